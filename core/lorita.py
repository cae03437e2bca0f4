"""LoRITa: over-parameterize each eligible weight as a product of N factors.

Composition happens in *weight space* with ``torch.nn.utils.parametrize``: the layer keeps
its ordinary forward, and its ``weight`` becomes the product of N trainable factors,
formed once per forward pass. ``collapse`` multiplies the factors back into a plain
parameter, so the model has exactly its original module types and ``state_dict`` keys.

Note: with weight decay ``lambda`` on N factors, the balanced optimum satisfies
``(1/N) sum_i ||W_i||_F^2 = sum_j sigma_j(W)^(2/N)``: plain weight decay on the factors is
a Schatten-(2/N) penalty on the product, which for N >= 2 drives it toward low rank.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from core.layers import bias_of, set_submodule, spatial_conv_like, weight_of

# ---------------------------------------------------------------------------------------
# The parametrization
# ---------------------------------------------------------------------------------------


def _product(factors: Sequence[torch.Tensor], squares_left: bool) -> torch.Tensor:
    """``S_{N-1} ... S_1 F`` when the squares sit on the left, ``F S_1 ... S_{N-1}`` otherwise."""
    full, squares = factors[0], factors[1:]
    if not squares:
        return full
    # Note: multiply the k x k squares together first (k^3 each) and touch the k x n full
    # factor once (k^2 n), instead of N-1 times: the same product at a fraction of the cost
    # when n >> k, as for a first layer on flattened images.
    chain = squares[0]
    for sq in squares[1:]:
        chain = sq @ chain if squares_left else chain @ sq
    return chain @ full if squares_left else full @ chain


def _balanced_factors(matrix: torch.Tensor, n_factors: int, squares_left: bool) -> list[torch.Tensor]:
    """An exact factorization of ``matrix`` (m x n) into one full and N-1 square factors.

    Note: with ``matrix = U S V^T`` (k = min(m, n)), each factor carries ``S^(1/N)``:
    squares ``Q_i = U S^(1/N) U^T`` (left, m = k) or ``V S^(1/N) V^T`` (right, n = k) and the
    full factor ``U S^(1/N) V^T``. Their product is ``U S V^T`` and all N factors have the
    same singular values, which is the balanced point weight decay converges to.
    """
    work = matrix.double()
    u, s, vh = torch.linalg.svd(work, full_matrices=False)
    root = s.pow(1.0 / n_factors)
    full = (u * root) @ vh
    square = (u * root) @ u.T if squares_left else (vh.T * root) @ vh
    dtype = matrix.dtype
    return [full.to(dtype)] + [square.to(dtype).clone() for _ in range(n_factors - 1)]


class _Factorized(nn.Module):
    """Parametrization ``weight = product of N factors`` for one matrix-shaped weight.

    ``weight_shape`` is the parameter's real shape (conv weights are 4-D); the product is
    formed on the ``(shape[0], prod(shape[1:]))`` matrix and reshaped back.
    """

    def __init__(self, weight_shape: torch.Size, n_factors: int) -> None:
        super().__init__()
        if n_factors < 2:
            raise ValueError(f"LoRITa needs at least 2 factors, got {n_factors}")
        self.weight_shape = tuple(weight_shape)
        self.m = weight_shape[0]
        self.n = math.prod(weight_shape[1:])
        self.n_factors = n_factors
        # Square factors go on the smaller side so that each costs min(m, n)^2.
        self.squares_left = self.m <= self.n

    def forward(self, *factors: torch.Tensor) -> torch.Tensor:
        # Note: under bf16 autocast a chain of N matmuls would round N times; form the product
        # in the factors' own precision and let the layer cast the result once.
        with torch.autocast(factors[0].device.type, enabled=False):
            return _product(factors, self.squares_left).reshape(self.weight_shape)

    def right_inverse(self, weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if tuple(weight.shape) != self.weight_shape:
            raise ValueError(f"expected a weight of shape {self.weight_shape}, got {tuple(weight.shape)}")
        matrix = weight.reshape(self.m, self.n)
        return tuple(_balanced_factors(matrix, self.n_factors, self.squares_left))


class _StackedFactorized(nn.Module):
    """``nn.MultiheadAttention.in_proj_weight`` stacks q, k and v: factorize each block apart.

    Originals are ordered ``[q factors..., k factors..., v factors...]``.
    """

    def __init__(self, weight_shape: torch.Size, n_factors: int, blocks: int = 3) -> None:
        super().__init__()
        rows, cols = weight_shape
        if rows % blocks:
            raise ValueError(f"in_proj_weight of shape {tuple(weight_shape)} does not split into {blocks}")
        self.blocks = blocks
        self.block = _Factorized(torch.Size((rows // blocks, cols)), n_factors)

    def forward(self, *factors: torch.Tensor) -> torch.Tensor:
        n = self.block.n_factors
        return torch.cat([self.block(*factors[i * n : (i + 1) * n]) for i in range(self.blocks)], dim=0)

    def right_inverse(self, weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out: list[torch.Tensor] = []
        for chunk in weight.chunk(self.blocks, dim=0):
            out.extend(self.block.right_inverse(chunk))
        return tuple(out)


# ---------------------------------------------------------------------------------------
# Which weights are eligible
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WeightTarget:
    """One weight LoRITa may compose: ``module_name.param`` of a given kind and matrix shape."""

    module: str
    param: str
    kind: str  # "linear" | "conv" | "attention_in" | "attention_qkv"
    shape: tuple[int, ...]
    eligible: bool
    reason: str = ""

    @property
    def name(self) -> str:
        return f"{self.module}.{self.param}" if self.module else self.param

    @property
    def matrix_shape(self) -> tuple[int, int]:
        if self.kind == "attention_in":
            return (self.shape[0] // 3, self.shape[1])
        return (self.shape[0], math.prod(self.shape[1:]))


def _selected(name: str, include: Sequence[str], exclude: Sequence[str]) -> bool:
    if include and not any(fnmatch.fnmatchcase(name, p) for p in include):
        return False
    return not any(fnmatch.fnmatchcase(name, p) for p in exclude)


def find_targets(
    model: nn.Module, include: Sequence[str] = (), exclude: Sequence[str] = ()
) -> list[WeightTarget]:
    """Every matrix-like weight of ``model`` with whether LoRITa composes it and, if not, why.

    Patterns are ``fnmatch`` patterns on module names (e.g. ``"features.*"``, ``"fc"``).
    """
    targets: list[WeightTarget] = []
    for name, mod in model.named_modules():
        found: list[tuple[str, str, torch.Tensor]] = []
        if isinstance(mod, nn.MultiheadAttention):
            if mod.in_proj_weight is not None:
                found.append(("in_proj_weight", "attention_in", mod.in_proj_weight))
            else:
                for p in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
                    found.append((p, "attention_qkv", getattr(mod, p)))
        elif isinstance(mod, nn.Linear):
            found.append(("weight", "linear", mod.weight))
        elif isinstance(mod, nn.Conv2d):
            found.append(("weight", "conv", mod.weight))
        for param, kind, weight in found:
            reason = ""
            shape = tuple(weight.shape)
            if isinstance(mod, nn.Conv2d) and mod.groups != 1:
                reason = f"grouped convolution (groups={mod.groups})"
            elif not _selected(name, include, exclude):
                reason = "excluded by the include/exclude patterns"
            elif min(shape[0] // (3 if kind == "attention_in" else 1), math.prod(shape[1:])) < 2:
                reason = "too small (a side of the matrix is 1)"
            targets.append(WeightTarget(name, param, kind, shape, not reason, reason))
    return targets


# ---------------------------------------------------------------------------------------
# Apply, collapse
# ---------------------------------------------------------------------------------------


_ORDER_ATTR = "_lorita_param_order"


def _factor_parametrization(target: WeightTarget, n_factors: int) -> nn.Module:
    if target.kind == "attention_in":
        return _StackedFactorized(torch.Size(target.shape), n_factors)
    return _Factorized(torch.Size(target.shape), n_factors)


def _originals(module: nn.Module, param: str) -> list[nn.Parameter]:
    plist = module.parametrizations[param]  # type: ignore[index]
    assert isinstance(plist, nn.Module)
    if hasattr(plist, "original"):
        return [plist.original]  # type: ignore[list-item]
    return [getattr(plist, f"original{i}") for i in range(len(list(plist.parameters())))]


def _scratch_init(
    parametrization: nn.Module, originals: list[nn.Parameter], generator: torch.Generator
) -> None:
    """Keep the layer's default init as the product; make every square factor orthogonal.

    Note: a product of independently initialized factors shrinks (or grows) with N. With
    random orthogonal squares ``Q_i`` and the full factor ``F = Q_1^T ... Q_{N-1}^T W0`` (or
    ``W0 Q_{N-1}^T ... Q_1^T`` on the right) the product is exactly the default init ``W0``,
    whatever N is, while the factors start in general position rather than balanced.
    """
    block = parametrization.block if isinstance(parametrization, _StackedFactorized) else parametrization
    assert isinstance(block, _Factorized)
    n = block.n_factors
    with torch.no_grad():
        for b in range(len(originals) // n):
            group = originals[b * n : (b + 1) * n]
            w0 = _product([p.detach() for p in group], block.squares_left)
            for dest, value in zip(
                group, _orthogonal_factors(w0, n, block.squares_left, generator), strict=True
            ):
                dest.copy_(value)


def _orthogonal_factors(
    matrix: torch.Tensor, n_factors: int, squares_left: bool, generator: torch.Generator
) -> list[torch.Tensor]:
    """``[F, Q_1, ..., Q_{N-1}]`` with Haar-random orthogonal ``Q_i`` whose product is ``matrix``."""
    full = matrix.double()
    size = matrix.shape[0] if squares_left else matrix.shape[1]
    squares = []
    for _ in range(n_factors - 1):
        q, r = torch.linalg.qr(torch.randn(size, size, generator=generator, dtype=torch.float64))
        squares.append(q * torch.sign(torch.diagonal(r)))
    for q in reversed(squares):
        full = q.T @ full if squares_left else full @ q.T
    return [t.to(matrix.dtype) for t in (full, *squares)]


INITS = ("weights", "preserve", "scratch", "paper")


def _default_init_(tensor: torch.Tensor, kind: str, generator: torch.Generator) -> torch.Tensor:
    """Fill a 2-D factor as a layer of ``kind`` with that factor's shape is initialized by default.

    Linear and Conv2d reset their weight with ``kaiming_uniform_(a=sqrt(5))``, i.e.
    ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` with ``fan_in`` the factor's columns (a 1x1 conv
    ``k -> k`` has fan_in k); ``nn.MultiheadAttention`` uses ``xavier_uniform_``.
    """
    if kind in ("attention_in", "attention_qkv"):
        return nn.init.xavier_uniform_(tensor, generator=generator)
    return nn.init.kaiming_uniform_(tensor, a=math.sqrt(5), generator=generator)


def _paper_factors(
    matrix: torch.Tensor, n_factors: int, kind: str, generator: torch.Generator
) -> list[torch.Tensor]:
    """``[F, Q_1, ..., Q_{N-1}]``, each factor initialized independently, as the research code does.

    ``F`` is the layer's own freshly initialized weight (same shape, same rule, whatever the
    model's init did); each square ``k x k`` (``k = min(m, n)``) is a fresh default init of a
    layer of the same kind with ``k`` inputs and outputs. The product is whatever that gives:
    smaller than the layer's usual scale, with a decaying spectrum (the implicit low-rank bias
    of a deep linear product).
    """
    size = min(matrix.shape)
    squares = [
        _default_init_(torch.empty(size, size, dtype=torch.float64), kind, generator).to(matrix.dtype)
        for _ in range(n_factors - 1)
    ]
    return [matrix.detach().clone(), *squares]


def _set_factors(originals: list[nn.Parameter], n_factors: int, groups: list[list[torch.Tensor]]) -> None:
    with torch.no_grad():
        for b, values in enumerate(groups):
            for dest, value in zip(originals[b * n_factors : (b + 1) * n_factors], values, strict=True):
                dest.copy_(value.reshape(dest.shape))


def _paper_init(
    originals: list[nn.Parameter],
    initial: torch.Tensor,
    n_factors: int,
    kind: str,
    generator: torch.Generator,
) -> None:
    """Set a composed weight's factors as :func:`_paper_factors` (a packed q/k/v weight per block)."""
    blocks = initial.chunk(3, dim=0) if kind == "attention_in" else (initial,)
    groups = [_paper_factors(b.reshape(b.shape[0], -1), n_factors, kind, generator) for b in blocks]
    _set_factors(originals, n_factors, groups)


def apply_lorita(
    model: nn.Module,
    n_factors: int,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    init: str = "weights",
    seed: int = 0,
    layer_space: Collection[str] = (),
) -> list[WeightTarget]:
    """Compose every eligible weight of ``model`` as a product of ``n_factors`` factors.

    ``init="weights"``: the factors are an exact balanced factorization of the current
    weights (the function the model computes is unchanged). ``init="preserve"`` (alias
    ``"scratch"``): the product still equals the current (freshly initialized) weights, but
    the square factors are random orthogonal matrices instead of balanced ones.
    ``init="paper"``: every factor is initialized independently, as the layer's own
    initialization would (see :func:`_paper_factors`); the product starts smaller than the
    layer's usual init. Returns the composed targets.

    Modules named in ``layer_space`` (see :func:`cheaper_in_layer_space`) are composed as a
    chain of layers instead: the same function and the same gradients, at a lower cost
    where the batch is small next to the weight. :func:`collapse` folds both kinds back.
    """
    if n_factors < 2:
        return []
    if init not in INITS:
        raise ValueError(f"init must be one of {', '.join(INITS)}; got {init!r}")
    targets = [t for t in find_targets(model, include, exclude) if t.eligible]
    generator = torch.Generator().manual_seed(seed)
    for t in targets:
        mod = model.get_submodule(t.module)
        weight = getattr(mod, t.param)
        if not torch.isfinite(weight).all():
            raise ValueError(f"{t.name} holds non-finite values; cannot factorize it")
        if t.module in layer_space and _chainable(t):
            _compose_as_chain(model, t, n_factors, init, generator)
            continue
        param = _factor_parametrization(t, n_factors)
        if not hasattr(mod, _ORDER_ATTR):  # collapse restores this order of the state_dict keys
            setattr(mod, _ORDER_ATTR, list(mod._parameters))
        initial = weight.detach().clone()
        parametrize.register_parametrization(mod, t.param, param)
        if init in ("scratch", "preserve"):
            _scratch_init(param, _originals(mod, t.param), generator)
        elif init == "paper":
            _paper_init(_originals(mod, t.param), initial, n_factors, t.kind, generator)
    return targets


def is_composed(model: nn.Module) -> bool:
    return any(parametrize.is_parametrized(m) or isinstance(m, LayerChain) for m in model.modules())


def collapse(model: nn.Module) -> nn.Module:
    """Multiply every factor product back into a plain weight, in place.

    Afterwards the model has its original module classes and ``state_dict`` keys.
    """
    for name, mod in list(model.named_modules()):
        if isinstance(mod, LayerChain):
            set_submodule(model, name, mod.fold(name))
    for name, mod in list(model.named_modules()):
        if not parametrize.is_parametrized(mod):
            continue
        for param in list(mod.parametrizations.keys()):
            with torch.no_grad():
                value = getattr(mod, param)
            if not torch.isfinite(value).all():
                raise ValueError(f"the product for {name}.{param} is not finite; training diverged")
            parametrize.remove_parametrizations(mod, param, leave_parametrized=True)
        order = getattr(mod, _ORDER_ATTR, None)
        if order is not None and not parametrize.is_parametrized(mod):
            params = mod._parameters
            mod._parameters = {k: params[k] for k in order if k in params} | params
            delattr(mod, _ORDER_ATTR)
    return model


def factor_parameters(model: nn.Module) -> int:
    """Number of trainable numbers in the factors (for the training-cost estimate)."""
    total = 0
    for mod in model.modules():
        if isinstance(mod, LayerChain):
            total += sum(p.numel() for p in mod.parameters() if p.dim() > 1)
        if parametrize.is_parametrized(mod):
            for plist in mod.parametrizations.values():  # type: ignore[operator]
                total += sum(p.numel() for p in plist.parameters())
    return total


# ---------------------------------------------------------------------------------------
# Layer-space composition: per layer where it is cheaper, and the research code's way
# ---------------------------------------------------------------------------------------


class LayerChain(nn.Sequential):
    """A Linear/Conv2d composed in layer space: the full factor as the layer (no bias), then N-1
    square Linear / 1x1 Conv2d layers, the last with the bias. ``fold`` multiplies it back."""

    def fold(self, name: str = "") -> nn.Module:
        first, squares = self[0], list(self)[1:]
        w_first = weight_of(first)
        m = w_first.shape[0]
        with torch.no_grad():
            product = _product(
                [w_first.reshape(m, -1)] + [weight_of(s).reshape(m, m) for s in squares], squares_left=True
            )
            if not torch.isfinite(product).all():
                raise ValueError(f"the product for {name}.weight is not finite; training diverged")
            bias = bias_of(squares[-1])
            if isinstance(first, nn.Linear):
                layer: nn.Module = nn.Linear(
                    first.in_features, m, bias=bias is not None, device=w_first.device, dtype=w_first.dtype
                )
            else:
                assert isinstance(first, nn.Conv2d)
                layer = spatial_conv_like(first, m, device=w_first.device, dtype=w_first.dtype)
                if bias is not None:
                    layer.bias = nn.Parameter(torch.empty(m, device=w_first.device, dtype=w_first.dtype))
            weight_of(layer).copy_(product.reshape(weight_of(layer).shape))
            layer_bias = bias_of(layer)
            if bias is not None and layer_bias is not None:
                layer_bias.copy_(bias)
        return layer


def _chainable(t: WeightTarget) -> bool:
    """Plain Linear/Conv2d whose squares sit on the output side (m <= n), as a chain needs."""
    m, n = t.matrix_shape
    return t.kind in ("linear", "conv") and t.param == "weight" and m <= n


def _compose_as_chain(
    model: nn.Module, t: WeightTarget, n_factors: int, init: str, generator: torch.Generator
) -> None:
    layer = model.get_submodule(t.module)
    assert isinstance(layer, nn.Linear | nn.Conv2d)
    chain = LayerChain(
        *(
            _layer_space_linear(layer, n_factors)
            if isinstance(layer, nn.Linear)
            else _layer_space_conv(layer, n_factors)
        )
    )
    weight = weight_of(layer)
    matrix = weight.detach().reshape(t.shape[0], -1)
    if init in ("scratch", "preserve"):
        factors = _orthogonal_factors(matrix, n_factors, squares_left=True, generator=generator)
    elif init == "paper":
        factors = _paper_factors(matrix, n_factors, t.kind, generator)
    else:
        factors = _balanced_factors_left(matrix, n_factors)
    chain.to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        for mod, f in zip(chain, factors, strict=True):
            target = weight_of(mod)
            target.copy_(f.reshape(target.shape))
        bias, last_bias = bias_of(layer), bias_of(chain[-1])
        if bias is not None and last_bias is not None:
            last_bias.copy_(bias)
    set_submodule(model, t.module, chain)


def cheaper_in_layer_space(
    model: nn.Module,
    targets: Sequence[WeightTarget],
    input_shape: tuple[int, ...],
    batch_size: int,
    n_factors: int,
) -> list[str]:
    """Modules whose composition costs less as a chain of layers than as a weight product.

    Note: per step, weight space forms the ``m x n`` product from ``m x m`` squares once
    forward and twice backward (~3 m^2 n multiply-adds, squares multiplied first), whatever
    the batch; layer space runs N-1 extra ``m x m`` layers on each of the B*P output
    positions (~3 B P m^2 (N-1)). Layer space wins when ``B P (N-1) < n``: a wide first layer
    of an MLP, or deep convs on small feature maps.
    """
    from core.svt import output_positions  # svt does not import lorita; keep the graph one way

    candidates = [t for t in targets if t.eligible and _chainable(t)]
    positions = output_positions(model, [t.module for t in candidates], input_shape)
    return [
        t.module
        for t in candidates
        if batch_size * positions.get(t.module, 1) * (n_factors - 1) < t.matrix_shape[1]
    ]


def _layer_space_linear(layer: nn.Linear, n_factors: int) -> nn.Sequential:
    out, inp = layer.out_features, layer.in_features
    mods: list[nn.Module] = [nn.Linear(inp, out, bias=False)]
    mods += [nn.Linear(out, out, bias=False) for _ in range(n_factors - 2)]
    mods.append(nn.Linear(out, out, bias=layer.bias is not None))
    return nn.Sequential(*mods)


def _layer_space_conv(layer: nn.Conv2d, n_factors: int) -> nn.Sequential:
    first = spatial_conv_like(layer, layer.out_channels)
    mods: list[nn.Module] = [first]
    mods += [nn.Conv2d(layer.out_channels, layer.out_channels, 1, bias=False) for _ in range(n_factors - 2)]
    mods.append(nn.Conv2d(layer.out_channels, layer.out_channels, 1, bias=layer.bias is not None))
    return nn.Sequential(*mods)


def apply_layer_space(
    model: nn.Module, n_factors: int, include: Sequence[str] = (), exclude: Sequence[str] = ()
) -> nn.Module:
    """Compose every eligible Linear/Conv2d as a chain of layers, as the research code does.

    Squares always sit on the output side (``m x m``), whatever the shape. Each chain is an
    exact factorization of the layer's current weight, so the model computes the same
    function; only the cost differs. Attention weights are left alone. ``collapse`` folds it.
    """
    if n_factors < 2:
        return model
    generator = torch.Generator().manual_seed(0)
    for t in find_targets(model, include, exclude):
        if t.eligible and t.kind in ("linear", "conv"):
            _compose_as_chain(model, t, n_factors, "weights", generator)
    return model


def _balanced_factors_left(matrix: torch.Tensor, n_factors: int) -> list[torch.Tensor]:
    """Factors in application order: full (m x n) first, then N-1 squares (m x m)."""
    work = matrix.double()
    m, n = work.shape
    if m > n:  # left squares of size m need a full factor of rank n: pad with an identity split
        full = work
        squares = [torch.eye(m, dtype=work.dtype) for _ in range(n_factors - 1)]
        return [full.to(matrix.dtype)] + [s.to(matrix.dtype) for s in squares]
    factors = _balanced_factors(work, n_factors, squares_left=True)
    return [f.to(matrix.dtype) for f in factors]
