"""Swagger UI's "Try it out", unknown fields and PDFs on image routes, over real HTTP on the tiny checkpoint.

`swagger_prefill` mimics how Swagger UI 5 fills a multipart form from an OpenAPI 3.1 document
(`request-body.jsx` and the JSON Schema 2020-12 sampler): each property, merged with its first
`anyOf`/`oneOf` alternative, starts with `examples[0]`, else `default`, else `example`, else a value made
from its type (`"string"`, the minimum or 0, `true`, the first enum value, an array of one item's value).
An empty optional field goes out as `""` ("Send empty value" starts checked); a `null` goes out as the text
`null`. A file array goes out as one part per item: the file picked, else the item's pre-fill as text; an
empty array as one empty part (`files=`). All were checked against the real Swagger UI in headless Chromium
(the request it sent; test_swagger_browser.py drives it). The test sends exactly that plus the files a user
picks, for every POST route, and wants 200 (202 for a job).
"""

from __future__ import annotations

import base64
import re
from typing import Any

import httpx
import pymupdf
import pytest
from helpers.images import png_bytes
from helpers.server import show

PNG = png_bytes(64, 48)


def two_page_pdf() -> bytes:
    doc = pymupdf.open()
    for n in range(2):
        page = doc.new_page(width=300, height=200)
        page.insert_text((30, 60), f"Page {n + 1}", fontsize=18)
    data = doc.tobytes()
    doc.close()
    return data


@pytest.fixture(scope="module")
def spec(base_url: str) -> dict[str, Any]:
    r = httpx.get(base_url + "/openapi.json")
    assert r.status_code == 200, show(r)
    return r.json()


