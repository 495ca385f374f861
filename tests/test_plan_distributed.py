"""Planning that scales out: header reads in chunks, here or on a Dask cluster's workers.

The plan must not depend on where or in how many chunks the headers were read: same
acquisitions, same SEGs, same notes and losses in the same order.  A chunk whose task could
not run loses each of its files by name (exit 3), never silently.
"""

from __future__ import annotations

import pickle
import shutil
import time
from pathlib import Path

import pytest
from dask_cluster import dask_cluster
from dicom_factory import Study, canonical_test_array, write_ct_series

from livercube.fanout import (
    balanced_size,
    chunks,
    dask_map,
    local_map,
    mapper_slots,
    results_in_order,
)
from livercube.sources.dicom_scan import (
    Grouping,
    HeaderChunk,
    ScanResult,
    _Interner,
    read_header_chunk,
    scan,
)


def _collection(root: Path) -> Path:
    """Two patients, several series and every kind of note and loss the scanner knows."""
    a = canonical_test_array((6, 16, 16), seed=5)
    p1, p2 = Study("P1"), Study("P2", study_date="20020304")
    write_ct_series(root / "p1" / "s3", a, study=p1, series_number=3)
    uid = "1.2.826.0.1.3680043.8.498.77"  # two acquisitions at the same positions
    write_ct_series(root / "p1" / "s4a", a, study=p1, series_uid=uid, series_number=4)
    write_ct_series(
        root / "p1" / "s4b", a + 2, study=p1, series_uid=uid, series_number=4,
        acquisition_number=2, acquisition_time="102000",
    )  # fmt: skip
    paths = write_ct_series(root / "p2" / "s7", a, study=p2, series_number=7, skip={2})
    write_ct_series(root / "p2" / "s9", a[:1], study=p2, series_number=9)  # a stray slice
    dup = root / "p2" / "copy" / "dup.dcm"  # a truncated second copy of one slice
    dup.parent.mkdir(parents=True)
    dup.write_bytes(paths[0].read_bytes()[:-64])
    paths[3].write_bytes(paths[3].read_bytes()[:-64])  # truncated, no other copy: lost
    (root / "p2" / "zero.dcm").write_bytes(b"")
    (root / "p2" / "junk.dcm").write_bytes(b"not a dicom file at all" * 20)
    (root / "p2" / "blob.bin").write_bytes(b"\x01\x02" * 40)
    (root / "metadata.csv").write_text("Series UID,Number of Images\n")
    return root


@pytest.fixture(scope="module")
def collection(tmp_path_factory) -> Path:
    return _collection(tmp_path_factory.mktemp("plan") / "coll")


def _seen(result) -> tuple:
    return (
        result.n_files,
        result.acquisitions,
        result.segs,
        result.notes,
        result.left_out,
    )


def test_the_fixture_has_every_kind_of_outcome(collection):
    result = scan(str(collection))
    assert len(result.acquisitions) == 4  # s3, s4 ×2, s7 (s9 is a single slice)
    reasons = " | ".join(n.reason for n in result.left_out)
    for lost in ("zero-byte", "not DICOM", "truncated file", "single CT slice"):
        assert lost in reasons
    notes = " | ".join(n.reason for n in result.notes)
    assert "not a DICOM file" in notes and "duplicate SOPInstanceUID" in notes
    assert not any(n.path.endswith("metadata.csv") for n in result.notes + result.left_out)


@pytest.mark.parametrize("chunk_files", [1, 3, 7, 1000])
def test_plan_does_not_depend_on_the_chunk_size(collection, chunk_files):
    whole = scan(str(collection), chunk_files=10_000, max_workers=1)
    assert _seen(scan(str(collection), chunk_files=chunk_files)) == _seen(whole)


def test_plan_does_not_depend_on_the_order_chunks_finish(collection):
    def backwards(fn, items):  # results in order, computed last chunk first
        return list(reversed([fn(x) for x in reversed(items)]))

    assert _seen(scan(str(collection), chunk_files=2, mapper=backwards)) == _seen(
        scan(str(collection))
    )


def test_a_chunk_that_could_not_be_read_loses_each_of_its_files(collection):
    files = sorted(str(p) for p in collection.rglob("*") if p.is_file())

    def second_chunk_dies(fn, items):
        return [RuntimeError("worker lost") if i == 1 else fn(x) for i, x in enumerate(items)]

    result = scan(str(collection), chunk_files=4, mapper=second_chunk_dies)
    lost = [n for n in result.left_out if "task reading it failed" in n.reason]
    assert [n.path for n in lost] == files[4:8]
    assert all("RuntimeError: worker lost" in n.reason for n in lost)
    used = {s.path for a in result.acquisitions for s in a.slices}
    assert used and not used & set(files[4:8])


