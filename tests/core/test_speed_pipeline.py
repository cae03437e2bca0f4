"""A job with the latency budget, rounding, distillation and INT8 export, end to end."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.config import parse_config
from core.pipeline import run_job
from core.report import JobReport, read_report


@pytest.fixture(scope="module")
def speed_job(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, JobReport]:
    out = tmp_path_factory.mktemp("speed_job")
    config = parse_config(
        {
            "model": {"arch": "fcn", "options": {"depth": 3, "width": 768, "batchnorm": False}},
            "dataset": {"name": "synthetic", "input_shape": [1, 32, 32], "n_train": 400, "n_test": 200},
            "train": {"factors": 1, "epochs": 2, "lr": 0.003, "weight_decay": 0.0, "batch_size": 100},
            "compress": {"policy": "latency_budget", "budget": 0.5, "batch_size": 64, "max_evals": 8},
            "finetune": {"epochs": 1, "distill": {"alpha": 0.5, "temperature": 4.0}},
            "measure": {"latency_repeats": 5, "batch_sizes": [1, 64]},
            "export": ["safetensors", "onnx_int8"],
            "device": "cpu",
        }
    )
    report = run_job(config, out)
    return out, report


def test_latency_budget_is_measured_and_met(speed_job: tuple[Path, JobReport]) -> None:
    _, report = speed_job
    ls = report.latency_search
    assert ls is not None and ls.met and ls.runtime == "onnxruntime" and ls.batch_size == 64
    assert ls.measured_fraction is not None and ls.measured_fraction <= 0.5
    assert ls.predicted_ms is not None and ls.measured_ms is not None and ls.confirmations
    # the rounding is visible: the CPU default, applied to every candidate
    assert report.rounding is not None and report.rounding.round_to == 8 and "cpu" in report.rounding.source
    for name, row in report.ranks.items():
        if row.factorized:
            assert row.kept_rank % 8 == 0, name
            assert row.kept_rank * sum(row.shape) < row.shape[0] * row.shape[1]
        elif name in ls.reasons:
            assert row.reason == ls.reasons[name]


def test_int8_export_and_summary(speed_job: tuple[Path, JobReport]) -> None:
    out, report = speed_job
    assert (out / "model.int8.onnx").is_file() and (out / "model.onnx").is_file()
    int8 = report.int8
    assert int8 is not None and int8.file == "model.int8.onnx"
    assert int8.bytes is not None and int8.fp32_bytes is not None and int8.bytes < int8.fp32_bytes
    assert int8.agreement is not None and 0.0 <= int8.agreement <= 1.0
    assert int8.main_artifact == ("model.int8.onnx" if int8.within_budget else "model.onnx")
    summary = report.summary
    assert summary is not None and set(summary.rows) == {"dense", "compressed", "int8"}
    for row in summary.rows.values():
        assert set(row.latency_ms) == {"1", "64"} and row.bytes and row.runtime == "onnxruntime"
        assert all(row.fastest_ms[b] <= row.latency_ms[b] for b in row.latency_ms)
    assert summary.rows["compressed"].params == report.params.after
    assert summary.rows["int8"].test_accuracy == int8.test_accuracy
    # the report on disk is the same, and validates
    assert read_report(out).summary == summary


def test_finetune_distilled(speed_job: tuple[Path, JobReport]) -> None:
    _, report = speed_job
    assert report.finetune is not None and report.finetune.history
    assert report.config["finetune"]["distill"] == {"alpha": 0.5, "temperature": 4.0}


def test_cli_prints_the_deployed_table(speed_job: tuple[Path, JobReport]) -> None:
    from cli.output import format_report_table

    _, report = speed_job
    text = format_report_table(report)
    print(text)
    assert "as deployed (onnxruntime" in text
    for label in ("dense", "compressed", "compressed INT8"):
        assert any(line.startswith(label + " ") for line in text.splitlines()), label
    assert "ms @1" in text and "ms @64" in text
    assert "latency_budget 0.5 at batch 64: predicted" in text
    assert "ranks rounded to multiples of 8" in text and "INT8:" in text
