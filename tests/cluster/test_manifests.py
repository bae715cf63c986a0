"""The cluster manifests: the launcher YAML against Ray's own schema, the KubeRay
resources against what KubeRay requires, and every one pinned to cluster/versions.env."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
KUBERAY = sorted((CLUSTER / "kuberay").glob("*.yaml"))


def versions() -> dict[str, str]:
    out = {}
    for line in (CLUSTER / "versions.env").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key] = value
    return out


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def ray_clusters() -> list[tuple[str, dict]]:
    """Every RayCluster spec: the RayCluster's own, a RayJob's and a RayService's."""
    out = []
    for path in KUBERAY:
        for d in docs(path):
            spec = d.get("spec", {})
            for key, where in (("RayCluster", spec), ("RayJob", spec.get("rayClusterSpec")),
                               ("RayService", spec.get("rayClusterConfig"))):
                if d.get("kind") == key and where is not None:
                    out.append((f"{path.name}:{key}", where))
    return out


class TestVersions:
    def test_pins_match_the_project(self):
        v = versions()
        project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
        assert v["GRAINFLOW_VERSION"] == project["version"]
        assert f"ray[serve,data,train]=={v['RAY_VERSION']}" in project["dependencies"]
        assert v["RAY_VERSION"] == ray.__version__
        assert v["RAY_VERSION"] in v["RAY_IMAGE"] and v["RAY_VERSION"] in v["GRAINFLOW_IMAGE"]
        assert v["GRAINFLOW_VERSION"] in v["GRAINFLOW_IMAGE"] and v["GRAINFLOW_VERSION"] in v["GRAINFLOW_GPU_IMAGE"]

    @pytest.mark.parametrize("path", [CLUSTER / "aws" / "gpu-cluster.yaml", *KUBERAY], ids=lambda p: p.name)
    def test_every_manifest_uses_the_pins(self, path):
        v = versions()
        text = path.read_text()
        allowed_images = {v[k] for k in ("RAY_IMAGE", "RAY_GPU_IMAGE", "GRAINFLOW_IMAGE", "GRAINFLOW_GPU_IMAGE")}
        images = _images(yaml.safe_load_all(text))
        assert images, f"{path.name}: no image"
        assert images <= allowed_images, f"{path.name}: images not in versions.env: {images - allowed_images}"
        for name, spec in ray_clusters():
            if name.startswith(f"{path.name}:"):
                assert spec["rayVersion"] == v["RAY_VERSION"], name
        if "aws" in path.parts:
            assert f"'{v['RAY_VERSION']}'" in text and f"'{v['GRAINFLOW_VERSION']}'" in text  # setup_commands check

    def test_dockerfile_defaults_match(self):
        v = versions()
        text = (CLUSTER / "docker" / "Dockerfile").read_text()
        assert f"ARG BASE={v['RAY_IMAGE']}" in text and f"ARG GRAINFLOW_VERSION={v['GRAINFLOW_VERSION']}" in text


def _images(documents) -> set[str]:
    found: set[str] = set()

    def walk(node):
        if isinstance(node, dict):
            for k, val in node.items():
                if k in ("image", "worker_image", "head_image") and isinstance(val, str):
                    found.add(val)
                else:
                    walk(val)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    for d in documents:
        walk(d)
    return found


class TestLauncherYaml:
    def test_validates_against_rays_schema(self):
        schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
        config = yaml.safe_load((CLUSTER / "aws" / "gpu-cluster.yaml").read_text())
        jsonschema.validate(config, schema)

    def test_schema_catches_a_broken_config(self):
        """The check above can fail: a fractional resource count is refused."""
        schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
        config = yaml.safe_load((CLUSTER / "aws" / "gpu-cluster.yaml").read_text())
        config["available_node_types"]["gpu-worker"]["resources"]["GPU"] = 0.5
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(config, schema)

    def test_autoscaling_cpu_and_gpu_groups(self):
        config = yaml.safe_load((CLUSTER / "aws" / "gpu-cluster.yaml").read_text())
        types = config["available_node_types"]
        gpu = [t for name, t in types.items() if t["resources"].get("GPU", 0) >= 1]
        cpu = [t for name, t in types.items() if name != config["head_node_type"] and not t["resources"].get("GPU")]
        assert gpu and cpu
        assert all(t["min_workers"] == 0 and t["max_workers"] > 0 for t in gpu)  # grows from zero on GPU demand
        assert all(t["max_workers"] > t["min_workers"] for t in cpu)
        start = " ".join(config["head_start_ray_commands"])
        assert "RAY_AUTH_MODE=token" in start and "--dashboard-host=127.0.0.1" in start
        assert "RAY_AUTH_MODE=token" in " ".join(config["worker_start_ray_commands"])


