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


# a job with a searched Pareto curve (accuracy_budget), for the select / ranks / plan tests
SEARCH_JOB: dict[str, Any] = {
    "name": "tiny",
    "model": {"arch": "fcn", "options": {"depth": 3, "width": 32}},
    "dataset": {"name": "digits", "val_fraction": 0.2},
    "train": {"factors": 2, "epochs": 5, "lr": 0.01, "weight_decay": 2e-4, "batch_size": 64},
    "compress": {"policy": "accuracy_budget", "max_drop": 0.02, "max_evals": 10},
    "finetune": {"epochs": 0},
    "measure": {"latency": False},
    "export": ["safetensors"],
    "device": "cpu",
}


def run_tiny_job(out_dir: Path) -> JobReport:
    """Run :data:`TINY_JOB` into ``out_dir`` (a few seconds on one CPU core)."""
    from core.config import parse_config
    from core.pipeline import run_job

    return run_job(parse_config(TINY_JOB), out_dir)


# an FCN as a user would upload it: trained plainly (N=1) on digits, no compression
PLAIN_JOB: dict[str, Any] = {
    "model": {"arch": "fcn", "options": {"depth": 3, "width": 48}},
    "dataset": {"name": "digits"},
    "train": {"factors": 1, "epochs": 8, "lr": 0.01, "batch_size": 64},
    "compress": {"policy": "none"},
    "measure": {"latency": False},
    "export": ["safetensors"],
    "device": "cpu",
}


def given_weights_job(weights: Path, lr: float) -> dict[str, Any]:
    """LoRITa (N=2, one epoch of Adam at ``lr``) on the uploaded ``weights`` of :data:`PLAIN_JOB`'s model."""
    return PLAIN_JOB | {
        "model": PLAIN_JOB["model"] | {"weights": str(weights)},
        "train": {"factors": 2, "epochs": 1, "lr": lr, "batch_size": 64},
        "compress": {"policy": "global", "keep": 0.5},
    }


def run_given_weights_jobs(root: Path) -> tuple[Path, JobReport, JobReport]:
    """The uploaded weights, and two LoRITa jobs on them: one whose training wrecks the model
    (Adam at lr 1.0) and one that barely moves it (lr 1e-5). A few seconds on one core."""
    from core.config import parse_config
    from core.pipeline import run_job

    run_job(parse_config(PLAIN_JOB), root / "plain")
    weights = root / "plain" / "dense" / "model.safetensors"
    wrecked = run_job(parse_config(given_weights_job(weights, 1.0)), root / "wrecked")
    gentle = run_job(parse_config(given_weights_job(weights, 1e-5)), root / "gentle")
    return weights, wrecked, gentle
