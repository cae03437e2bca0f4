"""`lorita compress` end to end, and the errors a person sees on bad input."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from cli.main import main
from core.config import DatasetConfig, load_config
from core.data import load_data
from core.export import load_model, onnx_accuracy
from core.report import read_report
from core.train import accuracy
from core.zoo import build_model

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _config(tmp_path: Path, **overrides: Any) -> Path:
    cfg: dict[str, Any] = {
        "model": {"arch": "fcn", "options": {"depth": 3, "width": 48}},
        "dataset": {"name": "digits"},
        "train": {"factors": 3, "epochs": 3, "lr": 0.01, "weight_decay": 5e-4, "batch_size": 128},
        "compress": {"policy": "global", "keep": 0.4},
        "measure": {"latency_repeats": 2},
        "export": ["safetensors", "pt2", "onnx"],
    }
    cfg.update(overrides)
    path = tmp_path / "job.json"
    path.write_text(json.dumps(cfg))
    return path


@pytest.fixture(scope="module")
def finished_job(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("job")
    out = tmp / "out"
    assert main(["compress", str(_config(tmp)), "--out", str(out), "--quiet"]) == 0
    return out


def test_compress_writes_every_artifact(finished_job: Path) -> None:
    for name in ("model.safetensors", "model.json", "model.pt2", "model.onnx", "report.json"):
        assert (finished_job / name).is_file(), name
    report = read_report(finished_job)
    assert report.params.after < report.params.before
    assert report.flops.after < report.flops.before
    for split in (report.accuracy.val, report.accuracy.test):
        for value in (split.before, split.after):
            assert value is not None and 0.0 <= value <= 1.0
    assert set(report.latency_ms) == {"1", "64"}  # the default measure.batch_sizes
    assert any(r.factorized for r in report.ranks.values())
    assert {"prepare", "train", "collapse", "compress", "measure", "export"} <= set(report.timings)
    for fmt in ("safetensors", "pt2", "onnx"):
        diff = report.files[fmt].max_abs_diff
        assert diff is not None and diff < 1e-3


def test_reported_test_accuracy_is_what_the_exported_onnx_scores(finished_job: Path) -> None:
    report = read_report(finished_job)
    data = load_data(DatasetConfig(name="digits"), seed=0)
    x, y = (t.numpy() for t in data.test.tensors)
    assert onnx_accuracy(finished_job / "model.onnx", x, y) == pytest.approx(
        report.accuracy.test.after, abs=1e-9
    )
    model = load_model(finished_job)
    assert accuracy(model, data.test) == pytest.approx(report.accuracy.test.after, abs=1e-9)
    # the validation figures (taken from the search's evaluations) are the models' own
    assert accuracy(model, data.val) == pytest.approx(report.accuracy.val.after, abs=1e-9)
    dense = load_model(finished_job / "dense")
    assert accuracy(dense, data.val) == pytest.approx(report.accuracy.val.before, abs=1e-9)
    program = torch.export.load(str(finished_job / "model.pt2"))
    torch.testing.assert_close(program.module()(data.test.tensors[0][:8]), model(data.test.tensors[0][:8]))


def test_compress_only_given_weights(tmp_path: Path, finished_job: Path) -> None:
    """train: null compresses uploaded weights as they are (here: the dense model of a job)."""
    out = tmp_path / "svt"
    cfg = _config(
        tmp_path,
        model={
            "arch": "fcn",
            "options": {"depth": 3, "width": 48},
            "weights": str(finished_job / "dense" / "model.safetensors"),
        },
        train=None,
        compress={"policy": "energy", "energy": 0.9},
        export=["safetensors"],
        measure={"latency": False},
    )
    assert main(["compress", str(cfg), "--out", str(out), "--quiet"]) == 0
    report = read_report(out)
    first = read_report(finished_job)
    assert report.accuracy.test.before == pytest.approx(first.accuracy.test.before)
    assert report.training is not None and report.training.factors is None
    # a job that did not train says nothing about composition
    assert all(r.composed is None and r.compose_reason is None for r in report.ranks.values())


@pytest.mark.parametrize("example", sorted(EXAMPLES.glob("*.json")), ids=lambda p: p.name)
def test_example_configs_are_valid(example: Path) -> None:
    load_config(example)


def _run_failing(capsys: pytest.CaptureFixture[str], cfg: Path, tmp_path: Path) -> str:
    code = main(["compress", str(cfg), "--out", str(tmp_path / "o"), "--quiet"])
    err = capsys.readouterr().err
    assert code != 0
    assert "Traceback" not in err
    return err


def test_unknown_field_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = _run_failing(capsys, _config(tmp_path, trian={"epochs": 1}), tmp_path)
    assert "trian" in err and "unknown field" in err


def test_unknown_architecture_lists_choices(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = _run_failing(capsys, _config(tmp_path, model={"arch": "resnet999"}), tmp_path)
    assert "resnet999" in err and "resnet20" in err and "vgg16" in err


def test_unknown_dataset_lists_choices(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = _run_failing(capsys, _config(tmp_path, dataset={"name": "imagenet"}), tmp_path)
    assert "imagenet" in err and "digits" in err and "cifar10" in err


def test_npz_with_missing_keys_says_which(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    npz = tmp_path / "d.npz"
    np.savez(npz, x_train=np.zeros((20, 4), np.float32), y_train=np.zeros(20, np.int64))
    err = _run_failing(capsys, _config(tmp_path, dataset={"path": str(npz)}), tmp_path)
    assert "x_test" in err and "y_test" in err


def test_weights_that_do_not_fit_list_the_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    other = build_model("fcn", 10, (1, 8, 8), {"depth": 2, "width": 32})
    weights = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(weights))
    cfg = _config(
        tmp_path, model={"arch": "fcn", "options": {"depth": 3, "width": 48}, "weights": str(weights)}
    )
    err = _run_failing(capsys, cfg, tmp_path)
    assert "do not fit" in err and "1.weight" in err


def test_auto_composition_puts_the_wide_first_layer_in_layer_space(tmp_path: Path) -> None:
    out = tmp_path / "auto"
    cfg = _config(
        tmp_path,
        # batch 50 x (N-1) 1 = 50: below the first layer's 64 inputs, not the hidden layers' 48
        train={"factors": 2, "epochs": 2, "batch_size": 50, "composition": "auto"},
        export=["safetensors"],
        measure={"latency": False},
    )
    assert main(["compress", str(cfg), "--out", str(out), "--quiet"]) == 0
    report = read_report(out)
    assert report.training is not None and report.training.layer_space == ["1"]
    before = report.accuracy.test.before
    assert before is not None and before > 0.5  # it learned through the chain
    dense = load_model(out / "dense")  # the collapsed model has the plain architecture again
    assert isinstance(dense.get_submodule("1"), torch.nn.Linear)


def test_checkpoint_tag_ignores_where_files_lie_but_not_what_they_hold(tmp_path: Path) -> None:
    """A worker on another machine resolves the same upload to another path and must resume."""
    from core.config import parse_config
    from core.data import load_job_data
    from core.stages import checkpoint_tag

    model = build_model("fcn", 10, (64,), {"depth": 2, "width": 8})
    first, second, other = (
        tmp_path / "a.safetensors",
        tmp_path / "b" / "w.safetensors",
        tmp_path / "c.safetensors",
    )
    second.parent.mkdir()
    for path in (first, second):
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    torch.manual_seed(1)
    changed = build_model("fcn", 10, (64,), {"depth": 2, "width": 8})
    save_file({k: v.contiguous() for k, v in changed.state_dict().items()}, str(other))

    def tag(weights: Path, val_fraction: float = 0.1) -> str:
        config = parse_config(
            {
                "model": {"arch": "fcn", "options": {"depth": 2, "width": 8}, "weights": str(weights)},
                "dataset": {"name": "digits", "val_fraction": val_fraction},
            }
        )
        assert config.train is not None
        return checkpoint_tag(config, config.train, load_job_data(config), 10)

    assert tag(first) == tag(second)
    assert tag(first) != tag(other)
    assert tag(first) != tag(first, val_fraction=0.2)
