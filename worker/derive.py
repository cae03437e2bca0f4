"""Derived jobs: another operating point of a finished job, without training again.

A job with a ``parent_id`` (made by ``POST /v1/jobs/{id}/select``) runs ``core.pipeline.select``
from the parent's collapsed dense model, which a finished job keeps among its artifacts under
``dense/`` (:func:`dense_artifacts`). The task itself (claim, lease, progress, outcome) is the
same as for any job: ``worker.tasks`` asks :func:`runner_for` what to run.

core (and torch) is imported inside the functions only, as in ``worker.tasks``.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import select

from store.artifacts import ArtifactStore, LocalArtifactStore, sha256_file
from store.db import session_scope
from store.models import Artifact, Job, Result
from store.references import UnresolvedReference

log = logging.getLogger(__name__)

DENSE_DIR = "dense"  # core.pipeline.DENSE_DIR: the folder of out_dir holding the dense model
PARENT_DIR = "parent"  # under the derived run's work dir: the parent's report and dense model

Runner = Callable[..., Any]


class ParentUnavailable(UnresolvedReference):
    """The parent's dense model or report is gone (a person's message; the job fails with it)."""


def dense_artifacts(out_dir: Path, prefix: str, store: ArtifactStore) -> list[tuple[str, int, str, str]]:
    """The files of ``out_dir/dense`` as artifacts named ``dense/<file>`` (stored under ``prefix``).

    They are what a derived job starts from; the API leaves them out of the downloads unless
    asked (``?include=dense``).
    """
    folder = out_dir / DENSE_DIR
    if not folder.is_dir():
        return []
    artifacts = []
    for path in sorted(folder.iterdir()):
        if not path.is_file():
            continue
        name = f"{DENSE_DIR}/{path.name}"
        key = f"{prefix}/{name}"
        # a local store is the folder the run wrote into; another store gets a copy
        local = isinstance(store, LocalArtifactStore)
        size, sha256 = sha256_file(path) if local else store.put_file(key, path)
        artifacts.append((name, int(size), sha256, key))
    return artifacts


def parent_of(job_id: str) -> str | None:
    with session_scope() as session:
        return session.scalar(select(Job.parent_id).where(Job.id == job_id))


def fetch_parent(parent_id: str, config_json: dict[str, Any], source: Path, store: ArtifactStore) -> None:
    """Lay out the parent as ``core.pipeline.select`` reads a job directory: ``report.json`` (the
    parent's, with the derived job's own config, references resolved) and ``dense/``."""
    with session_scope() as session:
        result = session.get(Result, parent_id)
        dense = session.scalars(
            select(Artifact).where(Artifact.job_id == parent_id, Artifact.name.startswith(f"{DENSE_DIR}/"))
        ).all()
        report = dict(result.report) if result is not None else None
        files = [(a.name, a.location) for a in dense]
    if report is None or not files:
        raise ParentUnavailable(
            f"job {parent_id} no longer has its report or dense model; submit it again to choose "
            "other operating points"
        )
    if source.exists():
        shutil.rmtree(source)
    (source / DENSE_DIR).mkdir(parents=True)
    for name, location in files:
        try:
            got = Path(store.local_path(location))
        except Exception as err:  # a missing key on either store
            raise ParentUnavailable(f"the dense model of job {parent_id} is missing from the store") from err
        if not got.is_file():
            raise ParentUnavailable(f"the dense model of job {parent_id} is missing from the store")
        shutil.copyfile(got, source / name)
    report["config"] = config_json
    (source / "report.json").write_text(json.dumps(report, indent=2) + "\n")


def runner_for(job_id: str, store: ArtifactStore) -> Runner | None:
    """None for an ordinary job; for a derived one, a function with ``run_job``'s signature that
    runs ``select`` from the parent's dense model."""
    parent_id = parent_of(job_id)
    if parent_id is None:
        return None

    def run_selected(config: Any, out_dir: Path, *, work_dir: Path, progress: Any, should_stop: Any) -> Any:
        from core.pipeline import select as select_point

        source = Path(work_dir) / PARENT_DIR
        fetch_parent(parent_id, config.model_dump(mode="json"), source, store)
        report = select_point(
            source,
            config.compress.model_dump(mode="json"),
            out_dir,
            finetune=config.finetune.epochs > 0,
            progress=progress,
            should_stop=should_stop,
        )
        # the report names the parent job, not the worker's scratch folder
        report = report.model_copy(update={"selected_from": f"job {parent_id}"})
        report.write(Path(out_dir) / "report.json")
        shutil.rmtree(source, ignore_errors=True)
        return report

    return run_selected
