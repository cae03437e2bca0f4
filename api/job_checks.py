"""What ``POST /v1/jobs`` checks beyond the schema: the model's size and the data's, from the
config and the upload records alone (the model is sized on the meta device, nothing is loaded).

A job that passes can be built by a worker within the operator's limits; one that cannot is a
422 naming the field to change, at submission, instead of a failure minutes into its run.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session

from api.errors import AppError
from core.config import JobConfig, RanksPolicy, shown_int
from store.repositories import datasets as dataset_repo
from store.settings import Settings

# (input shape, samples in train + test, classes) of the built-in datasets
_BUILTIN_DATA: dict[str, tuple[tuple[int, ...], int, int]] = {
    "digits": ((64,), 1797, 10),
    "mnist": ((1, 28, 28), 70_000, 10),
    "fashion-mnist": ((1, 28, 28), 70_000, 10),
    "cifar10": ((3, 32, 32), 60_000, 10),
    "cifar100": ((3, 32, 32), 60_000, 100),
}
SYNTHETIC_DEFAULTS = ((3, 32, 32), 2048, 512, 10)  # input_shape, n_train, n_test, num_classes
# The largest integer an architecture option may be. A size past what torch's C++ side can hold
# failed inside torch with its internal message (the source file of torch's build included).
MAX_OPTION_INT = 2**31 - 1


def check_option_sizes(options: Mapping[str, Any], where: str) -> None:
    """422 naming the first integer option (nested ones too) past ``MAX_OPTION_INT``."""
    stack: list[tuple[str, Any]] = [(f"{where}.{k}", v) for k, v in options.items()]
    while stack:
        path, value = stack.pop(0)
        if isinstance(value, Mapping):
            stack += [(f"{path}.{k}", v) for k, v in value.items()]
        elif isinstance(value, list | tuple):
            stack += [(f"{path}.{i}", v) for i, v in enumerate(value)]
        elif isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_OPTION_INT:
            raise AppError(
                422, f"{path}: {shown_int(value)} is far too large; an option is at most {MAX_OPTION_INT}"
            )


def check_ranks_against(full: Mapping[str, int], ranks: Mapping[str, int], owner: str) -> None:
    """A ``ranks`` policy against the full rank of each layer ``owner`` (a model, a parent job)
    has: 422 naming an unknown layer (and the valid ones) or a rank outside 1..its full rank."""
    unknown = [name for name in ranks if name not in full]
    if unknown:
        layers = ", ".join(list(full)[:20]) + (", ..." if len(full) > 20 else "")
        raise AppError(
            422,
            f"compress.ranks: {owner} has no truncatable layer named "
            f"{', '.join(repr(n) for n in unknown[:5])}; its layers are {layers or 'none'}",
        )
    bad = [
        f"{n!r} is {r}, valid 1..{full[n]} (its full rank)"
        for n, r in ranks.items()
        if not 1 <= r <= int(full[n])
    ]
    if bad:
        raise AppError(422, f"compress.ranks: out of range: {'; '.join(bad[:5])}")


def build_error_text(err: Exception) -> str:
    """The first line of an error from building a model: torch appends its C++ context (source
    files of its own build) on the lines after."""
    return str(err).split("\n", 1)[0]


@dataclass(frozen=True)
class DataShape:
    input_shape: tuple[int, ...]
    samples: int
    num_classes: int
    where: str  # the config field a person changes to shrink it


def data_shape(session: Session, tenant_id: str, config: JobConfig) -> DataShape | None:
    """The shape of the job's data as the worker will hold it, or None where it is not known here."""
    ds = config.dataset
    if ds.name == "synthetic":
        default_shape, n_train, n_test, classes = SYNTHETIC_DEFAULTS
        return DataShape(
            tuple(ds.input_shape or default_shape),
            (ds.n_train or n_train) + (ds.n_test or n_test),
            ds.num_classes or classes,
            "dataset",
        )
    if ds.name is not None and ds.name in _BUILTIN_DATA:
        builtin_shape, samples, classes = _BUILTIN_DATA[ds.name]
        return DataShape(builtin_shape, samples, classes, "dataset")
    if ds.id is not None:
        record = dataset_repo.get_for_tenant(session, tenant_id, ds.id)
        if record is None:
            return None  # reported by the reference check
        shape: tuple[int, ...] = tuple(record.input_shape)
        if record.kind == "imagefolder" and ds.image_size is not None:
            shape = (3, ds.image_size, ds.image_size)
        elif record.kind == "imagefolder" and len(record.image_sizes or []) > 1:
            # one clause, no "; ": the page splits a message into fields at "; "
            seen = " and ".join(f"{s['size']} like {s['example']}" for s in record.image_sizes or [])
            raise AppError(
                422,
                f"dataset.image_size: dataset {record.id} holds images of different sizes ({seen}), "
                "so set dataset.image_size (e.g. 32) to resize them all to one square size",
            )
        from core.data import MIN_TRAIN_SAMPLES  # core.data imports torch: not at the API's start

        if record.kind == "npz" and (record.n_train < MIN_TRAIN_SAMPLES or math.prod(shape) == 0):
            # uploads are refused like this since issue 11; a record from before can still exist
            raise AppError(
                422,
                f"dataset.id: dataset {record.id} has {record.n_train} training samples of shape "
                f"{list(shape)}; a job needs at least {MIN_TRAIN_SAMPLES} samples of at least one "
                "value: upload a larger .npz",
            )
        where = "dataset.image_size" if record.kind == "imagefolder" else "dataset"
        return DataShape(shape, record.n_train + record.n_test, record.num_classes, where)
    return None


def check_job_size(session: Session, tenant_id: str, config: JobConfig, settings: Settings) -> None:
    """422 when the job's data or model is past the operator's limits, or its options do not build."""
    data = data_shape(session, tenant_id, config)
    if data is None:
        return
    values = data.samples * math.prod(data.input_shape)
    if values > settings.max_dataset_values:
        raise AppError(
            422,
            f"{data.where}: {data.samples} samples of shape {list(data.input_shape)} are {values} values, "
            f"more than the {settings.max_dataset_values} a worker holds (LORITA_MAX_DATASET_VALUES); "
            "use fewer or smaller samples",
        )
    model = config.model
    arch = getattr(model, "arch", None)
    if not isinstance(arch, str):
        return  # an uploaded program is checked when it is uploaded
    from core import zoo

    check_option_sizes(model.options, "model.options")
    num_classes = model.num_classes or data.num_classes
    try:
        meta = zoo.build_meta_model(arch, num_classes, data.input_shape, model.options)
    except (ValueError, TypeError) as err:
        raise AppError(
            422, f"model.options: {arch} cannot be built with these settings: {build_error_text(err)}"
        ) from None
    count = zoo.count_parameters(meta)
    if count > settings.max_model_parameters:
        raise AppError(
            422,
            f"model.options: {arch} with options {json.dumps(model.options)} on inputs of shape "
            f"{list(data.input_shape)} has {count} parameters, more than the {settings.max_model_parameters} "
            "accepted (LORITA_MAX_MODEL_PARAMETERS); lower its size options (width, depth, width_mult...)",
        )
    if isinstance(config.compress, RanksPolicy):
        from core.layers import full_ranks

        # the layers the worker's SVD will see: the trained model is collapsed back to this one
        check_ranks_against(full_ranks(meta), config.compress.ranks, arch)
