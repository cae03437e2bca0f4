"""A loaded program as a module; LoRITa on its weights; the SVT graph rewrite; re-exports.

:class:`ProgramModel` wraps ``ExportedProgram.module()`` (an FX GraphModule whose parameters
sit in plain submodules named after the original ones, e.g. ``layer1.0.conv1.weight``).

- **Eligible weights** (:func:`program_targets`): every parameter the graph uses as the weight
  of ``aten.linear`` or of an ungrouped, non-transposed ``aten.conv1d/conv2d/convolution``.
  Every other weight-like parameter is listed with the reason it is left alone. A parameter
  used by several such ops (tied) is composed once and truncated once, the same thin pair
  serving every use; one also used by another op stays dense, and the reason says which op.
  ``nn.MultiheadAttention``'s packed ``in_proj_weight`` is composed as three q/k/v blocks
  (as :mod:`core.lorita` does) and truncated as one stacked matrix.
- **LoRITa** reuses :mod:`core.lorita`'s weight-space parametrization: the GraphModule reads
  ``self.<module>.weight`` and ``torch.nn.utils.parametrize`` turns that read into the product
  of the factors. :func:`core.lorita.collapse` folds it back unchanged.
- **Batch norm and dropout run as exported**: a program exported in train mode trains with
  batch statistics (and dropout on) and evaluates with running statistics (and dropout
  off); one exported in eval mode trains with frozen statistics (batch norm is an affine layer)
  and dropout off. :attr:`ProgramModel.norm_mode` says which.
- **SVT** (:func:`truncate_program`): each truncated op becomes two thin ops, exactly as
  :mod:`core.layers` builds thin pairs: ``linear(x, V) -> linear(., U, b)``; a conv becomes a
  conv to ``r`` channels with the original kernel, stride, padding and dilation, then a 1x1
  conv with the bias.
"""

from __future__ import annotations

import copy
import fnmatch
import math
import os
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn
from torch.nn.utils import parametrize

from core import svt
from core.lorita import (
    _ORDER_ATTR,
    WeightTarget,
    _factor_parametrization,
    _originals,
    _paper_init,
    _scratch_init,
)
from core.program.archive import ProgramError

aten = torch.ops.aten
LINEAR_OPS = (aten.linear.default,)
CONV_OPS = (aten.conv1d.default, aten.conv2d.default, aten.conv1d.padding, aten.conv2d.padding)
CONVOLUTION = aten.convolution.default
BN_OPS = (aten.batch_norm.default,)  # training flag at args[5]
DROPOUT_OPS = (aten.dropout.default, aten.native_dropout.default)  # train flag at args[2]
NORM_WEIGHT_OPS = (aten.batch_norm.default, aten.layer_norm.default, aten.group_norm.default)


# ---------------------------------------------------------------------------------------
# the module
# ---------------------------------------------------------------------------------------


