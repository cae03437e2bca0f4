"""Validate a ``torch.export.save`` archive (``.pt2``) as data, before anything loads it.

Pure Python (``zipfile`` + ``json`` + ``pickletools``): no torch import, so the API can run it
on every upload cheaply. :func:`validate_archive` refuses, with a :class:`ProgramError` naming
the user's file:

- an unsafe zip: absolute or ``..`` names, backslashes, duplicates, too many members, members
  or a total past the size caps, a compression ratio of a zip bomb, a truncated or corrupt file;
- anything torch would unpickle: ``use_pickle`` weights or constants, pickled custom/opaque
  objects (``custom_obj_*``, ``opaque_obj_*``), legacy pickled state files, compiled code
  (AOTInductor, ExecuTorch, MTIA), and bundled example inputs whose pickle names anything but
  plain tensors (``torch.export.load`` falls back to full unpickling for those);
- a graph that is not plain data: custom or opaque objects, subgraphs (control flow), any op
  outside :data:`ALLOWED_OPS`, node names that are not identifiers, symbolic expressions
  outside a small grammar (torch parses them with ``sympy.sympify``, which evaluates);
- a program that is not a classifier of one tensor: it must take one tensor whose batch
  dimension (and only that one) is dynamic, and return one ``(batch, classes)`` tensor.

Note: why the checks are enough. Our loader (:mod:`core.program.load`) never calls
``torch.export.load``; it builds the state from the raw little-endian tensor bytes described
by the (validated) payload configs, drops node metadata and ``guards_code`` (torch turns the
latter into Python source and ``exec``s it) and skips the example inputs. What is left for
torch's deserializer is the graph JSON, whose only code-like parts are the op names (allow-
listed here), node names (identifiers, which FX writes into generated source) and symbolic
expressions (a grammar without attribute access, subscripts or string escapes).
"""

from __future__ import annotations

import io
import json
import keyword
import pickletools
import re
import zipfile
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

# ---------------------------------------------------------------------------------------
# limits and format constants (torch 2.14's pt2 archive, schema 8)
# ---------------------------------------------------------------------------------------

MAX_MEMBERS = 20_000
MAX_MEMBER_BYTES = 4 * 1024**3
MAX_TOTAL_BYTES = 8 * 1024**3
MAX_JSON_BYTES = 256 * 1024**2
MAX_RATIO = 100  # uncompressed / compressed, for members that are compressed at all
RATIO_FLOOR_BYTES = 1024 * 1024  # small members may compress well legitimately
SCHEMA_MAJOR = 8
ARCHIVE_FORMAT = "pt2"
ARCHIVE_VERSION = "0"
MODEL_NAME = "model"

RE_EXPORT_HINT = (
    "export with a dynamic batch dimension: "
    'torch.export.export(model, (x,), dynamic_shapes={"x": {0: torch.export.Dim("batch")}}) '
    "(name the key after your forward's argument), then torch.export.save(program, "
    '"model.pt2")'
)

# schema.ScalarType -> bytes per element (the dtypes a classifier's state may hold)
DTYPE_BYTES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 2, 7: 4, 8: 8, 12: 1, 13: 2}
DTYPE_NAMES = {
    1: "uint8",
    2: "int8",
    3: "int16",
    4: "int32",
    5: "int64",
    6: "float16",
    7: "float32",
    8: "float64",
    12: "bool",
    13: "bfloat16",
}
FLOAT_DTYPES = {6, 7, 8, 13}
LAYOUT_STRIDED = 7

