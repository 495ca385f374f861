"""HCC-TACE-Seg and CRLM: plan volumes from DICOM headers, then convert one acquisition per task.

Planning (client side, headers only) decides everything a task needs: which acquisitions
become volumes, their store paths, contrast phase and evidence, which expert SEG annotates
which acquisition (matched by frame geometry), and the patient's clinical covariates.  A task
then reads one acquisition's pixels, places its SEG, and writes one volume.

AI segmentations (e.g. IDC's "AIMI liver-tumor AI segmentation", same SeriesNumber as the
expert SEG) are not mixed into ``label``: they are skipped with a note in the report.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import fsspec

from livercube import registry
from livercube.errors import SourceError, UsageError
from livercube.fanout import Mapper
from livercube.sources import idc
from livercube.sources.deid import DESCRIPTOR_ATTRIBUTES, Descriptors, clean_segment_item
from livercube.sources.dicom_scan import Acquisition, SegInstance, scan
from livercube.sources.plan import Plan, task_fingerprint
from livercube.store.layout import sanitize
from livercube.store.location import with_retries
from livercube.volumes.volume import Volume


@dataclass
class DicomVolumeTask:
    """One acquisition → one volume; small and picklable."""

    collection: str
    acquisition: Acquisition
    study: str
    series: str
    phase: str
    phase_evidence: str
    seg: SegInstance | None = None
    seg_target: Any = None  # dicom_seg.SegTarget
    seg_notes: list[str] = field(default_factory=list)
    #: the SEG's frame table as planning built it (used only if the file is unchanged)
    seg_frames: Any = None  # seg_frames.KnownFrames
    clinical: dict[str, Any] = field(default_factory=dict)
    age: float | None = None
    sex: str | None = None
    #: How free-text descriptors are stored (cleaned unless --keep-descriptions).
    descriptors: Descriptors = field(default_factory=Descriptors)

    @property
    def key(self) -> str:
        return f"{self.acquisition.patient_id}/{self.study}/{self.series}"

    @property
    def patient_id(self) -> str:
        return self.acquisition.patient_id

    @property
    def fingerprint(self) -> str:
        """Changes when any source file (SOP, path, size), the SEG, phase or covariates change."""
        return task_fingerprint(
            self.acquisition,
            self.seg,
            self.phase,
            self.phase_evidence,
            sorted(self.clinical.items()),
            self.age,
            self.sex,
            self.descriptors.mode,
        )

    def read(self, storage_options: dict | None = None) -> tuple[Volume, list[dict[str, str]]]:
        try:
            return read_volume(self, storage_options)
        except SourceError as exc:  # its message may quote the raw SeriesDescription
            scrub = self.descriptors.scrub
            raise type(exc)(scrub(exc.source), scrub(exc.reason)) from None


def _short(uid: str, n: int = 6) -> str:
    return hashlib.sha1(uid.encode()).hexdigest()[:n]


def study_name(acq: Acquisition) -> str:
    """``<StudyDate>_<hash of StudyInstanceUID>``: readable, sortable, unique per patient."""
    date = acq.study_date or "nodate"
    return sanitize(f"{date}_{_short(acq.study_uid)}")


def series_names(acqs: list[Acquisition]) -> dict[tuple[str, int], str]:
    """Store names of a study's acquisitions: ``<SeriesNumber>`` or ``<SeriesNumber>_acq<n>``.

    A series holding several acquisitions gets one volume per acquisition; two series sharing
    a number (CRLM CT 100 beside SEG 100 is harmless, but CT/CT clashes exist) get a UID hash.
    """
    by_series: dict[str, list[Acquisition]] = defaultdict(list)
    for a in acqs:
        by_series[a.series_uid].append(a)
    base: dict[str, str] = {
        uid: sanitize(a[0].series_number, fallback="NA") for uid, a in by_series.items()
    }
    counts: dict[str, int] = defaultdict(int)
    for name in base.values():
        counts[name] += 1
    names = {}
    for uid, group in by_series.items():
        stem = base[uid] if counts[base[uid]] == 1 else f"{base[uid]}_{_short(uid)}"
        if len(group) == 1:
            names[(uid, group[0].index_in_series)] = stem
            continue
        wanted = {
            a.index_in_series: f"{stem}_acq"
            f"{a.acquisition_number if a.acquisition_number is not None else a.index_in_series}"
            for a in group
        }
        taken = defaultdict(int)
        for name in wanted.values():
            taken[name] += 1
        for index, name in wanted.items():
            # several parts of one acquisition (duplicate positions with other pixels, or
            # several orientations): the part index keeps them apart
            names[(uid, index)] = name if taken[name] == 1 else f"{name}_p{index}"
    return names


def _find_clinical(source: str, collection: str, storage_options: dict | None) -> str | None:
    """The released spreadsheet if it lies at the top of SOURCE (where TCIA users keep it)."""
    fs, root = fsspec.core.url_to_fs(source, **(storage_options or {}))
    proto = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    for name in registry.get(collection).clinical_files:
        path = f"{root.rstrip('/')}/{name}"
        if fs.exists(path):
            return path if proto in ("file", "local") else f"{proto}://{path}"
    return None


def plan(
    source: str,
    collection: str,
    *,
    clinical: str | None = None,
    overrides: str | None = None,
    storage_options: dict | None = None,
    where: str | None = None,
    keep_descriptions: bool = False,
    clinical_columns: list[str] | tuple[str, ...] = (),
    mapper: Mapper | None = None,
) -> Plan:
    """Scan headers and decide every volume of a DICOM collection.

    ``source`` is a directory or URL, or ``idc://<collection>`` for the IDC bucket (then
    ``where`` narrows the series selected from the IDC index).
    Free-text descriptors are classified raw but stored cleaned (:mod:`livercube.sources.deid`)
    unless ``keep_descriptions``; every message of the plan that quotes them is scrubbed too.
    Clinical columns: the collection's documented ones plus ``clinical_columns``
    (:func:`livercube.sources.clinical.select_columns`).  An unreadable spreadsheet skips the
    covariates (a skipped input), never the images.  ``mapper`` decides where the headers
    are read (:mod:`livercube.fanout`: here by default, or on a Dask cluster's workers).
    """
    from livercube.sources import clinical as clinical_mod
    from livercube.sources import dicom_phase, dicom_seg

    scanned: str | list[str] = source
    selection = None
    if idc.is_idc(source):
        selection = idc.select_series(source, where)
        scanned = list(selection.prefixes)
        # the IDC bucket is public; S3 throttling is retried like any S3 source
        storage_options = with_retries("s3://", storage_options or {"anon": True})
    elif where:
        raise UsageError("--where selects series of an idc:// source only")
    result = scan(scanned, storage_options, mapper=mapper)
    if not result.n_files:
        raise UsageError(f"{source}: no files found (is it a DICOM collection?)")
    # IDC paths are "<bucket>/<series uuid>/<instance uuid>.dcm": already short and unique
    rel = _relative_to(result.source, storage_options) if selection is None else str
    # files that were never slices (other objects, localizers, redundant copies) are notes;
    # inputs that were lost (damaged files, stray single slices, refused geometry) are skipped
    skipped: list[dict[str, str]] = [
        {"input": rel(n.path), "reason": n.reason} for n in result.left_out
    ]
    warnings: list[str] = [f"{rel(n.path)}: {n.reason}" for n in result.notes]
    if selection is not None:
        warnings.insert(0, selection.describe())
    if not result.acquisitions:
        skipped.append(
            {
                "input": str(source),
                "reason": f"no convertible CT volume among {result.n_files} file(s); "
                "each file that was not used is listed with its reason",
            }
        )
    descriptors = _descriptors(result.acquisitions, result.segs, keep_descriptions)

    # clinical covariates
    table = None
    path = clinical or (
        None if selection is not None else _find_clinical(source, collection, storage_options)
    )
    if path:
        try:
            table = clinical_mod.read_clinical(
                path, collection, storage_options if not clinical else None
            )
        except SourceError as exc:
            skipped.append(
                {
                    "input": exc.source,
                    "reason": f"{exc.reason}; clinical covariates skipped, images converted",
                }
            )
        else:
            table = clinical_mod.select_columns(table, clinical_columns)
            warnings += table.notes
            warnings += clinical_mod.reconcile(table, {a.patient_id for a in result.acquisitions})
    else:
        warnings.append(f"no clinical spreadsheet found for {collection}: no covariates")

    # phases, per study
    by_study: dict[str, list[Acquisition]] = defaultdict(list)
    for a in result.acquisitions:
        by_study[a.study_uid].append(a)
    phase_overrides = {}
    if overrides:
        with fsspec.open(overrides, "rt", encoding="utf-8-sig") as f:
            phase_overrides = dicom_phase.read_phase_overrides(f.read(), overrides)

    tasks: dict[str, DicomVolumeTask] = {}
    targets_by_study: dict[str, list] = defaultdict(list)
    for study_uid, acqs in by_study.items():
        calls = dicom_phase.classify_study(acqs, collection)
        if phase_overrides:
            calls = dicom_phase.apply_overrides(calls, acqs, phase_overrides)
        names = series_names(acqs)
        for a in acqs:
            call = calls[dicom_phase.acquisition_key(a)]
            pid = a.patient_id
            task = DicomVolumeTask(
                collection=collection,
                acquisition=a,
                study=study_name(a),
                series=names[(a.series_uid, a.index_in_series)],
                phase=call.phase,
                phase_evidence=descriptors.scrub(f"{call.rule}: {call.evidence}"),
                clinical=dict(table.rows.get(pid, {})) if table else {},
                age=table.age.get(pid) if table else None,
                sex=table.sex.get(pid) if table else None,
                descriptors=descriptors,
            )
            if task.key in tasks:  # series_names makes names unique; never overwrite a volume
                skipped.append(
                    {"input": a.label, "reason": f"a second volume would be named {task.key}"}
                )
                continue
            tasks[task.key] = task
            try:
                targets_by_study[study_uid].append(dicom_seg.target_from_acquisition(a, task.key))
            except SourceError as exc:
                warnings.append(f"{task.key}: cannot serve as SEG target: {exc.reason}")

    # segmentations: the expert SEG of each study goes to the acquisition its frames lie on
    for seg in sorted(result.segs, key=lambda s: (s.study_uid, s.series_number or 0, s.sop_uid)):
        where = f"{rel(seg.path)} ({seg.series_description or 'no description'})"
        if dicom_seg.seg_kind(seg.series_description) == "ai":
            warnings.append(f"{where}: AI segmentation, not used for label (expert SEGs only)")
            continue
        targets = targets_by_study.get(seg.study_uid, [])
        if not targets:
            skipped.append({"input": where, "reason": "no CT acquisition of its study was found"})
            continue
        try:
            match = dicom_seg.match_scanned_seg(seg, f"{_root_url(seg)}", targets, storage_options)
        except SourceError as exc:
            skipped.append({"input": where, "reason": exc.reason})
            continue
        if match.target_key is None:
            skipped.append({"input": where, "reason": f"matches no CT acquisition: {match.reason}"})
            continue
        task = tasks[match.target_key]
        if task.seg is not None:
            skipped.append(
                {
                    "input": where,
                    "reason": f"a second expert SEG for {task.key}; kept {task.seg.sop_uid}",
                }
            )
            continue
        task.seg = seg
        task.seg_target = next(t for t in targets if t.key == match.target_key)
        task.seg_notes = [*match.notes, f"matched: {match.reason}"]
        task.seg_frames = match.known_frames
    columns = dict(table.columns) if table else {}
    return Plan(
        sorted(tasks.values(), key=lambda t: t.key),
        [descriptors.scrub_record(s) for s in skipped],
        [descriptors.scrub(w) for w in warnings],
        columns,
        descriptors.summary(),
    )


def _descriptors(acqs: list[Acquisition], segs: list[SegInstance], keep: bool) -> Descriptors:
    """The run's descriptor policy, knowing every raw descriptor the headers carry."""
    texts: list[Any] = []
    for a in acqs:
        texts += [a.study_description, a.series_description]
        texts += [v for k, v in a.attrs.items() if k in DESCRIPTOR_ATTRIBUTES]
    texts += [s.series_description for s in segs]
    flat = [t for v in texts for t in (v if isinstance(v, list) else [v]) if isinstance(t, str)]
    return Descriptors.collect(flat, keep=keep)


def _relative_to(source: str, storage_options: dict | None):
    """A function printing scan paths relative to ``source`` (reports stay readable)."""
    _, root = fsspec.core.url_to_fs(source, **(storage_options or {}))
    root = root.rstrip("/") + "/"

    def rel(path: str) -> str:
        return path[len(root) :] if path.startswith(root) else path

    return rel


def file_url(source: str, path: str) -> str:
    """URL of a scanned file: scan paths are relative to the scanned filesystem."""
    proto = fsspec.utils.get_protocol(source)
    return path if proto in ("file", "local") else f"{proto}://{path.split('://')[-1]}"


def _root_url(seg: SegInstance) -> str:
    return file_url(seg.source, seg.path)


def read_volume(
    task: DicomVolumeTask, storage_options: dict | None = None
) -> tuple[Volume, list[dict[str, str]]]:
    """Read one acquisition (and its SEG) into a :class:`Volume`; returns (volume, skipped)."""
    from livercube.sources.dicom_ct import read_acquisition
    from livercube.sources.dicom_seg import place_seg

    ct = read_acquisition(task.acquisition, storage_options)
    descriptors = task.descriptors
    rel = _relative_to(task.acquisition.source, storage_options)
    skipped: list[dict[str, str]] = [
        {
            "input": rel(d["path"]),
            "reason": f"damaged slice of {task.key} (canonical z {d['z']}, filled with "
            f"{ct.attrs.get('fill_hu')} HU): {d['reason']}",
        }
        for d in ct.damaged_slices
    ]
    notes = [f"{n.path}: {n.reason}" for n in task.acquisition.notes]
    segments, seg_meta = None, None
    annotation_complete = False
    if task.seg is not None:
        try:
            placed = place_seg(
                _root_url(task.seg),
                task.seg_target,
                collection=task.collection,
                storage_options=storage_options,
                known_frames=task.seg_frames,
            )
            if placed.segments.bits.shape != ct.image.shape:
                raise SourceError(task.seg.path, "SEG target grid differs from the CT read")
            segments = placed.segments
            for info in segments.segments:  # the source item, allow-listed
                info.codes = clean_segment_item(info.codes, descriptors.keep)
            seg_meta = {
                **descriptors.clean_attrs(placed.seg_attrs),
                "resampled": placed.resampled,
                "unknown_labels": placed.unknown_labels,
                "voxel_counts": placed.voxel_counts,
                "notes": [descriptors.scrub(n) for n in (*task.seg_notes, *placed.notes)],
            }
            annotation_complete = True
            lost = {k: c["outside_voxels"] for k, c in placed.voxel_counts.items()}
            if any(lost.values()):
                skipped.append(
                    {
                        "input": rel(task.seg.path),
                        "reason": "segment voxels outside the CT volume they annotate were "
                        f"dropped: { ({k: v for k, v in lost.items() if v}) }",
                    }
                )
            if placed.unknown_labels:
                notes.append(
                    f"segment labels unknown to the label schema kept as unified 0: "
                    f"{placed.unknown_labels}"
                )
        except SourceError as exc:
            skipped.append({"input": rel(task.seg.path), "reason": exc.reason})
    if ct.filled_slices:
        notes.append(
            f"{len(ct.filled_slices)} missing slice(s) filled with {ct.attrs.get('fill_hu')} HU "
            f"at canonical z {ct.filled_slices}"
        )
    a = ct.attrs
    study_date = a.get("study_date") or None
    if study_date and len(study_date) == 8 and study_date.isdigit():
        study_date = f"{study_date[:4]}-{study_date[4:6]}-{study_date[6:]}"
    meta = {
        "study_uid": a.get("study_uid"),
        "study_date": study_date,
        "series_uid": a.get("series_uid"),
        "series_number": a.get("series_number"),
        "series_description": descriptors.clean(a.get("series_description")),
        "acquisition_number": a.get("acquisition_number"),
        "phase_evidence": task.phase_evidence,
        "source": {
            "dicom": descriptors.clean_attrs(
                {k: v for k, v in a.items() if k not in ("scan_notes",)}
            ),
            "spacing_report": ct.spacing_report,
            "filled_slices": ct.filled_slices,
            "segmentation": seg_meta,
        },
        "intensity": {
            "exact": True,
            "windowed": False,
            "padding_voxels": a.get("padding_voxels", 0),
        },
        "geometry_flags": {
            "spacing_trusted": True,
            "origin_trusted": True,
            "filled_slices": len(ct.filled_slices),
            "damaged_slices": len(ct.damaged_slices),
            "obliquity_deg": ct.reorientation.obliquity_deg,
        },
        "annotation_complete": annotation_complete,
        "deidentification": descriptors.summary(),
        "notes": [descriptors.scrub(n) for n in notes],
        "age": task.age,
        "sex": task.sex,
    }
    vol = Volume(
        collection=task.collection,
        patient_id=task.acquisition.patient_id,
        study=task.study,
        series=task.series,
        image=ct.image,
        grid=ct.grid,
        phase=task.phase,
        source_direction=ct.source_direction,
        segments=segments,
        meta=meta,
        clinical=task.clinical,
    )
    return vol, [descriptors.scrub_record(s) for s in skipped]
