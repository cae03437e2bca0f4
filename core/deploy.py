"""What a user deploys: the INT8 stage and the dense / compressed / INT8 summary of a job.

``int8_stage`` quantizes the compressed model's ONNX file (:mod:`core.quantize`), checks it
on the validation split against the FP32 compressed model (top-1 agreement, accuracy) and
against the job's accuracy budget, and evaluates it once on the test split.

``speed_summary`` measures the variants side by side on the runtime the job asked for
(interleaved repeats, median; :mod:`core.latency`): per variant params, FLOPs, file size,
latency at each batch size, accuracy. INT8 models run on ONNX Runtime only, so with the
``torch`` runtime the INT8 row is measured on ONNX Runtime (its row says so).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

from core.latency import Runtime, measure_latency
from core.quantize import INT8_FILE, QuantizeError, calibration_samples, compare_int8, quantize_int8

# When the job's policy has no accuracy budget, INT8 may lose at most this much (absolute).
DEFAULT_INT8_MAX_DROP = 0.01


def int8_accuracy_budget(policy: Any) -> tuple[float, str]:
    """The absolute validation-accuracy drop INT8 may cost, and where it comes from.

    The job's ``accuracy_budget`` (``max_drop``; ``max_rel_drop`` is applied to the FP32
    model's accuracy by the caller) or, for every other policy, one point.
    """
    max_drop = getattr(policy, "max_drop", None)
    if isinstance(max_drop, float | int):
        return float(max_drop), "compress.max_drop"
    return DEFAULT_INT8_MAX_DROP, "default (the policy has no accuracy budget)"


def _xy(data: TensorDataset) -> tuple[np.ndarray, np.ndarray]:
    x, y = data.tensors
    return x.detach().cpu().float().numpy(), y.detach().cpu().numpy()


def int8_stage(
    fp32_onnx: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    train: TensorDataset,
    val: TensorDataset,
    test: TensorDataset,
    *,
    policy: Any = None,
    calibration: int = 256,
    seed: int = 0,
) -> dict[str, Any]:
    """Write ``model.int8.onnx`` next to the FP32 export; the report's ``int8`` part.

    Keys: ``file``, ``bytes``, ``fp32_bytes``, ``size_ratio``, ``calibration_samples``,
    ``per_channel``, ``quant_format``, ``val_accuracy``, ``test_accuracy``,
    ``fp32_val_accuracy``, ``fp32_test_accuracy``, ``agreement`` (top-1, validation, with
    the FP32 compressed model), ``max_drop`` / ``max_drop_source``, ``within_budget``,
    ``main_artifact`` and a ``message`` when INT8 loses more than the budget.
    """
    out = Path(out_dir) / INT8_FILE
    try:
        result = quantize_int8(fp32_onnx, out, calibration_samples(train, calibration, seed))
    except QuantizeError as err:
        return {
            "file": None,
            "error": str(err),
            "within_budget": False,
            "main_artifact": Path(fp32_onnx).name,
        }
    x_val, y_val = _xy(val)
    x_test, y_test = _xy(test)
    on_val = compare_int8(fp32_onnx, out, x_val, y_val)
    on_test = compare_int8(fp32_onnx, out, x_test, y_test)  # once, after every choice
    max_drop, source = int8_accuracy_budget(policy)
    rel = getattr(policy, "max_rel_drop", None)
    if isinstance(rel, float | int):
        max_drop, source = float(rel) * on_val.accuracy_fp32, "compress.max_rel_drop"
    drop = on_val.accuracy_fp32 - on_val.accuracy_int8
    within = drop <= max_drop + 1e-9
    info: dict[str, Any] = {
        **result.to_dict(),
        "val_accuracy": on_val.accuracy_int8,
        "test_accuracy": on_test.accuracy_int8,
        "fp32_val_accuracy": on_val.accuracy_fp32,
        "fp32_test_accuracy": on_test.accuracy_fp32,
        "agreement": on_val.agreement,
        "max_drop": max_drop,
        "max_drop_source": source,
        "within_budget": within,
        "main_artifact": INT8_FILE if within else Path(fp32_onnx).name,
        "message": None,
    }
    if not within:
        info["message"] = (
            f"INT8 loses {drop:.2%} of validation accuracy ({on_val.accuracy_int8:.4f} vs "
            f"{on_val.accuracy_fp32:.4f} in FP32), more than the job's budget of {max_drop:.2%} "
            f"({source}); the FP32 model stays the main artifact"
        )
    return info


@dataclass
class Variant:
    """One model of the summary: the module (for FLOPs / torch timing) and its deployed file."""

    params: int
    flops: int
    file: Path | None
    val_accuracy: float | None
    test_accuracy: float | None
    module: nn.Module | None = None


def speed_summary(
    variants: Mapping[str, Variant],
    input_shape: Sequence[int],
    batch_sizes: Sequence[int],
    *,
    runtime: Runtime = "onnxruntime",
    threads: int = 1,
    repeats: int = 20,
    device: torch.device | None = None,
    latency: bool = True,
) -> dict[str, Any]:
    """``{"runtime", "threads", "repeats", "rows": {name: row}}``, each row: ``params``,
    ``flops``, ``file``, ``bytes``, ``latency_ms`` (per batch size, a string key),
    ``runtime``, ``val_accuracy``, ``test_accuracy``.

    Files are timed on ONNX Runtime, modules on torch (``runtime``); variants without what
    the runtime needs fall back to the other (an INT8 file under ``torch``).
    """
    rows: dict[str, dict[str, Any]] = {}
    ort_models: dict[str, str] = {}
    torch_models: dict[str, nn.Module] = {}
    for name, v in variants.items():
        use_torch = runtime == "torch" and v.module is not None
        if use_torch:
            assert v.module is not None
            torch_models[name] = copy.deepcopy(v.module).eval()
        elif v.file is not None:
            ort_models[name] = str(v.file)
        rows[name] = {
            "params": v.params,
            "flops": v.flops,
            "file": v.file.name if v.file is not None else None,
            "bytes": v.file.stat().st_size if v.file is not None and v.file.exists() else None,
            "latency_ms": {},
            "runtime": "torch" if use_torch else ("onnxruntime" if v.file is not None else None),
            "val_accuracy": v.val_accuracy,
            "test_accuracy": v.test_accuracy,
        }
    if latency:
        measured: dict[str, dict[int, float]] = {}
        if ort_models:
            measured.update(
                measure_latency(ort_models, input_shape, batch_sizes, threads=threads, repeats=repeats)
            )
        if torch_models:
            measured.update(
                measure_latency(
                    torch_models,
                    input_shape,
                    batch_sizes,
                    runtime="torch",
                    threads=threads,
                    repeats=repeats,
                    device=device,
                )
            )
        for name, per_batch in measured.items():
            rows[name]["latency_ms"] = {str(b): ms for b, ms in per_batch.items()}
    return {"runtime": runtime, "threads": threads, "repeats": repeats, "rows": rows}
