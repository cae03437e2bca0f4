"""Datasets held in memory as tensors: built-ins, uploaded .npz archives, ImageFolder trees.

Every loader returns the full training split and the test split; ``load_data`` then
carves the validation split out of the training data only, so that every choice made
on validation never looks at the test set.
"""

from __future__ import annotations

import math
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from core.config import ConfigError, DatasetConfig, JobConfig

MAX_SAMPLES = 2_000_000
MAX_ARRAY_ELEMENTS = 4_000_000_000
MAX_IMAGE_FILES = 200_000
MAX_CLASSES = 1000
# Splits that must not move with the job seed (digits' test split, the synthetic data)
# use this seed, so results of different jobs are comparable.
FIXED_DATA_SEED = 0
HOLDOUT_FRACTION = 0.2
NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
NPZ_SCAN_VALUES = 4 * 1024 * 1024  # values read at once while an upload's arrays are checked
MIN_TRAIN_SAMPLES = 10  # fewer cannot give both a training and a validation split worth the name
_TORCHVISION_DATASETS = {
    "mnist": "MNIST",
    "fashion-mnist": "FashionMNIST",
    "cifar10": "CIFAR10",
    "cifar100": "CIFAR100",
}


class DataError(ValueError):
    """A dataset problem a person can fix; the message says what is wrong and how to fix it."""


@dataclass
class DataBundle:
    train: TensorDataset
    val: TensorDataset
    test: TensorDataset
    num_classes: int
    input_shape: tuple[int, ...]
    is_image: bool
    name: str


@dataclass(frozen=True)
class NpzInfo:
    num_classes: int
    input_shape: tuple[int, ...]
    n_train: int
    n_test: int


@dataclass
class _Splits:
    """Train (before the validation carve) and test tensors: x float32 0..1, y int64."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    name: str


def load_data(cfg: DatasetConfig, seed: int = 0) -> DataBundle:
    """Load the dataset ``cfg`` names; ``seed`` only chooses the validation split."""
    if cfg.id is not None:
        raise DataError("dataset.id must be resolved to a path by the service")
    if cfg.name is not None:
        splits = _load_builtin(cfg)
    elif cfg.path is not None:
        splits = _load_path(Path(cfg.path), cfg.image_size)
    else:
        raise DataError("give one of dataset.name, dataset.path or dataset.id")
    train_idx, val_idx = stratified_split(splits.y_train, cfg.val_fraction, seed)
    if len(train_idx) == 0:
        raise DataError(
            f"the training split has only {len(splits.y_train)} samples: too few to carve a "
            f"validation split of {cfg.val_fraction}; give more training data or lower dataset.val_fraction"
        )
    input_shape = tuple(splits.x_train.shape[1:])
    return DataBundle(
        train=TensorDataset(splits.x_train[train_idx], splits.y_train[train_idx]),
        val=TensorDataset(splits.x_train[val_idx], splits.y_train[val_idx]),
        test=TensorDataset(splits.x_test, splits.y_test),
        num_classes=splits.num_classes,
        input_shape=input_shape,
        is_image=len(input_shape) == 3,
        name=splits.name,
    )


def load_job_data(config: JobConfig) -> DataBundle:
    """The data of a job (its dataset, split by its seed): the one entry point of the pipeline,
    ``select`` and ``plan``. A :class:`DataError` becomes a ConfigError naming the section."""
    try:
        return load_data(config.dataset, seed=config.seed)
    except DataError as err:
        raise ConfigError(f"dataset: {err}") from None


def stratified_split(y: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (kept, held out): about ``fraction`` of each class held out, chosen by ``seed``.

    Stratifying keeps rare classes present in both parts of small datasets. At least one
    sample is held out whenever there are two or more.
    """
    gen = torch.Generator().manual_seed(seed)
    held: list[torch.Tensor] = []
    kept: list[torch.Tensor] = []
    for cls in torch.unique(y):
        idx = torch.nonzero(y == cls).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        k = round(len(idx) * fraction)
        held.append(idx[:k])
        kept.append(idx[k:])
    held_idx, kept_idx = torch.cat(held), torch.cat(kept)
    if len(held_idx) == 0 and len(kept_idx) >= 2:
        pick = int(torch.randint(len(kept_idx), (1,), generator=gen))
        held_idx = kept_idx[pick : pick + 1]
        kept_idx = torch.cat([kept_idx[:pick], kept_idx[pick + 1 :]])
    return torch.sort(kept_idx).values, torch.sort(held_idx).values


