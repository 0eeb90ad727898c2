"""serve/serve_config.yaml as shipped: the run-directory contract and the demo's stable paths.

A tiny run (best/ checkpoint) and a 2-shard index are laid out in a temp working directory where
`make demo` puts them (runs/demo/<ts>/{run,index} behind the runs/demo/latest link, published by
the demo's own function); the shipped file's application is then deployed with its import path and
args exactly as written (relative paths resolve against the working directory, as under `serve run`)
and answers /healthz and the README's /v1/retrieve example over HTTP on 127.0.0.1.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from checkpoint_support import make_checkpoint
from dialclip_ray.serving.loopback import free_port

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def readme_retrieve_example() -> dict:
    """The JSON body of the README's `curl .../v1/retrieve` example."""
    text = (ROOT / "README.md").read_text()
    match = re.search(r"curl -s localhost:8000/v1/retrieve .*?-d '(\{.*?\})'", text, re.DOTALL)
    assert match, "README lost its /v1/retrieve example"
    return json.loads(match.group(1))


def lay_out_demo(cwd: Path, corpus) -> dict:
    """A training run directory and its index where the demo writes them, relative to ``cwd``."""
    from dialclip_ray.data.dataset import CanonicalDataset, image_loader
    from dialclip_ray.data.schema import read_meta
    from dialclip_ray.evaluation.local import embed_images, embed_texts
    from dialclip_ray.index.layout import checkpoint_identity, write_index
    from dialclip_ray.model.checkpoint import load_checkpoint
    from dialclip_ray.pipelines.demo import DemoConfig, publish_latest

    run = cwd / "runs" / "cache" / "demo_runs" / "dialclip-tiny"
    (run / "latest").mkdir(parents=True)
    tiny = make_checkpoint(cwd / "scratch", 0)
    shutil.copytree(tiny, run / "best")
    for f in tiny.iterdir():
        shutil.copy(f, run / "latest" / f.name)
    (run / "train_config.yaml").write_text("# written by dialclip train\n")
    model, backbone, _ = load_checkpoint(run / "best")
    mods = {}
    ds = CanonicalDataset.load(corpus.photochat)
    t = pq.read_table(corpus.photochat / "images.parquet")
    ids, paths = t.column("image_id").to_pylist(), t.column("path").to_pylist()
    mods["image"] = (ids, embed_images(model, ids, image_loader(ds, backbone.preprocess_val)),
                     pa.Table.from_pylist([{"path": p} for p in paths]))
    t = pq.read_table(corpus.mmdialog / "texts.parquet")
    ids, texts = t.column("text_id").to_pylist(), t.column("text").to_pylist()
    mods["text"] = (ids, embed_texts(model, texts, backbone.tokenizer), pa.Table.from_pylist([{"text": x} for x in texts]))
    out = cwd / DemoConfig().out / "20260101-000000"
    corpora = [{"dir": str(d), "source": read_meta(d)["source"]} for d in (corpus.photochat, corpus.mmdialog)]
    write_index(out / "index", mods, checkpoint_identity(run / "best"), shards=2, corpora=corpora,
                checkpoint=str(run / "best"))
    assert publish_latest(out, run) == cwd / "runs" / "demo" / "latest"
    return {"run": run, "out": out}


@pytest.fixture(scope="module")
def demo_tree(tmp_path_factory, tiny_corpus):
    cwd = tmp_path_factory.mktemp("cwd")
    return {"cwd": cwd, **lay_out_demo(cwd, tiny_corpus)}


