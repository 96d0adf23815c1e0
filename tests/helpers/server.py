"""Real HTTP servers for the tests: the app in a uvicorn thread, or `uvicorn serve_ocr:app` as a process."""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import uvicorn

ROOT = Path(__file__).resolve().parents[2]


_DATA_ROOT: str | None = None


def scratch_root() -> str:
    """One folder per test process for servers' data and logs, removed when the process exits."""
    global _DATA_ROOT
    if _DATA_ROOT is None:
        _DATA_ROOT = tempfile.mkdtemp(prefix="ocr-data-")
        atexit.register(shutil.rmtree, _DATA_ROOT, True)
    return _DATA_ROOT


def data_dir() -> str:
    """A fresh DATA_DIR for one app or server (under `scratch_root`)."""
    return tempfile.mkdtemp(prefix="app-", dir=scratch_root())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


@contextlib.contextmanager
def serve_app(app, *, timeout: float = 60.0) -> Iterator[str]:
    """Run `app` with uvicorn on a free port in a thread; yields the base URL. The socket is bound here and
    handed to uvicorn, so no other server (another test process's) can take the port in between."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


@contextlib.contextmanager
def serve_process(env: dict[str, str], *, port: int | None = None, timeout: float = 120.0) -> Iterator[str]:
    """`uvicorn serve_ocr:app` as a child process, the README way; yields the base URL once /health answers."""
    port = port or free_port()
    argv = [sys.executable, "-m", "uvicorn", "serve_ocr:app", "--host", "127.0.0.1", "--port", str(port)]
    with child_server(argv, port, env, timeout=timeout) as (url, _):
        yield url


@contextlib.contextmanager
def child_server(argv: list[str], port: int, env: dict[str, str], *,
                 timeout: float = 120.0) -> Iterator[tuple[str, subprocess.Popen]]:
    """A server started by `argv` on `port` as a child process (the environment's `env` on top); yields its
    base URL and process once /health answers, and stops it after.

    Its output goes to a file, not a pipe: an unread pipe fills up and blocks the server's logging.
    """
    log = tempfile.NamedTemporaryFile("w+", prefix="uvicorn-", suffix=".log", delete=False, dir=scratch_root())
    proc = subprocess.Popen(argv, cwd=ROOT, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{Path(log.name).read_text()[-5000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    # the answer came from this child, not from another test process's server on the port
                    if not listens_on(proc.pid, port):
                        raise RuntimeError(f"port {port} answers, but not from this server (another took it)")
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"server did not come up:\n{Path(log.name).read_text()[-5000:]}")
            time.sleep(0.2)
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        os.unlink(log.name)


def listens_on(pid: int, port: int) -> bool:
    """Whether process `pid` or one of its descendants listens on TCP `port`."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return False
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            if any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in proc.net_connections("tcp")):
                return True
    return False


def show(response: httpx.Response | object) -> str:
    """The response as a failing assertion should print it."""
    status = getattr(response, "status_code", "?")
    headers = dict(getattr(response, "headers", {}))
    text = getattr(response, "text", "")
    return f"HTTP {status} {headers.get('content-type')}\n{text[:3000]}"


def make_settings(model_path: Path | str | None, **overrides: object):
    """Settings for a test app: the tiny checkpoint, short generations, small limits."""
    from config import Settings

    values: dict[str, object] = {
        "model_path": str(model_path) if model_path is not None else None,
        "engine": "torch",
        "device": "cpu",
        "default_max_tokens": 8,
        "max_concurrency": 8,
        "num_workers": 4,
        "data_dir": data_dir(),  # job store and files: never the checkout's ./data
        # The engine in the test's own process: seconds saved per app. Worker processes (the default) have
        # their own tests (test_workers.py), and every `serve_process` server runs them.
        "engine_workers": "inline",
        # Render processes on the first PDF: most test apps never see one (tests/service/test_engine_fill.py checks the
        # service's default, prestarted).
        "pdf_render_prestart": False,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


def curl_form_string(command: str) -> str:
    """The seed's curl command with its `-F "prompt=<..."` sent as `--form-string`.

    curl reads `-F name=<file` as "the value is the content of `file`", so `-F "prompt=<image>..."` makes
    curl itself fail (exit 26, no request sent) on any server; `--form-string` sends the text as typed.
    """
    return command.replace('-F "prompt=<', '--form-string "prompt=<')


def survivors(procs: list[psutil.Process], within_s: float = 15.0) -> list[psutil.Process]:
    """The processes of `procs` still running after up to `within_s`: a zombie (dead, not yet reaped by a
    PID 1 that may never reap it) counts as dead, and a busy machine gets time to deliver the signals."""
    deadline = time.monotonic() + within_s
    while True:
        alive = []
        for p in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(p)
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)