# ATen ops (any overload) a classifier's graph may use: the core ATen set a vision or text
# classifier exports to, the training-IR composites torch.export keeps (linear, conv2d,
# batch_norm, layer_norm, scaled_dot_product_attention, dropout), their in-place forms, and
# the shape ops of dynamic batches. Anything else (custom ops, collectives, I/O, RNG state)
# is refused.
_ATEN = """
abs acos acosh adaptive_avg_pool1d adaptive_avg_pool2d adaptive_max_pool2d add addmm alias
amax amin any arange argmax argmin as_strided asin asinh atan atan2 atanh avg_pool1d
avg_pool2d baddbmm batch_norm bitwise_and bitwise_not bitwise_or bmm cat ceil chunk clamp
clamp_max clamp_min clone constant_pad_nd contiguous conv1d conv2d convolution copy cos cosh
cumsum detach div dropout elu embedding empty eq erf exp expand expand_as expm1 fill flatten
flip floor fmod full full_like gather ge gelu glu group_norm gt hardsigmoid hardswish
hardtanh index index_select instance_norm isinf isnan layer_norm le leaky_relu lift_fresh_copy
linear log log1p log_softmax logical_and logical_not logical_or lt masked_fill matmul max
max_pool1d max_pool2d max_pool2d_with_indices maximum mean min minimum mish mm mul
native_batch_norm native_dropout native_group_norm native_layer_norm ne neg new_empty
new_full new_ones new_zeros norm ones ones_like pad permute pixel_shuffle pow prelu reciprocal
reflection_pad2d relu relu6 remainder repeat replication_pad2d reshape round rsqrt rsub
scalar_tensor scaled_dot_product_attention select sigmoid sign silu sin sinh slice softmax
split split_with_sizes sqrt square squeeze stack std sub sum sym_constrain_range_for_size
sym_numel sym_size sym_storage_offset sym_stride t tanh tile topk transpose tril triu
unbind unflatten unsafe_split unsqueeze upsample_bilinear2d upsample_nearest2d var view
where zeros zeros_like _assert_scalar _assert_tensor_metadata _log_softmax
_native_batch_norm_legit _native_batch_norm_legit_functional
_native_batch_norm_legit_no_training _safe_softmax _softmax _to_copy _unsafe_view
_scaled_dot_product_flash_attention_for_cpu _scaled_dot_product_efficient_attention
_scaled_dot_product_flash_attention to type_as
"""
_INPLACE = "add mul div sub relu hardtanh hardswish hardsigmoid silu gelu leaky_relu elu clamp sigmoid tanh"
ALLOWED_ATEN: frozenset[str] = frozenset(_ATEN.split()) | frozenset(f"{n}_" for n in _INPLACE.split())
ALLOWED_PRIMS: frozenset[str] = frozenset({"convert_element_type", "broadcast_in_dim", "squeeze", "view_of"})
ALLOWED_PY_OPS: frozenset[str] = frozenset(
    f"_operator.{n}" for n in ("add", "sub", "mul", "floordiv", "truediv", "mod", "neg", "getitem", "pow")
)
ALLOWED_OPS = (ALLOWED_ATEN, ALLOWED_PRIMS, ALLOWED_PY_OPS)  # what the docs call the allow-list

