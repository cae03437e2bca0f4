"""Saving, reloading and exporting models, and reading weights people upload.

The reload format is ``model.safetensors`` + ``model.json`` (a ``ModelMeta``): the
JSON names the architecture and the kept rank of each factorized layer, so
``load_model`` rebuilds the module (``core.zoo.build_model`` + empty thin pairs) and
loads the tensors strictly. ``model.pt2`` (torch.export) and ``model.onnx`` are for
deployment; every export is checked for output parity against the PyTorch model.

Uploaded weights are never unpickled: safetensors, or ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from core.layers import install_empty_thin_pairs

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
META_FILE = "model.json"
PT2_FILE = "model.pt2"
ONNX_FILE = "model.onnx"
EXPORT_FORMATS = ("safetensors", "pt2", "onnx")

# Note: parity bound. Exports reorder float32 arithmetic (fused BatchNorm, other GEMM
# kernels), which moves outputs by ~1e-6 of their scale; a real fault (wrong weights,
# BatchNorm in train mode, a dropped layer) moves them by far more than 1e-3 of it.
# So an export fails when max|y_export - y_torch| > PARITY_RTOL * max(1, max|y_torch|).
PARITY_RTOL = 1e-3

_WEIGHTS_HINT = "upload a .safetensors file or a weights-only PyTorch state_dict"
_LIST_LIMIT = 10


class WeightsError(ValueError):
    """Weights that cannot be read or do not fit the model; the message says which and why."""


class ExportError(RuntimeError):
    """An export failed or its outputs differ from the PyTorch model's."""


class ModelMetaError(ValueError):
    """A model.json that cannot be used to rebuild the model."""


@dataclass
class ModelMeta:
    """What ``load_model`` needs besides the tensors; written as ``model.json``.

    ``ranks`` maps layer names to ``{"shape": [m, n], "full_rank": int, "kept_rank": int,
    "factorized": bool}``; layers with ``factorized`` true are stored as thin pairs.
    """

    arch: str
    num_classes: int
    input_shape: list[int]
    options: dict[str, Any] = field(default_factory=dict)
    ranks: dict[str, dict[str, Any]] = field(default_factory=dict)
    input_scaling: str = "float32 in 0..1, shape (N, *input_shape); no normalization needed"
    format_version: int = FORMAT_VERSION

    def factorized_ranks(self) -> dict[str, int]:
        """Kept rank per factorized layer, as ``install_empty_thin_pairs`` takes it."""
        return {name: int(info["kept_rank"]) for name, info in self.ranks.items() if info.get("factorized")}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelMeta:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ModelMetaError(f"model.json has unknown fields: {', '.join(unknown)}")
        missing = sorted(
            f.name
            for f in dataclasses.fields(cls)
            if f.name not in data
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        )
        if missing:
            raise ModelMetaError(f"model.json lacks required fields: {', '.join(missing)}")
        version = data.get("format_version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise ModelMetaError(
                f"model.json has format_version {version}; this version of lorita reads {FORMAT_VERSION}"
            )
        for name, info in dict(data.get("ranks", {})).items():
            if info.get("factorized") and not isinstance(info.get("kept_rank"), int):
                raise ModelMetaError(f"model.json: factorized layer {name!r} needs an integer kept_rank")
        meta = cls(**dict(data))
        meta.input_shape = [int(d) for d in meta.input_shape]
        return meta

    @classmethod
    def from_json(cls, text: str) -> ModelMeta:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ModelMetaError(f"model.json is not valid JSON: {err}") from None
        if not isinstance(data, dict):
            raise ModelMetaError("model.json must hold a JSON object")
        return cls.from_dict(data)


# ---------------------------------------------------------------------------
# atomic files


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; on success it replaces ``path`` in one step."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:8]}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _write_text_atomic(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


# ---------------------------------------------------------------------------
# state dicts


def _alias_groups(model: nn.Module) -> list[list[str]]:
    """Groups of state_dict keys that are the same tensor (tied weights)."""
    groups: dict[tuple[Any, ...], list[str]] = {}
    for key, t in model.state_dict(keep_vars=True).items():
        ident: tuple[Any, ...] = (
            # meta tensors have no storage to compare: there, only the same tensor object is tied
            (id(t),)
            if t.device.type == "meta"
            else (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())
        )
        groups.setdefault(ident, []).append(key)
    return [keys for keys in groups.values() if len(keys) > 1]


