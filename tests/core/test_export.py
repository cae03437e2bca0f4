"""Save/reload, pt2 and ONNX parity, and the refusal of anything but plain weights."""

from __future__ import annotations

import pathlib
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import core.export as export
from core.export import (
    ExportError,
    ModelMeta,
    ModelMetaError,
    WeightsError,
    check_weights,
    export_all,
    export_onnx,
    export_pt2,
    load_model,
    load_weights_file,
    load_weights_into,
    onnx_accuracy,
    onnx_predict,
    save_model,
)
from core.layers import install_empty_thin_pairs


class TinyAttention(nn.Module):
    """Single-head self-attention over a (N, tokens, dim) input written with plain ops."""

    def __init__(self, dim: int = 8, tokens: int = 4, num_classes: int = 3) -> None:
        super().__init__()
        self.tokens, self.dim = tokens, dim
        self.qkv = nn.Linear(dim, 3 * dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], self.tokens, self.dim)
        q, k, v = self.qkv(self.norm(x)).chunk(3, dim=-1)
        attn = torch.softmax(q @ k.transpose(-2, -1) / self.dim**0.5, dim=-1)
        return self.head((x + attn @ v).mean(dim=1))


def tiny_cnn(num_classes: int = 10) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, stride=2),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, num_classes),
    )


def tiny_mlp(num_classes: int = 5) -> nn.Module:
    return nn.Sequential(nn.Linear(12, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, num_classes))


BUILDERS = {
    "tiny_cnn": (tiny_cnn, [3, 8, 8], {"3": 3}),  # the strided conv as a rank-3 thin pair
    "tiny_mlp": (tiny_mlp, [12], {}),
    "tiny_attn": (lambda n: TinyAttention(num_classes=n), [32], {"qkv": 4}),
}


def fake_build_model(meta: ModelMeta) -> nn.Module:
    """Stands in for core.zoo.build_model: the test architectures by name."""
    builder, _, _ = BUILDERS[meta.arch]
    return builder(meta.num_classes)


@pytest.fixture(autouse=True)
def _test_zoo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(export, "_build_model", fake_build_model)


def trained_like(arch: str) -> tuple[nn.Module, ModelMeta]:
    """A model with random weights, its thin pairs installed, BatchNorm statistics not at init."""
    torch.manual_seed(0)
    builder, input_shape, ranks = BUILDERS[arch]
    num_classes = 10 if arch == "tiny_cnn" else 5
    model = install_empty_thin_pairs(builder(num_classes), ranks)
    for p in model.parameters():  # thin pairs start uninitialized: give every weight values
        nn.init.normal_(p, std=0.3)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(16, *input_shape) * 2 + 0.5)
    model.eval()
    meta = ModelMeta(
        arch=arch,
        num_classes=num_classes,
        input_shape=input_shape,
        options={},
        ranks={
            name: {"shape": [8, 72], "full_rank": 8, "kept_rank": r, "factorized": True}
            for name, r in ranks.items()
        },
    )
    return model, meta


def batch(arch: str, n: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, *BUILDERS[arch][1], generator=g)


@pytest.mark.parametrize("arch", ["tiny_cnn", "tiny_mlp"])
def test_save_load_round_trip(tmp_path: Path, arch: str) -> None:
    model, meta = trained_like(arch)
    paths = save_model(model, meta, tmp_path)
    assert paths["safetensors"].name == "model.safetensors" and paths["meta"].name == "model.json"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.json", "model.safetensors"]  # no tmp left

    for where in (tmp_path, tmp_path / "model.json"):
        loaded = load_model(where)
        assert not loaded.training
        assert list(loaded.state_dict()) == list(model.state_dict())
        x = batch(arch, 4)
        with torch.no_grad():
            assert torch.equal(loaded(x), model(x))


def test_round_trip_with_tied_weights(tmp_path: Path) -> None:
    model, meta = trained_like("tiny_mlp")
    model[3].weight = nn.Parameter(torch.randn(5, 16))

    def tied(num_classes: int) -> nn.Module:
        m = nn.Sequential(nn.Linear(16, 5), tiny_mlp(num_classes))
        m[0].weight = m[1][3].weight
        return m

    BUILDERS["tied"] = (tied, [16], {})
    try:
        src = tied(5)
        meta.arch = "tied"
        meta.ranks = {}
        save_model(src, meta, tmp_path)
        loaded = load_model(tmp_path)
        assert loaded[0].weight is loaded[1][3].weight
        assert torch.equal(loaded[0].weight, src[0].weight)
    finally:
        del BUILDERS["tied"]


def test_meta_json_round_trip_and_version_check() -> None:
    _, meta = trained_like("tiny_cnn")
    again = ModelMeta.from_json(meta.to_json())
    assert again == meta
    assert again.factorized_ranks() == {"3": 3}
    data = meta.to_dict() | {"format_version": 99}
    with pytest.raises(ModelMetaError, match="format_version 99"):
        ModelMeta.from_dict(data)


@pytest.mark.parametrize("arch", ["tiny_cnn", "tiny_attn"])
def test_pt2_parity_and_dynamic_batch(tmp_path: Path, arch: str) -> None:
    model, _ = trained_like(arch)
    path = tmp_path / "model.pt2"
    assert export_pt2(model, batch(arch, 2), path) < 1e-4
    program = torch.export.load(str(path)).module()
    for n in (1, 5):
        x = batch(arch, n, seed=n)
        with torch.no_grad():
            assert (program(x) - model(x)).abs().max() < 1e-4


