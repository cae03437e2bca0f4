"""GET /v1/jobs/{id}/stream, POST /v1/plan and POST /v1/jobs/{id}/select."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from api.operating_points import (
    DENSE_WEIGHTS,
    Snapshot,
    StreamReader,
    get_stream_reader,
    job_events,
)
from store.models import Artifact, Job, JobEvent
from store.settings import Settings
from tests.api.conftest import Caller, RecordingDispatcher

pytestmark = pytest.mark.postgres

SMALL_JOB: dict[str, Any] = {
    "model": {"arch": "fcn", "options": {"depth": 2, "width": 16}},
    "dataset": {"name": "digits"},
    "train": {"factors": 2, "epochs": 2},
    "compress": {"policy": "accuracy_budget", "max_drop": 0.01},
    "finetune": {"epochs": 2},
    "export": ["safetensors", "onnx"],
}


def submit(client: TestClient, caller: Caller, config: dict[str, Any] = SMALL_JOB) -> str:
    resp = client.post("/v1/jobs", headers=caller.headers, json=config)
    assert resp.status_code == 202, resp.text
    return str(resp.json()["id"])


def set_job(session: Session, job_id: str, **values: Any) -> None:
    job = session.get(Job, job_id)
    assert job is not None
    for k, v in values.items():
        setattr(job, k, v)
    session.commit()  # releases the test's savepoint: a poll's session.close() keeps it


def add_epochs(session: Session, job_id: str, losses: list[float]) -> list[int]:
    events = [
        JobEvent(job_id=job_id, attempt=1, stage="train", progress=0.1 * (i + 1), epoch=i + 1, loss=loss)
        for i, loss in enumerate(losses)
    ]
    session.add_all(events)
    session.commit()
    return [e.id for e in events]


def parse_sse(text: str) -> list[tuple[str, dict[str, Any], int | None]]:
    """(event, data, id) of each event in a text/event-stream body; comments and retry skipped."""
    out = []
    for block in text.split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.splitlines():
            if line.startswith(":") or ":" not in line:
                continue
            key, _, value = line.partition(":")
            fields[key] = value.strip()
        if "event" in fields:
            ident = int(fields["id"]) if "id" in fields else None
            out.append((fields["event"], json.loads(fields["data"]), ident))
    return out


@pytest.fixture
def stream_client(client: TestClient, session: Session) -> TestClient:
    """The client with the stream's polls reading through the test's transaction."""
    reader = StreamReader(lambda: session)
    client.app.dependency_overrides[get_stream_reader] = lambda: reader  # type: ignore[attr-defined]
    return client


# ---------------------------------------------------------------------------------------
# stream


def test_stream_of_a_finished_job_sends_its_history_the_final_state_and_end(
    stream_client: TestClient, alice: Caller, session: Session
) -> None:
    job_id = submit(stream_client, alice)
    ids = add_epochs(session, job_id, [0.9, 0.4])
    set_job(session, job_id, status="succeeded", stage="done", progress=1.0, epoch=2, epochs=2)

    resp = stream_client.get(f"/v1/jobs/{job_id}/stream", headers=alice.headers)

    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(resp.text)
    assert [(e, d.get("loss"), i) for e, d, i in events if e == "epoch"] == [
        ("epoch", 0.9, ids[0]),
        ("epoch", 0.4, ids[1]),
    ]
    progress = [d for e, d, _ in events if e == "progress"]
    assert progress[-1]["status"] == "succeeded" and progress[-1]["progress"] == 1.0
    assert progress[-1]["epoch"] == 2 and progress[-1]["stage"] == "done"
    assert events[-1][0] == "end" and events[-1][1]["status"] == "succeeded"


def test_stream_resumes_after_last_event_id(
    stream_client: TestClient, alice: Caller, session: Session
) -> None:
    job_id = submit(stream_client, alice)
    ids = add_epochs(session, job_id, [0.9, 0.4, 0.2])
    set_job(session, job_id, status="failed", error="diverged")

    resp = stream_client.get(
        f"/v1/jobs/{job_id}/stream", headers=alice.headers | {"Last-Event-ID": str(ids[0])}
    )

    events = parse_sse(resp.text)
    assert [i for e, _, i in events if e == "epoch"] == ids[1:]
    assert events[-1][0] == "end" and events[-1][1] == {"id": job_id, "status": "failed", "error": "diverged"}


def test_stream_of_another_tenants_or_an_unknown_job_is_404_and_needs_a_key(
    stream_client: TestClient, alice: Caller, bob: Caller
) -> None:
    job_id = submit(stream_client, alice)

    assert stream_client.get(f"/v1/jobs/{job_id}/stream", headers=bob.headers).status_code == 404
    assert stream_client.get("/v1/jobs/nope/stream", headers=alice.headers).status_code == 404
    assert stream_client.get(f"/v1/jobs/{job_id}/stream").status_code == 401


def test_stream_follows_a_running_job_until_it_ends(
    client: TestClient, alice: Caller, session: Session
) -> None:
    """The generator itself: each poll sees what the worker wrote since, heartbeats in between."""
    job_id = submit(client, alice)
    set_job(session, job_id, status="running", stage="train", progress=0.1, epoch=1, epochs=2)
    polls = 0

    class AdvancingReader(StreamReader):
        async def poll(self, tenant_id: str, job_id: str, after_id: int) -> Snapshot | None:
            nonlocal polls
            polls += 1
            if polls == 3:  # the worker finishes epoch 2, then the job
                add_epochs(session, job_id, [0.3])
                set_job(session, job_id, epoch=2, progress=0.8, metrics={"loss": 0.3, "val_accuracy": 0.9})
            if polls == 5:
                set_job(session, job_id, status="succeeded", stage="done", progress=1.0)
            return self._poll(tenant_id, job_id, after_id)

    async def collect() -> list[str]:
        reader = AdvancingReader(lambda: session)
        gen = job_events(reader, alice.tenant.id, job_id, poll_seconds=0.0, heartbeat_seconds=0.0)
        return [chunk async for chunk in gen]

    chunks = asyncio.run(collect())

    events = parse_sse("".join(chunks))
    progress = [d for e, d, _ in events if e == "progress"]
    assert [(d["status"], d["epoch"], d["loss"]) for d in progress] == [
        ("running", 1, None),
        ("running", 2, 0.3),
        ("succeeded", 2, 0.3),
    ]
    assert progress[1]["val_accuracy"] == 0.9
    assert [e for e, _, _ in events].count("epoch") == 1
    assert events[-1][0] == "end" and polls == 5
    assert any(c.startswith(": heartbeat") for c in chunks)


def test_stream_ends_with_reconnect_when_its_time_is_up(
    client: TestClient, alice: Caller, session: Session
) -> None:
    job_id = submit(client, alice)
    set_job(session, job_id, status="running", stage="train", progress=0.2)

    async def collect() -> list[str]:
        gen = job_events(
            StreamReader(lambda: session), alice.tenant.id, job_id, poll_seconds=0.0, max_seconds=0.0
        )
        return [chunk async for chunk in gen]

    events = parse_sse("".join(asyncio.run(collect())))

    assert [e for e, _, _ in events] == ["progress", "reconnect"]


# ---------------------------------------------------------------------------------------
# plan


def test_plan_is_the_dry_run_of_lorita_plan(client: TestClient, alice: Caller) -> None:
    from core.config import parse_config
    from core.plan import plan_job

    resp = client.post("/v1/plan", headers=alice.headers, json=SMALL_JOB)

    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body == plan_job(parse_config(SMALL_JOB)).to_dict()
    # fcn depth 2 width 16 on digits (64 features, 10 classes): Linear, BatchNorm1d, Linear
    assert body["params"] == (64 * 16 + 16) + 2 * 16 + (16 * 10 + 10)
    assert body["factors"] == 2 and len(body["composed"]) >= 1


def test_plan_errors_are_422_naming_the_field(client: TestClient, alice: Caller) -> None:
    bad = SMALL_JOB | {"train": {"factors": 2, "epochs": 0}}

    resp = client.post("/v1/plan", headers=alice.headers, json=bad)

    assert resp.status_code == 422
    assert "train.epochs" in resp.json()["detail"]
    assert client.post("/v1/plan", json=SMALL_JOB).status_code == 401


def npz_upload(client: TestClient, caller: Caller) -> str:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    np.savez(
        buf,
        x_train=rng.uniform(0, 1, (60, 12)).astype(np.float32),
        y_train=np.arange(60) % 3,
        x_test=rng.uniform(0, 1, (20, 12)).astype(np.float32),
        y_test=np.arange(20) % 3,
    )
    resp = client.post(
        "/v1/datasets", headers=caller.headers, files={"file": ("tiny.npz", io.BytesIO(buf.getvalue()))}
    )
    assert resp.status_code == 201, resp.text
    return str(resp.json()["id"])


def test_plan_reads_an_uploaded_dataset_of_the_tenant_only(
    client: TestClient, alice: Caller, bob: Caller
) -> None:
    dataset_id = npz_upload(client, alice)
    config = SMALL_JOB | {"dataset": {"id": dataset_id}}

    mine = client.post("/v1/plan", headers=alice.headers, json=config)
    theirs = client.post("/v1/plan", headers=bob.headers, json=config)

    assert mine.status_code == 200, mine.text
    assert mine.json()["input_shape"] == [12] and mine.json()["num_classes"] == 3
    assert theirs.status_code == 404


# ---------------------------------------------------------------------------------------
# select


def succeed_with_dense(session: Session, job_id: str) -> None:
    set_job(session, job_id, status="succeeded", stage="done", progress=1.0)
    session.add(Artifact(job_id=job_id, name=DENSE_WEIGHTS, size_bytes=1, sha256="0" * 64, location="x/y"))
    session.commit()


SELECT = {"compress": {"policy": "params_budget", "budget": 0.4}}


def test_select_creates_a_derived_job_from_a_succeeded_parent(
    client: TestClient, alice: Caller, session: Session, dispatcher: RecordingDispatcher
) -> None:
    parent_id = submit(client, alice)
    succeed_with_dense(session, parent_id)

    resp = client.post(f"/v1/jobs/{parent_id}/select", headers=alice.headers, json=SELECT)

    assert resp.status_code == 202, resp.text
    body = resp.json()
    job = session.get(Job, body["id"])
    assert job is not None and job.parent_id == parent_id == body["parent_id"] and job.status == "queued"
    assert (job.config["compress"]["policy"], job.config["compress"]["budget"]) == ("params_budget", 0.4)
    assert job.config["finetune"]["epochs"] == 0  # no fine-tuning unless asked
    assert job.config["train"] == session.get(Job, parent_id).config["train"]  # type: ignore[union-attr]
    assert dispatcher.sent[-1] == body["id"] and dispatcher.row_status_at_send[-1] == "queued"


def test_select_with_finetune_and_export(client: TestClient, alice: Caller, session: Session) -> None:
    parent_id = submit(client, alice)
    succeed_with_dense(session, parent_id)
    body = SELECT | {"finetune": True, "export": ["onnx"]}

    resp = client.post(f"/v1/jobs/{parent_id}/select", headers=alice.headers, json=body)

    job = session.get(Job, resp.json()["id"])
    assert job is not None and job.config["finetune"]["epochs"] == 2 and job.config["export"] == ["onnx"]


def test_select_honours_the_idempotency_key(
    client: TestClient, alice: Caller, session: Session, dispatcher: RecordingDispatcher
) -> None:
    parent_id = submit(client, alice)
    succeed_with_dense(session, parent_id)
    headers = alice.headers | {"Idempotency-Key": "pick-0.4"}
    url = f"/v1/jobs/{parent_id}/select"

    first = client.post(url, headers=headers, json=SELECT)
    again = client.post(url, headers=headers, json=SELECT)
    other = client.post(url, headers=headers, json={"compress": {"policy": "global", "keep": 0.2}})

    assert (first.status_code, again.status_code) == (202, 200)
    assert first.json()["id"] == again.json()["id"]
    assert dispatcher.sent.count(first.json()["id"]) == 1
    assert other.status_code == 409 and "Idempotency-Key" in other.json()["detail"]


def test_select_of_another_tenants_job_is_404(
    client: TestClient, alice: Caller, bob: Caller, session: Session
) -> None:
    parent_id = submit(client, alice)
    succeed_with_dense(session, parent_id)

    resp = client.post(f"/v1/jobs/{parent_id}/select", headers=bob.headers, json=SELECT)

    assert resp.status_code == 404
    assert session.query(Job).filter(Job.parent_id == parent_id).count() == 0


@pytest.mark.parametrize("status", ["queued", "running", "failed", "canceled"])
def test_select_of_a_parent_that_has_not_succeeded_is_409(
    client: TestClient, alice: Caller, session: Session, status: str
) -> None:
    parent_id = submit(client, alice)
    set_job(session, parent_id, status=status)

    resp = client.post(f"/v1/jobs/{parent_id}/select", headers=alice.headers, json=SELECT)

    assert resp.status_code == 409
    assert f"is {status}" in resp.json()["detail"] and "succeeded" in resp.json()["detail"]


def test_select_of_a_parent_without_a_dense_model_is_409(
    client: TestClient, alice: Caller, session: Session
) -> None:
    parent_id = submit(client, alice)
    set_job(session, parent_id, status="succeeded")

    resp = client.post(f"/v1/jobs/{parent_id}/select", headers=alice.headers, json=SELECT)

    assert resp.status_code == 409 and "dense model" in resp.json()["detail"]


def test_select_with_an_invalid_policy_is_422_naming_the_field(
    client: TestClient, alice: Caller, session: Session
) -> None:
    parent_id = submit(client, alice)
    succeed_with_dense(session, parent_id)
    bad: Callable[[dict[str, Any]], Any] = lambda b: client.post(  # noqa: E731
        f"/v1/jobs/{parent_id}/select", headers=alice.headers, json=b
    )

    over = bad({"compress": {"policy": "params_budget", "budget": 1.5}})
    unknown = bad({"compress": {"policy": "smallest"}})

    assert (
        over.status_code == 422 and "compress" in over.json()["detail"] and "budget" in over.json()["detail"]
    )
    assert unknown.status_code == 422 and "unknown policy" in unknown.json()["detail"]


def test_the_cli_follows_the_stream_and_falls_back_when_there_is_none(
    stream_client: TestClient, alice: Caller, session: Session
) -> None:
    from cli.events import follow_stream

    job_id = submit(stream_client, alice)
    set_job(session, job_id, status="succeeded", stage="done", progress=1.0, metrics={"loss": 0.1})
    stream_client.headers.update(alice.headers)
    updates: list[dict[str, Any]] = []

    ended = follow_stream(stream_client, job_id, updates.append, sleep=lambda _: None)
    missing = follow_stream(stream_client, "nope", updates.append, sleep=lambda _: None)

    assert ended is True and missing is False
    assert updates[-1]["status"] == "succeeded" and updates[-1]["metrics"] == {"loss": 0.1}
    assert updates[-1]["progress"] == 1.0 and updates[-1]["stage"] == "done"


def test_the_dense_model_is_listed_only_when_asked_for(
    client: TestClient, alice: Caller, session: Session
) -> None:
    job_id = submit(client, alice)
    succeed_with_dense(session, job_id)
    session.add(Artifact(job_id=job_id, name="model.onnx", size_bytes=1, sha256="1" * 64, location="x/z"))
    session.commit()
    url = f"/v1/jobs/{job_id}/artifacts"

    plain = [a["name"] for a in client.get(url, headers=alice.headers).json()["data"]]
    dense = [
        a["name"] for a in client.get(url, headers=alice.headers, params={"include": "dense"}).json()["data"]
    ]

    assert plain == ["model.onnx"]
    assert sorted(dense) == [DENSE_WEIGHTS, "model.onnx"]
    assert client.get(url, headers=alice.headers, params={"include": "all"}).status_code == 422


def test_plan_refuses_a_model_past_the_operators_size_limit_before_building_it(
    client: TestClient, alice: Caller
) -> None:
    huge = SMALL_JOB | {"model": {"arch": "fcn", "options": {"depth": 3, "width": 200_000}}}

    resp = client.post("/v1/plan", headers=alice.headers, json=huge)

    assert resp.status_code == 422
    assert (
        resp.json()["detail"].startswith("model.options")
        and "LORITA_MAX_MODEL_PARAMETERS" in resp.json()["detail"]
    )


def test_select_counts_against_the_active_job_quota(
    make_client: Callable[[Settings], TestClient], settings: Settings, alice: Caller, session: Session
) -> None:
    client = make_client(settings.model_copy(update={"max_active_jobs": 1}))
    parent_id = submit(client, alice)
    succeed_with_dense(session, parent_id)
    submit(client, alice)  # one queued job: the quota is full

    resp = client.post(f"/v1/jobs/{parent_id}/select", headers=alice.headers, json=SELECT)

    assert resp.status_code == 429 and "LORITA_MAX_ACTIVE_JOBS" in resp.json()["detail"]
    assert session.query(Job).filter(Job.parent_id == parent_id).count() == 0


def succeed_with_report(session: Session, job_id: str, full: dict[str, int]) -> None:
    """A succeeded parent with a dense model and a report whose reference point has ``full`` ranks."""
    from store.models import Result

    succeed_with_dense(session, job_id)
    point = {"stage": "reference", "params": 100, "flops": 200, "val_accuracy": 0.9, "ranks": full}
    session.add(Result(job_id=job_id, report={"pareto": [point]}))
    session.commit()


def test_select_with_a_points_ranks_creates_the_derived_job(
    client: TestClient, alice: Caller, session: Session, dispatcher: RecordingDispatcher
) -> None:
    parent_id = submit(client, alice)
    succeed_with_report(session, parent_id, {"layers.0": 16, "head": 10})
    body = {"compress": {"policy": "ranks", "ranks": {"layers.0": 5}}}

    resp = client.post(f"/v1/jobs/{parent_id}/select", headers=alice.headers, json=body)

    assert resp.status_code == 202, resp.text
    job = session.get(Job, resp.json()["id"])
    assert job is not None and job.parent_id == parent_id
    assert job.config["compress"]["policy"] == "ranks"
    assert job.config["compress"]["ranks"] == {"layers.0": 5}
    assert job.config["finetune"]["epochs"] == 0
    assert dispatcher.sent[-1] == job.id


@pytest.mark.parametrize(
    ("ranks", "fragment"),
    [
        ({"layers.0": 0}, "at least 1"),
        ({"layers.0": 2.5}, "integer"),
        ({"layers.0": "5"}, "integer"),
        ([5], "dictionary"),
        ({"nope": 3}, "no truncatable layer named 'nope'; its layers are "),
        ({"layers.0": 17}, "'layers.0' is 17, valid 1..16"),
    ],
)
def test_select_with_malformed_ranks_is_422_naming_the_layer(
    client: TestClient, alice: Caller, session: Session, ranks: Any, fragment: str
) -> None:
    parent_id = submit(client, alice)
    succeed_with_report(session, parent_id, {"layers.0": 16, "head": 10})

    resp = client.post(
        f"/v1/jobs/{parent_id}/select",
        headers=alice.headers,
        json={"compress": {"policy": "ranks", "ranks": ranks}},
    )

    assert resp.status_code == 422, resp.text
    assert "compress" in resp.json()["detail"] and fragment in resp.json()["detail"]
    assert session.query(Job).filter(Job.parent_id == parent_id).count() == 0
