from __future__ import annotations

import pickle

import pytest

from engine.errors import InvalidURIError
from engine.stores.uri import resolve


class TestResolve:
    def test_local_forms_agree(self, tmp_path):
        a = resolve(tmp_path / "x" / ".." / "y")
        b = resolve(f"file://{tmp_path}/y")
        assert a == b and a.scheme == "file" and a.path == str(tmp_path / "y")

    def test_s3_and_memory(self):
        assert resolve("s3://lab-data/run1/").uri == "s3://lab-data/run1"
        assert resolve("memory://scratch/a").path == "/scratch/a"

    @pytest.mark.parametrize("uri", ["gs://bucket/x", "http://example.org/a.zarr", "ftp://h/x"])
    def test_unknown_scheme_is_named(self, uri):
        with pytest.raises(InvalidURIError, match=f"unknown scheme '{uri.split(':')[0]}'"):
            resolve(uri)

    @pytest.mark.parametrize("uri", ["", "file://relative/x", "s3://Bad_Bucket/x"])
    def test_malformed(self, uri):
        with pytest.raises(InvalidURIError):
            resolve(uri)

    def test_root_confinement(self, tmp_path):
        root = tmp_path / "tenant-a"
        assert resolve(root / "images" / "a.zarr", root=root).is_within(resolve(root))
        with pytest.raises(InvalidURIError, match="outside the allowed root"):
            resolve(tmp_path / "tenant-a" / ".." / "tenant-b", root=root)
        with pytest.raises(InvalidURIError, match="outside the allowed root"):
            resolve(str(tmp_path / "tenant-ab"), root=root)  # a shared prefix is not containment
        with pytest.raises(InvalidURIError, match="outside the allowed root"):
            resolve("s3://lab/a", root=root)

    def test_s3_dotdot_above_bucket(self):
        with pytest.raises(InvalidURIError, match="climbs above"):
            resolve("s3://lab-data/../other-bucket/x")

    def test_pickles_for_ray_workers(self):
        loc = resolve("s3://lab-data/x", storage_options={"endpoint_url": "http://127.0.0.1:1"})
        back = pickle.loads(pickle.dumps(loc))
        assert back == loc and back.storage_options == loc.storage_options

    def test_engine_config_supplies_s3_options(self, tmp_path, monkeypatch):
        cfg = tmp_path / "config.toml"
        cfg.write_text('[s3]\nendpoint_url = "http://127.0.0.1:9"\nregion = "eu-west-1"\n')
        monkeypatch.setenv("GRAINFLOW_CONFIG", str(cfg))
        loc = resolve("s3://lab-data/x")
        assert loc.storage_options == {"endpoint_url": "http://127.0.0.1:9", "client_kwargs": {"region_name": "eu-west-1"}}
        # explicit options win over the config file
        assert resolve("s3://lab-data/x", storage_options={"endpoint_url": "http://127.0.0.1:8"}).storage_options["endpoint_url"] == "http://127.0.0.1:8"
