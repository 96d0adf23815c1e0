"""Engine workers (workers/): each engine in its own process, over real HTTP with the real PyTorch engine.

The plan of workers per GPU is a pure function, checked directly. The rest runs real worker processes on
the tiny checkpoint: two CPU workers sharing a load, a worker SIGKILLed mid-load and mid-job (the server
heals without a restart, the job completes), an input in flight at two worker deaths quarantined, the
workers dying with a `kill -9`ed server, images' pixels reaching the worker unchanged (memfd and the socket
fallback), and no descriptor left open after requests that succeed, fail or are aborted.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from helpers.images import png_bytes
from helpers.jobs import submit, wait
from helpers.pdfs import make_pdf
from helpers.server import make_settings, serve_app, serve_process, show
from PIL import Image

from config import Settings, model_specs, usable_cpus
from engines.base import EngineRequest, SamplingParams
from errors import BadRequest, ModelNotReady
from process.modes import MODES
from serve_ocr import create_app
from workers import wire
from workers.client import WorkerEngine
from workers.plan import WorkerSpec, worker_plan

POISON_SIZE = (321, 123)


def plan(visible: list[str], kind: str = "vllm", memory_gib: float | None = None, **values: object) -> list[WorkerSpec]:
    return worker_plan(Settings(**values), kind, visible, memory_gib)  # type: ignore[arg-type]


def where(specs: list[WorkerSpec]) -> list[tuple[int, tuple[str, ...] | None]]:
    return [(s.index, s.gpus) for s in specs]


def test_worker_plan_one_worker_per_gpu() -> None:
    assert where(plan(["0", "1"])) == [(0, ("0",)), (1, ("1",))]
    assert where(plan(["0", "1", "2", "3"], tensor_parallel_size=2)) == [(0, ("0", "1")), (1, ("2", "3"))]
    assert where(plan(["0", "1"], gpus="1")) == [(0, ("1",))]
    assert where(plan(["3", "5"], gpus="5,3")) == [(0, ("5",)), (1, ("3",))]
    assert where(plan(["0", "1", "2"], data_parallel_size=2)) == [(0, ("0",)), (1, ("1",))]
    assert where(plan(["0", "1"], "torch")) == [(0, ("0",)), (1, ("1",))]
    assert plan(["0", "1"], "torch", device="cpu") == [WorkerSpec(0, ())]
    assert plan([], "torch") == [WorkerSpec(0, ())]
    share = max(1, usable_cpus() // 2)
    assert plan([], "torch", data_parallel_size=2) == [WorkerSpec(0, (), share), WorkerSpec(1, (), share)]
    assert plan(["0"], "torch", gpus="none") == [WorkerSpec(0, ())]


def test_gpu_workers_do_not_oversubscribe_the_cores() -> None:
    """Several vLLM workers on a host run one thread per operation each; one alone keeps raw vLLM's environment
    (no OMP_NUM_THREADS: its engine core keeps torch's threads); a PyTorch GPU worker's get its share."""
    assert [s.threads for s in plan(["0", "1"])] == [1, 1]
    assert [s.threads for s in plan(["0"])] == [None]
    assert [s.threads for s in plan(["0", "1"], "torch")] == [max(1, usable_cpus() // 2)] * 2


def test_cpu_workers_are_capped_at_the_usable_cores() -> None:
    cores = usable_cpus()
    assert len(plan([], "torch", data_parallel_size=cores)) == cores
    with pytest.raises(ValueError, match=f"DATA_PARALLEL_SIZE={cores + 1} CPU workers on {cores} usable cores"):
        plan([], "torch", data_parallel_size=cores + 1)
    with pytest.raises(ValueError, match="CPU workers on"):  # GPUS=none: CPU workers for the torch engine
        plan(["0"], "torch", gpus="none", data_parallel_size=cores + 1)


@pytest.mark.parametrize(
    ("visible", "values", "needle"),
    [
        (["0"], {"gpus": "1"}, "GPUS=1: GPU 1 is not visible"),
        (["0", "1"], {"data_parallel_size": 3}, "DATA_PARALLEL_SIZE=3 needs 3 GPUs"),
        (["0", "1", "2"], {"tensor_parallel_size": 2}, "not a multiple of TENSOR_PARALLEL_SIZE=2"),
        ([], {}, "ENGINE=vllm needs a GPU"),
    ],
)
def test_worker_plan_refuses_what_the_machine_lacks(visible: list[str], values: dict, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        plan(visible, **values)


def test_gpus_setting_is_checked() -> None:
    from config import SettingsError, load_settings

    with pytest.raises(SettingsError, match="GPUS"):
        load_settings(gpus="first")
    assert load_settings(gpus=" AUTO ").gpus == " AUTO "


def test_engines_per_gpu_puts_that_many_vllm_workers_on_each_gpu() -> None:
    specs = plan(["0", "1"], engines_per_gpu=2)
    assert where(specs) == [(0, ("0",)), (1, ("0",)), (2, ("1",)), (3, ("1",))]
    assert [s.label for s in specs] == ["w0 (gpu 0, 1 of 2)", "w1 (gpu 0, 2 of 2)", "w2 (gpu 1, 1 of 2)",
                                        "w3 (gpu 1, 2 of 2)"]
    assert {s.shares for s in specs} == {2} and {s.threads for s in specs} == {max(1, usable_cpus() // 4)}
    assert where(plan(["0", "1", "2", "3"], tensor_parallel_size=2, engines_per_gpu=3)) == [
        (0, ("0", "1")), (1, ("0", "1")), (2, ("0", "1")), (3, ("2", "3")), (4, ("2", "3")), (5, ("2", "3"))]
    assert where(plan(["0", "1", "2"], data_parallel_size=1, engines_per_gpu=2)) == [(0, ("0",)), (1, ("0",))]
    # The PyTorch engine runs one per GPU (its memory is not divided up front): the setting is not applied.
    assert plan(["0", "1"], "torch", engines_per_gpu=2) == plan(["0", "1"], "torch")
    assert plan(["0"], engines_per_gpu=1) == [WorkerSpec(0, ("0",))]


def test_engines_per_gpu_auto_shares_only_gpus_with_the_memory_for_two() -> None:
    """auto: two engines on each GPU of 64 GiB or more (an 80 GB H100 reports 79.6), one where the GPU is
    smaller, its memory unknown, a worker spans several GPUs, the engine is PyTorch, or one sequence is allowed."""
    h100 = 79.6
    assert where(plan(["0", "1"], memory_gib=h100, engines_per_gpu="auto")) == [
        (0, ("0",)), (1, ("0",)), (2, ("1",)), (3, ("1",))]
    assert {s.shares for s in plan(["0"], memory_gib=h100, engines_per_gpu=" AUTO ")} == {2}
    assert plan(["0"], memory_gib=47.5, engines_per_gpu="auto") == plan(["0"])  # a 48 GB card
    assert plan(["0"], memory_gib=None, engines_per_gpu="auto") == plan(["0"])
    assert plan(["0", "1"], memory_gib=h100, engines_per_gpu="auto", tensor_parallel_size=2) == \
        plan(["0", "1"], tensor_parallel_size=2)
    assert plan(["0"], "torch", memory_gib=h100, engines_per_gpu="auto") == plan(["0"], "torch")
    assert plan(["0"], memory_gib=h100, engines_per_gpu="auto", max_concurrency=1) == plan(["0"], max_concurrency=1)
    assert {s.shares for s in plan(["0"], memory_gib=h100, engines_per_gpu="auto", max_concurrency="auto")} == {2}
    # A number is taken as given, whatever the memory.
    assert {s.shares for s in plan(["0"], memory_gib=16.0, engines_per_gpu=3)} == {3}


@pytest.mark.parametrize("value", ["0", "9", "two", "1.5", True])
def test_engines_per_gpu_refuses_what_is_not_1_to_8_or_auto(value: object) -> None:
    from config import SettingsError, load_settings

    with pytest.raises(SettingsError, match="ENGINES_PER_GPU.*whole number 1..8 or auto"):
        load_settings(engines_per_gpu=value)


def test_nvml_memory_answers_where_nvml_counts_gpus() -> None:
    """NVML through the driver's library: no figure without a driver or GPU (this CPU machine), a positive one
    for every machine with a GPU."""
    from engines.registry import nvml_gpu_count, nvml_gpu_memory_gib

    memory = nvml_gpu_memory_gib()
    assert (memory is None) == (nvml_gpu_count() == 0)
    assert memory is None or memory > 1


class FakeNvml:
    """The calls `engines.registry` makes of the driver's libnvidia-ml, answering for `sizes_gib` GPUs (None: a
    GPU whose memory query fails). Return codes as NVML's: 0 success, 999 unknown error."""

    def __init__(self, sizes_gib: list[float | None], init: int = 0) -> None:
        self.sizes, self.init, self.shutdowns = sizes_gib, init, 0

    def nvmlInit_v2(self) -> int:  # noqa: N802 - NVML's names
        return self.init

    def nvmlShutdown(self) -> int:  # noqa: N802
        self.shutdowns += 1
        return 0

    def nvmlDeviceGetCount_v2(self, count) -> int:  # noqa: N802 - ctypes.byref(c_uint)
        count._obj.value = len(self.sizes)
        return 0

    def nvmlDeviceGetHandleByIndex_v2(self, index, handle) -> int:  # noqa: N802
        handle._obj.value = 1000 + index.value
        return 0

    def nvmlDeviceGetMemoryInfo(self, handle, memory) -> int:  # noqa: N802 - memory: byref((c_ulonglong * 3)())
        size = self.sizes[handle.value - 1000]  # the handle by value, as NVML takes it
        if size is None:
            return 999
        memory._obj[0], memory._obj[1], memory._obj[2] = int(size * 2**30), 0, 0
        return 0