class ProgramModel(nn.Module):
    """``ExportedProgram.module()`` as an ordinary module for training, SVT and export.

    ``train()``/``eval()`` never reach the GraphModule (torch refuses them there); instead the
    training flags of its batch-norm and dropout ops follow this module's mode at the next
    forward pass, starting from the flags the program was exported with.
    """

    def __init__(self, graph_module: fx.GraphModule, input_shape: Sequence[int], num_classes: int) -> None:
        super().__init__()
        self.program = graph_module
        self.input_shape = tuple(int(d) for d in input_shape)
        self.num_classes = int(num_classes)
        # the exported flags, by node name: what training mode runs
        self.exported_flags = {n.name: bool(_flag(n)) for n in _mode_nodes(graph_module.graph)}
        self._graph_training: bool | None = None

    @property
    def norm_mode(self) -> str:
        """How batch norm and dropout behave in training, as the program was exported."""
        has_bn = any(n.target in BN_OPS for n in self.program.graph.nodes if n.op == "call_function")
        has_dropout = any(
            n.target in DROPOUT_OPS for n in self.program.graph.nodes if n.op == "call_function"
        )
        if not (has_bn or has_dropout):
            return "none: the program has no batch norm or dropout"
        if any(self.exported_flags.values()):
            return (
                "exported in train mode: training uses batch statistics (and dropout); "
                "evaluation uses the running statistics"
            )
        return (
            "exported in eval mode: training keeps the running statistics frozen (batch norm "
            "acts as an affine layer) and dropout off"
        )

    def train(self, mode: bool = True) -> ProgramModel:
        self.training = mode  # the GraphModule's own flag is left alone (torch refuses it)
        return self

    def _sync_mode(self) -> None:
        if self._graph_training == self.training:
            return
        changed = False
        for node in _mode_nodes(self.program.graph):
            want = self.exported_flags.get(node.name, False) and self.training
            if bool(_flag(node)) != want:
                args = list(node.args)
                args[_flag_index(node)] = want
                node.args = tuple(args)
                changed = True
        if changed:
            self.program.recompile()
        self._graph_training = self.training

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._sync_mode()
        out = self.program(x)
        assert isinstance(out, torch.Tensor)
        return out

    def program_state_dict(self) -> dict[str, torch.Tensor]:
        """The GraphModule's state, keyed as in the program (no ``program.`` prefix)."""
        return dict(self.program.state_dict())


def _mode_nodes(graph: fx.Graph) -> list[fx.Node]:
    return [n for n in graph.nodes if n.op == "call_function" and n.target in (*BN_OPS, *DROPOUT_OPS)]


def _flag_index(node: fx.Node) -> int:
    return 5 if node.target in BN_OPS else 2


def _flag(node: fx.Node) -> Any:
    i = _flag_index(node)
    return node.args[i] if len(node.args) > i else False


def from_exported(exported: Any, input_shape: Sequence[int], num_classes: int) -> ProgramModel:
    """A ProgramModel of an ``ExportedProgram`` (from :mod:`core.program.load` or torch.export)."""
    return ProgramModel(exported.module(), input_shape, num_classes)


# ---------------------------------------------------------------------------------------
# which weights are eligible
# ---------------------------------------------------------------------------------------


@dataclass
class WeightUse:
    node: fx.Node
    kind: str  # "linear" | "conv" | "other"
    detail: str = ""


@dataclass
class ProgramWeight:
    """A parameter of the program with every op that reads it."""

    name: str  # the parameter's FQN, e.g. "layer1.0.conv1.weight"
    shape: tuple[int, ...]
    uses: list[WeightUse] = field(default_factory=list)

    @property
    def module(self) -> str:
        return self.name.rpartition(".")[0]

    @property
    def param(self) -> str:
        return self.name.rpartition(".")[2]


def _conv_groups(node: fx.Node) -> int:
    index = 8 if node.target is CONVOLUTION else 6
    groups: Any = node.args[index] if len(node.args) > index else node.kwargs.get("groups", 1)
    return int(groups)


def _classify_use(node: fx.Node, weight: fx.Node) -> WeightUse:
    target = node.target
    name = str(getattr(target, "__name__", target))
    weight_arg = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
    if target in LINEAR_OPS and weight_arg is weight and node.args[0] is not weight:
        return WeightUse(node, "linear")
    if (target in CONV_OPS or target is CONVOLUTION) and weight_arg is weight and node.args[0] is not weight:
        if target is CONVOLUTION and len(node.args) > 6 and node.args[6]:
            return WeightUse(node, "other", "transposed convolution")
        groups = _conv_groups(node)
        if groups != 1:
            return WeightUse(node, "other", f"grouped convolution (groups={groups})")
        return WeightUse(node, "conv")
    return WeightUse(node, "other", f"read by {name}")


