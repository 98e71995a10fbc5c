#!/usr/bin/env bash
# The single command a GPU-lent session runs on the device machine (see benchmarks/RESULTS.md, "GPU session").
#
#   bash scripts/gpu_session.sh [check] [tests] [step8b] [step8bcap] [step8bp50] [profile] [step1b] [bench] [families]
#                      (no argument: check step8b step8bcap step8bp50 profile tests step1b bench, in that order, inside
#                       a 570 s budget; whatever does not fit is skipped and says so)
#
# 1. check: python3 -m benchmarks.gpu_check   the tests marked `kernels` (pytest.ini) on CUDA: every Triton kernel
#                                             compiled, against float64 at the tests' tolerances, GPU-sized cases
#                                             included; then the Llama-3-8B head timed against TRL's chunked head
# 2. tests: the other model-level tests on CUDA (patch on a CUDA NF4 model, TRL integration, the trainer)
# step8b, step8bcap, step8bp50, step1b: benchmarks/step.py (the step benchmark) at the 8B shape uncapped, under a 16 GB
#           cap, and with prompts half of each row (what prefix sharing saves depends on the prompt share), and
#           group by group at the 1B shape; each comes back as $OUT/<phase>.tgz (results.json + plots;
#           step_8b.tgz and profile.tgz also hold gpu_clocks.csv: SM clock, power, throttle reasons)
# families (only when named): the head and the step at the Gemma-2-9B, Gemma-3-12B and Phi-3-mini shapes
# 3. bench: python3 -m benchmarks --quick, one level at a time (head, step, fit), each writing its own
#           results.json, so a level cut off by its timeout loses only itself
# Each phase has its own timeout inside one overall budget (GPU_SESSION_BUDGET seconds, default 570);
# a failing phase does not stop the next. Everything is tee'd to $OUT/session.log; the exit code is 1 if
# any phase failed or timed out.
#
# ---- Before the session, on the CPU machine, from the repository root (the wheels are never committed) ----
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
#     --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
#     bitsandbytes==0.50.2 trl==1.16.0 liger-kernel==0.8.5 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
#   du -sh .whl      # ~46 MB (bitsandbytes alone is 43 MB); the tree that travels must stay under 64 MiB
# The device (Python 3.12, torch 2.11, triton 3.6, transformers 5.17, accelerate, pandas, pyarrow,
# huggingface_hub, xxhash, fsspec already installed) lacks bitsandbytes, trl, liger-kernel, and trl's datasets
# with its dill and multiprocess; bitsandbytes >= 0.43 wheels are manylinux_2_24, hence that --platform.
#
# ---- The device call (one call; it starts the machine, ~1-2 min of the 15-min device budget) ----
#   run(command="bash scripts/gpu_session.sh", carry=[".whl"], timeout_s=600)
# then give_back() unless rerunning at once (a machine stays warm 30 s after a call; starting a fresh one needs
# >= 4 min of device time left). A rerun of one phase with less time, e.g. after fixing a kernel:
#   run(command="GPU_SESSION_BUDGET=240 bash scripts/gpu_session.sh check", carry=[".whl"], timeout_s=300)
# What comes back ($OUT, the device's limit of 8 files): session.log, gpu_check.json, and step_8b.tgz, step_8b_cap16.tgz,
# step_8b_p50.tgz, profile.tgz, step_1b.tgz, bench.tgz (each results.json + PNG plots; `tar xzf` them).
set -u -o pipefail

cd "$(dirname "$0")/.."
OUT="${OUT:-bench_out/gpu_session}"
mkdir -p "$OUT"
LOG="$OUT/session.log"
: > "$LOG"
BUDGET="${GPU_SESSION_BUDGET:-570}"
START=$(date +%s)
FAILED=()
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

