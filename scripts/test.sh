#!/usr/bin/env bash
# The test suite (real local Ray, tiny offline models, moto's S3 server on loopback).
# Usage: scripts/test.sh [pytest options, e.g. -k adapt]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh dev
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest "$@"
