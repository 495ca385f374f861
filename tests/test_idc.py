"""IDC as a source: series chosen from the IDC index, read from a bucket laid out like IDC's
(``<crdc_series_uuid>/<crdc_instance_uuid>.dcm``) on a real S3 endpoint (moto) on loopback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pydicom
import pytest

import livercube
from livercube.errors import UsageError
from livercube.sources import idc
from livercube.synth.dicom_collections import write_crlm

LIVERCUBE = str(Path(sys.executable).parent / "livercube")


def test_real_index_selects_the_expert_series_of_both_collections():
    """The pinned index holds what the collections' descriptions say: HCC-TACE-Seg 572 CT
    series + 105 expert SEGs, CRLM 197 CT + 197 expert SEGs; AI results are left out."""
    hcc = idc.select_series("idc://hcc-tace-seg")
    crlm = idc.select_series("idc://colorectal_liver_metastases")
    assert hcc.index.startswith("idc-index-data 25.")
    assert (hcc.n_series, crlm.n_series) == (572 + 105, 197 + 197)
    assert hcc.n_ai_results_left_out > 0 and crlm.n_ai_results_left_out > 0
    assert all(p.startswith("s3://idc-open-data/") for p in hcc.prefixes)
    one = idc.select_series("idc://crlm", "PatientID == 'CRLM-CT-1001'")
    assert one.n_series == 2  # its CT and its expert SEG


def test_bad_urls_and_queries_are_usage_errors():
    with pytest.raises(UsageError, match="not an IDC collection"):
        idc.select_series("idc://lidc_idri")
    with pytest.raises(UsageError, match="columns: "):
        idc.select_series("idc://crlm", "NoSuchColumn == 1")
    with pytest.raises(UsageError, match="no series selected"):
        idc.select_series("idc://crlm", "PatientID == 'nobody'")


def _index_subset(root: Path, bucket: str, out: Path) -> Path:
    """An index in the real index's schema listing the generated IDC-layout series."""
    import idc_index_data

    schema = pq.read_schema(idc_index_data.IDC_INDEX_PARQUET_FILEPATH)
    rows = []
    for series_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        files = sorted(series_dir.glob("*.dcm"))
        if not files:
            continue
        ds = pydicom.dcmread(files[0], stop_before_pixels=True)
        ai = "AI" in str(ds.get("SeriesDescription", ""))
        rows.append({
            "collection_id": "colorectal_liver_metastases",
            "analysis_result_id": "bamf_aimi_annotations" if ai else None,
            "PatientID": str(ds.PatientID),
            "StudyInstanceUID": str(ds.StudyInstanceUID),
            "SeriesInstanceUID": str(ds.SeriesInstanceUID),
            "SeriesNumber": str(ds.get("SeriesNumber", "")),
            "SeriesDescription": str(ds.get("SeriesDescription", "")),
            "Modality": str(ds.Modality),
            "instanceCount": len(files),
            "series_size_MB": sum(f.stat().st_size for f in files) / 1e6,
            "aws_bucket": bucket,
            "crdc_series_uuid": series_dir.name,
            "series_aws_url": f"s3://{bucket}/{series_dir.name}/*",
        })  # fmt: skip
    columns = {
        name: pa.array([r.get(name) for r in rows], type=schema.field(name).type)
        for name in schema.names
    }
    pq.write_table(pa.table(columns, schema=schema), out)
    return out


@pytest.mark.slow
def test_convert_from_an_idc_layout_bucket_through_the_index(tmp_path, s3_endpoint):
    import s3fs

    opts = {"key": "testing", "secret": "testing", "endpoint_url": s3_endpoint}
    fs = s3fs.S3FileSystem(**opts)
    bucket = f"idc-{os.getpid()}-{tmp_path.name[-8:]}".lower().replace("_", "-")
    fs.mkdir(bucket)
    root = tmp_path / "idc"
    truth = write_crlm(root, n_patients=2, size="tiny", seed=3, layout="idc")
    for d in root.iterdir():
        if d.is_dir():
            fs.put(str(d), f"{bucket}/{d.name}", recursive=True)
    index = _index_subset(root, bucket, tmp_path / "index.parquet")
    dest = tmp_path / "s.zarr"
    env = {**os.environ, idc.INDEX_ENV: str(index)}
    wanted = truth.patient_ids[1]
    res = subprocess.run(
        [LIVERCUBE, "convert", "idc://crlm", str(dest), "--collection", "crlm", "--quiet",
         "--where", f"PatientID == '{wanted}'",
         *[f"--source-option={k}={v}" for k, v in opts.items()]],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    store = livercube.open(str(dest))
    assert set(store.catalog.patient_id.values) == {wanted}
    (vol,) = [v for v in truth.volumes if v.patient_id == wanted]
    import numpy as np

    np.testing.assert_array_equal(store.volume(0).image.values, vol.hu)
    assert bool(store.catalog.annotated.values[0])
    report = json.loads((dest / "livercube-report.json").read_text())
    assert any(f"IDC index file {index}: 2 series" in w for w in report["warnings"])
