"""PLC-CECT (Science Data Bank 10.57760/sciencedb.12207) as released: NIfTI + ``patient_data.csv``.

The release's headers are wrong in known ways (``collections.md``), and we handle each honestly:

* voxels are uint8 holding a [−200, 200] HU window: mapped back with
  ``hu = round(v·400/255 − 200)`` — every uint8 value gets a distinct int16 (steps of ≥1.57 HU), so
  the mapping is lossless and invertible; the volume is marked ``intensity.exact = false``;
* declared 1 mm spacing and zero origin are kept but flagged ``spacing_trusted = false``;
  users may supply real spacings per volume in an overrides CSV;
* slices are stored superior-first although the header says otherwise: the slice axis is
  reversed, except for volumes the overrides CSV marks ``slice_order = header``;
* RGB and 4-D/5-D files are reduced to 3-D (``sources.nifti``).
"""

from __future__ import annotations

import csv
import hashlib
import io
import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

import fsspec
import numpy as np

from livercube.errors import MaskMismatchError, SourceError, UnreadableFileError, UsageError
from livercube.schema import STORE_SCHEMA_VERSION, map_segment_label
from livercube.sources.nifti import load_nifti, to_scalar_volume
from livercube.store.layout import volume_path
from livercube.volumes.geometry import canonical_reorientation, decompose_affine, ras_to_lps_affine
from livercube.volumes.volume import SegmentField, Volume

COLLECTION = "plc-cect"
STUDY = "CECT"
PHASE_OF_CODE = {"P": "non_contrast", "C1": "arterial", "C2": "portal_venous", "C3": "delayed"}
WINDOW_HU = (-200.0, 200.0)
CT_NAME = re.compile(r"^(?P<pid>P\d{4})_ct_(?P<code>[A-Za-z0-9]+)\.nii(\.gz)?$")
MASK_NAME = re.compile(r"^(?P<pid>P\d{4})_mask_(?P<code>[A-Za-z0-9]+)\.nii(\.gz)?$")
LIVER_NAME = re.compile(r"^(?P<pid>P\d{4})-livermask_(?P<code>[A-Za-z0-9]+)\.nii(\.gz)?$")

#: Clinical columns as catalog variables (typed); both CSV header versions map here.
CLINICAL_COLUMNS: dict[str, dict[str, Any]] = {
    "age": {"dtype": "float", "units": "years"},
    "gender": {"dtype": "str", "coding": "male | female"},
    "cancer_type": {"dtype": "str", "coding": "HCC, ICC, CHCC (combined), CN (control)"},
    "Stage": {"dtype": "str", "description": "older patient_data.csv header only"},
}
CURRENT_HEADER = [
    "patient_id",
    "age",
    "gender",
    "phase",
    "cancer_type",
    "ct_path",
    "mask_path",
    "liver_mask_path",
]
OLD_HEADER = ["Patient ID", "Stage", "Cancer Type", "CT File", "Mask File", "Liver Mask File"]


def hu_from_window(v: np.ndarray) -> np.ndarray:
    """uint8 windowed intensity → int16 HU (lossless: distinct inputs stay distinct)."""
    lo, hi = WINDOW_HU
    return np.rint(v.astype(np.float64) * ((hi - lo) / 255.0) + lo).astype(np.int16)


def window_from_hu(hu: np.ndarray) -> np.ndarray:
    """Inverse of :func:`hu_from_window` on its image."""
    lo, hi = WINDOW_HU
    return np.rint((hu.astype(np.float64) - lo) * (255.0 / (hi - lo))).astype(np.uint8)


