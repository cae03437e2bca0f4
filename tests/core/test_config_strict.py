"""Numbers and booleans in the job config are taken as JSON types, never coerced: ``"epochs": true``
was 1 epoch, ``"lr": "0.1"`` 0.1 and ``"max_drop": true`` a budget of 1.0, each silently. An integer
where a number is expected is still a number (``"lr": 1``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from core.config import MAX_RANK, ConfigError, load_config, parse_config
from core.layers import full_ranks
from core.report import read_report
from tests.reports import SEARCH_JOB

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.json"))

BASE: dict[str, Any] = {
    "model": {"arch": "fcn", "options": {"depth": 2, "width": 16}},
    "dataset": {"name": "digits"},
    "train": {"epochs": 2},
}


def _with(section: str, values: dict[str, Any]) -> dict[str, Any]:
    return {**BASE, section: {**BASE.get(section, {}), **values}}


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (_with("train", {"epochs": True}), "train.epochs: expected an integer, got a boolean"),
        (_with("train", {"epochs": "2"}), 'train.epochs: expected an integer, got a string ("2")'),
        (_with("train", {"epochs": 2.0}), "train.epochs: expected an integer, got 2.0"),
        (_with("train", {"seed": False}), "train.seed: expected an integer, got a boolean"),
        (_with("train", {"lr": "0.1"}), 'train.lr: expected a number, got a string ("0.1")'),
        (_with("train", {"lr": True}), "train.lr: expected a number, got a boolean"),
        (_with("train", {"amp": "yes"}), 'train.amp: expected true or false, got a string ("yes")'),
        (_with("train", {"amp": 1}), "train.amp: expected true or false, got an integer"),
        (
            {**BASE, "compress": {"policy": "accuracy_budget", "max_drop": True}},
            "compress.accuracy_budget.max_drop: expected a number, got a boolean",
        ),
        (
            {**BASE, "compress": {"policy": "accuracy_budget", "max_drop": 0.01, "refine": "false"}},
            'compress.accuracy_budget.refine: expected true or false, got a string ("false")',
        ),
        (
            {**BASE, "compress": {"policy": "global", "keep": "0.3"}},
            "compress.global.keep: expected a number",
        ),
        (
            {**BASE, "compress": {"policy": "global", "keep": 0.3, "round_to": 8.0}},
            "round_to: expected an integer",
        ),
        (_with("dataset", {"augment": 1}), "dataset.augment: expected true or false, got an integer"),
        (_with("dataset", {"val_fraction": "0.2"}), "dataset.val_fraction: expected a number"),
        (
            {**BASE, "dataset": {"name": "synthetic", "input_shape": [True, 8]}},
            "dataset.input_shape.0: expected an integer, got a boolean",
        ),
        (_with("model", {"num_classes": "10"}), "model.num_classes: expected an integer"),
        ({**BASE, "finetune": {"epochs": True}}, "finetune.epochs: expected an integer, got a boolean"),
        ({**BASE, "finetune": {"epochs": 1, "lr": "1e-3"}}, "finetune.lr: expected a number"),
        ({**BASE, "finetune": {"distill": {"alpha": "0.5"}}}, "finetune.distill.alpha: expected a number"),
        ({**BASE, "measure": {"latency": "false"}}, "measure.latency: expected true or false"),
        ({**BASE, "measure": {"batch_sizes": ["1"]}}, "measure.batch_sizes.0: expected an integer"),
    ],
)
def test_a_value_of_the_wrong_json_type_is_refused_naming_the_field(
    config: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(config)
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("section", "values", "field", "expected"),
    [
        ("train", {"lr": 1}, "lr", 1.0),
        ("train", {"weight_decay": 0}, "weight_decay", 0.0),
        ("dataset", {"val_fraction": 0.25}, "val_fraction", 0.25),
    ],
)
def test_an_integer_is_a_number(section: str, values: dict[str, Any], field: str, expected: float) -> None:
    config = parse_config(_with(section, values))
    value = getattr(getattr(config, section), field)
    assert isinstance(value, float) and value == expected


def test_an_integer_budget_is_a_number() -> None:
    config = parse_config({**BASE, "compress": {"policy": "accuracy_budget", "max_drop": 0}})
    assert config.compress.policy == "accuracy_budget"
    assert isinstance(config.compress.max_drop, float) and config.compress.max_drop == 0.0


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_the_shipped_examples_still_parse(path: Path) -> None:
    config = load_config(path)
    # and the stored form (what the API and the worker keep) parses again, unchanged
    stored = config.model_dump(mode="json")
    assert parse_config(json.loads(json.dumps(stored))).model_dump(mode="json") == stored


def test_the_examples_exist() -> None:
    assert len(EXAMPLES) >= 3


# ---------------------------------------------------------------------------------------
# compress.ranks: what can be refused without the model


def _ranks(ranks: Any) -> dict[str, Any]:
    return {**BASE, "compress": {"policy": "ranks", "ranks": ranks}}


@pytest.mark.parametrize(
    ("ranks", "message"),
    [
        ({"1": 10**20}, "'1' (a number of 21 digits)"),
        ({"1": 2**31}, f"'1' ({2**31})"),
        ({"4": 3, "1": 2**40}, "'1'"),
        ({"1": True}, "compress.ranks.ranks.1: expected an integer, got a boolean"),
        ({"1": 1e20}, "compress.ranks.ranks.1: expected an integer, got 1e+20"),
        ({"1": 3.5}, "compress.ranks.ranks.1: expected an integer, got 3.5"),
        ({"1": "3"}, 'compress.ranks.ranks.1: expected an integer, got a string ("3")'),
    ],
)
def test_a_rank_no_layer_can_have_is_refused_naming_the_layer(ranks: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(_ranks(ranks))
    assert message in str(err.value)
    if "expected" not in message:
        assert f"never above {MAX_RANK}" in str(err.value)


def test_the_largest_rank_the_schema_takes() -> None:
    config = parse_config(_ranks({"1": MAX_RANK}))  # the model decides whether the layer has it
    assert config.compress.policy == "ranks" and config.compress.ranks == {"1": MAX_RANK}


def test_full_ranks_of_a_meta_model_are_the_spectra_a_job_truncates(search_job_dir: Path) -> None:
    """What the API checks ranks against at submit (a meta model, no SVD) is what the worker's
    ``ranks`` policy checks them against (the SVD of the trained, collapsed model)."""
    from core import zoo

    report = read_report(search_job_dir)
    model = zoo.build_meta_model(SEARCH_JOB["model"]["arch"], 10, (64,), SEARCH_JOB["model"]["options"])
    assert full_ranks(model) == report.pareto[0].ranks  # the dense reference: every layer at full rank
    assert full_ranks(model) == {k: row.full_rank for k, row in report.ranks.items()}
