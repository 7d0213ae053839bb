#!/usr/bin/env bash
# Everything this project measures or checks on a GPU, in one run (a few minutes on an H100).
#
#   bash benchmarks/gpu.sh MODEL_FOLDER OUT_DIR
#
# MODEL_FOLDER: all-MiniLM-L6-v2 in sentence-transformers layout (the demo's encoder; the ST comparison needs that
# layout). Writes into OUT_DIR: cuda_checks.json (RNG replay of CUDA dropout, GradCache = full batch on CUDA, fp16 +
# GradScaler), train_step_b32.json and train_step_b128.json (full batch vs GradCache, fp32 vs fp16), the peak-memory
# sweep, and bertino vs sentence-transformers (fp32 and bf16; needs sentence-transformers installed).
set -uo pipefail
MODEL=$1
OUT=$2
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LIMIT=${STEP_LIMIT_S:-150}  # seconds per step, so that one stuck step cannot eat the machine's time
status=0
run() { echo "+ $*"; timeout "$LIMIT" "$@" || { echo "FAILED ($?): $*"; status=1; }; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
run "$PY" scripts/cuda_checks.py --model "$MODEL" --json "$OUT/cuda_checks.json"
run "$PY" benchmarks/train_step.py --model "$MODEL" --device cuda --amp fp32 low --mini-batch-sizes 8 16 32 \
    --tape default --steps 10 --json "$OUT/train_step_b32.json"
run "$PY" benchmarks/train_step.py --model "$MODEL" --device cuda --batch-size 128 --amp fp32 low \
    --mini-batch-sizes 16 32 64 --tape default --steps 10 --json "$OUT/train_step_b128.json"
run "$PY" benchmarks/train_step.py --model "$MODEL" --device cuda --no-timing --memory-sweep --no-sweep-tape \
    --sweep-batch-sizes 32 128 512 --sweep-mini-batch-size 16 --json "$OUT/train_step_memory.json"
run "$PY" benchmarks/vs_sentence_transformers.py --model "$MODEL" --device cuda --amp fp32 --steps 10 \
    --json "$OUT/vs_st_fp32.json"
run "$PY" benchmarks/vs_sentence_transformers.py --model "$MODEL" --device cuda --amp bf16 --only step --steps 10 \
    --json "$OUT/vs_st_bf16.json"
exit $status
