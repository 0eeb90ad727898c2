#!/usr/bin/env bash
# Build .gpu/kit/ (ignored): the wheels that carry Ray and this project to the GPU host, which has no
# network and takes at most 64 MiB per run. See bench/gpu_kit.py for what goes in and why.
#
#   bash bench/gpu_kit.sh                      # cp312 manylinux x86_64, host = the GPU image's packages
#   bash bench/gpu_kit.sh --host host_freeze.txt   # exact: `pip list --format=freeze` saved by gpu_run.sh
#   bash bench/gpu_kit.sh --strip              # also strip Ray's ELF symbol tables (about 4.5 MiB less)
#
# Exits 1 when the kit does not fit the per-call budget (64 MiB - the repo's travelling size - headroom).
# Then run it there with bench/gpu_run.sh (device tool: command `bash bench/gpu_run.sh`, carry [".gpu/kit"]).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
exec "$PY" bench/gpu_kit.py "$@"
