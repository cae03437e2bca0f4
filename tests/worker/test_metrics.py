"""The run hooks that feed a worker's metrics: stage timing, the per-epoch checkpoint upload hook,
the wall-time limit, and the failure reasons."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import REGISTRY

from store.artifacts import ArtifactStoreFull
from worker.metrics import RunHooks, failure_reason, record_run


@dataclass
class P:
    stage: str
    epoch: int | None = None


def count(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_stages_are_timed_and_each_new_epoch_calls_the_hook_once() -> None:
    seen: list[P] = []
    epochs: list[int] = []
    before = count("lorita_worker_stage_duration_seconds_count", stage="train")
    hooks = RunHooks(seen.append, lambda: False, wall_seconds=3600, on_epoch=lambda: epochs.append(len(seen)))

    for p in (P("data"), P("train", 1), P("train", 1), P("train", 2), P("train", 3), P("compress")):
        hooks.progress(p)
    hooks.end_stage()

    assert len(seen) == 6  # every report still reaches the reporter
    # at the starts of epochs 2 and 3 and when training ends: the previous epoch's checkpoint exists
    assert epochs == [3, 4, 5]
    assert count("lorita_worker_stage_duration_seconds_count", stage="train") == before + 1
    assert count("lorita_worker_stage_duration_seconds_count", stage="compress") >= 1


def test_past_the_wall_time_should_stop_says_so_and_why() -> None:
    hooks = RunHooks(lambda p: None, lambda: False, wall_seconds=0.0)

    assert hooks.should_stop() and hooks.timed_out
    assert "LORITA_JOB_WALL_SECONDS" in hooks.wall_time_message()
    assert not RunHooks(lambda p: None, lambda: False, wall_seconds=3600).should_stop()


def test_failures_are_counted_by_reason() -> None:
    before = count("lorita_worker_job_failures_total", reason="no_space")

    record_run("failed", 1.5, failure_reason(ArtifactStoreFull()))
    record_run("succeeded", 2.0)

    assert count("lorita_worker_job_failures_total", reason="no_space") == before + 1
    assert failure_reason(OSError(28, "No space left on device")) == "no_space"
    assert failure_reason(ValueError("x")) == "internal"
    assert count("lorita_worker_jobs_total", outcome="succeeded") >= 1
