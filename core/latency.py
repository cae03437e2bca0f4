"""Latency as a user deploys the model: ONNX Runtime on the CPU or PyTorch on the worker's device.

Two tools:

- :func:`measure_latency` times whole models (ONNX files or modules) side by side:
  fixed threads, warm-up, then *interleaved* repeats (each round runs every model once,
  starting at a rotating position) and the median per model. Interleaving spreads the
  noise of a shared machine (another process waking up, frequency changes) over every
  model alike, so ratios stay meaningful where absolute times drift.
- :func:`build_latency_table` measures each eligible layer alone, as the runtime would
  run it, on that layer's own input shape: the dense op and its thin pair at a small grid
  of ranks. :meth:`LatencyTable.predict` then estimates a whole model at any ranks as
  the dense model's measured time plus, per factorized layer, (thin time at that rank -
  dense time), interpolated between grid ranks. Layers whose thin pair is slower than the
  dense op at every grid rank are flagged (:meth:`LatencyTable.slow_layers`): a policy that
  cares about time leaves them dense.

Note: isolated ops on ONNX Runtime are built directly as one-node (dense) or two-node
(thin pair) ONNX graphs with random weights: op time does not depend on the weights'
values, and building a graph takes microseconds where exporting a module takes seconds.
A Linear on a 2-D input is a ``Gemm`` (what the exporter writes for ``nn.Linear``), on a
N-D input a ``MatMul`` + ``Add``; a Conv2d is a ``Conv`` (non-zero padding modes are timed
with zero padding, which costs the same).
"""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from core.layers import empty_thin_pair, matrix_shape, saves_parameters
from core.svt import probe_forward

Runtime = Literal["onnxruntime", "torch"]
Statistic = Literal["median", "min"]
RUNTIMES: tuple[Runtime, ...] = ("onnxruntime", "torch")
Runner = Callable[[], None]

DEFAULT_REPEATS = 15
DEFAULT_WARMUP = 3
GRID_POINTS = 5  # thin-pair ranks measured per layer


# ---------------------------------------------------------------------------------------
# Runners: one call = one forward pass on a fixed batch
# ---------------------------------------------------------------------------------------


