"""A job that trains given weights reports how accurate they were, and warns when LoRITa training
left the model less accurate than it was given (every budget is measured from the trained model)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cli.output import format_report_table
from core.config import parse_config
from core.data import load_job_data
from core.report import JobReport, TrainingInfo, read_report
from core.stages import build, result_warnings
from core.train import accuracy
from tests.reports import given_weights_job, run_tiny_job


@pytest.fixture
def jobs(given_weights_reports: tuple[Path, JobReport, JobReport]) -> tuple[Path, JobReport, JobReport]:
    return given_weights_reports


def test_the_given_models_accuracy_is_measured_on_the_jobs_own_splits(
    jobs: tuple[Path, JobReport, JobReport],
) -> None:
    weights, wrecked, gentle = jobs
    config = parse_config(given_weights_job(weights, 1.0))
    data = load_job_data(config)
    uploaded = build(config, data)  # the weights as uploaded, before any training
    val, test = accuracy(uploaded, data.val), accuracy(uploaded, data.test)
    assert val > 0.8  # a real, trained model
    for report in (wrecked, gentle):
        assert report.training is not None
        assert report.training.given_val_accuracy == pytest.approx(val)
        assert report.training.given_test_accuracy == pytest.approx(test)


def test_training_that_loses_accuracy_is_warned_about_and_gentle_training_is_not(
    jobs: tuple[Path, JobReport, JobReport],
) -> None:
    _, wrecked, gentle = jobs
    assert wrecked.training is not None and wrecked.training.given_val_accuracy is not None
    before, after = wrecked.training.given_val_accuracy, wrecked.accuracy.val.before
    assert after is not None and before - after > 0.2  # lr 1.0 wrecked it
    [warning] = wrecked.warnings
    assert f"from {100 * before:.2f}% to {100 * after:.2f}% validation accuracy" in warning
    assert "a lower train.lr than 1 (e.g. 0.1)" in warning
    assert gentle.accuracy.val.before is not None
    assert abs(gentle.accuracy.val.before - before) <= 0.01 and gentle.warnings == []
    # both are in report.json, and the CLI's table shows them
    table = format_report_table(wrecked)
    assert f"your model as given, before LoRITa training: val {100 * before:.2f}%" in table
    assert f"warning: {warning}" in table


def test_the_warning_travels_with_the_report_file(
    jobs: tuple[Path, JobReport, JobReport], tmp_path_factory: pytest.TempPathFactory
) -> None:
    _, wrecked, _ = jobs
    path = tmp_path_factory.mktemp("copy")
    wrecked.write(path / "report.json")
    again = read_report(path)
    assert again.warnings == wrecked.warnings and again.training == wrecked.training


def test_a_model_trained_from_scratch_has_no_given_accuracy(tmp_path: Path) -> None:
    report = run_tiny_job(tmp_path)
    assert report.training is not None
    assert report.training.given_val_accuracy is None and report.training.given_test_accuracy is None
    assert report.warnings == []


def test_the_warning_threshold_is_one_point() -> None:
    config = parse_config(given_weights_job(Path("w.safetensors"), 0.01))
    trained = TrainingInfo(factors=2, given_val_accuracy=0.96)
    assert result_warnings(config, trained, 0.955) == []
    [warning] = result_warnings(config, trained, 0.92)
    assert "from 96.00% to 92.00% validation accuracy (-4.00 points)" in warning
    assert "a lower train.lr than 0.01 (e.g. 0.001)" in warning
    assert result_warnings(config, TrainingInfo(factors=2), 0.5) == []
    assert result_warnings(config, None, 0.5) == []
