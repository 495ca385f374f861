"""Write one :class:`~livercube.volumes.volume.Volume` as an OME-Zarr 0.5 image group.

Write order is what makes a volume trustworthy: the old group document is deleted, every
array object is uploaded, and only then is the group document — carrying the completion
record (content checksum + source fingerprint) — written.  A reader, the catalog and
``verify`` ignore a group without that record, so an interrupted write never looks whole.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import MemoryStore

from livercube.errors import ForeignFilesError
from livercube.faults import fault_point
from livercube.schema import STORE_SCHEMA_VERSION, unified_labels
from livercube.store.chunking import DEFAULT_CHUNKING, Chunking, fill_shards
from livercube.store.completion import CompletionRecord
from livercube.store.layout import FULL_RES, volume_path
from livercube.store.location import StoreLocation
from livercube.store.pyramid import (
    image_level_path,
    label_level_path,
    level_group,
    multiscales,
    omero,
    pyramid_factors,
    subsample,
    subsampled_box,
)
from livercube.store.shards import (
    ShardLayout,
    encode_chunk,
    encode_threads,
    encoder_pool,
    iter_shards,
    numcodecs_blosc,
    numcodecs_zstd,
    shard_key,
)
from livercube.volumes.volume import (
    CLASS_LOCATIONS_PER_CLASS,
    Volume,
    class_locations,
    content_checksum,
)

#: One Blosc block per inner chunk (32×64×64 int16 = 256 KiB; smaller chunks clamp to their
#: size).  Blosc's automatic block size shrinks with the level (64 KiB at level 1 for zstd),
#: and each block restarts the compressor: a whole-chunk block compresses better and decodes
#: faster, since a patch read decodes whole chunks anyway.
BLOSC_BLOCK_BYTES = 1 << 18

#: CT: Blosc zstd level 1 (zstd's own level 1) with byte shuffle.  On noisy CT chunks it
#: encodes ~5.5× faster and decodes ~1.2× faster than level 5 (zstd 9) for 1 % more bytes
#: (ratio 3.12 vs 3.15); conversion time is dominated by this encode and training by its
#: decode (``benchmarks/bench_convert.py`` codec table).
COMPRESSOR = BloscCodec(cname="zstd", clevel=1, shuffle="shuffle", blocksize=BLOSC_BLOCK_BYTES)

#: Label and segment bit fields: Blosc lz4 without shuffle.  They compress ~50× this way (label
#: chunks add at most ~3 % to the image's bytes), and decode 6–9× faster than zstd + bitshuffle —
#: which matters because a patch read decodes label chunks next to every image chunk.
LABEL_COMPRESSOR = BloscCodec(
    cname="lz4", clevel=1, shuffle="noshuffle", blocksize=BLOSC_BLOCK_BYTES
)

#: CRC-32C of every stored chunk, after compression (the zarr v3 ``crc32c`` codec): livercube's
#: reader, zarr-python and TensorStore all verify it on every read, so a flipped byte is an
#: error naming the object instead of wrong voxels.  Shard indexes carry one too (zarr's
#: default ``index_codecs``: bytes + crc32c).
CHECKSUM = Crc32cCodec()

#: Array attribute (under ``livercube``) listing the shards that hold only the fill value and
#: were therefore never written; any other missing shard of a complete volume is damage.
FILL_SHARDS_ATTR = "fill_shards"


def ome_multiscales(volume: Volume) -> dict[str, Any]:
    """OME-Zarr 0.5 ``ome`` attribute: ``0/image`` then its browse levels ``<k>/image``."""
    g = volume.grid
    factors = pyramid_factors(g.shape, g.spacing)
    paths = [image_level_path(k) for k in range(len(factors) + 1)]
    name = volume_path(volume.collection, volume.patient_id, volume.study, volume.series)
    return {
        "version": "0.5",
        "multiscales": [multiscales(name, g.spacing, g.origin, paths, factors)],
        "omero": omero(g.shape[0]),
    }


def volume_attrs(volume: Volume, *, checksum: str, label_present: bool) -> dict[str, Any]:
    """The ``livercube`` attribute of a volume group: everything the catalog is rebuilt from."""
    g = volume.grid
    segs = volume.segments.segments if volume.segments else []
    return {
        "schema_version": STORE_SCHEMA_VERSION,
        "collection": volume.collection,
        "patient_id": volume.patient_id,
        "study": volume.study,
        "series": volume.series,
        "phase": volume.phase,
        "shape_zyx": list(g.shape),
        "spacing_zyx": list(g.spacing),
        "origin_zyx": list(g.origin),
        "source_direction": [list(r) for r in volume.source_direction],
        "annotated": label_present,
        "segments": [s.to_attrs() for s in segs],
        "clinical": volume.clinical,
        **volume.meta,
        "status": "writing",
        "checksum": checksum,
    }


@dataclass(frozen=True)
class ShardedArray:
    """One sharded (z, y, x) array of a volume group: where it goes, its voxels, its codec.

    ``data`` may be a strided view of a level-0 array (browse levels): the encoder copies one
    inner chunk at a time out of it.
    """

    path: str
    data: np.ndarray
    compressor: BloscCodec
    attrs: dict[str, Any]
    #: a box of ``data`` outside which every voxel is fill (``None``: anywhere): the encoder
    #: knows those chunks are empty without copying or looking at them
    occupied: tuple[slice, ...] | None = None

    def layout(self, chunking: Chunking) -> ShardLayout:
        chunks, shards = chunking.chunk_and_shard(self.data.shape)
        return ShardLayout(tuple(self.data.shape), chunks, shards)


def sharded_arrays(volume: Volume, arrays: dict[str, np.ndarray]) -> list[ShardedArray]:
    """Every sharded array of the volume group: level 0, then each browse level."""
    out = [
        ShardedArray(
            f"{FULL_RES}/image",
            volume.image,
            COMPRESSOR,
            {"units": "HU", "long_name": "CT attenuation (Hounsfield units)"},
        )
    ]
    occupied = volume.occupied
    if "label" in arrays:
        names = unified_labels()
        out.append(
            ShardedArray(
                f"{FULL_RES}/label",
                arrays["label"],
                LABEL_COMPRESSOR,
                {
                    "long_name": "unified label (tumor > vessels > liver)",
                    "flag_values": list(names),
                    "flag_meanings": " ".join(names.values()),
                },
                occupied,
            )
        )
        segs = volume.segments.segments if volume.segments else []
        out.append(
            ShardedArray(
                f"{FULL_RES}/segments",
                arrays["segments"],
                LABEL_COMPRESSOR,
                {
                    "long_name": "source segments as a bit field: bit k set = voxel in segment k",
                    "segments": [s.to_attrs() for s in segs],
                },
                occupied,
            )
        )
    for k, f in enumerate(pyramid_factors(volume.grid.shape, volume.grid.spacing), start=1):
        out.append(
            ShardedArray(
                image_level_path(k),
                subsample(volume.image, f),
                COMPRESSOR,
                {"units": "HU", "subsampling": list(f)},
            )
        )
        if "label" in arrays:
            out.append(
                ShardedArray(
                    label_level_path(k),
                    subsample(arrays["label"], f),
                    LABEL_COMPRESSOR,
                    {"subsampling": list(f)},
                    subsampled_box(occupied, f),
                )
            )
    return out


def _declare(
    group: zarr.Group, name: str, arr: ShardedArray, chunking: Chunking, fills: list[list[int]]
) -> None:
    """The zarr.json of a sharded array whose shards :mod:`livercube.store.shards` wrote.

    Inner chunks are compressed then checksummed (``CHECKSUM``); the all-fill shards that were
    not written are recorded in ``attrs.livercube.fill_shards``.
    """
    layout = arr.layout(chunking)
    attrs = arr.attrs
    group.create_array(
        name,
        shape=layout.shape,
        dtype=arr.data.dtype,
        chunks=layout.chunks,
        shards=layout.shard,
        compressors=[arr.compressor, CHECKSUM],
        dimension_names=("z", "y", "x"),
        fill_value=0,
        attributes={**attrs, "livercube": {**attrs.get("livercube", {}), FILL_SHARDS_ATTR: fills}},
    )


def metadata_objects(
    volume: Volume,
    attrs: dict[str, Any],
    arrays: dict[str, np.ndarray],
    sharded: list[ShardedArray],
    fills: dict[str, list[list[int]]],
    chunking: Chunking = DEFAULT_CHUNKING,
) -> dict:
    """Every object of a volume group except the sharded arrays' shards: ``{key: Buffer}``.

    Group and array documents, ``class_locations`` and the coordinates (all small), built by
    zarr-python in a :class:`~zarr.storage.MemoryStore` so the documents are exactly zarr's;
    the real store then sees one PUT per object instead of the existence checks and metadata
    round trips of creating nodes one by one.
    """
    objects: dict = {}
    memory = MemoryStore(objects)
    volume_group = zarr.create_group(memory, zarr_format=3, attributes=attrs)
    groups = {FULL_RES: volume_group.create_group(FULL_RES)}
    factors = pyramid_factors(volume.grid.shape, volume.grid.spacing)
    for k, f in enumerate(factors, start=1):
        groups[level_group(k)] = volume_group.create_group(
            level_group(k), attributes={"subsampling": list(f)}
        )
    for arr in sharded:
        parent, name = arr.path.split("/")
        _declare(groups[parent], name, arr, chunking, fills[arr.path])
    if "label" in arrays:
        locations = class_locations(arrays["label"], within=volume.occupied)
        _class_locations(groups[FULL_RES], objects, locations)
    centres = [volume.grid.centres(axis) for axis in range(3)]
    _coordinates(groups[FULL_RES], objects, centres)
    for k, f in enumerate(factors, start=1):
        level = [c[:: f[axis]] for axis, c in enumerate(centres)]
        _coordinates(groups[level_group(k)], objects, level)
    # each group's document lists its whole subtree: opening a volume (or its level 0) by URL
    # needs no listing, which plain HTTP hosting cannot give
    # (zarr's "not in the v3 spec" note is silenced once in store.layout)
    zarr.consolidate_metadata(memory, path=FULL_RES, zarr_format=3)
    zarr.consolidate_metadata(memory, zarr_format=3)
    return objects


def _put_single_chunk(objects: dict, arr: zarr.Array, data: np.ndarray, compressor: Any) -> None:
    """Store ``data`` as the one chunk of ``arr`` (its chunk shape is its shape), byte for byte
    as zarr writes it (``bytes`` → ``compressor`` → CRC-32C, nothing for an all-fill chunk),
    into the in-memory ``objects`` behind ``arr``: zarr's own write goes through its event
    loop for each of a volume's dozen small arrays, ~1 ms apiece."""
    frame = encode_chunk(np.asarray(data), tuple(arr.chunks), arr.fill_value, compressor)
    if frame is not None:
        key = f"{arr.path}/c/" + "/".join("0" * data.ndim)
        objects[key] = default_buffer_prototype().buffer.from_bytes(frame)