def ort_session(model: str | os.PathLike[str] | bytes, threads: int = 1) -> Any:
    """An ONNX Runtime CPU session with ``threads`` intra-op threads and sequential execution."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, sess_options=options, providers=["CPUExecutionProvider"])


def onnx_runner(
    model: str | os.PathLike[str] | bytes, input_shape: Sequence[int], batch: int, threads: int = 1
) -> Runner:
    """A runner for an ONNX model (a file or serialized bytes) on a random batch."""
    session = ort_session(model, threads)
    inp = session.get_inputs()[0]
    fixed = inp.shape[0] if isinstance(inp.shape[0], int) else None
    if fixed is not None and fixed != batch:
        raise ValueError(f"the ONNX model has a fixed batch of {fixed}; cannot time batch {batch}")
    x = np.random.default_rng(0).random((batch, *input_shape), dtype=np.float32)
    feed = {inp.name: x}

    def run() -> None:
        session.run(None, feed)

    return run


def torch_runner(module: nn.Module, input_shape: Sequence[int], batch: int, device: torch.device) -> Runner:
    """A runner for a module in eval mode on ``device`` (synchronized on CUDA)."""
    module = module.to(device).eval()
    x = torch.rand((batch, *input_shape), generator=torch.Generator().manual_seed(0)).to(device)

    def run() -> None:
        with torch.inference_mode():
            module(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return run


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Set ``torch.set_num_threads`` for the block only."""
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def interleaved_times(
    runners: Mapping[str, Runner], repeats: int = DEFAULT_REPEATS, warmup: int = DEFAULT_WARMUP
) -> dict[str, list[float]]:
    """Milliseconds of each call per runner; each of ``repeats`` rounds runs every runner
    once, starting at a rotating position, after ``warmup`` calls of each."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    names = list(runners)
    for name in names:
        for _ in range(max(0, warmup)):
            runners[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(repeats):
        shift = round_ % max(1, len(names))
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            runners[name]()
            times[name].append((time.perf_counter() - start) * 1000.0)
    return times


def summarize_times(times: Sequence[float], statistic: Statistic = "median") -> float:
    """The median of ``times``, or their minimum.

    Note: "min" is what the searches compare. On a loaded machine the noise only ever adds
    time (preemption, cache eviction), so the fastest of the repeats is the most stable
    estimate of what an op costs; the report gives medians, what a user sees typically.
    """
    return float(min(times) if statistic == "min" else statistics.median(times))


def interleaved_medians(
    runners: Mapping[str, Runner],
    repeats: int = DEFAULT_REPEATS,
    warmup: int = DEFAULT_WARMUP,
    statistic: Statistic = "median",
) -> dict[str, float]:
    """Milliseconds per runner (the median, or the ``statistic`` asked for) over interleaved
    rounds (:func:`interleaved_times`)."""
    times = interleaved_times(runners, repeats, warmup)
    return {name: summarize_times(ts, statistic) for name, ts in times.items()}


def measure_latency_times(
    models: Mapping[str, str | os.PathLike[str] | nn.Module],
    input_shape: Sequence[int],
    batch_sizes: Sequence[int] = (1, 64),
    *,
    runtime: Runtime = "onnxruntime",
    threads: int = 1,
    repeats: int = DEFAULT_REPEATS,
    warmup: int = DEFAULT_WARMUP,
    device: torch.device | None = None,
) -> dict[str, dict[int, list[float]]]:
    """Every timed call (ms) per model and batch size, the models of one batch size interleaved.

    ``models``: ONNX files for ``onnxruntime``, modules for ``torch`` (on ``device``, the
    CPU by default).
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    out: dict[str, dict[int, list[float]]] = {name: {} for name in models}
    dev = device or torch.device("cpu")
    with torch_threads(threads if runtime == "torch" else None):
        for batch in batch_sizes:
            runners: dict[str, Runner] = {}
            for name, model in models.items():
                if runtime == "onnxruntime":
                    if isinstance(model, nn.Module):
                        raise TypeError(f"{name}: onnxruntime times ONNX files, not modules")
                    runners[name] = onnx_runner(model, input_shape, batch, threads)
                else:
                    if not isinstance(model, nn.Module):
                        raise TypeError(f"{name}: the torch runtime times modules, not files")
                    runners[name] = torch_runner(model, input_shape, batch, dev)
            for name, ts in interleaved_times(runners, repeats, warmup).items():
                out[name][batch] = ts
    return out


def measure_latency(
    models: Mapping[str, str | os.PathLike[str] | nn.Module],
    input_shape: Sequence[int],
    batch_sizes: Sequence[int] = (1, 64),
    *,
    runtime: Runtime = "onnxruntime",
    threads: int = 1,
    repeats: int = DEFAULT_REPEATS,
    warmup: int = DEFAULT_WARMUP,
    device: torch.device | None = None,
    statistic: Statistic = "median",
) -> dict[str, dict[int, float]]:
    """Median (or fastest) ms per model and batch size (see :func:`measure_latency_times`)."""
    times = measure_latency_times(
        models,
        input_shape,
        batch_sizes,
        runtime=runtime,
        threads=threads,
        repeats=repeats,
        warmup=warmup,
        device=device,
    )
    return {
        name: {b: summarize_times(ts, statistic) for b, ts in per_batch.items()}
        for name, per_batch in times.items()
    }


# ---------------------------------------------------------------------------------------
# Isolated layers as ONNX graphs
# ---------------------------------------------------------------------------------------


def _initializer(name: str, shape: Sequence[int], rng: np.random.Generator) -> Any:
    from onnx import numpy_helper

    return numpy_helper.from_array(rng.standard_normal(tuple(shape)).astype(np.float32), name)


