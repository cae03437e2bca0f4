"""Data-driven rank selection: accuracy, parameter and FLOP budgets.

``choose(policy, spectra, other_params, other_flops, evaluate)`` returns the ranks a policy
asks for and every point evaluated on the way (:class:`EvaluatedPoint`, the Pareto curve of
the report).

- The SVDs are given (``spectra``); a candidate only slices them, so a search costs one
  forward pass over the validation split per candidate and no SVD at all.
- ``evaluate(ranks) -> validation accuracy`` is supplied by the caller; the test split is
  never seen here. Calls are cached by the *effective* ranks (a layer whose thin pair would
  not save parameters stays dense, so many rank settings build the same model).
- The dense reference is measured (``evaluate`` at full rank, one evaluation), never assumed.

Accuracy budget: a bisection over the distinct models a global threshold on the pooled
allocation scores can produce (their size is monotone in the threshold), then a greedy
per-layer refinement: lower one layer's rank by a step (a quarter of its rank), the largest
parameter saving first, and keep it while the budget holds; a failed step is halved and a
layer is frozen when its step falls below one rank. At most ``max_evals`` evaluations.

Cost budget (parameters, FLOPs): the global threshold that just fits
(:func:`core.svt.ranks_under_budget`) is the start; nearby settings that also fit are tried
by weighting one layer's scores by 2 or 1/2 before re-fitting the threshold, keeping a change
when the validation accuracy improves.

Where new strategies plug in:

- **Rank allocation** (how singular values of different layers compare): an
  :class:`Importance` gives each singular value a score; every threshold the searches move
  is a threshold on those scores. The default is :class:`NormalizedSingularValues`
  (``sigma_i / sigma_1`` per layer). A new allocator (e.g. one measuring each layer's
  sensitivity on the validation split) is a class with that one ``__call__``, chosen in
  :func:`importance_for` from the policy.
- **Cost** (what a budget limits): a :class:`Cost` maps ranks to a number that never grows
  when a rank falls. A new budget policy (e.g. latency) adds its ``case`` in :func:`choose`
  calling :func:`search_cost_budget` with its own ``Cost``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal, NamedTuple, Protocol, assert_never

import torch

from core import svt
from core.config import (
    AccuracyBudgetPolicy,
    CompressConfig,
    EnergyPolicy,
    FlopsBudgetPolicy,
    GlobalPolicy,
    LatencyBudgetPolicy,
    NonePolicy,
    ParamsBudgetPolicy,
    RanksPolicy,
    UniformPolicy,
)
from core.svt import Ranks, Scores, Spectrum

Evaluate = Callable[[Ranks], float]

# Comparisons of accuracies are made with this slack so that float noise in a budget such
# as ``ref - 0.01`` never flips a decision.
_EPS = 1e-9
# The refinement first lowers a layer's rank by this fraction of its rank per step.
REFINE_STEP = 0.25


class SearchError(Exception):
    """A rank search that cannot do what its policy asks; the message says what to change."""


class BudgetError(SearchError):
    """A budget no setting of the policy can meet; the message says what is possible."""


# ---------------------------------------------------------------------------------------
# Plug-in points: rank allocation and cost
# ---------------------------------------------------------------------------------------


class Importance(Protocol):
    """A rank-allocation strategy: how singular values of different layers compare.

    Returns, per layer of ``spectra``, one score per singular value, non-increasing along the
    layer (index 0 scores the largest singular value). A global threshold ``t`` keeps, in
    every layer, the values scored ``>= t`` (at least one): the searches only move ``t``
    (and, for the cost budgets, per-layer weights on the scores).
    """

    def __call__(self, spectra: Mapping[str, Spectrum], /) -> Scores: ...


class NormalizedSingularValues:
    """The default allocation: each layer's singular values divided by its largest."""

    def __call__(self, spectra: Mapping[str, Spectrum]) -> Scores:
        return svt.normalized_scores(spectra)


@dataclass(frozen=True)
class Cost:
    """What a budget limits: ``of(ranks)`` never grows when a rank falls."""

    name: str  # in messages: "params", "flops", ...
    of: Callable[[Mapping[str, int]], float]


def importance_for(policy: CompressConfig) -> Importance:
    """The allocation a policy uses (one place to select another allocator from the config)."""
    if getattr(policy, "allocation", "global") == "sensitivity":
        from core.allocation import SensitivityAllocation

        return SensitivityAllocation("flops" if policy.policy == "flops_budget" else "params")
    return NormalizedSingularValues()


