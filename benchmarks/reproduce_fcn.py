"""Reproduce the paper's first experiment (FCN, offline data): how much LoRITa-trained FCNs
can be truncated at an accuracy budget of one point, for N = 1, 2, 3 factors.

FCN width 96, depth 6, BatchNorm, Adam lr 1e-2, cosine schedule, a small weight-decay grid.
For each (N, weight decay) one job runs through ``core.pipeline.run_job`` with the policy
``accuracy_budget`` (max_drop 0.01, decided on the validation split); the test split is
evaluated once at the end. "With fine-tuning" runs the same bisection from the job's saved
dense model, but each candidate is fine-tuned a few epochs before its validation accuracy
is read (keep-the-better, as the pipeline does), so fine-tuning may allow a smaller model.

    python benchmarks/reproduce_fcn.py                       # digits, ~10 min on 2 busy cores
    python benchmarks/reproduce_fcn.py --mnist-root DIR      # also MNIST (torchvision layout)

Prints a markdown table and writes it to benchmarks/results/reproduce_fcn.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core import search, svt  # noqa: E402
from core.config import parse_config  # noqa: E402
from core.data import load_data  # noqa: E402
from core.export import load_model  # noqa: E402
from core.metrics import count_flops, count_params  # noqa: E402
from core.pipeline import DENSE_DIR, finetune_settings, run_job  # noqa: E402
from core.train import accuracy, fit  # noqa: E402

MAX_DROP = 0.01


def job_config(
    dataset: dict[str, Any], factors: int, wd: float, epochs: int, batch: int, seed: int
) -> dict[str, Any]:
    return {
        "name": f"fcn-{dataset.get('name')}-N{factors}-wd{wd:g}-seed{seed}",
        "model": {"arch": "fcn", "options": {"depth": 6, "width": 96, "batchnorm": True}},
        "dataset": dataset,
        "train": {
            "factors": factors,
            "epochs": epochs,
            "optimizer": "adam",
            "lr": 1e-2,
            "weight_decay": wd,
            "batch_size": batch,
            "schedule": "cosine",
            "seed": seed,
        },
        "compress": {"policy": "accuracy_budget", "max_drop": MAX_DROP, "max_evals": 20},
        "finetune": {"epochs": 0},
        "measure": {"latency": False},
        "export": ["safetensors"],
        "device": "cpu",
    }


def finetuned_search(job_dir: Path, cfg: dict[str, Any], ft_epochs: int) -> dict[str, Any]:
    """The accuracy-budget bisection where each candidate is fine-tuned before it is scored."""
    config = parse_config({**cfg, "finetune": {"epochs": ft_epochs, "patience": ft_epochs}})
    data = load_data(config.dataset, seed=config.train.seed if config.train else 0)
    model = load_model(job_dir / DENSE_DIR)
    spectra = svt.compute_spectra(model, data.input_shape)
    dense_params = count_params(model)
    dense_flops = count_flops(model, data.input_shape)
    other_params = dense_params - sum(sp.dense_params() for sp in spectra.values())
    other_flops = dense_flops - sum(sp.flops_at(sp.full_rank) for sp in spectra.values())
    settings = finetune_settings(config.finetune, config.train, augment=False)
    tuned_models: dict[tuple[int, ...], torch.nn.Module] = {}

    def evaluate(ranks: svt.Ranks) -> float:
        candidate = svt.truncate(model, spectra, ranks)
        untuned = accuracy(candidate, data.val)
        if all(ranks[k] == sp.full_rank for k, sp in spectra.items()):
            return untuned  # the dense reference is the collapsed model, not a fine-tuned one
        tuned = copy.deepcopy(candidate)
        fit(tuned, data.train, data.val, settings, device=torch.device("cpu"))
        tuned_val = accuracy(tuned, data.val)
        best = tuned if tuned_val >= untuned else candidate
        tuned_models[tuple(ranks[k] for k in spectra)] = best
        return max(untuned, tuned_val)

    ranks, points = search.search_accuracy_budget(
        spectra, other_params, other_flops, evaluate, max_drop=MAX_DROP, max_evals=20, refine=True
    )
    chosen = next(p for p in points if p["chosen"])
    final = tuned_models.get(tuple(ranks[k] for k in spectra), model)
    return {
        "params_fraction": chosen["params_fraction"],
        "val_accuracy": chosen["val_accuracy"],
        "test_accuracy": accuracy(final, data.test),
        "evaluations": len(points),
    }


def run_one(
    dataset: dict[str, Any], factors: int, wd: float, epochs: int, batch: int, ft: int, seed: int
) -> dict[str, Any]:
    cfg = job_config(dataset, factors, wd, epochs, batch, seed)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        report = run_job(parse_config(cfg), tmp)
        job_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        tuned = finetuned_search(Path(tmp), cfg, ft)
        ft_s = time.perf_counter() - t1
    acc = report["accuracy"]
    return {
        "dataset": report["dataset"]["name"],
        "N": factors,
        "wd": wd,
        "seed": seed,
        "val_dense": acc["val"]["before"],
        "test_dense": acc["test"]["before"],
        "kept": report["params"]["ratio"],
        "test_after": acc["test"]["after"],
        "evals": report["search"]["evaluations"],
        "kept_ft": tuned["params_fraction"],
        "test_after_ft": tuned["test_accuracy"],
        "evals_ft": tuned["evaluations"],
        "job_s": job_s,
        "ft_s": ft_s,
    }


def pct(x: float) -> str:
    return f"{100 * x:.2f}"


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| data | N | wd | seed | val acc dense | test acc dense | params kept | test acc trunc. | evals "
        "| params kept (FT) | test acc (FT) | evals (FT) | job s | FT search s |"
    )
    sep = "|" + "---|" * 14
    lines = [head, sep]
    for r in rows:
        lines.append(
            f"| {r['dataset']} | {r['N']} | {r['wd']:g} | {r['seed']} | {pct(r['val_dense'])} "
            f"| {pct(r['test_dense'])} | {pct(r['kept'])}% | {pct(r['test_after'])} | {r['evals']} "
            f"| {pct(r['kept_ft'])}% | {pct(r['test_after_ft'])} | {r['evals_ft']} | {r['job_s']:.0f} "
            f"| {r['ft_s']:.0f} |"
        )
    return "\n".join(lines)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def summary(rows: list[dict[str, Any]]) -> str:
    """Means over seeds per (N, wd); the weight decay chosen per N on *validation* accuracy;
    the N=3 / N=1 ratio of parameters kept."""
    out = [
        "| data | N | wd | mean val acc dense | mean test acc dense | mean params kept "
        "| mean params kept (FT) | mean test acc trunc. | mean test acc (FT) |",
        "|" + "---|" * 9,
    ]
    verdicts = []
    for name in sorted({r["dataset"] for r in rows}):
        groups: dict[tuple[int, float], list[dict[str, Any]]] = {}
        for r in rows:
            if r["dataset"] == name:
                groups.setdefault((r["N"], r["wd"]), []).append(r)
        means: dict[tuple[int, float], dict[str, float]] = {}
        for (n, wd), rs in sorted(groups.items()):
            m = {
                k: _mean([r[k] for r in rs])
                for k in ("val_dense", "test_dense", "kept", "kept_ft", "test_after", "test_after_ft")
            }
            means[(n, wd)] = m
            out.append(
                f"| {name} | {n} | {wd:g} | {pct(m['val_dense'])} | {pct(m['test_dense'])} | {pct(m['kept'])}% "
                f"| {pct(m['kept_ft'])}% | {pct(m['test_after'])} | {pct(m['test_after_ft'])} |"
            )
        best: dict[int, tuple[float, dict[str, float]]] = {}
        for (n, wd), m in means.items():
            if n not in best or m["val_dense"] > best[n][1]["val_dense"]:
                best[n] = (wd, m)
        parts = [f"N={n}: wd {wd:g} keeps {pct(m['kept'])}%" for n, (wd, m) in sorted(best.items())]
        verdicts.append(
            f"- {name}, weight decay chosen per N by mean dense validation accuracy: "
            + "; ".join(parts)
            + "."
        )
        if 1 in best and 3 in best:
            for key, label in (("kept", "without"), ("kept_ft", "with")):
                ratio = best[3][1][key] / best[1][1][key]
                holds = "holds" if ratio <= 0.5 else "does NOT hold"
                verdicts.append(
                    f"  - {label} fine-tuning: N=3 keeps {ratio:.2f}x what N=1 keeps (expected <= 0.5): {holds}."
                )
            for (n, wd), m in means.items():
                if n == 3 and (1, wd) in means:
                    m1 = means[(1, wd)]
                    verdicts.append(
                        f"  - at the same wd {wd:g}: N=3/N=1 kept ratio {m['kept'] / m1['kept']:.2f} "
                        f"(with FT {m['kept_ft'] / m1['kept_ft']:.2f})."
                    )
    return "\n".join(out) + "\n\n" + "\n".join(verdicts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=40, help="training epochs on digits")
    p.add_argument("--factors", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--weight-decays", type=float, nargs="+", default=[5e-5, 1e-4, 5e-4])
    p.add_argument("--finetune-epochs", type=int, default=3)
    p.add_argument("--mnist-root", type=Path, help="also run MNIST from this torchvision data directory")
    p.add_argument("--mnist-epochs", type=int, default=5)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "reproduce_fcn.md")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    runs: list[tuple[dict[str, Any], int, int]] = [
        ({"name": "digits", "val_fraction": 0.15}, args.epochs, 64)
    ]
    if args.mnist_root:
        runs.append(
            ({"name": "mnist", "root": str(args.mnist_root), "val_fraction": 0.1}, args.mnist_epochs, 128)
        )
    rows = []
    t0 = time.perf_counter()
    for dataset, epochs, batch in runs:
        for n in args.factors:
            for wd in args.weight_decays:
                for seed in args.seeds:
                    row = run_one(dataset, n, wd, epochs, batch, args.finetune_epochs, seed)
                    rows.append(row)
                    print(json.dumps(row), file=sys.stderr, flush=True)
    total = time.perf_counter() - t0
    text = "\n".join(
        [
            "# Reproduction: FCN with LoRITa + SVT at an accuracy budget of 1 point",
            "",
            f"FCN width 96, depth 6, BatchNorm; Adam lr 1e-2, cosine, batch {runs[0][2]}, seeds "
            + ", ".join(map(str, args.seeds))
            + "; "
            f"digits {args.epochs} epochs"
            + (f", MNIST {args.mnist_epochs} epochs (batch 128)" if args.mnist_root else "")
            + f" (fewer than the paper's, to fit ~15 min on 2 shared CPU cores); "
            f"policy accuracy_budget max_drop {MAX_DROP} on the validation split (bisection on the "
            "global threshold + per-layer greedy refinement, max_evals 20); FT: the same bisection "
            f"(with refinement, max 20 evaluations) with each candidate fine-tuned "
            f"{args.finetune_epochs} epochs (Adam lr 1e-3) before scoring.",
            "'params kept' = compressed / dense parameters (count_params); accuracies in %; "
            "the test split is evaluated once per model, after the choice.",
            "",
            table(rows),
            "",
            summary(rows),
            "",
            f"Total wall time {total / 60:.1f} min; torch {torch.__version__}, python "
            f"{platform.python_version()}, {args.threads} thread(s), CPU.",
            "",
        ]
    )
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
