"""What jobs do to DATA_DIR and to the server's memory, over real HTTP (issue 26: N1, N2, N8, N9; DELETE).

Downloads stream the ZIP from the job's files (server RSS stays flat while four 160 MB ZIPs go out at once);
DELETE on an ended job leaves nothing of it; quotas per key and in total answer 429/507 naming the setting;
a full disk (a 20 MB tmpfs) ends the job `failed` with the reason; an upload dropped mid-body leaves no file;
key A filling MAX_JOBS_QUEUED_PER_KEY does not stop key B.
"""

from __future__ import annotations

import io
import os
import socket
import subprocess
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
from helpers.jobs import problem, submit, wait
from helpers.pdfs import make_pdf
from helpers.server import data_dir, make_settings, serve_app, serve_process, show

from serve_ocr import create_app

FAST = {"mode": "tiny", "dpi": "72", "max_tokens": "4"}
SLOW = {"mode": "tiny", "dpi": "72", "max_tokens": "300"}
MB = 1024 * 1024


def files_under(folder: Path) -> list[Path]:
    return [Path(root) / name for root, _dirs, names in os.walk(folder) for name in names]


def job_files(folder: Path) -> list[Path]:
    return files_under(folder / "jobs") if (folder / "jobs").is_dir() else []


@pytest.fixture
def app_url(tiny_checkpoint: Path, request: pytest.FixtureRequest) -> Iterator[tuple[str, Path]]:
    overrides = getattr(request, "param", {})
    folder = Path(data_dir())
    settings = make_settings(tiny_checkpoint, data_dir=str(folder), **overrides)
    with serve_app(create_app(settings)) as url:
        yield url, folder


