"""Fault injection behind ``bench/chaos.py``: each scenario breaks one real component and records what survived.

A scenario row (``bench/results/chaos.json``: ``{"scenarios": [...]}``) says what was injected, whether
the system survived (finished, answered, kept its data), the requests sent / 5xx / failed where a
service was under load, the time to full recovery and whether any data was lost. Data and training
faults are real SIGKILLs of real processes (``dialclip`` subprocesses on the run's Ray cluster, joined
through ``RAY_ADDRESS``); the serving and several-node scenarios live in ``chaos_serve`` and
``chaos_cluster``. Everything runs on this machine, bounded in time, with the tiny synthetic corpus.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

KINDS = ("train", "serve", "fuzz", "data", "multinode")


@dataclass
class Scenario:
    """One row of chaos.json."""
    name: str
    kind: str
    injected: str
    survived: bool = False
    requests_sent: int = 0
    requests_5xx: int = 0
    requests_failed: int = 0
    requests_lost: int | None = None  # serving rows: no 200 even after the client's retries
    recovery_s: float | None = None
    data_lost: bool = False
    seconds: float = 0.0
    detail: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"scenario kind must be one of {KINDS}, got {self.kind!r}")


class ChaosRun:
    """Runs scenarios one after another; a scenario that raises is recorded as not survived, with the error."""

    def __init__(self, work: Path, only: set[str] | None = None):
        self.work, self.only, self.rows = Path(work), only, []

    def __call__(self, name: str, kind: str, injected: str, fn: Callable[[Scenario, Path], None]) -> Scenario | None:
        if self.only and name not in self.only and kind not in self.only:
            return None
        row = Scenario(name, kind, injected)
        work = self.work / name
        work.mkdir(parents=True, exist_ok=True)
        print(f"[chaos] {name} ({kind}): {injected}", flush=True)
        t0 = time.time()
        try:
            fn(row, work)
        except Exception as exc:  # the row says what broke; the run goes on to the next scenario
            row.survived = False
            row.detail["error"] = f"{type(exc).__name__}: {exc}"[:2000]
            traceback.print_exc()
        row.seconds = round(time.time() - t0, 1)
        print(f"[chaos] {name}: {'survived' if row.survived else 'NOT survived'} in {row.seconds:.0f}s "
              f"{json.dumps({k: v for k, v in asdict(row).items() if k not in ('name', 'kind', 'injected', 'detail')})}",
              flush=True)
        self.rows.append(row)
        return row

    def as_json(self) -> dict:
        return {"scenarios": [asdict(r) for r in self.rows]}


# ---------------------------------------------------------------------------------------------- helpers


def dialclip(args: list[str], env: dict | None = None) -> subprocess.Popen:
    """``dialclip ARGS`` in its own process group (so a kill takes its children too)."""
    return subprocess.Popen([sys.executable, "-m", "dialclip_ray.cli", *args], env={**os.environ, **(env or {})},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)


def run_ok(args: list[str], env: dict | None = None, timeout: float = 600) -> float:
    """Run ``dialclip ARGS`` to the end; its wall seconds, or an error with its stderr tail."""
    t0 = time.time()
    proc = dialclip(args, env)
    _, err = proc.communicate(timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"dialclip {' '.join(args[:3])} failed ({proc.returncode}): {err[-2000:]}")
    return time.time() - t0


def kill_after(proc: subprocess.Popen, seconds: float) -> bool:
    """SIGKILL ``proc``'s whole process group after ``seconds``; False if it had already ended."""
    try:
        proc.wait(timeout=seconds)
        return False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return True


def hidden_leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in Path(parent).iterdir() if p.name.startswith("."))


def kill_repeatedly(row: Scenario, args: list[str], kills: int, full_s: float, check: Callable[[], dict],
                    env: dict | None = None, seed: int = 0) -> None:
    """Start ``dialclip ARGS`` ``kills`` times, SIGKILL it at a random point of its ``full_s`` run, and
    ``check()`` after each kill (it raises if the previous output is damaged); then a full rerun."""
    rng = random.Random(seed)
    attempts = []
    for _ in range(kills):
        delay = rng.uniform(0.3 * full_s, 0.98 * full_s)  # past the imports: into the conversion and its writes
        killed = kill_after(dialclip(args, env), delay)
        attempts.append({"kill_after_s": round(delay, 2), "killed": killed, **check()})
    rerun_s = run_ok(args, env)
    row.detail.update(kills=attempts, rerun_s=round(rerun_s, 1), after_rerun=check())
    row.survived = True


