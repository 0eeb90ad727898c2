"""Production serving over real HTTP on 127.0.0.1: batch endpoint, per-request nprobe, readiness, retries
when an encoder replica is SIGKILLed under load, a hot index swap under load, and Ray's Prometheus export.

One app (``prod``) serves a version root holding two IVF versions of the same ids (random vectors; the
versions differ in their vectors and in a ``version`` metadata column, so an answer that mixed them would
show). The QueryEncoder runs 2 replicas (one is killed), each shard 1 (so killing it makes /readyz 503).
Tests run in file order: the metrics test at the end finds what the others caused.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from contextlib import contextmanager

import faiss
import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from checkpoint_support import make_checkpoint  # noqa: E402
from serve_support import serve_port  # noqa: E402

pytestmark = pytest.mark.slow
APP = "prod"
TOKEN = "test-admin-token-0123456789"
OK = {"context": [{"speaker": 0, "text": "a photo of the beach"}], "current": "", "k": 5}


def replicas_of(deployment: str) -> list[dict]:
    """Live replica actors of one deployment of the app (name, pid), from Ray's state API."""
    import ray
    from ray.util.state import list_actors

    prefix = f"SERVE_REPLICA::{APP}#{deployment}#"
    address = ray.get_runtime_context().gcs_address  # this cluster, even where another one runs on the host
    return [a for a in list_actors(address=address, filters=[("state", "=", "ALIVE")], limit=1000)
            if (a.get("name") or "").startswith(prefix)]


@pytest.fixture(scope="module")
def versions(tmp_path_factory, tiny_corpus):
    """A checkpoint and a version root with versions v1 (CURRENT) and v2 (built later, not served)."""
    from dialclip_ray.data.schema import read_meta
    from dialclip_ray.index.layout import checkpoint_identity, write_index
    from dialclip_ray.model.backbone import backbone_geometry

    tmp = tmp_path_factory.mktemp("serving_prod")
    ckpt = make_checkpoint(tmp, 0)
    dim = backbone_geometry("dialclip-micro").embed_dim
    dirs = [tiny_corpus.photochat, tiny_corpus.mmdialog]
    image_ids, text_ids = [], []
    for d in dirs:
        image_ids += [i for i in pq.read_table(d / "images.parquet").column("image_id").to_pylist()
                      if i not in image_ids]
        text_ids += pq.read_table(d / "texts.parquet").column("text_id").to_pylist()
    corpora = [{"dir": str(d), "source": read_meta(d)["source"]} for d in dirs]
    out = {"ckpt": ckpt, "root": tmp / "index", "vectors": {}, "ids": image_ids}
    for seed, tag in ((0, "v1"), (1, "v2")):
        rng = np.random.default_rng(seed)
        mods = {}
        for target, ids in (("image", image_ids), ("text", text_ids)):
            v = rng.standard_normal((len(ids), dim)).astype(np.float32)
            mods[target] = (ids, v, pa.Table.from_pylist([{"version": tag} for _ in ids]))
        layout = write_index(out["root"], mods, checkpoint_identity(ckpt), shards=2, kind="ivf",
                             params={"nlist": 4, "nprobe": 1}, corpora=corpora, versioned=True)
        out[tag] = layout.index_id
        out["vectors"][tag] = mods["image"][1]
    return out


@pytest.fixture(scope="module")
def base_url(ray_cluster, versions) -> str:
    from ray import serve

    from dialclip_ray.serving.app import build_app

    port = serve_port()
    args = {"checkpoint": str(versions["ckpt"]), "index_dir": str(versions["root"]), "admin_token": TOKEN,
            "cooloff_s": 1.0, "ready_timeout_s": 1.0, "index_poll_s": 0.5, "shard_timeout_s": 3.0,
            "encoder_autoscaling": {"min_replicas": 2, "max_replicas": 2},
            "shard_autoscaling": {"min_replicas": 1, "max_replicas": 1}}
    serve.run(build_app(args), name=APP, route_prefix=f"/{APP}")
    url = f"http://127.0.0.1:{port}/{APP}"
    r = httpx.post(f"{url}/v1/retrieve", json=OK, timeout=60)
    assert r.status_code == 200, r.text
    yield url
    serve.delete(APP)


@pytest.fixture(scope="module")
def client(base_url):
    with httpx.Client(base_url=base_url, timeout=30) as c:
        yield c


