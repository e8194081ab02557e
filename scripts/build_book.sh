#!/usr/bin/env bash
# The main command: set everything up, run the notebooks of a profile (default: the published book) and build
# the Jupyter Book into _build/html. Extra arguments go to `avss run` (e.g. --force, --only 02).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/avss run --profile "${AVSS_PROFILE:-default}" "$@"
