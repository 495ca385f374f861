"""Patch streaming: the fast reader on a real S3 endpoint, torch DataLoaders."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from zarr.storage import FsspecStore

import livercube
from livercube.convert import convert
from livercube.sampling import ArrayInfo, PatchSampler, ShardReader
from livercube.store.chunking import Chunking
from livercube.store.layout import data_path
from livercube.synth.plc_cect import write_plc_cect

PATCH = (6, 20, 20)


@pytest.fixture(scope="module")
def local_store(tmp_path_factory) -> str:
    tmp = tmp_path_factory.mktemp("stream")
    write_plc_cect(tmp / "PLC", n_subjects=2, size="tiny", seed=5)
    dest = str(tmp / "s.zarr")
    small = Chunking((4, 16, 16), 8)
    report = convert(str(tmp / "PLC"), dest, "plc-cect", progress=False, chunking=small)
    assert report.exit_code == 0, report.summary()
    return dest


class CountingS3:
    """Wraps an s3fs filesystem instance: counts GET requests and the bytes they return."""

    def __init__(self, fs) -> None:
        self.gets = 0
        self.bytes = 0
        inner = fs._cat_file

        async def counted(path, *args, **kwargs):
            self.gets += 1
            data = await inner(path, *args, **kwargs)
            self.bytes += len(data)
            return data

        fs._cat_file = counted


def test_reader_on_s3_equals_zarr_and_counts_requests(local_store, s3_bucket):
    import s3fs

    bucket, opts = s3_bucket
    s3 = s3fs.S3FileSystem(**opts, skip_instance_cache=True)
    local = livercube.open(local_store)
    path = local.paths()[0]
    # the volume data only: the sampler below takes catalog + metadata from the local copy
    patient = "plc-cect/P0001"
    s3.put(f"{local_store}/{patient}", f"{bucket}/store.zarr/{patient}", recursive=True)
    url = f"s3://{bucket}/store.zarr"
    counter = CountingS3(s3)
    reader = ShardReader(url, opts, fs=s3)

    # equality with zarr's own read (through the S3 endpoint) for random boxes
    rng = np.random.default_rng(0)
    for name in ("image", "label"):
        arr = zarr.open_array(
            FsspecStore.from_url(
                f"{url}/{data_path(path)}/{name}", storage_options=opts, read_only=True
            ),
            mode="r",
            zarr_format=3,
        )
        info = ArrayInfo.from_metadata(f"{data_path(path)}/{name}", arr.metadata.to_dict())
        full = local.root[data_path(path)][name][...]
        np.testing.assert_array_equal(arr[...], full)
        for _ in range(5):
            start = tuple(int(rng.integers(-3, n)) for n in arr.shape)
            got = reader.read(info, start, PATCH, fill=9)
            exp = np.full(PATCH, 9, dtype=arr.dtype)
            src = tuple(
                slice(max(0, s), min(n, s + k))
                for s, k, n in zip(start, PATCH, arr.shape, strict=True)
            )
            if all(s.stop > s.start for s in src):
                dst = tuple(slice(s.start - a, s.stop - a) for s, a in zip(src, start, strict=True))
                exp[dst] = full[src]
            np.testing.assert_array_equal(got, exp)

    # requests per patch once the shard indexes are cached
    sampler = PatchSampler(
        local, where="patient_id == 'P0001'", patch_size=PATCH, seed=0, reader=reader, prefetch=1
    )
    for p in range(20):  # warm: every shard index read once
        sampler.patch(p)

    def run(first: int, n: int = 30) -> tuple[int, int]:
        """(GETs, shard objects touched) of ``n`` patches from position ``first``."""
        before, touched = counter.gets, 0
        for p in range(first, first + n):
            spec = sampler.spec(p)
            vol = sampler.volumes[spec.volume]
            z0, z1 = max(0, spec.start[0]), min(vol.shape[0], spec.start[0] + PATCH[0])
            per_array = (z1 - 1) // vol.image.object_shape[0] - z0 // vol.image.object_shape[0] + 1
            touched += 2 * per_array  # image + label
            sample = sampler.read(spec)
            assert sample["image"].shape == (1, *PATCH)
        return counter.gets - before, touched

    # default rule remotely: exact ranges, so a patch fetches its own chunks and nothing else
    reader.stats.reset()
    gets, shards_touched = run(1000)
    st = reader.stats
    assert gets == st.requests >= shards_touched  # at least one GET per (array, shard) object
    assert reader.overfetch == 0 and st.bytes_fetched == st.chunk_bytes > 0
    # a looser rule: a request may carry at most `overfetch` x its wanted bytes unwanted
    exact_gets, exact_bytes = st.requests, st.bytes_fetched
    reader.overfetch = 0.25
    reader.stats.reset()
    run(1000)  # the same patches
    loose = reader.stats
    assert loose.chunk_bytes == exact_bytes
    assert exact_bytes <= loose.bytes_fetched <= 1.25 * exact_bytes
    assert loose.requests <= exact_gets  # what the extra bytes buy: fewer, longer GETs
    # unlimited over-fetch: one coalesced ranged GET per (array, shard) the patch touches —
    # image + label -> 2 when the patch lies within one shard (8 slices here; 64 in real stores)
    reader.overfetch = float("inf")
    gets, shards_touched = run(2000)
    assert reader.stats.index_requests == 0  # warm: no index re-read
    assert gets == shards_touched
    per_patch = gets / 30
    assert per_patch <= 4
    print(f"S3: {per_patch:.2f} GETs per patch ({shards_touched / 30:.2f} shard objects)")


def test_dataloader_workers_disjoint_reproducible_resumable(local_store):
    torch = pytest.importorskip("torch")
    from torch.utils.data import DataLoader

    from livercube.sampling import PatchDataset, PatchIterableDataset

    store = livercube.open(local_store)
    sampler = PatchSampler(store, patch_size=PATCH, mode="foreground", seed=9, prefetch=2)

    def run(position: int, n_batches: int, workers: int = 2, persistent: bool = False):
        ds = PatchIterableDataset(sampler, block=4)
        ds.load_state_dict({"position": position})
        loader = DataLoader(ds, batch_size=4, num_workers=workers, persistent_workers=persistent)
        out = []
        for batch in loader:
            out.append(batch)
            if len(out) == n_batches:
                break
        return out

    a = run(0, 6)
    positions = torch.cat([b["position"] for b in a]).tolist()
    assert positions == list(range(24))  # workers disjoint, returned in stream order
    idx = torch.cat([b["index"] for b in a]).tolist()
    assert len(set(idx)) == 24
    # the two workers' patches differ
    assert not torch.equal(a[0]["image"], a[1]["image"])
    b = run(0, 6, persistent=True)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["label"], y["label"])
    # resume mid-epoch at position 12 (with a different worker count): identical continuation
    c = run(12, 3, workers=3)
    for x, y in zip(a[3:], c, strict=True):
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["label"], y["label"])
    # numpy patches equal the torch ones
    np.testing.assert_array_equal(sampler.patch(5)["image"], a[1]["image"][1].numpy())

    # map-style dataset with workers
    mds = PatchDataset(sampler, length=8)
    batches = list(DataLoader(mds, batch_size=4, num_workers=2))
    np.testing.assert_array_equal(batches[0]["image"].numpy(), a[0]["image"].numpy())
    assert len(mds) == 8


def test_iterable_dataset_epochs(local_store):
    pytest.importorskip("torch")
    from livercube.sampling import PatchIterableDataset

    sampler = PatchSampler(local_store, patch_size=PATCH, seed=1)
    ds = PatchIterableDataset(sampler, samples_per_epoch=5)
    first = [int(s["position"]) for s in ds]
    second = [int(s["position"]) for s in ds]
    assert first == [0, 1, 2, 3, 4] and second == [5, 6, 7, 8, 9]