@pytest.mark.parametrize(("sizes", "init", "count", "memory"), [
    ([79.6, 139.8], 0, 2, 79.6),  # an H100 beside an H200: the smaller decides ENGINES_PER_GPU=auto
    ([None, 23.5], 0, 2, 23.5),  # a GPU whose query fails is left out
    ([None], 0, 1, None),
    ([], 0, 0, None),  # a driver without GPUs
    ([80.0], 999, 0, None),  # nvmlInit fails: as no driver
])
def test_nvml_figures_from_the_drivers_answers(monkeypatch: pytest.MonkeyPatch, sizes: list, init: int,
                                               count: int, memory: float | None) -> None:
    """What `nvml_gpu_count` and `nvml_gpu_memory_gib` make of NVML's answers, the library stood in for by
    FakeNvml (this machine has no driver): each call initialises NVML once and shuts it down after."""
    import ctypes

    from engines import registry

    fake = FakeNvml(sizes, init)
    monkeypatch.setattr(ctypes, "CDLL", lambda name: fake if name == "libnvidia-ml.so.1" else None)
    assert registry.nvml_gpu_count() == count
    got = registry.nvml_gpu_memory_gib()
    assert got == (pytest.approx(memory) if memory is not None else None)
    assert fake.shutdowns == (2 if init == 0 else 0)


