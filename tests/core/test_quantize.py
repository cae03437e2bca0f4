"""INT8 after low rank: static QDQ quantization reloads, agrees with FP32, and is smaller."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from core import svt
from core.config import DatasetConfig
from core.data import DataBundle, load_data
from core.export import export_onnx, onnx_predict
from core.quantize import calibration_samples, compare_int8, quantize_int8
from core.train import FitSettings, fit

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def digits() -> DataBundle:
    return load_data(DatasetConfig(name="digits"), seed=0)


def _trained(model: nn.Module, data: DataBundle, epochs: int = 4) -> nn.Module:
    torch.manual_seed(0)
    fit(model, data.train, data.val, FitSettings(epochs=epochs, lr=0.01, batch_size=64), device=CPU)
    return model.eval()


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)
    )


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 10),
    )


def _quantized_ops(path: Path) -> set[str]:
    return {node.op_type for node in onnx.load(str(path)).graph.node}


def _check(model: nn.Module, data: DataBundle, tmp_path: Path, max_ratio: float) -> None:
    fp32, int8 = tmp_path / "model.onnx", tmp_path / "model.int8.onnx"
    export_onnx(model, data.test.tensors[0][:2], fp32)
    result = quantize_int8(fp32, int8, calibration_samples(data.train, 256))
    # reloads and runs (ONNX Runtime), and holds quantize/dequantize pairs (QDQ format)
    assert int8.is_file() and result.path == int8
    assert {"QuantizeLinear", "DequantizeLinear"} <= _quantized_ops(int8)
    x_val, y_val = data.val.tensors[0].numpy(), data.val.tensors[1].numpy()
    logits = onnx_predict(int8, x_val)
    assert logits.shape == (len(x_val), 10) and np.isfinite(logits).all()
    # smaller: the weights are stored in one byte instead of four
    assert result.bytes == int8.stat().st_size < fp32.stat().st_size
    # (a few KB of graph and scales do not shrink, which matters only for tiny files)
    assert result.size_ratio < max_ratio
    check = compare_int8(fp32, int8, x_val, y_val)
    assert check.agreement >= 0.95
    assert check.accuracy_int8 >= check.accuracy_fp32 - 0.05


def test_int8_mlp_agrees_with_fp32_and_is_smaller(digits: DataBundle, tmp_path: Path) -> None:
    _check(_trained(_mlp(), digits), digits, tmp_path, max_ratio=0.4)


def test_int8_after_low_rank_conv(digits: DataBundle, tmp_path: Path) -> None:
    # the compressed model (thin conv pairs) is what gets quantized in a job
    dense = _trained(_cnn(), digits)
    spectra = svt.compute_spectra(dense, (1, 8, 8))
    compressed = svt.truncate(dense, spectra, svt.ranks_uniform(spectra, 0.5)).eval()
    assert any(isinstance(m, nn.Sequential) for m in compressed.modules() if m is not compressed)
    _check(compressed, digits, tmp_path, max_ratio=0.8)


def test_weights_are_quantized_per_channel(digits: DataBundle, tmp_path: Path) -> None:
    fp32, int8 = tmp_path / "model.onnx", tmp_path / "model.int8.onnx"
    export_onnx(_mlp().eval(), digits.test.tensors[0][:2], fp32)
    quantize_int8(fp32, int8, calibration_samples(digits.train, 64))
    graph = onnx.load(str(int8)).graph
    inits = {t.name: t for t in graph.initializer}
    scales = [
        inits[node.input[1]]
        for node in graph.node
        if node.op_type == "DequantizeLinear"
        and node.input[0] in inits
        and inits[node.input[0]].data_type == onnx.TensorProto.INT8
        and len(inits[node.input[0]].dims) == 2
    ]
    assert scales, "no quantized weight matrices found"
    assert all(len(s.dims) == 1 and s.dims[0] > 1 for s in scales)  # one scale per output channel


def test_calibration_uses_training_samples_only(digits: DataBundle) -> None:
    x = calibration_samples(digits.train, 100, seed=1)
    assert x.shape == (100, *digits.input_shape) and x.dtype == np.float32
    train_rows = {row.tobytes() for row in digits.train.tensors[0].numpy().astype(np.float32)}
    assert all(row.tobytes() in train_rows for row in x)
    assert len(calibration_samples(digits.train, 10_000)) == len(digits.train)
