"""facts, jobs, pack_versions

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

TZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "jobs",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("pack", sa.String(64), nullable=False, index=True),
        sa.Column("state", sa.String(16), nullable=False, index=True),
        sa.Column("created_at", TZ, nullable=False),
        sa.Column("started_at", TZ),
        sa.Column("finished_at", TZ),
        sa.Column("progress", sa.Float, nullable=False),
        sa.Column("eta_seconds", sa.Float),
        sa.Column("fact_count", sa.Integer),
        sa.Column("metrics", sa.JSON, nullable=False),
        sa.Column("error", sa.Text),
        sa.Column("published_version", sa.Integer),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("cancel_requested", sa.Boolean, nullable=False),
        sa.Column("lease_owner", sa.String(128)),
        sa.Column("lease_expires_at", TZ),
    )
    op.create_table(
        "facts",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("pack", sa.String(64), nullable=False, index=True),
        sa.Column("subject", sa.Text, nullable=False),
        sa.Column("prompt", sa.Text, nullable=False),
        sa.Column("target", sa.Text, nullable=False),
        sa.Column("extra", sa.JSON, nullable=False),
        sa.Column("job_id", sa.Integer, sa.ForeignKey("jobs.id"), nullable=False, index=True),
        sa.Column("idempotency_key", sa.String(200)),
        sa.Column("created_at", TZ, nullable=False),
        sa.Column("deleted_at", TZ),
    )
    op.create_index("ix_facts_pack_key", "facts", ["pack", "idempotency_key"])
    op.create_table(
        "pack_versions",
        sa.Column("pack", sa.String(64), primary_key=True),
        sa.Column("version", sa.Integer, primary_key=True),
        sa.Column("job_id", sa.Integer, sa.ForeignKey("jobs.id"), nullable=False),
        sa.Column("fact_ids", sa.JSON, nullable=False),
        sa.Column("metrics", sa.JSON, nullable=False),
        sa.Column("published_at", TZ, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("pack_versions")
    op.drop_table("facts")
    op.drop_table("jobs")
