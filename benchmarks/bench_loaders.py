"""Patches/s of a 2-worker torch DataLoader: livercube vs MONAI vs TorchIO on the same volumes.

    python benchmarks/bench_loaders.py [--volumes 4] [--size 100x512x512] [--n 48]

Why: does streaming patches from a sharded Zarr store beat the usual way of training on
``.nii.gz`` files (goal: ≥ 20× MONAI's patches/s)?  The three pipelines read the
*same voxels*:

1. **livercube** — example CRLM DICOM (``livercube.synth.dicom_collections.write_crlm``)
   converted by ``livercube.convert.convert`` into a local store; ``PatchSampler`` in
   ``foreground`` mode (``foreground_fraction`` 0.5) → ``PatchIterableDataset`` →
   ``DataLoader(num_workers=2, persistent_workers=True)``.
2. **MONAI** — the store's image and label arrays written as ``.nii.gz`` with SimpleITK (LPS
   origin and spacing kept); ``LoadImaged`` + ``EnsureChannelFirstd`` +
   ``RandCropByPosNegLabeld(pos=1, neg=1, num_samples=1)`` in a ``monai.data.Dataset`` and a
   ``monai.data.DataLoader`` (a torch DataLoader that re-seeds the random transforms per
   worker) with 2 persistent workers.
3. **TorchIO** — ``SubjectsDataset`` of the same files + ``Queue`` (``num_workers=2``, as
   TorchIO recommends) with a ``LabelSampler`` (half background-centred, half spread over the
   foreground classes) and a ``DataLoader(num_workers=0)`` over the queue.

All three produce 96³ patches (image + label) and half of them are centred on foreground.
Every patch comes from a freshly chosen random volume: for MONAI and TorchIO this means one
volume load per patch (``num_samples=1``, ``samples_per_volume=1``), which is what makes the
comparison about the storage format; the amortised TorchIO mode (several patches per loaded
volume) is measured as an extra row with ``--tio-spv``.

Each pipeline runs one long iterator (random sampling with replacement), so workers start
once; ``--warmup`` patches (worker start, imports, first file opens, shard-index reads) are
consumed and excluded, then ``--n`` patches are timed.  Besides wall time, CPU seconds of the
main process and all its children are summed over the timed window: the development machine
is 2 shared cores, so wall-clock rates move with other jobs while CPU-s per patch does not.
Goals are printed, never asserted.  Not a test.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

PATCH = (96, 96, 96)
GOAL_MONAI = 20.0
#: Length of the MONAI / TorchIO random-subject epochs: far more than any timed window needs.
MAX_PATCHES = 20_000
#: Field of view of the generator's "full" size (512 px × 0.7 mm, 100 slices × 2.5 mm): the
#: benchmark grids keep it, so ``--size`` changes the resolution, not the anatomy covered.
FOV_XY_MM, FOV_Z_MM = 358.4, 250.0


@dataclass
class Volume:
    """One converted volume and its NIfTI twin (what every pipeline reads)."""

    path: str  # group path in the store
    shape: tuple[int, int, int]  # z, y, x
    spacing: tuple[float, float, float]  # z, y, x mm
    image_nii: Path
    label_nii: Path
    store_bytes: int
    nii_bytes: int
    classes: tuple[int, ...]  # label values present (0 included)


@dataclass
class Result:
    """Throughput of one pipeline over the timed window (warm-up excluded)."""

    name: str
    setup: str
    patches: int
    seconds: float
    cpu_seconds: float
    warmup_patches: int
    warmup_seconds: float
    fg_fraction: float  # share of timed patches whose centre voxel is foreground (label > 0)

    @property
    def rate(self) -> float:
        return self.patches / self.seconds

    @property
    def cpu_per_patch(self) -> float:
        return self.cpu_seconds / self.patches


# -- data ---------------------------------------------------------------------------------------
def parse_size(text: str) -> tuple[int, int, int]:
    """``ZxYxX`` → (z, y, x); in-plane must be square because the generator's grid is."""
    parts = tuple(int(p) for p in text.lower().split("x"))
    if len(parts) != 3 or parts[1] != parts[2] or min(parts) < max(PATCH):
        raise argparse.ArgumentTypeError(f"--size wants ZxNxN with every side ≥ 96, got {text!r}")
    return parts  # type: ignore[return-value]


