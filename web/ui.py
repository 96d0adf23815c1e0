"""The `/ui` page: drop images or PDFs (several at once, each its own job), pick the options `POST /jobs` takes,
follow the queue and the history (`GET /jobs`), read each page's text beside its image (a PDF page's preview is
kept with the job, `GET /jobs/{id}/pages/{n}/image`) with the layout boxes over it, copy or download the text, the
JSON, the searchable PDF and the ZIP. Plain HTML, CSS and JavaScript served from the package (web/static/ui),
nothing from a CDN.

The page itself holds no data, so it and its assets are open (middleware.OPEN_PATHS has `/ui`; the assets sit
under the open `/static/` prefix); every API call it makes sends the key the user typed in
(`Authorization: Bearer`). A strict Content-Security-Policy keeps the page to its own origin and forbids inline
script, so model output that looks like HTML can never run even if the renderer had a hole.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

UI_PATH = "/ui"
UI_ASSETS = "/static/ui"  # under web.STATIC_PREFIX, which the API-key guard leaves open
UI_DIR = Path(__file__).resolve().parent / "static" / "ui"
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'"
)


def install_ui(app: FastAPI) -> None:
    """Mount the assets and add `GET /ui` (left out of the OpenAPI: it is a page, not an API)."""
    index = (UI_DIR / "index.html").read_text(encoding="utf-8")  # a missing file stops start-up, not a blank page
    app.mount(UI_ASSETS, StaticFiles(directory=UI_DIR), name="ui-assets")

    @app.get(UI_PATH, include_in_schema=False)
    async def ui_page() -> HTMLResponse:
        return HTMLResponse(index, headers={"Content-Security-Policy": CSP, "Cache-Control": "no-cache",
                                            "X-Content-Type-Options": "nosniff"})
