#!/usr/bin/env bash
# The test command: set everything up, then run the whole test suite (unit tests, the smoke pipeline and its
# book, and the browser check of that book). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
[ -f scripts/install_browser.sh ] && bash scripts/install_browser.sh
exec .venv/bin/python -m pytest "$@"
