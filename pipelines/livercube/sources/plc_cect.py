"""PLC-CECT (Science Data Bank 10.57760/sciencedb.12207) as released: NIfTI + ``patient_data.csv``.

The release's headers are wrong in known ways (``collections.md``), and we handle each honestly:

* voxels are uint8 holding a [−200, 200] HU window: mapped back with
  ``hu = round(v·400/255 − 200)`` — every uint8 value gets a distinct int16 (steps of ≥1.57 HU), so
  the mapping is lossless and invertible; the volume is marked ``intensity.exact = false``;
* declared 1 mm spacing and zero origin are kept but flagged ``spacing_trusted = false``;
  users may supply real spacings per volume in an overrides CSV;
* slices are stored superior-first although the header says otherwise: the slice axis is
  reversed, except for the phase whose liver profile runs opposite to the patient's other
  phases (``sources.slice_order``, noted) and volumes the overrides CSV marks — the CSV wins;
* RGB (RGB24 or vector) and 4-D/5-D files are reduced to 3-D (``sources.nifti``);
* ``patient_data.csv`` that is not UTF-8 is decoded as Windows-1252/Latin-1 with a warning; a
  broken one (empty, header only, truncated rows) costs only the covariates, reported as skipped.
"""

from __future__ import annotations

import csv
import io
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any, ClassVar

import fsspec
import numpy as np

from livercube.errors import (
    IntensityError,
    MaskMismatchError,
    SourceError,
    UnreadableFileError,
    UsageError,
)
from livercube.schema import map_segment_label
from livercube.sources import slice_order as so
from livercube.sources.nifti import load_nifti, max_nifti_bytes, shear_deg, to_scalar_volume
from livercube.sources.plan import Plan, task_fingerprint
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
    slice_order_source: str = "default (release stores superior-first)"
    max_bytes: int | None = None  # decompressed NIfTI size limit, fixed at planning

    collection: ClassVar[str] = COLLECTION
    #: A subject's phases form one study (the release has no study level).
    study: ClassVar[str] = STUDY

    @property
    def key(self) -> str:
        return f"{self.patient_id}_{self.code}"

    @property
    def series(self) -> str:
        return self.code

    @property
    def fingerprint(self) -> str:
        """Changes when a source file or any conversion parameter changes (resume key)."""
        return task_fingerprint(
            self.patient_id,
            self.code,
            self.lesion_expected,
            sorted(self.clinical.items()),
            self.slice_order,
            self.spacing_zyx,
            self.source_stamp,
        )

    def read(self, storage_options: dict | None = None) -> tuple[Volume, list[dict]]:
        return read_volume(self, storage_options)


@dataclass
class PatientTable:
    """Parsed ``patient_data.csv``: per-patient covariates and per-(patient, phase) file names."""

    header_version: str
    covariates: dict[str, dict[str, Any]]
    files: dict[tuple[str, str], dict[str, str]]
    notes: list[str]
    problems: list[str] = field(default_factory=list)  # rows not used: reported as skipped


def _clean(value: str | None) -> str:
    return (value or "").strip()


def decode_table(raw: bytes, source: str = "patient_data.csv") -> tuple[str, list[str]]:
    """Bytes of a CSV → text: UTF-8 (BOM allowed), else Windows-1252/Latin-1 with a warning.

    Spreadsheet exports on Windows write Windows-1252; decoding those as UTF-8 with
    replacement would turn ``mâle`` into ``m\ufffdle`` silently.
    """
    try:
        return raw.decode("utf-8-sig"), []
    except UnicodeDecodeError as exc:
        where = f"byte {exc.start}"
    try:
        text, enc = raw.decode("cp1252"), "Windows-1252"
    except UnicodeDecodeError:
        text, enc = raw.decode("latin-1"), "Latin-1"
    return text, [f"{source} is not UTF-8 ({where}); decoded as {enc}"]


def _describe(values: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v!r}" for k, v in values.items())


