"""Load generation for fault and autoscaling runs: locust (headless, loopback only) in a subprocess.

``start_locust`` runs ``serving/locustfile.py`` against a local Serve app for a bounded time and
user count; ``read_log`` and ``summarize`` turn its per-request log into the figures a fault report
needs: requests sent, 5xx, failures, p50/p99, and the time until the service answered fully again.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np

LOCUSTFILE = Path(__file__).with_name("locustfile.py")


def start_locust(host: str, log: Path, users: int = 4, seconds: int = 60, path: str = "", timeout_s: float = 10.0,
                 allow_partial: bool = False, wait_s: float = 0.05, retries: int = 0) -> subprocess.Popen:
    """Start locust headless: ``users`` users for ``seconds`` s against ``host`` (127.0.0.1 only); each user
    retries a 5xx up to ``retries`` times as ``dialclip query`` does."""
    if not host.startswith(("http://127.0.0.1:", "http://localhost:")):
        raise ValueError(f"load tests run against loopback only, not {host!r}")
    exe = shutil.which("locust", path=str(Path(sys.executable).parent)) or shutil.which("locust")
    if exe is None:
        raise RuntimeError("locust is not installed (pip install -e '.[dev]')")
    env = {**os.environ, "DIALCLIP_LOAD_LOG": str(log), "DIALCLIP_LOAD_PATH": path,
           "DIALCLIP_LOAD_TIMEOUT_S": str(timeout_s), "DIALCLIP_LOAD_ALLOW_PARTIAL": "1" if allow_partial else "0",
           "DIALCLIP_LOAD_WAIT_S": str(wait_s), "DIALCLIP_LOAD_RETRIES": str(retries)}
    cmd = [exe, "-f", str(LOCUSTFILE), "--headless", "--host", host, "-u", str(users), "-r", str(users),
           "-t", f"{int(seconds)}s", "--stop-timeout", str(int(timeout_s) + 1), "--only-summary", "--loglevel", "ERROR"]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def stop_locust(proc: subprocess.Popen, timeout_s: float = 60) -> None:
    """Wait for the bounded run to end (it stops by itself); kill it if it overstays."""
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def read_log(log: Path) -> list[dict]:
    if not Path(log).exists():
        return []
    return [json.loads(line) for line in Path(log).read_text().splitlines() if line.strip()]


def good(row: dict) -> bool:
    return row["status"] == 200 and not row.get("partial")


def summarize(rows: list[dict], fault_t: float | None = None) -> dict:
    """Counts and latencies; with ``fault_t``, ``recovery_s`` = from the fault to the end of the last
    request (started after it) that was not a full answer (0 when none was affected).

    ``requests_5xx`` counts the server's 5xx answers, retried attempts included; ``requests_lost`` the
    requests that got no 200 even after the client's retries (``requests_failed`` adds partial answers)."""
    ms = np.array([r["ms"] for r in rows]) if rows else np.zeros(0)
    out = {"requests_sent": len(rows),
           "requests_5xx": sum(500 <= s < 600 for r in rows for s in r.get("statuses", [r["status"]])),
           "requests_lost": sum(r["status"] != 200 for r in rows),
           "attempts": sum(len(r.get("statuses", [r["status"]])) for r in rows),
           "requests_failed": sum(not good(r) for r in rows), "requests_partial": sum(bool(r.get("partial")) for r in rows),
           "requests_no_answer": sum(r["status"] == 0 for r in rows),
           "status_counts": {str(s): int(n) for s, n in zip(*np.unique([r["status"] for r in rows], return_counts=True))}
           if rows else {},
           "p50_ms": float(np.percentile(ms, 50)) if len(ms) else None,
           "p99_ms": float(np.percentile(ms, 99)) if len(ms) else None,
           "max_ms": float(ms.max()) if len(ms) else None}
    if fault_t is not None:
        bad = [r for r in rows if r["t"] >= fault_t - 1.0 and not good(r)]
        out["recovery_s"] = round(max(r["t"] + r["ms"] / 1000 for r in bad) - fault_t, 2) if bad else 0.0
        later = [r for r in rows if r["t"] > fault_t + out["recovery_s"]]
        out["answered_after_recovery"] = len(later)
    return out