# ---------------------------------------------------------------------------------------------- data


def tiny_raw_corpus(work: Path, dialogs: int = 3000) -> Path:
    from dialclip_ray.data.synthetic import generate

    raw = work / "raw"
    if not (raw / "synth_meta.json").exists():
        generate(raw, dialogs=dialogs, seed=3, image_size=32, progress=False, overwrite=True)
    return raw


def dataset_check(out: Path, expected_ids: list[str] | None) -> dict:
    """The dataset at ``out`` loads and holds exactly the expected examples (raises otherwise)."""
    import pyarrow.parquet as pq

    from dialclip_ray.data.dataset import CanonicalDataset
    from dialclip_ray.data.layout import examples_files

    CanonicalDataset.load(out)
    ids = sorted(i for f in examples_files(out) for i in pq.read_table(f, columns=["id"]).column("id").to_pylist())
    if expected_ids is not None and ids != expected_ids:
        raise AssertionError(f"{out}: {len(ids)} examples after the kill, {len(expected_ids)} before")
    return {"examples": len(ids), "leftovers": hidden_leftovers(out.parent)}


def data_prepare_sigkill(fmt: str, kills: int = 5) -> Callable[[Scenario, Path], None]:
    """Kill ``dialclip data prepare`` while it replaces a good dataset: the old one must stay whole."""

    def scenario(row: Scenario, work: Path) -> None:
        raw = tiny_raw_corpus(work.parent / "data_corpus")
        out = work / fmt
        args = ["data", "prepare", "--format", fmt, "--input", str(raw / fmt), "--out", str(out), "--quiet"]
        if fmt == "photochat":
            args += ["--images", str(raw / "photochat_images")]
        else:
            args += ["--segment-mb", "0.05", "--processes", "2"]
        full_s = run_ok(args)
        expected = dataset_check(out, None)
        import pyarrow.parquet as pq

        from dialclip_ray.data.layout import examples_files

        ids = sorted(i for f in examples_files(out) for i in pq.read_table(f, columns=["id"]).column("id").to_pylist())
        kill_repeatedly(row, args, kills, full_s, lambda: dataset_check(out, ids))
        row.detail.update(full_run_s=round(full_s, 1), examples=expected["examples"])
        row.data_lost = False

    return scenario


def index_build_sigkill(row: Scenario, work: Path, kills: int = 3) -> None:
    """Kill ``dialclip index build --overwrite`` while it replaces a good index: the old one must stay whole."""
    from dialclip_ray.index.layout import IndexLayout

    raw = tiny_raw_corpus(work.parent / "data_corpus")
    corpus = work / "photochat"
    run_ok(["data", "prepare", "--format", "photochat", "--input", str(raw / "photochat"),
            "--images", str(raw / "photochat_images"), "--out", str(corpus), "--quiet"])
    ckpt = micro_checkpoint(work)
    out = work / "index"
    args = ["index", "build", "--checkpoint", str(ckpt), "--corpus", str(corpus), "--out", str(out),
            "--shards", "2", "--actors", "1", "--overwrite"]
    full_s = run_ok(args)

    def counts() -> dict:
        layout = IndexLayout.load(out)  # raises on a missing or half-written index
        for manifest in layout.manifests.values():  # every shard file it names is there
            for shard in manifest.shards:
                if not (out / manifest.kind / shard.index_file).exists() and not any(out.rglob(shard.index_file)):
                    raise FileNotFoundError(f"{out}: shard file {shard.index_file} missing")
        return {t: m.total_count for t, m in layout.manifests.items()}

    before = counts()

    def check() -> dict:
        now = counts()
        if now != before:
            raise AssertionError(f"{out}: index holds {now} after the kill, {before} before")
        return {"counts": now, "leftovers": hidden_leftovers(work)}

    kill_repeatedly(row, args, kills, full_s, check)
    row.detail["full_run_s"] = round(full_s, 1)