@pytest.mark.parametrize("arch", ["tiny_cnn", "tiny_mlp", "tiny_attn"])
def test_onnx_parity_and_dynamic_batch(tmp_path: Path, arch: str) -> None:
    model, _ = trained_like(arch)
    path = tmp_path / "model.onnx"
    assert export_onnx(model, batch(arch, 1), path) < 1e-4  # traced from batch 1, still dynamic
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]  # single file
    for n in (1, 5):
        x = batch(arch, n, seed=n)
        with torch.no_grad():
            expected = model(x).numpy()
        got = onnx_predict(path, x.numpy(), batch_size=n)
        assert got.shape == expected.shape
        assert np.abs(got - expected).max() < 1e-4


def test_onnx_accuracy_equals_torch_accuracy(tmp_path: Path) -> None:
    model, _ = trained_like("tiny_cnn")
    path = tmp_path / "model.onnx"
    export_onnx(model, batch("tiny_cnn", 2), path)
    x = batch("tiny_cnn", 40, seed=7)
    with torch.no_grad():
        pred = model(x).argmax(dim=1)
    y = pred.clone()
    y[::2] = (y[::2] + 1) % 10  # half right, half wrong: a non-trivial accuracy
    torch_acc = float((pred == y).float().mean())
    assert torch_acc == 0.5
    assert onnx_accuracy(path, x.numpy(), y.numpy()) == torch_acc
    assert onnx_accuracy(path, x.numpy(), y.numpy()) == onnx_accuracy(path, x.numpy(), y.numpy())
    # the batching of onnx_predict does not change the answer
    np.testing.assert_allclose(onnx_predict(path, x.numpy(), batch_size=7), onnx_predict(path, x.numpy()))


def test_export_all_writes_every_format_from_a_train_mode_model(tmp_path: Path) -> None:
    model, meta = trained_like("tiny_cnn")
    model.train()
    example = batch("tiny_cnn", 3)
    results = export_all(model, meta, tmp_path, ["pt2", "onnx"], example)
    assert set(results) == {"safetensors", "pt2", "onnx"}
    for fmt, name in [("safetensors", "model.safetensors"), ("pt2", "model.pt2"), ("onnx", "model.onnx")]:
        assert results[fmt]["file"] == name
        assert results[fmt]["bytes"] == (tmp_path / name).stat().st_size > 0
    assert results["safetensors"]["max_abs_diff"] == 0.0
    assert results["pt2"]["max_abs_diff"] < 1e-4 and results["onnx"]["max_abs_diff"] < 1e-4
    assert results["pt2"]["dynamic_batch"] and results["onnx"]["dynamic_batch"]
    assert model.training  # the caller's model is untouched
    assert (tmp_path / "model.json").exists()


def test_export_all_raises_on_parity_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, meta = trained_like("tiny_mlp")
    monkeypatch.setattr(export, "_export_onnx", lambda m, x, p: (0.5, True))
    with pytest.raises(ExportError, match="onnx export differs"):
        export_all(model, meta, tmp_path, ["onnx"], batch("tiny_mlp", 2))


def test_export_all_rejects_unknown_format(tmp_path: Path) -> None:
    model, meta = trained_like("tiny_mlp")
    with pytest.raises(ValueError, match="tflite"):
        export_all(model, meta, tmp_path, ["tflite"], batch("tiny_mlp", 2))


class _Canary:
    """Unpickling this object touches a file: proof that pickle code ran."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (pathlib.Path.touch, (pathlib.Path(self.path),))


def test_pickle_payload_is_refused_and_not_executed(tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    evil = tmp_path / "weights.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "payload": _Canary(str(canary))}, evil)
    with pytest.raises(WeightsError, match="could not read weights"):
        load_weights_file(evil)
    assert not canary.exists()


def test_weights_only_checkpoints_are_read(tmp_path: Path) -> None:
    model, _ = trained_like("tiny_mlp")
    state = model.state_dict()
    torch.save(state, tmp_path / "raw.pt")
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "ckpt.pth")
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "ddp.pt")
    for name in ("raw.pt", "ckpt.pth", "ddp.pt"):
        got = load_weights_file(tmp_path / name)
        assert list(got) == list(state)
        assert all(torch.equal(got[k], state[k]) for k in state)
    fresh = tiny_mlp()
    load_weights_into(fresh, tmp_path / "ckpt.pth")
    x = batch("tiny_mlp", 3)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), model(x))


def test_truncated_safetensors_is_refused(tmp_path: Path) -> None:
    full = tmp_path / "full.safetensors"
    save_file({"w": torch.randn(64, 64)}, str(full))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(WeightsError, match=r"could not read weights: .*upload a \.safetensors"):
        load_weights_file(cut)


def test_truncated_torch_file_is_refused(tmp_path: Path) -> None:
    full = tmp_path / "full.pt"
    torch.save({"w": torch.randn(64, 64)}, full)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(full.read_bytes()[:200])
    with pytest.raises(WeightsError, match="could not read weights"):
        load_weights_file(cut)


def test_check_weights_lists_every_kind_of_problem() -> None:
    model = tiny_mlp()
    state = dict(model.state_dict())
    del state["0.bias"]
    state["extra.weight"] = torch.zeros(1)
    state["3.weight"] = torch.zeros(7, 16)
    with pytest.raises(WeightsError) as info:
        check_weights(model, state)
    msg = str(info.value)
    assert "1 missing keys: 0.bias" in msg
    assert "1 unexpected keys: extra.weight" in msg
    assert "1 shape mismatches: 3.weight: expected [5, 16] got [7, 16]" in msg
    check_weights(model, model.state_dict())  # a matching state_dict passes


def test_check_weights_truncates_long_lists() -> None:
    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(12)])
    with pytest.raises(WeightsError, match=r"24 missing keys: 0\.weight, .* \(and 14 more\)"):
        check_weights(model, {})