def test_shipped_serve_config_serves_the_demo_run(ray_cluster, demo_tree, monkeypatch):
    from ray import serve
    from ray._common.utils import import_attr
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    laid, tmp_path = demo_tree, demo_tree["cwd"]
    shipped = ServeDeploySchema.model_validate(yaml.safe_load((ROOT / "serve" / "serve_config.yaml").read_text()))
    (app,) = shipped.applications
    assert shipped.http_options.host == "127.0.0.1"  # the API has no auth: loopback unless told otherwise
    monkeypatch.chdir(tmp_path)  # `make serve` runs `serve run` from the repo root: relative paths start here
    serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
    port = _get_global_client().http_config.port  # another module may have started Serve already
    built = call_user_app_builder_with_args_if_necessary(import_attr(app.import_path), app.args)
    encoder_args = built._bound_deployment.init_args[0]._bound_deployment.init_args  # QueryEncoder(ckpt, ...)
    assert encoder_args[0] == str((laid["run"] / "best").resolve())  # run_dir -> its best/ checkpoint
    monkeypatch.chdir(ROOT)  # everything the replicas need was resolved to absolute paths at build time
    name = "shipped-config"
    serve.run(built, name=name, route_prefix="/shipped")
    try:
        deployments = serve.status().applications[name].deployments
        assert set(deployments) == {"QueryEncoder", "RetrievalIngress", "Shard0", "Shard1"}  # from the index
        with httpx.Client(base_url=f"http://127.0.0.1:{port}/shipped", timeout=60) as client:
            deadline = time.time() + 60
            while (r := client.get("/healthz")).status_code != 200:
                assert time.time() < deadline, r.text
                time.sleep(0.5)
            assert client.get("/v1/info").json()["shards"] == 2
            r = client.post("/v1/retrieve", json=readme_retrieve_example())
            assert r.status_code == 200, r.text
            hits = r.json()["hits"]
            assert len(hits) == 5 and [h["rank"] for h in hits] == [1, 2, 3, 4, 5]
            assert all(h["metadata"].get("path") for h in hits)  # photos of the indexed corpus
    finally:
        serve.delete(name)


def test_run_dir_forms_and_errors(demo_tree, tmp_path, monkeypatch):
    """The three ways to name what to serve resolve to the same checkpoint; wrong paths say why."""
    from dialclip_ray.rundir import RunDirError, resolve_checkpoint, resolve_serving

    laid = demo_tree
    tmp_path = demo_tree["cwd"]
    monkeypatch.chdir(tmp_path)
    best = (laid["run"] / "best").resolve()
    index = (laid["out"] / "index").resolve()
    assert resolve_serving(run_dir="runs/demo/latest/run", index_dir="runs/demo/latest/index") == (best, index)
    assert resolve_serving(index_dir="runs/demo/latest/index") == (best, index)  # index.json names it
    assert resolve_serving(checkpoint="runs/demo/latest/run", index_dir=str(index)) == (best, index)
    assert resolve_checkpoint(laid["run"] / "latest") == (laid["run"] / "latest").resolve()
    shutil.copytree(index, laid["run"] / "index")  # the <run>/index convention: no index_dir needed
    assert resolve_serving(run_dir=str(laid["run"])) == (best, (laid["run"] / "index").resolve())

    with pytest.raises(RunDirError, match=r"run directory 'runs/nope' \(resolved against .* does not exist"):
        resolve_serving(run_dir="runs/nope", index_dir=str(index))
    with pytest.raises(RunDirError, match="not a training run directory: no best/dialclip.pt.*checkpoint directory"):
        resolve_serving(run_dir=str(laid["run"] / "best"), index_dir=str(index))
    with pytest.raises(RunDirError, match="index_dir 'runs/demo/old/index' .* does not exist"):
        resolve_serving(run_dir=str(laid["run"]), index_dir="runs/demo/old/index")
    with pytest.raises(ValueError, match="not both"):
        resolve_serving(checkpoint=str(best), run_dir=str(laid["run"]), index_dir=str(index))
    info = json.loads((index / "index.json").read_text())
    moved = tmp_path / "moved-index"
    shutil.copytree(index, moved)
    (moved / "index.json").write_text(json.dumps({**info, "checkpoint": "/elsewhere/best"}))
    with pytest.raises(RunDirError, match="names checkpoint /elsewhere/best, which does not exist here"):
        resolve_serving(index_dir=str(moved))
    assert resolve_serving(run_dir=str(laid["run"]), index_dir=str(moved)) == (best, moved.resolve())
    from dialclip_ray.serving.app import build_app
    from dialclip_ray.serving.schemas import AppArgs

    with pytest.raises(ValueError, match="shard_max_ongoing_requests"):
        AppArgs.model_validate({"index_dir": "x", "shard_max_ongoing_requests": 2,
                                "shard_autoscaling": {"target_ongoing_requests": 2}})
    with pytest.raises(ValueError, match="no index to serve: give index_dir"):
        build_app({"checkpoint": str(best)})


def test_serve_cli_refuses_bad_paths_before_starting_ray(tmp_path, monkeypatch, capsys):
    import ray

    from dialclip_ray.cli import main

    monkeypatch.chdir(tmp_path)
    was_up = ray.is_initialized()
    assert main(["serve", "--run", "runs/nope"]) == 2
    assert "error: run directory 'runs/nope' (resolved against" in capsys.readouterr().out
    assert main(["serve"]) == 2
    assert "no index to serve: give index_dir (dialclip serve --index DIR)" in capsys.readouterr().out
    assert ray.is_initialized() == was_up