def read_patient_table(text: str, source: str = "patient_data.csv") -> PatientTable:
    """Parse either header version of ``patient_data.csv`` (BOM, quoting and row order ignored).

    An empty file or an unknown header raises :class:`UnreadableFileError`; a file with a
    header but no rows, and rows that are cut short (a truncated download), are returned as
    ``problems`` so the caller can report them and still convert the images.  Rows that
    repeat a (patient, phase) with different values, or give one patient different
    covariates, keep the first value and produce a warning in ``notes``.
    """
    text = text.lstrip("\ufeff")
    if not text.strip():
        raise UnreadableFileError(source, "file is empty: no clinical covariates read")
    reader = csv.DictReader(io.StringIO(text), strict=True)
    try:
        header = [h.strip().lstrip("\ufeff") for h in (reader.fieldnames or [])]
    except csv.Error as exc:
        raise UnreadableFileError(source, f"header line cannot be parsed ({exc})") from exc
    reader.fieldnames = header
    notes: list[str] = []
    problems: list[str] = []
    covariates: dict[str, dict[str, Any]] = {}
    files: dict[tuple[str, str], dict[str, str]] = {}
    seen_rows: dict[tuple[str, str], tuple[int, dict[str, Any]]] = {}
    seen_cov: dict[tuple[str, str], int] = {}
    if set(CURRENT_HEADER) <= set(header):
        version = "current"
    elif set(OLD_HEADER) <= set(header):
        version = "old"
    else:
        raise UnreadableFileError(
            source,
            f"unrecognised header {header}; expected {CURRENT_HEADER} or the older {OLD_HEADER}",
        )
    rows: list[tuple[int, dict]] = []
    try:
        for row in reader:
            rows.append((reader.line_num, row))
    except csv.Error as exc:
        problems.append(
            f"{source}:{reader.line_num}: file ends inside a quoted field ({exc}): truncated? "
            "this row and anything after it not used"
        )
    if not rows and not problems:
        problems.append(f"{source} has a header but no rows: no clinical covariates")
    for lineno, row in rows:
        if None in row.values() or None in row:
            have = sum(v is not None for k, v in row.items() if k is not None)
            problems.append(
                f"{source}:{lineno}: row has {have} of {len(header)} fields "
                f"({'truncated' if None in row.values() else 'too many'}); row not used"
            )
            continue
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
        values = {**cov, **paths}
        if (pid, code) in seen_rows:
            first_line, first = seen_rows[(pid, code)]
            diff = {k: v for k, v in values.items() if first.get(k) != v}
            if diff:
                notes.append(
                    f"{source}: {pid} phase {code or '?'} is listed twice with different values "
                    f"(line {first_line}: {_describe({k: first.get(k) for k in diff})}; line "
                    f"{lineno}: {_describe(diff)}); the first row is used"
                )
            continue
        seen_rows[(pid, code)] = (lineno, values)
        previous = covariates.setdefault(pid, {})
        for k, v in cov.items():
            if v is None:
                continue
            if k in previous and previous[k] != v:
                notes.append(
                    f"{source}: {pid} has {k} {previous[k]!r} (line {seen_cov[(pid, k)]}) and "
                    f"{v!r} (line {lineno}, phase {code or '?'}); the first is used"
                )
            elif k not in previous:
                previous[k] = v
                seen_cov[(pid, k)] = lineno
        files[(pid, code)] = paths
    return PatientTable(version, covariates, files, notes, problems)


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


def _stamp(fs, url: str, prefix: str) -> tuple:
    """(name, size, modification stamp) of a source file: its identity for resume."""
    info = fs.info(url.removeprefix(prefix))
    when = info.get("mtime") or info.get("LastModified") or info.get("ETag") or info.get("created")
    return (url.rsplit("/", 1)[-1], int(info.get("size") or 0), str(when))


