"""INT8 after low rank: ONNX Runtime static quantization of an exported ONNX model.

``quantize_int8(fp32_onnx, out_path, calibration)`` writes ``model.int8.onnx``:

- static quantization (activations' ranges fixed from calibration data, so no per-call
  range computation at inference), weights quantized per output channel, QDQ format
  (QuantizeLinear/DequantizeLinear pairs around each quantized op, which every ONNX
  runtime reads and ORT's CPU provider fuses into integer kernels);
- calibrated on a few hundred samples of the TRAINING split (``calibration_samples``):
  choosing the ranges on the test split would leak it, and on the validation split would
  bias the accuracy the report gives on it.

Note: the model is first run through ``quant_pre_process`` (shape inference and the
graph optimizations ORT recommends before quantizing), so Conv+BatchNorm are fused and
the quantized graph holds one quantized op per matrix product.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import TensorDataset

INT8_FILE = "model.int8.onnx"
CALIBRATION_SAMPLES = 256
CALIBRATION_BATCH = 32


class QuantizeError(RuntimeError):
    """Quantization failed; the message says at which step."""


@dataclass(frozen=True)
class QuantizeResult:
    """What :func:`quantize_int8` wrote."""

    path: Path
    bytes: int
    fp32_bytes: int
    calibration_samples: int
    per_channel: bool
    quant_format: str  # "QDQ"
    activation_type: str  # "int8" | "uint8"
    weight_type: str  # "int8"

    @property
    def size_ratio(self) -> float:
        """INT8 file size over the FP32 file's."""
        return self.bytes / self.fp32_bytes if self.fp32_bytes else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.path.name,
            "bytes": self.bytes,
            "fp32_bytes": self.fp32_bytes,
            "size_ratio": self.size_ratio,
            "calibration_samples": self.calibration_samples,
            "per_channel": self.per_channel,
            "quant_format": self.quant_format,
            "activation_type": self.activation_type,
            "weight_type": self.weight_type,
        }


def calibration_samples(train: TensorDataset, count: int = CALIBRATION_SAMPLES, seed: int = 0) -> np.ndarray:
    """``count`` inputs (float32) drawn without replacement from the training split."""
    x = train.tensors[0]
    n = int(x.shape[0])
    if n == 0:
        raise ValueError("calibration needs at least one training sample")
    take = min(count, n)
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:take]
    return np.ascontiguousarray(x[idx].detach().cpu().float().numpy(), dtype=np.float32)


class _Reader:
    """A CalibrationDataReader over ``x`` in batches (the ONNX model's batch is dynamic)."""

    def __init__(self, input_name: str, x: np.ndarray, batch: int) -> None:
        self._batches: Iterator[dict[str, np.ndarray]] = iter(
            {input_name: x[i : i + batch]} for i in range(0, len(x), batch)
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)

    def rewind(self) -> None:  # the MinMax calibrater reads once
        pass


def _input_name_and_batch(path: Path) -> tuple[str, int | None]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    inp = session.get_inputs()[0]
    return inp.name, inp.shape[0] if isinstance(inp.shape[0], int) else None


def quantize_int8(
    fp32_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    calibration: np.ndarray,
    *,
    per_channel: bool = True,
    activation_type: str = "int8",
) -> QuantizeResult:
    """Static INT8 quantization (QDQ, per-channel weights) of the ONNX model at ``fp32_path``.

    ``calibration``: float32 inputs of shape (N, *input_shape) from the training split.
    Writes ``out_path`` atomically; raises :class:`QuantizeError` when ORT cannot do it.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from core.export import atomic_path

    src, dst = Path(fp32_path), Path(out_path)
    if activation_type not in ("int8", "uint8"):
        raise ValueError(f"activation_type must be 'int8' or 'uint8', got {activation_type!r}")
    x = np.ascontiguousarray(calibration, dtype=np.float32)
    if len(x) == 0:
        raise ValueError("calibration needs at least one sample")
    name, fixed = _input_name_and_batch(src)
    batch = fixed or CALIBRATION_BATCH
    if fixed is not None:  # a static-batch model: whole batches only (pad with repeats)
        x = np.concatenate([x, np.repeat(x[-1:], (-len(x)) % fixed, axis=0)])
    with tempfile.TemporaryDirectory(prefix="lorita-int8-") as tmpdir:
        prepared = Path(tmpdir) / "prepared.onnx"
        try:
            quant_pre_process(str(src), str(prepared), skip_symbolic_shape=False)
        except Exception:
            # Note: symbolic shape inference fails on some graphs; the quantizer works
            # without the pre-processing, only slower graphs may come out.
            prepared = src
        try:
            with atomic_path(dst) as tmp:
                quantize_static(
                    str(prepared),
                    str(tmp),
                    _Reader(name, x, batch),
                    quant_format=QuantFormat.QDQ,
                    per_channel=per_channel,
                    activation_type=QuantType.QInt8 if activation_type == "int8" else QuantType.QUInt8,
                    weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax,
                    extra_options={"ActivationSymmetric": activation_type == "int8"},
                )
        except Exception as err:
            raise QuantizeError(f"INT8 quantization failed: {type(err).__name__}: {err}") from err
    return QuantizeResult(
        path=dst,
        bytes=dst.stat().st_size,
        fp32_bytes=src.stat().st_size,
        calibration_samples=len(calibration),
        per_channel=per_channel,
        quant_format="QDQ",
        activation_type=activation_type,
        weight_type="int8",
    )


@dataclass(frozen=True)
class Int8Check:
    """How the INT8 model compares with the FP32 one on the same inputs."""

    accuracy_fp32: float
    accuracy_int8: float
    agreement: float  # fraction of inputs whose top-1 class is the same in both

    def to_dict(self) -> dict[str, float]:
        return {
            "accuracy_fp32": self.accuracy_fp32,
            "accuracy_int8": self.accuracy_int8,
            "agreement": self.agreement,
        }


def compare_int8(
    fp32_path: str | os.PathLike[str], int8_path: str | os.PathLike[str], x: np.ndarray, y: np.ndarray
) -> Int8Check:
    """Accuracy of both ONNX models on ``(x, y)`` and their top-1 agreement."""
    from core.export import onnx_predict

    if len(x) == 0 or len(x) != len(y):
        raise ValueError(f"compare_int8 needs as many labels as inputs (> 0), got {len(x)} and {len(y)}")
    labels = np.asarray(y)
    top_fp32 = onnx_predict(fp32_path, x).argmax(axis=1)
    top_int8 = onnx_predict(int8_path, x).argmax(axis=1)
    return Int8Check(
        accuracy_fp32=float((top_fp32 == labels).mean()),
        accuracy_int8=float((top_int8 == labels).mean()),
        agreement=float((top_fp32 == top_int8).mean()),
    )
