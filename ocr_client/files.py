"""Which files a run works on and where each one's outputs go.

A folder contributes its images, PDFs and office files (its subfolders too with `--recursive`, mirrored under `--out`).
Two inputs that would write the same `{stem}.md` (`a.png` and `a.pdf` side by side) get their extension in
the stem (`a_png`, `a_pdf`), so no output overwrites another.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"})
# Office files run as PDFs on the server (converted by its LibreOffice), so PDF options apply to them.
OFFICE_SUFFIXES = frozenset({".docx", ".pptx", ".xlsx", ".odt", ".odp", ".ods", ".rtf"})
SUFFIXES = IMAGE_SUFFIXES | OFFICE_SUFFIXES | {".pdf"}


@dataclass(frozen=True)
class Target:
    source: Path
    out_dir: Path
    stem: str

    @property
    def is_pdf(self) -> bool:
        return self.source.suffix.lower() in OFFICE_SUFFIXES | {".pdf"}

    def output(self, suffix: str) -> Path:
        return self.out_dir / f"{self.stem}{suffix}"


def collect(paths: list[Path], out: Path | None, recursive: bool) -> list[Target]:
    """The targets in a stable order (as given; a folder's files sorted). Raises ValueError for a missing path."""
    found: list[tuple[Path, Path]] = []  # (file, its output folder)
    for path in paths:
        if path.is_dir():
            pattern = "**/*" if recursive else "*"
            for f in sorted(path.glob(pattern)):
                if f.is_file() and f.suffix.lower() in SUFFIXES and not f.name.startswith("."):
                    found.append((f, (out / f.parent.relative_to(path)) if out else f.parent))
        elif path.is_file():
            found.append((path, out or path.parent))
        else:
            raise ValueError(f"{path}: no such file or folder")
    seen: set[Path] = set()
    unique = []
    for f, d in found:
        if f.resolve() not in seen:
            seen.add(f.resolve())
            unique.append((f, d))
    taken: dict[tuple[Path, str], int] = {}
    for f, d in unique:
        key = (d.resolve(), f.stem.casefold())
        taken[key] = taken.get(key, 0) + 1
    return [Target(f, d, f.stem if taken[(d.resolve(), f.stem.casefold())] == 1
                   else f"{f.stem}_{f.suffix.lstrip('.').lower()}") for f, d in unique]
