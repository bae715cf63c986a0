"""Fuzzing from the app's own OpenAPI schema (schemathesis): no 5xx, no replica lost."""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, given, settings

from .conftest import auth, replica_pids

EXAMPLES = 12  # per operation: enough to reach every field's validation, well under a minute


def test_generated_requests_get_no_server_error_and_crash_no_replica(served, client):
    """Requests generated from /openapi.json, sent with a valid key of the route's scope
    so they reach the handlers: every answer is < 500 with a JSON error body, and the
    same replica processes are alive afterwards."""
    before = replica_pids()
    schema = schemathesis.openapi.from_url(served["url"] + "/openapi.json")
    operations = [r.ok() for r in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/analyze", "/v1/models", "/healthz"}
    seen: dict[str, set[int]] = {}
    for op in operations:
        key = served["env"]["admin_key"] if op.path.startswith("/v1/admin") else served["env"]["analyze_key"]

        @given(case=op.as_strategy())
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def fuzz(case):
            response = case.call(headers=auth(key), timeout=120)
            seen.setdefault(op.path, set()).add(response.status_code)
            assert response.status_code < 500, (op.path, response.status_code, response.text[:500])
            if response.status_code >= 400:
                assert response.json()["status"] == response.status_code

        fuzz()
    assert 422 in seen["/v1/analyze"] or 415 in seen["/v1/analyze"], seen  # the fuzzer reached validation
    assert client.get("/healthz").status_code == 200
    assert replica_pids() == before
