"""Fixtures shared by the core tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def search_job_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The output directory of :data:`tests.reports.SEARCH_JOB`, run once per session."""
    from core.config import parse_config
    from core.pipeline import run_job
    from tests.reports import SEARCH_JOB

    torch.set_num_threads(1)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("search-job")
    run_job(parse_config(SEARCH_JOB), out)
    return out
