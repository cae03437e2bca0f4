"""Rank allocation by measured sensitivity: what each singular value costs in validation accuracy.

The default allocation (:class:`core.search.NormalizedSingularValues`) keeps the singular values
above one global threshold on ``sigma_i / sigma_1``. At an aggressive parameter budget that
starves some layers: a 10-class classifier left with rank 5 (each of its ranks costs ~100
parameters) while hidden layers keep generous ranks, or a wide input layer cut to rank 4.

:class:`SensitivityAllocation` scores singular value ``i`` of layer ``l`` by the validation
accuracy it is expected to buy per unit of cost, and the budget search keeps the values above one
threshold on those scores, i.e. a greedy (fractional-knapsack) allocation under the budget:

    score(l, i) = s_l * e_l(i) / c_l

- ``e_l(i) = sigma_i^2 / sum_j sigma_j^2``: the share of the layer's energy the value carries
  (from the singular values alone).
- ``c_l``: what one rank of the layer costs, ``m + n`` parameters (x 2 x output positions for
  a FLOP budget).
- ``s_l``: the layer's sensitivity, measured on validation, as accuracy change per unit of energy
  moved (``max(change, floor) / energy``). ``probe_at="budget"`` (the default): from the global
  threshold's fit under the same budget (evaluated once), one layer at a time is given up to twice
  its rank there (a layer left dense there is cut to half its largest saving rank instead), every
  other layer staying truncated, so the probes see how truncations compound.
  ``probe_at="dense"``: the layer alone is truncated to its rank in that fit, every other layer
  dense. One evaluation per layer, through the search (cached, counted in ``max_evals``, shown on
  the Pareto curve as stage ``probe``); the largest layers are probed first, at most about half of
  the evaluations left, and a layer not probed gets the median sensitivity of those that were.

Because ``e_l`` falls along a layer, the scores do too, as the budget search needs.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

import torch

from core.svt import Ranks, Scores, Spectrum

# ``probe(ranks, layer)``: the validation accuracy of the model at ``ranks`` (``layer`` names
# the layer being probed, for the report), or None when no evaluation is left.
Probe = Callable[[Mapping[str, int], str], float | None]

# The smallest accuracy drop a probe is credited with, so that a layer that lost nothing at its
# probe rank still ranks its values by energy instead of all scoring zero.
DROP_FLOOR = 1e-3


@dataclass(frozen=True)
class LayerSensitivity:
    """What a probe measured for one layer (``probe_rank`` None: not probed, median used)."""

    layer: str
    probe_rank: int | None
    drop: float | None
    removed_energy: float | None
    sensitivity: float


def energy_shares(sp: Spectrum) -> torch.Tensor:
    """``sigma_i^2 / sum_j sigma_j^2`` (all zeros for a zero matrix)."""
    sq = sp.s.pow(2)
    total = float(sq.sum())
    return sq / total if total > 0 else torch.zeros_like(sq)


def rank_cost(sp: Spectrum, cost: Literal["params", "flops"]) -> float:
    """What one more rank of the thin pair costs."""
    per_rank = float(sp.m + sp.n)
    return per_rank * 2 * sp.positions if cost == "flops" else per_rank


def probe_rank(sp: Spectrum, hint: int | None) -> int | None:
    """The rank a layer is probed at: ``hint`` where its thin pair saves, else the largest that saves.

    None when no rank below full saves anything (the layer always stays dense).
    """
    breakeven = (sp.m * sp.n - 1) // (sp.m + sp.n)  # the largest r with r (m + n) < m n
    top = min(sp.full_rank - 1, breakeven)
    if top < 1:
        return None
    return max(1, min(hint if hint is not None else top, top))


class SensitivityAllocation:
    """Allocate ranks by measured cost in validation accuracy (see the module docstring).

    Plugs into :mod:`core.search` as an ``Importance``: called plainly it returns the
    scores with every layer equally sensitive (energy per unit of cost, no evaluation);
    :meth:`measure` probes the layers first. ``last`` holds what the last measurement found.
    """

    name = "sensitivity"

    def __init__(
        self,
        cost: Literal["params", "flops"] = "params",
        floor: float = DROP_FLOOR,
        probe_at: Literal["budget", "dense"] = "budget",
    ) -> None:
        self.cost = cost
        self.floor = floor
        self.probe_at = probe_at
        self.last: list[LayerSensitivity] = []

    def __call__(self, spectra: Mapping[str, Spectrum]) -> Scores:
        return self.scores(spectra, {k: 1.0 for k in spectra})

    def scores(self, spectra: Mapping[str, Spectrum], sensitivity: Mapping[str, float]) -> Scores:
        return {
            k: energy_shares(sp) * (sensitivity[k] / rank_cost(sp, self.cost)) for k, sp in spectra.items()
        }

    def measure(
        self,
        spectra: Mapping[str, Spectrum],
        probe: Probe,
        hint: Mapping[str, int] | None,
        evaluations: int,
    ) -> Scores:
        """Probe each layer once (largest first, within half of ``evaluations``); the scores.

        ``probe_at="budget"`` (with a ``hint``): start from the hint (the global threshold's fit
        under the budget) and move one layer at a time, up to twice its rank (or, for a layer left
        dense there, down to half its largest saving rank): the accuracy it buys per unit of energy
        where the budget puts the model, with every other layer truncated as well.
        ``probe_at="dense"``: truncate one layer alone to its hint rank, every other layer dense.
        """
        at_budget = self.probe_at == "budget" and hint is not None
        base: Ranks = (
            {k: int(hint[k]) for k in spectra}
            if at_budget and hint is not None
            else {k: sp.full_rank for k, sp in spectra.items()}
        )
        # Leave at least one evaluation for the start the scores give (and about half for the search).
        allowance = max(0, evaluations - 1 - (1 if at_budget else 0)) // 2
        reference = probe(base, "") if allowance > 0 else None
        if reference is None:
            self.last = []
            return self(spectra)
        order = sorted(spectra, key=lambda k: -spectra[k].dense_params())
        measured: dict[str, LayerSensitivity] = {}
        for name in order:
            if len(measured) >= allowance:
                break
            sp = spectra[name]
            shares = energy_shares(sp)
            top = probe_rank(sp, None)
            if top is None:
                continue
            if not at_budget:
                rank = probe_rank(sp, hint.get(name) if hint is not None else None)
                assert rank is not None
                acc = probe({**base, name: rank}, name)
                if acc is None:
                    break
                moved, change = float(shares[rank:].sum()), reference - acc
            else:
                here = base[name]
                if here < top:  # raise it: what does more rank here buy?
                    rank = min(top, max(here + 1, 2 * here))
                    moved = float(shares[here:rank].sum())
                else:  # dense at the budget's fit: what does cutting it cost?
                    rank = max(1, top // 2)
                    moved = float(shares[rank:].sum())
                acc = probe({**base, name: rank}, name)
                if acc is None:
                    break
                change = acc - reference if here < top else reference - acc
            sens = max(change, self.floor) / max(moved, 1e-12)
            measured[name] = LayerSensitivity(name, rank, change, moved, sens)
        fallback = statistics.median(m.sensitivity for m in measured.values()) if measured else 1.0
        self.last = [
            measured.get(name, LayerSensitivity(name, None, None, None, fallback)) for name in spectra
        ]
        return self.scores(spectra, {m.layer: m.sensitivity for m in self.last})


def classifier_warning(
    spectra: Mapping[str, Spectrum], ranks: Mapping[str, int], num_classes: int
) -> tuple[str, str] | None:
    """``(layer, message)`` when the classifier was truncated below the number of classes.

    The classifier is the last linear layer with ``num_classes`` outputs. Its rank was lowered
    below ``min(num_classes, full rank)`` only if the policy chose so (a rank the architecture
    already limits is not flagged).
    """
    name = next(
        (k for k in reversed(list(spectra)) if spectra[k].kind == "linear" and spectra[k].m == num_classes),
        None,
    )
    if name is None:
        return None
    sp = spectra[name]
    rank = int(ranks.get(name, sp.full_rank))
    if not sp.factorizes(rank) or rank >= min(num_classes, sp.full_rank):
        return None
    return name, (
        f"the classifier keeps rank {rank} for {num_classes} classes: its logits span only {rank} "
        "directions, so some classes can become hard to tell apart; raise the budget or use "
        "compress.allocation 'sensitivity'"
    )
