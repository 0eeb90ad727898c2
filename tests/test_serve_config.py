"""Serve configs and the KubeRay RayService against Ray Serve's own config schema."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel
from ray.serve.schema import DeploymentSchema, ServeApplicationSchema, ServeDeploySchema

from dialclip_ray.serving.schemas import AppArgs

ROOT = Path(__file__).resolve().parents[1]
IMPORT_PATH = "dialclip_ray.serving.app:build_app"
NAMES = ["QueryEncoder", "Shard0", "Shard1", "Shard2", "Shard3", "RetrievalIngress"]


def unknown_keys(data: dict, model: type[BaseModel], where: str) -> list[str]:
    """Serve's schemas ignore unknown keys; a misspelt option would be silently dropped, so check."""
    return [f"{where}.{k}" for k in data if k not in model.model_fields]


def validated(cfg: dict) -> ServeDeploySchema:
    schema = ServeDeploySchema.model_validate(cfg)
    bad = unknown_keys(cfg, ServeDeploySchema, "<root>")
    for i, app in enumerate(cfg["applications"]):
        bad += unknown_keys(app, ServeApplicationSchema, f"applications[{i}]")
        for d in app.get("deployments", []):
            bad += unknown_keys(d, DeploymentSchema, f"applications[{i}].{d['name']}")
    assert not bad, bad
    return schema


def load(name: str) -> dict:
    return yaml.safe_load((ROOT / "serve" / name).read_text())


def rayservice_serve_config() -> dict:
    rs = yaml.safe_load((ROOT / "serve" / "rayservice.yaml").read_text())
    assert rs["apiVersion"] == "ray.io/v1" and rs["kind"] == "RayService"
    assert isinstance(rs["spec"]["serveConfigV2"], str)  # KubeRay takes the Serve config as a YAML string
    return yaml.safe_load(rs["spec"]["serveConfigV2"])


@pytest.mark.parametrize("name", ["serve_config.yaml", "serve_config.gpu.yaml", "rayservice.yaml"])
def test_validates_against_serve_schema(name):
    cfg = rayservice_serve_config() if name == "rayservice.yaml" else load(name)
    schema = validated(cfg)
    (app,) = schema.applications
    assert app.import_path == IMPORT_PATH
    AppArgs.model_validate(app.args)  # the args build_app will receive (strict: unknown keys fail)
    assert [d.name for d in app.deployments] == NAMES
    for d in app.deployments:
        if d.name.startswith("Shard"):
            a = d.autoscaling_config
            assert (a["min_replicas"], a["max_replicas"], a["target_ongoing_requests"]) == (1, 4, 2)
        if isinstance(d.autoscaling_config, dict):
            assert d.autoscaling_config["target_ongoing_requests"] < d.max_ongoing_requests


def test_schema_rejects_bad_values():
    cfg = load("serve_config.yaml")
    cfg["applications"][0]["deployments"][0]["num_replicas"] = -1
    with pytest.raises(ValueError):
        ServeDeploySchema.model_validate(cfg)


def test_cpu_config_fits_two_cores():
    (app,) = load("serve_config.yaml")["applications"]
    total = 0.0
    for d in app["deployments"]:
        opts = d["ray_actor_options"]
        assert "num_gpus" not in opts
        replicas = d.get("autoscaling_config", {}).get("max_replicas", d.get("num_replicas", 1))
        total += replicas * opts["num_cpus"]
    assert app["deployments"][0]["ray_actor_options"]["num_cpus"] == 0.25
    assert app["deployments"][0]["max_ongoing_requests"] == 16
    assert app["deployments"][-1]["ray_actor_options"]["num_cpus"] == 0.1
    assert total <= 2.0, f"fully scaled out the CPU config needs {total} CPUs"


def test_rayservice_embeds_the_gpu_app():
    gpu = load("serve_config.gpu.yaml")["applications"][0]
    rs = rayservice_serve_config()["applications"][0]
    assert all(d["ray_actor_options"].get("num_gpus", 0) > 0 for d in gpu["deployments"][:-1])
    # Same app and resources; only artifact paths differ (the PVC mount).
    assert gpu["deployments"] == rs["deployments"] and gpu["import_path"] == rs["import_path"]
    assert {k: v for k, v in gpu["args"].items() if k not in ("checkpoint", "index_dir")} == \
        {k: v for k, v in rs["args"].items() if k not in ("checkpoint", "index_dir")}
    spec = yaml.safe_load((ROOT / "serve" / "rayservice.yaml").read_text())["spec"]["rayClusterConfig"]
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    (group,) = spec["workerGroupSpecs"]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] >= 1 and group["maxReplicas"] == 8