@dataclass
class PlcVolumeTask:
    """Everything one conversion task needs; small and picklable (it travels to dask workers)."""

    patient_id: str
    code: str
    ct: str
    mask: str | None
    liver_mask: str | None
    lesion_expected: bool
    clinical: dict[str, Any] = field(default_factory=dict)
    slice_order: str = "superior_first"  # or "header"
    spacing_zyx: tuple[float, float, float] | None = None
    notes: list[str] = field(default_factory=list)
    source_stamp: tuple = ()  # (name, size, mtime/ETag) of every file, taken at planning

    @property
    def key(self) -> str:
        return f"{self.patient_id}_{self.code}"

    @property
    def store_path(self) -> str:
        return volume_path(COLLECTION, self.patient_id, STUDY, self.code)

    @property
    def fingerprint(self) -> str:
        """Changes when a source file or any conversion parameter changes (resume key)."""
        body = repr(
            (
                STORE_SCHEMA_VERSION,
                self.patient_id,
                self.code,
                self.lesion_expected,
                sorted(self.clinical.items()),
                self.slice_order,
                self.spacing_zyx,
                self.source_stamp,
            )
        )
        return "sha256:" + hashlib.sha256(body.encode()).hexdigest()

    def read(self, storage_options: dict | None = None) -> tuple[Volume, list[dict]]:
        return read_volume(self, storage_options)


@dataclass
class PatientTable:
    """Parsed ``patient_data.csv``: per-patient covariates and per-(patient, phase) file names."""

    header_version: str
    covariates: dict[str, dict[str, Any]]
    files: dict[tuple[str, str], dict[str, str]]
    notes: list[str]


def _clean(value: str | None) -> str:
    return (value or "").strip()


def read_patient_table(text: str, source: str = "patient_data.csv") -> PatientTable:
    """Parse either header version of ``patient_data.csv`` (BOM, quoting and row order ignored)."""
    text = text.lstrip("\ufeff")
    reader = csv.DictReader(io.StringIO(text))
    header = [h.strip().lstrip("\ufeff") for h in (reader.fieldnames or [])]
    reader.fieldnames = header
    notes: list[str] = []
    covariates: dict[str, dict[str, Any]] = {}
    files: dict[tuple[str, str], dict[str, str]] = {}
    if set(CURRENT_HEADER) <= set(header):
        version = "current"
    elif set(OLD_HEADER) <= set(header):
        version = "old"
    else:
        raise UnreadableFileError(
            source,
            f"unrecognised header {header}; expected {CURRENT_HEADER} or the older {OLD_HEADER}",
        )
    for lineno, row in enumerate(reader, start=2):
        if version == "current":
            pid = _clean(row["patient_id"])
            age_text = _clean(row["age"])
            try:
                age = float(age_text) if age_text else None
            except ValueError:
                notes.append(f"{source}:{lineno}: age {age_text!r} is not a number; left empty")
                age = None
            gender = _clean(row["gender"]).lower() or None
            cov = {"age": age, "gender": gender, "cancer_type": _clean(row["cancer_type"]) or None}
            code = _clean(row["phase"])
            paths = {
                "ct": _clean(row["ct_path"]),
                "mask": _clean(row["mask_path"]),
                "liver_mask": _clean(row["liver_mask_path"]),
            }
        else:
            pid = _clean(row["Patient ID"])
            cov = {
                "Stage": _clean(row["Stage"]) or None,
                "cancer_type": _clean(row["Cancer Type"]) or None,
            }
            paths = {
                "ct": _clean(row["CT File"]),
                "mask": _clean(row["Mask File"]),
                "liver_mask": _clean(row["Liver Mask File"]),
            }
            m = CT_NAME.match(PurePosixPath(paths["ct"]).name)
            code = m["code"] if m else ""
        if not pid:
            notes.append(f"{source}:{lineno}: row without patient id ignored")
            continue
        previous = covariates.setdefault(pid, {})
        for k, v in cov.items():
            if v is not None:
                previous.setdefault(k, v)
        files[(pid, code)] = paths
    return PatientTable(version, covariates, files, notes)


