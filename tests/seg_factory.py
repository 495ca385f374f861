"""DICOM-SEGs written by highdicom (with its defaults) over test CT series, for the SEG tests."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom


def sorted_sources(directory: Path) -> list[pydicom.Dataset]:
    dss = [pydicom.dcmread(p) for p in sorted(directory.glob("*.dcm"))]
    for ds in dss:  # type 2 patient/study attributes highdicom copies into the SEG
        for keyword in ("PatientSex", "StudyID", "StudyTime", "AccessionNumber"):
            ds.setdefault(keyword, "")
        ds.setdefault("ReferringPhysicianName", "")
        ds.setdefault("FrameOfReferenceUID", "1.2.3.4")
    return sorted(dss, key=lambda d: int(d.InstanceNumber))


def descriptions(labels: list[str], algorithm: str = "MANUAL") -> list:
    cat = hd.sr.CodedConcept("123037004", "SCT", "Anatomical Structure")
    typ = hd.sr.CodedConcept("10200004", "SCT", "Liver")
    return [
        hd.seg.SegmentDescription(n, label, cat, typ, algorithm, None)
        for n, label in enumerate(labels, start=1)
    ]


def write_hd_seg(path: Path, sources, stack: np.ndarray, labels, seg_type="BINARY", **kw) -> Path:
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=stack,
        segmentation_type=seg_type,
        segment_descriptions=descriptions(labels),
        series_instance_uid=hd.UID(),
        series_number=300,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="test",
        manufacturer_model_name="test",
        software_versions="1",
        device_serial_number="1",
        series_description="Segmentation",
        **kw,
    )
    seg.save_as(path)
    return path
