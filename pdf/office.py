"""Office documents (DOCX, PPTX, XLSX, ODT, ODP, ODS, RTF) turned into PDFs by LibreOffice, so they run as PDFs.

The faces call `OfficeConverter.as_pdf` on a PDF route's upload: a PDF (or anything that is not an office file)
passes through untouched; an office file is converted by `soffice --headless --convert-to pdf` and the PDF goes
on through the render processes like any upload. Each conversion:
- gets its own LibreOffice profile (`-env:UserInstallation`) and HOME in a fresh temporary folder: two
  conversions sharing a profile collide on its lock, and the service user's home may be read-only;
- runs in its own process group (`soffice` is a script that starts `oosplash`, which starts `soffice.bin`),
  so a timeout kills every process of it, not only the script;
- has an address-space and file-size limit (OFFICE_MEMORY_MB) and a timeout (OFFICE_TIMEOUT_S), and at most
  OFFICE_CONCURRENCY run at once (each is a whole office suite in memory);
- is awaited as a subprocess: the event loop stays free.
Nothing here parses the document: detection reads magic bytes and ZIP member names only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

from config import Settings
from errors import DeadlineExceeded, UnsupportedMediaType, ValidationFailed

log = logging.getLogger(__name__)

INSTALL_HINT = ("install LibreOffice (Debian: libreoffice-core libreoffice-writer libreoffice-impress "
                "libreoffice-calc) or point OFFICE_BINARY at its soffice")
OFFICE_FORMATS = ("docx", "pptx", "xlsx", "odt", "odp", "ods", "rtf")
# An ODF package starts with an uncompressed `mimetype` member holding the media type (ODF 1.2, part 3, 3.3).
_ODF_TYPES = {
    b"application/vnd.oasis.opendocument.text": "odt",
    b"application/vnd.oasis.opendocument.presentation": "odp",
    b"application/vnd.oasis.opendocument.spreadsheet": "ods",
}
# OOXML: the content-types part plus the main part of each kind; ZIP stores member names uncompressed.
_OOXML_PARTS = {b"word/document.xml": "docx", b"ppt/presentation.xml": "pptx", b"xl/workbook.xml": "xlsx"}


def office_kind(data: bytes, filename: str | None = None) -> str | None:
    """The office format of an upload (one of OFFICE_FORMATS) from its content, or None for anything else.

    The content decides; the extension only breaks a tie (an OOXML ZIP naming parts of two kinds). A file
    named .docx that is not a ZIP is not an office file: it gets the plain "not a PDF" answer.
    """
    if data.startswith(b"{\\rtf"):
        return "rtf"
    if not data.startswith(b"PK\x03\x04"):
        return None
    if data[30:38] == b"mimetype":
        for media_type, kind in _ODF_TYPES.items():
            if data[38:38 + len(media_type)] == media_type:
                return kind
    if b"[Content_Types].xml" not in data:
        return None
    kinds = [kind for part, kind in _OOXML_PARTS.items() if part in data]
    ext = Path(filename or "").suffix.lower().lstrip(".")
    if ext in kinds:
        return ext
    return kinds[0] if kinds else None


def office_converter(settings: Settings) -> OfficeConverter:
    return OfficeConverter(settings.office_binary, timeout_s=settings.office_timeout_s,
                           memory_mb=settings.office_memory_mb, concurrency=settings.office_concurrency)


class OfficeConverter:
    """Converts office files to PDF with LibreOffice; one per app (its semaphore bounds the conversions)."""

    def __init__(self, binary: str, *, timeout_s: float, memory_mb: int, concurrency: int) -> None:
        self.binary = binary
        self.path = shutil.which(binary)
        self.timeout_s = timeout_s
        self.memory_mb = memory_mb
        self._slots = asyncio.Semaphore(concurrency)

    @property
    def unavailable(self) -> str | None:
        """Why office files cannot be converted (`/health` lists it), or None."""
        if self.path is None:
            return f"no LibreOffice ({self.binary!r} not found), so office files get 415; {INSTALL_HINT}"
        return None

    async def as_pdf(self, data: bytes, filename: str | None) -> bytes:
        """The upload as a PDF: unchanged unless it is an office file, which is converted (415 without LibreOffice)."""
        kind = office_kind(data, filename)
        if kind is None:
            return data
        if self.path is None:
            raise UnsupportedMediaType(
                f"{filename or 'the file'} is a {kind.upper()} document; office files are converted to PDF by "
                f"LibreOffice, which this server does not have ({self.binary!r} not found): {INSTALL_HINT}",
                format=kind,
            )
        async with self._slots:
            return await self._convert(data, kind, filename)

    async def _convert(self, data: bytes, kind: str, filename: str | None) -> bytes:
        work = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="ocr-office-"))
        try:
            source = work / f"document.{kind}"
            await asyncio.to_thread(source.write_bytes, data)
            output = await self._run(work, source)
            pdf = work / "out" / "document.pdf"
            if not pdf.is_file() or pdf.stat().st_size == 0:
                raise ValidationFailed(
                    f"LibreOffice could not convert {filename or 'the file'} ({kind.upper()}) to PDF: the file may be "
                    f"damaged, or need more than OFFICE_MEMORY_MB={self.memory_mb}. LibreOffice said: "
                    f"{output.strip()[-300:] or 'nothing'}",
                    format=kind,
                )
            return await asyncio.to_thread(pdf.read_bytes)
        finally:
            await asyncio.to_thread(shutil.rmtree, work, True)

    async def _run(self, work: Path, source: Path) -> str:
        """Run soffice on `source` under the limits; its output text. 504 at OFFICE_TIMEOUT_S, every process killed."""
        limit = self.memory_mb << 20
        env = {**os.environ, "HOME": str(work)}
        proc = await asyncio.create_subprocess_exec(
            str(self.path), "--headless", "--norestore", "--nologo", "--nolockcheck",
            f"-env:UserInstallation={(work / 'profile').as_uri()}",
            "--convert-to", "pdf", "--outdir", str(work / "out"), str(source),
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=work, env=env,
            start_new_session=True, preexec_fn=lambda: _limit(limit),
        )
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), self.timeout_s)
        except TimeoutError:
            raise DeadlineExceeded(
                f"converting the office file to PDF took longer than OFFICE_TIMEOUT_S={self.timeout_s:g} s; "
                "LibreOffice was stopped. Convert it to PDF yourself, or raise OFFICE_TIMEOUT_S",
                timeout_s=self.timeout_s,
            ) from None
        finally:
            await _kill_group(proc)
        return out.decode("utf-8", "replace")


def _limit(limit: int) -> None:
    # Runs in the child before exec. The file-size cap equals the memory cap: a small document that expands
    # into a huge PDF is stopped at the same bound as one that expands in memory.
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


async def _kill_group(proc: asyncio.subprocess.Process) -> None:
    """Kill the conversion's process group when it is still running (timeout, a cancelled request).

    Only while the leader is unreaped: its pid then names this group and no other. After a normal exit every
    process of it has closed the output pipe (`communicate` waited for that), so none is left to kill.
    """
    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    await proc.wait()