def plan(
    source: str,
    *,
    collection: str = COLLECTION,
    clinical: str | None = None,
    overrides: str | None = None,
    storage_options: dict | None = None,
    where: str | None = None,
    keep_descriptions: bool = False,
    clinical_columns: tuple[str, ...] = (),
) -> Plan:
    """List the volumes of a PLC-CECT release from file names and ``patient_data.csv``.

    ``collection``, ``where``, ``keep_descriptions`` and ``clinical_columns`` complete the
    planner interface of the collection registry: a release has no series index to select
    from (``where`` is refused), no free-text descriptors, and only the documented columns of
    ``patient_data.csv`` (:data:`CLINICAL_COLUMNS`) are ever stored.
    """
    del keep_descriptions, clinical_columns
    if collection != COLLECTION:
        raise UsageError(f"the PLC-CECT planner cannot plan {collection!r}")
    if where:
        raise UsageError("--where selects series of an idc:// source only")
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
        shown = str(csv_path)
        try:
            with fsspec.open(
                csv_path if clinical else prefix + csv_path, "rb", **(storage_options or {})
            ) as f:
                text, decode_notes = decode_table(f.read(), shown)
            warnings.extend(decode_notes)
            table = read_patient_table(text, shown)
        except FileNotFoundError as exc:
            raise UsageError(f"clinical table {shown} not found") from exc
        except UnreadableFileError as exc:
            skipped.append(
                {
                    "input": shown,
                    "reason": f"{exc.reason}; images converted without clinical covariates "
                    "and without checking which lesion masks are expected",
                }
            )
        if table is not None:
            warnings.extend(table.notes)
            skipped.extend({"input": shown, "reason": p} for p in table.problems)
            if not table.files:
                table = None
    else:
        warnings.append("no patient_data.csv: no clinical covariates; lesion masks not checked")
    ov: dict[tuple[str, str], dict[str, Any]] = {}
    if overrides:
        with fsspec.open(overrides, "rt", encoding="utf-8-sig") as f:
            ov = read_overrides(f.read(), overrides)

    cts = _deduplicate(cts, CT_NAME, table, "ct", warnings)
    masks = _deduplicate(masks, MASK_NAME, table, "mask", warnings)
    livers = _deduplicate(livers, LIVER_NAME, table, "liver_mask", warnings)
    by_key_mask = {(m["pid"], m["code"]): n for n in masks if (m := MASK_NAME.match(n))}
    by_key_liver = {(m["pid"], m["code"]): n for n in livers if (m := LIVER_NAME.match(n))}
    limit = max_nifti_bytes()
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
                slice_order_source="overrides file"
                if "slice_order" in o
                else "default (release stores superior-first)",
                max_bytes=limit,
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
    warnings.extend(
        detect_slice_orders(tasks, storage_options, fixed={k for k in ov if "slice_order" in ov[k]})
    )
    columns = {k: v for k, v in CLINICAL_COLUMNS.items() if any(k in t.clinical for t in tasks)}
    return Plan(tasks, skipped, warnings, columns)


def _deduplicate(
    listing: dict[str, str],
    pattern: re.Pattern,
    table: PatientTable | None,
    kind: str,
    warnings: list[str],
) -> dict[str, str]:
    """One file per (patient, phase): ``.nii`` beside ``.nii.gz`` would make two volumes.

    Keeps the file ``patient_data.csv`` names, else the ``.nii.gz``; the other is a warning.
    """
    groups: dict[tuple[str, str], list[str]] = {}
    out = {}
    for name, url in listing.items():
        m = pattern.match(name)
        if m is None:
            out[name] = url
        else:
            groups.setdefault((m["pid"], m["code"]), []).append(name)
    for key, names in groups.items():
        keep = names[0]
        if len(names) > 1:
            named = PurePosixPath(
                ((table.files.get(key) or {}) if table else {}).get(kind, "")
            ).name
            keep = (
                named
                if named in names
                else next((n for n in sorted(names) if n.endswith(".nii.gz")), sorted(names)[0])
            )
            why = "named in patient_data.csv" if keep == named else "the compressed copy"
            others = ", ".join(n for n in sorted(names) if n != keep)
            warnings.append(
                f"{key[0]} phase {key[1]}: {len(names)} {kind} files ({others} beside {keep}); "
                f"using {keep} ({why}), ignoring {others}"
            )
        out[keep] = listing[keep]
    return out


def _profile(task: PlcVolumeTask, basis: str, storage_options: dict | None):
    """Per-slice profile of one volume in *stored* slice order, or None if it has none."""
    url = task.liver_mask if basis == so.LIVER_BASIS else task.ct
    if url is None:
        return None
    try:
        img = load_nifti(url, storage_options, max_bytes=task.max_bytes)
        data, _ = to_scalar_volume(img.data, url)
    except SourceError:
        return None  # the volume's own task reports the file
    kji = np.transpose(data, (2, 1, 0))
    if basis == so.LIVER_BASIS:
        return so.liver_area_profile(kji)
    return so.intensity_profile(kji)