def build_store(tmp: Path, n_volumes: int, size: tuple[int, int, int]) -> tuple[str, float]:
    """Write example CRLM DICOM at ``size`` and convert it with livercube's own converter.

    The generator only knows its named sizes; a benchmark-local entry is added to its size
    table (same field of view as "full"), so ``--size`` changes the resolution, not the anatomy
    covered.  The default is full-size 512² planes, what users train on (MONAI's and TorchIO's
    cost per patch grows with the volume, livercube's does not).
    One generator plan (CRLM-CT-1003) has twice the slices, as in the real collection.
    """
    from livercube.convert import convert
    from livercube.synth import dicom_collections as dc

    nz, n, _ = size
    name = f"bench{nz}x{n}"
    dc.SIZES[name] = (n, round(FOV_XY_MM / n, 4), round(FOV_Z_MM / nz, 4), nz)
    t = time.perf_counter()
    dc.write_crlm(tmp / "crlm", n_patients=n_volumes, size=name, keep_arrays=False)
    url = str(tmp / "store.zarr")
    report = convert(str(tmp / "crlm"), url, "crlm", progress=False)
    if report.exit_code != 0:
        raise SystemExit(f"conversion failed:\n{report.summary()}")
    return url, time.perf_counter() - t


def _tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def export_nifti(url: str, tmp: Path) -> list[Volume]:
    """Every store volume as ``image.nii.gz`` + ``label.nii.gz`` with its LPS geometry.

    SimpleITK is LPS like the store, so origin and spacing go over unchanged (x, y, z order);
    the files are what a MONAI / TorchIO user would have made from the same CT.
    """
    import SimpleITK as sitk

    import livercube
    from livercube.sampling import catalog_frame

    store = livercube.open(url)
    out = []
    for _, row in catalog_frame(store.catalog).iterrows():
        group = store.root[f"{row['path']}/0"]  # level 0: the full-resolution arrays
        spacing = tuple(float(row[f"spacing_{a}"]) for a in "zyx")
        origin = tuple(float(row[f"origin_{a}"]) for a in "zyx")
        d = tmp / "nifti" / str(row["patient_id"])
        d.mkdir(parents=True, exist_ok=True)
        label = group["label"][...]
        files = {}
        for key, arr in (("image", group["image"][...]), ("label", label)):
            img = sitk.GetImageFromArray(arr)
            img.SetSpacing(spacing[::-1])
            img.SetOrigin(origin[::-1])
            files[key] = d / f"{key}.nii.gz"
            sitk.WriteImage(img, str(files[key]), useCompression=True)
        out.append(
            Volume(
                path=str(row["path"]),
                shape=tuple(int(s) for s in label.shape),  # type: ignore[arg-type]
                spacing=spacing,  # type: ignore[arg-type]
                image_nii=files["image"],
                label_nii=files["label"],
                store_bytes=_tree_bytes(Path(url) / row["path"]),
                nii_bytes=files["image"].stat().st_size + files["label"].stat().st_size,
                classes=tuple(int(c) for c in np.unique(label)),
            )
        )
    return out


# -- timing -------------------------------------------------------------------------------------
def _cpu_seconds() -> float:
    """CPU (user + system) of this process and its live descendants (DataLoader workers).

    Workers are persistent and already running when the timed window opens, and still alive
    when it closes, so the difference over the window is the pipeline's CPU cost.
    """
    import psutil

    me = psutil.Process()
    total = sum(me.cpu_times()[:2])
    for child in me.children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):  # a worker may exit meanwhile
            total += sum(child.cpu_times()[:2])
    return total


