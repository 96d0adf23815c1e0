"""MCP server: the service's OCR as tools for agents (Model Context Protocol, the official `mcp` SDK 2.x).

Tools: `ocr_image` and `ocr_pdf` (base64 content, or a path under MCP_ALLOWED_DIR) return markdown;
`get_job_result` returns a job's markdown from the jobs API (`GET /jobs/{id}/result`).

Where it runs:
- Mounted in the app at `/mcp` (streamable HTTP; stateless, JSON answers): `serve_ocr` calls `mount(app)`
  and runs the returned session manager in its lifespan. The guard middleware applies API keys to `/mcp`
  like to any route.
- `python mcp_server.py --stdio --url http://host:8000` for agents that launch tools as processes: the
  tools call that server (API_KEY, or --api-key, is sent as the bearer key). Without `--url` the process
  starts the app itself from the environment's settings (MODEL_PATH ...) and serves it over stdio.

The tools always go through the service's HTTP API: in-process (httpx's ASGI transport into the same app,
forwarding the caller's key) or over the network. So they get the routes' limits, deadlines and errors,
the requests show in /metrics under their routes, and a job stays visible only to the key that made it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any

import httpx
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.server.transport_security import TransportSecuritySettings
from pydantic import Field

import images
from config import Settings
from errors import OcrError
from service.results import ITEM_STATUSES

log = logging.getLogger("deepseek_ocr.mcp")
MCP_PATH = "/mcp"
_FORWARDED = ("authorization", "x-api-key")
Connect = Callable[[Context], httpx.AsyncClient]
INSTRUCTIONS = (
    "DeepSeek-OCR: documents and images to markdown. Send files as base64 (or a path under the server's "
    "MCP_ALLOWED_DIR). ocr_pdf returns each page's status (" + ", ".join(ITEM_STATUSES) + "); a long PDF can "
    "also run as a job (POST /jobs) whose result get_job_result reads."
)

ImageB64 = Annotated[str | None, Field(description="The image as base64, raw or a data URL (PNG, JPEG, WebP ...)")]
PdfB64 = Annotated[str | None, Field(description="The PDF as base64, raw or a data URL")]
FilePath = Annotated[str | None, Field(description="A file under the server's MCP_ALLOWED_DIR, instead of base64")]
Prompt = Annotated[str, Field(description="Prompt; empty = the route's default (grounded markdown)")]
Mode = Annotated[str | None, Field(description="Resolution mode (tiny, small, base, large, gundam); default server's")]
MaxTokens = Annotated[int | None, Field(ge=1, le=131072, description="Most tokens to generate per image or page")]
JOB_ID = re.compile(r"[0-9a-f]{32}")  # jobs/submit.py makes ids as uuid4().hex
Pages = Annotated[str | None, Field(description="Pages, 1-based: `1-3,7`; default all")]


def build_server(settings: Settings, connect: Connect, *, lifespan: Any = None) -> MCPServer:
    """The tools, calling the HTTP API through the client `connect(ctx)` gives for each call."""
    server: MCPServer = MCPServer("deepseek-ocr", instructions=INSTRUCTIONS, lifespan=lifespan)

    @server.tool()
    async def ocr_image(
        ctx: Context, image_base64: ImageB64 = None, path: FilePath = None, prompt: Prompt = "",
        mode: Mode = None, max_tokens: MaxTokens = None,
    ) -> str:
        """OCR one image to markdown (layout tags removed)."""
        name, data = await load_input(settings, image_base64, path, default_name="image")
        fields = _fields(prompt=prompt, mode=mode, max_tokens=max_tokens, draw_boxes=False, crop_regions=False)
        answer = await call(connect(ctx), "POST", "/ocr/image/advanced", files={"file": (name, data)}, data=fields)
        note = "" if answer["finish_reason"] != "length" else "\n\n<!-- truncated: stopped at max_tokens -->"
        return answer["markdown"] + note

    @server.tool()
    async def ocr_pdf(
        ctx: Context, pdf_base64: PdfB64 = None, path: FilePath = None, pages: Pages = None, prompt: Prompt = "",
        mode: Mode = None, max_tokens: MaxTokens = None,
        dpi: Annotated[int, Field(ge=72, le=300, description="Render resolution")] = 144,
    ) -> str:
        """OCR a PDF: a summary of the pages and their statuses, then each page's markdown."""
        name, data = await load_input(settings, pdf_base64, path, default_name="document.pdf")
        fields = _fields(prompt=prompt, mode=mode, max_tokens=max_tokens, pages=pages, dpi=dpi,
                         draw_layouts=False, extract_images=False)
        answer = await call(connect(ctx), "POST", "/pdf/ocr", files={"file": (name, data)}, data=fields)
        return pdf_markdown(answer, name)

    @server.tool()
    async def get_job_result(ctx: Context, job_id: Annotated[str, Field(min_length=1, max_length=200)]) -> str:
        """A job's markdown so far (pages finished while it runs), from GET /jobs/{id}/result."""
        # Checked before it becomes part of a URL: `../metrics` would otherwise reach another route and come
        # back as that route's error, which names the wrong problem.
        if not JOB_ID.fullmatch(job_id):
            raise ToolError(f"job_id {job_id[:80]!r} is not a job id: send the `id` POST /jobs answered "
                            "(32 lowercase hexadecimal characters)")
        client = connect(ctx)
        answer = await call(client, "GET", f"/jobs/{job_id}/result", jobs=True)
        if "pages" in answer:
            return pdf_markdown(answer, f"job {job_id}")
        if "results" in answer:
            return batch_markdown(answer, job_id)
        raise ToolError(f"job {job_id}: the result has neither `pages` nor `results`; keys: {sorted(answer)}")

    return server


