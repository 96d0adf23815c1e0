"""The jobs API's JSON documents as pydantic models, for the OpenAPI schema (the views build plain dicts)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from service.results import ITEM_STATUSES

JobStatus = Literal["queued", "running", "done", "failed", "cancelled"]
# A job page: waiting or running, one of the item statuses once finished, or cut off by a cancel.
PageStatus = Literal[("queued", "running", *ITEM_STATUSES, "cancelled")]  # type: ignore[valid-type]


class JobLinks(BaseModel):
    self: str
    events: str = Field(description="Server-Sent Events")
    result: str = Field(description="JSON shaped like /pdf/ocr (or /batch/ocr)")
    download: str = Field(description="The ZIP of /pdf/ocr/download (or /batch/ocr/download)")


class JobSummary(BaseModel):
    id: str
    kind: Literal["pdf", "batch"]
    status: JobStatus
    filename: str | None
    pages_total: int
    pages_done: int
    pages_failed: int
    created_at: str
    started_at: str | None
    finished_at: str | None
    error: str | None
    links: JobLinks


class JobPage(BaseModel):
    page: int | None = Field(None, description="PDF page number (PDF jobs)")
    index: int | None = Field(None, description="File index (batch jobs)")
    file: str | None = Field(None, description="File name (batch jobs)")
    status: PageStatus
    finish_reason: str | None
    completion_tokens: int | None
    elapsed_s: float | None
    error: str | None
    attempts: int = Field(description="Times the page was started (a crash mid-page makes 2)")
    confidence: dict[str, float | int] | None = Field(
        None, description="How sure the model was of the page: mean_logprob, min_logprob, low_share (tokens with "
        "probability under 0.5), tokens; null until it ran or where the engine scored no token")
    worker: str | None = Field(None, description="Who ran the page's last attempt: the API replica "
                               "(host:pid:random) and its engine worker (`w0 (gpu 0)`), or a Ray worker "
                               "(`ray/<node ip>/<node id>/a0`)")


class WebhookState(BaseModel):
    status: Literal["pending", "delivered", "failed"] | None
    attempts: int


class JobDetail(JobSummary):
    eta_s: float | None = Field(description="Seconds left at the pace so far, while running")
    replica: str | None = Field(None, description="The API replica running the job now (host:pid:random), "
                                "while it runs; any replica answers for it")
    webhook: WebhookState | None
    pages: list[JobPage]


class JobList(BaseModel):
    jobs: list[JobSummary]
    total: int
    limit: int
    offset: int