def _class_locations(group: zarr.Group, objects: dict, locations: np.ndarray) -> None:
    loc = group.create_array(
        "class_locations",
        shape=locations.shape,
        dtype="int32",
        chunks=(max(1, locations.shape[0]), 4),
        compressors=[LABEL_COMPRESSOR, CHECKSUM],
        dimension_names=("location", "component"),
        fill_value=0,
        attributes={
            "long_name": "sampled voxel indices per unified class, for foreground sampling",
            "columns": ["class", "z", "y", "x"],
            "per_class": CLASS_LOCATIONS_PER_CLASS,
            "livercube": {
                FILL_SHARDS_ATTR: fill_shards(locations, (max(1, locations.shape[0]), 4), 0)
            },
        },
    )
    if locations.size:
        _put_single_chunk(
            objects, loc, locations, numcodecs_blosc(LABEL_COMPRESSOR, locations.dtype)
        )


#: Codec of the coordinate arrays (one small chunk each).
COORD_COMPRESSOR = ZstdCodec()


def _coordinates(group: zarr.Group, objects: dict, centres: list[np.ndarray]) -> None:
    """The ``z``, ``y``, ``x`` coordinate arrays (LPS mm of voxel centres) of one level."""
    compressor = numcodecs_zstd(COORD_COMPRESSOR)
    for name, coord in zip(("z", "y", "x"), centres, strict=True):
        arr = group.create_array(
            name,
            shape=coord.shape,
            dtype="float64",
            chunks=coord.shape,
            compressors=[COORD_COMPRESSOR, CHECKSUM],
            dimension_names=(name,),
            fill_value=0.0,
            attributes={
                "units": "mm",
                "long_name": f"LPS {name} of voxel centres",
                "standard_name": f"patient_lps_{name}",
            },
        )
        _put_single_chunk(objects, arr, np.asarray(coord, dtype="float64"), compressor)


