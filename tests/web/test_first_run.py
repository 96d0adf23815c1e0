"""The first ten minutes: the README's quick start on a fresh clone, the start-up lines, `/` for browsers, one
access line per request, a quiet Ctrl-C, and the one-shot CLI's progress.

Servers are real `uvicorn serve_ocr:app` processes (or `make serve` itself) whose log goes to a file the test reads.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from helpers.images import png_bytes
from helpers.server import ROOT, free_port, scratch_root, show
from helpers.tools import missing_tool

SETTINGS_ENV = ("MODEL_PATH", "MODELS", "API_KEY", "DATA_DIR", "HOST", "PORT", "LOG_FORMAT", "LOG_LEVEL", "URL")


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without the service's settings (a developer's shell may set them)."""
    env = {k: v for k, v in os.environ.items() if k not in SETTINGS_ENV}
    env.update(extra)
    return env


def wait_for(predicate, what: str, log: Path, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen in {timeout:.0f}s; the log:\n{log.read_text()[-6000:]}")
        time.sleep(0.3)


def stop_group(proc: subprocess.Popen, sig: int = signal.SIGINT, timeout: float = 90.0) -> int | None:
    """`sig` to the process's whole group, as a terminal's Ctrl-C does; its exit code, None if it would not end."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
        return None


@contextlib.contextmanager
def uvicorn_process(env: dict[str, str], host: str) -> Iterator[tuple[subprocess.Popen, str, Path]]:
    """`uvicorn serve_ocr:app --host HOST` in its own process group; yields (process, local URL, log file)."""
    port = free_port()
    log = Path(tempfile.mkstemp(prefix="first-run-", suffix=".log", dir=scratch_root())[1])
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "serve_ocr:app", "--host", host, "--port", str(port)],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        yield proc, f"http://127.0.0.1:{port}", log
    finally:
        if proc.poll() is None:
            stop_group(proc, signal.SIGTERM)


# ------------------------------------------------------------------- `/`, the start-up lines, the access log


def json_lines(text: str) -> list[dict]:
    entries = []
    for line in text.splitlines():
        with contextlib.suppress(ValueError):
            entries.append(json.loads(line))
    return entries


def test_open_on_every_interface_without_key_announces_warns_redirects_and_logs_once(tiny_checkpoint: Path) -> None:
    """Bound to 0.0.0.0 with no API_KEY (JSON logs): the start-up log names http://localhost:PORT/ui and warns; `/`
    sends a browser to /ui and answers JSON to programs; each request has exactly one access line, with pages
    and tokens; Ctrl-C ends it without a traceback."""
    env = clean_env(MODEL_PATH=str(tiny_checkpoint), ENGINE="torch", DEVICE="cpu", DEFAULT_MAX_TOKENS="8",
                    LOG_FORMAT="json", DATA_DIR=tempfile.mkdtemp(dir=scratch_root()))
    with uvicorn_process(env, "0.0.0.0") as (proc, url, log):
        port = url.rsplit(":", 1)[1]
        opened = f"open http://localhost:{port}/ui"
        wait_for(lambda: opened in log.read_text(), "the start-up line", log)
        warnings = [e for e in json_lines(log.read_text()) if e.get("level") == "WARNING"]
        assert any("without API_KEY" in e["message"] and "HOST=127.0.0.1" in e["message"] for e in warnings), warnings

        browser = httpx.get(url + "/", headers={"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"})
        assert browser.status_code == 307 and browser.headers["location"] == "/ui", show(browser)
        for accept in ("*/*", "application/json", "text/html, application/json"):
            program = httpx.get(url + "/", headers={"Accept": accept})
            assert program.status_code == 200, show(program)
            assert {"GET /ui", "GET /docs"} <= set(program.json()["endpoints"]), show(program)

        wait_for(lambda: httpx.get(url + "/ready").status_code == 200, "/ready", log)
        answer = httpx.post(url + "/generate_with_file", files={"file": ("p.png", png_bytes(64, 48))},
                            headers={"X-Request-ID": "first-run-1"}, timeout=120)
        assert answer.status_code == 200, show(answer)
        tokens = answer.json()["usage"]["completion_tokens"]

        def access_lines() -> list[dict]:
            return [e for e in json_lines(log.read_text()) if e.get("request_id") == "first-run-1"
                    and e.get("logger") in ("deepseek_ocr.access", "uvicorn.access")]

        wait_for(lambda: access_lines(), "the access line", log, timeout=30)
        (line,) = access_lines()  # ours only: uvicorn's access log is off
        assert line["logger"] == "deepseek_ocr.access"
        assert (line["method"], line["path"], line["status"], line["pages"], line["tokens"]) == (
            "POST", "/generate_with_file", 200, 1, tokens), line
        assert isinstance(line["duration_s"], float) and line["duration_s"] > 0, line
        assert "/generate_with_file" not in "".join(
            raw for raw in log.read_text().splitlines() if not raw.startswith("{")), "a non-JSON access line"

        code = stop_group(proc, signal.SIGINT)
        text = log.read_text()
        assert code is not None, f"the server did not stop on Ctrl-C:\n{text[-4000:]}"
        assert "Traceback" not in text and "KeyboardInterrupt" not in text, text[-6000:]


@pytest.mark.parametrize(
    ("host", "key", "shown", "warned"),
    [
        ("0.0.0.0", None, "http://localhost:8000/ui", True),
        ("0.0.0.0", "k", "http://localhost:8000/ui", False),
        ("::", None, "http://localhost:8000/ui", True),
        ("127.0.0.1", None, "http://127.0.0.1:8000/ui", False),
        ("::1", None, "http://[::1]:8000/ui", False),
        ("192.168.1.7", None, "http://192.168.1.7:8000/ui", True),
    ],
)
def test_announce_names_the_address_and_warns_beyond_loopback_without_a_key(
    host: str, key: str | None, shown: str, warned: bool, caplog: pytest.LogCaptureFixture
) -> None:
    import serve_ocr
    from config import Settings

    with caplog.at_level(logging.INFO, logger="deepseek_ocr"):
        serve_ocr.announce(Settings(api_key=key), "http", host, 8000)
    messages = [r.getMessage() for r in caplog.records if r.name == "deepseek_ocr"]
    assert messages[0] == f"open {shown}", messages
    assert any("without API_KEY" in m for m in messages) == warned, messages


# ----------------------------------------------------------------------------- the README's quick start


def quick_start_commands() -> list[str]:
    """The command lines of the README's "Quick start" code blocks, comments dropped."""
    text = (ROOT / "README.md").read_text()
    section = re.search(r"^## Quick start\n(.*?)^## ", text, re.S | re.M)
    assert section, "README.md has no '## Quick start' section"
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section.group(1), re.S):
        for line in block.splitlines():
            command = re.sub(r"\s+#.*$", "", line).strip()
            if command and not command.startswith("#"):
                commands.append(command)
    return commands


