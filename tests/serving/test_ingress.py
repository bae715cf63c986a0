"""The ingress without Ray: the key check and its audit fields, the audit of uploads
FastAPI refuses, and the OpenAPI schema (the HTTP paths run in test_api)."""

from __future__ import annotations

import hashlib
import json

import pytest
from fastapi import Depends, FastAPI, File, Form, Request, UploadFile
from fastapi.testclient import TestClient

from engine.serving.ingress import Ingress, api, audit_upload
from engine.serving.keys import KeyStore, add_key, revoke_key
from engine.serving.schemas import ERROR_CODES


def guard(tmp_path):
    """The ingress's key guard (`Ingress.refuse`) on a keys file in tmp_path, without a
    replica: the method on an object holding only what it reads."""
    from functools import partial
    from types import SimpleNamespace

    from engine.serving.config import ServeConfig
    from engine.serving.ratelimit import RateLimiter

    keys = tmp_path / "keys.json"
    key_id, key = add_key(keys, "lab-a", ["analyze"])
    state = SimpleNamespace(config=ServeConfig(keys_file=str(keys)), rate=RateLimiter(),
                            keys=KeyStore.load(keys, check_every_s=0))  # the served default is 1 s
    return SimpleNamespace(refuse=partial(Ingress.func_or_class.refuse, state)), keys, key_id, key


def get_models(key: str) -> Request:
    request = Request({"type": "http", "method": "GET", "path": "/v1/models", "root_path": "", "query_string": b"",
                       "headers": [(b"authorization", f"Bearer {key}".encode())]})
    request.state.request_id = "r-1"
    return request


class TestKeyGuard:
    def test_a_wrong_secret_for_a_real_key_id_logs_the_claimed_id(self, tmp_path):
        ingress, _, key_id, key = guard(tmp_path)
        audit = {"tenant": None, "key_id": None}
        refused = ingress.refuse(get_models(f"gf_{key_id}_{'x' * 43}"), audit)
        assert refused.status_code == 401
        assert audit == {"tenant": None, "key_id": key_id, "key_claimed": True}
        audit = {"tenant": None, "key_id": None}
        assert ingress.refuse(get_models("not-a-key"), audit).status_code == 401
        assert audit == {"tenant": None, "key_id": None}  # nothing claimed, nothing logged
        audit = {}
        assert ingress.refuse(get_models(key), audit) is None
        assert audit == {"tenant": "lab-a", "key_id": key_id}

    def test_a_key_revoked_in_the_file_is_refused_without_a_restart(self, tmp_path):
        ingress, keys, key_id, key = guard(tmp_path)
        assert ingress.refuse(get_models(key), {}) is None
        revoke_key(keys, key_id)
        assert ingress.refuse(get_models(key), {}).status_code == 401


class TestAuditUpload:
    """`audit_upload` hashes the image into the audit line even when FastAPI refuses the
    request's fields before the handler runs."""

    @pytest.fixture
    def app(self):
        app = FastAPI()
        lines: list[dict] = []

        @app.middleware("http")
        async def audited(request: Request, call_next):  # as the ingress's middleware does
            request.state.audit = {"image_sha256": None}
            response = await call_next(request)
            lines.append({**request.state.audit, "status": response.status_code})
            return response

        @app.post("/v1/analyze", dependencies=[Depends(audit_upload)])
        async def analyze(image: UploadFile = File(...), pixel_size_nm: float = Form(None)):
            return {"sha256": hashlib.sha256(await image.read()).hexdigest()}

        with TestClient(app) as client:
            yield client, lines

    def test_a_request_refused_for_a_malformed_field_logs_its_image(self, app):
        client, lines = app
        data = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 5000  # over one read chunk
        r = client.post("/v1/analyze", files={"image": ("a.png", data, "image/png")}, data={"pixel_size_nm": "abc"})
        assert r.status_code == 422
        assert lines[-1] == {"image_sha256": hashlib.sha256(data).hexdigest(), "status": 422}

    def test_the_handler_still_reads_the_whole_upload(self, app):
        client, lines = app
        data = b"\x89PNG\r\n\x1a\n" + b"\7" * 3_000_000
        r = client.post("/v1/analyze", files={"image": ("a.png", data, "image/png")}, data={"pixel_size_nm": "5"})
        assert r.status_code == 200 and r.json()["sha256"] == lines[-1]["image_sha256"] == \
            hashlib.sha256(data).hexdigest()

    def test_no_upload_no_digest(self, app):
        client, lines = app
        assert client.post("/v1/analyze", data={"image": "text", "pixel_size_nm": "5"}).status_code == 422
        assert lines[-1]["image_sha256"] is None


@pytest.fixture(scope="module")
def schema():
    return api.openapi()


class TestOpenAPI:
    def test_both_ways_of_sending_a_key_are_declared(self, schema):
        schemes = schema["components"]["securitySchemes"]
        assert schemes["APIKeyHeader"] == {"type": "apiKey", "in": "header", "name": "X-API-Key",
                                           "description": "an API key: gf_<key id>_<secret>"}
        assert schemes["HTTPBearer"]["type"] == "http" and schemes["HTTPBearer"]["scheme"] == "bearer"
        for path, method in (("/v1/analyze", "post"), ("/v1/models", "get"), ("/v1/admin/refresh", "post")):
            # a list of requirements: either one will do
            assert schema["paths"][path][method]["security"] == [{"APIKeyHeader": []}, {"HTTPBearer": []}]
        assert "security" not in schema["paths"]["/healthz"]["get"]

    def test_each_route_lists_the_refusals_it_can_answer(self, schema):
        def statuses(path, method):
            return sorted(int(c) for c in schema["paths"][path][method]["responses"] if c != "200")

        assert statuses("/v1/analyze", "post") == [400, 401, 403, 411, 413, 415, 422, 429, 500]
        assert statuses("/v1/models", "get") == [400, 401, 403, 429, 500]
        assert statuses("/healthz", "get") == [400, 500]
        # a stage's failure comes after the arm is chosen: its answer names the version
        assert set(schema["paths"]["/v1/analyze"]["post"]["responses"]["500"]["headers"]) == {
            "X-Model-Alias", "X-Model-Bundle"}

    def test_the_error_code_description_names_every_code(self, schema):
        description = schema["components"]["schemas"]["ErrorBody"]["properties"]["error"]["description"]
        for code in ("bad_request", "length_required", "method_not_allowed", *ERROR_CODES.values()):
            assert code in description
        json.dumps(schema)  # serialisable as served
