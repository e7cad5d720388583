"""API keys with roles and per-key pack allow-lists; off until keys are configured.

Keys live in a JSON file (`LKS_API_KEYS_FILE`), stored as SHA-256 hashes: the file never holds
a usable secret. A request presents `Authorization: Bearer <key>` (what the OpenAI SDK sends).
Roles are ordered: `read` (generate with allowed packs) < `write` (also submit facts to allowed
packs) < `admin` (pack administration and every pack's jobs).
"""

from __future__ import annotations

import hashlib
import json
import math
import secrets
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from server.api.errors import APIError

Role = Literal["read", "write", "admin"]
RANK: dict[str, int] = {"read": 0, "write": 1, "admin": 2}


class KeyRecord(BaseModel):
    name: str = Field(min_length=1, max_length=64)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    role: Role
    packs: list[str] = Field(default_factory=lambda: ["*"])  # "*": every pack
    requests_per_minute: int | None = Field(default=None, ge=1)

    def allows(self, pack: str) -> bool:
        return "*" in self.packs or pack in self.packs


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return "lks-" + secrets.token_urlsafe(24)


def load_keys(path: Path) -> list[KeyRecord]:
    raw = json.loads(path.read_text()) if path.is_file() else []
    return [KeyRecord.model_validate(r) for r in raw]


def add_key(path: Path, name: str, role: Role, packs: Iterable[str], rpm: int | None) -> str:
    """Create a key, store its hash in `path`, return the key (shown once)."""
    records = load_keys(path)
    if any(r.name == name for r in records):
        raise ValueError(f"a key named {name!r} exists already")
    key = new_key()
    record = KeyRecord(
        name=name,
        sha256=hash_key(key),
        role=role,
        packs=list(packs) or ["*"],
        requests_per_minute=rpm,
    )
    records.append(record)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([r.model_dump() for r in records], indent=2) + "\n")
    return key


@dataclass
class _Bucket:
    tokens: float
    updated: float


@dataclass
class Authenticator:
    """Checks a request's key, role, packs and rate; holds the per-key token buckets."""

    keys: list[KeyRecord]
    _by_hash: dict[str, KeyRecord] = field(init=False)
    _buckets: dict[str, _Bucket] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self._by_hash = {k.sha256: k for k in self.keys}

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    def check(
        self, authorization: str | None, role: Role, packs: Iterable[str] = ()
    ) -> KeyRecord | None:
        """The caller's key record (None when auth is off); 401/403/429 otherwise."""
        if not self.enabled:
            return None
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise APIError(401, "an API key is required: send 'Authorization: Bearer <key>'")
        record = self._by_hash.get(hash_key(key.strip()))
        if record is None:
            raise APIError(401, "unknown API key")
        if RANK[record.role] < RANK[role]:
            raise APIError(
                403,
                f"key {record.name!r} has role {record.role!r}; this needs {role!r}",
                type_="permission_error",
            )
        denied = sorted(p for p in packs if not record.allows(p))
        if denied:
            raise APIError(
                403,
                f"key {record.name!r} may not use pack(s) {', '.join(denied)}",
                type_="permission_error",
                param="pack",
            )
        self._rate(record)
        return record

    def _rate(self, record: KeyRecord) -> None:
        if record.requests_per_minute is None:
            return
        rate = record.requests_per_minute / 60.0
        now = time.monotonic()
        with self._lock:
            bucket = self._buckets.setdefault(
                record.sha256, _Bucket(record.requests_per_minute, now)
            )
            bucket.tokens = min(
                record.requests_per_minute, bucket.tokens + (now - bucket.updated) * rate
            )
            bucket.updated = now
            if bucket.tokens < 1:
                wait = math.ceil((1 - bucket.tokens) / rate)
                raise APIError(
                    429,
                    f"key {record.name!r} is over its rate limit of "
                    f"{record.requests_per_minute} requests per minute",
                    retry_after=wait,
                )
            bucket.tokens -= 1
