"""LoRITa and SVT on exported programs: a table of programs, each checked end to end.

For each program (exported here, loaded through the pickle-free loader): LoRITa training
lowers the loss; collapse gives back the function exactly; a full-rank rewrite computes the
same outputs; a truncated rewrite has the hand-counted parameters and FLOPs; the .pt2 and
ONNX re-exports reload (the .pt2 through our own validator) and match.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from core import svt
from core.lorita import collapse, is_composed
from core.metrics import count_flops, count_params
from core.program.graph import (
    ProgramModel,
    apply_program_lorita,
    compute_program_spectra,
    export_program,
    from_exported,
    program_targets,
    reinitialize,
    tied_uses,
    truncate_program,
)
from core.program.job import program_layer_rows
from core.program.load import load_program


class ResidualCNN(nn.Module):
    """Residual connections, a depthwise conv (left dense), a strided conv, a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pw = nn.Conv2d(8, 8, 1)
        self.down = nn.Conv2d(8, 16, 3, stride=2, padding=1, dilation=1)
        self.head = nn.Linear(16 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn(self.stem(x)))
        y = y + torch.relu(self.pw(self.dw(y)))
        y = torch.relu(self.down(y))
        return self.head(y.flatten(1))


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 16)
        self.layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer(self.embed(x)).mean(1))


