"""Run the benchmarks in sequence: what `make bench` and `make bench-quick` call.

Default: the CPU commands behind the README's Results section, with the arguments given there,
writing bench/results/ (hours on a 2-core machine: the synthetic benchmark trains every variant).
``--quick``: a minutes-scale smoke run of the cheap benchmarks at reduced sizes, writing
runs/bench-quick/ so the published results are left alone; the training benchmarks (cost_bench,
synthetic_benchmark) are skipped there and listed as skipped (``python bench/synthetic_benchmark.py
--quick`` proves that pipeline on tiny sizes). ``bench/gpu_check.py`` needs a CUDA
GPU and runs only with ``--gpu``.

    python bench/run_all.py [--quick] [--only NAME ...] [--list] [--gpu] [--keep-going]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
QUICK_OUT = "runs/bench-quick"

# name -> (full arguments, as in README's Results; quick arguments or None = skipped in --quick)
PLAN: dict[str, tuple[list[str], list[str] | None]] = {
    "synthetic_speed": ([], ["--dialogs", "1000", "--out", QUICK_OUT]),
    "synthetic_fairness": ([], ["--dialogs", "1000", "--out", QUICK_OUT]),
    "index_bench": (["--threads", "1"], ["--sizes", "20000", "--queries", "100", "--hnsw-max", "20000",
                                         "--threads", "1", "--out", QUICK_OUT]),
    "ann_recall": ([], ["--vectors", "20000", "--queries", "100", "--data", "clustered,uniform",
                        "--out", f"{QUICK_OUT}/ann_recall"]),  # "model" data needs the benchmark's stores
    "serve_bench": (["--shards", "4"], ["--quick", "--vectors", "20000", "--shards", "1", "2", "--requests", "40",
                                        "--max-seconds", "20", "--out", f"{QUICK_OUT}/serve_bench"]),
    "mmdialog_scale": ([], ["--conversations", "20000", "--out", f"{QUICK_OUT}/mmdialog_scale.json"]),
    "cost_bench": ([], None),  # Ray Train start-up and several training subprocesses: minutes even when small
    # the protocol of docs/results.md "Synthetic benchmark" with every variant and seed (the published run
    # is its 4-variant, 1-seed subset: --variants zeroshot,finetune,default,ungated --seeds 1)
    "synthetic_benchmark": (["--epochs", "4", "--patience", "2", "--max-text-queries", "2500"], None),
    "finetune_probe": ([], None),  # trains the finetune preset seven times (about 20 min)
    "chaos": ([], None),  # kills and restarts real clusters: minutes per scenario
}
GPU = ("gpu_check", [])


def commands(quick: bool, only: list[str] | None, gpu: bool) -> tuple[list[tuple[str, list[str]]], list[str]]:
    """(name, argv) to run, and the names skipped with the reason."""
    run, skipped = [], []
    for name, (full, small) in PLAN.items():
        if only and name not in only:
            continue
        args = small if quick else full
        if args is None:
            skipped.append(f"{name} (not in --quick: it trains models)")
            continue
        run.append((name, [sys.executable, f"bench/{name}.py", *args]))  # relative: run from REPO
    if gpu and (not only or GPU[0] in only):
        run.append((GPU[0], [sys.executable, f"bench/{GPU[0]}.py", *GPU[1]]))
    elif not only or GPU[0] in only:
        skipped.append(f"{GPU[0]} (needs a CUDA GPU: pass --gpu on a GPU machine)")
    return run, skipped


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help=f"reduced sizes, results under {QUICK_OUT}/")
    ap.add_argument("--only", nargs="+", choices=[*PLAN, GPU[0]], help="run only these")
    ap.add_argument("--gpu", action="store_true", help="also run gpu_check.py (needs CUDA)")
    ap.add_argument("--list", action="store_true", help="print the commands and exit")
    ap.add_argument("--keep-going", action="store_true", help="run the rest after a failure")
    args = ap.parse_args(argv)
    plan, skipped = commands(args.quick, args.only, args.gpu)
    for name, cmd in plan:
        print(f"{name:20s} python {' '.join(cmd[1:])}")
    for line in skipped:
        print(f"skipped: {line}")
    if args.list:
        return 0
    if args.quick:
        (REPO / QUICK_OUT).mkdir(parents=True, exist_ok=True)
    results = []
    for name, cmd in plan:
        print(f"\n=== {name}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.time()
        env = {**os.environ, "OUT": str(REPO / QUICK_OUT)} if args.quick else None  # gpu_check.py writes to $OUT
        rc = subprocess.run(cmd, cwd=REPO, env=env, check=False).returncode
        results.append((name, rc, time.time() - t0))
        if rc and not args.keep_going:
            break
    print("\nbenchmark            exit   seconds")
    for name, rc, secs in results:
        print(f"{name:20s} {rc:4d} {secs:9.1f}")
    print(f"results in {QUICK_OUT}/" if args.quick else "results in bench/results/")
    failed = [n for n, rc, _ in results if rc]
    if failed or len(results) < len(plan):
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
