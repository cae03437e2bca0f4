"""Parameters and FLOPs against hand counts; latency's side effects."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from core.layers import empty_thin_pair, install_empty_thin_pairs
from core.metrics import (
    count_flops,
    count_params,
    file_size_bytes,
    flops_by_module,
    measure_latency_ms,
    summarize,
)

# Hand counts. FLOPs = 2 x multiply-adds; biases are not counted by FlopCounterMode.
CONV_PARAMS = 8 * 3 * 3 * 3 + 8  # Conv2d(3, 8, 3) with bias
CONV_FLOPS = 2 * 8 * 3 * 9 * 64  # out channels x (in x kh x kw) x 8*8 positions
FC_PARAMS = 512 * 10 + 10
FC_FLOPS = 2 * 512 * 10


def tiny_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 8 * 8, 10),
    )


def tiny_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 5))


def test_cnn_params_and_flops_match_hand_count() -> None:
    model = tiny_cnn()
    assert count_params(model) == CONV_PARAMS + FC_PARAMS == 5354
    assert count_flops(model, (3, 8, 8)) == CONV_FLOPS + FC_FLOPS == 37888


def test_mlp_flops_scale_with_batch() -> None:
    model = tiny_mlp()
    assert count_params(model) == (20 * 16 + 16) + (16 * 5 + 5)
    assert count_flops(model, (20,)) == 2 * (20 * 16 + 16 * 5)
    assert count_flops(model, (20,), batch=3) == 3 * 2 * (20 * 16 + 16 * 5)


def test_thin_linear_pair_counts() -> None:
    model = tiny_cnn()
    model[3] = empty_thin_pair(model[3], rank=4)
    # Linear(512, 4, bias=False) -> Linear(4, 10)
    thin_params = 512 * 4 + (4 * 10 + 10)
    thin_flops = 2 * 512 * 4 + 2 * 4 * 10
    assert count_params(model) == CONV_PARAMS + thin_params
    assert count_flops(model, (3, 8, 8)) == CONV_FLOPS + thin_flops


def test_thin_conv_pair_counts() -> None:
    model = install_empty_thin_pairs(tiny_cnn(), {"0": 2})
    # Conv2d(3, 2, 3, bias=False) -> Conv2d(2, 8, 1), both on 8x8 positions
    thin_params = 2 * 3 * 9 + (8 * 2 + 8)
    thin_flops = 2 * 2 * 3 * 9 * 64 + 2 * 8 * 2 * 64
    assert count_params(model) == thin_params + FC_PARAMS
    assert count_flops(model, (3, 8, 8)) == thin_flops + FC_FLOPS


def test_flops_by_module_uses_module_names() -> None:
    model = install_empty_thin_pairs(tiny_cnn(), {"3": 4})
    per_module = flops_by_module(model, (3, 8, 8))
    assert per_module == {
        "0": CONV_FLOPS,
        "3": 2 * 512 * 4 + 2 * 4 * 10,
        "3.0": 2 * 512 * 4,
        "3.1": 2 * 4 * 10,
    }


def test_flop_count_restores_each_module_mode() -> None:
    model = tiny_cnn().train()
    model[0].eval()  # a frozen submodule must stay in eval, the rest in train
    count_flops(model, (3, 8, 8))
    assert model.training and model[3].training
    assert not model[0].training


def test_flops_follow_model_dtype() -> None:
    model = tiny_mlp().to(torch.float64)
    assert count_flops(model, (20,)) == 2 * (20 * 16 + 16 * 5)


def test_latency_is_positive_and_restores_threads() -> None:
    model = tiny_cnn().train()
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        ms = measure_latency_ms(model, (3, 8, 8), batch=2, repeats=3, warmup=1, threads=1)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert isinstance(ms, float) and ms > 0.0
    assert model.training


def test_latency_rejects_zero_repeats() -> None:
    with pytest.raises(ValueError, match="repeats"):
        measure_latency_ms(tiny_mlp(), (20,), batch=1, repeats=0)


def test_summarize_figures() -> None:
    model = tiny_cnn()
    summary = summarize(model, (3, 8, 8), latency_batches=(1, 4), repeats=2)
    assert summary["params"] == 5354
    assert summary["flops"] == 37888
    assert set(summary["latency_ms"]) == {"1", "4"}
    assert all(v > 0 for v in summary["latency_ms"].values())
    assert "latency_ms" not in summarize(model, (3, 8, 8), latency=False)


def test_file_size_bytes(tmp_path) -> None:
    path = tmp_path / "blob.bin"
    path.write_bytes(b"x" * 1234)
    assert file_size_bytes(path) == 1234
