"""The ``ranks`` policy: exactly one point of a job's Pareto curve, again, without a search."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from cli.main import main
from core import search
from core.config import ConfigError, parse_config
from core.pipeline import select
from core.report import JobReport, read_report
from tests.reports import SEARCH_JOB

JOB = SEARCH_JOB


def _other_point(report: JobReport) -> int:
    """A point the job did not choose, and not the dense reference."""
    for i, p in enumerate(report.pareto):
        if not p.chosen and i > 0 and p.params < report.pareto[0].params:
            return i
    raise AssertionError("the search evaluated no other compressed point")


def test_every_pareto_point_carries_its_ranks(search_job_dir: Path) -> None:
    report = read_report(search_job_dir)
    layers = {name for name, row in report.ranks.items() if row.full_rank > 0}
    for p in report.pareto:
        assert p.ranks and set(p.ranks) <= layers


def test_select_with_a_points_ranks_lands_exactly_on_that_point(search_job_dir: Path, tmp_path: Path) -> None:
    job = read_report(search_job_dir)
    index = _other_point(job)
    clicked = job.pareto[index]
    again = select(search_job_dir, {"policy": "ranks", "ranks": dict(clicked.ranks)}, tmp_path / "point")
    chosen = again.chosen
    assert chosen is not None
    assert (chosen.params, chosen.flops, chosen.val_accuracy) == (
        clicked.params,
        clicked.flops,
        clicked.val_accuracy,
    )
    assert chosen.ranks == clicked.ranks
    assert again.params.after == clicked.params
    # one evaluation besides the dense reference, which is the job's own reference point
    assert [p.stage for p in again.pareto] == ["reference", "ranks"]
    assert again.pareto[0].val_accuracy == job.pareto[0].val_accuracy


def test_lorita_select_point_flag(search_job_dir: Path, tmp_path: Path) -> None:
    job = read_report(search_job_dir)
    index = _other_point(job)
    out = tmp_path / "cli"
    assert main(["select", str(search_job_dir), "--point", str(index), "--out", str(out), "--quiet"]) == 0
    chosen = read_report(out).chosen
    assert chosen is not None and chosen.ranks == job.pareto[index].ranks
    assert chosen.val_accuracy == job.pareto[index].val_accuracy


def test_lorita_select_point_out_of_range_is_a_message(
    search_job_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    n = len(read_report(search_job_dir).pareto)
    assert (
        main(["select", str(search_job_dir), "--point", str(n), "--out", str(tmp_path / "x"), "--quiet"]) != 0
    )
    assert f"Pareto points 0..{n - 1}" in capsys.readouterr().err


def test_select_with_an_unknown_layer_names_it_and_the_valid_layers(
    search_job_dir: Path, tmp_path: Path
) -> None:
    job = read_report(search_job_dir)
    layer = next(iter(job.pareto[0].ranks))
    with pytest.raises(ConfigError, match=r"no truncatable layer named 'nope'.*" + layer.replace(".", r"\.")):
        select(search_job_dir, {"policy": "ranks", "ranks": {"nope": 2}}, tmp_path / "bad")


def test_select_with_a_rank_above_full_names_the_range(search_job_dir: Path, tmp_path: Path) -> None:
    job = read_report(search_job_dir)
    layer, full = next(iter(job.pareto[0].ranks.items()))
    with pytest.raises(ConfigError, match=rf"'{layer}' is {full + 1}, valid 1\.\.{full}"):
        select(search_job_dir, {"policy": "ranks", "ranks": {layer: full + 1}}, tmp_path / "bad")


# ---------------------------------------------------------------------------------------
# The policy in the config and in the search


def _config(ranks: Any) -> dict[str, Any]:
    return {**JOB, "compress": {"policy": "ranks", "ranks": ranks}}


@pytest.mark.parametrize(
    ("ranks", "message"),
    [
        ({"fc1": 0}, r"compress\.ranks\.ranks: .*at least 1.*'fc1' \(0\)"),
        ({"fc1": -3}, r"at least 1.*'fc1' \(-3\)"),
        ({"fc1": 2.5}, r"compress\.ranks\.ranks\.fc1: .*integer"),
        ({"fc1": "4"}, r"compress\.ranks\.ranks\.fc1: .*integer"),
        ({"fc1": True}, r"compress\.ranks\.ranks\.fc1: .*integer"),
        ({"": 3}, r"compress\.ranks\.ranks\..*\[key\]: .*at least 1 character"),
        ([4, 4], r"compress\.ranks\.ranks: .*dictionary"),
    ],
)
def test_malformed_ranks_are_config_errors(ranks: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(_config(ranks))


def test_ranks_policy_is_listed_and_valid() -> None:
    config = parse_config(_config({"fc1": 3}))
    assert config.compress.policy == "ranks"
    with pytest.raises(ConfigError, match="ranks"):
        parse_config({**JOB, "compress": {"policy": "rankz"}})


def test_explicit_ranks_fill_unnamed_layers_at_full_rank_and_check_the_range() -> None:
    class Sp:
        def __init__(self, full: int) -> None:
            self.full_rank = full

    spectra: Any = {"a": Sp(16), "b": Sp(8)}
    assert search.explicit_ranks(spectra, {"a": 4}) == {"a": 4, "b": 8}
    with pytest.raises(search.SearchError, match=r"'b' is 9, valid 1\.\.8"):
        search.explicit_ranks(spectra, {"b": 9})
    with pytest.raises(search.SearchError, match=r"'b' is 0, valid 1\.\.8"):
        search.explicit_ranks(spectra, {"b": 0})
    with pytest.raises(search.SearchError, match=r"no truncatable layer named 'c'.*a, b"):
        search.explicit_ranks(spectra, {"c": 1})
