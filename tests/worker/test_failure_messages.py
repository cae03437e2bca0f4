"""What a job's user reads when it fails: their input's problem without server paths, or a
sentence with a reference for an unexpected failure (it read ``internal error: <Type>: <text>``)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from tests.worker.conftest import job_row, submit
from worker.tasks import execute_job

CONFIG: dict[str, Any] = {
    "model": {"arch": "fcn", "options": {"depth": 2, "width": 8}},
    "dataset": {"name": "digits"},
    "train": {"epochs": 1, "batch_size": 64},
    "compress": {"policy": "global", "keep": 0.5},
    "measure": {"latency": False},
    "export": ["safetensors"],
    "device": "cpu",
}


def test_an_unexpected_failure_reads_as_a_sentence_with_a_log_reference(
    env: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import core.pipeline

    def broken(*_args: Any, **_kwargs: Any) -> Any:
        raise KeyError("/srv/lorita/var/work/tenant-7/layers.3.weight_orig")

    env.setattr(core.pipeline, "run_job", broken)
    job_id = submit(CONFIG, max_attempts=1)

    with caplog.at_level(logging.ERROR, logger="worker.tasks"):
        assert execute_job(job_id) == "failed"

    error = job_row(job_id).error or ""
    assert error.startswith("the job failed because of a problem on the server")
    for internal in ("internal error", "KeyError", "/srv", "tenant-7", "weight_orig"):
        assert internal not in error
    reference = error.rsplit(" ", 1)[-1]
    assert any(reference in r.getMessage() and "KeyError" in r.getMessage() for r in caplog.records)


def test_a_data_error_keeps_its_advice_but_not_the_server_path(
    env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import core.pipeline
    from core.config import ConfigError

    def bad_data(*_args: Any, **_kwargs: Any) -> Any:  # as core.data.load_job_data raises it
        raise ConfigError(
            f"cannot read image {tmp_path}/tenants/t-1/datasets/d-2/imagefolder/cat/7.png; replace it"
        )

    env.setattr(core.pipeline, "run_job", bad_data)
    job_id = submit(CONFIG, max_attempts=1)

    execute_job(job_id)

    error = job_row(job_id).error or ""
    assert "7.png; replace it" in error
    assert str(tmp_path) not in error and "t-1" not in error