class _Streaming:
    """A streaming mapper that logs when it computes each chunk, run here."""

    def __init__(self, log: list[str]) -> None:
        self.log = log

    def __call__(self, fn, items):
        return list(self.imap(fn, items))

    def imap(self, fn, items):
        for i, x in enumerate(items):
            self.log.append(f"read {i}")
            yield fn(x)


def test_each_chunk_is_grouped_before_the_next_is_waited_for(collection, monkeypatch):
    """The client's share of planning overlaps the workers' reads: a streamed chunk is
    folded in as soon as it is back, not after the last one."""
    log: list[str] = []
    added = Grouping.add

    def logged_add(self, part, got):
        log.append(f"group {len(log) // 2}")
        return added(self, part, got)

    monkeypatch.setattr(Grouping, "add", logged_add)
    streamed = scan(str(collection), chunk_files=4, mapper=_Streaming(log))
    n = len(chunks(range(streamed.n_files), 4))
    assert n > 2
    assert log == [f"{what} {i}" for i in range(n) for what in ("read", "group")]
    monkeypatch.setattr(Grouping, "add", added)
    assert _seen(streamed) == _seen(scan(str(collection)))


def test_results_in_order_streams_only_what_can_stream():
    calls: list[int] = []

    def job(x):
        calls.append(x)
        return x * 10

    lazy = results_in_order(None, job, [1, 2, 3])
    assert calls == [] and next(lazy) == 10 and calls == [1]  # runs when asked
    assert list(lazy) == [20, 30]
    plain = lambda fn, items: [fn(x) for x in items]  # noqa: E731
    assert list(results_in_order(plain, job, [4])) == [40]
    log: list[str] = []
    assert list(results_in_order(_Streaming(log), job, [5, 6])) == [50, 60]
    assert log == ["read 0", "read 1"]


def test_groups_built_as_chunks_arrive_equal_groups_built_from_all_slices(tmp_path):
    """A clean collection takes the incremental path; regrouping everything at the end (the
    path taken when an instance repeats) must give the very same plan."""
    a = canonical_test_array((9, 8, 8), seed=4)
    study = Study("P")
    write_ct_series(tmp_path / "s1", a, study=study, series_number=1)
    write_ct_series(tmp_path / "s2", a[:, :, ::-1], study=study, series_number=2)
    write_ct_series(tmp_path / "s3", a, study=Study("Q"), series_number=1, skip={4})
    files = sorted((str(p), p.stat().st_size) for p in tmp_path.rglob("*.dcm"))
    parts = chunks(files, 5)
    outcomes = [read_header_chunk(p, source=str(tmp_path), storage_options=None) for p in parts]

    def plan(regroup: bool) -> ScanResult:
        grouping = Grouping(ScanResult(source=str(tmp_path), n_files=len(files)))
        grouping._regroup = regroup
        for part, got in zip(parts, outcomes, strict=True):
            grouping.add(part, got)
        assert grouping._regroup is regroup  # nothing repeats: the fast path stayed
        return grouping.finish()

    incremental = plan(False)
    assert len(incremental.acquisitions) == 3
    assert _seen(incremental) == _seen(plan(True))


def test_a_repeated_instance_in_a_later_chunk_is_still_resolved(collection):
    """The truncated copy of a slice sits in a later chunk than the complete one (and a
    truncated slice with no copy in another): the plan keeps the complete copy and loses the
    truncated-only slice, whatever chunk each lands in."""
    for size in (1, 2, 5):
        result = scan(str(collection), chunk_files=size)
        assert _seen(result) == _seen(scan(str(collection), chunk_files=10_000))
    assert isinstance(read_header_chunk([], source=str(collection), storage_options=None),
                      HeaderChunk)  # fmt: skip


def test_chunk_results_carry_no_pydicom_objects_and_are_small(collection):
    import io

    import pydicom

    files = [(str(p), p.stat().st_size) for p in sorted((collection / "p1").rglob("*.dcm"))]
    out = read_header_chunk(files, source=str(collection), storage_options=None)
    shipped = pickle.dumps(out)
    assert b"pydicom" not in shipped
    datasets = [
        pydicom.dcmread(io.BytesIO(Path(p).read_bytes()), stop_before_pixels=True) for p, _ in files
    ]
    assert len(shipped) < len(pickle.dumps(datasets)) / 2


