"""The INT8 stage (budget, agreement, main artifact) and the dense/compressed/INT8 summary."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from core.config import DatasetConfig
from core.data import DataBundle, load_data
from core.deploy import Variant, int8_stage, speed_summary
from core.export import export_onnx
from core.train import FitSettings, fit


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[DataBundle, nn.Module, Path]:
    data = load_data(DatasetConfig(name="digits"), seed=0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 10))
    fit(
        model, data.train, data.val, FitSettings(epochs=4, lr=0.01, batch_size=64), device=torch.device("cpu")
    )
    path = tmp_path_factory.mktemp("fp32") / "model.onnx"
    export_onnx(model.eval(), data.test.tensors[0][:2], path)
    return data, model, path


def test_int8_within_budget_becomes_the_main_artifact(
    trained: tuple[DataBundle, nn.Module, Path], tmp_path: Path
) -> None:
    data, _, fp32 = trained
    policy = SimpleNamespace(policy="accuracy_budget", max_drop=0.02, max_rel_drop=None)
    info = int8_stage(fp32, tmp_path, data.train, data.val, data.test, policy=policy)
    assert (tmp_path / "model.int8.onnx").is_file() and info["file"] == "model.int8.onnx"
    assert info["agreement"] >= 0.95
    assert info["within_budget"] and info["main_artifact"] == "model.int8.onnx" and info["message"] is None
    assert info["max_drop"] == 0.02 and info["max_drop_source"] == "compress.max_drop"
    assert 0 <= info["test_accuracy"] <= 1 and info["bytes"] < info["fp32_bytes"]


def test_int8_over_budget_keeps_fp32_and_says_so(
    trained: tuple[DataBundle, nn.Module, Path], tmp_path: Path
) -> None:
    data, _, fp32 = trained
    # calibrating on blank images fixes every activation range near zero: INT8 clips everything
    blank = TensorDataset(torch.zeros_like(data.train.tensors[0][:64]), data.train.tensors[1][:64])
    info = int8_stage(fp32, tmp_path, blank, data.val, data.test, policy=None)
    assert info["max_drop"] == 0.01 and "default" in info["max_drop_source"]
    assert not info["within_budget"]
    assert info["main_artifact"] == "model.onnx"
    assert (
        "more than the job's budget" in info["message"]
        and "FP32 model stays the main artifact" in info["message"]
    )


def test_speed_summary_rows(trained: tuple[DataBundle, nn.Module, Path], tmp_path: Path) -> None:
    data, model, fp32 = trained
    variants = {
        "dense": Variant(100, 200, fp32, 0.9, 0.8, module=model),
        "compressed": Variant(50, 100, fp32, 0.85, 0.8, module=model),
    }
    got = speed_summary(variants, data.input_shape, [1, 4], repeats=2)
    assert set(got["rows"]) == {"dense", "compressed"}
    row = got["rows"]["compressed"]
    assert row["bytes"] == fp32.stat().st_size and row["runtime"] == "onnxruntime"
    assert set(row["latency_ms"]) == {"1", "4"} and min(row["latency_ms"].values()) > 0
    as_torch = speed_summary(variants, data.input_shape, [2], runtime="torch", repeats=2)
    assert as_torch["rows"]["dense"]["runtime"] == "torch"
    off = speed_summary(variants, data.input_shape, [2], latency=False)
    assert off["rows"]["dense"]["latency_ms"] == {}
