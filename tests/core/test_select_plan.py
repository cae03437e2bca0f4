"""`lorita select` (another operating point without training again), fine-tuning's
keep-the-better, and `lorita plan` (the dry run)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from cli.main import main
from core.config import parse_config
from core.pipeline import run_job, select
from core.report import JobReport, read_report
from tests.reports import SEARCH_JOB

JOB = SEARCH_JOB


def _report(path: Path) -> JobReport:
    return read_report(path)


def _figures(r: JobReport) -> dict[str, Any]:
    return {
        "ranks": r.ranks,
        "params": r.params,
        "flops": r.flops,
        "accuracy": r.accuracy,
        "pareto": [(p.ranks, p.val_accuracy, p.chosen) for p in r.pareto],
    }


def test_job_writes_plots_and_lists_them(search_job_dir: Path) -> None:
    report = _report(search_job_dir)
    for name in ("pareto", "spectra"):
        file = search_job_dir / report.plots[name].file
        assert file.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sum(p.chosen for p in report.pareto) == 1


def test_select_with_the_jobs_budget_reproduces_its_figures(search_job_dir: Path, tmp_path: Path) -> None:
    again = select(search_job_dir, JOB["compress"], tmp_path / "same")
    assert _figures(again) == _figures(_report(search_job_dir))


def test_select_another_budget_gives_a_consistent_model(search_job_dir: Path, tmp_path: Path) -> None:
    from core.config import DatasetConfig
    from core.data import load_data
    from core.export import load_model
    from core.train import accuracy

    out = tmp_path / "p30"
    assert (
        main(
            [
                "select",
                str(search_job_dir),
                "--params",
                "0.3",
                "--max-evals",
                "4",
                "--out",
                str(out),
                "--quiet",
            ]
        )
        == 0
    )
    report = _report(out)
    job = _report(search_job_dir)
    assert report.ranks != job.ranks
    assert report.params.after <= 0.3 * report.params.before
    assert report.policy == "params_budget"
    assert report.selected_from == str(search_job_dir)
    assert report.training == job.training  # what the job's training did, carried over
    # the reloaded artifact scores what its report says (same validation split: same seed)
    model = load_model(out)
    data = load_data(DatasetConfig(**JOB["dataset"]), seed=0)
    assert accuracy(model, data.val) == report.accuracy.val.after
    assert accuracy(model, data.test) == report.accuracy.test.after
    assert (out / "pareto.png").is_file() and (out / "dense" / "model.safetensors").is_file()


def test_select_default_directory_is_named_after_the_budget(search_job_dir: Path) -> None:
    assert main(["select", str(search_job_dir), "--flops", "0.5", "--max-evals", "3", "--quiet"]) == 0
    assert (search_job_dir / "select-flops-0.5" / "report.json").is_file()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["select", "/nonexistent/job", "--params", "0.3"], "is not a directory"),
        (["select", "{job}/dense", "--params", "0.3"], "no report.json"),
        (["select", "{job}", "--params", "1.5"], "budget"),
        (["select", "{job}", "--max-drop", "0.01", "--max-evals", "1"], "max_evals"),
        (["plan", "/nonexistent/config.json"], "does not exist"),
    ],
)
def test_bad_input_is_an_error_message_not_a_traceback(
    search_job_dir: Path, argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main([a.replace("{job}", str(search_job_dir)) for a in argv])
    err = capsys.readouterr().err
    assert code != 0
    assert "error:" in err and message in err
    assert "Traceback" not in err


def test_finetuning_never_lowers_validation_accuracy(tmp_path: Path) -> None:
    # a fine-tuning that can only hurt: plain SGD at a huge learning rate
    cfg = {
        **JOB,
        "train": {**JOB["train"], "epochs": 3},
        "compress": {"policy": "global", "keep": 0.2},
        "finetune": {"epochs": 2, "lr": 50.0, "optimizer": "sgd", "patience": 2},
    }
    report = run_job(parse_config(cfg), tmp_path)
    ft = report.finetune
    after = report.accuracy.val.after
    assert ft is not None and after is not None
    assert after >= ft.val_accuracy_before
    if ft.error:  # diverged: the untuned model is returned and the report says why
        assert "diverged" in ft.error and not ft.kept and after == ft.val_accuracy_before
    else:
        assert ft.val_accuracy_after is not None
        assert after == max(ft.val_accuracy_before, ft.val_accuracy_after)
        assert ft.kept == (ft.val_accuracy_after >= ft.val_accuracy_before)


def test_finetuning_that_helps_is_kept(tmp_path: Path) -> None:
    cfg = {
        **JOB,
        "train": {**JOB["train"], "epochs": 3},
        "compress": {"policy": "global", "keep": 0.1},
        "finetune": {"epochs": 3, "lr": 1e-3, "patience": 3},
    }
    report = run_job(parse_config(cfg), tmp_path)
    ft = report.finetune
    assert ft is not None and ft.val_accuracy_after is not None
    assert report.accuracy.val.after == max(ft.val_accuracy_before, ft.val_accuracy_after)
    assert ft.val_accuracy_after > ft.val_accuracy_before and ft.kept


# ---------------------------------------------------------------------------------------
# plan


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.mix = nn.Conv2d(8, 16, 1)
        self.head = nn.Linear(16, 10)
        self.score = nn.Linear(16, 1)  # a side of 1: too small

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mix(self.depthwise(self.stem(x))).mean((2, 3))
        return self.head(x) + self.score(x)


def test_plan_lists_exactly_the_eligible_layers() -> None:
    from core.plan import plan_model

    plan = plan_model(Small(), (3, 8, 8), factors=3, exclude=["head"])
    assert [lp.name for lp in plan.composed] == ["stem.weight", "mix.weight"]
    reasons = {lp.name: lp.reason for lp in plan.skipped}
    assert set(reasons) == {"depthwise.weight", "head.weight", "score.weight"}
    assert "grouped" in reasons["depthwise.weight"]
    assert "excluded" in reasons["head.weight"]
    assert "too small" in reasons["score.weight"]
    # N-1 = 2 square factors on the smaller side of each composed matrix: stem 8x27, mix 16x8
    assert plan.extra_params == 2 * 8 * 8 + 2 * 8 * 8
    d = plan.to_dict()
    adam = 4 * (2 + 2)  # float32 parameter, gradient, two moments
    assert d["training"]["memory_bytes"]["extra"] == plan.extra_params * adam
    assert d["params"] == sum(p.numel() for p in Small().parameters())
    assert d["flops"] > 0


def test_plan_cli_on_a_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = {**JOB, "model": {"arch": "fcn", "options": {"depth": 3, "width": 16}}}
    cfg["train"] = {**JOB["train"], "factors": 3, "exclude": ["4"]}
    path = tmp_path / "job.json"
    path.write_text(json.dumps(cfg))
    assert main(["plan", str(path), "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert [c["name"] for c in plan["composed"]] == ["1.weight", "7.weight"]
    assert [(s["name"], "excluded" in s["reason"]) for s in plan["skipped"]] == [("4.weight", True)]
    # layer 1: 16x64 -> two 16x16 squares; layer 7: 10x16 -> two 10x10 squares
    assert plan["training"]["extra_params"] == 2 * 16 * 16 + 2 * 10 * 10
    assert main(["plan", str(path)]) == 0
    text = capsys.readouterr().out
    assert "composed (2)" in text and "skipped (1)" in text and "excluded" in text


def test_plan_shows_which_layers_auto_composition_chains() -> None:
    from core.plan import plan_job

    config = parse_config(
        {
            "model": {"arch": "fcn", "options": {"depth": 3, "width": 96}},
            "dataset": {"name": "digits"},
            # batch 40 x (N-1) 2 = 80: below n = 96 for the 96x96 and 10x96 layers; the first
            # layer (96x64) has its squares on the input side and stays in weight space
            "train": {"factors": 3, "batch_size": 40, "composition": "auto"},
        }
    )
    spaces = {lp.name: lp.space for lp in plan_job(config).composed}
    assert spaces == {"1.weight": "weight", "4.weight": "layer", "7.weight": "layer"}
