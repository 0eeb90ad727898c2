"""MMDialog at full size: convert a 1M-conversation file with the streaming converter, in bounded memory.

    nice -n 10 python bench/mmdialog_scale.py --conversations 1000000 [--forms jsonl array] [--processes 2]

Writes a deterministic MMDialog-format training split, ``<tmp>/<form>/train/conversations.json``,
once as JSON Lines and once as one JSON array (one line, ``json.dump`` style; the same
conversations): 2-8 turns, text items of 4-28 words and image references (``__MEDIA__`` keys,
30% starting with ``-``), about the shape of the real training split (1,059,117 conversations,
~4.5 turns, ~1.5 images each). The images do not exist, so the conversion runs with
``--no-image-check``. Each form is converted by ``dialclip data prepare --format mmdialog`` in a
child process; the resident memory of the child and all its descendants (worker processes) is
sampled from /proc every 0.2 s and summed (``peak_rss_mb``: the peak of the sum, an upper bound
since shared pages count once per process). ``ru_maxrss`` of the children is recorded too.

Results go to ``bench/results/mmdialog_scale.json``: top-level ``conversations``, ``seconds``,
``conversations_per_s`` and ``peak_rss_mb`` are the worse of the forms; ``runs`` has each form.
The machine is shared (2 cores, other jobs): the load average before and after each run and the
CPU seconds of the converter are recorded; wall seconds depend on the other jobs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORDS = ("the a my our this that dog cat beach city night sunset mountain river coffee cake friend trip photo new "
         "old look see here there today yesterday weekend love nice great cute wow amazing beautiful painted red "
         "blue green small big little from with at on in of and so very really just café naïve 東京 🙂").split()


def conversation(rng: random.Random, i: int) -> dict:
    turns = []
    for _ in range(rng.choice((2, 3, 3, 4, 4, 5, 5, 6, 7, 8))):
        items = []
        if rng.random() < 0.9:
            items.append({"__TEXT__": " ".join(rng.choices(WORDS, k=rng.randint(4, 28)))})
        if rng.random() < 0.35 or not items:
            key = f"{rng.getrandbits(62):019d}"
            items.append({"__MEDIA__": "-" + key if rng.random() < 0.3 else key})
        rng.shuffle(items)
        turns.append({"turn": items})
    return {"conversation_id": f"{i:09d}", "conversation": turns}


def generate(root: Path, n: int, forms: list[str], seed: int = 0) -> dict:
    """The same n conversations in each form; returns {form: bytes}."""
    rng = random.Random(seed)
    handles = {}
    for form in forms:
        path = root / form / "train" / "conversations.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        handles[form] = open(path, "w", encoding="utf-8", buffering=1 << 22)
    if "array" in handles:
        handles["array"].write("[")
    for i in range(n):
        line = json.dumps(conversation(rng, i), ensure_ascii=False)
        if "jsonl" in handles:
            handles["jsonl"].write(line + "\n")
        if "array" in handles:
            handles["array"].write((", " if i else "") + line)
    if "array" in handles:
        handles["array"].write("]\n")
    sizes = {}
    for form, fh in handles.items():
        fh.close()
        sizes[form] = (root / form / "train" / "conversations.json").stat().st_size
    return sizes


def _tree_rss(root_pid: int) -> tuple[int, int, int]:
    """(sum of VmRSS over root_pid and its descendants, largest single process, process count), bytes."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(b")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    total = largest = count = 0
    todo = [root_pid]
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, ()))
        try:
            with open(f"/proc/{pid}/status", "rb") as fh:
                for line in fh:
                    if line.startswith(b"VmRSS:"):
                        rss = int(line.split()[1]) * 1024
                        total += rss
                        largest = max(largest, rss)
                        count += 1
                        break
        except OSError:
            continue
    return total, largest, count


