"""The seed's `test_ocr.py` program, run as a user runs it, against a real server on the tiny checkpoint.

Each menu item runs non-interactively (`--run N`) in its own process, in an empty folder (test 3 then
draws its own images, test 8 saves its ZIP there), with the API key taken from the environment.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from helpers.server import ROOT, free_port, make_settings, serve_app

from serve_ocr import create_app

KEY = "seed-program-key"
PROGRAM = ROOT / "test_ocr.py"


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path):
    with serve_app(create_app(make_settings(tiny_checkpoint, api_key=KEY))) as url:
        yield url


def run_program(*args: str, cwd: Path, key: str | None = KEY) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "API_KEY"}
    if key is not None:
        env["API_KEY"] = key
    return subprocess.run(
        [sys.executable, str(PROGRAM), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize("number", range(1, 10))
def test_menu_item_passes(server: str, tmp_path: Path, number: int) -> None:
    done = run_program("--url", server, "--run", str(number), cwd=tmp_path)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert f"PASS [{min(number, 8)}]" in output, output
    assert "FAIL" not in output, output
    if number == 9:
        assert "8 of 8 tests passed" in output, output
    if number in (8, 9):
        archives = list(tmp_path.glob("ocr_results_*.zip"))
        assert len(archives) == 1 and zipfile.is_zipfile(archives[0]), output


def test_given_pdf_and_key_option(server: str, tmp_path: Path) -> None:
    import pymupdf

    doc = pymupdf.open()
    for n in range(3):
        doc.new_page(width=200, height=150).insert_text((20, 50), f"page {n + 1}")
    pdf = tmp_path / "report.pdf"
    doc.save(pdf)
    done = run_program("--url", server, "--api-key", KEY, "--run", "6", "--file", str(pdf), cwd=tmp_path, key=None)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "(report.pdf): 3 page(s)" in output, output


def test_wrong_key_fails_with_the_servers_reason(server: str, tmp_path: Path) -> None:
    done = run_program("--url", server, "--run", "1", cwd=tmp_path, key="wrong")
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert "FAIL [1]" in output and "HTTP 401" in output, output


def test_no_server_fails_clearly(tmp_path: Path) -> None:
    done = run_program("--url", f"http://127.0.0.1:{free_port()}", "--run", "1", cwd=tmp_path)
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert "cannot reach" in output and "is the server running?" in output, output


def test_interactive_menu_runs_a_choice_then_quits(server: str, tmp_path: Path) -> None:
    env = {**os.environ, "API_KEY": KEY}
    done = subprocess.run(
        [sys.executable, str(PROGRAM), "--url", server],
        input="6\n\n0\n",
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "9. Everything" in output and "PASS [6]" in output, output
