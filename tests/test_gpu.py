"""GPU tests of the vLLM engine: the real service (uvicorn, ENGINE=vllm) and the engine in-process.

Skipped unless CUDA is available and `vllm` imports. The model is a real-size config-only checkpoint
served with LOAD_FORMAT=dummy (random weights): GPU_TEST_MODEL names it, else one is written to a temp dir.
One server for the `TestService` class (vLLM starts in about a minute) serves all five DeepSeek-OCR modes on
one engine (the `engines.vllm.modes` plugin); after it has stopped, one in-process `VllmEngine` (MODE=base
as its default, every mode served) checks streaming, abort and engine-death reporting.
Run: `python -m pytest -m gpu tests/test_gpu.py -v` (about 5 min on an H100).

GPU_TEST_ENGINE=torch runs the same checks against the PyTorch engine and a tiny checkpoint on any machine
(a way to debug this file without a GPU); engine-specific assertions are skipped then.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import os
import time
import zipfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers.gpu import ENGINE, GPU_ONLY, VLLM, engine_cores, png, post_image, post_pdf, real_size_model, serve, show

PDF_PAGE_A4 = (1190, 1684)  # an A4 page rendered at 144 dpi
GENERATE_TIMEOUT_S = 10  # short, so the deadline test aborts quickly; the other requests take < 2 s
pytestmark = GPU_ONLY


def balanced_png() -> bytes:
    """1280x1280, left half black, right half white: vLLM 0.26 sees its Gundam tiles as no image at all."""
    import numpy as np
    from PIL import Image

    a = np.zeros((1280, 1280, 3), np.uint8)
    a[:, 640:] = 255
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")
    return buf.getvalue()


def pdf(pages: int) -> bytes:
    import pymupdf

    doc = pymupdf.open()
    for n in range(pages):
        page = doc.new_page(width=595, height=842)  # A4 in points
        page.insert_text((72, 72), f"Page {n + 1}: quarterly report", fontsize=18)
        body = "Revenue grew 12% year on year. " * 40
        page.insert_textbox(pymupdf.Rect(72, 100, 523, 770), body, fontsize=10)
    data = doc.tobytes()
    doc.close()
    return data


ALL_MODES = ["tiny", "small", "base", "large", "gundam"]
# Sizes whose Gundam counts DEEPSEEK_OCR_FACTS section 3 gives: within 640x640, an A4 page, a 1x6 strip.
MODE_SIZES = [(600, 500), (1190, 1684), (300, 2000)]
FACTS_TOKENS = {"tiny": 73, "small": 111, "base": 273, "large": 421}
FACTS_GUNDAM = {(600, 500): 273, (1190, 1684): 903, (300, 2000): 933}


def facts_tokens(mode: str, size: tuple[int, int]) -> int:
    """Image tokens by DEEPSEEK_OCR_FACTS section 3 (checked against our own count too)."""
    from process.modes import MODES, count_image_tokens

    facts = FACTS_TOKENS[mode] if mode != "gundam" else FACTS_GUNDAM[size]
    spec = MODES[mode]
    assert facts == count_image_tokens(*size, spec.base_size, spec.image_size, spec.crop), (mode, size)
    return facts


def gundam_tokens(width: int, height: int) -> int:
    from process.modes import count_image_tokens

    return count_image_tokens(width, height, 1024, 640, True)


def prompt_ids(model: Path, prompt: str, has_image: bool) -> list[int]:
    from engines.vllm.engine import PromptBuilder

    return PromptBuilder.from_checkpoint(model).token_ids(prompt, 1 if has_image else None)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from deepseek_ocr import make_tiny

    if not VLLM:
        return make_tiny(tmp_path_factory.mktemp("tiny"), seed=0)
    return real_size_model(tmp_path_factory)


def unfinished(body: dict[str, Any]) -> int:
    """vLLM's unfinished requests in a /health answer, over every engine (ENGINES_PER_GPU=2 runs two; the
    top-level `detail` is the first engine's only)."""
    details = [e["detail"] for e in body["engines"]] or [body["detail"]]
    return sum(d.get("vllm_unfinished", 0) for d in details)


