from __future__ import annotations

import pathlib
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from core.config import DatasetConfig
from core.data import (
    DataBundle,
    DataError,
    augment_batch,
    load_data,
    stratified_split,
    validate_npz,
)


def _all_x(bundle: DataBundle, split: str) -> torch.Tensor:
    return getattr(bundle, split).tensors[0]


def _all_y(bundle: DataBundle, split: str) -> torch.Tensor:
    return getattr(bundle, split).tensors[1]


# ---------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def digits() -> DataBundle:
    return load_data(DatasetConfig(name="digits", val_fraction=0.1), seed=0)


def test_digits_shapes_and_ranges(digits: DataBundle) -> None:
    assert digits.input_shape == (1, 8, 8) and digits.is_image and digits.num_classes == 10
    x, y = _all_x(digits, "train"), _all_y(digits, "train")
    assert x.dtype == torch.float32 and x.shape[1:] == (1, 8, 8)
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert y.dtype == torch.int64 and set(y.tolist()) == set(range(10))


def test_digits_splits_add_up_with_a_fifth_held_for_test(digits: DataBundle) -> None:
    n_train, n_val, n_test = len(digits.train), len(digits.val), len(digits.test)
    assert n_train + n_val + n_test == 1797
    assert abs(n_test - 0.2 * 1797) <= 10
    assert abs(n_val - 0.1 * (n_train + n_val)) <= 10


def test_digits_test_set_is_the_same_for_every_job_seed(digits: DataBundle) -> None:
    other = load_data(DatasetConfig(name="digits", val_fraction=0.1), seed=7)
    assert torch.equal(_all_x(digits, "test"), _all_x(other, "test"))
    assert torch.equal(_all_y(digits, "test"), _all_y(other, "test"))
    # the job seed does move the validation split
    assert not torch.equal(_all_x(digits, "val"), _all_x(other, "val"))


def test_stratified_split_is_disjoint_covering_and_seeded() -> None:
    y = torch.arange(100) % 4
    kept, held = stratified_split(y, 0.2, seed=3)
    assert set(kept.tolist()).isdisjoint(held.tolist())
    assert sorted(kept.tolist() + held.tolist()) == list(range(100))
    assert torch.bincount(y[held]).tolist() == [5, 5, 5, 5]
    assert torch.equal(held, stratified_split(y, 0.2, seed=3)[1])


# ---------------------------------------------------------------- synthetic


def _synthetic(**kw: Any) -> DataBundle:
    cfg = DatasetConfig(name="synthetic", num_classes=5, input_shape=[3, 8, 8], n_train=300, n_test=100, **kw)
    return load_data(cfg, seed=0)


def test_synthetic_is_deterministic_and_shaped() -> None:
    a, b = _synthetic(), _synthetic()
    assert a.input_shape == (3, 8, 8) and a.num_classes == 5
    assert len(a.train) + len(a.val) == 300 and len(a.test) == 100
    for split in ("train", "val", "test"):
        assert torch.equal(_all_x(a, split), _all_x(b, split))
        assert torch.equal(_all_y(a, split), _all_y(b, split))
    x = _all_x(a, "train")
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0


def test_synthetic_height_width_shape_is_a_one_channel_image() -> None:
    cfg = DatasetConfig(name="synthetic", num_classes=3, input_shape=[6, 6], n_train=30, n_test=10)
    data = load_data(cfg)
    assert data.input_shape == (1, 6, 6) and data.is_image


def test_synthetic_is_learnable_by_nearest_class_mean() -> None:
    data = _synthetic()
    x, y = _all_x(data, "train").flatten(1), _all_y(data, "train")
    means = torch.stack([x[y == c].mean(0) for c in range(5)])
    xt, yt = _all_x(data, "test").flatten(1), _all_y(data, "test")
    accuracy = (torch.cdist(xt, means).argmin(1) == yt).float().mean().item()
    assert accuracy > 0.6  # chance is 0.2


