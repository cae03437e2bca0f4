"""Data-driven rank selection: accuracy, parameter and FLOP budgets.

``choose(policy, spectra, other_params, other_flops, evaluate)`` returns the ranks a policy
asks for and every point evaluated on the way (the Pareto curve of the report).

- The SVDs are given (``spectra``); a candidate only slices them, so a search costs one
  forward pass over the validation split per candidate and no SVD at all.
- ``evaluate(ranks) -> validation accuracy`` is supplied by the caller; the test split is
  never seen here. Calls are cached by the *effective* ranks (a layer whose thin pair would
  not save parameters stays dense, so many rank settings build the same model).
- The dense reference is measured (``evaluate`` at full rank, one evaluation), never assumed.

Accuracy budget: a bisection over the distinct models a global threshold on the pooled
normalized singular values can produce (their size is monotone in the threshold), then a
greedy per-layer refinement: lower one layer's rank by a step (a quarter of its rank), the
largest parameter saving first, and keep it while the budget holds; a failed step is halved
and a layer is frozen when its step falls below one rank. At most
``max_evals`` evaluations in total.

Parameter / FLOP budget: the global threshold that just fits (``svt.ranks_under_budget``)
is the start; nearby settings that also fit are tried by weighting one layer's normalized
singular values by 2 or 1/2 before re-fitting the threshold, keeping a change when the
validation accuracy improves.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from core import svt
from core.config import ConfigError
from core.svt import Ranks, Spectrum

Evaluate = Callable[[Ranks], float]
Point = dict[str, Any]

# Comparisons of accuracies are made with this slack so that float noise in a budget such
# as ``ref - 0.01`` never flips a decision.
_EPS = 1e-9
# The refinement first lowers a layer's rank by this fraction of its rank per step.
REFINE_STEP = 0.25


class BudgetError(ConfigError):
    """A budget no setting of the policy can meet; the message says what is possible."""


# ---------------------------------------------------------------------------------------
# Bookkeeping of evaluations
# ---------------------------------------------------------------------------------------


@dataclass
class _Search:
    """Evaluations with a cache by effective ranks, a budget of calls, and the Pareto points."""

    spectra: Mapping[str, Spectrum]
    other_params: int
    other_flops: int
    evaluate: Evaluate
    max_evals: int
    calls: int = 0
    points: list[Point] = field(default_factory=list)
    _cache: dict[tuple[int, ...], Point] = field(default_factory=dict)

    def __post_init__(self) -> None:
        full = self.full_ranks()
        self.dense_params = svt.params_of(self.spectra, full, self.other_params)
        self.dense_flops = svt.flops_of(self.spectra, full, self.other_flops)

    def full_ranks(self) -> Ranks:
        return {k: sp.full_rank for k, sp in self.spectra.items()}

    def effective(self, ranks: Mapping[str, int]) -> Ranks:
        return svt.effective_ranks(self.spectra, ranks)

    def key(self, ranks: Mapping[str, int]) -> tuple[int, ...]:
        eff = self.effective(ranks)
        return tuple(eff[k] for k in self.spectra)

    def params(self, ranks: Mapping[str, int]) -> int:
        return svt.params_of(self.spectra, ranks, self.other_params)

    def flops(self, ranks: Mapping[str, int]) -> int:
        return svt.flops_of(self.spectra, ranks, self.other_flops)

    @property
    def left(self) -> int:
        return self.max_evals - self.calls

    def known(self, ranks: Mapping[str, int]) -> Point | None:
        return self._cache.get(self.key(ranks))

    def can_evaluate(self, ranks: Mapping[str, int]) -> bool:
        return self.known(ranks) is not None or self.left > 0

    def point(self, ranks: Mapping[str, int], label: dict[str, Any]) -> Point:
        """The evaluated point of ``ranks`` (from the cache when the same model was seen)."""
        key = self.key(ranks)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        if self.left <= 0:
            raise RuntimeError("evaluation budget exhausted")  # callers check can_evaluate first
        eff = self.effective(ranks)
        self.calls += 1
        acc = float(self.evaluate(dict(eff)))
        params, flops = self.params(eff), self.flops(eff)
        point: Point = {
            **label,
            "params": params,
            "flops": flops,
            "params_fraction": params / self.dense_params if self.dense_params else 1.0,
            "flops_fraction": flops / self.dense_flops if self.dense_flops else 1.0,
            "val_accuracy": acc,
            "ranks": eff,
            "evaluation": self.calls,
            "chosen": False,
        }
        self._cache[key] = point
        self.points.append(point)
        return point

    def finish(self, ranks: Mapping[str, int]) -> tuple[Ranks, list[Point]]:
        chosen = self.known(ranks)
        assert chosen is not None, "the chosen setting must have been evaluated"
        for p in self.points:
            p["chosen"] = p is chosen
        return dict(chosen["ranks"]), self.points


# ---------------------------------------------------------------------------------------
# The ladder of distinct models a global threshold produces
# ---------------------------------------------------------------------------------------


def threshold_ladder(spectra: Mapping[str, Spectrum]) -> list[tuple[float, Ranks]]:
    """Every distinct model a global threshold can build, from the dense one to the smallest.

    Each entry is ``(threshold, effective ranks)``; ``svt.ranks_threshold(spectra, threshold)``
    builds that model. Thresholds run over the pooled normalized singular values, so the
    parameters and FLOPs fall monotonically along the list. Consecutive thresholds that
    build the same model (only dense layers moved) are merged.
    """
    names = list(spectra)
    if not names:
        return [(0.0, {})]
    thresholds = torch.unique(svt.pooled_normalized(spectra))  # ascending: most kept first
    columns = []
    for name in names:
        sp = spectra[name]
        asc = sp.normalized.flip(0).contiguous()
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
) -> tuple[Ranks, list[Point]]:
    """The smallest model whose validation accuracy is within the budget of the dense one's."""
    s = _Search(spectra, other_params, other_flops, evaluate, max_evals)
    reference = s.point(s.full_ranks(), {"stage": "reference", "threshold": 0.0})
    target = accuracy_target(reference["val_accuracy"], max_drop, max_rel_drop)

    def meets(p: Point) -> bool:
        return bool(p["val_accuracy"] >= target - _EPS)

    for p in s.points:
        p["within_budget"] = meets(p)

    # Bisection: ladder[lo] meets the budget (lo = 0 is the dense model); ``hi`` is the first
    # index known to fail (len(ladder) when none is known yet).
    ladder = threshold_ladder(spectra)
    lo, hi = 0, len(ladder)
    while hi - lo > 1 and s.left > 0:
        mid = (lo + hi) // 2
        threshold, ranks = ladder[mid]
        p = s.point(ranks, {"stage": "bisection", "threshold": threshold})
        p["within_budget"] = meets(p)
        if p["within_budget"]:
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
                known = s.point(trial, {"stage": "refine", "step": count, "layer": name})
                known["within_budget"] = meets(known)
            if known["within_budget"]:
                current = dict(known["ranks"])
            else:
                steps[name] //= 2
                if steps[name] == 0:
                    frozen.add(name)
    return s.finish(current)


