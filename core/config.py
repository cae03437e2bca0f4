"""The job config: one schema for the CLI and the HTTP API.

Unknown fields are rejected everywhere (``extra="forbid"``) so that a typo is an
error a person sees, never a setting silently ignored.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

ExportFormat = Literal["safetensors", "pt2", "onnx", "onnx_int8"]
ALL_EXPORTS: tuple[ExportFormat, ...] = ("safetensors", "pt2", "onnx")


class _Strict(BaseModel):
    # NaN and infinity are refused in every float field (JSON has no such numbers: stored, they
    # would come back as null). strict: a value is taken as the JSON type it is, never coerced
    # ("epochs": true was 1 epoch, "lr": "0.1" 0.1, "max_drop": true a budget of 1.0); an integer
    # is still a number where a float is expected ("lr": 1). Nested objects stay plain dicts.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)


MAX_OPTIONS = 64  # keys of model.options
MAX_PATTERNS = 1000  # entries of train.include / train.exclude
SEED_MAX = 2**32 - 1  # the seeds numpy and every torch generator accept
MAX_SIZE = 4096  # one dimension of a synthetic input_shape


def _plain_json(value: Any, where: str, depth: int = 0) -> None:
    """Options are JSON scalars or short lists of them: finite numbers, strings, booleans."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where} is {value}; give a finite number")
    if isinstance(value, str) and len(value) > 200:
        raise ValueError(f"{where} is a string of {len(value)} characters; at most 200")
    if isinstance(value, list | dict):
        if depth >= 2 or len(value) > 64:
            raise ValueError(f"{where} is nested too deep or too long; options are plain values")
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for k, v in items:
            _plain_json(v, f"{where}.{k}", depth + 1)


def check_options(options: Mapping[str, Any]) -> None:
    """Architecture options as a job config takes them (ValueError saying what is wrong): at most
    ``MAX_OPTIONS``, each a JSON scalar or a short list of them. Uploaded models' options too."""
    if len(options) > MAX_OPTIONS:
        raise ValueError(f"{len(options)} options; an architecture takes at most {MAX_OPTIONS}")
    for key, value in options.items():
        _plain_json(value, key)


