"""core.report: a report written by a real job validates, round-trips, and explains every layer."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from core.report import SCHEMA_VERSION, JobReport, ReportError, parse_report, read_report, report_schema
from tests.reports import TINY_JOB


def test_a_real_report_validates_and_round_trips(real_report_dir: Path) -> None:
    raw = json.loads((real_report_dir / "report.json").read_text())
    report = JobReport.model_validate(raw)
    assert report.schema_version == SCHEMA_VERSION
    again = JobReport.model_validate_json(report.model_dump_json())
    assert again == report
    # the file is the model's own dump: nothing is added or lost on the way
    assert json.loads(report.model_dump_json()) == raw


def test_a_real_report_has_every_figure(real_report: JobReport) -> None:
    assert set(real_report.latency_ms) == {str(b) for b in TINY_JOB["measure"]["batch_sizes"]}
    assert real_report.params.ratio == pytest.approx(real_report.params.after / real_report.params.before)
    assert real_report.size_bytes is not None and real_report.size_bytes.after < real_report.size_bytes.before
    assert real_report.chosen is not None and real_report.reference is not None
    assert real_report.accuracy.val.before == real_report.reference.val_accuracy
    assert real_report.search.evaluations == len(real_report.pareto)
    assert real_report.files["safetensors"].max_abs_diff is not None
    assert set(real_report.timings) >= {"prepare", "train", "collapse", "compress", "measure", "export"}
    assert real_report.training is not None and real_report.training.factors == 2
    assert len(real_report.training.history) == TINY_JOB["train"]["epochs"]


def test_every_layer_row_says_what_happened_and_why(real_report: JobReport) -> None:
    # fcn depth 2: two Linear layers (64 -> 16 -> 10), both composed by LoRITa and in the SVT
    assert {k: r.shape for k, r in real_report.ranks.items()} == {"1": [16, 64], "4": [10, 16]}
    assert real_report.training is not None
    assert real_report.training.composed == ["1.weight", "4.weight"]
    for row in real_report.ranks.values():
        assert row.composed is True and row.compose_reason is None
        assert row.full_rank == min(row.shape)
        assert (row.reason is None) == row.factorized
        assert row.kept_rank < row.full_rank if row.factorized else row.kept_rank == row.full_rank
    assert real_report.chosen is not None
    assert {k: r.kept_rank for k, r in real_report.ranks.items()} == real_report.chosen.ranks


def test_the_report_module_does_not_import_torch() -> None:
    code = "import sys, core.report, store.lifecycle; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_unreadable_reports_are_errors_a_person_can_read(tmp_path: Path, real_report: JobReport) -> None:
    with pytest.raises(ReportError, match="does not exist"):
        read_report(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ReportError, match="not valid JSON"):
        read_report(tmp_path / "bad.json")
    data = json.loads(real_report.model_dump_json())
    del data["params"]
    data["extra_field"] = 1
    with pytest.raises(ReportError, match=r"params: Field required.*extra_field"):
        parse_report(data)
    data = json.loads(real_report.model_dump_json())
    data["schema_version"] = SCHEMA_VERSION + 1
    with pytest.raises(ReportError, match="upgrade lorita"):
        parse_report(data)


def test_the_schema_describes_the_report(real_report: JobReport) -> None:
    schema = report_schema()
    assert schema["title"] == "JobReport"
    assert set(schema["required"]) <= set(JobReport.model_fields)
    assert set(json.loads(real_report.model_dump_json())) == set(schema["properties"])
