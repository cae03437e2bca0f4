"""Thin replacement layers: a dense Linear/Conv2d of rank r stored as two plain layers.

A Linear ``out x in`` becomes ``Linear(in, r, bias=False) -> Linear(r, out, bias)``.
A Conv2d ``(out, in, kh, kw)`` becomes ``Conv2d(in, r, (kh, kw), stride, padding,
dilation, padding_mode, bias=False) -> Conv2d(r, out, 1, bias)``: the first conv
carries every spatial setting, so the pair computes exactly ``U_r S_r V_r^T`` applied
to the unfolded input.

The pair is an ``nn.Sequential`` of stock modules so exports (ONNX, torch.export) and
any plain PyTorch code handle it without custom ops.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

THIN_TYPES = (nn.Linear, nn.Conv2d)


def matrix_shape(layer: nn.Module) -> tuple[int, int]:
    """(m, n) of the weight seen as a matrix: conv weights are ``(out, in*kh*kw)``."""
    if isinstance(layer, nn.Linear):
        return layer.out_features, layer.in_features
    if isinstance(layer, nn.Conv2d):
        kh, kw = layer.kernel_size
        return layer.out_channels, layer.in_channels // layer.groups * kh * kw
    raise TypeError(f"no matrix shape for {type(layer).__name__}")


def saves_parameters(rank: int, m: int, n: int) -> bool:
    """A rank-r pair stores r*(m+n) weights; it is worth it only when that is below m*n."""
    return rank * (m + n) < m * n


def spatial_conv_like(
    conv: nn.Conv2d, out_channels: int, device: torch.device | None = None, dtype: torch.dtype | None = None
) -> nn.Conv2d:
    """A bias-free conv with ``conv``'s input, kernel and every spatial setting, to ``out_channels``."""
    return nn.Conv2d(
        conv.in_channels,
        out_channels,
        conv.kernel_size,  # type: ignore[arg-type]
        stride=conv.stride,  # type: ignore[arg-type]
        padding=conv.padding,  # type: ignore[arg-type]
        dilation=conv.dilation,  # type: ignore[arg-type]
        padding_mode=conv.padding_mode,
        bias=False,
        device=device,
        dtype=dtype,
    )


def empty_thin_pair(layer: nn.Module, rank: int) -> nn.Sequential:
    """An uninitialized thin pair with the same interface as ``layer``."""
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    dev, dtype = weight_of(layer).device, weight_of(layer).dtype
    has_bias = bias_of(layer) is not None
    if isinstance(layer, nn.Linear):
        first: nn.Module = nn.Linear(layer.in_features, rank, bias=False, device=dev, dtype=dtype)
        second: nn.Module = nn.Linear(rank, layer.out_features, bias=has_bias, device=dev, dtype=dtype)
    elif isinstance(layer, nn.Conv2d):
        if layer.groups != 1:
            raise ValueError("grouped convolutions are not factorized")
        first = spatial_conv_like(layer, rank, device=dev, dtype=dtype)
        second = nn.Conv2d(rank, layer.out_channels, 1, bias=has_bias, device=dev, dtype=dtype)
    else:
        raise TypeError(f"cannot make a thin pair for {type(layer).__name__}")
    return nn.Sequential(first, second)


def weight_of(layer: nn.Module) -> torch.Tensor:
    """``layer.weight`` typed as a tensor (``nn.Module.__getattr__`` is typed loosely)."""
    weight = layer.weight
    assert isinstance(weight, torch.Tensor)
    return weight


def bias_of(layer: nn.Module) -> torch.Tensor | None:
    bias = getattr(layer, "bias", None)
    return bias if isinstance(bias, torch.Tensor) else None


def thin_pair_from_factors(layer: nn.Module, left: torch.Tensor, right: torch.Tensor) -> nn.Sequential:
    """A thin pair whose product ``left @ right`` (m x r times r x n) replaces ``layer.weight``."""
    rank = left.shape[1]
    pair = empty_thin_pair(layer, rank)
    first, second = weight_of(pair[0]), weight_of(pair[1])
    bias, second_bias = bias_of(layer), bias_of(pair[1])
    with torch.no_grad():
        first.copy_(right.reshape(first.shape))
        second.copy_(left.reshape(second.shape))
        if bias is not None and second_bias is not None:
            second_bias.copy_(bias)
    return pair


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def install_empty_thin_pairs(model: nn.Module, ranks: dict[str, int]) -> nn.Module:
    """Give ``model`` the structure of a compressed model (used to reload a checkpoint).

    ``ranks`` maps module names to the kept rank of each factorized layer.
    """
    for name, rank in ranks.items():
        layer = model.get_submodule(name)
        if not isinstance(layer, THIN_TYPES):
            raise ValueError(f"{name} is a {type(layer).__name__}, not a Linear or Conv2d")
        set_submodule(model, name, empty_thin_pair(layer, rank))
    return model


def named_matrix_layers(model: nn.Module, names: Iterable[str] | None = None) -> list[tuple[str, nn.Module]]:
    """Linear and ungrouped Conv2d modules that can become thin pairs, in definition order.

    ``nn.MultiheadAttention`` reads its ``out_proj.weight`` directly instead of calling the
    module, so its projections stay dense (they are still composed during LoRITa training).
    """
    wanted = set(names) if names is not None else None
    attention = [n for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
    out: list[tuple[str, nn.Module]] = []
    for name, mod in model.named_modules():
        if wanted is not None and name not in wanted:
            continue
        if any(name.startswith(f"{a}.") or not a for a in attention):
            continue
        if isinstance(mod, nn.Linear) or (isinstance(mod, nn.Conv2d) and mod.groups == 1):
            out.append((name, mod))
    return out


def full_ranks(model: nn.Module) -> dict[str, int]:
    """The full rank of every layer a ``ranks`` policy can name, in model order: the
    ``Spectrum.full_rank`` of :func:`core.svt.compute_spectra` (min(m, n)) without an SVD, so it
    works on the meta device."""
    return {name: min(matrix_shape(layer)) for name, layer in named_matrix_layers(model)}