say() { echo "[gpu_session +$(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }

# phase NAME TIMEOUT CMD...: run CMD with min(TIMEOUT, what is left of the budget), tee'd to the log.
phase() {
  local name=$1 want=$2; shift 2
  local left=$(( BUDGET - ($(date +%s) - START) - 10 ))
  local t=$(( want < left ? want : left ))
  if (( left < 20 )); then
    say "SKIP $name: only ${left}s of the ${BUDGET}s budget left"
    FAILED+=("$name(no time)")
    return
  fi
  say "BEGIN $name (timeout ${t}s): $*"
  timeout -k 10 "$t" "$@" 2>&1 | tee -a "$LOG"
  local rc=$?
  if (( rc == 124 || rc == 137 )); then
    say "TIMEOUT $name after ${t}s"
    FAILED+=("$name(timeout)")
  elif (( rc != 0 )); then
    say "FAIL $name (exit $rc)"
    FAILED+=("$name(exit $rc)")
  else
    say "OK $name"
  fi
}

# Phases write their results.json and plots under $STAGE/NAME; fold NAME packs that folder into
# $OUT/NAME.tgz (again after each phase that adds to it), so at most 8 files come back from $OUT even when a
# phase is cut off: session.log, gpu_check.json and one .tgz per phase group.
STAGE="${GPU_SESSION_STAGE:-/tmp/gpu_session_stage}"
rm -rf "$STAGE" && mkdir -p "$STAGE"
fold() {
  local name=$1
  [[ -d "$STAGE/$name" ]] && tar czf "$OUT/$name.tgz" -C "$STAGE" "$name"
  return 0
}

# clocks NAME / clocks_off: sample the GPU's SM clock, power and throttle reasons every 200 ms into
# $STAGE/NAME/gpu_clocks.csv while a phase runs (folded with its results). A step whose kernels take longer
# unprofiled than profiled, with a lower SM clock and a power throttle reason, is power-bound, not idle.
CLOCKS_PID=""
clocks() {
  mkdir -p "$STAGE/$1"
  command -v nvidia-smi > /dev/null || return 0
  local fields=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu reasons
  for reasons in clocks_event_reasons.active clocks_throttle_reasons.active; do  # newer / older drivers
    nvidia-smi --query-gpu="$reasons" --format=csv,noheader > /dev/null 2>&1 && { fields="$fields,$reasons"; break; }
  done
  nvidia-smi --query-gpu="$fields" --format=csv -lms 200 > "$STAGE/$1/gpu_clocks.csv" 2>/dev/null &
  CLOCKS_PID=$!
}
clocks_off() {
  [[ -n "$CLOCKS_PID" ]] && kill "$CLOCKS_PID" 2>/dev/null
  CLOCKS_PID=""
  return 0
}

# ---- carried wheels, then the package itself (from the tree, no dependencies, nothing fetched)
SITE=""
if [[ -z "${GPU_SESSION_NO_WHEELS:-}" ]] && compgen -G ".whl/*.whl" > /dev/null; then
  say "installing carried wheels: $(ls .whl | tr '\n' ' ')"
  if python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
       2>&1 | tee -a "$LOG"; then
    SITE=/tmp/site
  else
    say "WARNING: installing the carried wheels failed; going on without them"
  fi
else
  say "no .whl/ carried: bitsandbytes / trl / liger checks will be skipped"
fi
export PYTHONPATH="${SITE:+$SITE:}$PWD${PYTHONPATH:+:$PYTHONPATH}"

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "nvidia-smi failed"
  python3 - <<'EOF'
import importlib, platform
print("python", platform.python_version())
for name in ("torch", "triton", "transformers", "peft", "accelerate", "bitsandbytes", "trl.kernels", "liger_kernel",
             "datasets", "dpo_fast"):
    try:
        m = importlib.import_module(name)
        top = importlib.import_module(name.split(".")[0])
        print(f"{name:14s} {getattr(top, '__version__', '?'):12s} {m.__file__}")
    except Exception as exc:
        print(f"{name:14s} NOT IMPORTABLE: {type(exc).__name__}: {str(exc)[:200]}")
import torch
print("cuda available:", torch.cuda.is_available(), "|", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
EOF
} 2>&1 | tee -a "$LOG"

PHASES=("$@")
(( ${#PHASES[@]} )) || PHASES=(check step8b step8bcap step8bp50 profile tests step1b bench)
for p in "${PHASES[@]}"; do
  case "$p" in
    check)
      phase gpu_check "${GPU_CHECK_TIMEOUT:-240}" python3 -m benchmarks.gpu_check --out "$OUT" ;;
    tests)
      # the CUDA paths no CPU run reaches: patch() on a bitsandbytes-CUDA NF4 model (checkpointing, the
      # recompute skips), TRL's DPOTrainer with dpo_fast enabled, and the trainer (4-bit loading, paged 8-bit
      # AdamW, bf16 autocast). The `kernels` tests are the check phase's. No -x: show every failure (--maxfail
      # bounds the log).
      phase tests "${TESTS_TIMEOUT:-150}" python3 -m pytest -q -ra -p no:cacheprovider --maxfail=10 \
        --durations=5 tests/test_body_patch.py tests/test_checkpointing.py tests/test_patch.py tests/test_prefix_sharing.py \
        tests/test_trl_integration.py tests/test_train.py \
        -m "not kernels" -k "not short_dpo_run and not ctrl_c and not resume" ;;
    step8b)
      # the 8B step targets, 2 pairs x 2048 tokens (prompt 25% of each row): step time and peak memory at
      # 0.5x of unpatched TRL's; dpo_fast_all has prefix sharing, dpo_fast_all_unshared is the same without it;
      # dpo_fast_no_checkpointing (no recompute, all activations kept) bounds what partial recompute could buy;
      # dpo_fast_all_no_tail_skip is dpo_fast_all with the recompute running down_proj and o_proj in full
      clocks step_8b
      phase step_8b "${STEP8B_TIMEOUT:-170}" python3 benchmarks/step.py --shapes llama-3.1-8b --step-sizes 2x2048 \
        --methods trl dpo_fast dpo_fast_all dpo_fast_all_unshared dpo_fast_all_no_tail_skip \
        dpo_fast_precomputed_ref dpo_fast_no_checkpointing --step-warmup 2 \
        --step-repeats 3 --out "$STAGE/step_8b"
      clocks_off
      fold step_8b ;;
    step8bcap)
      # ... and whether that step fits a 16 GB cap (torch.cuda.set_per_process_memory_fraction)
      phase step_8b_cap16 "${STEP8BCAP_TIMEOUT:-150}" python3 benchmarks/step.py --shapes llama-3.1-8b \
        --step-sizes 2x2048 --cap-gb 16 --methods trl dpo_fast dpo_fast_all --step-warmup 1 --step-repeats 2 \
        --out "$STAGE/step_8b_cap16"
      fold step_8b_cap16 ;;
    step8bp50)
      # the same 8B step with prompts half of each row (multi-turn chat, long instructions)
      phase step_8b_p50 "${STEP8BP50_TIMEOUT:-120}" python3 benchmarks/step.py --shapes llama-3.1-8b \
        --step-sizes 2x2048 --prompt-fraction 0.5 --methods trl dpo_fast_all dpo_fast_all_unshared \
        --step-warmup 1 --step-repeats 2 --out "$STAGE/step_8b_p50"
      fold step_8b_p50 ;;
    profile)
      # where the 8B step's GPU time goes (trl, dpo_fast, dpo_fast_all), when the GPU waits, the nf4 dequantize
      # share per projection, and the issue floor (the same steps 256 wide: how long the CPU takes to issue one)
      clocks profile
      phase profile "${PROFILE_TIMEOUT:-180}" python3 benchmarks/profile_step.py --out "$STAGE/profile"
      clocks_off
      fold profile ;;
    step1b)
      # the step comparison group by group at the 1B shape
      phase step_1b "${STEP1B_TIMEOUT:-170}" python3 benchmarks/step.py --shapes llama-3.2-1b \
        --step-sizes 2x2048 --step-warmup 2 --step-repeats 7 --out "$STAGE/step_1b"
      fold step_1b ;;
    bench)
      phase bench_head "${BENCH_HEAD_TIMEOUT:-150}" python3 -m benchmarks --quick --level head --out "$STAGE/bench/head"
      fold bench
      phase bench_step "${BENCH_STEP_TIMEOUT:-150}" python3 -m benchmarks --quick --level step --out "$STAGE/bench/step"
      fold bench
      phase bench_fit "${BENCH_FIT_TIMEOUT:-200}" python3 -m benchmarks --quick --level fit --out "$STAGE/bench/fit"
      fold bench ;;
    families)
      # the other families' shapes: the fused head (Gemma 2's softcapped 256k vocabulary, Gemma 3's 262k, Phi-3's
      # 32k) and one QLoRA DPO step each, unpatched TRL vs dpo_fast; a second session's phase (after step8b)
      phase families_head "${FAMILIES_HEAD_TIMEOUT:-120}" python3 benchmarks/head.py \
        --shapes gemma-2-9b gemma-3-12b phi-3-mini --tokens 8192 --out "$STAGE/families/head"
      phase families_step "${FAMILIES_STEP_TIMEOUT:-200}" python3 benchmarks/step.py \
        --shapes gemma-2-9b gemma-3-12b phi-3-mini --step-sizes 2x1024 --methods trl dpo_fast dpo_fast_all \
        --step-warmup 1 --step-repeats 2 --out "$STAGE/families/step"
      fold families ;;
    *)
      say "unknown phase '$p' (use check, tests, step8b, step8bcap, step8bp50, profile, step1b, bench, families)"; FAILED+=("$p(unknown)") ;;
  esac
done

say "files in $OUT: $(cd "$OUT" && find . -type f | sort | tr '\n' ' ')"
if (( ${#FAILED[@]} )); then
  say "DONE with problems: ${FAILED[*]}"
  exit 1
fi
say "DONE: every phase passed"
