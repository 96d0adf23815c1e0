"""Tests that need a tool `.ci/run` installs (Chromium, PostgreSQL, docker-compose, curl, LibreOffice).

On a developer's machine a missing tool skips the test with the install line; on CI (`CI=true`) the tool was
meant to be installed, so its absence is a broken run and the test fails, rather than passing CI by skipping.
`make test` lists every skip (`-rs`), so a skip is never silent either way.
"""

from __future__ import annotations

import os

import pytest


def on_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def missing_tool(message: str) -> None:
    """Skip (here) or fail (on CI) the calling test: `message` names the tool and how to install it."""
    if on_ci():
        pytest.fail(f"{message} [CI=true: .ci/run installs it, so its absence fails the test]")
    pytest.skip(message)
