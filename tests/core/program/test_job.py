"""The program side of the job's stages: fitting the dataset, composing, truncating, exporting."""

from __future__ import annotations

import json
from pathlib import Path
from typing import cast

import pytest
import torch
from torch import nn

from core.lorita import collapse
from core.program.archive import ProgramError
from core.program.graph import ProgramModel
from core.program.job import (
    PROGRAM_META_FILE,
    compose,
    export_program_job,
    load_program_model,
    program_info,
    spectra_of,
    targets_of,
    truncate,
)


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


@pytest.fixture(scope="module")
def program(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("job") / "small.pt2"
    ep = torch.export.export(
        Small().eval(), (torch.randn(2, 64),), dynamic_shapes={"x": {0: torch.export.Dim("batch")}}
    )
    torch.export.save(ep, str(path))
    return path


def test_the_program_must_fit_the_dataset(program: Path) -> None:
    with pytest.raises(ProgramError) as err:
        load_program_model(program, "small.pt2", (1, 8, 8), 10, isolate=False)
    assert "[64]" in str(err.value) and "[1, 8, 8]" in str(err.value)
    with pytest.raises(ProgramError, match="fewer than the dataset's 12 classes"):
        load_program_model(program, "small.pt2", (64,), 12, isolate=False)
    with pytest.raises(ProgramError, match=r"model\.num_classes is 11"):
        load_program_model(program, "small.pt2", (64,), 10, expected_classes=11, isolate=False)
    model = load_program_model(program, "small.pt2", (64,), 10, isolate=False)
    assert program_info(model, "small.pt2")["num_classes"] == 10


def test_stage_helpers_dispatch_on_programs(program: Path, tmp_path: Path) -> None:
    model = load_program_model(program, "small.pt2", (64,), 10, isolate=False)
    assert isinstance(model, ProgramModel)
    assert [t.name for t in targets_of(model) if t.eligible] == ["fc1.weight", "fc2.weight"]
    x = torch.rand(3, 64)
    with torch.no_grad():
        before = model.eval()(x)
    composed = compose(model, 2, (), ("fc2",), init="preserve", seed=0)
    assert [t.name for t in composed] == ["fc1.weight"]
    collapse(model)
    spectra = spectra_of(model, (64,))
    small = truncate(model, spectra, {"fc1.weight": 4, "fc2.weight": 10})
    assert isinstance(small, ProgramModel)
    with torch.no_grad():
        assert float((model(x) - before).abs().max()) < 1e-5
        assert small(x).shape == (3, 10)
    table = {"fc1.weight": {"kept_rank": 4, "factorized": True}}
    files = export_program_job(small, model, table, tmp_path, ["pt2"], x[:2], "dense")
    assert set(files) == {"safetensors", "pt2"}
    assert (tmp_path / "dense" / "model.pt2").is_file()
    meta = json.loads((tmp_path / PROGRAM_META_FILE).read_text())
    assert meta["kind"] == "program" and meta["ranks"]["fc1.weight"]["kept_rank"] == 4


def test_from_scratch_reinitializes_the_program(program: Path) -> None:
    model = load_program_model(program, "small.pt2", (64,), 10, isolate=False)
    before = model.program.get_parameter("fc1.weight").detach().clone()
    compose(model, 2, (), (), init="preserve", seed=0, from_scratch=True)
    collapse(model)
    assert not torch.allclose(model.program.get_parameter("fc1.weight"), before)


def test_from_scratch_follows_train_init_paper_as_the_built_in_architectures_do(program: Path) -> None:
    from core.lorita import _originals
    from core.program.graph import reinitialize

    fresh = load_program_model(program, "small.pt2", (64,), 10, isolate=False)
    reinitialize(fresh, seed=4)
    fresh_weight = fresh.program.get_parameter("fc1.weight").detach().clone()  # (32, 64)

    model = load_program_model(program, "small.pt2", (64,), 10, isolate=False)
    compose(model, 3, (), (), init="paper", seed=4, from_scratch=True)
    owner = model.program.get_submodule("fc1")
    full, *squares = (p.detach() for p in _originals(owner, "weight"))
    torch.testing.assert_close(full, fresh_weight)  # the first factor is the layer's own fresh init
    assert [tuple(s.shape) for s in squares] == [(32, 32)] * 2 and not torch.allclose(squares[0], squares[1])
    for sq in squares:  # each square as a fresh 32 -> 32 Linear: U(-1/sqrt(32), 1/sqrt(32))
        assert float(sq.abs().max()) <= 32**-0.5 + 1e-7
        assert abs(float(sq.var()) - 1 / (3 * 32)) < 0.15 / (3 * 32)
    product = cast(torch.Tensor, owner.weight).detach()
    torch.testing.assert_close(product, squares[1] @ squares[0] @ full, atol=1e-6, rtol=1e-5)
    assert float(product.norm()) < 0.5 * float(fresh_weight.norm())  # starts small, as in the paper

    preserved = load_program_model(program, "small.pt2", (64,), 10, isolate=False)
    compose(preserved, 3, (), (), init="preserve", seed=4, from_scratch=True)
    torch.testing.assert_close(
        cast(torch.Tensor, preserved.program.get_submodule("fc1").weight).detach(),
        fresh_weight,
        atol=1e-5,
        rtol=1e-4,
    )
