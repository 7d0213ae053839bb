#!/usr/bin/env bash
# Everything this project measures or checks on a GPU, in one run (≈ 8 minutes on an H200; each command capped,
# 14 minutes at most in all).
#
#   bash benchmarks/gpu.sh MODEL_FOLDER OUT_DIR
#   DRY_RUN=1 bash benchmarks/gpu.sh MODEL_FOLDER OUT_DIR     # the same commands on the CPU with tiny sizes
#
# MODEL_FOLDER: all-MiniLM-L6-v2 in sentence-transformers layout (the demo's encoder; its tokenizer cuts the demo
# texts for the MiniLM table). ST_PYTHON (default: $PYTHON, else python3) is an environment with
# sentence-transformers for its steps; without one those rows are left out and the log says so.
# Writes into OUT_DIR:
#   cuda_checks.json          scripts/cuda_checks.py: RNG replay of CUDA dropout, GradCache = full batch, fp16 +
#                             GradScaler, and the fast path (captured graphs, pass 3's masks, = the full batch with
#                             dropout on, fp16, no host sync, DDP's one all-reduce, the memory probe, fused AdamW)
#   card_step_distilbert.json benchmarks/card_step.py: DistilBERT-base at the card's shapes (B = 128 × 4 texts,
#                             max length 256, C = 16, fp16 + GradScaler; the STS step, 128 pairs): every variant
#                             and sentence-transformers, ms/step, tokens/s, MFU, the recipe's estimate
#   card_step_minilm.json     the same for MiniLM at the card's batch on the demo's texts (max length 64): the
#                             issue's "GradCache ≤ 3× the one-tensor full batch" and "≤ 0.25× sentence-transformers"
#                             (both tables include the fused-vs-multi-tensor AdamW pair: the new default of issue 20)
#   host_cpu_profile.json     issue 20's levers on the GPU machine's host CPU (an Intel Xeon: MKL has its AVX-512
#   host_cpu_speedups.json    code there), 2 threads: benchmarks/profile_step.py (where a step's time goes, fp32 and
#                             bf16) and train_step.py with speedups.onednn_linear on/off and the multi-tensor AdamW
#                             — whether "auto" should turn oneDNN on for Intel CPUs too
# With PREVIOUS=1 it also reruns the earlier tables (train_step.py at B = 32 / 128, the memory sweep,
# vs_sentence_transformers.py in fp32 and bf16), ≈ 4 more minutes.
set -uo pipefail
MODEL=$1
OUT=$2
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
ST_PY=${ST_PYTHON:-$PY}
status=0
# each command capped; the CPU dry run (slower, and often on a shared machine) gets 10 minutes per command
run() { local limit=$1; shift; [ "${DRY_RUN:-0}" = 1 ] && limit=600
        echo "+ $*"; timeout "$limit" "$@" || { echo "FAILED ($?): $*"; status=1; }; }

if [ "${DRY_RUN:-0}" = 1 ]; then  # every command below, on the CPU, with tiny sizes
  DEV=cpu; CHECKS=(--device cpu --fp16); AMP=fp32; LOW=low
  CARD=(--shape tiny --max-length 32 --batch-size 8 --mini-batch-size 4 --sts-pairs 8 --steps 1 --warmup 1)
  MINI=(--max-length 64 --batch-size 8 --mini-batch-size 4 --sts-pairs 8 --steps 1 --warmup 1)
  STEP=(--steps 1 --warmup 0); B32=(--batch-size 8); B128=(--batch-size 16); SWEEP=(--sweep-batch-sizes 4 8)
  VS=(--only step); HOST_PROFILE=(--batch-size 4 --steps 1 --warmup 0 --gemm-reps 2)
  HOST_STEP=(--batch-size 4 --steps 1 --warmup 0)
else
  DEV=cuda; CHECKS=(); AMP=fp16; LOW=low
  CARD=(--shape distilbert-base --max-length 256 --batch-size 128 --mini-batch-size 16 --steps 8 --warmup 3)
  MINI=(--max-length 64 --batch-size 128 --mini-batch-size 16 --steps 10 --warmup 3)
  STEP=(--steps 10); B32=(); B128=(--batch-size 128); SWEEP=(--sweep-batch-sizes 32 128 512); VS=()
  HOST_PROFILE=(--steps 3 --warmup 1); HOST_STEP=(--steps 4)
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
"$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
ST=(--st-python "$ST_PY")
if ! "$ST_PY" -c "import sentence_transformers" 2>/dev/null; then
  echo "note: $ST_PY has no sentence-transformers: its rows are left out (set ST_PYTHON)"; ST=()
fi
run 150 "$PY" scripts/cuda_checks.py --model "$MODEL" ${CHECKS[@]+"${CHECKS[@]}"} --json "$OUT/cuda_checks.json"
run 240 "$PY" benchmarks/card_step.py --device "$DEV" --lengths card --amp "$AMP" "${CARD[@]}" \
    ${ST[@]+"${ST[@]}"} --json "$OUT/card_step_distilbert.json"
run 150 "$PY" benchmarks/card_step.py --device "$DEV" --shape minilm --lengths demo --tokenizer "$MODEL" \
    --amp "$AMP" "${MINI[@]}" ${ST[@]+"${ST[@]}"} --json "$OUT/card_step_minilm.json"
# issue 20's CPU levers on this machine's host CPU (2 threads, as the project's CPU measurements)
run 120 env OMP_NUM_THREADS=2 "$PY" benchmarks/profile_step.py --model "$MODEL" --amp fp32 bf16 \
    ${HOST_PROFILE[@]+"${HOST_PROFILE[@]}"} --json "$OUT/host_cpu_profile.json"
run 180 env OMP_NUM_THREADS=2 "$PY" benchmarks/train_step.py --model "$MODEL" --device cpu --amp fp32 low \
    --mini-batch-sizes 8 --no-bucketed --tape --speedups '{"onednn_linear": false}' '{"onednn_linear": true}' \
    '{"adamw_fused": false}' "${HOST_STEP[@]}" --json "$OUT/host_cpu_speedups.json"
if [ "${PREVIOUS:-0}" = 1 ]; then
  run 150 "$PY" benchmarks/train_step.py --model "$MODEL" --device "$DEV" --amp fp32 "$LOW" \
      --mini-batch-sizes 8 16 32 --tape default "${STEP[@]}" ${B32[@]+"${B32[@]}"} --json "$OUT/train_step_b32.json"
  run 150 "$PY" benchmarks/train_step.py --model "$MODEL" --device "$DEV" "${B128[@]}" --amp fp32 "$LOW" \
      --mini-batch-sizes 16 32 64 --tape default "${STEP[@]}" --json "$OUT/train_step_b128.json"
  run 150 "$PY" benchmarks/train_step.py --model "$MODEL" --device "$DEV" --no-timing --memory-sweep --no-sweep-tape \
      "${SWEEP[@]}" --sweep-mini-batch-size 16 --json "$OUT/train_step_memory.json"
  run 150 "$ST_PY" benchmarks/vs_sentence_transformers.py --model "$MODEL" --device "$DEV" --amp fp32 \
      "${STEP[@]}" ${B32[@]+"${B32[@]}"} ${VS[@]+"${VS[@]}"} --json "$OUT/vs_st_fp32.json"
  [ "$DEV" = cuda ] && run 150 "$ST_PY" benchmarks/vs_sentence_transformers.py --model "$MODEL" --device cuda \
      --amp bf16 --only step --steps 10 --json "$OUT/vs_st_bf16.json"
fi
exit $status
