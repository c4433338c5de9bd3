#!/usr/bin/env bash
# The GPU check: run on one H100/H200 whenever one is available.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]
#   PARTS="sampler_profile train_profile" bash benchmarks/gpu_check.sh OUT_DIR
#
# 1. sampler throughput of a Qwen2.5-1.5B-shaped bf16 model: tokens/s and the
#    fraction of peak HBM bandwidth a decode step achieves (batch 64 and 256),
#    the sampler's fused decode weights side by side with the params as they are;
# 2. the SRFT train step of the same shape (bf16; then fp32 master weights with
#    bf16 compute), cuDNN flash attention: tokens/s and MFU (model FLOPs / step
#    time / peak dense bf16 FLOP/s);
# 3. the model / objective / sampler tests on the GPU (multidevice tests skip).
# 4. (PARTS="packing packing_tests") sequence packing with cuDNN's packed layout:
#    packed vs padded update of the 1.5B shape, and cuDNN against the segment mask.
# Other parts (named in PARTS) look for where time goes: profiles, operand
# orders, and the Pallas decode-attention kernel (attn_sweep, decode_*_pallas,
# sampler_*_pallas, kernel_tests), e.g.
#   PARTS="attn_sweep decode_pallas decode_long_pallas decode_rl_pallas kernel_tests" \
#     bash benchmarks/gpu_check.sh OUT_DIR
# Each part has its own time limit and writes its JSON / log under OUT_DIR, so
# one failure does not hide the others. Needs jax with CUDA, flax, optax,
# transformers + torch (for the parity tests) and scipy. If the installed flax
# or optax cannot run the package, wheels in .whl/ (flax, optax) are used.
# Files: NAME.json per part, parts.log (all parts' stderr) and tests.log; a lent
# machine brings back at most 8 files, so name at most 6 parts there.
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

# Every part's stderr goes to one parts.log (fewer files to bring back).
part() {  # part NAME SECONDS CMD...: run with a limit, keep stdout as NAME.json
  local name=$1 limit=$2; shift 2
  echo "== $name (limit ${limit}s)"
  echo "== $name" >>"$OUT_DIR/parts.log"
  local t0=$SECONDS
  timeout "$limit" "$@" >"$OUT_DIR/$name.json" 2>"$OUT_DIR/part.err"
  local rc=$?
  cat "$OUT_DIR/part.err" >>"$OUT_DIR/parts.log"
  echo "   rc=$rc in $((SECONDS - t0))s"
  tail -c 1500 "$OUT_DIR/$name.json"
  [ $rc -ne 0 ] && tail -n 5 "$OUT_DIR/part.err"
  rm -f "$OUT_DIR/part.err"
  return 0
}

