"""Decode NIfTI bytes honestly: gzip and header errors become :class:`UnreadableFileError`.

Why by hand around nibabel: the real PLC-CECT files are ``.nii.gz`` that may be truncated, RGB,
or 4-D/5-D with singleton trailing axes; we want one clear error per file and the raw array and
affine, without nibabel's lazy proxies holding file handles across dask tasks.

Why streamed: a ``.nii.gz`` of a few MB can expand to many GiB (a decompression bomb, or just a
wrong header).  The header is read first and its declared image size checked against a limit
(:data:`MAX_NIFTI_BYTES`, overridable with the environment variable named by
:data:`MAX_NIFTI_BYTES_ENV`) *before* any voxel is decompressed; then exactly the declared bytes
are read, so memory stays bounded by the limit whatever the stream holds.
"""

from __future__ import annotations

import gzip
import io
import math
import os
import re
import zlib
from dataclasses import dataclass, field

import fsspec
import nibabel as nib
import numpy as np

from livercube.errors import UnreadableFileError, UsageError

#: Largest decompressed image (voxel bytes declared by the header) we agree to read.  The
#: largest real PLC-CECT file (512×512×~400, RGB) is ~300 MB; 1 GiB leaves room and keeps a
#: worker's memory bounded.  Raise it with ``LIVERCUBE_MAX_NIFTI_BYTES=4GiB`` (or bytes).
MAX_NIFTI_BYTES = 1 << 30
MAX_NIFTI_BYTES_ENV = "LIVERCUBE_MAX_NIFTI_BYTES"
#: After the declared image, at most this much of the stream is drained to let gzip check its
#: CRC; more than that is trailing data, noted and not read.
_TRAILER_PROBE_BYTES = 1 << 20
_CHUNK = 16 << 20
_UNITS = {"": 1, "b": 1, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}
_UNITS |= {"kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
#: NIfTI intent code of a vector-valued image (what SimpleITK writes for RGB / vector images,
#: shape x, y, z, 1, components).
INTENT_VECTOR = 1007


def max_nifti_bytes() -> int:
    """The configured limit: :data:`MAX_NIFTI_BYTES_ENV` if set (``"2GiB"``, ``"500MB"``, bytes)."""
    text = os.environ.get(MAX_NIFTI_BYTES_ENV, "").strip()
    if not text:
        return MAX_NIFTI_BYTES
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmgt]i?b|b)?", text.lower())
    if not m:
        raise UsageError(
            f"{MAX_NIFTI_BYTES_ENV}={text!r}: expected a size such as 2GiB, 500MB or 1073741824"
        )
    return int(float(m[1]) * _UNITS[m[2] or ""])


def _human(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.1f} MiB"


@dataclass
class NiftiImage:
    """Raw (unscaled) voxels in nibabel's (i, j, k, …) order with the header facts we need."""

    data: np.ndarray
    affine: np.ndarray  # RAS, nibabel's best affine (sform if set, else qform)
    facts: dict
    slope: float | None = None  # scl_slope / scl_inter; None when the header says "no scaling"
    inter: float | None = None
    notes: list[str] = field(default_factory=list)


def read_bytes(url: str, storage_options: dict | None = None) -> bytes:
    try:
        with fsspec.open(url, "rb", **(storage_options or {})) as f:
            return f.read()
    except FileNotFoundError as exc:
        raise UnreadableFileError(url, "file not found") from exc


def _read_exact(stream, n: int, url: str, what: str) -> bytearray:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = stream.readinto(view[got : min(n, got + _CHUNK)])
        if not k:
            raise UnreadableFileError(
                url, f"truncated file: {what} needs {n} bytes, only {got} present"
            )
        got += k
    return buf


def _header(stream, url: str):
    head = _read_exact(stream, 4, url, "the header")
    size = int.from_bytes(head, "little")
    if size not in (348, 540):
        size = int.from_bytes(head, "big")
    if size == 348:
        cls = nib.Nifti1Header
    elif size == 540:
        cls = nib.Nifti2Header
    else:
        raise UnreadableFileError(url, "not a readable NIfTI-1 file (sizeof_hdr is not 348 or 540)")
    raw = bytes(head) + bytes(_read_exact(stream, size - 4, url, "the header"))
    try:
        return cls.from_fileobj(io.BytesIO(raw), check=True), size
    except Exception as exc:  # nibabel raises several types for bad headers
        raise UnreadableFileError(url, f"not a readable NIfTI-1 file ({exc})") from exc


def shear_deg(affine: np.ndarray) -> float:
    """Largest deviation (degrees) from 90° between two voxel axes of an affine (0: no shear)."""
    m = np.asarray(affine, dtype=np.float64)[:3, :3]
    n = np.linalg.norm(m, axis=0)
    if np.any(n == 0):
        return 90.0
    u = m / n
    worst = 0.0
    for a, b in ((0, 1), (0, 2), (1, 2)):
        worst = max(worst, abs(90.0 - math.degrees(math.acos(np.clip(u[:, a] @ u[:, b], -1, 1)))))
    return worst


