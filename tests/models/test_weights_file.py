"""Weights named by an s3:// URI (moto's server): copied once per machine into the cache
under their digest, checked, never kept when they differ from the digest recorded."""

from __future__ import annotations

import hashlib

import pytest

from engine.models.errors import CheckpointError, ChecksumMismatchError
from engine.models.weights_file import weights_file

DATA = b"weights" * 1000
DIGEST = hashlib.sha256(DATA).hexdigest()


@pytest.fixture
def bucket_file(s3_bucket, s3_endpoint):
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint)
    uri = f"{s3_bucket}/models/sam_vit_b.pth"
    fs.pipe_file(uri, DATA)
    return fs, uri


def cached(cache) -> set[str]:
    return {str(p.relative_to(cache)) for p in cache.rglob("*") if p.is_file()}


def test_a_bucket_file_is_copied_once_under_its_digest(bucket_file, tmp_path):
    fs, uri = bucket_file
    path, digest = weights_file(uri, cache_dir=tmp_path)
    assert (digest, path) == (DIGEST, tmp_path / DIGEST / "sam_vit_b.pth") and path.read_bytes() == DATA
    placed = path.stat().st_mtime_ns
    # the next run, with no digest given, finds the copy by the object's version (ETag)
    assert weights_file(uri, cache_dir=tmp_path) == (path, DIGEST) and path.stat().st_mtime_ns == placed
    fs.pipe_file(uri, b"replaced later")
    # asked for by its digest, the copy is the one that has it; with none, the new object is copied
    assert weights_file(uri, DIGEST, cache_dir=tmp_path) == (path, DIGEST) and path.stat().st_mtime_ns == placed
    new = hashlib.sha256(b"replaced later").hexdigest()
    assert weights_file(uri, cache_dir=tmp_path) == (tmp_path / new / "sam_vit_b.pth", new)
    assert {f for f in cached(tmp_path) if not f.startswith(".")} == {f"{DIGEST}/sam_vit_b.pth",
                                                                     f"{new}/sam_vit_b.pth"}
    assert not list((tmp_path / ".partial").iterdir())


def test_the_sidecar_in_the_bucket_is_the_digest_checked(bucket_file, tmp_path):
    fs, uri = bucket_file
    fs.pipe_file(f"{uri}.sha256", f"{'ab' * 32}  sam_vit_b.pth\n".encode())
    with pytest.raises(ChecksumMismatchError, match=f"sam_vit_b.pth: sha256 mismatch: expected {'ab' * 32}"):
        weights_file(uri, cache_dir=tmp_path)
    assert not {f for f in cached(tmp_path) if not f.startswith(".locks")}  # no copy, no partial file left
    fs.pipe_file(f"{uri}.sha256", f"{DIGEST}  sam_vit_b.pth\n".encode())
    assert weights_file(uri, cache_dir=tmp_path)[1] == DIGEST


def test_a_missing_object_and_a_bad_digest_are_named(bucket_file, tmp_path):
    _, uri = bucket_file
    with pytest.raises(CheckpointError, match="models/nope.pth: no such file"):
        weights_file(uri.replace("sam_vit_b", "nope"), cache_dir=tmp_path)
    with pytest.raises(CheckpointError, match="must be 64 hex digits"):
        weights_file(uri, "abc", cache_dir=tmp_path)
    with pytest.raises(CheckpointError, match="every worker can read, not memory://"):
        weights_file("memory://weights/sam.pth", cache_dir=tmp_path)


def test_a_fine_tune_checks_weights_in_a_bucket_before_ray(s3_bucket, s3_endpoint, tmp_path, monkeypatch):
    """engine.training.train's driver check on an s3:// file; workers load through the
    same function (load_initial_weights), each machine from its cache."""
    import s3fs
    import torch

    import engine.models as M
    from engine.training.warm_start import check_warm_start, load_initial_weights

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    local = tmp_path / "sam_tiny.pth"
    torch.manual_seed(3)
    sam = M.create_segmenter("sam_tiny")
    torch.save(sam.sam.state_dict(), local)
    uri = f"{s3_bucket}/sam_tiny.pth"
    s3fs.S3FileSystem(endpoint_url=s3_endpoint).put_file(str(local), uri)
    digest = check_warm_start("segmenter", "sam_tiny", None, uri, None, ["sam.mask_decoder"])
    assert digest == M.sha256_file(local)
    fresh = M.create_segmenter("sam_tiny")
    load_initial_weights(fresh, "segmenter", uri, digest)
    for key, value in sam.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    assert (tmp_path / "cache" / "grainflow" / "weights" / digest / "sam_tiny.pth").is_file()