# PARTS picks and orders the parts (default: the check itself; the *_profile
# and variant parts are for finding where time goes).
PARTS=${PARTS:-"sampler_b64 sampler_b256 train train_fp32master tests"}
SAMPLER="$PY benchmarks/sampler_throughput.py --device --prompt_len 64 --new_tokens 256 --repeats 3"
TRAIN="$PY benchmarks/train_throughput.py --rows 32 --prompt_len 1024 --response_len 1024"
for name in $PARTS; do
  case $name in
    sampler_b64) part $name ${SAMPLER_LIMIT:-120} $SAMPLER --batch 64 ;;
    sampler_b256) part $name ${SAMPLER_LIMIT:-120} $SAMPLER --batch 256 ;;
    sampler_greedy) part $name ${SAMPLER_LIMIT:-120} $SAMPLER --batch 64 --temperature 0 ;;
    # a long cache (1,024-token prompts, 1,280 slots), the 1.5B GPU config's regime
    # (did not finish in 130 s on an H200 with both variants: two compiles and
    # 131k-token prefills each), so the default (fused) variant only
    sampler_long) part $name ${LONG_LIMIT:-300} $SAMPLER --batch 128 --prompt_len 1024 \
        --variants fused ;;
    # float32 master weights (configs/qwen2p5_1p5b_gpu.py): fused bf16 copy vs per-step casts
    sampler_fp32master) part $name ${SAMPLER_LIMIT:-150} $SAMPLER --batch 64 --param_dtype float32 ;;
    # operand order of the decode matmuls: x @ w.T (the GPU default) vs w @ x.T (CPU's)
    sampler_order) part $name ${SAMPLER_LIMIT:-150} $SAMPLER --batch 64 --variants fused,fused_wfirst ;;
    # The Pallas decode-attention kernel (ModelConfig.decode_attention="pallas"):
    # its launch settings vs XLA's attention, alone, at the three decode shapes below
    # (a mid-decode fill); the best settings go to /tmp for the decode_* parts.
    attn_sweep)
      part $name ${SWEEP_LIMIT:-150} bash -c "set -e; A='$PY benchmarks/decode_attention.py \
          --splits 1,2 --blocks 64,128'; \
        \$A --batch 64 --cache_len 320 --fill 192 --best /tmp/srft_tune_b64.json; \
        \$A --batch 128 --cache_len 1280 --fill 1152 --best /tmp/srft_tune_long.json; \
        \$A --batch 128 --cache_len 4224 --fill 4160 --best /tmp/srft_tune_rl.json" ;;
    # A decode step alone (sampler.decode_jit over a cache filled with random keys and
    # values: no prefill, one compile a variant), XLA's attention vs the kernel:
    # 64 rows x (64 + 256) slots; the 1.5B GPU config's 128 rollout rows over 1,024-token
    # prompts; and the same rows late in a long response (4,096 filled slots).
    decode_pallas) part $name ${DECODE_LIMIT:-100} $SAMPLER --decode_only --batch 64 \
        --variants fused,fused_pallas --decode_tuning /tmp/srft_tune_b64.json ;;
    decode_long_pallas) part $name ${DECODE_LIMIT:-100} $SAMPLER --decode_only --batch 128 \
        --prompt_len 1024 --variants fused,fused_pallas --decode_tuning /tmp/srft_tune_long.json ;;
    decode_rl_pallas) part $name ${DECODE_LIMIT:-100} $SAMPLER --decode_only --batch 128 \
        --prompt_len 4096 --new_tokens 128 --variants fused,fused_pallas \
        --decode_tuning /tmp/srft_tune_rl.json ;;
    # kernel profiles of one decode-only call (command buffers off: kernels keep their names)
    decode_profile) XLA_FLAGS="--xla_gpu_enable_command_buffer=" part $name \
        ${DECODE_LIMIT:-100} $SAMPLER --decode_only --batch 64 --profile 40 \
        --variants fused_pallas,fused --decode_tuning /tmp/srft_tune_b64.json ;;
    decode_rl_profile) XLA_FLAGS="--xla_gpu_enable_command_buffer=" part $name \
        ${DECODE_LIMIT:-100} $SAMPLER --decode_only --batch 128 --prompt_len 4096 \
        --new_tokens 128 --profile 40 --variants fused_pallas,fused \
        --decode_tuning /tmp/srft_tune_rl.json ;;
    # the whole sampler (prefill included), kernel vs XLA (77 s on an H200 with the
    # default 3 repeats; the long one took over 140 s)
    sampler_pallas) part $name ${SAMPLER_LIMIT:-150} $SAMPLER --batch 64 \
        --variants fused,fused_pallas --decode_tuning /tmp/srft_tune_b64.json ;;
    sampler_long_pallas) part $name ${LONG_LIMIT:-300} $PY benchmarks/sampler_throughput.py \
        --device --batch 128 --prompt_len 1024 --new_tokens 256 --repeats 2 \
        --variants fused,fused_pallas --decode_tuning /tmp/srft_tune_long.json ;;
    sampler_notriton) XLA_FLAGS="--xla_gpu_enable_triton_gemm=false" part $name \
        ${SAMPLER_LIMIT:-150} $SAMPLER --batch 64 ;;
    # Profiles run without XLA command buffers (CUDA graphs) so kernels keep their HLO names.
    sampler_profile) XLA_FLAGS="--xla_gpu_enable_command_buffer=" part $name \
        ${SAMPLER_LIMIT:-120} $SAMPLER --batch 64 --profile 40 --variants fused ;;
    # bf16 params and compute, cuDNN flash attention, no remat, 8 micro-batches
    train) part $name ${TRAIN_LIMIT:-180} $TRAIN --microbatches 8 --remat none \
        --attention cudnn --logit_chunk 4096 --param_dtype bfloat16 ;;
    # the same with float32 master weights (configs/qwen2p5_1p5b_gpu.py's numerics)
    train_fp32master) part $name ${TRAIN_LIMIT:-180} $TRAIN --microbatches 8 --remat none \
        --attention cudnn --logit_chunk 4096 --param_dtype float32 ;;
    train_profile) XLA_FLAGS="--xla_gpu_enable_command_buffer=" part $name ${TRAIN_LIMIT:-180} \
        $TRAIN --microbatches 8 --remat none --attention cudnn --logit_chunk 4096 \
        --param_dtype bfloat16 --profile 40 ;;
    train_chunked) part $name ${TRAIN_LIMIT:-180} $TRAIN --microbatches 4 --remat dots \
        --attention chunked ;;
    # Sequence packing in the update (docs/method.md §18) with cuDNN's packed layout:
    # the 1.5B shape, 32 rows of 512 + 2,048 tokens (long-tailed responses), packed
    # into slots of 4 x 5,120 tokens vs padded, one update each, side by side.
    packing) part $name ${PACKING_LIMIT:-240} $PY benchmarks/packing.py --preset qwen2_5_1_5b \
        --dtype bfloat16 --attention cudnn --remat full --scan_layers --prompt_len 512 --response_len 2048 \
        --pack_rows 4 --repeats 3 ;;
    # start to first step after a resume, compilation cache off vs on: the 1.5B GPU
    # config (random init, the built-in task, 256 new tokens; about 5 minutes)
    resume_1p5b) part $name ${RESUME_LIMIT:-420} $PY benchmarks/resume_time.py --device --in_place \
        --repeats 1 --out /tmp/srft_resume --config configs/qwen2p5_1p5b_gpu.py \
        --set model.hf_path= --set data.source=task --set data.tokenizer= \
        --set data.template=plain --set "data.prompt_buckets=[64]" \
        --set data.max_response_len=256 --set checkpoint.keep=1 ;;
    # the packing tests on the GPU: cuDNN's packed layout against the segment mask
    packing_tests)
      echo "== packing tests on the GPU"
      SRFT_TEST_PLATFORM=cuda timeout ${PACKING_TESTS_LIMIT:-150} $PY -m pytest -q -p no:cacheprovider \
        tests/test_packing.py -k "cudnn or runs or never_crosses" >"$OUT_DIR/packing_tests.log" 2>&1
      echo "   rc=$?"
      tail -n 25 "$OUT_DIR/packing_tests.log" ;;
    # the kernel's own tests, compiled through Triton
    kernel_tests)
      echo "== kernel tests on the GPU"
      SRFT_TEST_PLATFORM=cuda timeout ${KERNEL_TESTS_LIMIT:-120} $PY -m pytest -q -p no:cacheprovider \
        tests/test_decode_attention.py >"$OUT_DIR/kernel_tests.log" 2>&1
      echo "   rc=$?"
      tail -n 25 "$OUT_DIR/kernel_tests.log" ;;
    tests)
      echo "== tests on the GPU"
      SRFT_TEST_PLATFORM=cuda timeout ${TESTS_LIMIT:-170} $PY -m pytest -q -p no:cacheprovider \
        ${TESTS:-tests/test_model.py tests/test_objectives.py tests/test_sampler.py} \
        >"$OUT_DIR/tests.log" 2>&1
      echo "   rc=$?"
      tail -n 25 "$OUT_DIR/tests.log" ;;
    *) echo "unknown part $name" ;;
  esac
done
