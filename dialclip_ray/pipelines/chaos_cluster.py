"""Several nodes on one machine (``ray.cluster_utils.Cluster``) for ``bench/chaos.py``.

A head (1 CPU) and two worker nodes (2 CPUs each, custom resources ``node_a`` / ``node_b``) share this
machine's filesystem, which stands in for the shared filesystem a real cluster needs under
``storage_path`` (``runtime.check_shared_storage`` checks that every node sees it). Scenarios:
training with its two workers spread over two nodes, one of which is removed mid-run; Ray Data
evaluation over the cluster; the Serve app with its shards pinned to different nodes, the node
holding Shard1 removed (503 naming Shard1) and a node offering its resource added back.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from dialclip_ray.pipelines.chaos import Scenario, _catch, prepared_corpus, train_config


class LocalCluster:
    """Head + two worker nodes; the driver is connected for the lifetime of the ``with`` block."""

    def __enter__(self) -> "LocalCluster":
        import ray
        from ray.cluster_utils import Cluster

        if ray.is_initialized():
            ray.shutdown()
        self.cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"head": 1}})
        self.nodes = {"a": self.cluster.add_node(num_cpus=2, resources={"node_a": 1}),
                      "b": self.cluster.add_node(num_cpus=2, resources={"node_b": 1})}
        ray.init(address=self.cluster.address, logging_config=ray.LoggingConfig(log_level="ERROR"))
        self.cluster.wait_for_nodes()
        return self

    def node_id(self, key: str) -> str:
        return self.nodes[key].node_id

    def remove(self, key: str) -> None:
        self.cluster.remove_node(self.nodes.pop(key), allow_graceful=False)

    def add(self, key: str, **resources) -> None:
        self.nodes[key] = self.cluster.add_node(num_cpus=2, resources=resources)
        self.cluster.wait_for_nodes()

    def __exit__(self, *exc) -> None:
        import ray

        try:
            from ray import serve

            serve.shutdown()
        except Exception:
            pass
        ray.shutdown()
        self.cluster.shutdown()


def train_node_removed(cluster: LocalCluster):
    def scenario(row: Scenario, work: Path) -> None:
        from dialclip_ray.train.config import load_train_config
        from dialclip_ray.train.run import run_training

        corpus = prepared_corpus(work.parent / "train_corpus")
        cfg = load_train_config(train_config(work, corpus, "spread", 3, placement_strategy="SPREAD",
                                             checkpoint_every_steps=2, example_log=True, max_failures=3))
        log_dir = work / "runs" / "spread" / "example_log"
        result, errors = {}, []
        thread = threading.Thread(target=lambda: _catch(errors, lambda: result.update(run=run_training(cfg))))
        thread.start()
        removed_t, t0, nodes_before, victim = None, time.time(), set(), None
        workers = {cluster.node_id(k): k for k in cluster.nodes}  # the worker nodes (the head cannot go)
        while thread.is_alive() and removed_t is None and time.time() - t0 < 300:
            rows = _rows(log_dir)
            nodes_before = {r["node"] for r in rows}
            hit = [workers[n] for n in nodes_before if n in workers]
            if hit and any(r["step"] >= 5 for r in rows):
                victim = hit[0]
                cluster.remove(victim)
                removed_t = time.time()
            time.sleep(0.05)
        thread.join(timeout=600)
        if errors:
            raise errors[0]
        rows = _rows(log_dir)
        old_pids = {r["pid"] for r in rows if removed_t and r["t"] <= removed_t}
        after = [r for r in rows if removed_t and r["t"] > removed_t and r["pid"] not in old_pids]  # the new group
        row.recovery_s = round(after[0]["t"] - removed_t, 1) if after else None
        row.detail.update(nodes_used_before=len(nodes_before), spread_over_two_nodes=len(nodes_before) >= 2,
                          removed_node=victim, nodes_used_after=len({r["node"] for r in after}),
                          epochs=[h["epoch"] for h in result["run"].history])
        row.survived = bool(removed_t) and len(result["run"].history) == 3 and len(nodes_before) >= 2

    return scenario


def _rows(log_dir: Path) -> list[dict]:
    rows = []
    for f in sorted(log_dir.glob("rank*.jsonl")) if log_dir.exists() else []:
        rows += [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
    return sorted(rows, key=lambda r: r["t"])


def evaluate_across_nodes(row: Scenario, work: Path) -> None:
    """Ray Data evaluation on the several-node cluster equals the single-process evaluation."""
    from dialclip_ray.data.dataset import CanonicalDataset
    from dialclip_ray.evaluation.distributed import evaluate_with_ray
    from dialclip_ray.evaluation.local import evaluate_model
    from dialclip_ray.model.checkpoint import load_checkpoint
    from dialclip_ray.pipelines.chaos import micro_checkpoint

    corpus = prepared_corpus(work.parent / "train_corpus")
    ckpt = micro_checkpoint(work.parent / "serve_artifacts")
    model, backbone, _ = load_checkpoint(ckpt)
    diffs = []
    for data in (corpus.photochat, corpus.mmdialog):
        local = evaluate_model(model, backbone, CanonicalDataset.load(data), "test", batch_size=16)
        dist = evaluate_with_ray(ckpt, data, "test", actors=2, batch_size=8)
        diffs += [abs(dist["per_type"][t][k] - v) for t, m in local["per_type"].items() for k, v in m.items()]
    row.detail.update(max_abs_diff=max(diffs), metrics_compared=len(diffs))
    row.survived = max(diffs) < 1e-6


def serve_shard_node_removed(cluster: LocalCluster):
    """Shard0 on node_a, Shard1 on node_b; node_b removed -> 503 naming Shard1; a node offering node_b
    added back -> Serve places Shard1 there and full answers return."""

    def scenario(row: Scenario, work: Path) -> None:
        import httpx

        from dialclip_ray.pipelines.chaos_serve import APP, start_app

        for key in ("a", "b"):  # an earlier scenario may have removed one: shards need both
            if key not in cluster.nodes:
                cluster.add(key, **{f"node_{key}": 1})
        url = start_app(work, shard_resources={0: {"node_a": 0.01}, 1: {"node_b": 0.01}})
        body = {"context": [{"speaker": 0, "text": "a dog on the beach"}], "k": 3}
        retrieve = lambda: httpx.post(f"{url}/{APP}/v1/retrieve", json=body, timeout=30)  # noqa: E731
        assert retrieve().status_code == 200
        cluster.remove("b")
        removed_t = time.time()
        answers = []
        while time.time() - removed_t < 60:
            r = retrieve()
            answers.append((round(time.time() - removed_t, 1), r.status_code, r.json().get("missing_shards")))
            if r.status_code == 503 and "Shard1" in (r.json().get("missing_shards") or []):
                break
            time.sleep(0.5)
        named = any(s == 503 and m == ["Shard1"] for _, s, m in answers)
        cluster.add("b2", node_b=1)
        added_t = time.time()
        recovered = None
        while time.time() - added_t < 120:
            r = retrieve()
            answers.append((round(time.time() - removed_t, 1), r.status_code, r.json().get("missing_shards")))
            if r.status_code == 200 and not r.json().get("partial"):
                recovered = time.time() - added_t
                break
            time.sleep(1.0)
        codes = [s for _, s, _ in answers]
        row.requests_sent = len(answers)
        row.requests_5xx = sum(500 <= s < 600 for s in codes)
        row.requests_failed = sum(s != 200 for s in codes)
        row.recovery_s = round(recovered, 1) if recovered is not None else None
        row.detail.update(first_answers=answers[:6], last_answers=answers[-3:], shard1_named_in_503=named,
                          non_503_5xx=sum(500 <= s < 600 and s != 503 for s in codes))
        row.survived = named and recovered is not None and row.detail["non_503_5xx"] == 0

    return scenario
