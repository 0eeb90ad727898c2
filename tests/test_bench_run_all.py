"""`make bench` / `make bench-quick` call bench/run_all.py: every script and flag it passes exists."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_run_all():
    spec = importlib.util.spec_from_file_location("run_all", ROOT / "bench" / "run_all.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("quick", [False, True])
def test_plan_names_real_scripts_and_flags(quick):
    run_all = load_run_all()
    plan, skipped = run_all.commands(quick, None, gpu=True)
    assert plan and {name for name, _ in plan} >= {"synthetic_speed", "index_bench", "serve_bench"}
    for name, cmd in plan:
        script = ROOT / cmd[1]
        assert script.is_file(), script
        declared = set(re.findall(r"add_argument\(\s*\"(--[a-z0-9-]+)\"", script.read_text()))
        used = {a for a in cmd[2:] if a.startswith("--")}
        assert used <= declared, f"{name}: {used - declared} not accepted by {cmd[1]}"
        if quick and name != "gpu_check":  # the published results stay: quick runs write elsewhere
            assert run_all.QUICK_OUT in " ".join(cmd), name  # (gpu_check.py: through $OUT)
    if quick:
        assert any("synthetic_benchmark" in s for s in skipped)


def test_makefile_targets_call_it():
    make = (ROOT / "Makefile").read_text()
    assert "bench/run_all.py\n" in make and "bench/run_all.py --quick" in make
    assert "serve run serve/serve_config.yaml" in make
