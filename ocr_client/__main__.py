"""`python -m ocr_client` / `deepseek-ocr`: OCR images, PDFs and folders through a DeepSeek-OCR server.

Exit status: 0 when every document's job is done with no failed page; 1 when a page failed, a job failed or
was cancelled, or a document could not be sent; 2 for bad arguments; 130 after Ctrl-C (run again to resume).
"""

from __future__ import annotations

import argparse
import os
import queue
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import requests

from ocr_client import __version__, document, files
from ocr_client.api import ApiError, Client, Lost, plain_error
from ocr_client.files import Target

EPILOG = """examples:
  deepseek-ocr scan.png report.pdf
  deepseek-ocr ./inbox --recursive --out ./ocr --zip --searchable --workers 4 --skip-existing
  deepseek-ocr report.pdf --pages 1-3,7 --dpi 200 --url http://gpu-host:8000 --api-key $KEY

outputs per input: {stem}.md; with --zip {stem}.zip (the job's download); with --searchable
{stem}_searchable.pdf. A state file .{stem}.job.json beside the outputs lets a second run (after Ctrl-C or a
lost connection) follow the same job; it is removed when the outputs are written."""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="deepseek-ocr", description=__doc__.split("\n\n")[0], epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", type=Path, help="images, PDFs, or folders of them")
    p.add_argument("--out", type=Path, help="folder for the outputs (default: beside each input)")
    p.add_argument("--recursive", action="store_true", help="also the subfolders of a folder input")
    p.add_argument("--zip", action="store_true", help="also write the job's ZIP as {stem}.zip")
    p.add_argument("--searchable", action="store_true", help="also write {stem}_searchable.pdf")
    p.add_argument("--workers", type=int, default=1, metavar="N",
                   help="documents at once, each its own job on the server (default 1)")
    p.add_argument("--skip-existing", action="store_true",
                   help="leave out inputs whose outputs are all there already (a rerun after a stop)")
    server = p.add_argument_group("server")
    server.add_argument("--url", default=os.environ.get("OCR_URL", "http://localhost:8000"),
                        help="server URL (default: $OCR_URL or http://localhost:8000)")
    server.add_argument("--api-key", default=os.environ.get("API_KEY"), help="sent as Bearer (default: $API_KEY)")
    server.add_argument("--timeout", type=float, default=60.0, help="seconds per HTTP request (default 60)")
    server.add_argument("--retries", type=int, default=8,
                        help="reconnects in a row after a lost connection, with backoff (default 8)")
    server.add_argument("--poll", action="store_true", help="poll GET /jobs/{id} instead of the event stream")
    ocr = p.add_argument_group("OCR options (the server's defaults when left out)")
    ocr.add_argument("--prompt", help="the prompt (default: the document-to-markdown prompt)")
    ocr.add_argument("--mode", help="resolution mode: tiny, small, base, large, gundam")
    ocr.add_argument("--dpi", type=int, help="PDF render resolution, 72..300 (server default 144)")
    ocr.add_argument("--pages", help="PDF pages, 1-based, e.g. 1-3,7")
    ocr.add_argument("--password", help="password of an encrypted PDF (the same for every input)")
    ocr.add_argument("--max-tokens", type=int, help="tokens per page")
    ocr.add_argument("--model", help="model name, when the server serves several")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        targets = files.collect(args.inputs, args.out, args.recursive)
    except ValueError as e:
        print(f"deepseek-ocr: {e}", file=sys.stderr)
        return 2
    if not targets:
        print("deepseek-ocr: no images or PDFs found in the inputs", file=sys.stderr)
        return 2
    if args.workers < 1:
        print("deepseek-ocr: --workers must be 1 or more", file=sys.stderr)
        return 2
    outcomes = []
    try:
        for outcome in run_all(targets, args):
            outcomes.append(outcome)
            print(outcome.line(), flush=True)
    except KeyboardInterrupt:
        print("\ninterrupted: the server goes on with the job; run the same command again to resume it",
              file=sys.stderr)
        return 130
    failed = sum(not o.ok for o in outcomes)
    skipped = sum(o.status == "skipped" for o in outcomes)
    print(f"{len(outcomes) - failed} of {len(outcomes)} document(s) OK"
          + (f" ({skipped} skipped: their outputs exist)" if skipped else ""), flush=True)
    return 1 if failed else 0


def run_one(target: Target, args: argparse.Namespace, position: int | None = None) -> document.Outcome:
    """One input start to end; every failure becomes the outcome's note, in the CLI's terms."""
    if args.skip_existing and document.outputs_exist(target, args.zip, args.searchable):
        return document.Outcome(target, status="skipped", notes=["outputs exist (--skip-existing)"])
    common = {"prompt": args.prompt, "mode": args.mode, "max_tokens": args.max_tokens, "model": args.model}
    pdf_only = {"dpi": args.dpi, "pages": args.pages, "password": args.password}
    options = {**common, **(pdf_only if target.is_pdf else {})}
    client = Client(args.url, args.api_key, args.timeout)  # one per document: a requests Session is not shared
    try:
        return document.run(client, target, options, want_zip=args.zip, want_searchable=args.searchable,
                            retries=args.retries, poll=args.poll, quiet=args.quiet, position=position)
    except ApiError as e:
        return document.Outcome(target, notes=[password_note(e, args.password) or str(e)])
    except requests.RequestException as e:
        return document.Outcome(target, notes=[plain_error(e, args.url)])
    except (Lost, OSError) as e:
        return document.Outcome(target, notes=[str(e)])


def password_note(error: ApiError, password: str | None) -> str | None:
    """The server's encrypted-PDF answer names its form field; the user sets the flag."""
    if not error.problem.get("password_required"):
        return None
    if password:
        return "the password given with --password is wrong for this PDF"
    return "the PDF is encrypted: run again with --password PASSWORD"


def run_all(targets: list[Target], args: argparse.Namespace) -> Iterator[document.Outcome]:
    """The outcomes as documents finish, `--workers` of them at once (each a job in flight on the server)."""
    if args.workers == 1 or len(targets) == 1:
        for target in targets:
            yield run_one(target, args)
        return
    todo: queue.Queue[Target] = queue.Queue()
    for target in targets:
        todo.put(target)
    done: queue.Queue[document.Outcome] = queue.Queue()

    def work(slot: int) -> None:
        while True:
            try:
                target = todo.get_nowait()
            except queue.Empty:
                return
            done.put(run_one(target, args, position=slot))

    # Daemon threads: after Ctrl-C the main thread returns at once; the jobs go on on the server and their
    # state files (written right after each submit) let the next run resume them.
    for slot in range(min(args.workers, len(targets))):
        threading.Thread(target=work, args=(slot,), daemon=True, name=f"document-{slot}").start()
    for _ in targets:
        yield done.get()


if __name__ == "__main__":
    sys.exit(main())