def run_converter(cmd: list[str], cwd: Path, env: dict) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = {"sum": 0, "largest": 0, "processes": 0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            total, largest, count = _tree_rss(proc.pid)
            peak["sum"] = max(peak["sum"], total)
            peak["largest"] = max(peak["largest"], largest)
            peak["processes"] = max(peak["processes"], count)
            stop.wait(0.2)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    out, err = proc.communicate()
    seconds = time.perf_counter() - t0
    stop.set()
    thread.join()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        raise RuntimeError(f"converter failed ({proc.returncode}): {err[-2000:]}")
    return {"seconds": round(seconds, 1), "peak_rss_mb": round(peak["sum"] / 2**20, 1),
            "peak_rss_largest_process_mb": round(peak["largest"] / 2**20, 1),
            "max_processes_seen": peak["processes"],
            "ru_maxrss_children_mb": round(after.ru_maxrss / 1024, 1),
            "cpu_seconds": round((after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime), 1),
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()], "stdout": out.strip().splitlines()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--conversations", type=int, default=1_000_000)
    ap.add_argument("--forms", nargs="+", choices=["jsonl", "array"], default=["jsonl", "array"])
    ap.add_argument("--processes", type=int, default=None, help="converter worker processes (default: its own)")
    ap.add_argument("--segment-mb", type=float, default=None)
    ap.add_argument("--tmp", default=None, help="directory for the generated input and output (default: a temp dir)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "mmdialog_scale.json"))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="mmdialog_scale-", dir=args.tmp))
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    try:
        t0 = time.perf_counter()
        sizes = generate(tmp, args.conversations, args.forms, args.seed)
        gen_seconds = time.perf_counter() - t0
        print(f"generated {args.conversations} conversations in {gen_seconds:.0f} s: "
              f"{ {f: round(s / 2**20) for f, s in sizes.items()} } MiB", flush=True)
        runs = []
        for form in args.forms:
            out = tmp / f"out-{form}"
            opts = ["--no-image-check", "--quiet"]
            if args.processes is not None:
                opts += ["--processes", str(args.processes)]
            if args.segment_mb is not None:
                opts += ["--segment-mb", str(args.segment_mb)]
            cmd = [sys.executable, "-m", "dialclip_ray.cli", "data", "prepare", "--format", "mmdialog",
                   "--input", str(tmp / form), "--out", str(out), *opts]
            res = run_converter(cmd, REPO, env)
            meta = json.loads((out / "meta.json").read_text(encoding="utf-8"))
            import pyarrow.parquet as pq

            shards = sorted((out / "examples").glob("part-*.parquet"))
            rows = sum(pq.read_metadata(p).num_rows for p in shards)
            assert rows == meta["counts"]["examples"], (rows, meta["counts"])
            assert meta["counts"]["conversations"] == args.conversations, meta["counts"]
            output_bytes = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
            res["stdout"] = [line.replace(str(tmp), "<tmp>") for line in res["stdout"]]  # no absolute paths
            run = {"form": form, "conversations": args.conversations,
                   "seconds": res["seconds"],
                   "conversations_per_s": round(args.conversations / res["seconds"]),
                   "peak_rss_mb": res["peak_rss_mb"],
                   **{k: v for k, v in res.items() if k not in ("seconds", "peak_rss_mb")},
                   "command": " ".join(["python -m dialclip_ray.cli", *cmd[3:]]).replace(str(tmp), "<tmp>"),
                   "files": 1, "input_mib": round(sizes[form] / 2**20, 1),
                   "output_mib": round(output_bytes / 2**20, 1), "examples": meta["counts"]["examples"],
                   "images": meta["counts"]["images"], "texts": meta["counts"]["texts"],
                   "shards": len(shards), "segments": meta["streaming"]["segments"],
                   "workers": meta["streaming"]["processes"], "segment_bytes": meta["streaming"]["segment_bytes"],
                   "batch_rows": meta["streaming"]["batch_rows"],
                   "max_batch_rows": meta["streaming"]["max_batch_rows"],
                   "buckets": meta["streaming"]["buckets"],
                   "worker_max_rss_mb": meta["streaming"].get("worker_max_rss_mb"),
                   "converter_timings_s": meta["timings_s"]}
            runs.append(run)
            print(json.dumps({k: v for k, v in run.items() if k != "stdout"}), flush=True)
            shutil.rmtree(out)
        worst = {"conversations": args.conversations, "seconds": max(r["seconds"] for r in runs),
                 "conversations_per_s": min(r["conversations_per_s"] for r in runs),
                 "peak_rss_mb": max(r["peak_rss_mb"] for r in runs), "peak_rss_limit_mb": 2048,
                 "forms": [r["form"] for r in runs]}
        result = {**worst,
                  "note": "top-level numbers are the worse of the forms; peak_rss_mb = peak of the summed RSS of "
                          "the converter process and its worker processes (sampled every 0.2 s). Measured on a "
                          "shared machine (2 cores, other engineers' jobs running, this benchmark under nice): "
                          "wall seconds depend on their load; cpu_seconds is the converter's own CPU time.",
                  "machine": {"cpus": os.cpu_count(), "niceness": os.nice(0), "python": sys.version.split()[0]},
                  "generate_seconds": round(gen_seconds, 1),
                  "generator": "bench/mmdialog_scale.py (seeded, 2-8 turns, text 4-28 words, ~35% of turns with an "
                               "image key; images not created: --no-image-check)",
                  "runs": runs,
                  "created": time.strftime("%Y-%m-%d %H:%M:%S")}
        out_path = Path(args.out)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {out_path.relative_to(REPO) if out_path.is_relative_to(REPO) else out_path}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