# ---------------------------------------------------------------- built-in datasets


def _load_builtin(cfg: DatasetConfig) -> _Splits:
    assert cfg.name is not None
    if cfg.name == "digits":
        return _load_digits()
    if cfg.name == "synthetic":
        return make_synthetic(
            num_classes=cfg.num_classes or 10,
            input_shape=tuple(cfg.input_shape or (3, 32, 32)),
            n_train=cfg.n_train or 2048,
            n_test=cfg.n_test or 512,
        )
    if cfg.name in _TORCHVISION_DATASETS:
        return _load_torchvision(cfg.name, cfg.root, cfg.download)
    raise DataError(f"unknown dataset {cfg.name!r}")


def _load_digits() -> _Splits:
    from sklearn.datasets import load_digits

    digits = load_digits()
    # pixel values are counts 0..16 of an 8x8 grid downsampled from 32x32 bitmaps
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.int64)
    train_idx, test_idx = stratified_split(y, HOLDOUT_FRACTION, FIXED_DATA_SEED)
    return _Splits(x[train_idx], y[train_idx], x[test_idx], y[test_idx], 10, "digits")


def make_synthetic(
    num_classes: int = 10,
    input_shape: tuple[int, ...] = (3, 32, 32),
    n_train: int = 2048,
    n_test: int = 512,
    seed: int = FIXED_DATA_SEED,
) -> _Splits:
    """A learnable toy task: each class is a smooth random template, samples add contrast and noise.

    Templates are drawn at a quarter of the resolution and upsampled, so they survive
    the crop/flip augmentation a CNN may be trained with.
    """
    if len(input_shape) == 2:
        # (H, W) means a one-channel image, as for an NHW .npz
        input_shape = (1, *input_shape)
    gen = torch.Generator().manual_seed(seed)
    templates = _smooth_templates(num_classes, input_shape, gen)

    def sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(n) % num_classes
        y = y[torch.randperm(n, generator=gen)]
        contrast = 0.4 + 0.6 * torch.rand((n,) + (1,) * len(input_shape), generator=gen)
        noise = 0.25 * torch.randn((n, *input_shape), generator=gen)
        x = (0.5 + contrast * (templates[y] - 0.5) + noise).clamp_(0.0, 1.0)
        return x, y

    x_train, y_train = sample(n_train)
    x_test, y_test = sample(n_test)
    return _Splits(x_train, y_train, x_test, y_test, num_classes, "synthetic")