def test_engines_sharing_a_gpu_divide_its_memory_and_sequences() -> None:
    from workers.plan import share_settings

    spec = plan(["0"], engines_per_gpu=2)[1]
    shared = share_settings(Settings(gpu_mem_utilization=0.8, max_concurrency=257), spec)
    assert (shared.gpu_mem_utilization, shared.max_concurrency) == (0.4, 128)
    auto = share_settings(Settings(gpu_mem_utilization=0.9, max_concurrency="auto"), spec)
    assert (auto.gpu_mem_utilization, auto.max_concurrency) == (0.45, "auto")  # each measures its own cache
    alone = Settings(max_concurrency=256)
    assert share_settings(alone, plan(["0"])[0]) is alone
    with pytest.raises(ValueError, match="whole number 1..8 or auto"):
        Settings(engines_per_gpu=9)


def test_workers_sharing_a_device_start_one_after_another(tiny_checkpoint: Path) -> None:
    """Real worker processes: the two that share a device start in turn (the second begins only once the
    first is ready: vLLM measures the memory in use while it starts), each with its share of the sequences,
    which reaches the worker and comes back as its figure; another device's worker starts beside them."""
    from workers.start import start_side_by_side

    settings = make_settings(tiny_checkpoint, engine_workers="process", max_concurrency=6)
    engines = [WorkerEngine(settings, "torch", WorkerSpec(0, (), 1, shares=2)),
               WorkerEngine(settings, "torch", WorkerSpec(1, (), 1, shares=2)),
               WorkerEngine(settings, "torch", WorkerSpec(2, None, 1))]
    began: dict[int, float] = {}
    ready_at: dict[int, float] = {}

    async def main() -> list:
        for engine in engines:
            start = engine.start

            async def timed(engine: WorkerEngine = engine, start=start) -> None:
                began[engine.spec.index] = time.monotonic()
                await start()  # the real start: a worker process, its engine loaded, its "ready" answer
                ready_at[engine.spec.index] = time.monotonic()

            engine.start = timed  # type: ignore[method-assign]
        try:
            outcomes = await start_side_by_side(engines)
            pids = {e.process.pid for e in engines if e.process is not None}
            return [outcomes, len(pids), [e.max_concurrency for e in engines]]
        finally:
            await asyncio.gather(*(e.close() for e in engines))

    outcomes, processes, sequences = asyncio.run(main())
    assert outcomes == [None, None, None] and processes == 3
    assert began[1] >= ready_at[0], (began, ready_at)
    assert began[2] < ready_at[0] and began[0] < ready_at[2], (began, ready_at)  # the third did not wait
    assert sequences == [3, 3, 6]


