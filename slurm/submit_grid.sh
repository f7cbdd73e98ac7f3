#!/usr/bin/env bash
# Submit one slurm/train.sbatch job per run of params.yaml (or of the runs named), each
# after the job of the run its `init: {run: ...}` names (a ready grid goes into params.yaml
# first: iln config configs/X.yaml). Extra sbatch options go first:
#   slurm/submit_grid.sh --nodes 2 --time 3-00:00:00 -- [RUN ...]
# Then, when every job has finished: dvc commit train@RUN ... and dvc repro for the rest.
set -euo pipefail
cd "$(dirname "$0")/.."
python="${ILN_PYTHON:-.venv/bin/python}"
options=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do options+=("$1"); shift; done
[ "${1:-}" = "--" ] && shift

# "RUN SOURCE" lines, sources first (SOURCE is - for a run trained from scratch)
plan="$("$python" - "$@" <<'PY'
import sys
from iln.config.params import ParamsError, load_params, resolve_run

try:
    params = load_params("params.yaml")
    for name in sys.argv[1:]:
        resolve_run(params, name)  # an unknown name: one line listing the runs
except ParamsError as err:
    sys.exit(f"error: {err}")
wanted = sys.argv[1:] or list(params.runs)
order, seen = [], set()

def visit(name):
    if name in seen:
        return
    seen.add(name)
    init = params.runs[name].init
    if init is not None and init.run is not None:
        visit(init.run)
    order.append(name)

for name in wanted:
    visit(name)
for name in order:
    init = params.runs[name].init
    print(name, init.run if init is not None and init.run else "-")
PY
)"

declare -A job
while read -r run source; do
  dependency=()
  if [ "$source" != "-" ] && [ -n "${job[$source]:-}" ]; then
    dependency=(--dependency "afterok:${job[$source]}")
  fi
  id="$(sbatch --parsable "${options[@]}" "${dependency[@]}" --job-name "iln-$run" \
        slurm/train.sbatch "$run")"
  job[$run]="$id"
  echo "train@$run: job $id${dependency:+ (after ${job[$source]})}"
done <<< "$plan"
