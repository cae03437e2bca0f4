"""A program through the whole job: config, prepare (child-process load), LoRITa, SVT rewrite,
exports, the report's per-layer rows, ``select`` from its dense program, ``lorita plan``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from core.config import ConfigError, parse_config
from core.pipeline import run_job, select
from core.plan import plan_job
from core.program.archive import validate_archive


class DigitsCNN(nn.Module):
    """For the 1x8x8 digits: a conv with batch norm, a depthwise conv (left dense), a head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.fc = nn.Linear(16 * 4 * 4, 32)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn(self.conv(x)))
        y = nn.functional.max_pool2d(y + self.dw(y), 2)
        return self.head(torch.relu(self.fc(y.flatten(1))))


def _job(program: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": "program",
        "model": {"program": program},
        "dataset": {"name": "digits", "val_fraction": 0.2},
        "train": {"factors": 2, "epochs": 2, "lr": 0.01, "weight_decay": 1e-4, "batch_size": 64},
        "compress": {"policy": "global", "keep": 0.4},
        "finetune": {"epochs": 0},
        "measure": {"latency": False},
        "export": ["safetensors", "pt2", "onnx"],
        "device": "cpu",
        **extra,
    }


@pytest.fixture(scope="module")
def program(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = DigitsCNN().train()  # exported in train mode: batch norm trains with batch statistics
    path = tmp_path_factory.mktemp("program") / "digits_cnn.pt2"
    ep = torch.export.export(
        model, (torch.rand(4, 1, 8, 8),), dynamic_shapes={"x": {0: torch.export.Dim("batch")}}
    )
    torch.export.save(ep, str(path))
    return path


@pytest.fixture(scope="module")
def job_dir(program: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("job")
    run_job(parse_config(_job(str(program))), out)
    return out


def test_program_config_excludes_arch_options_and_weights(program: Path) -> None:
    for model in (
        {"program": str(program), "arch": "fcn"},
        {"program": str(program), "options": {"depth": 2}},
        {"program": str(program), "weights": "w.safetensors"},
        {},
    ):
        with pytest.raises(ConfigError):
            parse_config({**_job(str(program)), "model": model})
    with pytest.raises(ConfigError, match="from_scratch"):
        parse_config({**_job(str(program)), "model": {"arch": "fcn", "from_scratch": True}})
    assert parse_config({**_job(str(program)), "train": None}).model.program == str(program)


def test_program_that_does_not_fit_the_dataset(program: Path, tmp_path: Path) -> None:
    config = parse_config(
        _job(str(program), dataset={"name": "synthetic", "num_classes": 10, "input_shape": [3, 8, 8]})
    )
    with pytest.raises(ConfigError) as err:
        run_job(config, tmp_path)
    message = str(err.value)
    assert "[1, 8, 8]" in message and "[3, 8, 8]" in message and "digits_cnn.pt2" in message
    assert str(tmp_path) not in message and str(program.parent) not in message


def test_program_job_report(job_dir: Path) -> None:
    from core.report import read_report

    report = read_report(job_dir / "report.json")
    assert report.training is not None and report.training.norm_mode is not None
    assert "train mode" in report.training.norm_mode
    assert set(report.training.composed) == {"conv.weight", "fc.weight", "head.weight"}
    rows = report.ranks
    assert set(rows) == {"conv.weight", "dw.weight", "fc.weight", "head.weight"}
    assert rows["dw.weight"].reason is not None and "grouped" in rows["dw.weight"].reason
    assert rows["dw.weight"].composed is False and "grouped" in (rows["dw.weight"].compose_reason or "")
    for name, row in rows.items():
        assert row.factorized or row.reason, name  # every weight says why it stayed dense
        assert row.uses == 1
    assert report.params.after < report.params.before
    assert report.files["pt2"].dynamic_batch and report.files["onnx"].dynamic_batch
    assert {"safetensors", "pt2", "onnx"} <= set(report.files)
    assert validate_archive(job_dir / "model.pt2").num_classes == 10  # our export passes our checks
    assert (job_dir / "dense" / "model.pt2").is_file()


def test_select_from_a_program_job(job_dir: Path, tmp_path: Path) -> None:
    from core.report import read_report

    report = select(job_dir, {"policy": "none"}, tmp_path)
    assert report.params.after == report.params.before == read_report(job_dir / "report.json").params.before
    assert all(not row.factorized for row in report.ranks.values())


def test_plan_on_a_program(program: Path) -> None:
    plan = plan_job(parse_config(_job(str(program))))
    data = plan.to_dict()
    assert data["arch"] == "digits_cnn.pt2" and "train mode" in data["norm_mode"]
    assert [c["name"] for c in data["composed"]] == ["conv.weight", "fc.weight", "head.weight"]
    assert [s["name"] for s in data["skipped"]] == ["dw.weight"]
    assert data["num_classes"] == 10 and data["input_shape"] == [1, 8, 8]