# ---------------------------------------------------------------- npz


def _save_npz(path: Path, **arrays: Any) -> Path:
    np.savez(path, **arrays)
    return path


def _npz_cfg(path: Path) -> DatasetConfig:
    return DatasetConfig(path=str(path), val_fraction=0.2)


RNG = np.random.default_rng(0)
Y_TRAIN = np.arange(20) % 3
Y_TEST = np.arange(6) % 3


@pytest.mark.parametrize(
    ("x_train", "x_test", "input_shape"),
    [
        (
            RNG.integers(0, 256, (20, 5, 6), dtype=np.uint8),
            RNG.integers(0, 256, (6, 5, 6), dtype=np.uint8),
            (1, 5, 6),
        ),
        (
            RNG.integers(0, 256, (20, 5, 6, 3), dtype=np.uint8),
            RNG.integers(0, 256, (6, 5, 6, 3), dtype=np.uint8),
            (3, 5, 6),
        ),
        (RNG.random((20, 3, 5, 6), dtype=np.float32), RNG.random((6, 3, 5, 6), dtype=np.float32), (3, 5, 6)),
        (RNG.random((20, 11)), RNG.random((6, 11)), (11,)),
    ],
    ids=["NHW-uint8", "NHWC-uint8", "NCHW-float", "flat-features"],
)
def test_npz_round_trip(
    tmp_path: Path, x_train: np.ndarray, x_test: np.ndarray, input_shape: tuple[int, ...]
) -> None:
    path = _save_npz(tmp_path / "d.npz", x_train=x_train, y_train=Y_TRAIN, x_test=x_test, y_test=Y_TEST)
    info = validate_npz(path)
    assert (info.num_classes, info.input_shape, info.n_train, info.n_test) == (3, input_shape, 20, 6)
    data = load_data(_npz_cfg(path))
    assert data.input_shape == input_shape and data.is_image == (len(input_shape) == 3)
    assert data.name == "npz:d.npz"
    # the test split comes back sample for sample, in the layout and scale the model sees
    expected = torch.from_numpy(x_test.astype(np.float32))
    if x_test.dtype == np.uint8:
        expected = expected / 255.0
    if x_test.ndim == 3:
        expected = expected.unsqueeze(1)
    elif x_test.ndim == 4 and x_test.shape[-1] == 3:
        expected = expected.permute(0, 3, 1, 2)
    torch.testing.assert_close(_all_x(data, "test"), expected)
    assert _all_y(data, "test").tolist() == Y_TEST.tolist()


def _good(**override: Any) -> dict[str, Any]:
    arrays: dict[str, Any] = {
        "x_train": RNG.integers(0, 256, (20, 4, 4), dtype=np.uint8),
        "y_train": Y_TRAIN,
        "x_test": RNG.integers(0, 256, (6, 4, 4), dtype=np.uint8),
        "y_test": Y_TEST,
    }
    arrays.update(override)
    return {k: v for k, v in arrays.items() if v is not None}


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        (
            _good(y_test=None, labels=Y_TEST),
            r"missing array\(s\) y_test; found: labels, x_test, x_train, y_train",
        ),
        (_good(y_train=np.array([0, 1] * 9 + [1, 5000])), r"y_train has labels in \[0, 5000\]"),
        (_good(y_test=np.array([0, 1, 2, -1, 0, 1])), r"y_test has labels in \[-1, 2\]"),
        (_good(y_train=Y_TRAIN.astype(np.float32)), r"y_train has dtype float32; labels must be integers"),
        (_good(y_train=Y_TRAIN[:, None]), r"y_train has shape \(20, 1\); labels must be 1-D"),
        (_good(x_test=np.full((6, 4, 4), 1.5)), r"x_test holds floats in \[1\.5, 1\.5\], outside \[0, 1\]"),
        (_good(x_train=np.full((20, 4, 4), np.nan)), r"x_train contains NaN"),
        (_good(x_train=np.zeros((20, 4, 4), dtype=np.int32)), r"x_train has dtype int32; give uint8"),
        (_good(y_train=Y_TRAIN[:19]), r"x_train has 20 samples but y_train has 19 labels"),
        (_good(x_test=np.zeros((6, 5, 4), dtype=np.uint8)), r"train and test samples differ in shape"),
        (_good(x_train=np.zeros((20, 2, 2, 2, 2), dtype=np.uint8)), r"x_train has shape \(20, 2, 2, 2, 2\)"),
    ],
    ids=[
        "missing-key",
        "label-too-large",
        "label-negative",
        "float-labels",
        "2d-labels",
        "float-above-one",
        "nan",
        "int32-pixels",
        "length-mismatch",
        "shape-mismatch",
        "rank-5",
    ],
)
def test_malformed_npz_gives_specific_message(tmp_path: Path, arrays: dict[str, Any], message: str) -> None:
    path = _save_npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError, match=message):
        validate_npz(path)