class TestKubeRay:
    def test_kinds(self):
        kinds = {d["kind"] for p in KUBERAY for d in docs(p) if d.get("apiVersion") == "ray.io/v1"}
        assert kinds == {"RayCluster", "RayJob", "RayService"}

    @pytest.mark.parametrize("name,spec", ray_clusters(), ids=[n for n, _ in ray_clusters()])
    def test_cluster_spec_has_what_kuberay_requires(self, name, spec):
        head = spec["headGroupSpec"]
        assert isinstance(head["rayStartParams"], dict)
        assert all(isinstance(v, str) for v in head["rayStartParams"].values())  # KubeRay wants strings
        assert head["template"]["spec"]["containers"][0]["image"]
        assert spec["enableInTreeAutoscaling"] is True
        assert spec["authOptions"] == {"mode": "token"}
        groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
        assert len(groups) == len(spec["workerGroupSpecs"]) >= 2
        for g in groups.values():
            assert isinstance(g["rayStartParams"], dict)
            assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"] and g["maxReplicas"] >= 1
            resources = g["template"]["spec"]["containers"][0]["resources"]
            assert resources["limits"]["cpu"] and resources["requests"]["memory"]
        gpu = [g for g in groups.values()
               if "nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]]
        assert gpu and all(g["minReplicas"] == 0 for g in gpu)
        assert any(g not in gpu for g in groups.values())

    def test_rayjob_runs_the_reprocess_job_for_a_tenant(self):
        (job,) = [d for d in docs(CLUSTER / "kuberay" / "rayjob-reprocess.yaml") if d["kind"] == "RayJob"]
        assert job["spec"]["entrypoint"].startswith("python -m jobs.reprocess ")
        env = yaml.safe_load(job["spec"]["runtimeEnvYAML"])["env_vars"]
        assert env["GRAINFLOW_TENANT"] and env["GRAINFLOW_TENANTS_FILE"]

    def test_rayservice_serves_the_serve_yaml_application(self):
        (svc,) = [d for d in docs(CLUSTER / "kuberay" / "rayservice.yaml") if d["kind"] == "RayService"]
        apps = yaml.safe_load(svc["spec"]["serveConfigV2"])["applications"]
        serve_yaml = CLUSTER / "serve.yaml"
        expected = {a["import_path"] for a in yaml.safe_load(serve_yaml.read_text())["applications"]} \
            if serve_yaml.exists() else {"engine.serving.app:app_builder"}
        assert {a["import_path"] for a in apps} == expected

    def test_every_rayservice_pod_has_a_volume_for_the_audit_log(self):
        """The image runs as `ray`, who cannot create /var/log/...: without a volume there
        every request's audit line (and so the request) would fail."""
        (svc,) = [d for d in docs(CLUSTER / "kuberay" / "rayservice.yaml") if d["kind"] == "RayService"]
        (app,) = yaml.safe_load(svc["spec"]["serveConfigV2"])["applications"]
        audit_dir = str(Path(app["runtime_env"]["env_vars"]["GRAINFLOW_AUDIT_LOG"]).parent)
        cluster = svc["spec"]["rayClusterConfig"]
        pods = [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"]
                                                                for g in cluster["workerGroupSpecs"]]
        for pod in pods:
            volumes = {v["name"] for v in pod["volumes"]}
            mounts = {m["mountPath"]: m["name"] for c in pod["containers"] for m in c["volumeMounts"]}
            assert mounts.get(audit_dir) in volumes, pod["containers"][0]["name"]

    def test_the_ingress_refuses_bodies_the_app_would_refuse(self):
        """Serve's proxy buffers a body before the app's size check runs, so the Ingress in
        front of the RayService must refuse what the app would: same limit, same service."""
        from engine.serving.config import ServeConfig

        documents = docs(CLUSTER / "kuberay" / "rayservice.yaml")
        (svc,) = [d for d in documents if d["kind"] == "RayService"]
        (ingress,) = [d for d in documents if d["kind"] == "Ingress"]
        serve_config = yaml.safe_load(svc["spec"]["serveConfigV2"])
        (app,) = serve_config["applications"]
        limit = app["args"].get("max_body_bytes", ServeConfig.model_fields["max_body_bytes"].default)
        size = ingress["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-body-size"]
        units = {"k": 2**10, "m": 2**20, "g": 2**30}
        assert int(size[:-1]) * units[size[-1].lower()] == limit
        backends = [p["backend"]["service"] for r in ingress["spec"]["rules"] for p in r["http"]["paths"]]
        assert backends == [{"name": f"{svc['metadata']['name']}-serve-svc",
                             "port": {"number": serve_config["http_options"]["port"]}}]


def test_clusters_whose_gpus_start_at_zero_let_training_wait_for_them():
    """`train --gpu yes` is refused where no GPU can come (engine.training.trainer); the
    clusters that grow a GPU group from zero say that GPUs will come."""
    from engine.runtime import GPU_AUTOSCALING_ENV

    aws = yaml.safe_load((CLUSTER / "aws" / "gpu-cluster.yaml").read_text())
    assert f"--env {GPU_AUTOSCALING_ENV}=1" in aws["docker"]["run_options"]
    (cluster,) = [d for d in docs(CLUSTER / "kuberay" / "raycluster.yaml") if d.get("kind") == "RayCluster"]
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {"name": GPU_AUTOSCALING_ENV, "value": "1"} in head["env"]
