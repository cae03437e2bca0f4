"""Request and response schemas, one family per resource (``XCreate``, ``XRead``, ``XsRead``)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from core.progress import Stage
from store.status import JobStatus


class _Read(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class ModelRead(_Read):
    id: str
    name: str
    kind: str = Field(
        default="weights",
        description="'weights' (an architecture's weights; use in model.weights) or 'program' (a "
        "torch.export program; use in model.program).",
    )
    arch: str = Field(description="The architecture; 'program' for a program (its graph is in the file).")
    num_classes: int
    input_shape: list[int]
    options: dict[str, Any]
    filename: str = Field(description="The uploaded file's name, for display.")
    size_bytes: int
    sha256: str
    created_at: datetime


class ModelsRead(BaseModel):
    data: list[ModelRead]
    count: int


class ImageSizeRead(BaseModel):
    size: str = Field(description="Width x height in pixels, e.g. '32x32'.")
    example: str = Field(description="The first image of this size in the archive.")


class DatasetRead(_Read):
    id: str
    name: str
    kind: str = Field(description="'npz' or 'imagefolder'.")
    num_classes: int
    input_shape: list[int] = Field(description="An ImageFolder's: 3 x the first image's height x width.")
    image_sizes: list[ImageSizeRead] | None = Field(
        default=None,
        description="ImageFolder: the distinct image sizes found (at most 3 listed). More than one: a job "
        "must set dataset.image_size, which resizes them all.",
    )
    n_train: int
    n_test: int = Field(description="Held-out test samples (a flat ImageFolder tree keeps 20% aside).")
    size_bytes: int = Field(description="Size of the uploaded file.")
    sha256: str = Field(description="sha256 of the uploaded file.")
    created_at: datetime


class BuiltinDatasetRead(BaseModel):
    name: str
    description: str
    availability: str
    use: dict[str, Any] = Field(description="The `dataset` value to put in a job config.")


class DatasetsRead(BaseModel):
    data: list[DatasetRead] = Field(description="This tenant's uploads, newest first.")
    count: int
    builtins: list[BuiltinDatasetRead]


class ResultSummary(_Read):
    params_before: int | None
    params_after: int | None
    flops_before: int | None
    flops_after: int | None
    val_accuracy_before: float | None
    val_accuracy_after: float | None
    test_accuracy_before: float | None
    test_accuracy_after: float | None
    latency_ms: dict[str, dict[str, float | None]] = Field(
        default_factory=dict, description='{"<batch size>": {"before": ms, "after": ms}} as measured.'
    )
    params_ratio: float | None = Field(
        default=None, description="params_after / params_before, from the report."
    )
    flops_ratio: float | None = Field(
        default=None, description="flops_after / flops_before, from the report."
    )


class JobRead(_Read):
    id: str
    name: str | None
    parent_id: str | None = Field(
        default=None, description="Set on a derived job (POST /v1/jobs/{id}/select): the job it starts from."
    )
    status: JobStatus
    stage: Stage | None = Field(description="The pipeline stage the job is in (or ended in).")
    progress: float = Field(description="Whole-job progress, 0..1.")
    epoch: int | None
    epochs: int | None
    metrics: dict[str, Any] = Field(description="Latest figures, e.g. loss and val_accuracy.")
    eta_seconds: float | None
    attempt: int
    max_attempts: int
    cancel_requested: bool
    error: str | None
    config: dict[str, Any]
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime
    result: ResultSummary | None = Field(default=None, description="Set once the job succeeded.")


class JobsRead(BaseModel):
    data: list[JobRead]
    count: int = Field(description="Jobs matching the filter, over all pages.")


class JobEventRead(_Read):
    id: int
    attempt: int
    created_at: datetime
    stage: Stage
    progress: float
    epoch: int | None
    loss: float | None
    val_accuracy: float | None
    message: str


class JobEventsRead(BaseModel):
    data: list[JobEventRead]
    count: int


class ArtifactRead(BaseModel):
    name: str
    size_bytes: int
    sha256: str
    url: str
    created_at: datetime


class ArtifactsRead(BaseModel):
    data: list[ArtifactRead]
    count: int


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    status: str
    checks: dict[str, str]
