#!/usr/bin/env bash
# The main job end to end on the embedded default (local Ray, local files, small offline model).
# Usage: scripts/demo.sh [mrm demo options, e.g. --workdir /tmp/demo]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh demo
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0 TOKENIZERS_PARALLELISM=false
exec .venv/bin/mrm demo "$@"