def micro_checkpoint(work: Path) -> Path:
    """An (untrained) dialclip-micro checkpoint whose backbone weights are a file: every process loads the same."""
    import torch

    from dialclip_ray.model.backbone import load_backbone
    from dialclip_ray.model.checkpoint import save_checkpoint
    from dialclip_ray.model.config import BackboneConfig, DialCLIPConfig
    from dialclip_ray.model.dialclip import build_model

    ckpt = work / "ckpt"
    if (ckpt / "dialclip.pt").exists():
        return ckpt
    work.mkdir(parents=True, exist_ok=True)
    weights = work / "micro-backbone.pt"
    torch.manual_seed(0)
    torch.save(load_backbone("dialclip-micro").model.state_dict(), weights)
    cfg = DialCLIPConfig(backbone=BackboneConfig(model_name="dialclip-micro", pretrained=str(weights)),
                         context_prompt_length=4, cpg_dim=32, cpg_heads=2)
    model, _ = build_model(cfg)
    return save_checkpoint(model, ckpt)


SAVE_LOOP = """
import sys, torch
from dialclip_ray.model.checkpoint import save_checkpoint
from dialclip_ray.model.config import DialCLIPConfig, merge_preset
from dialclip_ray.model.dialclip import build_model
model, _ = build_model(DialCLIPConfig(**merge_preset({"preset": "finetune", "backbone": {"model_name": "dialclip-small"}})))
version = 0
while True:
    version += 1
    save_checkpoint(model, sys.argv[1], extra={"version": version})
    print(version, flush=True)
"""


def checkpoint_save_sigkill(row: Scenario, work: Path, kills: int = 8) -> None:
    """Kill a process that saves checkpoints back to back: the directory always holds one whole checkpoint."""
    from dialclip_ray.model.checkpoint import read_checkpoint

    out = work / "ckpt"
    rng = random.Random(1)
    seen, attempts = 0, []
    for _ in range(kills):
        proc = subprocess.Popen([sys.executable, "-c", SAVE_LOOP, str(out)], stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True, start_new_session=True)
        first = proc.stdout.readline()  # one complete save, then die at a random point of the next ones
        if not first:
            raise RuntimeError("the save loop died before its first save")
        delay = rng.uniform(0.0, 1.0)
        kill_after(proc, delay)
        meta, state = read_checkpoint(out)  # raises CorruptCheckpointError if a save was half-visible
        version = meta["extra"]["version"]
        attempts.append({"kill_after_s": round(delay, 2), "version": version, "tensors": len(state),
                         "leftovers": hidden_leftovers(out)})
        seen += 1
    row.detail.update(kills=attempts, weights_mb=round((out / "dialclip.pt").stat().st_size / 2**20, 1))
    row.survived = seen == kills


# ---------------------------------------------------------------------------------------------- train


def train_config(work: Path, corpus, name: str, epochs: int, **run) -> Path:
    import yaml

    cfg = {"model": {"preset": "default", "backbone": {"model_name": "dialclip-micro"}, "context_prompt_length": 4,
                     "cpg_dim": 32, "cpg_heads": 2},
           "data": {"train": [str(corpus.photochat), str(corpus.mmdialog)], "max_train_examples": 64,
                    "max_val_examples": 16},
           "optim": {"epochs": epochs, "batch_size": 8, "lr": 3e-3, "warmup_steps": 2, "eval_batch_size": 32},
           "run": {"name": name, "storage_path": str(work / "runs"), "workers": 2, "threads_per_worker": 1, **run}}
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def prepared_corpus(work: Path):
    """The tiny corpus, prepared through the real loaders (shared by the training scenarios)."""
    from types import SimpleNamespace

    from dialclip_ray.data.prepare import prepare

    raw = tiny_raw_corpus(work, dialogs=60)
    for fmt, images in (("photochat", raw / "photochat_images"), ("mmdialog", None)):
        if not (work / fmt / "meta.json").exists():
            prepare(fmt, raw / fmt, images, work / fmt, progress=False)
    return SimpleNamespace(photochat=work / "photochat", mmdialog=work / "mmdialog")


