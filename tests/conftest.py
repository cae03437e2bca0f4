"""Shared test settings: deterministic, single-threaded torch so results do not depend on load."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _torch_defaults() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
