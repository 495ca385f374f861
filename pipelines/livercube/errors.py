"""Exception types.

Every error a user can meet names the input and says what is wrong with it in terms of the
image (slices, orientation, spacing, segments), not in terms of our code.  The converter catches
:class:`SourceError` per input, reports it and moves on; anything else is a bug and is reported
as a failure with its traceback.
"""

from __future__ import annotations


class LivercubeError(Exception):
    """Base class of all livercube errors."""


class SourceError(LivercubeError):
    """An input file or series cannot be converted as it is; the rest of the collection can."""

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason


class UnreadableFileError(SourceError):
    """A file is truncated, corrupt or not in the format its name promises."""


class GeometryError(SourceError):
    """Slice positions or orientations do not describe one regular 3-D grid."""


class MaskMismatchError(SourceError):
    """A mask does not lie on the grid of the CT it annotates."""


class StoreError(LivercubeError):
    """The store is missing, incomplete or does not follow the livercube contract."""


class StoreBusyError(StoreError):
    """Another run holds the store's writer lease; two writers would corrupt each other."""


class StoreFullError(StoreError):
    """The destination ran out of space (or quota); what was stored before is kept."""


class ForeignFilesError(StoreError):
    """The destination holds files livercube did not write where it would write; untouched."""


class VolumeNotFoundError(StoreError, KeyError):
    """No complete volume with this key or index in the store."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class SegmentLimitError(LivercubeError):
    """More source segments than the store's segment bit field can hold (64)."""


class UsageError(LivercubeError):
    """The command line or API call is inconsistent (exit status 2)."""


class IntensityError(SourceError):
    """Stored pixel values cannot be turned into exact int16 HU (non-integer or out of range)."""


class SlantedStackError(GeometryError):
    """Slice origins drift in-plane along the stack (gantry tilt, shear): no orthogonal grid."""


class StoreIntegrityError(StoreError):
    """Stored bytes of a complete volume are missing or no longer what the writer wrote.

    ``object`` is the store key (``<volume>/<array>/c/<i>/<j>/<k>``) of the damaged object, so
    the user can re-convert that volume (``livercube convert --overwrite --only PATIENT``) or
    report the file; ``livercube verify`` lists every such object of a store.
    """

    def __init__(self, url: str, obj: str, reason: str) -> None:
        super().__init__(f"{url.rstrip('/')}/{obj}: {reason}")
        self.url = url
        self.object = obj
        self.reason = reason


class MissingShardError(StoreIntegrityError):
    """A shard object of a volume recorded as complete is absent (and not an all-fill shard)."""


class ChecksumMismatchError(StoreIntegrityError):
    """A chunk's or shard index's stored CRC-32C does not match its bytes: corrupt data."""


class VolumeIncompleteError(StoreError):
    """The catalog lists a volume whose group is missing or has no completion record."""


class RemoteReadError(StoreError):
    """An object store or web server failed a read of the store, retries included.

    ``url`` is the object's full URL, so the message says which bucket/server and which object;
    network blips and throttling are retried with backoff before this is raised.
    """

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"{url}: {reason}")
        self.url = url
        self.reason = reason


class RemoteAccessDeniedError(RemoteReadError, PermissionError):
    """The store refused the read (HTTP 401/403, or no credentials to sign with).

    Also a :class:`PermissionError`, as fsspec reports a refused read.
    """