class TiedMLP(nn.Module):
    """``hidden`` is applied twice (tied: one weight, two linear ops); ``proj`` is also read
    by a matmul, so it must stay dense."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(12, 16)
        self.hidden = nn.Linear(16, 16)
        self.proj = nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.inp(x))
        y = torch.relu(self.hidden(y))
        y = torch.relu(self.hidden(y))
        y = torch.relu(self.proj(y)) + y @ self.proj.weight
        return self.head(y)


class BNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.drop = nn.Dropout(0.2)
        self.fc = nn.Linear(6 * 6 * 6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(torch.relu(self.bn(self.conv(x)))).flatten(1))


@dataclass(frozen=True)
class Case:
    make: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    classes: int
    train_mode: bool = False


CASES = {
    "residual_cnn": Case(ResidualCNN, (3, 8, 8), 5),
    "resnet18": Case(lambda: torchvision.models.resnet18(num_classes=4), (3, 16, 16), 4),
    "transformer_encoder": Case(Encoder, (6, 8), 4),
    "tied_mlp": Case(TiedMLP, (12,), 3),
    "batchnorm_train": Case(BNNet, (1, 6, 6), 3, train_mode=True),
    "batchnorm_eval": Case(BNNet, (1, 6, 6), 3),
}


@dataclass
class Exported:
    case: Case
    path: Path
    reference: nn.Module  # the eval-mode original

    def load(self) -> ProgramModel:
        loaded = load_program(self.path, self.path.name, isolate=False)
        return from_exported(loaded.exported, loaded.input_shape, loaded.num_classes)

    def x(self, batch: int = 4, seed: int = 0) -> torch.Tensor:
        return torch.randn(batch, *self.case.input_shape, generator=torch.Generator().manual_seed(seed))


# resnet18 (11M parameters) takes most of this file's time on a small CPU
PARAMS = [pytest.param(k, marks=pytest.mark.slow) if k == "resnet18" else k for k in CASES]


@pytest.fixture(scope="module", params=PARAMS)
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Exported:
    case = CASES[request.param]
    torch.manual_seed(0)
    model = case.make()
    with torch.no_grad():  # non-trivial running statistics
        for mod in model.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.get_buffer("running_mean").uniform_(-0.5, 0.5)
                mod.get_buffer("running_var").uniform_(0.5, 1.5)
    model.train(case.train_mode)
    example = torch.randn(4, *case.input_shape)
    program = torch.export.export(model, (example,), dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    path = tmp_path_factory.mktemp(request.param) / f"{request.param}.pt2"
    torch.export.save(program, str(path))
    return Exported(case, path, model.eval())


def _outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x)


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-5) -> bool:
    return float((a - b).abs().max()) <= rtol * max(1.0, float(b.abs().max()))


def test_loaded_program_computes_the_model(exported: Exported) -> None:
    model = exported.load()
    x = exported.x()
    assert _close(_outputs(model, x), _outputs(exported.reference, x), 1e-5)


def test_lorita_training_lowers_the_loss_and_collapse_is_exact(exported: Exported) -> None:
    model = exported.load()
    x = exported.x(8, seed=1)
    y = torch.arange(8) % exported.case.classes
    before = _outputs(model, x)
    dense_keys = list(model.program.state_dict())
    composed = apply_program_lorita(model, 3)
    assert composed and is_composed(model)
    assert _close(_outputs(model, x), before, 1e-4)  # exact balanced factorization
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    trained = _outputs(model, x)
    collapse(model)
    assert not is_composed(model)
    assert _close(_outputs(model, x), trained, 1e-5)  # the same function, in the original structure
    assert list(model.program.state_dict()) == dense_keys


def test_full_rank_rewrite_is_exact(exported: Exported) -> None:
    model = exported.load()
    spectra = compute_program_spectra(model)
    assert spectra
    full = truncate_program(model, spectra, {}, force_factorize=True)
    x = exported.x()
    assert _close(_outputs(full, x), _outputs(model, x), 1e-4)


def _hand_counts(
    model: ProgramModel, spectra: dict[str, svt.Spectrum], ranks: dict[str, int]
) -> tuple[int, int]:
    params, flops = count_params(model), count_flops(model, model.input_shape)
    for name, sp in spectra.items():
        r = ranks[name]
        if sp.factorizes(r):
            params += r * (sp.m + sp.n) - sp.m * sp.n
            flops += 2 * sp.positions * (r * (sp.m + sp.n) - sp.m * sp.n)
    return params, flops


def test_truncated_rewrite_has_the_hand_counted_size(exported: Exported, tmp_path: Path) -> None:
    model = exported.load()
    spectra = compute_program_spectra(model)
    ranks = {k: max(1, sp.full_rank // 4) for k, sp in spectra.items()}
    small = truncate_program(model, spectra, ranks)
    params, flops = _hand_counts(model, spectra, ranks)
    assert count_params(small) == params < count_params(model)
    assert count_flops(small, model.input_shape) == flops < count_flops(model, model.input_shape)

    x = exported.x(3)
    files = export_program(small, tmp_path, ["pt2", "onnx"], exported.x(2))
    assert files["pt2"]["dynamic_batch"] and files["onnx"]["dynamic_batch"]
    again = load_program(tmp_path / "model.pt2", "model.pt2", isolate=False)  # our own validator
    reloaded = from_exported(again.exported, again.input_shape, again.num_classes)
    assert _close(_outputs(reloaded, x), _outputs(small, x), 1e-4)
    from core.export import onnx_predict

    got = torch.from_numpy(onnx_predict(tmp_path / "model.onnx", x.numpy()))
    assert _close(got, _outputs(small, x), 1e-3)


def test_batch_norm_runs_as_exported() -> None:
    """Train-mode export: batch statistics in training, running ones in eval. Eval-mode
    export: frozen statistics in training too."""
    torch.manual_seed(0)
    net = BNNet()
    x = torch.randn(8, 1, 6, 6)
    for train_mode in (True, False):
        net.train(train_mode)
        program = torch.export.export(net, (x,), dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
        model = from_exported(program, (1, 6, 6), 3)
        assert ("train mode" if train_mode else "eval mode") in model.norm_mode
        mean_before = model.program.get_buffer("bn.running_mean").clone()
        model.train()
        torch.manual_seed(1)
        model(x)
        moved = not torch.equal(model.program.get_buffer("bn.running_mean"), mean_before)
        assert moved == train_mode
        net.eval()
        assert _close(_outputs(model, x), _outputs(BNNet().eval().requires_grad_(False), x), 1e9)
        # evaluation always uses the running statistics (and no dropout): deterministic
        assert torch.equal(_outputs(model, x), _outputs(model, x))


def test_targets_explain_every_weight() -> None:
    torch.manual_seed(0)
    program = torch.export.export(
        TiedMLP().eval(), (torch.randn(2, 12),), dynamic_shapes={"x": {0: torch.export.Dim("b")}}
    )
    model = from_exported(program, (12,), 3)
    rows = {t.name: t for t in program_targets(model, exclude=["head"])}
    assert rows["inp.weight"].eligible
    assert rows["hidden.weight"].eligible and tied_uses(model) == {"hidden.weight": 2}
    assert not rows["proj.weight"].eligible and "tied" in rows["proj.weight"].reason
    assert "excluded" in rows["head.weight"].reason

    spectra = compute_program_spectra(model)
    assert spectra["hidden.weight"].positions == 2  # both uses are counted
    tried = {"inp.weight": 7, "hidden.weight": 3, "head.weight": 3}
    table = program_layer_rows(model, list(rows.values()), spectra, tried, composed=["inp.weight"])
    assert table["hidden.weight"]["factorized"] and table["hidden.weight"]["uses"] == 2
    assert table["hidden.weight"]["kept_rank"] == 3 and table["hidden.weight"]["reason"] is None
    assert table["hidden.weight"]["compose_reason"] == "not composed"
    assert table["proj.weight"]["reason"].startswith("tied") and table["proj.weight"]["uses"] == 2
    assert table["proj.weight"]["compose_reason"].startswith("tied")
    assert "would not save" in table["inp.weight"]["reason"]  # 7 x (16 + 12) > 16 x 12
    assert table["head.weight"]["reason"] == "the policy kept every singular value"
    assert table["inp.weight"]["composed"] and not table["hidden.weight"]["composed"]

    ranks = {"inp.weight": 2, "hidden.weight": 3, "head.weight": 3}

    # by hand: inp 16x12 -> 2*(16+12); hidden 16x16 -> 3*32, shared by its two uses; the rest dense
    small = truncate_program(model, spectra, ranks)
    dense = count_params(model)
    assert count_params(small) == dense - 16 * 12 + 2 * 28 - 16 * 16 + 3 * 32
    # FLOPs per sample: inp 2*56, hidden twice 2*96 each, proj twice (linear + matmul) 2*256 each, head 2*48
    assert count_flops(small, (12,)) == 2 * 56 + 2 * (2 * 96) + 2 * (2 * 256) + 2 * 48
    x = torch.randn(3, 12)
    assert _close(
        _outputs(truncate_program(model, spectra, {}, force_factorize=True), x), _outputs(model, x), 1e-4
    )


def test_residual_cnn_by_hand() -> None:
    """Parameters and FLOPs of a truncated ResidualCNN, counted by hand."""
    torch.manual_seed(0)
    program = torch.export.export(
        ResidualCNN().eval(), (torch.randn(2, 3, 8, 8),), dynamic_shapes={"x": {0: torch.export.Dim("b")}}
    )
    model = from_exported(program, (3, 8, 8), 5)
    spectra = compute_program_spectra(model)
    assert set(spectra) == {"stem.weight", "pw.weight", "down.weight", "head.weight"}  # dw is grouped
    assert {k: sp.positions for k, sp in spectra.items()} == {
        "stem.weight": 64,
        "pw.weight": 64,
        "down.weight": 16,
        "head.weight": 1,
    }
    small = truncate_program(
        model, spectra, {"stem.weight": 2, "pw.weight": 8, "down.weight": 4, "head.weight": 2}
    )
    # stem 8x27 -> 2*(8+27)=70; down 16x72 -> 4*88=352; head 5x256 -> 2*261=522; pw full rank stays
    dense = count_params(model)
    assert count_params(small) == dense - 8 * 27 + 70 - 16 * 72 + 352 - 5 * 256 + 522
    flops_dense = 2 * (64 * 8 * 27 + 64 * 8 * 9 + 64 * 8 * 8 + 16 * 16 * 72 + 5 * 256)
    assert count_flops(model, (3, 8, 8)) == flops_dense
    assert count_flops(small, (3, 8, 8)) == 2 * (64 * 70 + 64 * 8 * 9 + 64 * 64 + 16 * 352 + 522)
    down = [n for n in small.program.graph.nodes if n.op == "call_function" and "conv" in str(n.target)]
    strided = [n for n in down if list(n.args[3:4]) == [[2, 2]]]
    assert (
        len(strided) == 1 and strided[0].args[1].target == "down.weight_svt_in"
    )  # first op keeps the stride


def test_training_from_scratch_reinitializes() -> None:
    torch.manual_seed(0)
    net = ResidualCNN().eval()
    program = torch.export.export(
        net, (torch.randn(2, 3, 8, 8),), dynamic_shapes={"x": {0: torch.export.Dim("b")}}
    )
    model = from_exported(program, (3, 8, 8), 5)
    exported_stem = model.program.get_parameter("stem.weight").detach().clone()
    reinitialize(model, seed=3)
    assert not torch.equal(model.program.get_parameter("stem.weight"), exported_stem)
    assert torch.equal(model.program.get_parameter("bn.weight"), torch.ones(8))
    fan_in = 8 * 9
    assert (
        float(model.program.get_parameter("down.weight").detach().abs().max()) <= math.sqrt(1 / fan_in) + 1e-7
    )
    x = torch.randn(2, 3, 8, 8)
    before = _outputs(model, x)
    apply_program_lorita(model, 2, init="scratch", seed=1)
    assert _close(_outputs(model, x), before, 1e-4)  # the product is the fresh init
