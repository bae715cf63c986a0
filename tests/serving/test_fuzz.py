"""Fuzzing from the app's own OpenAPI schema (schemathesis): no 5xx, no replica lost."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from .conftest import auth, replica_pids

schema = schemathesis.pytest.from_fixture("api_schema")


@pytest.fixture(scope="module")
def api_schema(served):
    return schemathesis.openapi.from_url(served["url"] + "/openapi.json")


@pytest.fixture(scope="module")
def replicas_before(served):
    return replica_pids()


@schema.parametrize()
@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors(case, served, replicas_before):
    """Generated requests (with a valid key, so they reach the handlers) never get a 5xx."""
    headers = auth(served["env"]["analyze_key"]) if case.operation.path != "/v1/admin/refresh" \
        else auth(served["env"]["admin_key"])
    response = case.call(headers=headers, timeout=120)
    assert response.status_code < 500, (response.status_code, response.text[:500])
    if response.status_code >= 400:
        assert "detail" in response.json()


def test_no_replica_crashed(served, replicas_before, client):
    assert client.get("/healthz").status_code == 200
    assert replica_pids() == replicas_before