class ModelConfig(_Strict):
    arch: str | None = Field(
        default=None,
        description="A built-in architecture (see core.zoo.architectures()) or 'torchvision:<name>'. "
        "Give exactly one of arch and program.",
    )
    program: str | None = Field(
        default=None,
        description="Any classifier as a torch.export program (.pt2, saved with torch.export.save, "
        "dynamic batch dimension): a local path (CLI) or an uploaded model id (API). The program "
        "holds the architecture, the weights and the class count, so it excludes arch, options and "
        "weights. Validated as data; nothing of it is ever run as code.",
    )
    from_scratch: bool = Field(
        default=False,
        description="Programs only: re-initialize the program's weights and train from scratch, the "
        "factors starting as train.init says (default: LoRITa starts from the program's weights, an "
        "exact factorization).",
    )
    num_classes: int | None = Field(
        default=None, ge=2, le=100_000, description="Defaults to the dataset's class count."
    )
    weights: str | None = Field(
        default=None,
        description="Starting weights: a .safetensors or weights-only .pt file (CLI), an uploaded model id (API).",
    )
    options: dict[str, Any] = Field(
        default_factory=dict, description="Architecture options, e.g. depth/width."
    )

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, arch: str | None) -> str | None:
        if arch is None:
            return None
        from core.zoo import check_arch  # local: zoo imports torch, config stays light

        check_arch(arch)
        return arch

    @model_validator(mode="after")
    def _arch_or_program(self) -> ModelConfig:
        if (self.arch is None) == (self.program is None):
            raise ValueError(
                "give exactly one of 'arch' (a built-in architecture) or 'program' (a torch.export .pt2)"
            )
        if self.program is not None and (self.options or self.weights is not None):
            raise ValueError("'program' excludes 'options' and 'weights': the program holds both")
        if self.from_scratch and self.program is None:
            raise ValueError("'from_scratch' applies to programs only")
        return self

    @property
    def label(self) -> str:
        """The architecture's name, or the program's file name."""
        return self.arch if self.arch is not None else Path(self.program or "program").name

    @field_validator("options")
    @classmethod
    def _known_options(cls, options: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        check_options(options)
        arch = info.data.get("arch")
        if isinstance(arch, str):
            from core import zoo

            if arch in zoo.architectures():  # torchvision:<name> options are checked when it is built
                defaults = zoo.arch_spec(arch).defaults
                unknown = sorted(set(options) - set(defaults))
                if unknown:
                    valid = ", ".join(f"{k} (default {v!r})" for k, v in defaults.items())
                    raise ValueError(
                        f"unknown option(s) {', '.join(unknown)} for {arch}; valid options: {valid}"
                    )
        return options


BUILTIN_DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10", "cifar100", "synthetic")


class DatasetConfig(_Strict):
    name: str | None = Field(default=None, description=f"One of {', '.join(BUILTIN_DATASETS)}.")
    path: str | None = Field(
        default=None, description="An .npz (x_train, y_train, x_test, y_test) or an ImageFolder directory."
    )
    id: str | None = Field(default=None, description="An uploaded dataset id (API only).")
    root: str | None = Field(default=None, description="Directory holding torchvision datasets.")
    download: bool = Field(default=False, description="Allow torchvision to download into root.")
    val_fraction: float = Field(default=0.1, gt=0.0, lt=0.9)
    augment: bool = Field(default=False, description="Random crop (pad 4) and horizontal flip for images.")
    image_size: int | None = Field(default=None, ge=8, le=1024, description="Resize ImageFolder images.")
    # synthetic only
    num_classes: int | None = Field(default=None, ge=2, le=1000)
    input_shape: list[Annotated[int, Field(ge=1, le=MAX_SIZE)]] | None = Field(
        default=None, min_length=1, max_length=3
    )
    n_train: int | None = Field(default=None, ge=10, le=200_000)
    n_test: int | None = Field(default=None, ge=10, le=100_000)

    @model_validator(mode="after")
    def _one_source(self) -> DatasetConfig:
        given = [k for k in ("name", "path", "id") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of 'name' (a built-in dataset), 'path' or 'id'")
        if self.name is not None and self.name not in BUILTIN_DATASETS:
            raise ValueError(f"unknown dataset {self.name!r}; choose one of {', '.join(BUILTIN_DATASETS)}")
        synthetic_only = ("num_classes", "input_shape", "n_train", "n_test")
        if self.name != "synthetic":
            bad = [k for k in synthetic_only if getattr(self, k) is not None]
            if bad:
                raise ValueError(f"{', '.join(bad)} only apply to the 'synthetic' dataset")
        return self


class TrainConfig(_Strict):
    factors: int = Field(default=3, ge=1, le=8, description="N: factors per weight (1 = plain training).")
    epochs: int = Field(default=30, ge=1, le=10_000)
    optimizer: Literal["sgd", "adam", "adamw"] = "adam"
    lr: float = Field(default=0.01, gt=0.0, le=10.0)
    momentum: float = Field(default=0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(default=1e-4, ge=0.0, le=1.0)
    schedule: Literal["cosine", "step", "none"] = "cosine"
    step_size: int = Field(default=30, ge=1, description="Epochs between lr drops for 'step'.")
    gamma: float = Field(default=0.1, gt=0.0, le=1.0)
    label_smoothing: float = Field(default=0.0, ge=0.0, lt=1.0)
    batch_size: int = Field(default=128, ge=1, le=65_536)
    seed: int = Field(default=0, ge=0, le=SEED_MAX)
    amp: bool = Field(default=True, description="bf16 autocast on CUDA; ignored on CPU.")
    composition: Literal["weight", "auto"] = Field(
        default="weight",
        description="'weight': every product formed once per step (torch parametrize). 'auto': a layer "
        "whose batch x output positions x (N-1) is below its input width is composed as a chain of "
        "layers instead (same function and gradients, cheaper there).",
    )
    init: Literal["paper", "preserve"] = Field(
        default="paper",
        description="How the factors start when training from scratch. 'paper' (default): each factor "
        "initialized independently as the layer's own initialization would (the product starts small, "
        "with a decaying spectrum, as in the paper's code); it truncates far better at aggressive budgets "
        "(benchmarks/results/reproduce_fcn_inits.md). 'preserve': the product equals the layer's default "
        "init, square factors orthogonal. Ignored when model.weights are given, or a program without "
        "from_scratch (exact factorization).",
    )
    include: list[Annotated[str, Field(max_length=200)]] = Field(
        default_factory=list,
        max_length=MAX_PATTERNS,
        description="fnmatch patterns of module names to compose.",
    )
    exclude: list[Annotated[str, Field(max_length=200)]] = Field(
        default_factory=list, max_length=MAX_PATTERNS, description="fnmatch patterns of module names to skip."
    )


ROUND_TO_HELP = (
    "Round every kept rank to a multiple of this (1: no rounding), never making a layer bigger than "
    "its dense weight (core/rounding.py). Default: none, except for latency_budget, which rounds to 8 "
    "on CPU (the float32 GEMM panel width of MLAS/oneDNN) and 16 on CUDA (tensor cores need multiples "
    "of 8 for fp16/bf16 and of 16 for int8). The rounded point is evaluated and shown in the report."
)


class _Policy(_Strict):
    round_to: int | None = Field(default=None, ge=1, le=256, description=ROUND_TO_HELP)


class NonePolicy(_Policy):
    policy: Literal["none"]


class UniformPolicy(_Policy):
    policy: Literal["uniform"]
    keep: float = Field(gt=0.0, le=1.0, description="Fraction of each layer's singular values kept.")


class GlobalPolicy(_Policy):
    policy: Literal["global"]
    keep: float = Field(gt=0.0, le=1.0, description="Fraction of all normalized singular values kept.")


class EnergyPolicy(_Policy):
    policy: Literal["energy"]
    energy: float = Field(gt=0.0, le=1.0, description="Fraction of sum(sigma^2) kept per layer.")


Allocation = Literal["global", "sensitivity"]
ALLOCATION_HELP = (
    "How ranks are shared between layers under the budget. 'global': one threshold on each layer's "
    "normalized singular values. 'sensitivity': each layer's accuracy cost measured on the validation "
    "split (one evaluation per layer, within max_evals), then the values buying the most accuracy per "
    "parameter (or FLOP) are kept (core/allocation.py)."
)


class ParamsBudgetPolicy(_Policy):
    policy: Literal["params_budget"]
    budget: float = Field(gt=0.0, le=1.0, description="Fraction of the dense model's parameters.")
    max_evals: int = Field(
        default=20, ge=2, le=200, description="Validation evaluations at most (the dense reference is one)."
    )
    allocation: Allocation = Field(default="global", description=ALLOCATION_HELP)


class FlopsBudgetPolicy(_Policy):
    policy: Literal["flops_budget"]
    budget: float = Field(gt=0.0, le=1.0, description="Fraction of the dense model's FLOPs.")
    max_evals: int = Field(
        default=20, ge=2, le=200, description="Validation evaluations at most (the dense reference is one)."
    )
    allocation: Allocation = Field(default="global", description=ALLOCATION_HELP)


class AccuracyBudgetPolicy(_Policy):
    policy: Literal["accuracy_budget"]
    max_drop: float | None = Field(default=None, ge=0.0, le=1.0, description="Absolute drop in val accuracy.")
    max_rel_drop: float | None = Field(default=None, ge=0.0, le=1.0, description="Relative drop.")
    max_evals: int = Field(default=20, ge=2, le=200)
    refine: bool = Field(default=True, description="Per-layer greedy refinement after the bisection.")

    @model_validator(mode="after")
    def _one_budget(self) -> AccuracyBudgetPolicy:
        if (self.max_drop is None) == (self.max_rel_drop is None):
            raise ValueError("give exactly one of 'max_drop' or 'max_rel_drop'")
        return self


class LatencyBudgetPolicy(_Policy):
    policy: Literal["latency_budget"]
    budget: float = Field(
        gt=0.0,
        le=1.0,
        description="Fraction of the dense model's latency, measured on the worker's hardware.",
    )
    batch_size: int = Field(default=64, ge=1, le=4096, description="The batch size the latency is for.")
    runtime: Literal["onnxruntime", "torch"] = Field(
        default="onnxruntime",
        description="onnxruntime: the exported model.onnx on the CPU with measure.threads threads; "
        "torch: the PyTorch module on the job's device.",
    )
    max_evals: int = Field(default=20, ge=2, le=200, description="Validation evaluations at most.")


MAX_RANK_ENTRIES = 10_000  # layers named in a ranks policy
# The largest rank the schema takes: past what torch's C++ side holds as a dimension, no layer
# has it. Each rank is checked against its layer's full rank where the model is known (at
# submit for built-in architectures, always when the job compresses).
MAX_RANK = 2**31 - 1


class RanksPolicy(_Policy):
    """Explicit ranks, e.g. one point of a job's Pareto curve (its ``ranks``): one evaluation."""

    policy: Literal["ranks"]
    ranks: dict[Annotated[str, Field(min_length=1, max_length=200)], Annotated[int, Field(strict=True)]] = (
        Field(
            max_length=MAX_RANK_ENTRIES,
            description="Kept rank per layer, by module name (a report's ranks or a Pareto point's); "
            "layers not named stay dense. Each rank is 1..the layer's full rank, checked against the "
            "model at submission (built-in architectures over HTTP) and when the job compresses.",
        )
    )

    @field_validator("ranks")
    @classmethod
    def _in_range(cls, ranks: dict[str, int]) -> dict[str, int]:
        bad = [f"{name!r} ({rank})" for name, rank in ranks.items() if rank < 1]
        if bad:
            raise ValueError(f"a kept rank is at least 1; fix layer(s) {', '.join(bad[:5])}")
        huge = [f"{name!r} ({shown_int(rank)})" for name, rank in ranks.items() if rank > MAX_RANK]
        if huge:
            raise ValueError(
                f"a kept rank is at most the layer's full rank, and never above {MAX_RANK}: "
                f"fix layer(s) {', '.join(huge[:5])}"
            )
        return ranks


CompressConfig = Annotated[
    NonePolicy
    | UniformPolicy
    | GlobalPolicy
    | EnergyPolicy
    | ParamsBudgetPolicy
    | FlopsBudgetPolicy
    | AccuracyBudgetPolicy
    | LatencyBudgetPolicy
    | RanksPolicy,
    Field(discriminator="policy"),
]
POLICIES = (
    "none",
    "uniform",
    "global",
    "energy",
    "params_budget",
    "flops_budget",
    "accuracy_budget",
    "latency_budget",
    "ranks",
)


class DistillConfig(_Strict):
    alpha: float = Field(
        default=0.5, ge=0.0, le=1.0, description="Weight of the teacher's soft targets (0: labels only)."
    )
    temperature: float = Field(default=4.0, gt=0.0, le=100.0, description="Softmax temperature T.")


class FinetuneConfig(_Strict):
    epochs: int = Field(default=0, ge=0, le=1000)
    distill: DistillConfig | None = Field(
        default=None,
        description="Learn from the dense (collapsed) model's soft outputs as well as the labels: "
        "loss = (1 - alpha) CE + alpha T^2 KL(teacher || student). Off when null.",
    )
    lr: float | None = Field(
        default=None,
        gt=0.0,
        description="Defaults to the training lr (lr rewinding: recovers aggressive truncations far "
        "better than a tenth of it); 1e-3 when compressing given weights.",
    )
    optimizer: Literal["sgd", "adam", "adamw"] | None = None
    weight_decay: float = Field(default=0.0, ge=0.0, le=1.0)
    patience: int = Field(default=3, ge=1, description="Stop after this many epochs without val improvement.")


class MeasureConfig(_Strict):
    latency: bool = True
    latency_repeats: int = Field(default=20, ge=1, le=1000)
    threads: int = Field(default=1, ge=1, le=256)
    batch_sizes: list[Annotated[int, Field(ge=1, le=65_536)]] = Field(
        default_factory=lambda: [1, 64], min_length=1, max_length=16
    )


class JobConfig(_Strict):
    name: str | None = Field(default=None, max_length=200)
    model: ModelConfig
    dataset: DatasetConfig
    train: TrainConfig | None = Field(
        default_factory=TrainConfig, description="null: compress given weights."
    )
    compress: CompressConfig = Field(default_factory=lambda: GlobalPolicy(policy="global", keep=0.3))
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    measure: MeasureConfig = Field(default_factory=MeasureConfig)
    export: list[ExportFormat] = Field(default_factory=lambda: list(ALL_EXPORTS))
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @property
    def seed(self) -> int:
        """The job's seed: the model's init, the validation split, the data order (train.seed; 0 without training)."""
        return self.train.seed if self.train is not None else 0

    @model_validator(mode="after")
    def _needs_weights_without_training(self) -> JobConfig:
        if self.train is None and self.model.weights is None and self.model.program is None:
            raise ValueError("'train' is null (compress only) but 'model.weights' is not set: give weights")
        return self


class ConfigError(ValueError):
    """A config a person must fix; the message says what and how."""


def shown_int(value: int) -> str:
    """An integer as a message shows it: a huge one by its length."""
    return str(value) if abs(value) < 10**15 else f"a number of {len(str(abs(value)))} digits"


def shown_value(value: Any) -> str:
    """What a value of the wrong JSON type is, in JSON's words."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer" if abs(value) < 10**15 else shown_int(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:37] + "..."
        return f"a string ({json.dumps(shown)})"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


_EXPECTED = {"int_type": "an integer", "float_type": "a number", "bool_type": "true or false"}


def type_error_text(error: Mapping[str, Any]) -> str | None:
    """``expected an integer, got a boolean`` for a pydantic error of a strict number or boolean
    field (None for any other error): which JSON type to send instead of pydantic's wording."""
    expected = _EXPECTED.get(str(error.get("type")))
    if expected is None or "input" not in error:
        return None
    return f"expected {expected}, got {shown_value(error['input'])}"


def format_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "config"
        msg = type_error_text(e) or e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field; remove it (see the job config schema for valid fields)"
        elif e["type"] == "union_tag_invalid":
            msg = f"unknown policy; choose one of {', '.join(POLICIES)}"
        lines.append(f"{where}: {msg}")
    return "; ".join(lines)


def parse_config(data: dict[str, Any]) -> JobConfig:
    try:
        return JobConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"invalid job config: {format_validation_error(err)}") from None


def load_config(path: str | Path) -> JobConfig:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object")
    config = parse_config(data)
    # relative paths in a config file are relative to the file
    base = path.resolve().parent
    if config.model.weights and not Path(config.model.weights).is_absolute():
        candidate = base / config.model.weights
        if candidate.exists():
            config.model.weights = str(candidate)
    if config.model.program and not Path(config.model.program).is_absolute():
        candidate = base / config.model.program
        if candidate.exists():
            config.model.program = str(candidate)
    if config.dataset.path and not Path(config.dataset.path).is_absolute():
        candidate = base / config.dataset.path
        if candidate.exists():
            config.dataset.path = str(candidate)
    return config