def wait_idle(url: str, seconds: float) -> dict[str, Any]:
    """/health once nothing is in flight (our counter and vLLM's own, every engine), or the last answer."""
    deadline = time.monotonic() + seconds
    while True:
        body = httpx.get(url + "/health", timeout=5).json()
        if body["in_flight"] == 0 and unfinished(body) == 0:
            return body
        if time.monotonic() > deadline:
            return body
        time.sleep(0.2)


# --------------------------------------------------------------------------------------- the service


@pytest.fixture(scope="class")
def url(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The service of `TestService`; class-scoped so that it has stopped before the in-process test."""
    log = tmp_path_factory.mktemp("server") / "server.log"
    env = {"MAX_CONCURRENCY": "32", "GENERATE_TIMEOUT_S": str(GENERATE_TIMEOUT_S), "DEFAULT_MAX_TOKENS": "64"}
    with serve(model_dir, log, **env) as base:
        yield base
    if os.environ.get("GPU_TEST_LOG"):
        Path(os.environ["GPU_TEST_LOG"]).write_text(log.read_text())


class TestService:

    def test_info_routes_answer(self, url: str) -> None:
        for path in ("/", "/health", "/ready", "/ocr/status", "/pdf/status", "/batch/status", "/ocr/info",
                     "/pdf/info", "/batch/info"):
            r = httpx.get(url + path, timeout=10)
            assert r.status_code == 200, show(r)
        root = httpx.get(url + "/", timeout=10).json()
        assert root["engine"] == ENGINE and root["ready"], root
        assert root["modes"] == ALL_MODES, root
        if VLLM:
            health = httpx.get(url + "/health", timeout=10).json()
            assert health["detail"]["vllm_version"].startswith("0.26"), health
            assert health["detail"]["served_modes"] == ALL_MODES, health
            # Every engine worker (ENGINES_PER_GPU may run several on the GPU), not only the first.
            assert all(e["ready"] and e["detail"]["served_modes"] == ALL_MODES for e in health["engines"]), health
        for router in ("ocr", "pdf", "batch"):
            status = httpx.get(f"{url}/{router}/status", timeout=10).json()
            assert status["ready"] and status["modes"] == ALL_MODES, status

    def test_generate_json_with_and_without_image(self, url: str, model_dir: Path) -> None:
        r = httpx.post(url + "/generate", json={"prompt": "Hello there", "max_tokens": 8}, timeout=60)
        assert r.status_code == 200, show(r)
        usage = r.json()["usage"]
        assert usage["image_tokens"] == 0, usage
        assert usage["prompt_tokens"] == len(prompt_ids(model_dir, "Hello there", False)), usage
        assert 1 <= usage["completion_tokens"] <= 8, usage
        image = base64.b64encode(png(700, 500)).decode()
        body = {"prompt": "<image>\nFree OCR.", "image_base64": image, "max_tokens": 8, "ngram_size": 20,
                "ngram_window": 50}
        r = httpx.post(url + "/generate", json=body, timeout=60)
        assert r.status_code == 200, show(r)
        answer = r.json()
        tokens = gundam_tokens(700, 500)
        assert answer["usage"]["image_tokens"] == tokens, answer
        text_ids = prompt_ids(model_dir, body["prompt"], True)  # one <image> id, expanded by the engine
        assert answer["usage"]["prompt_tokens"] == len(text_ids) - 1 + tokens, answer
        assert answer["finish_reason"] in ("length", "stop") and answer["mode"] == "gundam", answer

    def test_generate_with_file_seed_example(self, url: str) -> None:
        r = post_image(url, "/generate_with_file", {"prompt": "<image>Extract all text", "max_tokens": "16"},
                       png(900, 700), name="invoice.png")
        assert r.status_code == 200, show(r)
        body = r.json()
        assert set(body) >= {"result", "finish_reason", "mode", "usage", "elapsed_s"}, body
        assert body["usage"]["image_tokens"] == gundam_tokens(900, 700), body

    def test_two_images_one_prompt(self, url: str) -> None:
        """Issue 28: two images fill two `<image>` tags (vLLM gets multi_modal_data {"image": [a, b]}); the image
        tokens are the FACTS count of each, in order, and the answer carries the sampled tokens' confidence."""
        sizes = [(600, 500), (1190, 1684)]
        want = [facts_tokens("gundam", size) for size in sizes]
        files = [("files", (f"p{i}.png", png(*size, seed=i), "image/png")) for i, size in enumerate(sizes)]
        r = httpx.post(url + "/generate_with_file", files=files,
                       data={"prompt": "<image>\n<image>\nFree OCR.", "max_tokens": "16"}, timeout=120)
        assert r.status_code == 200, show(r)
        usage = r.json()["usage"]
        assert usage["image_tokens"] == sum(want) and usage["per_image"] == want, r.json()
        confidence = r.json()["confidence"]
        assert confidence is not None and confidence["tokens"] >= 1, r.json()
        assert confidence["min_logprob"] <= confidence["mean_logprob"] <= 0, confidence
        parts = [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(
            png(*size, seed=i)).decode()}} for i, size in enumerate(sizes)]
        chat = {"model": "deepseek-ocr", "max_tokens": 16,
                "messages": [{"role": "user", "content": [*parts, {"type": "text", "text": "Free OCR."}]}]}
        r = httpx.post(url + "/v1/chat/completions", json=chat, timeout=120)
        assert r.status_code == 200, show(r)
        assert r.json()["usage"]["image_tokens"] == sum(want), r.json()
        assert r.json()["usage"]["per_image"] == want, r.json()

    @pytest.mark.parametrize("size,facts", [((640, 640), 273), ((600, 500), 273), ((1190, 1684), 903),
                                            ((1684, 1190), None), ((300, 2000), 933), ((8000, 300), None),
                                            ((1024, 1024), None), ((1200, 800), None)])
    def test_image_tokens_gundam(self, url: str, size: tuple[int, int], facts: int | None) -> None:
        r = post_image(url, "/generate_with_file", {"max_tokens": "1"}, png(*size))
        assert r.status_code == 200, show(r)
        got = r.json()["usage"]["image_tokens"]
        assert got == gundam_tokens(*size), (size, got)
        if facts is not None:
            assert got == facts, (size, got)  # the figures of DEEPSEEK_OCR_FACTS section 3

    @pytest.mark.parametrize("mode", ALL_MODES)
    def test_every_mode_over_http_on_one_engine(self, url: str, mode: str) -> None:
        for size in MODE_SIZES:
            r = post_image(url, "/ocr/image/advanced", {"mode": mode, "max_tokens": "2", "draw_boxes": "false"},
                           png(*size))
            assert r.status_code == 200, show(r)
            body = r.json()
            assert body["mode"] == mode, body
            assert body["usage"]["image_tokens"] == facts_tokens(mode, size), (mode, size, body["usage"])

    def test_mixed_mode_burst(self, url: str) -> None:
        """All modes at once: vLLM batches their images, each mode's encoder batch must stay its own."""
        jobs = [(ALL_MODES[i % len(ALL_MODES)], MODE_SIZES[i % len(MODE_SIZES)], i) for i in range(10)]

        def one(job: tuple[str, tuple[int, int], int]) -> httpx.Response:
            mode, size, seed = job
            form = {"mode": mode, "max_tokens": "8", "draw_boxes": "false", "ngram_size": "20", "ngram_window": "50"}
            return post_image(url, "/ocr/image/advanced", form, png(*size, seed=seed), timeout=120)

        with ThreadPoolExecutor(len(jobs)) as pool:
            answers = list(pool.map(one, jobs))
        failed = [show(r) for r in answers if r.status_code != 200]
        assert not failed, failed[:3]
        got = [(r.json()["mode"], r.json()["usage"]["image_tokens"]) for r in answers]
        assert got == [(mode, facts_tokens(mode, size)) for mode, size, _ in jobs], got
        assert all(r.json()["usage"]["completion_tokens"] >= 1 for r in answers)
        assert wait_idle(url, 10)["in_flight"] == 0

    def test_ocr_image_routes(self, url: str) -> None:
        page = png(800, 1000)
        form = {"max_tokens": "16", "draw_boxes": "true", "crop_regions": "true"}
        r = post_image(url, "/ocr/image/advanced", form, page)
        assert r.status_code == 200, show(r)
        assert r.json()["usage"]["image_tokens"] == gundam_tokens(800, 1000)
        r = post_image(url, "/ocr/image/advanced", {"max_tokens": "8", "crop_mode": "tiling"}, page)
        assert r.status_code == 200, show(r)
        r = post_image(url, "/ocr/image/simple", {"max_tokens": "8"}, page)
        assert r.status_code == 200, show(r)
        assert isinstance(r.json()["text"], str)

    def test_pdf_routes(self, url: str) -> None:
        doc = pdf(2)
        form = {"max_tokens": "8", "dpi": "144", "draw_layouts": "true", "extract_images": "true"}
        r = post_pdf(url, "/pdf/ocr", doc, form)
        assert r.status_code == 200, show(r)
        body = r.json()
        assert [p["page"] for p in body["pages"]] == [1, 2], body
        for page in body["pages"]:
            assert page["usage"]["image_tokens"] == gundam_tokens(*PDF_PAGE_A4) == 903, page
            assert 1 <= page["usage"]["completion_tokens"] <= 8, page
        r = post_pdf(url, "/pdf/ocr/simple", doc, {"max_tokens": "8"})
        assert r.status_code == 200, show(r)
        assert len(r.json()["pages"]) == 2
        r = post_pdf(url, "/pdf/ocr/download", doc, {"max_tokens": "8", "draw_layouts": "false"})
        if r.status_code != 404:  # an extra of this service, not a seed route
            assert r.status_code == 200, show(r)
            assert zipfile.ZipFile(io.BytesIO(r.content)).namelist(), "empty ZIP"

    def test_batch_routes(self, url: str) -> None:
        def files() -> list[tuple[str, tuple[str, bytes, str]]]:
            return [("files", ("a.png", png(500, 400, seed=1), "image/png")),
                    ("files", ("b.png", png(900, 1200, seed=2), "image/png"))]

        r = httpx.post(url + "/batch/ocr", files=files(), data={"max_tokens": "8"}, timeout=180)
        assert r.status_code == 200, show(r)
        results = r.json()["results"]
        assert [x["filename"] for x in results] == ["a.png", "b.png"], results
        expected = [gundam_tokens(500, 400), gundam_tokens(900, 1200)]
        assert [x["usage"]["image_tokens"] for x in results] == expected, results
        r = httpx.post(url + "/batch/ocr/download", files=files(), data={"max_tokens": "8"}, timeout=180)
        assert r.status_code == 200, show(r)
        assert r.headers["content-type"] == "application/zip", show(r)
        assert zipfile.ZipFile(io.BytesIO(r.content)).namelist()
        r = httpx.post(url + "/batch/ocr/simple", files=files(), data={"max_tokens": "8"}, timeout=180)
        assert r.status_code == 200, show(r)
        assert len(r.json()["results"]) == 2

    def test_concurrent_requests_all_answer(self, url: str) -> None:
        def one(i: int) -> httpx.Response:
            form = {"max_tokens": "32", "ngram_size": "20", "ngram_window": "50"}
            return post_image(url, "/generate_with_file", form, png(640, 480, seed=i), timeout=120)

        with ThreadPoolExecutor(48) as pool:
            answers = list(pool.map(one, range(48)))  # more than MAX_CONCURRENCY=32: some wait for a slot
        failed = [show(r) for r in answers if r.status_code != 200]
        assert not failed, failed[:3]
        assert all(r.json()["usage"]["completion_tokens"] >= 1 for r in answers)
        assert wait_idle(url, 10)["in_flight"] == 0

    def test_deadline_aborts_engine_work(self, url: str) -> None:
        started = time.monotonic()
        r = post_image(url, "/generate_with_file", {"max_tokens": "7000", "ngram_size": "0"}, timeout=120)
        if r.status_code == 200:
            pytest.skip(f"the model finished early ({r.json()['finish_reason']}); no deadline to hit")
        assert r.status_code == 504, show(r)
        # Cut at the deadline, not when 7000 tokens are done (about a minute or more for one stream):
        # 30 s past the deadline leaves room for a busy GPU box and still tells the two apart.
        assert time.monotonic() - started < GENERATE_TIMEOUT_S + 30
        health = wait_idle(url, 5)
        assert health["in_flight"] == 0 and unfinished(health) == 0, health
        self._next_request_works(url)

    def test_client_disconnect_aborts_engine_work(self, url: str) -> None:
        with pytest.raises(httpx.ReadTimeout):
            post_image(url, "/generate_with_file", {"max_tokens": "7000", "ngram_size": "0"},
                       timeout=httpx.Timeout(60, read=2))
        # Well before GENERATE_TIMEOUT_S: only the disconnect can have stopped it.
        health = wait_idle(url, GENERATE_TIMEOUT_S - 4)
        assert health["in_flight"] == 0 and unfinished(health) == 0, health
        self._next_request_works(url)

    def test_balanced_page_does_not_kill_the_engine(self, url: str) -> None:
        r = post_image(url, "/generate_with_file", {"max_tokens": "4"}, balanced_png(), name="half.png")
        assert r.status_code == 200, show(r)
        assert r.json()["usage"]["image_tokens"] == gundam_tokens(1280, 1280)
        self._next_request_works(url)

    @staticmethod
    def _next_request_works(url: str) -> None:
        r = post_image(url, "/generate_with_file", {"max_tokens": "4"}, png(320, 240))
        assert r.status_code == 200, show(r)
        assert httpx.get(url + "/ready", timeout=10).status_code == 200


