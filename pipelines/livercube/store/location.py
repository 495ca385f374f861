"""Where a store is: one URL with its storage options and livercube's retry policy, built once.

Every part of livercube that touches a store (writer, catalog, lease, verify, publish, the
read API, the sampler) receives a :class:`StoreLocation` instead of a ``(url,
storage_options)`` pair it would have to re-parse.  The location is made once at the edge (the
CLI, ``livercube.open``, ``convert``) and passed down; it is a small frozen value that pickles,
so Dask tasks and DataLoader workers get the same policy as the client.

Options are spelled as fsspec spells them (``anon``, ``endpoint_url``, ``key``/``secret``,
``profile``, ``client_kwargs`` …).  For S3 the retry policy below is added unless the user set
their own.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import fsspec
import zarr
from zarr.errors import ZarrUserWarning
from zarr.storage import FsspecStore, LocalStore

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

#: botocore retry policy for S3: throttling (503 SlowDown) and 5xx are retried with backoff,
#: so a misbehaving bucket slows a conversion down instead of losing volumes.
S3_RETRIES = {"max_attempts": 10, "mode": "standard"}

#: The first contact with a remote store (is it there, is it ours?) should fail in seconds
#: with one clear line, not after ten backed-off retries.
FIRST_CONTACT_RETRIES = {"max_attempts": 2, "mode": "standard"}
FIRST_CONTACT_TIMEOUT_S = 10

_S3_PREFIXES = ("s3://", "s3a://")


def is_remote(url: str) -> bool:
    """Whether ``url`` is anything but a local path (``s3://``, ``https://``, ``memory://`` …)."""
    return fsspec.utils.get_protocol(str(url)) not in ("file", "local")


def is_s3(url: str) -> bool:
    return str(url).startswith(_S3_PREFIXES)


def with_retries(url: str, storage_options: Mapping[str, Any] | None) -> dict[str, Any]:
    """Storage options with livercube's retry policy added for S3 (user settings win).

    Used for sources too: a flaky bucket on the reading side must not lose volumes either.
    """
    opts = dict(storage_options or {})
    if is_s3(url):
        config = dict(opts.get("config_kwargs") or {})
        config.setdefault("retries", S3_RETRIES)
        opts["config_kwargs"] = config
    return opts


@dataclass(frozen=True)
class StoreLocation:
    """A store URL and the storage options (retry policy included) to reach it."""

    url: str
    storage_options: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def of(
        cls, where: str | StoreLocation, storage_options: Mapping[str, Any] | None = None
    ) -> StoreLocation:
        """The location of ``where``: a URL (with its options) or an existing location.

        Passing options together with a location is refused: which of the two would win is
        exactly the ambiguity this type exists to remove.
        """
        if isinstance(where, StoreLocation):
            if storage_options:
                raise TypeError("storage options given twice: once in the StoreLocation")
            return where
        url = str(where)
        if not is_remote(url):
            url = url.removeprefix("file://")
        return cls(url, with_retries(url, storage_options))

    def __str__(self) -> str:
        return self.url

    @property
    def options(self) -> dict[str, Any]:
        """A fresh copy of the storage options, for APIs that take them as keyword arguments."""
        return dict(self.storage_options)

    @property
    def is_remote(self) -> bool:
        return is_remote(self.url)

    @property
    def is_s3(self) -> bool:
        return is_s3(self.url)

    @property
    def endpoint(self) -> str:
        """What to name in an error when the store cannot be reached."""
        return str(self.storage_options.get("endpoint_url") or self.url)

    def filesystem(self) -> tuple[fsspec.AbstractFileSystem, str]:
        """The fsspec filesystem and root path (for non-zarr objects: reports, the lease)."""
        return fsspec.core.url_to_fs(self.url, **self.storage_options)

    def zarr_store(self, *, read_only: bool = False) -> zarr.abc.store.Store:
        """A zarr store on this location."""
        if not self.is_remote:
            return LocalStore(self.url, read_only=read_only)
        opts = self.options
        if read_only and self.is_s3:
            # whole-object GETs without a HEAD first: s3fs sizes an object before a plain read
            # only to split objects over 50 MB (no livercube object is), which doubles the
            # requests of a reader and fails where anonymous HEAD is refused
            opts.setdefault("max_concurrency", 1)
        return FsspecStore.from_url(self.url, storage_options=opts or None, read_only=read_only)

    def open_root(
        self,
        *,
        mode: str = "r",
        consolidated: bool = True,
        store: zarr.abc.store.Store | None = None,
    ) -> zarr.Group:
        """Open the root group (``mode='a'`` creates it), on ``store`` if one is already open.

        Readers use the consolidated metadata (one request for the whole hierarchy); writers
        and checkers pass ``consolidated=False`` to see every group as it is now.
        """
        if store is None:
            store = self.zarr_store(read_only=(mode == "r"))
        if mode == "r" and consolidated:
            try:
                # mode="r": the default ("a") is refused by a read-only store, which silently
                # fell back to walking the hierarchy (and fails where there is no listing)
                return zarr.open_consolidated(store, zarr_format=3, mode="r")
            except Exception:  # no consolidated metadata (store still being written)
                pass
        # writers must see the volumes as they are now, never a stale consolidated snapshot
        return zarr.open_group(store, mode=mode, zarr_format=3, use_consolidated=False)

    def first_contact(self) -> StoreLocation:
        """The same location with few retries and short timeouts, to probe it before a run."""
        if not self.is_s3:
            return self
        opts = self.options
        config = dict(opts.get("config_kwargs") or {})
        config.update(retries=FIRST_CONTACT_RETRIES, connect_timeout=FIRST_CONTACT_TIMEOUT_S)
        opts["config_kwargs"] = config
        opts["skip_instance_cache"] = True
        return StoreLocation(self.url, opts)