# ---------------------------------------------------------------------------------------
# Parameter / FLOP budget
# ---------------------------------------------------------------------------------------


def _weighted_fit(
    spectra: Mapping[str, Spectrum],
    weights: Mapping[str, float],
    cost: Callable[[Mapping[str, int]], int],
    limit: int,
) -> Ranks | None:
    """The most singular values a global threshold on ``weight * normalized`` keeps within ``limit``.

    None when even one value per layer does not fit.
    """
    names = list(spectra)
    scaled = {k: spectra[k].normalized * weights.get(k, 1.0) for k in names}
    candidates = torch.unique(torch.cat([scaled[k] for k in names])).flip(0)  # descending

    def ranks_at(t: float) -> Ranks:
        return {k: max(1, int((scaled[k] >= t).sum())) for k in names}

    lo, hi, best = 0, candidates.numel() - 1, -1
    while lo <= hi:
        mid = (lo + hi) // 2
        if cost(ranks_at(float(candidates[mid]))) <= limit:
            best, lo = mid, mid + 1
        else:
            hi = mid - 1
    if best < 0:
        return None
    return ranks_at(float(candidates[best]))


def search_cost_budget(
    spectra: Mapping[str, Spectrum],
    other_params: int,
    other_flops: int,
    evaluate: Evaluate,
    *,
    cost: str,
    budget: float,
    max_evals: int = 20,
) -> tuple[Ranks, list[Point]]:
    """The most accurate setting found whose ``cost`` ("params" or "flops") fits the budget."""
    if cost not in ("params", "flops"):
        raise ValueError(f"cost must be 'params' or 'flops', got {cost!r}")
    s = _Search(spectra, other_params, other_flops, evaluate, max_evals)
    measure = s.params if cost == "params" else s.flops
    dense = s.dense_params if cost == "params" else s.dense_flops
    limit = math.floor(budget * dense)
    other = other_params if cost == "params" else other_flops

    reference = s.point(s.full_ranks(), {"stage": "reference", "threshold": 0.0})
    reference["within_budget"] = measure(reference["ranks"]) <= limit
    start_ranks, threshold = svt.ranks_under_budget(spectra, cost, limit, other)
    if measure(start_ranks) > limit:
        smallest = {k: 1 for k in spectra}
        raise BudgetError(
            f"{cost}_budget {budget:g} cannot be met: the smallest model this policy builds "
            f"(rank 1 in every layer) has {measure(smallest):,} {cost}, "
            f"{measure(smallest) / dense:.1%} of the dense model's {dense:,}; raise the budget"
        )
    if reference["within_budget"]:  # the budget allows the dense model
        return s.finish(reference["ranks"])
    if not s.can_evaluate(start_ranks):
        return s.finish(reference["ranks"])  # pragma: no cover - max_evals >= 2 by schema
    best = s.point(start_ranks, {"stage": "start", "threshold": threshold})
    best["within_budget"] = True

    # Coordinate search over per-layer weights of the normalized singular values.
    weights = {k: 1.0 for k in spectra}
    order = sorted(spectra, key=lambda k: -spectra[k].dense_params())
    step = 0
    improved = True
    while improved and s.left > 0:
        improved = False
        for name in order:
            for factor in (2.0, 0.5):
                if s.left <= 0:
                    break
                trial_weights = {**weights, name: weights[name] * factor}
                trial = _weighted_fit(spectra, trial_weights, measure, limit)
                if trial is None or s.known(trial) is not None:
                    continue
                step += 1
                p = s.point(trial, {"stage": "variant", "step": step, "layer": name, "weight": factor})
                p["within_budget"] = True
                if p["val_accuracy"] > best["val_accuracy"] + _EPS:
                    best, weights, improved = p, trial_weights, True
                    break
    return s.finish(best["ranks"])


