"""The GPU tests' server: `uvicorn serve_ocr:app` with ENGINE=vllm (or GPU_TEST_ENGINE=torch on any machine),
the skip where CUDA or vLLM is missing, and the requests those tests send."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
ENGINE = os.environ.get("GPU_TEST_ENGINE", "vllm")


def gpu_ready() -> bool:
    if importlib.util.find_spec("vllm") is None:
        return False
    # Ask NVML: the default check initialises the CUDA runtime, after which a forked child cannot use CUDA.
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    import torch

    return bool(torch.cuda.is_available())


# A GPU test module's `pytestmark`: the gpu mark, and the skip where CUDA or vLLM is missing.
GPU_ONLY = [
    pytest.mark.gpu,
    pytest.mark.skipif(ENGINE == "vllm" and not gpu_ready(), reason="needs CUDA and vllm"),
]
VLLM = ENGINE == "vllm"


def show(r: httpx.Response) -> str:
    return f"{r.request.method} {r.request.url} -> {r.status_code}: {r.text[:2000]}"


def png(width: int, height: int, *, seed: int = 0) -> bytes:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    for y in range(10, height - 10, 24):
        draw.text((10 + seed % 7, y), f"Line {y} of a test page, seed {seed}: 12.50 EUR", fill="black")
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def post_image(url: str, path: str, data: dict[str, str], image: bytes | None = None, *,
               name: str = "p.png", timeout: Any = 60) -> httpx.Response:
    """Multipart POST of one image (`file`) with form fields."""
    content = image if image is not None else png(640, 480)
    return httpx.post(url + path, files={"file": (name, content, "image/png")}, data=data, timeout=timeout)


def post_pdf(url: str, path: str, doc: bytes, data: dict[str, str]) -> httpx.Response:
    return httpx.post(url + path, files={"file": ("r.pdf", doc, "application/pdf")}, data=data, timeout=180)


def real_size_model(tmp_path_factory: Any) -> Path:
    """The checkpoint GPU tests serve with LOAD_FORMAT=dummy: GPU_TEST_MODEL when it names one, else the released
    model's config and tokenizer written to a temp dir (no weights)."""
    given = os.environ.get("GPU_TEST_MODEL")
    if given and (Path(given) / "config.json").is_file():
        return Path(given)
    from deepseek_ocr import make_tiny

    return make_tiny(tmp_path_factory.mktemp("real-config"), vision="real", decoder="real", weights=False)


def health(url: str) -> dict[str, Any]:
    return httpx.get(url + "/health", timeout=10).json()


def engine_cores(pid: int | None = None) -> list[Any]:
    """vLLM's engine core processes below `pid` (default: this process), by the title vLLM gives them
    (VLLM::EngineCore, setproctitle)."""
    import psutil

    children = psutil.Process(pid).children(recursive=True)
    return [p for p in children if "EngineCor" in p.name() + " ".join(p.cmdline())]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(model: Path, log_path: Path, **env: str) -> Iterator[str]:
    """`uvicorn serve_ocr:app` as a child process; yields its URL once /ready answers 200."""
    port = free_port()
    full = {**os.environ, "MODEL_PATH": str(model), "ENGINE": ENGINE, "LOG_LEVEL": "INFO", **env}
    if VLLM:
        full.setdefault("LOAD_FORMAT", "dummy")
    log = open(log_path, "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "serve_ocr:app", "--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT, env=full, stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 420
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited {proc.returncode}:\n{log_path.read_text()[-4000:]}")
            with contextlib.suppress(httpx.HTTPError):
                r = httpx.get(url + "/ready", timeout=5)
                if r.status_code == 200:
                    break
                body = r.json()
                if body.get("engine") == "none" and "starting" not in (body.get("reason") or ""):
                    raise RuntimeError(f"engine did not start: {body}\n{log_path.read_text()[-4000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not ready in time:\n{log_path.read_text()[-4000:]}")
            time.sleep(1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()
