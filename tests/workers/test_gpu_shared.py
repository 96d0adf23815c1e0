"""GPU test of two vLLM engine workers sharing one GPU (ENGINES_PER_GPU=2).

A real service (`uvicorn serve_ocr:app`, ENGINE=vllm, LOAD_FORMAT=dummy, a real-size config-only checkpoint)
on GPU 0 with two worker processes, each with half the memory and the sequences: both measured about the
same KV cache, both serve a burst, and one whose engine core is killed is replaced while its neighbour serves
on, and comes back with as large a cache as before beside a loaded neighbour. Its own module: a module's
server holds its GPU memory until the module ends (test_gpu_workers.py's takes half the GPU).
Run on the GPU machine: `python -m pytest -m gpu tests/workers/test_gpu_shared.py -v`.
"""

from __future__ import annotations

import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from helpers.gpu import VLLM, engine_cores, health, png, post_image, real_size_model, serve, show
from helpers.gpu import gpu_ready as _gpu_ready

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not VLLM or not _gpu_ready(), reason="needs CUDA and vllm")]


@pytest.fixture(scope="module")
def shared_gpu(tmp_path_factory: pytest.TempPathFactory):
    model_dir = real_size_model(tmp_path_factory)
    log = tmp_path_factory.mktemp("shared") / "server.log"
    env = {"MAX_CONCURRENCY": "64", "MAX_MODEL_LEN": "4096", "GENERATE_TIMEOUT_S": "120", "DEFAULT_MAX_TOKENS": "16",
           "GPUS": "0", "ENGINES_PER_GPU": "2", "ENFORCE_EAGER": "true", "GPU_MEM_UTILIZATION": "0.6"}
    with serve(model_dir, log, **env) as url:
        yield url, log


def test_two_engines_share_one_gpu(shared_gpu) -> None:
    url, log = shared_gpu
    engines = health(url)["engines"]
    assert [(e["detail"]["gpus"], e["max_concurrency"], e["detail"]["max_num_seqs"]) for e in engines] == \
        [(["0"], 32, 32)] * 2, engines
    assert len({e["detail"]["pid"] for e in engines}) == 2 and all(engine_cores(e["detail"]["pid"]) for e in engines)
    caches = [e["detail"]["kv_cache_tokens"] for e in engines]
    # Each measured its cache in its own 0.3 of the GPU with the other loaded: about equal, neither starved.
    assert min(caches) > 0.8 * max(caches) and min(caches) > 32 * 4096, caches
    busy: dict[int, int] = {}
    with ThreadPoolExecutor(24) as pool:
        futures = [pool.submit(post_image, url, "/ocr/image/advanced", {"max_tokens": "48"}, png(900, 1200, seed=i))
                   for i in range(48)]
        while not all(f.done() for f in futures):
            for e in health(url)["engines"]:
                busy[e["detail"]["pid"]] = max(busy.get(e["detail"]["pid"], 0), e["in_flight"])
            time.sleep(0.05)
    answers = [f.result() for f in futures]
    assert all(r.status_code == 200 for r in answers), [show(r) for r in answers if r.status_code != 200]
    assert len(busy) == 2 and all(n > 0 for n in busy.values()), busy  # admission used both

    # One engine core killed: the other serves on; the new one sizes its cache beside a loaded neighbour.
    victim = engines[1]["detail"]["pid"]
    for core in engine_cores(victim):
        core.send_signal(signal.SIGKILL)
    time.sleep(2)  # the worker reports its engine core's death within a health period (0.5 s)
    deadline = time.monotonic() + 300
    while True:
        body = health(url)
        if body["restarts"] >= 1 and all(e["ready"] for e in body["engines"]):
            break
        assert time.monotonic() < deadline, f"no heal: {body}\n{log.read_text()[-3000:]}"
        r = post_image(url, "/ocr/image/advanced", {"max_tokens": "8"}, png(640, 480, seed=7))
        assert r.status_code == 200, show(r)  # served by the neighbour meanwhile
        time.sleep(1)
    after = [e["detail"]["kv_cache_tokens"] for e in body["engines"]]
    assert min(after) > 0.8 * max(caches), (caches, after)
    ok = post_image(url, "/ocr/image/advanced", {"max_tokens": "8"}, png(640, 480, seed=8))
    assert ok.status_code == 200, show(ok)
