from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from core.zoo import (
    Attention,
    arch_spec,
    architectures,
    build_model,
    check_arch,
    describe_arch,
    register_arch,
)


def small(arch: str) -> dict[str, Any]:
    return dict(arch_spec(arch).tiny)


@pytest.mark.parametrize("arch", architectures())
@pytest.mark.parametrize("input_shape", [(3, 32, 32), (1, 8, 8)])
def test_builtin_arch_gives_logits_per_class(arch: str, input_shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    model = build_model(arch, 7, input_shape, small(arch)).eval()
    with torch.no_grad():
        out = model(torch.rand(2, *input_shape))
    assert out.shape == (2, 7)


@pytest.mark.parametrize("arch", architectures())
def test_every_registered_arch_is_checked_described_and_refuses_unknown_options(arch: str) -> None:
    check_arch(arch)
    spec = arch_spec(arch)
    described = describe_arch(arch)
    assert (described["kind"], described["summary"], described["options"]) == (
        "builtin",
        spec.summary,
        dict(spec.defaults),
    )
    assert spec.summary and set(spec.tiny) == set(spec.defaults)
    with pytest.raises(ValueError, match=rf"unknown option\(s\) nope for {arch}; valid options"):
        build_model(arch, 3, (3, 32, 32), {"nope": 1})


def test_registering_an_architecture_is_one_decorated_function() -> None:
    @register_arch("test_linear", defaults={"bias": True}, summary="one Linear on flat inputs")
    def _linear(num_classes: int, input_shape: tuple[int, ...], opts: dict[str, Any]) -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Linear(int(torch.tensor(input_shape).prod()), num_classes))

    try:
        assert "test_linear" in architectures()
        check_arch("test_linear")
        assert describe_arch("test_linear")["options"] == {"bias": True}
        assert build_model("test_linear", 4, (2, 3))(torch.rand(5, 2, 3)).shape == (5, 4)
        with pytest.raises(ValueError, match="taken or reserved"):
            register_arch("test_linear", defaults={}, summary="again")
        with pytest.raises(ValueError, match="taken or reserved"):
            register_arch("torchvision:mine", defaults={}, summary="reserved prefix")
    finally:
        from core import zoo

        zoo._REGISTRY.pop("test_linear", None)


def test_fcn_takes_flat_features() -> None:
    model = build_model("fcn", 3, (64,), {"depth": 2, "width": 8}).eval()
    assert model(torch.rand(4, 64)).shape == (4, 3)


def test_fcn_has_depth_linear_layers_and_hand_counted_parameters() -> None:
    model = build_model("fcn", 5, (1, 4, 4), {"depth": 3, "width": 8})
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 3
    # Linear 16->8, BN(8), Linear 8->8, BN(8), Linear 8->5 (weights + biases; BN weight + bias)
    expected = (16 * 8 + 8) + 2 * 8 + (8 * 8 + 8) + 2 * 8 + (8 * 5 + 5)
    assert sum(p.numel() for p in model.parameters()) == expected == 285


def test_fcn_without_batchnorm_has_none() -> None:
    model = build_model("fcn", 5, (16,), {"depth": 3, "width": 8, "batchnorm": False})
    assert not any(isinstance(m, nn.BatchNorm1d) for m in model.modules())


def test_vit_uses_plain_linear_attention() -> None:
    model = build_model("vit_small", 10, (3, 32, 32), small("vit_small"))
    assert not any(isinstance(m, nn.MultiheadAttention) for m in model.modules())
    attn = next(m for m in model.modules() if isinstance(m, Attention))
    assert all(isinstance(getattr(attn, n), nn.Linear) for n in ("q", "k", "v", "proj"))


def test_vit_attention_matches_scaled_dot_product_attention() -> None:
    torch.manual_seed(0)
    attn = Attention(dim=32, heads=4).eval()
    x = torch.randn(3, 9, 32)

    def heads(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(3, 9, 4, 8).transpose(1, 2)

    with torch.no_grad():
        ref = F.scaled_dot_product_attention(heads(attn.q(x)), heads(attn.k(x)), heads(attn.v(x)))
        ref = attn.proj(ref.transpose(1, 2).reshape(3, 9, 32))
        out = attn(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_unknown_arch_lists_choices() -> None:
    with pytest.raises(ValueError, match=r"unknown architecture 'foo'.*fcn, vgg11.*torchvision:<name>"):
        check_arch("foo")


def test_unknown_torchvision_name_suggests_close_names() -> None:
    with pytest.raises(ValueError, match=r"torchvision:resnet18"):
        check_arch("torchvision:resnet1800")


def test_bare_torchvision_name_points_at_prefix() -> None:
    with pytest.raises(ValueError, match=r"did you mean torchvision:resnet18"):
        check_arch("resnet18")


def test_unknown_option_names_valid_options() -> None:
    with pytest.raises(ValueError, match=r"unknown option\(s\) widht for fcn; valid options: depth.*width"):
        build_model("fcn", 10, (64,), {"widht": 3})


def test_conv_arch_rejects_flat_input() -> None:
    with pytest.raises(ValueError, match=r"needs image inputs \(C, H, W\)"):
        build_model("resnet20", 10, (64,))


def test_vit_rejects_indivisible_patch() -> None:
    with pytest.raises(ValueError, match="not divisible by patch_size 4"):
        build_model("vit_small", 10, (1, 10, 10), {"dim": 16, "heads": 2, "depth": 1})


def test_torchvision_resnet18_builds_with_num_classes() -> None:
    model = build_model("torchvision:resnet18", 7, (3, 32, 32)).eval()
    with torch.no_grad():
        assert model(torch.rand(1, 3, 32, 32)).shape == (1, 7)


def test_torchvision_needs_three_channels() -> None:
    with pytest.raises(ValueError, match="torchvision models need 3-channel images"):
        build_model("torchvision:resnet18", 7, (1, 28, 28))


def test_torchvision_refuses_weights_option() -> None:
    with pytest.raises(ValueError, match="weights are never downloaded"):
        build_model("torchvision:resnet18", 7, (3, 32, 32), {"weights": "DEFAULT"})


def test_torchvision_bad_option_is_value_error() -> None:
    with pytest.raises(ValueError, match="invalid option"):
        build_model("torchvision:resnet18", 7, (3, 32, 32), {"no_such_thing": 1})


@pytest.mark.parametrize("arch", ["fcn", "resnet20", "vit_small"])
def test_same_seed_gives_same_weights(arch: str) -> None:
    def weights(seed: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(seed)
        return build_model(arch, 10, (3, 32, 32), small(arch)).state_dict()

    first, again, other = weights(1), weights(1), weights(2)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_width_mult_scales_channels() -> None:
    narrow = build_model("resnet20", 10, (3, 32, 32), {"width_mult": 0.5})
    assert isinstance(narrow.fc, nn.Linear)
    assert narrow.fc.in_features == 32


def test_describe_arch_lists_defaults() -> None:
    assert describe_arch("vit_small")["options"] == {
        "patch_size": 4,
        "dim": 256,
        "depth": 6,
        "heads": 8,
        "mlp_ratio": 2,
    }
    assert describe_arch("torchvision:resnet18")["kind"] == "torchvision"
