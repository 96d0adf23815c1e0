"""A render process whose server closes the pipe mid-answer (a shutdown, or a render the server gave up on) ends
quietly: exit status 0 and nothing on stderr, not a BrokenPipeError traceback per process in the server's log."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from helpers.pdfs import make_pdf
from helpers.server import ROOT


def test_a_closed_pipe_mid_answer_ends_the_worker_quietly(tmp_path: Path) -> None:
    pdf = tmp_path / "doc.pdf"
    pdf.write_bytes(make_pdf(2))
    # In a child interpreter, so that the worker's stderr (where a traceback would go) is ours to read.
    script = textwrap.dedent(f"""
        import multiprocessing, os, sys
        from pdf.limits import PdfLimits
        from pdf import render_process
        if __name__ == "__main__":
            ctx = multiprocessing.get_context("spawn")
            ours, theirs = ctx.Pipe()
            worker = ctx.Process(target=render_process.worker_main, args=(theirs, os.getpid(), 2048, PdfLimits()))
            worker.start()
            theirs.close()
            assert ours.recv()[0] == "ready"
            # A page at 300 dpi: its pixels (tens of MB) cannot fit the socket's buffer, so the send is under way
            # when our end closes, and a small reply after it meets the closed pipe in any case.
            ours.send(("render", "d1", {str(pdf)!r}, None, 1, 300, 40_000_000, False))
            ours.close()
            worker.join(60)
            print("exitcode", worker.exitcode)
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "exitcode 0" in done.stdout, done.stdout + done.stderr
    assert "Traceback" not in done.stderr and "BrokenPipeError" not in done.stderr, done.stderr

