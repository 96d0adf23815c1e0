"""Checks a server started by `.ci/fresh_install.sh` over real HTTP: every feature the README lists works.

Standard library only: it runs on the runtime virtual environment (requirements.txt alone), which has no
test tools. Usage: `python .ci/fresh_checks.py http://127.0.0.1:PORT [SERVER_PID]`. Prints one line per check
and exits non-zero when any fails.
"""

from __future__ import annotations

import json
import os
import struct
import sys
import time
import urllib.error
import urllib.request
import uuid
import zlib
from collections.abc import Callable
from typing import Any

STARTUP_S = 300.0  # the demo checkpoint written, the engine workers started and loaded
JOB_S = 180.0  # one small image job, from 202 to done
# The routers and subsystems the README lists: `/` must name each, available.
EXPECTED_ROUTERS = ("ocr", "pdf", "batch", "openai", "jobs", "mcp")


class Answer:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    def json(self) -> Any:
        return json.loads(self.body)

    def __str__(self) -> str:
        return f"HTTP {self.status} {self.headers.get('content-type')}: {self.body[:1500].decode(errors='replace')}"


def request(method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None,
            timeout: float = 30.0) -> Answer:
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return Answer(r.status, {k.lower(): v for k, v in r.headers.items()}, r.read())
    except urllib.error.HTTPError as e:  # a 4xx/5xx is an answer to check, not a crash
        return Answer(e.code, {k.lower(): v for k, v in e.headers.items()}, e.read())


def png(width: int = 320, height: int = 96) -> bytes:
    """A grey-scale PNG with dark bars (something text-like), written without PIL."""
    rows = b"".join(
        b"\x00" + bytes(0 if (20 < y < 40 or 56 < y < 76) and (x // 12) % 3 else 255 for x in range(width))
        for y in range(height)
    )

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def multipart(fields: dict[str, str], files: list[tuple[str, str, bytes, str]]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in fields.items()]
    for field, name, data, ctype in files:
        head = (f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{name}"\r\n'
                f"Content-Type: {ctype}\r\n\r\n")
        parts.append(head.encode() + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def wait_until_ready(base: str, server_pid: int | None) -> None:
    """Until `/ready` is 200: the server is up and its engine loaded. Raises when it died or took too long."""
    deadline = time.monotonic() + STARTUP_S
    last = "no answer yet"
    while time.monotonic() < deadline:
        if server_pid is not None and not alive(server_pid):
            raise RuntimeError(f"the server exited before it was ready ({last})")
        try:
            r = request("GET", base + "/ready", timeout=5)
            if r.status == 200:
                return
            last = str(r)
        except OSError as exc:  # not listening yet
            last = f"{type(exc).__name__}: {exc}"
        time.sleep(1.0)
    raise RuntimeError(f"not ready after {STARTUP_S:.0f} s: {last}")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --------------------------------------------------------------------------------------- the checks
# Each returns what it saw (printed on success) or raises AssertionError saying what was wrong.


def check_routers(base: str) -> str:
    r = request("GET", base + "/")
    assert r.status == 200, str(r)
    routers: dict[str, dict[str, Any]] = r.json()["routers"]
    missing = [name for name in EXPECTED_ROUTERS if name not in routers]
    down = {name: state.get("reason") for name, state in routers.items() if not state.get("available")}
    assert not missing and not down, f"missing {missing}, unavailable {down}"
    return "available: " + ", ".join(sorted(routers))


def check_job(base: str) -> str:
    body, ctype = multipart({"mode": "tiny", "max_tokens": "8"}, [("files", "bars.png", png(), "image/png")])
    r = request("POST", base + "/jobs", body, {"Content-Type": ctype}, timeout=60)
    assert r.status == 202, f"POST /jobs: {r}"
    job_id = r.json()["id"]
    deadline = time.monotonic() + JOB_S
    while True:
        job = request("GET", f"{base}/jobs/{job_id}")
        assert job.status == 200, str(job)
        status = job.json()["status"]
        if status in ("done", "failed", "cancelled"):
            break
        assert time.monotonic() < deadline, f"job {job_id} still {status} after {JOB_S:.0f} s"
        time.sleep(0.5)
    assert status == "done", f"job {job_id} ended {status}: {job}"
    result = request("GET", f"{base}/jobs/{job_id}/result")
    assert result.status == 200, str(result)
    return f"202, job {job_id} done, result {result.headers.get('content-type')}"


def check_mcp(base: str) -> str:
    call = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
            "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                       "clientInfo": {"name": "fresh-install-check", "version": "1"}}}
    headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
    r = request("POST", base + "/mcp", json.dumps(call).encode(), headers)
    assert r.status == 200, str(r)
    text = r.body.decode()
    if r.headers.get("content-type", "").startswith("text/event-stream"):  # the SSE form of the same answer
        text = next(line[5:] for line in text.splitlines() if line.startswith("data:"))
    answer = json.loads(text)
    info = (answer.get("result") or {}).get("serverInfo")
    assert info, f"no result.serverInfo: {r}"
    return f"server {info.get('name')!r}, protocol {answer['result'].get('protocolVersion')}"


def check_ui(base: str) -> str:
    r = request("GET", base + "/ui")
    assert r.status == 200 and r.headers.get("content-type", "").startswith("text/html"), str(r)
    assert b"<html" in r.body.lower(), str(r)
    return f"200 text/html, {len(r.body)} bytes"


def check_health(base: str) -> str:
    r = request("GET", base + "/health")
    assert r.status == 200, str(r)
    body = r.json()
    assert body["status"] == "ok", str(r)
    return f"status {body['status']!r}, engine {body['engine']}"


CHECKS: list[tuple[str, Callable[[str], str]]] = [
    ("GET / lists every router available", check_routers),
    ("POST /jobs (PNG) answers 202 and the job finishes", check_job),
    ("POST /mcp initialize gets a result", check_mcp),
    ("GET /ui loads", check_ui),
    ("GET /health is ok", check_health),
]


def main() -> int:
    base = sys.argv[1].rstrip("/")
    server_pid = int(sys.argv[2]) if len(sys.argv) > 2 else None
    try:
        wait_until_ready(base, server_pid)
    except RuntimeError as exc:
        print(f"FAIL server start: {exc}")
        return 1
    print(f"ok   server ready at {base}")
    failed = 0
    for name, check in CHECKS:
        try:
            print(f"ok   {name}: {check(base)}")
        except (AssertionError, OSError, ValueError, KeyError) as exc:
            failed += 1
            print(f"FAIL {name}: {type(exc).__name__}: {exc}")
    print(f"fresh install: {len(CHECKS) - failed} of {len(CHECKS)} checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