def _probe(s: Evaluations) -> Callable[[Mapping[str, int], str], float | None]:
    """Evaluations for an allocation that measures (``measure``): through the search, counted."""

    def probe(ranks: Mapping[str, int], layer: str) -> float | None:
        if not s.can_evaluate(ranks):
            return None
        return s.point(ranks, Label("probe", layer=layer or None)).val_accuracy

    return probe


# ---------------------------------------------------------------------------------------
# Bookkeeping of evaluations
# ---------------------------------------------------------------------------------------


@dataclass
class EvaluatedPoint:
    """One rank setting evaluated on the validation split: a point of the Pareto curve.

    ``ranks`` are effective (a layer whose thin pair would not save keeps its full rank).
    The label fields say which step of the policy proposed it: ``threshold`` (a global
    threshold on the allocation scores), ``step`` / ``layer`` / ``weight`` (refinement and
    variant steps). ``within_budget`` is set for the budget policies.
    """

    stage: str
    ranks: Ranks
    params: int
    flops: int
    params_fraction: float
    flops_fraction: float
    val_accuracy: float
    evaluation: int
    chosen: bool = False
    within_budget: bool | None = None
    threshold: float | None = None
    step: int | None = None
    layer: str | None = None
    weight: float | None = None


@dataclass(frozen=True)
class Label:
    """What proposed a point (see :class:`EvaluatedPoint`)."""

    stage: str
    threshold: float | None = None
    step: int | None = None
    layer: str | None = None
    weight: float | None = None


class SearchResult(NamedTuple):
    """The chosen (effective) ranks and every point evaluated, in order; unpacks as a pair."""

    ranks: Ranks
    points: list[EvaluatedPoint]

    @property
    def chosen(self) -> EvaluatedPoint:
        return next(p for p in self.points if p.chosen)

    @property
    def reference(self) -> EvaluatedPoint:
        """The dense model's point: every policy evaluates it first."""
        return self.points[0]


@dataclass
class Evaluations:
    """Evaluations with a cache by effective ranks, a budget of calls, and the Pareto points.

    ``judge`` (when set) decides ``within_budget`` of every new point.
    """

    spectra: Mapping[str, Spectrum]
    other_params: int
    other_flops: int
    evaluate: Evaluate
    max_evals: int
    judge: Callable[[EvaluatedPoint], bool] | None = None
    calls: int = 0
    points: list[EvaluatedPoint] = field(default_factory=list)
    _cache: dict[tuple[int, ...], EvaluatedPoint] = field(default_factory=dict)

    def __post_init__(self) -> None:
        full = self.full_ranks()
        self.dense_params = svt.params_of(self.spectra, full, self.other_params)
        self.dense_flops = svt.flops_of(self.spectra, full, self.other_flops)

    def full_ranks(self) -> Ranks:
        return {k: sp.full_rank for k, sp in self.spectra.items()}

    def key(self, ranks: Mapping[str, int]) -> tuple[int, ...]:
        eff = svt.effective_ranks(self.spectra, ranks)
        return tuple(eff[k] for k in self.spectra)

    def params(self, ranks: Mapping[str, int]) -> int:
        return svt.params_of(self.spectra, ranks, self.other_params)

    def flops(self, ranks: Mapping[str, int]) -> int:
        return svt.flops_of(self.spectra, ranks, self.other_flops)

    @property
    def evaluations_remaining(self) -> int:
        return self.max_evals - self.calls

    def known(self, ranks: Mapping[str, int]) -> EvaluatedPoint | None:
        return self._cache.get(self.key(ranks))

    def can_evaluate(self, ranks: Mapping[str, int]) -> bool:
        return self.known(ranks) is not None or self.evaluations_remaining > 0

    def point(self, ranks: Mapping[str, int], label: Label) -> EvaluatedPoint:
        """The evaluated point of ``ranks`` (from the cache when the same model was seen)."""
        hit = self.known(ranks)
        if hit is not None:
            return hit
        if self.evaluations_remaining <= 0:
            raise RuntimeError("evaluation budget exhausted")  # callers check can_evaluate first
        eff = svt.effective_ranks(self.spectra, ranks)
        self.calls += 1
        acc = float(self.evaluate(dict(eff)))
        params, flops = self.params(eff), self.flops(eff)
        point = EvaluatedPoint(
            stage=label.stage,
            ranks=eff,
            params=params,
            flops=flops,
            params_fraction=params / self.dense_params if self.dense_params else 1.0,
            flops_fraction=flops / self.dense_flops if self.dense_flops else 1.0,
            val_accuracy=acc,
            evaluation=self.calls,
            threshold=label.threshold,
            step=label.step,
            layer=label.layer,
            weight=label.weight,
        )
        if self.judge is not None:
            point.within_budget = self.judge(point)
        self._cache[self.key(eff)] = point
        self.points.append(point)
        return point

    def reference(self) -> EvaluatedPoint:
        return self.point(self.full_ranks(), Label("reference", threshold=0.0))

    def finish(self, ranks: Mapping[str, int]) -> SearchResult:
        chosen = self.known(ranks)
        assert chosen is not None, "the chosen setting must have been evaluated"
        for p in self.points:
            p.chosen = p is chosen
        return SearchResult(dict(chosen.ranks), self.points)


