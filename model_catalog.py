"""The models a service serves: name, checkpoint directory, architecture (DeepSeek-OCR or -OCR-2), modes.

`MODEL_PATH` serves one model; `MODELS=ocr=/models/DeepSeek-OCR,ocr2=/models/DeepSeek-OCR-2` serves several
side by side, each with its own engine, and requests choose one with their `model` field (default: the
first). The architecture is read from the checkpoint's config.json (`architectures`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from process.image_process import ModeSpec, modes_for
from tiny_checkpoint import ARCHITECTURES

ARCH_OF = {name: arch for arch, name in ARCHITECTURES.items()}
DEFAULT_NAMES = {"ocr": "deepseek-ocr", "ocr2": "deepseek-ocr-2"}
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# n-gram guard defaults (size, window) per route kind, from each model's reference scripts (FACTS 6 and 8).
NGRAM_DEFAULTS = {
    "ocr": {"image": (30, 90), "pdf": (20, 50), "batch": (40, 90)},
    "ocr2": {"image": (20, 90), "pdf": (20, 90), "batch": (20, 90)},
}


@dataclass(frozen=True)
class ModelSpec:
    name: str
    path: str
    arch: str  # "ocr" or "ocr2"; "ocr" when the checkpoint cannot be read (its engine then says why)

    @property
    def modes(self) -> dict[str, ModeSpec]:
        return modes_for(self.arch)

    def ngram(self, kind: str) -> tuple[int, int]:
        return NGRAM_DEFAULTS[self.arch][kind]


def read_arch(path: str | Path) -> str:
    """The checkpoint's architecture from config.json; ValueError naming what was found and what is known."""
    config_file = Path(path) / "config.json"
    try:
        names = json.loads(config_file.read_text()).get("architectures") or []
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read {config_file}: {exc}") from None
    for name in names:
        if name in ARCH_OF:
            return ARCH_OF[name]
    raise ValueError(f"{config_file} names architectures {names}; known: {', '.join(ARCH_OF)}")


def parse_models(value: str) -> list[tuple[str, str]]:
    """`name=path,name2=path2` -> pairs; ValueError saying what is wrong and what is allowed."""
    pairs: list[tuple[str, str]] = []
    for part in (p.strip() for p in value.split(",")):
        if not part:
            continue
        name, eq, path = (s.strip() for s in part.partition("="))
        if not eq or not NAME_RE.match(name) or not path:
            raise ValueError(
                f"MODELS entry {part!r} is not name=path (name: letters, digits, '.', '_', '-', at most 64); "
                "e.g. MODELS=ocr=/models/DeepSeek-OCR,ocr2=/models/DeepSeek-OCR-2"
            )
        if name in dict(pairs):
            raise ValueError(f"MODELS names {name!r} twice; each model needs its own name")
        pairs.append((name, path))
    if not pairs:
        raise ValueError("MODELS is set but names no model; e.g. MODELS=ocr=/models/DeepSeek-OCR")
    return pairs


def model_specs(models: str | None, model_path: str | None) -> list[ModelSpec]:
    """The configured models in order (the first is the default); none when nothing is configured."""
    if models:
        return [ModelSpec(name, path, _arch_or_v1(path)) for name, path in parse_models(models)]
    if model_path:
        arch = _arch_or_v1(model_path)
        return [ModelSpec(DEFAULT_NAMES[arch], model_path, arch)]
    return []


def _arch_or_v1(path: str) -> str:
    try:
        return read_arch(path)
    except ValueError:
        return "ocr"  # unreadable: the engine that fails to load it reports why
