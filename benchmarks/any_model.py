"""Bring your own model: a torch.export program through the whole job, next to the zoo path.

For each model (a CIFAR ResNet-20 CNN, a small ViT transformer encoder, torchvision ResNet-18
at 32x32), on synthetic 3x32x32 data:

1. the zoo model is built and trained briefly (N=1) so that it has weights worth compressing;
   those weights are saved (safetensors) and the model is exported as a program
   (``torch.export`` with a dynamic batch, in train mode so that batch norm trains as in the
   zoo model) and saved with ``torch.export.save``;
2. the same job runs twice: ``{"model": {"program": "model.pt2"}}`` and ``{"model": {"arch": ...,
   "weights": "weights.safetensors"}}``: LoRITa (N=3) from those weights, then
   ``accuracy_budget`` with ``max_drop`` 0.01 (one point of validation accuracy);
3. it prints parameters, FLOPs and latency before/after and the accuracies of both paths.

The two paths must agree within noise: the same weights, seed and data; only the float
rounding of the graph and the module differ.

    python benchmarks/any_model.py                      # all three, ~30 min on 2 busy shared cores
    python benchmarks/any_model.py --models cnn --epochs 2
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.config import parse_config  # noqa: E402
from core.data import load_data  # noqa: E402
from core.pipeline import run_job  # noqa: E402
from core.report import JobReport  # noqa: E402
from core.train import FitSettings, fit  # noqa: E402
from core.zoo import build_model  # noqa: E402

MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "cnn": ("resnet20", {"width_mult": 0.5}),
    "transformer": ("vit_small", {"dim": 64, "depth": 2, "heads": 4, "patch_size": 8}),
    "resnet18": ("torchvision:resnet18", {}),
}
# ResNet-18 costs ~0.56 GFLOPs per 32x32 image: a smaller run keeps it to minutes on a CPU
SCALE: dict[str, float] = {"cnn": 1.0, "transformer": 1.0, "resnet18": 0.5}


def dataset(n_train: int, n_test: int) -> dict[str, Any]:
    return {
        "name": "synthetic",
        "num_classes": 10,
        "input_shape": [3, 32, 32],
        "n_train": n_train,
        "n_test": n_test,
    }


def job(model: dict[str, Any], args: argparse.Namespace, scale: float = 1.0) -> dict[str, Any]:
    return {
        "model": model,
        "dataset": dataset(max(64, int(args.n_train * scale)), args.n_test),
        "train": {
            "factors": 3,
            "epochs": args.epochs,
            "optimizer": "adam",
            "lr": args.lr,
            "weight_decay": args.weight_decay,
            "batch_size": 64,
            "seed": 0,
            "amp": False,
        },
        "compress": {"policy": "accuracy_budget", "max_drop": 0.01, "max_evals": 12},
        "finetune": {"epochs": 0},
        "measure": {"latency": True, "latency_repeats": 10, "threads": 1, "batch_sizes": [1, 32]},
        "export": ["safetensors", "pt2", "onnx"],
        "device": "cpu",
    }


def prepare(name: str, args: argparse.Namespace, work: Path) -> tuple[Path, Path]:
    """Train the zoo model briefly; save its weights and its torch.export program."""
    from safetensors.torch import save_file

    from core.export import portable_state_dict

    arch, options = MODELS[name]
    config = parse_config(job({"arch": arch, "options": options}, args, SCALE[name]))
    data = load_data(config.dataset, seed=config.seed)
    torch.manual_seed(0)
    model = build_model(arch, data.num_classes, data.input_shape, options)
    fit(
        model,
        data.train,
        data.val,
        FitSettings(epochs=args.pretrain_epochs, optimizer="adam", lr=args.lr, batch_size=64, amp=False),
        device=torch.device("cpu"),
    )
    weights = work / f"{name}.safetensors"
    save_file(portable_state_dict(model), str(weights))
    model.train()  # batch norm trains with batch statistics, as the zoo model does
    example = data.train.tensors[0][:4].clone()  # a view would save the whole training tensor
    program = torch.export.export(model, (example,), dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    path = work / f"{name}.pt2"
    torch.export.save(program, str(path))
    return weights, path


def row(name: str, path: str, report: JobReport, seconds: float) -> str:
    lat = report.latency_ms
    acc = report.accuracy
    return (
        f"| {name} | {path} | {report.params.before:,} -> {report.params.after:,} ({report.params.ratio:.3f}) "
        f"| {report.flops.before:,} -> {report.flops.after:,} ({report.flops.ratio:.3f}) "
        f"| {lat['1'].before:.2f} -> {lat['1'].after:.2f} | {lat['32'].before:.1f} -> {lat['32'].after:.1f} "
        f"| {acc.val.before:.3f} -> {acc.val.after:.3f} | {acc.test.before:.3f} -> {acc.test.after:.3f} "
        f"| {sum(r.factorized for r in report.ranks.values())}/{len(report.ranks)} | {seconds:.0f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--pretrain-epochs", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--n-train", type=int, default=1024)
    parser.add_argument("--n-test", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    lines = [
        "| model | path | params | FLOPs (batch 1) | latency ms, batch 1 | latency ms, batch 32 "
        "| val acc | test acc | truncated | s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name in args.models:
            arch, options = MODELS[name]
            weights, program = prepare(name, args, work)
            for path, model in (
                ("program", {"program": str(program)}),
                ("zoo", {"arch": arch, "options": options, "weights": str(weights)}),
            ):
                t0 = time.perf_counter()
                report = run_job(parse_config(job(model, args, SCALE[name])), work / f"{name}-{path}")
                lines.append(row(name, path, report, time.perf_counter() - t0))
                print(lines[-1], flush=True)
    print()
    print("\n".join(lines))


if __name__ == "__main__":
    main()