def test_a_process_groups_members_are_found_until_they_exit() -> None:
    """What a restart on a shared GPU waits for: every process of the killed worker's group (its engine core
    holds the GPU memory) gone, zombies aside."""
    import subprocess

    from workers.client import group_members

    leader = subprocess.Popen(["bash", "-c", "sleep 60 & sleep 60 & wait"], start_new_session=True)
    deadline = time.monotonic() + 10
    while len(group_members(leader.pid)) < 3:
        assert time.monotonic() < deadline, group_members(leader.pid)
        time.sleep(0.02)
    assert leader.pid in group_members(leader.pid) and os.getpid() not in group_members(leader.pid)
    os.killpg(leader.pid, signal.SIGKILL)
    leader.wait()
    deadline = time.monotonic() + 10
    while group_members(leader.pid):  # the two sleeps, reparented, exit on their own SIGKILL
        assert time.monotonic() < deadline, group_members(leader.pid)
        time.sleep(0.02)


def ocr(url: str, size: tuple[int, int] = (200, 120), max_tokens: int = 16) -> httpx.Response:
    return httpx.post(url + "/ocr/image/advanced", files={"file": ("a.png", png_bytes(*size))},
                      data={"max_tokens": str(max_tokens)}, timeout=120)


def health(url: str) -> dict:
    return httpx.get(url + "/health", timeout=5).json()


