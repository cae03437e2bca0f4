"""A job's status: one vocabulary for the database, the lifecycle, the API and the CLI.

Kept free of SQLAlchemy so that light clients (the CLI's HTTP client) can import it.
"""

from __future__ import annotations

from enum import StrEnum


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"

    @property
    def finished(self) -> bool:
        """True once the job will not change any more (succeeded, failed or canceled)."""
        return self in FINISHED


FINISHED: frozenset[JobStatus] = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED})


def sql_in_list(column: str) -> str:
    """``column IN ('queued', ...)``: the text of the database's check constraint on the status."""
    return f"{column} IN ({', '.join(repr(s.value) for s in JobStatus)})"
