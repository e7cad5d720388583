"""API keys with roles and per-key pack allow-lists; off only while no keys file is configured.

Keys live in a JSON file (`LKS_API_KEYS_FILE`), stored as SHA-256 hashes: the file never holds
a usable secret. A request presents `Authorization: Bearer <key>` (what the OpenAI SDK sends).
Roles are ordered: `read` (generate with allowed packs) < `write` (also submit facts to allowed
packs and follow their jobs) < `admin` (pack administration and every job); a key's pack
allow-list bounds what every role sees and manages.

Auth fails closed: a configured keys file that is missing, unreadable, malformed or empty stops
the server from starting (`KeysFileError`), and one that turns bad while serving makes every
request answer 503 until it is fixed (see `Authenticator`). It never falls back to "no auth".
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import secrets
import tempfile
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, ValidationError

from server.api.errors import APIError

log = logging.getLogger(__name__)

Role = Literal["read", "write", "admin"]
RANK: dict[str, int] = {"read": 0, "write": 1, "admin": 2}


class KeysFileError(Exception):
    """The API keys file cannot be used; the message names the file and what to fix."""


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


def _parse_keys(path: Path, text: str) -> list[KeyRecord]:
    """Every record, or KeysFileError naming the file and the first problem."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise KeysFileError(f"API keys file {path} is not valid JSON ({exc})") from None
    if not isinstance(raw, list):
        raise KeysFileError(f"API keys file {path} must hold a JSON list of keys")
    records = []
    for number, item in enumerate(raw):
        try:
            records.append(KeyRecord.model_validate(item))
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc'])) or 'key'}: {e['msg']}" for e in exc.errors()
            )
            raise KeysFileError(f"API keys file {path}: key {number}: {problems}") from None
    for field_name in ("name", "sha256"):
        values = [getattr(r, field_name) for r in records]
        if len(set(values)) != len(values):
            raise KeysFileError(f"API keys file {path}: two keys share a {field_name}")
    return records


def stored_keys(path: Path, *, missing_ok: bool = False) -> list[KeyRecord]:
    """The keys `path` holds, for the CLI to show or edit: a missing file is [] if `missing_ok`
    (`lks keys add` creates it); an unreadable or malformed one is never treated as empty, so
    an edit cannot overwrite keys it failed to read."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        if missing_ok:
            return []
        raise KeysFileError(
            f"API keys file {path} does not exist; create it with `lks keys add`, "
            "or unset LKS_API_KEYS_FILE to serve without auth"
        ) from None
    except OSError as exc:
        raise KeysFileError(f"API keys file {path} cannot be read: {exc.strerror}") from None
    return _parse_keys(path, text)


def read_keys(path: Path) -> list[KeyRecord]:
    """The keys to serve with: a missing, unreadable, malformed or empty file is an error,
    never "auth off" (whoever set LKS_API_KEYS_FILE meant to turn auth on)."""
    records = stored_keys(path)
    if not records:
        raise KeysFileError(
            f"API keys file {path} holds no keys; add one with `lks keys add`, "
            "or unset LKS_API_KEYS_FILE to serve without auth"
        )
    return records


def _write_keys(path: Path, records: list[KeyRecord]) -> None:
    """Replace the file atomically (a server reading it sees the old or the new list, never
    half of one), readable by its owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps([r.model_dump() for r in records], indent=2) + "\n"
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def add_key(path: Path, name: str, role: Role, packs: Iterable[str], rpm: int | None) -> str:
    """Create a key, store its hash in `path` (created if missing), return the key (shown once).
    ValueError when the name is taken; KeysFileError when the file exists but cannot be used."""
    records = stored_keys(path, missing_ok=True)
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
    _write_keys(path, [*records, record])
    return key


def revoke_key(path: Path, name: str) -> list[KeyRecord]:
    """Remove the key called `name`; returns the keys left. A running server refuses the key
    from its next request on (it notices the file changed)."""
    records = stored_keys(path)
    kept = [r for r in records if r.name != name]
    if len(kept) == len(records):
        raise ValueError(f"no key named {name!r} in {path}; `lks keys list` shows the names")
    _write_keys(path, kept)
    return kept


FileSignature = tuple[int, int, int, int, int]  # device, inode, size, mtime and ctime in ns


