"""Size and speed figures of a model: parameters, FLOPs, latency, file sizes.

Units are in the names: ``flops`` are floating-point operations as counted by
``torch.utils.flop_counter`` (2 x multiply-adds), latencies are milliseconds.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module) -> int:
    """Number of parameter elements (a tied parameter counts once, as ``parameters()`` yields it once)."""
    return sum(p.numel() for p in model.parameters())


def model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device of the first parameter/buffer and dtype of the first floating one (CPU/float32 if none)."""
    device = torch.device("cpu")
    dtype = torch.float32
    tensors = [*model.parameters(), *model.buffers()]
    if tensors:
        device = tensors[0].device
    for t in tensors:
        if t.is_floating_point():
            dtype = t.dtype
            break
    return device, dtype


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode, then restore each one's own flag (they may differ)."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


def zeros_input(model: nn.Module, input_shape: Sequence[int], batch: int) -> torch.Tensor:
    device, dtype = model_device_dtype(model)
    return torch.zeros((batch, *input_shape), device=device, dtype=dtype)


def _flop_counts(model: nn.Module, input_shape: Sequence[int], batch: int) -> FlopCounterMode:
    x = zeros_input(model, input_shape, batch)
    counter = FlopCounterMode(display=False)
    with eval_mode(model), torch.no_grad(), counter:
        model(x)
    return counter


def count_flops(model: nn.Module, input_shape: tuple[int, ...], batch: int = 1) -> int:
    """FLOPs (2 x multiply-adds) of one forward pass on a batch of ``batch`` inputs, in eval mode."""
    return int(_flop_counts(model, input_shape, batch).get_total_flops())


def flops_by_module(model: nn.Module, input_shape: tuple[int, ...], batch: int = 1) -> dict[str, int]:
    """FLOPs per module, keyed by the names of ``model.named_modules()`` (the root is left out).

    A parent's figure includes its children's (a thin pair ``fc`` has ``fc``, ``fc.0`` and
    ``fc.1``), so do not sum the values: the total is ``count_flops``. Modules that
    count no FLOPs (activations, norms, pooling) are absent.
    """
    counts = _flop_counts(model, input_shape, batch).get_flop_counts()
    # Note: FlopCounterMode names modules "<RootClass>.<qualified name>" and adds "Global".
    prefix = f"{type(model).__name__}."
    known = {name for name, _ in model.named_modules() if name}
    out: dict[str, int] = {}
    for key, per_op in counts.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix) :]
        total = int(sum(per_op.values()))
        if name in known and total > 0:
            out[name] = total
    return out


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_latency_ms(
    model: nn.Module,
    input_shape: tuple[int, ...],
    batch: int,
    repeats: int = 20,
    warmup: int = 3,
    threads: int | None = 1,
) -> float:
    """Median wall-clock milliseconds of one forward pass on ``batch`` inputs, in eval mode.

    ``threads`` sets ``torch.set_num_threads`` for the measurement only (None: leave as is);
    the previous value is restored afterwards.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be >= 1 or None, got {threads}")
    device, _ = model_device_dtype(model)
    x = zeros_input(model, input_shape, batch)
    previous_threads = torch.get_num_threads()
    times_ms: list[float] = []
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        with eval_mode(model), torch.inference_mode():
            for _ in range(max(0, warmup)):
                model(x)
            _synchronize(device)
            for _ in range(repeats):
                start = time.perf_counter()
                model(x)
                _synchronize(device)
                times_ms.append((time.perf_counter() - start) * 1000.0)
    finally:
        torch.set_num_threads(previous_threads)
    return float(statistics.median(times_ms))


def file_size_bytes(path: str | os.PathLike[str]) -> int:
    return os.path.getsize(path)


def summarize(
    model: nn.Module,
    input_shape: tuple[int, ...],
    latency_batches: Sequence[int] = (1, 64),
    repeats: int = 20,
    threads: int | None = 1,
    latency: bool = True,
) -> dict[str, Any]:
    """``{"params": int, "flops": int, "latency_ms": {"<batch>": ms}}``; FLOPs are for batch 1.

    ``latency_ms`` is left out when ``latency`` is False (e.g. in tests, where timing is noise).
    """
    summary: dict[str, Any] = {
        "params": count_params(model),
        "flops": count_flops(model, input_shape, batch=1),
    }
    if latency:
        summary["latency_ms"] = {
            str(b): measure_latency_ms(model, input_shape, b, repeats=repeats, threads=threads)
            for b in latency_batches
        }
    return summary