def program_weights(model: ProgramModel) -> list[ProgramWeight]:
    """Every parameter of the program with at least two dimensions, and the ops that read it."""
    gm = model.program
    params = dict(gm.named_parameters(remove_duplicate=False))
    found: dict[str, ProgramWeight] = {}
    for node in gm.graph.nodes:
        if node.op != "get_attr" or node.target not in params:
            continue
        p = params[node.target]
        if p.dim() < 2:
            continue
        # tied parameters (one tensor, two names) are one weight: key by the first name
        entry = found.setdefault(node.target, ProgramWeight(node.target, tuple(p.shape)))
        entry.uses.extend(_classify_use(user, node) for user in node.users)
    by_tensor: dict[int, ProgramWeight] = {}
    for name, w in list(found.items()):
        ident = id(params[name])
        if ident in by_tensor:
            by_tensor[ident].uses.extend(w.uses)
            del found[name]
        else:
            by_tensor[ident] = w
    return list(found.values())


def _is_packed_attention(w: ProgramWeight) -> bool:
    return w.param == "in_proj_weight" and len(w.shape) == 2 and w.shape[0] == 3 * w.shape[1]


def _selected(module: str, include: Sequence[str], exclude: Sequence[str]) -> bool:
    if include and not any(fnmatch.fnmatchcase(module, p) for p in include):
        return False
    return not any(fnmatch.fnmatchcase(module, p) for p in exclude)


def program_targets(
    model: ProgramModel, include: Sequence[str] = (), exclude: Sequence[str] = ()
) -> list[WeightTarget]:
    """Every weight-like parameter, as :class:`core.lorita.WeightTarget` rows with reasons."""
    targets: list[WeightTarget] = []
    for w in program_weights(model):
        kinds = {u.kind for u in w.uses}
        others = sorted({u.detail for u in w.uses if u.kind == "other"})
        matrix_kind = "conv" if len(w.shape) > 2 else "linear"
        kind = "attention_in" if _is_packed_attention(w) and kinds == {"linear"} else matrix_kind
        reason = ""
        if not w.uses:
            reason = "not used by the graph"
        elif others:
            if kinds & {"linear", "conv"}:
                reason = f"tied: also {others[0]}, so it stays dense"
            elif others[0].startswith("grouped convolution"):
                reason = others[0]
            else:
                reason = f"not a linear or convolution weight ({others[0]})"
        elif kinds == {"linear", "conv"}:
            reason = "tied between a linear and a convolution; left dense"
        elif not _selected(w.module, include, exclude):
            reason = "excluded by the include/exclude patterns"
        else:
            m = w.shape[0] // (3 if kind == "attention_in" else 1)
            if min(m, math.prod(w.shape[1:])) < 2:
                reason = "too small (a side of the matrix is 1)"
        targets.append(WeightTarget(w.module, w.param, kind, w.shape, not reason, reason))
    return targets


def tied_uses(model: ProgramModel) -> dict[str, int]:
    """Eligible weights read by more than one op (composed and truncated once for all uses)."""
    return {
        w.name: len(w.uses)
        for w in program_weights(model)
        if len(w.uses) > 1 and all(u.kind in ("linear", "conv") for u in w.uses)
    }


# ---------------------------------------------------------------------------------------
# LoRITa
# ---------------------------------------------------------------------------------------


def apply_program_lorita(
    model: ProgramModel,
    n_factors: int,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    init: str = "weights",
    seed: int = 0,
) -> list[WeightTarget]:
    """Compose every eligible weight of the program as a product of ``n_factors`` factors.

    ``init="weights"``: an exact balanced factorization of the program's weights (the function
    is unchanged). ``init="scratch"``: call :func:`reinitialize` first; the product equals the
    fresh weights and the square factors are random orthogonal matrices (``train.init``
    'preserve'). ``init="paper"``: call :func:`reinitialize` first; the first factor is the fresh
    weight and each square a fresh default init of its own (``train.init`` 'paper', as for the
    built-in architectures).
    """
    if n_factors < 2:
        return []
    if init not in ("weights", "scratch", "paper"):
        raise ValueError(f"init must be 'weights', 'scratch' or 'paper', got {init!r}")
    targets = [t for t in program_targets(model, include, exclude) if t.eligible]
    generator = torch.Generator().manual_seed(seed)
    for t in targets:
        owner = model.program.get_submodule(t.module) if t.module else model.program
        weight = getattr(owner, t.param)
        if not torch.isfinite(weight).all():
            raise ValueError(f"{t.name} holds non-finite values; cannot factorize it")
        param = _factor_parametrization(t, n_factors)
        if not hasattr(owner, _ORDER_ATTR):
            setattr(owner, _ORDER_ATTR, list(owner._parameters))
        initial = weight.detach().clone()
        parametrize.register_parametrization(owner, t.param, param)
        if init == "scratch":
            _scratch_init(param, _originals(owner, t.param), generator)
        elif init == "paper":
            _paper_init(_originals(owner, t.param), initial, n_factors, t.kind, generator)
    return targets


