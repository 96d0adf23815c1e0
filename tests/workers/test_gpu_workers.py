"""GPU tests of engine workers: one vLLM worker per GPU, and a worker healed after its engine core dies.

One real service (`uvicorn serve_ocr:app`, ENGINE=vllm, LOAD_FORMAT=dummy, a real-size config-only
checkpoint, GPUS=auto) on every visible GPU. Checks: one worker process per GPU, each on its own GPU;
a burst of requests spread over them; then twice the vLLM engine core under an in-flight input is SIGKILLed:
the request gets a 503 with Retry-After, the supervisor replaces the worker without a server restart, other
requests are served, and after the second death the input is quarantined (422 naming its hash).
ENFORCE_EAGER keeps each engine start short (no CUDA graphs): this file checks behaviour, not speed.
Run on the GPU machine: `python -m pytest -m gpu tests/workers/test_gpu_workers.py -v`.
"""

from __future__ import annotations

import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from helpers.gpu import VLLM, engine_cores, health, png, post_image, real_size_model, serve, show
from helpers.gpu import gpu_ready as _gpu_ready

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not VLLM or not _gpu_ready(), reason="needs CUDA and vllm")]
POISON = (777, 555)
MAX_MODEL_LEN = 4096  # the served fixture's; a longer max_tokens is a 422 (allowed 1..MAX_MODEL_LEN)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    model_dir = real_size_model(tmp_path_factory)
    log = tmp_path_factory.mktemp("workers") / "server.log"
    env = {"MAX_CONCURRENCY": "auto", "MAX_MODEL_LEN": str(MAX_MODEL_LEN), "GENERATE_TIMEOUT_S": "120",
           "DEFAULT_MAX_TOKENS": "16", "GPUS": "auto", "ENGINES_PER_GPU": "1", "ENFORCE_EAGER": "true",
           "GPU_MEM_UTILIZATION": "0.5"}
    with serve(model_dir, log, **env) as url:
        yield url, log


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


def test_one_worker_per_gpu(served) -> None:
    url, _ = served
    body = health(url)
    engines = body["engines"]
    assert len(engines) == gpu_count(), body
    assert sorted(tuple(e["detail"]["gpus"]) for e in engines) == [(str(i),) for i in range(gpu_count())], body
    pids = {e["detail"]["pid"] for e in engines}
    # MAX_CONCURRENCY=auto: each worker measured its own and the server keeps to it.
    assert all(e["max_concurrency"] == e["detail"]["kv_cache_tokens"] // 4096 > 4 for e in engines), body
    assert len(pids) == len(engines) and all(engine_cores(pid) for pid in pids), body
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda i: post_image(url, "/ocr/image/advanced", {"max_tokens": "32"},
                                                     png(900, 1200, seed=i)), range(32)))
    assert all(r.status_code == 200 for r in answers), [show(r) for r in answers if r.status_code != 200]
    deadline = time.monotonic() + 15  # each worker's vLLM detail reaches /health within a few seconds
    while True:
        engines = health(url)["engines"]
        if all(e["detail"].get("vllm_unfinished", 0) == 0 and e["in_flight"] == 0 for e in engines):
            break
        assert time.monotonic() < deadline, engines


def test_engine_core_death_heals_and_quarantines(served) -> None:
    url, log = served
    for crash in (1, 2):
        with ThreadPoolExecutor(1) as pool:
            # As long as the server allows: with random weights the page runs to the model's length.
            future = pool.submit(post_image, url, "/ocr/image/advanced", {"max_tokens": str(MAX_MODEL_LEN)},
                                 png(*POISON))
            deadline = time.monotonic() + 60
            busy: list[dict] = []
            while not busy:
                assert not future.done(), f"the long request ended before it was in flight: {show(future.result())}"
                assert time.monotonic() < deadline, health(url)
                busy = [e for e in health(url)["engines"] if e["in_flight"] > 0]
                time.sleep(0.05)
            cores = engine_cores(busy[0]["detail"]["pid"])
            assert cores, busy
            for core in cores:
                core.send_signal(signal.SIGKILL)
            r = future.result()
        assert r.status_code == 503 and r.headers.get("retry-after"), show(r)
        deadline = time.monotonic() + 300
        while True:
            body = health(url)
            if body["restarts"] >= crash and all(e["ready"] for e in body["engines"]):
                break
            assert time.monotonic() < deadline, f"no heal after crash {crash}: {body}\n{log.read_text()[-3000:]}"
            time.sleep(1)
        ok = post_image(url, "/ocr/image/advanced", {"max_tokens": "8"}, png(640, 480, seed=99))
        assert ok.status_code == 200, show(ok)
    r = post_image(url, "/ocr/image/advanced", {"max_tokens": "8"}, png(*POISON))
    assert r.status_code == 422 and r.json()["type"].endswith("/quarantined-input"), show(r)
    assert health(url)["quarantined"] == 1