def test_batch_endpoint_equals_single_calls(client, versions):
    bodies = [OK, {**OK, "k": 3, "target": "text"}, {**OK, "current": "and the dog", "nprobe": 4},
              {"context": [{"speaker": 1, "text": "look", "images": [{"id": versions["ids"][0]}]}], "k": 7},
              {"context": [{"speaker": 0, "images": [{"id": "no-such-image"}]}]}]
    r = client.post("/v1/retrieve/batch", json={"requests": bodies})
    assert r.status_code == 200, r.text
    batch = r.json()
    assert len(batch["responses"]) == len(bodies) and batch["index_version"] == versions["v1"]
    for body, item in zip(bodies, batch["responses"]):
        single = client.post("/v1/retrieve", json=body)
        assert item["status"] == single.status_code
        if single.status_code == 200:
            got, want = item["response"], single.json()
            assert [h["id"] for h in got["hits"]] == [h["id"] for h in want["hits"]]
            np.testing.assert_allclose([h["score"] for h in got["hits"]], [h["score"] for h in want["hits"]],
                                       atol=1e-5)
            assert got["index_version"] == want["index_version"] == versions["v1"]
        else:
            assert item["error"]["error"] == single.json()["error"] and "unknown corpus image id" in item["error"]["error"]
    for body, fragment in (({"requests": []}, "requests: List should have at least 1 item"),
                           ({"requests": [OK] * 17}, "requests: List should have at most 16 items"),
                           ({"requests": [OK, {**OK, "k": 0}]}, "requests.1.k: Input should be greater than")):
        r = client.post("/v1/retrieve/batch", json=body)
        assert r.status_code == 422 and fragment in r.json()["error"], r.text


def test_per_request_nprobe_over_http(client, versions):
    """nprobe = nlist is exact search (FAISS's IndexFlatIP over the same vectors); bounds come from the index."""
    from dialclip_ray.serving.dialogs import DialogEncoder
    from dialclip_ray.serving.schemas import RetrieveRequest

    encoder = DialogEncoder(str(versions["ckpt"]), [])  # text-only dialogs: no corpus images needed
    flat = faiss.IndexFlatIP(versions["vectors"]["v1"].shape[1])
    x = versions["vectors"]["v1"].copy()
    faiss.normalize_L2(x)
    flat.add(x)
    body = {**OK, "k": 10}
    (enc,) = encoder.encode([RetrieveRequest.model_validate(body)])
    _, exact = flat.search(enc["embedding"][None].astype(np.float32), 10)
    exact_ids = [versions["ids"][i] for i in exact[0]]
    full = client.post("/v1/retrieve", json={**body, "nprobe": 4}).json()
    assert [h["id"] for h in full["hits"]] == exact_ids
    low = client.post("/v1/retrieve", json={**body, "nprobe": 1}).json()
    assert len(set(h["id"] for h in low["hits"]) & set(exact_ids)) <= 10
    info = client.get("/v1/info").json()
    assert info["manifests"]["image"]["search"]["nprobe"] == {"default": 1, "min": 1, "max": 4}
    r = client.post("/v1/retrieve", json={**body, "nprobe": 5})
    assert r.status_code == 422 and "nprobe: 5 is outside the image index (ivf)'s bounds 1..4" in r.json()["error"]
    r = client.post("/v1/retrieve", json={**body, "ef_search": 5})
    assert r.status_code == 422 and "ef_search: the image index (ivf) has no ef_search knob" in r.json()["error"]
    r = client.post("/v1/retrieve", json={**body, "timeout_ms": 99})
    assert r.status_code == 422 and "timeout_ms" in r.json()["error"]
    assert client.post("/v1/retrieve", json={**body, "timeout_ms": 100}).status_code == 200


def test_readyz_names_a_dead_shard_until_it_is_replaced(client):
    import ray

    assert client.get("/healthz").json() == {"status": "ok"}
    r = client.get("/readyz")
    assert r.status_code == 200 and r.json()["status"] == "ready", r.text
    (victim,) = replicas_of("Shard1")
    ray.kill(ray.get_actor(victim["name"], namespace="serve"), no_restart=True)
    seen, deadline = [], time.time() + 60
    while time.time() < deadline:
        r = client.get("/readyz")
        seen.append(r.status_code)
        if r.status_code == 503:
            assert r.json()["missing_shards"] == ["Shard1"] and "Shard1" in r.json()["error"], r.text
            assert client.get("/healthz").status_code == 200  # alive, not ready
            partial = client.post("/v1/retrieve", json={**OK, "allow_partial": True})
            assert partial.status_code == 200, partial.text  # partial, or full once Serve replaced Shard1
        elif 503 in seen:
            break  # replaced: ready again
        time.sleep(0.3)
    assert 503 in seen and seen[-1] == 200, seen
    # Ready means served in full: /readyz's ping ended the cool-off that the partial requests started.
    r = client.post("/v1/retrieve", json=OK)
    assert r.status_code == 200 and not r.json().get("missing_shards"), r.text


