"""The running app over real HTTP on 127.0.0.1: answers, parity with the batch job's
code path, every error status, and the audit log."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from engine.audit import read_audit

from .conftest import auth, png_bytes, synthetic_image


def analyze(client, key, files, data=None, headers=None):
    return client.post("/v1/analyze", files=files, data=data or {}, headers={**auth(key), **(headers or {})})


@pytest.fixture(scope="module")
def image():
    return synthetic_image(seed=4, size=256)


class TestAnalyze:
    def test_png_answer_matches_the_batch_path(self, client, served, image, tmp_path):
        """A 16-bit PNG: detections, masks, material and grade equal `Ensemble.analyze`
        on the tiles the batch job reads from the same pixels (an archive on disk)."""
        pixels, nm = image
        r = analyze(client, served["env"]["analyze_key"], {"image": ("a.png", png_bytes(pixels), "image/png")},
                    {"modality": "SEM", "pixel_size_nm": str(nm)})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"]["alias"] == "production"
        assert body["model"]["bundle"] == "serve-tiny/1"
        assert (r.headers["X-Model-Alias"], r.headers["X-Model-Bundle"]) == ("production", "serve-tiny/1")
        assert set(body["model"]["versions"]) >= {"detector", "segmenter", "classifier", "bundle"}
        assert body["image"]["height"] == 256 and body["image"]["dtype"] == "uint16"
        # where the time went: each stage's compute in its replica, inside the stages' wall
        # time, where the classifier runs beside the detector and segmenter
        t = body["timings_ms"]
        stages = [t[f"{s}_ms"] for s in ("preprocess", "detect", "segment", "classify", "measure")]
        critical_path = t["preprocess_ms"] + max(t["classify_ms"], t["detect_ms"] + t["segment_ms"]) + t["measure_ms"]
        assert all(v > 0 for v in stages) and critical_path <= t["stages_ms"] <= t["total_ms"]
        assert body["batch_sizes"] == {"detect": 1, "segment": 1, "classify": 1}  # alone: batched with no one
        expected = batch_job_answer(served, pixels, nm, tmp_path)
        dets = body["detections"]
        assert len(dets) == sum(t.n_defects for t in expected) > 0
        want_boxes = np.concatenate([t.boxes_level0 for t in expected])
        np.testing.assert_allclose([d["box_px"] for d in dets], want_boxes, atol=1e-3)
        np.testing.assert_allclose([d["box_nm"] for d in dets], want_boxes * nm, rtol=1e-9, atol=1e-3)
        np.testing.assert_allclose([d["score"] for d in dets], np.concatenate([t.scores for t in expected]),
                                   atol=1e-5)
        np.testing.assert_allclose([d["area_nm2"] for d in dets], np.concatenate([t.area_nm2 for t in expected]),
                                   rtol=1e-6)
        assert body["material"]["name"] == expected[0].material
        assert body["grade"]["name"] == expected[0].grade
        # masks decode to the pixels the ensemble labelled
        from engine.serving.response import rle_decode

        labels = expected[0].core_labels
        for j, d in enumerate(dets):
            m = d["mask"]
            if not m["counts"]:  # wholly under higher-scoring masks
                assert not (labels == j + 1).any()
                continue
            y0, x0 = (int(v) for v in m["origin_px"])
            got = np.zeros_like(labels, bool)
            got[y0 : y0 + m["size"][0], x0 : x0 + m["size"][1]] = rle_decode(m["counts"], m["size"])
            np.testing.assert_array_equal(got, labels == j + 1)

    def test_tiff_pixel_size_from_metadata(self, client, served, image):
        import tifffile

        pixels, _ = image
        buf = io.BytesIO()
        # 2.5 nm per pixel as TIFF resolution in pixels per centimetre
        tifffile.imwrite(buf, pixels, resolution=(1e7 / 2.5, 1e7 / 2.5), resolutionunit="CENTIMETER")
        r = analyze(client, served["env"]["analyze_key"], {"image": ("a.tif", buf.getvalue(), "image/tiff")},
                    {"modality": "SEM"})
        assert r.status_code == 200, r.text
        assert r.json()["image"]["pixel_size_source"] == "tiff metadata"
        assert r.json()["image"]["pixel_size_nm"] == r.json()["image"]["pixel_size_y_nm"] == pytest.approx(2.5)
        assert r.json()["image"]["dtype"] == "uint16"

    def test_non_square_pixels_are_reported_as_both_sizes(self, client, served, image):
        """pixel_size_y_nm beside pixel_size_nm: the image and the tiles the models saw
        report (y, x); measurements in nm follow them (tests/serving/test_response.py)."""
        pixels, nm = image
        r = analyze(client, served["env"]["analyze_key"], {"image": ("a.png", png_bytes(pixels), "image/png")},
                    {"modality": "SEM", "pixel_size_nm": str(nm), "pixel_size_y_nm": str(2 * nm)})
        assert r.status_code == 200, r.text
        info = r.json()["image"]
        assert (info["pixel_size_y_nm"], info["pixel_size_nm"]) == pytest.approx((2 * nm, nm))
        assert info["pixel_size_source"] == "request"
        assert info["level_pixel_size_y_nm"] > 0 and info["level_pixel_size_nm"] > 0

    def test_raw_array_same_answer_as_png(self, client, served, image):
        pixels, nm = image
        key = served["env"]["analyze_key"]
        png = analyze(client, key, {"image": ("a.png", png_bytes(pixels), "image/png")},
                      {"modality": "SEM", "pixel_size_nm": str(nm)}).json()
        raw = analyze(client, key, {"image": ("a.raw", pixels.astype("<u2").tobytes(), "application/octet-stream")},
                      {"modality": "SEM", "pixel_size_nm": str(nm), "dtype": "uint16", "shape": "256,256"})
        assert raw.status_code == 200, raw.text
        assert raw.json()["image"]["sha256"] != png["image"]["sha256"]
        assert [d["box_px"] for d in raw.json()["detections"]] == [d["box_px"] for d in png["detections"]]

    def test_models_and_health(self, client, served):
        h = client.get("/healthz")
        assert h.status_code == 200 and h.json()["arms"]["production"] == "serve-tiny/1"
        m = client.get("/v1/models", headers=auth(served["env"]["analyze_key"]))
        assert m.status_code == 200, m.text
        assert m.json()["members"]["serve-tiny/1"]["detector"].startswith("serve-tiny-detector/")
        assert len(m.json()["class_names"]) == 5


def batch_job_answer(served, pixels, nm, tmp_path):
    """What the batch job computes for these pixels: the image written to an archive,
    read by the job's datasource (default chunk, halo), through Ensemble.analyze."""
    from engine.pipeline import Ensemble
    from engine.pipeline.ensemble import tiles_from_batch
    from engine.stores.catalog import CatalogRow, write_catalog
    from engine.stores.writer import write_image
    from tests.pipeline.conftest import read_batch

    archive = tmp_path / "archive"
    info = write_image(str(archive / "images" / "img.ome.zarr"), pixels, pixel_size=nm, unit="nanometer", chunk=512)
    write_catalog(str(archive), [CatalogRow(image_id="img", uri="images/img.ome.zarr", modality="SEM",
                                            pixel_size_y=nm, pixel_size_x=nm, unit="nanometer", height=256,
                                            width=256, dtype=str(pixels.dtype), levels=info.levels,
                                            chunk=info.chunk, checksum=info.checksum)])
    config = served["config"]
    ens = Ensemble.from_registry("serve-tiny/1", served["env"]["registry"], config=config.ensemble_config())
    return ens.analyze(tiles_from_batch(read_batch(archive, halo=config.halo)))


