"""Ray Serve retrieval app over real HTTP: hits, shard-merge exactness, 4xx on bad input, timeouts, refusal, YAML."""

from __future__ import annotations

import base64
import io
import time
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from dialclip_ray.model.checkpoint import load_checkpoint
from dialclip_ray.data.dataset import CanonicalDataset, image_loader
from dialclip_ray.data.schema import read_meta
from dialclip_ray.evaluation.local import embed_images, embed_texts
from dialclip_ray.index import ShardedIndex
from dialclip_ray.index.layout import IndexMismatchError, checkpoint_identity, write_index
from dialclip_ray.serving.app import build_app
from dialclip_ray.serving.dialogs import DialogEncoder
from dialclip_ray.serving.schemas import RetrieveRequest

from checkpoint_support import make_checkpoint  # noqa: E402
from dialclip_ray.serving.loopback import free_port

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def png_b64(width: int, height: int) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def as_request(record, k: int = 5) -> dict:
    return {"context": [{"speaker": t.speaker, "text": t.text, "images": [{"id": i} for i in t.image_ids]}
                        for t in record.context], "current": record.current_text, "target": record.target_type, "k": k}


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, tiny_corpus):
    """Checkpoint, a second checkpoint, and 1/3/4-shard flat indexes of the same corpus vectors."""
    tmp = tmp_path_factory.mktemp("serving")
    ckpt, other = make_checkpoint(tmp, 0), make_checkpoint(tmp, 1)
    model, backbone, _ = load_checkpoint(ckpt)
    dirs = [tiny_corpus.photochat, tiny_corpus.mmdialog]
    modalities, seen = {"image": ([], [], []), "text": ([], [], [])}, set()
    for d in dirs:
        ds = CanonicalDataset.load(d)
        t = pq.read_table(d / "images.parquet")
        ids = [i for i in t.column("image_id").to_pylist() if i not in seen]
        seen.update(ids)
        paths = dict(zip(t.column("image_id").to_pylist(), t.column("path").to_pylist()))
        modalities["image"][0].extend(ids)
        modalities["image"][1].append(embed_images(model, ids, image_loader(ds, backbone.preprocess_val)))
        modalities["image"][2].extend({"path": paths[i]} for i in ids)
        t = pq.read_table(d / "texts.parquet")
        ids, texts = t.column("text_id").to_pylist(), t.column("text").to_pylist()
        if ids:
            modalities["text"][0].extend(ids)
            modalities["text"][1].append(embed_texts(model, texts, backbone.tokenizer))
            modalities["text"][2].extend({"text": x} for x in texts)
    mods = {k: (ids, np.concatenate(v), pa.Table.from_pylist(m)) for k, (ids, v, m) in modalities.items()}
    corpora = [{"dir": str(d), "source": read_meta(d)["source"]} for d in dirs]
    ident = checkpoint_identity(ckpt)
    index = {n: write_index(tmp / f"index{n}", mods, ident, shards=n, corpora=corpora).directory for n in (1, 3, 4)}
    return {"ckpt": ckpt, "other": other, "index": index, "tmp": tmp, "corpus": tiny_corpus}


@pytest.fixture(scope="module")
def unsharded(artifacts):
    """The reference: the same checkpoint's encoder and the 1-shard index, in this process."""
    corpus = artifacts["corpus"]
    encoder = DialogEncoder(str(artifacts["ckpt"]), [str(corpus.photochat), str(corpus.mmdialog)])
    indexes = {t: ShardedIndex(artifacts["index"][1] / t) for t in ("image", "text")}

    def search(body: dict):
        (res,) = encoder.encode([RetrieveRequest.model_validate(body)])
        return indexes[body.get("target", "image")].search(res["embedding"][None], body["k"])

    return search


@pytest.fixture(scope="module")
def served(ray_cluster, artifacts):
    """Apps: `yaml` from serve/serve_config.yaml (4 shards, Shard3 slowed) and `s3` (3 shards)."""
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
    port = _get_global_client().http_config.port  # another module may have started Serve already
    # `serve run serve/serve_config.yaml` semantics: the YAML's import path + args + per-deployment options.
    cfg = yaml.safe_load((ROOT / "serve" / "serve_config.yaml").read_text())
    cfg["http_options"] = {"host": "127.0.0.1", "port": port}
    app = cfg["applications"][0]
    app.update(name="yaml", route_prefix="/yaml")
    app["args"].update(run_dir=None, checkpoint=str(artifacts["ckpt"]), index_dir=str(artifacts["index"][4]),
                       shard_delay_s={3: 2.0})
    (artifacts["tmp"] / "serve_config.yaml").write_text(yaml.safe_dump(cfg))
    _get_global_client().deploy_apps(ServeDeploySchema.model_validate(cfg), _blocking=False)
    serve.run(build_app({"checkpoint": str(artifacts["ckpt"]), "index_dir": str(artifacts["index"][3])}),
              name="s3", route_prefix="/s3")
    deadline = time.time() + 90
    while (status := serve.status().applications["yaml"].status) != "RUNNING":  # read once: no race
        assert status in ("NOT_STARTED", "DEPLOYING"), serve.status()
        assert time.time() < deadline, "YAML app did not start"
        time.sleep(0.5)
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
        yield client
    for name in ("s3", "yaml"):
        serve.delete(name)