def test_interner_shares_equal_values_but_keeps_signed_zero_apart():
    intern = _Interner()
    a, b = "".join(["SIE", "MENS"]), "".join(["SIEM", "ENS"])
    assert a is not b and intern(a) is intern(b)
    neg, pos = (1.0, -0.0), (1.0, 0.0)
    assert intern(neg) is neg and intern(pos) is pos
    assert repr(intern((1.0, -0.0))) == "(1.0, -0.0)"
    intern(1)
    assert type(intern(1.0)) is float
    items = ["A", "B"]
    assert intern(items) == items and intern(items) is not items  # lists are never shared


def test_chunks_keep_order_and_cover_everything():
    items = list(range(11))
    parts = chunks(items, 4)
    assert [len(p) for p in parts] == [4, 4, 3] and [x for p in parts for x in p] == items
    assert local_map(lambda x: x * 2, items) == [2 * x for x in items]
    with pytest.raises(ValueError, match="at least 1"):
        chunks(items, 0)


def test_jobs_are_cut_so_every_worker_thread_gets_several():
    size = lambda n, slots: balanced_size(n, slots, per_slot=4, smallest=32, largest=256)  # noqa: E731
    assert size(404, 2) == 51  # 8 jobs for 2 threads, not 256 + 148
    assert size(404, 1) == 101
    assert size(85_000, 32) == 256  # capped: small results, cheap retries
    assert size(40, 8) == 32  # floored: a task must outweigh its ~1 ms of overhead
    assert size(0, 4) == 32 and balanced_size(5, 2, per_slot=4, smallest=1, largest=8) == 1


class _TwoSlots:
    """A mapper that runs here but says it has two threads, as a 2-worker cluster would."""

    def __init__(self) -> None:
        self.sizes: list[int] = []

    def slots(self) -> int:
        return 2

    def __call__(self, fn, items):
        self.sizes = [len(x) for x in items]
        return [fn(x) for x in items]


def test_scan_cuts_headers_to_the_mappers_threads(tmp_path, monkeypatch):
    from livercube.sources import dicom_scan

    write_ct_series(tmp_path / "s", canonical_test_array((24, 8, 8), seed=2), study=Study("P"))
    monkeypatch.setattr(dicom_scan, "MIN_HEADER_CHUNK_FILES", 1)
    plain = lambda fn, items: [fn(x) for x in items]  # noqa: E731
    assert mapper_slots(plain) == 1 and mapper_slots(None) == 1
    two = _TwoSlots()
    assert mapper_slots(two) == 2
    result = scan(str(tmp_path), mapper=two)
    assert two.sizes == [3] * 8  # 24 files, 4 jobs per thread
    assert _seen(result) == _seen(scan(str(tmp_path), mapper=plain))


def test_plan_from_object_storage_equals_the_local_plan(collection, s3_bucket):
    """Listing by top-level folders at once and prefix-first header reads see what a local
    scan sees: same volumes, notes and losses once the roots are set aside."""
    import s3fs

    bucket, opts = s3_bucket
    fs = s3fs.S3FileSystem(**opts)
    fs.put(str(collection) + "/", f"{bucket}/coll/", recursive=True)
    from livercube.sources.dicom_headers import list_files

    listed = list_files(fs, f"{bucket}/coll")
    flat = sorted((k, v["size"]) for k, v in fs.find(f"{bucket}/coll", detail=True).items())
    assert listed == flat and len(listed) == sum(1 for p in collection.rglob("*") if p.is_file())
    assert list_files(fs, f"{bucket}/nothing-here") == []

    remote = scan(f"s3://{bucket}/coll", opts, chunk_files=5)
    local = scan(str(collection))
    as_remote = repr(_seen(local)).replace(str(collection), "ROOT")
    seen = repr(_seen(remote)).replace(f"s3://{bucket}/coll", "ROOT")
    assert seen.replace(f"{bucket}/coll", "ROOT") == as_remote


# --------------------------------------------------------------------------- real cluster


def _plan_signature(plan) -> tuple:
    return (
        [(t.key, t.fingerprint, t.phase, t.phase_evidence, t.seg_notes) for t in plan.tasks],
        plan.skipped,
        plan.warnings,
    )


