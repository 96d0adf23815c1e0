"""The seed's test program: try a running DeepSeek-OCR server through its public HTTP API.

    python test_ocr.py                          # interactive menu of the 9 tests
    python test_ocr.py --run 5 --file doc.pdf   # one test, no questions; exit code 0 = passed
    python test_ocr.py --run 9                  # everything, on a generated test image and PDF

`--url` (default http://localhost:8000); the API key from `--api-key` or the API_KEY environment variable,
sent as `Authorization: Bearer <key>`. Without `--file` the program draws its own test image (Pillow) or
PDF (PyMuPDF). It only uses `requests`, so it also runs on a machine that has no copy of the service.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp", ".gif"}
PROMPTS = (
    "<image>\nFree OCR.",
    "<image>\n<|grounding|>Convert the document to markdown.",
    "<image>\n<|grounding|>OCR this image.",
    "<image>\nParse the figure.",
    "<image>\nDescribe this image in detail.",
)
MENU = (
    "Quick test (health check + one inference)",
    "Image upload test (/ocr/image/advanced)",
    "Batch image processing (the images of the current directory)",
    "One image, several prompts",
    "PDF OCR test (full: pages, markdown, layout PDF)",
    "PDF OCR test (simple: plain text)",
    "Batch OCR test (several images)",
    "Batch OCR, download the ZIP",
    "Everything (tests 1-8)",
)


class TestFailed(Exception):
    """A test's request failed or its answer was not what the API promises; the message says which."""


class Client:
    def __init__(self, url: str, api_key: str | None, timeout: float, max_tokens: int | None) -> None:
        self.url = url.rstrip("/")
        self.session = requests.Session()
        if api_key:
            self.session.headers["Authorization"] = f"Bearer {api_key}"
        self.timeout = timeout
        self.max_tokens = max_tokens

    def call(self, method: str, path: str, *, expect: tuple[str, ...] = (), **kwargs: Any) -> requests.Response:
        """One request; a connection error or a non-2xx answer is a `TestFailed` carrying the server's words."""
        if self.max_tokens is not None and "data" in kwargs:
            kwargs["data"] = {**kwargs["data"], "max_tokens": str(self.max_tokens)}
        try:
            r = self.session.request(method, self.url + path, timeout=self.timeout, **kwargs)
        except requests.RequestException as exc:
            raise TestFailed(f"{method} {path}: cannot reach {self.url} ({exc}); is the server running?") from exc
        if not r.ok:
            raise TestFailed(f"{method} {path}: HTTP {r.status_code}: {describe_problem(r)}")
        if expect:
            body = r.json()
            missing = [key for key in expect if key not in body]
            if missing:
                raise TestFailed(f"{method} {path}: the answer lacks {missing}: {r.text[:500]}")
        return r


def describe_problem(r: requests.Response) -> str:
    try:
        body = r.json()
    except ValueError:
        return r.text[:500]
    if isinstance(body, dict):
        return str(body.get("detail") or body.get("title") or body)[:500]
    return str(body)[:500]


# ----- test inputs: the user's files, or small ones drawn here -------------------------------------------


def make_image(text: str = "DeepSeek-OCR test 123") -> bytes:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (640, 200), "white")
    draw = ImageDraw.Draw(image)
    draw.text((20, 40), text, fill="black")
    draw.text((20, 100), "Invoice 42: total 17.50 EUR", fill="black")
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def make_pdf(pages: int = 2) -> bytes:
    import pymupdf

    doc = pymupdf.open()
    for n in range(1, pages + 1):
        page = doc.new_page(width=300, height=200)
        page.insert_text((30, 60), f"Test page {n}", fontsize=18)
        page.insert_text((30, 100), "DeepSeek-OCR sample document", fontsize=11)
    data = doc.tobytes()
    doc.close()
    return data


def image_input(path: Path | None) -> tuple[str, bytes]:
    if path is None:
        return "generated.png", make_image()
    return path.name, read_file(path)


def pdf_input(path: Path | None) -> tuple[str, bytes]:
    if path is None:
        return "generated.pdf", make_pdf()
    return path.name, read_file(path)


def read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise TestFailed(f"cannot read {path}: {exc}") from exc


