"""Singular value truncation: SVD each eligible weight once, choose ranks, build thin layers.

The SVDs are computed once (:func:`compute_spectra`) and every rank setting only slices
them, so a search over many settings costs one SVD per layer in total.

Singular values are compared after dividing each layer's by its largest (for Linear and
Conv2d alike), so layers of different scale can share one global threshold.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from core.layers import (
    matrix_shape,
    named_matrix_layers,
    saves_parameters,
    set_submodule,
    thin_pair_from_factors,
    weight_of,
)

Ranks = dict[str, int]


@dataclass
class Spectrum:
    """The SVD of one layer's weight seen as an ``m x n`` matrix (float64, on the CPU)."""

    name: str
    kind: str  # "linear" | "conv"
    m: int
    n: int
    u: torch.Tensor  # (m, k)
    s: torch.Tensor  # (k,)
    vh: torch.Tensor  # (k, n)
    positions: int = 1  # output positions per sample (conv: H_out*W_out; linear: tokens)

    @property
    def full_rank(self) -> int:
        return int(self.s.numel())

    @property
    def normalized(self) -> torch.Tensor:
        top = self.s[0] if self.s.numel() and self.s[0] > 0 else torch.tensor(1.0, dtype=self.s.dtype)
        return self.s / top

    def dense_params(self) -> int:
        return self.m * self.n

    def params_at(self, rank: int) -> int:
        """Weights stored at ``rank`` (the layer stays dense when a thin pair would not save)."""
        return rank * (self.m + self.n) if self.factorizes(rank) else self.m * self.n

    def flops_at(self, rank: int) -> int:
        return 2 * self.positions * self.params_at(rank)

    def factorizes(self, rank: int) -> bool:
        return rank < self.full_rank and saves_parameters(rank, self.m, self.n)


def output_positions(model: nn.Module, names: Iterable[str], input_shape: tuple[int, ...]) -> dict[str, int]:
    """Per-sample output positions of each layer (what its weight is applied to), via one forward."""
    wanted = set(names)
    seen: dict[str, int] = {}
    hooks = []

    def make_hook(name: str, mod: nn.Module) -> Callable[[nn.Module, object, torch.Tensor], None]:
        def hook(_m: nn.Module, _inp: object, out: torch.Tensor) -> None:
            per_sample = out.shape[1:]
            if isinstance(mod, nn.Conv2d):
                seen[name] = seen.get(name, 0) + math.prod(per_sample[1:])
            else:
                seen[name] = seen.get(name, 0) + math.prod(per_sample[:-1])

        return hook

    for name, mod in model.named_modules():
        if name in wanted:
            hooks.append(mod.register_forward_hook(make_hook(name, mod)))
    probe_forward(model, input_shape, hooks)
    return seen


def probe_forward(model: nn.Module, input_shape: Sequence[int], hooks: Sequence[Any]) -> None:
    """One eval-mode forward pass of a zero sample on the model's device, for ``hooks`` to watch;
    removes the hooks and restores the model's mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        with torch.no_grad():
            model(torch.zeros(1, *input_shape, device=device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)


def compute_spectra(
    model: nn.Module, input_shape: tuple[int, ...] | None = None, names: Iterable[str] | None = None
) -> dict[str, Spectrum]:
    """SVD of every Linear and ungrouped Conv2d weight (or of ``names``), in model order.

    With ``input_shape`` each spectrum also knows how many output positions its layer
    serves per sample, which makes FLOP estimates exact without re-running the model.
    """
    layers = named_matrix_layers(model, names)
    positions = output_positions(model, [n for n, _ in layers], input_shape) if input_shape else {}
    spectra: dict[str, Spectrum] = {}
    for name, layer in layers:
        m, n = matrix_shape(layer)
        matrix = weight_of(layer).detach().reshape(m, n).to("cpu", torch.float64)
        u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
        kind = "conv" if isinstance(layer, nn.Conv2d) else "linear"
        spectra[name] = Spectrum(name, kind, m, n, u, s, vh, positions.get(name, 1))
    return spectra


# ---------------------------------------------------------------------------------------
# Rank policies (the ones that need no data)
# ---------------------------------------------------------------------------------------


def ranks_uniform(spectra: Mapping[str, Spectrum], keep: float) -> Ranks:
    """Keep the same fraction of each layer's singular values (at least one)."""
    return {k: max(1, math.ceil(keep * sp.full_rank - 1e-9)) for k, sp in spectra.items()}


Scores = dict[str, torch.Tensor]


def normalized_scores(spectra: Mapping[str, Spectrum]) -> Scores:
    """Per layer, its singular values divided by its largest: the default allocation score."""
    return {k: sp.normalized for k, sp in spectra.items()}


def ranks_at(scores: Mapping[str, torch.Tensor], threshold: float) -> Ranks:
    """Keep, per layer, the values scored >= ``threshold`` (at least one).

    ``scores`` are non-increasing along each layer (index 0 scores the largest singular value),
    so the kept values are always a layer's leading ones.
    """
    return {k: max(1, int((s >= threshold).sum())) for k, s in scores.items()}


def ranks_threshold(spectra: Mapping[str, Spectrum], threshold: float) -> Ranks:
    """Keep every normalized singular value >= ``threshold`` (at least one per layer)."""
    return ranks_at(normalized_scores(spectra), threshold)


def pooled_normalized(spectra: Mapping[str, Spectrum]) -> torch.Tensor:
    """All normalized singular values, sorted from largest to smallest."""
    if not spectra:
        return torch.zeros(0, dtype=torch.float64)
    return torch.cat([sp.normalized for sp in spectra.values()]).sort(descending=True).values


