"""Shared test settings: deterministic, single-threaded torch so results do not depend on load."""

from __future__ import annotations

import pytest
import torch

# the S3 protocol server fixtures (s3_endpoint, s3) for every test package
pytest_plugins = ["tests.store.s3_server"]


@pytest.fixture(autouse=True)
def _torch_defaults() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
