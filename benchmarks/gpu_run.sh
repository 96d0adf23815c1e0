#!/usr/bin/env bash
# Everything the vLLM engine needs checked on the GPU machine, one phase per device call (<= 10 min each).
#
# From the repo root on the GPU machine:
#   bash .kit/bin/install.sh && source .kit/bin/env.sh && bash benchmarks/gpu_run.sh PHASE
# PHASE: views  vLLM's DeepSeek-OCR processor vs our views and token counts, every mode (no engine) ~1 min
#        equiv  teacher-forced equivalence, ours vs vLLM, every mode (float32, then bfloat16) ~6 min
#        tests  pytest -m gpu tests/test_gpu.py tests/test_gpu_ocr2.py (real uvicorn, ENGINE=vllm) ~11 min: over
#               one call with the kit install since 2026-12-07 (27 + 8 tests, 473 + 193 s): run the halves
#        tests-v1 / tests-v2  the same, one file each (when `tests` runs out of its 570 s)
#        tests-auto  tests/test_gpu.py's service tests with ENGINES_PER_GPU=auto (two engines a GPU) ~7 min
#        bench  256-page PDF: raw vLLM LLM.generate vs the service's POST /pdf/ocr        ~8 min
#        ocr2   DeepSeek-OCR-2: teacher-forced agreement ours vs vLLM (float32), then the service's
#               pages/s on the 256-page PDF                                                ~8 min
#        workers  pytest -m gpu tests/workers/test_gpu_workers.py: a vLLM worker per GPU, engine core killed, healed ~5 min
#        workers-shared  pytest -m gpu tests/workers/test_gpu_shared.py: two workers sharing GPU 0 (ENGINES_PER_GPU=2),
#               a burst, one engine core killed and healed beside its loaded neighbour             ~5-6 min
#        ngram  the n-gram guard's cost: raw vLLM, 128 pages, batched vs per-request (vllm) processor,
#               guard on and off, median of 3 runs each (one engine per processor)         ~8 min
#        ngram-test  pytest -m gpu tests/engines/test_gpu_ngram.py: batched bans == vLLM's per request  ~4 min
#        ray1 / ray2  ORCHESTRATOR=ray (nvidia-h200-x2): a one-host Ray cluster holding both GPUs, the
#               1,024-page PDF through POST /pdf/ocr on one actor (ray1), then on two (ray2)  ~6-8 min each
#        pair   (nvidia-h200-x2, standing in for two nvidia-h200 at once) raw LLM.generate on GPU 0 and cores
#               0-15 while the service runs on GPU 1 and cores 16-31: 256 pages median of REPEAT (3), then
#               four 256-page PDFs at once (1,024 pages) once                              ~9 min
#        scale  (nvidia-h200-x2) the 1,024 pages through the service on both GPUs (two local workers),
#               REPEAT (2) runs on one start                                               ~7 min
#        ray1i  (nvidia-h200-x2) ORCHESTRATOR=ray with one actor on GPU 0 (cores 0-15), 1,024 pages; beside it
#               on GPU 1 (cores 16-31) the interactive run: 64 clients of single A4 pages, raw AsyncLLM vs
#               /ocr/image/advanced, then one client                                       ~7 min
#        pair1024  (nvidia-h200-x2) as pair, the 1,024 pages only (needs the compile caches of an earlier call) ~7 min
#        ray12  (nvidia-h200-x2) one Ray cluster holding both GPUs: 1,024 pages on one actor, then on two ~9 min
#        solo   (nvidia-h200) raw LLM.generate then the service on the one GPU: FILES=1 (256 pages) both in
#               one call, REPEAT (3) runs each ~8 min; FILES=4 (1,024 pages) WHAT=raw or WHAT=service, one a
#               call                                                                        ~8 min each
#        moetune  benchmarks/tune_moe.py: fused-MoE tile sizes for this model's experts on this GPU ~9 min
#        moeab  the service on the 256-page PDF (as solo's service half) with vLLM's default fused-MoE tiles
#               (VLLM_TUNED_CONFIG_FOLDER an empty folder), then with engines/moe_configs/ (the service's
#               default), each on its own start, REPEAT (3) runs each; MOEAB_ORDER="tuned default" swaps ~8 min
#        conc   MAX_CONCURRENCY 256 then 512 on the service (CONC="256 512"), FILES (2) copies of the 256-page
#               PDF at once, REPEAT (1) runs on each start                                  ~6-8 min
#        steps  issue 30's per-step profile: raw AsyncLLM with the 256 pages sent at once, unprofiled (pages/s,
#               the engine core's CPU use), then again under vLLM's torch profiler in two windows by time after
#               the send (FILL_WINDOW "0 3": the prefills; DECODE_WINDOW "12 13.5": the full batch decoding):
#               step wall vs GPU busy, kernel time by class and by vLLM range, the memory-traffic bound ~5 min
#               ASYNC=off: the same with vLLM's async scheduling off (on by default in vLLM 0.26); ASYNC="auto
#               off": both in one call, each on its own start (~9 min);
#               STEPS_ARCH=ocr2: DeepSeek-OCR-2 on the same pages
#        shared  K raw AsyncLLM engines sharing one GPU, each with 1/K of its memory and sequences, the 256
#               pages dealt over them (benchmarks/bench_vllm.py shared): SHARED="1,2" (K=1 the baseline in the
#               same call), REPEAT (3) passes per K                                              ~6 min
#        ngramstep  the n-gram guard's time a step by batch size, bans on the device against the host path
#               (benchmarks/bench_ngram_step.py; no engine: the processor alone on the GPU)        ~1 min
#        kv     KV_CACHE_DTYPE auto (bf16) then fp8 (KV_ORDER swaps): the service on the 256-page PDF, each on its
#               own start, REPEAT (3) runs each; with MAX_CONCURRENCY=auto (KV_CONC) both measure their own
#               sequences at MAX_MODEL_LEN (2048 here: 903 image + 1,000 tokens fit)              ~8 min
#        ocr2ab  DeepSeek-OCR-2 against v1: the encoder stage a page with vLLM's mask loop and ours
#               (benchmarks/bench_ocr2_mask.py), then the service on the 256 pages, each on its own start, REPEAT (3) runs
#               each (OCR2AB="v1 ocr2 ocr2-vllmmask": OCR-2 with vLLM's own encoder-mask loop too)  ~8 min
#               MASK_BENCH=0 skips the encoder-stage benchmark
#        sam    vLLM's SAM-B on one step's 17 A4 pages: image after image, batched, batched + fused attention ~1 min
#        encab  the encoder over the whole batch (engines/vllm/encoder_batch.py) and SAM's attention without its
#               bias tensor (engines/vllm/sam_attention.py) against vLLM's encoder as it is
#               (DEEPSEEK_OCR_ENCODER=vllm): the checks and `sam` first, then the service on the 256-page PDF,
#               each on its own start, REPEAT (3) runs each (ENCAB_ORDER="vllm batched both": three) ~9 min
#        kvfp8  teacher-forced top-1 agreement of vLLM with its KV cache in fp8 against bf16, every mode, on
#               the small checkpoint (benchmarks/equivalence.py --kv-compare; two vLLM starts), KV_PAGES (6)
#               pages a case, 64 positions each                                                    ~6-8 min
#        pixab  the views as 8-bit values normalised on the GPU (DEEPSEEK_OCR_PIXELS=uint8) against vLLM's
#               floats: tests/engines/test_vllm_pixels.py, then the service on the 256-page PDF, each on its own
#               start, REPEAT (3) runs each                                                     ~9 min
#        epg    ENGINES_PER_GPU=2 (two vLLM engine workers sharing the GPU, each half its memory and sequences)
#               then 1: the service on the 256-page PDF, each on its own start, REPEAT (3) runs each; GPU load
#               each second in smi-epg.csv; EPG_ORDER="1 2" swaps                                ~9 min
#        confidence  the service on the 256-page PDF with CONFIDENCE=false, then true, each on its own start,
#               REPEAT (3) runs each; CONF_ORDER="true false" swaps                           ~8 min
#        warmdump  py-spy dumps of an engine worker and its engine core every 4 s during the warm-up ~4 min
#        scale12  (nvidia-h200-x2) 1,024 pages through the service on one local worker (GPUS=0), then on two
#               (GPUS=0,1), each on its own start                                          ~8 min
#               SCALE_GPUS="0" or "0,1" runs one half; REPEAT=3 T1=560 (or T2=560) for a median per start;
#               PROFILE=1 adds a run under py-spy (first PROFILE_S=20 s), summarised in profile-scaleN-summary.txt
#        dp     (nvidia-h200-x2) vLLM's own data parallelism (data_parallel_size=2, one AsyncLLM) on the
#               1,024 pages, to set against scale12's two independent workers            ~5 min
#        single  one client only: service (process, profiled), raw (profiled), service inline  ~7 min
#        interconf  inter's service half only, CONFIDENCE=true then false, ROUNDS (2) each  ~7 min
#        inter  the interactive run alone (GPU 0, a quiet machine for the one-client latency)    ~6 min
#               REPEAT=3: three rounds on each start, medians over them                          ~8 min
# Logs go to $OUT (the device tool's folder; /tmp/gpu-out elsewhere). Checkpoints are written once into
# /tmp/dsocr-ckpt and reused while the machine stays up.
set -uo pipefail
phase=${1:?usage: gpu_run.sh views|equiv|steps|shared|pixab|sam|encab|ocr2ab|ngramstep|kv|kvfp8|tests|tests-v1|tests-v2|bench|workers|ocr2|ngram|ngram-test|ray1|ray2|pair|pair1024|solo|scale|scale12|dp|ray1i|ray12|inter|interconf|single|moetune|moeab|conc|confidence|warmdump}
OUT=${OUT:-/tmp/gpu-out}
CK=${CKPT_DIR:-/tmp/dsocr-ckpt}
mkdir -p "$OUT" "$CK"
export PYTHONUNBUFFERED=1
[ -d /tmp/site/bin ] && export PATH=/tmp/site/bin:$PATH  # py-spy and other kit scripts

