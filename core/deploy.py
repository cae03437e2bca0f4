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

from core.latency import Runtime, measure_latency_times, summarize_times
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
    ``flops``, ``file``, ``bytes``, ``latency_ms`` (median per batch size, a string key),
    ``fastest_ms`` (the fastest repeat: the stable figure on a loaded machine), ``runtime``,
    ``val_accuracy``, ``test_accuracy``.

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
            "fastest_ms": {},
            "runtime": "torch" if use_torch else ("onnxruntime" if v.file is not None else None),
            "val_accuracy": v.val_accuracy,
            "test_accuracy": v.test_accuracy,
        }
    if latency:
        measured: dict[str, dict[int, list[float]]] = {}
        if ort_models:
            measured.update(
                measure_latency_times(ort_models, input_shape, batch_sizes, threads=threads, repeats=repeats)
            )
        if torch_models:
            measured.update(
                measure_latency_times(
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
            rows[name]["latency_ms"] = {str(b): summarize_times(ts, "median") for b, ts in per_batch.items()}
            rows[name]["fastest_ms"] = {str(b): summarize_times(ts, "min") for b, ts in per_batch.items()}
    warnings: list[str] = []
    dense = rows.get("dense")
    for name, row in rows.items():
        if name == "dense" or dense is None:
            continue
        for b, ms in row["fastest_ms"].items():
            ref = dense["fastest_ms"].get(b)
            if ref is not None and ms > ref:
                warnings.append(
                    f"{name} is slower than dense at batch {b} ({ms:.3g} ms vs {ref:.3g} ms, fastest runs)"
                )
    return {"runtime": runtime, "threads": threads, "repeats": repeats, "rows": rows, "warnings": warnings}


# ---------------------------------------------------------------------------------------
# The job's steps (called by core.stages)
# ---------------------------------------------------------------------------------------


def resolve_round_to(policy: Any, device: torch.device) -> tuple[int, str]:
    """The multiple ranks are rounded to under ``policy`` on ``device``, and where it comes from.

    ``compress.round_to`` when given; for ``latency_budget`` the default of the device the
    latency is measured on (ONNX Runtime: the CPU); 1 (no rounding) otherwise.
    """
    from core.rounding import default_round_to

    if getattr(policy, "round_to", None) is not None:
        return int(policy.round_to), "compress.round_to"
    if getattr(policy, "policy", None) == "latency_budget":
        where = torch.device("cpu") if policy.runtime == "onnxruntime" else device
        multiple = default_round_to(where)
        why = (
            "the float32 GEMM panel width of MLAS/oneDNN"
            if where.type == "cpu"
            else "tensor cores need multiples of 8 (fp16/bf16) and 16 (int8)"
        )
        return multiple, f"default for {where.type}: {multiple} ({why})"
    return 1, "none (compress.round_to not set)"


@dataclass
class RankChoice:
    """The ranks chosen, with what the latency search measured and how ranks were rounded."""

    result: Any  # core.search.SearchResult
    latency: dict[str, Any] | None = None  # core.speed_report.LatencySearch as a dict
    rounding: dict[str, Any] | None = None  # core.speed_report.Rounding as a dict


def choose_ranks(
    config: Any,
    model: nn.Module,
    spectra: Mapping[str, Any],
    input_shape: tuple[int, ...],
    evaluate: Any,
    other_params: int,
    other_flops: int,
    device: torch.device,
) -> RankChoice:
    """The policy's ranks: ``latency_budget`` by :mod:`core.latency_search` (measured on its
    runtime), every other policy by :func:`core.search.choose`; then ``compress.round_to``."""
    import tempfile

    from core import search, svt
    from core.latency_search import make_probe, round_result, search_latency_budget
    from core.rounding import round_ranks, rounding_rows

    policy = config.compress
    multiple, source = resolve_round_to(policy, device)
    if policy.policy == "latency_budget":
        from core.program.job import is_program

        if is_program(model):
            raise search.SearchError(
                "latency_budget is not available for uploaded programs yet (it times each layer alone); "
                "use params_budget, flops_budget or accuracy_budget"
            )
        with tempfile.TemporaryDirectory(prefix="lorita-latency-") as tmp:
            probe = make_probe(
                model,
                spectra,
                input_shape,
                Path(tmp),
                batch=policy.batch_size,
                runtime=policy.runtime,
                threads=config.measure.threads,
                multiple=multiple,
                device=device,
            )
            result, info = search_latency_budget(
                spectra,
                other_params,
                other_flops,
                evaluate,
                budget=policy.budget,
                table=probe.table,
                dense_ms=probe.dense_ms,
                measure=probe.measure,
                remeasure=probe.remeasure,
                multiple=multiple,
                max_evals=policy.max_evals,
                scores=search.importance_for(policy)(spectra),
            )
        rounding = {
            "round_to": multiple,
            "source": source,
            "applied": "to every candidate before it was evaluated",
            "changed": {},
        }
        return RankChoice(result, info.to_dict(), rounding)
    result = search.choose(policy, spectra, other_params, other_flops, evaluate)
    if multiple <= 1:
        return RankChoice(result)
    before = dict(result.ranks)
    result = round_result(result, spectra, multiple, evaluate, other_params, other_flops)
    after = svt.effective_ranks(spectra, round_ranks(spectra, before, multiple))
    rounding = {
        "round_to": multiple,
        "source": source,
        "applied": "to the policy's chosen ranks, then evaluated (stage 'rounded' on the curve)",
        "changed": rounding_rows(spectra, before, after, multiple),
    }
    return RankChoice(result, None, rounding)


def deployment(
    config: Any,
    dense: nn.Module,
    compressed: nn.Module,
    data: Any,
    out: Path,
    *,
    dense_val: float | None,
    compressed_val: float | None,
    test_before: float | None,
    test_after: float | None,
    device: torch.device,
) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """``model.int8.onnx`` when ``onnx_int8`` is exported (the report's ``int8``), and the
    dense / compressed / INT8 summary (the report's ``summary``)."""
    import tempfile

    from core.export import ONNX_FILE, WEIGHTS_FILE, export_onnx
    from core.metrics import count_flops, count_params

    int8 = None
    if "onnx_int8" in config.export and (out / ONNX_FILE).is_file():
        int8 = int8_stage(
            out / ONNX_FILE, out, data.train, data.val, data.test, policy=config.compress, seed=config.seed
        )
    policy = config.compress
    runtime: Runtime = policy.runtime if policy.policy == "latency_budget" else "onnxruntime"
    m = config.measure
    shape = tuple(data.input_shape)
    dense_params, small_params = count_params(dense), count_params(compressed)
    dense_flops, small_flops = count_flops(dense, shape), count_flops(compressed, shape)
    with tempfile.TemporaryDirectory(prefix="lorita-summary-") as tmp:
        dense_file: Path | None = out / "dense" / WEIGHTS_FILE
        small_file: Path | None = out / ONNX_FILE if (out / ONNX_FILE).is_file() else out / WEIGHTS_FILE
        if m.latency and runtime == "onnxruntime":
            example = data.test.tensors[0][:2].detach().cpu().float()
            try:
                exported = Path(tmp) / "dense.onnx"
                export_onnx(copy.deepcopy(dense).cpu().eval(), example, exported)
                dense_file = exported
                if not (out / ONNX_FILE).is_file():
                    small_file = Path(tmp) / "compressed.onnx"
                    export_onnx(copy.deepcopy(compressed).cpu().eval(), example, small_file)
            except Exception:
                # a model the ONNX exporter cannot take is timed as a module (its rows say torch)
                runtime = "torch"
        variants = {
            "dense": Variant(dense_params, dense_flops, dense_file, dense_val, test_before, module=dense),
            "compressed": Variant(
                small_params, small_flops, small_file, compressed_val, test_after, module=compressed
            ),
        }
        if int8 is not None and int8.get("file"):
            variants["int8"] = Variant(
                small_params,
                small_flops,
                out / str(int8["file"]),
                int8.get("val_accuracy"),
                int8.get("test_accuracy"),
            )
        summary = speed_summary(
            variants,
            shape,
            m.batch_sizes,
            runtime=runtime,
            threads=m.threads,
            repeats=m.latency_repeats,
            device=device,
            latency=m.latency,
        )
    # name the dense file by where it lies (or that it only existed for the measurement)
    if dense_file is not None and dense_file.parent == out / "dense":
        summary["rows"]["dense"]["file"] = f"dense/{WEIGHTS_FILE}"
    elif dense_file is not None:
        summary["rows"]["dense"]["file"] = "dense model.onnx (exported for the measurement, not kept)"
    return int8, summary
