"""The latency budget: the most accurate ranks whose measured latency is at most budget x dense.

``search_latency_budget`` works like the cost budgets of :mod:`core.search`, with the cost
being the latency a :class:`~core.latency.LatencyTable` predicts, and then *confirms* its
choice by measuring the whole exported model side by side with the dense one:

1. Every candidate is adjusted first (:func:`adjust_ranks`): ranks are rounded to the
   hardware multiple (:mod:`core.rounding`), and a layer whose thin pair is not predicted
   faster than its dense op at that rank stays dense (this includes the layers whose thin
   pair is slower at every rank measured). So the predicted latency of a layer is
   ``min(dense, thin(r))`` and only falls as ranks fall.
2. The global threshold on the allocation scores that keeps the most singular values
   within the predicted limit is the start (``svt.ranks_under_budget``); variants weight one
   layer's scores by 2 or 1/2 and re-fit, kept when validation accuracy improves
   (``max_evals`` bounds the accuracy evaluations).
3. The best point is exported and measured with the dense model, interleaved (the first fit
   aims 10% under the limit: the table tends to predict low). If it misses
   the budget, the predicted limit is tightened by the miss ratio and steps 2-3 run again
   (at most ``confirmations`` times). A point that meets the budget with room to spare
   (below 0.8 x budget: the table was pessimistic) loosens the limit the same way while
   tries remain; the most accurate point that met the budget is the answer. When nothing
   measured meets the budget,
   :class:`~core.search.BudgetError` names the fastest model found.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from core import svt
from core.latency import LatencyTable, Runtime, build_latency_table, measure_latency
from core.rounding import round_ranks
from core.search import BudgetError, EvaluatedPoint, Evaluations, Label, SearchResult
from core.svt import Ranks, Scores, Spectrum

Evaluate = Callable[[Ranks], float]
# (candidate ms, dense ms) measured side by side on the deployed runtime
Measure = Callable[[Ranks], tuple[float, float]]

CONFIRMATIONS = 4
# After a miss the predicted limit is scaled by budget / measured fraction times this margin.
_MARGIN = 0.97
# Note: the table adds up isolated ops, which leaves out what a whole model pays around them
# (activations, copies, the session's own overhead), so it tends to predict low; the first
# fit aims at this fraction of the limit, which saves a measurement in most cases.
_START_MARGIN = 0.9
# A point measured below this fraction of the budget leaves room: the next try aims higher.
_RELAX_BELOW = 0.8
_EPS = 1e-9


def adjust_ranks(
    spectra: Mapping[str, Spectrum], ranks: Mapping[str, int], table: LatencyTable | None, multiple: int
) -> tuple[Ranks, dict[str, str]]:
    """Ranks rounded to ``multiple``, with layers not predicted faster as thin pairs left dense.

    Returns the effective ranks and, per layer left dense for time, the reason.
    """
    rounded = round_ranks(spectra, ranks, multiple)
    reasons: dict[str, str] = {}
    if table is not None:
        for name, sp in spectra.items():
            lat = table.layers.get(name)
            if lat is None:
                continue
            if lat.always_slower:
                rounded[name] = sp.full_rank
                reasons[name] = (
                    f"left dense: its thin pair is slower than the dense layer at every rank measured "
                    f"({table.runtime}, batch {table.batch_size})"
                )
            elif sp.factorizes(rounded[name]) and lat.at(rounded[name]) >= lat.dense_ms:
                reasons[name] = (
                    f"left dense: at rank {rounded[name]} its thin pair is not faster than the dense layer "
                    f"({table.runtime}, batch {table.batch_size})"
                )
                rounded[name] = sp.full_rank
    return svt.effective_ranks(spectra, rounded), reasons


@dataclass
class LatencyInfo:
    """What the latency search predicted and measured (for the report)."""

    budget: float
    runtime: str
    batch_size: int
    threads: int
    round_to: int
    dense_ms: float
    limit_ms: float
    predicted_ms: float | None = None
    measured_ms: float | None = None
    measured_dense_ms: float | None = None
    measured_fraction: float | None = None
    met: bool = False
    slow_layers: list[str] = field(default_factory=list)
    reasons: dict[str, str] = field(default_factory=dict)
    confirmations: list[dict[str, Any]] = field(default_factory=list)
    predicted_by_evaluation: dict[int, float] = field(default_factory=dict)
    table: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "budget": self.budget,
            "runtime": self.runtime,
            "batch_size": self.batch_size,
            "threads": self.threads,
            "round_to": self.round_to,
            "dense_ms": self.dense_ms,
            "limit_ms": self.limit_ms,
            "predicted_ms": self.predicted_ms,
            "measured_ms": self.measured_ms,
            "measured_dense_ms": self.measured_dense_ms,
            "measured_fraction": self.measured_fraction,
            "met": self.met,
            "slow_layers": list(self.slow_layers),
            "reasons": dict(self.reasons),
            "confirmations": list(self.confirmations),
            "table": dict(self.table),
        }


def search_latency_budget(
    spectra: Mapping[str, Spectrum],
    other_params: int,
    other_flops: int,
    evaluate: Evaluate,
    *,
    budget: float,
    table: LatencyTable,
    dense_ms: float,
    measure: Measure,
    multiple: int = 1,
    max_evals: int = 20,
    scores: Scores | None = None,
    confirmations: int = CONFIRMATIONS,
    remeasure: Callable[[], LatencyTable] | None = None,
) -> tuple[SearchResult, LatencyInfo]:
    """The most accurate ranks found whose measured latency is at most ``budget`` x dense.

    ``table`` and ``dense_ms`` (the whole dense model, measured) predict; ``measure(ranks)``
    builds, exports and times the model at ``ranks`` next to the dense model. After a miss,
    ``remeasure()`` (when given) measures the table again and each op keeps its faster
    figure. Raises :class:`BudgetError` naming the fastest model found when the budget is
    not met.
    """
    if not 0 < budget <= 1:
        raise ValueError(f"budget must be in (0, 1], got {budget}")
    book = Evaluations(spectra, other_params, other_flops, evaluate, max(2, max_evals))
    info = LatencyInfo(
        budget=budget,
        runtime=table.runtime,
        batch_size=table.batch_size,
        threads=table.threads,
        round_to=multiple,
        dense_ms=dense_ms,
        limit_ms=budget * dense_ms,
        slow_layers=table.slow_layers(),
        table=table.to_dict(),
    )
    scores = scores if scores is not None else svt.normalized_scores(spectra)

    reasons_by_key: dict[tuple[int, ...], dict[str, str]] = {}

    def adjusted(ranks: Mapping[str, int]) -> Ranks:
        eff, reasons = adjust_ranks(spectra, ranks, table, multiple)
        reasons_by_key.setdefault(book.key(eff), reasons)
        return eff

    def finish(
        chosen: EvaluatedPoint, measured: tuple[float, float] | None
    ) -> tuple[SearchResult, LatencyInfo]:
        always = adjust_ranks(spectra, {k: 1 for k in info.slow_layers}, table, 1)[1]
        info.reasons = {**reasons_by_key.get(book.key(chosen.ranks), {}), **always}
        return _finish(book, chosen, info, measured)

    def predicted(ranks: Mapping[str, int]) -> float:
        eff = adjusted(ranks)
        factorized = {k: sp.factorizes(eff[k]) for k, sp in spectra.items()}
        return table.predict(dense_ms, eff, factorized)

    def record(p: EvaluatedPoint, limit: float) -> EvaluatedPoint:
        ms = predicted(p.ranks)
        info.predicted_by_evaluation[p.evaluation] = ms
        if p.within_budget is None:
            p.within_budget = ms <= limit + _EPS
        return p

    reference = record(
        book.point({k: sp.full_rank for k, sp in spectra.items()}, Label("reference", threshold=0.0)),
        info.limit_ms,
    )
    reference.within_budget = budget >= 1.0
    if budget >= 1.0:
        return finish(reference, None)

    limit = info.limit_ms * _START_MARGIN
    fastest: tuple[float, EvaluatedPoint] | None = None  # (measured fraction, point)
    met: list[tuple[EvaluatedPoint, float, float]] = []  # (point, measured ms, dense ms) within budget
    step = 0
    for attempt in range(max(1, confirmations)):
        fit = svt.ranks_under_budget(scores, predicted, limit)
        if fit is None:
            break
        start_ranks, threshold = fit
        if book.known(adjusted(start_ranks)) is None and book.evaluations_remaining <= 0:
            break
        best = record(
            book.point(adjusted(start_ranks), Label("start", threshold=threshold, step=attempt)), limit
        )
        reserve = max(0, confirmations - attempt - 1)
        weights = {k: 1.0 for k in spectra}
        order = sorted(spectra, key=lambda k: -spectra[k].dense_params())
        improved = True
        while improved and book.evaluations_remaining > reserve:
            improved = False
            for name in order:
                for factor in (2.0, 0.5):
                    if book.evaluations_remaining <= reserve:
                        break
                    trial_weights = {**weights, name: weights[name] * factor}
                    weighted = {k: v * trial_weights[k] for k, v in scores.items()}
                    trial = svt.ranks_under_budget(weighted, predicted, limit)
                    if trial is None or book.known(adjusted(trial[0])) is not None:
                        continue
                    step += 1
                    p = record(
                        book.point(
                            adjusted(trial[0]), Label("variant", step=step, layer=name, weight=factor)
                        ),
                        limit,
                    )
                    if p.within_budget and p.val_accuracy > best.val_accuracy + _EPS:
                        best, weights, improved = p, trial_weights, True
                        break
        measured_ms, measured_dense = measure(dict(best.ranks))
        fraction = measured_ms / measured_dense if measured_dense > 0 else math.inf
        info.confirmations.append(
            {
                "evaluation": best.evaluation,
                "predicted_ms": info.predicted_by_evaluation[best.evaluation],
                "measured_ms": measured_ms,
                "measured_dense_ms": measured_dense,
                "measured_fraction": fraction,
                "predicted_limit_ms": limit,
            }
        )
        if fastest is None or fraction < fastest[0]:
            fastest = (fraction, best)
        if fraction <= budget + _EPS:
            best.within_budget = True
            met.append((best, measured_ms, measured_dense))
            if fraction >= budget * _RELAX_BELOW or attempt + 1 >= confirmations:
                break
            # Met with room to spare: the table was pessimistic, so aim higher (a more
            # accurate model may fit); the best that met stays the answer if that one misses.
            limit = limit * (budget / max(fraction, _EPS)) * _MARGIN
            continue
        best.within_budget = False  # measured: it misses
        if met:
            break  # a looser aim missed: keep what met the budget
        # Aim lower by the miss ratio, or by how far the prediction fell short of the
        # measurement, whichever is stricter; and measure the table again when possible
        # (a burst of load during the first measurement makes its predictions wrong).
        predicted_best = info.predicted_by_evaluation[best.evaluation]
        dense_ms = min(dense_ms, measured_dense)
        calibrated = budget * dense_ms * predicted_best / measured_ms if measured_ms > 0 else limit
        limit = min(limit * budget / fraction, calibrated) * _MARGIN
        if remeasure is not None and attempt + 1 < confirmations:
            table = table.merged(remeasure())
            info.table = table.to_dict()
            info.slow_layers = table.slow_layers()

    if met:
        chosen, ms, dense = max(met, key=lambda m: (m[0].val_accuracy, -m[1] / m[2]))
        return finish(chosen, (ms, dense))
    where = f"on this machine ({table.runtime}, batch {table.batch_size}, {table.threads} thread(s))"
    if fastest is None:
        smallest = adjusted({k: 1 for k in spectra})
        ms, dense = measure(smallest)
        fraction = ms / dense if dense > 0 else math.inf
        raise BudgetError(
            f"latency_budget {budget:g} cannot be met {where}: the fastest model this policy builds "
            f"(the smallest rank in every layer whose thin pair is faster) runs at {fraction:.2f}x the dense "
            f"model's latency ({ms:.3g} ms vs {dense:.3g} ms); raise the budget to at least {math.ceil(fraction * 100) / 100:g}"
        )
    fraction, point = fastest
    raise BudgetError(
        f"latency_budget {budget:g} was not met {where}: the fastest model found runs at {fraction:.2f}x the "
        f"dense model's latency (val accuracy {point.val_accuracy:.4f}, {point.params_fraction:.1%} of the "
        f"parameters) after {len(info.confirmations)} measurement(s); raise the budget to at least "
        f"{math.ceil(fraction * 100) / 100:g}"
    )


def _finish(
    book: Evaluations, chosen: EvaluatedPoint, info: LatencyInfo, measured: tuple[float, float] | None
) -> tuple[SearchResult, LatencyInfo]:
    for p in book.points:
        p.chosen = p is chosen
    info.predicted_ms = info.predicted_by_evaluation.get(chosen.evaluation)
    if measured is not None:
        info.measured_ms, info.measured_dense_ms = measured
        info.measured_fraction = measured[0] / measured[1] if measured[1] > 0 else None
    info.met = True
    return SearchResult(dict(chosen.ranks), book.points), info


# ---------------------------------------------------------------------------------------
# Predicting and measuring a model on its runtime
# ---------------------------------------------------------------------------------------


@dataclass
class Probe:
    """The lookup table, the dense model's measured latency, and a whole-model measurer."""

    table: LatencyTable
    dense_ms: float
    measure: Measure
    remeasure: Callable[[], LatencyTable]