def reinitialize(model: ProgramModel, seed: int = 0) -> None:
    """Fresh weights for training from scratch, chosen by how the graph uses each parameter.

    Linear and conv weights and their biases get PyTorch's default layer init (Kaiming
    uniform, a = sqrt(5)); norm weights 1 and biases 0, running statistics reset; any other
    parameter (embeddings, tokens) N(0, 0.02).
    """
    gm = model.program
    params = dict(gm.named_parameters())
    buffers = dict(gm.named_buffers())
    generator = torch.Generator().manual_seed(seed)
    done: set[str] = set()

    def attr(node: Any) -> str | None:
        if isinstance(node, fx.Node) and node.op == "get_attr" and isinstance(node.target, str):
            return node.target
        return None

    with torch.no_grad():
        for node in gm.graph.nodes:
            if node.op != "call_function":
                continue
            if node.target in LINEAR_OPS or node.target in CONV_OPS or node.target is CONVOLUTION:
                w, b = (
                    attr(node.args[1]) if len(node.args) > 1 else None,
                    attr(node.args[2]) if len(node.args) > 2 else None,
                )
                if w in params and w not in done:
                    weight = params[w]
                    fan_in = math.prod(weight.shape[1:])
                    bound = math.sqrt(1.0 / fan_in) if fan_in else 0.0  # kaiming_uniform(a=sqrt(5))
                    weight.copy_(torch.empty_like(weight).uniform_(-bound, bound, generator=generator))
                    done.add(w)
                    if b in params and b not in done:
                        params[b].copy_(
                            torch.empty_like(params[b]).uniform_(-bound, bound, generator=generator)
                        )
                        done.add(b)
            elif node.target in NORM_WEIGHT_OPS:
                idx = (1, 2) if node.target is aten.batch_norm.default else (2, 3)
                for i, value in zip(idx, (1.0, 0.0), strict=True):
                    name = attr(node.args[i]) if len(node.args) > i else None
                    if name in params and name not in done:
                        params[name].fill_(value)
                        done.add(name)
                if node.target is aten.batch_norm.default:
                    for i, value in ((3, 0.0), (4, 1.0)):
                        name = attr(node.args[i]) if len(node.args) > i else None
                        if name in buffers:
                            buffers[name].fill_(value)
        for name, p in params.items():
            if name not in done:
                p.copy_(torch.empty_like(p).normal_(0.0, 0.02, generator=generator))


# ---------------------------------------------------------------------------------------
# spectra and the SVT rewrite
# ---------------------------------------------------------------------------------------


def _use_positions(
    model: ProgramModel, weights: Sequence[ProgramWeight], input_shape: Sequence[int]
) -> dict[str, int]:
    """Per weight, the output positions per sample summed over its uses (conv: H*W; linear: tokens)."""
    wanted = {id(u.node): w for w in weights for u in w.uses if u.kind in ("linear", "conv")}
    positions: dict[str, int] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            out = super().run_node(n)
            w = wanted.get(id(n))
            if w is not None and isinstance(out, torch.Tensor):
                # the run has batch 1, so every output element but the m per position is a
                # position (reshaped attention inputs put tokens in dimension 0)
                per_sample = out.numel() // max(1, w.shape[0])
                positions[w.name] = positions.get(w.name, 0) + per_sample
            return out

    was = model.training
    model.eval()
    try:
        model._sync_mode()
        device = next(iter(model.parameters()), torch.zeros(0)).device
        with torch.no_grad():
            Recorder(model.program).run(torch.zeros(1, *input_shape, device=device))
    finally:
        model.train(was)
    return positions


