#!/usr/bin/env bash
# The executor on an NVIDIA GPU with the real-size Z-Image-Turbo architecture (random bf16 weights):
# seconds per 1024x1024 image at 8 steps, batch 1 and 4, images/min, peak memory. `--tiny`: CPU, CI;
# `--smoke`: `--tiny` with one timed run (make bench-smoke). Then bench/accel_check.py on the same model:
# step caching on/off (s/image, steps computed, PSNR) and ControlNet (make bench-smoke runs its own
# --smoke, so this script leaves it out there).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
if [ "${1:-}" != "--tiny" ] && [ "${1:-}" != "--smoke" ] && ! command -v nvidia-smi >/dev/null 2>&1; then
  echo "gpu_check: no NVIDIA GPU here (nvidia-smi not found); run with --tiny or --smoke for the CPU path" >&2
  exit 2
fi
"$PY" bench/gpu_check.py "$@"
if [ "${1:-}" != "--smoke" ]; then
  exec "$PY" bench/accel_check.py "$@"
fi
