"""Pack errors; each message names the pack, the file or the field to fix."""


class PackError(Exception):
    """Base of every pack problem."""


class InvalidPackRefError(PackError, ValueError):
    """A pack name or version that is not allowed (could escape the store, or is malformed)."""


class PackNotFoundError(PackError, LookupError):
    """No such pack, or no such version of it."""


class PackCorruptError(PackError):
    """A pack on disk that fails validation: missing or damaged file, inconsistent manifest."""


class PackIncompatibleError(PackError):
    """A valid pack that belongs to another backbone (fingerprint or hidden size)."""
