"""GPU for every stage, requested not inspected: Ray Data pools and Tune trials on a simulated GPU cluster.

The Ray Data check runs in a subprocess (``pipelines.placement``): it starts its own several-node
``ray.cluster_utils.Cluster``, so it cannot collide with the session's Ray fixture.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml


def test_actor_pool_requests_what_it_is_told():
    from ray.data import ActorPoolStrategy

    from dialclip_ray.runtime import actor_pool

    gpu = actor_pool(3, 0.5)
    assert isinstance(gpu["compute"], ActorPoolStrategy) and gpu["num_gpus"] == 0.5 and gpu["num_cpus"] == 0.25
    cpu = actor_pool(2, 0)
    assert cpu["num_gpus"] is None and cpu["num_cpus"] == 0.5
    with pytest.raises(ValueError):
        actor_pool(0)


@pytest.mark.slow
def test_ray_data_pools_ask_for_gpus_on_a_gpu_cluster(tiny_corpus, tmp_path):
    out = tmp_path / "placement.json"
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([sys.executable, "-m", "dialclip_ray.pipelines.placement", str(tiny_corpus.photochat),
                           str(out)], env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    for stage, gpus in (("features", 1.0), ("evaluate", 0.5)):
        actors = result[stage]
        assert len(actors) == 2, (stage, actors)
        assert all(a["required"].get("GPU") == gpus for a in actors), (stage, actors)
        placed = {a["node_id"] for a in actors if a["node_id"]}  # an actor Ray Data never needed has no node
        assert placed and placed <= set(result["gpu_nodes"]), "an encoder landed on the CPU head"


def test_sweep_trials_reserve_no_gpu_and_take_use_gpu_from_the_base(tmp_path, tiny_corpus, monkeypatch):
    """What run_sweep hands Tune: trial resources without a GPU; use_gpu from the base unless overridden."""
    from ray import tune

    from dialclip_ray.tuning import sweep

    base = {"model": {"preset": "default", "backbone": {"model_name": "dialclip-micro"}, "context_prompt_length": 0},
            "data": {"train": [str(tiny_corpus.photochat)], "features": "off"},
            "run": {"workers": 2, "use_gpu": True}}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(
        {"base_config": "base.yaml", "search": "random", "samples": 6, "max_concurrent": 4, "epochs": 1,
         "params": {"lr": {"loguniform": [1e-4, 1e-2]}}}))
    seen = []

    class Stop(Exception):
        pass

    def with_parameters(fn, **kwargs):
        seen.append(kwargs)
        return fn

    def with_resources(fn, resources):
        seen[-1]["resources"] = resources
        raise Stop

    monkeypatch.setattr(sweep, "ensure_ray", lambda **kw: None)
    monkeypatch.setattr(tune, "with_parameters", with_parameters)
    monkeypatch.setattr(tune, "with_resources", with_resources)
    for override, expected in ((None, True), (False, False), (True, True)):
        with pytest.raises(Stop):
            sweep.run_sweep(tmp_path / "space.yaml", "s", tmp_path / "runs", use_gpu=override)
        assert seen[-1]["use_gpu"] is expected
        assert seen[-1]["resources"] == {"cpu": 0.5, "gpu": 0}, "a trial's driver must not hold a GPU"
    assert sweep.trial_use_gpu(False, None) is False and sweep.trial_use_gpu(False, True) is True
