"""`lorita compress`: the whole job on this machine, no service."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cli.output import fail, format_report_table, progress_bar


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "compress",
        help="run a compression job locally and write its artifacts",
        description="Train with LoRITa, collapse, truncate, measure and export, all on this machine.",
    )
    p.add_argument("config", type=Path, help="job config (JSON); see examples/")
    p.add_argument("--out", type=Path, required=True, help="directory for the artifacts and report.json")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="override the config's device")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_compress)


def cmd_compress(args: argparse.Namespace) -> int:
    from core.config import ConfigError, load_config
    from core.progress import JobCanceled, JobError

    try:
        config = load_config(args.config)
        if args.device:
            config.device = args.device
        from core.pipeline import run_job

        with progress_bar(disable=args.quiet) as on_progress:
            report = run_job(config, args.out, progress=on_progress)
    except (ConfigError, JobError) as err:
        return fail(str(err))
    except JobCanceled:
        return fail("canceled")
    except KeyboardInterrupt:
        return fail("interrupted; run the same command again to resume from the last epoch", code=130)
    print(format_report_table(report))
    print(f"artifacts in {args.out}", file=sys.stderr)
    return 0