def read_overrides(text: str, source: str = "overrides") -> dict[tuple[str, str], dict[str, Any]]:
    """Per-volume overrides CSV: ``patient_id,phase,slice_order,spacing_z,spacing_y,spacing_x``.

    ``slice_order`` is ``superior_first`` (the release's usual error, corrected) or ``header``
    (trust the header); spacings in mm replace the header's untrusted 1 mm; empty cells keep
    the defaults.
    """
    out: dict[tuple[str, str], dict[str, Any]] = {}
    reader = csv.DictReader(io.StringIO(text.lstrip("\ufeff")))
    for lineno, row in enumerate(reader, start=2):
        pid, code = _clean(row.get("patient_id")), _clean(row.get("phase"))
        if not pid or not code:
            raise UsageError(f"{source}:{lineno}: patient_id and phase are required")
        entry: dict[str, Any] = {}
        order = _clean(row.get("slice_order"))
        if order:
            if order not in ("superior_first", "header"):
                raise UsageError(f"{source}:{lineno}: slice_order must be superior_first or header")
            entry["slice_order"] = order
        sp = [_clean(row.get(f"spacing_{a}")) for a in "zyx"]
        if any(sp):
            try:
                entry["spacing_zyx"] = tuple(float(v) for v in sp)
            except ValueError as exc:
                raise UsageError(f"{source}:{lineno}: spacing_z/y/x must all be numbers") from exc
        out[(pid, code)] = entry
    return out


@dataclass
class PlcPlan:
    tasks: list[PlcVolumeTask]
    skipped: list[dict[str, str]]  # {"input":…, "reason":…}
    warnings: list[str]
    clinical_columns: dict[str, dict[str, Any]]


def _stamp(fs, url: str, prefix: str) -> tuple:
    """(name, size, modification stamp) of a source file: its identity for resume."""
    info = fs.info(url.removeprefix(prefix))
    when = info.get("mtime") or info.get("LastModified") or info.get("ETag") or info.get("created")
    return (url.rsplit("/", 1)[-1], int(info.get("size") or 0), str(when))