_OP_RE = re.compile(r"^torch\.ops\.(aten|prims)\.([a-z_][a-z0-9_]*)\.([A-Za-z_][A-Za-z0-9_]*)$")
_IDENT_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_FQN_RE = re.compile(r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*$")
_GUARD_RE = re.compile(r"^[A-Za-z0-9_\[\]'\.\(\) =<>!+\-*/%]*$")
# sympy expressions as torch writes them, e.g. "Mul(Integer(2), Symbol('s77', positive=True,
# integer=True))": calls of known names on integers, floats and symbol-name strings.
_SYM_NAMES = frozenset(
    [
        "Symbol",
        "Integer",
        "Float",
        "Rational",
        "Mul",
        "Add",
        "Pow",
        "Max",
        "Min",
        "Abs",
        "Eq",
        "Ne",
        "Lt",
        "Le",
        "Gt",
        "Ge",
        "And",
        "Or",
        "Not",
        "FloorDiv",
        "ModularIndexing",
        "Where",
        "PythonMod",
        "Mod",
        "CleanDiv",
        "CeilToInt",
        "FloorToInt",
        "CeilDiv",
        "LShift",
        "RShift",
        "PowByNatural",
        "FloatPow",
        "FloatTrueDiv",
        "IntTrueDiv",
        "IsNonOverlappingAndDenseIndicator",
        "TruncToFloat",
        "TruncToInt",
        "RoundToInt",
        "RoundDecimal",
        "ToFloat",
        "Identity",
        "oo",
        "positive",
        "negative",
        "nonnegative",
        "nonpositive",
        "integer",
        "real",
        "finite",
        "zero",
        "precision",
        "True",
        "False",
    ]
)
_SYM_TOKEN_RE = re.compile(
    r"\s*(?:(?P<name>[A-Za-z_][A-Za-z0-9_]*)|(?P<str>'[A-Za-z0-9_.+\-]{0,64}')"
    r"|(?P<num>[0-9]+(?:\.[0-9]+)?(?:e[+-]?[0-9]+)?)|(?P<op>\*\*|//|[-+*/(),=<>]))"
)
MAX_EXPR_CHARS = 2000

# the globals a plain-tensor pickle (torch.save of tensors in tuples and dicts) names
_SAFE_PICKLE_GLOBALS = frozenset(
    {
        ("torch._utils", "_rebuild_tensor_v2"),
        ("torch._utils", "_rebuild_parameter"),
        ("collections", "OrderedDict"),
        ("torch", "device"),
    }
    | {
        ("torch", f"{t}Storage")
        for t in [
            "Float",
            "Double",
            "Half",
            "BFloat16",
            "Long",
            "Int",
            "Short",
            "Char",
            "Byte",
            "Bool",
            "ComplexFloat",
            "ComplexDouble",
        ]
    }
)
_STRING_OPS = frozenset(
    {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING"}
)
_FORBIDDEN_PICKLE_OPS = frozenset({"INST", "OBJ", "EXT1", "EXT2", "EXT4", "BUILD", "NEWOBJ", "NEWOBJ_EX"})


class ProgramError(ValueError):
    """A program archive that is refused or cannot be used; the message says why and what to do."""


# ---------------------------------------------------------------------------------------
# what a valid archive yields
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorEntry:
    """One stored tensor: its archive member and layout (all checked against the member)."""

    fqn: str
    member: str  # full member name in the zip
    dtype: int  # schema.ScalarType
    sizes: tuple[int, ...]
    strides: tuple[int, ...]
    storage_offset: int
    is_param: bool
    requires_grad: bool


@dataclass
class ProgramArchive:
    """The validated contents of a ``.pt2``: graph JSON (sanitized), tensors, shapes, ops."""

    display_name: str
    program: dict[str, Any]  # models/model.json, with metadata and guards_code removed
    weights: dict[str, TensorEntry]
    constants: dict[str, TensorEntry]
    input_shape: tuple[int, ...]  # without the batch dimension
    num_classes: int
    ops: dict[str, int] = field(default_factory=dict)  # op -> number of nodes
    torch_version: str = ""
    sample_inputs: str | None = None  # member name; never read by the loader

    def program_bytes(self) -> bytes:
        return json.dumps(self.program).encode()

    @property
    def parameter_count(self) -> int:
        """Elements of the stored parameters (each stored tensor counted once)."""
        seen: set[tuple[str, int, tuple[int, ...]]] = set()
        total = 0
        for e in self.weights.values():
            key = (e.member, e.storage_offset, e.sizes)
            if e.is_param and key not in seen:
                seen.add(key)
                n = 1
                for d in e.sizes:
                    n *= d
                total += n
        return total


# ---------------------------------------------------------------------------------------
# the zip layer
# ---------------------------------------------------------------------------------------


def _fail(name: str, message: str) -> ProgramError:
    return ProgramError(f"{name}: {message}")


def _check_name(display: str, member: str) -> None:
    if not member or "\x00" in member or "\\" in member:
        raise _fail(display, f"archive entry {member!r} has an invalid name")
    if member.startswith("/") or (len(member) > 1 and member[1] == ":"):
        raise _fail(display, f"archive entry {member!r} is an absolute path; entries must be relative")
    if ".." in PurePosixPath(member).parts:
        raise _fail(display, f"archive entry {member!r} contains '..'; entries must stay inside the archive")


def _open_zip(path: Path, display: str) -> zipfile.ZipFile:
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        raise _fail(
            display,
            "is not a complete .pt2 archive (truncated or not a zip file); save it again with "
            "torch.export.save(program, 'model.pt2') and upload the whole file",
        ) from None
    return zf


def _check_zip(zf: zipfile.ZipFile, display: str, file_size: int) -> tuple[str, dict[str, zipfile.ZipInfo]]:
    """Names, counts, sizes and ratios; returns the archive's root folder and its members."""
    infos = zf.infolist()
    if len(infos) > MAX_MEMBERS:
        raise _fail(display, f"the archive holds {len(infos)} entries, more than the limit of {MAX_MEMBERS}")
    if not infos:
        raise _fail(display, "the archive is empty")
    seen: dict[str, zipfile.ZipInfo] = {}
    total = 0
    for info in infos:
        _check_name(display, info.filename)
        if info.filename in seen:
            raise _fail(display, f"archive entry {info.filename!r} appears twice")
        seen[info.filename] = info
        if info.is_dir():
            continue
        if info.flag_bits & 0x1:
            raise _fail(display, f"archive entry {info.filename!r} is encrypted")
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise _fail(display, f"archive entry {info.filename!r} uses an unsupported compression")
        if info.file_size > MAX_MEMBER_BYTES:
            raise _fail(
                display,
                f"archive entry {info.filename!r} is {info.file_size} bytes, over the {MAX_MEMBER_BYTES} limit",
            )
        total += info.file_size
        if total > MAX_TOTAL_BYTES:
            raise _fail(display, f"the archive unpacks to more than {MAX_TOTAL_BYTES} bytes, the limit")
        compressed = info.compress_type != zipfile.ZIP_STORED and info.file_size > RATIO_FLOOR_BYTES
        if compressed and info.file_size > MAX_RATIO * max(1, info.compress_size):
            raise _fail(
                display,
                f"archive entry {info.filename!r} expands {info.file_size // max(1, info.compress_size)}x "
                f"(more than {MAX_RATIO}x): refused as a zip bomb",
            )
        if info.header_offset + info.compress_size > file_size:
            raise _fail(display, "the archive is truncated: an entry runs past the end of the file")
    roots = {PurePosixPath(n).parts[0] for n in seen}
    if len(roots) != 1:
        raise _fail(display, "a .pt2 archive keeps every entry under one top folder; this one does not")
    return roots.pop(), seen


def _read(zf: zipfile.ZipFile, info: zipfile.ZipInfo, display: str, limit: int) -> bytes:
    """Read a member whole (CRC checked by zipfile), refusing more than ``limit`` bytes."""
    if info.file_size > limit:
        raise _fail(display, f"archive entry {info.filename!r} is larger than {limit} bytes, the limit")
    try:
        with zf.open(info) as f:
            data = f.read(limit + 1)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, RuntimeError):
        raise _fail(display, f"archive entry {info.filename!r} is corrupt or truncated") from None
    if len(data) > limit or len(data) != info.file_size:
        raise _fail(display, f"archive entry {info.filename!r} is not the size its header declares")
    return data


def _verify(zf: zipfile.ZipFile, info: zipfile.ZipInfo, display: str) -> None:
    """Stream a member through zipfile's CRC check without keeping it."""
    read = 0
    try:
        with zf.open(info) as f:
            while chunk := f.read(1 << 20):
                read += len(chunk)
                if read > info.file_size:
                    break
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, RuntimeError):
        raise _fail(display, f"archive entry {info.filename!r} is corrupt or truncated") from None
    if read != info.file_size:
        raise _fail(display, f"archive entry {info.filename!r} is not the size its header declares")


