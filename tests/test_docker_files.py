"""The Docker files do what they say, checked without Docker: the image's CMD and HEALTHCHECK run here.

The HEALTHCHECK command is read out of the Dockerfile and run against a server started with the
Dockerfile's own CMD (HOST and PORT from the environment, API_KEY set); `docker-compose config` checks the
compose file, and its resolved environment must give settings that start.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from helpers.server import ROOT, free_port, show
from helpers.tools import missing_tool

KEY = "docker-files-key"
DOCKERFILE = (ROOT / "Dockerfile").read_text()
COMPOSE = ROOT / "docker-compose.yml"
NOT_SETTINGS = {"HOST", "PORT", "MALLOC_ARENA_MAX"}  # read by the image's CMD, or by glibc


def instructions() -> list[str]:
    """The Dockerfile's instructions, continuation lines joined, comments dropped."""
    lines = [line for line in DOCKERFILE.splitlines() if not line.lstrip().startswith("#")]
    return [re.sub(r"\s+", " ", i).strip() for i in "\n".join(lines).replace("\\\n", " ").split("\n") if i.strip()]


def healthcheck_command() -> str:
    (line,) = [i for i in instructions() if i.startswith("HEALTHCHECK ")]
    return line.split(" CMD ", 1)[1]


def image_command() -> list[str]:
    (line,) = [i for i in instructions() if i.startswith("CMD ")]
    return json.loads(line[4:])