def limit_encode_threads(n: int) -> None:
    """Cap this process's encoding threads at ``n``: livercube's shard encoder pool (read
    per volume from zarr's ``threading.max_workers``) and zarr's own codec pool.

    Blosc itself runs single-threaded off the main thread (numcodecs' default), so a worker's
    CPU use is its Dask threads plus the encode threads, which default to the machine's cores
    (zarr's pool: cores + 4): on a machine with one worker process per core that would be
    several encoding threads per core.  zarr's pool is sized at its first use in the process
    (a fresh Dask worker); the shard encoder follows the setting at every volume.
    """
    zarr.config.set({"threading.max_workers": max(1, int(n))})


#: Concurrent PUTs per volume upload.
UPLOAD_CONCURRENCY = 16
_GROUP_DOC = json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {}}).encode()


#: Children of a volume group written by earlier store versions (1.x); with the children of
#: the version being written (and numbered levels), the only names ever deleted.
LEGACY_CHILDREN = frozenset(
    ("image", "label", "segments", "class_locations", "z", "y", "x", "pyramid", "labels")
)


def _own_child(name: str, own: frozenset[str] | set[str]) -> bool:
    return name in own or name in LEGACY_CHILDREN or name.isdigit()


async def _clear_own_group(
    store: zarr.abc.store.Store, path: str, own: frozenset[str] | set[str]
) -> None:
    """Delete the previous version of the volume at ``path`` — livercube's objects only.

    ``own``: the children of the group about to be written.  The group document goes first,
    so a reader never pairs an old completion record with new data.  Anything else found
    under the path (a user's own file in a folder that happens to sit where a volume goes) is
    refused, not deleted.
    """
    keys = [k async for k in store.list_prefix(f"{path}/")]
    children = {k: k[len(path) + 1 :].split("/", 1)[0] for k in keys}
    foreign = sorted(
        k for k, c in children.items() if k != f"{path}/zarr.json" and not _own_child(c, own)
    )
    if foreign:
        shown = ", ".join(f.rsplit("/", 1)[-1] for f in foreign[:3])
        raise ForeignFilesError(
            f"{path}: refusing to replace this volume, the folder holds files livercube did "
            f"not write ({shown}{', …' if len(foreign) > 3 else ''}); move them away"
        )
    await store.delete(f"{path}/zarr.json")
    for child in sorted(set(children.values()) - {"zarr.json"}):
        await store.delete_dir(f"{path}/{child}")


