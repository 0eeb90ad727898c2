"""Serving faults for ``bench/chaos.py``: replicas killed under locust load, autoscaling, a schemathesis run.

One Serve app (``chaos``: micro checkpoint, 2-shard index of the tiny corpus's ids, random vectors:
here the service's behaviour counts, not its retrieval quality) on 127.0.0.1, with the shipped
configs' 2 replicas of every deployment. A locust run (headless, bounded; its users retry a 5xx as
``dialclip query`` does) sends valid dialogs while one replica process is SIGKILLed, or while the
index is hot-swapped; the log of every request gives the server's 5xx, the requests lost after the
client's retries, and the time until every request was answered in full again.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from dialclip_ray.pipelines.chaos import Scenario, micro_checkpoint, prepared_corpus
from dialclip_ray.serving.loopback import free_port
from dialclip_ray.serving.loadtest import read_log, start_locust, stop_locust, summarize

APP = "chaos"
LIMITS = {"shard_timeout_s": 3.0, "encoder_timeout_s": 10.0, "cooloff_s": 1.0, "encoder_cpus": 0.25,
          "shard_cpus": 0.1, "ingress_cpus": 0.1}


TOKEN = "chaos-admin-token-0123456789"
TWO = {"min_replicas": 2, "max_replicas": 2}  # the shipped configs' replica counts, fixed for the run
SHIPPED = {"encoder_autoscaling": TWO, "shard_autoscaling": {**TWO, "target_ongoing_requests": 2},
           "ingress_autoscaling": TWO}


def random_index(work: Path, corpus, ckpt: Path, versions: tuple[str, ...] = ()) -> Path:
    """A 2-shard flat index of every corpus image and text id (random unit vectors of the model's size).

    With ``versions``: a version root holding one index per tag (different vectors; every row's
    metadata says its tag, so an answer mixing versions shows), the first one CURRENT."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from dialclip_ray.data.schema import read_meta
    from dialclip_ray.index.layout import checkpoint_identity, write_index
    from dialclip_ray.model.backbone import backbone_geometry

    out = work / ("index_versions" if versions else "index")
    if (out / ("CURRENT" if versions else "index.json")).exists():
        return out
    dim = backbone_geometry("dialclip-micro").embed_dim
    rng = np.random.default_rng(0)
    dirs = [corpus.photochat, corpus.mmdialog]
    images = list(dict.fromkeys(i for d in dirs for i in pq.read_table(d / "images.parquet").column("image_id").to_pylist()))
    texts = [t for d in dirs for t in pq.read_table(d / "texts.parquet").column("text_id").to_pylist()]

    def vectors(n: int) -> np.ndarray:
        v = rng.standard_normal((n, dim)).astype(np.float32)
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    corpora = [{"dir": str(d), "source": read_meta(d)["source"]} for d in dirs]
    for tag in versions or (None,):
        meta = (lambda key, ids: pa.Table.from_pylist([{key: i, **({"version": tag} if tag else {})} for i in ids]))
        mods = {"image": (images, vectors(len(images)), meta("path", images)),
                "text": (texts, vectors(len(texts)), meta("text", texts))}
        layout = write_index(out, mods, checkpoint_identity(ckpt), shards=2, corpora=corpora, versioned=bool(tag))
        if tag:
            (out / f"TAG-{tag}").write_text(layout.index_id)  # the chaos run's own note of which id is which tag
    return out


def start_app(work: Path, versions: tuple[str, ...] = (), **overrides) -> str:
    """Serve the chaos app on a free loopback port (or the running proxy's); returns its base URL."""
    import httpx
    from ray import serve
    from ray.serve.context import _get_global_client

    from dialclip_ray.serving.app import build_app

    corpus = prepared_corpus(work.parent / "train_corpus")
    ckpt = micro_checkpoint(work.parent / "serve_artifacts")
    index = random_index(work.parent / "serve_artifacts", corpus, ckpt, versions)
    try:
        port = _get_global_client().http_config.port
    except Exception:
        port = free_port()
        # HeadOnly: on a several-node cluster of one machine, a proxy per node would fight over the port
        serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
    serve.run(build_app({"checkpoint": str(ckpt), "index_dir": str(index), **LIMITS, **overrides}),
              name=APP, route_prefix=f"/{APP}")
    url = f"http://127.0.0.1:{port}"
    body = {"context": [{"speaker": 0, "text": "hello there"}], "k": 3}
    for _ in range(60):  # the first request loads lazily
        if httpx.post(f"{url}/{APP}/v1/retrieve", json=body, timeout=30).status_code == 200:
            return url
        time.sleep(1)
    raise RuntimeError("the chaos app did not answer within 60 s")


def replicas() -> dict[str, dict]:
    """``{replica actor name: {"deployment", "pid"}}`` of the chaos app's live replicas (Ray's state API)."""
    import ray
    from ray.util.state import list_actors

    prefix = f"SERVE_REPLICA::{APP}#"
    address = ray.get_runtime_context().gcs_address
    return {a["name"]: {"deployment": a["name"].removeprefix(prefix).split("#")[0], "pid": a["pid"]}
            for a in list_actors(address=address, filters=[("state", "=", "ALIVE")], limit=1000)
            if (a.get("name") or "").startswith(prefix)}


def _fill_row(row: Scenario, s: dict, **detail) -> None:
    """A serving row's request counts from ``summarize``; the rest of the summary and ``detail`` go to detail."""
    row.requests_sent, row.requests_5xx, row.requests_failed = s["requests_sent"], s["requests_5xx"], s["requests_failed"]
    row.requests_lost, row.recovery_s = s["requests_lost"], s.get("recovery_s")
    row.detail.update({k: v for k, v in s.items() if k not in ("requests_sent", "requests_5xx", "requests_failed",
                                                               "requests_lost", "recovery_s")}, **detail)


def kill_under_load(deployment: str, seconds: int = 40, users: int = 4, retries: int = 3):
    """The shipped replica counts (2 of everything); locust for ``seconds`` s with client retries; at 1/4
    of it, SIGKILL one of ``deployment``'s replica processes; the row from the request log."""

    def scenario(row: Scenario, work: Path) -> None:
        import os
        import signal

        url = start_app(work, **SHIPPED)
        log = work / "requests.jsonl"
        log.unlink(missing_ok=True)
        before = replicas()
        proc = start_locust(url, log, users=users, seconds=seconds, path=f"/{APP}", timeout_s=30, retries=retries)
        time.sleep(seconds / 4)
        victim = next(name for name, r in before.items() if r["deployment"] == deployment)
        fault_t = time.time()
        os.kill(before[victim]["pid"], signal.SIGKILL)
        stop_locust(proc, timeout_s=seconds + 90)
        rows = read_log(log)
        s = summarize(rows, fault_t)
        after = replicas()
        replaced = (sorted(r["deployment"] for r in after.values()) == sorted(r["deployment"] for r in before.values())
                    and victim not in after)
        _fill_row(row, s, victim=deployment, replicas=sum(r["deployment"] == deployment for r in before.values()),
                  replaced=replaced, users=users, seconds=seconds, client_retries=retries, signal="SIGKILL")
        # survived: Serve replaced the replica, nothing hung and no request was lost (the target)
        row.survived = replaced and s["requests_no_answer"] == 0 and s["requests_lost"] == 0

    return scenario


def hot_swap_under_load(row: Scenario, work: Path, seconds: int = 30, users: int = 4) -> None:
    """Locust (no client retries) against a version root; at 1/3 of the run, POST /admin/index switches to
    version v2. Target: no failed request, and every answer wholly from the version it names."""
    import httpx

    url = start_app(work, versions=("v1", "v2"), admin_token=TOKEN, index_poll_s=0.5, **SHIPPED)
    root = work.parent / "serve_artifacts" / "index_versions"
    ids = {tag: (root / f"TAG-{tag}").read_text() for tag in ("v1", "v2")}
    log = work / "requests.jsonl"
    log.unlink(missing_ok=True)
    proc = start_locust(url, log, users=users, seconds=seconds, path=f"/{APP}", timeout_s=30)
    time.sleep(seconds / 3)
    swap_t = time.time()
    r = httpx.post(f"{url}/{APP}/admin/index", json={"version": ids["v2"]},
                   headers={"authorization": f"Bearer {TOKEN}"}, timeout=120)
    swap_s = time.time() - swap_t
    stop_locust(proc, timeout_s=seconds + 60)
    rows = read_log(log)
    s = summarize(rows, swap_t)
    tag_of = {v: k for k, v in ids.items()}
    mixed = [x for x in rows if x["status"] == 200 and x["hit_versions"] != [tag_of.get(x["index_version"])]]
    seen = [tag_of.get(x["index_version"]) for x in sorted(rows, key=lambda x: x["t"]) if x["status"] == 200]
    after = [tag_of.get(x["index_version"]) for x in rows if x["status"] == 200 and x["t"] > swap_t + swap_s + 2]
    _fill_row(row, s, swap_status=r.status_code, swap_answer=r.json(), swap_seconds=round(swap_s, 2),
              answers_mixing_versions=len(mixed), answers_by_version={t: seen.count(t) for t in ("v1", "v2")},
              v1_after_swap_plus_2s=after.count("v1"), users=users, seconds=seconds)
    row.survived = (r.status_code == 200 and s["requests_lost"] == 0 and s["requests_5xx"] == 0 and not mixed
                    and "v1" in seen and seen[-1] == "v2" and after.count("v1") == 0)


def autoscaling(row: Scenario, work: Path, out_png: Path | None = None) -> None:
    """8 locust users for 45 s against 1-replica deployments that may grow to 2: they scale up under the
    load and back down after it; replicas and p99 over time are plotted."""
    from ray import serve

    scale = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1, "upscale_delay_s": 2,
             "downscale_delay_s": 8}
    url = start_app(work, shard_autoscaling=scale, shard_max_ongoing_requests=4, encoder_autoscaling=scale)
    log = work / "requests.jsonl"
    log.unlink(missing_ok=True)
    seconds, t0 = 45, time.time()
    proc = start_locust(url, log, users=8, seconds=seconds, path=f"/{APP}", timeout_s=15, wait_s=0.0)
    timeline = []
    while time.time() - t0 < seconds + 40:
        status = serve.status().applications[APP].deployments
        timeline.append({"t": round(time.time() - t0, 1),
                         **{name: sum(n for state, n in d.replica_states.items() if str(state).endswith("RUNNING"))
                            for name, d in status.items()}})
        time.sleep(1.0)
    stop_locust(proc, timeout_s=30)
    rows = read_log(log)
    s = summarize(rows)
    peak = {name: max(p.get(name) or 0 for p in timeline) for name in timeline[0] if name != "t"}
    final = {name: timeline[-1].get(name) for name in peak}
    _fill_row(row, s, peak_replicas=peak, final_replicas=final, config=scale, timeline=timeline)
    scaled_up = peak.get("QueryEncoder", 0) >= 2 or any(peak.get(f"Shard{i}", 0) >= 2 for i in range(2))
    scaled_down = all((final.get(n) or 0) <= 1 for n in peak if n.startswith(("Shard", "QueryEncoder")))
    row.detail.update(scaled_up=scaled_up, scaled_down=scaled_down)
    row.survived = scaled_up and scaled_down and s["requests_5xx"] == 0
    if out_png is not None:
        plot_autoscaling(timeline, rows, t0, out_png)


