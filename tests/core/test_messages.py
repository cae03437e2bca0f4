"""core.messages: what a job's user reads never shows this machine's paths or internals."""

from __future__ import annotations

import errno

import pytest

from core.data import DataError
from core.messages import failure_message, scrub_paths, user_message


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (
            "dataset.path /srv/lorita/var/artifacts/tenants/7f3a9c/datasets/d41d8c/data.npz does not exist",
            "dataset.path data.npz does not exist",
        ),
        (
            "cannot read image /tmp/lorita-work/ab12/imagefolder/cats/001.png: truncated",
            "cannot read image 001.png: truncated",
        ),
        ("could not open '/var/lib/x/y/checkpoint.pt'", "could not open 'checkpoint.pt'"),
        ("see file:///opt/a/b/report.json", "see report.json"),
        (
            "x_train has shape (2, 0); each sample needs a value",
            "x_train has shape (2, 0); each sample needs a value",
        ),
        ("give a ratio like 1/2 or a path like model.pt", "give a ratio like 1/2 or a path like model.pt"),
        (
            "upload it with POST /v1/models/ and see GET /v1/jobs/abc/artifacts",
            "upload it with POST /v1/models/ and see GET /v1/jobs/abc/artifacts",
        ),
    ],
)
def test_absolute_paths_become_file_names(raw: str, expected: str) -> None:
    assert scrub_paths(raw) == expected


def test_a_person_fixable_error_keeps_its_advice_without_the_path() -> None:
    err = DataError("/var/artifacts/tenants/t-123/datasets/d-9/data.npz: x_train contains NaN; remove them")

    message = user_message(err)

    assert message == "data.npz: x_train contains NaN; remove them"
    assert "t-123" not in message


def test_unexpected_errors_read_as_a_sentence_with_a_reference() -> None:
    err = KeyError("layers.3.weight_orig")

    message = failure_message(err, "abc123def456")

    assert "abc123def456" in message
    assert "KeyError" not in message and "weight_orig" not in message and "internal error" not in message


def test_out_of_memory_and_disk_full_say_what_to_do() -> None:
    oom = failure_message(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), "r")
    disk = failure_message(OSError(errno.ENOSPC, "No space left on device", "/var/a/b/c.pt"), "r")

    assert "train.batch_size" in oom and "CUDA" not in oom
    assert "no space left on the artifact store" in disk and "/var" not in disk


def test_long_messages_are_cut() -> None:
    assert len(scrub_paths("x" * 5000)) == 1000
