"""Training cost of LoRITa: N=1, N=3 composed in weight space (ours), N=3 as extra layers.

Measures the time of one training epoch of each variant side by side, in one run,
interleaving the variants round by round so that background load hits them alike, and
prints the median per variant and its ratio to N=1.

    python benchmarks/train_overhead.py                # fcn and resnet20, 32x32 synthetic
    python benchmarks/train_overhead.py --rounds 7 --n-train 1024 --threads 2

Goal (issue 2): weight-space N=3 costs at most 1.05x the N=1 epoch on the CNN.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from core.data import make_synthetic
from core.lorita import apply_layer_space, apply_lorita, cheaper_in_layer_space, find_targets
from core.train import FitSettings, batches, make_optimizer
from core.zoo import build_model


def _auto(model: nn.Module, batch_size: int) -> nn.Module:
    chains = cheaper_in_layer_space(model, find_targets(model), (3, 32, 32), batch_size, 3)
    apply_lorita(model, 3, init="scratch", layer_space=chains)
    return model


def variants(batch_size: int) -> dict[str, Callable[[nn.Module], nn.Module]]:
    return {
        "N=1": lambda m: m,
        "N=3 weight space (ours)": lambda m: (apply_lorita(m, 3, init="scratch"), m)[1],
        "N=3 auto (ours, composition: auto)": lambda m: _auto(m, batch_size),
        "N=3 layer space (research code)": lambda m: apply_layer_space(m, 3),
    }


def epoch_seconds(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> float:
    opt = make_optimizer(
        model.parameters(), FitSettings(epochs=1, optimizer="sgd", lr=0.01, weight_decay=1e-3)
    )
    loss_fn = nn.CrossEntropyLoss()
    data = torch.utils.data.TensorDataset(x, y)
    model.train()
    t0 = time.perf_counter()
    for xb, yb in batches(data, batch_size, shuffle=True, generator=torch.Generator().manual_seed(0)):
        loss = loss_fn(model(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return time.perf_counter() - t0


def bench(arch: str, options: dict[str, object], args: argparse.Namespace) -> dict[str, float]:
    splits = make_synthetic(10, (3, 32, 32), args.n_train, 10)
    x, y = splits.x_train, splits.y_train
    models = {}
    for name, compose in variants(args.batch_size).items():
        torch.manual_seed(0)
        models[name] = compose(build_model(arch, 10, (3, 32, 32), options))
    for model in models.values():  # warm-up: allocator, kernels
        epoch_seconds(model, x[: args.batch_size * 2], y[: args.batch_size * 2], args.batch_size)
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.rounds):
        for name, model in models.items():
            times[name].append(epoch_seconds(model, x, y, args.batch_size))
    return {name: statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--n-train", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"epoch of {args.n_train} samples 3x32x32, batch {args.batch_size}, {args.threads} threads, "
        f"median of {args.rounds} interleaved rounds, torch {torch.__version__}, CPU"
    )
    print("| model | variant | s/epoch | ratio to N=1 |\n|---|---|---|---|")
    for arch, options in (("fcn", {"depth": 6, "width": 96}), ("resnet20", {})):
        medians = bench(arch, options, args)
        base = medians["N=1"]
        for name, sec in medians.items():
            print(f"| {arch} | {name} | {sec:.3f} | {sec / base:.3f}x |")


if __name__ == "__main__":
    main()
