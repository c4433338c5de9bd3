#!/usr/bin/env bash
# SRFT on a Cloud TPU VM slice: create (or reuse) the slice, put the project on
# every worker, install jax[tpu] + requirements, and start the same training
# command on all workers (`gcloud compute tpus tpu-vm ssh --worker=all`).
#
#   bash launch/tpu_pod.sh --name=srft7b --zone=us-east5-a --accelerator-type=v5p-64 \
#       --bucket=gs://my-bucket --config=configs/srft_7b_tpu.py \
#       --model-gcs=gs://my-bucket/models/Qwen2.5-Math-7B --data-gcs=gs://my-bucket/data --spot
#   bash launch/tpu_pod.sh ... --spot --queued --supervise   # spot capacity through the queue
#   bash launch/tpu_pod.sh ... --dry-run        # print the commands, touch nothing
#
# Flags (all --flag=value or --flag value):
#   --name NAME              TPU VM name (required)
#   --zone ZONE              e.g. us-east5-a (v5p), us-west4-a (v5e) (required)
#   --accelerator-type T     e.g. v5p-64 (v4/v5p count TensorCores: 2 a chip),
#                            v5litepod-16, v6e-16
#   --topology GEN:SHAPE     alternative to --accelerator-type, e.g. v5p:2x4x4
#   --version V              TPU software version (default by generation)
#   --project P              gcloud project (default: gcloud's)
#   --spot | --preemptible   cheaper, can be reclaimed; rerun the same command to resume
#                            (or add --supervise)
#   --queued                 get the slice through a queued resource named NAME (its node,
#                            the TPU VM, is NAME too): `queued-resources create`, then wait
#                            while it is ACCEPTED / WAITING_FOR_RESOURCES / PROVISIONING until
#                            ACTIVE; a SUSPENDED (reclaimed) or FAILED request is deleted
#                            (--force) and created again. With --spot (not --preemptible).
#                            The wait polls every QUEUE_POLL_S (default 30) seconds.
#   --valid-until D          with --queued: the request fails if not ACTIVE within D
#                            (gcloud's --valid-until-duration, e.g. 6h, 2d)
#   --bucket gs://B          workdir = gs://B/runs/NAME unless --workdir is given
#   --workdir gs://...       everything the run writes (shared by all workers): checkpoints,
#                            logs, TensorBoard, plots, results.json, the HF export
#   --config FILE[:ARG]      training config (default configs/srft_7b_tpu.py)
#   --model-gcs gs://...     HF checkpoint dir: model.hf_path and data.tokenizer (each
#                            worker copies it once into ~/.cache/srft_jax, every file
#                            checked against the bucket's hash, and reuses the copy)
#   --data-gcs gs://...      prepared TFDS data_dir (copied and checked the same way)
#   --repo URL [--ref REF]   git clone on every worker instead of copying this tree
#   --resume                 the slice and install exist: only (re)start training.
#                            Training always resumes from WORKDIR/checkpoints, so after a
#                            preemption rerun the same command (a preempted slice is
#                            deleted and recreated, then the install runs again).
#   --foreground             stay attached (default: start detached under nohup)
#   On a slice that exists, a trainer an earlier launch started is first sent SIGTERM
#   and waited for (it checkpoints; STOP_WAIT_S, default 1200 s) before anything runs.
#   --stop                   only stop the trainer (SIGTERM, wait for its checkpoint); keep the slice
#   --supervise              stay here and keep the run going until WORKDIR/results.json exists
#                            (srft_jax/supervise.py, TPU mode; run it on an always-on machine,
#                            not the slice): each round looks at the slice with `describe`,
#                            recreates a preempted or missing one (a quota or capacity error:
#                            backoff, try again), and runs this script with --foreground
#                            (--resume once installed). Stop: Ctrl-C or `kill PID` (PID printed,
#                            and in runs/supervise/NAME/supervise.pid beside supervise.log);
#                            the trainers checkpoint and stop, the slice is kept. Its options:
#                            --max-stalled-restarts N (5), --backoff-s S (10), --backoff-max-s S
#                            (600), --poll-s S (30), --state-dir DIR (runs/supervise/NAME).
#                            With --queued it looks at the request instead: waits while it
#                            is queued, recreates a SUSPENDED or FAILED one (docs/method.md §14.2)
#   --dry-run                print every command instead of running it
# Anything else (e.g. --config.steps=100) is passed to srft_jax.main.
set -euo pipefail
cd "$(dirname "$0")/.."

