"""Schemathesis over every operation of the OpenAPI schema, against the app with a real
PostgreSQL database and no worker (the dispatcher records sends): every answer must be declared,
match its declared schema, content type and headers, and no input may cause a 5xx.

One pytest test per operation (the operation list comes from the app's schema, which does not
depend on the database); each draws ``EXAMPLES_PER_OPERATION`` cases, positive and negative.
"""

from __future__ import annotations

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.generation.modes import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance

from api.app import create_app
from store.settings import Settings
from tests.api.conftest import Caller

pytestmark = pytest.mark.postgres

EXAMPLES_PER_OPERATION = 20
# Every check runs but one: "a schema-valid request must be accepted" cannot hold for an API that
# validates meaning beyond JSON Schema (an architecture name that exists, a file that is an .npz,
# exactly one of max_drop or max_rel_drop); those answers are 422s that the schema declares.
EXCLUDED_CHECKS = [positive_data_acceptance]


def _operation_labels() -> list[str]:
    app = create_app(Settings(database_url="sqlite://"))
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    return [result.ok().label for result in schema.get_all_operations()]


OPERATIONS = _operation_labels()


def test_the_fuzz_covers_every_operation() -> None:
    assert len(OPERATIONS) >= 20
    assert "POST /v1/jobs" in OPERATIONS and "POST /v1/datasets" in OPERATIONS


# GET /v1/jobs/{id} hands its connection back early (session.close() in the route), which ends
# the test's shared transaction: that one route gets random ids only.
RANDOM_IDS_ONLY = ("GET /v1/jobs/{job_id}",)


def _real_ids(client: TestClient, caller: Caller) -> dict[str, str]:
    job = client.post(
        "/v1/jobs",
        headers=caller.headers,
        json={"model": {"arch": "fcn", "options": {"depth": 2, "width": 16}}, "dataset": {"name": "digits"}},
    )
    assert job.status_code == 202, job.text
    return {"job_id": job.json()["id"], "name": "model.safetensors"}


@pytest.mark.parametrize("label", OPERATIONS)
def test_operation_conforms_to_its_schema(client: TestClient, alice: Caller, label: str) -> None:
    schema = schemathesis.openapi.from_asgi("/openapi.json", client.app)
    operation = next(r.ok() for r in schema.get_all_operations() if r.ok().label == label)
    strategies = [
        operation.as_strategy(GenerationMode.POSITIVE),
        operation.as_strategy(GenerationMode.NEGATIVE),
    ]
    ids = _real_ids(client, alice)
    known = {k: v for k, v in ids.items() if "{" + k + "}" in operation.path}
    if known and label not in RANDOM_IDS_ONLY:
        strategies.append(operation.as_strategy(GenerationMode.POSITIVE, path_parameters=known))
    calls = []

    @given(case=st.one_of(strategies))
    @settings(
        max_examples=EXAMPLES_PER_OPERATION,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        derandomize=True,
        database=None,
    )
    def call(case: schemathesis.Case) -> None:
        response = case.call_and_validate(headers=alice.headers, excluded_checks=EXCLUDED_CHECKS)
        calls.append(response.status_code)

    call()
    assert calls, label
    print(f"{label}: {len(calls)} examples, statuses {sorted(set(calls))}")