def folder_images(folder: Path) -> list[tuple[str, bytes]]:
    """The images directly in `folder`; two generated ones when it has none."""
    found = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not found:
        print(f"  no images in {folder}: using two generated test images")
        return [("generated-1.png", make_image("First test image")), ("generated-2.png", make_image("Second one"))]
    return [(p.name, read_file(p)) for p in found]


def preview(text: str, limit: int = 200) -> str:
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[:limit] + "..."


# ----- the 9 tests --------------------------------------------------------------------------------------


def check_quick(c: Client, path: Path | None) -> None:
    health = c.call("GET", "/health", expect=("status",)).json()
    print(f"  /health: status={health.get('status')} engine={health.get('engine')} model={health.get('model')}")
    if health.get("demo"):
        print("  note: the server runs a random-weights demo checkpoint; its text is meaningless")
    name, data = image_input(path)
    files = {"file": (name, data)}
    body = c.call("POST", "/generate_with_file", files=files, data={"prompt": PROMPTS[0]}, expect=("result",)).json()
    print(f"  /generate_with_file ({name}): {preview(body['result'])!r} [{body.get('finish_reason')}]")


def check_image_upload(c: Client, path: Path | None) -> None:
    name, data = image_input(path)
    body = c.call("POST", "/ocr/image/advanced", files={"file": (name, data)}, data={}, expect=("text", "markdown"))
    result = body.json()
    print(
        f"  /ocr/image/advanced ({name}): {len(result.get('blocks') or [])} blocks, "
        f"{len(result.get('crops') or [])} crops, annotated image: {bool(result.get('annotated_image'))}"
    )
    print(f"  markdown: {preview(result['markdown'])!r}")


def check_folder(c: Client, path: Path | None) -> None:
    folder = path if path is not None and path.is_dir() else Path.cwd()
    images = folder_images(folder)
    for name, data in images:
        started = time.monotonic()
        body = c.call("POST", "/ocr/image/simple", files={"file": (name, data)}, data={}, expect=("text",)).json()
        print(f"  {name}: {time.monotonic() - started:.1f}s {preview(body['text'], 120)!r}")
    print(f"  {len(images)} image(s) from {folder}")


def check_prompts(c: Client, path: Path | None) -> None:
    name, data = image_input(path)
    for prompt in PROMPTS:
        files = {"file": (name, data)}
        body = c.call("POST", "/generate_with_file", files=files, data={"prompt": prompt}, expect=("result",)).json()
        print(f"  {prompt.splitlines()[-1]!r}: {preview(body['result'], 120)!r}")


def check_pdf_full(c: Client, path: Path | None) -> None:
    name, data = pdf_input(path)
    files = {"file": (name, data, "application/pdf")}
    body = c.call("POST", "/pdf/ocr", files=files, data={}, expect=("pages", "markdown")).json()
    failed = [p for p in body["pages"] if p.get("status") == "error"]
    print(
        f"  /pdf/ocr ({name}): {len(body['pages'])} page(s), {len(body.get('images') or [])} figure(s), "
        f"layout PDF: {bool(body.get('layout_pdf'))}"
    )
    print(f"  markdown: {preview(body['markdown'])!r}")
    if failed:
        raise TestFailed(f"/pdf/ocr: page(s) failed: {[(p.get('page'), p.get('error')) for p in failed]}")


def check_pdf_simple(c: Client, path: Path | None) -> None:
    name, data = pdf_input(path)
    files = {"file": (name, data, "application/pdf")}
    body = c.call("POST", "/pdf/ocr/simple", files=files, data={}, expect=("text",)).json()
    print(f"  /pdf/ocr/simple ({name}): {body.get('page_count')} page(s), {body.get('pages_failed', 0)} failed")
    print(f"  text: {preview(body['text'])!r}")
    if body.get("pages_failed"):
        raise TestFailed(f"/pdf/ocr/simple: {body['pages_failed']} page(s) failed: {body.get('pages')}")


def batch_files(path: Path | None) -> list[tuple[str, tuple[str, bytes]]]:
    if path is not None and path.is_dir():
        images = folder_images(path)
    elif path is not None:
        images = [image_input(path), ("generated.png", make_image())]
    else:
        images = [("generated-1.png", make_image("First test image")), ("generated-2.png", make_image("Second"))]
    return [("files", (name, data)) for name, data in images]


