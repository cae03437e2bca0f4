"""Shared test settings: deterministic, single-threaded torch so results do not depend on load."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from core.report import JobReport

# the S3 protocol server fixtures (s3_endpoint, s3) for every test package
pytest_plugins = ["tests.store.s3_server"]


@pytest.fixture(autouse=True)
def _torch_defaults() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def real_report_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The output directory of one real tiny job (tests/reports.py), run once per session."""
    from tests.reports import run_tiny_job

    torch.set_num_threads(1)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny-job")
    run_tiny_job(out)
    return out


@pytest.fixture(scope="session")
def given_weights_reports(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, JobReport, JobReport]:
    """Uploaded weights and two LoRITa jobs on them (tests/reports.py), run once per session."""
    from tests.reports import run_given_weights_jobs

    torch.set_num_threads(1)
    torch.manual_seed(0)
    return run_given_weights_jobs(tmp_path_factory.mktemp("given-weights"))


@pytest.fixture
def real_report(real_report_dir: Path) -> JobReport:
    """The report of that job, read back from its report.json."""
    from core.report import read_report

    return read_report(real_report_dir)
