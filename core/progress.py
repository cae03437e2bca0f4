"""Progress reporting and cancellation shared by the CLI, the worker and the library.

Stdlib only: the API and the store import :class:`Stage` without importing torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any


class Stage(StrEnum):
    """The stages of a job, in order; a job's ``stage`` column holds one of these values."""

    PREPARE = "prepare"
    TRAIN = "train"
    COLLAPSE = "collapse"
    COMPRESS = "compress"
    FINETUNE = "finetune"
    MEASURE = "measure"
    EXPORT = "export"
    DONE = "done"

    @property
    def window(self) -> tuple[float, float]:
        """Where this stage sits in the whole job's progress (start, end), both in 0..1."""
        return _WINDOWS[self]


# Training dominates a job's time; the other stages get thin slices.
_WINDOWS: dict[Stage, tuple[float, float]] = {
    Stage.PREPARE: (0.0, 0.02),
    Stage.TRAIN: (0.02, 0.80),
    Stage.COLLAPSE: (0.80, 0.81),
    Stage.COMPRESS: (0.81, 0.86),
    Stage.FINETUNE: (0.86, 0.93),
    Stage.MEASURE: (0.93, 0.96),
    Stage.EXPORT: (0.96, 1.0),
    Stage.DONE: (1.0, 1.0),
}

STAGES: tuple[str, ...] = tuple(s.value for s in Stage)


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
