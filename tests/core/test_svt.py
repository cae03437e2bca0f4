"""Singular value truncation: exactness, error bounds, rank policies, cost model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from core import svt
from core.layers import saves_parameters
from core.metrics import count_flops, count_params
from tests.core.models import make


@pytest.mark.parametrize("name", ["mlp", "cnn_bn", "resnet_block", "transformer_mha", "torchvision_resnet18"])
def test_full_rank_thin_pairs_leave_outputs_unchanged(name: str) -> None:
    model, x = make(name)
    spectra = svt.compute_spectra(model)
    full = {k: sp.full_rank for k, sp in spectra.items()}
    thin = svt.truncate(model, spectra, full, force_factorize=True)
    assert sum(isinstance(m, nn.Sequential) and len(m) == 2 for m in thin.modules()) >= len(spectra)
    torch.testing.assert_close(thin(x), model(x), atol=1e-4, rtol=1e-4)
    # Without forcing, full rank never pays for itself: nothing changes at all.
    same = svt.truncate(model, spectra, full)
    assert [type(m) for m in same.modules()] == [type(m) for m in model.modules()]


@pytest.mark.parametrize("layer", [nn.Linear(40, 24), nn.Conv2d(6, 10, 3, stride=2, padding=1)])
def test_truncation_error_in_spectral_norm_is_the_next_singular_value(layer: nn.Module) -> None:
    model = nn.Sequential(layer)
    spectra = svt.compute_spectra(model)
    sp = spectra["0"]
    for rank in (1, 3, 5):
        thin = svt.truncate(model, spectra, {"0": rank}, force_factorize=True)[0]
        first, second = thin[0].weight.detach().double(), thin[1].weight.detach().double()
        approx = second.reshape(sp.m, rank) @ first.reshape(rank, sp.n)
        dense = layer.weight.detach().double().reshape(sp.m, sp.n)
        err = torch.linalg.matrix_norm(dense - approx, ord=2)
        assert err == pytest.approx(float(sp.s[rank]), rel=1e-5)


def test_thin_conv_keeps_every_setting() -> None:
    conv = nn.Conv2d(8, 12, 3, stride=2, padding=2, dilation=2, padding_mode="reflect", bias=True)
    model = nn.Sequential(conv)
    spectra = svt.compute_spectra(model)
    first, second = svt.truncate(model, spectra, {"0": 2}, force_factorize=True)[0]
    assert (first.stride, first.padding, first.dilation, first.padding_mode) == (
        (2, 2),
        (2, 2),
        (2, 2),
        "reflect",
    )
    assert first.bias is None and second.kernel_size == (1, 1)
    torch.testing.assert_close(second.bias, conv.bias)


def test_a_layer_is_never_factorized_where_it_would_grow() -> None:
    model = nn.Sequential(nn.Linear(10, 10), nn.Linear(10, 100))
    spectra = svt.compute_spectra(model)
    ranks = {"0": 5, "1": 9}  # 5*(10+10)=100 == 100: no saving; 9*(100+10)=990 < 1000: saving
    assert not saves_parameters(5, 10, 10) and saves_parameters(9, 100, 10)
    out = svt.truncate(model, spectra, ranks)
    assert isinstance(out[0], nn.Linear) and torch.equal(out[0].weight, model[0].weight)
    assert isinstance(out[1], nn.Sequential)
    table = svt.rank_table(spectra, ranks)
    assert table["0"]["factorized"] is False and table["0"]["kept_rank"] == 10
    assert table["1"]["factorized"] is True and table["1"]["kept_rank"] == 9


def test_parameters_and_flops_match_hand_counts_before_and_after() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
    shape = (3, 6, 6)
    assert count_params(model) == (8 * 27 + 8) + (288 * 10 + 10)
    # FLOPs = 2 x multiply-adds: conv at 36 positions, then the Linear.
    assert count_flops(model, shape) == 2 * (8 * 27 * 36) + 2 * (288 * 10)
    spectra = svt.compute_spectra(model, shape)
    ranks = {"0": 2, "3": 3}
    small = svt.truncate(model, spectra, ranks)
    conv_after = 2 * (27 + 8) + 8  # thin pair weights + the bias kept on the second conv
    linear_after = 3 * (288 + 10) + 10
    assert count_params(small) == conv_after + linear_after
    assert count_flops(small, shape) == 2 * 36 * 2 * (27 + 8) + 2 * 3 * (288 + 10)
    # The cost model used by the policies agrees with the real counts.
    other = count_params(model) - sum(sp.dense_params() for sp in spectra.values())
    assert svt.params_of(spectra, ranks, other) == count_params(small)
    assert svt.flops_of(spectra, ranks) == count_flops(small, shape)


def test_compressed_layers_really_are_thin() -> None:
    """The research code rebuilt the dense weight in forward; ours must hold no m x n matrix."""
    model, _ = make("mlp")
    spectra = svt.compute_spectra(model)
    small = svt.truncate(model, spectra, {"fc1": 2})
    shapes = [tuple(p.shape) for p in small.fc1.parameters()]
    assert (16, 20) not in shapes and (2, 20) in shapes and (16, 2) in shapes
    assert count_flops(small, (20,)) < count_flops(model, (20,))


def test_candidates_never_share_batchnorm_statistics() -> None:
    model, x = make("cnn_bn")
    spectra = svt.compute_spectra(model)
    a = svt.truncate(model, spectra, {"conv2": 2})
    a.train()
    a(x)  # updates a's running statistics only
    assert not torch.equal(a.bn2.running_mean, model.bn2.running_mean)
    assert a.bn1.running_mean.data_ptr() != model.bn1.running_mean.data_ptr()


def test_linear_and_conv_singular_values_are_both_normalized() -> None:
    model, _ = make("cnn_bn")
    spectra = svt.compute_spectra(model)
    assert {sp.kind for sp in spectra.values()} == {"conv", "linear"}
    for sp in spectra.values():
        assert float(sp.normalized[0]) == pytest.approx(1.0)
        assert float(sp.normalized.max()) <= 1.0 + 1e-12


def _toy_spectra() -> dict[str, svt.Spectrum]:
    def spectrum(name: str, values: list[float], m: int, n: int) -> svt.Spectrum:
        k = len(values)
        s = torch.tensor(values, dtype=torch.float64)
        return svt.Spectrum(
            name,
            "linear",
            m,
            n,
            torch.eye(m, k, dtype=torch.float64),
            s,
            torch.eye(k, n, dtype=torch.float64),
        )

    return {
        "a": spectrum("a", [10.0, 5.0, 1.0, 0.1], 4, 50),
        "b": spectrum("b", [2.0, 1.8, 0.2, 0.02], 4, 50),
    }


def test_rank_policies_on_known_spectra() -> None:
    spectra = _toy_spectra()
    # normalized: a = [1, .5, .1, .01], b = [1, .9, .1, .01]
    assert svt.ranks_uniform(spectra, 0.5) == {"a": 2, "b": 2}
    assert svt.ranks_uniform(spectra, 0.01) == {"a": 1, "b": 1}
    assert svt.ranks_global(spectra, 0.25) == ({"a": 1, "b": 1}, 1.0)  # top 2 of 8: the two 1.0s
    assert svt.ranks_global(spectra, 0.5) == ({"a": 2, "b": 2}, 0.5)  # top 4: 1, 1, .9, .5
    assert svt.ranks_threshold(spectra, 0.1) == {"a": 3, "b": 3}
    # energy: a = 100, 25, 1, .01 -> 0.95 needs 2 (125/126.01 = .992); b: 4, 3.24, .04 -> .95 needs 2
    assert svt.ranks_energy(spectra, 0.95) == {"a": 2, "b": 2}
    assert svt.ranks_energy(spectra, 0.999) == {"a": 3, "b": 3}


def test_budget_policy_finds_the_threshold_that_just_fits() -> None:
    spectra = _toy_spectra()
    dense = sum(sp.dense_params() for sp in spectra.values())  # 400
    for budget in (0.3, 0.6, 0.9):
        limit = int(budget * dense)
        fit = svt.ranks_under_budget(
            svt.normalized_scores(spectra), lambda r: svt.params_of(spectra, r), limit
        )
        assert fit is not None
        ranks, threshold = fit
        assert svt.params_of(spectra, ranks) <= limit
        # the next lower threshold (one more singular value kept) no longer fits
        lower = [float(v) for v in svt.pooled_normalized(spectra) if float(v) < threshold]
        if lower:
            assert svt.params_of(spectra, svt.ranks_threshold(spectra, max(lower))) > limit


def test_budget_fit_is_none_when_even_rank_one_is_too_big() -> None:
    spectra = _toy_spectra()
    smallest = svt.params_of(spectra, {k: 1 for k in spectra})
    cost = lambda r: svt.params_of(spectra, r)  # noqa: E731
    assert svt.ranks_under_budget(svt.normalized_scores(spectra), cost, smallest - 1) is None
    assert svt.ranks_under_budget(svt.normalized_scores(spectra), cost, smallest) == ({"a": 1, "b": 1}, 1.0)


def test_multihead_attention_projections_stay_dense_and_the_rest_is_truncated() -> None:
    """nn.MultiheadAttention reads out_proj.weight itself: replacing out_proj would break it."""
    model, x = make("transformer_mha")
    spectra = svt.compute_spectra(model)
    assert set(spectra) == {"mlp.0", "mlp.2"}
    small = svt.truncate(model, spectra, {k: 1 for k in spectra})
    assert isinstance(small.attn.out_proj, nn.Linear)
    assert isinstance(small.mlp[0], nn.Sequential)
    assert small(x).shape == x.shape
