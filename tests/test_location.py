"""StoreLocation: a store's URL, options and retry policy, decided once."""

from __future__ import annotations

import pickle

import pytest

from livercube.store.location import (
    FIRST_CONTACT_RETRIES,
    S3_RETRIES,
    StoreLocation,
    is_remote,
    with_retries,
)


def test_s3_gets_the_retry_policy_and_user_settings_win():
    loc = StoreLocation.of("s3://bucket/store", {"anon": True})
    assert loc.storage_options["config_kwargs"]["retries"] == S3_RETRIES
    assert loc.storage_options["anon"] is True
    mine = {"config_kwargs": {"retries": {"max_attempts": 1}}}
    assert StoreLocation.of("s3://b/s", mine).storage_options["config_kwargs"]["retries"] == {
        "max_attempts": 1
    }
    assert mine == {"config_kwargs": {"retries": {"max_attempts": 1}}}  # caller's dict untouched


def test_local_paths_and_other_protocols_get_no_s3_settings(tmp_path):
    loc = StoreLocation.of(f"file://{tmp_path}/s.zarr")
    assert loc.url == f"{tmp_path}/s.zarr" and not loc.is_remote
    assert dict(loc.storage_options) == {}
    https = StoreLocation.of("https://example.org/s.zarr")
    assert https.is_remote and not https.is_s3 and dict(https.storage_options) == {}
    assert with_retries("gs://b/s", {"token": "anon"}) == {"token": "anon"}
    assert is_remote("memory://x") and not is_remote(str(tmp_path))


def test_a_location_is_made_once_and_options_cannot_be_given_twice():
    loc = StoreLocation.of("s3://bucket/store", {"anon": True})
    assert StoreLocation.of(loc) is loc
    with pytest.raises(TypeError, match="given twice"):
        StoreLocation.of(loc, {"anon": False})


def test_a_location_pickles_for_workers_with_its_policy():
    loc = StoreLocation.of("s3://bucket/store", {"endpoint_url": "http://127.0.0.1:1"})
    back = pickle.loads(pickle.dumps(loc))
    assert back == loc and back.endpoint == "http://127.0.0.1:1"


def test_first_contact_fails_fast_without_changing_the_location():
    loc = StoreLocation.of("s3://bucket/store", {"anon": True})
    probe = loc.first_contact()
    assert probe.storage_options["config_kwargs"]["retries"] == FIRST_CONTACT_RETRIES
    assert probe.storage_options["skip_instance_cache"] is True
    assert loc.storage_options["config_kwargs"]["retries"] == S3_RETRIES
    assert StoreLocation.of("/tmp/x").first_contact() == StoreLocation.of("/tmp/x")


def test_root_is_opened_on_the_given_store(tmp_path):
    import zarr

    loc = StoreLocation.of(tmp_path / "s.zarr")
    root = loc.open_root(mode="a")
    root.attrs["k"] = 1
    store = loc.zarr_store(read_only=True)
    again = loc.open_root(mode="r", consolidated=False, store=store)
    assert again.store is store and again.attrs["k"] == 1
    with pytest.raises((FileNotFoundError, zarr.errors.GroupNotFoundError)):
        StoreLocation.of(tmp_path / "missing.zarr").open_root(mode="r")
