"""POST/GET /v1/datasets: .npz checks and safe archive extraction; nothing is kept on failure."""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from store.models import Dataset
from store.settings import Settings
from tests.api.conftest import Caller

pytestmark = pytest.mark.postgres


def post_file(client: TestClient, caller: Caller, filename: str, data: bytes, **form: str) -> Any:
    return client.post(
        "/v1/datasets", headers=caller.headers, data=form, files={"file": (filename, io.BytesIO(data))}
    )


def npz_bytes(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]
    return buf.getvalue()


def png_bytes(value: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (6, 5), (value, value, value)).save(buf, format="PNG")
    return buf.getvalue()


def dataset_rows(session: Session) -> int:
    return session.scalar(select(func.count()).select_from(Dataset)) or 0


def store_files(settings: Settings) -> list[Path]:
    root = Path(settings.artifact_dir)
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


def test_npz_upload_records_its_shape_and_counts(client: TestClient, alice: Caller, session: Session) -> None:
    rng = np.random.default_rng(0)
    data = npz_bytes(
        x_train=rng.random((40, 8), dtype=np.float32),
        y_train=np.arange(40) % 4,
        x_test=rng.random((12, 8), dtype=np.float32),
        y_test=np.arange(12) % 4,
    )

    resp = post_file(client, alice, "toy.npz", data, name="toy")

    assert resp.status_code == 201, resp.text
    body = resp.json()
    assert (body["kind"], body["num_classes"], body["input_shape"], body["n_train"], body["n_test"]) == (
        "npz",
        4,
        [8],
        40,
        12,
    )
    row = session.get(Dataset, body["id"])
    assert row is not None and row.tenant_id == alice.tenant.id
    assert client.get(f"/v1/datasets/{body['id']}", headers=alice.headers).json()["name"] == "toy"


def test_npz_with_wrong_keys_names_the_missing_ones(
    client: TestClient, alice: Caller, session: Session, settings: Settings
) -> None:
    data = npz_bytes(x=np.zeros((4, 2), np.float32), y=np.zeros(4, np.int64))

    resp = post_file(client, alice, "bad.npz", data)

    assert resp.status_code == 422
    detail = resp.json()["detail"]
    assert "x_train" in detail and "y_test" in detail
    assert dataset_rows(session) == 0 and store_files(settings) == []


def test_image_folder_zip_is_extracted_and_counted(
    client: TestClient, alice: Caller, session: Session, settings: Settings
) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for split, n in (("train", 3), ("test", 1)):
            for cls, value in (("cat", 10), ("dog", 200)):
                for i in range(n):
                    zf.writestr(f"pets/{split}/{cls}/{i}.png", png_bytes(value))

    resp = post_file(client, alice, "pets.zip", buf.getvalue())

    assert resp.status_code == 201, resp.text
    body = resp.json()
    assert (body["kind"], body["num_classes"], body["input_shape"], body["n_train"], body["n_test"]) == (
        "imagefolder",
        2,
        [3, 5, 6],
        6,
        2,
    )
    row = session.get(Dataset, body["id"])
    assert row is not None
    tree = Path(settings.artifact_dir) / row.location
    assert sorted(p.name for p in (tree / "train").iterdir()) == ["cat", "dog"]


def test_zip_with_parent_path_is_refused_and_nothing_escapes(
    client: TestClient, alice: Caller, session: Session, settings: Settings, tmp_path: Path
) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("cat/0.png", png_bytes(1))
        zf.writestr("../evil", b"owned")
        zf.writestr("../../evil", b"owned")

    resp = post_file(client, alice, "evil.zip", buf.getvalue())

    assert resp.status_code == 422
    assert "'..'" in resp.json()["detail"]
    assert not any(p.name == "evil" for p in tmp_path.rglob("evil"))
    assert dataset_rows(session) == 0 and store_files(settings) == []


@pytest.mark.parametrize("link_type", [tarfile.SYMTYPE, tarfile.LNKTYPE])
def test_tar_with_a_link_is_refused(
    client: TestClient, alice: Caller, session: Session, settings: Settings, link_type: bytes
) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        png = png_bytes(1)
        info = tarfile.TarInfo("cat/0.png")
        info.size = len(png)
        tf.addfile(info, io.BytesIO(png))
        link = tarfile.TarInfo("dog/passwd.png")
        link.type = link_type
        link.linkname = "/etc/passwd"
        tf.addfile(link)

    resp = post_file(client, alice, "links.tar.gz", buf.getvalue())

    assert resp.status_code == 422
    assert "link" in resp.json()["detail"]
    assert dataset_rows(session) == 0 and store_files(settings) == []


def test_archive_over_the_file_cap_is_refused(
    make_client: Any, settings: Settings, alice: Caller, session: Session
) -> None:
    client = make_client(settings.model_copy(update={"max_archive_files": 3}))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for i in range(4):
            zf.writestr(f"c{i % 2}/{i}.png", png_bytes(i))

    resp = post_file(client, alice, "many.zip", buf.getvalue())

    assert resp.status_code == 422
    assert "holds 4 files, more than 3" in resp.json()["detail"]
    assert dataset_rows(session) == 0


