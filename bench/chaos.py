"""Chaos run: inject every fault of the fault issue into the real system and record what survived.

    python bench/chaos.py                     # every scenario (about 15-25 minutes on 2 cores)
    python bench/chaos.py --only serve,fuzz   # some scenarios or kinds; rows of the others are kept

Writes bench/results/chaos.json ({"scenarios": [...]}: name, kind, injected, survived, requests_sent,
requests_5xx, requests_failed, recovery_s, data_lost, plus seconds and detail), chaos.md (the table)
and chaos_autoscale.png. Scenario code: dialclip_ray/pipelines/chaos*.py. Traffic goes to 127.0.0.1
only; every load and fuzz run is bounded in time and count.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from dialclip_ray.pipelines import chaos as C  # noqa: E402
from dialclip_ray.pipelines import chaos_serve as S  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def no_ray_scenarios(run: C.ChaosRun, kills: int) -> None:
    run("data_prepare_photochat_sigkill", "data", f"SIGKILL `dialclip data prepare` (PhotoChat) at {kills} random "
        "points while it replaces a good dataset", C.data_prepare_sigkill("photochat", kills))
    run("data_prepare_mmdialog_sigkill", "data", f"SIGKILL the streaming MMDialog converter (2 processes) at "
        f"{kills} random points while it replaces a good dataset", C.data_prepare_sigkill("mmdialog", kills))
    run("checkpoint_save_sigkill", "data", "SIGKILL a process saving checkpoints back to back, 8 times",
        C.checkpoint_save_sigkill)


RAY_SCENARIOS = ("index_build_sigkill", "train_worker_killed_mid_epoch", "train_driver_sigkill", "tune_driver_sigkill",
                 "train_corrupt_checkpoint", "serve_kill_shard_replica", "serve_kill_encoder_replica",
                 "serve_kill_ingress_replica", "serve_hot_swap", "serve_autoscaling", "fuzz_schemathesis")


def ray_scenarios(run: C.ChaosRun, png: Path) -> None:
    run("index_build_sigkill", "data", "SIGKILL `dialclip index build --overwrite` at 3 random points",
        C.index_build_sigkill)
    run("train_worker_killed_mid_epoch", "train", "SIGKILL Ray Train worker rank 0 at batch 5 of epoch 1 "
        "(step checkpoints every 2 steps)", C.train_worker_kill)
    run("train_driver_sigkill", "train", "SIGKILL `dialclip train`'s driver after epoch 2 of 4, then rerun",
        C.train_driver_kill)
    run("tune_driver_sigkill", "train", "SIGKILL `dialclip tune`'s driver mid-sweep (3 trials x 3 epochs), then rerun",
        C.tune_driver_kill)
    run("train_corrupt_checkpoint", "train", "truncate the newest checkpoint's weights, then resume",
        C.corrupt_checkpoint)
    for name, deployment in (("serve_kill_shard_replica", "Shard1"), ("serve_kill_encoder_replica", "QueryEncoder"),
                             ("serve_kill_ingress_replica", "RetrievalIngress")):
        run(name, "serve", f"SIGKILL one of 2 {deployment} replicas under locust load (4 users, client retries "
            "as `dialclip query`: 3, backoff + Retry-After)", S.kill_under_load(deployment))
    run("serve_hot_swap", "serve", "POST /admin/index to a new index version under locust load (4 users, no "
        "client retries); every answer checked against the version it names", S.hot_swap_under_load)
    run("serve_autoscaling", "serve", "8 locust users for 45 s against autoscaled (1..2) encoder and shards",
        lambda row, work: S.autoscaling(row, work, png))
    run("fuzz_schemathesis", "fuzz", "schemathesis (examples and fuzzing phases, 60 examples) against the live "
        "/openapi.json", S.schemathesis_run)


def cluster_scenarios(run: C.ChaosRun) -> None:
    from dialclip_ray.pipelines import chaos_cluster as M

    wanted = [n for n in ("multinode_train_node_removed", "multinode_evaluate", "multinode_serve_shard_node_removed")
              if not run.only or n in run.only or "multinode" in run.only]
    if not wanted:
        return
    with M.LocalCluster() as cluster:
        run("multinode_train_node_removed", "multinode", "2 workers SPREAD over 2 of 3 nodes; a worker node "
            "holding one of them removed mid-run", M.train_node_removed(cluster))
        run("multinode_evaluate", "multinode", "Ray Data evaluation (2 encoder actors) on the several-node cluster vs "
            "one process", M.evaluate_across_nodes)
        run("multinode_serve_shard_node_removed", "multinode", "Shard1 pinned to node_b; node_b removed, then a "
            "node offering node_b added", M.serve_shard_node_removed(cluster))


def write(rows: list[dict], out: Path, work: Path) -> None:
    rows = json.loads(json.dumps(rows, default=str).replace(str(work), "<work>").replace(str(Path.cwd()), "<repo>"))
    previous = json.loads(out.with_suffix(".json").read_text())["scenarios"] if out.with_suffix(".json").exists() else []
    names = {r["name"] for r in rows}
    merged = [r for r in previous if r["name"] not in names] + rows
    out.with_suffix(".json").write_text(json.dumps({"scenarios": merged}, indent=2, default=str) + "\n")
    cols = ("name", "kind", "survived", "requests_sent", "requests_5xx", "requests_lost", "requests_failed",
            "recovery_s", "data_lost")
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c)) for c in cols) + " |" for r in merged]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="comma list of scenario names or kinds")
    ap.add_argument("--kills", type=int, default=5, help="random SIGKILLs per data-writing command")
    ap.add_argument("--work", default=None, help="scratch dir (default: a new temp dir)")
    ap.add_argument("--out", default=str(RESULTS / "chaos"))
    args = ap.parse_args(argv)
    import ray

    work = Path(args.work or tempfile.mkdtemp(prefix="dialclip-chaos-"))
    run = C.ChaosRun(work, {x for x in args.only.split(",") if x} or None)
    out = Path(args.out)
    no_ray_scenarios(run, args.kills)
    kinds = {"data": ("index_build_sigkill",), "train": RAY_SCENARIOS[1:5], "serve": RAY_SCENARIOS[5:10],
             "fuzz": RAY_SCENARIOS[10:]}
    wanted = not run.only or any(n in run.only or any(n in kinds.get(o, ()) for o in run.only) for n in RAY_SCENARIOS)
    if wanted:  # the local Ray cluster only when a selected scenario needs it
        ray.init(num_cpus=4, include_dashboard=True, log_to_driver=False,
                 logging_config=ray.LoggingConfig(log_level="ERROR"),
                 runtime_env={"env_vars": {"RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"}})
        try:
            ray_scenarios(run, out.with_name(out.name + "_autoscale.png"))
        finally:
            try:
                from ray import serve

                serve.shutdown()
            except Exception:
                pass
            ray.shutdown()
    cluster_scenarios(run)
    return finish(run, out, work)


def finish(run: C.ChaosRun, out: Path, work: Path) -> int:
    rows = run.as_json()["scenarios"]
    write(rows, out, work)
    bad = [r["name"] for r in rows if not r["survived"]]
    print(f"wrote {out.with_suffix('.json').relative_to(Path.cwd()) if out.is_relative_to(Path.cwd()) else out}: "
          f"{len(rows) - len(bad)}/{len(rows)} survived" + (f"; not survived: {', '.join(bad)}" if bad else ""))
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