def measure(
    name: str,
    setup: str,
    loader: Iterable[Any],
    args: argparse.Namespace,
    label_of: Callable[[Any], Any],
) -> Result:
    """Consume ``warmup`` then time ≥ ``n`` patches and ≥ ``min_seconds`` (whole batches).

    The time floor keeps the fast pipeline's window long enough to average over load spikes
    of the shared machine; the patch floor does the same for the slow ones.

    The clock starts before ``iter(loader)``, so the warm-up time includes worker start-up.
    The iterator is dropped on return, which shuts its workers down before the next pipeline.
    """
    batch_size, warmup, n, min_seconds = args.batch, args.warmup, args.n, args.min_seconds
    t0 = time.perf_counter()
    batches = iter(loader)
    seen = 0
    while seen < warmup:
        next(batches)
        seen += batch_size
    warm_s, warm_n = time.perf_counter() - t0, seen
    fg, count = 0, 0
    c0, t1 = _cpu_seconds(), time.perf_counter()
    while count < n or time.perf_counter() - t1 < min_seconds:
        batch = next(batches)
        lab = np.asarray(label_of(batch))
        # (B, 1, 96, 96, 96): is the centre voxel labelled?  Checks that each pipeline really
        # oversamples (~50 % + the uniform/background half's chance hits), not just its setup
        fg += int((lab[(slice(None), 0, *(p // 2 for p in PATCH))] > 0).sum())
        count += lab.shape[0]
    dt, dc = time.perf_counter() - t1, _cpu_seconds() - c0
    return Result(name, setup, count, dt, dc, warm_n, warm_s, fg / count)


# -- pipelines ----------------------------------------------------------------------------------
def bench_livercube(url: str, args: argparse.Namespace) -> Result:
    """livercube's IterableDataset with foreground oversampling (half of the patches)."""
    import torch.utils.data as tud

    from livercube.sampling import PatchIterableDataset, PatchSampler

    sampler = PatchSampler(
        url, patch_size=PATCH, mode="foreground", foreground_fraction=0.5, seed=0
    )
    ds = PatchIterableDataset(sampler, block=args.batch)
    loader = tud.DataLoader(
        ds, batch_size=args.batch, num_workers=args.workers, persistent_workers=True
    )
    setup = (
        f"PatchSampler(mode='foreground', foreground_fraction=0.5, prefetch={sampler.prefetch}) "
        f"→ PatchIterableDataset → DataLoader(num_workers={args.workers}, persistent)"
    )
    return measure("livercube", setup, loader, args, lambda b: b["label"])


def bench_livercube_inprocess(url: str, args: argparse.Namespace) -> Result:
    """The same sampler iterated in the main process (NumPy batches, no DataLoader).

    Why: separates what the reader costs from what DataLoader workers add (collation, pickling
    through shared memory, two processes fighting for two cores) — tells where to optimise.
    """
    from livercube.sampling import PatchSampler

    sampler = PatchSampler(
        url, patch_size=PATCH, mode="foreground", foreground_fraction=0.5, seed=0
    )
    setup = f"PatchSampler.batches({args.batch}) in the main process, prefetch={sampler.prefetch}"
    return measure(
        "livercube, no DataLoader",
        setup,
        sampler.batches(args.batch),
        args,
        lambda b: b["label"],
    )


def bench_monai(vols: list[Volume], args: argparse.Namespace) -> Result:
    """MONAI's dictionary transforms on ``.nii.gz``: one volume load per patch."""
    import torch.utils.data as tud

    # MONAI's optional GPU DICOM plugin is absent here and irrelevant for NIfTI
    warnings.filterwarnings("ignore", message="NvImgCodec")
    from monai.data import DataLoader, Dataset
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, RandCropByPosNegLabeld

    keys = ["image", "label"]
    transform = Compose(
        [
            LoadImaged(keys=keys, reader="NibabelReader"),
            EnsureChannelFirstd(keys=keys),
            RandCropByPosNegLabeld(
                keys=keys, label_key="label", spatial_size=PATCH, pos=1, neg=1, num_samples=1
            ),
        ]
    )
    transform.set_random_state(seed=0)
    data = [{"image": str(v.image_nii), "label": str(v.label_nii)} for v in vols]
    ds = Dataset(data, transform=transform)
    total = MAX_PATCHES
    loader = DataLoader(
        ds,
        batch_size=args.batch,
        sampler=tud.RandomSampler(ds, replacement=True, num_samples=total),
        num_workers=args.workers,
        persistent_workers=True,
    )
    setup = (
        "LoadImaged(NibabelReader) + EnsureChannelFirstd + RandCropByPosNegLabeld(pos=1, neg=1, "
        f"num_samples=1) → monai Dataset → DataLoader(num_workers={args.workers}, persistent)"
    )
    return measure("MONAI", setup, loader, args, lambda b: b["label"])


def bench_torchio(vols: list[Volume], args: argparse.Namespace, spv: int) -> Result:
    """TorchIO's patch queue: subjects loaded by 2 workers, patches cut in the main process."""
    import torch.utils.data as tud
    import torchio as tio

    subjects = [
        tio.Subject(image=tio.ScalarImage(v.image_nii), label=tio.LabelMap(v.label_nii))
        for v in vols
    ]
    ds = tio.SubjectsDataset(subjects)
    # background-centred half the time, the rest spread evenly over the foreground classes —
    # the same split as livercube's foreground mode and MONAI's pos=1/neg=1
    fg_classes = sorted({c for v in vols for c in v.classes if c > 0})
    probs = {0: float(len(fg_classes)), **{c: 1.0 for c in fg_classes}}
    sampler = tio.LabelSampler(PATCH, label_name="label", label_probabilities=probs)
    total = MAX_PATCHES
    max_length = max(2 * spv, 8)
    queue = tio.Queue(
        ds,
        max_length=max_length,
        samples_per_volume=spv,
        sampler=sampler,
        # one long epoch of random subjects, so the queue's loader workers start only once
        subject_sampler=tud.RandomSampler(ds, replacement=True, num_samples=-(-total // spv)),
        num_workers=args.workers,
        shuffle_subjects=False,
    )
    loader = tud.DataLoader(queue, batch_size=args.batch, num_workers=0)
    setup = (
        f"SubjectsDataset → Queue(max_length={max_length}, samples_per_volume={spv}, "
        f"num_workers={args.workers}, LabelSampler) → DataLoader(num_workers=0)"
    )
    name = "TorchIO" if spv == 1 else f"TorchIO, {spv} patches/volume"
    return measure(name, setup, loader, args, lambda b: b["label"][tio.DATA])


# -- report -------------------------------------------------------------------------------------
def _versions() -> str:
    from importlib.metadata import version

    names = ("livercube", "torch", "monai", "torchio", "nibabel", "SimpleITK", "zarr")
    return ", ".join(f"{n} {version(n)}" for n in names)


def _mb(b: float) -> str:
    return f"{b / 1e6:.1f}"


def report(vols: list[Volume], results: list[Result], args, build_s: float, loads: dict) -> None:
    """Print volumes, the side-by-side table and the goal reading (never asserting it)."""
    print(f"\n{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {_versions()}")
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs")
    print(f"1-min load average: {', '.join(f'{k} {v:.1f}' for k, v in loads.items())}")
    print(f"\nvolumes ({len(vols)}; store written + converted in {build_s:.0f} s):")
    print("| volume | shape z×y×x | spacing mm | raw MB | store MB | raw ÷ store | .nii.gz MB |")
    print("|---|---|---|---:|---:|---:|---:|")
    for v in vols:
        raw = int(np.prod(v.shape)) * 3  # int16 image + uint8 label
        print(
            f"| {v.path} | {'×'.join(map(str, v.shape))} | "
            f"{' × '.join(f'{s:g}' for s in v.spacing)} | {_mb(raw)} | {_mb(v.store_bytes)} | "
            f"{raw / max(1, v.store_bytes):.2f}× | {_mb(v.nii_bytes)} |"
        )
    print(
        f"\npatch {'×'.join(map(str, PATCH))} (image + label), batch {args.batch}, "
        f"{args.workers} workers; warm-up excluded"
    )
    for r in results:
        print(f"  {r.name}: {r.setup}")
    base = results[0]
    others = {r.name: r for r in results[1:]}
    monai, tio = others.get("MONAI"), others.get("TorchIO")
    print("(ratios: how many times livercube with 2 DataLoader workers beats each row)")
    print(
        "\n| pipeline | patches/s | CPU s/patch | timed patches | warm-up (patches, s) "
        "| centre in fg | livercube ÷ this (patches/s) | livercube ÷ this (CPU/patch) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r.name} | {r.rate:.2f} | {r.cpu_per_patch:.3f} | {r.patches} | "
            f"{r.warmup_patches}, {r.warmup_seconds:.1f} s | {100 * r.fg_fraction:.0f} % | "
            f"{base.rate / r.rate:.1f}× | {r.cpu_per_patch / base.cpu_per_patch:.1f}× |"
        )
    print()
    if monai:
        ratio = base.rate / monai.rate
        verdict = "met" if ratio >= GOAL_MONAI else "NOT met"
        print(f"goal livercube ≥ {GOAL_MONAI:.0f}× MONAI patches/s: {ratio:.1f}× — {verdict}")
    if tio:
        print(f"livercube ÷ TorchIO (1 patch/volume): {base.rate / tio.rate:.1f}×")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--volumes", type=int, default=4, help="CRLM patients (one volume each)")
    ap.add_argument(
        "--size",
        type=parse_size,
        default=parse_size("100x512x512"),  # full-size CT planes: what users train on
        help="nominal volume grid ZxNxN (CRLM-CT-1003 gets twice the slices)",
    )
    ap.add_argument("--n", type=int, default=48, help="timed patches per pipeline")
    ap.add_argument(
        "--min-seconds", type=float, default=15.0, help="shortest timed window per pipeline"
    )
    ap.add_argument("--warmup", type=int, default=8, help="patches consumed before timing")
    ap.add_argument("--batch", type=int, default=2, help="DataLoader batch size")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader / Queue workers")
    ap.add_argument(
        "--tio-spv",
        type=int,
        default=8,
        help="also time TorchIO with this many patches per loaded volume (0: skip)",
    )
    ap.add_argument(
        "--only",
        default="livercube,monai,torchio",
        help="comma list of pipelines (livercube always runs: it is the reference)",
    )
    args = ap.parse_args()
    from livercube.synth.phantom import use_scanner_noise

    use_scanner_noise(True)  # CT-like example data (σ 15 HU, correlated): compresses ~3×
    only = {s.strip().lower() for s in args.only.split(",")}
    loads: dict[str, float] = {"start": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory(prefix="bench_loaders_") as d:
        tmp = Path(d)
        print(f"writing {args.volumes} CRLM volumes of ~{'×'.join(map(str, args.size))} …")
        url, build_s = build_store(tmp, args.volumes, args.size)
        vols = export_nifti(url, tmp)
        results = []
        print("livercube …", flush=True)
        results.append(bench_livercube(url, args))
        results.append(bench_livercube_inprocess(url, args))
        loads["after livercube"] = os.getloadavg()[0]
        if "monai" in only:
            print("MONAI …", flush=True)
            results.append(bench_monai(vols, args))
            loads["after MONAI"] = os.getloadavg()[0]
        if "torchio" in only:
            print("TorchIO …", flush=True)
            results.append(bench_torchio(vols, args, 1))
            if args.tio_spv > 1:
                results.append(bench_torchio(vols, args, args.tio_spv))
            loads["after TorchIO"] = os.getloadavg()[0]
        report(vols, results, args, build_s, loads)


if __name__ == "__main__":
    main()