def wait_ready(url: str, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = health(url)
        if body["ready"] and all(e["ready"] for e in body["engines"]):
            return body
        time.sleep(0.1)
    raise AssertionError(f"not ready again after {timeout} s: {body}")


def worker_pids(body: dict) -> list[int]:
    return [e["detail"]["pid"] for e in body["engines"]]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").exists() and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def test_two_cpu_workers_share_the_load(tiny_checkpoint: Path) -> None:
    settings = make_settings(tiny_checkpoint, engine_workers="process", data_parallel_size=2, max_concurrency=2)
    app = create_app(settings)
    with serve_app(app) as url:
        body = health(url)
        pids = worker_pids(body)
        assert len(pids) == 2 and len(set(pids)) == 2 and os.getpid() not in pids, body
        assert all(alive(pid) for pid in pids), body
        assert [e["detail"]["worker"].split("/")[-1] for e in body["engines"]] == ["w0 (cpu)", "w1 (cpu)"], body
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _: ocr(url, max_tokens=12), range(6)))
        assert all(r.status_code == 200 for r in answers), [show(r) for r in answers if r.status_code != 200]
        assert all(r.json()["usage"]["image_tokens"] > 0 for r in answers), answers[0].json()
        form = {"dpi": "72", "mode": "tiny"}
        r = httpx.post(url + "/pdf/ocr", files={"file": ("r.pdf", make_pdf(2))}, data=form, timeout=120)
        assert r.status_code == 200 and {p["status"] for p in r.json()["pages"]} <= {"ok", "truncated"}, show(r)
        assert len(r.json()["pages"]) == 2, show(r)
        engines = app.state.service.admission.engines
        assert all(e.completed >= 1 for e in engines), [e.completed for e in engines]  # both took work
        assert all(e.peak_running <= 2 for e in engines), [e.peak_running for e in engines]
    assert not any(alive(pid) for pid in pids), "workers outlived the server's shutdown"


def test_worker_killed_mid_load_heals_and_the_job_completes(tiny_checkpoint: Path) -> None:
    settings = make_settings(tiny_checkpoint, engine_workers="process", max_concurrency=2, default_max_tokens=48)
    app = create_app(settings)
    with serve_app(app) as url:
        (pid,) = worker_pids(health(url))
        job = submit(url, make_pdf(4), dpi="72", mode="tiny")
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(ocr, url, (200, 120), 64) for _ in range(4)]
            deadline = time.monotonic() + 30
            while health(url)["engines"][0]["in_flight"] == 0:  # the load is on the worker
                assert time.monotonic() < deadline
                time.sleep(0.02)
            os.kill(pid, signal.SIGKILL)
            answers = [f.result() for f in futures]
        assert {r.status_code for r in answers} <= {200, 503}, [show(r) for r in answers]
        assert any(r.status_code == 503 for r in answers), [show(r) for r in answers]
        for r in answers:
            if r.status_code == 503:
                assert r.headers["content-type"].startswith("application/problem+json"), show(r)
                assert r.headers["retry-after"] and "engine worker w0" in r.json()["detail"], show(r)
        body = wait_ready(url)
        assert body["restarts"] >= 1, body
        (new_pid,) = worker_pids(body)
        assert new_pid != pid and alive(new_pid) and not alive(pid), body
        done = wait(url, job["id"], timeout=120)
        assert done["status"] == "done" and done["pages_done"] == 4, done
        # Each page names the worker that ran it (the one replaced or its successor: the same slot, w0).
        workers = {p["worker"] for p in done["pages"]}
        assert workers and all(w and w.endswith("/w0 (cpu)") for w in workers), done["pages"]
        r = ocr(url)
        assert r.status_code == 200, show(r)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_request_sent_after_the_socket_closed_is_503(loop: str) -> None:
    """Between a worker's socket closing and its reader noticing, a request sent to it is a 503 with
    Retry-After, not a 500: uvloop (the server's loop) raises RuntimeError for a write on a closed socket."""
    async def scenario() -> None:
        engine = WorkerEngine(Settings(), "torch", WorkerSpec(0, ()))
        ours, theirs = socket.socketpair()
        _, engine._writer = await asyncio.open_unix_connection(sock=ours)
        engine.set_ready()
        theirs.close()
        engine._writer.transport.abort()  # closed; nothing has read its end of stream yet
        await asyncio.sleep(0)
        request = EngineRequest("<image>\nFree OCR.", Image.new("RGB", (64, 48)), MODES["tiny"],
                                SamplingParams(max_tokens=4))
        with pytest.raises(ModelNotReady) as caught:
            await engine.generate(request)
        assert caught.value.headers == {"Retry-After": "10"} and "engine worker w0" in str(caught.value), caught.value

    if loop == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        uvloop.run(scenario())
    else:
        asyncio.run(scenario())