NAME="" ZONE="" ACCEL="" TOPOLOGY="" VERSION="" PROJECT="" SPOT="" BUCKET="" WORKDIR=""
CONFIG="configs/srft_7b_tpu.py" MODEL_GCS="" DATA_GCS="" REPO="" REF="main"
RESUME=0 FOREGROUND=0 DRY=0 STOP=0 SUPERVISE=0 STATE_DIR="" QUEUED=0 VALID_UNTIL=""
EXTRA=()
SUP_ARGS=()  # the supervisor's own options
ROUND_ARGS=()  # what each supervised round passes back to this script
REMOTE_DIR='$HOME/srft-jax'
JAX_VERSION=${JAX_VERSION:-0.10.2}
GCSFS_VERSION=${GCSFS_VERSION:-2026.10.1}  # gs:// workdirs (srft_jax.paths, Orbax) go through gcsfs

ALL_ARGS=("$@")
need_value() { [ -n "${2:-}" ] || { echo "tpu_pod.sh: $1 needs a value" >&2; exit 2; }; }
while [ $# -gt 0 ]; do
  arg="$1"; shift
  case "$arg" in
    --*=*) key="${arg%%=*}"; val="${arg#*=}" ;;
    *) key="$arg"; val="" ;;
  esac
  takes() {  # value from --k=v or the next word
    if [ -z "$val" ]; then need_value "$key" "${1:-}"; val="$1"; return 0; fi; return 1; }
  case "$key" in
    --name) takes "${1:-}" && shift; NAME="$val" ;;
    --zone) takes "${1:-}" && shift; ZONE="$val" ;;
    --accelerator-type|--accelerator_type) takes "${1:-}" && shift; ACCEL="$val" ;;
    --topology) takes "${1:-}" && shift; TOPOLOGY="$val" ;;
    --version) takes "${1:-}" && shift; VERSION="$val" ;;
    --project) takes "${1:-}" && shift; PROJECT="$val" ;;
    --bucket) takes "${1:-}" && shift; BUCKET="${val%/}" ;;
    --workdir) takes "${1:-}" && shift; WORKDIR="$val" ;;
    --config) takes "${1:-}" && shift; CONFIG="$val" ;;
    --model-gcs|--model_gcs) takes "${1:-}" && shift; MODEL_GCS="${val%/}" ;;
    --data-gcs|--data_gcs) takes "${1:-}" && shift; DATA_GCS="${val%/}" ;;
    --repo) takes "${1:-}" && shift; REPO="$val" ;;
    --ref) takes "${1:-}" && shift; REF="$val" ;;
    --spot) SPOT="--spot" ;;
    --queued) QUEUED=1 ;;
    --valid-until|--valid_until) takes "${1:-}" && shift; VALID_UNTIL="$val" ;;
    --preemptible) SPOT="--preemptible" ;;
    --resume) RESUME=1 ;;
    --foreground) FOREGROUND=1 ;;
    --dry-run|--dry_run) DRY=1 ;;
    --stop) STOP=1 ;;
    --supervise) SUPERVISE=1 ;;
    --max-stalled-restarts|--max_stalled_restarts|--backoff-s|--backoff_s|--backoff-max-s|\
--backoff_max_s|--poll-s|--poll_s)
      takes "${1:-}" && shift; k="${key#--}"; SUP_ARGS+=("--${k//-/_}=$val") ;;
    --state-dir|--state_dir) takes "${1:-}" && shift; STATE_DIR="$val" ;;
    -h|--help) sed -n '2,60p' "$0"; exit 0 ;;
    *) EXTRA+=("$arg") ;;
  esac
done

