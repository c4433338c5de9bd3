#!/usr/bin/env bash
# Local run (what `make run` uses): the default SRFT job on this machine's CPU
# (or its GPUs, if jax-cuda is installed). Extra flags pass through, e.g.
#   bash launch/local.sh --workdir=runs/x --config.steps=50
#   bash launch/local.sh --dry-run
#   bash launch/local.sh --supervise --workdir=runs/x   # restarted until results.json exists
# --supervise runs the job under srft_jax/supervise.py: a job that dies is
# restarted (it resumes from its checkpoints) with backoff, until
# WORKDIR/results.json exists; its options --max_stalled_restarts=N,
# --backoff_s=S, --backoff_max_s=S, --state_dir=DIR go to the supervisor.
# Stop it with Ctrl-C or `kill PID` (WORKDIR/supervise.pid); events: WORKDIR/supervise.log.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
CONFIG=${CONFIG:-configs/default.py}
DRY=0 SUPERVISE=0
WORKDIR=runs/default  # srft_jax/main.py's default
ARGS=() SUP=()
prev=""
for a in "$@"; do
  case "$a" in
    --dry-run) DRY=1 ;;
    --supervise) SUPERVISE=1 ;;
    --max[-_]stalled[-_]restarts=*|--backoff[-_]s=*|--backoff[-_]max[-_]s=*|--state[-_]dir=*)
      k="${a%%=*}"; k="${k#--}"; SUP+=("--${k//-/_}=${a#*=}") ;;
    *)
      ARGS+=("$a")
      case "$a" in --workdir=*) WORKDIR="${a#*=}" ;; esac
      [ "$prev" != "--workdir" ] || WORKDIR="$a" ;;
  esac
  prev="$a"
done
CMD=("$PY" -m srft_jax.main "--config=$CONFIG" "${ARGS[@]}")
if [ "$SUPERVISE" = 1 ]; then
  CMD=("$PY" -m srft_jax.supervise "--workdir=$WORKDIR" "${SUP[@]}" -- "${CMD[@]}")
fi
if [ "$DRY" = 1 ]; then
  printf '%q ' "${CMD[@]}"; echo  # shell-quoted: the printed line runs as is
  exit 0
fi
exec "${CMD[@]}"
