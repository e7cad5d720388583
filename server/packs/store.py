"""The pack store on disk: `<root>/<name>/<version>/`. Names and versions are validated before
any path is built, and only whole, renamed-into-place versions are ever listed."""

from __future__ import annotations

import re
from pathlib import Path

from server.packs.errors import PackNotFoundError
from server.packs.format import (
    DEFAULT_MAX_PACK_BYTES,
    BackboneInfo,
    Manifest,
    Pack,
    PackContent,
    read_manifest,
    read_pack,
)
from server.packs.format import write_pack as _write_pack
from server.packs.names import NAME_PATTERN, PackRef, validate_name
from server.settings import Settings

_MAX_PUBLISH_ATTEMPTS = 8
# A version directory: ASCII digits without a leading zero, exactly what str(version) writes
# ('²'.isdigit() holds but int('²') fails; '01' would shadow version 1).
_VERSION_DIR = re.compile(r"[1-9][0-9]{0,17}")

FileSignature = tuple[tuple[str, int, int, int], ...]


class PackStore:
    def __init__(self, root: Path, *, max_pack_bytes: int = DEFAULT_MAX_PACK_BYTES) -> None:
        """`max_pack_bytes` (Settings.max_pack_bytes): a version whose files together are larger
        is refused before any of them is read."""
        self.root = root
        self.max_pack_bytes = max_pack_bytes

    @classmethod
    def from_settings(cls, settings: Settings) -> PackStore:
        """The store every entry point uses: LKS_PACKS_DIR, bounded by LKS_MAX_PACK_MB."""
        return cls(settings.packs_dir, max_pack_bytes=settings.max_pack_bytes)

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(
            p.name for p in self.root.iterdir() if p.is_dir() and NAME_PATTERN.fullmatch(p.name)
        )

    def versions(self, name: str) -> list[int]:
        pack_dir = self.root / validate_name(name)
        if not pack_dir.is_dir():
            return []
        return sorted(
            int(p.name) for p in pack_dir.iterdir() if _VERSION_DIR.fullmatch(p.name) and p.is_dir()
        )

    def resolve(self, ref: PackRef) -> PackRef:
        """Pin a reference to a concrete version (the latest when none is given)."""
        versions = self.versions(ref.name)
        if not versions:
            raise PackNotFoundError(f"no pack named {ref.name!r} in {self.root}")
        if ref.version is None:
            return PackRef(ref.name, versions[-1])
        if ref.version not in versions:
            raise PackNotFoundError(
                f"pack {ref.name!r} has no version {ref.version} "
                f"(versions: {', '.join(map(str, versions))})"
            )
        return ref

    def path(self, ref: PackRef) -> Path:
        resolved = self.resolve(ref)
        return self.root / resolved.name / str(resolved.version)

    def manifest(self, ref: PackRef) -> Manifest:
        return read_manifest(self.path(ref))

    def load(self, ref: PackRef) -> Pack:
        return read_pack(self.path(ref), max_bytes=self.max_pack_bytes)

    def signature(self, ref: PackRef) -> FileSignature:
        """What a version's files look like on disk (name, inode, size, mtime), cheap to compare:
        a version refused once is not read again until one of its files changes."""
        path = self.path(ref)
        entries = []
        for entry in sorted(path.iterdir()):
            try:
                info = entry.stat()
            except FileNotFoundError:
                continue
            entries.append((entry.name, info.st_ino, info.st_size, info.st_mtime_ns))
        return tuple(entries)

    def publish(self, name: str, content: PackContent, backbone: BackboneInfo) -> Manifest:
        """Write `content` as the next version of `name`; racing publishers get distinct ones."""
        pack_dir = self.root / validate_name(name)
        pack_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(_MAX_PUBLISH_ATTEMPTS):
            version = (self.versions(name) or [0])[-1] + 1
            try:
                return _write_pack(
                    content,
                    name=name,
                    version=version,
                    backbone=backbone,
                    destination=pack_dir / str(version),
                )
            except OSError:
                if not (pack_dir / str(version)).exists():
                    raise  # a real write error, not a lost race for the version number
        raise RuntimeError(f"could not claim a new version of pack {name!r}; too much contention")