die() { echo "tpu_pod.sh: $*" >&2; exit 2; }
[ -n "$NAME" ] || die "--name is required"
[ -n "$ZONE" ] || die "--zone is required"
[ -n "$ACCEL" ] || [ -n "$TOPOLOGY" ] || die "give --accelerator-type (e.g. v5p-64) or --topology (e.g. v5p:2x4x4)"
[ -z "$ACCEL" ] || [ -z "$TOPOLOGY" ] || die "give only one of --accelerator-type and --topology"
[ -z "$VALID_UNTIL" ] || [ "$QUEUED" = 1 ] || die "--valid-until needs --queued"
[ "$QUEUED" = 0 ] || [ "$SPOT" != "--preemptible" ] || die "--queued takes --spot, not --preemptible"
if [ -z "$WORKDIR" ]; then
  [ -n "$BUCKET" ] || die "give --bucket=gs://BUCKET (or --workdir=gs://...)"
  WORKDIR="$BUCKET/runs/$NAME"
fi
case "$WORKDIR" in gs://*) ;; *) echo "tpu_pod.sh: warning: workdir $WORKDIR is not on GCS; workers do not share it" >&2 ;; esac

GEN="${TOPOLOGY%%:*}"
[ -n "$GEN" ] || GEN="${ACCEL%%-*}"
if [ -z "$VERSION" ]; then
  case "$GEN" in
    v5p) VERSION="v2-alpha-tpuv5" ;;
    v5e|v5litepod) VERSION="v2-alpha-tpuv5-lite" ;;
    v6e) VERSION="v2-alpha-tpuv6e" ;;
    v4) VERSION="tpu-ubuntu2204-base" ;;
    *) die "no default --version for $GEN; pass --version" ;;
  esac
fi

GCLOUD=(gcloud compute tpus tpu-vm)
LOC=(--zone="$ZONE")
[ -z "$PROJECT" ] || LOC+=(--project="$PROJECT")

show() {  # one shell-quoted line, readable: only words with special characters are quoted
  local out="+" a
  for a in "$@"; do
    if [[ "$a" =~ ^[A-Za-z0-9_./:=@,+%-]+$ ]]; then out+=" $a"; else out+=" '${a//\'/\'\\\'\'}'"; fi
  done
  echo "$out"
}
run() { if [ "$DRY" = 1 ]; then show "$@"; else "$@"; fi; }
on_all() {  # run a shell command on every worker
  run "${GCLOUD[@]}" ssh "$NAME" "${LOC[@]}" --worker=all --command="$1"
}

# --queued: a queued resource NAME whose one node is the TPU VM NAME.
QR=(gcloud compute tpus queued-resources)
if [ "$QUEUED" = 1 ]; then
  CREATE=("${QR[@]}" create "$NAME" --node-id="$NAME" "${LOC[@]}" --runtime-version="$VERSION")
else
  CREATE=("${GCLOUD[@]}" create "$NAME" "${LOC[@]}" --version="$VERSION")
fi
if [ -n "$ACCEL" ]; then
  CREATE+=(--accelerator-type="$ACCEL")
else
  TYPE="${TOPOLOGY%%:*}"
  [ "$TYPE" != "v5e" ] || TYPE="v5litepod"  # the TPU API's name for v5e
  CREATE+=(--type="$TYPE" --topology="${TOPOLOGY#*:}")
fi
[ -z "$SPOT" ] || CREATE+=("$SPOT")
[ -z "$VALID_UNTIL" ] || CREATE+=(--valid-until-duration="$VALID_UNTIL")

# A trainer left running by an earlier launch (its pid file) is stopped before
# anything is reinstalled or started: SIGTERM, then wait while it writes its
# checkpoint (up to STOP_WAIT_S), so two trainers never share the TPU or workdir.
STOP_WAIT_S=${STOP_WAIT_S:-1200}
stop_trainer() {
  on_all "f=\$HOME/srft_train.pid; [ -f \$f ] || exit 0; p=\$(cat \$f); \
if kill \$p 2>/dev/null; then t=0; while kill -0 \$p 2>/dev/null && [ \$t -lt $STOP_WAIT_S ]; do \
sleep 5; t=\$((t + 5)); done; kill -9 \$p 2>/dev/null || true; fi; rm -f \$f"
}
if [ "$STOP" = 1 ]; then
  stop_trainer
  echo "# trainer stopped on every worker of $NAME (the slice is kept)"
  exit 0
