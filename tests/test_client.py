"""The command-line client (`python -m ocr_client`) against real servers, run as users run it: a subprocess.

A folder of two images and a PDF becomes markdown, ZIPs and searchable PDFs (tiny checkpoint); a client
killed mid-job and started again finishes the same job; a failed page makes the exit status non-zero. The
slow and failing engines are the replay engine (the model only; routes, job runner and store are real).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pymupdf
import pytest
from helpers.images import image_bytes
from helpers.pdfs import FAILING_SIZE, make_pdf
from helpers.replay import ReplayEngine, factory
from helpers.server import ROOT, make_settings, serve_app, show

from ocr_client import sse
from ocr_client.api import Client, follow
from serve_ocr import create_app

TEXT = "<|ref|>text<|/ref|><|det|>[[100, 100, 800, 300]]<|/det|>\nHello client"


def cli(url: str, *args: str | Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ocr_client", "--url", url, *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def jobs(url: str) -> list[dict]:
    r = httpx.get(f"{url}/jobs", timeout=30)
    assert r.status_code == 200, show(r)
    return r.json()["jobs"]


def result_of(url: str, job_id: str) -> dict:
    r = httpx.get(f"{url}/jobs/{job_id}/result", timeout=30)
    assert r.status_code == 200, show(r)
    return r.json()


def test_a_folder_becomes_markdown_zips_and_searchable_pdfs(tiny_checkpoint: Path, tmp_path: Path) -> None:
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    (inbox / "sub").mkdir(parents=True)
    (inbox / "a.png").write_bytes(image_bytes(size=(64, 48), seed=1))
    (inbox / "b.jpg").write_bytes(image_bytes("JPEG", size=(80, 40), seed=2))
    (inbox / "report.pdf").write_bytes(make_pdf(3))
    (inbox / "notes.txt").write_text("not an input")
    (inbox / "sub" / "deep.png").write_bytes(image_bytes(seed=3))  # not without --recursive
    with serve_app(create_app(make_settings(tiny_checkpoint))) as url:
        done = cli(url, inbox, "--out", out, "--zip", "--searchable", "--dpi", "72")
        assert done.returncode == 0, done.stdout + done.stderr
        listed = jobs(url)
        assert len(listed) == 3 and all(j["status"] == "done" for j in listed), listed
        for stem in ("a", "b", "report"):
            assert (out / f"{stem}.md").is_file() and (out / f"{stem}.zip").is_file(), sorted(os.listdir(out))
            pdf = pymupdf.open(out / f"{stem}_searchable.pdf")
            assert pdf.page_count == (3 if stem == "report" else 1)
            assert zipfile.ZipFile(out / f"{stem}.zip").testzip() is None
        report = next(j for j in listed if j["filename"] == "report.pdf")
        assert (out / "report.md").read_text() == result_of(url, report["id"])["markdown"]
        assert report["pages_total"] == 3
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"{s}{x}" for s in ("a", "b", "report") for x in (".md", ".zip", "_searchable.pdf"))  # no state left
    lines = done.stdout.splitlines()
    assert len(lines) == 4 and lines[-1] == "3 of 3 document(s) OK", done.stdout
    assert "report.pdf: done; 3 page(s)" in done.stdout, done.stdout


@contextlib.contextmanager
def terminal_sigint() -> Iterator[None]:
    """Children started inside get SIGINT as a terminal's foreground job does, however the suite was started
    (a shell's background job starts with SIGINT ignored, and a child inherits an ignored signal)."""
    kept = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, kept)