def _json(zf: zipfile.ZipFile, info: zipfile.ZipInfo, display: str) -> Any:
    data = _read(zf, info, display, MAX_JSON_BYTES)
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise _fail(display, f"archive entry {info.filename!r} is not valid JSON") from None


# ---------------------------------------------------------------------------------------
# pickles we never run: example inputs must name only plain tensors
# ---------------------------------------------------------------------------------------


def _pickle_globals(data: bytes) -> Iterator[tuple[str, str] | None]:
    """Every global a pickle would import, without running it (None: undeterminable)."""
    strings: list[str] = []
    for opcode, arg, _pos in pickletools.genops(data):
        name = opcode.name
        if name in _FORBIDDEN_PICKLE_OPS:
            yield None
            return
        if name in _STRING_OPS and isinstance(arg, str | bytes):
            strings.append(arg if isinstance(arg, str) else arg.decode("latin-1"))
            continue
        if name == "GLOBAL" and isinstance(arg, str):
            module, _, attr = arg.partition(" ")
            yield (module, attr)
        elif name == "STACK_GLOBAL":
            yield (strings[-2], strings[-1]) if len(strings) >= 2 else None
        if name not in ("MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT"):
            strings.clear()  # STACK_GLOBAL must follow its two strings directly


def _check_plain_tensor_pickle(data: bytes, display: str, what: str) -> None:
    """A torch.save zip whose data.pkl names only tensor-rebuilding globals (no payloads)."""
    try:
        inner = zipfile.ZipFile(io.BytesIO(data))
        pkl = [i for i in inner.infolist() if i.filename.endswith("data.pkl")]
        if len(pkl) != 1 or pkl[0].file_size > MAX_JSON_BYTES:
            raise _fail(display, f"{what} is not a plain torch.save of tensors")
        for info in inner.infolist():
            _check_name(display, info.filename)
        found = list(_pickle_globals(inner.read(pkl[0])))
    except ProgramError:
        raise
    except Exception:
        raise _fail(display, f"{what} cannot be read as a torch.save of tensors") from None
    bad = [g for g in found if g is None or g not in _SAFE_PICKLE_GLOBALS]
    if bad:
        shown = ", ".join(sorted({".".join(g) if g else "an object built by the pickle" for g in bad}))[:200]
        raise _fail(
            display,
            f"{what} would unpickle {shown}, not just tensors; refused. Export with plain tensor "
            "inputs (torch.export.export(model, (torch.randn(...),), ...))",
        )


# ---------------------------------------------------------------------------------------
# payload configs (weights, constants)
# ---------------------------------------------------------------------------------------


def _ints(values: Any, display: str, where: str) -> tuple[int, ...]:
    if not isinstance(values, list):
        raise _fail(display, f"{where} is malformed")
    out = []
    for v in values:
        if not (
            isinstance(v, dict) and set(v) == {"as_int"} and type(v["as_int"]) is int and v["as_int"] >= 0
        ):
            raise _fail(display, f"{where} must hold fixed non-negative sizes")
        out.append(v["as_int"])
    return tuple(out)


