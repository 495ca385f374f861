"""Decode NIfTI bytes honestly: gzip and header errors become :class:`UnreadableFileError`.

Why by hand around nibabel: the real PLC-CECT files are ``.nii.gz`` that may be truncated, RGB,
or 4-D/5-D with singleton trailing axes; we want one clear error per file and the raw array and
affine, without nibabel's lazy proxies holding file handles across dask tasks.
"""

from __future__ import annotations

import gzip
import io
import zlib

import fsspec
import nibabel as nib
import numpy as np

from livercube.errors import UnreadableFileError


def read_bytes(url: str, storage_options: dict | None = None) -> bytes:
    try:
        with fsspec.open(url, "rb", **(storage_options or {})) as f:
            return f.read()
    except FileNotFoundError as exc:
        raise UnreadableFileError(url, "file not found") from exc


def load_nifti(
    url: str, storage_options: dict | None = None
) -> tuple[np.ndarray, np.ndarray, dict]:
    """(data in nibabel's (i, j, k, …) order, RAS affine, header facts) of a .nii / .nii.gz."""
    raw = read_bytes(url, storage_options)
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (EOFError, OSError, zlib.error) as exc:
            raise UnreadableFileError(url, f"truncated or corrupt gzip stream ({exc})") from exc
    try:
        img = nib.Nifti1Image.from_stream(io.BytesIO(raw))
        data = np.asanyarray(img.dataobj)
    except Exception as exc:  # nibabel raises several types for bad headers/short data
        raise UnreadableFileError(url, f"not a readable NIfTI-1 file ({exc})") from exc
    hdr = img.header
    facts = {
        "datatype": str(hdr.get_data_dtype()),
        "dim": [int(v) for v in hdr["dim"][1 : 1 + int(hdr["dim"][0])]],
        "pixdim": [float(v) for v in hdr["pixdim"][1:4]],
        "qform_code": int(hdr["qform_code"]),
        "sform_code": int(hdr["sform_code"]),
    }
    return data, np.asarray(img.affine, dtype=np.float64), facts


def to_scalar_volume(data: np.ndarray, source: str) -> tuple[np.ndarray, list[str]]:
    """Reduce RGB and 4-D/5-D files to one 3-D scalar array; returns (array, notes).

    RGB whose three channels agree (grey stored as colour) keeps one channel exactly; true
    colour is refused, because no HU can be recovered from it.
    """
    notes: list[str] = []
    if data.dtype.names:  # RGB24 / RGBA32 structured dtype
        channels = [np.asarray(data[n]) for n in data.dtype.names if n != "A"]
        data = np.stack(channels, axis=-1)
        notes.append(f"RGB file ({len(channels)} components)")
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
