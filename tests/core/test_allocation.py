"""compress.allocation 'sensitivity': ranks by measured cost in validation accuracy, within the budget."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from core import search, svt
from core.allocation import SensitivityAllocation, classifier_warning, probe_rank
from core.config import ConfigError, parse_config
from core.pipeline import run_job, select
from core.report import read_report
from core.svt import Ranks, Spectrum


def _random_spectrum(name: str, m: int, n: int, seed: int, positions: int = 1) -> Spectrum:
    gen = torch.Generator().manual_seed(seed)
    u, s, vh = torch.linalg.svd(torch.randn(m, n, generator=gen, dtype=torch.float64), full_matrices=False)
    return Spectrum(name, "linear", m, n, u, s, vh, positions)


class Sensitive:
    """A model whose accuracy depends clearly on layer "a" and barely on the others.

    Accuracy = chance + (top - chance) * (energy kept in "a") - a small penalty per layer for the
    energy lost elsewhere; monotone in every rank. Counts calls.
    """

    def __init__(self, spectra: dict[str, Spectrum], sensitive: str = "a") -> None:
        self.spectra, self.sensitive = spectra, sensitive
        self.calls = 0

    def kept(self, name: str, rank: int) -> float:
        sq = self.spectra[name].s.pow(2)
        return float(sq[:rank].sum() / sq.sum())

    def __call__(self, ranks: Ranks) -> float:
        self.calls += 1
        acc = 0.1 + 0.85 * self.kept(self.sensitive, ranks[self.sensitive]) ** 4
        for k in self.spectra:
            if k != self.sensitive:
                acc -= 0.02 * (1.0 - self.kept(k, ranks[k]))
        return acc


@pytest.fixture
def twins() -> dict[str, Spectrum]:
    """Layers of the same shape and the same kind of spectrum: only their sensitivity differs."""
    return {
        "a": _random_spectrum("a", 48, 48, 0),
        "b": _random_spectrum("b", 48, 48, 1),
        "c": _random_spectrum("c", 48, 48, 2),
    }


def _dense_params(spectra: dict[str, Spectrum], other: int = 0) -> int:
    return svt.params_of(spectra, {k: sp.full_rank for k, sp in spectra.items()}, other)


def test_the_sensitive_layer_gets_more_rank_than_the_global_threshold_gives_it(
    twins: dict[str, Spectrum],
) -> None:
    limit = math.floor(0.3 * _dense_params(twins))
    threshold_fit = svt.ranks_under_budget(
        svt.normalized_scores(twins), lambda r: svt.params_of(twins, r), limit
    )
    assert threshold_fit is not None
    global_ranks = threshold_fit[0]  # what the global threshold gives every layer under the budget
    assert max(global_ranks.values()) - min(global_ranks.values()) <= 3  # twins: about the same

    alloc = SensitivityAllocation("params")
    kwargs = {"cost": "params", "budget": 0.3, "max_evals": 10}  # reference, fit, 3 probes, start, variants
    sens = search.search_cost_budget(twins, 0, 0, Sensitive(twins), importance=alloc, **kwargs)  # type: ignore[arg-type]
    glob = search.search_cost_budget(twins, 0, 0, Sensitive(twins), **kwargs)  # type: ignore[arg-type]
    assert sens.ranks["a"] > global_ranks["a"] + 5, (sens.ranks, global_ranks)
    assert sens.ranks["a"] > max(sens.ranks["b"], sens.ranks["c"])
    # Its start point alone is more accurate than the global threshold's, and it ends no worse
    # than the global search with the same evaluations.
    start = next(p for p in sens.points if p.stage == "start")
    global_start = next(p for p in glob.points if p.stage == "start")
    assert start.val_accuracy > global_start.val_accuracy + 0.05
    assert sens.chosen.val_accuracy >= glob.chosen.val_accuracy
    # The probes measured "a" as the most sensitive layer.
    by_layer = {m.layer: m for m in alloc.last}
    assert by_layer["a"].sensitivity > 10 * max(by_layer["b"].sensitivity, by_layer["c"].sensitivity)


@pytest.mark.parametrize("budget", [0.07, 0.1, 0.15, 0.3, 0.6])
@pytest.mark.parametrize("cost", ["params", "flops"])
@pytest.mark.parametrize("max_evals", [2, 3, 5, 20])
def test_never_exceeds_the_budget_nor_max_evals(budget: float, cost: str, max_evals: int) -> None:
    spectra = {
        "first": _random_spectrum("first", 96, 784, 3, positions=1),
        "conv": _random_spectrum("conv", 32, 288, 4, positions=64),
        "hidden": _random_spectrum("hidden", 96, 96, 5),
        "head": _random_spectrum("head", 10, 96, 6),
    }
    other_params, other_flops = 500, 2_000
    evaluate = Sensitive(spectra, sensitive="head")
    result = search.search_cost_budget(
        spectra,
        other_params,
        other_flops,
        evaluate,
        cost=cost,  # type: ignore[arg-type]
        budget=budget,
        max_evals=max_evals,
        importance=SensitivityAllocation(cost),  # type: ignore[arg-type]
    )
    measure = svt.params_of if cost == "params" else svt.flops_of
    other = other_params if cost == "params" else other_flops
    dense = measure(spectra, {k: sp.full_rank for k, sp in spectra.items()}, other)
    assert measure(spectra, result.ranks, other) <= math.floor(budget * dense)
    assert evaluate.calls <= max_evals
    assert len(result.points) <= max_evals
    assert sum(p.chosen for p in result.points) == 1
    assert result.chosen.within_budget
    if max_evals >= 3:  # the global threshold's own fit competes: never worse on validation
        fit = svt.ranks_under_budget(
            svt.normalized_scores(spectra),
            lambda r: measure(spectra, r, other),
            math.floor(budget * dense),
        )
        assert fit is not None
        assert result.chosen.val_accuracy >= Sensitive(spectra, sensitive="head")(fit[0]) - 1e-12


def test_probes_are_evaluations_of_the_search_on_its_pareto_curve(twins: dict[str, Spectrum]) -> None:
    evaluate = Sensitive(twins)
    result = search.search_cost_budget(
        twins, 0, 0, evaluate, cost="params", budget=0.2, max_evals=20, importance=SensitivityAllocation()
    )
    probes = [p for p in result.points if p.stage == "probe"]
    base = next(p for p in probes if p.layer is None)  # the global threshold's fit under the budget
    moved = [p for p in probes if p.layer is not None]
    assert moved and {p.layer for p in moved} <= set(twins)
    for p in moved:  # one layer moved away from that fit, every other one as there
        assert [k for k in twins if p.ranks[k] != base.ranks[k]] == [p.layer]
    assert evaluate.calls == len(result.points) <= 20


def test_probing_alone_from_the_dense_model(twins: dict[str, Spectrum]) -> None:
    alloc = SensitivityAllocation(probe_at="dense")
    result = search.search_cost_budget(
        twins, 0, 0, Sensitive(twins), cost="params", budget=0.2, max_evals=20, importance=alloc
    )
    probes = [p for p in result.points if p.stage == "probe"]
    assert probes
    for p in probes:  # one layer truncated, every other one dense
        assert p.layer is not None
        assert [k for k, r in p.ranks.items() if r < twins[k].full_rank] == [p.layer]
    by_layer = {m.layer: m for m in alloc.last}
    assert by_layer["a"].sensitivity > 10 * max(by_layer["b"].sensitivity, by_layer["c"].sensitivity)


def test_without_evaluations_the_scores_are_energy_per_unit_of_cost() -> None:
    spectra = {"wide": _random_spectrum("wide", 16, 512, 0), "head": _random_spectrum("head", 10, 16, 1)}
    scores = SensitivityAllocation("params")(spectra)
    for k, sp in spectra.items():
        sq = sp.s.pow(2)
        torch.testing.assert_close(scores[k], sq / sq.sum() / (sp.m + sp.n))
        assert bool((scores[k][1:] <= scores[k][:-1]).all())  # non-increasing, as the searches need


def test_probe_rank_is_a_rank_whose_thin_pair_saves() -> None:
    sp = _random_spectrum("x", 10, 96, 0)  # breakeven: r * 106 < 960 -> r <= 9
    assert probe_rank(sp, None) == 9
    assert probe_rank(sp, 10) == 9
    assert probe_rank(sp, 4) == 4
    assert probe_rank(_random_spectrum("y", 2, 2, 0), 1) is None  # 1 x (2 + 2) >= 4: never saves


def test_the_classifier_below_the_class_count_is_flagged() -> None:
    spectra = {"hidden": _random_spectrum("hidden", 96, 96, 0), "head": _random_spectrum("head", 10, 96, 1)}
    warning = classifier_warning(spectra, {"hidden": 8, "head": 5}, num_classes=10)
    assert (
        warning is not None and warning[0] == "head" and "rank 5" in warning[1] and "10 classes" in warning[1]
    )
    assert classifier_warning(spectra, {"hidden": 8, "head": 10}, num_classes=10) is None  # dense
    assert classifier_warning(spectra, {"hidden": 8, "head": 9}, num_classes=9) is None  # no 9-output layer
    narrow = {"head": _random_spectrum("head", 10, 6, 2)}  # the architecture already limits it to 6
    assert classifier_warning(narrow, {"head": 6}, num_classes=10) is None


def test_allocation_is_a_budget_policy_choice() -> None:
    base = {"model": {"arch": "fcn"}, "dataset": {"name": "digits"}}
    cfg = parse_config(
        {**base, "compress": {"policy": "params_budget", "budget": 0.1, "allocation": "sensitivity"}}
    )
    assert isinstance(search.importance_for(cfg.compress), SensitivityAllocation)
    cfg = parse_config({**base, "compress": {"policy": "flops_budget", "budget": 0.1}})
    assert cfg.compress.allocation == "global"  # type: ignore[union-attr]
    with pytest.raises(ConfigError):
        parse_config({**base, "compress": {"policy": "params_budget", "budget": 0.1, "allocation": "magic"}})


# ---------------------------------------------------------------------------------------
# through the pipeline: a tiny real job on digits


@pytest.fixture(scope="module")
def tiny_job(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("alloc") / "job"
    config = parse_config(
        {
            "model": {"arch": "fcn", "options": {"depth": 3, "width": 48}},
            "dataset": {"name": "digits"},
            "train": {"factors": 3, "epochs": 3, "lr": 0.01, "weight_decay": 5e-4, "batch_size": 128},
            "compress": {"policy": "uniform", "keep": 0.3},
            "measure": {"latency": False},
            "export": ["safetensors"],
            "device": "cpu",
        }
    )
    run_job(config, out)
    return out


def test_the_report_flags_a_classifier_below_the_class_count(tiny_job: Path) -> None:
    report = read_report(tiny_job)
    name = list(report.ranks)[-1]  # the classifier, Linear(48 -> 10)
    head = report.ranks[name]
    assert head.shape == [10, 48] and head.kept_rank == 3 and head.factorized
    assert head.warning is not None and "10 classes" in head.warning
    assert all(r.warning is None for k, r in report.ranks.items() if k != name)


@pytest.mark.parametrize("policy", ["params_budget", "flops_budget"])
def test_sensitivity_allocation_in_a_job_fits_the_budget(tiny_job: Path, tmp_path: Path, policy: str) -> None:
    compress = {"policy": policy, "budget": 0.15, "max_evals": 10, "allocation": "sensitivity"}
    report = select(tiny_job, compress, tmp_path / "sel")
    ratio = report.params.ratio if policy == "params_budget" else report.flops.ratio
    assert ratio is not None and ratio <= 0.15
    assert len(report.pareto) <= 10
    probes = [p for p in report.pareto if p.stage == "probe"]
    assert any(p.layer is not None for p in probes)
    assert all(p.layer is None or p.layer in report.ranks for p in probes)  # None: the budget's global fit
    assert sum(p.chosen for p in report.pareto) == 1
