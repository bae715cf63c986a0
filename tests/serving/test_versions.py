"""Versions: a 50/50 production/canary split answers in proportion and sticks to a
request id; promote and rollback reach the running replicas through reconfigure
(user_config) while requests keep flowing, none failing."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from .conftest import BUNDLE, auth, png_bytes, replica_pids, serve_config

PNG = png_bytes((np.arange(64 * 64).reshape(64, 64) % 251).astype(np.uint8))


def ask(client, key, rid):
    r = client.post("/v1/analyze", files={"image": ("a.png", PNG, "image/png")},
                    data={"modality": "SEM", "pixel_size_nm": "5"}, headers={**auth(key), "X-Request-ID": rid})
    return r.status_code, (r.json()["model"] if r.status_code == 200 else r.text)


def wait_arms(client, arms, timeout_s=120):
    """Until /healthz shows `arms` (the ingress has reconfigured)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if client.get("/healthz").json()["arms"] == arms:
            return
        time.sleep(0.3)
    raise AssertionError(f"arms never became {arms}: {client.get('/healthz').json()}")


@pytest.fixture(scope="module")
def restore(served):
    yield
    registry = served["env"]["registry"]
    if registry.get(f"{BUNDLE}@production").version != 1:
        registry.promote(BUNDLE, 1)
    served["deploy"](served["config"].model_copy(update={"generation": 99}))


def test_split_rollout_and_rollback(client, served, restore):
    env, registry = served["env"], served["env"]["registry"]
    key = env["analyze_key"]
    registry.set_alias(BUNDLE, "canary", 2)
    served["deploy"](serve_config(env, split={"production": 0.5, "canary": 0.5}, generation=1))
    wait_arms(client, {"production": f"{BUNDLE}/1", "canary": f"{BUNDLE}/2"})

    # 50/50: both answer, in proportion; each names the version that answered
    n = 40
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda i: ask(client, key, f"ab-{i}"), range(n)))
    assert all(code == 200 for code, _ in answers), answers
    by_alias = {}
    for _, model in answers:
        by_alias.setdefault(model["alias"], set()).add(model["bundle"])
    assert by_alias == {"production": {f"{BUNDLE}/1"}, "canary": {f"{BUNDLE}/2"}}
    canary = sum(m["alias"] == "canary" for _, m in answers) / n
    assert 0.25 <= canary <= 0.75, canary  # 50% +- 3.2 standard deviations of 40 draws
    # sticky: a request id always gets the same arm
    assert {ask(client, key, "ab-7")[1]["alias"] for _ in range(3)} == {answers[7][1]["alias"]}

    # under load: promote v2 to production, then roll back and drop the canary
    stop, results = threading.Event(), []

    def load(worker):
        i = 0
        while not stop.is_set():
            results.append(ask(client, key, f"load-{worker}-{i}"))
            i += 1

    threads = [threading.Thread(target=load, args=(w,)) for w in range(3)]
    for t in threads:
        t.start()
    try:
        registry.promote(BUNDLE, 2)
        served["deploy"](serve_config(env, split={"production": 1.0}, generation=2))
        wait_arms(client, {"production": f"{BUNDLE}/2"})
        during_promotion = len(results)
        after = [ask(client, key, f"after-promote-{i}")[1]["bundle"] for i in range(6)]
        assert set(after) == {f"{BUNDLE}/2"}

        assert registry.rollback(BUNDLE).version == 1
        served["deploy"](serve_config(env, split={"production": 1.0, "canary": 0.0}, generation=3))
        wait_arms(client, {"production": f"{BUNDLE}/1"})
        after = [ask(client, key, f"after-rollback-{i}")[1] for i in range(8)]
        assert {(m["alias"], m["bundle"]) for m in after} == {("production", f"{BUNDLE}/1")}
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert len(results) > during_promotion > 0, "requests flowed during the switches"
    failed = [r for r in results if r[0] != 200]
    assert not failed, failed[:3]


def wait_health(client, done, timeout_s=120):
    """/healthz's body once `done(body)` holds (the ingress has reconfigured)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        body = client.get("/healthz").json()
        if done(body):
            return body
        time.sleep(0.3)
    raise AssertionError(f"/healthz never got there: {client.get('/healthz').json()}")


def test_a_live_split_without_production_is_refused_and_serving_goes_on(client, served, restore):
    """A user_config reaches the replicas unchecked (`serve deploy` of a hand-edited
    serve.yaml). One the startup checks would refuse, here a split without production,
    is refused by the replicas, which go on answering with the split in force and say
    why in /healthz (taken, it failed every health check of the ingress and Serve
    replaced the replica with the same settings, over and over)."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    from engine.serving.app import application_schema

    env = served["env"]
    before, pids = client.get("/healthz").json()["arms"], replica_pids()
    app = application_schema(served["config"])
    for deployment in app["deployments"]:
        deployment["user_config"] = {**deployment["user_config"], "split": {"canary": 1.0}, "generation": 50}
    _get_global_client().deploy_apps(ServeDeploySchema(applications=[app]))  # as `serve deploy` sends it

    health = wait_health(client, lambda body: body.get("settings_error"))
    assert "split: needs a 'production' weight" in health["settings_error"], health
    assert health["arms"] == before
    answers = [ask(client, env["analyze_key"], f"refused-split-{i}") for i in range(3)]
    assert [(code, model["alias"]) for code, model in answers] == [(200, "production")] * 3, answers
    assert replica_pids() == pids  # no replica lost or replaced

    # good settings afterwards are taken, and the error is gone
    served["deploy"](serve_config(env, generation=51))
    assert wait_health(client, lambda body: body.get("settings_error") is None)["arms"] == before