def resolve(spec: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        schema = spec["components"]["schemas"][schema["$ref"].rsplit("/", 1)[-1]]
    return schema


def post_bodies(spec: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """(path, media type, body schema) of every POST route that takes a multipart or JSON body."""
    found = []
    for path, item in spec["paths"].items():
        content = item.get("post", {}).get("requestBody", {}).get("content", {})
        for media in ("multipart/form-data", "application/json"):
            if media in content:
                found.append((path, media, resolve(spec, content[media]["schema"])))
    return found


def merged(prop: dict[str, Any]) -> dict[str, Any]:
    """The property as Swagger UI's form renders it: merged with its first anyOf/oneOf alternative."""
    first = (prop.get("oneOf") or prop.get("anyOf") or [{}])[0]
    return {**first, **{k: v for k, v in prop.items() if k not in ("anyOf", "oneOf")}}


def is_file(prop: dict[str, Any]) -> bool:
    return prop.get("type") == "string" and (prop.get("format") == "binary" or "contentMediaType" in prop)


def type_sample(prop: dict[str, Any]) -> Any:
    """What Swagger UI makes up for a property without an author-given value."""
    if "const" in prop:
        return prop["const"]
    if prop.get("enum"):
        return prop["enum"][0]
    kind = prop.get("type")
    if kind in ("integer", "number"):
        value: float = 0
        if "minimum" in prop:
            value = prop["minimum"]
        if "exclusiveMinimum" in prop:
            value = prop["exclusiveMinimum"] + 1
        if "maximum" in prop:
            value = min(value, prop["maximum"])
        return int(value) if kind == "integer" else value
    if kind == "array":
        return [swagger_prefill(prop["items"])] if "items" in prop else []
    return {"string": "string", "boolean": True, "object": {}}.get(kind, "string")


def swagger_prefill(prop: dict[str, Any]) -> Any:
    """Swagger UI 5's initial value for one form field (OpenAPI 3.1 sampler precedence)."""
    prop = merged(prop)
    if isinstance(prop.get("examples"), list) and prop["examples"]:
        return prop["examples"][0]
    for key in ("default", "example"):
        if key in prop:
            return prop[key]
    return type_sample(prop)


def form_text(value: Any) -> str:
    """A value as Swagger UI writes it into multipart: JavaScript's String() (`null` becomes "null")."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def swagger_request(path: str, schema: dict[str, Any]) -> tuple[dict[str, Any], list[tuple[str, Any]]]:
    """The form fields Swagger UI sends with its pre-fill, and the files a user picks for this route."""
    data: dict[str, Any] = {}
    files = []
    properties = schema.get("properties", {})
    for name, prop in properties.items():
        prop = merged(prop)
        if name == "files" and "file" in properties:
            # POST /jobs: the user picks `file`; the array goes out as its items' pre-fill, or one empty part.
            data[name] = [form_text(v) for v in swagger_prefill(prop)] or [""]
        elif prop.get("type") == "array" and is_file(prop.get("items", {})):
            files += [(name, ("a.png", PNG, "image/png")), (name, ("b.png", PNG, "image/png"))]
        elif is_file(prop):
            pdf = path.startswith("/pdf")
            files.append((name, ("doc.pdf", two_page_pdf(), "application/pdf") if pdf else ("a.png", PNG, "image/png")))
        else:
            data[name] = form_text(swagger_prefill(prop))
    return data, files


def test_every_post_route_answers_200_to_swaggers_prefilled_form(spec: dict[str, Any], base_url: str) -> None:
    bodies = post_bodies(spec)
    assert {p for p, _, _ in bodies} >= {
        "/generate",
        "/generate_with_file",
        "/ocr/image/advanced",
        "/ocr/image/simple",
        "/pdf/ocr",
        "/pdf/ocr/download",
        "/pdf/ocr/simple",
        "/batch/ocr",
        "/batch/ocr/download",
        "/batch/ocr/simple",
    }, bodies
    for path, media, schema in bodies:
        if media == "application/json":
            # The JSON editor starts with the body model's example (examples[0] of the schema).
            body = schema["examples"][0] if schema.get("examples") else swagger_prefill(schema)
            r = httpx.post(base_url + path, json=body, timeout=300)
        else:
            data, files = swagger_request(path, schema)
            r = httpx.post(base_url + path, data=data, files=files, timeout=300)
        ok = 202 if path == "/jobs" else 200  # a job is accepted, then runs
        assert r.status_code == ok, f"{path} with {media} Swagger pre-fill: " + show(r)


def multipart(*parts: tuple[str, str | None, bytes]) -> dict[str, Any]:
    """httpx arguments for a multipart body written byte for byte: (name, file name or None, content).

    httpx leaves out an empty file name; a browser's file input with no file picked sends `filename=""`.
    """
    boundary = "swagger-form-test"
    body = b""
    for name, filename, content in parts:
        head = f'Content-Disposition: form-data; name="{name}"'
        if filename is not None:
            head += f'; filename="{filename}"\r\nContent-Type: application/octet-stream'
        body += f"--{boundary}\r\n{head}\r\n\r\n".encode() + content + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    return {"content": body, "headers": {"Content-Type": f"multipart/form-data; boundary={boundary}"}}


EMPTY_FILE = (None, b"")  # Swagger UI's empty file field: a text part with no value (`files=`)
NO_FILE_PICKED = ("", b"")  # a browser's file input with nothing picked: a file part without name or bytes
PDF_FILE = ("doc.pdf", two_page_pdf())
PNG_FILE = ("a.png", PNG)


@pytest.mark.parametrize(
    ("path", "parts", "ok"),
    [
        # Swagger UI on POST /jobs: `file` picked, `files` as one empty part (its item removed, or left empty).
        ("/jobs", [("file", *PDF_FILE), ("files", *EMPTY_FILE)], 202),
        # Images picked as `files`: the unpicked `file` goes out empty, and so does an item added but not picked.
        ("/jobs", [("file", *EMPTY_FILE), ("files", *PNG_FILE), ("files", *EMPTY_FILE), ("files", *PNG_FILE)], 202),
        ("/jobs", [("file", *NO_FILE_PICKED), ("files", *PNG_FILE), ("files", *NO_FILE_PICKED)], 202),
        ("/batch/ocr", [("files", *EMPTY_FILE), ("files", *PNG_FILE), ("files", *EMPTY_FILE)], 200),
        ("/batch/ocr/simple", [("files", *PNG_FILE), ("files", *NO_FILE_PICKED)], 200),
    ],
)
def test_empty_file_parts_beside_a_file_are_absent(
    base_url: str, path: str, parts: list[tuple[str, str | None, bytes]], ok: int
) -> None:
    r = httpx.post(base_url + path, timeout=300, **multipart(*parts))
    assert r.status_code == ok, show(r)
    if path.startswith("/batch"):
        assert [f["filename"] for f in r.json()["results"]] == ["a.png"], show(r)


@pytest.mark.parametrize(
    ("path", "parts", "named"),
    [
        ("/jobs", [("file", *EMPTY_FILE), ("files", *EMPTY_FILE)], ["`file`", "`files`"]),
        ("/jobs", [("file", *NO_FILE_PICKED), ("files", *NO_FILE_PICKED)], ["`file`", "`files`"]),
        ("/batch/ocr", [("files", *EMPTY_FILE)], ["files: Field required"]),
        ("/batch/ocr/download", [("files", *EMPTY_FILE), ("files", *NO_FILE_PICKED)], ["files: Field required"]),
        ("/ocr/image/advanced", [("file", *EMPTY_FILE)], ["file: Field required"]),
        ("/pdf/ocr", [("file", *NO_FILE_PICKED)], ["file: Field required"]),
    ],
)
def test_only_empty_file_parts_is_a_422_saying_what_to_send(
    base_url: str, path: str, parts: list[tuple[str, str | None, bytes]], named: list[str]
) -> None:
    r = httpx.post(base_url + path, timeout=60, **multipart(*parts))
    assert r.status_code == 422 and r.headers["content-type"].startswith("application/problem+json"), show(r)
    for text in named:
        assert text in r.json()["detail"], show(r)


def test_form_fields_are_documented_and_prefill_is_author_given(spec: dict[str, Any]) -> None:
    for path, media, schema in post_bodies(spec):
        if media != "multipart/form-data":
            continue
        required = set(schema.get("required", []))
        for name, prop in schema["properties"].items():
            where = f"{path} field {name}: {prop}"
            assert prop.get("description"), where
            assert not ("example" in prop and "examples" in prop), where  # one pre-fill rule in every UI version
            flat = merged(prop)
            if flat.get("type") == "array":
                assert flat["items"] == {**flat["items"], "type": "string", "format": "binary"}, where
                # An item's pre-fill goes out as a text part when no file is picked: it must be empty.
                assert swagger_prefill(flat["items"]) == "", where
            elif not is_file(flat) and name not in required:
                assert "default" in prop or prop.get("examples"), where  # else Swagger UI makes one up
            # Swagger UI and ReDoc render descriptions as markdown: a bare `<image>` would vanish as an HTML tag.
            assert "<" not in re.sub(r"`[^`]*`", "", prop["description"]), where


def test_prompt_descriptions_show_image_tag_in_code(spec: dict[str, Any]) -> None:
    _, _, schema = next(b for b in post_bodies(spec) if b[0] == "/pdf/ocr")
    assert "`<image>\\n<|grounding|>" in schema["properties"]["prompt"]["description"], schema["properties"]["prompt"]


@pytest.mark.parametrize(
    ("path", "fields"),
    [
        ("/ocr/image/advanced", {"drawboxes": "false"}),
        ("/ocr/image/simple", {"temperature": "0.5"}),
        ("/generate_with_file", {"draw_boxes": "true", "dpi": "100"}),
    ],
)
def test_unknown_form_field_is_422_naming_it(base_url: str, path: str, fields: dict[str, str]) -> None:
    r = httpx.post(base_url + path, data=fields, files={"file": ("a.png", PNG, "image/png")}, timeout=60)
    assert r.status_code == 422 and r.headers["content-type"].startswith("application/problem+json"), show(r)
    body = r.json()
    assert body["unknown_fields"] == list(fields), show(r)
    assert "file" in body["accepted_fields"] and "prompt" in body["accepted_fields"], show(r)
    for name in fields:
        assert f"'{name}'" in body["detail"], show(r)
    assert "max_tokens" in body["detail"], show(r)


def test_unknown_field_in_sub_dependency_routes(base_url: str) -> None:
    """Fields declared by a shared dependency (PDF options, batch options) count as known; others do not."""
    ok = httpx.post(
        base_url + "/pdf/ocr",
        data={"pages": "1", "dpi": "72", "draw_layouts": "false"},
        files={"file": ("d.pdf", two_page_pdf(), "application/pdf")},
        timeout=300,
    )
    assert ok.status_code == 200, show(ok)
    bad = httpx.post(
        base_url + "/batch/ocr/simple",
        data={"clean_formulas": "true"},  # only /batch/ocr and /batch/ocr/download take it
        files=[("files", ("a.png", PNG, "image/png"))],
        timeout=60,
    )
    assert bad.status_code == 422 and bad.json()["unknown_fields"] == ["clean_formulas"], show(bad)
    assert "ngram_window" in bad.json()["accepted_fields"], show(bad)


def test_unknown_json_field_is_422_naming_it(base_url: str) -> None:
    r = httpx.post(base_url + "/generate", json={"prompt": "hi", "max_token": 5}, timeout=60)
    assert r.status_code == 422, show(r)
    body = r.json()
    assert body["unknown_fields"] == ["max_token"] and "max_tokens" in body["accepted_fields"], show(r)
    assert "'max_token'" in body["detail"] and "image_base64" in body["detail"], show(r)
    mixed = httpx.post(base_url + "/generate", json={"max_token": 5}, timeout=60)
    assert mixed.status_code == 422 and "max_tokens" in mixed.json()["detail"], show(mixed)


def pdf_base64() -> str:
    return base64.b64encode(two_page_pdf()).decode()


@pytest.mark.parametrize("path", ["/generate_with_file", "/ocr/image/advanced", "/ocr/image/simple", "/generate"])
def test_pdf_on_an_image_route_is_415_pointing_to_pdf_routes(base_url: str, path: str) -> None:
    if path == "/generate":
        r = httpx.post(base_url + path, json={"prompt": "Free OCR.", "image_base64": pdf_base64()}, timeout=60)
    else:
        r = httpx.post(base_url + path, files={"file": ("doc.pdf", two_page_pdf(), "application/pdf")}, timeout=60)
    assert r.status_code == 415, show(r)
    assert "/pdf/ocr" in r.json()["detail"] and "/jobs" in r.json()["detail"], show(r)


def test_pdf_in_a_batch_is_a_failed_entry_pointing_to_pdf_routes(base_url: str) -> None:
    files = [("files", ("a.png", PNG, "image/png")), ("files", ("doc.pdf", two_page_pdf(), "application/pdf"))]
    r = httpx.post(base_url + "/batch/ocr/simple", files=files, timeout=300)
    assert r.status_code == 200, show(r)
    text = r.text
    assert "415" in text and "/pdf/ocr" in text and "/jobs" in text, show(r)


def test_docs_file_pickers_for_file_arrays(spec: dict[str, Any]) -> None:
    for path in ("/batch/ocr", "/batch/ocr/download", "/batch/ocr/simple"):
        _, _, schema = next(b for b in post_bodies(spec) if b[0] == path)
        files = schema["properties"]["files"]
        assert files["type"] == "array" and files["items"]["format"] == "binary", files
        assert files["items"]["type"] == "string", files
