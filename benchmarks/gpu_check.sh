#!/usr/bin/env bash
# GPU checks of the MoE hot path, in one call on a GPU machine (one H100/H200 is enough).
#
#   OUT=/some/dir bash benchmarks/gpu_check.sh          # from the repository root, ~5 min on an H200
#   OUT=/tmp/x bash benchmarks/gpu_check.sh --cpu       # the same steps, small, on a CPU machine
#
# Needs torch, megatron-core, transformers, safetensors, pyyaml importable by $PYTHON (default
# python3; put missing wheels on PYTHONPATH beforehand); installs nothing, needs no internet.
# Every step is independent (a failing step does not stop the rest), has its own time limit, and
# the whole run stays within BUDGET_S seconds (default 420). Each step prints PASS, FAIL or SKIP
# with the reason to summary.txt. Files under $OUT (default ./gpu_check_out):
#   summary.txt       one line per step, and NOTE lines (versions, ratios, generated text)
#   gpu_check.log     every step's full output
#   gpu_<date>.json/.md   bench_block's results (cpu_<date>.* with --cpu)
#   profile.json      the profile step's time by category and top ops
# STEPS="train cpu" runs only those steps (each step needs only the steps before it in its own
# group: train, cpu, back, hf in that order). Steps:
#   env        GPU, torch, megatron-core, Transformer Engine versions, the fusions chosen
#   reference  the block (grouped_mm) in fp32 and bf16 against the tests' per-token reference
#   syncs      16B-shape block forward+backward (bf16, grouped_mm, EP=1) under
#              torch.cuda.set_sync_debug_mode("error") and the host-sync counter: no host sync
#   te         tests/test_te.py, TE vs grouped_mm in bf16 (SKIP where TE does not import)
#   fp8        tests/test_te.py, an FP8 step with padded expert rows (SKIP without TE)
#   bench      bench_block.py: 16B layer, 16k tokens, bf16, balanced and skewed routing; block vs
#              dense-equivalent time, Megatron-core's MoELayer
#   profile    where that time goes: device time per op (torch.profiler) of the block and the
#              dense-equivalent, summed into GEMMs, row moves, activation, other (profile.json)
#   train      dsmoe-train of the tiny model in bf16, one GPU (torchrun, world size 1), saved
#   cpu        resume that checkpoint on the CPU in fp32 (CUDA hidden, plain python), 2 iterations,
#              save
#   back       resume the CPU-written checkpoint on the GPU in bf16, 2 iterations, save
#   hf         dsmoe-convert to-hf of the result, then transformers loads it and generates

set +e -u
MODE=gpu
[ "${1:-}" = --cpu ] && MODE=cpu
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
OUT=${OUT:-$ROOT/gpu_check_out}
BUDGET_S=${BUDGET_S:-420}
LIMIT_SCALE=1  # --cpu: slower, and a shared CPU machine may be loaded
PY=${PYTHON:-python3}
RUN=$(mktemp -d /tmp/gpu_check.XXXXXX)
mkdir -p "$OUT"
LOG=$OUT/gpu_check.log
SUMMARY=$OUT/summary.txt
: >"$LOG"
: >"$SUMMARY"
START=$(date +%s)
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
export PYTHONWARNINGS=ignore KINETO_LOG_LEVEL=5 PYTHONUNBUFFERED=1
SKIP=77  # exit status a check uses for "cannot run here"

# step NAME LIMIT_S COMMAND...: run with min(LIMIT_S, time left); PASS / FAIL / SKIP + reason.
step() {
  local name=$1 limit=$2
  shift 2
  [ -n "${STEPS:-}" ] && [[ " $STEPS " != *" $name "* ]] && return
  local left=$((BUDGET_S - ($(date +%s) - START)))
  if [ "$left" -lt 20 ]; then
    echo "SKIP $name: the time budget (${BUDGET_S}s) is spent" | tee -a "$SUMMARY"
    return
  fi
  limit=$((limit * LIMIT_SCALE))
  [ "$limit" -gt "$left" ] && limit=$left
  local t0 out=$RUN/$name.out
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >"$out" 2>&1
  local rc=$? took=$(($(date +%s) - t0))
  { echo "===== $name (limit ${limit}s, rc $rc, ${took}s): $*"; cat "$out"; } >>"$LOG"
  local last  # the reason: an error line where there is one, else the last line
  last=$( (grep -E '^dsmoe-[a-z-]+: ' "$out" || grep -E '^[A-Za-z_.]*Error|^SKIPPED|^FAILED' "$out" |
    grep -v ChildFailedError || grep -v '^\s*$' "$out") | grep -v '^NOTE: ' | tail -n 1 | cut -c1-300)
  case $rc in
    0) echo "PASS $name (${took}s)" ;;
    "$SKIP") echo "SKIP $name: $last" ;;
    124 | 137) echo "FAIL $name: timed out after ${limit}s; last line: $last" ;;
    *) echo "FAIL $name (rc $rc, ${took}s): $last" ;;
  esac | tee -a "$SUMMARY"
  grep '^NOTE: ' "$out" | sed "s/^NOTE: /  $name: /" | tee -a "$SUMMARY"
}

