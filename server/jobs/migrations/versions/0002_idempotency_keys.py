"""idempotency_keys: one row per (pack, Idempotency-Key) with the request's hash

Revision ID: 0002
Revises: 0001

Keys used before this revision lived only on the facts they wrote; they become rows without a
hash (any retry under them replays, as it did).
"""

import itertools

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

TZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    keys = op.create_table(
        "idempotency_keys",
        sa.Column("pack", sa.String(64), primary_key=True),
        sa.Column("key", sa.String(200), primary_key=True),
        sa.Column("request_hash", sa.String(64)),
        sa.Column("job_id", sa.Integer, sa.ForeignKey("jobs.id"), nullable=False),
        sa.Column("fact_ids", sa.JSON, nullable=False),
        sa.Column("created_at", TZ, nullable=False),
    )
    facts = sa.table(
        "facts",
        sa.column("id", sa.Integer),
        sa.column("pack", sa.String),
        sa.column("job_id", sa.Integer),
        sa.column("idempotency_key", sa.String),
        sa.column("created_at", TZ),
    )
    rows = op.get_bind().execute(
        sa.select(
            facts.c.pack, facts.c.idempotency_key, facts.c.id, facts.c.job_id, facts.c.created_at
        )
        .where(facts.c.idempotency_key.is_not(None))
        .order_by(facts.c.pack, facts.c.idempotency_key, facts.c.id)
    )
    earlier = []
    for (pack, key), group in itertools.groupby(rows, key=lambda r: (r.pack, r.idempotency_key)):
        written = list(group)
        earlier.append(
            {
                "pack": pack,
                "key": key,
                "request_hash": None,
                "job_id": written[0].job_id,
                "fact_ids": [r.id for r in written],
                "created_at": written[0].created_at,
            }
        )
    if earlier:
        op.bulk_insert(keys, earlier)


def downgrade() -> None:
    op.drop_table("idempotency_keys")
