"""Load a validated ``.pt2`` without pickle, first in a child process, then here.

Note: why the parent may build the program itself, and what the child is for.
``torch.export.load`` is never called: it would ``torch.load(weights_only=False)`` pickled
weights and constants, ``pickle.loads`` opaque objects, fall back to full unpickling of the
example inputs, and ``exec`` the archive's ``guards_code``. Instead :func:`build_program`

1. reads each tensor from the raw bytes the validated payload configs describe
   (``torch.frombuffer`` + ``as_strided``; tensors sharing a file share storage, so tied
   weights stay tied), refusing anything pickled (the validator already has);
2. hands torch's deserializer the *sanitized* graph JSON of :mod:`core.program.archive`
   (no node metadata, no guards code) and no example inputs.

With the allow-listed ops, identifier-only node names and grammar-checked symbolic
expressions, nothing of the upload is run as code. What remains is torch's own C++/Python
deserializer and FX code generation working on odd but well-typed input, which can still
crash (an assertion, a segfault in a kernel) or hang (a huge symbolic expression). So
:func:`load_program` first builds the program in a spawned child, runs one forward pass on
zeros and reports back as a small JSON message (the parent unpickles nothing the child
sends); only when the child succeeded within the timeout does the parent build it the same
deterministic way. A crash or hang costs the child, never the caller.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.program.archive import DTYPE_NAMES, ProgramArchive, ProgramError, TensorEntry, validate_archive

DEFAULT_TIMEOUT_S = 120.0


@dataclass
class LoadedProgram:
    """A program built from a validated archive."""

    archive: ProgramArchive
    exported: Any  # torch.export.ExportedProgram

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.archive.input_shape

    @property
    def num_classes(self) -> int:
        return self.archive.num_classes


def _tensors(zf: zipfile.ZipFile, entries: dict[str, TensorEntry]) -> dict[str, Any]:
    import torch

    bases: dict[tuple[str, int], torch.Tensor] = {}
    out: dict[str, torch.Tensor] = {}
    for fqn, e in entries.items():
        dtype = getattr(torch, DTYPE_NAMES[e.dtype])
        key = (e.member, e.dtype)
        if key not in bases:
            raw = bytearray(zf.read(e.member))
            bases[key] = torch.frombuffer(raw, dtype=dtype) if raw else torch.zeros(0, dtype=dtype)
        base = bases[key]
        if base.numel() == 0:
            tensor = torch.zeros(e.sizes, dtype=dtype)
        else:
            tensor = torch.as_strided(base, e.sizes, e.strides, e.storage_offset)
        out[fqn] = torch.nn.Parameter(tensor, requires_grad=e.requires_grad) if e.is_param else tensor
    return out


def build_program(path: str | Path, archive: ProgramArchive) -> LoadedProgram:
    """An ExportedProgram from a validated archive, with no pickle and no archive code run."""
    import torch
    from torch._export.serde import schema
    from torch._export.serde.serialize import ExportedProgramDeserializer, _dict_to_dataclass

    with zipfile.ZipFile(path) as zf:
        state = _tensors(zf, archive.weights)
        constants = _tensors(zf, archive.constants)
    try:
        serialized = _dict_to_dataclass(schema.ExportedProgram, archive.program)
        exported = ExportedProgramDeserializer().deserialize(serialized, state, constants, None)
    except (ProgramError, MemoryError):
        raise
    except Exception as err:
        raise ProgramError(
            f"{archive.display_name}: torch could not rebuild the program ({type(err).__name__}); "
            "export it again with torch 2.14"
        ) from None
    if not isinstance(exported, torch.export.ExportedProgram):
        raise ProgramError(f"{archive.display_name}: the archive does not hold an exported program")
    return LoadedProgram(archive, exported)


def smoke_test(loaded: LoadedProgram) -> None:
    """``ep.module()`` and one forward pass on zeros (batch 2) give finite logits of the right shape."""
    import torch

    module = loaded.exported.module()
    x = torch.zeros(2, *loaded.input_shape)
    with torch.no_grad():
        y = module(x)
    if not isinstance(y, torch.Tensor) or tuple(y.shape) != (2, loaded.num_classes):
        raise ProgramError(
            f"{loaded.archive.display_name}: a forward pass returned "
            f"{tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__}, expected (2, {loaded.num_classes})"
        )


def _child(path: str, display: str, conn: Any) -> None:
    """Child process: validate, build, run once; send a JSON status (never a pickle)."""
    try:
        import torch

        torch.set_num_threads(1)
        archive = validate_archive(path, display)
        loaded = build_program(path, archive)
        smoke_test(loaded)
        message: dict[str, Any] = {"ok": True}
    except ProgramError as err:
        message = {"ok": False, "error": str(err)}
    except BaseException as err:  # anything else is reported as a failed load, by type only
        message = {"ok": False, "error": f"{display}: the program could not be loaded ({type(err).__name__})"}
    conn.send_bytes(json.dumps(message).encode())
    conn.close()


def check_in_child(
    path: str | Path,
    display: str,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    *,
    target: Callable[[str, str, Any], None] | None = None,
) -> None:
    """Build and run the program in a spawned child; ProgramError if it fails, crashes or hangs.

    ``target`` replaces the child's work (tests use it to simulate a crash or a hang).
    """
    ctx = mp.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=target or _child, args=(os.fspath(path), display, send), daemon=True)
    proc.start()
    send.close()
    try:
        if not receive.poll(timeout_s):
            raise ProgramError(
                f"{display}: loading the program did not finish within {timeout_s:.0f} s; refused"
            )
        try:
            raw = receive.recv_bytes(1 << 20)
        except (EOFError, OSError):
            raise ProgramError(
                f"{display}: loading the program crashed the loader process; refused"
            ) from None
        try:
            message = json.loads(raw.decode())
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ProgramError(f"{display}: the loader process answered garbage; refused") from None
        if not message.get("ok"):
            raise ProgramError(str(message.get("error") or f"{display}: the program could not be loaded"))
    finally:
        receive.close()
        proc.join(timeout=1)  # a child that answered exits at once; a hung one is killed
        if proc.is_alive():
            proc.kill()
            proc.join(timeout=5)


def load_program(
    path: str | Path,
    display_name: str | None = None,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    isolate: bool = True,
) -> LoadedProgram:
    """Validate ``path``, prove it loads in a child process, then build it here.

    ``isolate=False`` skips the child (for archives this process wrote itself).
    """
    display = display_name or Path(path).name
    archive = validate_archive(path, display)
    if isolate:
        check_in_child(path, display, timeout_s)
    return build_program(path, archive)