def test_input_in_flight_at_two_worker_deaths_is_quarantined(tiny_checkpoint: Path) -> None:
    settings = make_settings(tiny_checkpoint, engine_workers="process", max_concurrency=2)
    app = create_app(settings)
    with serve_app(app) as url:
        for crash in (1, 2):
            (pid,) = worker_pids(wait_ready(url))
            with ThreadPoolExecutor(1) as pool:
                future = pool.submit(ocr, url, POISON_SIZE, 4000)
                deadline = time.monotonic() + 30
                while health(url)["engines"][0]["in_flight"] == 0:
                    assert time.monotonic() < deadline
                    time.sleep(0.02)
                os.kill(pid, signal.SIGKILL)  # the engine dies with this input in flight
                r = future.result()
            assert r.status_code == 503, show(r)
            assert wait_ready(url)["restarts"] == crash
        r = ocr(url, POISON_SIZE)
        assert r.status_code == 422 and r.json()["type"].endswith("/quarantined-input"), show(r)
        assert "crashed the engine 2 times" in r.json()["detail"], show(r)
        r = ocr(url)
        assert r.status_code == 200, show(r)
        assert health(url)["quarantined"] == 1


def test_workers_die_with_a_killed_server(tiny_checkpoint: Path) -> None:
    env = {"MODEL_PATH": str(tiny_checkpoint), "ENGINE": "torch", "DEVICE": "cpu", "DATA_PARALLEL_SIZE": "2",
           "DATA_DIR": str(tiny_checkpoint.parent / "workers-data")}
    with serve_process(env) as url:
        body = health(url)
        pids = worker_pids(body)
        assert len(pids) == 2 and all(alive(p) for p in pids), body
        server = {int(line.split()[0]) for line in os.popen("ps -o ppid= -p " + ",".join(map(str, pids)))}
        assert len(server) == 1, server
        os.kill(server.pop(), signal.SIGKILL)
        deadline = time.monotonic() + 15
        while any(alive(p) for p in pids):
            assert time.monotonic() < deadline, f"workers {pids} outlived their server"
            time.sleep(0.1)


async def started_worker(settings: Settings) -> WorkerEngine:
    engine = WorkerEngine(settings, "torch", WorkerSpec(0, ()))
    engine.model = model_specs(None, settings.model_path)[0]
    await engine.start()
    return engine


def page(size: tuple[int, int], seed: int = 0) -> Image.Image:
    rgb = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(rgb)


def request(image: Image.Image | None, max_tokens: int = 1, prompt: str = "<image>\nFree OCR.") -> EngineRequest:
    return EngineRequest(prompt, image, MODES["tiny"], SamplingParams(max_tokens=max_tokens))


