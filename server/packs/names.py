"""Pack names and versions. They become directory names, so they are checked before any path is
built: nothing a user types can escape the pack store."""

from __future__ import annotations

import re
from dataclasses import dataclass

from server.packs.errors import InvalidPackRefError

NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_RULE = "lowercase letters, digits, '.', '_' or '-', starting with a letter or digit, at most 64"


def validate_name(name: str) -> str:
    if not NAME_PATTERN.fullmatch(name) or ".." in name:
        raise InvalidPackRefError(f"invalid pack name {name!r}: use {_RULE}")
    return name


def validate_version(version: str) -> int:
    if not NAME_PATTERN.fullmatch(version):
        raise InvalidPackRefError(f"invalid pack version {version!r}: use {_RULE}")
    if not version.isdigit() or int(version) < 1:
        raise InvalidPackRefError(
            f"invalid pack version {version!r}: versions are positive integers such as 3"
        )
    return int(version)


@dataclass(frozen=True)
class PackRef:
    """`NAME` (the latest version) or `NAME@VERSION`."""

    name: str
    version: int | None = None

    @classmethod
    def parse(cls, text: str) -> PackRef:
        name, sep, version = text.strip().partition("@")
        if sep and version == "latest":
            return cls(validate_name(name))
        return cls(validate_name(name), validate_version(version) if sep else None)

    def __str__(self) -> str:
        return self.name if self.version is None else f"{self.name}@{self.version}"
