"""Read DICOM headers (never pixel data) from a local tree or any fsspec URL.

The I/O edge of the scanner: list the files below a source, and read each file's header
cheaply — locally up to the pixel data, remotely a prefix of :data:`HEADER_PREFIX_BYTES` first
and the whole object only when the header is longer.  Whether an uncompressed file holds all
the pixel bytes its header announces is judged here too (a truncated copy must not win over a
complete one, and must not be decoded as a slice).
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import fsspec
import pydicom
from fsspec.implementations.local import LocalFileSystem
from pydicom.errors import InvalidDicomError

#: How much of a remote file is fetched first; if the header is longer the whole file is read.
HEADER_PREFIX_BYTES = 64 * 1024

#: The (7FE0,0010) PixelData tag as stored, little and big endian.
PIXEL_TAG_LE = b"\xe0\x7f\x10\x00"
_PIXEL_TAG_BE = b"\x7f\xe0\x00\x10"
#: Bytes of the PixelData element's tag, VR and length before its value (PS3.5 7.1.2: OB/OW
#: carry two reserved bytes in explicit VR), by ``is_implicit_VR``.
PIXEL_ELEMENT_HEADER = {True: 8, False: 12}
#: Transfer syntaxes whose pixel bytes can be counted from the header (deflate compresses all).
_UNCOMPRESSED = frozenset(
    str(u)
    for u in pydicom.uid.UncompressedTransferSyntaxes
    if u != pydicom.uid.DeflatedExplicitVRLittleEndian
)


class NotDicomError(Exception):
    """The file is not a DICOM file (no preamble and no SOP class)."""


@dataclass
class Header:
    path: str
    size: int
    ds: pydicom.Dataset
    complete: bool | None  # uncompressed pixel bytes fully present? None: cannot tell
    #: offset of the pixel data element (where the header ends; None: not reached) and the
    #: file's bytes up to and including that element's own header, so the planner can note
    #: where a plain slice's pixels start and digest what precedes them
    pixel_at: int | None = None
    head: bytes = b""


#: Bytes of a pixel data element's own header (tag, VR, reserved, length) at most.
_ELEMENT_HEADER = max(PIXEL_ELEMENT_HEADER.values())


def header_digest(fileobj: Any, end: int) -> str:
    """Digest of the first ``end`` bytes of a file: its header when ``end`` is where the
    pixel data (or their value) start.  What planning derives from a header is a function of
    those bytes alone, so a task may reuse it for a file with the same digest."""
    fileobj.seek(0)
    h = hashlib.blake2b(digest_size=16)
    left = end
    while left > 0:
        block = fileobj.read(min(left, 1 << 20))
        if not block:
            break
        h.update(block)
        left -= len(block)
    h.update(f"|{end - left}".encode())
    return h.hexdigest()


#: What :func:`stored_value` returns for an element the dataset does not hold.
MISSING = object()


def stored_value(
    ds: pydicom.Dataset,
    tag: int,
    cache: dict | None,
    context: Any = None,
    convert: Callable[[Any], Any] = lambda value: value,
) -> Any:
    """``convert(ds[tag].value)``, or :data:`MISSING`; with ``cache``, converted once per
    distinct stored value.

    The files of a series repeat most attribute values, and converting a pydicom element
    costs ~10 µs where looking its stored bytes up costs ~1 µs.  The key is the element's
    raw bytes, VR and encoding plus ``context``: whatever else its conversion reads (the
    character set, PixelRepresentation for a US-or-SS value).
    """
    elem = ds.get_item(tag)
    if elem is None:
        return MISSING
    if cache is None or not isinstance(elem, pydicom.dataelem.RawDataElement):
        return convert(ds[tag].value)
    ident = (tag, elem.VR, elem.value, elem.is_little_endian, elem.is_implicit_VR, context)
    value = cache.get(ident, MISSING)
    if value is MISSING:
        value = cache[ident] = convert(ds[tag].value)
    return value


def _dcmread_header(buf: io.BytesIO | Any) -> pydicom.Dataset:
    try:
        return pydicom.dcmread(buf, stop_before_pixels=True)
    except InvalidDicomError:
        buf.seek(0)
        try:
            ds = pydicom.dcmread(buf, stop_before_pixels=True, force=True)
        except Exception as exc:
            raise NotDicomError(str(exc)) from exc
        if "SOPClassUID" not in ds or "SOPInstanceUID" not in ds:
            raise NotDicomError("no DICOM preamble and no SOP class") from None
        return ds


def _stopped_at_pixels(buf: io.BytesIO | Any, data: bytes | None = None) -> bool:
    pos = buf.tell()
    if data is None:
        head = buf.read(4)
        buf.seek(pos)
    else:
        head = data[pos : pos + 4]
    return head in (PIXEL_TAG_LE, _PIXEL_TAG_BE)


def _completeness(ds: pydicom.Dataset, size: int, header_end: int | None) -> bool | None:
    ts = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "")
    if header_end is None or ts not in _UNCOMPRESSED:
        return None
    try:
        expected = (
            int(ds.Rows)
            * int(ds.Columns)
            * int(ds.get("SamplesPerPixel", 1) or 1)
            * int(ds.get("NumberOfFrames", 1) or 1)
            * int(ds.BitsAllocated)
            // 8
        )
    except (AttributeError, TypeError, ValueError):
        return None
    element_header = PIXEL_ELEMENT_HEADER[ts == pydicom.uid.ImplicitVRLittleEndian]
    return size >= header_end + element_header + expected


def read_header(
    fs: fsspec.AbstractFileSystem, path: str, size: int, *, header_bytes: int = HEADER_PREFIX_BYTES
) -> Header:
    """Read one file's DICOM header; raises ``NotDicomError`` for anything else."""
    if isinstance(fs, LocalFileSystem):
        with fs.open(path, "rb") as f:
            ds = _dcmread_header(f)
            end = f.tell() if _stopped_at_pixels(f) else None
            head = b""
            if end is not None:
                f.seek(0)
                head = f.read(end + _ELEMENT_HEADER)
        return Header(path, size, ds, _completeness(ds, size, end), end, head)
    prefix = fs.cat_file(path, start=0, end=min(size, header_bytes))
    if len(prefix) < size:
        plausible = prefix[128:132] == b"DICM"
        buf = io.BytesIO(prefix)
        try:
            ds = _dcmread_header(buf)
            if _stopped_at_pixels(buf, prefix):
                end = buf.tell()
                head = prefix[: end + _ELEMENT_HEADER]
                return Header(path, size, ds, _completeness(ds, size, end), end, head)
            plausible = True  # parsed, but the header may go on beyond the prefix
        except Exception:
            pass
        if not plausible:
            raise NotDicomError("no DICOM header in the first bytes")
        prefix = fs.cat_file(path)
    buf = io.BytesIO(prefix)
    ds = _dcmread_header(buf)
    end = buf.tell() if _stopped_at_pixels(buf, prefix) else None
    head = prefix[: end + _ELEMENT_HEADER] if end is not None else b""
    return Header(path, size, ds, _completeness(ds, len(prefix), end), end, head)


