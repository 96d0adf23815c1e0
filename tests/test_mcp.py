"""The MCP server through the official `mcp` SDK's clients: streamable HTTP at /mcp (API key header) and stdio.

A replay engine stands in for the model (the random tiny checkpoint writes placeholder tokens whose markdown
is empty), so the tools' markdown can be checked against known text; the service and routes are the real
ones, and a tool's markdown must equal the route's for the same file.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import socket
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import httpx
import httpx2
import pymupdf
import pytest
from helpers.images import png_bytes
from helpers.replay import ReplayEngine, SlowEngine, factory
from helpers.server import ROOT, make_settings, serve_app, show
from mcp import ClientSession, StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client

from serve_ocr import create_app

KEY = "mcp-key"
IMAGE = png_bytes(80, 60)
TOOLS = {"ocr_image", "ocr_pdf", "get_job_result"}
REPLAY = (
    "<|ref|>title<|/ref|><|det|>[[100, 50, 900, 120]]<|/det|>\n# Scan report\n\n"
    "<|ref|>text<|/ref|><|det|>[[100, 150, 900, 400]]<|/det|>\nTotal: 42 EUR\n"
)


def pdf_bytes(pages: int) -> bytes:
    doc = pymupdf.open()
    for n in range(pages):
        doc.new_page(width=200, height=150).insert_text((20, 40), f"Page {n + 1}")
    return doc.tobytes()


@pytest.fixture(scope="module")
def allowed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mcp-allowed")
    (root / "scan.png").write_bytes(IMAGE)
    (root.parent / "secret.png").write_bytes(IMAGE)
    return root


@pytest.fixture(scope="module")
def url(tiny_checkpoint: Path, allowed: Path):
    settings = make_settings(tiny_checkpoint, api_key=KEY, mcp_allowed_dir=str(allowed))
    with serve_app(create_app(settings, engine_factory=factory(ReplayEngine(REPLAY)))) as base:
        yield base


@contextlib.asynccontextmanager
async def session(url: str, key: str = KEY, seen: list[int] | None = None) -> AsyncIterator[ClientSession]:
    async def record(response: httpx2.Response) -> None:
        (seen if seen is not None else []).append(response.status_code)

    hooks = {"response": [record]}
    async with (
        httpx2.AsyncClient(headers={"Authorization": f"Bearer {key}"}, timeout=120, event_hooks=hooks) as http,
        streamable_http_client(url + "/mcp", http_client=http) as (read, write),
        ClientSession(read, write) as mcp,
    ):
        await mcp.initialize()
        yield mcp


def text_of(result) -> str:
    return "".join(part.text for part in result.content if part.type == "text")


def route_markdown(url: str) -> str:
    r = httpx.post(url + "/ocr/image/advanced", files={"file": ("scan.png", IMAGE)},
                   data={"draw_boxes": "false", "crop_regions": "false"}, headers={"X-API-Key": KEY}, timeout=60)
    assert r.status_code == 200, show(r)
    return r.json()["markdown"]


def test_tools_over_streamable_http(url: str) -> None:
    expected = route_markdown(url)

    async def run() -> None:
        async with session(url) as mcp:
            tools = (await mcp.list_tools()).tools
            assert {t.name for t in tools} == TOOLS, tools
            schema = next(t for t in tools if t.name == "ocr_pdf").input_schema
            assert {"pdf_base64", "path", "pages", "mode", "max_tokens", "dpi"} <= set(schema["properties"]), schema

            image = await mcp.call_tool("ocr_image", {"image_base64": base64.b64encode(IMAGE).decode()})
            assert not image.is_error and text_of(image) == expected, text_of(image)
            assert "# Scan report" in expected and "Total: 42 EUR" in expected, expected
            by_path = await mcp.call_tool("ocr_image", {"path": "scan.png"})
            assert not by_path.is_error and text_of(by_path) == text_of(image), text_of(by_path)

            pdf = "data:application/pdf;base64," + base64.b64encode(pdf_bytes(3)).decode()
            doc = await mcp.call_tool("ocr_pdf", {"pdf_base64": pdf, "pages": "1-2"})
            body = text_of(doc)
            assert not doc.is_error and "2 of 3 pages processed (2 ok)" in body, body
            assert "<!-- page 1: ok -->" in body and "<!-- page 2: ok -->" in body and "page 3" not in body, body
            assert body.count("Total: 42 EUR") == 2 and "<--- Page Split --->" in body, body

    anyio.run(run)


def test_tool_errors_say_what_to_send(url: str, allowed: Path) -> None:
    async def run() -> None:
        async with session(url) as mcp:
            for args, says in [
                ({"path": "../secret.png"}, "outside the allowed directory"),
                ({"path": str(allowed.parent / "secret.png")}, "outside the allowed directory"),
                ({"path": "missing.png"}, "is not a file"),
                ({}, "exactly one of"),
                ({"image_base64": "!!!"}, "base64"),
                ({"image_base64": base64.b64encode(b"not an image").decode()}, "HTTP 4"),
            ]:
                result = await mcp.call_tool("ocr_image", args)
                assert result.is_error and says in text_of(result), (args, text_of(result))
            job = await mcp.call_tool("get_job_result", {"job_id": "0" * 32})  # well-formed, unknown
            assert job.is_error and "HTTP 404" in text_of(job) and "no jobs API" not in text_of(job), text_of(job)
            # Not an id: refused by its format, never sent on as a path (`../metrics` reached /metrics).
            for bad in ("../metrics", "abc", "..%2Fmetrics", "A" * 32, "0" * 31 + "/"):
                job = await mcp.call_tool("get_job_result", {"job_id": bad})
                assert job.is_error and "is not a job id" in text_of(job) and "HTTP" not in text_of(job), text_of(job)

    anyio.run(run)


def test_get_job_result_reads_a_real_job(url: str) -> None:
    """A PDF job made through the jobs API, read back through the MCP tool: the job's markdown, per page."""
    headers = {"X-API-Key": KEY}
    r = httpx.post(url + "/jobs", files={"file": ("r.pdf", pdf_bytes(2))}, data={"dpi": "72"}, headers=headers,
                   timeout=60)
    assert r.status_code == 202, show(r)
    job_id = r.json()["id"]
    deadline = time.monotonic() + 60
    while httpx.get(f"{url}/jobs/{job_id}", headers=headers).json()["status"] != "done":
        assert time.monotonic() < deadline, "the job did not finish"
        time.sleep(0.1)
    result = httpx.get(f"{url}/jobs/{job_id}/result", headers=headers).json()

    async def run() -> str:
        async with session(url) as mcp:
            answer = await mcp.call_tool("get_job_result", {"job_id": job_id})
            assert not answer.is_error, text_of(answer)
            return text_of(answer)

    body = anyio.run(run)
    assert "2 of 2 pages processed" in body and body.count("Total: 42 EUR") == 2, body
    assert all(p["markdown"] in body for p in result["pages"]), (body, result)