def test_zip_bomb_stops_at_the_byte_cap(
    make_client: Any, settings: Settings, alice: Caller, session: Session
) -> None:
    client = make_client(settings.model_copy(update={"max_archive_bytes": 10_000}))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a/zeros.png", b"\0" * 1_000_000)  # compresses to about 1 KB

    resp = post_file(client, alice, "bomb.zip", buf.getvalue())

    assert resp.status_code == 422
    assert "10000 bytes" in resp.json()["detail"]
    assert dataset_rows(session) == 0 and store_files(settings) == []


def test_listing_shows_uploads_and_builtins(client: TestClient, alice: Caller) -> None:
    body = client.get("/v1/datasets", headers=alice.headers).json()

    assert body["count"] == 0 and body["data"] == []
    names = {b["name"] for b in body["builtins"]}
    assert names == {"digits", "synthetic", "mnist", "fashion-mnist", "cifar10", "cifar100"}


def test_unknown_file_type_is_422(client: TestClient, alice: Caller) -> None:
    resp = post_file(client, alice, "data.csv", b"a,b\n1,2\n")

    assert resp.status_code == 422
    assert ".npz" in resp.json()["detail"]


def test_zip_with_a_symlink_is_refused(client: TestClient, alice: Caller, session: Session) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("cat/0.png", png_bytes(1))
        link = zipfile.ZipInfo("dog/0.png")
        link.create_system = 3  # Unix
        link.external_attr = (0o120777) << 16  # S_IFLNK
        zf.writestr(link, "/etc/passwd")

    resp = post_file(client, alice, "link.zip", buf.getvalue())

    assert resp.status_code == 422 and "symbolic link" in resp.json()["detail"]
    assert dataset_rows(session) == 0


def test_files_that_are_not_images_are_not_kept(
    client: TestClient, alice: Caller, session: Session, settings: Settings
) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("README.txt", b"my dataset")
        zf.writestr("a/0.png", png_bytes(1))
        zf.writestr("b/0.png", png_bytes(2))
        zf.writestr("b/notes.bin", b"\0" * 10_000)

    resp = post_file(client, alice, "data.zip", buf.getvalue())

    assert resp.status_code == 201, resp.text
    assert sorted(p.name for p in store_files(settings)) == ["0.png", "0.png"]


def _pets_zip(sizes: dict[str, tuple[int, int]]) -> bytes:
    """cat/ and dog/ images, 4 each; ``sizes`` maps a class to the size of its images."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for cls, size in sizes.items():
            for i in range(4):
                img = io.BytesIO()
                Image.new("RGB", size, (40 * i, 0, 0)).save(img, format="PNG")
                zf.writestr(f"{cls}/{i}.png", img.getvalue())
    return buf.getvalue()


JOB_ON = {"model": {"arch": "fcn", "options": {"depth": 2, "width": 8}}, "train": {"epochs": 1}}


def test_images_of_different_sizes_need_image_size_and_the_submit_says_so(
    client: TestClient, alice: Caller
) -> None:
    resp = post_file(client, alice, "pets.zip", _pets_zip({"cat": (8, 6), "dog": (5, 5)}))
    assert resp.status_code == 201, resp.text
    body = resp.json()
    assert body["image_sizes"] == [
        {"size": "8x6", "example": "cat/0.png"},
        {"size": "5x5", "example": "dog/0.png"},
    ]

    refused = client.post("/v1/jobs", headers=alice.headers, json=JOB_ON | {"dataset": {"id": body["id"]}})
    assert refused.status_code == 422, refused.text
    detail = refused.json()["detail"]
    assert (
        detail.startswith("dataset.image_size: ") and "(8x6 like cat/0.png and 5x5 like dog/0.png)" in detail
    )
    assert client.get("/v1/jobs", headers=alice.headers).json()["count"] == 0  # nothing queued

    sized = JOB_ON | {"dataset": {"id": body["id"], "image_size": 8}}
    accepted = client.post("/v1/jobs", headers=alice.headers, json=sized)
    assert accepted.status_code == 202, accepted.text


def test_images_of_one_size_need_nothing_more(client: TestClient, alice: Caller) -> None:
    resp = post_file(client, alice, "pets.zip", _pets_zip({"cat": (7, 7), "dog": (7, 7)}))
    assert resp.status_code == 201, resp.text
    assert resp.json()["image_sizes"] == [{"size": "7x7", "example": "cat/0.png"}]
    assert resp.json()["input_shape"] == [3, 7, 7]
    accepted = client.post(
        "/v1/jobs", headers=alice.headers, json=JOB_ON | {"dataset": {"id": resp.json()["id"]}}
    )
    assert accepted.status_code == 202, accepted.text
