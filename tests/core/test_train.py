"""Training: the LoRITa low-rank effect, exact resume, clear failures."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from core import svt
from core.config import DatasetConfig
from core.data import DataBundle, load_data
from core.lorita import apply_lorita, collapse
from core.progress import JobCanceled, JobError, Progress
from core.train import FitSettings, accuracy, fit
from core.zoo import build_model

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def digits() -> DataBundle:
    return load_data(DatasetConfig(name="digits"), seed=0)


def _fcn(data: DataBundle, n_factors: int, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model("fcn", 10, data.input_shape, {"depth": 4, "width": 64})
    apply_lorita(model, n_factors, init="scratch", seed=seed)
    return model


def test_lorita_with_three_factors_gives_clearly_lower_rank_than_plain_training(digits: DataBundle) -> None:
    settings = FitSettings(epochs=12, optimizer="adam", lr=0.01, weight_decay=5e-4, batch_size=128)
    counts, accs = {}, {}
    for n in (1, 3):
        model = _fcn(digits, n)
        fit(model, digits.train, digits.val, settings, device=CPU)
        collapse(model)
        accs[n] = accuracy(model, digits.val)
        counts[n] = svt.count_above(svt.compute_spectra(model), 0.1)
    assert accs[1] > 0.9 and accs[3] > 0.9  # both learned the task
    assert counts[3] < 0.5 * counts[1], counts


def test_resumed_training_equals_uninterrupted_training(digits: DataBundle, tmp_path: Path) -> None:
    settings = FitSettings(
        epochs=3, optimizer="sgd", lr=0.05, weight_decay=1e-3, batch_size=256, augment=False
    )
    straight = _fcn(digits, 3)
    fit(straight, digits.train, digits.val, settings, device=CPU)

    ckpt = tmp_path / "checkpoint.pt"
    interrupted = _fcn(digits, 3)
    epochs_done: list[int] = []

    def on_progress(p: Progress) -> None:
        if p.message.endswith("done"):
            epochs_done.append(int(p.epoch or 0))

    def stop_after_two() -> bool:
        return len(epochs_done) >= 2

    with pytest.raises(JobCanceled):
        fit(
            interrupted,
            digits.train,
            digits.val,
            settings,
            device=CPU,
            checkpoint=ckpt,
            tag="t",
            progress=on_progress,
            should_stop=stop_after_two,
        )
    assert epochs_done == [1, 2]

    resumed = _fcn(digits, 3, seed=123)  # a different init: everything must come from the checkpoint
    result = fit(resumed, digits.train, digits.val, settings, device=CPU, checkpoint=ckpt, tag="t")
    assert result.resumed_from_epoch == 2
    assert [h["epoch"] for h in result.history] == [1, 2, 3]
    for (k, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


def test_a_checkpoint_for_another_config_is_not_resumed(digits: DataBundle, tmp_path: Path) -> None:
    settings = FitSettings(epochs=1, batch_size=512)
    ckpt = tmp_path / "checkpoint.pt"
    fit(_fcn(digits, 2), digits.train, digits.val, settings, device=CPU, checkpoint=ckpt, tag="a")
    result = fit(_fcn(digits, 2), digits.train, digits.val, settings, device=CPU, checkpoint=ckpt, tag="b")
    assert result.resumed_from_epoch == 0


def test_a_diverging_loss_is_a_clear_error(digits: DataBundle) -> None:
    model = _fcn(digits, 2)
    with torch.no_grad():
        model.get_submodule("1").bias.fill_(float("nan"))  # the first Linear (after Flatten)
    with pytest.raises(JobError, match=r"diverged.*lower the learning rate"):
        fit(model, digits.train, digits.val, FitSettings(epochs=1), device=CPU)


def test_same_seed_same_result(digits: DataBundle) -> None:
    settings = FitSettings(epochs=1, batch_size=256, augment=False)
    a, b = _fcn(digits, 2), _fcn(digits, 2)
    fit(a, digits.train, digits.val, settings, device=CPU)
    fit(b, digits.train, digits.val, settings, device=CPU)
    for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y)