def test_four_parallel_downloads_stream_from_disk(tiny_checkpoint: Path, tmp_path: Path) -> None:
    folder = Path(data_dir())
    env = {"MODEL_PATH": str(tiny_checkpoint), "ENGINE": "torch", "DEVICE": "cpu", "DATA_DIR": str(folder),
           "ENGINE_WORKERS": "inline", "DEFAULT_MAX_TOKENS": "8"}
    with serve_process(env) as url:
        job = submit(url, make_pdf(2), **FAST)
        assert wait(url, job["id"])["status"] == "done"
        # The job's searchable PDF made 160 MB (a 150-page scan's size): the ZIP carries it as it is.
        searchable = folder / "jobs" / job["id"] / "searchable.pdf"
        with searchable.open("wb") as f:
            for _ in range(160):
                f.write(os.urandom(MB))  # incompressible: the ZIP is as big as the file
        server = psutil.Process(next(c.pid for c in psutil.net_connections("tcp")
                                     if c.status == "LISTEN" and c.laddr.port == int(url.rsplit(":", 1)[1])))
        before = server.memory_info().rss
        peak, done = [before], threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak.append(server.memory_info().rss)
                time.sleep(0.05)

        def download(n: int) -> Path:
            target = tmp_path / f"{n}.zip"
            with httpx.stream("GET", f"{url}/jobs/{job['id']}/download", timeout=300) as r, target.open("wb") as f:
                assert r.status_code == 200 and r.headers["content-type"] == "application/zip", r.status_code
                for chunk in r.iter_bytes():
                    f.write(chunk)
            return target

        sampler = threading.Thread(target=sample)
        sampler.start()
        results: list[Path] = []
        threads = [threading.Thread(target=lambda n=n: results.append(download(n))) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        done.set()
        sampler.join()
        assert len(results) == 4
        growth = (max(peak) - before) / MB
        # Built in memory, each download held the file and its ZIP: 4 x 2 x 160 MB. Streamed: a few chunks each.
        assert growth < 120, f"server RSS grew {growth:.0f} MB while four 160 MB ZIPs were downloaded"
        for path in results:
            assert path.stat().st_size > 160 * MB
            with zipfile.ZipFile(path) as archive:
                assert archive.testzip() is None  # every member read back, CRC checked
                names = archive.namelist()
                assert "report_searchable.pdf" in names and "report.md" in names and "pages.json" in names, names
                assert archive.getinfo("report_searchable.pdf").file_size == 160 * MB


def test_the_streamed_layout_pdf_opens_with_every_page(app_url: tuple[str, Path]) -> None:
    import pymupdf

    url, _ = app_url
    job = submit(url, make_pdf(3), **{**FAST, "draw_layouts": "true"})
    assert wait(url, job["id"])["status"] == "done"
    r = httpx.get(f"{url}/jobs/{job['id']}/download", timeout=60)
    assert r.status_code == 200, show(r)
    with zipfile.ZipFile(io.BytesIO(r.content)) as archive:
        assert archive.testzip() is None
        layouts = [n for n in archive.namelist() if n.endswith("_layouts.pdf")]
        if layouts:  # drawn when a page's answer had boxes
            doc = pymupdf.open(stream=archive.read(layouts[0]), filetype="pdf")
            assert doc.page_count >= 1 and not doc.is_repaired


def test_delete_an_ended_job_purges_it(app_url: tuple[str, Path]) -> None:
    url, folder = app_url
    job = submit(url, make_pdf(2), **FAST)
    assert wait(url, job["id"])["status"] == "done"
    assert any(job["id"] in str(p) for p in job_files(folder))
    r = httpx.delete(f"{url}/jobs/{job['id']}")
    assert r.status_code == 204, show(r)
    assert not [p for p in files_under(folder) if job["id"] in str(p)], files_under(folder)
    problem(httpx.get(f"{url}/jobs/{job['id']}"), 404, "no job")
    # A running job is cancelled as before (200, finished pages kept); deleting it again purges it.
    slow = submit(url, make_pdf(4), **SLOW)
    cancelled = httpx.delete(f"{url}/jobs/{slow['id']}")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled", show(cancelled)
    assert httpx.delete(f"{url}/jobs/{slow['id']}").status_code == 204
    assert not [p for p in files_under(folder) if slow["id"] in str(p)]


@pytest.mark.parametrize("app_url", [{"job_quota_bytes_per_key": 20_000}], indirect=True)
def test_a_key_past_its_byte_quota_gets_429_naming_it(app_url: tuple[str, Path]) -> None:
    url, folder = app_url
    big = make_pdf(5)
    assert len(big) > 20_000
    body = problem(httpx.post(f"{url}/jobs", files={"file": ("a.pdf", big)}, data=FAST, timeout=60), 429,
                   "JOB_QUOTA_BYTES_PER_KEY")
    assert body["setting"] == "JOB_QUOTA_BYTES_PER_KEY"
    assert job_files(folder) == []


@pytest.mark.parametrize("app_url", [{"job_quota_jobs_per_key": 1, "data_min_free_gb": 0}], indirect=True)
def test_a_key_past_its_job_quota_gets_429_and_delete_frees_it(app_url: tuple[str, Path]) -> None:
    url, _ = app_url
    job = submit(url, make_pdf(1), **FAST)
    assert wait(url, job["id"])["status"] == "done"
    problem(httpx.post(f"{url}/jobs", files={"file": ("a.pdf", make_pdf(1))}, data=FAST), 429,
            "JOB_QUOTA_JOBS_PER_KEY")
    assert httpx.delete(f"{url}/jobs/{job['id']}").status_code == 204
    submit(url, make_pdf(1), **FAST)


@pytest.mark.parametrize("app_url", [{"data_min_free_gb": 1e9}], indirect=True)
def test_below_the_free_space_floor_new_jobs_get_507(app_url: tuple[str, Path]) -> None:
    url, folder = app_url
    body = problem(httpx.post(f"{url}/jobs", files={"file": ("a.pdf", make_pdf(1))}, data=FAST), 507,
                   "DATA_MIN_FREE_GB")
    assert body["setting"] == "DATA_MIN_FREE_GB"
    assert job_files(folder) == []


@pytest.mark.parametrize("app_url", [{"data_quota_bytes": 1_000}], indirect=True)
def test_past_the_total_byte_quota_new_jobs_get_507(app_url: tuple[str, Path]) -> None:
    url, _ = app_url
    problem(httpx.post(f"{url}/jobs", files={"file": ("a.pdf", make_pdf(1))}, data=FAST), 507, "DATA_QUOTA_BYTES")


def test_results_growing_past_the_key_quota_fail_the_job(tiny_checkpoint: Path) -> None:
    pdf = make_pdf(4)
    folder = Path(data_dir())
    # Room for the upload, not for the drawn pages at 200 dpi.
    settings = make_settings(tiny_checkpoint, data_dir=str(folder), job_quota_bytes_per_key=len(pdf) + 2_000)
    with serve_app(create_app(settings)) as url:
        job = submit(url, pdf, **{**FAST, "dpi": "200"})
        final = wait(url, job["id"])
        assert final["status"] == "failed" and "JOB_QUOTA_BYTES_PER_KEY" in (final["error"] or ""), final


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(mount)],
                                           capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(folder: Path, leave: int, name: str = "filler") -> None:
    """Write a filler file until `leave` bytes are free on `folder`'s disk."""
    with (folder / name).open("wb") as f:
        while (free := os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize) > leave:
            f.write(b"\0" * min(MB, free - leave))
            f.flush()