def plan(
    source: str,
    *,
    clinical: str | None = None,
    overrides: str | None = None,
    storage_options: dict | None = None,
) -> PlcPlan:
    """List the volumes of a PLC-CECT release from file names and ``patient_data.csv``."""
    fs, root = fsspec.core.url_to_fs(source, **(storage_options or {}))
    root = root.rstrip("/")
    proto = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    prefix = "" if proto in ("file", "local") else f"{proto}://"

    def listing(sub: str) -> dict[str, str]:
        try:
            names = fs.ls(f"{root}/{sub}", detail=False)
        except FileNotFoundError:
            return {}
        return {PurePosixPath(n).name: prefix + n for n in names}

    cts, masks, livers = listing("ct_files"), listing("mask_files"), listing("liver_mask_files")
    if not cts:
        raise UsageError(f"{source} has no ct_files/ folder with .nii.gz files: is it PLC-CECT?")
    warnings: list[str] = []
    skipped: list[dict[str, str]] = []

    table: PatientTable | None = None
    csv_path = clinical or (
        f"{root}/patient_data.csv" if fs.exists(f"{root}/patient_data.csv") else None
    )
    if csv_path:
        with fsspec.open(
            csv_path if clinical else prefix + csv_path, "rb", **(storage_options or {})
        ) as f:
            text = f.read().decode("utf-8-sig", errors="replace")
        table = read_patient_table(text, str(csv_path))
        warnings.extend(table.notes)
    else:
        warnings.append("no patient_data.csv: no clinical covariates; lesion masks not checked")
    ov: dict[tuple[str, str], dict[str, Any]] = {}
    if overrides:
        with fsspec.open(overrides, "rt", encoding="utf-8-sig") as f:
            ov = read_overrides(f.read(), overrides)

    by_key_mask = {(m["pid"], m["code"]): n for n in masks if (m := MASK_NAME.match(n))}
    by_key_liver = {(m["pid"], m["code"]): n for n in livers if (m := LIVER_NAME.match(n))}
    tasks: list[PlcVolumeTask] = []
    for name in sorted(cts):
        m = CT_NAME.match(name)
        if not m:
            skipped.append(
                {"input": cts[name], "reason": "file name is not P####_ct_<phase>.nii.gz"}
            )
            continue
        pid, code = m["pid"], m["code"]
        key = (pid, code)
        notes: list[str] = []
        if code not in PHASE_OF_CODE:
            notes.append(f"unknown phase code {code!r} (expected P, C1, C2, C3): phase 'unknown'")
        cov = dict(table.covariates.get(pid, {})) if table else {}
        if table and pid not in table.covariates:
            warnings.append(f"{pid}: CT files present but no row in patient_data.csv")
        row = table.files.get(key) if table else None
        lesion_expected = True
        if table is not None:
            if row is not None:
                lesion_expected = bool(row.get("mask"))
            else:
                lesion_expected = cov.get("cancer_type") not in (None, "CN")
        if cov.get("cancer_type") == "CN":
            lesion_expected = False
        mask_name = by_key_mask.get(key)
        liver_name = by_key_liver.get(key)
        o = ov.get(key, {})
        stamp = tuple(
            _stamp(fs, url, prefix)
            for url in (cts[name], masks.get(mask_name or ""), livers.get(liver_name or ""))
            if url
        )
        tasks.append(
            PlcVolumeTask(
                patient_id=pid,
                code=code,
                ct=cts[name],
                mask=masks[mask_name] if mask_name else None,
                liver_mask=livers[liver_name] if liver_name else None,
                lesion_expected=lesion_expected and not (table is None and mask_name is None),
                clinical=cov,
                slice_order=o.get("slice_order", "superior_first"),
                spacing_zyx=o.get("spacing_zyx"),
                notes=notes,
                source_stamp=stamp,
            )
        )
    if table:
        have = {(t.patient_id, t.code) for t in tasks}
        for (pid, code), _paths in sorted(table.files.items()):
            if (pid, code) not in have:
                skipped.append(
                    {
                        "input": f"patient_data.csv {pid} {code}",
                        "reason": "listed in patient_data.csv but its CT file is missing",
                    }
                )
    ct_keys = {(t.patient_id, t.code) for t in tasks}
    for k, n in sorted({**by_key_mask, **by_key_liver}.items()):
        if k not in ct_keys:
            warnings.append(f"{n}: mask without a CT file; ignored")
    columns = {k: v for k, v in CLINICAL_COLUMNS.items() if any(k in t.clinical for t in tasks)}
    return PlcPlan(tasks, skipped, warnings, columns)


def _reorient_plan(data_shape_ijk, affine_ras, task: PlcVolumeTask, source: str):
    direction, spacing_ijk, origin = decompose_affine(ras_to_lps_affine(affine_ras))
    if task.spacing_zyx is not None:
        world = np.argmax(np.abs(direction), axis=0)  # world axis (0=x) of index axes i, j, k
        user_xyz = task.spacing_zyx[::-1]
        spacing_ijk = tuple(float(user_xyz[w]) for w in world)
    return canonical_reorientation(
        tuple(data_shape_ijk[::-1]), direction, spacing_ijk, origin, source=source
    ), spacing_ijk


def _load_kji(url: str, storage_options: dict | None, slice_order: str):
    data, affine, facts = load_nifti(url, storage_options)
    data, notes = to_scalar_volume(data, url)
    kji = np.transpose(data, (2, 1, 0))  # nibabel (i, j, k) -> numpy (k, j, i)
    if slice_order == "superior_first":
        kji = kji[::-1]
    return kji, affine, facts, notes


