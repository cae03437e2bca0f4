"""A real report for fixtures: written by a tiny job (fcn on digits, one epoch), never by hand."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from core.report import JobReport

TINY_JOB: dict[str, Any] = {
    "name": "tiny",
    "model": {"arch": "fcn", "options": {"depth": 2, "width": 16}},
    "dataset": {"name": "digits"},
    "train": {"factors": 2, "epochs": 1, "batch_size": 128},
    "compress": {"policy": "global", "keep": 0.3},
    "measure": {"latency_repeats": 1, "batch_sizes": [1, 8]},
    "export": ["safetensors"],
    "device": "cpu",
}


def run_tiny_job(out_dir: Path) -> JobReport:
    """Run :data:`TINY_JOB` into ``out_dir`` (a few seconds on one CPU core)."""
    from core.config import parse_config
    from core.pipeline import run_job

    return run_job(parse_config(TINY_JOB), out_dir)