def test_a_full_disk_fails_the_job_with_the_reason_and_never_500(tiny_checkpoint: Path, tmpfs: Path,
                                                                 tmp_path: Path) -> None:
    pdf = make_pdf(4)
    # The store outside the small disk: the job's files fill it, its record can still say why it failed.
    settings = make_settings(tiny_checkpoint, data_dir=str(tmpfs), data_min_free_gb=0,
                             job_store_url=f"sqlite:///{tmp_path / 'jobs.sqlite'}")
    with serve_app(create_app(settings)) as url:
        fill(tmpfs, len(pdf) + 16 * 1024)
        job = submit(url, pdf, **{**FAST, "dpi": "200"})
        final = wait(url, job["id"])
        assert final["status"] == "failed" and "No space left" in (final["error"] or ""), final
        fill(tmpfs, 0, "filler2")  # the failed job's upload went: the disk full again
        r = httpx.post(f"{url}/jobs", files={"file": ("a.pdf", pdf)}, data=FAST, timeout=60)
        assert r.status_code == 507 and r.json()["setting"] in ("DATA_MIN_FREE_GB", "DATA_DIR"), show(r)
        listed = httpx.get(f"{url}/jobs").json()["jobs"]
        assert [j["status"] for j in listed] == ["failed"], listed


def test_an_upload_dropped_mid_body_leaves_no_file(app_url: tuple[str, Path], tmp_path: Path) -> None:
    url, folder = app_url
    host, port = url.removeprefix("http://").split(":")
    boundary = "dropped"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.pdf\"\r\n"
            "Content-Type: application/pdf\r\n\r\n").encode()
    body = head + make_pdf(3) + f"\r\n--{boundary}--\r\n".encode()
    request = (f"POST /jobs HTTP/1.1\r\nHost: {host}\r\nContent-Type: multipart/form-data; boundary={boundary}\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection((host, int(port))) as s:
        s.sendall(request + body[: len(body) // 2])
    # The server noticed: it answers the next request, and nothing of the upload is under DATA_DIR.
    deadline = time.monotonic() + 30
    while httpx.get(f"{url}/health").status_code != 200:
        assert time.monotonic() < deadline
    assert job_files(folder) == [] and httpx.get(f"{url}/jobs").json()["total"] == 0


def test_the_start_up_sweep_removes_folders_without_a_job(tiny_checkpoint: Path) -> None:
    folder = Path(data_dir())
    stray = folder / "jobs" / ("f" * 32) / "input"
    stray.mkdir(parents=True)
    (stray / "0.bin").write_bytes(b"%PDF-1.7 left by a dropped upload")
    with serve_app(create_app(make_settings(tiny_checkpoint, data_dir=str(folder)))) as url:
        job = submit(url, make_pdf(1), **FAST)
        assert wait(url, job["id"])["status"] == "done"
        assert not (folder / "jobs" / ("f" * 32)).exists()
        assert (folder / "jobs" / job["id"]).is_dir()


@pytest.mark.parametrize("app_url", [{"api_key": "key-a,key-b", "max_jobs_queued_per_key": 2}], indirect=True)
def test_one_key_filling_its_queue_does_not_stop_another(app_url: tuple[str, Path]) -> None:
    url, _ = app_url
    a, b = {"X-API-Key": "key-a"}, {"X-API-Key": "key-b"}
    mine = [submit(url, make_pdf(4), headers=a, **SLOW) for _ in range(2)]
    r = httpx.post(f"{url}/jobs", files={"file": ("a.pdf", make_pdf(1))}, data=FAST, headers=a, timeout=60)
    assert problem(r, 429, "MAX_JOBS_QUEUED_PER_KEY")["setting"] == "MAX_JOBS_QUEUED_PER_KEY"
    theirs = submit(url, make_pdf(1), headers=b, **FAST)
    for job, key in zip((*mine, theirs), (a, a, b), strict=True):
        httpx.delete(f"{url}/jobs/{job['id']}", headers=key)