# ---------------------------------------------------------------------------------------
# The ladder of distinct models a global threshold produces
# ---------------------------------------------------------------------------------------


def threshold_ladder(
    spectra: Mapping[str, Spectrum], scores: Scores | None = None
) -> list[tuple[float, Ranks]]:
    """Every distinct model a global threshold can build, from the dense one to the smallest.

    Each entry is ``(threshold, effective ranks)``; ``svt.ranks_at(scores, threshold)``
    builds that model (``scores`` default to the normalized singular values). Thresholds run
    over the pooled scores, so the parameters and FLOPs fall monotonically along the list.
    Consecutive thresholds that build the same model (only dense layers moved) are merged.
    """
    names = list(spectra)
    if not names:
        return [(0.0, {})]
    scores = scores if scores is not None else svt.normalized_scores(spectra)
    thresholds = torch.unique(torch.cat([scores[k] for k in names]))  # ascending: most kept first
    columns = []
    for name in names:
        sp = spectra[name]
        asc = scores[name].flip(0).contiguous()
        kept = asc.numel() - torch.searchsorted(asc, thresholds, side="left")
        kept = kept.clamp(min=1)
        saves = (kept < sp.full_rank) & (kept * (sp.m + sp.n) < sp.m * sp.n)
        columns.append(torch.where(saves, kept, torch.full_like(kept, sp.full_rank)))
    table = torch.stack(columns, dim=1).tolist()
    ladder: list[tuple[float, Ranks]] = []
    previous: list[int] | None = None
    for t, row in zip(thresholds.tolist(), table, strict=True):
        if row != previous:
            ladder.append((float(t), dict(zip(names, (int(r) for r in row), strict=True))))
            previous = row
    return ladder


# ---------------------------------------------------------------------------------------
# Accuracy budget
# ---------------------------------------------------------------------------------------


def accuracy_target(reference: float, max_drop: float | None, max_rel_drop: float | None) -> float:
    """The lowest validation accuracy the budget allows."""
    if max_drop is not None:
        return reference - max_drop
    assert max_rel_drop is not None
    return reference * (1.0 - max_rel_drop)


def _refine_proposal(sp: Spectrum, rank: int, step: int) -> int | None:
    """``rank`` lowered by ``step`` for one layer, or None when no lower rank saves anything.

    A layer that is dense at ``rank`` (its thin pair would not save) first drops to the
    largest rank whose thin pair saves, which is where lowering it starts to pay.
    """
    if sp.factorizes(rank):
        new = max(1, rank - step)
    else:
        breakeven = (sp.m * sp.n - 1) // (sp.m + sp.n)  # largest r with r(m+n) < mn
        new = min(sp.full_rank - step, breakeven)
    if new < 1 or new >= rank or not sp.factorizes(new):
        return None
    return new


