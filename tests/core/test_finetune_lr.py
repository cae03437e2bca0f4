"""Fine-tuning's default lr is the training lr (lr rewinding), and the job keeps the better model."""

from __future__ import annotations

import math
from pathlib import Path

from core.config import FinetuneConfig, TrainConfig, parse_config
from core.data import load_data
from core.export import load_model
from core.pipeline import finetune_settings, run_job
from core.train import accuracy


def test_the_default_is_the_training_lr_unless_one_is_given() -> None:
    train = TrainConfig(lr=0.02)
    assert finetune_settings(FinetuneConfig(epochs=2), train, False).lr == 0.02
    assert finetune_settings(FinetuneConfig(epochs=2, lr=0.004), train, False).lr == 0.004
    # compressing given weights: no training lr to rewind to, a tenth of the default training lr
    assert finetune_settings(FinetuneConfig(epochs=2), None, False).lr == TrainConfig().lr / 10


def test_a_job_fine_tunes_at_the_training_lr_and_never_keeps_a_worse_model(tmp_path: Path) -> None:
    config = parse_config(
        {
            "model": {"arch": "fcn", "options": {"depth": 3, "width": 32}},
            "dataset": {"name": "digits"},
            "train": {"factors": 3, "epochs": 3, "lr": 0.02, "weight_decay": 1e-4},
            "compress": {"policy": "uniform", "keep": 0.15},
            "finetune": {"epochs": 2, "patience": 2},
            "measure": {"latency": False},
            "export": ["safetensors"],
            "device": "cpu",
        }
    )
    report = run_job(config, tmp_path)
    ft = report.finetune
    assert ft is not None and len(ft.history) == 2
    # cosine from the training lr over 2 epochs: the lr recorded after the first epoch is half of it
    assert math.isclose(ft.history[0].lr, 0.02 * (1 + math.cos(math.pi / 2)) / 2, rel_tol=1e-6)
    assert ft.val_accuracy_after is not None
    kept_val = max(ft.val_accuracy_before, ft.val_accuracy_after)
    assert report.accuracy.val.after == kept_val
    assert ft.kept == (ft.val_accuracy_after >= ft.val_accuracy_before)
    # the model on disk is the one the report describes
    data = load_data(config.dataset, seed=config.seed)
    assert math.isclose(accuracy(load_model(tmp_path).eval(), data.val), kept_val)