@pytest.mark.parametrize("via", [wire.VIA_MEMFD, wire.VIA_SOCKET])
def test_pixels_reach_the_worker_unchanged(tiny_checkpoint: Path, via: str, capfd: pytest.CaptureFixture,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A 1 x 40,000,000 strip and a 40 MP page cross to a real worker process; the worker logs (at DEBUG) a
    hash of the pixels it built its image from, and which way they came. Without a memfd (macOS) they cross
    the socket: that path is checked by turning the capability off, the worker being the real one."""
    if via == wire.VIA_SOCKET:
        monkeypatch.setattr(wire, "HAS_MEMFD", False)
    elif not wire.HAS_MEMFD:
        pytest.skip("no memfd on this OS")
    settings = make_settings(tiny_checkpoint, engine_workers="process", log_level="DEBUG")
    images = [page((40_000_000, 1), 1), page((7300, 5480), 2)]
    digests = [hashlib.sha256(image.tobytes()).hexdigest() for image in images]

    async def scenario() -> None:
        engine = await started_worker(settings)
        try:
            for image in images:
                try:
                    await engine.generate(request(image))
                except BadRequest:  # the model may refuse a strip's shape; its pixels crossed first
                    pass
            assert engine.ready, engine.health()
        finally:
            await engine.close()

    asyncio.run(scenario())
    err = capfd.readouterr().err
    for image, digest in zip(images, digests, strict=True):
        line = f"worker image RGB {image.width}x{image.height} via {via}: pixels sha256 {digest}"
        assert line in err, (line, [x for x in err.splitlines() if "worker image" in x])


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_no_descriptor_is_left_open(tiny_checkpoint: Path) -> None:
    """After requests that succeed, fail in the worker, are aborted mid-generation or while their pixels are
    being copied, the server's and the worker's open descriptors are back to where they were."""
    settings = make_settings(tiny_checkpoint, engine_workers="process")
    a4 = page((1190, 1684))

    async def scenario() -> None:
        engine = await started_worker(settings)
        try:
            assert engine.process is not None
            worker = engine.process.pid
            await engine.generate(request(a4))  # the engine's lazy start-up (threads, files) before counting
            before = open_fds(os.getpid()), open_fds(worker)
            for _ in range(3):
                assert (await engine.generate(request(a4, 2))).finish_reason in ("stop", "length")
                with pytest.raises(BadRequest):  # an image without its <image> tag: the worker refuses it
                    await engine.generate(request(a4, prompt="Free OCR."))
                running = asyncio.create_task(engine.generate(request(a4, 4000)))
                deadline = time.monotonic() + 60
                while engine.health().detail["worker_running"] == 0:  # generating in the worker
                    assert time.monotonic() < deadline and not running.done(), engine.health()
                    await asyncio.sleep(0.02)
                running.cancel()
                copying = asyncio.create_task(engine.generate(request(page((4000, 3000)))))
                await asyncio.sleep(0)  # its memfd is being filled
                copying.cancel()
                await asyncio.gather(running, copying, return_exceptions=True)
            deadline = time.monotonic() + 60
            while (now := (open_fds(os.getpid()), open_fds(worker))) != before:
                assert time.monotonic() < deadline, f"descriptors (server, worker): {before} before, {now} after"
                await asyncio.sleep(0.1)
            assert engine.ready, engine.health()
        finally:
            await engine.close()

    asyncio.run(scenario())


def test_auto_concurrency_runs_the_torch_worker_at_its_default(tiny_checkpoint: Path) -> None:
    """MAX_CONCURRENCY=auto, the README way, with the PyTorch engine in a worker process: the engine takes 100
    (auto measures vLLM's KV cache; tests/test_gpu.py and tests/workers/test_gpu_workers.py check that), the
    worker reports it to the server, and the limits say how it was set."""
    env = {"MODEL_PATH": str(tiny_checkpoint), "ENGINE": "torch", "DEVICE": "cpu", "MAX_CONCURRENCY": "auto",
           "DATA_DIR": str(tiny_checkpoint.parent / "auto-data")}
    with serve_process(env) as url:
        body = health(url)
        assert [(e["max_concurrency"], bool(e["detail"].get("pid"))) for e in body["engines"]] == [(100, True)], body
        status = httpx.get(url + "/ocr/status", timeout=10).json()
        assert status["limits"]["max_concurrency"] == "auto", status
        assert ocr(url).status_code == 200
