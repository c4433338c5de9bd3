#!/usr/bin/env bash
# SRFT on this host's GPUs: one process drives every local GPU (the mesh spans them).
#
#   bash launch/gpu.sh --install --config=configs/qwen2p5_1p5b_gpu.py --workdir=runs/q15 \
#       --config.model.hf_path=/models/Qwen2.5-1.5B --config.data.tokenizer=/models/Qwen2.5-1.5B
#   bash launch/gpu.sh ... --dry-run     # print the commands only
#
# Flags:
#   --install          create/refresh the venv: jax[cuda12] (or --cuda=13) + requirements
#   --cuda 12|13       CUDA major version of the jax plugin (default 12)
#   --gpus LIST        CUDA_VISIBLE_DEVICES for the run (default: all)
#   --config FILE[:ARG]  (default configs/qwen2p5_1p5b_gpu.py)
#   --workdir DIR      (default runs/gpu)
#   --venv DIR         (default .venv)
#   --supervise        restart the job until WORKDIR/results.json exists (srft_jax/supervise.py:
#                      it resumes from its checkpoints; backoff; gives up after restarts
#                      that make no progress); --max_stalled_restarts=N, --backoff_s=S,
#                      --backoff_max_s=S, --state_dir=DIR go to it. Stop: Ctrl-C or
#                      `kill PID` (WORKDIR/supervise.pid); events: WORKDIR/supervise.log
#   --dry-run
# Anything else is passed to srft_jax.main (e.g. --config.steps=100).
# Several GPU hosts: use launch/slurm.sbatch (jax.distributed finds SLURM's layout).
set -euo pipefail
cd "$(dirname "$0")/.."
CUDA=12 INSTALL=0 DRY=0 SUPERVISE=0 GPUS="" CONFIG="configs/qwen2p5_1p5b_gpu.py" WORKDIR="runs/gpu"
VENV=${VENV:-.venv}
JAX_VERSION=${JAX_VERSION:-0.10.2}
ARGS=() SUP=()
while [ $# -gt 0 ]; do
  arg="$1"; shift
  case "$arg" in
    --cuda=*) CUDA="${arg#*=}" ;;
    --cuda) CUDA="${1:?--cuda needs 12 or 13}"; shift ;;
    --gpus=*) GPUS="${arg#*=}" ;;
    --gpus) GPUS="${1:?--gpus needs a list}"; shift ;;
    --config=*) CONFIG="${arg#*=}" ;;
    --config) CONFIG="${1:?--config needs a file}"; shift ;;
    --workdir=*) WORKDIR="${arg#*=}" ;;
    --workdir) WORKDIR="${1:?--workdir needs a directory}"; shift ;;
    --venv=*) VENV="${arg#*=}" ;;
    --venv) VENV="${1:?--venv needs a directory}"; shift ;;
    --install) INSTALL=1 ;;
    --dry-run|--dry_run) DRY=1 ;;
    --supervise) SUPERVISE=1 ;;
    --max[-_]stalled[-_]restarts=*|--backoff[-_]s=*|--backoff[-_]max[-_]s=*|--state[-_]dir=*)
      k="${arg%%=*}"; k="${k#--}"; SUP+=("--${k//-/_}=${arg#*=}") ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) ARGS+=("$arg") ;;
  esac
done
case "$CUDA" in 12|13) ;; *) echo "gpu.sh: --cuda must be 12 or 13, got $CUDA" >&2; exit 2 ;; esac

show() {
  local out="+" a
  for a in "$@"; do
    if [[ "$a" =~ ^[A-Za-z0-9_./:=@,+%-]+$ ]]; then out+=" $a"; else out+=" '${a//\'/\'\\\'\'}'"; fi
  done
  echo "$out"
}
run() { if [ "$DRY" = 1 ]; then show "$@"; else "$@"; fi; }

if [ "$INSTALL" = 1 ]; then
  [ -x "$VENV/bin/python" ] || run python3 -m venv "$VENV"
  run "$VENV/bin/pip" install -q -U pip
  run "$VENV/bin/pip" install -q "jax[cuda$CUDA]==$JAX_VERSION" -r requirements.txt
  run "$VENV/bin/pip" install -q --no-deps -e .
fi
ENV=(env XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}")
[ -z "$GPUS" ] || ENV+=(CUDA_VISIBLE_DEVICES="$GPUS")
CMD=("$VENV/bin/python" -m srft_jax.main "--config=$CONFIG" "--workdir=$WORKDIR" "${ARGS[@]}")
if [ "$SUPERVISE" = 1 ]; then
  CMD=("$VENV/bin/python" -m srft_jax.supervise "--workdir=$WORKDIR" "${SUP[@]}" -- "${CMD[@]}")
fi
CMD=("${ENV[@]}" "${CMD[@]}")
if [ "$DRY" = 1 ]; then show "${CMD[@]}"; exit 0; fi
exec "${CMD[@]}"