@contextmanager
def under_load(url: str, users: int = 2):
    """``users`` client threads sending requests back to back while the block runs; yields their
    (status, body) list, complete once the block has ended."""
    stop, results = threading.Event(), []
    threads = [threading.Thread(target=run_load, args=(url, stop, results)) for _ in range(users)]
    for t in threads:
        t.start()
    try:
        yield results
    finally:
        stop.set()
        for t in threads:
            t.join(60)


def run_load(url: str, stop: threading.Event, results: list, limit: int = 2000, body: dict = OK) -> None:
    """One client thread: requests back to back until ``stop`` or ``limit`` (bounded), retrying nothing."""
    with httpx.Client(timeout=30) as c:
        while not stop.is_set() and len(results) < limit:
            r = c.post(f"{url}/v1/retrieve", json=body)
            results.append((r.status_code, r.json()))


def test_encoder_replica_sigkill_under_load_costs_no_5xx(base_url, client):
    """SIGKILL one of two QueryEncoder replicas while 2 clients send requests: the ingress retries the
    calls that hit the dead replica on the live one, so no request gets a 5xx."""
    # Shards must be back from the previous test before the load starts.
    deadline = time.time() + 60
    while client.get("/readyz").status_code != 200:
        assert time.time() < deadline, "app did not become ready"
        time.sleep(0.5)
    (victim, _survivor) = replicas_of("QueryEncoder")
    with under_load(base_url) as results:
        time.sleep(2.0)
        before = len(results)
        os.kill(victim["pid"], signal.SIGKILL)
        deadline = time.time() + 40
        while time.time() < deadline:  # until Serve has replaced it (or the bound)
            names = {a["name"] for a in replicas_of("QueryEncoder")}
            if len(names) == 2 and victim["name"] not in names:
                break
            time.sleep(0.5)
        time.sleep(1.0)
    codes = [c for c, _ in results]
    print(f"{len(codes)} requests ({len(codes) - before} after the kill); statuses {sorted(set(codes))}")
    assert len(codes) - before > 5 and set(codes) == {200}, [(c, b) for c, b in results if c != 200][:3]


def test_hot_swap_under_load_loses_nothing(base_url, client, versions):
    from dialclip_ray.index.layout import current_version

    r = client.post("/admin/index", json={"version": versions["v2"]}, headers={"authorization": "Bearer nope"})
    assert r.status_code == 401
    r = client.post("/admin/index", json={"version": "../x"}, headers={"authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 422 and "version" in r.json()["error"]
    with under_load(base_url) as results:
        time.sleep(1.5)
        r = client.post("/admin/index", json={"version": versions["v2"]}, headers={"authorization": f"Bearer {TOKEN}"},
                        timeout=120)
        assert r.status_code == 200, r.text
        assert r.json() == {"index_version": versions["v2"], "previous": versions["v1"]}
        swapped_at = len(results)
        time.sleep(2.0)
    assert current_version(versions["root"]) == versions["v2"]
    tags = {versions["v1"]: "v1", versions["v2"]: "v2"}
    assert {c for c, _ in results} == {200}, [b for c, b in results if c != 200][:3]
    for _, body in results:  # wholly from one version: every hit's metadata says the version the answer names
        assert {h["metadata"]["version"] for h in body["hits"]} == {tags[body["index_version"]]}
    versions_seen = [b["index_version"] for _, b in results]
    assert versions["v1"] in versions_seen[:swapped_at] and versions_seen[-1] == versions["v2"]
    assert set(versions_seen[swapped_at + 4:]) == {versions["v2"]}
    assert client.get("/v1/info").json()["index_version"] == versions["v2"]


def test_metrics_reach_rays_prometheus_export(client, ray_metrics_url):
    """Ray's metrics agent on 127.0.0.1 exports what the requests above caused (names get Ray's ray_ prefix)."""
    client.post("/v1/retrieve", json=OK)
    wanted = ["ray_dialclip_requests", 'endpoint="/v1/retrieve"', 'status="422"', 'endpoint="/v1/retrieve/batch"',
              "ray_dialclip_stage_latency_ms_bucket", 'stage="encode"', 'stage="search"', 'stage="merge"',
              "ray_dialclip_partial_answers", "ray_dialclip_shard_down_events",
              "ray_dialclip_feature_cache_hit_ratio", "ray_dialclip_index_version", "ray_dialclip_shard_batch_size"]
    deadline, missing = time.time() + 30, wanted
    while time.time() < deadline:
        text = httpx.get(ray_metrics_url, timeout=10).text
        missing = [w for w in wanted if w not in text]
        if not missing:
            break
        time.sleep(1.0)
    assert not missing, missing
    lines = [ln for ln in text.splitlines() if ln.startswith("ray_dialclip_index_version{") and ln.endswith(" 1.0")]
    assert lines and all(APP in ln for ln in lines), lines