def plot_autoscaling(timeline: list[dict], rows: list[dict], t0: float, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 5.5), sharex=True)
    for name in [n for n in timeline[0] if n != "t"]:
        top.step([p["t"] for p in timeline], [p.get(name) or 0 for p in timeline], where="post", label=name)
    top.set_ylabel("replicas")
    top.legend(fontsize=8)
    window = 5.0
    ends = np.arange(window, max(p["t"] for p in timeline) + window, window)
    p99 = [np.percentile([r["ms"] for r in rows if e - window <= r["t"] - t0 < e] or [np.nan], 99) for e in ends]
    bottom.plot(ends - window / 2, p99, marker="o")
    bottom.set_ylabel("p99 latency (ms), 5 s windows")
    bottom.set_xlabel("seconds since the load started (load ends at 45 s)")
    fig.suptitle("Serve autoscaling under locust load (8 users, 2 CPUs)")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def schemathesis_run(row: Scenario, work: Path, examples: int = 60) -> None:
    """schemathesis against the live /openapi.json: no 5xx, responses and status codes as documented."""
    url = start_app(work)
    har = work / "schemathesis.har"
    cmd = [str(Path(sys.executable).with_name("schemathesis")), "run", f"{url}/{APP}/openapi.json",
           "--url", f"{url}/{APP}", "--checks", "not_a_server_error,response_schema_conformance,status_code_conformance",
           "-n", str(examples), "--request-timeout", "30", "--phases", "examples,fuzzing",
           "--report", "har", "--report-har-path", str(har), "--seed", "1", "--continue-on-failure"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    entries = json.loads(har.read_text())["log"]["entries"] if har.exists() else []
    statuses = [e["response"]["status"] for e in entries]
    row.requests_sent = len(statuses)
    row.requests_5xx = sum(500 <= s < 600 for s in statuses)
    row.requests_failed = row.requests_5xx
    # The one 5xx the API documents for a well-formed request: 503 when the shards miss the request's own
    # ``timeout_ms`` (schemathesis likes timeout_ms: 1). Any other 5xx is a failure.
    own_deadline = [e for e in entries if e["response"]["status"] == 503 and
                    "timeout_ms" in json.loads(e["request"].get("postData", {}).get("text") or "{}")]
    unexplained = row.requests_5xx - len(own_deadline)
    row.detail.update(exit_code=proc.returncode, status_counts={str(s): statuses.count(s) for s in sorted(set(statuses))},
                      own_deadline_503=len(own_deadline), unexplained_5xx=unexplained, output_tail=proc.stdout[-1500:])
    row.survived = unexplained == 0 and row.requests_sent > 0
