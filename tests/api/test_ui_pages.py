"""The page's sign-in, its defences against cross-site requests and its tenant rules, without a
browser (the browser tests in tests/ui drive the same pages in Chromium)."""

from __future__ import annotations

import re
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from api.ui.security import csrf_token
from store.models import Job
from tests.api.conftest import Caller

pytestmark = pytest.mark.postgres

JOB: dict[str, Any] = {
    "model": {"arch": "fcn", "options": {"depth": 2, "width": 16}},
    "dataset": {"name": "digits"},
    "train": {"factors": 2, "epochs": 2},
    "compress": {"policy": "global", "keep": 0.5},
}
HIDDEN_CSRF = re.compile(r'name="csrf" value="([^"]+)"')


def sign_in(client: TestClient, caller: Caller, next_: str = "/ui/jobs") -> Any:
    page = client.get("/ui/login")
    token = HIDDEN_CSRF.search(page.text)
    assert token is not None
    return client.post(
        "/ui/login",
        data={"csrf": token.group(1), "api_key": caller.key, "next": next_},
        follow_redirects=False,
    )


def submit(client: TestClient, caller: Caller) -> str:
    resp = client.post("/v1/jobs", headers=caller.headers, json=JOB)
    assert resp.status_code == 202, resp.text
    return str(resp.json()["id"])


def test_root_and_pages_lead_to_the_sign_in_without_a_session(client: TestClient) -> None:
    root = client.get("/", follow_redirects=False)
    jobs = client.get("/ui/jobs", follow_redirects=False)

    assert root.status_code == 302 and root.headers["location"] == "/ui"
    assert jobs.status_code == 303 and jobs.headers["location"].startswith("/ui/login?next=")


def test_sign_in_sets_an_httponly_samesite_strict_cookie(client: TestClient, alice: Caller) -> None:
    resp = sign_in(client, alice)

    assert resp.status_code == 303 and resp.headers["location"] == "/ui/jobs"
    cookie = next(c for c in resp.headers.get_list("set-cookie") if c.startswith("lorita_session="))
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/" in cookie
    page = client.get("/ui/jobs")
    assert page.status_code == 200 and alice.tenant.name in page.text


def test_sign_in_refuses_a_wrong_key_a_missing_form_token_and_another_origin(
    client: TestClient, alice: Caller
) -> None:
    page = client.get("/ui/login")
    token = HIDDEN_CSRF.search(page.text).group(1)  # type: ignore[union-attr]

    wrong = client.post("/ui/login", data={"csrf": token, "api_key": "lrt_nope"}, follow_redirects=False)
    no_token = client.post("/ui/login", data={"api_key": alice.key}, follow_redirects=False)
    elsewhere = client.post(
        "/ui/login",
        data={"csrf": token, "api_key": alice.key},
        headers={"Origin": "https://evil.example"},
        follow_redirects=False,
    )

    assert wrong.status_code == 401 and "not valid" in wrong.text and "lorita_session" not in client.cookies
    assert no_token.status_code == 403
    assert elsewhere.status_code == 403


def test_next_never_leads_to_another_site(client: TestClient, alice: Caller) -> None:
    for target in ("//evil.example/x", "https://evil.example/", "/ui/../../x\\y"):
        client.cookies.clear()
        assert sign_in(client, alice, target).headers["location"] == "/ui/jobs"


def test_a_form_post_needs_the_sessions_csrf_token_and_this_origin(
    client: TestClient, alice: Caller, session: Session
) -> None:
    job_id = submit(client, alice)
    sign_in(client, alice)
    url = f"/ui/jobs/{job_id}/cancel"

    no_token = client.post(url, follow_redirects=False)
    wrong_token = client.post(url, data={"csrf": csrf_token("another key")}, follow_redirects=False)
    other_origin = client.post(
        url, data={"csrf": csrf_token(alice.key)}, headers={"Origin": "null"}, follow_redirects=False
    )
    assert (no_token.status_code, wrong_token.status_code, other_origin.status_code) == (403, 403, 403)
    assert no_token.headers["content-type"].startswith("text/html") and "CSRF token" in no_token.text
    assert "cross-site request refused" in other_origin.text
    assert session.get(Job, job_id, populate_existing=True).status == "queued"  # type: ignore[union-attr]

    ok = client.post(
        url,
        data={"csrf": csrf_token(alice.key)},
        headers={"Origin": "http://testserver"},
        follow_redirects=False,
    )
    assert ok.status_code == 303
    assert session.get(Job, job_id, populate_existing=True).status == "canceled"  # type: ignore[union-attr]


def test_the_bridge_needs_the_cookie_and_for_writes_the_token(client: TestClient, alice: Caller) -> None:
    job_id = submit(client, alice)
    assert client.get("/ui/api/jobs").status_code == 401
    sign_in(client, alice)

    listed = client.get("/ui/api/jobs")
    write_without_token = client.post(f"/ui/api/jobs/{job_id}/cancel")
    write_with_token = client.post(
        f"/ui/api/jobs/{job_id}/cancel", headers={"X-CSRF-Token": csrf_token(alice.key)}
    )
    outside = client.get("/ui/api/healthz")

    assert listed.status_code == 200 and [j["id"] for j in listed.json()["data"]] == [job_id]
    assert write_without_token.status_code == 403
    assert write_with_token.status_code == 200 and write_with_token.json()["status"] == "canceled"
    assert outside.status_code == 404


