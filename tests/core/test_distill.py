"""Distillation while fine-tuning: alpha 0 is plain fine-tuning; alpha > 0 adds the teacher term."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from core.config import FinetuneConfig
from core.train import FitSettings, distillation_loss, fit

CPU = torch.device("cpu")


def _data(n: int = 48, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    return TensorDataset(x, y)


def _student(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def _teacher() -> nn.Module:
    return _student(seed=1).eval()


def test_alpha_zero_equals_plain_finetuning() -> None:
    data = _data()
    settings = FitSettings(epochs=3, lr=0.05, batch_size=16, seed=0)
    plain, distilled = _student(), _student()
    fit(plain, data, data, settings, device=CPU)
    zero = FitSettings(**{**settings.__dict__, "distill_alpha": 0.0, "distill_temperature": 4.0})
    fit(distilled, data, data, zero, device=CPU, teacher=_teacher())
    for (name, a), (_, b) in zip(plain.state_dict().items(), distilled.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_alpha_positive_changes_training() -> None:
    data = _data()
    settings = FitSettings(epochs=2, lr=0.05, batch_size=16, seed=0)
    plain, distilled = _student(), _student()
    fit(plain, data, data, settings, device=CPU)
    half = FitSettings(**{**settings.__dict__, "distill_alpha": 0.5})
    fit(distilled, data, data, half, device=CPU, teacher=_teacher())
    assert not torch.equal(plain.state_dict()["0.weight"], distilled.state_dict()["0.weight"])


def _hand_loss(
    student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, alpha: float, t: float
) -> float:
    """The loss written out element by element, in float64."""
    s64, t64 = student.double(), teacher.double()
    total_ce, total_kl = 0.0, 0.0
    for i in range(s64.shape[0]):
        row = s64[i]
        total_ce += -(row[labels[i]] - torch.logsumexp(row, 0)).item()
        ps = torch.softmax(row / t, 0)
        pt = torch.softmax(t64[i] / t, 0)
        total_kl += sum(float(pt[c] * math.log(pt[c] / ps[c])) for c in range(row.numel()))
    n = s64.shape[0]
    return (1 - alpha) * total_ce / n + alpha * t * t * total_kl / n


@pytest.mark.parametrize("alpha,temperature", [(0.5, 4.0), (1.0, 2.0), (0.3, 1.0)])
def test_loss_matches_hand_computation(alpha: float, temperature: float) -> None:
    g = torch.Generator().manual_seed(3)
    student, teacher = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g) * 3
    labels = torch.tensor([0, 1, 2, 3, 1])
    ce = nn.functional.cross_entropy(student, labels)
    got = distillation_loss(ce, student, teacher, alpha, temperature)
    assert float(got) == pytest.approx(_hand_loss(student, teacher, labels, alpha, temperature), rel=1e-5)


def test_fit_reports_the_distillation_loss() -> None:
    # lr 0 and one batch: the recorded loss is the loss of the starting weights, by hand.
    data = _data(n=20)
    student, teacher = _student(), _teacher()
    with torch.no_grad():
        expected = _hand_loss(student(data.tensors[0]), teacher(data.tensors[0]), data.tensors[1], 0.5, 4.0)
    settings = FitSettings(epochs=1, lr=0.0, batch_size=64, distill_alpha=0.5, distill_temperature=4.0)
    result = fit(student, data, data, settings, device=CPU, teacher=teacher)
    assert result.history[0]["loss"] == pytest.approx(expected, rel=1e-5)


def test_teacher_matching_student_adds_nothing() -> None:
    logits = torch.randn(4, 3)
    ce = torch.tensor(1.25)
    assert float(distillation_loss(ce, logits, logits.clone(), 1.0, 4.0)) == pytest.approx(0.0, abs=1e-6)


def test_config_accepts_distill_and_rejects_bad_values() -> None:
    cfg = FinetuneConfig.model_validate({"epochs": 2, "distill": {"alpha": 0.5, "temperature": 4.0}})
    assert cfg.distill is not None and cfg.distill.alpha == 0.5
    assert FinetuneConfig().distill is None
    with pytest.raises(ValueError):
        FinetuneConfig.model_validate({"distill": {"alpha": 1.5}})
    with pytest.raises(ValueError):
        FinetuneConfig.model_validate({"distill": {"temperature": 0}})
    with pytest.raises(ValueError):
        fit(
            _student(),
            _data(),
            _data(),
            FitSettings(epochs=1, distill_alpha=2.0),
            device=CPU,
            teacher=_teacher(),
        )
