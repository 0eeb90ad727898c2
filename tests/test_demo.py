"""End to end: `dialclip demo --tiny` in its own process; report, plots and HTTP answers exist; nothing left running."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest
from dialclip_ray.serving.loopback import free_port

pytestmark = pytest.mark.slow


def processes_mentioning(text: str) -> list[str]:
    # -ww: full command lines (pytest sets COLUMNS, and ps cuts its output to that width)
    out = subprocess.run(["ps", "-ww", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines()[1:] if text in line and "pytest" not in line]


def test_tiny_demo_end_to_end(tmp_path):
    # The demo's Ray cluster gets its own temp dir (short: it holds Unix sockets), so its processes
    # (raylet, GCS, dashboard, log monitor) can be told apart from any other cluster on the machine.
    ray_tmp = tempfile.mkdtemp(prefix="dcr-", dir="/tmp")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_TMPDIR": ray_tmp}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-m", "dialclip_ray.cli", "demo", "--tiny", "--out", str(tmp_path / "out"),
                           "--cache", str(tmp_path / "cache"), "--port", str(free_port())],
                          capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for n in range(1, 9):
        assert f"[{n}/8]" in proc.stdout
    (run,) = [p for p in (tmp_path / "out").iterdir() if p.name != "latest"]
    # Stable paths for serve/serve_config.yaml: out/latest -> this run; run/ -> the DialCLIP training run.
    assert (tmp_path / "out" / "latest").resolve() == run.resolve()
    assert (run / "run" / "best" / "dialclip.pt").is_file() and (run / "run" / "train_config.yaml").is_file()
    report = (run / "report.md").read_text()
    assert "## Test metrics" in report and "DialCLIP (dialog_to_image)" in report and "zero-shot CLIP" in report
    for png in ("training_curves.png", "contact_sheet.png"):
        assert (run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((run / "report.json").read_text())
    assert len(summary["answers"]) == 3  # 2 photo queries + 1 reply query, answered over HTTP
    for answer in summary["answers"]:
        assert len(answer["hits"]) == 5 and all({"id", "score", "rank", "metadata"} <= set(h) for h in answer["hits"])
    assert (run / "index" / "index.json").is_file()
    assert processes_mentioning(ray_tmp) == [], "Ray processes of the demo's cluster were left behind"
    shutil.rmtree(ray_tmp, ignore_errors=True)