fi

# --supervise: this script becomes one round of srft_jax/supervise.py, which
# stays here (an always-on machine) and reruns it until results.json exists.
if [ "$SUPERVISE" = 1 ]; then
  skip=0
  for a in "${ALL_ARGS[@]}"; do
    if [ "$skip" = 1 ]; then skip=0; continue; fi
    case "$a" in
      --supervise|--resume|--foreground|--dry-run|--dry_run|--stop) ;;
      --max-stalled-restarts=*|--max_stalled_restarts=*|--backoff-s=*|--backoff_s=*) ;;
      --backoff-max-s=*|--backoff_max_s=*|--poll-s=*|--poll_s=*|--state-dir=*|--state_dir=*) ;;
      --max-stalled-restarts|--max_stalled_restarts|--backoff-s|--backoff_s) skip=1 ;;
      --backoff-max-s|--backoff_max_s|--poll-s|--poll_s|--state-dir|--state_dir) skip=1 ;;
      *) ROUND_ARGS+=("$a") ;;
    esac
  done
  PY=${PY:-}
  if [ -z "$PY" ]; then PY=python3; [ ! -x .venv/bin/python ] || PY=.venv/bin/python; fi
  SUP=(env "PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m srft_jax.supervise
    "--workdir=$WORKDIR" "--state_dir=${STATE_DIR:-runs/supervise/$NAME}"
    "--tpu_name=$NAME" "--zone=$ZONE")
  [ -z "$PROJECT" ] || SUP+=("--project=$PROJECT")
  [ "$QUEUED" = 0 ] || SUP+=(--queued)
  SUP+=("--create_cmd=$(printf '%q ' "${CREATE[@]}")" "${SUP_ARGS[@]}")
  SUP+=(-- bash "$PWD/launch/tpu_pod.sh" "${ROUND_ARGS[@]}" --foreground)
  if [ "$DRY" = 1 ]; then show "${SUP[@]}"; exit 0; fi
  exec "${SUP[@]}"
fi

# 1. The slice: reuse a READY one, recreate a preempted one, else create.
vm_slice() {  # sets STATE (READY: reused) and RESUME
  if [ "$DRY" = 1 ]; then
    show "${GCLOUD[@]}" describe "$NAME" "${LOC[@]}" --format='value(state)'
    [ "$RESUME" = 1 ] && STATE="READY"
    echo "# (dry run: assuming state $STATE)"
  else
    STATE=$("${GCLOUD[@]}" describe "$NAME" "${LOC[@]}" --format='value(state)' 2>/dev/null || echo NOT_FOUND)
  fi
  case "$STATE" in
    READY) echo "# reusing TPU VM $NAME ($STATE)" ;;
    PREEMPTED|TERMINATED|STOPPED|FAILED)
      run "${GCLOUD[@]}" delete "$NAME" "${LOC[@]}" --quiet
      RESUME=0; STATE="NOT_FOUND" ;;
  esac
  if [ "$STATE" != "READY" ]; then
    run "${CREATE[@]}"
    RESUME=0
  fi
}
# --queued: the same through the request. Reuse an ACTIVE one, delete a SUSPENDED
# (reclaimed) or FAILED one, create a missing one, then wait until it is ACTIVE.
QR_DESCRIBE=("${QR[@]}" describe "$NAME" "${LOC[@]}" --format='value(state.state)')
QUEUE_POLL_S=${QUEUE_POLL_S:-30}
queued_slice() {  # sets STATE (READY: reused) and RESUME
  if [ "$DRY" = 1 ]; then
    show "${QR_DESCRIBE[@]}"
    [ "$RESUME" = 1 ] && STATE="ACTIVE"
    echo "# (dry run: assuming state $STATE)"
  else
    STATE=$("${QR_DESCRIBE[@]}" 2>/dev/null || echo NOT_FOUND)
  fi
  case "$STATE" in
    ACTIVE) echo "# reusing queued resource $NAME ($STATE)"; STATE="READY"; return 0 ;;
    SUSPENDED|FAILED)
      run "${QR[@]}" delete "$NAME" "${LOC[@]}" --quiet --force
      STATE="NOT_FOUND" ;;
  esac
  RESUME=0
  [ "$STATE" != "NOT_FOUND" ] || run "${CREATE[@]}"
  if [ "$DRY" = 1 ]; then
    echo "# (dry run: then every $QUEUE_POLL_S s until ACTIVE:)"
    show "${QR_DESCRIBE[@]}"
    STATE="NEW"; return 0
  fi
  while true; do
    STATE=$("${QR_DESCRIBE[@]}" 2>/dev/null || echo NOT_FOUND)
    case "$STATE" in
      ACTIVE) STATE="NEW"; return 0 ;;  # a new slice: installed, no earlier trainer
      ACCEPTED|WAITING_FOR_RESOURCES|PROVISIONING|CREATING)
        echo "# queued resource $NAME: $STATE (waiting)"; sleep "$QUEUE_POLL_S" ;;
      *) die "queued resource $NAME is $STATE (rerun, or add --supervise): $("${QR[@]}" \
describe "$NAME" "${LOC[@]}" --format='value(state.failedData.error.message)' 2>&1 || true)" ;;
    esac
  done
}
STATE="NOT_FOUND"
if [ "$QUEUED" = 1 ]; then queued_slice; else vm_slice; fi

