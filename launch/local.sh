#!/usr/bin/env bash
# Local run (what `make run` uses): the default SRFT job on this machine's CPU
# (or its GPUs, if jax-cuda is installed). Extra flags pass through, e.g.
#   bash launch/local.sh --workdir=runs/x --config.steps=50
#   bash launch/local.sh --dry-run
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
CONFIG=${CONFIG:-configs/default.py}
DRY=0
ARGS=()
for a in "$@"; do
  if [ "$a" = "--dry-run" ]; then DRY=1; else ARGS+=("$a"); fi
done
CMD=("$PY" -m srft_jax.main "--config=$CONFIG" "${ARGS[@]}")
if [ "$DRY" = 1 ]; then
  printf '%q ' "${CMD[@]}"; echo  # shell-quoted: the printed line runs as is
  exit 0
fi
exec "${CMD[@]}"
