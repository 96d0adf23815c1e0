# DeepSeek-OCR API on NVIDIA GPUs (vLLM engine; the PyTorch engine is in the image too).
# vllm 0.26.0 pins torch 2.11.0 built for CUDA 13: the host needs an NVIDIA driver >= 580 and the
# NVIDIA Container Toolkit (`docker run --gpus all`). Weights are mounted, never downloaded.
FROM nvidia/cuda:13.0.1-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    VLLM_USE_FLASHINFER_SAMPLER=0 \
    MALLOC_ARENA_MAX=2 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# LibreOffice (core, writer, impress, calc) converts office files to PDF (pdf/office.py): DOCX, PPTX, XLSX, ODF, RTF.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential curl \
    libreoffice-core libreoffice-writer libreoffice-impress libreoffice-calc \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv

WORKDIR /app
COPY requirements.txt requirements-gpu.txt requirements-cluster.txt ./
RUN pip install --upgrade pip && pip install -r requirements-gpu.txt
# CLUSTER=1 (the compose profile `cluster`): Ray too, for ORCHESTRATOR=ray (README "Scale out").
ARG CLUSTER=0
RUN if [ "$CLUSTER" = "1" ]; then pip install -r requirements-cluster.txt; fi

# The whole service (every module and package); .dockerignore keeps out weights, caches and the venv.
COPY . ./

# Ubuntu 24.04 images already have a user with UID 1000 (ubuntu). /cache holds the compile caches
# (vLLM's torch.compile and CUDA-graph artefacts, TorchInductor, Triton): mount a volume there so a
# restart reuses them instead of compiling again for minutes.
RUN useradd --create-home --uid 10001 ocr && mkdir -p /app/models /cache && chown -R ocr /app /cache
USER ocr

ENV MODEL_PATH=/app/models/deepseek-ocr \
    ENGINE=auto \
    GPU_MEM_UTILIZATION=0.75 \
    HOST=0.0.0.0 \
    PORT=8000 \
    XDG_CACHE_HOME=/cache \
    VLLM_CACHE_ROOT=/cache/vllm \
    TORCHINDUCTOR_CACHE_DIR=/cache/torchinductor \
    TRITON_CACHE_DIR=/cache/triton

EXPOSE 8000
# /ready is 200 once the model serves (loading the weights and compiling take a few minutes); it is open
# without a key, so this works with API_KEY set. Shell form: PORT is the container's. tests/test_docker_files.py
# runs this very command against a server.
HEALTHCHECK --interval=30s --timeout=10s --start-period=600s --retries=3 \
    CMD curl -fsS "http://127.0.0.1:${PORT:-8000}/ready" || exit 1

# HOST and PORT (ENV above, or -e / compose) are honoured; the connection limits are serve_ocr.uvicorn_options'.
CMD ["sh", "-c", "exec uvicorn serve_ocr:app --host \"${HOST:-0.0.0.0}\" --port \"${PORT:-8000}\" --http h11 --h11-max-incomplete-event-size 65536 --limit-concurrency \"${LIMIT_CONCURRENCY:-2000}\" --timeout-keep-alive 5"]
