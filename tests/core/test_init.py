"""train.init: "paper" (independent factors, as the research code) and "preserve" (product = default init)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from core.config import DatasetConfig, TrainConfig, parse_config
from core.data import DataBundle, load_data
from core.lorita import LayerChain, apply_lorita, collapse
from core.pipeline import train_settings
from core.progress import JobCanceled, Progress
from core.train import fit
from core.zoo import build_model

CPU = torch.device("cpu")


def _factors(layer: nn.Module, param: str = "weight") -> list[torch.Tensor]:
    plist = layer.parametrizations[param]  # type: ignore[index]
    assert isinstance(plist, nn.Module)
    return [p.detach() for p in plist.parameters()]


def _check_default_uniform(values: torch.Tensor, fan_in: int) -> None:
    """``values`` look like a sample of U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (Linear/Conv2d's default)."""
    bound = 1.0 / math.sqrt(fan_in)
    var = bound**2 / 3
    n = values.numel()
    x = values.double().flatten()
    assert x.abs().max() <= bound + 1e-7
    # The sample mean has sd sqrt(var / n); the sample variance has sd ~ var * sqrt(0.8 / n)
    # for a uniform (excess kurtosis -1.2): 5 standard errors either way.
    assert abs(float(x.mean())) < 5 * math.sqrt(var / n)
    assert abs(float(x.var()) - var) < 5 * var * math.sqrt(0.8 / n)


@pytest.mark.parametrize(("out_f", "in_f"), [(48, 400), (300, 40)])
def test_paper_init_gives_each_linear_factor_the_layers_own_statistics(out_f: int, in_f: int) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(in_f, out_f)
    default = layer.weight.detach().clone()
    apply_lorita(layer, 3, init="paper", seed=5)
    full, *squares = _factors(layer)
    k = min(out_f, in_f)
    assert full.shape == (out_f, in_f) and [tuple(s.shape) for s in squares] == [(k, k)] * 2
    torch.testing.assert_close(full, default)  # the full factor is the layer's own init
    _check_default_uniform(full, in_f)
    for sq in squares:
        _check_default_uniform(sq, k)  # as a k -> k Linear would be initialized
    assert not torch.allclose(squares[0], squares[1])  # independent, not copies
    # The product is what the factors multiply to, in the order of the side they sit on.
    expected = squares[1] @ squares[0] @ full if out_f <= in_f else full @ squares[0] @ squares[1]
    torch.testing.assert_close(layer.weight, expected, atol=1e-6, rtol=1e-5)
    # ... and it starts smaller than the layer's usual init (each square shrinks by ~1/sqrt(3)).
    assert float(layer.weight.detach().norm()) < 0.5 * float(default.norm())


def test_paper_init_of_a_conv_treats_the_squares_as_1x1_convs() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 32, 3)  # matrix 32 x 144: 32 x 32 squares on the output side
    default = conv.weight.detach().clone()
    apply_lorita(conv, 3, init="paper", seed=1)
    full, *squares = _factors(conv)
    torch.testing.assert_close(full.reshape(default.shape), default)
    _check_default_uniform(full, 16 * 9)
    for sq in squares:
        _check_default_uniform(sq, 32)  # a 1x1 conv 32 -> 32
    product = (squares[1] @ squares[0] @ full.reshape(32, -1)).reshape(conv.weight.shape)
    torch.testing.assert_close(conv.weight, product, atol=1e-6, rtol=1e-5)


def test_paper_init_as_a_layer_chain_starts_from_the_same_factors() -> None:
    torch.manual_seed(0)
    weight_space = nn.Sequential(nn.Linear(600, 40))
    chained = nn.Sequential(nn.Linear(600, 40))
    chained.load_state_dict(weight_space.state_dict())
    apply_lorita(weight_space, 3, init="paper", seed=2)
    apply_lorita(chained, 3, init="paper", seed=2, layer_space=["0"])
    chain = chained[0]
    assert isinstance(chain, LayerChain)
    factors = _factors(weight_space[0])
    for mod, f in zip(chain, factors, strict=True):
        assert isinstance(mod, nn.Linear)
        torch.testing.assert_close(mod.weight.detach(), f)
    x = torch.randn(5, 600)
    torch.testing.assert_close(chained(x), weight_space(x), atol=1e-5, rtol=1e-4)
    collapse(chained)
    torch.testing.assert_close(chained(x), weight_space(x), atol=1e-5, rtol=1e-4)


def test_attention_factors_follow_xavier() -> None:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(32, 4)
    apply_lorita(mha, 2, init="paper", seed=0)
    originals = _factors(mha, "in_proj_weight")
    assert len(originals) == 6  # (full, square) for q, k and v
    for square in originals[1::2]:
        bound = math.sqrt(6.0 / (32 + 32))
        assert square.abs().max() <= bound + 1e-7
        assert abs(float(square.double().var()) - bound**2 / 3) < 0.25 * bound**2 / 3


def test_init_is_a_train_config_choice() -> None:
    assert TrainConfig(init="paper").init == "paper"
    with pytest.raises(ValueError):
        apply_lorita(nn.Linear(4, 4), 2, init="orthogonal")
    with pytest.raises(ValueError):
        parse_config({"model": {"arch": "fcn"}, "dataset": {"name": "digits"}, "train": {"init": "zeros"}})


@pytest.fixture(scope="module")
def digits() -> DataBundle:
    return load_data(DatasetConfig(name="digits"), seed=0)


def _paper_fcn(data: DataBundle, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = build_model("fcn", 10, data.input_shape, {"depth": 3, "width": 32})
    apply_lorita(model, 3, init="paper", seed=seed)
    return model


def test_paper_init_training_resumes_identically_from_a_checkpoint(
    digits: DataBundle, tmp_path: Path
) -> None:
    settings = train_settings(
        TrainConfig(epochs=3, optimizer="adam", lr=1e-2, weight_decay=5e-5, batch_size=256, init="paper"),
        augment=False,
    )
    straight = _paper_fcn(digits)
    fit(straight, digits.train, digits.val, settings, device=CPU)

    ckpt = tmp_path / "checkpoint.pt"
    interrupted = _paper_fcn(digits)
    done: list[int] = []

    def on_progress(p: Progress) -> None:
        if p.message.endswith("done"):
            done.append(int(p.epoch or 0))

    with pytest.raises(JobCanceled):
        fit(
            interrupted,
            digits.train,
            digits.val,
            settings,
            device=CPU,
            checkpoint=ckpt,
            progress=on_progress,
            should_stop=lambda: len(done) >= 1,
        )
    assert ckpt.exists()
    assert done == [1]
    resumed = _paper_fcn(digits, seed=123)  # another init: everything must come from the checkpoint
    result = fit(resumed, digits.train, digits.val, settings, device=CPU, checkpoint=ckpt)
    assert result.resumed_from_epoch == 1
    assert [h["epoch"] for h in result.history] == [1, 2, 3]
    for (k, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


def test_the_default_is_the_paper_init() -> None:
    assert TrainConfig().init == "paper"
    config = parse_config({"model": {"arch": "fcn"}, "dataset": {"name": "digits"}})
    assert config.train is not None and config.train.init == "paper"
    again = parse_config(config.model_dump(mode="json"))  # what select and the worker re-read
    assert again.train is not None and again.train.init == "paper"
