"""The model zoo: built-in architectures and torchvision classifiers, by name.

Every model is built from stock layers (Linear, Conv2d, BatchNorm, LayerNorm) so the
LoRITa parametrizations, the SVT thin pairs and the exporters see ordinary modules.
Models take inputs scaled to 0..1 as ``core.data`` provides them.
"""

from __future__ import annotations

import difflib
import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

TORCHVISION_PREFIX = "torchvision:"

# "M" is a 2x2 max pool; numbers are conv output channels before width_mult.
_VGG_CFGS: dict[str, list[int | str]] = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
}
# torchvision constructors must never fetch weights and num_classes comes from the job.
_RESERVED_TORCHVISION_OPTIONS = ("weights", "weights_backbone", "num_classes", "progress")

Builder = Callable[[int, tuple[int, ...], dict[str, Any]], nn.Module]


@dataclass(frozen=True)
class ArchSpec:
    """A built-in architecture: its builder, its options with their defaults, a one-line summary,
    and options that build a tiny instance of it (for tests and quick trials)."""

    name: str
    build: Builder
    defaults: Mapping[str, Any]
    summary: str
    tiny: Mapping[str, Any]


_REGISTRY: dict[str, ArchSpec] = {}


def register_arch(
    name: str, *, defaults: Mapping[str, Any], summary: str, tiny: Mapping[str, Any] | None = None
) -> Callable[[Builder], Builder]:
    """Register ``build(num_classes, input_shape, options)`` as the architecture ``name``.

    ``options`` reaches the builder with every default filled in and no unknown key; ``tiny``
    (default: the defaults) overrides some of them to build a small instance. Adding an
    architecture is one decorated function: ``check_arch``, ``describe_arch``, ``build_model``
    and the zoo's tests see it at once.
    """
    if name in _REGISTRY or name.startswith(TORCHVISION_PREFIX) or not name:
        raise ValueError(f"architecture name {name!r} is taken or reserved")
    unknown = set(tiny or {}) - set(defaults)
    if unknown:
        raise ValueError(f"tiny options {sorted(unknown)} of {name} are not among its options")

    def register(build: Builder) -> Builder:
        _REGISTRY[name] = ArchSpec(name, build, dict(defaults), summary, {**defaults, **(tiny or {})})
        return build

    return register


def architectures() -> tuple[str, ...]:
    """The built-in architectures, in the order they were registered."""
    return tuple(_REGISTRY)


def arch_spec(arch: str) -> ArchSpec:
    """The registry entry of a built-in architecture (``check_arch`` first for a person's message)."""
    return _REGISTRY[arch]


@functools.cache
def torchvision_models() -> tuple[str, ...]:
    """Names of torchvision's classification models (accepted as ``torchvision:<name>``)."""
    import torchvision

    return tuple(sorted(torchvision.models.list_models(module=torchvision.models)))


def _choices_text() -> str:
    return f"{', '.join(architectures())}, or torchvision:<name> (e.g. torchvision:resnet18)"


def check_arch(arch: str) -> None:
    """Raise ValueError (listing the valid choices) unless ``arch`` names a buildable model."""
    if arch in _REGISTRY:
        return
    if arch.startswith(TORCHVISION_PREFIX):
        name = arch[len(TORCHVISION_PREFIX) :]
        known = torchvision_models()
        if name in known:
            return
        close = difflib.get_close_matches(name, known, n=4, cutoff=0.5)
        hint = f"; did you mean {', '.join(TORCHVISION_PREFIX + c for c in close)}?" if close else ""
        raise ValueError(
            f"unknown torchvision classification model {name!r}{hint} "
            f"(any of torchvision.models.list_models(module=torchvision.models) works)"
        )
    hints = difflib.get_close_matches(arch, architectures(), n=3, cutoff=0.6)
    if arch in torchvision_models():
        hints.insert(0, TORCHVISION_PREFIX + arch)
    hint = f" (did you mean {', '.join(hints)}?)" if hints else ""
    raise ValueError(f"unknown architecture {arch!r}{hint}; choose one of {_choices_text()}")