def ranks_global(spectra: Mapping[str, Spectrum], keep: float) -> tuple[Ranks, float]:
    """Keep the largest ``keep`` fraction of all per-layer-normalized singular values.

    Returns the ranks and the threshold on the normalized values that keeps them.
    """
    pooled = pooled_normalized(spectra)
    if pooled.numel() == 0:
        return {}, 0.0
    count = max(1, math.ceil(keep * pooled.numel() - 1e-9))
    threshold = float(pooled[count - 1])
    return ranks_threshold(spectra, threshold), threshold


def ranks_energy(spectra: Mapping[str, Spectrum], energy: float) -> Ranks:
    """Per layer, the smallest rank holding ``energy`` of ``sum(sigma^2)``."""
    ranks: Ranks = {}
    for k, sp in spectra.items():
        sq = sp.s.pow(2)
        total = float(sq.sum())
        if total == 0.0:
            ranks[k] = 1
            continue
        cum = torch.cumsum(sq, 0) / total
        ranks[k] = min(sp.full_rank, int((cum < energy - 1e-12).sum()) + 1)
    return ranks


def params_of(spectra: Mapping[str, Spectrum], ranks: Mapping[str, int], other: int = 0) -> int:
    """Parameters of the model at ``ranks``: ``other`` counts everything not in ``spectra``."""
    return other + sum(sp.params_at(ranks.get(k, sp.full_rank)) for k, sp in spectra.items())


def flops_of(spectra: Mapping[str, Spectrum], ranks: Mapping[str, int], other: int = 0) -> int:
    return other + sum(sp.flops_at(ranks.get(k, sp.full_rank)) for k, sp in spectra.items())


def ranks_under_budget(
    scores: Mapping[str, torch.Tensor], cost: Callable[[Ranks], float], limit: float
) -> tuple[Ranks, float] | None:
    """The lowest global threshold on ``scores`` (most values kept) whose ``cost`` is at most ``limit``.

    ``cost`` maps ranks to the model's cost (parameters, FLOPs, ...) and never grows when a
    rank falls, so the cost is monotone in the threshold and a binary search over the pooled
    scores finds the edge exactly. Returns the ranks and the threshold, or None when even
    one value per layer (the smallest model a threshold builds) costs more than ``limit``.
    This is the one budget-fitting routine: the budget searches call it with the default
    scores (:func:`normalized_scores`) or with per-layer weighted ones.
    """
    names = list(scores)
    if not names:
        return ({}, 1.0) if cost({}) <= limit else None
    candidates = torch.unique(torch.cat([scores[k] for k in names])).flip(0)  # descending
    lo, hi, best = 0, candidates.numel() - 1, -1  # the last index (most kept) that fits
    while lo <= hi:
        mid = (lo + hi) // 2
        if cost(ranks_at(scores, float(candidates[mid]))) <= limit:
            best, lo = mid, mid + 1
        else:
            hi = mid - 1
    if best < 0:
        return None
    threshold = float(candidates[best])
    return ranks_at(scores, threshold), threshold


# ---------------------------------------------------------------------------------------
# Building the compressed model
# ---------------------------------------------------------------------------------------


def truncate(
    model: nn.Module,
    spectra: Mapping[str, Spectrum],
    ranks: Mapping[str, int],
    force_factorize: bool = False,
) -> nn.Module:
    """A copy of ``model`` in which each layer with a saving rank becomes a thin pair.

    Note: the pair stores ``U_r S_r^(1/2)`` and ``S_r^(1/2) V_r^T`` (balanced), which keeps
    both thin layers at the same scale for fine-tuning. A layer whose thin pair would not
    save parameters stays dense and untouched (truncating it would lose accuracy for
    nothing) unless ``force_factorize`` (used to check exactness at full rank).
    The original ``model`` is never modified, so candidates never share state
    (BatchNorm statistics included).
    """
    out = copy.deepcopy(model)
    for name, sp in spectra.items():
        rank = int(ranks.get(name, sp.full_rank))
        if not 1 <= rank <= sp.full_rank:
            raise ValueError(f"rank {rank} for {name} is outside 1..{sp.full_rank}")
        if not (sp.factorizes(rank) or force_factorize):
            continue
        layer = out.get_submodule(name)
        weight = weight_of(layer)
        root = sp.s[:rank].sqrt()
        left = (sp.u[:, :rank] * root).to(weight.device, weight.dtype)
        right = (root[:, None] * sp.vh[:rank]).to(weight.device, weight.dtype)
        pair = thin_pair_from_factors(layer, left, right)
        set_submodule(out, name, pair)
    return out


def rank_table(spectra: Mapping[str, Spectrum], ranks: Mapping[str, int]) -> dict[str, dict[str, object]]:
    """Per layer: matrix shape, full rank, kept rank, and whether it became a thin pair."""
    table: dict[str, dict[str, object]] = {}
    for name, sp in spectra.items():
        rank = int(ranks.get(name, sp.full_rank))
        factorized = sp.factorizes(rank)
        table[name] = {
            "kind": sp.kind,
            "shape": [sp.m, sp.n],
            "full_rank": sp.full_rank,
            "kept_rank": rank if factorized else sp.full_rank,
            "factorized": factorized,
        }
    return table


def effective_ranks(spectra: Mapping[str, Spectrum], ranks: Mapping[str, int]) -> Ranks:
    """Ranks as they take effect: a layer that stays dense keeps its full rank."""
    out: Ranks = {}
    for k, sp in spectra.items():
        rank = int(ranks.get(k, sp.full_rank))
        out[k] = rank if sp.factorizes(rank) else sp.full_rank
    return out


def count_above(spectra: Mapping[str, Spectrum], threshold: float) -> int:
    """Normalized singular values above ``threshold``, over all layers (the LoRITa signature)."""
    return sum(int((sp.normalized > threshold).sum()) for sp in spectra.values())