# An earlier launch's trainer is stopped first (stop_trainer, above).
if [ "$STATE" = "READY" ]; then
  stop_trainer
fi

# 2. The project and its dependencies on every worker (skipped with --resume).
if [ "$RESUME" = 0 ]; then
  if [ -n "$REPO" ]; then
    on_all "set -e; rm -rf $REMOTE_DIR; git clone --depth 1 --branch $REF $REPO $REMOTE_DIR"
  else
    TARBALL="/tmp/srft-jax-$NAME.tar.gz"
    run tar czf "$TARBALL" --exclude=.venv --exclude=runs --exclude=.git --exclude='__pycache__' .
    run "${GCLOUD[@]}" scp "$TARBALL" "$NAME:/tmp/srft-jax.tar.gz" "${LOC[@]}" --worker=all
    on_all "set -e; rm -rf $REMOTE_DIR; mkdir -p $REMOTE_DIR; tar xzf /tmp/srft-jax.tar.gz -C $REMOTE_DIR"
  fi
  on_all "set -e; cd $REMOTE_DIR; python3 -m venv .venv; .venv/bin/pip install -q -U pip; \
.venv/bin/pip install -q 'jax[tpu]==$JAX_VERSION' -r requirements.txt 'gcsfs==$GCSFS_VERSION'; \
.venv/bin/pip install -q --no-deps -e ."
fi

# 3. The same command on every worker; jax.distributed.initialize() finds the slice.
TRAIN=(.venv/bin/python -m srft_jax.main "--config=$CONFIG" "--workdir=$WORKDIR" --config.multihost=True)
# gs:// inputs go through as they are: the job makes its own checked local copies.
[ -z "$MODEL_GCS" ] || TRAIN+=("--config.model.hf_path=$MODEL_GCS" "--config.data.tokenizer=$MODEL_GCS")
[ -z "$DATA_GCS" ] || TRAIN+=("--config.data.data_dir=$DATA_GCS")
TRAIN+=("${EXTRA[@]}")
TRAIN_Q=$(printf ' %q' "${TRAIN[@]}")
if [ "$FOREGROUND" = 1 ]; then
  on_all "cd $REMOTE_DIR && echo \$\$ > \$HOME/srft_train.pid && exec$TRAIN_Q"
else
  on_all "cd $REMOTE_DIR || exit 1; nohup$TRAIN_Q > \$HOME/srft_train.log 2>&1 < /dev/null & \
echo \$! > \$HOME/srft_train.pid"
  echo "# started on all workers; logs: ${GCLOUD[*]} ssh $NAME ${LOC[*]} --worker=0 --command='tail -f ~/srft_train.log'"
fi
echo "# workdir: $WORKDIR  (rerun this command after a preemption to resume from its checkpoints)"
