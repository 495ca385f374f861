"""Where things live in a store, and how to open one anywhere fsspec reaches.

Layout (see ``schemas/store-contract.md``)::

    <root>/zarr.json                         root group, consolidated metadata
    <root>/catalog/                          xarray Dataset, dim ``volume``
    <root>/<collection>/<patient>/<study>/<series>/   one OME-Zarr image per volume
        0/                    full-resolution Dataset: image, label, segments, z, y, x …
        1/, 2/ …              browse levels of the image (own z, y, x)
        (the label pyramid is ``<k>/label``, beside each browse image)
"""

from __future__ import annotations

import re
import warnings
from typing import Any

import fsspec
import zarr
from zarr.errors import ZarrUserWarning
from zarr.storage import FsspecStore, LocalStore

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")

# The store contract uses consolidated metadata on purpose (one GET opens a whole store or a
# volume); zarr warns on every consolidation that it is not in the v3 spec yet.  That note is
# silenced here, once and by its exact text, rather than with ``warnings.catch_warnings``
# around each call: that context manager swaps the process-wide filters and is not
# thread-safe, so volumes written in parallel threads leaked the warning onto the CLI's one-line
# error output now and then.
warnings.filterwarnings(
    "ignore",
    message="Consolidated metadata is currently not part in the Zarr format 3 specification",
    category=ZarrUserWarning,
)

#: Group of a volume holding its full-resolution data (OME-Zarr level 0): ``image``, ``label``,
#: ``segments``, ``class_locations`` and the ``z``/``y``/``x`` coordinates.  The volume group
#: itself holds no arrays, so its browse levels (sibling groups) may have other sizes.
FULL_RES = "0"


def data_path(path: str) -> str:
    """Group of the full-resolution arrays of the volume at ``path``.

    ``xarray.open_zarr(url, group=data_path(path))`` is the volume as one Dataset.
    """
    return f"{path.strip('/')}/{FULL_RES}"


def sanitize(name: str | int | None, *, fallback: str = "NA") -> str:
    """A path component safe on every object store and file system.

    DICOM text such as ``"Recon 2: LIVER 3 PHASE (AP)"`` may hold slashes, colons or ``..``;
    anything outside ``[A-Za-z0-9._-]`` becomes ``_``, runs of dots collapse to one and edge
    dots/underscores are stripped, so no key can escape its parent group or hide.
    """
    text = "" if name is None else str(name).strip()
    text = re.sub(r"\.{2,}", ".", _UNSAFE.sub("_", text)).strip("._")
    if not text:
        return fallback
    return text[:120]


def volume_path(collection: str, patient: str, study: str, series: str) -> str:
    """Group path of one volume: ``<collection>/<patient>/<study>/<series>``, sanitized."""
    return "/".join(sanitize(p) for p in (collection, patient, study, series))


def is_remote(url: str) -> bool:
    protocol = fsspec.utils.get_protocol(str(url))
    return protocol not in ("file", "local")


def open_zarr_store(
    url: str, storage_options: dict[str, Any] | None = None, *, read_only: bool = False
) -> zarr.abc.store.Store:
    """A zarr store for a local path or any fsspec URL (``s3://``, ``https://``, ``memory://``)."""
    url = str(url)
    if not is_remote(url):
        path = url.removeprefix("file://")
        return LocalStore(path, read_only=read_only)
    opts = with_retries(url, storage_options)
    if read_only and url.startswith(("s3://", "s3a://")):
        # whole-object GETs without a HEAD first: s3fs sizes an object before a plain read
        # only to split objects over 50 MB (no livercube object is), which doubles the requests
        # of a reader and fails where anonymous HEAD is refused
        opts.setdefault("max_concurrency", 1)
    return FsspecStore.from_url(url, storage_options=opts or None, read_only=read_only)


#: botocore retry policy for S3: throttling (503 SlowDown) and 5xx are retried with backoff,
#: so a misbehaving bucket slows a conversion down instead of losing volumes.
S3_RETRIES = {"max_attempts": 10, "mode": "standard"}


def with_retries(url: str, storage_options: dict[str, Any] | None) -> dict[str, Any]:
    """Storage options with livercube's retry policy added for S3 (user settings win)."""
    opts = dict(storage_options or {})
    if str(url).startswith(("s3://", "s3a://")):
        config = dict(opts.get("config_kwargs") or {})
        config.setdefault("retries", S3_RETRIES)
        opts["config_kwargs"] = config
    return opts


def open_root(
    url: str,
    storage_options: dict[str, Any] | None = None,
    *,
    mode: str = "r",
    consolidated: bool = True,
) -> zarr.Group:
    """Open the root group of a store (``mode='a'`` creates it).

    Readers use the consolidated metadata (one request for the whole hierarchy); writers and
    checkers pass ``consolidated=False`` to see every group as it is now.
    """
    store = open_zarr_store(url, storage_options, read_only=(mode == "r"))
    if mode == "r" and consolidated:
        try:
            # mode="r": the default ("a") is refused by a read-only store, which silently
            # fell back to walking the hierarchy (and fails where there is no listing: HTTP)
            return zarr.open_consolidated(store, zarr_format=3, mode="r")
        except Exception:  # no consolidated metadata (store still being written)
            pass
    # writers must see the volumes as they are now, never a stale consolidated snapshot
    return zarr.open_group(store, mode=mode, zarr_format=3, use_consolidated=False)


def filesystem(url: str, storage_options: dict[str, Any] | None = None):
    """The fsspec filesystem and root path of ``url`` (for non-zarr files such as reports)."""
    fs, path = fsspec.core.url_to_fs(str(url), **(storage_options or {}))
    return fs, path