def search_accuracy_budget(
    spectra: Mapping[str, Spectrum],
    other_params: int,
    other_flops: int,
    evaluate: Evaluate,
    *,
    max_drop: float | None = None,
    max_rel_drop: float | None = None,
    max_evals: int = 20,
    refine: bool = True,
    importance: Importance | None = None,
) -> SearchResult:
    """The smallest model whose validation accuracy is within the budget of the dense one's."""
    s = Evaluations(spectra, other_params, other_flops, evaluate, max_evals)
    reference = s.reference()
    target = accuracy_target(reference.val_accuracy, max_drop, max_rel_drop)

    def meets(p: EvaluatedPoint) -> bool:
        return p.val_accuracy >= target - _EPS

    s.judge = meets
    reference.within_budget = meets(reference)

    # Bisection: ladder[lo] meets the budget (lo = 0 is the dense model); ``hi`` is the first
    # index known to fail (len(ladder) when none is known yet).
    scores = (importance or NormalizedSingularValues())(spectra)
    ladder = threshold_ladder(spectra, scores)
    lo, hi = 0, len(ladder)
    while hi - lo > 1 and s.evaluations_remaining > 0:
        mid = (lo + hi) // 2
        threshold, ranks = ladder[mid]
        if s.point(ranks, Label("bisection", threshold=threshold)).within_budget:
            lo = mid
        else:
            hi = mid
    current = dict(ladder[lo][1])

    # Greedy refinement: lower one layer by a step (a quarter of its rank), the largest
    # parameter saving first; keep it while the budget holds. A failed step is halved, and
    # a layer is frozen once its step would be less than one rank.
    if refine:
        steps = {k: max(1, math.ceil(REFINE_STEP * current[k])) for k in spectra}
        frozen: set[str] = set()
        count = 0
        while True:
            proposals: list[tuple[int, int, str, Ranks]] = []
            for order, (name, sp) in enumerate(spectra.items()):
                if name in frozen:
                    continue
                new = _refine_proposal(sp, current[name], steps[name])
                if new is None:
                    frozen.add(name)
                    continue
                trial = {**current, name: new}
                saving = s.params(current) - s.params(trial)
                if saving > 0 and s.can_evaluate(trial):
                    proposals.append((-saving, order, name, trial))
            if not proposals:
                break
            _, _, name, trial = min(proposals)
            known = s.known(trial)
            if known is None:
                count += 1
                known = s.point(trial, Label("refine", step=count, layer=name))
            if known.within_budget:
                current = dict(known.ranks)
            else:
                steps[name] //= 2
                if steps[name] == 0:
                    frozen.add(name)
    return s.finish(current)


# ---------------------------------------------------------------------------------------
# Cost budgets: parameters, FLOPs (and any other cost)
# ---------------------------------------------------------------------------------------


def search_cost_budget(
    spectra: Mapping[str, Spectrum],
    other_params: int,
    other_flops: int,
    evaluate: Evaluate,
    *,
    cost: Literal["params", "flops"] | Cost,
    budget: float,
    max_evals: int = 20,
    importance: Importance | None = None,
) -> SearchResult:
    """The most accurate setting found whose cost fits ``budget`` x the dense model's cost."""
    s = Evaluations(spectra, other_params, other_flops, evaluate, max_evals)
    if isinstance(cost, Cost):
        measure = cost
    elif cost in ("params", "flops"):
        measure = Cost(cost, s.params if cost == "params" else s.flops)
    else:
        raise ValueError(f"cost must be 'params', 'flops' or a Cost, got {cost!r}")
    dense = measure.of(s.full_ranks())
    limit = math.floor(budget * dense)

    s.judge = lambda p: measure.of(p.ranks) <= limit
    reference = s.reference()
    scores = (importance or NormalizedSingularValues())(spectra)
    measured = getattr(importance, "measure", None)  # e.g. core.allocation.SensitivityAllocation
    hint = None
    if measured is not None and not reference.within_budget:
        hint = svt.ranks_under_budget(svt.normalized_scores(spectra), measure.of, limit)
        scores = measured(spectra, _probe(s), hint[0] if hint else None, s.evaluations_remaining)
    fit = svt.ranks_under_budget(scores, measure.of, limit)
    if fit is None:
        smallest = measure.of({k: 1 for k in spectra})
        raise BudgetError(
            f"{measure.name}_budget {budget:g} cannot be met: the smallest model this policy builds "
            f"(rank 1 in every layer) has {smallest:,} {measure.name}, "
            f"{smallest / dense:.1%} of the dense model's {dense:,}; raise the budget"
        )
    start_ranks, threshold = fit
    if reference.within_budget:  # the budget allows the dense model
        return s.finish(reference.ranks)
    if not s.can_evaluate(start_ranks):
        return s.finish(reference.ranks)  # pragma: no cover - max_evals >= 2 by schema
    best = s.point(start_ranks, Label("start", threshold=threshold))
    if hint is not None and s.can_evaluate(hint[0]):
        # A measured allocation competes with the global threshold's own fit: the search goes on
        # from whichever is more accurate on validation, so it never starts worse than the default.
        plain = s.known(hint[0]) or s.point(hint[0], Label("start", threshold=hint[1]))
        if plain.val_accuracy > best.val_accuracy + _EPS:
            best, scores = plain, svt.normalized_scores(spectra)

    # Coordinate search over per-layer weights of the scores.
    weights = {k: 1.0 for k in spectra}
    order = sorted(spectra, key=lambda k: -spectra[k].dense_params())
    step = 0
    improved = True
    while improved and s.evaluations_remaining > 0:
        improved = False
        for name in order:
            for factor in (2.0, 0.5):
                if s.evaluations_remaining <= 0:
                    break
                trial_weights = {**weights, name: weights[name] * factor}
                weighted = {k: v * trial_weights[k] for k, v in scores.items()}
                trial_fit = svt.ranks_under_budget(weighted, measure.of, limit)
                if trial_fit is None or s.known(trial_fit[0]) is not None:
                    continue
                step += 1
                p = s.point(trial_fit[0], Label("variant", step=step, layer=name, weight=factor))
                if p.val_accuracy > best.val_accuracy + _EPS:
                    best, weights, improved = p, trial_weights, True
                    break
    return s.finish(best.ranks)


