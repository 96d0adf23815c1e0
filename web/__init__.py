"""API docs pages (Swagger UI at /docs, ReDoc at /redoc) that load nothing from outside the server.

FastAPI's own pages pull their JavaScript and CSS from a CDN, so on a GPU host without internet they are
blank. The assets come from the installed `fastapi-offline` package (Swagger UI bundle, its CSS, ReDoc's
standalone bundle, a favicon) and are served under `STATIC_PREFIX`, which the API-key guard leaves open
(middleware.OPEN_PREFIXES): they are public files and hold no data.

Also the `/ui` page (web/ui.py): try OCR in a browser through the jobs API.

Integrate: `FastAPI(..., docs_url=None, redoc_url=None)` and then `web.install(app)`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import fastapi_offline
from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse, Response
from fastapi.staticfiles import StaticFiles

from web.ui import install_ui

STATIC_PREFIX = "/static/"
DOCS_ASSETS = STATIC_PREFIX + "docs"
ASSET_DIR = Path(fastapi_offline.__file__).resolve().parent / "static"
ASSETS = ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js", "favicon.png")
# validatorUrl=None: Swagger UI otherwise shows a badge image fetched from validator.swagger.io whenever the
# page is not on localhost, the one outside request left on a GPU host's address.
SWAGGER_PARAMETERS: dict[str, Any] = {"validatorUrl": None}
# ReDoc's side menu always shows an <img> of Redocly's logo from their CDN; it is pointed at our favicon
# instead (relative to the /redoc page, so it also works under a root_path).
REDOC_CDN_LOGO = b"https://cdn.redoc.ly/redoc/logo-mini.svg"
REDOC_LOCAL_LOGO = DOCS_ASSETS.lstrip("/").encode() + b"/favicon.png"


def asset_dir() -> Path:
    """The installed assets; start-up fails here, naming what is missing, rather than serving a blank page."""
    missing = [name for name in ASSETS if not (ASSET_DIR / name).is_file()]
    if missing:
        raise RuntimeError(
            f"fastapi-offline's assets {missing} are missing from {ASSET_DIR}; reinstall it "
            "(pip install -r requirements.txt)"
        )
    return ASSET_DIR


def redoc_bundle(directory: Path) -> bytes:
    """ReDoc's standalone bundle with its one hard-coded CDN image pointed at a local file."""
    return (directory / "redoc.standalone.js").read_bytes().replace(REDOC_CDN_LOGO, REDOC_LOCAL_LOGO)


def install(app: FastAPI) -> None:
    """Mount the assets and add `/docs`, `/docs/oauth2-redirect`, `/redoc` and `/ui` (left out of the OpenAPI)."""
    install_ui(app)
    directory = asset_dir()
    redoc_js = redoc_bundle(directory)

    # Added before the mount, so this route answers for the bundle rather than the file as installed.
    @app.get(f"{DOCS_ASSETS}/redoc.standalone.js", include_in_schema=False)
    async def redoc_script() -> Response:
        return Response(redoc_js, media_type="text/javascript", headers={"Cache-Control": "public, max-age=3600"})

    app.mount(DOCS_ASSETS, StaticFiles(directory=directory), name="docs-assets")
    redirect_url = app.swagger_ui_oauth2_redirect_url or "/docs/oauth2-redirect"

    def urls(request: Request) -> tuple[str, str]:
        root = request.scope.get("root_path", "").rstrip("/")
        return root + DOCS_ASSETS, root + (app.openapi_url or "/openapi.json")

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        assets, openapi = urls(request)
        return get_swagger_ui_html(
            openapi_url=openapi,
            title=f"{app.title} - Swagger UI",
            oauth2_redirect_url=redirect_url,
            swagger_js_url=f"{assets}/swagger-ui-bundle.js",
            swagger_css_url=f"{assets}/swagger-ui.css",
            swagger_favicon_url=f"{assets}/favicon.png",
            swagger_ui_parameters={**SWAGGER_PARAMETERS, **(app.swagger_ui_parameters or {})},
        )

    @app.get(redirect_url, include_in_schema=False)
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        assets, openapi = urls(request)
        return get_redoc_html(
            openapi_url=openapi,
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{assets}/redoc.standalone.js",
            redoc_favicon_url=f"{assets}/favicon.png",
            with_google_fonts=False,
        )
