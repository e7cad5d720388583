"""Edit packs as data: the on-disk format, the store of versions, and (later) the live registry."""

from server.packs.errors import (
    InvalidPackRefError,
    PackCorruptError,
    PackError,
    PackIncompatibleError,
    PackNotFoundError,
)
from server.packs.format import FORMAT_VERSION, Manifest, Pack, PackContent, SubjectEntry
from server.packs.names import PackRef
from server.packs.store import PackStore

__all__ = [
    "FORMAT_VERSION",
    "InvalidPackRefError",
    "Manifest",
    "Pack",
    "PackContent",
    "PackCorruptError",
    "PackError",
    "PackIncompatibleError",
    "PackNotFoundError",
    "PackRef",
    "PackStore",
    "SubjectEntry",
]