def detect_slice_orders(
    tasks: list[PlcVolumeTask],
    storage_options: dict | None = None,
    *,
    fixed: set[tuple[str, str]] = frozenset(),  # type: ignore[assignment]
    workers: int = 4,
) -> list[str]:
    """Find the phases stored opposite to the rest of their patient and correct their order.

    Reads every liver mask once (in a few threads: zlib releases the GIL); a patient whose
    liver masks are missing or empty falls back to mean-intensity profiles of the CTs.  A
    volume whose slice order the overrides file fixes (``fixed``) keeps it.  Returns
    warnings for the report; the volumes get the same words as notes.
    """
    by_patient: dict[str, list[PlcVolumeTask]] = {}
    for t in tasks:
        by_patient.setdefault(t.patient_id, []).append(t)
    with ThreadPoolExecutor(workers) as pool:
        liver = dict(
            zip(
                [t.key for t in tasks],
                pool.map(lambda t: _profile(t, so.LIVER_BASIS, storage_options), tasks),
                strict=True,
            )
        )
        need_ct = [
            t
            for group in by_patient.values()
            if len(group) > 1 and any(so.normalise_profile(liver[t.key]) is None for t in group)
            for t in group
        ]
        intensity = dict(
            zip(
                [t.key for t in need_ct],
                pool.map(lambda t: _profile(t, so.INTENSITY_BASIS, storage_options), need_ct),
                strict=True,
            )
        )
    warnings: list[str] = []
    for _pid, group in sorted(by_patient.items()):
        if all(t.key in intensity for t in group):
            basis, profiles = so.INTENSITY_BASIS, {t.code: intensity[t.key] for t in group}
        else:
            basis, profiles = so.LIVER_BASIS, {t.code: liver[t.key] for t in group}
        decision = so.decide(profiles, basis)
        detail = f" ({basis} profiles)" if basis == so.INTENSITY_BASIS else ""
        for t in group:
            note = None
            if decision.reversed[t.code]:
                others = ", ".join(g.code for g in group if not decision.reversed[g.code])
                what = (
                    f"slice order: phase {t.code} runs opposite to {others} of the same patient "
                    f"({basis} profiles, evidence {decision.margin:.2f})"
                )
                if (t.patient_id, t.code) in fixed:
                    note = f"{what}; the overrides file sets {t.slice_order!r}, which is used"
                else:
                    t.slice_order = "header"
                    t.slice_order_source = f"detected from {basis} profiles across phases"
                    note = f"{what}: stored as the header says (not reversed like the others)"
            elif decision.notes and (t.patient_id, t.code) not in fixed:
                note = f"slice order{detail}: {decision.notes[0]}"
            if note:
                t.notes.append(note)
        for t in group:
            if decision.reversed[t.code]:
                warnings.append(f"{t.key}: {t.notes[-1]}")
    return warnings


def _reorient_plan(data_shape_ijk, affine_ras, task: PlcVolumeTask, source: str):
    direction, spacing_ijk, origin = decompose_affine(ras_to_lps_affine(affine_ras))
    if task.spacing_zyx is not None:
        world = np.argmax(np.abs(direction), axis=0)  # world axis (0=x) of index axes i, j, k
        user_xyz = task.spacing_zyx[::-1]
        spacing_ijk = tuple(float(user_xyz[w]) for w in world)
    return canonical_reorientation(
        tuple(data_shape_ijk[::-1]), direction, spacing_ijk, origin, source=source
    ), spacing_ijk


def _load_kji(url: str, storage_options: dict | None, slice_order: str, max_bytes=None):
    img = load_nifti(url, storage_options, max_bytes=max_bytes)
    data, notes = to_scalar_volume(img.data, url)
    kji = np.transpose(data, (2, 1, 0))  # nibabel (i, j, k) -> numpy (k, j, i)
    if slice_order == "superior_first":
        kji = kji[::-1]
    return kji, img, [*img.notes, *notes]


