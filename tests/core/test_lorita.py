"""LoRITa composition and collapse on a table of tiny models."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from core.lorita import (
    LayerChain,
    apply_layer_space,
    apply_lorita,
    cheaper_in_layer_space,
    collapse,
    factor_parameters,
    find_targets,
    is_composed,
)
from tests.core.models import TINY_MODELS, make

MODEL_NAMES = list(TINY_MODELS)


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        t.name: getattr(model.get_submodule(t.module), t.param).detach().clone() for t in find_targets(model)
    }


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("n_factors", [2, 3])
def test_factorization_of_given_weights_reproduces_them(name: str, n_factors: int) -> None:
    model, _ = make(name)
    before = _weights(model)
    targets = apply_lorita(model, n_factors, init="weights")
    assert targets, "every model in the table has eligible weights"
    for t in targets:
        product = getattr(model.get_submodule(t.module), t.param)
        torch.testing.assert_close(product, before[t.name], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("init", ["weights", "scratch"])
def test_composed_collapsed_and_original_outputs_agree(name: str, init: str) -> None:
    model, x = make(name)
    reference = model(x)
    composed = copy.deepcopy(model)
    apply_lorita(composed, 3, init=init)
    assert is_composed(composed)
    composed_out = composed(x)
    torch.testing.assert_close(composed_out, reference, atol=1e-4, rtol=1e-4)
    collapse(composed)
    assert not is_composed(composed)
    torch.testing.assert_close(composed(x), composed_out, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_collapse_restores_types_and_keys_and_loads_into_a_fresh_instance(name: str) -> None:
    model, x = make(name)
    keys = list(model.state_dict())
    types = [type(m) for m in model.modules()]
    apply_lorita(model, 3, init="scratch", seed=3)
    # Change the factors as training would, so the collapsed weights differ from the start.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    expected = model(x)
    collapse(model)
    assert list(model.state_dict()) == keys
    assert [type(m) for m in model.modules()] == types
    fresh, _ = make(name, seed=99)
    fresh.load_state_dict(model.state_dict(), strict=True)
    torch.testing.assert_close(fresh.eval()(x), expected, atol=1e-4, rtol=1e-4)


def test_square_factors_sit_on_the_smaller_side() -> None:
    wide = nn.Linear(40, 6)  # out 6 < in 40: squares are 6x6, on the left
    tall = nn.Linear(5, 30)  # out 30 > in 5: squares are 5x5, on the right
    conv = nn.Conv2d(3, 16, 3)  # matrix 16 x 27: squares 16x16
    for layer, square in ((wide, 6), (tall, 5), (conv, 16)):
        apply_lorita(layer, 3)
        shapes = [tuple(p.shape) for p in layer.parametrizations.weight.parameters()]
        assert shapes.count((square, square)) == 2, shapes
        assert len(shapes) == 3


def test_scratch_init_keeps_the_default_init_scale() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(64, 64)
    default = layer.weight.detach().clone()
    apply_lorita(layer, 4, init="scratch", seed=1)
    factors = list(layer.parametrizations.weight.parameters())
    torch.testing.assert_close(layer.weight, default, atol=1e-5, rtol=1e-5)
    # The squares are orthogonal, not balanced copies of one another.
    for sq in factors[1:]:
        torch.testing.assert_close(sq @ sq.T, torch.eye(64), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(factors[1], factors[2])


def test_multihead_attention_blocks_are_factorized_separately() -> None:
    model, x = make("transformer_mha")
    reference = model(x)
    targets = {t.name: t for t in apply_lorita(model, 2)}
    assert {"attn.in_proj_weight", "attn.out_proj.weight"} <= set(targets)
    originals = list(model.attn.parametrizations.in_proj_weight.parameters())
    assert [tuple(p.shape) for p in originals] == [(16, 16)] * 6  # (full, square) for q, k and v
    torch.testing.assert_close(model(x), reference, atol=1e-5, rtol=1e-5)


def test_gradients_reach_every_factor() -> None:
    model, x = make("cnn_bn")
    apply_lorita(model, 3)
    model.train()
    model(x).sum().backward()
    for mod in model.modules():
        if parametrize.is_parametrized(mod):
            for p in mod.parametrizations.weight.parameters():
                assert p.grad is not None and torch.count_nonzero(p.grad) > 0


def test_targets_skip_grouped_convs_and_excluded_names() -> None:
    model, _ = make("cnn_bn")
    targets = {t.name: t for t in find_targets(model, exclude=["head"])}
    assert targets["dw.weight"].eligible is False and "grouped" in targets["dw.weight"].reason
    assert targets["head.weight"].eligible is False and "excluded" in targets["head.weight"].reason
    assert targets["conv1.weight"].eligible and targets["conv2.weight"].eligible
    only = {t.name for t in find_targets(model, include=["conv*"]) if t.eligible}
    assert only == {"conv1.weight", "conv2.weight"}


def test_factor_parameter_count() -> None:
    layer = nn.Linear(20, 8)
    apply_lorita(layer, 3)
    assert factor_parameters(layer) == 8 * 20 + 2 * 8 * 8


def test_layer_space_composition_computes_the_same_function() -> None:
    for name in ("mlp", "cnn_bn"):
        model, x = make(name)
        reference = model(x)
        layered = apply_layer_space(copy.deepcopy(model), 3)
        assert sum(isinstance(m, nn.Sequential) for m in layered.modules()) >= 2
        torch.testing.assert_close(layered(x), reference, atol=1e-4, rtol=1e-4)


def test_collapse_refuses_non_finite_products() -> None:
    layer = nn.Linear(4, 4)
    apply_lorita(layer, 2)
    with torch.no_grad():
        next(iter(layer.parametrizations.weight.parameters())).fill_(float("nan"))
    with pytest.raises(ValueError, match="not finite"):
        collapse(layer)


def _wide_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(3 * 16 * 16, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 10)
    )


def test_the_cost_model_puts_wide_layers_on_small_batches_in_layer_space() -> None:
    model = _wide_mlp()
    targets = find_targets(model)
    # B*P*(N-1) = 128*1*2 = 256 < 768 (the first layer's n) but not < 24 (the others)
    assert cheaper_in_layer_space(model, targets, (3, 16, 16), batch_size=128, n_factors=3) == ["1"]
    assert cheaper_in_layer_space(model, targets, (3, 16, 16), batch_size=512, n_factors=3) == []
    cnn, _ = make("cnn_bn")
    # batch 2, N=3: conv1 (8 x 27 on 8x8 maps) 2*64*2 = 256 >= 27: weight space;
    # conv2 (16 x 72 on 4x4) 2*16*2 = 64 < 72 and head (4 x 16) 2*1*2 = 4 < 16: layer space
    chosen = cheaper_in_layer_space(cnn, find_targets(cnn), (3, 8, 8), batch_size=2, n_factors=3)
    assert chosen == ["conv2", "head"]


@pytest.mark.parametrize("init", ["weights", "scratch"])
def test_layer_space_chains_compute_the_same_function_and_fold_back(init: str) -> None:
    for name in ("mlp", "cnn_bn"):
        model, x = make(name)
        keys, types = list(model.state_dict()), [type(m) for m in model.modules()]
        reference = model(x)
        chained = [t.module for t in find_targets(model) if t.eligible][:2]
        apply_lorita(model, 3, init=init, layer_space=chained)
        assert all(isinstance(model.get_submodule(c), LayerChain) for c in chained)
        assert is_composed(model)
        torch.testing.assert_close(model(x), reference, atol=1e-4, rtol=1e-4)
        collapse(model)
        assert list(model.state_dict()) == keys and [type(m) for m in model.modules()] == types
        torch.testing.assert_close(model(x), reference, atol=1e-4, rtol=1e-4)


def test_layer_space_and_weight_space_train_identically() -> None:
    """Same function, same gradients: one SGD step in either space gives the same weights."""
    model, x = make("cnn_bn")
    model.train()
    results = []
    for layer_space in ((), ("conv1", "conv2", "head")):
        m = copy.deepcopy(model)
        apply_lorita(m, 3, init="weights", layer_space=layer_space)
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        m(x).square().mean().backward()
        opt.step()
        collapse(m)
        results.append(m.state_dict())
    for key in results[0]:
        torch.testing.assert_close(results[0][key], results[1][key], atol=1e-5, rtol=1e-4)
