"""A fourth collection plugs in from another package, with no change to livercube.

The plug-in below is a real installed-looking distribution (a ``.dist-info`` with an
``entry_points.txt`` on ``sys.path``), found through ``importlib.metadata`` in a fresh
``livercube`` process — exactly what ``pip install livercube-toy`` would give.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from livercube.sources.plan import Plan, VolumeTask, task_fingerprint

TOY_MODULE = '''
"""A toy collection: one .npy file of int16 HU per volume (and _mask.npy for the liver)."""
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from livercube.registry import Collection
from livercube.sources.plan import Plan, task_fingerprint
from livercube.volumes.geometry import Grid
from livercube.volumes.volume import SegmentField, Volume


@dataclass
class ToyTask:
    patient_id: str
    path: str
    collection: str = "toy"
    study: str = "s1"

    @property
    def key(self):
        return Path(self.path).name

    @property
    def series(self):
        return "ct"

    @property
    def fingerprint(self):
        return task_fingerprint(self.path, Path(self.path).stat().st_size)

    def read(self, storage_options=None):
        image = np.load(self.path)
        grid = Grid(tuple(image.shape), (2.0, 0.8, 0.8), (-10.0, -100.0, -100.0))
        mask_path = Path(self.path.replace(".npy", "_mask.npy"))
        segments = None
        if mask_path.exists():
            segments = SegmentField(image.shape, 1)
            segments.add(np.load(mask_path), label="Liver", number=1, unified=1)
        # what the store contract asks of every volume beyond voxels (volume.schema.json)
        meta = {
            "intensity": {"exact": True, "units": "HU"},
            "geometry_flags": {"spacing_trusted": True},
            "source": {"files": [Path(self.path).name]},
        }
        vol = Volume("toy", self.patient_id, self.study, self.series, image, grid,
                     phase="portal_venous", segments=segments, meta=meta)
        return vol, []


def plan(source, *, collection, **_):
    tasks, skipped = [], []
    for f in sorted(Path(source).glob("*.npy")):
        if f.name.endswith("_mask.npy"):
            continue
        if f.stat().st_size == 0:
            skipped.append({"input": f.name, "reason": "empty file"})
            continue
        tasks.append(ToyTask(f.stem, str(f)))
    return Plan(tasks, skipped, [], {})


def write_example(root, *, n, size, seed):
    raise NotImplementedError


COLLECTION = Collection(
    id="toy",
    title="Toy collection",
    aliases=("toy-ct",),
    planner="livercube_toy:plan",
    example_writer="livercube_toy:write_example",
    example_folder="Toy",
    catalog_prefix="toy_",
    provenance={"title": "Toy", "publisher": "tests", "licence": "CC0", "licence_url": "",
                "doi": ""},
)
CLASHING = Collection(
    id="crlm-copy",
    title="clash",
    aliases=("crlm",),
    planner="livercube_toy:plan",
    example_writer="livercube_toy:write_example",
    example_folder="X",
    catalog_prefix="x_",
    provenance={},
)
'''


def _install_plugin(site: Path, entry_points: str) -> None:
    site.mkdir(parents=True, exist_ok=True)
    (site / "livercube_toy.py").write_text(TOY_MODULE)
    dist = site / "livercube_toy-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: livercube-toy\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(textwrap.dedent(entry_points))


def _livercube(site: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(site), env.get("PYTHONPATH")) if p)
    code = "import sys; from livercube.cli import main; sys.exit(main())"
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=300
    )


@pytest.mark.slow
def test_a_plugin_collection_converts_through_the_cli(tmp_path):
    site = tmp_path / "site"
    _install_plugin(
        site,
        """
        [livercube.collections]
        toy = livercube_toy:COLLECTION
        clash = livercube_toy:CLASHING
        broken = livercube_toy_missing:COLLECTION
        """,
    )
    src = tmp_path / "toy-src"
    src.mkdir()
    rng = np.random.default_rng(0)
    images = {}
    for pid in ("p1", "p2"):
        images[pid] = rng.integers(-1000, 1500, size=(6, 20, 24)).astype(np.int16)
        np.save(src / f"{pid}.npy", images[pid])
    mask = np.zeros((6, 20, 24), dtype=bool)
    mask[2:4, 5:10, 6:12] = True
    np.save(src / "p1_mask.npy", mask)
    (src / "p3.npy").write_bytes(b"")  # left out by the plug-in's planner, with its reason

    dest = tmp_path / "store.zarr"
    res = _livercube(site, "convert", str(src), str(dest), "--collection", "toy-ct", "--quiet")
    # the broken and the clashing plug-ins are named once each, and the run goes on
    assert "livercube_toy_missing:COLLECTION" in res.stderr and "failed to load" in res.stderr
    assert "reuses a known name (crlm)" in res.stderr
    assert res.returncode == 3, res.stdout + res.stderr  # p3 was left out
    report = json.loads((dest / "livercube-report.json").read_text())
    assert [s["input"] for s in report["skipped"]] == ["p3.npy"]
    assert sorted(r["path"] for r in report["converted"]) == ["toy/p1/s1/ct", "toy/p2/s1/ct"]

    import livercube
    from livercube.store.contract import check_store

    store = livercube.open(str(dest))
    assert sorted(store.paths()) == ["toy/p1/s1/ct", "toy/p2/s1/ct"]
    for pid, image in images.items():
        np.testing.assert_array_equal(store.volume(f"toy/{pid}/s1/ct")["image"].values, image)
    assert store.segments("toy/p1/s1/ct")["Liver"].sum() == mask.sum()
    assert check_store(str(dest)) == []

    # without the plug-in on the path the name is unknown, and livercube says which it knows
    res = _livercube(tmp_path / "empty", "convert", str(src), str(tmp_path / "s2"),
                     "--collection", "toy")
    assert res.returncode == 2 and "toy" in res.stderr and "crlm" in res.stderr


def test_the_builtin_tasks_satisfy_the_task_protocol(tmp_path):
    """Every collection's planner returns a Plan of VolumeTasks, which the store places."""
    from livercube import registry
    from livercube.store.layout import task_path

    for cid in ("hcc-tace-seg", "crlm", "plc-cect"):
        entry = registry.get(cid)
        root = tmp_path / cid
        entry.write_example(root, n=1, size="tiny", seed=3)
        plan = entry.plan(str(root))
        assert isinstance(plan, Plan) and plan.tasks, cid
        for task in plan.tasks:
            assert isinstance(task, VolumeTask), (cid, type(task))
            assert task_path(task).split("/")[:2] == [cid, task.patient_id.replace(" ", "_")]
            assert task.fingerprint.startswith("sha256:")


def test_the_fingerprint_covers_the_schema_version_and_every_part(monkeypatch):
    a = task_fingerprint("x", 1, (2, 3))
    assert a == task_fingerprint("x", 1, (2, 3))
    assert a != task_fingerprint("x", 1, (2, 4))
    import livercube.sources.plan as plan_module

    monkeypatch.setattr(plan_module, "STORE_SCHEMA_VERSION", "99.0")
    assert a != task_fingerprint("x", 1, (2, 3))  # a layout change re-converts everything