def fresh_clone(into: Path) -> Path:
    """`git clone` of this checkout, with the working tree's uncommitted edits and new files laid over it (so
    the test checks what is being changed, not only HEAD), and the checkout's `.venv` linked in: `make setup`
    would need the network. The requirement files are dated back so `make` finds that venv up to date."""
    clone = into / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True, timeout=120)
    changed = subprocess.run(["git", "ls-files", "-m", "-o", "--exclude-standard"], cwd=ROOT, check=True,
                             capture_output=True, text=True).stdout.split()
    for name in changed:
        if (ROOT / name).is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, clone / name)
    venv = (ROOT / ".venv").resolve()
    if not (venv / ".setup").is_file():
        missing_tool(f"{venv} was not made by `make setup` (no .setup mark): a fresh clone would install packages")
    (clone / ".venv").symlink_to(venv)
    for req in clone.glob("requirements*.txt"):
        os.utime(req, (0, 0))
    up_to_date = subprocess.run(["make", "-q", ".venv/.setup"], cwd=clone, capture_output=True)
    assert up_to_date.returncode == 0, "make would set the venv up again (network); not running the quick start"
    return clone


@pytest.mark.slow
def test_readme_quick_start_runs_as_written_on_a_fresh_clone() -> None:
    """Every quick-start command, as the README writes it, in a fresh clone: `make serve` in the background (on
    127.0.0.1 by default: no HOST set), then the others, each exiting 0; the curl answer fits a terminal
    (< 8 KB). Only the port differs when the README's 8000 is taken: `PORT` for make, and the URL of the curl
    line. Ctrl-C to the server's group ends it without a traceback."""
    if not all(shutil.which(tool) for tool in ("make", "git", "curl")):
        missing_tool("needs make, git and curl (.ci/run installs curl)")
    commands = quick_start_commands()
    assert commands and commands[0] == "make serve", commands
    assert any(c.startswith("curl ") for c in commands), commands
    work = Path(tempfile.mkdtemp(prefix="quick-start-", dir=scratch_root()))
    clone = fresh_clone(work)
    port = free_port()
    env = clean_env(PORT=str(port))
    log = work / "serve.log"
    with log.open("w") as out:
        server = subprocess.Popen(["bash", "-c", commands[0]], cwd=clone, env=env, stdout=out,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: f"open http://127.0.0.1:{port}/ui" in log.read_text(), "make serve's start-up line", log,
                 timeout=600)
        assert "without API_KEY" not in log.read_text(), "make serve listens beyond loopback by default"
        wait_for(lambda: httpx.get(f"http://127.0.0.1:{port}/ready").status_code == 200, "/ready", log)
        for command in commands[1:]:
            run = command.replace("localhost:8000", f"localhost:{port}")
            done = subprocess.run(["bash", "-c", run], cwd=clone, env=env, capture_output=True, text=True,
                                  timeout=600)
            assert done.returncode == 0, f"{command!r} exited {done.returncode}:\n{done.stdout[-3000:]}\n" \
                                         f"{done.stderr[-3000:]}\nserver:\n{log.read_text()[-3000:]}"
            if command.startswith("curl "):
                assert len(done.stdout.encode()) < 8192, f"{command!r} printed {len(done.stdout)} bytes"
                assert json.loads(done.stdout)["text"] is not None, done.stdout[:2000]
        assert list((clone / "results").glob("*.md")), "the client wrote no markdown under results/"
        # Text logs: the curl request has one access line, ours (uvicorn's `"POST /ocr/... HTTP/1.1" 200` is off).
        access = [line for line in log.read_text().splitlines() if "POST /ocr/image/advanced" in line]
        assert len(access) == 1 and "deepseek_ocr.access" in access[0] and "pages=1" in access[0], access
    finally:
        code = stop_group(server, signal.SIGINT)
    text = log.read_text()
    assert code is not None, f"make serve did not stop on Ctrl-C:\n{text[-4000:]}"
    assert "Traceback" not in text, text[-6000:]


# ------------------------------------------------------------------------------------ the one-shot CLI


def test_one_shot_cli_prints_its_stages_with_seconds(tiny_checkpoint: Path, tmp_path: Path) -> None:
    image = tmp_path / "page.png"
    image.write_bytes(png_bytes(64, 48))
    done = subprocess.run(
        [sys.executable, "deepseek_ocr.py", "run", "--model", str(tiny_checkpoint), "--image", str(image),
         "--max-tokens", "4", "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "text" in json.loads(done.stdout)  # stdout keeps only the answer
    stages = re.findall(r"^\[\s*(\d+\.\d)s\] (loading|generating)\b.*\.\.\.$", done.stderr, re.M)
    assert [s for _, s in stages] == ["loading", "generating"], done.stderr
    assert re.search(r"^\[\s*\d+\.\ds\] generating: done$", done.stderr, re.M), done.stderr
