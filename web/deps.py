"""FastAPI dependencies and request helpers shared by the routers.

Settings and the service come from `app.state` (never a global); the service dependency refuses work up
front when no engine is ready or too much is waiting; uploads are read under their size limit; shared form
fields are declared once; deadlines end in 504 (`service.run.deadline`); a form field no route declares is a
422, not ignored; the owner of a request (its API key's hash) is passed on explicitly.

The option fields (and their Swagger UI pre-fills) are typed once in `service/options.py` and turned into
form fields by `web/forms.py`; the file fields are declared here. Swagger UI's "Try it out": file arrays
declare `format: binary` items, which Swagger UI renders as file pickers; an item without a file goes out as
its pre-fill, a text part, and an empty array as one empty part (`files=`, even beside `file` on
`POST /jobs`). So the items carry `examples: [""]`, and `files_field` reads empty parts as absent
(tests/web/test_swagger_browser.py drives the real page).
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable, Mapping
from typing import Annotated

from fastapi import Depends, File, Request, UploadFile
from fastapi import params as params_module
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError, ValidatorFunctionWrapHandler, WrapValidator
from pydantic_core import PydanticCustomError

from config import Settings
from errors import BadRequest, PayloadTooLarge, ValidationFailed
from pdf.office import OfficeConverter
from service.ocr import OcrService
from service.options import PROMPT_MAX_CHARS  # noqa: F401  # the faces' prompt cap, typed once
from service.run import deadline as deadline  # the routes' plain deadline (504), kept in the service

_CHUNK = 1 << 20


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_service(request: Request) -> OcrService:
    """The app's service, after admission: 503 when no engine is ready or too much work is waiting."""
    service: OcrService = request.app.state.service
    service.admit()
    return service


def get_office(request: Request) -> OfficeConverter:
    return request.app.state.office


SettingsDep = Annotated[Settings, Depends(get_settings)]
ServiceDep = Annotated[OcrService, Depends(get_service)]
OfficeDep = Annotated[OfficeConverter, Depends(get_office)]  # office files -> PDF on the PDF routes and jobs

def file_field(description: str) -> object:
    return File(description=description, json_schema_extra={"format": "binary"})


def files_field(description: str) -> object:
    """A repeated file field; items `format: binary` so Swagger UI shows file pickers, not text boxes.

    An item's pre-fill is empty, not Swagger UI's made-up `string`; empty parts are dropped (see
    `_drop_empty_parts`). A browser's file input with nothing picked (no name, no bytes) FastAPI drops
    itself (tests/web/test_swagger_forms.py checks both).
    """
    binary = {"type": "string", "format": "binary", "contentMediaType": "application/octet-stream", "examples": [""]}
    field = File(description=description, json_schema_extra={"items": binary})
    field.metadata.append(WrapValidator(_drop_empty_parts))  # File() takes no validator; pydantic runs these
    return field


def _drop_empty_parts(value: object, handler: ValidatorFunctionWrapHandler) -> object:
    """The parts without the empty text ones (`files=`); none left is the field absent, as FastAPI reads one
    empty part of a single field: the default, or "Field required"."""
    if not isinstance(value, list) or "" not in value:
        return handler(value)
    parts = [part for part in value if part != ""]
    if parts:
        return handler(parts)
    try:
        return handler(None)  # an optional field: absent
    except ValidationError:
        raise PydanticCustomError("missing", "Field required") from None


def _body_fields(dependant: Dependant) -> list[str]:
    """Names of the body fields a route reads, its dependencies' included, in declaration order."""
    names = [p.alias for p in dependant.body_params]
    for sub in dependant.dependencies:
        names += [n for n in _body_fields(sub) if n not in names]
    return names