# --------------------------------------------------------------------------------------- in-process


def test_engine_in_process_streams_aborts_and_reports_death(model_dir: Path) -> None:
    """A second engine only after the service's is gone (two would need twice the GPU memory)."""
    if not VLLM:
        pytest.skip("vLLM engine only")
    asyncio.run(_in_process(model_dir))


async def _in_process(model_dir: Path) -> None:
    from PIL import Image

    from config import MODES, Settings
    from engines.base import EngineRequest
    from engines.base import SamplingParams as Sampling
    from engines.vllm.args import MOE_CONFIGS
    from engines.vllm.engine import VllmEngine
    from errors import ModelNotReady

    settings = Settings(model_path=str(model_dir), engine="vllm", load_format="dummy", mode="base",
                        max_concurrency="auto", max_model_len=4096, enforce_eager=True, gpu_mem_utilization=0.5)
    engine = VllmEngine(settings)
    await engine.start()
    try:
        assert engine.served_modes == tuple(MODES), engine.health()
        # vLLM's offline step budget, not AsyncLLM's 2,048 (engines/vllm/args.offline_batched_tokens).
        from vllm import EngineArgs
        from vllm.usage.usage_lib import UsageContext

        detail = engine.health().detail
        offline = EngineArgs.get_batch_defaults(1)[0][UsageContext.LLM_CLASS]
        assert detail["max_num_batched_tokens"] == offline >= 8192, detail
        # MAX_CONCURRENCY=auto: as many sequences of MAX_MODEL_LEN as vLLM's measured cache holds (the ceiling
        # vLLM was started with is above it: the weights are not in it), and the settings vLLM settled on.
        assert detail["kv_cache_dtype"] == "auto" and detail["async_scheduling"] is True, detail
        assert engine.max_concurrency == detail["kv_cache_tokens"] // 4096 < detail["max_num_seqs"], detail
        assert engine.max_concurrency > 4, detail  # half an H100 holds ~70 sequences of 4,096 tokens
        import torch

        device = torch.cuda.get_device_name(0).replace(" ", "_")
        assert detail["moe_table"]["file"].startswith("E=64,N=896,device_name="), detail
        assert detail["moe_table"]["file"].split("device_name=")[1].split(".json")[0] in (device, "NVIDIA_H200")
        shipped = MOE_CONFIGS / detail["moe_table"]["file"]  # used where it exists, else vLLM's own or none
        assert (detail["moe_table"]["found"] == str(shipped)) == await asyncio.to_thread(shipped.is_file), detail
        page = Image.open(io.BytesIO(png(*PDF_PAGE_A4)))

        def request(max_tokens: int, mode: str = "base", stream: bool = True) -> EngineRequest:
            return EngineRequest("<image>\nFree OCR.", page, MODES[mode],
                                 Sampling(max_tokens=max_tokens, ngram_size=20, ngram_window=50), stream=stream)

        # Streaming: several deltas, the last one with the finish reason and the usage.
        chunks = [c async for c in engine.stream(request(24))]
        assert len(chunks) > 1 and all(c.finish_reason is None for c in chunks[:-1]), chunks
        last = chunks[-1]
        assert last.finish_reason in ("length", "stop") and last.usage is not None, last
        assert last.usage.image_tokens == 273, last.usage  # base: 16 x 17 + 1 whatever the page
        if last.finish_reason == "length":
            assert last.usage.completion_tokens == 24, last.usage
        again = await engine.generate(request(24, stream=False))  # FINAL_ONLY: one result, no deltas
        assert again.text == "".join(c.text for c in chunks), "greedy output differs between runs"

        # Another mode on the same engine: the page is tiled 2x3 (FACTS section 3), then base again.
        assert (await engine.generate(request(4, mode="gundam"))).usage.image_tokens == 903
        tiny, base = await asyncio.gather(engine.generate(request(4, mode="tiny")), engine.generate(request(4)))
        assert (tiny.usage.image_tokens, base.usage.image_tokens) == (73, 273), (tiny.usage, base.usage)

        # Abort: cancel the consumer mid-stream; our slot and vLLM's sequence are both released.
        seen = asyncio.Event()

        async def consume() -> None:
            async for chunk in engine.stream(request(4000)):
                if chunk.text:
                    seen.set()

        task = asyncio.create_task(consume())
        await asyncio.wait_for(seen.wait(), 60)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        for _ in range(50):
            health = engine.health()
            if health.running == 0 and health.detail.get("vllm_unfinished") == 0:
                break
            await asyncio.sleep(0.1)
        assert health.running == 0 and health.detail.get("vllm_unfinished") == 0, health
        assert (await engine.generate(request(4))).usage.image_tokens == 273

        # Death: kill the engine core process; health says so and requests get 503.
        import psutil

        children = psutil.Process().children(recursive=True)
        # vLLM titles it VLLM::EngineCore (setproctitle); else every child but multiprocessing's tracker.
        cores = engine_cores() or [p for p in children if "resource_tracker" not in " ".join(p.cmdline())]
        assert cores, [(p.pid, p.name(), p.cmdline()) for p in children]
        for p in cores:
            p.kill()
        for _ in range(100):
            if not engine.health().ready:
                break
            await asyncio.sleep(0.1)
        health = engine.health()
        assert not health.ready and "died" in (health.reason or ""), health
        with pytest.raises(ModelNotReady):
            await engine.generate(request(4))

        # Healing: what the service's supervisor does (engines.supervisor) - a restart in place serves again.
        await engine.restart()
        assert engine.ready, engine.health()
        assert (await engine.generate(request(4))).usage.image_tokens == 273
    finally:
        await engine.close()