def test_concurrent_requests_each_get_their_own_answer(client, served, image):
    """Six requests at once: each answered under its own request id with its image's
    answer, whether a stage batched it with others or not."""
    from concurrent.futures import ThreadPoolExecutor

    pixels, nm = image
    key = served["env"]["analyze_key"]

    def one(i: int):
        return analyze(client, key, {"image": ("a.png", png_bytes(pixels), "image/png")},
                       {"modality": "SEM", "pixel_size_nm": str(nm)}, headers={"X-Request-ID": f"together-{i}"})

    alone = one(-1).json()
    with ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(one, range(6)))
    assert [r.status_code for r in responses] == [200] * 6
    bodies = [r.json() for r in responses]
    assert [b["request_id"] for b in bodies] == [f"together-{i}" for i in range(6)]
    # the same answer to float rounding (a model call over more tiles may sum in another
    # order: ensemble max_batch > 1)
    want = np.array([d["box_px"] for d in alone["detections"]])
    for b in bodies:
        assert b["material"]["name"] == alone["material"]["name"]
        np.testing.assert_allclose([d["box_px"] for d in b["detections"]], want, atol=0.01)


def test_passes_that_arrive_together_share_a_batch(client, served, image):
    """@serve.batch across requests, at the stage itself: six preprocessed passes sent to
    the detector at once (over HTTP the two cores stagger requests so that they seldom
    meet in a stage). The first may go alone (nothing else in flight yet); the ones
    queued behind it go together."""
    from ray import serve

    from engine.serving.app import APP_NAME

    pixels, nm = image
    ref = client.get("/v1/models", headers=auth(served["env"]["analyze_key"])).json()["arms"]["production"]
    pre = serve.get_deployment_handle("preprocess", app_name=APP_NAME)
    det = serve.get_deployment_handle("detector", app_name=APP_NAME)
    passes = [pre.remote(ref, pixels, "SEM", nm).result() for _ in range(6)]
    detected = [r.result() for r in [det.detect.remote(ref, p) for p in passes]]
    sizes = [p.batch_sizes["detect"] for p in detected]
    assert max(sizes) > 1, sizes
    for p, q, n in zip(detected, passes, sizes):
        assert len(p.tiles) == len(q.tiles) and p.batch_sizes == {"detect": n}


