"""Latency tools (isolated ops, the lookup table, its prediction) and rank rounding.

No test asserts a time: they check shapes, bookkeeping and arithmetic on given numbers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from core import svt
from core.export import export_onnx
from core.latency import (
    LatencyTable,
    LayerLatency,
    build_latency_table,
    layer_input_shapes,
    layer_module,
    layer_onnx,
    measure_latency,
    ort_session,
    rank_grid,
)
from core.rounding import default_round_to, round_rank, round_ranks, rounding_rows

# ---------------------------------------------------------------------------------------
# rounding


@pytest.mark.parametrize("multiple", [1, 2, 8, 16, 32])
def test_rounding_never_grows_a_layer_past_dense(multiple: int) -> None:
    for m, n in [(10, 64), (64, 27), (128, 128), (256, 9), (33, 47), (512, 4608)]:
        full = min(m, n)
        for rank in range(1, full + 1):
            got = round_rank(rank, m, n, full, multiple)
            saves = rank < full and rank * (m + n) < m * n
            if not saves:
                assert got == rank  # a dense layer is left alone
                continue
            assert 1 <= got < full
            assert got * (m + n) < m * n, (m, n, rank, got)
            if multiple > 1 and got != rank:
                assert got % multiple == 0
                assert abs(got - rank) < multiple


def test_rounding_goes_up_when_that_saves_and_down_otherwise() -> None:
    # 128 x 128: break-even rank 63
    assert round_rank(37, 128, 128, 128, 8) == 40
    assert round_rank(40, 128, 128, 128, 8) == 40
    assert round_rank(61, 128, 128, 128, 8) == 56  # 64 would not save: down
    assert round_rank(3, 128, 128, 128, 16) == 16
    # 10 x 256 (a classifier head): break-even 9; below one multiple that saves, left as is
    assert round_rank(3, 10, 256, 10, 8) == 8
    assert round_rank(9, 10, 256, 10, 8) == 8
    assert round_rank(3, 10, 256, 10, 16) == 3
    with pytest.raises(ValueError):
        round_rank(3, 10, 10, 10, 0)


def test_round_ranks_and_rows() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    spectra = svt.compute_spectra(model)
    ranks = {"0": 13, "2": 10}  # layer "2" at full rank stays dense
    rounded = round_ranks(spectra, ranks, 8)
    assert rounded == {"0": 16, "2": 10}
    assert svt.params_of(spectra, rounded) <= svt.params_of(
        spectra, {k: sp.full_rank for k, sp in spectra.items()}
    )
    assert rounding_rows(spectra, ranks, rounded, 8) == {
        "0": {"rank": 13, "rounded": 16, "how": "up", "multiple": 8}
    }


def test_default_multiple_per_device() -> None:
    assert default_round_to("cpu") == 8
    assert default_round_to(torch.device("cuda")) == 16


# ---------------------------------------------------------------------------------------
# isolated ops


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.same = nn.Conv2d(16, 16, (3, 5), padding="same", dilation=(1, 2), bias=False)
        self.tokens = nn.Linear(16, 24)
        self.head = nn.Linear(24, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.same(torch.relu(self.conv(x))))
        h = self.tokens(h.flatten(2).transpose(1, 2))  # (N, positions, 24)
        return self.head(h.mean(1))


NAMES = ["conv", "same", "tokens", "head"]


def test_layer_input_shapes() -> None:
    shapes = layer_input_shapes(Net(), NAMES, (3, 8, 8))
    assert shapes == {"conv": (3, 8, 8), "same": (16, 4, 4), "tokens": (16, 16), "head": (24,)}


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("rank", [None, 2])
def test_isolated_op_matches_the_module_shape(name: str, rank: int | None) -> None:
    net = Net().eval()
    shape = layer_input_shapes(net, NAMES, (3, 8, 8))[name]
    layer = net.get_submodule(name)
    x = np.random.default_rng(0).random((3, *shape), dtype=np.float32)
    session = ort_session(layer_onnx(layer, shape, rank))
    (got,) = session.run(None, {"x": x})
    with torch.no_grad():
        expected = layer_module(layer, rank)(torch.from_numpy(x))
    assert got.shape == tuple(expected.shape)


def test_isolated_dense_op_computes_the_layer_given_its_weights() -> None:
    # the graph is the layer's computation: with the layer's own weights the output matches
    import onnx
    from onnx import numpy_helper

    torch.manual_seed(0)
    layer = nn.Conv2d(4, 6, 3, stride=2, padding=1).eval()
    proto = onnx.load_from_string(layer_onnx(layer, (4, 7, 7)))
    for init in proto.graph.initializer:
        value = layer.weight if init.name == "w0" else layer.bias
        assert value is not None
        init.CopyFrom(numpy_helper.from_array(value.detach().numpy(), init.name))
    x = np.random.default_rng(1).random((2, 4, 7, 7), dtype=np.float32)
    (got,) = ort_session(proto.SerializeToString()).run(None, {"x": x})
    with torch.no_grad():
        expected = layer(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------
# the table


def test_rank_grid_saves_and_is_sorted() -> None:
    for m, n, multiple in [(128, 128, 8), (64, 27, 8), (10, 256, 8), (512, 4608, 16), (4, 4, 1)]:
        grid = rank_grid(m, n, min(m, n), multiple)
        assert grid == sorted(set(grid))
        assert all(1 <= r < min(m, n) and r * (m + n) < m * n for r in grid)
    assert rank_grid(2, 2, 2) == []  # no rank of a 2 x 2 layer saves
    assert rank_grid(128, 128, 128, 8) == [4, 8, 16, 32, 56]


def test_interpolation_and_prediction_by_hand() -> None:
    lat = LayerLatency("a", dense_ms=10.0, ranks=[8, 16, 32], thin_ms=[2.0, 4.0, 12.0])
    assert lat.at(8) == 2.0 and lat.at(16) == 4.0
    assert lat.at(12) == pytest.approx(3.0)
    assert lat.at(24) == pytest.approx(8.0)
    assert lat.at(40) == pytest.approx(16.0)  # extrapolated along the last segment
    assert not lat.always_slower
    slow = LayerLatency("b", dense_ms=1.0, ranks=[2, 4], thin_ms=[1.5, 2.0])
    assert slow.always_slower
    table = LatencyTable("onnxruntime", 64, 1, {"a": lat, "b": slow})
    assert table.slow_layers() == ["b"]
    # dense model 50 ms; a at rank 12 (3 ms instead of 10), b left dense
    assert table.predict(50.0, {"a": 12, "b": 4}, {"a": True, "b": False}) == pytest.approx(43.0)
    assert table.predict(50.0, {"a": 12, "b": 2}, {"a": True, "b": True}) == pytest.approx(43.5)
    assert table.to_dict()["layers"]["b"]["always_slower"] is True


@pytest.mark.parametrize("runtime", ["onnxruntime", "torch"])
def test_build_table_measures_every_called_layer(runtime: str) -> None:
    net = Net().eval()
    table = build_latency_table(net, NAMES, (3, 8, 8), 4, runtime=runtime, multiple=4, repeats=2, warmup=0)  # type: ignore[arg-type]
    assert list(table.layers) == NAMES
    for name, lat in table.layers.items():
        m, n = svt.compute_spectra(net, names=[name])[name].m, svt.compute_spectra(net, names=[name])[name].n
        assert lat.ranks == rank_grid(m, n, min(m, n), 4)
        assert len(lat.thin_ms) == len(lat.ranks)
        assert lat.dense_ms > 0 and all(t > 0 for t in lat.thin_ms)
    assert table.runtime == runtime and table.batch_size == 4


def test_measure_latency_of_files_and_modules(tmp_path: Path) -> None:
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 3)).eval()
    b = nn.Sequential(nn.Linear(12, 3)).eval()
    export_onnx(a, torch.rand(2, 12), tmp_path / "a.onnx")
    export_onnx(b, torch.rand(2, 12), tmp_path / "b.onnx")
    got = measure_latency({"a": tmp_path / "a.onnx", "b": tmp_path / "b.onnx"}, (12,), (1, 8), repeats=3)
    assert set(got) == {"a", "b"} and all(set(v) == {1, 8} and min(v.values()) > 0 for v in got.values())
    got_torch = measure_latency({"a": a, "b": b}, (12,), (2,), runtime="torch", repeats=3)
    assert all(v[2] > 0 for v in got_torch.values())
    with pytest.raises(TypeError):
        measure_latency({"a": a}, (12,), (2,), runtime="onnxruntime", repeats=1)
    with pytest.raises(ValueError):
        measure_latency({"a": a}, (12,), (2,), runtime="tensorrt", repeats=1)  # type: ignore[arg-type]


def test_prediction_scales_when_isolated_ops_add_up_to_more_than_the_model() -> None:
    # isolated ops 30 + 10 = 40 ms, but the whole dense model runs in 20 ms: savings are fractions
    table = LatencyTable(
        "onnxruntime",
        64,
        1,
        {"a": LayerLatency("a", 30.0, [8], [6.0]), "b": LayerLatency("b", 10.0, [8], [5.0])},
    )
    assert table.predict(20.0, {"a": 8, "b": 8}, {"a": True, "b": False}) == pytest.approx(20.0 * 16 / 40)
    assert table.predict(20.0, {"a": 8, "b": 8}, {"a": True, "b": True}) == pytest.approx(20.0 * 11 / 40)
    assert table.predict(20.0, {"a": 8, "b": 8}, {}) == pytest.approx(20.0)
