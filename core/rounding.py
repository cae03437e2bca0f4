"""Hardware-friendly ranks: round each kept rank to a multiple the matrix kernels like.

Note: why a multiple. A thin pair's inner dimension is the rank; GEMM and convolution
kernels work on tiles of the inner dimension, so a rank of 37 costs about what 40 (CPU)
or 48 (CUDA) costs while keeping fewer singular values. Rounding *up* to the multiple
therefore buys accuracy at almost no time; the defaults per device are
- CPU: 8. MLAS (ONNX Runtime) and oneDNN/OpenBLAS (PyTorch) pack the inner dimension in
  panels of 8 float32 values (one 256-bit AVX2 register); AVX-512 kernels use 16, which is
  also a multiple of 8.
- CUDA: 16. Tensor cores need the inner dimension to be a multiple of 8 for fp16/bf16
  (16 bytes) and of 16 for int8; 16 satisfies both, so the chosen ranks stay on the fast
  path whatever precision the model is deployed in.

The rule never makes a layer bigger than its dense weight: a rank is rounded up only when
the thin pair at the rounded rank still stores fewer weights than the dense layer
(``r (m + n) < m n``) and is below the full rank; otherwise it is rounded down (to a
non-zero multiple); when even that is impossible (the rank is below one multiple and one
multiple does not save) the rank is left as it is.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Protocol

import torch

DEFAULT_ROUND_TO = {"cpu": 8, "cuda": 16}


class Shaped(Protocol):
    """What rounding needs to know of a layer (``core.svt.Spectrum`` has it)."""

    m: int
    n: int

    @property
    def full_rank(self) -> int: ...


def default_round_to(device: torch.device | str) -> int:
    """The default multiple for ``device`` (see the module docstring for why)."""
    kind = torch.device(device).type
    return DEFAULT_ROUND_TO.get(kind, DEFAULT_ROUND_TO["cpu"])


def _saves(rank: int, m: int, n: int, full_rank: int) -> bool:
    return 1 <= rank < full_rank and rank * (m + n) < m * n


def round_rank(rank: int, m: int, n: int, full_rank: int, multiple: int) -> int:
    """``rank`` of an ``m x n`` layer rounded to ``multiple`` without exceeding the dense size.

    A rank whose thin pair would not save (the layer stays dense) is returned unchanged.
    """
    if multiple < 1:
        raise ValueError(f"round_to must be >= 1, got {multiple}")
    if multiple == 1 or not _saves(rank, m, n, full_rank):
        return rank
    up = math.ceil(rank / multiple) * multiple
    if _saves(up, m, n, full_rank):
        return up
    down = (rank // multiple) * multiple
    if down >= 1:
        return down
    return rank


def round_ranks(layers: Mapping[str, Shaped], ranks: Mapping[str, int], multiple: int) -> dict[str, int]:
    """Every layer's rank rounded by :func:`round_rank` (layers absent from ``ranks`` keep full rank)."""
    out: dict[str, int] = {}
    for name, sp in layers.items():
        rank = int(ranks.get(name, sp.full_rank))
        out[name] = round_rank(rank, sp.m, sp.n, sp.full_rank, multiple)
    return out


def rounding_rows(
    layers: Mapping[str, Shaped], before: Mapping[str, int], after: Mapping[str, int], multiple: int
) -> dict[str, dict[str, int | str]]:
    """Per layer whose rank the rounding changed: ``{"rank": before, "rounded": after, "how": up|down}``."""
    rows: dict[str, dict[str, int | str]] = {}
    for name, sp in layers.items():
        b, a = int(before.get(name, sp.full_rank)), int(after.get(name, sp.full_rank))
        if a != b:
            rows[name] = {"rank": b, "rounded": a, "how": "up" if a > b else "down", "multiple": multiple}
    return rows
