"""The job config over HTTP: values of the wrong JSON type are a 422 naming the field (they were
coerced: ``"epochs": true`` ran 1 epoch, select's ``"finetune": "yes"`` fine-tuned), and a ``ranks``
policy no layer of the model can take is a 422 at submit naming the layer (it was a 202, and the
worker refused the job later)."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from store.models import Job
from tests.api.conftest import Caller
from tests.api.test_operating_points import SMALL_JOB, submit, succeed_with_dense

pytestmark = pytest.mark.postgres

# fcn depth 2 width 16 on digits (64 inputs, 10 classes): Linear "1" is 16x64, the head "4" 10x16
FCN_FULL_RANKS = {"1": 16, "4": 10}


def jobs(session: Session) -> int:
    return session.scalar(select(func.count()).select_from(Job)) or 0


def with_(section: str, values: dict[str, Any]) -> dict[str, Any]:
    return {**SMALL_JOB, section: {**SMALL_JOB.get(section, {}), **values}}


WRONG_TYPES = [
    (with_("train", {"epochs": True}), "train.epochs: expected an integer, got a boolean"),
    (with_("train", {"lr": "0.1"}), 'train.lr: expected a number, got a string ("0.1")'),
    (
        with_("compress", {"max_drop": True}),
        "compress.accuracy_budget.max_drop: expected a number, got a boolean",
    ),
    (with_("train", {"amp": "true"}), 'train.amp: expected true or false, got a string ("true")'),
    (with_("dataset", {"val_fraction": "0.2"}), "dataset.val_fraction: expected a number"),
    (with_("finetune", {"epochs": 1.0}), "finetune.epochs: expected an integer, got 1.0"),
]
WRONG_IDS = ["epochs-true", "lr-string", "max-drop-true", "amp-string", "val-fraction-string", "epochs-float"]


@pytest.mark.parametrize(("config", "message"), WRONG_TYPES, ids=WRONG_IDS)
def test_a_value_of_the_wrong_type_is_422_naming_the_field(
    client: TestClient, alice: Caller, session: Session, config: dict[str, Any], message: str
) -> None:
    resp = client.post("/v1/jobs", headers=alice.headers, json=config)

    assert resp.status_code == 422, resp.text  # was 202, the value coerced
    assert resp.json()["detail"].startswith("invalid request: ")
    assert message in resp.json()["detail"]
    assert jobs(session) == 0


@pytest.mark.parametrize(("config", "message"), WRONG_TYPES[:3], ids=WRONG_IDS[:3])
def test_the_plan_refuses_them_as_submit_does(
    client: TestClient, alice: Caller, config: dict[str, Any], message: str
) -> None:
    resp = client.post("/v1/plan", headers=alice.headers, json=config)

    assert resp.status_code == 422, resp.text
    assert message in resp.json()["detail"]


def test_an_integer_where_a_number_is_expected_is_fine(
    client: TestClient, alice: Caller, session: Session
) -> None:
    config = with_("train", {"lr": 1, "weight_decay": 0}) | {
        "compress": {"policy": "accuracy_budget", "max_drop": 0}
    }

    resp = client.post("/v1/jobs", headers=alice.headers, json=config)

    assert resp.status_code == 202, resp.text
    stored = session.get(Job, resp.json()["id"])
    assert stored is not None
    assert stored.config["train"]["lr"] == 1.0 and isinstance(stored.config["train"]["lr"], float)
    assert stored.config["compress"]["max_drop"] == 0.0


@pytest.mark.parametrize("finetune", ["yes", "true", 1, 0, None, [True]], ids=repr)
def test_select_finetune_takes_a_boolean_or_settings_only(
    client: TestClient, alice: Caller, session: Session, finetune: Any
) -> None:
    parent_id = submit(client, alice)
    succeed_with_dense(session, parent_id)
    body = {"compress": {"policy": "params_budget", "budget": 0.4}, "finetune": finetune}

    resp = client.post(f"/v1/jobs/{parent_id}/select", headers=alice.headers, json=body)

    assert resp.status_code == 422, resp.text  # "yes" was true: a derived job that fine-tuned
    assert resp.json()["detail"].startswith("invalid request: finetune: expected true, false or an object")
    assert session.query(Job).filter(Job.parent_id == parent_id).count() == 0


@pytest.mark.parametrize(
    ("finetune", "epochs"), [(True, 2), (False, 0), ({"epochs": 1}, 1)], ids=["true", "false", "settings"]
)
def test_select_finetune_as_before(
    client: TestClient, alice: Caller, session: Session, finetune: Any, epochs: int
) -> None:
    parent_id = submit(client, alice)
    succeed_with_dense(session, parent_id)
    body = {"compress": {"policy": "params_budget", "budget": 0.4}, "finetune": finetune}

    resp = client.post(f"/v1/jobs/{parent_id}/select", headers=alice.headers, json=body)

    assert resp.status_code == 202, resp.text
    job = session.get(Job, resp.json()["id"])
    assert job is not None and job.config["finetune"]["epochs"] == epochs


def test_select_settings_of_the_wrong_type_are_422_naming_the_field(
    client: TestClient, alice: Caller, session: Session
) -> None:
    parent_id = submit(client, alice)
    succeed_with_dense(session, parent_id)
    body = {"compress": {"policy": "params_budget", "budget": "0.4"}}

    resp = client.post(f"/v1/jobs/{parent_id}/select", headers=alice.headers, json=body)

    assert resp.status_code == 422, resp.text
    assert "compress.params_budget.budget: expected a number, got a string" in resp.json()["detail"]


# ---------------------------------------------------------------------------------------
# compress.ranks at submit


def ranks_job(ranks: Any) -> dict[str, Any]:
    return SMALL_JOB | {"compress": {"policy": "ranks", "ranks": ranks}}


@pytest.mark.parametrize(
    ("ranks", "fragments"),
    [
        ({"1": 10**20}, ["compress.ranks.ranks", "'1' (a number of 21 digits)", "never above 2147483647"]),
        ({"1": 2**31}, ["compress.ranks.ranks", "'1' (2147483648)"]),
        ({"1": 1e20}, ["compress.ranks.ranks.1: expected an integer, got 1e+20"]),
        ({"1": True}, ["compress.ranks.ranks.1: expected an integer, got a boolean"]),
        ({"1": 0}, ["compress.ranks.ranks", "at least 1", "'1' (0)"]),
        ({"1": 17}, ["compress.ranks: out of range: '1' is 17, valid 1..16 (its full rank)"]),
        ({"4": 3, "1": 2**31 - 1}, ["'1' is 2147483647, valid 1..16"]),
        ({"4": 11}, ["'4' is 11, valid 1..10"]),
        (
            {"layers.0": 3},
            ["compress.ranks: fcn has no truncatable layer named 'layers.0'", "its layers are 1, 4"],
        ),
    ],
    ids=["1e20-integer", "2^31", "1e20-float", "true", "zero", "past-full-rank", "2^31-1", "head", "unknown"],
)
def test_a_rank_the_model_cannot_take_is_422_at_submit_naming_the_layer(
    client: TestClient, alice: Caller, session: Session, ranks: dict[str, Any], fragments: list[str]
) -> None:
    resp = client.post("/v1/jobs", headers=alice.headers, json=ranks_job(ranks))

    assert resp.status_code == 422, resp.text  # was 202; the worker refused it minutes later
    for fragment in fragments:
        assert fragment in resp.json()["detail"]
    assert jobs(session) == 0


def test_the_plan_checks_ranks_as_submit_does(client: TestClient, alice: Caller) -> None:
    resp = client.post("/v1/plan", headers=alice.headers, json=ranks_job({"1": 17}))

    assert resp.status_code == 422, resp.text
    assert "'1' is 17, valid 1..16" in resp.json()["detail"]


def test_ranks_within_every_layers_full_rank_are_accepted(
    client: TestClient, alice: Caller, session: Session
) -> None:
    resp = client.post("/v1/jobs", headers=alice.headers, json=ranks_job(FCN_FULL_RANKS))
    assert resp.status_code == 202, resp.text

    low = client.post("/v1/jobs", headers=alice.headers, json=ranks_job({"1": 1}))
    assert low.status_code == 202, low.text
    job = session.get(Job, low.json()["id"])
    assert job is not None and job.config["compress"]["ranks"] == {"1": 1}
