"""Runs, evaluations and indexes on object storage: a real S3 API (moto_server) on 127.0.0.1.

The server is started and stopped here. Training runs as `dialclip train` subprocesses, each with
its own local Ray cluster whose workers inherit the S3 endpoint and credentials from the
environment, as on a real cluster (instance roles / env): Ray Train writes its checkpoints to
``s3://`` itself, and our outputs (best/, latest/, metrics, steps, curves, TensorBoard, config)
go through ``dialclip_ray.storage``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import yaml

pytest.importorskip("moto")
boto3 = pytest.importorskip("boto3")

BUCKET = "dialclip"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3():
    """moto_server on 127.0.0.1 with one bucket; this process's env points pyarrow/boto3 at it."""
    exe = os.path.join(os.path.dirname(sys.executable), "moto_server")  # this venv's, not one on PATH
    exe = exe if os.path.exists(exe) else (shutil.which("moto_server") or exe)
    if not os.path.exists(exe):
        pytest.skip("moto_server is not installed (pip install 'moto[server]')")
    port = _free_port()
    server = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=open(os.environ.get("MOTO_LOG", os.devnull), "w"),
                              stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        deadline = time.time() + 30
        while True:
            try:
                urllib.request.urlopen(endpoint, timeout=1)
                break
            except Exception:
                if time.time() > deadline or server.poll() is not None:
                    raise RuntimeError("moto_server did not come up")
                time.sleep(0.2)
        boto3.client("s3").create_bucket(Bucket=BUCKET)
        yield env
    finally:
        server.terminate()
        server.wait(timeout=20)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_storage_round_trip_never_resolves_a_uri(s3, tmp_path):
    from dialclip_ray import storage

    uri = f"s3://{BUCKET}/unit/a/"
    assert storage.normalize(uri) == f"s3://{BUCKET}/unit/a" and storage.join(uri, "b", "c.txt").endswith("/a/b/c.txt")
    storage.write_text(storage.join(uri, "x.txt"), "hello")
    assert storage.read_text(storage.join(uri, "x.txt")) == "hello" and storage.list_names(uri) == ["x.txt"]
    with storage.output_dir(storage.join(uri, "out")) as out:
        (out / "sub").mkdir()
        (out / "sub" / "y.bin").write_bytes(b"\1\2")
    local = storage.local_dir(storage.join(uri, "out"))
    assert (local / "sub" / "y.bin").read_bytes() == b"\1\2"
    assert storage.local_dir(storage.join(uri, "out")) == local  # cached while unchanged
    storage.write_text(storage.join(uri, "out", "sub", "y.bin"), "new")
    assert (storage.local_dir(storage.join(uri, "out")) / "sub" / "y.bin").read_text() == "new"
    assert not storage.exists(f"s3://{BUCKET}/nothing/here")


def _dialclip(*args: str, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "dialclip_ray.cli", *args], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_train_kill_resume_evaluate_and_index_on_s3(s3, tiny_corpus, tmp_path):
    from dialclip_ray import storage
    from dialclip_ray.train.run import latest_history

    storage_uri = f"s3://{BUCKET}/runs"
    cfg = {"model": {"preset": "default", "backbone": {"model_name": "dialclip-micro"}, "context_prompt_length": 0},
           "data": {"train": [str(tiny_corpus.photochat)], "max_train_examples": 32, "max_val_examples": 16},
           "optim": {"epochs": 2, "batch_size": 8, "lr": 3e-3, "warmup_steps": 2, "eval_batch_size": 32},
           "run": {"name": "s3run", "storage_path": storage_uri, "workers": 2, "threads_per_worker": 1}}
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, **s3, "PYTHONUNBUFFERED": "1", "DIALCLIP_RAY_CPUS": "3",
           "DIALCLIP_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": os.getcwd()}
    env.pop("RAY_ADDRESS", None)
    run_dir = f"{storage_uri}/s3run"

    driver = _dialclip("train", "--config", str(config), env=env)
    deadline = time.time() + 240
    while time.time() < deadline and driver.poll() is None and not latest_history(run_dir):
        time.sleep(0.5)
    assert driver.poll() is None, f"driver ended before the kill: {driver.stderr.read()[-3000:]}"
    before = latest_history(run_dir)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait(timeout=30)
    assert storage.is_file(f"{run_dir}/train_config.yaml"), "the config is recorded before training starts"

    again = _dialclip("train", "--config", str(config), env=env)
    _, err = again.communicate(timeout=300)
    assert again.returncode == 0, err[-3000:]
    history = latest_history(run_dir)
    assert [h["epoch"] for h in history] == [1, 2]
    assert history[0]["epoch_seconds"] == before[0]["epoch_seconds"], "epoch 1 came from the checkpoint"
    names = storage.list_names(run_dir)
    for name in ("best", "latest", "metrics.csv", "metrics.json", "steps.csv", "training_curves.png",
                 "train_config.yaml"):
        assert name in names, names
    from dialclip_ray.train.plots import read_steps

    steps = read_steps(run_dir)  # rank 0's per-step log; epoch 1's rows came back with its checkpoint
    assert {r["epoch"] for r in steps} == {1.0, 2.0} and [r["step"] for r in steps] == list(range(1, len(steps) + 1))
    assert all(r["lr"] > 0 and r["logit_scale"] > 0 and r["samples_per_s"] > 0 for r in steps)
    assert not any(n.startswith("s3:") for n in os.listdir(os.getcwd())), "a URI was turned into a local path"

    # evaluate and index build read the run from the bucket and write their outputs there
    script = ("import sys; from dialclip_ray.cli import main; "
              f"sys.exit(main(['evaluate', '--checkpoint', '{run_dir}', '--data', '{tiny_corpus.photochat}', "
              f"'--out', 's3://{BUCKET}/eval/s3run', '--actors', '1', '--batch-size', '32']) or "
              f"main(['index', 'build', '--checkpoint', '{run_dir}', '--corpus', '{tiny_corpus.photochat}', "
              f"'--out', '{run_dir}/index', '--actors', '1', '--batch-size', '32']))")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-3000:])
    report = json.loads(storage.read_text(f"s3://{BUCKET}/eval/s3run/eval.json"))
    assert report["results"]["s3run"]["per_type"]["dialog_to_image"]["Sum"] >= 0
    info = json.loads(storage.read_text(f"{run_dir}/index/index.json"))
    assert info["checkpoint"] == f"{run_dir}/best" and info["modalities"]["image"]["count"] > 0

    from dialclip_ray.rundir import resolve_serving

    ckpt, index = resolve_serving(run_dir=run_dir)  # serve: the run and its index from the bucket, local copies
    assert (ckpt / "dialclip.pt").is_file() and (index / "index.json").is_file()
