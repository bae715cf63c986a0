from __future__ import annotations

import os
import pickle

import pytest

from engine.errors import InvalidURIError
from engine.stores.uri import escaping_link, resolve


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


class TestEscapingLink:
    """A link below a root passes `is_within` (path text) wherever it leads; `escaping_link`
    finds the ones that leave the root's real folder."""

    @pytest.fixture
    def tree(self, tmp_path):
        """An archive with two image folders, and another tenant's image beside it."""
        archive, other = tmp_path / "lab-a" / "archive", tmp_path / "lab-b" / "img.ome.zarr"
        for folder in (archive / "images" / "a.ome.zarr" / "0", archive / "images" / "b.ome.zarr", other / "labels"):
            folder.mkdir(parents=True)
        return archive, other

    def test_a_linked_folder_that_leaves_the_root_is_named_with_its_target(self, tree):
        archive, other = tree
        link = archive / "images" / "x.ome.zarr"
        os.symlink(other, link)
        image = resolve(archive).join("images/x.ome.zarr")
        assert image.is_within(resolve(archive))  # what join() checks: text only
        assert escaping_link(image, resolve(archive)) == (str(link), str(other))
        assert image.real().path == str(other)

    def test_links_that_stay_inside_and_a_linked_root_are_fine(self, tree, tmp_path):
        archive, _ = tree
        os.symlink(archive / "images" / "a.ome.zarr", archive / "images" / "same.ome.zarr")
        os.symlink(archive, tmp_path / "archive-link")
        root = resolve(tmp_path / "archive-link")
        assert escaping_link(root.join("images/same.ome.zarr"), root, depth=3) is None
        assert escaping_link(root.join("images/a.ome.zarr"), root, depth=3) is None

    def test_a_link_inside_the_folder_is_found_down_to_depth(self, tree):
        archive, other = tree
        image = resolve(archive).join("images/b.ome.zarr")
        os.symlink(other / "labels", archive / "images" / "b.ome.zarr" / "labels")
        assert escaping_link(image, resolve(archive)) is None  # depth 0: the folder alone
        assert escaping_link(image, resolve(archive), depth=1) == (
            str(archive / "images" / "b.ome.zarr" / "labels"), str(other / "labels"))
        deeper = resolve(archive).join("images/a.ome.zarr")
        os.symlink(other / "labels", archive / "images" / "a.ome.zarr" / "0" / "c")
        assert escaping_link(deeper, resolve(archive), depth=1) is None
        assert escaping_link(deeper, resolve(archive), depth=2)[1] == str(other / "labels")

    def test_stores_without_links_and_missing_folders(self, tree):
        archive, _ = tree
        assert escaping_link(resolve("memory://a/images/x"), resolve("memory://a"), depth=3) is None
        assert escaping_link(resolve(archive).join("images/gone.ome.zarr"), resolve(archive), depth=3) is None