def _conv_attrs(conv: nn.Conv2d, kernel: bool) -> dict[str, Any]:
    """ONNX Conv attributes of ``conv``'s spatial settings (or of a 1x1 conv when not ``kernel``)."""
    if not kernel:
        return {"kernel_shape": [1, 1]}
    kh, kw = conv.kernel_size
    dh, dw = conv.dilation
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            pads = [0, 0, 0, 0]
        else:  # "same" (stride 1): the extra pixel goes to the end, as in PyTorch
            th, tw = dh * (kh - 1), dw * (kw - 1)
            pads = [th // 2, tw // 2, th - th // 2, tw - tw // 2]
    else:
        ph, pw = conv.padding
        pads = [ph, pw, ph, pw]
    return {
        "kernel_shape": [kh, kw],
        "strides": list(conv.stride),
        "dilations": [dh, dw],
        "pads": pads,
    }


def layer_onnx(layer: nn.Module, input_shape: Sequence[int], rank: int | None = None) -> bytes:
    """A serialized ONNX graph of ``layer`` alone (``rank``: its thin pair at that rank).

    ``input_shape`` is the layer's per-sample input shape; the batch dimension is dynamic.
    """
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    inits: list[Any] = []
    nodes: list[Any] = []
    has_bias = getattr(layer, "bias", None) is not None
    m, n = matrix_shape(layer)
    in_shape: list[int | str] = ["batch", *[int(d) for d in input_shape]]
    if isinstance(layer, nn.Linear):
        two_d = len(input_shape) == 1
        widths = [n, m] if rank is None else [n, rank, m]
        current = "x"
        for i in range(len(widths) - 1):
            last = i == len(widths) - 2
            w = f"w{i}"
            out = "y" if last else f"h{i}"
            bias = [f"b{i}"] if last and has_bias else []
            if bias:
                inits.append(_initializer(bias[0], [widths[i + 1]], rng))
            if two_d:
                inits.append(_initializer(w, [widths[i + 1], widths[i]], rng))
                nodes.append(helper.make_node("Gemm", [current, w, *bias], [out], transB=1))
            else:
                inits.append(_initializer(w, [widths[i], widths[i + 1]], rng))
                if bias:
                    nodes.append(helper.make_node("MatMul", [current, w], [f"mm{i}"]))
                    nodes.append(helper.make_node("Add", [f"mm{i}", bias[0]], [out]))
                else:
                    nodes.append(helper.make_node("MatMul", [current, w], [out]))
            current = out
    elif isinstance(layer, nn.Conv2d):
        if layer.groups != 1:
            raise ValueError("grouped convolutions are not factorized")
        kh, kw = layer.kernel_size
        cin, cout = layer.in_channels, layer.out_channels
        if rank is None:
            inits.append(_initializer("w0", [cout, cin, kh, kw], rng))
            inputs = ["x", "w0"]
            if has_bias:
                inits.append(_initializer("b0", [cout], rng))
                inputs.append("b0")
            nodes.append(helper.make_node("Conv", inputs, ["y"], **_conv_attrs(layer, True)))
        else:
            inits.append(_initializer("w0", [rank, cin, kh, kw], rng))
            inits.append(_initializer("w1", [cout, rank, 1, 1], rng))
            nodes.append(helper.make_node("Conv", ["x", "w0"], ["h0"], **_conv_attrs(layer, True)))
            inputs = ["h0", "w1"]
            if has_bias:
                inits.append(_initializer("b1", [cout], rng))
                inputs.append("b1")
            nodes.append(helper.make_node("Conv", inputs, ["y"], **_conv_attrs(layer, False)))
    else:
        raise TypeError(f"no isolated op for {type(layer).__name__}")
    graph = helper.make_graph(
        nodes,
        "layer",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = min(model.ir_version, 9)
    return bytes(model.SerializeToString())


def layer_module(layer: nn.Module, rank: int | None = None) -> nn.Module:
    """``layer`` alone (a fresh copy with random weights) or its thin pair at ``rank``."""
    if rank is None:
        import copy

        return copy.deepcopy(layer)
    pair = empty_thin_pair(layer, rank)
    with torch.no_grad():
        for p in pair.parameters():
            p.normal_(0, 0.05)
    return pair


def layer_input_shapes(
    model: nn.Module, names: Sequence[str], input_shape: Sequence[int]
) -> dict[str, tuple[int, ...]]:
    """Per-sample input shape of each named layer (its first call), from one forward pass."""
    wanted = set(names)
    seen: dict[str, tuple[int, ...]] = {}
    hooks = []

    def make_hook(name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
            if name not in seen and args and isinstance(args[0], torch.Tensor):
                seen[name] = tuple(int(d) for d in args[0].shape[1:])

        return hook

    for name, mod in model.named_modules():
        if name in wanted:
            hooks.append(mod.register_forward_pre_hook(make_hook(name)))
    probe_forward(model, input_shape, hooks)
    return seen


# ---------------------------------------------------------------------------------------
# The lookup table
# ---------------------------------------------------------------------------------------


def breakeven_rank(m: int, n: int) -> int:
    """The largest rank whose thin pair stores fewer weights than the dense ``m x n`` layer."""
    return (m * n - 1) // (m + n)


def rank_grid(m: int, n: int, full_rank: int, multiple: int = 1, points: int = GRID_POINTS) -> list[int]:
    """Up to ``points`` saving ranks, halving from the break-even rank down, on multiples of ``multiple``.

    Note: halving (top, top/2, top/4, ...) puts more points at small ranks, where a latency
    budget usually lands and where fixed per-op costs make time least proportional to rank.
    """
    top = min(full_rank - 1, breakeven_rank(m, n))
    if top < 1:
        return []
    ranks: set[int] = set()
    for i in range(points):
        r = max(1, round(top / 2**i))
        if multiple > 1 and r >= multiple:
            r = (r // multiple) * multiple
        ranks.add(min(r, top))
    return sorted(r for r in ranks if saves_parameters(r, m, n) and r < full_rank)


@dataclass
class LayerLatency:
    """One layer's measured op times: dense, and its thin pair at each grid rank."""

    name: str
    dense_ms: float
    ranks: list[int] = field(default_factory=list)
    thin_ms: list[float] = field(default_factory=list)

    def envelope(self) -> list[float]:
        """The measured thin-pair times made non-decreasing in the rank: each is the least
        time measured at that rank or above (timing noise only ever adds time)."""
        out = list(self.thin_ms)
        for i in range(len(out) - 2, -1, -1):
            out[i] = min(out[i], out[i + 1])
        return out

    def at(self, rank: int) -> float:
        """Thin-pair ms at ``rank`` on the :meth:`envelope`: linear between grid ranks, flat
        below the smallest, along the last segment above the largest."""
        if not self.ranks:
            return self.dense_ms
        xs, ys = self.ranks, self.envelope()
        if len(xs) == 1 or rank <= xs[0]:
            return ys[0]
        i = 1
        while i < len(xs) - 1 and rank > xs[i]:
            i += 1
        x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
        return max(0.0, y0 + (y1 - y0) * (rank - x0) / (x1 - x0))

    @property
    def always_slower(self) -> bool:
        """The thin pair is slower than the dense op at every grid rank (or none saves)."""
        return not self.ranks or min(self.thin_ms) >= self.dense_ms

    def to_dict(self) -> dict[str, Any]:
        return {
            "dense_ms": self.dense_ms,
            "ranks": list(self.ranks),
            "thin_ms": list(self.thin_ms),
            "always_slower": self.always_slower,
        }


@dataclass
class LatencyTable:
    """Per-layer op latencies at one batch size on one runtime (see the module docstring)."""

    runtime: str
    batch_size: int
    threads: int
    layers: dict[str, LayerLatency] = field(default_factory=dict)

    def slow_layers(self) -> list[str]:
        """Layers whose thin pair never beats the dense op: keep them dense when time matters."""
        return [name for name, lat in self.layers.items() if lat.always_slower]

    def delta_ms(self, ranks: Mapping[str, int], factorized: Mapping[str, bool]) -> float:
        """Predicted change of the model's latency at ``ranks`` relative to the dense model."""
        total = 0.0
        for name, lat in self.layers.items():
            if factorized.get(name):
                total += lat.at(int(ranks[name])) - lat.dense_ms
        return total

    def predict(self, dense_ms: float, ranks: Mapping[str, int], factorized: Mapping[str, bool]) -> float:
        """Predicted latency of the model at ``ranks`` from the measured dense model's ``dense_ms``.

        Note: the whole model is the layers' ops plus the rest (activations, pooling, copies):
        ``rest = dense_ms - sum(dense ops)``, and the prediction is
        ``dense_ms x (rest + sum(op at its rank)) / (rest + sum(dense ops))``. When the isolated
        ops add up to less than the model (the usual case) this is exactly the dense time plus
        :meth:`delta_ms`; when they add up to more (isolated ops pay layout changes a fused
        model does not) the rest is 0 and the saving is taken as a fraction, which cancels
        that inflation instead of predicting a time near zero.
        """
        dense_ops = sum(lat.dense_ms for lat in self.layers.values())
        rest = max(0.0, dense_ms - dense_ops)
        total = rest + dense_ops
        if total <= 0:
            return dense_ms
        return max(0.0, dense_ms * (total + self.delta_ms(ranks, factorized)) / total)

    def merged(self, other: LatencyTable) -> LatencyTable:
        """Per op the faster of the two measurements (same layers and grids; see "min")."""
        layers: dict[str, LayerLatency] = {}
        for name, lat in self.layers.items():
            o = other.layers.get(name)
            if o is None or o.ranks != lat.ranks:
                layers[name] = lat
                continue
            thin = [min(a, b) for a, b in zip(lat.thin_ms, o.thin_ms, strict=True)]
            layers[name] = LayerLatency(name, min(lat.dense_ms, o.dense_ms), list(lat.ranks), thin)
        return LatencyTable(self.runtime, self.batch_size, self.threads, layers)

    def to_dict(self) -> dict[str, Any]:
        return {
            "runtime": self.runtime,
            "batch_size": self.batch_size,
            "threads": self.threads,
            "layers": {name: lat.to_dict() for name, lat in self.layers.items()},
        }


def build_latency_table(
    model: nn.Module,
    names: Sequence[str],
    input_shape: Sequence[int],
    batch: int,
    *,
    runtime: Runtime = "onnxruntime",
    threads: int = 1,
    multiple: int = 1,
    points: int = GRID_POINTS,
    repeats: int = DEFAULT_REPEATS,
    warmup: int = DEFAULT_WARMUP,
    device: torch.device | None = None,
    grids: Mapping[str, Sequence[int]] | None = None,
    statistic: Statistic = "min",
    passes: int = 2,
) -> LatencyTable:
    """Measure each named layer alone: dense vs thin pair at a grid of ranks (interleaved).

    ``grids`` overrides the grid per layer; otherwise :func:`rank_grid` with ``multiple``.
    Each op's figure is the fastest of ``repeats`` (``statistic``; see :func:`interleaved_medians`).
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    dev = device or torch.device("cpu")
    shapes = layer_input_shapes(model, names, input_shape)
    table = LatencyTable(runtime=runtime, batch_size=batch, threads=threads)
    plans: dict[str, tuple[list[int], dict[str, Runner]]] = {}
    with torch_threads(threads if runtime == "torch" else None):
        for name in names:
            if name not in shapes:
                continue  # never called in a forward pass: it costs nothing
            layer = model.get_submodule(name)
            m, n = matrix_shape(layer)
            full = min(m, n)
            grid = list(grids[name]) if grids and name in grids else rank_grid(m, n, full, multiple, points)
            shape = shapes[name]
            runners: dict[str, Runner] = {}
            for rank in [None, *grid]:
                key = "dense" if rank is None else str(rank)
                if runtime == "onnxruntime":
                    runners[key] = onnx_runner(layer_onnx(layer, shape, rank), shape, batch, threads)
                else:
                    runners[key] = torch_runner(layer_module(layer, rank), shape, batch, dev)
            plans[name] = (grid, runners)
        # Note: the layers are measured in ``passes`` sweeps, so each op's repeats are spread
        # over time and a burst of load on a shared machine cannot spoil all of one op's.
        collected: dict[str, dict[str, list[float]]] = {name: {} for name in plans}
        for sweep in range(max(1, passes)):
            for name, (_, runners) in plans.items():
                got = interleaved_times(
                    runners, max(1, repeats // max(1, passes)), warmup if sweep == 0 else 0
                )
                for key, ts in got.items():
                    collected[name].setdefault(key, []).extend(ts)
    for name, (grid, _) in plans.items():
        ms = {key: summarize_times(ts, statistic) for key, ts in collected[name].items()}
        table.layers[name] = LayerLatency(name, ms["dense"], list(grid), [ms[str(r)] for r in grid])
    return table


def speedup(dense_ms: float, ms: float) -> float:
    """dense / compressed (above 1 is faster); NaN when either is not positive."""
    return dense_ms / ms if dense_ms > 0 and ms > 0 else math.nan


def file_bytes(path: str | os.PathLike[str]) -> int:
    return Path(path).stat().st_size