@pytest.mark.skipif(not VLLM, reason="vLLM's processor")
def test_resized_processor_cuts_what_a_built_one_cuts(model_dir: Path) -> None:
    """Each mode's processor is a copy of vLLM's Gundam one with the two sides set (`resized_processor`): its
    views and tokens equal those of a processor vLLM's class builds with the mode's sizes, and the Gundam
    original is left as it was."""
    import numpy as np
    from PIL import Image
    from transformers import AutoTokenizer
    from vllm.transformers_utils.processors.deepseek_ocr import DeepseekOCRProcessor

    from engines.vllm.modes import GUNDAM, ViewSizes
    from engines.vllm.modes_model import resized_processor
    from process.modes import MODES

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    default = DeepseekOCRProcessor(tokenizer, image_size=GUNDAM.image_size, base_size=GUNDAM.base_size)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype="uint8")) for w, h in MODE_SIZES]
    for mode in ALL_MODES:
        sizes = ViewSizes.for_mode(MODES[mode])
        copied = resized_processor(default, sizes)
        assert resized_processor(default, sizes) is copied  # one copy per size, reused
        assert copied.tokenizer is default.tokenizer
        built = DeepseekOCRProcessor(tokenizer, image_size=sizes.image_size, base_size=sizes.base_size)
        assert set(vars(copied)) == set(vars(built)), mode
        for image in images:
            a = built(prompt="<image>\nFree OCR.", images=[image], crop_mode=sizes.crop)
            b = copied(prompt="<image>\nFree OCR.", images=[image], crop_mode=sizes.crop)
            assert set(a) == set(b), mode
            for key in a:
                assert a[key].shape == b[key].shape and bool((a[key] == b[key]).all()), (mode, image.size, key)
    assert (default.base_size, default.image_size) == (GUNDAM.base_size, GUNDAM.image_size)