def signal_lines(pid: int) -> str:
    """The kernel's view of a process's signals (ignored, caught, blocked masks): why a signal did nothing."""
    with contextlib.suppress(OSError):
        status = Path(f"/proc/{pid}/status").read_text().splitlines()
        return "signals: " + ", ".join(line.replace("\t", " ") for line in status if line.startswith(("SigIgn",
                                                                                                  "SigCgt", "SigBlk")))
    return "signals: unknown"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_killed_mid_job_and_run_again_it_finishes_the_same_job(tmp_path: Path, sig: signal.Signals) -> None:
    # No page ends before the client is stopped (a fixed delay let a loaded box finish the job first: CI flake).
    hold = threading.Event()
    engine = ReplayEngine(TEXT, delay_s=0.05, max_concurrency=1, hold=hold)
    source = tmp_path / "long.pdf"
    source.write_bytes(make_pdf(6))
    state_file = tmp_path / ".long.job.json"
    app = create_app(make_settings(None, data_dir=str(tmp_path / "data")), engine_factory=factory(engine))
    with serve_app(app) as url, terminal_sigint():
        first = subprocess.Popen([sys.executable, "-m", "ocr_client", "--url", url, source], cwd=ROOT,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        while not state_file.exists():
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.05)
        job_id = json.loads(state_file.read_text())["job_id"]
        dispositions = signal_lines(first.pid)
        first.send_signal(sig)
        try:
            out, err = first.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            first.kill()
            out, err = first.communicate()
            pytest.fail(f"the client did not end within 30 s of {sig.name}; its {dispositions}; stderr: {err}")
        assert first.returncode == (130 if sig == signal.SIGINT else -signal.SIGKILL), f"{dispositions}\n{out}{err}"
        running = httpx.get(f"{url}/jobs/{job_id}").json()
        assert running["status"] in ("queued", "running"), running  # killed before the job ended
        assert not (tmp_path / "long.md").exists()

        hold.set()
        again = cli(url, source)
        assert again.returncode == 0, again.stdout + again.stderr
        assert f"job {job_id} (resumed)" in again.stdout, again.stdout
        assert [j["id"] for j in jobs(url)] == [job_id]  # no second job
        result = result_of(url, job_id)
        assert [p["status"] for p in result["pages"]] == ["ok"] * 6, result["pages"]
        assert (tmp_path / "long.md").read_text() == result["markdown"] and "Hello client" in result["markdown"]
        assert not state_file.exists()


def test_a_failed_page_exits_non_zero_and_says_so(tmp_path: Path) -> None:
    engine = ReplayEngine(TEXT, fail_on_size=FAILING_SIZE)  # page 2 of make_pdf at 72 dpi
    (tmp_path / "doc.pdf").write_bytes(make_pdf(3))
    app = create_app(make_settings(None, data_dir=str(tmp_path / "data")), engine_factory=factory(engine))
    with serve_app(app) as url:
        done = cli(url, tmp_path / "doc.pdf", "--dpi", "72", "--poll", "-q")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "FAIL" in done.stdout and "1 failed" in done.stdout and "2 ok" in done.stdout, done.stdout
    assert "0 of 1 document(s) OK" in done.stdout
    assert "<!--" in (tmp_path / "doc.md").read_text()  # the failed page's place is kept, saying why


def test_bad_server_and_missing_input_are_reported(tmp_path: Path) -> None:
    (tmp_path / "x.png").write_bytes(image_bytes())
    missing = cli("http://127.0.0.1:9", tmp_path / "nope.pdf")
    assert missing.returncode == 2 and "no such file" in missing.stderr, missing.stderr
    down = cli("http://127.0.0.1:9", tmp_path / "x.png", "--retries", "0")
    assert down.returncode == 1 and "FAIL" in down.stdout and "0 of 1" in down.stdout, down.stdout + down.stderr


def test_sse_parser_reads_the_jobs_stream_format() -> None:
    lines = [": ping", "id: 1", "event: page", 'data: {"page": 1}', "", "", "id: 2", "event: done",
             'data: {"pages_done": 1}', ""]
    events = list(sse.parse(lines))
    assert [(e.id, e.event, e.data) for e in events] == [("1", "page", {"page": 1}), ("2", "done", {"pages_done": 1})]


class CuttingProxy:
    """A TCP proxy in front of the server that cuts every event stream after `life_s` seconds: a lost
    connection, as a flaky network or a proxy's idle timeout makes it. It keeps each request's head."""

    def __init__(self, upstream_port: int, life_s: float) -> None:
        self.upstream_port, self.life_s = upstream_port, life_s
        self.heads: list[str] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
        threading.Thread(target=self._pump, args=(upstream, conn), daemon=True).start()
        self._pump(conn, upstream, watch=True)

    def _pump(self, src: socket.socket, dst: socket.socket, watch: bool = False) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                if watch and data[:4] in (b"GET ", b"POST"):  # a request's head (keep-alive: several per connection)
                    self.heads.append(data[:2000].decode("latin-1"))
                    if b"/events" in data.split(b"\r\n", 1)[0]:
                        threading.Timer(self.life_s, self._cut, args=(src, dst)).start()
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    @staticmethod
    def _cut(*sockets: socket.socket) -> None:
        for s in sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.listener.close()


