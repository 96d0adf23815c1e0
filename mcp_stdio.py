"""`python mcp_stdio.py --stdio`: the MCP server over stdin/stdout for agents that start their tools.

With `--url` its tools call a running server over HTTP; without it the app (and the model) runs in this
process. The tools themselves are `mcp_server`'s; this entry point sits above `serve_ocr`, so that the
mounted `/mcp` (which `serve_ocr` wires) and the app (which this file starts) do not import each other.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import AsyncIterator

from mcp.server.mcpserver import MCPServer

import logging_config
from config import Settings, load_settings
from mcp_server import build_server, in_process, remote
from serve_ocr import create_app


def stdio_server(args: argparse.Namespace, settings: Settings) -> MCPServer:
    """The server for `--stdio`: tools against `--url`, or against the app started in this process."""
    key = args.api_key or (settings.api_keys[0] if settings.api_keys else None)
    if args.url:
        return build_server(settings, remote(args.url, key, settings.pdf_timeout_s + 60))
    app = create_app(settings)

    @contextlib.asynccontextmanager
    async def engine(_: MCPServer) -> AsyncIterator[None]:
        async with app.router.lifespan_context(app):  # loads the model while stdio already diverts fd 1
            yield

    return build_server(settings, in_process(app, key=key), lifespan=engine)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="DeepSeek-OCR MCP server over stdio")
    parser.add_argument("--stdio", action="store_true", required=True, help="serve MCP over stdin/stdout")
    parser.add_argument("--url", help="a running server's base URL; without it the model is loaded here")
    parser.add_argument("--api-key", help="the key to send (default: the first of API_KEY)")
    args = parser.parse_args(argv)
    settings = load_settings()
    logging_config.configure_logging(settings)  # stderr: stdout carries the protocol
    stdio_server(args, settings).run("stdio")


if __name__ == "__main__":
    main()