def accepted_fields(route: object) -> list[str]:
    """The body fields `route` accepts: form field names, or the fields of its JSON body model."""
    if not isinstance(route, APIRoute):
        return []
    names = _body_fields(route.dependant)
    params = route.dependant.body_params
    if len(names) == 1 and len(params) == 1 and not isinstance(params[0].field_info, params_module.Form):
        model = params[0].field_info.annotation
        if isinstance(model, type) and issubclass(model, BaseModel):  # a JSON body: its model's fields
            return [f.alias or name for name, f in model.model_fields.items()]
    return names


def unknown_field_error(unknown: list[str], accepted: list[str], where: str = "form") -> ValidationFailed:
    names = ", ".join(f"'{n}'" for n in unknown)
    return ValidationFailed(
        f"unknown {where} field{'s' if len(unknown) > 1 else ''} {names}; this route accepts: "
        f"{', '.join(accepted) or 'no fields'}. Check the spelling (see /docs)",
        errors=[{"field": n, "msg": "unknown field"} for n in unknown],
        unknown_fields=unknown,
        accepted_fields=accepted,
    )


async def reject_unknown_fields(request: Request) -> None:
    """422 for a form field the route does not declare: a typo (`drawboxes`) must not be silently ignored.

    Added to every router's routes; FastAPI has already parsed (and cached) the form when it runs.
    """
    ctype = request.headers.get("content-type", "")
    if not ctype.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        return
    accepted = accepted_fields(request.scope.get("route"))
    if not accepted:  # a route without a body (GET /status): nothing to compare with
        return
    form = await request.form()
    unknown = list(dict.fromkeys(k for k in form if k not in accepted))
    if unknown:
        raise unknown_field_error(unknown, accepted)


KnownFieldsOnly = Depends(reject_unknown_fields)


async def read_upload(file: UploadFile, settings: Settings, *, what: str = "file") -> bytes:
    """The upload's bytes, refused with 413 as soon as they pass MAX_UPLOAD_MB; 400 when empty.

    Starlette has the upload on disk already (spooled past 1 MB); it is read when its item runs, in one
    allocation when its size is known (chunks joined would hold it twice while joining).
    """
    limit = settings.max_upload_bytes
    if file.size is not None and file.size > limit:
        raise _too_large(what, file.filename, file.size, settings)
    if file.size:
        data = await file.read(limit + 1)
        if len(data) > limit:
            raise _too_large(what, file.filename, len(data), settings)
        return data
    parts, total = [], 0
    while chunk := await file.read(_CHUNK):
        total += len(chunk)
        if total > limit:
            raise _too_large(what, file.filename, total, settings)
        parts.append(chunk)
    if total == 0:
        raise BadRequest(f"the {what} {file.filename or ''!s} is empty (0 bytes); send an image or PDF file")
    return b"".join(parts)


def _too_large(what: str, name: str | None, size: int, settings: Settings) -> PayloadTooLarge:
    shown = "more than" if size <= settings.max_upload_bytes + _CHUNK else "at least"
    return PayloadTooLarge(
        f"the {what} {name or ''} is {shown} {size / 1048576:.1f} MB; the limit is "
        f"MAX_UPLOAD_MB={settings.max_upload_mb:g}",
        limit_bytes=settings.max_upload_bytes,
    )


def upload_reader(file: UploadFile, settings: Settings) -> Callable[[], Awaitable[bytes]]:
    """`read_upload` from the start each time it is called: the deadline handoff reads a file again."""

    async def read() -> bytes:
        await file.seek(0)
        return await read_upload(file, settings)

    return read


def owner_of(settings: Settings, headers: Mapping[str, str]) -> str:
    """Who sent a request (their jobs are theirs): a hash of the API key sent (keys are never stored); ''
    when the server has no keys."""
    if not settings.api_keys:
        return ""
    given = headers.get("x-api-key", "")
    auth = headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        given = auth[7:].strip()
    return hashlib.sha256(given.encode()).hexdigest()


def request_owner(request: Request) -> str:
    return owner_of(request.app.state.settings, request.headers)


OwnerDep = Annotated[str, Depends(request_owner)]