def describe_arch(arch: str) -> dict[str, Any]:
    """The options ``arch`` accepts with their defaults, and a one-line summary."""
    check_arch(arch)
    if arch.startswith(TORCHVISION_PREFIX):
        return {
            "arch": arch,
            "kind": "torchvision",
            "summary": "torchvision classifier built with weights=None; options are passed as keyword "
            "arguments to its constructor; needs 3-channel images",
            "options": {},
        }
    spec = _REGISTRY[arch]
    return {"arch": arch, "kind": "builtin", "summary": spec.summary, "options": dict(spec.defaults)}


def build_model(
    arch: str, num_classes: int, input_shape: tuple[int, ...], options: dict[str, Any] | None = None
) -> nn.Module:
    """A freshly initialized classifier (deterministic under ``torch.manual_seed``)."""
    check_arch(arch)
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    input_shape = tuple(int(s) for s in input_shape)
    if not input_shape or any(s < 1 for s in input_shape):
        raise ValueError(f"input_shape must be a non-empty tuple of positive sizes, got {input_shape}")
    options = dict(options or {})
    if arch.startswith(TORCHVISION_PREFIX):
        return _build_torchvision(arch[len(TORCHVISION_PREFIX) :], num_classes, input_shape, options)
    spec = _REGISTRY[arch]
    return spec.build(num_classes, input_shape, _resolve_options(spec, options))


def build_meta_model(
    arch: str, num_classes: int, input_shape: tuple[int, ...], options: dict[str, Any] | None = None
) -> nn.Module:
    """The model ``build_model`` makes, on the meta device: every shape, no memory, whatever the
    options (a width of 10^6 costs nothing). For checking options, sizes and uploaded weights.

    Raises ValueError for settings that do not build (unknown options, bad values), as build_model.
    """
    try:
        with torch.device("meta"):
            return build_model(arch, num_classes, input_shape, options)
    except (ValueError, TypeError):
        raise
    except (RuntimeError, NotImplementedError) as err:  # a builder that reads tensor values
        raise ValueError(f"{arch} cannot be sized before it is built ({type(err).__name__})") from None


def count_parameters(model: nn.Module) -> int:
    """Parameters of ``model``, tied ones once (works on the meta device)."""
    return sum(p.numel() for p in model.parameters())


def _resolve_options(spec: ArchSpec, options: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(options) - set(spec.defaults))
    if unknown:
        valid = ", ".join(f"{k} (default {v!r})" for k, v in spec.defaults.items())
        raise ValueError(f"unknown option(s) {', '.join(unknown)} for {spec.name}; valid options: {valid}")
    return {**spec.defaults, **options}


def _positive_int(opts: dict[str, Any], key: str) -> int:
    value = opts[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"option {key} must be a positive integer, got {value!r}")
    return value


def _bool(opts: dict[str, Any], key: str) -> bool:
    value = opts[key]
    if not isinstance(value, bool):
        raise ValueError(f"option {key} must be true or false, got {value!r}")
    return value


def _positive_float(opts: dict[str, Any], key: str) -> float:
    value = opts[key]
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(f"option {key} must be a positive number, got {value!r}")
    return float(value)


def _width_mult(opts: dict[str, Any]) -> float:
    return _positive_float(opts, "width_mult")


def _image_shape(arch: str, input_shape: tuple[int, ...]) -> tuple[int, int, int]:
    if len(input_shape) != 3:
        raise ValueError(
            f"{arch} needs image inputs (C, H, W), got input_shape {input_shape}; use fcn instead"
        )
    c, h, w = input_shape
    return c, h, w


def _scaled(channels: int, width_mult: float) -> int:
    return max(1, round(channels * width_mult))


class FCN(nn.Sequential):
    """Flatten, then ``depth`` Linear layers; hidden ones are followed by [BatchNorm1d +] ReLU."""

    def __init__(self, in_features: int, num_classes: int, depth: int, width: int, batchnorm: bool) -> None:
        layers: list[nn.Module] = [nn.Flatten()]
        fan_in = in_features
        for _ in range(depth - 1):
            layers.append(nn.Linear(fan_in, width))
            if batchnorm:
                layers.append(nn.BatchNorm1d(width))
            layers.append(nn.ReLU(inplace=True))
            fan_in = width
        layers.append(nn.Linear(fan_in, num_classes))
        super().__init__(*layers)


