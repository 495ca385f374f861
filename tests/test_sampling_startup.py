"""Sampler start-up reads the catalog only: its cost does not grow with the number of volumes.

Every object read is counted at the two I/O edges (zarr's store for the root and catalog, the
reader's fetch step for volume metadata and chunks), on stores of 2 and 6 volumes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import zarr
from volume_factory import phantom_volume

from livercube.sampling import PatchSampler
from livercube.sampling import fetch as fetch_mod
from livercube.store.catalog import write_catalog
from livercube.store.writer import write_volume


def _store(dest: Path, n: int) -> str:
    zarr.open_group(str(dest), mode="w", zarr_format=3)
    for i in range(n):
        vol = phantom_volume(
            patient=f"CRLM-CT-{1001 + i}", shape=(8, 48, 40), spacing=(4.0, 6.0, 6.0), seed=i
        )
        write_volume(str(dest), vol)
    write_catalog(str(dest))
    return str(dest)


def _without_consolidated(url: str, dest: Path) -> str:
    """A copy whose root has no consolidated metadata (a store still being written, or
    published by a tool that does not consolidate): every group is then its own object."""
    shutil.copytree(url, dest)
    root = json.loads((dest / "zarr.json").read_text())
    root.pop("consolidated_metadata", None)
    (dest / "zarr.json").write_text(json.dumps(root))
    return str(dest)


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[int, str]:
    base = tmp_path_factory.mktemp("startup")
    return {n: _store(base / f"s{n}.zarr", n) for n in (2, 6)}


@pytest.fixture(scope="module")
def plain_stores(stores, tmp_path_factory) -> dict[int, str]:
    base = tmp_path_factory.mktemp("startup-plain")
    return {n: _without_consolidated(url, base / f"s{n}.zarr") for n, url in stores.items()}


@pytest.fixture()
def reads(monkeypatch) -> list[str]:
    """Keys read through zarr's LocalStore and through the reader's fetch step."""
    keys: list[str] = []
    get = zarr.storage.LocalStore.get

    async def counting_get(self, key, *args, **kwargs):
        keys.append(key)
        return await get(self, key, *args, **kwargs)

    def counting_read(root, rng):
        keys.append(rng.key)
        return read_local(root, rng)

    read_local = fetch_mod.read_local
    monkeypatch.setattr(zarr.storage.LocalStore, "get", counting_get)
    monkeypatch.setattr(fetch_mod, "read_local", counting_read)
    return keys


def _under_volumes(keys: list[str], url: str) -> set[str]:
    """The volume paths (catalog ``path``) that the keys lie under."""
    import livercube

    paths = livercube.open(url).paths()
    return {p for p in paths for k in keys if k == p or k.startswith(p + "/")}


@pytest.mark.parametrize("consolidated", [True, False])
@pytest.mark.parametrize("mode", ["uniform", "foreground"])
def test_startup_reads_do_not_depend_on_the_number_of_volumes(
    stores, plain_stores, reads, mode, consolidated
):
    counts = {}
    for n, url in (stores if consolidated else plain_stores).items():
        reads.clear()
        PatchSampler(url, patch_size=(4, 16, 16), mode=mode, seed=0)
        counts[n] = list(reads)
        assert _under_volumes(counts[n], url) == set(), "start-up read volume metadata"
    assert len(counts[2]) == len(counts[6]) > 0


def test_first_patch_reads_its_own_volume_only_and_metadata_once(stores, reads):
    url = stores[6]
    sampler = PatchSampler(url, patch_size=(4, 16, 16), mode="foreground", seed=0)
    reads.clear()
    first = sampler.patch(0)
    read = list(reads)
    assert _under_volumes(read, url) == {first["volume"]}
    meta = [k for k in read if k.endswith("zarr.json")]
    # group (completion record) + image, label, class_locations
    assert len(meta) == 4
    # later patches of the same volume read no metadata again
    same = [p for p in range(1, 200) if sampler.spec(p).volume == sampler.spec(0).volume]
    reads.clear()
    sampler.patch(same[0])
    assert not [k for k in reads if k.endswith("zarr.json")]


def test_startup_reads_the_catalogs_own_document_not_the_root(stores, reads):
    """The root document consolidates every volume's metadata (megabytes with thousands of
    volumes); the catalog group consolidates its own arrays, so start-up never needs the root."""
    PatchSampler(stores[6], patch_size=(4, 16, 16), mode="foreground", seed=0)
    assert "zarr.json" not in reads
    assert reads[0] == "catalog/zarr.json"
    assert [k for k in reads if k.endswith("zarr.json")] == ["catalog/zarr.json"]


def test_catalog_arrays_are_read_concurrently(stores, monkeypatch):
    """One round trip for all the catalog's arrays, not one each: over HTTP at 50 ms a
    request, ~30 sequential reads were seconds of start-up."""
    import asyncio

    import livercube

    state = {"now": 0, "peak": 0}
    get = zarr.storage.LocalStore.get

    async def slow_get(self, key, *args, **kwargs):
        state["now"] += 1
        state["peak"] = max(state["peak"], state["now"])
        try:
            await asyncio.sleep(0.005)  # a far-away store: reads overlap only if issued together
            return await get(self, key, *args, **kwargs)
        finally:
            state["now"] -= 1

    monkeypatch.setattr(zarr.storage.LocalStore, "get", slow_get)
    catalog = livercube.open(stores[6]).catalog
    assert state["peak"] >= len(catalog.data_vars) - 1


def test_catalog_without_its_own_consolidated_document_is_read_through_the_root(stores, tmp_path):
    """Stores whose catalog was written before it carried its own consolidated metadata."""
    import livercube

    dest = tmp_path / "old.zarr"
    shutil.copytree(stores[6], dest)
    doc = json.loads((dest / "catalog" / "zarr.json").read_text())
    doc.pop("consolidated_metadata")
    (dest / "catalog" / "zarr.json").write_text(json.dumps(doc))
    old, new = livercube.open(str(dest)), livercube.open(stores[6])
    assert old.catalog.identical(new.catalog)
    sampler = PatchSampler(str(dest), patch_size=(4, 16, 16), mode="foreground", seed=0)
    again = PatchSampler(stores[6], patch_size=(4, 16, 16), mode="foreground", seed=0)
    a, b = sampler.patch(3), again.patch(3)
    assert a["volume"] == b["volume"] and (a["image"] == b["image"]).all()
