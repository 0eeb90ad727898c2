#!/usr/bin/env bash
# Run ON the GPU host, from the repo root, with .gpu/kit carried there (build it first: bench/gpu_kit.sh).
# Device tool:  command "bash bench/gpu_run.sh"  carry [".gpu/kit"]  timeout_s 600
# Extra arguments go to bench/gpu_ray_check.py (e.g. --stages env,data,train_dialclip --features auto).
#
# 1. installs every kit wheel offline, without dependency resolution, into $KIT_SITE (the host's own
#    packages stay as they are; the kit's shadow them through PYTHONPATH, which Ray workers inherit);
# 2. saves the host's own package list ($OUT/host_freeze.txt: feed it to `gpu_kit.sh --host FILE`);
# 3. runs bench/gpu_ray_check.py (results: bench/results/gpu_ray_check.json and $OUT/, log in $OUT/);
# 4. keeps Ray's small logs ($OUT/ray_logs.tgz) for a post-mortem.
set -uo pipefail
cd "$(dirname "$0")/.."
KIT=${KIT:-.gpu/kit}
export KIT_SITE=${KIT_SITE:-/tmp/dialclip-site}
PY=${PY:-python3}
OUTDIR=${OUT:-}
say() { echo "[gpu_run] $*"; }

compgen -G "$KIT/*.whl" >/dev/null || { say "no wheels in $KIT: run bench/gpu_kit.sh here and carry .gpu/kit"; exit 3; }
[ -n "$OUTDIR" ] && "$PY" -m pip list --format=freeze --disable-pip-version-check > "$OUTDIR/host_freeze.txt" 2>/dev/null
t0=$(date +%s)
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
  --target "$KIT_SITE" "$KIT"/*.whl || { say "kit install failed"; exit 4; }
# Byte-compile once, in parallel, so Ray's many processes do not each compile the same modules at start-up.
"$PY" -m compileall -q -j 0 "$KIT_SITE" >/dev/null 2>&1 || true
say "installed $(ls "$KIT"/*.whl | wc -l) wheels into $KIT_SITE (compiled) in $(( $(date +%s) - t0 )) s"

# The working tree first (it is what the lead is testing; the kit's dialclip_ray wheel only backs it up).
export PYTHONPATH="$PWD:$KIT_SITE${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$KIT_SITE/bin:$PATH"
export RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1
"$PY" -c 'import ray, torch, dialclip_ray; print("[gpu_run] ray", ray.__version__, "torch", torch.__version__, "cuda", torch.cuda.is_available())' \
  || { say "imports failed"; exit 5; }

"$PY" bench/gpu_ray_check.py "$@" 2>&1 | tee ${OUTDIR:+"$OUTDIR/gpu_ray_check.log"}
rc=${PIPESTATUS[0]}

if [ -n "$OUTDIR" ] && [ -d /tmp/ray/session_latest/logs ]; then
  ( cd /tmp/ray/session_latest && find logs -type f -size -2M \( -name '*.err' -o -name '*.log' -o -name 'raylet.out' \
      -o -name 'gcs_server.out' \) -print0 | tar czf "$OUTDIR/ray_logs.tgz" --null -T - ) 2>/dev/null
  [ -f "$OUTDIR/ray_logs.tgz" ] && [ "$(stat -c %s "$OUTDIR/ray_logs.tgz")" -gt 15000000 ] && rm -f "$OUTDIR/ray_logs.tgz"
fi
say "gpu_ray_check exit $rc"
exit "$rc"
