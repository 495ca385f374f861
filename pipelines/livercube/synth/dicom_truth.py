"""What a correct reader must produce from the generated DICOM collections, voxel for voxel.

The writer (:mod:`livercube.synth.dicom_collections`) fills these records as it writes; tests
and benchmarks compare a converter's output against them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from livercube.volumes.geometry import Grid


@dataclass
class CTVolumeTruth:
    """One CT acquisition as a correct reader must reconstruct it.

    ``files[z]`` / ``sop_instance_uids[z]`` belong to canonical slice ``z`` (files are written
    head first, so file order is the reverse).  ``hu`` is the modality value
    (stored × slope + intercept) in canonical (z, y, x) order, including the −3024 HU padding
    corners of GE images (``padding_value`` −2000 stored).  ``missing_z`` lists slices whose
    file was deleted by a quirk flag (their ``files`` entry no longer exists).
    """

    key: str  # "<PatientID>/<study ordinal>/<SeriesNumber>/<acquisition ordinal>"
    patient_id: str
    study_uid: str
    study_date: str
    study_description: str
    series_uid: str
    series_number: int
    series_description: str
    acquisition_number: int | None
    phase: str  # expected phase label (PHASES); "unknown" when nothing in the header tells
    rendered_phase: str  # the phantom phase whose HU the voxels carry
    grid: Grid
    hu: np.ndarray | None
    files: list[Path]
    sop_instance_uids: list[str]
    frame_of_reference_uid: str
    manufacturer: str
    pixel_representation: int
    rescale_intercept: float
    slice_thickness: float
    image_orientation: tuple[float, ...]
    padding_value: int | None
    first_instance_number: int
    series_dir: Path
    missing_z: list[int] = field(default_factory=list)


@dataclass
class SegTruth:
    """One DICOM-SEG and the masks a correct reader must paste onto the referenced CT grid."""

    patient_id: str
    study_uid: str
    series_uid: str
    sop_instance_uid: str
    series_number: int
    series_description: str
    kind: str  # "expert" | "ai"
    path: Path
    referenced_volumes: tuple[str, ...]  # CTVolumeTruth keys (all on ``grid``)
    source_volume_by_z: tuple[str | None, ...]  # which volume each canonical slice's frames cite
    grid: Grid
    segment_labels: tuple[str, ...]
    masks: dict[str, np.ndarray] | None  # label -> canonical (z, y, x) bool on ``grid``
    omit_empty_frames: bool
    in_plane_flipped: bool  # SEG array order is flipped relative to the referenced CT
    has_referenced_series_sequence: bool
    missing_referenced_sop_uids: list[str] = field(default_factory=list)


@dataclass
class DicomCollectionTruth:
    """One generated collection: its CT volumes, SEGs, clinical sheet, PHI and defect files.

    ``quirks`` maps a defect or variant flag to the files it made (or, for ``gantry_tilt``,
    the files a correct converter refuses; they are not in ``volumes``/``segs``).
    """

    collection: str
    root: Path
    layout: str
    size: str
    seed: int
    patient_ids: list[str]
    volumes: list[CTVolumeTruth]
    segs: list[SegTruth]
    clinical_path: Path
    clinical_sheet: str
    clinical_id_column: str
    clinical_rows: list[dict[str, Any]]
    metadata_csv: Path | None
    phi: dict[str, dict[str, str]]  # patient -> dummy PHI keyword -> value written
    quirks: dict[str, list[Path]] = field(default_factory=dict)

    def volume(self, key: str) -> CTVolumeTruth:
        return next(v for v in self.volumes if v.key == key)

    def volumes_of(self, patient_id: str) -> list[CTVolumeTruth]:
        return [v for v in self.volumes if v.patient_id == patient_id]

    def segs_of(self, patient_id: str, kind: str | None = None) -> list[SegTruth]:
        return [
            s for s in self.segs if s.patient_id == patient_id and (kind is None or s.kind == kind)
        ]

    def series_uids(self) -> set[str]:
        return {v.series_uid for v in self.volumes} | {s.series_uid for s in self.segs}
