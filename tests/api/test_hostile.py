"""Hostile input (issue 11): each case was a 500, a memory or disk blow-up, or a job accepted that
could never run. Every one is refused with a 4xx that says what to change, before anything heavy."""

from __future__ import annotations

import io
import json
import math
import struct
import tarfile
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from safetensors.torch import save_file
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from store.models import Dataset, Job, ModelRecord
from store.settings import Settings
from tests.api.conftest import Caller

pytestmark = pytest.mark.postgres


# ---------------------------------------------------------------- builders


def png_bytes(value: int, size: tuple[int, int] = (6, 5)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (value, value, value)).save(buf, format="PNG")
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def huge_png_header(width: int, height: int) -> bytes:
    """A valid PNG header announcing width x height pixels, with one tiny (wrong) IDAT: a few
    hundred bytes that claim a picture too large to decode."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def zip_bytes(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


def tar_bytes(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def npz_bytes(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    return buf.getvalue()


def _npy_header(shape: tuple[int, ...], dtype: str) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": np.dtype(dtype).str, "fortran_order": False, "shape": shape}
    )
    return buf.getvalue()  # magic, length and the header dict


@pytest.fixture(scope="module")
def npz_bomb(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """About 1.5 MB on the wire; x_train inflates to 1.5 GB of float32 zeros."""
    path = tmp_path_factory.mktemp("bomb") / "bomb.npz"
    n, d = 375_000, 1000  # 375M float32 values = 1.5 GB
    chunk = b"\0" * (16 * 1024 * 1024)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        with zf.open("x_train.npy", "w", force_zip64=True) as f:
            f.write(_npy_header((n, d), "<f4"))
            left = n * d * 4
            while left > 0:
                f.write(chunk[: min(left, len(chunk))])
                left -= len(chunk)
        for key, arr in (
            ("y_train", np.arange(n) % 2),
            ("x_test", np.zeros((4, d), np.float32)),
            ("y_test", np.arange(4) % 2),
        ):
            with zf.open(f"{key}.npy", "w") as f:
                np.lib.format.write_array(f, arr)
    return path.read_bytes()


def post_dataset(client: TestClient, caller: Caller, filename: str, data: bytes) -> Any:
    return client.post("/v1/datasets", headers=caller.headers, files={"file": (filename, io.BytesIO(data))})


def post_model(client: TestClient, caller: Caller, filename: str, data: bytes, **form: str) -> Any:
    fields = {"arch": "fcn", "num_classes": "10", "input_shape": "64"} | form
    return client.post(
        "/v1/models", headers=caller.headers, data=fields, files={"file": (filename, io.BytesIO(data))}
    )


def rows(session: Session, table: Any) -> int:
    return session.scalar(select(func.count()).select_from(table)) or 0


def stored_files(settings: Settings) -> list[Path]:
    root = Path(settings.artifact_dir)
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


def detail(resp: Any) -> str:
    return str(resp.json()["detail"])


# ---------------------------------------------------------------- 500s: query integers


@pytest.mark.parametrize("path", ["/v1/jobs", "/v1/models", "/v1/datasets"])
def test_offset_past_any_integer_column_is_422(client: TestClient, alice: Caller, path: str) -> None:
    resp = client.get(path, headers=alice.headers, params={"offset": 9223372036854775808})

    assert resp.status_code == 422, resp.text
    assert "offset" in detail(resp)


def test_events_after_id_past_the_id_range_is_422(client: TestClient, alice: Caller) -> None:
    job = client.post("/v1/jobs", headers=alice.headers, json=DIGITS_JOB).json()

    resp = client.get(
        f"/v1/jobs/{job['id']}/events", headers=alice.headers, params={"after_id": 99999999999999999999}
    )

    assert resp.status_code == 422, resp.text
    assert "after_id" in detail(resp)


# ---------------------------------------------------------------- archives


def test_zip_with_a_30000x30000_png_is_422_naming_the_pixel_cap(
    client: TestClient, alice: Caller, session: Session, settings: Settings
) -> None:
    data = zip_bytes({"a/0.png": huge_png_header(30000, 30000), "b/0.png": png_bytes(1)})

    resp = post_dataset(client, alice, "bomb.zip", data)

    assert resp.status_code == 422, resp.text
    assert "0.png" in detail(resp) and "pixels" in detail(resp)
    assert rows(session, Dataset) == 0 and stored_files(settings) == []


def test_every_image_is_checked_not_only_the_first(
    client: TestClient, alice: Caller, session: Session, settings: Settings
) -> None:
    data = zip_bytes({"a/0.png": png_bytes(1), "a/1.png": b"not an image", "b/0.png": png_bytes(2)})

    resp = post_dataset(client, alice, "mixed.zip", data)

    assert resp.status_code == 422, resp.text
    assert "a/1.png" in detail(resp)
    assert rows(session, Dataset) == 0 and stored_files(settings) == []


def test_a_huge_image_that_is_not_the_first_is_refused(
    client: TestClient, alice: Caller, session: Session
) -> None:
    data = zip_bytes(
        {"a/0.png": png_bytes(1), "b/0.png": png_bytes(2), "b/1.png": huge_png_header(20000, 20000)}
    )

    resp = post_dataset(client, alice, "late.zip", data)

    assert resp.status_code == 422, resp.text
    assert "b/1.png" in detail(resp)
    assert rows(session, Dataset) == 0


def test_zip_declaring_a_1_gib_entry_is_refused_before_extracting(
    client: TestClient, alice: Caller, session: Session, settings: Settings, tmp_path: Path
) -> None:
    path = tmp_path / "big.zip"
    chunk = b"\0" * (16 * 1024 * 1024)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        zf.writestr("a/0.png", png_bytes(1))
        zf.writestr("b/0.png", png_bytes(2))
        with zf.open("b/huge.png", "w", force_zip64=True) as f:
            for _ in range(64):  # 1 GiB of zeros, about 1 MB compressed
                f.write(chunk)
    assert path.stat().st_size < 2 * 1024 * 1024

    resp = post_dataset(client, alice, "big.zip", path.read_bytes())

    assert resp.status_code == 422, resp.text
    assert "b/huge.png" in detail(resp)
    assert rows(session, Dataset) == 0 and stored_files(settings) == []


def test_truncated_tar_is_refused(client: TestClient, alice: Caller, session: Session) -> None:
    entries = {f"{c}/{i}.png": png_bytes(i, (16, 16)) for c in ("a", "b") for i in range(4)}
    whole = tar_bytes(entries)
    # cut at a member boundary: the first five members survive, intact; the end-of-archive marker does not
    with tarfile.open(fileobj=io.BytesIO(whole)) as tf:
        members = tf.getmembers()
    cut = whole[: members[5].offset]

    resp = post_dataset(client, alice, "cut.tar", cut)

    assert resp.status_code == 422, resp.text
    assert "truncated" in detail(resp) or "incomplete" in detail(resp)
    assert rows(session, Dataset) == 0


def test_truncated_tar_gz_is_refused(client: TestClient, alice: Caller, session: Session) -> None:
    entries = {f"{c}/{i}.png": png_bytes(i, (16, 16)) for c in ("a", "b") for i in range(4)}
    whole = zlib.compressobj(6, zlib.DEFLATED, 31)
    gz = whole.compress(tar_bytes(entries)) + whole.flush()

    resp = post_dataset(client, alice, "cut.tar.gz", gz[: len(gz) * 2 // 3])

    assert resp.status_code == 422, resp.text
    assert rows(session, Dataset) == 0


def test_archive_past_the_entry_cap_is_refused_before_extracting_anything(
    make_client: Any, settings: Settings, alice: Caller, session: Session, tmp_path: Path
) -> None:
    client = make_client(settings.model_copy(update={"max_archive_files": 50}))
    # the first entries are fine images; a streaming extractor would write 50 of them first
    data = zip_bytes({f"{'ab'[i % 2]}/{i}.png": png_bytes(i % 200) for i in range(51)})
    scratch_files: list[Path] = []

    resp = post_dataset(client, alice, "many.zip", data)

    assert resp.status_code == 422, resp.text
    assert "51" in detail(resp) and "50" in detail(resp)
    assert rows(session, Dataset) == 0 and stored_files(settings) == scratch_files


def test_tar_past_the_entry_cap_is_refused_naming_the_count(
    make_client: Any, settings: Settings, alice: Caller, session: Session
) -> None:
    client = make_client(settings.model_copy(update={"max_archive_files": 50}))
    data = tar_bytes({f"{'ab'[i % 2]}/{i}.png": png_bytes(i % 200) for i in range(51)})

    resp = post_dataset(client, alice, "many.tar", data)

    assert resp.status_code == 422, resp.text
    assert "more than 50" in detail(resp)
    assert rows(session, Dataset) == 0


# ---------------------------------------------------------------- .npz


def test_npz_bomb_is_refused_from_its_headers(
    client: TestClient, alice: Caller, session: Session, npz_bomb: bytes
) -> None:
    assert len(npz_bomb) < 3 * 1024 * 1024

    resp = post_dataset(client, alice, "bomb.npz", npz_bomb)

    assert resp.status_code == 422, resp.text
    assert "x_train" in detail(resp) and "375000000 values" in detail(resp)
    assert rows(session, Dataset) == 0


@pytest.mark.parametrize(
    ("arrays", "needle"),
    [
        (
            {
                "x_train": np.zeros((20, 0), np.float32),
                "y_train": np.arange(20) % 2,
                "x_test": np.zeros((4, 0), np.float32),
                "y_test": np.arange(4) % 2,
            },
            "x_train",
        ),
        (
            {
                "x_train": np.zeros((2, 8), np.float32),
                "y_train": np.array([0, 1]),
                "x_test": np.zeros((1, 8), np.float32),
                "y_test": np.array([0]),
            },
            "too few",
        ),
    ],
    ids=["zero-size-samples", "two-samples"],
)
def test_npz_that_can_never_train_is_refused_at_upload(
    client: TestClient, alice: Caller, session: Session, arrays: dict[str, np.ndarray], needle: str
) -> None:
    resp = post_dataset(client, alice, "mine.npz", npz_bytes(**arrays))

    assert resp.status_code == 422, resp.text
    assert needle in detail(resp)
    assert rows(session, Dataset) == 0


def test_npz_errors_name_the_users_file(client: TestClient, alice: Caller) -> None:
    data = npz_bytes(x=np.zeros((4, 2), np.float32))

    resp = post_dataset(client, alice, "holiday-photos.npz", data)

    assert resp.status_code == 422
    assert "holiday-photos.npz" in detail(resp) and "upload.npz" not in detail(resp)


# ---------------------------------------------------------------- model uploads


def test_one_byte_model_with_a_huge_width_is_refused_before_building(
    client: TestClient, alice: Caller, session: Session
) -> None:
    resp = post_model(client, alice, "w.safetensors", b"\0", options=json.dumps({"width": 16000}))

    assert resp.status_code == 422, resp.text
    assert "parameters" in detail(resp) and "width" in detail(resp)
    assert rows(session, ModelRecord) == 0


def test_model_options_are_checked_per_architecture_at_upload(client: TestClient, alice: Caller) -> None:
    resp = post_model(client, alice, "w.safetensors", b"\0", options=json.dumps({"widht": 16}))

    assert resp.status_code == 422, resp.text
    assert "widht" in detail(resp)


def test_nan_weights_are_refused_at_upload(
    client: TestClient, alice: Caller, session: Session, tmp_path: Path
) -> None:
    from core.zoo import build_model

    state = {
        k: v.clone() for k, v in build_model("fcn", 10, (64,), {"depth": 2, "width": 16}).state_dict().items()
    }
    name = next(k for k, v in state.items() if v.is_floating_point() and v.ndim == 2)
    state[name][0, 0] = float("nan")
    path = tmp_path / "nan.safetensors"
    save_file(state, str(path))

    resp = post_model(
        client, alice, "nan.safetensors", path.read_bytes(), options=json.dumps({"depth": 2, "width": 16})
    )

    assert resp.status_code == 422, resp.text
    assert name in detail(resp) and "NaN" in detail(resp)
    assert rows(session, ModelRecord) == 0


class PickledNote:
    """A custom class: pickled by reference, so a weights-only load refuses it."""


def test_torch_internal_text_never_reaches_the_user(
    client: TestClient, alice: Caller, tmp_path: Path
) -> None:
    path = tmp_path / "ckpt.pt"
    torch.save({"fc.weight": torch.zeros(2, 2), "note": PickledNote()}, path)

    resp = post_model(client, alice, "ckpt.pt", path.read_bytes())

    assert resp.status_code == 422, resp.text
    text = detail(resp)
    for internal in (
        "weights_only",
        "WeightsUnpickler",
        "Unsupported global",
        "add_safe_globals",
        "PickledNote",
    ):
        assert internal not in text
    assert "torch.save(model.state_dict(), path)" in text


# ---------------------------------------------------------------- job configs


DIGITS_JOB: dict[str, Any] = {
    "model": {"arch": "fcn", "options": {"depth": 2, "width": 16}},
    "dataset": {"name": "digits"},
    "train": {"epochs": 1},
    "compress": {"policy": "uniform", "keep": 0.5},
}


def _with(path: str, value: Any) -> dict[str, Any]:
    config = json.loads(json.dumps(DIGITS_JOB))
    *parents, leaf = path.split(".")
    node = config
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = value
    return config


@pytest.mark.parametrize(
    ("config", "field"),
    [
        (_with("model.options", {"widht": 16}), "model.options"),
        (_with("model.options", {"width": 1_000_000}), "model.options"),
        (_with("train.seed", 10**30), "train.seed"),
        (
            _with("dataset", {"name": "synthetic", "num_classes": 3, "input_shape": [3, 100000, 100000]}),
            "dataset.input_shape",
        ),
        (
            _with("dataset", {"name": "synthetic", "num_classes": 3, "input_shape": [-1, 8]}),
            "dataset.input_shape",
        ),
        (_with("measure.batch_sizes", [1e9]), "measure.batch_sizes"),
        (_with("train.include", ["*"] * 20_000), "train.include"),
    ],
    ids=[
        "option-typo",
        "width-1e6",
        "seed-1e30",
        "input-3x1e5x1e5",
        "input-negative",
        "batch-1e9",
        "20k-patterns",
    ],
)
def test_config_that_can_never_run_is_422_naming_the_field(
    client: TestClient, alice: Caller, session: Session, config: dict[str, Any], field: str
) -> None:
    resp = client.post("/v1/jobs", headers=alice.headers, json=config)

    assert resp.status_code == 422, resp.text
    assert field in detail(resp)
    assert rows(session, Job) == 0


@pytest.mark.parametrize("literal", ["Infinity", "-Infinity", "NaN"])
def test_non_finite_numbers_are_refused_not_stored_as_null(
    client: TestClient, alice: Caller, session: Session, literal: str
) -> None:
    body = json.dumps(DIGITS_JOB)[:-1] + f', "finetune": {{"epochs": 1, "lr": {literal}}}}}'

    resp = client.post(
        "/v1/jobs", headers=alice.headers | {"Content-Type": "application/json"}, content=body.encode()
    )

    assert resp.status_code == 422, resp.text
    assert "finetune.lr" in detail(resp)
    assert rows(session, Job) == 0


def test_non_finite_numbers_inside_model_options_are_refused(
    client: TestClient, alice: Caller, session: Session
) -> None:
    body = json.dumps(DIGITS_JOB).replace('"width": 16', '"width": 16, "extra": NaN')

    resp = client.post(
        "/v1/jobs", headers=alice.headers | {"Content-Type": "application/json"}, content=body.encode()
    )

    assert resp.status_code == 422, resp.text
    assert rows(session, Job) == 0


def test_a_25_mb_config_is_refused_by_the_json_body_cap(
    client: TestClient, alice: Caller, session: Session
) -> None:
    patterns = ",".join(['"ab"'] * 5_000_000)
    body = json.dumps(DIGITS_JOB)[:-1] + f', "train": {{"include": [{patterns}]}}}}'
    assert len(body) > 24_000_000  # 25 MB

    resp = client.post(
        "/v1/jobs", headers=alice.headers | {"Content-Type": "application/json"}, content=body.encode()
    )

    assert resp.status_code == 413, resp.text
    assert "LORITA_MAX_JSON_BYTES" in detail(resp)
    assert rows(session, Job) == 0


def test_synthetic_data_too_large_to_hold_is_refused(client: TestClient, alice: Caller) -> None:
    config = _with(
        "dataset",
        {"name": "synthetic", "num_classes": 3, "input_shape": [3, 1024, 1024], "n_train": 200_000},
    )

    resp = client.post("/v1/jobs", headers=alice.headers, json=config)

    assert resp.status_code == 422, resp.text
    assert "dataset" in detail(resp)
    assert math.prod([3, 1024, 1024]) > 0


def test_uploads_past_the_concurrent_validation_slots_get_503_with_retry_after(
    client: TestClient, alice: Caller, session: Session
) -> None:
    from api.uploads import ValidationSlots

    slots = ValidationSlots(capacity=1, wait_seconds=0.05)
    client.app.state.validation_slots = slots  # type: ignore[attr-defined]
    data = npz_bytes(
        x_train=np.zeros((20, 4), np.float32),
        y_train=np.arange(20) % 2,
        x_test=np.zeros((4, 4), np.float32),
        y_test=np.arange(4) % 2,
    )
    with slots.hold():  # another upload is being checked
        busy = post_dataset(client, alice, "a.npz", data)

    assert busy.status_code == 503, busy.text
    assert int(busy.headers["Retry-After"]) > 0
    assert rows(session, Dataset) == 0
    assert post_dataset(client, alice, "a.npz", data).status_code == 201


def test_an_npz_recorded_before_the_upload_checks_is_refused_at_submit(
    client: TestClient, alice: Caller, session: Session
) -> None:
    record = Dataset(
        tenant_id=alice.tenant.id,
        name="old.npz",
        kind="npz",
        num_classes=2,
        input_shape=[8],
        n_train=2,
        n_test=1,
        size_bytes=100,
        sha256="0" * 64,
        location="tenants/x/datasets/y/data.npz",
    )
    session.add(record)
    session.flush()
    config = _with("dataset", {"id": record.id})

    resp = client.post("/v1/jobs", headers=alice.headers, json=config)

    assert resp.status_code == 422, resp.text
    assert "dataset.id" in detail(resp) and "2 training samples" in detail(resp)
    assert rows(session, Job) == 0


# ---------------------------------------------------------------- sweep 2: each case was a 500,
# a leak of torch's internals, or a good upload refused


ID_ROUTES = [
    ("GET", "/v1/models/{}"),
    ("DELETE", "/v1/models/{}"),
    ("GET", "/v1/datasets/{}"),
    ("DELETE", "/v1/datasets/{}"),
    ("GET", "/v1/jobs/{}"),
    ("DELETE", "/v1/jobs/{}"),
    ("POST", "/v1/jobs/{}/cancel"),
    ("GET", "/v1/jobs/{}/events"),
    ("GET", "/v1/jobs/{}/report"),
    ("GET", "/v1/jobs/{}/artifacts"),
    ("GET", "/v1/jobs/{}/artifacts/model%00.onnx"),
    ("GET", "/v1/jobs/{}/stream"),
]


@pytest.mark.parametrize(("method", "path"), ID_ROUTES, ids=[f"{m} {p}" for m, p in ID_ROUTES])
def test_a_nul_in_the_url_path_is_404_saying_so(
    client: TestClient, alice: Caller, method: str, path: str
) -> None:
    resp = client.request(method, path.format("a%00b"), headers=alice.headers)

    assert resp.status_code == 404, resp.text
    assert "NUL character (%00)" in detail(resp)


def _job_text(config: dict[str, Any], old: str, new: str) -> bytes:
    text = json.dumps(config)
    assert old in text
    return text.replace(old, new, 1).encode()


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/v1/jobs", _job_text(DIGITS_JOB, '"model": {', '"name": "a\\u0000b", "model": {'), "name:"),
        (
            "/v1/jobs",
            _job_text(DIGITS_JOB, '"dataset": {"name": "digits"}', '"dataset": {"id": "\\u0000"}'),
            "dataset.id:",
        ),
        (
            "/v1/jobs",
            _job_text(DIGITS_JOB, '"arch": "fcn"', '"arch": "fcn", "weights": "\\ud800"'),
            "model.weights:",
        ),
        (
            "/v1/jobs",
            _job_text(DIGITS_JOB, '"epochs": 1', '"epochs": 1, "include": ["\\u0000"]'),
            "train.include.0:",
        ),
        (
            "/v1/plan",
            _job_text(DIGITS_JOB, '"dataset": {"name": "digits"}', '"dataset": {"id": "x\\u0000"}'),
            "dataset.id:",
        ),
    ],
    ids=["job-name-nul", "dataset-id-nul", "weights-surrogate", "include-nul", "plan-dataset-id-nul"],
)
def test_text_the_database_cannot_store_is_422_naming_the_field(
    client: TestClient, alice: Caller, session: Session, path: str, body: bytes, field: str
) -> None:
    resp = client.post(path, headers=alice.headers | {"Content-Type": "application/json"}, content=body)

    assert resp.status_code == 422, resp.text
    assert detail(resp).startswith(field) and "remove it" in detail(resp)
    assert rows(session, Job) == 0


def test_a_nul_in_a_derived_jobs_name_is_422(client: TestClient, alice: Caller, session: Session) -> None:
    from store.models import Artifact

    parent = client.post("/v1/jobs", headers=alice.headers, json=DIGITS_JOB).json()["id"]
    job = session.get(Job, parent)
    assert job is not None
    job.status = "succeeded"
    session.add(
        Artifact(job_id=parent, name="dense/model.safetensors", size_bytes=1, sha256="0" * 64, location="x")
    )
    session.commit()

    resp = client.post(
        f"/v1/jobs/{parent}/select",
        headers=alice.headers,
        json={"compress": {"policy": "uniform", "keep": 0.5}, "name": "a\u0000b"},
    )

    assert resp.status_code == 422, resp.text
    assert detail(resp).startswith("name: the text holds a NUL character")
    assert rows(session, Job) == 1


GOOD_NPZ = npz_bytes(
    x_train=np.zeros((20, 4), np.float32),
    y_train=np.arange(20) % 2,
    x_test=np.zeros((4, 4), np.float32),
    y_test=np.arange(4) % 2,
)


@pytest.mark.parametrize("path", ["/v1/datasets", "/v1/models"])
def test_a_nul_in_an_uploads_name_is_422_and_nothing_is_kept(
    client: TestClient, alice: Caller, session: Session, settings: Settings, path: str
) -> None:
    form = {"arch": "fcn", "num_classes": "10", "input_shape": "64"} if path == "/v1/models" else {}

    resp = client.post(
        path, headers=alice.headers, data=form | {"name": "a\x00b"}, files={"file": ("a.npz", GOOD_NPZ)}
    )

    assert resp.status_code == 422, resp.text
    assert detail(resp) == "name: the text holds a NUL character (\\u0000); remove it"
    assert rows(session, Dataset) + rows(session, ModelRecord) == 0
    assert stored_files(settings) == []


def test_an_archive_without_any_image_is_422_naming_the_layout(
    client: TestClient, alice: Caller, session: Session
) -> None:
    resp = post_dataset(client, alice, "notes.zip", zip_bytes({"notes.txt": b"no images here"}))

    assert resp.status_code == 422, resp.text
    assert "found 0 class folder(s) with images" in detail(resp) and "<class>/<image>" in detail(resp)
    assert rows(session, Dataset) == 0


@pytest.mark.parametrize(
    "options",
    ["[" * 100_000 + "]" * 100_000, '{"width": ' + "9" * 5000 + "}"],
    ids=["nested-100k-deep", "5000-digit-number"],
)
def test_model_options_the_json_parser_cannot_read_are_422(
    client: TestClient, alice: Caller, session: Session, options: str
) -> None:
    resp = post_model(client, alice, "w.safetensors", b"\0" * 16, options=options)

    assert resp.status_code == 422, resp.text
    assert "options is nested too deeply or holds a number too long" in detail(resp)
    assert rows(session, ModelRecord) == 0


TORCH_INTERNALS = ("Exception raised from", "/pytorch/", "csrc", "unpackLong", "long long")


def test_a_huge_integer_option_is_422_naming_it_without_torchs_internals(
    client: TestClient, alice: Caller, session: Session
) -> None:
    body = _job_text(DIGITS_JOB, '"width": 16', '"width": 1' + "0" * 400)

    job = client.post("/v1/jobs", headers=alice.headers | {"Content-Type": "application/json"}, content=body)
    upload = post_model(client, alice, "w.safetensors", b"\0" * 16, options='{"width": ' + "1" * 30 + "}")

    assert job.status_code == 422, job.text
    assert detail(job) == (
        "model.options.width: a number of 401 digits is far too large; an option is at most 2147483647"
    )
    assert upload.status_code == 422, upload.text
    assert detail(upload).startswith("options.width: a number of 30 digits is far too large")
    for text in (detail(job), detail(upload)):
        assert not any(internal in text for internal in TORCH_INTERNALS)
    assert rows(session, Job) + rows(session, ModelRecord) == 0


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("multipart/form-data", b"--x\r\nabc"),
        (
            "multipart/form-data; boundary=zz",
            b'--x\r\nContent-Disposition: form-data; name="file"\r\n\r\nab\r\n--x--\r\n',
        ),
        ("multipart/form-data; boundary=x", b"--x\r\n\r\nabc\r\n--x--\r\n"),
    ],
    ids=["no-boundary", "wrong-boundary", "part-without-a-name"],
)
@pytest.mark.parametrize("path", ["/v1/datasets", "/v1/models"])
def test_a_broken_multipart_body_is_422_saying_how_to_send_the_file(
    client: TestClient, alice: Caller, path: str, content_type: str, body: bytes
) -> None:
    resp = client.post(path, headers=alice.headers | {"Content-Type": content_type}, content=body)

    assert resp.status_code == 422, resp.text  # was Starlette's 400, which no operation declares
    assert detail(resp).startswith("invalid multipart/form-data body (")
    assert "curl -F file=@" in detail(resp)


@pytest.mark.parametrize(
    ("filename", "shown"),
    [("データ.npz", "_.npz"), ("n" * 250 + ".npz", "n" * 196 + ".npz")],
    ids=["japanese-name", "250-character-name"],
)
def test_an_npz_keeps_its_extension_whatever_its_name(
    client: TestClient, alice: Caller, filename: str, shown: str
) -> None:
    resp = post_dataset(client, alice, filename, GOOD_NPZ)

    assert resp.status_code == 201, resp.text  # was 422 "unsupported dataset file 'npz'"
    assert resp.json()["name"] == shown and resp.json()["kind"] == "npz"


def test_an_empty_idempotency_key_is_422_not_a_replay_of_the_first_job(
    client: TestClient, alice: Caller, session: Session
) -> None:
    resp = client.post("/v1/jobs", headers=alice.headers | {"Idempotency-Key": ""}, json=DIGITS_JOB)

    assert resp.status_code == 422, resp.text
    assert "Idempotency-Key" in detail(resp)
    assert rows(session, Job) == 0


@pytest.mark.parametrize(
    ("body", "cause"),
    [
        (b"[" * 100_000, "nested too deeply"),
        (b'{"train": {"epochs": ' + b"9" * 5000 + b"}}", "a number too long"),
        (b'{"name": "\xff\xfe"}', "not UTF-8"),
    ],
    ids=["nested-100k-deep", "5000-digit-number", "not-utf-8"],
)
def test_a_job_body_that_cannot_be_read_says_why_it_may_be(
    client: TestClient, alice: Caller, session: Session, body: bytes, cause: str
) -> None:
    resp = client.post("/v1/jobs", headers=alice.headers | {"Content-Type": "application/json"}, content=body)

    assert resp.status_code == 422, resp.text
    assert detail(resp).startswith("invalid request: the body cannot be read as JSON")
    assert cause in detail(resp)
    assert rows(session, Job) == 0


def test_a_broken_sign_in_form_is_told_to_sign_in_again_not_to_upload_a_file(client: TestClient) -> None:
    resp = client.post(
        "/ui/login",
        headers={"Content-Type": "multipart/form-data", "Origin": "http://testserver"},
        content=b"--x",
    )

    assert resp.status_code == 422, resp.text
    assert "sign in again from the page" in resp.text and "curl -F file=@" not in resp.text


def test_uploaded_model_options_have_the_bounds_of_a_job_configs(
    client: TestClient, alice: Caller, session: Session
) -> None:
    # a 200,000-item list once took seconds to walk and came back whole inside the message
    long_list = '{"depth": [' + "0," * 200_000 + "0]}"
    deep = '{"width": ' + '{"a": ' * 900 + "1" + "}" * 900 + "}"

    for options in (long_list, deep):
        resp = post_model(client, alice, "w.safetensors", b"\0" * 16, options=options)

        assert resp.status_code == 422, resp.text
        assert "is nested too deep or too long; options are plain values" in detail(resp)
        assert detail(resp).startswith("options: ") and len(detail(resp)) < 200
    assert rows(session, ModelRecord) == 0
