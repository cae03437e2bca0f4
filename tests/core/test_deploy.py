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


def test_round_to_defaults_per_device_and_config() -> None:
    from core.config import AccuracyBudgetPolicy, LatencyBudgetPolicy
    from core.deploy import resolve_round_to

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    latency = LatencyBudgetPolicy(policy="latency_budget", budget=0.5)
    assert resolve_round_to(latency, cpu)[0] == 8
    assert resolve_round_to(latency, cuda)[0] == 8  # onnxruntime runs on the CPU whatever the job device
    on_torch = LatencyBudgetPolicy(policy="latency_budget", budget=0.5, runtime="torch")
    multiple, source = resolve_round_to(on_torch, cuda)
    assert multiple == 16 and "cuda" in source and "tensor cores" in source
    accuracy = AccuracyBudgetPolicy(policy="accuracy_budget", max_drop=0.01)
    assert resolve_round_to(accuracy, cuda) == (1, "none (compress.round_to not set)")
    explicit = AccuracyBudgetPolicy(policy="accuracy_budget", max_drop=0.01, round_to=32)
    assert resolve_round_to(explicit, cpu) == (32, "compress.round_to")


def test_choose_ranks_rounds_any_policy() -> None:
    from core import svt
    from core.config import parse_config
    from core.deploy import choose_ranks

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64))
    spectra = svt.compute_spectra(model, (64,))
    config = parse_config(
        {
            "model": {"arch": "fcn"},
            "dataset": {"name": "digits"},
            "compress": {"policy": "uniform", "keep": 0.3, "round_to": 16},
        }
    )
    choice = choose_ranks(config, model, spectra, (64,), lambda r: 0.5, 0, 0, torch.device("cpu"))
    assert choice.result.ranks == {"0": 32, "2": 32}
    assert choice.rounding is not None and choice.rounding["round_to"] == 16
    assert choice.rounding["changed"]["0"] == {"rank": 20, "rounded": 32, "how": "up", "multiple": 16}
    assert choice.latency is None


def test_summary_warns_when_a_variant_is_slower_than_dense() -> None:
    small = nn.Linear(64, 10).eval()
    big = nn.Sequential(nn.Linear(64, 2048), nn.ReLU(), nn.Linear(2048, 2048), nn.Linear(2048, 10)).eval()
    variants = {
        "dense": Variant(650, 1300, None, None, None, module=small),
        "compressed": Variant(4_000_000, 8_000_000, None, None, None, module=big),
    }
    got = speed_summary(variants, (64,), [32], runtime="torch", repeats=3)
    assert any(w.startswith("compressed is slower than dense at batch 32") for w in got["warnings"])
    swapped = speed_summary(
        {"dense": variants["compressed"], "compressed": variants["dense"]},
        (64,),
        [32],
        runtime="torch",
        repeats=3,
    )
    assert swapped["warnings"] == []
