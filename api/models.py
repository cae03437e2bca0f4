"""``/v1/models``: uploaded weights for a named architecture, checked against it before storing,
or (without ``arch``) a torch.export program validated as data (:mod:`api.programs`)."""

from __future__ import annotations

import json
import shutil
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Query, UploadFile

from api.deps import CurrentTenant, SessionDep, SettingsDep, StoreDep
from api.errors import AppError, not_found
from api.job_checks import build_error_text, check_option_sizes
from api.limits import Offset, check_text
from api.quotas import check_upload
from api.schemas import ModelRead, ModelsRead
from api.uploads import ValidationSlotsDep, clean_filename, commit_record, save_upload
from core.config import check_options
from store.artifacts import model_key
from store.models import ModelRecord, new_id
from store.repositories import models as model_repo

router = APIRouter(prefix="/v1/models", tags=["models"])

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


def parse_input_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(p) for p in text.replace("x", ",").split(",") if p.strip())
    except ValueError:
        shape = ()
    if not shape or len(shape) > 3 or any(s < 1 or s > 100_000 for s in shape):
        raise AppError(422, f"input_shape {text!r} is not valid: give 1 to 3 positive sizes, e.g. '3,32,32'")
    return shape


def _refuse_non_finite(literal: str) -> Any:
    raise AppError(422, f"options holds {literal}; give finite numbers")


def parse_options(text: str | None) -> dict[str, Any]:
    if text is None or not text.strip():
        return {}
    try:
        options = json.loads(text, parse_constant=_refuse_non_finite)
    except json.JSONDecodeError as err:
        raise AppError(
            422, f'options is not valid JSON ({err}); send a JSON object, e.g. {{"depth": 3}}'
        ) from None
    except (ValueError, RecursionError):
        # nesting past the parser's recursion limit, or an integer of thousands of digits
        raise AppError(
            422,
            "options is nested too deeply or holds a number too long to read; send a flat JSON object "
            'of options, e.g. {"depth": 3}',
        ) from None
    if not isinstance(options, dict):
        raise AppError(422, 'options must be a JSON object, e.g. {"depth": 3}')
    try:  # the bounds a job config's model.options has: a 200,000-item list took seconds to walk
        check_options(options)
    except ValueError as err:
        raise AppError(422, f"options: {err}") from None
    check_text(options, "options")
    return options


def sized_model(
    arch: str, num_classes: int, input_shape: tuple[int, ...], options: dict[str, Any], max_parameters: int
) -> Any:
    """The architecture on the meta device (shapes only, no memory), refused past the parameter
    limit: nothing of that size is ever built or read in the API."""
    from core import zoo  # torch is imported on first upload, not at startup

    check_option_sizes(options, "options")
    try:
        model = zoo.build_meta_model(arch, num_classes, input_shape, options)
    except (ValueError, TypeError) as err:
        raise AppError(422, f"cannot build {arch} with these settings: {build_error_text(err)}") from None
    count = zoo.count_parameters(model)
    if count > max_parameters:
        raise AppError(
            422,
            f"{arch} with options {json.dumps(options)} has {count} parameters, more than the "
            f"{max_parameters} accepted (LORITA_MAX_MODEL_PARAMETERS); lower its size options "
            "(width, depth, width_mult...)",
        )
    return model


def check_upload_against_arch(path: Any, model: Any) -> None:
    """Check the file's keys and shapes fit ``model`` (from ``sized_model``) and its values are
    finite, one tensor at a time; 422 otherwise."""
    from core import export

    try:
        export.check_weights_file(model, path)
    except export.WeightsError as err:
        raise AppError(422, str(err)) from None


@router.post(
    "", status_code=201, response_model=ModelRead, summary="Upload weights for an architecture, or a program"
)
def upload_model(
    session: SessionDep,
    tenant: CurrentTenant,
    settings: SettingsDep,
    store: StoreDep,
    slots: ValidationSlotsDep,
    file: Annotated[
        UploadFile,
        File(
            description="Weights: .safetensors, or a weights-only PyTorch state_dict. Without arch: a "
            "torch.export program (.pt2, torch.export.save, dynamic batch dimension)."
        ),
    ],
    arch: Annotated[
        str | None,
        Form(description="Architecture, e.g. fcn, resnet20, torchvision:resnet18; leave out for a program."),
    ] = None,
    num_classes: Annotated[int | None, Form(ge=2, le=100_000, description="With arch.")] = None,
    input_shape: Annotated[
        str | None, Form(description="With arch: input shape without the batch, e.g. '3,32,32' or '64'.")
    ] = None,
    options: Annotated[str | None, Form(description="Architecture options as a JSON object.")] = None,
    name: Annotated[str | None, Form(max_length=200)] = None,
) -> ModelRecord:
    """Stream the file to disk (capped at LORITA_MAX_UPLOAD_BYTES), check that its tensors fit the
    architecture key by key and shape by shape, then store it. Pickled code is never executed:
    PyTorch files are read with ``torch.load(weights_only=True)``.

    Without ``arch`` the file is a torch.export program: validated as data (no pickle, allow-listed
    ops, dynamic batch) and stored as a model of kind ``program``; its class count and input shape
    come from the file. Name it in a job as ``{"model": {"program": "<id>"}}``."""
    from core.zoo import check_arch

    check_text(name, "name")
    if arch is None:
        from api.programs import upload_program

        form = {"num_classes": num_classes, "input_shape": input_shape, "options": options}
        return upload_program(session, tenant.id, settings, store, slots, file, name, form)
    if num_classes is None or input_shape is None:
        raise AppError(422, "weights need num_classes and input_shape with arch (e.g. 10 and '3,32,32')")
    try:
        check_arch(arch)
    except ValueError as err:
        raise AppError(422, str(err)) from None
    shape = parse_input_shape(input_shape)
    opts = parse_options(options)
    model = sized_model(arch, num_classes, shape, opts, settings.max_model_parameters)
    filename = clean_filename(file.filename, "weights.safetensors")
    suffix = next((s for s in WEIGHT_SUFFIXES if filename.lower().endswith(s)), ".safetensors")

    scratch = store.temp_dir()
    try:
        upload = scratch / f"upload{suffix}"
        size, sha256 = save_upload(file.file, upload, settings.max_upload_bytes)
        check_upload(session, tenant.id, size, settings)  # the tenant's stored-bytes quota
        with slots.hold():
            check_upload_against_arch(upload, model)
        model_id = new_id()
        key = model_key(tenant.id, model_id, f"weights{suffix}")
        store.put_file(key, upload)
        record = ModelRecord(
            id=model_id,
            tenant_id=tenant.id,
            name=name or filename,
            arch=arch,
            num_classes=num_classes,
            input_shape=list(shape),
            options=opts,
            filename=filename,
            size_bytes=size,
            sha256=sha256,
            location=key,
        )
        commit_record(
            session, lambda: model_repo.add(session, record), store, model_key(tenant.id, model_id, "")
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return record


@router.get("", response_model=ModelsRead, summary="List uploaded models")
def list_models(
    session: SessionDep,
    tenant: CurrentTenant,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    offset: Offset = 0,
) -> ModelsRead:
    records, count = model_repo.list_for_tenant(session, tenant.id, limit=limit, offset=offset)
    return ModelsRead(data=[ModelRead.model_validate(r) for r in records], count=count)


@router.get("/{model_id}", response_model=ModelRead, summary="Get an uploaded model")
def get_model(model_id: str, session: SessionDep, tenant: CurrentTenant) -> ModelRecord:
    record = model_repo.get_for_tenant(session, tenant.id, model_id)
    if record is None:
        raise not_found("model", model_id)
    return record