def make_probe(
    model: nn.Module,
    spectra: Mapping[str, Spectrum],
    input_shape: tuple[int, ...],
    work_dir: Path,
    *,
    batch: int,
    runtime: Runtime = "onnxruntime",
    threads: int = 1,
    multiple: int = 1,
    device: torch.device | None = None,
    repeats: int = 20,
    layer_repeats: int = 10,
) -> Probe:
    """Measure ``model``'s layers (the table) and the whole dense model on ``runtime``.

    ``onnxruntime``: the models measured are ONNX exports (``core.export.export_onnx``, as
    the job's ``model.onnx``) in ``work_dir``, on the CPU with ``threads`` threads.
    ``torch``: the modules themselves on ``device``. Every figure here is the fastest of
    the interleaved repeats (the stable estimate on a loaded machine, see
    :func:`core.latency.interleaved_medians`); the report's latencies are medians.
    """
    from core.export import export_onnx

    dev = device or torch.device("cpu")
    work_dir.mkdir(parents=True, exist_ok=True)

    def measure_table() -> LatencyTable:
        return build_latency_table(
            model,
            list(spectra),
            input_shape,
            batch,
            runtime=runtime,
            threads=threads,
            multiple=multiple,
            repeats=layer_repeats,
            device=dev,
        )

    table = measure_table()
    example = torch.rand((2, *input_shape), generator=torch.Generator().manual_seed(0))

    def as_measured(m: nn.Module, name: str) -> Path | nn.Module:
        if runtime == "torch":
            return m
        path = work_dir / f"{name}.onnx"
        export_onnx(copy.deepcopy(m).cpu().eval(), example, path)
        return path

    dense = as_measured(model, "dense_latency")
    dense_ms = measure_latency(
        {"dense": dense},
        input_shape,
        (batch,),
        runtime=runtime,
        threads=threads,
        repeats=repeats,
        device=dev,
        statistic="min",
    )["dense"][batch]

    def measure(ranks: Ranks) -> tuple[float, float]:
        candidate = as_measured(svt.truncate(model, spectra, ranks).eval(), "candidate_latency")
        got = measure_latency(
            {"dense": dense, "candidate": candidate},
            input_shape,
            (batch,),
            runtime=runtime,
            threads=threads,
            repeats=repeats,
            device=dev,
            statistic="min",
        )
        return got["candidate"][batch], got["dense"][batch]

    return Probe(table, dense_ms, measure, measure_table)


