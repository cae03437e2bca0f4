"""The prepared GPU check (issue 3): training throughput and exports on CUDA, one short run.

For resnet20 and vgg16 on synthetic 32x32 data: epochs/second of N=1, N=3 composed in weight
space (ours) and N=3 composed as extra layers (the research code's way), under bf16 autocast;
then a LoRITa model of each is collapsed, truncated, and exported on the device (torch.export
and ONNX), each checked for output parity against the PyTorch model. Prints markdown tables.

    python benchmarks/gpu_check.py                      # on CUDA, about 3-5 minutes on one GPU
    python benchmarks/gpu_check.py --device cpu --n-train 256 --rounds 1   # a smoke run anywhere
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from train_overhead import variants  # the same variants as the CPU benchmark (benchmarks/ is on sys.path)

from core import svt
from core.data import make_synthetic
from core.export import export_onnx, export_pt2
from core.lorita import apply_lorita, collapse
from core.train import FitSettings, make_optimizer
from core.zoo import build_model


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def epoch_seconds(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int, amp: bool) -> float:
    opt = make_optimizer(
        model.parameters(), FitSettings(epochs=1, optimizer="sgd", lr=0.01, weight_decay=1e-3)
    )
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    order = torch.randperm(x.shape[0], device=x.device)
    sync(x.device)
    t0 = time.perf_counter()
    for start in range(0, x.shape[0], batch):
        idx = order[start : start + batch]
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
            loss = loss_fn(model(x[idx]).float(), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    sync(x.device)
    return time.perf_counter() - t0


def throughput(arch: str, device: torch.device, args: argparse.Namespace) -> dict[str, float]:
    data = make_synthetic(10, (3, 32, 32), args.n_train, 10)
    x, y = data.x_train.to(device), data.y_train.to(device)
    amp = device.type == "cuda"
    models = {}
    for name, compose in variants(args.batch_size).items():
        torch.manual_seed(0)
        models[name] = compose(build_model(arch, 10, (3, 32, 32))).to(device)
    for model in models.values():  # warm-up: cuDNN autotuning, allocator
        epoch_seconds(model, x[: 4 * args.batch_size], y[: 4 * args.batch_size], args.batch_size, amp)
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.rounds):
        for name, model in models.items():
            times[name].append(epoch_seconds(model, x, y, args.batch_size, amp))
    return {name: 1.0 / statistics.median(ts) for name, ts in times.items()}


def exports(arch: str, device: torch.device, out: Path) -> dict[str, str]:
    torch.manual_seed(0)
    model = build_model(arch, 10, (3, 32, 32)).to(device)
    apply_lorita(model, 3, init="scratch")
    collapse(model)
    spectra = svt.compute_spectra(model, (3, 32, 32))
    ranks, _threshold = svt.ranks_global(spectra, 0.3)
    small = svt.truncate(model, spectra, ranks).eval()
    example = torch.rand(4, 3, 32, 32, device=device)
    results = {}
    for fmt, export in (("pt2", export_pt2), ("onnx", export_onnx)):
        try:
            diff = export(small, example, out / f"{arch}.{fmt}")
            results[fmt] = f"max abs diff {diff:.2e}"
        except Exception as err:  # a report, not a crash: the table says what failed
            results[fmt] = f"FAILED: {type(err).__name__}: {err}"[:200]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--n-train", type=int, default=10_000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--archs", nargs="+", default=["resnet20", "vgg16"])
    args = parser.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device {name}, torch {torch.__version__}, {args.n_train} samples/epoch, batch {args.batch_size}")
    print("\n| model | variant | epochs/s | ratio to N=1 |\n|---|---|---|---|")
    for arch in args.archs:
        eps = throughput(arch, device, args)
        for variant, value in eps.items():
            print(f"| {arch} | {variant} | {value:.3f} | {eps['N=1'] / value:.3f}x time |")
    print("\n| model | pt2 on device | onnx from device |\n|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.archs:
            res = exports(arch, device, Path(tmp))
            print(f"| {arch} | {res['pt2']} | {res['onnx']} |")


if __name__ == "__main__":
    main()
