"""A job's spec, typed: the options it was submitted with (the same `JobOptions` model `POST /jobs` reads)
and what the job adds (its inputs' names and the request as admission bound it).

Written as JSON into the job row by `POST /jobs` and by the sync routes' deadline handoff, read back with
`JobSpec.load` by the runner, the views and the routes. Rows written before the spec was typed (a flat dict:
`prompt`, `mode`, `dpi`, ... beside `filenames`, `mode_name`, `model`) still load: they are converted on
read, so a job store kept across the upgrade keeps running its jobs. A spec that is neither is refused with
`JobSpecUnreadable` (409), naming the job and what is wrong, never a bare KeyError.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from config import Settings
from errors import OcrError
from service.options import JobOptions, Options
from service.postprocess import PostOptions
from service.request import OcrRequest

# The keys of a pre-typed spec that were form options (they move into `options`).
_LEGACY_OPTIONS = ("prompt", "mode", "max_tokens", "dpi", "pages", "password", "draw_layouts", "extract_images",
                   "clean_formulas")


class JobSpecUnreadable(OcrError):
    status, slug, title = 409, "job-spec-unreadable", "The job's stored options cannot be read"


class JobSpec(BaseModel):
    """Everything a job's pages run with, besides the input bytes and the page rows."""

    model_config = ConfigDict(extra="forbid")

    version: Literal[2] = 2
    kind: Literal["pdf", "batch"]
    options: JobOptions = Field(description="The options as submitted (for a handoff: the sync route's)")
    # The request as admission bound it, so that a page run later (or on another replica) runs the same way.
    default_prompt: str = Field(description="The prompt used when `options.prompt` is empty")
    prompt_text: str = Field(description="The prompt the model sees")
    mode_name: str
    ngram: tuple[int, int] = Field(description="The n-gram guard (size, window) the pages run with")
    bound_model: str | None = Field(None, description="The model admission bound the job to")
    # What the job adds.
    filenames: list[str]
    stems: list[str] = Field(description="Safe, unique member names of the inputs (batch ZIP entries)")
    stem: str = Field(description="The download's name (PDF jobs)")
    warnings: list[str] = Field(default_factory=list, description="The PDF's warnings as /pdf/ocr reports them")

    @model_validator(mode="before")
    @classmethod
    def _upgrade(cls, data: Any) -> Any:
        """A pre-typed row (a flat dict: no `version`, no `options`) becomes a version-2 spec."""
        if not isinstance(data, dict) or "version" in data or "options" in data:
            return data
        old = dict(data)
        options = {k: old.pop(k) for k in _LEGACY_OPTIONS if k in old}
        ngram = old.pop("ngram", None)
        if ngram is not None:  # stored bound: the same numbers as sent or as defaulted
            options.update(ngram_size=ngram[0], ngram_window=ngram[1])
        bound = old.pop("model", None)
        options["model"] = bound
        return {"version": 2, **old, "options": options, "ngram": ngram, "bound_model": bound}

    @classmethod
    def load(cls, text: str | bytes, job_id: str = "") -> JobSpec:
        try:
            return cls.model_validate_json(text)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'spec'}: {e['msg']}" for e in exc.errors()[:5])
            raise JobSpecUnreadable(
                f"job {job_id or '?'}: its stored spec does not match this server's JobSpec ({problems}); "
                "it was written by another version. Submit the job again",
                job_id=job_id or None,
            ) from None

    def dump(self) -> str:
        return self.model_dump_json()

    @classmethod
    def of_request(
        cls,
        kind: Literal["pdf", "batch"],
        options: Options,
        req: OcrRequest,
        post: PostOptions,
        *,
        filenames: list[str],
        stems: list[str],
        stem: str = "document",
        warnings: list[str] | None = None,
    ) -> JobSpec:
        """The spec of a job taking over a sync request (`/pdf/ocr*`, `/batch/ocr*`): that route's options
        (the post-processing it asked for included) and its request as admitted."""
        fields = {name: getattr(options, name) for name in JobOptions.model_fields if hasattr(options, name)}
        fields.update(draw_layouts=post.draw, extract_images=post.crop, clean_formulas=post.clean_formulas)
        return cls.admitted(kind, JobOptions(**fields), req, filenames=filenames, stems=stems, stem=stem,
                            warnings=warnings, default_prompt=req.prompt)

    @classmethod
    def admitted(
        cls,
        kind: Literal["pdf", "batch"],
        options: JobOptions,
        req: OcrRequest,
        *,
        filenames: list[str],
        stems: list[str],
        stem: str,
        warnings: list[str] | None = None,
        default_prompt: str | None = None,
    ) -> JobSpec:
        """The spec of `options` admitted as `req` (`POST /jobs`, or `of_request`)."""
        return cls(
            kind=kind, options=options, default_prompt=default_prompt or options.default_prompt,
            prompt_text=req.prompt, mode_name=req.mode.name, ngram=(req.sampling.ngram_size, req.sampling.ngram_window),
            bound_model=req.model, filenames=filenames, stems=stems, stem=stem, warnings=list(warnings or []),
        )

    def request(self, settings: Settings) -> OcrRequest:
        """The request the job was admitted with: its model, mode and n-gram guard as they were bound then."""
        o = self.options
        return OcrRequest.build(settings, prompt=o.prompt, default_prompt=self.default_prompt, mode=self.mode_name,
                                max_tokens=o.max_tokens, ngram=self.ngram, model=self.bound_model, kind=self.kind)

    def post(self) -> PostOptions:
        o = self.options
        if self.kind == "pdf":
            return PostOptions(draw=o.draw_layouts, annotated_format="jpeg", crop=o.extract_images)
        return PostOptions(crop=o.extract_images, clean_formulas=o.clean_formulas)

    def without_password(self) -> JobSpec:
        """The spec kept after the job ends: the PDF's password is no longer needed."""
        return self.model_copy(update={"options": self.options.model_copy(update={"password": None})})