def _tensor_entry(
    fqn: str,
    meta: Any,
    root: str,
    directory: str,
    prefix: str,
    members: Mapping[str, zipfile.ZipInfo],
    display: str,
) -> TensorEntry:
    if not isinstance(fqn, str) or not _FQN_RE.match(fqn):
        raise _fail(display, f"stored tensor name {str(fqn)[:80]!r} is not a dotted identifier")
    if not isinstance(meta, dict):
        raise _fail(display, f"the entry for {fqn} is malformed")
    if meta.get("use_pickle") is not False:
        raise _fail(
            display,
            f"{fqn} is stored as a pickle (use_pickle), which would run code on load; refused. "
            "Save plain tensors (no tensor subclasses, e.g. call .detach() on quantized or "
            "wrapped parameters) before torch.export",
        )
    path = meta.get("path_name")
    if not isinstance(path, str) or not re.fullmatch(rf"{prefix}[0-9]+", path):
        if isinstance(path, str) and path.startswith(("custom_obj_", "opaque_obj_")):
            raise _fail(display, f"{fqn} is a custom or opaque object (a pickled Python object); refused")
        raise _fail(display, f"{fqn} names an unexpected file {str(path)[:80]!r}")
    member = f"{root}/{directory}{path}"
    info = members.get(member)
    if info is None:
        raise _fail(display, f"{fqn}'s data ({directory}{path}) is missing from the archive")
    tm = meta.get("tensor_meta")
    if not isinstance(tm, dict):
        raise _fail(display, f"{fqn} has no tensor description")
    dtype = tm.get("dtype")
    if dtype not in DTYPE_BYTES:
        raise _fail(
            display, f"{fqn} has an unsupported dtype ({dtype}); use float32, float16, bfloat16 or integers"
        )
    if tm.get("layout") != LAYOUT_STRIDED:
        raise _fail(display, f"{fqn} is not a dense (strided) tensor")
    sizes = _ints(tm.get("sizes"), display, f"{fqn}'s sizes")
    strides = _ints(tm.get("strides"), display, f"{fqn}'s strides")
    offset = _ints([tm.get("storage_offset")], display, f"{fqn}'s storage offset")[0]
    if len(sizes) != len(strides) or len(sizes) > 8:
        raise _fail(display, f"{fqn} has inconsistent sizes and strides")
    numel = 1
    for s in sizes:
        numel *= s
    if numel:
        extent = offset + sum((s - 1) * st for s, st in zip(sizes, strides, strict=True)) + 1
        if extent * DTYPE_BYTES[dtype] > info.file_size:
            raise _fail(display, f"{fqn} needs more bytes than its file holds")
    if info.file_size % DTYPE_BYTES[dtype]:
        raise _fail(display, f"{fqn}'s file size is not a multiple of its element size")
    return TensorEntry(
        fqn, member, dtype, sizes, strides, offset, bool(meta.get("is_param")), bool(tm.get("requires_grad"))
    )


def _payload(
    zf: zipfile.ZipFile,
    members: Mapping[str, zipfile.ZipInfo],
    root: str,
    directory: str,
    config_name: str,
    prefix: str,
    display: str,
) -> dict[str, TensorEntry]:
    info = members.get(f"{root}/{directory}{config_name}")
    if info is None:
        raise _fail(display, f"{directory}{config_name} is missing; save the program with torch.export.save")
    config = _json(zf, info, display)
    if not isinstance(config, dict) or set(config) != {"config"} or not isinstance(config["config"], dict):
        raise _fail(display, f"{directory}{config_name} is malformed")
    return {
        fqn: _tensor_entry(fqn, meta, root, directory, prefix, members, display)
        for fqn, meta in config["config"].items()
    }


# ---------------------------------------------------------------------------------------
# the graph JSON
# ---------------------------------------------------------------------------------------


def check_sym_expr(expr: Any, display: str) -> None:
    """Refuse a symbolic expression outside the grammar torch writes (sympify evaluates it)."""
    if not isinstance(expr, str) or len(expr) > MAX_EXPR_CHARS:
        raise _fail(display, "a symbolic shape expression is malformed or too long")
    pos, depth = 0, 0
    while pos < len(expr):
        m = _SYM_TOKEN_RE.match(expr, pos)
        if m is None or m.end() == pos:
            if expr[pos:].strip() == "":
                break
            raise _fail(display, f"symbolic shape expression {expr[:80]!r} has unexpected text; refused")
        name = m.group("name")
        if name is not None and name not in _SYM_NAMES:
            raise _fail(display, f"symbolic shape expression {expr[:80]!r} names {name!r}; refused")
        op = m.group("op")
        depth += 1 if op == "(" else -1 if op == ")" else 0
        if depth < 0 or depth > 50:
            raise _fail(display, f"symbolic shape expression {expr[:80]!r} is not balanced")
        pos = m.end()


