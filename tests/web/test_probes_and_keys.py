"""Probes answer HEAD like GET, and an API key header comes once (issue 26, low findings), over real HTTP.

Before: `HEAD /health` was a 405 (load balancers and `curl -I` probe with HEAD); with a key header sent twice,
the guard checked the last copy while the jobs' owner was named from the first, so a client holding one valid
key could file jobs under a made-up owner.
"""

from __future__ import annotations

import io
from collections.abc import Iterator

import httpx
import pytest
from helpers.jobs import problem
from helpers.replay import ReplayEngine, factory
from helpers.server import make_settings, serve_app, show
from PIL import Image

from serve_ocr import create_app

KEYS = "key-a,key-b"


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    settings = make_settings(None, data_dir=str(tmp_path_factory.mktemp("probes")), api_key=KEYS)
    with serve_app(create_app(settings, engine_factory=factory(ReplayEngine("text")))) as base:
        yield base


def png() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (32, 32), "white").save(out, "PNG")
    return out.getvalue()


def test_head_on_probes_answers_like_get(url: str) -> None:
    for path, headers in (("/health", {}), ("/ready", {}), ("/", {"X-API-Key": "key-a"})):
        got = httpx.get(url + path, headers=headers)
        head = httpx.head(url + path, headers=headers)
        assert got.status_code == 200 and head.status_code == got.status_code, (path, show(head))
        assert head.content == b"" and head.headers["content-type"] == got.headers["content-type"], show(head)
    assert httpx.head(url + "/").status_code == 401  # HEAD is guarded like GET


@pytest.mark.parametrize("pairs", [
    [("X-API-Key", "made-up"), ("X-API-Key", "key-a")],
    [("X-API-Key", "key-a"), ("X-API-Key", "key-a")],
    [("Authorization", "Bearer made-up"), ("Authorization", "Bearer key-b")],
])
def test_a_key_header_sent_twice_is_400(url: str, pairs: list[tuple[str, str]]) -> None:
    r = httpx.post(f"{url}/jobs", files={"file": ("a.png", png())}, headers=pairs)
    body = problem(r, 400, "more than once")
    assert body["header"] == pairs[0][0].lower(), show(r)
    # Nothing was filed under either reading of the headers.
    for key in ("key-a", "key-b"):
        assert httpx.get(f"{url}/jobs", headers={"X-API-Key": key}).json()["total"] == 0


def test_one_key_header_of_each_kind_reads_one_way(url: str) -> None:
    """X-API-Key and a bearer key together: the bearer key counts, for the guard and for the owner alike."""
    both = [("X-API-Key", "made-up"), ("Authorization", "Bearer key-b")]
    r = httpx.post(f"{url}/jobs", files={"file": ("a.png", png())}, headers=both)
    assert r.status_code == 202, show(r)
    job_id = r.json()["id"]
    assert httpx.get(f"{url}/jobs/{job_id}", headers={"X-API-Key": "key-b"}).status_code == 200
    assert httpx.get(f"{url}/jobs/{job_id}", headers={"X-API-Key": "key-a"}).status_code == 404