def test_mcp_needs_the_api_key(url: str) -> None:
    r = httpx.post(url + "/mcp", json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"})
    assert r.status_code == 401 and r.headers["content-type"] == "application/problem+json", show(r)

    seen: list[int] = []

    async def wrong_key() -> None:
        async with session(url, key="wrong", seen=seen):
            pass

    with pytest.raises(Exception):  # noqa: B017  # the SDK reports the 401 as its own (grouped) errors
        anyio.run(wrong_key)
    assert seen == [401], seen


def test_stdio_round_trip_against_the_server(url: str) -> None:
    expected = route_markdown(url)
    params = StdioServerParameters(
        command=sys.executable,
        args=[str(ROOT / "mcp_stdio.py"), "--stdio", "--url", url],
        env={**os.environ, "API_KEY": KEY, "LOG_LEVEL": "WARNING"},
        cwd=str(ROOT),
    )

    async def run() -> None:
        async with stdio_client(params) as (read, write), ClientSession(read, write) as mcp:
            await mcp.initialize()
            assert {t.name for t in (await mcp.list_tools()).tools} == TOOLS
            image = await mcp.call_tool("ocr_image", {"image_base64": base64.b64encode(IMAGE).decode()})
            assert not image.is_error and text_of(image) == expected, text_of(image)

    anyio.run(run)


def test_client_gone_aborts_the_tool_engine_work(tiny_checkpoint: Path) -> None:
    engine = SlowEngine(step_s=0.05)  # 200 pieces: 10 s unless stopped
    with serve_app(create_app(make_settings(tiny_checkpoint), engine_factory=factory(engine))) as base:
        call = {"jsonrpc": "2.0", "id": 1, "method": "tools/call",
                "params": {"name": "ocr_image", "arguments": {"image_base64": base64.b64encode(IMAGE).decode()}}}
        body = json.dumps(call).encode()
        host, port = base.removeprefix("http://").split(":")
        # The client leaves once the engine is generating for it (a fixed client timeout left a CPU-hogged box
        # still decoding the image then: no engine work to abort, a CI flake).
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(b"POST /mcp HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Accept: application/json, text/event-stream\r\n"
                         + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            deadline = time.monotonic() + 30
            while not engine.running and time.monotonic() < deadline:
                time.sleep(0.02)
            assert engine.running == 1 and len(engine.requests) == 1, (engine.running, engine.requests)
        deadline = time.monotonic() + 5
        while (engine.running or not engine.aborted) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert engine.running == 0 and len(engine.aborted) == 1, (engine.running, engine.aborted)


def test_app_without_the_mcp_sdk_still_builds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mcp_server", None)  # import fails as when the SDK is missing
    monkeypatch.setitem(sys.modules, "openai_routes", None)
    app = create_app(make_settings(None))
    assert not app.state.routers["mcp"].available and "mcp_server" in app.state.routers["mcp"].reason
    assert not app.state.routers["openai"].available and app.state.mcp_sessions is None
    assert "/mcp" not in {getattr(r, "path", None) for r in app.routes}
    paths = app.openapi()["paths"]
    assert "/v1/status" in paths and "/v1/models" not in paths and "/ocr/image/advanced" in paths, paths