def _walk(node: Any, display: str, path: str = "") -> None:
    """Recursive checks that apply anywhere in the graph JSON."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("as_custom_obj", "custom_obj", "as_opaque", "opaque"):
                raise _fail(
                    display, "the program uses a custom or opaque object (e.g. a ScriptObject); refused"
                )
            if key in ("as_graph", "as_graphs"):
                raise _fail(
                    display,
                    "the program contains a subgraph (control flow such as torch.cond or a "
                    "higher-order op); export a straight-line forward",
                )
            if key == "expr_str":
                check_sym_expr(value, display)
                continue
            if key == "name" and isinstance(value, str) and not _is_identifier(value):
                raise _fail(display, f"a graph name {value[:80]!r} is not an identifier; refused")
            if key == "metadata":
                continue  # dropped by the loader
            _walk(value, display, f"{path}.{key}")
    elif isinstance(node, list):
        for item in node:
            _walk(item, display, path)


def _is_identifier(name: str) -> bool:
    return bool(_IDENT_RE.match(name)) and not keyword.iskeyword(name) and not name.startswith("__")


def op_allowed(target: str) -> bool:
    if target in ALLOWED_PY_OPS:
        return True
    m = _OP_RE.match(target)
    if m is None:
        return False
    namespace, base = m.group(1), m.group(2)
    return base in (ALLOWED_ATEN if namespace == "aten" else ALLOWED_PRIMS)


def _check_ops(nodes: list[Any], display: str) -> dict[str, int]:
    ops: dict[str, int] = {}
    bad: list[str] = []
    for n in nodes:
        if not isinstance(n, dict) or not isinstance(n.get("target"), str):
            raise _fail(display, "a graph node is malformed")
        target = n["target"]
        if not op_allowed(target):
            bad.append(target[:80])
        ops[target] = ops.get(target, 0) + 1
    if bad:
        shown = ", ".join(sorted(set(bad))[:8])
        raise _fail(
            display,
            f"the program uses op(s) outside the allowed core ATen set: {shown}. Custom ops and "
            "non-ATen calls cannot be loaded safely; rewrite them with standard torch ops",
        )
    return ops


def _sizes_of(graph: dict[str, Any], name: str, display: str) -> list[Any]:
    values = graph.get("tensor_values")
    if not isinstance(values, dict) or not isinstance(values.get(name), dict):
        raise _fail(display, f"the graph does not describe tensor {name!r}")
    sizes = values[name].get("sizes")
    if not isinstance(sizes, list):
        raise _fail(display, f"the graph does not describe tensor {name!r}")
    return sizes


def _io(program: dict[str, Any], display: str) -> tuple[tuple[int, ...], int]:
    """The input shape (without the batch) and the class count, from the graph signature."""
    gm = program["graph_module"]
    graph, signature = gm.get("graph"), gm.get("signature")
    if not isinstance(graph, dict) or not isinstance(signature, dict):
        raise _fail(display, "the program has no graph or signature")
    user_inputs, user_outputs = [], []
    for spec in signature.get("input_specs") or []:
        kind = next(iter(spec)) if isinstance(spec, dict) and len(spec) == 1 else None
        if kind == "user_input":
            arg = spec[kind].get("arg", {})
            if set(arg) != {"as_tensor"}:
                raise _fail(display, "the program takes a non-tensor input; a classifier takes one tensor")
            user_inputs.append(arg["as_tensor"]["name"])
        elif kind not in ("parameter", "buffer", "tensor_constant"):
            raise _fail(
                display, f"the program has an input of kind {kind!r}; refused (custom objects or tokens)"
            )
    for spec in signature.get("output_specs") or []:
        kind = next(iter(spec)) if isinstance(spec, dict) and len(spec) == 1 else None
        if kind == "user_output":
            arg = spec[kind].get("arg", {})
            if set(arg) != {"as_tensor"}:
                raise _fail(display, "the program returns a non-tensor output; a classifier returns logits")
            user_outputs.append(arg["as_tensor"]["name"])
        elif kind != "buffer_mutation":
            raise _fail(display, f"the program has an output of kind {kind!r}; refused")
    if len(user_inputs) != 1:
        raise _fail(
            display,
            f"the program takes {len(user_inputs)} inputs; a classifier program takes exactly one tensor",
        )
    if len(user_outputs) != 1:
        raise _fail(
            display,
            f"the program returns {len(user_outputs)} outputs; return one tensor of logits (batch, classes)",
        )
    in_sizes = _sizes_of(graph, user_inputs[0], display)
    if not in_sizes or len(in_sizes) > 4:
        raise _fail(
            display, "the program's input must be (batch, ...) with 1 to 3 dimensions after the batch"
        )
    first = in_sizes[0]
    if not (isinstance(first, dict) and "as_expr" in first):
        raise _fail(
            display,
            f"the program's batch dimension is static (fixed to {first.get('as_int') if isinstance(first, dict) else '?'}); {RE_EXPORT_HINT}",
        )
    shape = []
    for s in in_sizes[1:]:
        if not (
            isinstance(s, dict) and set(s) == {"as_int"} and type(s["as_int"]) is int and s["as_int"] > 0
        ):
            raise _fail(
                display,
                "only the batch dimension of the input may be dynamic; export with fixed sizes "
                "for the other dimensions (dynamic_shapes only for dimension 0)",
            )
        shape.append(s["as_int"])
    out_sizes = _sizes_of(graph, user_outputs[0], display)
    if len(out_sizes) != 2 or not (isinstance(out_sizes[0], dict) and "as_expr" in out_sizes[0]):
        raise _fail(display, "the program must return logits of shape (batch, classes)")
    classes = out_sizes[1]
    if not (isinstance(classes, dict) and set(classes) == {"as_int"} and type(classes["as_int"]) is int):
        raise _fail(display, "the program's number of classes (output dimension 1) must be fixed")
    if classes["as_int"] < 2:
        raise _fail(
            display,
            f"the program returns {classes['as_int']} logits per sample; a classifier needs two or more",
        )
    return tuple(shape), classes["as_int"]


def _check_signature_names(program: dict[str, Any], display: str) -> None:
    sig = program["graph_module"]["signature"]
    for spec in [*(sig.get("input_specs") or []), *(sig.get("output_specs") or [])]:
        ((_kind, body),) = spec.items()
        for key in ("parameter_name", "buffer_name", "tensor_constant_name"):
            value = body.get(key)
            if value is not None and (not isinstance(value, str) or not _FQN_RE.match(value)):
                raise _fail(display, f"state name {str(value)[:80]!r} is not a dotted identifier; refused")


def _check_specs(program: dict[str, Any], display: str) -> None:
    """The module call graph's tree specs name only plain containers."""
    for entry in program["graph_module"].get("module_call_graph") or []:
        if not isinstance(entry, dict):
            raise _fail(display, "the module call graph is malformed")
        fqn = entry.get("fqn")
        if not isinstance(fqn, str) or (fqn and not _FQN_RE.match(fqn)):
            raise _fail(display, f"module name {str(fqn)[:80]!r} is not a dotted identifier")
        sig = entry.get("signature")
        if sig is None:
            continue
        for key in ("in_spec", "out_spec"):
            try:
                spec = json.loads(sig.get(key) or "null")
            except (json.JSONDecodeError, TypeError, RecursionError):
                raise _fail(display, f"the program's {key} is malformed") from None
            for t in _spec_types(spec):
                if t not in (
                    None,
                    "builtins.tuple",
                    "builtins.list",
                    "builtins.dict",
                    "collections.OrderedDict",
                ):
                    raise _fail(
                        display,
                        f"the program's inputs or outputs use the container {str(t)[:80]!r}; use tuples",
                    )