#: Encoded shards waiting for their PUT, per volume: bounds memory to a few shards
#: (≈ 10 MB each for 512² CT) while the next slab is encoded during the upload.
SHARDS_IN_FLIGHT = 4


async def _put_shards(
    store: zarr.abc.store.Store,
    path: str,
    sharded: list[ShardedArray],
    chunking: Chunking,
    threads: int,
) -> tuple[dict[str, list[list[int]]], int]:
    """Encode and upload every shard of ``sharded``, one z-slab at a time.

    Returns the all-fill shards skipped per array (for ``fill_shards``) and the bytes sent.
    Encoding runs off the event loop (zarr's loop is shared by every thread of the process).
    """
    proto = default_buffer_prototype()
    fills: dict[str, list[list[int]]] = {}
    sent = 0
    slots = asyncio.Semaphore(SHARDS_IN_FLIGHT)

    async def put(key: str, obj: bytes) -> None:
        try:
            await store.set(key, proto.buffer.from_bytes(obj))
        finally:
            slots.release()
        fault_point("shard-written")

    with encoder_pool(threads) as pool:
        try:
            async with asyncio.TaskGroup() as puts:
                for arr in sharded:
                    layout = arr.layout(chunking)
                    blosc = numcodecs_blosc(arr.compressor, arr.data.dtype)
                    shards = iter_shards(arr.data, layout, blosc, 0, pool, arr.occupied)
                    fills[arr.path] = []
                    while (item := await asyncio.to_thread(next, shards, None)) is not None:
                        coords, obj = item
                        if obj is None:
                            fills[arr.path].append([int(c) for c in coords])
                            continue
                        await slots.acquire()
                        sent += len(obj)
                        puts.create_task(put(f"{path}/{arr.path}/{shard_key(coords)}", obj))
        except ExceptionGroup as failed:
            # the first failed PUT as itself: callers and Dask retries look at its type
            # (a full disk, a storage error), not at a group wrapper
            raise failed.exceptions[0] from None
    return fills, sent


