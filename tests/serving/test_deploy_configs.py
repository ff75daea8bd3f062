"""The cluster deploy files parse as what they claim to be and agree with each other and the code."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from serving.config import ServeSettings

ROOT = Path(__file__).resolve().parents[2]
SERVE_CONFIGS = ("serving/serve_config.yaml", "deploy/serve_config.cluster.yaml")
DEPLOYMENTS = {"LampModel", "LampIngress", "MetricsHub"}


def rayservice() -> dict:
    return yaml.safe_load((ROOT / "deploy/kuberay-rayservice.yaml").read_text())


def serve_configs() -> dict[str, dict]:
    configs = {name: yaml.safe_load((ROOT / name).read_text()) for name in SERVE_CONFIGS}
    configs["kuberay serveConfigV2"] = yaml.safe_load(rayservice()["spec"]["serveConfigV2"])
    return configs


@pytest.mark.parametrize("name", [*SERVE_CONFIGS, "kuberay serveConfigV2"])
def test_serve_configs_are_valid_for_serve_deploy(name):
    schema = ServeDeploySchema.model_validate(serve_configs()[name])
    (app,) = schema.applications
    assert app.import_path == "serving.app:build_app"
    ServeSettings.from_mapping(app.args, source=name)  # every arg is a known, well-typed setting
    for deployment in app.deployments:
        assert deployment.name in DEPLOYMENTS, f"{name}: no deployment named {deployment.name!r}"


def test_kuberay_gpu_workers_match_the_replicas_they_host():
    spec = rayservice()["spec"]
    model = next(d for d in yaml.safe_load(spec["serveConfigV2"])["applications"][0]["deployments"]
                 if d["name"] == "LampModel")
    cluster = spec["rayClusterConfig"]
    (workers,) = cluster["workerGroupSpecs"]
    (container,) = workers["template"]["spec"]["containers"]
    limits = container["resources"]["limits"]
    per_replica = model["ray_actor_options"]
    assert float(workers["rayStartParams"]["num-gpus"]) == float(limits["nvidia.com/gpu"]) == per_replica["num_gpus"]
    assert float(limits["cpu"]) >= per_replica["num_cpus"]
    # One replica per worker pod: the replica bounds and the pod bounds must allow each other.
    assert model["max_replicas_per_node"] == 1
    assert model["autoscaling_config"]["max_replicas"] <= workers["maxReplicas"]
    assert model["autoscaling_config"]["min_replicas"] >= workers["minReplicas"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


def test_kuberay_admin_token_comes_from_a_secret_on_every_pod():
    cluster = rayservice()["spec"]["rayClusterConfig"]
    pods = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for pod in pods:
        for container in pod["spec"]["containers"]:
            token = next(e for e in container["env"] if e["name"] == "LAMP_ADMIN_TOKEN")
            assert "secretKeyRef" in token["valueFrom"] and "value" not in token
    # Not in the Serve config either: `serve status` and the dashboard show it.
    assert "LAMP_ADMIN_TOKEN" not in rayservice()["spec"]["serveConfigV2"]


@pytest.mark.parametrize("name", [*SERVE_CONFIGS, "kuberay serveConfigV2"])
def test_serve_configs_route_by_task_affinity(name):
    (app,) = serve_configs()[name]["applications"]
    assert ServeSettings.from_mapping(app["args"], source=name).routing_in_force == "affinity"