def test_a_lost_event_stream_resumes_after_the_last_event_seen(tmp_path: Path) -> None:
    engine = ReplayEngine(TEXT, delay_s=0.3, max_concurrency=1)
    app = create_app(make_settings(None, data_dir=str(tmp_path / "data")), engine_factory=factory(engine))
    (tmp_path / "doc.pdf").write_bytes(make_pdf(6))
    with serve_app(app) as url:
        proxy = CuttingProxy(int(url.rsplit(":", 1)[1]), life_s=0.8)
        try:
            client = Client(proxy.url, timeout=10)
            job = client.submit(tmp_path / "doc.pdf", {})
            seen: list[tuple[str, object]] = []
            final = follow(client, job["id"], lambda kind, data: seen.append((kind, data)), sleep=lambda _s: None)
        finally:
            proxy.close()
    resumed = [h for h in proxy.heads if "/events" in h.split("\r\n", 1)[0] and "last-event-id:" in h.lower()]
    assert resumed, proxy.heads  # the stream was cut and picked up after the last event seen
    assert final["status"] == "done" and final["pages_done"] == 6, final
    pages = [data["page"] for kind, data in seen if kind == "page"]
    assert sorted(pages) == [1, 2, 3, 4, 5, 6], seen  # every page event once: none twice, none lost
    assert [kind for kind, _ in seen].count("done") == 1


def test_the_api_key_comes_from_the_flag_or_the_environment(tmp_path: Path) -> None:
    (tmp_path / "x.png").write_bytes(image_bytes())
    app = create_app(make_settings(None, data_dir=str(tmp_path / "data"), api_key="k1"),
                     engine_factory=factory(ReplayEngine(TEXT)))
    with serve_app(app) as url:
        denied = cli(url, tmp_path / "x.png", "-q")
        assert denied.returncode == 1 and "HTTP 401" in denied.stdout, denied.stdout + denied.stderr
        flag = cli(url, tmp_path / "x.png", "-q", "--api-key", "k1")
        assert flag.returncode == 0, flag.stdout + flag.stderr
        env = subprocess.run([sys.executable, "-m", "ocr_client", "-q", tmp_path / "x.png"], cwd=ROOT, text=True,
                             capture_output=True, timeout=60, env={**os.environ, "OCR_URL": url, "API_KEY": "k1"})
        assert env.returncode == 0, env.stdout + env.stderr
    assert "Hello client" in (tmp_path / "x.md").read_text()


def test_inputs_recursive_mirrored_and_clashing_stems_kept_apart(tmp_path: Path) -> None:
    from ocr_client.files import collect

    for name in ("a.png", "a.pdf", "sub/c.jpg", "skip.txt"):
        (tmp_path / "in" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "in" / name).write_bytes(b"x")
    flat = collect([tmp_path / "in"], None, recursive=False)
    assert [(t.source.name, t.stem, t.out_dir) for t in flat] == [
        ("a.pdf", "a_pdf", tmp_path / "in"), ("a.png", "a_png", tmp_path / "in")]
    deep = collect([tmp_path / "in"], tmp_path / "out", recursive=True)
    assert [(t.stem, t.out_dir) for t in deep][-1] == ("c", tmp_path / "out" / "sub")