def geometry_notes(header) -> list[str]:
    """What is suspicious in a header's qform/sform (shear, disagreement), as readable notes."""
    notes = []
    sform, scode = header.get_sform(coded=True)
    qform, qcode = header.get_qform(coded=True)
    used = "sform" if scode else "qform" if qcode else None
    best = header.get_best_affine()
    s = shear_deg(best)
    if s > 1e-3:
        notes.append(
            f"{used or 'header'} affine is sheared ({s:.2f}° from perpendicular voxel axes): "
            "stored on the nearest axis-aligned grid without resampling; this release's "
            "geometry headers are untrusted anyway"
        )
    if scode and qcode and not np.allclose(sform, qform, atol=1e-3):
        notes.append("sform and qform disagree; the sform was used (NIfTI rule)")
    return notes


def load_nifti(
    url: str, storage_options: dict | None = None, *, max_bytes: int | None = None
) -> NiftiImage:
    """Raw data, RAS affine and header facts of a .nii / .nii.gz, read as a bounded stream.

    Refuses, before decompressing voxels, any file whose header declares more than
    ``max_bytes`` (default :func:`max_nifti_bytes`) of image data.
    """
    limit = max_nifti_bytes() if max_bytes is None else max_bytes
    notes: list[str] = []
    try:
        with fsspec.open(url, "rb", **(storage_options or {})) as raw:
            magic = raw.read(2)
            raw.seek(0)
            stream = gzip.GzipFile(fileobj=raw, mode="rb") if magic == b"\x1f\x8b" else raw
            hdr, hsize = _header(stream, url)
            try:
                shape = tuple(int(v) for v in hdr.get_data_shape())
                dtype = hdr.get_data_dtype()
            except Exception as exc:
                raise UnreadableFileError(url, f"not a readable NIfTI-1 file ({exc})") from exc
            if any(v <= 0 for v in shape):
                raise UnreadableFileError(url, f"header declares an empty image, shape {shape}")
            declared = math.prod(shape) * dtype.itemsize
            if declared > limit:
                raise UnreadableFileError(
                    url,
                    f"header declares a {_human(declared)} image (shape {shape}, {dtype}), more "
                    f"than the {_human(limit)} limit; not read (a wrong header or a "
                    f"decompression bomb). Raise {MAX_NIFTI_BYTES_ENV} if the file is genuine",
                )
            offset = int(hdr.get_data_offset())
            if offset > hsize:
                _read_exact(stream, offset - hsize, url, "the header extensions")
            buf = _read_exact(stream, declared, url, f"a {shape} {dtype} image")
            rest = stream.read(_TRAILER_PROBE_BYTES)
            if rest:
                notes.append("data after the declared image ignored")
    except FileNotFoundError as exc:
        raise UnreadableFileError(url, "file not found") from exc
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise UnreadableFileError(url, f"truncated or corrupt gzip stream ({exc})") from exc
    data = np.frombuffer(buf, dtype=dtype).reshape(shape, order="F")
    slope, inter = hdr.get_slope_inter()
    if slope is not None and slope == 1.0 and not inter:
        slope = inter = None
    elif slope is not None and inter is None:
        inter = 0.0
    notes.extend(geometry_notes(hdr))
    facts = {
        "datatype": str(dtype),
        "dim": [int(v) for v in hdr["dim"][1 : 1 + int(hdr["dim"][0])]],
        "pixdim": [float(v) for v in hdr["pixdim"][1:4]],
        "qform_code": int(hdr["qform_code"]),
        "sform_code": int(hdr["sform_code"]),
        "intent_code": int(hdr["intent_code"]),
    }
    if slope is not None:
        facts["scl_slope"], facts["scl_inter"] = float(slope), float(inter or 0.0)
    affine = np.asarray(hdr.get_best_affine(), dtype=np.float64)
    return NiftiImage(data, affine, facts, slope, inter, notes)


def to_scalar_volume(data: np.ndarray, source: str) -> tuple[np.ndarray, list[str]]:
    """Reduce RGB and 4-D/5-D files to one 3-D scalar array; returns (array, notes).

    RGB comes in two encodings: the RGB24 datatype (a structured dtype) and the standard
    vector image (intent "vector", shape x, y, z, 1, components — what SimpleITK and ITK
    write).  RGB whose three channels agree (grey stored as colour) keeps one channel
    exactly; true colour is refused, because no HU can be recovered from it.
    """
    notes: list[str] = []
    if data.dtype.names:  # RGB24 / RGBA32 structured dtype
        channels = [np.asarray(data[n]) for n in data.dtype.names if n != "A"]
        data = np.stack(channels, axis=-1)
        notes.append(f"RGB file ({len(channels)} components)")
    elif data.ndim == 5 and data.shape[3] == 1 and data.shape[4] in (3, 4):
        data = data[:, :, :, 0, :]
        notes.append(f"vector image (x, y, z, 1, {data.shape[-1]}): read as RGB")
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
        notes.append("dropped a singleton trailing axis")
    if data.ndim == 4 and data.shape[-1] in (3, 4):
        rgb = data[..., :3]
        if not (
            np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])
        ):
            raise UnreadableFileError(
                source, "true-colour RGB CT: channels differ, no HU recoverable"
            )
        data = rgb[..., 0]
        notes.append("RGB channels identical: kept one")
    if data.ndim != 3:
        raise UnreadableFileError(source, f"expected a 3-D volume, got shape {data.shape}")
    return np.asarray(data), notes
