"""Verify a store: re-read every complete volume and prove it is what was written.

``livercube verify URL [--source DIR --collection C]``

For every complete volume group (see ``schemas/store-contract.md``):

* the completion record, the group's ``checksum`` and the catalog's ``checksum`` agree;
* every expected shard object exists (where the store can be listed).  Zarr omits shards that
  hold only the fill value, so a missing shard is damage only when the content checksum no
  longer matches; otherwise it is noted as an all-fill shard;
* the arrays decode and their content checksum (:func:`~livercube.volumes.volume.
  content_checksum` over ``image``/``label``/``segments``, by the algorithm the stored one
  names) equals the stored one; a missing or
  damaged shard object reads as fill values or fails to decode, so either way it is caught;
* the group still satisfies the contract (metadata schema, coordinates, OME metadata), and
  ``class_locations`` rows point at voxels of their class;
* with ``source``: the sources are planned again, exactly as ``convert`` does, and decoded
  again — for DICOM by **independent** decoders (SimpleITK for the CT slices, highdicom for the
  SEG, both placed by physical coordinates only; :mod:`livercube.sources.dicom_reference`), so
  a mistake in the converter's own decoding or placement shows up; PLC-CECT NIfTI sources are
  re-decoded by the converter's reader (the release's header quirks need its corrections) —
  and compared voxel for voxel with the store.

The catalog is checked against the set of complete volumes, and the consolidated root
metadata against the volumes' own documents (a stale snapshot misleads every reader).

Exit status of the command: **0** nothing wrong, **4** damage or mismatches found
(:data:`EXIT_DAMAGED`), 2 usage errors, 1 anything else.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from livercube.errors import SourceError, StoreError, UsageError
from livercube.schema import CATALOG_GROUP
from livercube.store.completion import CompletionRecord, is_complete
from livercube.store.contract import check_volume_group
from livercube.store.layout import FULL_RES, in_collection_tree, task_path
from livercube.store.location import StoreLocation, with_retries
from livercube.volumes.volume import (
    CHECKSUM_HASHES,
    checksum_algorithm,
    content_checksum,
    segment_mask,
)

#: Exit status of ``livercube verify`` when any damage or mismatch is found.
EXIT_DAMAGED = 4

#: Arrays covered by the content checksum, in the contract's words.
CHECKSUM_ARRAYS = ("image", "label", "segments")

#: Arrays never all-fill when written (coordinates, sampled class locations): an absent
#: shard object is damage even though their content has no checksum.
ALWAYS_WRITTEN = ("class_locations", "z", "y", "x")


@dataclass
class VolumeResult:
    """What verification found for one volume (``problems`` empty: intact)."""

    path: str
    checksum: str = ""
    computed: str = ""
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    source_checked: bool = False

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class VerifyReport:
    """Outcome of :func:`verify`: per-volume results plus store-level problems."""

    url: str
    listed: bool = True
    source: str | None = None
    volumes: list[VolumeResult] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # store level: catalog, consolidation
    notes: list[str] = field(default_factory=list)

    @property
    def damaged(self) -> list[VolumeResult]:
        return [v for v in self.volumes if not v.ok]

    @property
    def ok(self) -> bool:
        return not self.problems and not self.damaged

    @property
    def exit_code(self) -> int:
        return 0 if self.ok else EXIT_DAMAGED

    def to_dict(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "ok": self.ok,
            "exit_code": self.exit_code,
            "listed": self.listed,
            "source": self.source,
            "n_volumes": len(self.volumes),
            "n_damaged": len(self.damaged),
            "damaged": [v.path for v in self.damaged],
            "problems": self.problems,
            "notes": self.notes,
            "volumes": [{**asdict(v), "ok": v.ok} for v in self.volumes],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def summary(self) -> str:
        lines = []
        for v in self.damaged:
            lines.append(f"DAMAGED {v.path}")
            lines += [f"  {p}" for p in v.problems]
        lines += [f"STORE   {p}" for p in self.problems]
        lines += [f"note    {n}" for n in self.notes]
        checked = "decoded and checksummed"
        if self.source:
            checked += f", compared voxel for voxel with {self.source}"
        lines.append(
            f"{len(self.volumes)} volumes {checked}: {len(self.volumes) - len(self.damaged)} "
            f"intact, {len(self.damaged)} damaged, {len(self.problems)} store problems"
            f" -> {'OK' if self.ok else 'DAMAGE FOUND'}"
        )
        return "\n".join(lines)


# --------------------------------------------------------------------------- inventory


async def _inventory(store: zarr.abc.store.Store) -> tuple[set[str], dict[str, bytes]]:
    """Every key of the store (one recursive listing) and every ``zarr.json`` document."""
    keys = {k async for k in store.list()}
    proto = default_buffer_prototype()
    sem = asyncio.Semaphore(32)

    async def get(key: str):
        async with sem:
            buf = await store.get(key, prototype=proto)
            return key, None if buf is None else buf.to_bytes()

    docs = [k for k in keys if k == "zarr.json" or k.endswith("/zarr.json")]
    fetched = await asyncio.gather(*(get(k) for k in docs))
    return keys, {k: v for k, v in fetched if v is not None}


def _volume_groups(
    docs: dict[str, bytes], problems: list[str], notes: list[str]
) -> dict[str, dict[str, Any]]:
    """Complete volume groups (path → livercube attrs) among the metadata documents."""
    found: dict[str, dict[str, Any]] = {}
    for key, raw in sorted(docs.items()):
        path = key.removesuffix("zarr.json").rstrip("/")
        if not in_collection_tree(key):
            continue
        try:
            doc = json.loads(raw)
        except ValueError as exc:
            problems.append(f"{key}: unreadable metadata document ({exc})")
            continue
        if doc.get("node_type") != "group":
            continue
        meta = doc.get("attributes", {}).get("livercube")
        if not isinstance(meta, dict) or "collection" not in meta:
            continue  # intermediate group (collection / patient / study)
        if is_complete(meta):
            found[path] = meta
        else:
            notes.append(f"{path}: incomplete volume (status {meta.get('status')!r}), ignored")
    return found


def _consolidated_volumes(root: zarr.Group) -> dict[str, dict[str, Any]]:
    """Complete volume groups according to the root's consolidated metadata."""
    cm = root.metadata.consolidated_metadata
    out: dict[str, dict[str, Any]] = {}
    for path, node in (cm.flattened_metadata if cm else {}).items():
        meta = getattr(node, "attributes", {}).get("livercube")
        if (
            getattr(node, "node_type", "") == "group"
            and isinstance(meta, dict)
            and is_complete(meta)
            and in_collection_tree(f"{path}/")
        ):
            out[path] = meta
    return out


