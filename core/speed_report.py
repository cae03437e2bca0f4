"""The report's parts about speed and deployment (issue 9): optional fields of ``JobReport``.

Pydantic and the stdlib only (the store and the API read reports without torch), like
:mod:`core.report`, which holds these as optional fields so older reports still validate.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class _Part(BaseModel):
    model_config = ConfigDict(extra="forbid", from_attributes=True)


class SpeedRow(_Part):
    """One deployed variant: dense, compressed or compressed INT8."""

    params: int
    flops: int = Field(description="FLOPs (2 x multiply-adds) at batch 1; INT8 does the same operations.")
    file: str | None = Field(description="The file measured (an ONNX export), None when not exported.")
    bytes: int | None = Field(description="Its size on disk.")
    latency_ms: dict[str, float] = Field(
        default_factory=dict, description="Median ms per batch size (a string), interleaved with the others."
    )
    fastest_ms: dict[str, float] = Field(
        default_factory=dict,
        description="The fastest repeat per batch size: the stable figure when the machine is shared.",
    )
    runtime: str | None = Field(description="onnxruntime (CPU) or torch (the worker's device).")
    val_accuracy: float | None = None
    test_accuracy: float | None = None


class SpeedSummary(_Part):
    """Dense / compressed / compressed INT8 side by side, on the runtime measured."""

    runtime: str
    threads: int
    repeats: int
    rows: dict[str, SpeedRow] = Field(description="'dense', 'compressed' and, when exported, 'int8'.")
    warnings: list[str] = Field(
        default_factory=list, description="A variant slower than dense at some batch size (fastest runs)."
    )


class Int8Info(_Part):
    """model.int8.onnx: static quantization of the compressed model (QDQ, per-channel weights)."""

    file: str | None = Field(description="model.int8.onnx; None when quantization failed.")
    error: str | None = None
    bytes: int | None = None
    fp32_bytes: int | None = Field(default=None, description="model.onnx (FP32 compressed).")
    size_ratio: float | None = Field(default=None, description="bytes / fp32_bytes.")
    calibration_samples: int | None = Field(
        default=None, description="Training samples the ranges came from."
    )
    per_channel: bool | None = None
    quant_format: str | None = None
    activation_type: str | None = None
    weight_type: str | None = None
    val_accuracy: float | None = None
    test_accuracy: float | None = None
    fp32_val_accuracy: float | None = None
    fp32_test_accuracy: float | None = None
    agreement: float | None = Field(
        default=None, description="Top-1 agreement with the FP32 compressed model on validation."
    )
    max_drop: float | None = Field(default=None, description="Validation accuracy INT8 may lose.")
    max_drop_source: str | None = None
    within_budget: bool
    main_artifact: str = Field(description="model.int8.onnx when within budget, else the FP32 file.")
    message: str | None = Field(default=None, description="Why FP32 stays the main artifact.")


class LatencySearch(_Part):
    """What the latency_budget policy predicted (lookup table) and measured (whole model)."""

    budget: float
    runtime: str
    batch_size: int
    threads: int
    round_to: int
    dense_ms: float = Field(description="The dense model measured whole (fastest of repeats).")
    limit_ms: float = Field(description="budget x dense_ms.")
    predicted_ms: float | None = None
    measured_ms: float | None = Field(default=None, description="The chosen model, measured whole.")
    measured_dense_ms: float | None = Field(default=None, description="The dense model, in the same run.")
    measured_fraction: float | None = Field(default=None, description="measured_ms / measured_dense_ms.")
    met: bool
    slow_layers: list[str] = Field(
        default_factory=list,
        description="Layers whose thin pair was slower than dense at every rank measured.",
    )
    reasons: dict[str, str] = Field(
        default_factory=dict, description="Layer -> why it stayed dense for time."
    )
    confirmations: list[dict[str, Any]] = Field(
        default_factory=list, description="Each whole-model measurement."
    )
    table: dict[str, Any] = Field(default_factory=dict, description="The per-layer lookup table.")


class Rounding(_Part):
    """compress.round_to as applied."""

    round_to: int
    source: str = Field(description="compress.round_to, or the per-device default and why.")
    applied: str = Field(description="To every candidate (latency_budget) or to the chosen point.")
    changed: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="Layer -> {rank, rounded, how} where rounding moved a rank."
    )