# ---------------------------------------------------------------------------------------
# compress.round_to for the other policies
# ---------------------------------------------------------------------------------------


def round_result(
    result: SearchResult,
    spectra: Mapping[str, Spectrum],
    multiple: int,
    evaluate: Evaluate,
    other_params: int,
    other_flops: int,
) -> SearchResult:
    """``result`` with its chosen ranks rounded to ``multiple`` (:mod:`core.rounding`).

    When rounding changes the ranks, the rounded model is evaluated on validation (one more
    evaluation, stage ``"rounded"``) and becomes the chosen point; the policy's own choice
    stays on the curve. Rounding up never makes a layer bigger than its dense weight.
    """
    if multiple <= 1:
        return result
    rounded = svt.effective_ranks(spectra, round_ranks(spectra, result.ranks, multiple))
    if rounded == svt.effective_ranks(spectra, result.ranks):
        return result
    book = Evaluations(spectra, other_params, other_flops, evaluate, max_evals=len(result.points) + 1)
    book.points = list(result.points)
    book.calls = len(book.points)
    for p in book.points:
        book._cache[book.key(p.ranks)] = p
    point = book.point(rounded, Label("rounded", step=multiple))
    for p in book.points:
        p.chosen = p is point
    return SearchResult(dict(point.ranks), book.points)
