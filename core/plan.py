"""A dry run of a job: which weights LoRITa composes (and why others are skipped), what the
factors cost during training, and the model's parameters and FLOPs — before any training.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from core.config import JobConfig

FLOAT32_BYTES = 4


@dataclass
class LayerPlan:
    name: str  # "<module>.<param>"
    kind: str  # linear | conv | attention_in | attention_qkv
    shape: list[int]  # the parameter's shape
    matrix: list[int]  # (m, n) it is seen as
    composed: bool
    reason: str = ""  # why it is skipped, when it is
    space: str = "weight"  # where a composed weight's product is formed: "weight" or "layer" (a chain)


@dataclass
class Plan:
    factors: int
    input_shape: list[int]
    num_classes: int
    params: int  # of the model as built (dense)
    flops: int  # one forward pass, batch 1
    layers: list[LayerPlan] = field(default_factory=list)
    factor_params: int = 0  # trainable numbers in the factors of composed weights
    composed_dense_params: int = 0  # the dense weights those factors replace
    optimizer: str = "adam"
    optimizer_states: int = 2  # float32 numbers the optimizer keeps per parameter
    arch: str = ""
    norm_mode: str | None = None  # programs: how batch norm and dropout train, as exported

    @property
    def composed(self) -> list[LayerPlan]:
        return [lp for lp in self.layers if lp.composed]

    @property
    def skipped(self) -> list[LayerPlan]:
        return [lp for lp in self.layers if not lp.composed]

    @property
    def extra_params(self) -> int:
        """Trainable parameters added by the factorization (factors minus the dense weights)."""
        return self.factor_params - self.composed_dense_params

    @property
    def training_params(self) -> int:
        return self.params + self.extra_params

    def training_bytes(self, params: int) -> int:
        """Parameters + gradients + optimizer states, float32 (activations not included)."""
        return params * FLOAT32_BYTES * (2 + self.optimizer_states)

    def to_dict(self) -> dict[str, Any]:
        dense_bytes = self.training_bytes(self.params)
        lorita_bytes = self.training_bytes(self.training_params)
        return {
            "arch": self.arch,
            "norm_mode": self.norm_mode,
            "factors": self.factors,
            "input_shape": self.input_shape,
            "num_classes": self.num_classes,
            "params": self.params,
            "flops": self.flops,
            "composed": [dataclasses.asdict(lp) for lp in self.composed],
            "skipped": [dataclasses.asdict(lp) for lp in self.skipped],
            "training": {
                "factor_params": self.factor_params,
                "composed_dense_params": self.composed_dense_params,
                "extra_params": self.extra_params,
                "trainable_params": self.training_params,
                "optimizer": self.optimizer,
                "optimizer_states_per_param": self.optimizer_states,
                "memory_bytes": {
                    "dense": dense_bytes,
                    "lorita": lorita_bytes,
                    "extra": lorita_bytes - dense_bytes,
                    "note": "parameters + gradients + optimizer states in float32; activations excluded",
                },
            },
        }


def optimizer_states(optimizer: str, momentum: float = 0.9) -> int:
    """float32 numbers kept per parameter: Adam/AdamW two moments, SGD one momentum buffer."""
    if optimizer in ("adam", "adamw"):
        return 2
    if optimizer == "sgd":
        return 1 if momentum > 0 else 0
    raise ValueError(f"unknown optimizer {optimizer!r}")


def plan_model(
    model: nn.Module,
    input_shape: Sequence[int],
    factors: int,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    optimizer: str = "adam",
    momentum: float = 0.9,
) -> Plan:
    """The plan for ``model`` (left unchanged): targets, factor cost, parameters and FLOPs."""
    from core.lorita import factor_parameters
    from core.metrics import count_flops, count_params
    from core.program.job import compose, targets_of

    targets = targets_of(model, include, exclude)
    layers = [
        LayerPlan(t.name, t.kind, list(t.shape), list(t.matrix_shape), t.eligible, t.reason) for t in targets
    ]
    shape = tuple(int(s) for s in input_shape)
    plan = Plan(
        factors=factors,
        input_shape=list(shape),
        num_classes=0,
        params=count_params(model),
        flops=count_flops(model, shape),
        layers=layers,
        optimizer=optimizer,
        optimizer_states=optimizer_states(optimizer, momentum),
    )
    if factors >= 2:
        # Count on a real composed copy, so the figure is what training will hold.
        composed = copy.deepcopy(model)
        done = compose(composed, factors, include, exclude, init="scratch", seed=0)
        plan.factor_params = factor_parameters(composed)
        plan.composed_dense_params = sum(_numel(t.shape) for t in done)
    return plan


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def plan_job(config: JobConfig) -> Plan:
    """The plan of a job config: builds the model for the config's data, trains nothing."""
    from core.data import load_job_data
    from core.stages import build, layer_space

    data = load_job_data(config)
    model = build(config, data)
    tcfg = config.train
    plan = plan_model(
        model,
        data.input_shape,
        tcfg.factors if tcfg else 1,
        tcfg.include if tcfg else (),
        tcfg.exclude if tcfg else (),
        optimizer=tcfg.optimizer if tcfg else "adam",
        momentum=tcfg.momentum if tcfg else 0.9,
    )
    from core.program.job import classes_of, norm_mode_of

    plan.num_classes = classes_of(model) or config.model.num_classes or data.num_classes
    plan.arch = config.model.label
    plan.norm_mode = norm_mode_of(model)
    if tcfg is not None:
        from core.program.job import targets_of

        targets = targets_of(model, tcfg.include, tcfg.exclude)
        chains = set(layer_space(model, targets, data.input_shape, tcfg))
        for lp, t in zip(plan.layers, targets, strict=True):
            if lp.composed and t.module in chains:
                lp.space = "layer"
    if tcfg is None:  # compress-only job: nothing is composed or trained
        plan.factors = 0
        for lp in plan.layers:
            if lp.composed:
                lp.composed, lp.reason = False, "no training in this job (train is null)"
    return plan