class VGG(nn.Module):
    """CIFAR-style VGG: conv3x3+BN+ReLU stacks, max pools, global average pool, one Linear."""

    def __init__(
        self,
        cfg: list[int | str],
        in_channels: int,
        spatial: tuple[int, int],
        num_classes: int,
        width_mult: float,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        height, width = spatial
        for item in cfg:
            if item == "M":
                # Smaller inputs than 32x32 (digits 8x8, MNIST 28x28) run out of resolution
                # before the fifth pool; skipping pools that would empty the map keeps them usable.
                if height >= 2 and width >= 2:
                    layers.append(nn.MaxPool2d(2))
                    height, width = height // 2, width // 2
                continue
            assert isinstance(item, int)
            out = _scaled(item, width_mult)
            layers += [nn.Conv2d(channels, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(True)]
            channels = out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


class BasicBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """He et al.'s CIFAR ResNet (6n+2 layers) with 1x1 projection shortcuts."""

    def __init__(self, blocks_per_stage: int, in_channels: int, num_classes: int, width_mult: float) -> None:
        super().__init__()
        widths = [_scaled(c, width_mult) for c in (16, 32, 64)]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        stages: list[nn.Module] = []
        channels = widths[0]
        for i, out in enumerate(widths):
            blocks = []
            for j in range(blocks_per_stage):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(BasicBlock(channels, out, stride))
                channels = out
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class Attention(nn.Module):
    """Multi-head self-attention from four plain Linear layers.

    Note: kept free of ``nn.MultiheadAttention`` (whose in-projection is a bare
    Parameter) and of fused kernels, so LoRITa can compose q/k/v/proj like any Linear,
    SVT can swap each for a thin pair, and ONNX/torch.export see ordinary matmuls.
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"vit_small: dim ({dim}) must be divisible by heads ({heads})")
        self.heads = heads
        self.head_dim = dim // heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def _split_heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.reshape(b, n, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self._split_heads(self.q(x)), self._split_heads(self.k(x)), self._split_heads(self.v(x))
        scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(self.head_dim)
        out = torch.matmul(scores.softmax(dim=-1), v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Patch embedding (Conv2d kernel=stride=patch), class token, learned positions, pre-norm blocks."""

    def __init__(
        self,
        in_channels: int,
        image_size: tuple[int, int],
        num_classes: int,
        patch_size: int,
        dim: int,
        depth: int,
        heads: int,
        hidden: int,
    ) -> None:
        super().__init__()
        height, width = image_size
        if height % patch_size or width % patch_size:
            raise ValueError(
                f"vit_small: image size {height}x{width} is not divisible by patch_size {patch_size}"
            )
        num_patches = (height // patch_size) * (width // patch_size)
        self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, dim))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.blocks = nn.Sequential(*(TransformerBlock(dim, heads, hidden) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)
        tokens = torch.cat([cls, tokens], dim=1) + self.pos_embed
        tokens = self.norm(self.blocks(tokens))
        return self.head(tokens[:, 0])


# --------------------------------------------------------------------------------------------
# The built-in architectures: one decorated builder each.

_WIDTH = {"width_mult": 1.0}
_VGG_SUMMARY = "CIFAR-style {} (conv3x3+BN+ReLU), for 32x32 images"
_RESNET_SUMMARY = "CIFAR {} (3 stages of 16/32/64 channels, basic blocks)"


@register_arch(
    "fcn",
    defaults={"depth": 6, "width": 96, "batchnorm": True},
    summary="fully connected net on flattened inputs; BatchNorm1d + ReLU after each hidden Linear",
    tiny={"depth": 3, "width": 16},
)
def _fcn(num_classes: int, input_shape: tuple[int, ...], opts: dict[str, Any]) -> nn.Module:
    return FCN(
        math.prod(input_shape),
        num_classes,
        depth=_positive_int(opts, "depth"),
        width=_positive_int(opts, "width"),
        batchnorm=_bool(opts, "batchnorm"),
    )


def _vgg(name: str, num_classes: int, input_shape: tuple[int, ...], opts: dict[str, Any]) -> nn.Module:
    channels, height, width = _image_shape(name, input_shape)
    return VGG(_VGG_CFGS[name], channels, (height, width), num_classes, _width_mult(opts))


@register_arch("vgg11", defaults=_WIDTH, summary=_VGG_SUMMARY.format("VGG-11"), tiny={"width_mult": 0.125})
def _vgg11(num_classes: int, input_shape: tuple[int, ...], opts: dict[str, Any]) -> nn.Module:
    return _vgg("vgg11", num_classes, input_shape, opts)


@register_arch("vgg13", defaults=_WIDTH, summary=_VGG_SUMMARY.format("VGG-13"), tiny={"width_mult": 0.125})
def _vgg13(num_classes: int, input_shape: tuple[int, ...], opts: dict[str, Any]) -> nn.Module:
    return _vgg("vgg13", num_classes, input_shape, opts)


@register_arch("vgg16", defaults=_WIDTH, summary=_VGG_SUMMARY.format("VGG-16"), tiny={"width_mult": 0.125})
def _vgg16(num_classes: int, input_shape: tuple[int, ...], opts: dict[str, Any]) -> nn.Module:
    return _vgg("vgg16", num_classes, input_shape, opts)


def _resnet(
    name: str, blocks: int, num_classes: int, input_shape: tuple[int, ...], opts: dict[str, Any]
) -> nn.Module:
    channels, _, _ = _image_shape(name, input_shape)
    return CifarResNet(blocks, channels, num_classes, _width_mult(opts))


@register_arch(
    "resnet20", defaults=_WIDTH, summary=_RESNET_SUMMARY.format("ResNet-20"), tiny={"width_mult": 0.25}
)
def _resnet20(num_classes: int, input_shape: tuple[int, ...], opts: dict[str, Any]) -> nn.Module:
    return _resnet("resnet20", 3, num_classes, input_shape, opts)


@register_arch(
    "resnet56", defaults=_WIDTH, summary=_RESNET_SUMMARY.format("ResNet-56"), tiny={"width_mult": 0.25}
)
def _resnet56(num_classes: int, input_shape: tuple[int, ...], opts: dict[str, Any]) -> nn.Module:
    return _resnet("resnet56", 9, num_classes, input_shape, opts)


@register_arch(
    "vit_small",
    defaults={"patch_size": 4, "dim": 256, "depth": 6, "heads": 8, "mlp_ratio": 2},
    summary="small Vision Transformer with plain Linear q/k/v/proj projections",
    tiny={"dim": 32, "depth": 1, "heads": 4},
)
def _vit_small(num_classes: int, input_shape: tuple[int, ...], opts: dict[str, Any]) -> nn.Module:
    channels, height, width = _image_shape("vit_small", input_shape)
    return _build_vit(opts, channels, height, width, num_classes)


def _build_vit(opts: dict[str, Any], channels: int, height: int, width: int, num_classes: int) -> ViT:
    dim = _positive_int(opts, "dim")
    hidden = max(1, round(dim * _positive_float(opts, "mlp_ratio")))
    return ViT(
        channels,
        (height, width),
        num_classes,
        patch_size=_positive_int(opts, "patch_size"),
        dim=dim,
        depth=_positive_int(opts, "depth"),
        heads=_positive_int(opts, "heads"),
        hidden=hidden,
    )


def _build_torchvision(
    name: str, num_classes: int, input_shape: tuple[int, ...], options: dict[str, Any]
) -> nn.Module:
    import torchvision

    if len(input_shape) != 3 or input_shape[0] != 3:
        raise ValueError(
            f"torchvision models need 3-channel images (3, H, W); got input_shape {input_shape}; "
            "use a built-in architecture (e.g. resnet20 or fcn) for this data"
        )
    reserved = sorted(set(options) & set(_RESERVED_TORCHVISION_OPTIONS))
    if reserved:
        raise ValueError(
            f"option(s) {', '.join(reserved)} cannot be set for torchvision:{name}: weights are never "
            "downloaded (give model.weights instead) and num_classes comes from model.num_classes"
        )
    try:
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **options)
    except TypeError as err:
        raise ValueError(f"invalid option(s) for torchvision:{name}: {err}") from None
