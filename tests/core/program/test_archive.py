"""The .pt2 validator and loader against a corpus of hostile archives.

Each hostile archive is a real ``torch.export.save`` file with one thing changed. Every one
is refused by the validator and by the loader, and its payload (which creates a marker file
when unpickled or evaluated) never runs: the marker never appears.
"""

from __future__ import annotations

import contextlib
import io
import json
import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from core.program.archive import ProgramError, validate_archive
from core.program.load import check_in_child, load_program


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def _export(model: nn.Module, example: torch.Tensor, path: Path, dynamic: bool = True) -> Path:
    shapes = {"x": {0: torch.export.Dim("batch")}} if dynamic else None
    torch.export.save(torch.export.export(model.eval(), (example,), dynamic_shapes=shapes), str(path))
    return path


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    return _export(Net(), torch.randn(4, 6), tmp_path_factory.mktemp("pt2") / "net.pt2")


class Payload:
    """Unpickling this creates ``marker`` (an empty file): proof that the pickle ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def _rewrite(src: Path, dest: Path, change: Callable[[dict[str, bytes], str], None]) -> Path:
    """Copy the archive with ``change(members, root)`` applied to its members (name -> bytes)."""
    with zipfile.ZipFile(src) as zf:
        members = {i.filename: zf.read(i) for i in zf.infolist()}
    root = next(iter(members)).split("/")[0]
    change(members, root)
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_STORED) as out:
        for name, data in members.items():
            out.writestr(name, data)
    return dest


def _json_member(members: dict[str, bytes], name: str) -> dict:
    return json.loads(members[name])


def _use_pickle_weight(marker: Path) -> Callable[[dict[str, bytes], str], None]:
    def change(members: dict[str, bytes], root: str) -> None:
        cfg_name = f"{root}/data/weights/model_weights_config.json"
        cfg = _json_member(members, cfg_name)
        first = next(iter(cfg["config"].values()))
        first["use_pickle"] = True
        members[f"{root}/data/weights/{first['path_name']}"] = pickle.dumps(Payload(marker))
        members[cfg_name] = json.dumps(cfg).encode()

    return change


def _opaque_constant(marker: Path) -> Callable[[dict[str, bytes], str], None]:
    def change(members: dict[str, bytes], root: str) -> None:
        name = f"{root}/data/constants/model_constants_config.json"
        members[f"{root}/data/constants/opaque_obj_0"] = pickle.dumps(Payload(marker))
        cfg = {
            "config": {
                "obj": {
                    "path_name": "opaque_obj_0",
                    "is_param": False,
                    "use_pickle": True,
                    "tensor_meta": None,
                }
            }
        }
        members[name] = json.dumps(cfg).encode()

    return change


def _example_inputs(marker: Path) -> Callable[[dict[str, bytes], str], None]:
    def change(members: dict[str, bytes], root: str) -> None:
        buf = io.BytesIO()
        torch.save(((torch.zeros(2, 6), Payload(marker)), {}), buf)
        members[f"{root}/data/sample_inputs/model.pt"] = buf.getvalue()

    return change


def _graph_edit(edit: Callable[[dict], None]) -> Callable[[dict[str, bytes], str], None]:
    def change(members: dict[str, bytes], root: str) -> None:
        name = f"{root}/models/model.json"
        program = _json_member(members, name)
        edit(program)
        members[name] = json.dumps(program).encode()

    return change


def _sympy_payload(marker: Path) -> Callable[[dict], None]:
    def edit(program: dict) -> None:
        sizes = program["graph_module"]["graph"]["tensor_values"]["x"]["sizes"]
        sizes[0]["as_expr"]["expr_str"] = f"__import__('pathlib').Path('{marker}').touch()"

    return edit


def _guard_payload(marker: Path) -> Callable[[dict], None]:
    def edit(program: dict) -> None:
        program["guards_code"] = [f"__import__('pathlib').Path('{marker}').touch()"]

    return edit


def _node_name_payload(marker: Path) -> Callable[[dict], None]:
    def edit(program: dict) -> None:
        node = program["graph_module"]["graph"]["nodes"][0]
        node["name"] = f"y = __import__('pathlib').Path('{marker}').touch(); z"

    return edit


def _custom_op(program: dict) -> None:
    program["graph_module"]["graph"]["nodes"][0]["target"] = "torch.ops.evil.run.default"


def _traversal(members: dict[str, bytes], root: str) -> None:
    members["../../outside"] = b"x"


def _absolute(members: dict[str, bytes], root: str) -> None:
    members["/tmp/absolute"] = b"x"


def _aoti(members: dict[str, bytes], root: str) -> None:
    members[f"{root}/data/aotinductor/model/model.so"] = b"\x7fELF"


HOSTILE: dict[str, tuple[Callable[[Path], Callable[[dict[str, bytes], str], None]], str]] = {
    "use_pickle weight with a __reduce__ payload": (_use_pickle_weight, "use_pickle"),
    "pickled opaque constant": (_opaque_constant, "opaque"),
    "example inputs carrying a payload": (_example_inputs, "example inputs"),
    "sympy expression payload": (lambda m: _graph_edit(_sympy_payload(m)), "symbolic shape expression"),
    "guards_code payload": (lambda m: _graph_edit(_guard_payload(m)), "guards"),
    "node name payload": (lambda m: _graph_edit(_node_name_payload(m)), "not an identifier"),
    "custom op": (lambda m: _graph_edit(_custom_op), "outside the allowed core ATen set"),
    "traversal name": (lambda m: _traversal, "'..'"),
    "absolute name": (lambda m: _absolute, "absolute"),
    "compiled code": (lambda m: _aoti, "compiled code"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_archive_is_refused_and_its_payload_never_runs(good: Path, tmp_path: Path, case: str) -> None:
    marker = tmp_path / "PAYLOAD_RAN"
    make, expected = HOSTILE[case]
    hostile = _rewrite(good, tmp_path / "model.pt2", make(marker))
    with pytest.raises(ProgramError) as err:
        validate_archive(hostile, "my-model.pt2")
    message = str(err.value)
    assert message.startswith("my-model.pt2: ")
    assert expected in message
    assert str(tmp_path) not in message  # never a server path
    with pytest.raises(ProgramError):
        load_program(hostile, "my-model.pt2", isolate=False)
    assert not marker.exists()


def test_the_corpus_is_live(good: Path, tmp_path: Path) -> None:
    """Control: torch.export.load itself runs the use_pickle payload; our loader refuses it."""
    marker = tmp_path / "PAYLOAD_RAN"
    hostile = _rewrite(good, tmp_path / "model.pt2", _use_pickle_weight(marker))
    with pytest.raises(ProgramError):
        load_program(hostile, isolate=False)
    assert not marker.exists()
    with contextlib.suppress(Exception):  # the payload runs before deserialization fails
        torch.export.load(str(hostile))
    assert marker.exists()


def test_zip_bomb_is_refused(good: Path, tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.pt2"
    with zipfile.ZipFile(good) as zf, zipfile.ZipFile(bomb, "w") as out:
        root = zf.namelist()[0].split("/")[0]
        for info in zf.infolist():
            out.writestr(info.filename, zf.read(info))
        out.writestr(f"{root}/extra/zeros", b"\0" * (32 * 1024 * 1024), compress_type=zipfile.ZIP_DEFLATED)
    with pytest.raises(ProgramError, match="zip bomb"):
        validate_archive(bomb, "bomb.pt2")


def test_truncated_archive_is_refused(good: Path, tmp_path: Path) -> None:
    data = good.read_bytes()
    for cut in (len(data) // 2, len(data) - 10):
        truncated = tmp_path / "cut.pt2"
        truncated.write_bytes(data[:cut])
        with pytest.raises(ProgramError, match=r"truncated|corrupt"):
            validate_archive(truncated, "cut.pt2")


def test_corrupt_tensor_bytes_are_refused(good: Path, tmp_path: Path) -> None:
    """A flipped byte in a stored weight fails the zip CRC check."""
    with zipfile.ZipFile(good) as zf:
        info = next(i for i in zf.infolist() if i.filename.endswith("data/weights/weight_0"))
    data = bytearray(good.read_bytes())
    start = info.header_offset  # local header: name and extra lengths at bytes 26..29
    name_len = int.from_bytes(data[start + 26 : start + 28], "little")
    extra_len = int.from_bytes(data[start + 28 : start + 30], "little")
    offset = start + 30 + name_len + extra_len
    data[offset] ^= 0xFF
    corrupt = tmp_path / "corrupt.pt2"
    corrupt.write_bytes(bytes(data))
    with pytest.raises(ProgramError, match="corrupt"):
        validate_archive(corrupt, "corrupt.pt2")


def test_static_batch_is_refused_with_how_to_re_export(tmp_path: Path) -> None:
    static = _export(Net(), torch.randn(4, 6), tmp_path / "static.pt2", dynamic=False)
    with pytest.raises(ProgramError) as err:
        validate_archive(static, "static.pt2")
    message = str(err.value)
    assert "static" in message
    assert 'dynamic_shapes={"x": {0: torch.export.Dim("batch")}}' in message


def test_custom_op_program_is_refused(tmp_path: Path) -> None:
    @torch.library.custom_op("lorita_test::twice", mutates_args=())
    def twice(x: torch.Tensor) -> torch.Tensor:
        return x * 2

    @twice.register_fake
    def _(x: torch.Tensor) -> torch.Tensor:
        return torch.empty_like(x)

    class Custom(Net):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc2(twice(self.fc1(x)))

    path = _export(Custom(), torch.randn(4, 6), tmp_path / "custom.pt2")
    with pytest.raises(ProgramError, match=r"lorita_test\.twice"):
        validate_archive(path, "custom.pt2")


def test_valid_archive_describes_the_program(good: Path) -> None:
    archive = validate_archive(good, "net.pt2")
    assert archive.input_shape == (6,)
    assert archive.num_classes == 3
    assert set(archive.weights) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
    assert archive.ops["torch.ops.aten.linear.default"] == 2
    assert all(node["metadata"] == {} for node in archive.program["graph_module"]["graph"]["nodes"])


def test_loaded_program_matches_the_model(tmp_path: Path) -> None:
    torch.manual_seed(1)
    net = Net().eval()
    path = _export(net, torch.randn(4, 6), tmp_path / "net.pt2")
    loaded = load_program(path, "net.pt2", timeout_s=300)  # once through a real child process
    x = torch.randn(5, 6)
    with torch.no_grad():
        assert torch.equal(loaded.exported.module()(x), net(x))


@pytest.mark.parametrize(("target", "expected"), [("crash", "crashed"), ("hang", "did not finish")])
def test_a_crash_or_hang_in_the_child_fails_with_a_message(good: Path, target: str, expected: str) -> None:
    from tests.core.program import children

    with pytest.raises(ProgramError, match=expected) as err:
        check_in_child(good, "net.pt2", timeout_s=3, target=getattr(children, target))
    assert str(err.value).startswith("net.pt2: ")


def _mutations(node: object, path: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    """Paths to every value in a JSON tree."""
    out: list[tuple[object, ...]] = [path]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _mutations(v, (*path, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _mutations(v, (*path, i))
    return out


def test_malformed_program_json_is_a_program_error(good: Path, tmp_path: Path) -> None:
    """Any value of models/model.json swapped for a value of another type: a ProgramError, never
    another exception (which the API would turn into a 500)."""
    import random

    with zipfile.ZipFile(good) as zf:
        name = next(n for n in zf.namelist() if n.endswith("models/model.json"))
        program = json.loads(zf.read(name))
    paths = _mutations(program)[1:]
    rng = random.Random(0)
    for i in range(60):
        where = rng.choice(paths)
        replacement = rng.choice([None, 7, "x", [], {}, {"a": 1}, [1, 2], -1.5, True])

        def edit(p: dict, where: tuple[object, ...] = where, value: object = replacement) -> None:
            node: object = p
            for key in where[:-1]:
                node = node[key]  # type: ignore[index]
            node[where[-1]] = value  # type: ignore[index]

        mutated = _rewrite(good, tmp_path / f"m{i}.pt2", _graph_edit(edit))
        with contextlib.suppress(ProgramError):  # accepted, or refused as a ProgramError
            validate_archive(mutated, "m.pt2")
