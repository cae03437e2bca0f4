"""`lorita select` (another operating point of a finished job) and `lorita plan` (a dry run)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from cli.output import fail, format_report_table, progress_bar


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "select",
        help="pick another operating point from a finished job, without training again",
        description=(
            "Start from the dense model a finished job saved (DIR/dense), rerun the rank search "
            "with another budget on the job's validation split, and write a new set of "
            "artifacts. Same budget as the job: same ranks and figures."
        ),
    )
    p.add_argument(
        "job_dir", type=Path, metavar="DIR", nargs="?", help="the --out directory of a finished job"
    )
    p.add_argument(
        "--job",
        metavar="ID",
        help="a finished job of the service instead of DIR: a derived job runs there (no training), "
        "its artifacts are downloaded to --out (default lorita-<new id>)",
    )
    p.add_argument("--url", help="with --job: the service (default LORITA_URL)")
    p.add_argument("--key", help="with --job: the API key (default LORITA_API_KEY)")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--max-drop", type=float, help="accuracy budget: absolute drop in val accuracy")
    budget.add_argument("--max-rel-drop", type=float, help="accuracy budget: relative drop in val accuracy")
    budget.add_argument("--params", type=float, help="parameter budget: fraction of the dense model")
    budget.add_argument("--flops", type=float, help="FLOPs budget: fraction of the dense model")
    budget.add_argument(
        "--point",
        type=int,
        metavar="N",
        help="exactly the job's Pareto point N (its index in the report's pareto list): its ranks, "
        "one evaluation, the same figures",
    )
    p.add_argument("--max-evals", type=int, default=20, help="most validation evaluations (default 20)")
    p.add_argument("--no-refine", action="store_true", help="accuracy budget: bisection only")
    p.add_argument("--finetune", action="store_true", help="fine-tune as the job's config says")
    p.add_argument("--out", type=Path, help="output directory (default DIR/select-<budget>)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="override the job's device")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_select)

    q = sub.add_parser(
        "plan",
        help="dry run: which layers a job composes, the training overhead, params and FLOPs",
        description="Build the model of CONFIG and say, before any training, which weights LoRITa "
        "composes and which are skipped and why, what the factors add during training, and the "
        "model's parameters and FLOPs.",
    )
    q.add_argument("config", type=Path, help="job config (JSON)")
    q.add_argument("--json", action="store_true", help="machine-readable output")
    q.set_defaults(func=cmd_plan)


# ---------------------------------------------------------------------------------------
# select


def point_policy(pareto: list[Any], index: int) -> dict[str, Any]:
    """The ``ranks`` policy of a report's Pareto point ``index`` (a dict or a SearchPoint)."""
    from core.config import ConfigError

    if not 0 <= index < len(pareto):
        raise ConfigError(f"--point {index}: the job has Pareto points 0..{len(pareto) - 1}")
    point = pareto[index]
    ranks = point["ranks"] if isinstance(point, dict) else point.ranks
    return {"policy": "ranks", "ranks": dict(ranks)}