@contextlib.contextmanager
def image_cmd_server(tiny_checkpoint: Path, port: int) -> Iterator[str]:
    """The Dockerfile's CMD as a process, configured the way the image is: by environment variables."""
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",  # its uvicorn
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "API_KEY": KEY,
        "MODEL_PATH": str(tiny_checkpoint),
        "ENGINE": "torch",
        "DEVICE": "cpu",
        "DEFAULT_MAX_TOKENS": "8",
    }
    log = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(image_command(), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"the image's CMD exited with {proc.returncode}:\n{log.read()[-5000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("the image's CMD did not come up")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def run_healthcheck(port: int) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PORT": str(port)}
    return subprocess.run(["sh", "-c", healthcheck_command()], env=env, capture_output=True, text=True, timeout=30)


def test_healthcheck_passes_with_api_key_against_the_images_cmd(tiny_checkpoint: Path) -> None:
    if shutil.which("curl") is None:
        missing_tool("curl is not installed (the image and .ci/run install it)")
    port = free_port()
    with image_cmd_server(tiny_checkpoint, port) as url:
        locked = httpx.post(url + "/generate", json={"prompt": "hi"}, timeout=30)
        assert locked.status_code == 401, show(locked)  # the key is in force
        deadline = time.monotonic() + 60
        while (done := run_healthcheck(port)).returncode != 0 and time.monotonic() < deadline:
            time.sleep(0.5)  # /ready is 503 until the engine has loaded
        assert done.returncode == 0, f"{healthcheck_command()!r}: {done.stdout}{done.stderr}"
    down = run_healthcheck(port)
    assert down.returncode != 0, "the HEALTHCHECK passed with no server listening"


def compose(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("docker-compose")
    if exe is None:
        missing_tool("docker-compose is not installed (.ci/run installs Debian's docker-compose package)")
    clean = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp"), **(env or {})}
    return subprocess.run(
        [exe, "-f", str(COMPOSE), *args], cwd=ROOT, env=clean, capture_output=True, text=True, timeout=60
    )


def test_compose_file_is_valid() -> None:
    done = compose("config", "-q")
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize(
    ("env", "mode"),
    [
        ({}, "gundam"),
        ({"MODE": "tiny"}, "tiny"),
        ({"MODE": "base"}, "base"),
        ({"CROP_MODE": "false", "BASE_SIZE": "1280", "IMAGE_SIZE": "1280"}, "large"),
    ],
)
def test_compose_environment_gives_settings_that_start(
    env: dict[str, str], mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from config import Settings

    done = compose("config", env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    service = yaml.safe_load(done.stdout)["services"]["deepseek-ocr"]
    environment = {k: str(v) for k, v in service["environment"].items()}
    unknown = {k for k in environment if k.lower() not in Settings.model_fields} - NOT_SETTINGS
    assert not unknown, f"compose sets variables the service does not read: {sorted(unknown)}"
    for name in list(os.environ):
        if name.lower() in Settings.model_fields:
            monkeypatch.delenv(name)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    settings = Settings()
    assert settings.mode == mode
    assert service["ports"][0]["target"] == int(environment["PORT"])
    assert any(v.endswith(":/cache:rw") or v.endswith(":/cache") for v in map(str, service["volumes"]))


def test_compose_mounts_no_code_and_the_context_leaves_out_weights() -> None:
    volumes = [str(v) for v in yaml.safe_load(COMPOSE.read_text())["services"]["deepseek-ocr"]["volumes"]]
    assert not [v for v in volumes if ".py" in v or v.startswith("./process")], volumes
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {"models/", ".venv/", ".git", "data/"} <= ignored
    assert "COPY . ./" in DOCKERFILE


def test_compose_cluster_profile_is_valid_and_configures_ray() -> None:
    """`--profile cluster`: the API (the Ray head too) with ORCHESTRATOR=ray and PostgreSQL, a GPU worker node."""
    from config import Settings

    done = compose("--profile", "cluster", "config")
    assert done.returncode == 0, done.stdout + done.stderr
    services = yaml.safe_load(done.stdout)["services"]
    api, worker = services["ocr-cluster-api"], services["ocr-ray-gpu"]
    environment = {k: str(v) for k, v in api["environment"].items()}
    unknown = {k for k in environment if k.lower() not in Settings.model_fields} - NOT_SETTINGS
    assert not unknown, f"compose sets variables the service does not read: {sorted(unknown)}"
    assert environment["ORCHESTRATOR"] == "ray" and environment["JOB_STORE_URL"].startswith("postgresql+psycopg://")
    assert "ray start --head" in " ".join(api["command"]) and "uvicorn serve_ocr:app" in " ".join(api["command"])
    assert "ray start --address=ocr-cluster-api:6379" in " ".join(worker["command"])
    assert worker["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert {"ocr-postgres", "ocr-ray-gpu"} <= set(api["depends_on"]) and "ocr-postgres" in services
    # `docker compose up` alone stays the one-host service: every other service is in the profile
    assert {name for name, s in services.items() if not s.get("profiles")} == {"deepseek-ocr"}, services
    assert all(s["profiles"] == ["cluster"] for name, s in services.items() if name != "deepseek-ocr")


def test_compose_keeps_jobs_in_a_named_volume_on_port_8000() -> None:
    """`DATA_DIR` (job store, uploads, results) is a named volume: `docker compose up -d --build` keeps the jobs;
    the host port is the 8000 of every README example."""
    done = compose("config")
    assert done.returncode == 0, done.stdout + done.stderr
    resolved = yaml.safe_load(done.stdout)
    service = resolved["services"]["deepseek-ocr"]
    data_dir = service["environment"]["DATA_DIR"]
    named = [v for v in map(str, service["volumes"]) if v.split(":")[1] == data_dir]
    assert named and named[0].split(":")[0] in resolved["volumes"], service["volumes"]
    assert service["ports"][0]["published"] == 8000, service["ports"]


def test_compose_passes_every_setting_through_from_a_dot_env(tmp_path: Path) -> None:
    """Every setting but the two the image fixes (MODEL_PATH, DATA_DIR: paths inside the container) reaches the
    service, from the shell or from a `.env` (Compose reads the one beside the file; here one named with
    --env-file). A new setting needs its `NAME: ${NAME:-}` line in docker-compose.yml."""
    from config import Settings

    fixed = {"model_path", "data_dir"}
    env_file = tmp_path / ".env"
    env_file.write_text("".join(f"{name.upper()}=from-dot-env-{name}\n" for name in Settings.model_fields))
    done = compose("--env-file", str(env_file), "config")
    assert done.returncode == 0, done.stdout + done.stderr
    environment = yaml.safe_load(done.stdout)["services"]["deepseek-ocr"]["environment"]
    missing = [n.upper() for n in Settings.model_fields if n not in fixed and n.upper() not in environment]
    assert not missing, f"settings docker-compose.yml does not pass through: {missing}"
    passed = {n for n in Settings.model_fields if environment.get(n.upper()) == f"from-dot-env-{n}"}
    assert passed == set(Settings.model_fields) - fixed, sorted(set(Settings.model_fields) - fixed - passed)
    assert environment["MODEL_PATH"] == "/app/models/deepseek-ocr" and environment["DATA_DIR"] == "/data"