@pytest.fixture(scope="module")
def hcc_with_defects(tmp_path_factory) -> Path:
    """The HCC-TACE-Seg example (SEGs, phases, the generator's quirks) plus damaged files."""
    from livercube.synth.dicom_collections import write_hcc_tace_seg

    root = tmp_path_factory.mktemp("plan-hcc") / "HCC"
    write_hcc_tace_seg(root, n_patients=2, size="tiny", seed=3)
    extra = _collection(root.parent / "defects")
    shutil.copytree(extra / "p2", root / "zz-damaged")
    return root


@pytest.mark.slow
def test_plan_on_a_real_cluster_equals_the_local_plan(hcc_with_defects, tmp_path, monkeypatch):
    from distributed import Client

    from livercube.sources import dicom_scan
    from livercube.sources.planning import plan_collection

    local = plan_collection(str(hcc_with_defects), "hcc-tace-seg")
    assert local.skipped and local.tasks  # the damaged files are losses
    monkeypatch.setattr(dicom_scan, "HEADER_CHUNK_FILES", 8)  # many tasks for both workers
    ran_on: set[str] = set()
    with dask_cluster(tmp_path / "logs") as c, Client(c.address, timeout=60) as client:
        mapper = dask_map(client, name="headers", retries=1)
        client.wait_for_workers(2, timeout=60)
        assert mapper_slots(mapper) == 2  # two single-threaded workers

        def spy(fn, items):  # which worker read each chunk (a closure: pickled by value)
            def tagged(x):
                from distributed import get_worker

                return get_worker().address, fn(x)

            got = mapper(tagged, items)
            assert not [g for g in got if isinstance(g, BaseException)]
            ran_on.update(where for where, _ in got)
            return [out for _, out in got]

        remote = plan_collection(str(hcc_with_defects), "hcc-tace-seg", mapper=spy)
        assert ran_on == set(client.scheduler_info()["workers"])

        def first_is_slowest(i):  # later items finish first; item 3 raises
            time.sleep(0.8 if i == 0 else 0.01)
            if i == 3:
                raise ValueError("chunk 3 is damaged")
            return i

        got = list(mapper.imap(first_is_slowest, range(6)))
        assert [g if isinstance(g, int) else type(g).__name__ for g in got] == [
            0, 1, 2, "ValueError", 4, 5,
        ]  # fmt: skip
        for _ in range(200):  # releases reach the client's event loop asynchronously
            if not client.futures:
                break
            time.sleep(0.05)
        assert not client.futures  # every result fetched and released
    assert len(ran_on) == 2
    assert _plan_signature(remote) == _plan_signature(local)


