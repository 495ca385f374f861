"""One catalog query language for info, ls, preview, publish and the sampler."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from livercube.cli import main
from livercube.errors import UsageError
from livercube.store.query import QueryError, catalog_frame, select, select_indices


def _catalog() -> xr.Dataset:
    return xr.Dataset(
        {
            "path": ("volume", np.array(["a/1/s/1", "a/2/s/1", "b/3/s/1"], dtype=object)),
            "phase": ("volume", np.array(["arterial", "portal_venous", "arterial"], dtype=object)),
            "annotated": ("volume", np.array([True, False, True])),
            "spacing": (
                ("volume", "axis"),
                np.array([[5.0, 0.7, 0.7], [2.5, 0.8, 0.8], [1.0, 0.6, 0.6]]),
            ),
            "origin": (("volume", "axis"), np.array([[-10.0, 1, 2], [0.0, 0, 0], [7.0, -3, 4]])),
        },
        coords={"axis": ["z", "y", "x"]},
    )


def test_axis_variables_are_flattened_per_axis():
    frame = catalog_frame(_catalog())
    assert {"spacing_z", "spacing_y", "spacing_x", "origin_z", "origin_y", "origin_x"} <= set(
        frame.columns
    )
    assert list(frame.columns[:1]) == ["path"]
    np.testing.assert_array_equal(frame["spacing_z"], [5.0, 2.5, 1.0])
    np.testing.assert_array_equal(frame["origin_y"], [1.0, 0.0, -3.0])


@pytest.mark.parametrize(
    "where,expected",
    [
        ("spacing_z < 5", [1, 2]),
        ("spacing_y >= 0.7 and annotated", [0]),
        ("origin_x > 1 and phase == 'arterial'", [0, 2]),
        ("origin_z == 0", [1]),
        ("path.str.startswith('b/')", [2]),
        ("", [0, 1, 2]),
        (None, [0, 1, 2]),
    ],
)
def test_select_evaluates_flattened_names(where, expected):
    assert select_indices(_catalog(), where).tolist() == expected
    assert select(catalog_frame(_catalog()), where).index.tolist() == expected


def test_unknown_name_lists_the_available_columns():
    with pytest.raises(QueryError) as info:
        select(catalog_frame(_catalog()), "slice_thickness < 5")
    msg = str(info.value)
    assert "'slice_thickness'" in msg and "spacing_z" in msg and "origin_x" in msg
    assert "\n" not in msg
    assert isinstance(info.value, UsageError)


def test_invalid_expression_is_a_query_error():
    with pytest.raises(QueryError) as info:
        select(catalog_frame(_catalog()), "spacing_z <")
    assert "\n" not in str(info.value)
    with pytest.raises(QueryError, match="not a condition"):
        select(catalog_frame(_catalog()), "spacing_z")


@pytest.fixture()
def tiny_store(tmp_path):
    import zarr
    from volume_factory import phantom_volume

    from livercube.store.catalog import write_catalog
    from livercube.store.writer import write_volume

    url = str(tmp_path / "s.zarr")
    zarr.open_group(url, mode="w", zarr_format=3)
    for i, (series, spacing) in enumerate((("1", (5.0, 1.4, 1.4)), ("2", (2.0, 1.4, 1.4)))):
        write_volume(url, phantom_volume(series=series, shape=(6, 40, 40), spacing=spacing, seed=i))
    write_catalog(url)
    return url


@pytest.mark.parametrize("command", ["info", "ls"])
def test_info_and_ls_accept_the_same_expressions(tiny_store, command, capsys):
    assert main([command, tiny_store, "--where", "spacing_z < 5"]) == 0
    out = capsys.readouterr().out
    assert "crlm/CRLM-CT-1001/S1/2" in out and "crlm/CRLM-CT-1001/S1/1 " not in out + " "


@pytest.mark.parametrize("command", ["info", "ls"])
def test_unknown_name_is_one_line_and_exit_2(tiny_store, command, capsys):
    assert main([command, tiny_store, "--where", "thickness < 5"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "'thickness'" in err and "spacing_z" in err


def test_sampler_uses_the_same_query(tiny_store):
    from livercube.sampling import PatchSampler

    sampler = PatchSampler(tiny_store, where="spacing_z < 5", patch_size=(4, 16, 16), seed=0)
    assert [v.path for v in sampler.volumes] == ["crlm/CRLM-CT-1001/S1/2"]
    with pytest.raises(QueryError, match="thickness"):
        PatchSampler(tiny_store, where="thickness < 5", patch_size=(4, 16, 16))