# --------------------------------------------------------------------------------------- inputs


async def load_input(settings: Settings, b64: str | None, path: str | None, *, default_name: str) -> tuple[str, bytes]:
    """(file name, bytes) from exactly one of base64 content or an allowed path; errors say what to send."""
    if (b64 is None) == (path is None):
        raise ToolError("send exactly one of the base64 content or `path`")
    if b64 is not None:
        payload = b64.partition(",")[2] if b64[:5].lower() == "data:" else b64  # data:application/pdf too
        try:
            data = await asyncio.to_thread(images.decode_base64_image, payload, max_bytes=settings.max_upload_bytes)
        except OcrError as exc:
            raise ToolError(exc.detail) from None
        return default_name, data
    target = allowed_path(settings, path or "")
    size = target.stat().st_size
    if size > settings.max_upload_bytes:
        raise ToolError(f"{path} is {size / 1048576:.1f} MB; the limit is MAX_UPLOAD_MB={settings.max_upload_mb:g}")
    return target.name, await asyncio.to_thread(target.read_bytes)


def allowed_path(settings: Settings, path: str) -> Path:
    """The file `path` names (relative paths under MCP_ALLOWED_DIR), refused unless it resolves inside it."""
    if not settings.mcp_allowed_dir:
        raise ToolError("reading files by path is off on this server (MCP_ALLOWED_DIR is unset); send base64")
    root = Path(settings.mcp_allowed_dir).resolve()
    target = (root / path).resolve()  # symlinks and `..` resolved before the check
    if not target.is_relative_to(root):
        raise ToolError(f"{path} is outside the allowed directory {root} (MCP_ALLOWED_DIR)")
    if not target.is_file():
        raise ToolError(f"{path} is not a file under {root} (MCP_ALLOWED_DIR)")
    return target


def _fields(**values: Any) -> dict[str, str]:
    return {k: (str(v).lower() if isinstance(v, bool) else str(v)) for k, v in values.items() if v not in (None, "")}


# --------------------------------------------------------------------------------------- HTTP calls


async def call(client: httpx.AsyncClient, method: str, url: str, *, jobs: bool = False, **kwargs: Any) -> Any:
    """One API call; a 4xx/5xx answer becomes a tool error carrying the problem's detail."""
    async with client:
        response = await client.request(method, url, **kwargs)
    if response.status_code < 400:
        return response.json()
    try:
        problem = response.json()
    except ValueError:
        problem = {"detail": response.text[:500]}
    detail = problem.get("detail") or problem.get("title") or response.reason_phrase
    if jobs and response.status_code == 404 and detail == "Not Found":  # no such route, not a missing job
        raise ToolError("this server has no jobs API (GET /jobs/{id}/result is not served); jobs are not available")
    raise ToolError(f"HTTP {response.status_code} from {url}: {detail}")