def _spec_types(spec: Any) -> Iterator[Any]:
    if isinstance(spec, dict):
        yield spec.get("type")
        for child in spec.get("children_spec") or []:
            yield from _spec_types(child)
    elif isinstance(spec, list):
        for item in spec:
            yield from _spec_types(item)


def _sanitize(program: dict[str, Any]) -> dict[str, Any]:
    """Keep what deserialization needs; drop node metadata (stack traces, module types) and
    ``guards_code`` (torch execs it as Python source)."""
    clean = json.loads(json.dumps(program))
    clean["guards_code"] = []
    gm = clean["graph_module"]
    gm["metadata"] = {}
    for node in gm["graph"].get("nodes") or []:
        node["metadata"] = {}
    return clean


# ---------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------

_ALLOWED_TOP = {"archive_format", "archive_version", "byteorder", ".data/version", ".data/serialization_id"}


def validate_archive(path: str | Path, display_name: str | None = None) -> ProgramArchive:
    """Check ``path`` as described in the module docstring; return what the loader needs.

    ``display_name`` is how messages name the file (the user's file name, never a server path).
    Raises only :class:`ProgramError`, whatever the file holds.
    """
    p = Path(path)
    display = display_name or p.name
    try:
        return _validate(p, display)
    except ProgramError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, RecursionError, OverflowError):
        raise _fail(
            display,
            "the program's description in the archive is malformed; save it again with torch.export.save",
        ) from None
    except (zipfile.BadZipFile, zlib.error, NotImplementedError, EOFError, OSError, RuntimeError):
        raise _fail(
            display, "the archive is corrupt or truncated; save it again and upload the whole file"
        ) from None


