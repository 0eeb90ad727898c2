"""The shared runtime: one Ray sizing rule, one TorchTrainer, one LR schedule, one AMP step; no tuning cycle."""

from __future__ import annotations

import ast
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dialclip_ray.runtime import CPUS_ENV, DEFAULT_LOCAL_CPUS, AmpStep, build_trainer, local_cpus, warmup_cosine

PACKAGE = Path(__file__).resolve().parent.parent / "dialclip_ray"


def test_warmup_cosine_ramps_then_decays_to_zero():
    f = warmup_cosine(4, 20)
    assert [f(s) for s in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert f(4) == pytest.approx(1.0)  # cosine starts at its peak
    assert f(12) == pytest.approx(0.5)  # half-way through the decay
    assert f(20) == pytest.approx(0.0) and f(25) == pytest.approx(0.0)  # ends at 0 and stays there
    decay = [f(s) for s in range(4, 21)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))
    assert warmup_cosine(0, 10)(0) == pytest.approx(1.0)  # no warmup: full rate from the first step


def _optim(lr: float = 0.1):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    return model, opt


def _steps(model, opt, sched, n: int) -> list[float]:
    lrs = []
    for _ in range(n):
        loss = model(torch.ones(2, 3)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    return lrs


def _through_checkpoint(state: dict) -> dict:
    """As the loops do: torch.save, then torch.load(weights_only=True)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_scheduler_restored_from_state_dict_continues_like_an_uninterrupted_run():
    model, opt = _optim()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(3, 20))
    straight = _steps(model, opt, sched, 20)

    model, opt = _optim()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(3, 20))
    first = _steps(model, opt, sched, 8)
    saved = _through_checkpoint({"model": model.state_dict(), "optimizer": opt.state_dict(),
                                 "scheduler": sched.state_dict()})
    model, opt = _optim()  # a fresh worker: new objects, scheduler built before the states are loaded
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(3, 20))
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["optimizer"])
    sched.load_state_dict(saved["scheduler"])
    assert sched.last_epoch == 8
    assert first + _steps(model, opt, sched, 12) == pytest.approx(straight, rel=1e-12)


def test_resumed_scheduler_follows_a_longer_total():
    """A rerun asking for more epochs decays over its new total (the lambda is not stored)."""
    model, opt = _optim()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(2, 10))
    _steps(model, opt, sched, 10)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0)
    saved = _through_checkpoint({"optimizer": opt.state_dict(), "scheduler": sched.state_dict()})
    model2, opt2 = _optim()
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, warmup_cosine(2, 20))
    opt2.load_state_dict(saved["optimizer"])
    sched2.load_state_dict(saved["scheduler"])
    lrs = _steps(model2, opt2, sched2, 10)
    assert lrs[0] == pytest.approx(0.1 * warmup_cosine(2, 20)(11))
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12)


def test_amp_step_on_cpu_trains_clips_and_steps_the_scheduler():
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1)
    x = torch.randn(64, 8)
    y = x @ torch.randn(8, 1) * 2 + 1
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(0, 1000))
    step = AmpStep("cpu", "bf16", model.parameters(), grad_clip=0.5)
    assert step.dtype is None and not step.scaler.is_enabled()  # autocast and loss scaling are CUDA-only
    losses = []
    for _ in range(30):
        with step.autocast():
            out = model(x)
            loss = torch.nn.functional.mse_loss(out, y)
        assert out.dtype == torch.float32
        before = [p.detach().clone() for p in model.parameters()]
        step.backward_and_step(loss, opt, sched)
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
        assert norm <= 0.5 + 1e-5  # clipped (the raw norm starts near 17)
        assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert sched.last_epoch == 30


def test_amp_step_without_clip_matches_a_plain_step():
    torch.manual_seed(0)
    a, b = torch.nn.Linear(4, 2), torch.nn.Linear(4, 2)
    b.load_state_dict(a.state_dict())
    x = torch.randn(5, 4)
    opt_a, opt_b = torch.optim.AdamW(a.parameters(), lr=0.01), torch.optim.AdamW(b.parameters(), lr=0.01)
    step = AmpStep(torch.device("cpu"), "none", a.parameters())
    with step.autocast():
        loss_a = a(x).sum()
    step.backward_and_step(loss_a, opt_a)
    opt_b.zero_grad()
    b(x).sum().backward()
    opt_b.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="amp"):
        AmpStep("cpu", "fp8")


def test_local_cluster_sizing_rule(monkeypatch):
    monkeypatch.delenv(CPUS_ENV, raising=False)
    assert local_cpus(1) == DEFAULT_LOCAL_CPUS
    assert local_cpus(2.5) == max(3, DEFAULT_LOCAL_CPUS)
    assert local_cpus(7) == 7  # never below what the job needs
    monkeypatch.setenv(CPUS_ENV, "6")
    assert local_cpus(1) == 6 and local_cpus(9) == 9
    monkeypatch.setenv(CPUS_ENV, "0")
    with pytest.raises(ValueError, match=CPUS_ENV):
        local_cpus(1)


ENSURE_RAY_SCRIPT = """
import os, ray
from dialclip_ray.runtime import ensure_ray
ensure_ray(num_cpus=2)
first = ray.cluster_resources().get("CPU")
ensure_ray(num_cpus=9)  # already connected: left alone
print(first, ray.cluster_resources().get("CPU"), os.environ.get("RAY_USAGE_STATS_ENABLED"))
ray.shutdown()
"""


def test_ensure_ray_starts_a_local_cluster_by_the_rule(tmp_path):
    """A real start in a fresh interpreter (this session's own cluster would make ensure_ray a no-op)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_USAGE_STATS_ENABLED")}
    env[CPUS_ENV] = "3"
    proc = subprocess.run([sys.executable, "-c", ENSURE_RAY_SCRIPT], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[-3:] == ["3.0", "3.0", "0"]


def _noop_loop(config: dict) -> None:
    pass


def test_build_trainer_carries_failure_checkpoint_and_scaling_config(tmp_path):
    from ray.train.torch import TorchTrainer

    trainer = build_trainer(_noop_loop, {"train": {"x": 1}}, name="run-a", storage_path=str(tmp_path), workers=2,
                            use_gpu=False, max_failures=3, num_to_keep=2, score_attribute="val_sum")
    assert isinstance(trainer, TorchTrainer)
    rc = trainer.run_config
    assert rc.failure_config.max_failures == 3
    assert (rc.checkpoint_config.num_to_keep, rc.checkpoint_config.checkpoint_score_attribute,
            rc.checkpoint_config.checkpoint_score_order) == (2, "val_sum", "max")
    assert (rc.name, rc.storage_path) == ("run-a", str(tmp_path))
    assert trainer.scaling_config.num_workers == 2 and not trainer.scaling_config.use_gpu
    assert trainer.train_loop_config == {"train": {"x": 1}}
    plain = build_trainer(_noop_loop, {}, name="run-b", storage_path=str(tmp_path), workers=1, use_gpu=False,
                          max_failures=0)
    assert plain.run_config.failure_config.max_failures == 0
    assert plain.run_config.checkpoint_config.num_to_keep is None


def _package_sources():
    return [(p, p.read_text()) for p in PACKAGE.rglob("*.py")]


def test_one_owner_for_trainer_construction_and_usage_stats():
    for path, text in _package_sources():
        if path.name == "runtime.py":
            continue
        tree = ast.parse(text)
        calls = [n.func for n in ast.walk(tree) if isinstance(n, ast.Call)]
        names = {f.id if isinstance(f, ast.Name) else getattr(f, "attr", None) for f in calls}
        assert "TorchTrainer" not in names, f"{path}: build TorchTrainers with runtime.build_trainer"
        assert "RAY_USAGE_STATS_ENABLED" not in text, f"{path}: runtime.ensure_ray owns RAY_USAGE_STATS_ENABLED"


def _imported_modules(path: Path) -> set[str]:
    mods = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            mods.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            mods.add(node.module)
            mods.update(f"{node.module}.{a.name}" for a in node.names)
    return mods


def test_tuning_report_does_not_import_sweep():
    assert not any(m.startswith("dialclip_ray.tuning.sweep") for m in _imported_modules(PACKAGE / "tuning" /
                                                                                          "report.py"))


@pytest.mark.parametrize("module", ["dialclip_ray.tuning.report", "dialclip_ray.tuning.sweep"])
def test_tuning_modules_import_alone_in_a_fresh_interpreter(module):
    proc = subprocess.run([sys.executable, "-c", f"import {module}; print('ok')"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_no_function_over_80_lines_in_the_training_modules():
    for rel in ("runtime.py", "train/loop.py", "train/run.py", "pretrain/loop.py", "pretrain/run.py",
                "tuning/sweep.py", "tuning/report.py", "pipelines/costs.py"):
        for node in ast.walk(ast.parse((PACKAGE / rel).read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                assert length <= 80, f"{rel}::{node.name} has {length} lines"

