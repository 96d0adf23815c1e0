"""Shared fixtures: the tiny random checkpoint that every CPU test runs on."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent
for _p in (ROOT, TESTS):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random DeepSeek-OCR checkpoint in the real layout, written once per test session."""
    from deepseek_ocr import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny-ckpt"), seed=0)


@pytest.fixture(scope="session")
def base_url(tiny_checkpoint: Path):
    """One real uvicorn server on the tiny checkpoint for the whole session (default test settings)."""
    from helpers.server import make_settings, serve_app

    from serve_ocr import create_app

    with serve_app(create_app(make_settings(tiny_checkpoint))) as url:
        yield url


@pytest.fixture(scope="session")
def tiny_checkpoint_v2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random DeepSeek-OCR-2 checkpoint (released names and token ids), written once per test session."""
    from deepseek_ocr import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny-ckpt-v2"), seed=0, arch="ocr2")
