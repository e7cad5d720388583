"""Databases for the job store tests: SQLite in a temporary file, and PostgreSQL (a fresh
database per test on the local server) where one is reachable; and the tools to make races
happen on cue there (another session holding a lock, counting the sessions that wait)."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import pytest

T = TypeVar("T")

PG_ADMIN_URL = os.environ.get(
    "LKS_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


def _pg_reachable() -> str | None:
    try:
        import psycopg

        with psycopg.connect(PG_ADMIN_URL.replace("+psycopg", ""), connect_timeout=3):
            return None
    except Exception as exc:  # any failure means: skip, and say why
        return f"PostgreSQL not reachable at {PG_ADMIN_URL} ({exc}); set LKS_TEST_PG_URL"


@contextmanager
def database_url(kind: str, tmp_path: Path) -> Iterator[str]:
    if kind == "sqlite":
        yield f"sqlite:///{tmp_path / 'jobs.db'}"
        return
    reason = _pg_reachable()
    if reason:
        pytest.skip(reason)
    import psycopg

    name = f"lks_test_{uuid.uuid4().hex[:10]}"
    admin = PG_ADMIN_URL.replace("+psycopg", "")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _plain(url: str) -> str:
    return url.replace("+psycopg", "")


@contextmanager
def later_database(tmp_path: Path) -> Iterator[tuple[str, Callable[[], None]]]:
    """A PostgreSQL URL whose database does not exist yet, and the function that creates it:
    a database that is down, then comes back."""
    reason = _pg_reachable()
    if reason:
        pytest.skip(reason)
    import psycopg

    name = f"lks_test_{uuid.uuid4().hex[:10]}"
    admin = _plain(PG_ADMIN_URL)

    def create() -> None:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')

    try:
        yield PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}", create
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def holding(url: str, statement: str) -> Iterator[None]:
    """Run `statement` (a LOCK TABLE, a CREATE TABLE...) in a transaction of another session
    that stays open, and so keeps its locks, until the block ends; then roll it back."""
    import psycopg

    with psycopg.connect(_plain(url)) as conn:
        conn.execute(statement)
        try:
            yield
        finally:
            conn.rollback()


def sessions_waiting_on_locks(url: str) -> int:
    """How many sessions of this database are waiting for a lock (a row, a table, a
    transaction, an advisory lock)."""
    import psycopg

    with psycopg.connect(_plain(url), autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE datname = current_database() AND wait_event_type = 'Lock'"
        ).fetchone()
    return int(row[0]) if row else 0


def terminate_sessions(url: str) -> int:
    """Kill every other session of this database, as a database restart or a failover would."""
    import psycopg

    with psycopg.connect(_plain(url), autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchall()
    return len(rows)


def wait_for(condition: Callable[[], T], timeout: float = 20.0, what: str = "condition") -> T:
    """Poll `condition` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"{what} not reached after {timeout} s"
        time.sleep(0.02)
    return value
