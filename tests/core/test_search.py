"""core.search: the accuracy / parameter / FLOP budget searches.

Synthetic spectra with a fake monotone ``evaluate`` check the search logic exactly and
cheaply; a tiny FCN trained briefly on digits checks it on a real model.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping

import pytest
import torch

from core import search, svt
from core.config import AccuracyBudgetPolicy, ParamsBudgetPolicy
from core.data import DataBundle
from core.svt import Ranks, Spectrum

# ---------------------------------------------------------------------------------------
# synthetic spectra


def _spectrum(name: str, m: int, n: int, decay: float) -> Spectrum:
    k = min(m, n)
    s = torch.tensor([decay**i for i in range(k)], dtype=torch.float64)
    return Spectrum(
        name,
        "linear",
        m,
        n,
        torch.zeros(m, k, dtype=torch.float64),
        s,
        torch.zeros(k, n, dtype=torch.float64),
    )


@pytest.fixture
def spectra() -> dict[str, Spectrum]:
    return {
        "a": _spectrum("a", 96, 64, 0.9),
        "b": _spectrum("b", 96, 96, 0.8),
        "c": _spectrum("c", 10, 96, 0.7),
    }


class FakeEval:
    """Accuracy = weighted fraction of sum(sigma^2) kept (monotone in every rank); counts calls."""

    def __init__(self, spectra: dict[str, Spectrum], top: float = 0.9) -> None:
        self.spectra = spectra
        self.top = top
        self.calls: list[Ranks] = []
        self.weights = {"a": 0.2, "b": 0.7, "c": 0.1}

    def value(self, ranks: Ranks) -> float:
        kept = 0.0
        for k, sp in self.spectra.items():
            sq = sp.s.pow(2)
            kept += self.weights[k] * float(sq[: ranks[k]].sum() / sq.sum())
        return self.top * kept

    def __call__(self, ranks: Ranks) -> float:
        self.calls.append(dict(ranks))
        return self.value(ranks)


def test_ladder_runs_from_dense_to_smallest_with_falling_size(spectra: dict[str, Spectrum]) -> None:
    ladder = search.threshold_ladder(spectra)
    assert ladder[0][1] == {k: sp.full_rank for k, sp in spectra.items()}
    sizes = [svt.params_of(spectra, r) for _, r in ladder]
    assert all(x > y for x, y in itertools.pairwise(sizes))
    for threshold, ranks in ladder:  # each threshold really builds its model
        assert svt.effective_ranks(spectra, svt.ranks_threshold(spectra, threshold)) == ranks


def test_bisection_finds_the_edge_exactly(spectra: dict[str, Spectrum]) -> None:
    fake = FakeEval(spectra, top=0.9)
    ranks, points = search.search_accuracy_budget(
        spectra, 500, 1000, fake, max_drop=0.01, max_evals=50, refine=False
    )
    target = 0.9 - 0.01
    ladder = [r for _, r in search.threshold_ladder(spectra)]
    # brute force: the smallest model on the ladder that meets the budget
    expected = max(i for i, r in enumerate(ladder) if fake.value(r) >= target - 1e-12)
    assert ranks == ladder[expected]
    assert fake.value(ranks) >= target
    # the next more aggressive model was evaluated and fails
    nxt = ladder[expected + 1]
    assert nxt in fake.calls and fake.value(nxt) < target
    assert len(fake.calls) <= 1 + math.ceil(math.log2(len(ladder)))
    assert sum(p.chosen for p in points) == 1


def test_the_reference_is_measured_not_assumed(spectra: dict[str, Spectrum]) -> None:
    low, high = FakeEval(spectra, top=0.5), FakeEval(spectra, top=0.95)
    r_low, p_low = search.search_accuracy_budget(spectra, 0, 0, low, max_drop=0.01, refine=False)
    assert p_low[0].ranks == {k: sp.full_rank for k, sp in spectra.items()}
    assert p_low[0].val_accuracy == pytest.approx(0.5)
    # a relative budget scales with the measured reference: same edge for both scales
    r_a, _ = search.search_accuracy_budget(spectra, 0, 0, low, max_rel_drop=0.02, refine=False)
    r_b, _ = search.search_accuracy_budget(spectra, 0, 0, high, max_rel_drop=0.02, refine=False)
    assert r_a == r_b
    assert low.value(r_low) >= 0.5 - 0.01


@pytest.mark.parametrize("max_evals", [2, 5, 9, 20])
def test_refinement_stays_within_budget_and_max_evals(spectra: dict[str, Spectrum], max_evals: int) -> None:
    fake = FakeEval(spectra)
    ranks, points = search.search_accuracy_budget(
        spectra, 500, 1000, fake, max_drop=0.02, max_evals=max_evals, refine=True
    )
    assert len(fake.calls) <= max_evals
    assert len(points) == len(fake.calls)
    assert fake.value(ranks) >= 0.9 - 0.02 - 1e-12
    keys = [tuple(c[k] for k in spectra) for c in fake.calls]
    assert len(keys) == len(set(keys)), "the same model was evaluated twice"


def test_refinement_only_ever_shrinks_the_bisection_result(spectra: dict[str, Spectrum]) -> None:
    plain, _ = search.search_accuracy_budget(spectra, 0, 0, FakeEval(spectra), max_drop=0.02, refine=False)
    fake = FakeEval(spectra)
    refined, _points = search.search_accuracy_budget(
        spectra, 0, 0, fake, max_drop=0.02, max_evals=40, refine=True
    )
    assert all(refined[k] <= plain[k] for k in spectra)
    assert svt.params_of(spectra, refined) < svt.params_of(spectra, plain)
    # a local edge: lowering any layer one rank more was tried and failed (or is impossible)
    target = 0.9 - 0.02
    for k, sp in spectra.items():
        lower = {**refined, k: refined[k] - 1}
        if refined[k] > 1 and sp.factorizes(refined[k] - 1):
            assert fake.value(lower) < target


def test_params_budget_fits_and_picks_the_most_accurate_evaluated(spectra: dict[str, Spectrum]) -> None:
    fake = FakeEval(spectra)
    other = 500
    dense = svt.params_of(spectra, {k: sp.full_rank for k, sp in spectra.items()}, other)
    ranks, points = search.choose(
        ParamsBudgetPolicy(policy="params_budget", budget=0.3, max_evals=8), spectra, other, 0, fake
    )
    limit = math.floor(0.3 * dense)
    assert svt.params_of(spectra, ranks, other) <= limit
    assert len(fake.calls) <= 8
    under = [p for p in points if p.params <= limit]
    chosen = next(p for p in points if p.chosen)
    assert chosen.val_accuracy == max(p.val_accuracy for p in under)
    fit = svt.ranks_under_budget(
        svt.normalized_scores(spectra), lambda r: svt.params_of(spectra, r, other), limit
    )
    assert fit is not None
    assert fake.value(ranks) >= fake.value(svt.effective_ranks(spectra, fit[0]))


def test_an_impossible_budget_says_what_is_possible(spectra: dict[str, Spectrum]) -> None:
    with pytest.raises(search.BudgetError, match="smallest model"):
        search.search_cost_budget(spectra, 10_000, 0, FakeEval(spectra), cost="params", budget=0.01)


def test_pareto_points_are_what_the_report_records(spectra: dict[str, Spectrum]) -> None:
    from core.report import SearchPoint

    _, points = search.choose(
        AccuracyBudgetPolicy(policy="accuracy_budget", max_drop=0.01), spectra, 10, 20, FakeEval(spectra)
    )
    for p in points:
        SearchPoint.model_validate(p)  # every field of the point has its place in the report
        assert (p.threshold is not None) or (p.step is not None)
        assert p.within_budget is not None
    assert [p.evaluation for p in points] == list(range(1, len(points) + 1))
    assert points[0].stage == "reference"
    assert points[0].params_fraction == 1.0 and points[0].flops_fraction == 1.0


def test_global_policy_point_carries_the_threshold_svt_used(spectra: dict[str, Spectrum]) -> None:
    from core.config import GlobalPolicy

    ranks, points = search.choose(GlobalPolicy(policy="global", keep=0.3), spectra, 0, 0, FakeEval(spectra))
    chosen = next(p for p in points if p.chosen)
    assert chosen.threshold is not None
    assert ranks == svt.effective_ranks(spectra, svt.ranks_threshold(spectra, chosen.threshold))


def test_a_custom_allocation_plugs_into_the_budget_searches(spectra: dict[str, Spectrum]) -> None:
    """An Importance that favours layer "b" keeps more of it than the default at the same budget."""

    def favour_b(sp: Mapping[str, Spectrum]) -> svt.Scores:
        return {k: s.normalized * (4.0 if k == "b" else 1.0) for k, s in sp.items()}

    def fit(importance: search.Importance | None) -> Ranks:
        # two evaluations: the reference and the start, the threshold fit of the scores
        return search.search_cost_budget(
            spectra, 0, 0, FakeEval(spectra), cost="params", budget=0.3, max_evals=2, importance=importance
        ).ranks

    default, custom = fit(None), fit(favour_b)
    assert custom["b"] > default["b"]
    assert svt.params_of(spectra, custom) <= 0.3 * svt.params_of(
        spectra, {k: sp.full_rank for k, sp in spectra.items()}
    )


def test_a_custom_cost_plugs_into_the_cost_budget(spectra: dict[str, Spectrum]) -> None:
    """Any monotone cost can be budgeted: here, the rank of layer "a" alone."""
    cost = search.Cost("rank_a", lambda r: r.get("a", spectra["a"].full_rank))
    ranks, points = search.search_cost_budget(spectra, 0, 0, FakeEval(spectra), cost=cost, budget=0.25)
    assert ranks["a"] <= 0.25 * spectra["a"].full_rank
    assert all(p.within_budget == (p.ranks["a"] <= 0.25 * spectra["a"].full_rank) for p in points)


def test_a_search_error_is_its_own_type(spectra: dict[str, Spectrum]) -> None:
    assert issubclass(search.BudgetError, search.SearchError)
    from core.config import ConfigError

    assert not issubclass(search.SearchError, ConfigError)  # the pipeline maps it


Trained = tuple[torch.nn.Module, DataBundle, dict[str, Spectrum]]


# ---------------------------------------------------------------------------------------
# a real model: tiny FCN, short LoRITa training on digits


@pytest.fixture(scope="module")
def trained() -> Trained:
    from core.config import DatasetConfig
    from core.data import load_data
    from core.lorita import apply_lorita, collapse
    from core.train import FitSettings, fit
    from core.zoo import build_model

    torch.manual_seed(0)
    data = load_data(DatasetConfig(name="digits", val_fraction=0.2), seed=0)
    model = build_model("fcn", 10, data.input_shape, {"depth": 3, "width": 32})
    apply_lorita(model, 2, init="scratch", seed=0)
    fit(
        model,
        data.train,
        data.val,
        FitSettings(epochs=6, lr=1e-2, weight_decay=2e-4, batch_size=64),
        device=torch.device("cpu"),
    )
    collapse(model)
    model.eval()
    return model, data, svt.compute_spectra(model, data.input_shape)


def _others(model: torch.nn.Module, data: DataBundle, spectra: dict[str, Spectrum]) -> tuple[int, int]:
    from core.metrics import count_flops, count_params

    params = count_params(model) - sum(sp.dense_params() for sp in spectra.values())
    flops = count_flops(model, data.input_shape) - sum(sp.flops_at(sp.full_rank) for sp in spectra.values())
    return params, flops


def test_accuracy_budget_on_digits_finds_the_edge(trained: Trained) -> None:
    from core.train import accuracy

    model, data, spectra = trained
    calls: list[Ranks] = []

    def evaluate(ranks: Ranks) -> float:
        calls.append(ranks)
        return accuracy(svt.truncate(model, spectra, ranks), data.val)

    other_params, other_flops = _others(model, data, spectra)
    policy = AccuracyBudgetPolicy(policy="accuracy_budget", max_drop=0.02, max_evals=20, refine=False)
    ranks, points = search.choose(policy, spectra, other_params, other_flops, evaluate)
    assert len(calls) <= 20
    dense_val = accuracy(model, data.val)
    got = accuracy(svt.truncate(model, spectra, ranks), data.val)  # measured again, independently
    assert got >= dense_val - 0.02 - 1e-9
    chosen = next(p for p in points if p.chosen)
    assert chosen.params_fraction < 1.0
    # the next-higher threshold tried in the bisection does not meet the budget
    ladder = search.threshold_ladder(spectra)
    index = next(i for i, (_, r) in enumerate(ladder) if r == ranks)
    assert index + 1 < len(ladder), "rank 1 everywhere cannot meet a 2-point budget"
    nxt = ladder[index + 1][1]
    assert nxt in calls
    assert accuracy(svt.truncate(model, spectra, nxt), data.val) < dense_val - 0.02


def test_accuracy_budget_with_refinement_on_digits(trained: Trained) -> None:
    from core.train import accuracy

    model, data, spectra = trained
    calls: list[Ranks] = []

    def evaluate(ranks: Ranks) -> float:
        calls.append(ranks)
        return accuracy(svt.truncate(model, spectra, ranks), data.val)

    policy = AccuracyBudgetPolicy(policy="accuracy_budget", max_drop=0.02, max_evals=12)
    ranks, points = search.choose(policy, spectra, *_others(model, data, spectra), evaluate)
    assert len(calls) <= 12
    dense_val = points[0].val_accuracy
    assert accuracy(svt.truncate(model, spectra, ranks), data.val) >= dense_val - 0.02 - 1e-9
    chosen = next(p for p in points if p.chosen)
    # something smaller than the chosen model was tried and rejected
    assert any(p.params < chosen.params and not p.within_budget for p in points)


def test_params_budget_on_digits_keeps_at_most_the_budget(trained: Trained) -> None:
    from core.metrics import count_params
    from core.train import accuracy

    model, data, spectra = trained
    policy = ParamsBudgetPolicy(policy="params_budget", budget=0.3, max_evals=6)
    ranks, _ = search.choose(
        policy,
        spectra,
        *_others(model, data, spectra),
        lambda r: accuracy(svt.truncate(model, spectra, r), data.val),
    )
    small = svt.truncate(model, spectra, ranks)
    assert count_params(small) <= 0.3 * count_params(model)


@pytest.mark.parametrize("policy", ["params_budget", "flops_budget"])
def test_a_cost_budget_needs_two_evaluations(policy: str) -> None:
    # one evaluation is the dense reference alone: the search could only return the dense
    # model, over its budget, so the config refuses it up front
    from core.config import ConfigError, parse_config

    base = {"model": {"arch": "fcn"}, "dataset": {"name": "digits"}}
    with pytest.raises(ConfigError, match="max_evals"):
        parse_config(base | {"compress": {"policy": policy, "budget": 0.3, "max_evals": 1}})
    assert parse_config(base | {"compress": {"policy": policy, "budget": 0.3, "max_evals": 2}})
