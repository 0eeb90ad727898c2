"""Ray jobs as the README submits them: `ray job submit` against a `ray start --head` on this machine.

The head gets its own temp dir (RAY_TMPDIR and --temp-dir, short: it holds Unix sockets) and free
ports for everything it listens on, so it neither finds nor disturbs the session's test cluster or
any other Ray on the machine; it is stopped by killing the processes of that temp dir (found by
command line or working directory, killed by pid; never `ray stop`, which stops every Ray on the
machine). An evaluate job (no Ray Train: two local clusters
side by side can confuse Train V2's placement-group cleaner, see jobs/_entry.py) runs with absolute
paths; the path checks that refuse what a job cannot see are tested without a cluster.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from checkpoint_support import make_checkpoint

from dialclip_ray.serving.loopback import free_ports

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def cluster_pids(root: str) -> list[int]:
    """Processes of the cluster under ``root``: its temp dir in their command line, or their working
    directory under it (`ray start` runs there; Ray's agents and workers inherit it, and renamed
    workers such as ``ray::IDLE`` show no path in their command line)."""
    import psutil

    ours = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "cwd"]):
        info = proc.info
        if info["pid"] in ours:
            continue
        cwd, cmdline = info.get("cwd") or "", " ".join(info.get("cmdline") or [])
        if cwd == root or cwd.startswith(root + os.sep) or root in cmdline:
            found.append(info["pid"])
    return found


def stop_cluster(root: str) -> list[int]:
    """SIGTERM, then SIGKILL, the processes of the cluster under ``root``; returns the survivors."""
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        for pid in cluster_pids(root):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + wait
        while cluster_pids(root) and time.time() < deadline:
            time.sleep(0.5)
    return cluster_pids(root)


@pytest.mark.slow
def test_evaluate_job_on_a_local_head(tmp_path, tiny_corpus):
    ray_cli = VENV_BIN / "ray"
    if not ray_cli.exists():
        pytest.skip(f"no `ray` CLI next to {sys.executable}")
    ray_tmp = tempfile.mkdtemp(prefix="dcj-", dir="/tmp")
    gcs, dashboard, agent, agent_grpc, env_agent, metrics, client = free_ports(7)
    env = {**os.environ, "RAY_TMPDIR": ray_tmp, "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_AUTH_MODE": "token",  # this Ray requires the token once ~/.ray/auth_token exists
           "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}  # = a head started from the venv
    env.pop("RAY_ADDRESS", None)
    try:
        start = subprocess.run(
            [str(ray_cli), "start", "--head", f"--port={gcs}", "--num-cpus=2", f"--dashboard-port={dashboard}",
             "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-agent-listen-port={agent}",
             f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={env_agent}",
             f"--metrics-export-port={metrics}", f"--ray-client-server-port={client}", f"--temp-dir={ray_tmp}",
             "--disable-usage-stats"], cwd=ray_tmp, env=env, capture_output=True, text=True, timeout=180)
        if start.returncode != 0:
            pytest.skip(f"`ray start --head` failed here: {(start.stdout + start.stderr)[-1500:]}")
        ckpt = make_checkpoint(tmp_path / "ckpt", 0)
        out = tmp_path / "eval"
        submit = [str(ray_cli), "job", "submit", "--address", f"http://127.0.0.1:{dashboard}", "--working-dir",
                  str(ROOT), "--", "python", "jobs/evaluate.py", "--checkpoint", f"tiny={ckpt}",
                  "--data", str(tiny_corpus.photochat), "--out", str(out), "--actors", "1", "--batch-size", "8",
                  "--max-examples", "8"]
        deadline = time.time() + 90
        while True:
            job = subprocess.run(submit, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=420)
            logs = job.stdout + job.stderr
            # The dashboard agent registers a little after `ray start` returns.
            if "No available agent" not in logs or time.time() > deadline:
                break
            time.sleep(3)
        assert job.returncode == 0 and "succeeded" in logs, logs[-4000:]
        assert "| tiny (dialog_to_image) |" in logs  # the job's own output, streamed back by the CLI
        result = json.loads((out / "eval.json").read_text())
        assert "tiny" in json.dumps(result)
    finally:
        left = stop_cluster(ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert not left, f"processes of the job test's cluster left behind: {left}"


JOB_ENV = json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg_x.zip"},
                      "metadata": {"job_submission_id": "raysubmit_test"}})


def test_job_refuses_paths_it_cannot_see(monkeypatch, capsys, tmp_path):
    from dialclip_ray.cli import main
    from dialclip_ray.jobpaths import ray_job_id

    monkeypatch.chdir(ROOT)
    assert ray_job_id() is None
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", JOB_ENV)
    assert ray_job_id() == "raysubmit_test"
    data = tmp_path / "data"
    data.mkdir()
    rc = main(["evaluate", "--checkpoint", "tiny=runs/train/x/best", "--data", str(data), "--out", "eval-out"])
    err = capsys.readouterr().err
    assert rc == 2
    assert ("--checkpoint: relative path 'runs/train/x/best' does not exist in the job's working directory "
            "(ray job submit uploads the repo minus git-ignored paths like runs/); pass an absolute path on "
            "storage every node sees") in err
    assert "--out: relative output path 'eval-out' would be written into the job's temporary copy" in err
    assert str(data) not in err  # absolute paths pass
    # Paths inside a training config: configs/synthetic.yaml names the demo's runs/cache, not uploaded.
    assert main(["train", "--config", "configs/synthetic.yaml"]) == 2
    out = capsys.readouterr().out
    assert "configs/synthetic.yaml: data.train: relative path 'runs/cache/synth-1500-s0-64px/photochat'" in out
    assert "run.storage_path (or --storage): relative output path 'runs/train'" in out
    # A sweep's base config is checked the same way before any trial starts.
    assert main(["tune", "--space", "tune/synthetic.yaml", "--storage", str(tmp_path / "tune")]) == 2
    assert "tune/synthetic.yaml (base_config): data.train: relative path 'runs/cache/" in capsys.readouterr().out


def test_paths_are_free_outside_jobs(monkeypatch, tmp_path):
    import argparse

    from dialclip_ray.jobpaths import arg_problems

    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    monkeypatch.chdir(tmp_path)
    args = argparse.Namespace(checkpoint=["a=runs/x"], data="runs/y", out="z", pretrained="openai")
    assert arg_problems(args) == []
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", JOB_ENV)
    problems = arg_problems(args)
    assert len(problems) == 3 and not any("openai" in p for p in problems)  # an open_clip tag is no path
    (tmp_path / "runs" / "y").mkdir(parents=True)  # uploaded with the working directory: fine
    assert len(arg_problems(args)) == 2


def test_job_entry_point_names_a_python_without_the_project(tmp_path):
    """`python` on the head's PATH without torch/ray: the job says which Python and how to fix it."""
    bare = shutil.which("python3", path="/usr/bin:/bin")
    if not bare or subprocess.run([bare, "-c", "import torch"], capture_output=True).returncode == 0:
        pytest.skip("no system python3 without torch here")
    proc = subprocess.run([bare, str(ROOT / "jobs" / "evaluate.py"), "--help"], capture_output=True, text=True,
                          cwd=tmp_path, env={"PATH": "/usr/bin:/bin"}, timeout=60)
    assert proc.returncode == 3
    assert f"the job's Python ({bare}) cannot import" in proc.stderr and "ray start --head" in proc.stderr