def expected_shard_keys(path: str, name: str, array: zarr.Array) -> list[str]:
    """Keys of every shard (or chunk, when unsharded) object of ``array`` at ``path/name``."""
    grid_chunk = array.shards or array.chunks
    grid = tuple(-(-s // c) for s, c in zip(array.shape, grid_chunk, strict=True))
    encode = array.metadata.encode_chunk_key
    return [f"{path}/{name}/{encode(idx)}" for idx in np.ndindex(*grid)]


# --------------------------------------------------------------------------- one volume


def _check_class_locations(group: zarr.Group, label: np.ndarray | None) -> list[str]:
    if "class_locations" not in group or label is None:
        return []
    rows = np.asarray(group["class_locations"][...])
    if rows.size == 0:
        return []
    if rows.ndim != 2 or rows.shape[1] != 4:
        return [f"class_locations has shape {rows.shape}, expected (n, 4)"]
    zyx = rows[:, 1:]
    if (zyx < 0).any() or (zyx >= np.array(label.shape)).any():
        return ["class_locations points outside the volume"]
    wrong = int((label[zyx[:, 0], zyx[:, 1], zyx[:, 2]] != rows[:, 0]).sum())
    return [f"class_locations: {wrong} rows point at voxels of another class"] if wrong else []


def _data_name(name: str) -> str:
    """Member name relative to a volume group → name relative to its full-resolution group."""
    return name.removeprefix(f"{FULL_RES}/")


def verify_volume(
    root: zarr.Group,
    path: str,
    meta: dict[str, Any],
    *,
    keys: set[str] | None,
    catalog_checksum: str | None,
    source_check: Callable[[zarr.Group, dict[str, np.ndarray]], tuple[list[str], list[str]]]
    | None = None,
) -> VolumeResult:
    """Re-read one complete volume group and report everything wrong with it.

    ``source_check(group, stored arrays)`` compares the volume with its re-decoded source and
    returns (problems, notes).
    """
    res = VolumeResult(path, checksum=str(meta.get("checksum", "")))
    record = getattr(CompletionRecord.of(meta), "checksum", None)
    if record != res.checksum:
        res.problems.append(f"completion record checksum {record} != group checksum")
    if catalog_checksum is None:
        res.problems.append("not in the catalog")
    elif catalog_checksum != res.checksum:
        res.problems.append(f"catalog checksum {catalog_checksum} != group checksum")
    try:
        # with a listing, as stored now: the volume's own consolidated metadata (what plain
        # HTTP readers use) could hide what is there
        group = (
            root[path]
            if keys is None
            else zarr.open_group(root.store, path=path, mode="r", use_consolidated=False)
        )
        assert isinstance(group, zarr.Group)
    except Exception as exc:
        res.problems.append(f"group unreadable: {type(exc).__name__}: {exc}")
        return res

    expected = ["image", *(("label", "segments") if meta.get("annotated") else ())]
    try:
        members = sorted(
            (name, node)
            for name, node in group.members(max_depth=None)
            if isinstance(node, zarr.Array)
        )
    except Exception as exc:
        res.problems.append(f"group members unreadable: {type(exc).__name__}: {exc}")
        return res
    # full-resolution arrays by their own name ("image"), browse levels by path ("1/image")
    names = {_data_name(name) for name, _ in members}
    res.problems += [f"array {n!r} missing" for n in expected if n not in names]
    arrays: dict[str, np.ndarray] = {}
    missing: dict[str, list[str]] = {}
    for member, arr in members:
        name = _data_name(member)
        if keys is not None:
            absent = [k for k in expected_shard_keys(path, member, arr) if k not in keys]
            if absent:
                missing[name] = absent
        try:
            data = np.asarray(arr[...])
        except Exception as exc:
            res.problems.append(f"{name}: cannot be decoded ({type(exc).__name__}: {exc})")
            continue
        if name in CHECKSUM_ARRAYS:
            arrays[name] = data
    present = [n for n in CHECKSUM_ARRAYS if n in names]
    algorithm = checksum_algorithm(res.checksum)
    if algorithm not in CHECKSUM_HASHES:
        res.problems.append(f"stored checksum {res.checksum!r} names no known algorithm")
    elif present and len(arrays) == len(present):
        res.computed = content_checksum(arrays, algorithm)
        if res.computed != res.checksum:
            res.problems.append(f"content checksum {res.computed} != stored {res.checksum}")
    for name, absent in missing.items():
        if name in CHECKSUM_ARRAYS and res.computed == res.checksum:
            # zarr does not write shards holding only the fill value: fine if content matches
            res.notes.append(f"{len(absent)} all-fill shards of {name} not stored (checksum ok)")
        elif name in CHECKSUM_ARRAYS or name in ALWAYS_WRITTEN:
            res.problems += [f"missing shard object {k}" for k in absent]
        else:  # other arrays carry no checksum: missing means all fill, which may be right
            res.notes.append(f"{len(absent)} shards of {name} not stored (read as fill)")
    try:
        res.problems += [p.removeprefix(f"{path}: ") for p in check_volume_group(path, group)]
        res.problems += _check_class_locations(group[FULL_RES], arrays.get("label"))
    except Exception as exc:
        res.problems.append(f"metadata/coordinates unreadable: {type(exc).__name__}: {exc}")

    if source_check is not None:
        try:
            problems, notes = source_check(group, arrays)
        except SourceError as exc:
            res.problems.append(f"source cannot be read: {exc.source}: {exc.reason}")
            return res
        except Exception as exc:
            res.problems.append(f"source cannot be read: {type(exc).__name__}: {exc}")
            return res
        res.source_checked = True
        res.problems += problems
        res.notes += notes
    return res


def compare_arrays(source: dict[str, np.ndarray], stored: dict[str, np.ndarray]) -> list[str]:
    """Voxel-for-voxel differences between freshly decoded sources and stored arrays."""
    problems = []
    for name in sorted(set(source) | set(stored)):
        if name not in stored:
            problems.append(f"source has {name!r}, the store does not")
            continue
        if name not in source:
            problems.append(f"store has {name!r}, the source does not")
            continue
        a, b = source[name], stored[name]
        if a.shape != b.shape or a.dtype != b.dtype:
            problems.append(f"{name}: source {a.dtype}{a.shape} != store {b.dtype}{b.shape}")
            continue
        diff = a != b
        n = int(diff.sum())
        if n:
            first = tuple(int(i) for i in np.argwhere(diff)[0])
            problems.append(
                f"{name}: {n} voxels differ from the source (first at z,y,x={first}: "
                f"source {a[first]}, store {b[first]})"
            )
    return problems


# --------------------------------------------------------------------------- sources


def source_tasks(
    source: str,
    collection: str,
    *,
    clinical: str | None = None,
    overrides: str | None = None,
    source_options: dict | None = None,
) -> dict[str, Any]:
    """Conversion tasks of a source collection, keyed by their store path (as ``convert``)."""
    from livercube.sources.planning import plan_collection

    plan = plan_collection(
        source, collection, clinical=clinical, overrides=overrides, source_options=source_options
    )
    return {task_path(t): t for t in plan.tasks}


def decoded_arrays(task: Any, source_options: dict | None) -> dict[str, np.ndarray]:
    """The arrays ``convert`` would write for one task (``image``, ``label``, ``segments``)."""
    volume, _ = task.read(source_options)
    arrays = {"image": volume.image}
    label = volume.label()
    if label is not None:
        arrays["label"] = label
        arrays["segments"] = volume.segments.bits
    return arrays


def dicom_reference_check(
    task: Any, group: zarr.Group, arrays: dict[str, np.ndarray], source_options: dict | None
) -> tuple[list[str], list[str]]:
    """Compare a stored DICOM volume with SimpleITK's CT and highdicom's SEG decoding."""
    from livercube.sources.dicom_collection import file_url
    from livercube.sources.dicom_ct import FILL_HU
    from livercube.sources.dicom_reference import reference_ct, reference_segments

    coords = tuple(np.asarray(group[FULL_RES][a][...]) for a in ("z", "y", "x"))
    acq = task.acquisition
    urls = list(dict.fromkeys(file_url(acq.source, s.path) for s in acq.slices))
    ref = reference_ct(urls, coords, fill=FILL_HU, storage_options=source_options)  # type: ignore[arg-type]
    stored = arrays.get("image")
    problems: list[str] = []
    notes: list[str] = []
    if stored is None:
        return ["image not decodable: nothing to compare"], notes
    problems += compare_arrays({"image": ref.image.astype(stored.dtype)}, {"image": stored})
    segs = (group.attrs.get("livercube") or {}).get("segments") or []
    if task.seg is None or not segs or "segments" not in arrays:
        return problems, notes
    numbers = [int(s["number"]) for s in segs]
    masks, checked, why = reference_segments(
        file_url(task.seg.source, task.seg.path),
        coords,
        numbers,
        storage_options=source_options,  # type: ignore[arg-type]
    )
    if checked is None:
        notes += [f"segments not independently checked: {w}" for w in why]
        return problems, notes
    bits = arrays["segments"]
    for s in segs:
        mine = segment_mask(bits, int(s["bit"]))
        diff = (mine != masks[int(s["number"])]) & checked
        n = int(diff.sum())
        if n:
            first = tuple(int(i) for i in np.argwhere(diff)[0])
            problems.append(
                f"segment {s['label']!r}: {n} voxels differ from highdicom's placement of the "
                f"SEG (first at z,y,x={first})"
            )
    if not checked.all():
        notes.append(
            f"segments compared on {int(checked.sum())} of {checked.size} voxels (the SEG "
            "samples other planes than the CT)"
        )
    return problems, notes


def _source_check(task: Any, source_options: dict | None):
    """How to compare a volume with its source: independent decoders for DICOM, the NIfTI
    reader (with the release's corrections) for PLC-CECT."""
    if hasattr(task, "acquisition"):
        return lambda group, arrays: dicom_reference_check(task, group, arrays, source_options)
    return lambda group, arrays: (
        compare_arrays(decoded_arrays(task, source_options), arrays),
        [],
    )


# --------------------------------------------------------------------------- the store


def _catalog_checksums(root: zarr.Group, report: VerifyReport) -> dict[str, str] | None:
    if CATALOG_GROUP not in root:
        report.problems.append("catalog group missing (livercube catalog URL rebuilds it)")
        return None
    try:
        cat = root[CATALOG_GROUP]
        paths = [str(p) for p in np.asarray(cat["path"][...])]
        sums = [str(c) for c in np.asarray(cat["checksum"][...])]
    except Exception as exc:
        report.problems.append(f"catalog unreadable: {type(exc).__name__}: {exc}")
        return None
    return dict(zip(paths, sums, strict=True))


def verify(
    where: str | StoreLocation,
    storage_options: dict[str, Any] | None = None,
    *,
    source: str | None = None,
    collection: str | None = None,
    clinical: str | None = None,
    overrides: str | None = None,
    source_options: dict[str, Any] | None = None,
    workers: int = 4,
) -> VerifyReport:
    """Verify the store at ``url`` (and, with ``source``, against that collection's sources).

    Read-only: works with anonymous access.  On stores that cannot be listed (plain HTTP),
    volumes come from the consolidated metadata and shard presence is judged by decoding.
    """
    loc = StoreLocation.of(where, storage_options)
    url = loc.url
    source_options = with_retries(source, source_options) if source else source_options
    report = VerifyReport(url, source=source)
    if source is not None and collection is None:
        raise UsageError("--source needs --collection")
    store = loc.zarr_store(read_only=True)
    keys: set[str] | None
    try:
        keys, docs = sync(_inventory(store))
    except (FileNotFoundError, NotImplementedError, OSError, ValueError):
        keys, docs = None, {}
    if keys is not None and "zarr.json" not in keys:
        keys = None  # a listing that sees nothing (HTTP without index pages): not a listing
    try:
        consolidated_root = loc.open_root(mode="r", store=store)
    except Exception as exc:
        raise StoreError(f"no livercube store at {url}: {exc}") from exc

    if keys is None:
        report.listed = False
        report.notes.append(
            "store cannot be listed: volumes taken from the consolidated metadata, "
            "shard objects judged by decoding only"
        )
        vols = _consolidated_volumes(consolidated_root)
        root = consolidated_root
    else:
        vols = _volume_groups(docs, report.problems, report.notes)
        root = loc.open_root(mode="r", consolidated=False, store=store)
        if consolidated_root.metadata.consolidated_metadata is None:
            report.problems.append(
                "root metadata is not consolidated (livercube publish / catalog fixes it)"
            )
        else:
            snap = _consolidated_volumes(consolidated_root)
            stale = sorted(
                p
                for p in set(snap) | set(vols)
                if snap.get(p, {}).get("checksum") != vols.get(p, {}).get("checksum")
            )
            if stale:
                report.problems.append(
                    f"consolidated metadata is stale for {len(stale)} volumes "
                    f"(e.g. {stale[0]}); livercube publish / catalog fixes it"
                )

    catalog = _catalog_checksums(root, report)
    if catalog is not None:
        for p in sorted(set(catalog) - set(vols)):
            report.problems.append(f"catalog lists {p}, which is not a complete volume")

    tasks: dict[str, Any] = {}
    if source is not None:
        assert collection is not None
        tasks = source_tasks(
            source,
            collection,
            clinical=clinical,
            overrides=overrides,
            source_options=source_options,
        )
        mine = {p for p in vols if p.split("/", 1)[0] == collection}
        for p in sorted(set(tasks) - mine):
            report.problems.append(f"source volume {p} is not in the store")
        for p in sorted(mine - set(tasks)):
            report.problems.append(f"store volume {p} has no source in {source}")

    def one(item: tuple[str, dict[str, Any]]) -> VolumeResult:
        path, meta = item
        task = tasks.get(path)
        return verify_volume(
            root,
            path,
            meta,
            keys=keys,
            catalog_checksum=None if catalog is None else catalog.get(path),
            source_check=None if task is None else _source_check(task, source_options),
        )

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        report.volumes = list(pool.map(one, sorted(vols.items())))
    if catalog is None:  # "not in the catalog" is a store problem then, not per volume
        for v in report.volumes:
            v.problems = [p for p in v.problems if p != "not in the catalog"]
    return report
