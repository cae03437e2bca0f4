"""The job report: every figure a job measured, as typed, versioned models.

``report.json`` is ``JobReport.model_dump_json(indent=2)``; every reader (the store's result row,
the API, the CLI, ``lorita select``, the tests) goes through :meth:`JobReport.model_validate` or
:func:`read_report`. ``GET /v1/schemas/report`` serves :func:`report_schema`.

Imports pydantic and the stdlib only (never torch): the store and the API read reports without
loading the compression library.

Extending the report: add an *optional* field with a default (``x: T | None = None``) to the
part it belongs to, so every report written before still validates; bump
:data:`SCHEMA_VERSION` only for a change an old reader would misread (a renamed or retyped
field). Unknown fields are rejected (``extra="forbid"``) so a typo in a writer fails its tests.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from core.speed_report import Int8Info, LatencySearch, Rounding, SpeedSummary

SCHEMA_VERSION = 1
REPORT_FILE = "report.json"


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid", from_attributes=True)


# ---------------------------------------------------------------------------------------
# Before / after figures
# ---------------------------------------------------------------------------------------


def _ratio(before: float | None, after: float | None) -> float | None:
    return after / before if before and after is not None else None


class CountChange(_Part):
    """A count (parameters, FLOPs, bytes) of the model before and after compression."""

    before: int
    after: int
    ratio: float | None = Field(description="after / before (None when before is 0).")

    @classmethod
    def of(cls, before: int, after: int) -> CountChange:
        return cls(before=before, after=after, ratio=_ratio(before, after))


class AccuracyChange(_Part):
    before: float | None = Field(description="Accuracy of the dense (collapsed) model, 0..1.")
    after: float | None = Field(description="Accuracy of the compressed model, 0..1.")


class Accuracy(_Part):
    val: AccuracyChange = Field(description="On the validation split every choice was made on.")
    test: AccuracyChange = Field(description="On the test split, evaluated once at the end.")


class LatencyChange(_Part):
    """Median milliseconds of one forward pass at one batch size."""

    before: float
    after: float
    ratio: float | None = None

    @classmethod
    def of(cls, before: float, after: float) -> LatencyChange:
        return cls(before=before, after=after, ratio=_ratio(before, after))


# ---------------------------------------------------------------------------------------
# Per layer
# ---------------------------------------------------------------------------------------


class LayerRank(_Part):
    """One matrix-shaped weight of the model: what LoRITa and the truncation did with it, and why.

    Keyed by the layer's module name in :attr:`JobReport.ranks`. Every Linear / Conv2d /
    attention weight of the model has a row, so a layer left alone says why (``reason``).
    """

    kind: str = Field(description="linear | conv | attention_in | attention_qkv | ...")
    shape: list[int] = Field(description="The [m, n] matrix the weight is seen as (conv: out x in*kh*kw).")
    full_rank: int = Field(description="min(m, n).")
    kept_rank: int = Field(description="Rank of the compressed layer (full_rank when left dense).")
    factorized: bool = Field(description="Replaced by a thin pair of rank kept_rank.")
    composed: bool | None = Field(
        default=None,
        description="Trained by LoRITa as a product of factors (None: this job did not train).",
    )
    reason: str | None = Field(
        default=None,
        description="Why the layer was not factorized (None when it was): the chosen rank, a thin "
        "pair that would not save parameters, a layer kind the truncation leaves alone.",
    )
    compose_reason: str | None = Field(
        default=None,
        description="Why LoRITa did not compose the weight (grouped convolution, excluded by the "
        "patterns, too small); None when it was composed or the job did not train.",
    )
    warning: str | None = Field(
        default=None,
        description="A choice a person should know about, e.g. the classifier truncated below the "
        "number of classes.",
    )
    uses: int | None = Field(
        default=None,
        description="Programs: how many ops of the graph read the weight (more than 1: tied, composed "
        "and truncated once for every use, or left dense with the reason).",
    )


# ---------------------------------------------------------------------------------------
# The rank search
# ---------------------------------------------------------------------------------------


class SearchPoint(_Part):
    """One rank setting the search evaluated on the validation split (a point of the Pareto curve)."""

    stage: str = Field(
        description="reference (dense) | bisection | refine | start | variant | probe | none | uniform | "
        "global | energy | ranks: the step of the policy that proposed it (probe: one layer truncated alone "
        "to measure its sensitivity, compress.allocation 'sensitivity'; ranks: the ranks policy's one point)."
    )
    params: int
    flops: int
    params_fraction: float = Field(description="params / the dense model's params.")
    flops_fraction: float = Field(description="flops / the dense model's flops.")
    val_accuracy: float
    ranks: dict[str, int] = Field(description="Effective rank per layer (full rank when left dense).")
    evaluation: int = Field(description="1-based order of the evaluation.")
    chosen: bool
    within_budget: bool | None = Field(default=None, description="Budget policies: the point fits.")
    threshold: float | None = Field(default=None, description="Global threshold on normalized values.")
    step: int | None = Field(default=None, description="Refinement / variant step number.")
    layer: str | None = Field(default=None, description="The layer a refinement / variant step moved.")
    weight: float | None = Field(default=None, description="Variant: the weight applied to that layer.")


class SearchInfo(_Part):
    evaluations: int = Field(description="Validation evaluations the policy made.")


# ---------------------------------------------------------------------------------------
# Stages: data, training, fine-tuning, exports
# ---------------------------------------------------------------------------------------


class DatasetInfo(_Part):
    name: str
    num_classes: int
    input_shape: list[int]
    n_train: int
    n_val: int
    n_test: int


class EpochRecord(_Part):
    epoch: int
    loss: float | None
    val_accuracy: float
    lr: float
    seconds: float


class TrainingInfo(_Part):
    factors: int | None = Field(description="N of LoRITa; None when the job did not train.")
    composed: list[str] = Field(default_factory=list, description="Weights trained as products.")
    layer_space: list[str] = Field(
        default_factory=list, description="Modules composed as a chain of layers (composition 'auto')."
    )
    skipped: dict[str, str] = Field(default_factory=dict, description="Weight -> why it was not composed.")
    history: list[EpochRecord] = Field(default_factory=list)
    resumed_from_epoch: int | None = None
    norm_mode: str | None = Field(
        default=None,
        description="Programs: how batch norm and dropout trained, as the program was exported "
        "(train mode: batch statistics; eval mode: frozen statistics).",
    )
    given_val_accuracy: float | None = Field(
        default=None,
        description="Validation accuracy of the model as given (model.weights, or a program's own "
        "weights), before LoRITa training; None when the job trained from scratch.",
    )
    given_test_accuracy: float | None = Field(
        default=None,
        description="Test accuracy of the model as given, before LoRITa training (a figure only: "
        "no choice is made on it); None when the job trained from scratch.",
    )


class FinetuneInfo(_Part):
    history: list[EpochRecord] = Field(default_factory=list)
    val_accuracy_before: float
    val_accuracy_after: float | None = Field(description="None when the fine-tune diverged.")
    kept: bool = Field(description="The fine-tuned model replaced the untuned one (never worse on val).")
    error: str | None = None


class ExportFile(_Part):
    """One exported file and its output parity against the PyTorch model."""

    file: str
    bytes: int
    max_abs_diff: float | None = Field(description="Largest |output - PyTorch output| on an example batch.")
    dynamic_batch: bool | None = Field(default=None, description="pt2 / onnx: any batch size is accepted.")


class PlotFile(_Part):
    file: str
    bytes: int


# ---------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------


class JobReport(_Part):
    """report.json: what a job did and measured. See the module docstring for how it evolves."""

    schema_version: int = Field(default=SCHEMA_VERSION, description="Version of this report format.")
    name: str | None = None
    config: dict[str, Any] = Field(description="The job config as it ran (see the job config schema).")
    dataset: DatasetInfo
    params: CountChange
    flops: CountChange = Field(description="FLOPs (2 x multiply-adds) of one forward pass at batch 1.")
    accuracy: Accuracy
    latency_ms: dict[str, LatencyChange] = Field(
        default_factory=dict,
        description="Per batch size (as a string) of measure.batch_sizes; empty when latency is off.",
    )
    size_bytes: CountChange | None = Field(
        default=None, description="model.safetensors of the dense model vs. of the compressed one."
    )
    ranks: dict[str, LayerRank] = Field(description="Per layer (module name), in model order.")
    pareto: list[SearchPoint] = Field(description="Every rank setting evaluated, in order.")
    search: SearchInfo
    training: TrainingInfo | None = None
    finetune: FinetuneInfo | None = None
    files: dict[str, ExportFile] = Field(description="Per export format: the file and its parity.")
    plots: dict[str, PlotFile] = Field(default_factory=dict)
    timings: dict[str, float] = Field(description="Seconds per stage.")
    device: str
    versions: dict[str, str] = Field(description="torch, torchvision, python.")
    selected_from: str | None = Field(
        default=None, description="lorita select: the job directory this point was chosen from."
    )
    summary: SpeedSummary | None = Field(
        default=None, description="Dense / compressed / compressed INT8 side by side, as deployed."
    )
    int8: Int8Info | None = Field(default=None, description="model.int8.onnx (export format onnx_int8).")
    latency_search: LatencySearch | None = Field(
        default=None, description="latency_budget: the lookup table's prediction and the measurement."
    )
    rounding: Rounding | None = Field(default=None, description="compress.round_to as applied.")
    warnings: list[str] = Field(
        default_factory=list,
        description="What to know about this result before using it, with what to change (e.g. "
        "LoRITa training left the model less accurate than it was given).",
    )

    @property
    def chosen(self) -> SearchPoint | None:
        return next((p for p in self.pareto if p.chosen), None)

    @property
    def reference(self) -> SearchPoint | None:
        """The dense model's point (the first evaluation of every policy)."""
        return next((p for p in self.pareto if p.stage == "reference"), None)

    @property
    def policy(self) -> str:
        compress = self.config.get("compress")
        return str(compress.get("policy", "?")) if isinstance(compress, dict) else "?"

    def latency_by_batch(self) -> dict[str, dict[str, float]]:
        """``{"<batch>": {"before": ms, "after": ms}}`` for every measured batch size."""
        return {b: {"before": v.before, "after": v.after} for b, v in self.latency_ms.items()}

    def write(self, path: str | Path) -> Path:
        """Write atomically (a temporary file renamed over ``path``)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(self.model_dump_json(indent=2) + "\n")
        tmp.replace(path)
        return path


class ReportError(ValueError):
    """A report.json that cannot be read as a :class:`JobReport`; the message says why."""


def _first_problems(err: ValidationError, limit: int = 3) -> str:
    parts = []
    for e in err.errors()[:limit]:
        where = ".".join(str(p) for p in e["loc"]) or "report"
        parts.append(f"{where}: {e['msg']}")
    more = err.error_count() - limit
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


def parse_report(data: Any) -> JobReport:
    """A :class:`JobReport` from decoded JSON; ReportError naming the first problems."""
    if isinstance(data, dict):
        version = data.get("schema_version")
        if isinstance(version, int) and version > SCHEMA_VERSION:
            raise ReportError(
                f"the report has schema_version {version}; this version of lorita reads up to "
                f"{SCHEMA_VERSION}: upgrade lorita"
            )
    try:
        return JobReport.model_validate(data)
    except ValidationError as err:
        raise ReportError(
            f"not a lorita job report (schema {SCHEMA_VERSION}): {_first_problems(err)}"
        ) from None


def read_report(path: str | Path) -> JobReport:
    """The report at ``path`` (a report.json, or a job's output directory holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / REPORT_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ReportError(f"{path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ReportError(f"{path} is not valid JSON: {err}") from None
    return parse_report(data)


def report_schema() -> dict[str, Any]:
    """The JSON Schema of report.json (what ``GET /v1/schemas/report`` serves)."""
    return JobReport.model_json_schema()