def _walk_local(root: str) -> list[tuple[str, int]]:
    """``(path, size)`` of the regular files below a local directory, as ``fs.find`` sees them.

    ``LocalFileSystem.find`` builds an ``info`` dict per entry (a second ``stat``, the link
    target, path normalisation): about 40 µs a file on the client while every worker waits
    for the plan.  The same walk on ``os.scandir`` entries costs a few µs and keeps its rules:
    real directories are descended, only regular files are listed (symbolic links are
    neither), entries that vanish and folders that cannot be read are left out.
    """
    out: list[tuple[str, int]] = []
    posix = os.sep == "/"
    folders = [root]
    while folders:
        folder = folders.pop()
        try:
            with os.scandir(folder) as it:
                entries = list(it)
        except OSError:  # unreadable or vanished: fs.find omits it too
            continue
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    folders.append(entry.path)
                elif entry.is_file(follow_symlinks=False):
                    path = entry.path if posix else LocalFileSystem._strip_protocol(entry.path)
                    out.append((path, entry.stat(follow_symlinks=False).st_size))
            except FileNotFoundError:  # removed while listing
                continue
    return out


#: Folders (prefixes) listed at once on object storage, where each listing page is a request.
LIST_CONCURRENCY = 16


def list_files(fs: fsspec.AbstractFileSystem, root: str) -> list[tuple[str, int]]:
    """``(path, size)`` of every file below ``root`` (or ``root`` itself), sorted by path.

    On object storage one flat listing is a chain of requests of 1000 keys each, and the
    whole plan waits for it (85 pages in a row for the real collections); the top-level
    folders (patients, in every layout) are listed concurrently instead.
    """
    if fs.isfile(root):
        info = fs.info(root)
        return [(info["name"], int(info.get("size") or 0))]
    if isinstance(fs, LocalFileSystem):
        return sorted(_walk_local(fs._strip_protocol(root)))
    try:
        top = fs.ls(root, detail=True, refresh=True)
    except FileNotFoundError:  # nothing there: the planner says "no files found"
        return []
    found = {e["name"]: e for e in top if e.get("type", "file") == "file"}
    folders = [e["name"] for e in top if e.get("type") == "directory"]
    if folders:
        with ThreadPoolExecutor(max_workers=min(LIST_CONCURRENCY, len(folders))) as pool:
            for below in pool.map(lambda d: fs.find(d, detail=True), folders):
                found.update(below)
    out = []
    for name, info in found.items():
        if info.get("type", "file") != "file":
            continue
        out.append((name, int(info.get("size") or 0)))
    return sorted(out)