def read_volume(
    task: PlcVolumeTask, storage_options: dict | None = None
) -> tuple[Volume, list[dict]]:
    """Decode one CT with its masks into a canonical :class:`Volume`; returns (volume, skipped).

    A missing or unreadable mask does not lose the CT: the volume is written with what exists,
    marked ``annotation_complete = false``, and the mask is listed as a skipped input.
    """
    skipped: list[dict[str, str]] = []
    kji, affine, facts, notes = _load_kji(task.ct, storage_options, task.slice_order)
    reo, spacing_ijk = _reorient_plan(kji.shape[::-1], affine, task, task.ct)
    if kji.dtype == np.uint8:
        image = hu_from_window(reo.apply(kji))
        intensity = {
            "exact": False,
            "windowed": True,
            "window_hu": list(WINDOW_HU),
            "source_dtype": "uint8",
            "to_hu": "round(v * 400 / 255 - 200)",
            "from_hu": "round((hu + 200) * 255 / 400)",
            "note": "values outside the window saturate; HU are approximate",
        }
    elif np.issubdtype(kji.dtype, np.integer) and kji.min() >= -32768 and kji.max() <= 32767:
        image = reo.apply(kji).astype(np.int16)
        intensity = {"exact": True, "windowed": False, "source_dtype": str(kji.dtype)}
    else:
        raise UnreadableFileError(task.ct, f"unsupported CT voxel type {kji.dtype}")

    seg_specs = []
    annotation_complete = True
    for kind, url, label in (
        ("liver mask", task.liver_mask, "Liver"),
        ("lesion mask", task.mask, "Lesion"),
    ):
        if url is None:
            if kind == "liver mask" or task.lesion_expected:
                annotation_complete = False
                skipped.append(
                    {"input": f"{task.key} {kind}", "reason": f"{kind} file missing for {task.ct}"}
                )
            continue
        try:
            mk, _, _, _ = _load_kji(url, storage_options, task.slice_order)
            if mk.shape != kji.shape:
                raise MaskMismatchError(
                    url,
                    f"mask shape {mk.shape[::-1]} differs from CT "
                    f"shape {kji.shape[::-1]} (i, j, k)",
                )
        except SourceError as exc:
            annotation_complete = False
            skipped.append({"input": url, "reason": exc.reason})
            continue
        values = np.unique(mk)
        seg_specs.append(
            (
                label,
                reo.apply(mk) > 0,
                {
                    "source_file": PurePosixPath(url).name,
                    "source_values": [int(v) for v in values[values != 0][:16]],
                    "binarised": "value > 0",
                },
            )
        )
    segments = None
    if seg_specs:
        segments = SegmentField(image.shape, len(seg_specs))
        for number, (label, mask, codes) in enumerate(seg_specs, start=1):
            info = segments.add(
                mask,
                label=label,
                number=number,
                unified=map_segment_label(COLLECTION, label),
                codes=codes,
            )
            if info.voxels == 0:
                notes.append(f"{label} mask is empty")

    gender = task.clinical.get("gender")
    meta = {
        "study_uid": None,
        "study_date": None,
        "series_uid": None,
        "series_number": None,
        "series_description": f"PLC-CECT phase {task.code}",
        "acquisition_number": None,
        "phase_evidence": f"file name phase code {task.code}",
        "source": {
            "ct": task.ct,
            "mask": task.mask,
            "liver_mask": task.liver_mask,
            "nifti_header": facts,
        },
        "intensity": intensity,
        "geometry_flags": {
            "spacing_trusted": task.spacing_zyx is not None,
            "origin_trusted": False,
            "slice_order": task.slice_order,
            "spacing_source": "overrides file"
            if task.spacing_zyx
            else "NIfTI header (declared 1 mm)",
            "declared_spacing_ijk": list(spacing_ijk),
        },
        "annotation_complete": annotation_complete and bool(seg_specs),
        "notes": [*task.notes, *notes],
        "age": task.clinical.get("age"),
        "sex": gender if gender in ("male", "female") else None,
    }
    vol = Volume(
        collection=COLLECTION,
        patient_id=task.patient_id,
        study=STUDY,
        series=task.code,
        image=image,
        grid=reo.grid,
        phase=PHASE_OF_CODE.get(task.code, "unknown"),
        source_direction=reo.source_direction,
        segments=segments,
        meta=meta,
        clinical=dict(task.clinical),
    )
    return vol, skipped