def compute_program_spectra(
    model: ProgramModel, input_shape: Sequence[int] | None = None, names: Collection[str] | None = None
) -> dict[str, svt.Spectrum]:
    """SVD of every eligible weight (all uses linear, or all ungrouped conv), keyed by FQN."""
    eligible = {t.name for t in program_targets(model) if t.eligible}
    weights = [w for w in program_weights(model) if w.name in eligible and (names is None or w.name in names)]
    shape = tuple(input_shape) if input_shape is not None else model.input_shape
    positions = _use_positions(model, weights, shape)
    params = dict(model.program.named_parameters())
    spectra: dict[str, svt.Spectrum] = {}
    for w in weights:
        weight = params[w.name]
        m, n = weight.shape[0], math.prod(weight.shape[1:])
        u, s, vh = torch.linalg.svd(
            weight.detach().reshape(m, n).to("cpu", torch.float64), full_matrices=False
        )
        kind = "conv" if weight.dim() > 2 else "linear"
        spectra[w.name] = svt.Spectrum(w.name, kind, m, n, u, s, vh, positions.get(w.name, 1))
    return spectra


def _thin_ops(graph: fx.Graph, node: fx.Node, first_w: fx.Node, second_w: fx.Node) -> fx.Node:
    """Insert the two thin ops replacing ``node`` (whose weight is args[1]); return the second."""
    args: list[Any] = list(node.args)
    x = args[0]
    bias = args[2] if len(args) > 2 else node.kwargs.get("bias")
    target: Any = node.target
    with graph.inserting_before(node):
        if node.target in LINEAR_OPS:
            first = graph.call_function(aten.linear.default, (x, first_w))
            second = graph.call_function(aten.linear.default, (first, second_w, bias))
        elif node.target is CONVOLUTION:
            spatial = len(args[3])
            first_args = [x, first_w, None, *args[3:8], 1]
            first = graph.call_function(CONVOLUTION, tuple(first_args))
            ones, zeros = [1] * spatial, [0] * spatial
            second = graph.call_function(
                CONVOLUTION, (first, second_w, bias, ones, zeros, ones, False, zeros, 1)
            )
        else:
            first_args = [x, first_w, None, *args[3:]]
            first = graph.call_function(target, tuple(first_args), dict(node.kwargs))
            one_by_one = (
                aten.conv1d.default
                if node.target in (aten.conv1d.default, aten.conv1d.padding)
                else aten.conv2d.default
            )
            second = graph.call_function(one_by_one, (first, second_w, bias))
    for key in ("val", "tensor_meta"):
        node.meta.pop(key, None)
    return second


