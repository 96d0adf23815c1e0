"""PDF documents opened and rendered for the service (interim: wraps `inputs.RenderPool`)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import inputs


@dataclass
class Document:
    source: inputs.PdfSource
    pool: inputs.RenderPool

    @property
    def page_count(self) -> int:
        return self.source.page_count

    @property
    def warnings(self) -> tuple[str, ...]:
        return self.source.warnings

    @property
    def repaired(self) -> bool:
        return self.source.repaired

    @property
    def metadata(self) -> dict[str, str]:
        return self.source.metadata

    async def render(self, page: int, *, dpi: int, max_pixels: int) -> inputs.RenderedPage:
        return await self.pool.render(self.source, page, dpi=dpi, max_pixels=max_pixels)


class RenderPool:
    def __init__(self, workers: int, *, page_timeout_s: float, **_: Any) -> None:
        self._pool = inputs.RenderPool(workers, page_timeout_s)

    @contextlib.asynccontextmanager
    async def document(self, data: bytes, *, password: str | None, max_pages: int) -> AsyncIterator[Document]:
        source = await asyncio.to_thread(inputs.open_pdf, data, password=password, max_pages=max_pages)
        try:
            yield Document(source, self._pool)
        finally:
            await asyncio.to_thread(source.close)

    def close(self) -> None:
        self._pool.close()
