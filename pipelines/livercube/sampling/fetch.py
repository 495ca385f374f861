"""The only I/O of a box read: fetch byte ranges, concurrently, from disk or fsspec.

Returns the bytes of each :class:`~livercube.sampling.ranges.ByteRange` or ``None`` for an
object that does not exist (the caller decides whether that means "all fill" or "lost").
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from livercube.sampling.ranges import ByteRange

#: Up to this many local ranges are read in the calling thread: a pread from the page cache
#: takes tens of microseconds, less than handing it to a pool thread and back.
LOCAL_SERIAL = 16


def read_local(root: str, rng: ByteRange) -> bytes | None:
    """One range of a local file with ``pread`` (no file object, no seek: thread-safe)."""
    key, start, end = rng
    try:
        fd = os.open(os.path.join(root, key), os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        if start is None or start < 0 or end is None:
            size = os.fstat(fd).st_size
            if start is None:
                start, end = 0, size
            elif start < 0:
                start, end = max(0, size + start), size
            else:
                end = size
        return os.pread(fd, end - start, start)
    finally:
        os.close(fd)


def fetch_ranges(
    ranges: Sequence[ByteRange],
    *,
    root: str,
    fs: Any = None,
    pool: ThreadPoolExecutor | None = None,
) -> list[bytes | None]:
    """Fetch ``ranges`` of objects under ``root`` concurrently; ``None`` for a missing object.

    Local (``fs=None``): ``pread`` in ``pool``.  Async fsspec filesystems (s3fs, HTTP, GCS):
    one ``cat_ranges`` call, all requests in flight at once.  Other fsspec filesystems:
    ``cat_file`` per range in ``pool``.
    """
    if not ranges:
        return []
    if fs is None:
        if pool is None or len(ranges) <= LOCAL_SERIAL:
            return [read_local(root, r) for r in ranges]
        return list(pool.map(lambda r: read_local(root, r), ranges))
    paths = [f"{root}/{r.key}" for r in ranges]
    starts = [r.start for r in ranges]
    ends = [r.end for r in ranges]
    if getattr(fs, "async_impl", False):
        out = fs.cat_ranges(paths, starts, ends, on_error="return")
    else:

        def one(i: int):
            try:
                return fs.cat_file(paths[i], start=starts[i], end=ends[i])
            except FileNotFoundError as exc:
                return exc

        out = (
            list(pool.map(one, range(len(paths)))) if pool else [one(i) for i in range(len(paths))]
        )
    res: list[bytes | None] = []
    for o in out:
        if isinstance(o, FileNotFoundError):
            res.append(None)
        elif isinstance(o, BaseException):
            raise o
        else:
            res.append(o)
    return res


__all__ = ["fetch_ranges", "read_local"]