def train_worker_kill(row: Scenario, work: Path) -> None:
    """SIGKILL a Ray Train worker mid-epoch: the run resumes at the batch after its last step checkpoint."""
    from dialclip_ray.train.config import load_train_config
    from dialclip_ray.train.run import run_training

    corpus = prepared_corpus(work.parent / "train_corpus")
    every = 2
    cfg = load_train_config(train_config(work, corpus, "worker-kill", 2, checkpoint_every_steps=every,
                                         example_log=True, max_failures=2))
    log = work / "runs" / "worker-kill" / "example_log" / "rank0.jsonl"
    result, errors = {}, []
    thread = threading.Thread(target=lambda: _catch(errors, lambda: result.update(run=run_training(cfg))))
    t0 = time.time()
    thread.start()
    killed = None
    while killed is None and thread.is_alive() and time.time() - t0 < 300:
        rows = [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []
        mid = [r for r in rows if r["epoch"] == 0 and r["batch"] >= 2 * every + 1]
        if mid:
            killed = mid[0]
            os.kill(killed["pid"], signal.SIGKILL)
            kill_t = time.time()
        time.sleep(0.02)
    thread.join(timeout=600)
    if errors:
        raise errors[0]
    rows = [json.loads(x) for x in log.read_text().splitlines()]
    resumed = next((r for r in rows if killed and r["pid"] != killed["pid"]), None)
    coverage_ok = _epoch_coverage_ok(rows, 2)
    row.detail.update(killed_at_batch=killed and killed["batch"], resumed_at_batch=resumed and resumed["batch"],
                      epochs=[h["epoch"] for h in result["run"].history], checkpoint_every_steps=every,
                      each_example_once_per_epoch=coverage_ok)
    if killed and resumed:
        row.recovery_s = round(resumed["t"] - kill_t, 1) if "t" in resumed else None
        row.detail["steps_redone"] = killed["batch"] - (resumed["batch"] - 1)
    row.survived = bool(killed and resumed and coverage_ok and len(result["run"].history) == 2)
    row.data_lost = not coverage_ok


def _catch(errors: list, fn: Callable[[], None]) -> None:
    try:
        fn()
    except BaseException as exc:
        errors.append(exc)


def _epoch_coverage_ok(rows: list[dict], epochs: int) -> bool:
    first, last = {}, {}
    for r in rows:
        key = (r["epoch"], r["batch"])
        if first.setdefault(key, r["ids"]) != r["ids"]:
            return False
        last[key] = r["ids"]
    for e in range(epochs):
        batches = sorted(b for ee, b in last if ee == e)
        ids = [i for b in batches for i in last[(e, b)]]
        if batches != list(range(1, len(batches) + 1)) or len(ids) != len(set(ids)):
            return False
    return True


def train_driver_kill(row: Scenario, work: Path) -> None:
    """SIGKILL ``dialclip train``'s driver after its first epoch; the rerun resumes and ends where an
    uninterrupted run with the same seed ends."""
    from dialclip_ray.train.config import load_train_config
    from dialclip_ray.train.run import latest_history, run_training

    corpus = prepared_corpus(work.parent / "train_corpus")
    epochs = 4
    straight = run_training(load_train_config(train_config(work, corpus, "straight", epochs)))
    config = train_config(work, corpus, "interrupted", epochs)
    run_dir = work / "runs" / "interrupted"
    driver = dialclip(["train", "--config", str(config)], ray_env())
    t0 = time.time()
    while driver.poll() is None and len(latest_history(run_dir)) < 2 and time.time() - t0 < 300:
        time.sleep(0.2)  # epoch 2 on disk: Ray has registered epoch 1 (its registry may lag one behind)
    before = latest_history(run_dir)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    kill_t = time.time()
    run_ok(["train", "--config", str(config)], ray_env())
    after = latest_history(run_dir)
    diffs = {k: max(abs(a[k] - b[k]) for a, b in zip(after, straight.history)) for k in ("train_loss", "val_sum")}
    row.recovery_s = round(time.time() - kill_t, 1)
    row.detail.update(epochs_before_kill=len(before), epochs=[h["epoch"] for h in after], max_abs_diff=diffs,
                      epoch1_restored=bool(before) and after[0]["epoch_seconds"] == before[0]["epoch_seconds"])
    row.survived = len(after) == epochs and all(d <= 1e-4 for d in diffs.values())


def ray_env() -> dict:
    """Subprocess drivers join this process's Ray cluster (their death must not take it down)."""
    import ray

    return {"RAY_ADDRESS": ray.get_runtime_context().gcs_address}


def tune_driver_kill(row: Scenario, work: Path) -> None:
    """SIGKILL ``dialclip tune``'s driver mid-sweep; the rerun finishes only the unfinished trials, and the
    trials table counts each trial's epochs (not its reports since the resume)."""
    import yaml

    corpus = prepared_corpus(work.parent / "train_corpus")
    base = yaml.safe_load(train_config(work, corpus, "base", 3).read_text())
    base["data"].update(train=[str(corpus.photochat)], max_train_examples=24, max_val_examples=12)
    base["run"] = {"workers": 1, "threads_per_worker": 1}
    (work / "base.yaml").write_text(yaml.safe_dump(base))
    space = {"base_config": "base.yaml", "search": "random", "samples": 3, "max_concurrent": 1, "epochs": 3,
             "scheduler": {"type": "fifo"}, "params": {"lr": {"loguniform": [1e-4, 3e-2]}}}
    (work / "space.yaml").write_text(yaml.safe_dump(space))
    args = ["tune", "--space", str(work / "space.yaml"), "--name", "sweep", "--storage", str(work / "tune")]
    driver = dialclip(args, ray_env())
    trials = work / "tune" / "sweep" / "trials"
    t0 = time.time()
    from dialclip_ray.train.run import latest_history

    def epochs_done() -> dict[str, int]:
        return {d.name: len(latest_history(d)) for d in trials.glob("trial-*")} if trials.exists() else {}

    while driver.poll() is None and time.time() - t0 < 400:
        done = epochs_done()
        if any(n >= 3 for n in done.values()) and any(0 < n < 3 for n in done.values()) or \
                sum(done.values()) >= 4:
            break
        time.sleep(0.2)
    before = epochs_done()
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    kill_t = time.time()
    run_ok(args, ray_env())
    table = json.loads((work / "tune" / "sweep" / "summary.json").read_text())
    rows = list(__import__("csv").DictReader(open(work / "tune" / "sweep" / "trials.csv")))
    after = epochs_done()
    finished_before = [t for t, n in before.items() if n >= 3]
    row.recovery_s = round(time.time() - kill_t, 1)
    row.detail.update(epochs_before_kill=before, epochs_after=after, table_epochs=[int(r["epochs_run"]) for r in rows],
                      summary_trials=table.get("trials"), finished_before_kill=finished_before)
    row.survived = (len(rows) == 3 and all(int(r["epochs_run"]) == 3 for r in rows)
                    and all(after.get(t) == 3 for t in finished_before))


def corrupt_checkpoint(row: Scenario, work: Path) -> None:
    """Truncate a run's newest checkpoint: resuming names the file and falls back to the one before."""
    from dialclip_ray.model.checkpoint import read_checkpoint
    from dialclip_ray.train.config import load_train_config
    from dialclip_ray.train.run import run_training

    corpus = prepared_corpus(work.parent / "train_corpus")
    config = train_config(work, corpus, "corrupt", 2)
    first = run_training(load_train_config(config))
    newest = sorted(p for p in first.run_dir.glob("checkpoint_2*") if p.is_dir())[-1] / "dialclip.pt"
    newest.write_bytes(newest.read_bytes()[:100])
    second = run_training(load_train_config(config, {"optim.epochs": 3}))
    read_checkpoint(second.best), read_checkpoint(second.latest)
    retrained = second.history[1]["epoch_seconds"] != first.history[1]["epoch_seconds"]
    row.detail.update(truncated=str(newest.relative_to(work)), epochs=[h["epoch"] for h in second.history],
                      fell_back_to_epoch=1 if retrained else None)
    row.survived = [h["epoch"] for h in second.history] == [1, 2, 3] and retrained
