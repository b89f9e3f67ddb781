#!/usr/bin/env bash
# Create .venv in the checkout and install mrm-ray with the given extras (default: dev).
# Idempotent: re-installs only when pyproject.toml changed.  Usage: scripts/setup.sh [extras]
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-dev}"
py="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$py" -m venv .venv
stamp=".venv/.mrm-installed-$extras-$(sha1sum pyproject.toml | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  # torch first and pinned: a CPU wheel of exactly this version is what pip finds on
  # CPU machines; letting a dependency pull torch would fetch several GB of CUDA.
  .venv/bin/python -m pip install -q "torch==2.13.0"
  # DeepSpeed (extras dev, finetune, gpu) builds from source: without its compiled ops it is pure Python and
  # installs in seconds; ZeRO needs none of them (GPU images that want fused Adam build it themselves).
  DS_BUILD_OPS="${DS_BUILD_OPS:-0}" .venv/bin/python -m pip install -q -e ".[$extras]"
  .venv/bin/python -c "import mrm_ray, torch, ray" # fail here, not later, if the install broke
  touch "$stamp"
fi