# ---------------------------------------------------------------------------------------
# Fixed policies and the entry point
# ---------------------------------------------------------------------------------------


def _fixed(
    ranks: Ranks,
    label: dict[str, Any],
    spectra: Mapping[str, Spectrum],
    other_params: int,
    other_flops: int,
    evaluate: Evaluate,
) -> tuple[Ranks, list[Point]]:
    s = _Search(spectra, other_params, other_flops, evaluate, max_evals=2)
    s.point(s.full_ranks(), {"stage": "reference", "threshold": 0.0})
    s.point(ranks, label)
    return s.finish(ranks)


def choose(
    policy: Any,
    spectra: Mapping[str, Spectrum],
    other_params: int,
    other_flops: int,
    evaluate: Evaluate,
) -> tuple[Ranks, list[Point]]:
    """The ranks ``policy`` asks for and every point evaluated (see the module docstring).

    ``other_params`` / ``other_flops`` count what is not in ``spectra`` (biases, norms, ...).
    Each point: ``stage``, ``threshold`` or ``step``, ``params``, ``flops``,
    ``params_fraction``, ``flops_fraction``, ``val_accuracy``, ``ranks`` (effective, per
    layer), ``chosen`` and, for the budget policies, ``within_budget``.
    """
    name = policy.policy
    if name == "accuracy_budget":
        return search_accuracy_budget(
            spectra,
            other_params,
            other_flops,
            evaluate,
            max_drop=policy.max_drop,
            max_rel_drop=policy.max_rel_drop,
            max_evals=policy.max_evals,
            refine=policy.refine,
        )
    if name in ("params_budget", "flops_budget"):
        return search_cost_budget(
            spectra,
            other_params,
            other_flops,
            evaluate,
            cost="params" if name == "params_budget" else "flops",
            budget=policy.budget,
            max_evals=policy.max_evals,
        )
    full = {k: sp.full_rank for k, sp in spectra.items()}
    if name == "none":
        ranks, label = full, {"stage": "none", "threshold": 0.0}
    elif name == "uniform":
        ranks, label = svt.ranks_uniform(spectra, policy.keep), {"stage": "uniform", "step": 0}
    elif name == "global":
        ranks = svt.ranks_global(spectra, policy.keep)
        pooled = svt.pooled_normalized(spectra)
        count = max(1, math.ceil(policy.keep * pooled.numel() - 1e-9)) if pooled.numel() else 0
        threshold = float(pooled[count - 1]) if count else 0.0
        label = {"stage": "global", "threshold": threshold}
    elif name == "energy":
        ranks, label = svt.ranks_energy(spectra, policy.energy), {"stage": "energy", "step": 0}
    else:
        raise ConfigError(f"unknown policy {name!r}")
    return _fixed(ranks, label, spectra, other_params, other_flops, evaluate)


def edge_points(points: Sequence[Point]) -> tuple[Point | None, Point | None]:
    """The chosen point and the most aggressive bisection point that failed right above it."""
    chosen = next((p for p in points if p.get("chosen")), None)
    failed = [
        p
        for p in points
        if p.get("stage") == "bisection" and not p.get("within_budget") and chosen is not None
    ]
    above = min(failed, key=lambda p: p["threshold"], default=None)
    return chosen, above
