"""Tiny synthetic CT DICOM series written with pydicom from a known canonical array.

``write_ct_series`` takes the array as it should come out of the reader (canonical ``(z, y, x)``
LPS, identity direction, grid origin/spacing in z, y, x order) and writes one file per source
slice for any axis-aligned source orientation, so every test knows the exact expected result.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from livercube.sources import dicom_sop

CT_IMAGE_STORAGE = dicom_sop.CT_IMAGE
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"
SEGMENTATION_STORAGE = dicom_sop.SEGMENTATION


def canonical_test_array(shape=(6, 16, 16), seed=0) -> np.ndarray:
    """Distinct-ish HU values in [-1000, 1500], even (so slope 2 / 0.5 stay exact)."""
    rng = np.random.default_rng(seed)
    return (rng.integers(-500, 750, size=shape) * 2).astype(np.int16)


@dataclass
class Study:
    patient_id: str = "TEST_001"
    study_uid: str = field(default_factory=generate_uid)
    study_date: str = "20010203"


def _ds_header(study: Study, sop_class: str, sop_uid: str, series_uid: str) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.PatientID = study.patient_id
    ds.PatientName = "Doe^Jane"
    ds.PatientBirthDate = "19500101"
    ds.InstitutionName = "Somewhere Hospital"
    ds.StudyInstanceUID = study.study_uid
    ds.StudyDate = study.study_date
    ds.StudyDescription = "ABDOMEN"
    ds.SeriesInstanceUID = series_uid
    return ds


def source_geometry(shape_zyx, spacing_zyx, origin_zyx, row_cos, col_cos):
    """Source (k, j, i) array mapping for an axis-aligned orientation.

    Returns (take, ipp0, spacing_ijk, shape_kji, normal) where ``take(canonical)`` gives the
    source array, slices ascending along the normal.
    """
    r = np.asarray(row_cos, dtype=float)
    c = np.asarray(col_cos, dtype=float)
    n = np.cross(r, c)
    dirs = [r, c, n]
    shape_xyz = np.asarray(shape_zyx[::-1])
    spacing_xyz = np.asarray(spacing_zyx[::-1], dtype=float)
    origin_xyz = np.asarray(origin_zyx[::-1], dtype=float)
    world = [int(np.argmax(np.abs(d))) for d in dirs]
    signs = [float(np.sign(d[w])) for d, w in zip(dirs, world, strict=True)]
    ipp0 = origin_xyz.copy()
    for w, s in zip(world, signs, strict=True):
        if s < 0:
            ipp0[w] += (shape_xyz[w] - 1) * spacing_xyz[w]
    shape_ijk = [int(shape_xyz[w]) for w in world]
    spacing_ijk = [float(spacing_xyz[w]) for w in world]

    def take(canonical: np.ndarray) -> np.ndarray:
        kk, jj, ii = np.meshgrid(*(np.arange(s) for s in shape_ijk[::-1]), indexing="ij")
        idx_xyz = [None, None, None]
        for t, w, s in zip((ii, jj, kk), world, signs, strict=True):
            idx_xyz[w] = t if s > 0 else shape_xyz[w] - 1 - t
        return canonical[idx_xyz[2], idx_xyz[1], idx_xyz[0]]

    return take, ipp0, spacing_ijk, tuple(shape_ijk[::-1]), n


def write_ct_series(
    directory: Path | str,
    canonical: np.ndarray,
    *,
    spacing_zyx=(2.5, 0.75, 0.7),
    origin_zyx=(-100.0, -50.0, -60.0),
    row_cos=(1.0, 0.0, 0.0),
    col_cos=(0.0, 1.0, 0.0),
    study: Study | None = None,
    series_uid: str | None = None,
    series_number: int = 3,
    series_description: str = "PRE LIVER",
    acquisition_number: int | None = 1,
    acquisition_time: str | None = "101500",
    instance_start: int = 1,
    reverse_instances: bool = False,
    pixel_representation: int = 1,
    slope: float = 1.0,
    intercept: float = -1024.0,
    slice_thickness: float | None = None,
    padding_value: int | None = None,
    padding_mask: np.ndarray | None = None,
    z_shift: dict[int, float] | None = None,
    skip: set[int] = frozenset(),
    name: str = "{acq}-{n:02d}.dcm",
    shuffle_seed: int | None = None,
    extra: dict | None = None,
) -> list[Path]:
    """Write the slices of ``canonical`` as a CT series; returns the files in InstanceNumber order.

    ``skip`` (source slice indices ascending along the normal) are not written; ``z_shift``
    moves slice k along the normal by that many mm; ``padding_mask`` (canonical) marks voxels
    stored as ``padding_value``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    study = study or Study()
    series_uid = series_uid or generate_uid()
    take, ipp0, spacing_ijk, shape_kji, normal = source_geometry(
        canonical.shape, spacing_zyx, origin_zyx, row_cos, col_cos
    )
    src = take(canonical).astype(np.int64)
    pad_src = take(padding_mask) if padding_mask is not None else None
    stored = (src - int(intercept)) / slope
    assert np.all(stored == np.round(stored)), "test array not exactly representable"
    stored = stored.astype(np.int64)
    if pad_src is not None:
        stored[pad_src] = padding_value
    dtype = np.int16 if pixel_representation == 1 else np.uint16
    info = np.iinfo(dtype)
    assert stored.min() >= info.min and stored.max() <= info.max
    ks = [k for k in range(shape_kji[0]) if k not in skip]
    order = list(reversed(ks)) if reverse_instances else ks
    paths = []
    for n_, k in enumerate(order):
        ipp = ipp0 + normal * (k * spacing_ijk[2] + (z_shift or {}).get(k, 0.0))
        sop = generate_uid()
        ds = _ds_header(study, CT_IMAGE_STORAGE, sop, series_uid)
        ds.Modality = "CT"
        ds.Manufacturer = "GE MEDICAL SYSTEMS"
        ds.ManufacturerModelName = "LightSpeed"
        ds.ConvolutionKernel = "STANDARD"
        ds.KVP = "120"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SeriesNumber = series_number
        ds.SeriesDescription = series_description
        if acquisition_number is not None:
            ds.AcquisitionNumber = acquisition_number
        if acquisition_time is not None:
            ds.AcquisitionTime = acquisition_time
        ds.InstanceNumber = instance_start + n_
        ds.ImagePositionPatient = [f"{v:.4f}" for v in ipp]
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*row_cos, *col_cos)]
        ds.PixelSpacing = [f"{spacing_ijk[1]:g}", f"{spacing_ijk[0]:g}"]
        ds.SliceThickness = f"{slice_thickness if slice_thickness else spacing_ijk[2]:g}"
        ds.Rows, ds.Columns = shape_kji[1], shape_kji[2]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = pixel_representation
        ds.RescaleSlope = f"{slope:g}"
        ds.RescaleIntercept = f"{intercept:g}"
        if padding_value is not None:
            ds.add_new((0x0028, 0x0120), "SS" if pixel_representation else "US", padding_value)
        for key, value in (extra or {}).items():
            setattr(ds, key, value)
        ds.PixelData = stored[k].astype(dtype).tobytes()
        path = directory / name.format(acq=acquisition_number or 1, n=n_ + 1, sop=sop)
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(paths)
    return paths


def write_non_image(
    path: Path | str,
    study: Study,
    sop_class: str,
    *,
    series_number=300,
    description="Segmentation",
    referenced_series: str | None = None,
) -> Path:
    """A header-only non-image object (SR, or a SEG-like instance without real frames)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds = _ds_header(study, sop_class, generate_uid(), generate_uid())
    ds.Modality = "SEG" if sop_class == SEGMENTATION_STORAGE else "SR"
    ds.SeriesNumber = series_number
    ds.SeriesDescription = description
    if referenced_series:
        item = Dataset()
        item.SeriesInstanceUID = referenced_series
        ds.ReferencedSeriesSequence = [item]
    ds.save_as(path, enforce_file_format=True)
    return path
