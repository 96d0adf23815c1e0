"""Shared fixtures: the tiny random checkpoint that every CPU test runs on."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random DeepSeek-OCR checkpoint in the real layout, written once per test session."""
    from deepseek_ocr import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny-ckpt"), seed=0)
