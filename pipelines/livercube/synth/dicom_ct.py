"""Single-frame CT Image Storage datasets for the synthetic DICOM collections.

Every quirk of the real CT files that this module reproduces (one line each):

* Explicit VR Little Endian, one slice per file (CT Image Storage), written with pydicom.
* Files run head to feet: InstanceNumber 1 (or a mid-exam start such as 45) is the most
  superior slice, so file order is the reverse of canonical z.
* ``PixelRepresentation`` 1 (signed, stored = HU + 1024) for most series, 0 (unsigned,
  stored = HU + 1024 as uint16) for some, and signed with ``RescaleIntercept`` 0 (stored = HU)
  for one; slope is always 1.
* GE images carry ``PixelPaddingValue`` −2000 (VR SS) and store −2000 in the corners outside
  the circular field of view, which SimpleITK reads as −3024 HU.
* ``ImageOrientationPatient`` (−1,0,0,0,−1,0) for some series: the pixel array is the canonical
  slice flipped in both in-plane axes and ``ImagePositionPatient`` names the far corner.
* ``SliceThickness`` need not equal the slice spacing.
* ``AcquisitionNumber`` can be absent; several acquisitions can share a series.
* Dummy PHI (PatientName, PatientBirthDate, InstitutionName, ReferringPhysicianName,
  AccessionNumber, OtherPatientIDs) so anonymisation tests have something to find.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass, field

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)

from livercube.volumes.geometry import Grid

#: Root of all generated UIDs (the TCIA root, as in the real collections).
UID_PREFIX = "1.3.6.1.4.1.14519.5.2.1."

#: Orientation of a standard axial series and of a series read out with rows and columns reversed.
IOP_STANDARD = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
IOP_FLIPPED = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0)

GE_PADDING_VALUE = -2000


def det_uid(*parts: object) -> str:
    """A UID derived only from ``parts`` (same parts, same UID)."""
    return generate_uid(prefix=UID_PREFIX, entropy_srcs=[repr(p) for p in parts])


def det_uuid(*parts: object) -> str:
    """An RFC 4122 version-4-shaped uuid derived only from ``parts`` (IDC-style crdc uuids)."""
    digest = hashlib.sha256("|".join(repr(p) for p in parts).encode()).digest()
    return str(uuid.UUID(bytes=digest[:16], version=4))


def det_digits(n: int, *parts: object) -> str:
    """``n`` decimal digits derived only from ``parts`` (the NBIA folder-name suffixes)."""
    h = int(hashlib.sha256("|".join(repr(p) for p in parts).encode()).hexdigest(), 16)
    return f"{h % 10**n:0{n}d}"


@dataclass(frozen=True)
class CTHeader:
    """Header values shared by every slice of one acquisition."""

    patient: dict[str, str]  # PatientID, PatientName, PatientBirthDate, PatientSex, PatientAge...
    study: dict[str, str]  # StudyInstanceUID, StudyDate, StudyTime, StudyDescription, ...
    series_uid: str
    series_number: int
    series_description: str
    frame_of_reference_uid: str
    manufacturer: str
    model: str
    kernel: str
    acquisition_number: int | None
    acquisition_time: str  # HHMMSS.ffffff
    contrast_agent: str | None
    slice_thickness: float
    pixel_representation: int = 1
    rescale_intercept: float = -1024.0
    padding: bool = False
    orientation: tuple[float, ...] = IOP_STANDARD
    first_instance_number: int = 1
    extra: dict[str, object] = field(default_factory=dict)


def padding_mask(shape_yx: tuple[int, int]) -> np.ndarray:
    """In-plane voxels outside the circular reconstruction field of view (True = padding)."""
    ny, nx = shape_yx
    yy, xx = np.mgrid[0:ny, 0:nx]
    r = min(ny, nx) / 2.0
    return (yy + 0.5 - ny / 2.0) ** 2 + (xx + 0.5 - nx / 2.0) ** 2 > r**2


def stored_hu(hu: np.ndarray, header: CTHeader) -> np.ndarray:
    """The HU a reader computes from the stored values (padding corners become −3024 on GE)."""
    out = np.asarray(hu, dtype=np.int16).copy()
    if header.padding:
        out[:, padding_mask(out.shape[1:])] = int(GE_PADDING_VALUE + header.rescale_intercept)
    return out


def _encode(slice_hu: np.ndarray, header: CTHeader) -> bytes:
    stored = slice_hu.astype(np.int32) - int(header.rescale_intercept)
    if header.pixel_representation == 0:
        if stored.min() < 0 or stored.max() > 65535:
            raise ValueError("unsigned CT pixel data out of range")
        return stored.astype("<u2").tobytes()
    if header.padding:
        # the padding corners hold the raw padding value, not a rescaled HU
        stored[padding_mask(stored.shape)] = GE_PADDING_VALUE
    return stored.astype("<i2").tobytes()


def slice_position(
    grid: Grid, z: int, orientation: tuple[float, ...]
) -> tuple[float, float, float]:
    """LPS (x, y, z) of the first stored pixel of canonical slice ``z``."""
    oz, oy, ox = grid.origin
    sz, sy, sx = grid.spacing
    _, ny, nx = grid.shape
    if orientation == IOP_FLIPPED:
        return (ox + sx * (nx - 1), oy + sy * (ny - 1), oz + sz * z)
    return (ox, oy, oz + sz * z)


def _ds(v: float) -> str:
    """A DS value string that round-trips exactly through float()."""
    s = repr(round(float(v), 6))
    return s[:-2] if s.endswith(".0") else s


def ct_datasets(hu: np.ndarray, grid: Grid, header: CTHeader, sop_uids: list[str]) -> list[Dataset]:
    """One dataset per slice of canonical ``hu`` (z, y, x), returned in file (instance) order.

    ``sop_uids[z]`` is the SOPInstanceUID of canonical slice ``z``; instance order runs from the
    most superior slice (largest z) down.  ``hu`` must already contain the padding corners
    (see :func:`stored_hu`) if ``header.padding``.
    """
    nz, ny, nx = grid.shape
    out = []
    for k in range(nz):
        z = nz - 1 - k
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uids[z]
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds.file_meta.ImplementationVersionName = "LIVERCUBE_SYN"
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop_uids[z]
        date = header.study["StudyDate"]
        ds.StudyDate = date
        ds.SeriesDate = date
        ds.AcquisitionDate = date
        ds.ContentDate = date
        ds.StudyTime = header.study["StudyTime"]
        ds.SeriesTime = header.acquisition_time
        ds.AcquisitionTime = header.acquisition_time
        h, m, s = (int(header.acquisition_time[i : i + 2]) for i in (0, 2, 4))
        secs = h * 3600 + m * 60 + s + k // 2
        frac = (k % 2) * 5
        ds.ContentTime = f"{secs // 3600:02d}{secs // 60 % 60:02d}{secs % 60:02d}.{frac}00000"
        ds.AccessionNumber = header.study.get("AccessionNumber", "")
        ds.Modality = "CT"
        ds.Manufacturer = header.manufacturer
        ds.InstitutionName = header.study.get("InstitutionName", "")
        ds.ReferringPhysicianName = header.study.get("ReferringPhysicianName", "")
        ds.StudyDescription = header.study["StudyDescription"]
        ds.SeriesDescription = header.series_description
        ds.ManufacturerModelName = header.model
        for key in (
            "PatientName",
            "PatientID",
            "PatientBirthDate",
            "PatientSex",
            "PatientAge",
            "OtherPatientIDs",
        ):
            if key in header.patient:
                setattr(ds, key, header.patient[key])
        ds.BodyPartExamined = "ABDOMEN"
        if header.contrast_agent:
            ds.ContrastBolusAgent = header.contrast_agent
        ds.SliceThickness = _ds(header.slice_thickness)
        ds.KVP = "120"
        ds.ConvolutionKernel = header.kernel
        ds.PatientPosition = "FFS"
        ds.StudyInstanceUID = header.study["StudyInstanceUID"]
        ds.SeriesInstanceUID = header.series_uid
        ds.StudyID = header.study.get("StudyID", "")
        ds.SeriesNumber = header.series_number
        if header.acquisition_number is not None:
            ds.AcquisitionNumber = header.acquisition_number
        ds.InstanceNumber = header.first_instance_number + k
        pos = slice_position(grid, z, header.orientation)
        ds.ImagePositionPatient = [_ds(v) for v in pos]
        ds.ImageOrientationPatient = [_ds(v) for v in header.orientation]
        ds.FrameOfReferenceUID = header.frame_of_reference_uid
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = _ds(pos[2])
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = ny
        ds.Columns = nx
        ds.PixelSpacing = [_ds(grid.spacing[1]), _ds(grid.spacing[2])]
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = header.pixel_representation
        if header.padding:
            ds.add_new(0x00280120, "SS", GE_PADDING_VALUE)  # PixelPaddingValue
        ds.WindowCenter = "40"
        ds.WindowWidth = "400"
        ds.RescaleIntercept = _ds(header.rescale_intercept)
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        for key, value in header.extra.items():
            setattr(ds, key, value)
        sl = hu[z]
        if header.orientation == IOP_FLIPPED:
            sl = sl[::-1, ::-1]
        ds.PixelData = _encode(np.ascontiguousarray(sl), header)
        out.append(ds)
    return out