{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c 'import vllm, torch, transformers; print("vllm", vllm.__version__, "torch", torch.__version__,
"transformers", transformers.__version__)' 2>&1 | tail -1
} > "$OUT/env-$phase.log" 2>&1

# The service must import with this kit before a phase spends its call: a kit built before a requirement
# was added (2026-12-06: zipstream) otherwise fails only when the server starts, minutes in.
if ! python3 -c "import serve_ocr" > "$OUT/preflight.log" 2>&1; then
  tail -3 "$OUT/preflight.log"
  echo "the service does not import with this kit: rebuild it (bash ../shared/gpu-kit/build.sh requirements.txt)"
  exit 3
fi

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

# DeepSeek-OCR-2, real vision sizes + 2-layer decoder with weights (tests), and real-size config only (bench).
ocr2_small_ckpt() {
  [ -f "$CK/ocr2-small/model.safetensors" ] ||
    python3 deepseek_ocr.py make-tiny "$CK/ocr2-small" --arch ocr2 --vision real --decoder small --seed 0
}
ocr2_real_ckpt() {
  [ -f "$CK/ocr2-real/config.json" ] ||
    python3 deepseek_ocr.py make-tiny "$CK/ocr2-real" --arch ocr2 --vision real --decoder real --config-only
}

# The benchmark PDF, written once (concurrent runs would race to write it).
bench_pdf() {
  [ -f /tmp/bench-256.pdf ] && return 0
  python3 -c "import sys; sys.path.insert(0, 'benchmarks'); import bench_vllm
open('/tmp/bench-256.tmp', 'wb').write(bench_vllm.text_pdf(256))" && mv -f /tmp/bench-256.tmp /tmp/bench-256.pdf
}
# Run "$2..." on the cores "$1" (taskset), where taskset exists.
pin() {
  local cores=$1; shift
  if command -v taskset > /dev/null; then taskset -c "$cores" "$@"; else "$@"; fi
}
# A one-host Ray cluster (kit: ray is in it; no network here). $1: GPUs it holds.
ray_up() {
  export RAY_USAGE_STATS_ENABLED=0
  ray start --head --port=6399 --num-gpus="$1" --include-dashboard=false --disable-usage-stats \
    > "$OUT/ray-head.log" 2>&1 || { cat "$OUT/ray-head.log"; return 1; }
}
# The engine-workers benchmark: 256-page PDFs, 1000 tokens a page, n-gram 20/50, MAX_CONCURRENCY 256.
big=(--pages 256 --max-tokens 1000 --concurrency 256 --ngram 20 50 --pdf /tmp/bench-256.pdf)

# One service start of an on/off phase (moeab, conc) on GPU 0: $1 its name, $2 its time limit (s), then
# environment settings for it (VAR=value, or -u VAR), then -- and bench_vllm.py service arguments. SIGINT
# at the limit, so that the benchmark stops its server on the way out and the next start has the GPU.
ab_run() {
  local name=$1 limit=$2 envs=()
  shift 2
  while [ "$1" != -- ]; do envs+=("$1"); shift; done
  shift
  echo "=== $name: up to $limit s, env ${envs[*]:-(none)}, $(date -u +%T)"
  env "${envs[@]}" timeout -s INT -k 30 "$limit" python3 benchmarks/bench_vllm.py service --model "$CK/real" \
    --gpus 0 --log "$OUT/service-$name.log" --out "$OUT/$name.json" "$@" 2>&1 | grep -v '"timeline"' |
    tee "$OUT/$name.log"
  grep -h "Using configuration from\|Using default MoE config\|Asynchronous scheduling\|warm-up took\|JIT compilation during inference\|Maximum concurrency for\|encoder: attention mask\|encoder: the views\|SAM attention: relative\|views: 8-bit\|_ATTN\|FLASHINFER\|kv_cache_dtype=\|preempt" \
    "$OUT/service-$name.log" | cut -c1-260 | sort | uniq -c | sort -rn | head -14
}
# Each start's runs (written as each ends: <name>.json.runs), one line each, and the median.
ab_summary() {
  python3 - "$OUT" "$@" <<'PY'
import json, statistics, sys
from pathlib import Path
out = Path(sys.argv[1])
for name in sys.argv[2:]:
    path = out / f"{name}.json.runs"
    runs = json.loads(path.read_text()) if path.is_file() else []
    rates = [r["pages_per_s"] for r in runs]
    steady = [r.get("fill", {}).get("steady_pages_per_s") for r in runs]
    med = statistics.median(rates) if rates else None
    print(f"{name:16} runs {rates} median {med} steady(20-80%) {steady} "
          f"tokens/page {[r['mean_completion_tokens'] for r in runs]} failed {[r['pages_failed'] for r in runs]}")
PY
}