@pytest.mark.slow
def test_convert_with_a_cluster_reports_every_loss(hcc_with_defects, tmp_path):
    import json
    import subprocess

    from dask_cluster import BIN

    def run(dest: Path, *extra: str) -> dict:
        res = subprocess.run(
            [str(BIN / "livercube"), "convert", str(hcc_with_defects), str(dest),
             "--collection", "hcc-tace-seg", "--quiet", *extra],
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert res.returncode == 3, res.stdout + res.stderr  # damaged inputs: exit 3
        return json.loads((dest / "livercube-report.json").read_text())

    local = run(tmp_path / "local.zarr")
    with dask_cluster(tmp_path / "logs") as c:
        remote = run(tmp_path / "cluster.zarr", "--scheduler", c.address)
    assert remote["skipped"] == local["skipped"]
    # volume notes arrive in the order tasks finish; the plan's own order is tested above
    assert sorted(remote["warnings"]) == sorted(local["warnings"])
    assert sorted(r["path"] for r in remote["converted"]) == sorted(
        r["path"] for r in local["converted"]
    )
    damaged = {s["input"] for s in remote["skipped"]}
    assert any("zero.dcm" in d for d in damaged) and any("junk.dcm" in d for d in damaged)


# --------------------------------------------------------------------------- client costs


def test_local_listing_sees_what_fsspec_find_sees(tmp_path):
    """The scandir walk keeps find's rules: real folders descended, regular files only
    (links are neither), hidden files kept, vanished and unreadable folders left out."""
    import os

    import fsspec

    from livercube.sources.dicom_headers import list_files

    fs = fsspec.filesystem("file")
    (tmp_path / "a" / "b" / "c").mkdir(parents=True)
    (tmp_path / "empty").mkdir()
    (tmp_path / "a" / "x.dcm").write_bytes(b"12345")
    (tmp_path / "a" / "b" / "c" / "y").write_bytes(b"")
    (tmp_path / ".hidden").write_bytes(b"1")
    os.symlink(tmp_path / "a" / "x.dcm", tmp_path / "link.dcm")
    os.symlink(tmp_path / "a", tmp_path / "linked-folder")
    os.symlink(tmp_path / "nowhere", tmp_path / "broken")
    os.mkfifo(tmp_path / "fifo")

    def find(root: str) -> list[tuple[str, int]]:
        found = fs.find(root, detail=True).items()
        return sorted((k, int(v["size"])) for k, v in found if v["type"] == "file")

    root = str(tmp_path)
    assert list_files(fs, root) == find(root)
    assert [Path(p).name for p, _ in list_files(fs, root)] == [".hidden", "y", "x.dcm"]
    assert list_files(fs, root + "/") == find(root)
    assert list_files(fs, f"{root}/linked-folder") == find(f"{root}/linked-folder") != []
    assert list_files(fs, f"{root}/a/x.dcm") == [(f"{root}/a/x.dcm", 5)]
    assert list_files(fs, f"{root}/missing") == []


def test_chunks_ship_slices_as_columns_that_rebuild_the_same_slices(collection):
    from livercube.sources import dicom_scan
    from livercube.sources.dicom_headers import HEADER_PREFIX_BYTES
    from livercube.sources.dicom_scan import _IMAGE_ARGS, _WIRE_FIELDS, HeaderChunk

    assert sorted(_WIRE_FIELDS) == sorted(_IMAGE_ARGS)
    files = [(str(p), p.stat().st_size) for p in sorted(collection.rglob("*")) if p.is_file()]
    chunk = read_header_chunk(files, source=str(collection), storage_options=None)
    fs, intern = dicom_scan.fsspec.filesystem("file"), _Interner()
    direct = [
        dicom_scan._summarize_file(fs, f, str(collection), HEADER_PREFIX_BYTES, intern)
        for f in files
    ]
    expected = [im for o in direct for im in o.images]
    got = pickle.loads(pickle.dumps(chunk)).images()
    assert got == expected and len(got) == chunk.n_images > 0
    assert [n.path for n in chunk.lost] == [o.lost.path for o in direct if o.lost]
    assert [n.path for n in chunk.notes] == [o.note.path for o in direct if o.note]
    # rebuilt objects are the planner's own: setting an offset touches no other chunk's copy
    again = chunk.images()
    again[0].offset = 123.0
    assert chunk.images()[0].offset == 0.0
    empty = HeaderChunk.pack([])
    assert empty.images() == [] and pickle.loads(pickle.dumps(empty)) == empty


def test_grouping_leaves_the_garbage_collector_as_it_found_it(collection):
    import gc

    assert gc.isenabled()
    scan(str(collection))
    assert gc.isenabled()
    gc.disable()
    try:
        scan(str(collection))
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_a_remembered_spacing_fit_is_the_fresh_fit():
    """The fit is shared between calls on the same stack; errors still name their caller,
    and stacks that differ only in the sign of a zero are not mixed up."""
    from livercube.errors import GeometryError
    from livercube.sources import dicom_geometry
    from livercube.sources.dicom_geometry import DEFAULT_TOLERANCES, Tolerances, analyse_spacing

    dicom_geometry._fit_sorted.cache_clear()
    offsets = [5.0, 0.0, 12.5, 2.5, 15.0]
    first = analyse_spacing(offsets)
    assert analyse_spacing(sorted(offsets)) is first
    assert dicom_geometry._fit_sorted.cache_info().hits == 1
    assert first.missing == (3, 4) and first.spacing == 2.5
    loose = analyse_spacing(offsets, tol=Tolerances(spacing_rel=0.2))
    assert loose is not first and loose.tolerance == 0.5
    assert analyse_spacing(offsets, tol=DEFAULT_TOLERANCES) is first

    for name in ("series A", "series B"):  # a cached failure, raised for each caller
        with pytest.raises(GeometryError) as err:
            analyse_spacing([0.0, 2.5, 5.0, 8.7], source=name)
        assert err.value.source == name and "irregular slice spacing" in err.value.reason
    with pytest.raises(GeometryError) as neg:
        analyse_spacing([-0.0, 2.5, 5.0, 8.7])
    with pytest.raises(GeometryError) as pos:
        analyse_spacing([0.0, 2.5, 5.0, 8.7])
    assert "[-0.0, 2.5" in neg.value.reason and "[0.0, 2.5" in pos.value.reason