# ---------------------------------------------------------------------------------------
# Fixed policies and the entry point
# ---------------------------------------------------------------------------------------


def _fixed(
    ranks: Ranks,
    label: Label,
    spectra: Mapping[str, Spectrum],
    other_params: int,
    other_flops: int,
    evaluate: Evaluate,
) -> SearchResult:
    s = Evaluations(spectra, other_params, other_flops, evaluate, max_evals=2)
    s.reference()
    s.point(ranks, label)
    return s.finish(ranks)


def explicit_ranks(spectra: Mapping[str, Spectrum], given: Mapping[str, int]) -> Ranks:
    """The ranks a ``ranks`` policy names, every other layer at its full rank.

    Raises :class:`SearchError` naming each unknown layer (with the valid names) and each rank
    outside 1..full rank (with the layer's range).
    """
    unknown = [name for name in given if name not in spectra]
    if unknown:
        valid = ", ".join(list(spectra)[:20]) + (", ..." if len(spectra) > 20 else "")
        raise SearchError(
            f"ranks: no truncatable layer named {', '.join(repr(n) for n in unknown[:5])}; "
            f"the model's layers are {valid or 'none'}"
        )
    bad = [
        f"{name!r} is {rank}, valid 1..{spectra[name].full_rank}"
        for name, rank in given.items()
        if not 1 <= rank <= spectra[name].full_rank
    ]
    if bad:
        raise SearchError(f"ranks: out of range: {'; '.join(bad[:5])}")
    return {k: int(given.get(k, sp.full_rank)) for k, sp in spectra.items()}


def choose(
    policy: CompressConfig,
    spectra: Mapping[str, Spectrum],
    other_params: int,
    other_flops: int,
    evaluate: Evaluate,
) -> SearchResult:
    """The ranks ``policy`` asks for and every point evaluated (see the module docstring).

    ``other_params`` / ``other_flops`` count what is not in ``spectra`` (biases, norms, ...).
    The first point is always the dense reference; exactly one point is ``chosen``.
    Raises :class:`SearchError` when the policy cannot be met.
    """
    match policy:
        case AccuracyBudgetPolicy():
            return search_accuracy_budget(
                spectra,
                other_params,
                other_flops,
                evaluate,
                max_drop=policy.max_drop,
                max_rel_drop=policy.max_rel_drop,
                max_evals=policy.max_evals,
                refine=policy.refine,
                importance=importance_for(policy),
            )
        case ParamsBudgetPolicy() | FlopsBudgetPolicy():
            return search_cost_budget(
                spectra,
                other_params,
                other_flops,
                evaluate,
                cost="params" if policy.policy == "params_budget" else "flops",
                budget=policy.budget,
                max_evals=policy.max_evals,
                importance=importance_for(policy),
            )
        case NonePolicy():
            ranks, label = {k: sp.full_rank for k, sp in spectra.items()}, Label("none", threshold=0.0)
        case UniformPolicy():
            ranks, label = svt.ranks_uniform(spectra, policy.keep), Label("uniform", step=0)
        case GlobalPolicy():
            ranks, threshold = svt.ranks_global(spectra, policy.keep)
            label = Label("global", threshold=threshold)
        case EnergyPolicy():
            ranks, label = svt.ranks_energy(spectra, policy.energy), Label("energy", step=0)
        case RanksPolicy():
            ranks, label = explicit_ranks(spectra, policy.ranks), Label("ranks")
        case LatencyBudgetPolicy():
            # it measures the model on its runtime: core.latency_search, called by core.stages.compress
            raise SearchError(
                "latency_budget needs the model and its runtime; run it through core.stages.compress"
            )
        case _:
            assert_never(policy)
    return _fixed(ranks, label, spectra, other_params, other_flops, evaluate)