def test_malformed_npz_fails_load_data_too(tmp_path: Path) -> None:
    path = _save_npz(tmp_path / "bad.npz", **_good(x_test=np.full((6, 4, 4), 2.0)))
    with pytest.raises(DataError, match="outside"):
        load_data(_npz_cfg(path))


class _Trap:
    """Unpickling this touches a marker file, so a test can tell whether pickle ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_object_array_is_rejected_without_unpickling(tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    trap = np.empty(20, dtype=object)
    trap[:] = [_Trap(marker) for _ in range(20)]
    path = _save_npz(tmp_path / "evil.npz", **_good(y_train=trap))
    with pytest.raises(DataError, match="holds Python objects"):
        validate_npz(path)
    assert not marker.exists()


def test_non_zip_file_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "fake.npz"
    path.write_bytes(b"not a zip archive")
    with pytest.raises(DataError, match=r"is not an \.npz archive"):
        validate_npz(path)


# ---------------------------------------------------------------- ImageFolder


def _png(path: Path, value: int, size: tuple[int, int] = (6, 5)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value, value, value)).save(path)


# class i is a flat gray of 50 * (i + 1), so a label can be read back from its pixels
def _label_from_pixels(x: torch.Tensor) -> list[int]:
    return [round(float(v) * 255 / 50) - 1 for v in x.mean(dim=(1, 2, 3))]


def test_image_folder_with_class_dirs(tmp_path: Path) -> None:
    for i, cls in enumerate(["cat", "dog", "eel"]):
        for j in range(5):
            _png(tmp_path / "pets" / cls / f"{j}.png", 50 * (i + 1))
    data = load_data(DatasetConfig(path=str(tmp_path / "pets"), val_fraction=0.25))
    assert data.num_classes == 3 and data.input_shape == (3, 5, 6) and data.is_image
    assert len(data.train) + len(data.val) + len(data.test) == 15
    assert len(data.test) == 3  # a fifth of each class
    for split in ("train", "val", "test"):
        assert _label_from_pixels(_all_x(data, split)) == _all_y(data, split).tolist()


def test_image_folder_train_test_layout_maps_classes_by_name(tmp_path: Path) -> None:
    for i, cls in enumerate(["a", "b", "c"]):
        for j in range(3):
            _png(tmp_path / "train" / cls / f"{j}.png", 50 * (i + 1))
    for i, cls in [(1, "b"), (2, "c")]:  # test/ lacks class a: its own numbering would start at b
        _png(tmp_path / "test" / cls / "0.png", 50 * (i + 1))
    data = load_data(DatasetConfig(path=str(tmp_path), val_fraction=0.3))
    assert data.num_classes == 3
    assert _all_y(data, "test").tolist() == [1, 2]
    assert _label_from_pixels(_all_x(data, "test")) == [1, 2]


def test_image_folder_mixed_sizes_need_image_size(tmp_path: Path) -> None:
    _png(tmp_path / "a" / "0.png", 50, (6, 6))
    _png(tmp_path / "a" / "1.png", 50, (6, 6))
    _png(tmp_path / "b" / "0.png", 100, (9, 7))
    _png(tmp_path / "b" / "1.png", 100, (6, 6))
    with pytest.raises(DataError, match=r"images differ in size.*set dataset\.image_size"):
        load_data(DatasetConfig(path=str(tmp_path)))
    resized = load_data(DatasetConfig(path=str(tmp_path), image_size=8, val_fraction=0.3))
    assert resized.input_shape == (3, 8, 8)


# ---------------------------------------------------------------- torchvision datasets, ids


def _idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_mnist_is_read_from_root_without_download(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    _idx(raw / "train-images-idx3-ubyte", np.full((20, 4, 4), 255))
    _idx(raw / "train-labels-idx1-ubyte", np.arange(20) % 10)
    _idx(raw / "t10k-images-idx3-ubyte", np.zeros((10, 4, 4)))
    _idx(raw / "t10k-labels-idx1-ubyte", np.arange(10))
    data = load_data(DatasetConfig(name="mnist", root=str(tmp_path), val_fraction=0.1))
    assert data.input_shape == (1, 4, 4) and data.num_classes == 10
    assert len(data.train) + len(data.val) == 20
    assert float(_all_x(data, "train").min()) == 1.0
    assert _all_y(data, "test").tolist() == list(range(10))


@pytest.mark.parametrize("root", [None, "missing", "empty"])
def test_missing_torchvision_dataset_says_how_to_fix(tmp_path: Path, root: str | None) -> None:
    if root == "empty":
        (tmp_path / "empty").mkdir()
    cfg = DatasetConfig(name="cifar10", root=None if root is None else str(tmp_path / root))
    with pytest.raises(DataError, match=r'give dataset\.root pointing at .*or set "download": true'):
        load_data(cfg)


def test_unresolved_dataset_id_is_an_error() -> None:
    with pytest.raises(DataError, match=r"dataset\.id must be resolved to a path by the service"):
        load_data(DatasetConfig(id="ds_123"))


# ---------------------------------------------------------------- augmentation


def test_augment_batch_keeps_shape_and_is_deterministic_with_generator() -> None:
    x = torch.rand(16, 3, 8, 8)
    a = augment_batch(x, torch.Generator().manual_seed(0))
    b = augment_batch(x, torch.Generator().manual_seed(0))
    assert a.shape == x.shape
    assert torch.equal(a, b)
    assert not torch.equal(a, augment_batch(x, torch.Generator().manual_seed(1)))


def test_augment_batch_flips_some_samples_and_not_others() -> None:
    x = torch.rand(32, 3, 8, 8)
    out = augment_batch(x, torch.Generator().manual_seed(0), pad=0)
    flipped = [torch.equal(o, s.flip(-1)) for o, s in zip(out, x, strict=True)]
    kept = [torch.equal(o, s) for o, s in zip(out, x, strict=True)]
    assert all(f != k for f, k in zip(flipped, kept, strict=True))
    assert 0 < sum(flipped) < 32


def test_augment_batch_crops_are_shifted_windows_of_the_padded_image() -> None:
    x = torch.rand(8, 1, 6, 6) + 1.0  # strictly positive, so zero padding is recognizable
    out = augment_batch(x, torch.Generator().manual_seed(0), pad=2, flip=False)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for o, p in zip(out, padded, strict=True):
        windows = [p[:, i : i + 6, j : j + 6] for i in range(5) for j in range(5)]
        assert any(torch.equal(o, w) for w in windows)


def test_augment_batch_rejects_non_image_batches() -> None:
    with pytest.raises(ValueError, match=r"needs an image batch \(N, C, H, W\)"):
        augment_batch(torch.rand(4, 10))