# One service start per value of an env variable (`ab_each PREFIX T1 VAR "VALUES" [more env]`): the 256 pages,
# REPEAT (3) runs each, named PREFIX-VALUE; the first start gets at most T1 s, a start begins only with 120 s left.
ab_each() {
  local prefix=$1 t1=$2 var=$3 values=$4 names=() v limit
  shift 4
  for v in $values; do
    limit=$(( ${T_TOTAL:-565} - SECONDS ))
    [ "$limit" -lt 120 ] && { echo "=== $prefix-$v: not started, $limit s left"; break; }
    [ ${#names[@]} = 0 ] && [ "$limit" -gt "${T1:-$t1}" ] && limit=${T1:-$t1}
    ab_run "$prefix-$v" "$limit" "$var=$v" "$@" -- "${big[@]}" --files 1 --repeat "${REPEAT:-3}"
    names+=("$prefix-$v")
    ab_summary "${names[@]}"
  done
}

case "$phase" in
  pair)
    real_ckpt; bench_pdf
    VLLM_CACHE_ROOT=/root/.cache/vllm-raw CUDA_VISIBLE_DEVICES=0 pin 0-15 timeout 545 \
      python3 benchmarks/bench_vllm.py raw --model "$CK/real" "${big[@]}" --files 1,4 --repeat "${REPEAT:-3},1" \
      --out "$OUT/pair-raw.json" > "$OUT/pair-raw.log" 2>&1 &
    raw=$!
    pin 16-31 timeout 545 python3 benchmarks/bench_vllm.py service --model "$CK/real" "${big[@]}" \
      --gpus 1 --files 1,4 --repeat "${REPEAT:-3},1" --log "$OUT/service-pair.log" --out "$OUT/pair-service.json" \
      2>&1 | tee "$OUT/pair-service.log"
    wait $raw
    grep '^{' "$OUT/pair-raw.log"
    ;;
  solo)  # nvidia-h200: raw LLM.generate, then the service, one after the other on GPU 0 (one GPU: not side by
    # side as `pair` does on two). FILES=1: the 256-page PDF, REPEAT runs each (~8 min); FILES=4: the 1,024
    # pages, REPEAT runs of WHAT=raw or WHAT=service alone (~7-9 min each: both do not fit in one call).
    real_ckpt; bench_pdf
    files=${FILES:-1}
    long=$([ "$files" = 1 ] && echo 290 || echo 570)  # both halves in one call, or one half a call
    if [ "${WHAT:-both}" != service ]; then
      CUDA_VISIBLE_DEVICES=0 timeout "${T1:-$long}" python3 benchmarks/bench_vllm.py raw --model "$CK/real" \
        "${big[@]}" --files "$files" --repeat "${REPEAT:-3}" --out "$OUT/solo-raw-$files.json" > "$OUT/solo-raw-$files.log" 2>&1
      grep '^{' "$OUT/solo-raw-$files.log" | cut -c1-400
    fi
    if [ "${WHAT:-both}" != raw ]; then
      timeout "${T2:-$long}" python3 benchmarks/bench_vllm.py service --model "$CK/real" "${big[@]}" --gpus 0 \
        --files "$files" --repeat "${REPEAT:-3}" --log "$OUT/service-solo-$files.log" \
        --out "$OUT/solo-service-$files.json" 2>&1 | grep -v '"timeline"' | tee "$OUT/solo-service-$files.log"
      grep -h "warm-up took" "$OUT/service-solo-$files.log" | cut -c1-600
    fi
    ;;
  pair1024)
    real_ckpt; bench_pdf
    VLLM_CACHE_ROOT=/root/.cache/vllm-raw CUDA_VISIBLE_DEVICES=0 pin 0-15 timeout 560 \
      python3 benchmarks/bench_vllm.py raw --model "$CK/real" "${big[@]}" --files 4 \
      --out "$OUT/pair1024-raw.json" > "$OUT/pair1024-raw.log" 2>&1 &
    raw=$!
    pin 16-31 timeout 560 python3 benchmarks/bench_vllm.py service --model "$CK/real" "${big[@]}" \
      --gpus 1 --files 4 --log "$OUT/service-pair1024.log" --out "$OUT/pair1024-service.json" \
      2>&1 | tee "$OUT/pair1024-service.log"
    wait $raw
    grep '^{' "$OUT/pair1024-raw.log"
    ;;
  ray12)
    real_ckpt; bench_pdf
    ray_up 2 || exit 1
    for n in 1 2; do
      ORCHESTRATOR=ray RAY_ADDRESS=127.0.0.1:6399 DATA_PARALLEL_SIZE=$n timeout 290 \
        python3 benchmarks/bench_vllm.py service --model "$CK/real" "${big[@]}" --files 4 \
        --log "$OUT/service-ray$n.log" --out "$OUT/ray$n.json" 2>&1 | tee "$OUT/ray$n.log"
    done
    ray stop --force > /dev/null 2>&1
    ;;
  inter)  # issue 29: raw AsyncLLM then the service on one start each, ROUNDS (3) rounds, each written as it ends;
    # PROFILE=1: the service's second round under load under py-spy (first PROFILE_S=12 s), summarised
    real_ckpt; bench_pdf
    prof=(); [ -n "${PROFILE:-}" ] && prof=(--profile "$OUT/prof-inter" --profile-s "${PROFILE_S:-12}")
    CUDA_VISIBLE_DEVICES=0 timeout "${T_TOTAL:-570}" python3 benchmarks/bench_vllm.py interactive --model "$CK/real" \
      --pages 256 --pdf /tmp/bench-256.pdf --max-tokens 256 --concurrency 256 --ngram 30 90 \
      --requests "${REQUESTS:-192}" --latency-runs "${LATENCY_RUNS:-12}" --rounds "${ROUNDS:-${REPEAT:-3}}" \
      --rounds-out "$OUT/interactive-rounds.jsonl" --log "$OUT/service-interactive.log" \
      --out "$OUT/interactive.json" "${prof[@]}" 2>&1 | grep -v "^INFO\|^(EngineCore" | tee "$OUT/interactive.log"
    grep -h "warm-up took" "$OUT/service-interactive.log" | cut -c1-600
    if [ -n "${PROFILE:-}" ]; then
      python3 benchmarks/profile_summary.py "$OUT"/prof-inter.*.txt --seconds "${PROFILE_S:-12}" --top 25 \
        > "$OUT/profile-inter-summary.txt" 2>&1
      tar czf "$OUT/prof-inter.tgz" -C "$OUT" $(cd "$OUT" && ls prof-inter.*) && rm -f "$OUT"/prof-inter.*.txt
    fi
    ;;
  single)  # issue 29's one-client gap located: no loaded rounds; the service with engine worker processes
    # (profiled: LATENCY_RUNS extra requests under py-spy), raw AsyncLLM (profiled the same way), then the
    # service with the engine in the server process (ENGINE_WORKERS=inline); each on its own start, written as
    # it ends; ~7 min
    real_ckpt; bench_pdf
    # process1: the worker processes with OMP_NUM_THREADS=1 (what every vLLM worker had before 2026-12-06)
    # A side may come more than once (SINGLE_SIDES="raw process raw process": starts alternate); each start's
    # files are named by its place, `<n>-<side>`; its rows in single-rounds.jsonl come in the same order.
    # single-<n>-<side>-full.log keeps every line (raw's vLLM engine config among them, to compare with the
    # service's log).
    n=0
    for side in ${SINGLE_SIDES:-process raw inline}; do
      n=$((n + 1)); tag="$n-$side"
      limit=$(( ${T_TOTAL:-560} - SECONDS ))
      [ "$limit" -lt 60 ] && break
      only=service; [ "$side" = raw ] && only=raw
      omp=(); [ "$side" = process1 ] && omp=(OMP_NUM_THREADS=1)
      echo "=== single $side: up to $limit s, $(date -u +%T)"
      # The GPU's clocks, power and load each second, and once a minute the processes holding a CUDA context:
      # a slower engine step with the same kernels (BENCHMARKS 22) is a clock or a neighbour on the GPU.
      nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,utilization.gpu \
        --format=csv -l 1 > "$OUT/smi-$tag.csv" 2>&1 &
      smi=$!
      (while sleep 60; do nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv; done) \
        > "$OUT/smi-apps-$tag.csv" 2>&1 &
      apps=$!
      env "${omp[@]}" CUDA_VISIBLE_DEVICES=0 timeout -s INT -k 30 "$limit" python3 benchmarks/bench_vllm.py interactive \
        --only "$only" --workers "$([ "$side" = inline ] && echo inline || echo process)" --model "$CK/real" \
        --pages 256 --pdf /tmp/bench-256.pdf --max-tokens 256 --concurrency 256 --ngram 30 90 --requests 0 \
        --latency-runs "${LATENCY_RUNS:-10}" --rounds 1 --rounds-out "$OUT/single-rounds.jsonl" \
        --log "$OUT/service-single-$tag.log" --out "$OUT/single-$tag.json" \
        $([ "$side" = inline ] || [ "$side" = process1 ] || echo --profile "$OUT/prof-$tag" --profile-single) 2>&1 |
        tee "$OUT/single-$tag-full.log" | grep -v "^INFO\|^(EngineCore" | tee "$OUT/single-$tag.log"
      kill "$smi" "$apps" 2> /dev/null || true
      if ls "$OUT"/prof-$tag.*.txt > /dev/null 2>&1; then
        python3 benchmarks/profile_summary.py "$OUT"/prof-$tag.*.txt --top 25 > "$OUT/profile-$tag-summary.txt" 2>&1
        tar czf "$OUT/prof-$tag.tgz" -C "$OUT" $(cd "$OUT" && ls prof-$tag.*) && rm -f "$OUT"/prof-$tag.*.txt
      fi
    done
    ;;
  interconf)  # the interactive run's service half only, CONFIDENCE=true then false (CONF_ORDER), each on its own
    # start, ROUNDS (2) rounds each; PROFILE=1 puts the first start's second loaded round under py-spy
    real_ckpt; bench_pdf
    first=1
    for v in ${CONF_ORDER:-true false}; do
      prof=(); [ -n "${PROFILE:-}" ] && [ "$first" = 1 ] && prof=(--profile "$OUT/prof-inter" --profile-s "${PROFILE_S:-12}")
      limit=$(( ${T_TOTAL:-560} - SECONDS ))
      [ "$first" = 1 ] && [ "$limit" -gt "${T1:-300}" ] && limit=${T1:-300}
      echo "=== interconf CONFIDENCE=$v: up to $limit s, $(date -u +%T)"
      CONFIDENCE="$v" CUDA_VISIBLE_DEVICES=0 timeout -s INT -k 30 "$limit" python3 benchmarks/bench_vllm.py interactive \
        --only service --model "$CK/real" --pages 256 --pdf /tmp/bench-256.pdf --max-tokens 256 --concurrency 256 \
        --ngram 30 90 --requests "${REQUESTS:-160}" --latency-runs "${LATENCY_RUNS:-10}" --rounds "${ROUNDS:-2}" \
        --rounds-out "$OUT/interconf-$v-rounds.jsonl" --log "$OUT/service-interconf-$v.log" \
        --out "$OUT/interconf-$v.json" "${prof[@]}" 2>&1 | grep -v "^INFO\|^(EngineCore" | tee "$OUT/interconf-$v.log"
      first=0
    done
    if [ -n "${PROFILE:-}" ] && ls "$OUT"/prof-inter.*.txt > /dev/null 2>&1; then
      python3 benchmarks/profile_summary.py "$OUT"/prof-inter.*.txt --seconds "${PROFILE_S:-12}" --top 25 \
        > "$OUT/profile-inter-summary.txt" 2>&1
      tar czf "$OUT/prof-inter.tgz" -C "$OUT" $(cd "$OUT" && ls prof-inter.*) && rm -f "$OUT"/prof-inter.*.txt
    fi
    ;;
  scale)  # local workers only since 2026-11-30 (Ray: ray12); its first run also had Ray and cut this at 280 s
    real_ckpt; bench_pdf
    timeout 560 python3 benchmarks/bench_vllm.py service --model "$CK/real" "${big[@]}" --gpus 0,1 --files 4 \
      --repeat "${REPEAT:-2}" --log "$OUT/service-2gpu.log" --out "$OUT/scale-2gpu.json" 2>&1 |
      tee "$OUT/scale-2gpu.log"
    ;;
  scale12)  # the issue's pair: one local worker (GPUS=0), then two (GPUS=0,1), 1,024 pages, REPEAT runs a start
    real_ckpt; bench_pdf
    for gpus in ${SCALE_GPUS:-0 0,1}; do
      n=$(( $(tr -cd , <<< "$gpus" | wc -c) + 1 ))
      limit=$([ "$n" = 1 ] && echo "${T1:-300}" || echo "${T2:-270}")
      prof=()  # PROFILE=1: one more run under py-spy (its first PROFILE_S seconds), after the timed ones
      [ -n "${PROFILE:-}" ] && prof=(--profile "$OUT/prof-scale$n" --profile-s "${PROFILE_S:-20}")
      timeout "$limit" python3 benchmarks/bench_vllm.py service --model "$CK/real" "${big[@]}" --gpus "$gpus" \
        --files 4 --repeat "${REPEAT:-1}" "${prof[@]}" --log "$OUT/service-scale$n.log" \
        --out "$OUT/scale-${n}gpu.json" 2>&1 | tee "$OUT/scale-${n}gpu.log"
      if [ -n "${PROFILE:-}" ]; then  # one summary and one archive: the device tool returns few files
        python3 benchmarks/profile_summary.py "$OUT"/prof-scale$n.*.txt --seconds "${PROFILE_S:-20}" \
          > "$OUT/profile-scale$n-summary.txt" 2>&1
        tar -czf "$OUT/prof-scale$n.tar.gz" -C "$OUT" $(cd "$OUT" && ls prof-scale$n.*) && rm -f "$OUT"/prof-scale$n.*.txt "$OUT"/prof-scale$n.pids.json
      fi
    done
    grep -h "warm-up took" "$OUT"/service-scale*.log | cut -c1-600
    ;;
  dp)  # vLLM's data_parallel_size=2 (one AsyncLLM over both GPUs) on the 1,024 pages: vs scale12's two workers
    real_ckpt; bench_pdf
    timeout "${T1:-400}" python3 benchmarks/bench_vllm.py dp --model "$CK/real" "${big[@]}" --files 4 --dp 2 \
      --repeat "${REPEAT:-1}" --out "$OUT/dp2.json" 2>&1 | grep -v "^INFO\|^(EngineCore" | tee "$OUT/dp2.log"
    ;;
  ray1i)
    real_ckpt; bench_pdf
    CUDA_VISIBLE_DEVICES=1 pin 16-31 timeout 530 python3 benchmarks/bench_vllm.py interactive \
      --model "$CK/real" --pages 256 --pdf /tmp/bench-256.pdf --max-tokens 256 --concurrency 256 --ngram 30 90 \
      --requests 256 --latency-runs 10 --log "$OUT/service-interactive.log" --out "$OUT/interactive.json" \
      > "$OUT/interactive.log" 2>&1 &
    inter=$!
    export CUDA_VISIBLE_DEVICES=0
    ray_up 1 && ORCHESTRATOR=ray RAY_ADDRESS=127.0.0.1:6399 DATA_PARALLEL_SIZE=1 pin 0-15 timeout 530 \
      python3 benchmarks/bench_vllm.py service --model "$CK/real" "${big[@]}" --files 4 \
      --log "$OUT/service-ray1.log" --out "$OUT/ray1.json" 2>&1 | tee "$OUT/ray1.log"
    ray stop --force > /dev/null 2>&1
    wait $inter
    grep -v "^INFO\|^(EngineCore\|^\[" "$OUT/interactive.log" | tail -12
    ;;
  views)
    real_ckpt
    timeout 240 python3 benchmarks/vllm_views.py --ckpt "$CK/real" 2>&1 | tee "$OUT/views.log"
    ;;
  equiv)
    small_ckpt
    timeout 500 python3 benchmarks/equivalence.py --ckpt "$CK/small" --dtypes float32,bfloat16 \
      --child-timeout 200 --out "$OUT/equivalence.json" 2>&1 | tee "$OUT/equivalence.log"
    ;;
  tests)
    real_ckpt
    ocr2_small_ckpt
    GPU_TEST_MODEL="$CK/real" GPU_TEST_MODEL_V2="$CK/ocr2-small" timeout 570 python3 -m pytest -m gpu \
      tests/test_gpu.py tests/test_gpu_ocr2.py -v -rs -p no:cacheprovider 2>&1 | tee "$OUT/tests.log"
    ;;
  tests-v1)
    real_ckpt
    GPU_TEST_MODEL="$CK/real" timeout 570 python3 -m pytest -m gpu tests/test_gpu.py -v -rs -p no:cacheprovider \
      2>&1 | tee "$OUT/tests-v1.log"
    ;;
  tests-auto)  # issue 30: the service's GPU tests (TestService) with ENGINES_PER_GPU=auto: two engine workers on
    # a GPU of 64 GiB or more; the server's log comes back as server-auto.log
    real_ckpt
    ENGINES_PER_GPU=auto GPU_TEST_LOG="$OUT/server-auto.log" GPU_TEST_MODEL="$CK/real" timeout 540 python3 -m pytest \
      -m gpu tests/test_gpu.py -k TestService -v -rs -p no:cacheprovider 2>&1 | tee "$OUT/tests-auto.log"
    grep -h "engine worker .* started\|GPU KV cache size\|Maximum concurrency for\|JIT compilation during inf\|warm-up" \
      "$OUT/server-auto.log" 2>/dev/null | cut -c1-220 | head -16
    ;;
  tests-v2)
    ocr2_small_ckpt
    GPU_TEST_MODEL_V2="$CK/ocr2-small" timeout 570 python3 -m pytest -m gpu tests/test_gpu_ocr2.py -v -rs \
      -p no:cacheprovider 2>&1 | tee "$OUT/tests-v2.log"
    ;;
  ocr2)
    ocr2_real_ckpt
    timeout 240 python3 tests/data/vllm_ocr2_agreement.py "$OUT" 2>&1 | tee "$OUT/ocr2-agreement.log"
    timeout 330 python3 benchmarks/bench_vllm.py service --model "$CK/ocr2-real" --pages 256 --max-tokens 1000 \
      --concurrency 256 --ngram 20 50 --out "$OUT/bench-ocr2.json" 2>&1 | tee "$OUT/bench-ocr2.log"
    ;;
  bench)
    # One GPU: raw LLM.generate vs the service (one engine worker, GPUS=0) on 256 pages, then two 256-page
    # PDFs at once on one worker and on two (GPUS=0,1): the scaling figure. py-spy profiles one more
    # service run after the timed ones. A JIT compile of the fused-MoE kernel during serving shows as a "JIT" line in the logs.
    real_ckpt
    common=(--model "$CK/real" --pages 256 --max-tokens 1000 --concurrency 256 --ngram 20 50)
    CUDA_VISIBLE_DEVICES=0 timeout 170 python3 benchmarks/bench_vllm.py raw "${common[@]}" --repeat "${REPEAT:-1}" \
      --out "$OUT/bench-raw.json" 2>&1 | tee "$OUT/bench-raw.log"
    timeout 270 python3 benchmarks/bench_vllm.py service "${common[@]}" --gpus 0 --files 1,2 --repeat "${REPEAT:-1}" \
      --profile "$OUT/prof1" --log "$OUT/service-1gpu.log" --out "$OUT/bench-1gpu.json" 2>&1 |
      tee "$OUT/bench-1gpu.log"
    timeout 150 python3 benchmarks/bench_vllm.py service "${common[@]}" --gpus 0,1 --files 2 \
      --log "$OUT/service-2gpu.log" --out "$OUT/bench-2gpu.json" 2>&1 | tee "$OUT/bench-2gpu.log"
    python3 benchmarks/profile_summary.py "$OUT"/prof1.*.txt --seconds "$(python3 -c "import json;print(json.load(open('$OUT/bench-1gpu.json'))[0]['elapsed_s'])" 2>/dev/null || echo 60)" \
      > "$OUT/profile-1gpu-summary.txt" 2>&1
    grep -il "jit comp\|compiling\|default MoE config" "$OUT"/*.log > "$OUT/jit-lines.txt" 2>&1
    grep -ih "jit comp\|default MoE config" "$OUT"/*.log | sort | uniq -c | head -20 >> "$OUT/jit-lines.txt"
    ;;
  modes)  # the all-modes service tests only (one engine start)
    real_ckpt
    GPU_TEST_MODEL="$CK/real" timeout 400 python3 -m pytest -m gpu tests/test_gpu.py -v -rs -p no:cacheprovider \
      -k "every_mode or mixed_mode or info_routes or generate_json" 2>&1 | tee "$OUT/modes.log"
    ;;
  bench1)  # raw vs the service on one GPU, 256 pages (no profile, no 2-GPU run)
    real_ckpt
    common=(--model "$CK/real" --pages 256 --max-tokens 1000 --concurrency 256 --ngram 20 50)
    CUDA_VISIBLE_DEVICES=0 timeout 200 python3 benchmarks/bench_vllm.py raw "${common[@]}" \
      --out "$OUT/bench-raw.json" 2>&1 | grep -v "^INFO\|^(EngineCore" | tee "$OUT/bench-raw.log"
    timeout 330 python3 benchmarks/bench_vllm.py service "${common[@]}" --gpus 0 \
      --log "$OUT/service-1gpu.log" --out "$OUT/bench-1gpu.json" 2>&1 | tee "$OUT/bench-1gpu.log"
    grep -h "JIT compilation during inference\|warm-up took" "$OUT"/*.log | head -5
    ;;
  workers)
    real_ckpt
    GPU_TEST_MODEL="$CK/real" timeout 560 python3 -m pytest -m gpu tests/workers/test_gpu_workers.py -v -rs \
      -p no:cacheprovider 2>&1 | tee "$OUT/workers.log"
    ;;
  workers-shared)  # ENGINES_PER_GPU=2: two workers on GPU 0, a burst, one engine core killed and healed
    real_ckpt
    rm -rf /tmp/pt-shared
    GPU_TEST_MODEL="$CK/real" timeout 575 python3 -m pytest -m gpu tests/workers/test_gpu_shared.py -v -rs \
      -p no:cacheprovider --basetemp /tmp/pt-shared --timeout 550 2>&1 | tail -60 | tee "$OUT/workers-shared.log"
    find /tmp/pt-shared -name server.log -exec grep -v "^(EngineCore\|^INFO\|^DEBUG" {} \; | tail -200 \
      > "$OUT/workers-shared-server.log"
    ;;
  ngram)  # PAGES, MAX_TOKENS, IMPLS, T1 change the run (2026-12-06, BENCHMARKS section 16: PAGES=256
    # MAX_TOKENS=1000 IMPLS=batched T1=330, the service benchmark's pages, ~5 min)
    real_ckpt
    timeout -s INT -k 20 "${T1:-570}" python3 benchmarks/bench_vllm.py ngram --model "$CK/real" \
      --pages "${PAGES:-128}" --max-tokens "${MAX_TOKENS:-400}" --concurrency 256 --ngram 20 50 --repeat 3 \
      --impls "${IMPLS:-batched,vllm}" --out "$OUT/ngram.json" 2>&1 | grep -v "^INFO\|^(EngineCore\|^WARNING" |
      tee "$OUT/ngram.log"
    ;;
  ray1|ray2)
    real_ckpt
    ray_up 2 || exit 1
    n=${phase#ray}
    ORCHESTRATOR=ray RAY_ADDRESS=127.0.0.1:6399 DATA_PARALLEL_SIZE=$n timeout 540 python3 benchmarks/bench_vllm.py \
      service --model "$CK/real" --pages 1024 --max-tokens 1000 --concurrency 256 --ngram 20 50 \
      --log "$OUT/service-ray$n.log" --out "$OUT/bench-ray$n.json" 2>&1 | tee "$OUT/bench-ray$n.log"
    ray stop --force > /dev/null 2>&1
    ;;
  moetune)  # benchmarks/tune_moe.py: the fused-MoE table for this GPU into $OUT/moe-configs (no engine start).
    # Keep it (engines/moe_configs/) only if the service is faster with it: scale12 with
    # VLLM_TUNED_CONFIG_FOLDER=/nonexistent (vLLM's defaults) against without (the shipped table).
    real_ckpt
    timeout 575 python3 benchmarks/tune_moe.py --model "$CK/real" --out "$OUT/moe-configs" \
      --budget-s "${BUDGET_S:-500}" 2>&1 | grep -v "^INFO\|^WARNING" | tee "$OUT/moetune.log"
    rc=$?
    # The device tool does not return vLLM's file name ('=' and ','): a copy under a plain one comes back.
    for f in "$OUT"/moe-configs/E=*.json; do if [ -f "$f" ]; then cp "$f" "$OUT/moe-configs/table.json"; fi; done
    (exit "$rc")
    ;;
  moeab)  # vLLM's default fused-MoE tiles against the table in engines/moe_configs/, each on its own start
    real_ckpt; bench_pdf
    mkdir -p /tmp/no-moe-configs
    ls engines/moe_configs/*.json 2>/dev/null || echo "no table in engines/moe_configs/: both starts use vLLM's defaults"
    names=()
    for v in ${MOEAB_ORDER:-default tuned}; do
      if [ "$v" = default ]; then set_env=(VLLM_TUNED_CONFIG_FOLDER=/tmp/no-moe-configs); else set_env=(-u VLLM_TUNED_CONFIG_FOLDER); fi
      # the first start at most T1 (it also fills the compile caches); the last one what is left of T_TOTAL
      limit=$(( ${T_TOTAL:-565} - SECONDS ))
      [ ${#names[@]} = 0 ] && [ "$limit" -gt "${T1:-300}" ] && limit=${T1:-300}
      ab_run "moeab-$v" "$limit" "${set_env[@]}" -- "${big[@]}" --files 1 --repeat "${REPEAT:-3}"
      names+=("moeab-$v")
      ab_summary "${names[@]}"
    done
    ;;
  conc)  # MAX_CONCURRENCY (vLLM's max_num_seqs) 256 against 512: 512 pages at once (two 256-page PDFs), since
    # 256 pages fit in 256 sequences either way
    real_ckpt; bench_pdf
    names=()
    for c in ${CONC:-256 512}; do
      limit=$(( ${T_TOTAL:-565} - SECONDS ))
      [ ${#names[@]} = 0 ] && [ "$limit" -gt "${T1:-290}" ] && limit=${T1:-290}
      ab_run "conc-$c" "$limit" -- --pages 256 --max-tokens 1000 --concurrency "$c" \
        --ngram 20 50 --pdf /tmp/bench-256.pdf --files "${FILES:-2}" --repeat "${REPEAT:-1}"
      names+=("conc-$c")
      ab_summary "${names[@]}"
    done
    ;;
  kv)  # KV_CACHE_DTYPE auto against fp8 on the 256-page PDF: halving the KV cache's bytes halves the
    # attention's reads of it, most of a decode step's memory traffic at 256 sequences (issue 30)
    real_ckpt; bench_pdf
    names=()
    for v in ${KV_ORDER:-auto fp8}; do
      limit=$(( ${T_TOTAL:-565} - SECONDS ))
      [ ${#names[@]} = 0 ] && [ "$limit" -gt "${T1:-290}" ] && limit=${T1:-290}
      ab_run "kv-$v" "$limit" KV_CACHE_DTYPE="$v" MAX_MODEL_LEN="${MAX_MODEL_LEN:-2048}" -- --pages 256 \
        --max-tokens 1000 --concurrency "${KV_CONC:-256}" --ngram 20 50 --pdf /tmp/bench-256.pdf --files 1 \
        --repeat "${REPEAT:-3}"
      names+=("kv-$v")
      ab_summary "${names[@]}"
    done
    ;;
  ocr2ab)  # issue 30: DeepSeek-OCR-2 against v1 through the service on the 256 pages, each on its own start,
    # REPEAT (3) runs each; OCR2AB="v1 ocr2 ocr2-vllmmask" adds OCR-2 with vLLM's own encoder-mask loop
    real_ckpt; ocr2_real_ckpt; bench_pdf
    # first the encoder stage alone a page, both masks (no engine, ~30 s; MASK_BENCH=0 skips it)
    [ "${MASK_BENCH:-1}" = 1 ] &&
      timeout 120 python3 benchmarks/bench_ocr2_mask.py --device cuda --repeat 10 --out "$OUT/ocr2-mask.json" 2>&1 |
      grep -v "^INFO\|^WARNING\|warn" | tee "$OUT/ocr2-mask.log"
    names=()
    for v in ${OCR2AB:-v1 ocr2}; do
      limit=$(( ${T_TOTAL:-565} - SECONDS ))
      [ "$limit" -lt 120 ] && { echo "=== ocr2ab-$v: not started, $limit s left"; break; }
      [ ${#names[@]} = 0 ] && [ "$limit" -gt "${T1:-240}" ] && limit=${T1:-240}
      model=$CK/ocr2-real; mask=(-u DEEPSEEK_OCR_OCR2_MASK)
      [ "$v" = v1 ] && model=$CK/real
      [ "$v" = ocr2-vllmmask ] && mask=(DEEPSEEK_OCR_OCR2_MASK=vllm)
      ab_run "ocr2ab-$v" "$limit" "${mask[@]}" -- "${big[@]}" --model "$model" --files 1 --repeat "${REPEAT:-3}"
      names+=("ocr2ab-$v")
      ab_summary "${names[@]}"
    done
    ;;
  sam)  # vLLM's SAM-B on one step's 17 A4 pages: image after image, batched, batched with the fused attention
    timeout 300 python3 benchmarks/bench_sam.py --pages "${PAGES:-17}" --repeat 5 --out "$OUT/sam.json" 2>&1 |
      grep -v "^INFO\|^WARNING\|warn" | tee "$OUT/sam.log"
    ;;
  encab)  # issue 30: the encoder changes (engines/vllm/encoder_batch.py, engines/vllm/sam_attention.py) against
    # vLLM's encoder as it is (DEEPSEEK_OCR_ENCODER=vllm), the service on the 256 pages, each on its own
    # start, REPEAT (3) runs each; ENCAB_ORDER="vllm batched both" adds the batch alone
    real_ckpt; bench_pdf
    # first the checks against vLLM's own loop and attention with this machine's vLLM (~20 s; ENCAB_TESTS=0
    # skips them), then vLLM's SAM on a step's 17 pages three ways (~1 min; SAM_BENCH=0 skips it)
    [ "${ENCAB_TESTS:-1}" = 1 ] && timeout 150 python3 -m pytest -q -p no:cacheprovider \
      tests/engines/test_vllm_encoder_batch.py tests/engines/test_vllm_sam_attention.py 2>&1 | tail -3 |
      tee "$OUT/encab-test.log"
    [ "${SAM_BENCH:-1}" = 1 ] && timeout 150 python3 benchmarks/bench_sam.py --pages 17 --repeat 5 \
      --out "$OUT/sam.json" 2>&1 | grep -v "^INFO\|^WARNING\|warn" | tee "$OUT/sam.log"
    names=()
    # vllm: DEEPSEEK_OCR_ENCODER=vllm (vLLM's encoder as it is); batched: the batch alone; both: the default
    for v in ${ENCAB_ORDER:-vllm both}; do
      limit=$(( ${T_TOTAL:-565} - SECONDS ))
      [ "$limit" -lt 120 ] && { echo "=== encab-$v: not started, $limit s left"; break; }
      [ ${#names[@]} = 0 ] && [ "$limit" -gt "${T1:-290}" ] && limit=${T1:-290}
      if [ "$v" = both ]; then set_env=(-u DEEPSEEK_OCR_ENCODER); else set_env=(DEEPSEEK_OCR_ENCODER="$v"); fi
      ab_run "encab-$v" "$limit" "${set_env[@]}" -- "${big[@]}" --files 1 --repeat "${REPEAT:-3}"
      names+=("encab-$v")
      ab_summary "${names[@]}"
    done
    ;;
  shared)  # issue 30: K raw AsyncLLM engines on one GPU (bench_vllm.py shared), K in SHARED (1,2), the 256
    # pages dealt over them, REPEAT (3) passes per K, each K's engines shut down before the next
    real_ckpt; bench_pdf
    timeout -s INT -k 20 $(( ${T_TOTAL:-565} - SECONDS )) python3 benchmarks/bench_vllm.py shared --model "$CK/real" \
      "${big[@]}" --files 1 --repeat "${REPEAT:-3}" --engines-per-gpu "${SHARED:-1,2}" --out "$OUT/shared.json" \
      > "$OUT/shared-full.log" 2>&1
    grep -v "^INFO\|^(EngineCore\|^WARNING\|^DEBUG" "$OUT/shared-full.log" | tail -30
    grep -h "Maximum concurrency for\|KV cache\|JIT compilation during inference" "$OUT/shared-full.log" |
      cut -c1-220 | sort | uniq -c | head
    ;;
  steps)
    bench_pdf
    # STEPS_ARCH=ocr2: DeepSeek-OCR-2 (1,121 image tokens an A4 page), the issue's "profile it the same way"
    if [ "${STEPS_ARCH:-ocr}" = ocr2 ]; then ocr2_real_ckpt; model=$CK/ocr2-real; itok=1121; else real_ckpt; model=$CK/real; itok=903; fi
    bw=$(nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200 && echo 4.8 || echo 3.35)  # TB/s
    # ASYNC="auto off": both, each on its own engine start, in one call (a start only while 200 s are left)
    for a in ${ASYNC:-auto}; do
      left=$(( ${T_TOTAL:-565} - SECONDS ))
      [ "$left" -lt 200 ] && { echo "=== steps async=$a: not started, $left s left"; break; }
      tag=${STEPS_ARCH:-ocr}-async-$a
      rm -rf /tmp/step-trace
      echo "=== steps $tag: up to $left s, $(date -u +%T)"
      timeout -s INT -k 20 "$left" python3 benchmarks/step_profile.py --model "$model" "${big[@]}" \
        --image-tokens "$itok" --fill-window ${FILL_WINDOW:-0 3} --decode-window ${DECODE_WINDOW:-12 13.5} \
        --bandwidth-tbs "$bw" \
        --trace-dir /tmp/step-trace --async-scheduling "$a" --out "$OUT/steps-$tag.json" \
        --pyspy "$OUT/pyspy-$tag" > "$OUT/steps-$tag-full.log" 2>&1
      grep -v "^INFO\|^(EngineCore\|^WARNING\|^DEBUG" "$OUT/steps-$tag-full.log" | tail -60
      # the engine core's Python in the last unprofiled pass, by kind and by frame
      for w in decode fill; do
        [ -s "$OUT/pyspy-$tag.$w.txt" ] && python3 benchmarks/profile_summary.py "$OUT/pyspy-$tag.$w.txt" \
          --rate 250 --top 25 2>&1 | tee "$OUT/pyspy-$tag.$w-summary.txt" | head -40
      done
      # the traces themselves, where they fit what comes back (16 MiB a file)
      find /tmp/step-trace -name "*.json.gz" -size -15M -exec cp {} "$OUT/" \; 2>/dev/null
    done
    ;;
  ngramstep)
    timeout 300 python3 benchmarks/bench_ngram_step.py --out "$OUT/ngramstep.json" 2>&1 | tee "$OUT/ngramstep.log"
    timeout 200 python3 benchmarks/bench_ngram_step.py --ngram 20 50 --rows 1 8 16 32 256 2>&1 | tee -a "$OUT/ngramstep.log"
    ;;
  kvfp8)
    small_ckpt
    # KV_PAGES (6): pages and continuations a case, 64 forced positions each (Tiny: 2 cases x 6 x 64 = 768);
    # 1 was section 31's run (Tiny's figure then rested on 128 positions)
    timeout 560 python3 benchmarks/equivalence.py --ckpt "$CK/small" --kv-compare --kv-pages "${KV_PAGES:-6}" \
      --child-timeout 250 --out "$OUT/kvfp8.json" 2>&1 | grep -v "^INFO\|^(EngineCore\|^WARNING" | tee "$OUT/kvfp8.log"
    ;;
  epg)  # issue 30: ENGINES_PER_GPU vLLM engine workers sharing the GPU (each half the memory and sequences)
    # against one, the service on the 256 pages, each on its own start, REPEAT (3) runs each; EPG_ORDER (2 1)
    real_ckpt; bench_pdf
    nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -l 1 > "$OUT/smi-epg.csv" 2>&1 &
    smi=$!
    ab_each epg 310 ENGINES_PER_GPU "${EPG_ORDER:-2 1}"
    kill $smi 2>/dev/null
    grep -h "engine worker .* started\|GPU KV cache size\|Maximum concurrency for" "$OUT"/service-epg-*.log |
      cut -c1-200 | head -16
    ;;
  pixab)  # issue 30: the views as 8-bit values (DEEPSEEK_OCR_PIXELS=uint8, engines/vllm/pixels.py) against vLLM's
    # floats, the service on the 256 pages, each on its own start, REPEAT (3) runs each (PIXAB_ORDER swaps)
    real_ckpt; bench_pdf
    [ "${PIXAB_TESTS:-1}" = 1 ] && timeout 120 python3 -m pytest -q -p no:cacheprovider tests/engines/test_vllm_pixels.py \
      2>&1 | tail -3 | tee "$OUT/pixab-test.log"
    ab_each pixab 290 DEEPSEEK_OCR_PIXELS "${PIXAB_ORDER:-float uint8}"
    ;;
  confidence)  # the cost of CONFIDENCE (vLLM logprobs=0 on every request): the 256-page service run with it
    # off then on (CONF_ORDER swaps), each on its own start, REPEAT (3) runs each
    real_ckpt; bench_pdf
    ab_each conf 290 CONFIDENCE "${CONF_ORDER:-false true}"
    ;;
  warmdump)  # where an engine's warm-up waits: py-spy dumps of the worker and its engine core every 4 s
    real_ckpt
    MODEL_PATH="$CK/real" ENGINE=vllm LOAD_FORMAT=dummy GPUS=0 MAX_CONCURRENCY=256 GPU_MEM_UTILIZATION=0.75 \
      LOG_LEVEL=INFO timeout "${T1:-300}" python3 -m uvicorn serve_ocr:app --host 127.0.0.1 --port 8765 \
      --log-level warning > "$OUT/service-warmdump.log" 2>&1 &
    server=$!
    for _ in $(seq 1 "${DUMPS:-70}"); do
      sleep 4
      grep -q "warm-up took" "$OUT/service-warmdump.log" && break
      for pid in $(pgrep -f "workers.main|EngineCore"); do
        { echo "=== $(date -u +%T) pid $pid: $(tr '\0' ' ' < /proc/$pid/cmdline | cut -c1-100)"
          py-spy dump --pid "$pid" 2>&1 | head -120; } >> "$OUT/warmdump.txt"
      done
    done
    kill "$server"; wait "$server"
    grep -h "warm-up took\|Loading weights took\|Graph capturing finished\|init engine" "$OUT/service-warmdump.log" | cut -c1-400
    ;;
  ngram-test)
    real_ckpt
    GPU_TEST_MODEL="$CK/real" timeout 570 python3 -m pytest -m gpu tests/engines/test_gpu_ngram.py -v -s -rs \
      -p no:cacheprovider 2>&1 | tee "$OUT/ngram-test.log"
    ;;
  *)
    echo "unknown phase $phase; use views, equiv, tests, tests-v1, tests-v2, bench, workers, ocr2, ngram, ngram-test, ray1, ray2, pair, pair1024, solo, scale, scale12, dp, ray1i, ray12, inter, moetune, moeab, conc or warmdump" >&2
    exit 2
    ;;
esac
status=$?
echo "phase $phase exit $status" | tee -a "$OUT/env-$phase.log"
exit "$status"