def test_workers_run_documents_at_once_and_skip_existing_submits_nothing(tmp_path: Path) -> None:
    engine = ReplayEngine(TEXT, delay_s=1.0, max_concurrency=8)  # each job lasts seconds: easy to see at once
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    inbox.mkdir()
    for n in range(4):
        (inbox / f"doc{n}.pdf").write_bytes(make_pdf(4))
    app = create_app(make_settings(None, data_dir=str(tmp_path / "data"), jobs_running=4),
                     engine_factory=factory(engine))
    with serve_app(app) as url:
        most = 0
        stop = threading.Event()

        def watch() -> None:  # the server's view: how many of the client's jobs are active at one moment
            nonlocal most
            while not stop.is_set():
                active = [j for j in httpx.get(f"{url}/jobs", timeout=30).json()["jobs"]
                          if j["status"] in ("queued", "running")]
                most = max(most, len(active))
                time.sleep(0.05)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            done = cli(url, inbox, "--out", out, "--workers", "3", "--dpi", "72", "-q", timeout=120)
        finally:
            stop.set()
            watcher.join(30)
        assert done.returncode == 0, done.stdout + done.stderr
        assert most == 3, f"at most {most} jobs were active at once; --workers 3 should keep three in flight"
        assert len(jobs(url)) == 4 and "4 of 4 document(s) OK" in done.stdout, done.stdout
        assert sorted(p.name for p in out.iterdir()) == [f"doc{n}.md" for n in range(4)]

        (out / "doc3.md").unlink()  # one output lost: only that document runs again
        again = cli(url, inbox, "--out", out, "--workers", "3", "--skip-existing", "-q", timeout=120)
        assert again.returncode == 0, again.stdout + again.stderr
        assert len(jobs(url)) == 5, jobs(url)
        assert again.stdout.count("SKIP") == 3 and "OK   " in again.stdout, again.stdout
        rerun = cli(url, inbox, "--out", out, "--skip-existing", "-q")
        assert rerun.returncode == 0 and rerun.stdout.count("SKIP") == 4, rerun.stdout + rerun.stderr
        assert len(jobs(url)) == 5, jobs(url)  # nothing submitted


def test_a_failed_document_leaves_no_output(tmp_path: Path) -> None:
    engine = ReplayEngine(TEXT, fail_on_size=(64, 48))  # the one image below: its only page fails
    (tmp_path / "bad.png").write_bytes(image_bytes(size=(64, 48), seed=1))
    (tmp_path / "good.png").write_bytes(image_bytes(size=(80, 40), seed=2))
    app = create_app(make_settings(None, data_dir=str(tmp_path / "data")), engine_factory=factory(engine))
    with serve_app(app) as url:
        done = cli(url, tmp_path / "bad.png", tmp_path / "good.png", "-q")
    assert done.returncode == 1 and "1 of 2 document(s) OK" in done.stdout, done.stdout + done.stderr
    assert "no output written" in done.stdout, done.stdout
    assert not (tmp_path / "bad.md").exists() and (tmp_path / "good.md").is_file()
    assert not (tmp_path / ".bad.job.json").exists()  # the job ended: nothing to resume


def test_refused_connection_is_one_plain_line(tmp_path: Path) -> None:
    (tmp_path / "x.png").write_bytes(image_bytes())
    down = cli("http://127.0.0.1:9", tmp_path / "x.png", "--retries", "0")
    both = down.stdout + down.stderr
    assert down.returncode == 1, both
    assert "the server at http://127.0.0.1:9 refused the connection" in down.stdout, both
    for noise in ("Traceback", "urllib3", "HTTPConnectionPool", "Max retries", "NewConnectionError"):
        assert noise not in both, both


def test_encrypted_pdf_names_the_password_flag(tmp_path: Path) -> None:
    (tmp_path / "locked.pdf").write_bytes(
        make_pdf(1, encryption=pymupdf.PDF_ENCRYPT_AES_256, owner_pw="owner", user_pw="secret"))
    app = create_app(make_settings(None, data_dir=str(tmp_path / "data")), engine_factory=factory(ReplayEngine(TEXT)))
    with serve_app(app) as url:
        bare = cli(url, tmp_path / "locked.pdf", "-q")
        wrong = cli(url, tmp_path / "locked.pdf", "-q", "--password", "nope")
        right = cli(url, tmp_path / "locked.pdf", "-q", "--password", "secret")
    assert bare.returncode == 1 and "run again with --password" in bare.stdout, bare.stdout + bare.stderr
    assert "`password` field" not in bare.stdout, bare.stdout
    assert wrong.returncode == 1 and "--password is wrong" in wrong.stdout, wrong.stdout + wrong.stderr
    assert right.returncode == 0, right.stdout + right.stderr
