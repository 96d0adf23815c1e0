"""Issue 28: phone photos. A JPEG over MAX_IMAGE_PIXELS (9000x5000 = 45 MP against 40 MP) and a 48 MP HEIC are
read reduced (JPEG: decoded at 1/2 by libjpeg; HEIC: decoded whole, then halved) with a note saying so, over
real HTTP against `uvicorn serve_ocr:app` with the defaults; the server's RSS (engine worker included) stays
within what the decoded-pixel budget charges for the photo."""

from __future__ import annotations

import io
import threading
from pathlib import Path

import httpx
import pillow_heif
import psutil
import pytest
from helpers.server import serve_process, show
from PIL import Image

# Measured through decoding and preprocessing: ~5 bytes a pixel (images.ROW_COST_PIXELS's comment); the budget
# charges a HEIF its full decode and any photo twice once reduced (server and engine worker).
BYTES_PER_PIXEL = 5
BASELINE_MB = 400  # the tiny model's activations for a gundam grid, the ZIP-free answer, allocator slack


def jpeg(size: tuple[int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, "white").save(out, "JPEG", quality=60)
    return out.getvalue()


def heic(size: tuple[int, int]) -> bytes:
    out = io.BytesIO()
    pillow_heif.from_pillow(Image.new("RGB", size, "white")).save(out, quality=30)
    return out.getvalue()


def peak_rss_mb(pid: int, stop: threading.Event, peaks: list[float]) -> None:
    server = psutil.Process(pid)
    while not stop.is_set():
        try:
            peaks.append(sum(p.memory_info().rss for p in [server, *server.children(recursive=True)]) / 2**20)
        except psutil.Error:
            pass
        stop.wait(0.05)


def server_pid(port: str) -> int:
    for proc in psutil.process_iter(["cmdline"]):
        argv = proc.info["cmdline"] or []
        if "serve_ocr:app" in argv and port in argv:
            return proc.pid
    raise AssertionError(f"no server on port {port}")


@pytest.mark.parametrize(("kind", "size", "decoded_mpix"), [("jpeg", (9000, 5000), 11.25 * 2),
                                                             ("heic", (8064, 6048), 48.8)])
def test_a_photo_over_max_image_pixels_is_read_reduced_with_a_note(
    tiny_checkpoint: Path, tmp_path: Path, kind: str, size: tuple[int, int], decoded_mpix: float
) -> None:
    data = jpeg(size) if kind == "jpeg" else heic(size)
    env = {"MODEL_PATH": str(tiny_checkpoint), "DEFAULT_MAX_TOKENS": "8", "DATA_DIR": str(tmp_path / "data")}
    with serve_process(env) as url:
        pid = server_pid(url.rsplit(":", 1)[1])
        warm = httpx.post(url + "/ocr/image/advanced", files={"file": ("w.jpg", jpeg((640, 480)))}, timeout=120)
        assert warm.status_code == 200, show(warm)
        start = sum(p.memory_info().rss for p in [psutil.Process(pid), *psutil.Process(pid).children(True)]) / 2**20
        stop, peaks = threading.Event(), []
        sampler = threading.Thread(target=peak_rss_mb, args=(pid, stop, peaks))
        sampler.start()
        try:
            r = httpx.post(url + "/ocr/image/advanced", files={"file": (f"photo.{kind}", data)}, timeout=300)
        finally:
            stop.set()
            sampler.join()
    assert r.status_code == 200, show(r)
    body = r.json()
    assert f"reduced from {size[0]}x{size[1]} to {size[0] // 2}x{size[1] // 2}" in (body["note"] or ""), show(r)
    assert (body["width"], body["height"]) == (size[0] // 2, size[1] // 2), show(r)
    growth = max(peaks) - start
    bound = decoded_mpix * BYTES_PER_PIXEL + BASELINE_MB
    print(f"{kind} {size}: RSS +{growth:.0f} MB (bound {bound:.0f} MB)")
    assert growth < bound, f"server + worker RSS grew {growth:.0f} MB, over {bound:.0f} MB"