def _validate(p: Path, display: str) -> ProgramArchive:
    try:
        file_size = p.stat().st_size
    except OSError:
        raise _fail(display, "the file cannot be read") from None
    with _open_zip(p, display) as zf:
        root, members = _check_zip(zf, display, file_size)
        rel = {name[len(root) + 1 :]: info for name, info in members.items() if not info.is_dir()}

        # every member must be one we know how to read without pickle
        sample_inputs: str | None = None
        for name in rel:
            if name in _ALLOWED_TOP or name == f"models/{MODEL_NAME}.json":
                continue
            if name in (
                f"data/weights/{MODEL_NAME}_weights_config.json",
                f"data/constants/{MODEL_NAME}_constants_config.json",
            ):
                continue
            if re.fullmatch(r"data/weights/weight_[0-9]+", name) or re.fullmatch(
                r"data/constants/tensor_[0-9]+", name
            ):
                continue
            if name == f"data/sample_inputs/{MODEL_NAME}.pt":
                sample_inputs = f"{root}/{name}"
                continue
            if re.fullmatch(r"extra/[A-Za-z0-9_.\-]{1,100}", name):
                continue
            if name.startswith("data/constants/") and re.match(
                r"data/constants/(custom_obj_|opaque_obj_)", name
            ):
                raise _fail(display, f"the archive holds a pickled custom or opaque object ({name}); refused")
            if name.startswith(("data/aotinductor/", "data/executorch/", "data/mtia", "xl_model_weights/")):
                raise _fail(
                    display,
                    f"the archive holds compiled code or external weights ({name}); upload a plain torch.export.save file",
                )
            if name.startswith("models/"):
                raise _fail(
                    display, f"the archive holds more than one program ({name}); save a single program"
                )
            raise _fail(display, f"the archive holds an unexpected entry {name!r}; refused")

        for name in ("archive_format", "archive_version", f"models/{MODEL_NAME}.json"):
            if name not in rel:
                raise _fail(
                    display,
                    f"is not a torch.export archive ({name} is missing); save it with torch.export.save",
                )
        fmt = _read(zf, rel["archive_format"], display, 64).decode("utf-8", "replace").strip()
        version = _read(zf, rel["archive_version"], display, 64).decode("utf-8", "replace").strip()
        if fmt != ARCHIVE_FORMAT or version != ARCHIVE_VERSION:
            raise _fail(
                display, f"has archive format {fmt!r} version {version!r}; this service reads 'pt2' version 0"
            )
        if "byteorder" in rel and _read(zf, rel["byteorder"], display, 64).strip() != b"little":
            raise _fail(display, "was saved on a big-endian machine; save it on a little-endian one")

        program = _json(zf, rel[f"models/{MODEL_NAME}.json"], display)
        if not isinstance(program, dict) or not isinstance(program.get("graph_module"), dict):
            raise _fail(display, "models/model.json is not a serialized exported program")
        schema = program.get("schema_version") or {}
        if not isinstance(schema, dict) or schema.get("major") != SCHEMA_MAJOR:
            raise _fail(
                display,
                f"was saved with export schema {schema.get('major') if isinstance(schema, dict) else '?'} "
                f"(torch {str(program.get('torch_version'))[:40]}); this service reads schema {SCHEMA_MAJOR} "
                "(torch 2.14): export again with torch 2.14",
            )
        guards = program.get("guards_code") or []
        if not isinstance(guards, list) or not all(
            isinstance(g, str) and len(g) < 500 and _GUARD_RE.match(g) and "__" not in g for g in guards
        ):
            raise _fail(display, "the program's guards are not plain shape checks; refused")
        graph = program["graph_module"].get("graph")
        if not isinstance(graph, dict) or not isinstance(graph.get("nodes"), list):
            raise _fail(display, "the program has no graph")
        if graph.get("custom_obj_values"):
            raise _fail(display, "the program uses a custom or opaque object (e.g. a ScriptObject); refused")
        _walk(program["graph_module"], display)
        for key in program.get("range_constraints") or {}:
            if not _IDENT_RE.match(str(key)):
                raise _fail(display, f"range constraint {str(key)[:80]!r} is not a symbol name")
        ops = _check_ops(graph["nodes"], display)
        _check_signature_names(program, display)
        _check_specs(program, display)
        input_shape, num_classes = _io(program, display)

        weights = _payload(
            zf, members, root, "data/weights/", f"{MODEL_NAME}_weights_config.json", "weight_", display
        )
        constants = _payload(
            zf, members, root, "data/constants/", f"{MODEL_NAME}_constants_config.json", "tensor_", display
        )
        _check_state_names(program, weights, constants, display)
        for entry in {e.member for e in (*weights.values(), *constants.values())}:
            _verify(zf, members[entry], display)
        if sample_inputs is not None:
            data = _read(zf, members[sample_inputs], display, MAX_JSON_BYTES)
            if data:
                _check_plain_tensor_pickle(data, display, "the bundled example inputs")
    return ProgramArchive(
        display_name=display,
        program=_sanitize(program),
        weights=weights,
        constants=constants,
        input_shape=input_shape,
        num_classes=num_classes,
        ops=ops,
        torch_version=str(program.get("torch_version", ""))[:40],
        sample_inputs=sample_inputs,
    )


def _check_state_names(
    program: dict[str, Any],
    weights: Mapping[str, TensorEntry],
    constants: Mapping[str, TensorEntry],
    display: str,
) -> None:
    for spec in program["graph_module"]["signature"].get("input_specs") or []:
        ((kind, body),) = spec.items()
        if kind == "parameter":
            name = body.get("parameter_name")
            if name not in weights:
                raise _fail(display, f"parameter {str(name)[:80]} has no stored data")
            if weights[name].dtype not in FLOAT_DTYPES:
                raise _fail(display, f"parameter {name} is not a floating-point tensor")
        elif kind == "buffer":
            name = body.get("buffer_name")
            if name not in weights and name not in constants:
                raise _fail(display, f"buffer {str(name)[:80]} has no stored data")
        elif kind == "tensor_constant":
            name = body.get("tensor_constant_name")
            if name not in constants:
                raise _fail(display, f"constant {str(name)[:80]} has no stored data")
