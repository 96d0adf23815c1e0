"""One options model (service/options.py) -> the multipart form fields of a route.

`form_of(Model)` is a FastAPI dependency whose parameters are the model's fields as `Form(...)`: same names,
defaults, limits, descriptions and Swagger pre-fills, so `/docs` shows them and FastAPI validates them (422
problem+json naming the field, as for any form field), and an empty field (`""`, what Swagger UI sends for
an untouched box) is "not given": the default applies. The dependency returns the model, so a route reads
`options: Annotated[PdfOptions, Depends(form_of(PdfOptions))]` plus its file fields, and nothing else.
The unknown-field check (`web.deps.reject_unknown_fields`) sees these fields as the route's own.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, TypeVar

import annotated_types as at
from fastapi import Form
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from service.options import FIELD_ORDER

M = TypeVar("M", bound=BaseModel)

# The limits a model field may carry, as `Form` keyword arguments.
_LIMITS = {at.Ge: "ge", at.Gt: "gt", at.Le: "le", at.Lt: "lt", at.MinLen: "min_length", at.MaxLen: "max_length"}


def form_field(field: FieldInfo) -> Any:
    """The `Form(...)` that declares `field` as a multipart field."""
    limits: dict[str, Any] = {}
    for item in field.metadata:
        name = _LIMITS.get(type(item))
        if name is None:
            # A constraint the form layer would silently drop: refuse at import time, not at request time.
            raise TypeError(f"form_of: unsupported constraint {item!r}; add it to web.forms._LIMITS")
        limits[name] = getattr(item, name)
    extra: dict[str, Any] = {}
    if field.examples is not None:
        extra["examples"] = field.examples
    return Form(field.default, description=field.description, json_schema_extra=field.json_schema_extra,
                **extra, **limits)


def _place(name: str) -> int:
    return FIELD_ORDER.index(name) if name in FIELD_ORDER else len(FIELD_ORDER)


@functools.cache
def form_of(model: type[M]) -> Any:
    """A dependency reading `model`'s fields from the form and returning the model (cached: one per model)."""
    fields = sorted(model.model_fields.items(), key=lambda kv: _place(kv[0]))
    params = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=form_field(field), annotation=field.annotation)
        for name, field in fields
    ]

    def read(**values: Any) -> M:
        # FastAPI has validated every field against the same limits; this only assembles the model.
        return model.model_validate(values)

    read.__signature__ = inspect.Signature(params, return_annotation=model)  # type: ignore[attr-defined]
    read.__name__ = f"{model.__name__}_form"
    return read