class TestErrors:
    def post(self, client, served, **kw):
        key = kw.pop("key", served["env"]["analyze_key"])
        files = kw.pop("files", {"image": ("a.png", png_bytes(np.zeros((64, 64), np.uint8)), "image/png")})
        data = kw.pop("data", {"modality": "SEM", "pixel_size_nm": "5"})
        return client.post("/v1/analyze", files=files, data=data, headers={**auth(key), **kw.pop("headers", {})})

    def check(self, r, status, words):
        assert r.status_code == status, r.text
        body = r.json()
        assert body["status"] == status and words in body["detail"], body
        assert r.headers["X-Request-ID"] == body["request_id"]  # one id, from Serve's proxy

    def test_401_missing_and_bad_key(self, client, served):
        r = client.post("/v1/analyze", files={"image": ("a.png", b"x", "image/png")})
        self.check(r, 401, "API key")
        self.check(self.post(client, served, key="gf_k0000_nope"), 401, "API key")

    def test_403_wrong_scope(self, client, served):
        self.check(self.post(client, served, key=served["env"]["admin_key"]), 403, "'analyze' scope")
        r = client.post("/v1/admin/refresh", headers=auth(served["env"]["analyze_key"]))
        self.check(r, 403, "'admin' scope")
        assert client.post("/v1/admin/refresh", headers=auth(served["env"]["admin_key"])).status_code == 200

    def test_413_body_and_pixels(self, client, served):
        big = b"\0" * (served["config"].max_body_bytes + 1)
        self.check(self.post(client, served, files={"image": ("a.raw", big, "application/octet-stream")}), 413,
                   "over the limit")
        r = self.post(client, served, files={"image": ("a.png", png_bytes(np.zeros((1, 2049 * 2048), np.uint8)),
                                                       "image/png")})
        self.check(r, 413, "pixels is over the limit")

    def test_415_unsupported_media(self, client, served):
        r = self.post(client, served, files={"image": ("a.jpg", b"\xff\xd8\xff\xe0JFIF", "image/jpeg")})
        self.check(r, 415, "unsupported media type")
        # refused before an arm was chosen: no version to name
        assert r.json()["model"] is None and "X-Model-Alias" not in r.headers

    def test_422_a_jpeg_declared_png_is_named_not_called_unsupported(self, client, served):
        r = self.post(client, served, files={"image": ("a.png", b"\xff\xd8\xff\xe0\x00\x10JFIF\x00", "image/png")})
        self.check(r, 422, "declared image/png but its bytes are not a PNG")
        assert "a JPEG" in r.json()["detail"]

    @pytest.mark.parametrize("shape, sizes, status, words", [
        # 20 nm rows, 1 nm columns: square 1 nm pixels make 512 x 512 into 10240 x 512, over max_pixels
        ((512, 512), {"pixel_size_nm": "1", "pixel_size_y_nm": "20"}, 413, "too large once resampled"),
        # 5000 nm columns, 5 nm rows: a tile resampled to 5 nm would be 64000 px wide
        ((4, 64), {"pixel_size_nm": "5000", "pixel_size_y_nm": "5"}, 422, "cannot be preprocessed"),
    ])
    def test_errors_after_the_arm_is_chosen_name_the_version(self, client, served, shape, sizes, status, words):
        """The preprocess stage refuses the pixels once the request's version is chosen:
        the refusal names that version, in the body and the headers, as a 200 does."""
        png = png_bytes(np.zeros(shape, np.uint8))
        r = self.post(client, served, files={"image": ("a.png", png, "image/png")}, data={"modality": "SEM", **sizes})
        self.check(r, status, words)
        assert r.json()["model"] == {"alias": "production", "bundle": "serve-tiny/1"}
        assert (r.headers["X-Model-Alias"], r.headers["X-Model-Bundle"]) == ("production", "serve-tiny/1")
        spec = client.get("/openapi.json").json()  # the schema says so
        assert "model" in spec["components"]["schemas"]["ErrorBody"]["properties"]
        assert "X-Model-Bundle" in spec["paths"]["/v1/analyze"]["post"]["responses"][str(status)]["headers"]

    @pytest.mark.parametrize("data, files, words", [
        ({"modality": "XRAY", "pixel_size_nm": "5"}, None, "modality"),
        ({"modality": "SEM", "pixel_size_nm": "-1"}, None, "pixel_size_nm"),
        ({"modality": "SEM", "pixel_size_nm": "abc"}, None, "pixel_size_nm"),
        ({"modality": "SEM"}, None, "pixel_size_nm: required"),
        ({"modality": "SEM", "pixel_size_nm": "5", "pixel_size_y_nm": "-1"}, None, "pixel_size_y_nm"),
        ({"modality": "SEM", "pixel_size_nm": "5", "pixel_size_y_nm": "nan"}, None, "pixel_size_y_nm"),
        ({"modality": "SEM", "pixel_size_nm": "5", "pixel_size_y_nm": "abc"}, None, "pixel_size_y_nm"),
        ({"modality": "SEM", "pixel_size_y_nm": "5"}, None, "pixel_size_y_nm: given without pixel_size_nm"),
        ({"modality": "SEM", "pixel_size_nm": "5", "dtype": "uint16", "shape": "4,4"},
         {"image": ("a.raw", b"\0" * 7, "application/octet-stream")}, "do not hold"),
        ({"modality": "SEM", "pixel_size_nm": "5"}, {"image": ("a.png", b"\x89PNG\r\n\x1a\nbroken", "image/png")},
         "not a readable PNG"),
        ({"modality": "SEM", "pixel_size_nm": "5"}, {}, "image"),
        ({"modality": "SEM", "pixel_size_nm": "5"}, {"image": ("a.tif", "stack", "image/tiff")},
         "TIFF holds 3 image planes"),
    ])
    def test_422_malformed_fields(self, client, served, data, files, words):
        if files and files["image"][1] == "stack":  # a 3-page TIFF: one micrograph per request
            import tifffile

            buf = io.BytesIO()
            tifffile.imwrite(buf, np.zeros((3, 32, 32), np.uint16), photometric="minisblack")
            files = {"image": (files["image"][0], buf.getvalue(), files["image"][2])}
        kw = {"data": data} if files is None else {"data": data, "files": files or None}
        self.check(self.post(client, served, **kw), 422, words)

    def test_400_request_id_too_long(self, client, served):
        r = self.post(client, served, headers={"X-Request-ID": "r" * 129})
        assert r.status_code == 400 and "X-Request-ID: longer than 128" in r.json()["detail"]
        assert self.post(client, served, headers={"X-Request-ID": "r" * 128}).status_code == 200

    def test_429_with_retry_after(self, client, served):
        key = served["env"]["slow_key"]  # one request a minute
        codes = [self.post(client, served, key=key).status_code for _ in range(2)]
        assert codes[0] == 200
        r = self.post(client, served, key=key)
        self.check(r, 429, "rate limit")
        assert int(r.headers["Retry-After"]) >= 1