def ct_to_hu(
    kji: np.ndarray, slope: float | None, inter: float | None, source: str
) -> tuple[np.ndarray, dict[str, Any]]:
    """Stored CT voxels → int16 HU and the ``intensity`` record that says how exact they are.

    uint8 without scaling is the release's [−200, 200] window (lossless, approximate HU).
    Anything else must give exact integer HU after ``scl_slope``/``scl_inter`` (an int16 CT
    with slope 1 and intercept −1024, a float file holding whole numbers); otherwise the
    reason is stated — rounding would invent values.
    """
    if kji.dtype == np.uint8 and slope is None:
        return hu_from_window(kji), {
            "exact": False,
            "windowed": True,
            "window_hu": list(WINDOW_HU),
            "source_dtype": "uint8",
            "to_hu": "round(v * 400 / 255 - 200)",
            "from_hu": "round((hu + 200) * 255 / 400)",
            "note": "values outside the window saturate; HU are approximate",
        }
    if not (np.issubdtype(kji.dtype, np.integer) or np.issubdtype(kji.dtype, np.floating)):
        raise IntensityError(source, f"unsupported CT voxel type {kji.dtype}")
    intensity: dict[str, Any] = {"exact": True, "windowed": False, "source_dtype": str(kji.dtype)}
    values = kji
    if slope is not None:
        intensity.update(scl_slope=float(slope), scl_inter=float(inter or 0.0))
        values = kji.astype(np.float64) * float(slope) + float(inter or 0.0)
    if np.issubdtype(values.dtype, np.floating):
        bad = ~np.isfinite(values)
        if bad.any():
            raise IntensityError(source, f"{int(bad.sum())} CT voxels are NaN or infinite")
        frac = values != np.rint(values)
        if frac.any():
            example = float(values[frac].flat[0])
            scale = (
                f"scl_slope {slope:g} and scl_inter {inter or 0.0:g} give"
                if slope is not None
                else f"{kji.dtype} voxels hold"
            )
            raise IntensityError(
                source,
                f"{scale} non-integer HU ({int(frac.sum())} voxels, e.g. {example:g}); "
                "storing them as int16 HU would need rounding",
            )
    lo, hi = float(values.min()), float(values.max())
    if lo < -32768 or hi > 32767:
        raise IntensityError(
            source, f"HU range [{lo:g}, {hi:g}] does not fit int16 [-32768, 32767]"
        )
    return values.astype(np.int16), intensity


def read_volume(
    task: PlcVolumeTask, storage_options: dict | None = None
) -> tuple[Volume, list[dict]]:
    """Decode one CT with its masks into a canonical :class:`Volume`; returns (volume, skipped).

    A missing or unreadable mask does not lose the CT: the volume is written with what exists,
    marked ``annotation_complete = false``, and the mask is listed as a skipped input.
    """
    skipped: list[dict[str, str]] = []
    kji, ct_img, notes = _load_kji(task.ct, storage_options, task.slice_order, task.max_bytes)
    affine, facts = ct_img.affine, ct_img.facts
    reo, spacing_ijk = _reorient_plan(kji.shape[::-1], affine, task, task.ct)
    if reo.obliquity_deg > 0.5:
        notes.append(
            f"header axes are {reo.obliquity_deg:.1f}° oblique: snapped to the nearest patient "
            "axes without resampling (header geometry untrusted in this release)"
        )
    hu_kji, intensity = ct_to_hu(kji, ct_img.slope, ct_img.inter, task.ct)
    image = reo.apply(hu_kji)

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
            mk, mk_img, mk_notes = _load_kji(url, storage_options, task.slice_order, task.max_bytes)
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
        if mk_img.slope is not None:
            mk = mk.astype(np.float64) * mk_img.slope + (mk_img.inter or 0.0)
        if np.issubdtype(mk.dtype, np.floating):
            nan = np.isnan(mk)
            if nan.any():
                notes.append(f"{kind}: {int(nan.sum())} NaN voxels read as 0 (background)")
                mk = np.where(nan, 0, mk)
        notes.extend(f"{kind}: {n}" for n in mk_notes if "singleton" not in n)
        values = np.unique(mk)
        seg_specs.append(
            (
                label,
                reo.apply(mk) > 0,
                {
                    "source_file": PurePosixPath(url).name,
                    "source_values": [
                        int(v) if float(v).is_integer() else float(v)
                        for v in values[values != 0][:16]
                    ],
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
            "slice_order_source": task.slice_order_source,
            "affine_shear_deg": round(shear_deg(affine), 4),
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
