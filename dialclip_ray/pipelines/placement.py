"""Where the GPU stages land: Ray Data encoder pools on a simulated several-node GPU cluster.

A ``ray.cluster_utils.Cluster`` of a CPU-only head and two nodes that declare one GPU each (no
CUDA behind them: the actors still run their work on CPU). The feature-store build and the
distributed evaluation are run with ``gpus_per_actor=1``; what each pool *asked for* is read
back from Ray's actor table (the State API): the resources every encoder actor required and the
node it was placed on. Run in its own process (it starts its own cluster), e.g. by the tests.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path


def _encoder_actors() -> list[dict]:
    import ray
    from ray.util.state import list_actors

    address = ray.get_runtime_context().gcs_address  # this cluster, even where another one runs on the host
    return [{"class_name": a.class_name, "node_id": a.node_id, "required": dict(a.required_resources or {})}
            for a in list_actors(address=address, detail=True, limit=1000) if "MapWorker" in (a.class_name or "")]


def gpu_placement(dataset_dir: str) -> dict:
    """Build a feature store and evaluate a checkpoint with GPU actors; return what was requested, where."""
    import ray
    from ray.cluster_utils import Cluster

    from dialclip_ray.evaluation.distributed import evaluate_with_ray
    from dialclip_ray.features.build import build_feature_store
    from dialclip_ray.model.checkpoint import save_checkpoint
    from dialclip_ray.model.config import BackboneConfig, preset
    from dialclip_ray.model.dialclip import build_model

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0, "include_dashboard": True})
    gpu_nodes = [cluster.add_node(num_cpus=2, num_gpus=1) for _ in range(2)]
    try:
        ray.init(address=cluster.address, logging_config=ray.LoggingConfig(log_level="ERROR"))
        cluster.wait_for_nodes()
        out: dict = {"gpu_nodes": sorted(n.node_id for n in gpu_nodes), "head": cluster.head_node.node_id}
        build_feature_store(dataset_dir, "dialclip-micro", None, actors=2, gpus_per_actor=1.0, force=True,
                            batch_size=64)
        out["features"] = _encoder_actors()
        cfg = preset("default", backbone=BackboneConfig(model_name="dialclip-micro"), context_prompt_length=0)
        model, _ = build_model(cfg)
        with tempfile.TemporaryDirectory() as tmp:
            save_checkpoint(model, tmp, extra={})
            evaluate_with_ray(tmp, dataset_dir, "test", actors=2, batch_size=64, max_examples=8,
                              features="off", gpus_per_actor=0.5)
        out["evaluate"] = [a for a in _encoder_actors() if a not in out["features"]]
        return out
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    result = gpu_placement(sys.argv[1])
    Path(sys.argv[2]).write_text(json.dumps(result, indent=2))