def portable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A CPU, contiguous state_dict with tied tensors stored once (safetensors refuses shared memory)."""
    dropped = {key for group in _alias_groups(model) for key in group[1:]}
    out: dict[str, torch.Tensor] = {}
    for key, t in model.state_dict().items():
        if key in dropped:
            continue
        t = t.detach()
        # clone CPU tensors: views of one storage (not exact aliases) must not share memory
        out[key] = t.to("cpu").contiguous() if t.device.type != "cpu" else t.contiguous().clone()
    return out


def _fill_aliases(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Restore keys of tied tensors that were stored once."""
    filled = dict(state_dict)
    for group in _alias_groups(model):
        present = [k for k in group if k in filled]
        if present:
            for key in group:
                filled.setdefault(key, filled[present[0]])
    return filled


def save_model(model: nn.Module, meta: ModelMeta, out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Write ``model.safetensors`` and ``model.json`` into ``out_dir``; returns their paths."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    weights_path, meta_path = out / WEIGHTS_FILE, out / META_FILE
    with atomic_path(weights_path) as tmp:
        save_file(portable_state_dict(model), str(tmp), metadata={"format": "pt"})
    _write_text_atomic(meta_path, meta.to_json() + "\n")
    return {"safetensors": weights_path, "meta": meta_path}


def read_meta(path: str | os.PathLike[str]) -> ModelMeta:
    """The ModelMeta of a saved model (``path``: its directory or its model.json)."""
    p = Path(path)
    meta_path = p / META_FILE if p.is_dir() else p
    try:
        return ModelMeta.from_json(meta_path.read_text())
    except FileNotFoundError:
        raise ModelMetaError(f"{meta_path} does not exist") from None


def _build_model(meta: ModelMeta) -> nn.Module:
    from core.zoo import build_model  # local: zoo may import torchvision model code

    return build_model(meta.arch, meta.num_classes, tuple(meta.input_shape), meta.options)


def load_model(path: str | os.PathLike[str]) -> nn.Module:
    """Rebuild a saved model (``path``: its directory or its model.json), in eval mode on CPU."""
    p = Path(path)
    meta = read_meta(p)
    directory = p if p.is_dir() else p.parent
    model = _build_model(meta)
    install_empty_thin_pairs(model, meta.factorized_ranks())
    load_weights_into(model, directory / WEIGHTS_FILE)
    return model.eval()


# ---------------------------------------------------------------------------
# uploaded weights


def _looks_like_safetensors(path: Path) -> bool:
    # 8-byte little-endian header length, then a JSON object
    try:
        with path.open("rb") as f:
            head = f.read(9)
    except OSError:
        return False
    return len(head) == 9 and head[8:9] == b"{"


def _as_state_dict(obj: Any) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            inner = obj.get(key)
            if isinstance(inner, Mapping):
                obj = inner
                break
    if not isinstance(obj, Mapping) or not obj:
        raise WeightsError(f"the file holds no state_dict (a mapping of names to tensors); {_WEIGHTS_HINT}")
    bad = [str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise WeightsError(
            f"the file is not a state_dict: {len(bad)} entries are not tensors "
            f"(e.g. {', '.join(bad[:3])}); {_WEIGHTS_HINT}"
        )
    state = dict(obj)
    # checkpoints saved from nn.DataParallel / DistributedDataParallel
    if all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def load_weights_file(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a state_dict from ``.safetensors`` or a weights-only PyTorch file, on CPU.

    A PyTorch file may hold the state_dict itself or a dict with it under "state_dict"
    or "model". Nothing is ever unpickled beyond tensors and plain containers.
    """
    p = Path(path)
    if not p.is_file():
        raise WeightsError(f"could not read weights: {p} does not exist; {_WEIGHTS_HINT}")
    try:
        if p.suffix == ".safetensors" or _looks_like_safetensors(p):
            from safetensors.torch import load_file

            obj: Any = load_file(str(p), device="cpu")
        else:
            obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:  # every reader failure is the upload's fault
        raise WeightsError(f"could not read weights: {_unreadable_reason(err, p)}; {_WEIGHTS_HINT}") from None
    return _as_state_dict(obj)


def _unreadable_reason(err: Exception, path: Path) -> str:
    """Why a weights file cannot be read, in the user's terms: never the reader's own text (torch's
    advice to set weights_only=False, file paths of this machine)."""
    import pickle

    if isinstance(err, pickle.UnpicklingError):
        return (
            "the PyTorch file holds Python objects besides tensors (a whole pickled model, an "
            "optimizer or custom classes), which are never loaded; save only the weights with "
            "torch.save(model.state_dict(), path)"
        )
    if path.suffix == ".safetensors" or _looks_like_safetensors(path):
        return "the file is not a complete .safetensors file (its header or data cannot be read)"
    return "the file is neither a .safetensors file nor a PyTorch state_dict saved with torch.save"


def _check_finite(name: str, tensor: torch.Tensor) -> None:
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise WeightsError(
            f"weights tensor {name} holds NaN or infinite values; a model cannot train from them"
        )


def check_weights_file(model: nn.Module, path: str | os.PathLike[str]) -> None:
    """Check an uploaded weights file against ``model`` (build it on the meta device: only shapes
    are compared) without holding the file in memory: names and shapes from the safetensors header
    (or a memory map of a PyTorch file), then each tensor, one at a time, for NaN and infinity.
    Raises WeightsError saying what to fix."""
    p = Path(path)
    try:
        if p.suffix == ".safetensors" or _looks_like_safetensors(p):
            from safetensors import safe_open

            with safe_open(str(p), framework="pt", device="cpu") as f:
                names = list(f.keys())
                shapes = {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in names}
                check_weights(model, _as_state_dict(shapes))
                for k in names:
                    _check_finite(k, f.get_tensor(k))
            return
        try:
            obj: Any = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # the legacy (non-zip) format cannot be memory-mapped; it is small
            obj = torch.load(p, map_location="cpu", weights_only=True)
    except WeightsError:
        raise
    except Exception as err:
        raise WeightsError(f"could not read weights: {_unreadable_reason(err, p)}; {_WEIGHTS_HINT}") from None
    state = _as_state_dict(obj)
    check_weights(model, state)
    for k, t in state.items():
        _check_finite(k, t)


def _listed(items: list[str]) -> str:
    shown = ", ".join(items[:_LIST_LIMIT])
    more = len(items) - _LIST_LIMIT
    return f"{shown} (and {more} more)" if more > 0 else shown


def check_weights(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Raise WeightsError naming missing keys, unexpected keys and shape mismatches."""
    expected = model.state_dict()
    given = _fill_aliases(model, dict(state_dict))
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    mismatched = [
        f"{k}: expected {list(expected[k].shape)} got {list(given[k].shape)}"
        for k in expected
        if k in given and tuple(given[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys: {_listed(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {_listed(unexpected)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches: {_listed(mismatched)}")
    if problems:
        raise WeightsError(
            "weights do not fit the model (check the architecture, its options and num_classes): "
            + "; ".join(problems)
        )


def load_weights_into(model: nn.Module, path: str | os.PathLike[str]) -> nn.Module:
    """Read ``path``, check it against ``model``, and load it strictly."""
    state = _fill_aliases(model, load_weights_file(path))
    check_weights(model, state)
    model.load_state_dict(state, strict=True)
    return model


# ---------------------------------------------------------------------------
# exports


def _output_tensor(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise ExportError(f"the model returns {type(out).__name__}; exports need a tensor of logits")


def _reference(model: nn.Module, example: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return _output_tensor(model(example)).detach().float().cpu()


def max_abs_diff(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    ta = torch.as_tensor(a).detach().float().cpu()
    tb = torch.as_tensor(b).detach().float().cpu()
    if ta.shape != tb.shape:
        raise ExportError(f"exported output has shape {list(ta.shape)}, expected {list(tb.shape)}")
    if ta.numel() == 0:
        return 0.0
    return float((ta - tb).abs().max())


def parity_bound(reference: torch.Tensor) -> float:
    scale = float(reference.abs().max()) if reference.numel() else 0.0
    return PARITY_RTOL * max(1.0, scale)


def _batch_of_at_least_two(example: torch.Tensor) -> torch.Tensor:
    # torch.export specializes a dimension seen with size 1, so trace with batch >= 2
    if example.shape[0] >= 2:
        return example
    return example.expand(2, *example.shape[1:]).contiguous()


def _export_program(model: nn.Module, example: torch.Tensor) -> tuple[torch.export.ExportedProgram, bool]:
    """An ExportedProgram with a dynamic batch dimension if possible, else a static one."""
    traced = _batch_of_at_least_two(example)
    try:
        batch = torch.export.Dim("batch", min=1, max=65_536)
        return torch.export.export(model, (traced,), dynamic_shapes=({0: batch},)), True
    except Exception as err:
        warnings.warn(
            f"torch.export with a dynamic batch failed ({err}); exporting a static batch", stacklevel=2
        )
        return torch.export.export(model, (example,)), False


def _export_pt2(model: nn.Module, example: torch.Tensor, path: Path) -> tuple[float, bool]:
    program, dynamic = _export_program(model, example)
    with atomic_path(path) as tmp:
        torch.export.save(program, str(tmp))
    reloaded = torch.export.load(str(path)).module()
    with torch.no_grad():
        got = _output_tensor(reloaded(example))
    return max_abs_diff(got, _reference(model, example)), dynamic


def export_pt2(model: nn.Module, example: torch.Tensor, path: str | os.PathLike[str]) -> float:
    """torch.export the model (dynamic batch if feasible) to ``path``; max |diff| after reloading."""
    diff, _ = _export_pt2(model, example, Path(path))
    return diff


def _onnx_session(path: str | os.PathLike[str]) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def _param_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def _onnx_export_file(model: nn.Module, example: torch.Tensor, tmp: Path) -> None:
    # protobuf caps a single file at 2 GiB; only then do weights go to an external file
    external = _param_bytes(model) > 1_500_000_000
    try:
        batch = torch.export.Dim("batch", min=1, max=65_536)
        torch.onnx.export(
            model,
            (_batch_of_at_least_two(example),),
            str(tmp),
            dynamo=True,
            input_names=["input"],
            output_names=["logits"],
            dynamic_shapes=({0: batch},),
            external_data=external,
            verbose=False,
        )
        return
    except Exception as err:
        warnings.warn(f"dynamo ONNX export failed ({err}); using the legacy exporter", stacklevel=2)
    torch.onnx.export(
        model,
        (example,),
        str(tmp),
        dynamo=False,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
    )


def onnx_has_dynamic_batch(path: str | os.PathLike[str]) -> bool:
    first = _onnx_session(path).get_inputs()[0].shape[0]
    return not isinstance(first, int)


def _export_onnx(model: nn.Module, example: torch.Tensor, path: Path) -> tuple[float, bool]:
    import onnx

    with atomic_path(path) as tmp:
        _onnx_export_file(model, example, tmp)
    onnx.checker.check_model(str(path))
    got = onnx_predict(path, example.detach().float().cpu().numpy())
    return max_abs_diff(got, _reference(model, example)), onnx_has_dynamic_batch(path)


def export_onnx(model: nn.Module, example: torch.Tensor, path: str | os.PathLike[str]) -> float:
    """Export to ONNX (dynamo exporter, dynamic batch; legacy exporter as fallback), check it
    with onnx.checker, run it with onnxruntime on CPU; returns max |diff| vs PyTorch."""
    diff, _ = _export_onnx(model, example, Path(path))
    return diff


def onnx_predict(path: str | os.PathLike[str], x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Logits of the ONNX model for ``x`` (float32, shape (N, *input_shape)), in batches."""
    session = _onnx_session(path)
    inp = session.get_inputs()[0]
    fixed = inp.shape[0] if isinstance(inp.shape[0], int) else None
    step = fixed or max(1, batch_size)
    x = np.ascontiguousarray(x, dtype=np.float32)
    outs: list[np.ndarray] = []
    for start in range(0, len(x), step):
        chunk = x[start : start + step]
        n = len(chunk)
        if fixed is not None and n < fixed:  # a static-batch model: pad the last chunk
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], fixed - n, axis=0)])
        outs.append(session.run(None, {inp.name: chunk})[0][:n])
    if not outs:
        raise ValueError("onnx_predict needs at least one input")
    return np.concatenate(outs)


def onnx_accuracy(path: str | os.PathLike[str], x: np.ndarray, y: np.ndarray, batch_size: int = 256) -> float:
    """Fraction (0..1) of inputs whose arg-max logit equals the label."""
    if len(x) != len(y) or len(x) == 0:
        raise ValueError(f"onnx_accuracy needs as many labels as inputs (> 0), got {len(x)} and {len(y)}")
    logits = onnx_predict(path, x, batch_size=batch_size)
    return float((logits.argmax(axis=1) == np.asarray(y)).mean())


def _check_parity(fmt: str, diff: float, reference: torch.Tensor) -> None:
    bound = parity_bound(reference)
    if not diff <= bound:  # also catches NaN
        raise ExportError(
            f"{fmt} export differs from the PyTorch model: max |diff| {diff:.3g} > {bound:.3g} "
            f"({PARITY_RTOL:g} x output scale)"
        )


def _safetensors_parity(cpu_model: nn.Module, out_dir: Path, example: torch.Tensor) -> float:
    reloaded = load_model(out_dir)
    return max_abs_diff(_reference(reloaded, example), _reference(cpu_model, example))


def export_all(
    model: nn.Module,
    meta: ModelMeta,
    out_dir: str | os.PathLike[str],
    formats: list[str],
    example: torch.Tensor,
) -> dict[str, dict[str, Any]]:
    """Write the requested formats (safetensors always) and check each for output parity.

    Returns per format ``{"file": name, "bytes": int, "max_abs_diff": float}`` (pt2 and
    onnx also say ``"dynamic_batch"``). Works on an eval-mode CPU copy of ``model``;
    raises ExportError when an export's outputs are off by more than ``parity_bound``.
    """
    unknown = sorted(set(formats) - set(EXPORT_FORMATS))
    if unknown:
        raise ValueError(f"unknown export formats {unknown}; choose among {', '.join(EXPORT_FORMATS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cpu_model = copy.deepcopy(model).cpu().eval()
    example = example.detach().cpu().float()
    reference = _reference(cpu_model, example)

    results: dict[str, dict[str, Any]] = {}
    save_model(cpu_model, meta, out)
    diff = _safetensors_parity(cpu_model, out, example)
    _check_parity("safetensors", diff, reference)
    results["safetensors"] = _file_result(out / WEIGHTS_FILE, diff)
    results.update(export_programs(cpu_model, example, reference, out, formats))
    return results


def export_programs(
    cpu_model: nn.Module, example: torch.Tensor, reference: torch.Tensor, out: Path, formats: Iterable[str]
) -> dict[str, dict[str, Any]]:
    """``model.pt2`` and ``model.onnx`` (those of ``formats``), each checked for output parity
    against ``reference`` (the model's output on ``example``); ``{format: file result}``."""
    exporters: dict[str, tuple[str, Callable[[nn.Module, torch.Tensor, Path], tuple[float, bool]]]] = {
        "pt2": (PT2_FILE, _export_pt2),
        "onnx": (ONNX_FILE, _export_onnx),
    }
    wanted = set(formats)
    results: dict[str, dict[str, Any]] = {}
    for fmt, (name, exporter) in exporters.items():
        if fmt not in wanted:
            continue
        try:
            diff, dynamic = exporter(cpu_model, example, out / name)
        except ExportError:
            raise
        except Exception as err:
            raise ExportError(f"{fmt} export failed: {type(err).__name__}: {err}") from err
        _check_parity(fmt, diff, reference)
        results[fmt] = {**_file_result(out / name, diff), "dynamic_batch": dynamic}
    return results


def _file_result(path: Path, diff: float) -> dict[str, Any]:
    return {"file": path.name, "bytes": path.stat().st_size, "max_abs_diff": diff}