def forwarded(headers: Mapping[str, str] | None) -> dict[str, str]:
    """The caller's API key headers, passed on to the in-process call so the guard sees the same key."""
    given = {k.lower(): v for k, v in (headers or {}).items()}
    return {k: given[k] for k in _FORWARDED if k in given}


def in_process(app: Any, *, key: str | None = None) -> Connect:
    """Clients into `app` itself: the caller's key headers forwarded (or `key`, for stdio)."""

    def connect(ctx: Context) -> httpx.AsyncClient:
        headers = {"authorization": f"Bearer {key}"} if key else forwarded(_headers(ctx))
        transport = httpx.ASGITransport(app=app)
        return httpx.AsyncClient(transport=transport, base_url="http://deepseek-ocr.internal", headers=headers,
                                 timeout=None)

    return connect


def _headers(ctx: Context) -> Mapping[str, str] | None:
    with contextlib.suppress(Exception):  # no request (stdio): no headers
        return ctx.headers
    return None


# --------------------------------------------------------------------------------------- markdown


def pdf_markdown(answer: dict[str, Any], name: str) -> str:
    """`/pdf/ocr`'s answer (or a job's) as one markdown text: a status line per page, then the pages."""
    pages = answer.get("pages") or []
    counts = {s: sum(p.get("status") == s for p in pages) for s in ITEM_STATUSES}
    summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    lines = [f"<!-- {name}: {len(pages)} of {answer.get('page_count', '?')} pages processed ({summary or 'none'}) -->"]
    for page in pages:
        status = page.get("status")
        lines.append(f"<!-- page {page.get('page')}: {status}{': ' + page['error'] if page.get('error') else ''} -->")
    sections = [f"<!-- page {p.get('page')} -->\n{p.get('markdown') or ''}" for p in pages]
    return "\n".join(lines) + "\n\n" + "\n\n<--- Page Split --->\n\n".join(sections)


def batch_markdown(answer: dict[str, Any], job_id: str) -> str:
    results = answer.get("results") or []
    lines = [f"<!-- job {job_id}: {len(results)} files -->"]
    for item in results:
        error = item.get("error") or {}
        why = f": {error.get('detail')}" if isinstance(error, dict) and error.get("detail") else ""
        lines.append(f"<!-- {item.get('filename')}: {item.get('status')}{why} -->\n{item.get('markdown') or ''}")
    return "\n\n".join(lines)


# --------------------------------------------------------------------------------------- running it


def mount(app: Any) -> Any:
    """Serve the tools at `/mcp` inside `app`; returns the session manager whose `run()` the lifespan enters.

    Stateless with JSON answers: no session state to lose across restarts or replicas. DNS-rebinding
    checks are off here because `/mcp` is exactly as exposed as every other route of the app, which
    API_KEY guards. The route is added to the app itself (not a Mount), so `/mcp` needs no redirect.
    """
    settings: Settings = app.state.settings
    server = build_server(settings, in_process(app))
    sub = server.streamable_http_app(
        streamable_http_path=MCP_PATH,
        stateless_http=True,
        json_response=True,
        transport_security=TransportSecuritySettings(enable_dns_rebinding_protection=False),
        max_request_body_size=settings.max_upload_bytes * 4 // 3 + (1 << 20),  # base64 + the JSON around it
    )
    app.router.routes.extend(sub.routes)
    return server.session_manager


def remote(url: str, key: str | None, timeout_s: float) -> Connect:
    def connect(ctx: Context) -> httpx.AsyncClient:
        headers = {"authorization": f"Bearer {key}"} if key else {}
        return httpx.AsyncClient(base_url=url.rstrip("/"), headers=headers,
                                 timeout=httpx.Timeout(30.0, read=timeout_s))

    return connect