def check_batch(c: Client, path: Path | None) -> None:
    files = batch_files(path)
    body = c.call("POST", "/batch/ocr", files=files, data={}, expect=("results",)).json()
    for item in body["results"]:
        print(f"  {item.get('filename')}: {item.get('status')} {preview(item.get('markdown') or '', 100)!r}")
    errors = [item for item in body["results"] if item.get("status") == "error"]
    if len(body["results"]) != len(files) or errors:
        raise TestFailed(f"/batch/ocr: {len(body['results'])} result(s) for {len(files)} file(s); errors: {errors}")


def check_batch_zip(c: Client, path: Path | None) -> None:
    files = batch_files(path)
    r = c.call("POST", "/batch/ocr/download", files=files, data={})
    if not zipfile.is_zipfile(io.BytesIO(r.content)):
        raise TestFailed(f"/batch/ocr/download: the answer is not a ZIP ({r.headers.get('content-type')})")
    out = Path.cwd() / f"ocr_results_{time.strftime('%Y%m%d_%H%M%S')}.zip"
    out.write_bytes(r.content)
    with zipfile.ZipFile(out) as archive:
        names = archive.namelist()
    print(f"  saved {out} ({len(r.content)} bytes, {len(names)} entries: {', '.join(names[:6])})")


TESTS: tuple[Callable[[Client, Path | None], None], ...] = (
    check_quick,
    check_image_upload,
    check_folder,
    check_prompts,
    check_pdf_full,
    check_pdf_simple,
    check_batch,
    check_batch_zip,
)


def run_test(c: Client, number: int, path: Path | None) -> bool:
    """Run test `number` (1-9); prints PASS/FAIL lines and returns whether it passed."""
    if number == 9:
        results = [run_test(c, n, pdf_or_image(n, path)) for n in range(1, 9)]
        print(f"{sum(results)} of {len(results)} tests passed")
        return all(results)
    print(f"[{number}] {MENU[number - 1]}")
    started = time.monotonic()
    try:
        TESTS[number - 1](c, path)
    except TestFailed as exc:
        print(f"FAIL [{number}] {MENU[number - 1]}: {exc}")
        return False
    print(f"PASS [{number}] {MENU[number - 1]} ({time.monotonic() - started:.1f}s)")
    return True


def pdf_or_image(number: int, path: Path | None) -> Path | None:
    """For test 9: a given file goes only to the tests of its kind; the others use generated inputs."""
    if path is None or path.is_dir():
        return path
    wants_pdf = number in (5, 6)
    return path if (path.suffix.lower() == ".pdf") == wants_pdf else None


def interactive(c: Client) -> int:
    print(f"DeepSeek-OCR API tests against {c.url}")
    while True:
        print()
        for n, label in enumerate(MENU, 1):
            print(f"{n}. {label}")
        print("0. Quit")
        choice = input("Choose a test: ").strip()
        if choice in ("0", "q", ""):
            return 0
        if not choice.isdigit() or not 1 <= int(choice) <= 9:
            print(f"{choice!r} is not a menu item; type 0-9")
            continue
        number = int(choice)
        path = None
        if number in (2, 4, 5, 6):
            kind = "PDF" if number in (5, 6) else "image"
            given = input(f"Path of the {kind} (Enter for a generated test {kind}): ").strip()
            path = Path(given).expanduser() if given else None
        run_test(c, number, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://localhost:8000", help="server base URL (default %(default)s)")
    parser.add_argument("--api-key", default=os.environ.get("API_KEY"), help="API key (default: $API_KEY)")
    parser.add_argument("--run", type=int, choices=range(1, 10), metavar="N", help="run test N (1-9) and exit")
    parser.add_argument("--file", type=Path, help="image, PDF or folder to use instead of generated inputs")
    parser.add_argument("--max-tokens", type=int, help="max_tokens for every request (default: the server's)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per request (default %(default)s)")
    args = parser.parse_args(argv)
    if args.file is not None and not args.file.exists():
        parser.error(f"--file {args.file} does not exist")
    client = Client(args.url, args.api_key, args.timeout, args.max_tokens)
    if args.run is None:
        try:
            return interactive(client)
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
    return 0 if run_test(client, args.run, args.file) else 1


if __name__ == "__main__":
    sys.exit(main())