def _signature(path: Path) -> FileSignature | None:
    """What changes whenever the file is rewritten: `lks keys` replaces it (a new inode); an
    in-place edit changes the size or the times. None when the file cannot be looked at."""
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@dataclass
class _Bucket:
    tokens: float
    updated: float


class Authenticator:
    """Checks a request's key, role, packs and rate; holds the per-key token buckets.

    The keys file is looked at (one `stat`) on every request and re-read only when it changed,
    so `lks keys revoke` or `lks keys add` take effect without a restart.

    If the file turns missing, unreadable, malformed or empty while serving, every request is
    refused with 503 and the error is logged once, until the file is valid again. Keeping the
    last good keys instead would be the quieter choice, but the usual reason to edit the file is
    to revoke a key, and a botched edit would then silently keep that key working; refusing
    everyone is visible (5xx alerts, a log error), safe, and ends as soon as the file is fixed.
    503 rather than 401: the caller's key is not at fault, the server's configuration is.
    """

    def __init__(self, keys_file: Path | None) -> None:
        """`keys_file` None: auth is off. Otherwise it must be usable now (KeysFileError)."""
        self.keys_file = keys_file
        self._lock = threading.Lock()
        self._buckets: dict[str, _Bucket] = {}
        self._by_hash: dict[str, KeyRecord] = {}
        self._signature: FileSignature | None = None
        self._broken = False
        if keys_file is not None:
            signature = _signature(keys_file)  # before reading: a change in between is re-read
            self._install(read_keys(keys_file), signature)

    @property
    def enabled(self) -> bool:
        return self.keys_file is not None

    def _install(self, records: list[KeyRecord], signature: FileSignature | None) -> None:
        self._by_hash = {r.sha256: r for r in records}
        self._signature = signature
        self._broken = False
        self._buckets = {h: b for h, b in self._buckets.items() if h in self._by_hash}

    def _current(self, path: Path) -> dict[str, KeyRecord]:
        """The keys the file holds now; 503 while it is unusable."""
        with self._lock:
            self._refresh(path)
            if not self._broken:
                return self._by_hash
        raise APIError(
            503,
            "authentication is unavailable: the server's API keys file is unusable; "
            "the operator must fix it (the server log says how)",
            retry_after=10,
        )

    def _refresh(self, path: Path) -> None:
        """Re-read the file if it changed since the last look; call with the lock held."""
        signature = _signature(path)
        if signature is not None and signature == self._signature:
            return
        if signature is None and self._signature is None and self._broken:
            return  # still missing: said so already
        was_broken = self._broken
        try:
            records = read_keys(path)
        except KeysFileError as exc:
            log.error("%s; every request is refused (503) until it is fixed", exc)
            self._by_hash, self._signature, self._broken = {}, signature, True
            return
        self._install(records, signature)
        log.info("API keys reloaded from %s: %d key(s)", path, len(records))
        if was_broken:
            log.warning("API keys file %s is usable again", path)

    def authenticate(self, authorization: str | None) -> KeyRecord | None:
        """The caller's key record (None when auth is off); 401, 429 or 503 otherwise. Runs
        before a route looks at anything else, so every request with a known key counts to its
        rate, one that is then refused (403) too."""
        if self.keys_file is None:
            return None
        by_hash = self._current(self.keys_file)
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise APIError(401, "an API key is required: send 'Authorization: Bearer <key>'")
        record = by_hash.get(hash_key(key.strip()))
        if record is None:
            raise APIError(401, "unknown API key")
        self._rate(record)
        return record

    def authorize(self, record: KeyRecord | None, role: Role, packs: Iterable[str] = ()) -> None:
        """403 unless `record` has `role` (or above) and may use every pack in `packs`."""
        if record is None:
            return
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


@dataclass(frozen=True)
class Caller:
    """Who is asking (already authenticated): checks role and packs against an endpoint."""

    auth: Authenticator
    key: KeyRecord | None  # None: auth is off

    def require(self, role: Role, packs: Iterable[str] = ()) -> None:
        """403 unless the key has `role` and may use every pack in `packs`."""
        self.auth.authorize(self.key, role, packs)

    def allows(self, pack: str) -> bool:
        """Whether the caller may see or manage `pack` (for filtering listings)."""
        return self.key is None or self.key.allows(pack)

    @property
    def pack_scope(self) -> list[str] | None:
        """The packs the key is limited to; None when it may use every pack."""
        if self.key is None or "*" in self.key.packs:
            return None
        return list(self.key.packs)
