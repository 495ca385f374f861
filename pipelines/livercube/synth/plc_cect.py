"""A miniature PLC-CECT release, written exactly as the real one is on disk, quirks included.

On disk: ``ct_files/P0001_ct_C1.nii.gz``, ``mask_files/P0001_mask_C1.nii.gz``,
``liver_mask_files/P0001-livermask_C1.nii.gz`` and ``patient_data.csv`` (current header, every
field quoted, rows shuffled, ``mask_path`` empty for CN controls, an age and a gender missing).
Every file declares 1 mm spacing and origin 0 (identity affine) and holds uint8 voxels of a
[−200, 200] HU window, stored superior-first although the header says inferior-first — except
one phase of one patient (``flipped``), stored as the header says: the release's "sometimes
only one phase of a patient is flipped".  One CT is RGB24 (grey in three channels), one a
vector image as SimpleITK writes RGB (shape x, y, z, 1, 3, intent "vector"), one 4-D and one
5-D with singleton trailing axes.  Each phase is cropped to the liver in z, with a slightly
different crop per phase, and phases are not co-registered.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field, replace
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from livercube.sources.plc_cect import (
    CURRENT_HEADER,
    OLD_HEADER,
    hu_from_window,
    window_from_hu,
)
from livercube.synth.phantom import Anatomy, Ball, abdomen_grid, make_anatomy, render

CODES = ("P", "C1", "C2", "C3")
PHASE = {"P": "non_contrast", "C1": "arterial", "C2": "portal_venous", "C3": "delayed"}
SIZES = {"tiny": (48, 7.5), "small": (128, 2.8), "full": (512, 0.78125)}
SLICE_SPACING = {"tiny": 10.0, "small": 4.0, "full": 2.5}


@dataclass
class PlcVolumeTruth:
    """What the converter must recover for one (patient, phase), canonical (z, y, x) LPS."""

    patient_id: str
    code: str
    image: np.ndarray  # int16 HU after the uint8 window (what the file can tell)
    liver: np.ndarray
    lesion: np.ndarray | None  # None for controls
    slice_order: str  # "superior_first" (usual quirk) or "header"
    form: str  # "3d", "rgb" (RGB24), "vector" (x, y, z, 1, 3 as SimpleITK writes), "4d", "5d"
    physical_spacing_zyx: tuple[float, float, float]


@dataclass
class PlcTruth:
    root: Path
    volumes: dict[tuple[str, str], PlcVolumeTruth] = field(default_factory=dict)
    patients: dict[str, dict[str, object]] = field(default_factory=dict)
    overrides_csv: str = ""


def _top_heavy_liver(anatomy: Anatomy) -> Anatomy:
    """Move the left lobe up against the dome, as in a real liver.

    A real liver is widest near its top and tapers into the right lobe's tip, so its area
    profile along z is lopsided — what lets the converter tell a reversed phase.  The
    phantom's default liver is nearly symmetric in z; this keeps its lobes but lifts and
    widens the left one.
    """
    main, left = anatomy.liver[:2]
    lobe = Ball(
        (left.centre[0], left.centre[1], main.centre[2] + 0.55 * main.radii[2]),
        (left.radii[0] * 1.3, left.radii[1] * 1.2, 0.45 * main.radii[2]),
    )
    return replace(anatomy, liver=(main, lobe, *anatomy.liver[2:]))


def _cancer_type(index: int, n: int) -> str:
    if n >= 2 and index == n - 1:
        return "CN"
    return ("HCC", "ICC", "CHCC")[index % 3]


def _to_file_order(canonical: np.ndarray, slice_order: str) -> np.ndarray:
    """Canonical (z, y, x) LPS → nibabel (i, j, k) under an identity (RAS) affine.

    Identity RAS: i runs toward patient Right (−x), j toward Anterior (−y), k toward Superior.
    ``superior_first`` stores slice k=0 as the most superior one, contradicting the header.
    """
    a = canonical[:, ::-1, ::-1]
    if slice_order == "superior_first":
        a = a[::-1]
    return np.ascontiguousarray(np.transpose(a, (2, 1, 0)))


def _save_vector(data: np.ndarray, path: Path) -> None:
    """Grey in three components, written by SimpleITK as a vector image (the standard way).

    ITK is LPS: direction diag(−1, −1, 1) and origin 0 become the identity RAS affine every
    other file of this release declares.
    """
    kji = np.transpose(data, (2, 1, 0))
    img = sitk.GetImageFromArray(np.repeat(kji[..., None], 3, axis=-1), isVector=True)
    img.SetDirection((-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path))


def _save(data: np.ndarray, path: Path, form: str = "3d") -> None:
    if form == "vector":
        _save_vector(data, path)
        return
    if form == "rgb":
        rgb = np.empty(data.shape, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
        rgb["R"] = rgb["G"] = rgb["B"] = data
        data = rgb
    elif form == "4d":
        data = data[..., None]
    elif form == "5d":
        data = data[..., None, None]
    img = nib.Nifti1Image(data, np.eye(4))
    img.set_qform(np.eye(4), code=1)
    img.set_sform(np.eye(4), code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))


def write_plc_cect(
    root: str | Path,
    *,
    n_subjects: int = 3,
    size: str = "tiny",
    seed: int = 0,
    header_version: str = "current",
    flipped: set[tuple[int, str]] | None = None,
) -> PlcTruth:
    """Write a PLC-CECT release of ``n_subjects`` under ``root``; returns the truth.

    ``flipped`` names the (subject index, phase) stored as the header says, unlike the rest of
    its patient (default: subject 0, phase C3).
    """
    root = Path(root)
    n_xy, sxy = SIZES[size]
    sz = SLICE_SPACING[size]
    truth = PlcTruth(root)
    rng = np.random.default_rng(seed)
    forms = {
        (n_subjects - 1, "P"): "vector",
        (0, "C1"): "rgb",
        (0, "C2"): "4d",
        (1 % max(n_subjects, 1), "C3"): "5d",
    }
    header_ordered = {(0, "C3")} if flipped is None else set(flipped)
    rows = []
    for s in range(n_subjects):
        pid = f"P{s + 1:04d}"
        ctype = _cancer_type(s, n_subjects)
        anatomy = _top_heavy_liver(
            make_anatomy(
                seed * 1000 + s,
                n_tumours=0 if ctype == "CN" else 2,
                tumour_kind="tumor_hcc" if ctype in ("HCC", "CHCC") else "tumor_met",
            )
        )
        age = None if s == 1 else int(rng.integers(35, 80))
        gender = None if s == 2 else ("male" if rng.random() < 0.7 else "female")
        truth.patients[pid] = {"age": age, "gender": gender, "cancer_type": ctype}
        z_lo = min(b.centre[2] - b.radii[2] for b in anatomy.liver)
        z_hi = max(b.centre[2] + b.radii[2] for b in anatomy.liver)
        for code in CODES:
            lo = z_lo + sz * float(rng.uniform(-1.0, 1.0))  # cropped to the liver, per phase
            hi = z_hi + sz * float(rng.uniform(-1.0, 1.0))
            nz = round((hi - lo) / sz) + 1
            grid = abdomen_grid((nz, n_xy, n_xy), (sz, sxy, sxy), centre_z=(lo + hi) / 2)
            r = render(anatomy, grid, PHASE[code], seed=seed * 100 + s * 10 + CODES.index(code))
            v = window_from_hu(np.clip(r.image, -200, 200))
            liver = r.masks["liver"]
            lesion = np.zeros_like(liver)
            for name, m in r.masks.items():
                if name.startswith("tumor_"):
                    lesion |= m
            order = "header" if (s, code) in header_ordered else "superior_first"
            form = forms.get((s, code), "3d")
            _save(_to_file_order(v, order), root / "ct_files" / f"{pid}_ct_{code}.nii.gz", form)
            _save(
                _to_file_order(liver.astype(np.uint8), order),
                root / "liver_mask_files" / f"{pid}-livermask_{code}.nii.gz",
            )
            mask_rel = ""
            if ctype != "CN":
                _save(
                    _to_file_order(lesion.astype(np.uint8), order),
                    root / "mask_files" / f"{pid}_mask_{code}.nii.gz",
                )
                mask_rel = f"mask_files/{pid}_mask_{code}.nii.gz"
            truth.volumes[(pid, code)] = PlcVolumeTruth(
                pid,
                code,
                hu_from_window(v),
                liver,
                None if ctype == "CN" else lesion,
                order,
                form,
                (sz, sxy, sxy),
            )
            rows.append(
                [
                    pid,
                    "" if age is None else str(age),
                    gender or "",
                    code,
                    ctype,
                    f"ct_files/{pid}_ct_{code}.nii.gz",
                    mask_rel,
                    f"liver_mask_files/{pid}-livermask_{code}.nii.gz",
                ]
            )
    rng.shuffle(rows)
    buf = io.StringIO()
    w = csv.writer(buf, quoting=csv.QUOTE_ALL, lineterminator="\n")
    if header_version == "current":
        w.writerow(CURRENT_HEADER)
        w.writerows(rows)
    else:
        w.writerow(OLD_HEADER)
        for r_ in rows:
            w.writerow(
                [
                    r_[0],
                    "I" if r_[4] != "CN" else "",
                    r_[4],
                    Path(r_[5]).name,
                    Path(r_[6]).name if r_[6] else "",
                    Path(r_[7]).name,
                ]
            )
    (root / "patient_data.csv").write_text(buf.getvalue())
    truth.overrides_csv = "patient_id,phase,slice_order,spacing_z,spacing_y,spacing_x\n" + "".join(
        f"{pid},{code},header,,,\n"
        for (pid, code), t in truth.volumes.items()
        if t.slice_order == "header"
    )
    return truth


def write_plc_example(root: Path, *, n: int, size: str, seed: int) -> PlcTruth:
    """The registry's example writer for PLC-CECT."""
    return write_plc_cect(root, n_subjects=n, size=size, seed=seed)
