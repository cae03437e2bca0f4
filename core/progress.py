"""Progress reporting and cancellation shared by the CLI, the worker and the library."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

STAGES = ("prepare", "train", "collapse", "compress", "finetune", "measure", "export", "done")


@dataclass
class Progress:
    """One progress report. ``fraction`` is the whole job's progress in 0..1."""

    stage: str
    fraction: float
    epoch: int | None = None
    epochs: int | None = None
    step: int | None = None
    steps: int | None = None
    loss: float | None = None
    val_accuracy: float | None = None
    message: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


ProgressFn = Callable[[Progress], None]
StopFn = Callable[[], bool]


class JobCanceled(Exception):
    """Raised inside the pipeline when ``should_stop()`` turns true."""


class JobError(Exception):
    """A failure a person can act on (bad data, weights that do not fit, a diverged loss)."""