def test_another_tenant_sees_nothing_of_the_job_on_the_page(
    client: TestClient, alice: Caller, bob: Caller, session: Session
) -> None:
    job_id = submit(client, alice)
    sign_in(client, bob)

    listing = client.get("/ui/jobs")
    page = client.get(f"/ui/jobs/{job_id}")
    bridged = client.get(f"/ui/api/jobs/{job_id}")
    cancel = client.post(
        f"/ui/jobs/{job_id}/cancel", data={"csrf": csrf_token(bob.key)}, follow_redirects=False
    )

    assert job_id not in listing.text
    assert page.status_code == 404 and "Not found" in page.text
    assert bridged.status_code == 404
    assert cancel.status_code == 404
    assert session.get(Job, job_id, populate_existing=True).status == "queued"  # type: ignore[union-attr]


def test_pages_forbid_framing_and_outside_scripts(client: TestClient, alice: Caller) -> None:
    sign_in(client, alice)

    page = client.get("/ui/jobs/new")

    assert page.status_code == 200
    assert page.headers["X-Frame-Options"] == "DENY"
    assert "script-src 'self'" in page.headers["Content-Security-Policy"]
    assert 'value="digits-fcn-lorita"' in page.text  # the form starts from examples/digits_fcn.json
    assert client.get("/ui/static/app.js").status_code == 200


def test_new_job_form_offers_the_latency_budget_policy_and_int8_export(
    client: TestClient, alice: Caller
) -> None:
    sign_in(client, alice)

    page = client.get("/ui/jobs/new").text

    assert '<option value="latency_budget"' in page
    for field in ("budget", "batch_size", "runtime", "max_evals"):  # shown when latency_budget is chosen
        start = page.index(f'<label for="f-compress.{field}"')
        assert "latency_budget" in page[page.rindex("data-policies=", 0, start) : start]
    assert '<option value="onnxruntime"' in page and '<option value="torch"' in page
    assert 'data-export="onnx_int8"' in page


def test_use_this_point_posts_the_points_index_and_the_derived_job_takes_its_ranks(
    client: TestClient, alice: Caller, bob: Caller, session: Session
) -> None:
    from api.operating_points import DENSE_WEIGHTS
    from store.models import Artifact, Result
    from store.status import JobStatus

    job_id = submit(client, alice)
    pareto = [
        {"stage": "reference", "params": 900, "flops": 1800, "val_accuracy": 0.9, "ranks": {"a": 16, "b": 8}},
        {"stage": "bisection", "params": 300, "flops": 600, "val_accuracy": 0.8, "ranks": {"a": 3, "b": 8}},
    ]
    url = f"/ui/jobs/{job_id}/select"
    form = {"csrf": csrf_token(alice.key), "point": "1"}
    sign_in(client, alice)
    not_yet = client.post(url, data=form, follow_redirects=False)
    job = session.get(Job, job_id)
    assert job is not None
    job.status = JobStatus.SUCCEEDED
    session.add(Artifact(job_id=job_id, name=DENSE_WEIGHTS, size_bytes=1, sha256="0" * 64, location="x/y"))
    session.add(Result(job_id=job_id, report={"pareto": pareto}))
    session.commit()

    made = client.post(url, data=form, follow_redirects=False)
    past_the_end = client.post(url, data=form | {"point": "2"}, follow_redirects=False)
    not_a_number = client.post(url, data=form | {"point": "x"}, follow_redirects=False)
    sign_in(client, bob)
    other = client.post(url, data={"csrf": csrf_token(bob.key), "point": "1"}, follow_redirects=False)

    assert not_yet.status_code == 409 and "succeeded" in not_yet.text
    assert made.status_code == 303
    derived = session.get(Job, made.headers["location"].rsplit("/", 1)[1])
    assert derived is not None and derived.parent_id == job_id
    assert derived.config["compress"]["policy"] == "ranks"
    assert derived.config["compress"]["ranks"] == {"a": 3, "b": 8}
    assert past_the_end.status_code == 422 and "points 0..1" in past_the_end.text
    assert not_a_number.status_code == 422 and "point" in not_a_number.text
    assert other.status_code == 404
    assert session.query(Job).filter(Job.parent_id == job_id).count() == 1


def test_the_job_page_shows_the_given_models_accuracy_and_the_reports_warnings(
    client: TestClient, alice: Caller, session: Session, given_weights_reports: tuple[Any, Any, Any]
) -> None:
    from store.models import Result
    from store.status import JobStatus

    _, wrecked, _ = given_weights_reports
    job_id = submit(client, alice)
    job = session.get(Job, job_id)
    assert job is not None
    job.status = JobStatus.SUCCEEDED
    session.add(Result(job_id=job_id, report=wrecked.model_dump(mode="json")))
    session.commit()
    sign_in(client, alice)

    page = client.get(f"/ui/jobs/{job_id}").text

    given = wrecked.training.given_val_accuracy
    assert f"Your model as given, before LoRITa training: validation accuracy {100 * given:.2f}%" in page
    [warning] = wrecked.warnings
    assert '<p class="warning" role="note">' + warning.replace("'", "&#39;") + "</p>" in page