def truncate_program(
    model: ProgramModel,
    spectra: Mapping[str, svt.Spectrum],
    ranks: Mapping[str, int],
    force_factorize: bool = False,
) -> ProgramModel:
    """A copy of ``model`` in which each weight with a saving rank is read by two thin ops.

    Note: as in :func:`core.svt.truncate`, the pair stores ``U_r S_r^(1/2)`` (second op) and
    ``S_r^(1/2) V_r^T`` (first op); a weight whose pair would not save stays dense unless
    ``force_factorize``. Tied weights get one pair, shared by every use.
    """
    out = copy.deepcopy(model)
    gm = out.program
    weights = {w.name: w for w in program_weights(out)}
    for name, sp in spectra.items():
        rank = int(ranks.get(name, sp.full_rank))
        if not 1 <= rank <= sp.full_rank:
            raise ValueError(f"rank {rank} for {name} is outside 1..{sp.full_rank}")
        if not (sp.factorizes(rank) or force_factorize):
            continue
        w = weights[name]
        owner_name, _, param = name.rpartition(".")
        owner = gm.get_submodule(owner_name) if owner_name else gm
        weight = getattr(owner, param)
        root = sp.s[:rank].sqrt()
        left = (sp.u[:, :rank] * root).to(weight.device, weight.dtype)  # m x r
        right = (root[:, None] * sp.vh[:rank]).to(weight.device, weight.dtype)  # r x n
        conv = weight.dim() > 2
        first_shape = (rank, *weight.shape[1:]) if conv else (rank, weight.shape[1])
        second_shape = (
            (weight.shape[0], rank, *([1] * (weight.dim() - 2))) if conv else (weight.shape[0], rank)
        )
        first_name, second_name = f"{param}_svt_in", f"{param}_svt_out"
        owner.register_parameter(first_name, nn.Parameter(right.reshape(first_shape).contiguous()))
        owner.register_parameter(second_name, nn.Parameter(left.reshape(second_shape).contiguous()))
        prefix = f"{owner_name}." if owner_name else ""
        for use in w.uses:
            node = use.node
            with gm.graph.inserting_before(node):
                first_w = gm.graph.get_attr(prefix + first_name)
                second_w = gm.graph.get_attr(prefix + second_name)
            replacement = _thin_ops(gm.graph, node, first_w, second_w)
            node.replace_all_uses_with(replacement)
            gm.graph.erase_node(node)
        for node in list(gm.graph.nodes):
            if node.op == "get_attr" and node.target == name and not node.users:
                gm.graph.erase_node(node)
        delattr(owner, param)
    gm.graph.lint()
    gm.recompile()
    out._graph_training = None
    return out


# ---------------------------------------------------------------------------------------
# exports
# ---------------------------------------------------------------------------------------


def export_program(
    model: ProgramModel,
    out_dir: str | os.PathLike[str],
    formats: Sequence[str],
    example: torch.Tensor,
) -> dict[str, dict[str, Any]]:
    """``model.safetensors`` (the program's state) plus ``model.pt2`` / ``model.onnx`` of the
    rewritten graph with a dynamic batch, each checked for output parity like core.export."""
    from safetensors.torch import load_file, save_file

    from core.export import (
        WEIGHTS_FILE,
        _check_parity,
        _file_result,
        _reference,
        atomic_path,
        export_programs,
        max_abs_diff,
    )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cpu_model = copy.deepcopy(model).cpu().eval()
    example = example.detach().cpu().float()
    reference = _reference(cpu_model, example)
    results: dict[str, dict[str, Any]] = {}

    state = _portable(cpu_model.program)
    with atomic_path(out / WEIGHTS_FILE) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt", "lorita": "program"})
    reloaded = copy.deepcopy(cpu_model)
    loaded = load_file(str(out / WEIGHTS_FILE))
    reloaded.program.load_state_dict(_with_aliases(reloaded.program, loaded), strict=True)
    diff = max_abs_diff(_reference(reloaded, example), reference)
    _check_parity("safetensors", diff, reference)
    results["safetensors"] = _file_result(out / WEIGHTS_FILE, diff)
    results.update(export_programs(cpu_model, example, reference, out, formats))
    return results


def _portable(module: nn.Module) -> dict[str, torch.Tensor]:
    from core.export import portable_state_dict

    return portable_state_dict(module)


def _with_aliases(module: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from core.export import _fill_aliases

    return _fill_aliases(module, state)


def require_program_shape(
    model: ProgramModel, input_shape: Sequence[int], num_classes: int, display: str
) -> None:
    """The dataset must fit the program: same input shape, same number of classes."""
    if tuple(input_shape) != model.input_shape:
        raise ProgramError(
            f"{display} takes inputs of shape {list(model.input_shape)} but the dataset's are "
            f"{list(input_shape)}; export the program with an example of the dataset's shape"
        )
    if int(num_classes) != model.num_classes:
        raise ProgramError(
            f"{display} returns {model.num_classes} logits per sample but the dataset has "
            f"{num_classes} classes; export a model with {num_classes} outputs"
        )