# need_te: SKIP (77) with the reason where Transformer Engine does not import.
need_te() {
  "$PY" -c "import transformer_engine.pytorch" >/dev/null 2>&1 ||
    { echo "Transformer Engine not installed (does not import)"; return $SKIP; }
}
# pytest_step ARGS: like pytest, but SKIP (77) when nothing passed and something was skipped.
pytest_step() {
  need_te || return $SKIP
  "$PY" -m pytest -q -p no:cacheprovider -rs "$@" | tee "$RUN/pytest.out"
  local rc=${PIPESTATUS[0]}
  if [ "$rc" -eq 0 ] && ! grep -q ' passed' "$RUN/pytest.out"; then
    grep SKIPPED "$RUN/pytest.out" | tail -n 1
    return $SKIP
  fi
  return "$rc"
}

if [ "$MODE" = gpu ]; then
  GPU_ONLY=()
  BENCH=(--shapes 16B --tokens 16384 --repeats 5)
  ITERS=(train_iters=24 20 22)  # schedule length, stop of `train`, stop of `cpu`
  LAUNCH=("$PY" -m torch.distributed.run --standalone --nproc-per-node=1)
else
  GPU_ONLY=(env CUDA_VISIBLE_DEVICES=)
  LIMIT_SCALE=5
  BUDGET_S=${BUDGET_S_CPU:-3600}
  BENCH=(--shapes small --tokens 512 --repeats 1)
  ITERS=(train_iters=8 4 6)
  LAUNCH=(env CUDA_VISIBLE_DEVICES= "$PY" -m torch.distributed.run --standalone --nproc-per-node=1)
fi
CHECK=(${GPU_ONLY[@]+"${GPU_ONLY[@]}"} "$PY" benchmarks/gpu_check.py)

step env 60 "${CHECK[@]}" env
step reference 120 "${CHECK[@]}" reference
step syncs 120 "${CHECK[@]}" syncs
export -f need_te pytest_step
export PY RUN SKIP
step te 150 bash -c 'pytest_step tests/test_te.py -k bf16'
step fp8 120 bash -c 'pytest_step tests/test_te.py -k fp8'

step bench 240 bash -c "${GPU_ONLY[*]+${GPU_ONLY[*]}} $PY benchmarks/bench_block.py ${BENCH[*]} \
  --routing balanced skewed --out $OUT && $PY benchmarks/gpu_check.py bench-summary \
  \$(ls -t $OUT/*_????-??-??.json | head -n 1)"
step profile 120 "${CHECK[@]}" profile "$OUT"

TRAIN=(yaml_configs/tiny.yaml model_parallel.bf16=true "save=$RUN/ckpt" "tensorboard_dir=$RUN/tb"
       "${ITERS[0]}" lr_warmup_iters=2 eval_interval=1000 eval_iters=1 log_interval=2 save_interval=1000)
step train 150 "${LAUNCH[@]}" -m dsmoe_megatron.train "${TRAIN[@]}" --stop-at "${ITERS[1]}"
step cpu 150 env CUDA_VISIBLE_DEVICES= "$PY" -m dsmoe_megatron.train "${TRAIN[@]}" \
  model_parallel.bf16=false --resume --stop-at "${ITERS[2]}"
step back 120 "${LAUNCH[@]}" -m dsmoe_megatron.train "${TRAIN[@]}" --resume
step hf 150 bash -c "${GPU_ONLY[*]+${GPU_ONLY[*]}} $PY -m dsmoe_megatron.convert to-hf \
  --checkpoint $RUN/ckpt --out $RUN/hf && ${GPU_ONLY[*]+${GPU_ONLY[*]}} \
  $PY benchmarks/gpu_check.py generate $RUN/hf"

echo "total $(($(date +%s) - START))s ($MODE mode); full output in $LOG" | tee -a "$SUMMARY"
rm -rf "$RUN"
