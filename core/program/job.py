"""What the job's stages do differently for a program (``{"model": {"program": "model.pt2"}}``).

Each function here has the zoo counterpart named in its docstring; the stages in
:mod:`core.stages` and the plan in :mod:`core.plan` call the one that fits the model, so a
program job runs the same stages (and writes the same report) as a zoo job.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from core import svt
from core.lorita import WeightTarget
from core.program.archive import ProgramError
from core.program.graph import (
    ProgramModel,
    apply_program_lorita,
    compute_program_spectra,
    export_program,
    from_exported,
    program_targets,
    reinitialize,
    tied_uses,
    truncate_program,
)
from core.program.load import load_program

PROGRAM_META_FILE = "program.json"  # next to a saved program: what the job knows about it


def is_program(model: nn.Module) -> bool:
    return isinstance(model, ProgramModel)


def load_program_model(
    path: str | Path,
    display: str,
    input_shape: Sequence[int],
    num_classes: int,
    *,
    expected_classes: int | None = None,
    isolate: bool = True,
) -> ProgramModel:
    """Load ``path`` (validated, then proven in a child process) and check it fits the dataset.

    The program's input shape must equal the dataset's; its number of logits must be at
    least the dataset's class count (and equal ``expected_classes`` when the config gives
    one). Raises ProgramError with both shapes named.
    """
    loaded = load_program(path, display, isolate=isolate)
    model = from_exported(loaded.exported, loaded.input_shape, loaded.num_classes)
    if tuple(input_shape) != model.input_shape:
        raise ProgramError(
            f"{display} takes inputs of shape {list(model.input_shape)} (after the batch) but the "
            f"dataset's inputs are {list(input_shape)}; export the program with an example input "
            "of the dataset's shape or choose the matching dataset"
        )
    if model.num_classes < num_classes:
        raise ProgramError(
            f"{display} returns {model.num_classes} logits per sample, fewer than the dataset's "
            f"{num_classes} classes; export a model with {num_classes} outputs"
        )
    if expected_classes is not None and expected_classes != model.num_classes:
        raise ProgramError(
            f"model.num_classes is {expected_classes} but {display} returns {model.num_classes} "
            "logits per sample; remove model.num_classes (a program fixes it)"
        )
    return model


def targets_of(
    model: nn.Module, include: Sequence[str] = (), exclude: Sequence[str] = ()
) -> list[WeightTarget]:
    """:func:`core.lorita.find_targets`, for programs too."""
    if isinstance(model, ProgramModel):
        return program_targets(model, include, exclude)
    from core.lorita import find_targets

    return find_targets(model, include, exclude)


def compose(
    model: nn.Module,
    factors: int,
    include: Sequence[str],
    exclude: Sequence[str],
    *,
    init: str,
    seed: int,
    layer_space: Collection[str] = (),
    from_scratch: bool = False,
) -> list[WeightTarget]:
    """:func:`core.lorita.apply_lorita`, for programs too.

    A program starts from its own weights (an exact balanced factorization) unless
    ``from_scratch``: then :func:`core.program.graph.reinitialize` gives it fresh weights and the
    factors start as ``init`` says ('paper' or 'preserve', as for the built-in architectures).
    """
    if isinstance(model, ProgramModel):
        if from_scratch:
            reinitialize(model, seed)
        program_init = ("paper" if init == "paper" else "scratch") if from_scratch else "weights"
        return apply_program_lorita(model, factors, include, exclude, init=program_init, seed=seed)
    from core.lorita import apply_lorita

    return apply_lorita(model, factors, include, exclude, init=init, seed=seed, layer_space=layer_space)


def spectra_of(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, svt.Spectrum]:
    """:func:`core.svt.compute_spectra`, for programs too (keyed by parameter name)."""
    if isinstance(model, ProgramModel):
        return compute_program_spectra(model, input_shape)
    return svt.compute_spectra(model, input_shape)


def truncate(model: nn.Module, spectra: Mapping[str, svt.Spectrum], ranks: Mapping[str, int]) -> nn.Module:
    """:func:`core.svt.truncate`, for programs too."""
    if isinstance(model, ProgramModel):
        return truncate_program(model, spectra, ranks)
    return svt.truncate(model, spectra, ranks)


def program_info(model: ProgramModel, display: str) -> dict[str, Any]:
    """What the report and the plan say about the program itself."""
    return {
        "file": display,
        "input_shape": list(model.input_shape),
        "num_classes": model.num_classes,
        "norm_mode": model.norm_mode,
        "tied": tied_uses(model),
    }


def export_program_job(
    compressed: ProgramModel,
    dense: ProgramModel,
    ranks_table: Mapping[str, Mapping[str, Any]],
    out: Path,
    formats: Sequence[str],
    example: torch.Tensor,
    dense_dir: str,
) -> dict[str, dict[str, Any]]:
    """The compressed program in every requested format (safetensors always), parity-checked;
    the dense program as ``dense_dir/model.pt2`` (what ``select`` reloads)."""
    files = export_program(compressed, out, formats, example)
    meta = {
        "kind": "program",
        "input_shape": list(compressed.input_shape),
        "num_classes": compressed.num_classes,
        "ranks": {k: dict(v) for k, v in ranks_table.items()},
        "input_scaling": "float32 in 0..1, shape (N, *input_shape), as the dataset",
    }
    (out / PROGRAM_META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    export_program(dense, out / dense_dir, ["pt2"], example)
    (out / dense_dir / PROGRAM_META_FILE).write_text(json.dumps({**meta, "ranks": {}}, indent=2) + "\n")
    return files


def program_layer_rows(
    model: ProgramModel,
    targets: Sequence[WeightTarget],
    spectra: Mapping[str, svt.Spectrum],
    ranks: Mapping[str, int],
    composed: Collection[str] | None,
    skipped: Mapping[str, str] | None = None,
) -> dict[str, dict[str, Any]]:
    """One row per weight-like parameter of the dense program (keyed by its name), as the report's
    :class:`core.report.LayerRank` fields: composed or not and why, truncated or not and why.

    ``composed`` is None when the job did not train. ``reason`` is None for a truncated
    weight (``kept_rank`` is the chosen rank); ``uses`` counts the ops reading each weight.
    """
    from core.program.graph import program_weights

    uses = {w.name: len(w.uses) for w in program_weights(model)}
    skipped = skipped or {}
    rows: dict[str, dict[str, Any]] = {}
    for t in targets:
        m, n = t.matrix_shape
        sp = spectra.get(t.name)
        row: dict[str, Any] = {
            "kind": t.kind,
            "shape": [m, n] if sp is None else [sp.m, sp.n],
            "full_rank": min(m, n) if sp is None else sp.full_rank,
            "kept_rank": min(m, n) if sp is None else sp.full_rank,
            "factorized": False,
            "composed": None if composed is None else t.name in composed,
            "compose_reason": None
            if composed is None or t.name in composed
            else (skipped.get(t.name) or t.reason or "not composed"),
            "reason": None,
            "uses": uses.get(t.name),
        }
        if sp is None:
            row["reason"] = t.reason or "not read as a linear or convolution weight"
        else:
            rank = int(ranks.get(t.name, sp.full_rank))
            if sp.factorizes(rank):
                row["kept_rank"], row["factorized"] = rank, True
            elif rank >= sp.full_rank:
                row["reason"] = "the policy kept every singular value"
            else:
                row["reason"] = (
                    f"a thin pair of rank {rank} would not save parameters "
                    f"({rank} x ({sp.m} + {sp.n}) >= {sp.m} x {sp.n})"
                )
        rows[t.name] = row
    return rows


# ---------------------------------------------------------------------------------------
# entry points of core.stages / core.pipeline / core.plan
# ---------------------------------------------------------------------------------------


def build_for_job(config: Any, data: Any) -> ProgramModel:
    """``core.stages.build`` for ``model.program``: validated, proven in a child process, fitted
    to the dataset. A refused or unfitting program is a ConfigError naming the file."""
    from core.config import ConfigError

    path = Path(config.model.program)
    if not path.is_file():
        raise ConfigError(
            f"model.program: {path.name} does not exist; give a .pt2 file saved with torch.export.save"
        )
    try:
        return load_program_model(
            path, path.name, data.input_shape, data.num_classes, expected_classes=config.model.num_classes
        )
    except ProgramError as err:
        raise ConfigError(f"model.program: {err}") from None


def classes_of(model: nn.Module) -> int | None:
    """The number of logits a program returns (None for a zoo model: the config decides)."""
    return model.num_classes if isinstance(model, ProgramModel) else None


def norm_mode_of(model: nn.Module) -> str | None:
    """How batch norm and dropout train, for a program (None for a zoo model)."""
    return model.norm_mode if isinstance(model, ProgramModel) else None


def export_for_job(
    config: Any,
    dense: ProgramModel,
    compressed: ProgramModel,
    spectra: Mapping[str, svt.Spectrum],
    ranks: Mapping[str, int],
    example: torch.Tensor,
    out: Path,
    dense_dir: str,
) -> dict[str, dict[str, Any]]:
    """``core.stages.export`` for programs: the formats of ``config.export`` that apply to a
    program (safetensors, pt2, onnx), ExportError / JobError as for zoo models."""
    from core.export import ExportError
    from core.progress import JobError

    formats = [f for f in config.export if f in ("safetensors", "pt2", "onnx")]
    if "onnx_int8" in config.export and "onnx" not in formats:
        formats.append("onnx")  # core.deploy quantizes model.onnx afterwards
    try:
        return export_program_job(
            compressed, dense, svt.rank_table(spectra, ranks), out, formats, example, dense_dir
        )
    except ExportError as err:
        raise JobError(str(err)) from None


def rows_for_job(
    model: ProgramModel,
    config: Any,
    spectra: Mapping[str, svt.Spectrum],
    ranks: Mapping[str, int],
    training: Any,
) -> dict[str, Any]:
    """``core.stages.layer_rows`` for programs: :class:`core.report.LayerRank` rows keyed by
    parameter name."""
    from core.report import LayerRank

    tcfg = config.train
    targets = program_targets(model, tcfg.include if tcfg else (), tcfg.exclude if tcfg else ())
    trained = training is not None and training.factors is not None
    composed = set(training.composed) if trained else None
    skipped = training.skipped if training is not None else {}
    rows = program_layer_rows(model, targets, spectra, ranks, composed, skipped)
    return {k: LayerRank.model_validate(v) for k, v in rows.items()}


def is_program_dir(directory: Path) -> bool:
    """A job's dense/ folder that holds a program (``lorita select`` reloads it as one)."""
    return (directory / PROGRAM_META_FILE).is_file() and (directory / "model.pt2").is_file()


def load_dense_program(directory: Path, data: Any) -> ProgramModel:
    """The dense program a job saved, checked against the job's data (as ``select`` needs it)."""
    from core.config import ConfigError

    try:
        return load_program_model(
            directory / "model.pt2", "dense/model.pt2", data.input_shape, data.num_classes
        )
    except ProgramError as err:
        raise ConfigError(f"cannot reload the job's dense program: {err}") from None