def test_retrieve_returns_k_hits_with_metadata(served, artifacts, unsharded):
    corpus = artifacts["corpus"]
    dialog = CanonicalDataset.load(corpus.photochat).examples("test", "image")[0]
    body = as_request(dialog, k=5)
    r = served.post("/s3/v1/retrieve", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert not out["partial"] and out["missing_shards"] == [] and out["took_ms"] > 0
    hits = out["hits"]
    assert [h["rank"] for h in hits] == [1, 2, 3, 4, 5]
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    paths = {}
    for d in (corpus.photochat, corpus.mmdialog):
        t = pq.read_table(d / "images.parquet")
        for i, p in zip(t.column("image_id").to_pylist(), t.column("path").to_pylist()):
            paths.setdefault(i, p)
    assert all(h["metadata"]["path"] == paths[h["id"]] for h in hits)

    # Same answer as encode + search in one process.
    local = unsharded(body)
    assert [h["id"] for h in hits] == local.ids[0].tolist()
    np.testing.assert_allclose([h["score"] for h in hits], local.scores[0], atol=1e-4)

    # Text target, and inline base64 images next to corpus ids.
    texts = dict(zip(*[pq.read_table(corpus.mmdialog / "texts.parquet").column(c).to_pylist()
                       for c in ("text_id", "text")]))
    body = {"context": [{"speaker": 0, "text": "look at this", "images": [{"base64": png_b64(40, 30)},
                                                                          {"id": hits[0]["id"]}]}],
            "current": "", "target": "text", "k": 3}
    r = served.post("/s3/v1/retrieve", json=body)
    assert r.status_code == 200, r.text
    assert [h["metadata"]["text"] for h in r.json()["hits"]] == [texts[h["id"]] for h in r.json()["hits"]]
    assert len(r.json()["hits"]) == 3

    info = served.get("/s3/v1/info").json()
    assert info["shards"] == 3 and set(info["manifests"]) == {"image", "text"}
    assert info["backbone"]["model_name"] == "dialclip-micro" and info["model"]["context_prompt_length"] == 4
    assert served.get("/s3/healthz").json() == {"status": "ok"}
    assert served.get("/s3/docs").status_code == 200
    assert "RetrieveRequest" in served.get("/s3/openapi.json").json()["components"]["schemas"]


def test_sharded_equals_unsharded(served, artifacts, unsharded):
    corpus = artifacts["corpus"]
    records = (CanonicalDataset.load(corpus.photochat).examples("test", "image")[:3]
               + CanonicalDataset.load(corpus.mmdialog).examples("test", "text")[:3]
               + CanonicalDataset.load(corpus.mmdialog).examples("test", "image")[:2])
    assert {r.target_type for r in records} == {"image", "text"}
    for record in records:
        body = as_request(record, k=10)
        three, one = served.post("/s3/v1/retrieve", json=body).json()["hits"], unsharded(body)
        assert [h["id"] for h in three] == one.ids[0].tolist()
        np.testing.assert_allclose([h["score"] for h in three], one.scores[0], atol=1e-4)


def test_bad_requests_get_4xx(served):
    ok = {"context": [{"speaker": 0, "text": "hello"}], "current": "", "k": 3}
    huge = "A" * (5 * 1024 * 1024 // 3 * 4)  # valid base64 of 5 MB of zeros: over the image size limit
    cases = [
        (b"{not json", 400, "not valid JSON"),
        (b"[1, 2]", 422, "invalid request"),
        ({"context": [{"text": "hi"}]}, 422, "context.0.speaker"),
        ({**ok, "k": "many"}, 422, "k: Input should be a valid integer"),
        ({**ok, "k": 0}, 422, "k: Input should be greater than or equal to 1"),
        ({**ok, "k": 101}, 422, "k: Input should be less than or equal to 100"),
        ({**ok, "target": "video"}, 422, "target: "),
        ({**ok, "extra": 1}, 422, "extra: Extra inputs are not permitted"),
        ({"context": [], "current": "  "}, 422, "empty dialog"),
        ({"context": [{"speaker": 0, "text": ""}]}, 422, "empty dialog"),
        ({"context": [{"speaker": 0, "text": "x" * 5000}]}, 422, "context.0.text"),
        ({"context": [{"speaker": 0, "images": [{"base64": "%%%not-b64"}]}]}, 422, "base64"),
        ({"context": [{"speaker": 0, "images": [{"base64": base64.b64encode(b"junk" * 10).decode()}]}]},
         422, "not a decodable"),
        ({"context": [{"speaker": 0, "images": [{"base64": png_b64(5000, 4000)}]}]}, 422, "pixels"),
        ({"context": [{"speaker": 0, "images": [{"base64": huge}]}]}, 422, "images.0.base64"),
        ({"context": [{"speaker": 0, "images": [{"id": "no-such-image"}]}]}, 422, "unknown corpus image id"),
        ({"context": [{"speaker": 0, "images": [{"id": "a", "base64": "AAAA"}]}]}, 422, "exactly one"),
        (b"x" * (9 * 1024 * 1024), 413, "exceeds the limit"),
    ]
    for body, status, fragment in cases:
        if isinstance(body, bytes):
            r = served.post("/s3/v1/retrieve", content=body, headers={"content-type": "application/json"})
        else:
            r = served.post("/s3/v1/retrieve", json=body)
        assert r.status_code == status, (str(body)[:80], r.status_code, r.text[:300])
        assert fragment in r.json()["error"], (str(body)[:80], r.json())
    r = served.post("/s3/v1/retrieve", content=b"hello", headers={"content-type": "text/plain"})
    assert r.status_code == 415
    assert served.get("/s3/healthz").status_code == 200
    assert served.post("/s3/v1/retrieve", json=ok).status_code == 200  # the replicas survived it all


def test_slow_shard_gives_504_or_partial(served, artifacts):
    body = {"context": [{"speaker": 0, "text": "a photo of the beach"}], "current": "", "k": 5}
    r = served.post("/yaml/v1/retrieve", json={**body, "timeout_ms": 1000})  # Shard3 answers after 2 s
    assert r.status_code == 504 and "Shard3" in r.json()["missing_shards"] and "Shard3" in r.json()["error"]
    r = served.post("/yaml/v1/retrieve", json={**body, "timeout_ms": 1000, "allow_partial": True})
    assert r.status_code == 200, r.text
    partial = r.json()
    assert partial["partial"] and partial["missing_shards"] == ["Shard3"]
    # Partial hits = the full ranking without Shard3's vectors.
    full = served.post("/yaml/v1/retrieve", json={**body, "k": 50}).json()
    assert not full["partial"] and len(full["hits"]) == 50
    shard3 = set(pq.read_table(artifacts["index"][4] / "image" / "shard-00003.ids.parquet").column("id").to_pylist())
    expected = [h["id"] for h in full["hits"] if h["id"] not in shard3][:5]
    assert [h["id"] for h in partial["hits"]] == expected


def test_yaml_app_matches_unsharded(served, unsharded):
    from ray import serve

    deployments = serve.status().applications["yaml"].deployments
    assert set(deployments) == {"QueryEncoder", "Shard0", "Shard1", "Shard2", "Shard3", "RetrievalIngress"}
    body = {"context": [{"speaker": 0, "text": "what did you cook"}, {"speaker": 1, "text": "pasta!"}],
            "current": "", "target": "text", "k": 7}
    yaml_hits = served.post("/yaml/v1/retrieve", json=body).json()["hits"]
    assert [h["id"] for h in yaml_hits] == unsharded(body).ids[0].tolist() and len(yaml_hits) == 7
    assert served.get("/yaml/v1/info").json()["shards"] == 4


def test_mismatched_checkpoint_and_index_refused(artifacts):
    from dialclip_ray.serving.encoder import QueryEncoder

    with pytest.raises(IndexMismatchError, match="checkpoint_sha256"):
        build_app({"checkpoint": str(artifacts["other"]), "index_dir": str(artifacts["index"][3])})
    # The replica checks again (the index may be swapped after the app was built).
    ident = checkpoint_identity(artifacts["ckpt"])
    with pytest.raises(IndexMismatchError, match="checkpoint_sha256"):
        QueryEncoder.func_or_class(str(artifacts["other"]), [], ident, 64)
    with pytest.raises(ValueError, match="index_dir"):
        build_app({"checkpoint": str(artifacts["ckpt"])})


def test_query_cli_prints_hits(served, tmp_path, capsys):
    from dialclip_ray.cli import main

    dialog = tmp_path / "dialog.json"
    dialog.write_text('{"context": [{"speaker": 0, "text": "my cat"}], "current": "here she is"}')
    base = str(served.base_url).rstrip("/")
    assert main(["query", "--url", f"{base}/s3", "--dialog", str(dialog), "--k", "3", "--target", "text"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("3 hits") and [ln.split()[0] for ln in lines[1:]] == ["1", "2", "3"]
    dialog.write_text('{"context": []}')
    assert main(["query", "--url", f"{base}/s3", "--dialog", str(dialog)]) == 1
    err = capsys.readouterr().err
    assert "error 422" in err and "empty dialog" in err