class TestAudit:
    def test_accepted_and_refused_requests_are_logged(self, client, served, image):
        pixels, nm = image
        path = served["env"]["audit_log"]
        before = len(read_audit(path))
        ok = analyze(client, served["env"]["analyze_key"], {"image": ("a.png", png_bytes(pixels), "image/png")},
                     {"modality": "SEM", "pixel_size_nm": str(nm)}, headers={"X-Request-ID": "audit-ok-1"})
        bad = client.post("/v1/analyze", files={"image": ("a.png", b"x", "image/png")},
                          headers={"X-Request-ID": "audit-refused-1"})
        assert (ok.status_code, bad.status_code) == (200, 401)
        entries = {e["request_id"]: e for e in read_audit(path)[before:]}
        good = entries["audit-ok-1"]
        assert good["status"] == 200 and good["tenant"] == "lab-a" and good["route"] == "/v1/analyze"
        assert good["key_id"] == served["env"]["analyze_key"].split("_", 2)[1]
        assert good["image_sha256"] == ok.json()["image"]["sha256"]
        assert good["models"] == ok.json()["model"]["versions"]
        assert "time" in good
        refused = entries["audit-refused-1"]
        assert refused["status"] == 401 and refused["tenant"] is None

    def test_refused_requests_log_the_image_and_the_key_id_they_claim(self, client, served):
        """FastAPI's own field validation (422 before the handler) still logs the image's
        digest; a well-formed key with a wrong secret logs the id it claims."""
        import hashlib

        path = served["env"]["audit_log"]
        before = len(read_audit(path))
        png = png_bytes(np.zeros((8, 8), np.uint8))
        bad_field = analyze(client, served["env"]["analyze_key"], {"image": ("a.png", png, "image/png")},
                            {"modality": "SEM", "pixel_size_nm": "abc"}, headers={"X-Request-ID": "audit-422-1"})
        key_id = served["env"]["analyze_key"].split("_", 2)[1]
        guessed = analyze(client, f"gf_{key_id}_{'A' * 43}", {"image": ("a.png", png, "image/png")},
                          {"modality": "SEM", "pixel_size_nm": "5"}, headers={"X-Request-ID": "audit-401-1"})
        assert (bad_field.status_code, guessed.status_code) == (422, 401)
        entries = {e["request_id"]: e for e in read_audit(path)[before:]}
        assert entries["audit-422-1"]["image_sha256"] == hashlib.sha256(png).hexdigest()
        assert entries["audit-422-1"]["tenant"] == "lab-a"
        claimed = entries["audit-401-1"]
        assert (claimed["status"], claimed["tenant"], claimed["key_id"], claimed["key_claimed"]) == \
            (401, None, key_id, True)
        raw = open(path).read()
        assert served["env"]["analyze_key"].split("_", 2)[2] not in raw  # secrets never logged
        assert max(len(line) for line in raw.splitlines()) < 4000  # digests, never pixels

    def test_a_request_the_client_abandons_is_logged(self, client, served, image):
        """A client that gives up before the answer (Serve cancels the request) still
        leaves its audit line: the key was checked and a rate token spent."""
        import time

        import httpx

        pixels, nm = image
        path = served["env"]["audit_log"]
        with pytest.raises(httpx.TimeoutException):
            httpx.post(f"{served['url']}/v1/analyze", timeout=httpx.Timeout(60, read=0.05),
                       files={"image": ("a.png", png_bytes(pixels), "image/png")},
                       data={"modality": "SEM", "pixel_size_nm": str(nm)},
                       headers={**auth(served["env"]["analyze_key"]), "X-Request-ID": "audit-abandoned-1"})
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            entry = next((e for e in read_audit(path) if e.get("request_id") == "audit-abandoned-1"), None)
            if entry is not None:
                break
            time.sleep(0.2)
        assert entry is not None, "no audit line for the abandoned request"
        assert entry["tenant"] == "lab-a" and entry["status"] in (200, 499), entry


def test_admin_refresh_needs_no_body(served):
    """`curl -X POST` sends no Content-Length on a body-less POST; the admin route takes it."""
    import socket
    from urllib.parse import urlsplit

    url = urlsplit(served["url"])
    with socket.create_connection((url.hostname, url.port), timeout=60) as s:
        s.sendall(f"POST /v1/admin/refresh HTTP/1.1\r\nHost: {url.netloc}\r\nConnection: close\r\n"
                  f"Authorization: Bearer {served['env']['admin_key']}\r\n\r\n".encode())
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    status_line, _, rest = reply.partition(b"\r\n")
    assert b" 200 " in status_line, reply[:500]
    assert json.loads(rest.partition(b"\r\n\r\n")[2])["status"] == "ok"
