#!/usr/bin/env bash
# Everything the vLLM engine needs checked on the GPU machine, one phase per device call (<= 10 min each).
#
# From the repo root on the GPU machine:
#   bash .kit/bin/install.sh && source .kit/bin/env.sh && bash benchmarks/gpu_run.sh PHASE
# PHASE: equiv  teacher-forced equivalence, ours vs vLLM (float32, then bfloat16)     ~5 min
#        tests  pytest -m gpu tests/test_gpu.py (real uvicorn, ENGINE=vllm, dummy weights) ~5 min
#        bench  256-page PDF: raw vLLM LLM.generate vs the service's POST /pdf/ocr        ~8 min
# Logs go to $OUT (the device tool's folder; /tmp/gpu-out elsewhere). Checkpoints are written once into
# /tmp/dsocr-ckpt and reused while the machine stays up.
set -uo pipefail
phase=${1:?usage: gpu_run.sh equiv|tests|bench}
OUT=${OUT:-/tmp/gpu-out}
CK=${CKPT_DIR:-/tmp/dsocr-ckpt}
mkdir -p "$OUT" "$CK"
export PYTHONUNBUFFERED=1

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c 'import vllm, torch, transformers; print("vllm", vllm.__version__, "torch", torch.__version__,
"transformers", transformers.__version__)' 2>&1 | tail -1
} > "$OUT/env-$phase.log" 2>&1

# Real SAM/CLIP sizes + a 2-layer real-width decoder with real random weights (equivalence).
small_ckpt() {
  [ -f "$CK/small/model.safetensors" ] ||
    python3 deepseek_ocr.py make-tiny "$CK/small" --vision real --decoder small --seed 0
}
# Real-size config + tokenizer, no weights (vLLM load_format=dummy): service tests and benchmark.
real_ckpt() {
  [ -f "$CK/real/config.json" ] ||
    python3 deepseek_ocr.py make-tiny "$CK/real" --vision real --decoder real --config-only
}

case "$phase" in
  equiv)
    small_ckpt
    timeout 500 python3 benchmarks/equivalence.py --ckpt "$CK/small" --dtypes float32,bfloat16 \
      --child-timeout 200 --out "$OUT/equivalence.json" 2>&1 | tee "$OUT/equivalence.log"
    ;;
  tests)
    real_ckpt
    GPU_TEST_MODEL="$CK/real" timeout 540 python3 -m pytest -m gpu tests/test_gpu.py -v -rs \
      -p no:cacheprovider 2>&1 | tee "$OUT/tests.log"
    ;;
  bench)
    real_ckpt
    timeout 560 python3 benchmarks/bench_vllm.py all --model "$CK/real" --pages 256 --max-tokens 1000 \
      --concurrency 256 --ngram 20 50 --out "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log"
    ;;
  *)
    echo "unknown phase $phase; use equiv, tests or bench" >&2
    exit 2
    ;;
esac
status=$?
echo "phase $phase exit $status" | tee -a "$OUT/env-$phase.log"
exit "$status"