def policy_from_args(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    """The compress policy the flags ask for and a short tag for the default directory.

    ``--point`` gives a placeholder ``ranks`` policy: the point's ranks come from the job's report.
    """
    if getattr(args, "point", None) is not None:
        return {"policy": "ranks", "ranks": {}}, f"point-{args.point}"
    if args.max_drop is not None or args.max_rel_drop is not None:
        key = "max_drop" if args.max_drop is not None else "max_rel_drop"
        value = getattr(args, key)
        policy = {
            "policy": "accuracy_budget",
            key: value,
            "max_evals": args.max_evals,
            "refine": not args.no_refine,
        }
        return policy, f"{key.replace('_', '-')}-{value:g}"
    cost = "params" if args.params is not None else "flops"
    value = getattr(args, cost)
    return {"policy": f"{cost}_budget", "budget": value, "max_evals": args.max_evals}, f"{cost}-{value:g}"


def cmd_select(args: argparse.Namespace) -> int:
    from core.config import ConfigError
    from core.progress import JobCanceled, JobError

    if (args.job_dir is None) == (args.job is None):
        return fail("give either DIR (a local job directory) or --job ID (a job of the service)")
    policy, tag = policy_from_args(args)
    if args.job is not None:
        return select_on_service(args, policy)
    out = args.out or args.job_dir / f"select-{tag}"
    try:
        from core.pipeline import read_job_report, select, select_config

        if args.point is not None:
            policy = point_policy(read_job_report(args.job_dir).pareto, args.point)

        select_config(args.job_dir, policy, finetune=args.finetune, device=args.device)  # errors first
        with progress_bar(disable=args.quiet) as on_progress:
            report = select(
                args.job_dir, policy, out, finetune=args.finetune, device=args.device, progress=on_progress
            )
    except (ConfigError, JobError) as err:
        return fail(str(err))
    except JobCanceled:
        return fail("canceled")
    except KeyboardInterrupt:
        return fail("interrupted", code=130)
    print(format_report_table(report))
    chosen = report.chosen
    if chosen is not None:
        print(chosen_line(len(report.pareto), chosen.params_fraction, chosen.flops_fraction))
    print(f"artifacts in {out}", file=sys.stderr)
    return 0


def chosen_line(evaluations: int, params_fraction: float, flops_fraction: float) -> str:
    """The line under a select's report table: how many points were evaluated, what the chosen keeps."""
    return (
        f"chosen after {evaluations} evaluations: {params_fraction:.3f} of the "
        f"parameters, {flops_fraction:.3f} of the FLOPs"
    )


def select_on_service(args: argparse.Namespace, policy: dict[str, Any]) -> int:
    """``POST /v1/jobs/{id}/select``, follow the derived job, download its artifacts."""
    import uuid

    from cli.client import ClientError, LoritaClient
    from cli.service_commands import follow_job
    from core.config import ConfigError
    from store.settings import SettingsError, load_settings
    from store.status import JobStatus

    if args.device is not None:
        return fail("--device applies to local directories; a job of the service runs where it runs")
    try:
        settings = load_settings()
    except SettingsError as err:
        return fail(str(err))
    key = args.key or settings.api_key
    if not key:
        return fail("no API key: pass --key or set LORITA_API_KEY (create one with `lorita keys create`)")
    body = {"compress": policy, "finetune": bool(args.finetune)}
    try:
        with LoritaClient(args.url or settings.url, key) as client:
            if getattr(args, "point", None) is not None:
                body["compress"] = point_policy(client.report(args.job).get("pareto") or [], args.point)
            job = client.select(args.job, body, idempotency_key=f"lorita-select-{uuid.uuid4().hex}")
            job_id = job["id"]
            print(f"job {job_id} {job['status']} (another operating point of {args.job})", file=sys.stderr)
            job = follow_job(client, job_id, show=not args.quiet)
            if job["status"] != JobStatus.SUCCEEDED:
                return fail(f"job {job_id} {job['status']}: {job['error'] or job['status']}", 1)
            out = Path(args.out or f"lorita-{job_id}")
            client.download_artifacts(job_id, out)
            report = client.report(job_id)
    except ClientError as err:
        return fail(str(err), 1)
    except ConfigError as err:
        return fail(str(err))
    except KeyboardInterrupt:
        return fail("interrupted", code=130)
    print(format_report_table(report))
    chosen = next((p for p in report.get("pareto", []) if p.get("chosen")), None)
    if chosen is not None:
        print(chosen_line(len(report["pareto"]), chosen["params_fraction"], chosen["flops_fraction"]))
    print(f"job {job_id}: artifacts in {out}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------
# plan


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def format_plan(plan: dict[str, Any]) -> str:
    lines = [
        f"plan for {plan['arch']} with N={plan['factors']} factors, input {tuple(plan['input_shape'])}, "
        f"{plan['num_classes']} classes",
        f"model: {plan['params']:,} parameters, {plan['flops']:,} FLOPs per sample",
        "",
    ]
    for title, key in (("composed", "composed"), ("skipped", "skipped")):
        rows = plan[key]
        lines.append(f"{title} ({len(rows)}):")
        width = max((len(r["name"]) for r in rows), default=0)
        for r in rows:
            shape = "x".join(str(d) for d in r["matrix"])
            why = f"  {r['reason']}" if r["reason"] else ""
            if key == "composed" and r.get("space") == "layer":
                why = "  as a chain of layers (composition: auto)"
            lines.append(f"  {r['name'].ljust(width)}  {r['kind']:<13} {shape:>11}{why}")
        if not rows:
            lines.append("  (none)")
    t = plan["training"]
    mem = t["memory_bytes"]
    lines += [
        "",
        f"training: {t['trainable_params']:,} trainable parameters ({t['extra_params']:+,}: factors "
        f"{t['factor_params']:,} replace dense weights {t['composed_dense_params']:,})",
        f"memory ({mem['note']}; {t['optimizer']}: {t['optimizer_states_per_param']} states/param): "
        f"dense {_mib(mem['dense'])}, LoRITa {_mib(mem['lorita'])} ({mem['extra'] / 2**20:+.2f} MiB)",
    ]
    return "\n".join(lines)


def cmd_plan(args: argparse.Namespace) -> int:
    from core.config import ConfigError, load_config
    from core.progress import JobError

    try:
        config = load_config(args.config)
        from core.plan import plan_job

        plan = plan_job(config).to_dict()
    except (ConfigError, JobError) as err:
        return fail(str(err))
    if args.json:
        print(json.dumps(plan, indent=2))
    else:
        print(format_plan(plan))
    return 0