async def _put_group(store: zarr.abc.store.Store, path: str, objects: dict) -> None:
    """Upload the group's documents and small arrays; its own ``zarr.json`` goes last.

    Until that document lands the volume is invisible (see :func:`_clear_own_group`), so a
    run killed mid-volume leaves nothing a reader would take for a volume.
    """
    proto = default_buffer_prototype()
    sem = asyncio.Semaphore(UPLOAD_CONCURRENCY)

    async def put(key: str, value) -> None:
        async with sem:
            await store.set(key, value)

    parts = path.split("/")
    parents = ["/".join(parts[:i]) for i in range(1, len(parts))]
    await asyncio.gather(
        *(put(f"{path}/{k}", v) for k, v in objects.items() if k != "zarr.json"),
        *(put(f"{p}/zarr.json", proto.buffer.from_bytes(_GROUP_DOC)) for p in parents),
    )
    fault_point("before-group-doc")
    await store.set(f"{path}/zarr.json", objects["zarr.json"])


def write_volume(
    url: str | StoreLocation,
    volume: Volume,
    *,
    storage_options: dict[str, Any] | None = None,
    fingerprint: str = "",
    chunking: Chunking = DEFAULT_CHUNKING,
) -> dict[str, Any]:
    """Write ``volume`` into the store at ``url``; returns a small record for the report.

    An existing group at the same path is replaced: the caller decides whether to skip
    complete volumes (resume) before calling this.  ``chunking``: inner chunk and shard
    shapes (the contract's by default; tests pass small ones).  Memory beyond the volume's
    own arrays: the unified label, a few encoded shards and the browse levels' chunk copies.
    """
    path = volume_path(volume.collection, volume.patient_id, volume.study, volume.series)
    label = volume.label()
    arrays: dict[str, np.ndarray] = {"image": volume.image}
    if label is not None:
        arrays["label"] = label
        assert volume.segments is not None
        arrays["segments"] = volume.segments.bits
    checksum = content_checksum(arrays)
    meta = volume_attrs(volume, checksum=checksum, label_present=label is not None)
    CompletionRecord.new(checksum, fingerprint).stamp(meta)
    attrs = {"ome": ome_multiscales(volume), "livercube": meta}
    sharded = sharded_arrays(volume, arrays)

    store = StoreLocation.of(url, storage_options).zarr_store()
    threads = encode_threads(zarr.config.get("threading.max_workers", None))
    # old group document first (invisible from here on), then shards, documents, group last
    sync(_clear_own_group(store, path, {FULL_RES, *(a.path.split("/")[0] for a in sharded)}))
    fills, sent = sync(_put_shards(store, path, sharded, chunking, threads))
    objects = metadata_objects(volume, attrs, arrays, sharded, fills, chunking)
    sync(_put_group(store, path, objects))
    stored = sent + sum(len(v) for v in objects.values())
    return {
        "path": path,
        "checksum": checksum,
        "shape": list(volume.grid.shape),
        "bytes": int(sum(a.nbytes for a in arrays.values())),
        "stored_bytes": int(stored),
    }