def _smooth_templates(num_classes: int, input_shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    if len(input_shape) == 3:
        c, h, w = input_shape
        coarse = torch.rand((num_classes, c, max(1, h // 4), max(1, w // 4)), generator=gen)
        return F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    return torch.rand((num_classes, *input_shape), generator=gen)


def _load_torchvision(name: str, root: str | None, download: bool) -> _Splits:
    import torchvision

    fix = (
        f"give dataset.root pointing at a directory holding {name} "
        '(as torchvision stores it), or set "download": true where downloading is allowed'
    )
    if root is None:
        raise DataError(f"dataset {name} needs a data directory: {fix}")
    if not download and not Path(root).is_dir():
        raise DataError(f"dataset.root {root} does not exist: {fix}")
    cls: Any = getattr(torchvision.datasets, _TORCHVISION_DATASETS[name])
    try:
        train = cls(root, train=True, download=download)
        test = cls(root, train=False, download=download)
    except RuntimeError as err:
        raise DataError(f"{name} was not found under {root} ({err}): {fix}") from None
    except OSError as err:
        raise DataError(f"could not read or download {name} into {root}: {err}") from None
    x_train, y_train = _torchvision_tensors(train)
    x_test, y_test = _torchvision_tensors(test)
    return _Splits(x_train, y_train, x_test, y_test, len(train.classes), name)


def _torchvision_tensors(ds: Any) -> tuple[torch.Tensor, torch.Tensor]:
    data = torch.as_tensor(np.asarray(ds.data))
    # MNIST-like sets store (N, H, W), CIFAR stores (N, H, W, C)
    data = data.unsqueeze(1) if data.ndim == 3 else data.permute(0, 3, 1, 2)
    x = data.contiguous().to(torch.float32) / 255.0
    y = torch.as_tensor(np.asarray(ds.targets), dtype=torch.int64)
    return x, y


# ---------------------------------------------------------------- paths


def _load_path(path: Path, image_size: int | None) -> _Splits:
    if not path.exists():
        raise DataError(f"dataset.path {path} does not exist")
    if path.is_dir():
        return _load_image_folder(path, image_size)
    if path.suffix.lower() != ".npz":
        raise DataError(
            f"dataset.path {path} is neither an .npz file (x_train, y_train, x_test, y_test) "
            "nor an ImageFolder directory"
        )
    if image_size is not None:
        raise DataError("dataset.image_size only applies to ImageFolder directories, not to .npz files")
    x_train, y_train, x_test, y_test, info = _read_npz(path, MAX_CLASSES)
    return _Splits(
        _npz_images_to_tensor(x_train),
        torch.from_numpy(y_train.astype(np.int64)),
        _npz_images_to_tensor(x_test),
        torch.from_numpy(y_test.astype(np.int64)),
        info.num_classes,
        f"npz:{path.name}",
    )


# ---------------------------------------------------------------- .npz


def validate_npz(
    path: str | Path,
    max_classes: int = MAX_CLASSES,
    *,
    name: str | None = None,
    max_values: int = MAX_ARRAY_ELEMENTS,
) -> NpzInfo:
    """Check an .npz dataset without loading it: shapes, dtypes and sizes from the .npy headers,
    then the values in chunks of ``NPZ_SCAN_VALUES`` (memory stays at a few MB whatever the
    arrays' sizes; a zip bomb is refused from its header). Never unpickles. Raises DataError
    naming the first problem; ``name`` is the file name the errors show (the user's, not ours)."""
    path = Path(path)
    shown = name or path.name
    headers = _npz_headers(path, shown)
    shapes = {key: headers[key][0] for key in NPZ_KEYS}
    values = {key: math.prod(shape) for key, shape in shapes.items()}
    if sum(values.values()) > max_values:
        big = max(NPZ_KEYS, key=lambda k: values[k])
        raise DataError(
            f"{shown}: {big} has shape {shapes[big]} = {values[big]} values; the dataset holds "
            f"{sum(values.values())} values in all, more than the {max_values} accepted "
            "(LORITA_MAX_DATASET_VALUES); upload fewer or smaller samples"
        )
    for xk, yk in (("x_train", "y_train"), ("x_test", "y_test")):
        _check_feature_header(xk, shapes[xk], headers[xk][1])
        _check_label_header(yk, shapes[yk], headers[yk][1])
        if shapes[xk][0] != shapes[yk][0]:
            raise DataError(f"{xk} has {shapes[xk][0]} samples but {yk} has {shapes[yk][0]} labels")
    sample_train, sample_test = _sample_shape_from(shapes["x_train"]), _sample_shape_from(shapes["x_test"])
    if sample_train != sample_test:
        raise DataError(
            f"train and test samples differ in shape: x_train {shapes['x_train']} gives samples of shape "
            f"{sample_train}, x_test {shapes['x_test']} gives {sample_test}"
        )
    n_train, n_test = shapes["y_train"][0], shapes["y_test"][0]
    if n_train < MIN_TRAIN_SAMPLES or n_test < 1:
        raise DataError(
            f"too few samples: {n_train} training and {n_test} test; give at least "
            f"{MIN_TRAIN_SAMPLES} training samples (a validation split is carved from them) and 1 test sample"
        )
    highest = 0
    with zipfile.ZipFile(path) as zf:
        for key in NPZ_KEYS:
            lo, hi = _scan_npz_array(zf, key, shapes[key], headers[key][1], shown)
            if key.startswith("x") and headers[key][1] != np.uint8 and (lo < 0.0 or hi > 1.0):
                raise DataError(
                    f"{key} holds floats in [{lo:g}, {hi:g}], outside [0, 1]; scale them to [0, 1] "
                    "(e.g. divide 0..255 values by 255) or store uint8"
                )
            if key.startswith("y"):
                if lo < 0 or hi >= max_classes:
                    raise DataError(
                        f"{key} has labels in [{int(lo)}, {int(hi)}]; labels must lie in [0, {max_classes}) "
                        "(class indices counted from 0)"
                    )
                highest = max(highest, int(hi))
    if highest < 1:
        raise DataError("all labels are 0: a classifier needs at least two classes (labels 0 and 1)")
    return NpzInfo(highest + 1, sample_train, n_train, n_test)


def _check_feature_header(key: str, shape: tuple[int, ...], dtype: np.dtype[Any]) -> None:
    if len(shape) not in (2, 3, 4):
        raise DataError(
            f"{key} has shape {shape}; give flat features (N, D) or images (N, H, W), (N, H, W, C) "
            "or (N, C, H, W)"
        )
    if dtype != np.uint8 and not np.issubdtype(dtype, np.floating):
        raise DataError(
            f"{key} has dtype {dtype}; give uint8 values 0..255 or floats in [0, 1] "
            "(e.g. x.astype(np.uint8) for 0..255 integers)"
        )
    if math.prod(shape[1:]) == 0:
        raise DataError(f"{key} has shape {shape}: its samples hold no values; each needs at least one")


def _check_label_header(key: str, shape: tuple[int, ...], dtype: np.dtype[Any]) -> None:
    if len(shape) != 1:
        raise DataError(f"{key} has shape {shape}; labels must be 1-D (one integer class per sample)")
    if not np.issubdtype(dtype, np.integer):
        raise DataError(
            f"{key} has dtype {dtype}; labels must be integers 0..num_classes-1 "
            "(e.g. y.astype(np.int64) if they are whole numbers)"
        )


def _scan_npz_array(
    zf: zipfile.ZipFile, key: str, shape: tuple[int, ...], dtype: np.dtype[Any], shown: str
) -> tuple[float, float]:
    """(min, max) of one array, read in bounded chunks after its header; NaN/inf and a member
    shorter than its header says are DataErrors. Element order (C or Fortran) does not matter."""
    left = math.prod(shape)
    lo, hi = math.inf, -math.inf
    floating = np.issubdtype(dtype, np.floating)
    try:
        with zf.open(key + ".npy") as f:
            if np.lib.format.read_magic(f) == (1, 0):  # the header _npz_headers checked; skip it
                np.lib.format.read_array_header_1_0(f)
            else:
                np.lib.format.read_array_header_2_0(f)
            while left > 0:
                count = min(left, NPZ_SCAN_VALUES)
                raw = f.read(count * dtype.itemsize)
                if len(raw) != count * dtype.itemsize:
                    raise DataError(
                        f"{shown}: array {key} is shorter than its header says; save the file again"
                    )
                chunk = np.frombuffer(raw, dtype=dtype)
                if floating and not np.isfinite(chunk).all():
                    raise DataError(f"{key} contains NaN or infinite values; remove or replace them")
                lo, hi = min(lo, float(chunk.min())), max(hi, float(chunk.max()))
                left -= count
    except DataError:
        raise
    except (OSError, zipfile.BadZipFile, EOFError, ValueError, zlib.error):
        raise DataError(f"{shown}: array {key} cannot be read (the file is damaged); save it again") from None
    return lo, hi


def _read_npz(path: Path, max_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, NpzInfo]:
    _npz_headers(path)
    arrays: dict[str, np.ndarray] = {}
    try:
        with np.load(path, allow_pickle=False) as npz:
            for key in NPZ_KEYS:
                arrays[key] = npz[key]
    except ValueError as err:
        # numpy refuses object arrays when allow_pickle=False; the header check normally catches them first
        raise DataError(f"{path.name}: {err}; only numeric arrays are accepted") from None
    except (OSError, zipfile.BadZipFile, EOFError) as err:
        raise DataError(f"{path.name} could not be read as an .npz archive: {err}") from None
    x_train, y_train, x_test, y_test = (arrays[k] for k in NPZ_KEYS)
    for xk, yk in (("x_train", "y_train"), ("x_test", "y_test")):
        _check_features(xk, arrays[xk])
        _check_labels(yk, arrays[yk], max_classes)
        if len(arrays[xk]) != len(arrays[yk]):
            raise DataError(f"{xk} has {len(arrays[xk])} samples but {yk} has {len(arrays[yk])} labels")
    sample_train, sample_test = _sample_shape(x_train), _sample_shape(x_test)
    if sample_train != sample_test:
        raise DataError(
            f"train and test samples differ in shape: x_train {x_train.shape} gives samples of shape "
            f"{sample_train}, x_test {x_test.shape} gives {sample_test}"
        )
    if len(y_train) < 2 or len(y_test) < 1:
        raise DataError(
            f"too few samples: {len(y_train)} training and {len(y_test)} test; "
            "give at least 2 training and 1 test sample"
        )
    num_classes = int(max(y_train.max(), y_test.max())) + 1
    if num_classes < 2:
        raise DataError("all labels are 0: a classifier needs at least two classes (labels 0 and 1)")
    info = NpzInfo(num_classes, sample_train, len(y_train), len(y_test))
    return x_train, y_train, x_test, y_test, info


def _npz_headers(path: Path, shown: str | None = None) -> dict[str, tuple[tuple[int, ...], np.dtype[Any]]]:
    """Shapes and dtypes of the archive's arrays, read from their headers before any data.

    Reading headers first rejects object arrays and oversized arrays (a zip bomb
    announces its size in the header) without decompressing or unpickling anything.
    """
    name = shown or path.name
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError):
        raise DataError(
            f"{name} is not an .npz archive (not a readable zip file); save it with numpy.savez or "
            "numpy.savez_compressed"
        ) from None
    with zf:
        found = sorted(n[: -len(".npy")] for n in zf.namelist() if n.endswith(".npy"))
        missing = [k for k in NPZ_KEYS if k not in found]
        if missing:
            raise DataError(
                f"{name} is missing array(s) {', '.join(missing)}; found: {', '.join(found) or 'none'}; "
                f"an .npz dataset needs {', '.join(NPZ_KEYS)}"
            )
        headers = {}
        for key in NPZ_KEYS:
            try:
                with zf.open(key + ".npy") as f:
                    version = np.lib.format.read_magic(f)
                    if version == (1, 0):
                        shape, _, dtype = np.lib.format.read_array_header_1_0(f)
                    else:
                        shape, _, dtype = np.lib.format.read_array_header_2_0(f)
            except (ValueError, OSError, zipfile.BadZipFile, EOFError, zlib.error):
                raise DataError(
                    f"{name}: array {key} is not a valid .npy member; save it with numpy.savez"
                ) from None
            if dtype.hasobject:
                raise DataError(
                    f"{name}: array {key} holds Python objects (dtype {dtype}); only numeric arrays "
                    "are accepted and pickled data is never loaded"
                )
            if shape and shape[0] > MAX_SAMPLES:
                raise DataError(f"{key} has {shape[0]} samples; at most {MAX_SAMPLES} are accepted")
            if math.prod(shape) > MAX_ARRAY_ELEMENTS:
                raise DataError(
                    f"{key} has {math.prod(shape)} values; at most {MAX_ARRAY_ELEMENTS} are accepted"
                )
            headers[key] = (shape, dtype)
        return headers


def _check_features(key: str, x: np.ndarray) -> None:
    if x.ndim not in (2, 3, 4):
        raise DataError(
            f"{key} has shape {x.shape}; give flat features (N, D) or images (N, H, W), (N, H, W, C) "
            "or (N, C, H, W)"
        )
    if x.dtype == np.uint8:
        return
    if not np.issubdtype(x.dtype, np.floating):
        raise DataError(
            f"{key} has dtype {x.dtype}; give uint8 values 0..255 or floats in [0, 1] "
            "(e.g. x.astype(np.uint8) for 0..255 integers)"
        )
    if x.size == 0:
        return
    if not np.isfinite(x).all():
        raise DataError(f"{key} contains NaN or infinite values; remove or replace them")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0.0 or hi > 1.0:
        raise DataError(
            f"{key} holds floats in [{lo:g}, {hi:g}], outside [0, 1]; scale them to [0, 1] "
            "(e.g. divide 0..255 values by 255) or store uint8"
        )


def _check_labels(key: str, y: np.ndarray, max_classes: int) -> None:
    if y.ndim != 1:
        raise DataError(f"{key} has shape {y.shape}; labels must be 1-D (one integer class per sample)")
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(
            f"{key} has dtype {y.dtype}; labels must be integers 0..num_classes-1 "
            "(e.g. y.astype(np.int64) if they are whole numbers)"
        )
    if y.size == 0:
        return
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= max_classes:
        raise DataError(
            f"{key} has labels in [{lo}, {hi}]; labels must lie in [0, {max_classes}) "
            "(class indices counted from 0)"
        )


def _is_nhwc(shape: tuple[int, ...]) -> bool:
    return shape[-1] in (1, 3) and shape[1] not in (1, 3)


def _sample_shape(x: np.ndarray) -> tuple[int, ...]:
    return _sample_shape_from(x.shape)


def _sample_shape_from(array_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The per-sample shape after conversion: (D,) or (C, H, W)."""
    shape = tuple(int(s) for s in array_shape)
    if len(shape) == 2:
        return (shape[1],)
    if len(shape) == 3:
        return (1, shape[1], shape[2])
    if _is_nhwc(shape):
        return (shape[3], shape[1], shape[2])
    return shape[1:]


def _npz_images_to_tensor(x: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(x))
    if t.ndim == 3:
        t = t.unsqueeze(1)
    elif t.ndim == 4 and _is_nhwc(tuple(x.shape)):
        t = t.permute(0, 3, 1, 2)
    if t.dtype == torch.uint8:
        return t.to(torch.float32).div_(255.0).contiguous()
    return t.to(torch.float32).contiguous()


# ---------------------------------------------------------------- ImageFolder


def _load_image_folder(root: Path, image_size: int | None) -> _Splits:
    if (root / "train").is_dir() and (root / "test").is_dir():
        train_items, classes = _list_images(root / "train")
        test_items, test_classes = _list_images(root / "test")
        extra = sorted(set(test_classes) - set(classes))
        if extra:
            raise DataError(f"test/ has class folder(s) {', '.join(extra)} that train/ lacks")
        # ImageFolder numbers test/'s classes on its own; remap them by name onto train/'s numbering
        remap = {i: classes.index(c) for i, c in enumerate(test_classes)}
        test_items = [(p, remap[label]) for p, label in test_items]
        _check_file_count(len(train_items) + len(test_items), root)
        x_train, y_train = _read_images(train_items, image_size)
        x_test, y_test = _read_images(test_items, image_size)
        if x_train.shape[1:] != x_test.shape[1:]:
            raise DataError(
                f"train images are {x_train.shape[-2]}x{x_train.shape[-1]} but test images are "
                f"{x_test.shape[-2]}x{x_test.shape[-1]}; set dataset.image_size to resize them all"
            )
    else:
        items, classes = _list_images(root)
        _check_file_count(len(items), root)
        x, y = _read_images(items, image_size)
        train_idx, test_idx = stratified_split(y, HOLDOUT_FRACTION, FIXED_DATA_SEED)
        x_train, y_train, x_test, y_test = x[train_idx], y[train_idx], x[test_idx], y[test_idx]
    if len(classes) < 2:
        raise DataError(f"{root} holds one class folder ({classes[0]}); a classifier needs at least two")
    return _Splits(x_train, y_train, x_test, y_test, len(classes), f"folder:{root.name}")


def _check_file_count(n: int, root: Path) -> None:
    if n > MAX_IMAGE_FILES:
        raise DataError(f"{root} holds {n} images; at most {MAX_IMAGE_FILES} are accepted")


def _list_images(root: Path) -> tuple[list[tuple[str, int]], list[str]]:
    from torchvision.datasets import ImageFolder

    try:
        # ImageFolder only lists files here; images are decoded in _read_images
        ds = ImageFolder(str(root), loader=lambda p: p)
    except FileNotFoundError as err:
        raise DataError(
            f"{root} is not an ImageFolder tree ({err}); lay it out as <class>/<image> "
            "or train/<class>/<image> plus test/<class>/<image>"
        ) from None
    return list(ds.samples), list(ds.classes)


def _read_images(items: list[tuple[str, int]], image_size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    from PIL import Image, UnidentifiedImageError

    pixels: list[np.ndarray] = []
    first: tuple[str, tuple[int, int]] | None = None
    for path, _ in items:
        try:
            with Image.open(path) as img:
                rgb = img.convert("RGB")
        except (UnidentifiedImageError, OSError) as err:
            raise DataError(f"cannot read image {path}: {err}") from None
        if image_size is not None:
            rgb = rgb.resize((image_size, image_size), Image.Resampling.BILINEAR)
        elif first is None:
            first = (path, rgb.size)
        elif rgb.size != first[1]:
            raise DataError(
                f"images differ in size ({first[1][0]}x{first[1][1]} in {first[0]}, "
                f"{rgb.size[0]}x{rgb.size[1]} in {path}); set dataset.image_size to resize them all"
            )
        pixels.append(np.asarray(rgb, dtype=np.uint8))
    x = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).to(torch.float32).div_(255.0).contiguous()
    y = torch.tensor([label for _, label in items], dtype=torch.int64)
    return x, y


# ---------------------------------------------------------------- augmentation


def augment_batch(
    x: torch.Tensor, generator: torch.Generator | None = None, pad: int = 4, flip: bool = True
) -> torch.Tensor:
    """Per-sample random crop (zero padding ``pad``) and horizontal flip of an (N, C, H, W) batch.

    Runs on ``x``'s device; random numbers are drawn on ``generator``'s device (so a CPU
    generator gives the same augmentation whatever device ``x`` lives on).
    """
    if x.ndim != 4:
        raise ValueError(f"augment_batch needs an image batch (N, C, H, W), got shape {tuple(x.shape)}")
    n, _, h, w = x.shape
    rng_device = generator.device if generator is not None else x.device
    off_y = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=rng_device).to(x.device)
    off_x = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device=rng_device).to(x.device)
    flips = torch.rand(n, generator=generator, device=rng_device).to(x.device) < 0.5
    padded = F.pad(x, (pad, pad, pad, pad))
    rows = off_y[:, None] + torch.arange(h, device=x.device)
    cols = off_x[:, None] + torch.arange(w, device=x.device)
    if flip:
        cols = torch.where(flips[:, None], cols.flip(1), cols)
    batch = torch.arange(n, device=x.device)[:, None, None]
    # advanced indexing on (N, H, W, C) gathers each sample's window in one op
    out = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()
