#!/usr/bin/env bash
# The GPU check (issue 7): run on one H100/H200 whenever one is available.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]
#
# 1. sampler throughput of a Qwen2.5-1.5B-shaped bf16 model: tokens/s and the
#    fraction of peak HBM bandwidth a decode step achieves (batch 64 and 256);
# 2. the SRFT train step of the same shape (fp32 master weights, bf16 compute):
#    tokens/s and MFU (model FLOPs / step time / peak dense bf16 FLOP/s);
# 3. the model / objective / sampler tests on the GPU (multidevice tests skip).
# Each part has its own time limit and writes its JSON / log under OUT_DIR, so
# one failure does not hide the others. Needs jax with CUDA, flax, optax,
# transformers + torch (for the parity tests) and scipy. If the installed flax
# or optax cannot run the package, wheels in .whl/ (flax, optax) are used.
set -u
OUT_DIR=${1:-${OUT:-/tmp/gpu_check}}
mkdir -p "$OUT_DIR"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
smoke='import jax, flax, optax; from srft_jax import model, sampler, train; print("jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__, jax.devices())'
if ! $PY -c "$smoke"; then
  echo "installed flax/optax failed; using the wheels in .whl/"
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/srft_site .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/srft_site:$PYTHONPATH"
  $PY -c "$smoke" || exit 1
fi

part() {  # part NAME SECONDS CMD...: run with a limit, keep stdout as NAME.json, log stderr
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s)"
  local t0=$SECONDS
  timeout "$limit" "$@" >"$OUT_DIR/$name.json" 2>"$OUT_DIR/$name.log"
  local rc=$?
  echo "   rc=$rc in $((SECONDS - t0))s"
  tail -c 1500 "$OUT_DIR/$name.json"
  [ $rc -ne 0 ] && tail -n 5 "$OUT_DIR/$name.log"
  return 0
}

part sampler_b64 ${SAMPLER_LIMIT:-120} $PY benchmarks/sampler_throughput.py --device \
  --batch 64 --prompt_len 64 --new_tokens 256 --repeats 3
part sampler_b256 ${SAMPLER_LIMIT:-120} $PY benchmarks/sampler_throughput.py --device \
  --batch 256 --prompt_len 64 --new_tokens 256 --repeats 3
part train ${TRAIN_LIMIT:-180} $PY benchmarks/train_throughput.py --rows 32 \
  --prompt_len 1024 --response_len 1024 --microbatches 4 --remat dots --attention chunked
echo "== tests on the GPU"
SRFT_TEST_PLATFORM=cuda timeout ${TESTS_LIMIT:-170} $PY -m pytest -q -p no:cacheprovider \
  tests/test_model.py tests/test_objectives.py tests/test_sampler.py >"$OUT_DIR/tests.log" 2>&1
echo "   rc=$?"
tail -n 25 "$OUT_DIR/tests.log"
