"""Terminal output shared by the CLI commands: errors, the progress bar, the report table."""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from core.progress import Progress, ProgressFn
from core.report import JobReport


def fail(message: str, code: int = 2) -> int:
    """Print ``message`` for a person (no traceback) and return the exit code."""
    print(f"error: {message}", file=sys.stderr)
    return code


@contextmanager
def progress_bar(disable: bool = False) -> Iterator[ProgressFn]:
    """A tqdm bar over the whole job (0..100%), its text saying the stage, epoch, loss, val acc."""
    from tqdm import tqdm

    bar = tqdm(
        total=100,
        unit="%",
        disable=disable,
        file=sys.stderr,
        bar_format="{l_bar}{bar}| {elapsed}<{remaining}",
    )

    def on_progress(p: Progress) -> None:
        parts = [p.stage]
        if p.epoch is not None:
            parts.append(f"epoch {p.epoch}/{p.epochs}")
        if p.loss is not None:
            parts.append(f"loss {p.loss:.4f}")
        if p.val_accuracy is not None:
            parts.append(f"val {p.val_accuracy:.3f}")
        bar.set_description(" ".join(parts), refresh=False)
        bar.update(max(0.0, round(100 * p.fraction, 2) - bar.n))

    try:
        yield on_progress
    finally:
        bar.close()


def _fmt_int(n: int | None) -> str:
    return f"{int(n):,}" if n is not None else "-"


def _fmt_acc(a: float | None) -> str:
    return f"{100 * a:.2f}%" if a is not None else "-"


def _ratio(before: float | None, after: float | None) -> str:
    return f"{after / before:.3f}x" if before and after is not None else "-"


def format_report_table(report: JobReport | Mapping[str, Any]) -> str:
    """The before/after table printed at the end of a job (a report as decoded JSON is validated)."""
    if not isinstance(report, JobReport):
        report = JobReport.model_validate(report)
    rows: list[tuple[str, str, str, str]] = []
    for label, count in (("parameters", report.params), ("FLOPs (batch 1)", report.flops)):
        rows.append((label, _fmt_int(count.before), _fmt_int(count.after), _ratio(count.before, count.after)))
    for split, acc in (("val", report.accuracy.val), ("test", report.accuracy.test)):
        b, a = acc.before, acc.after
        diff = f"{100 * (a - b):+.2f} pt" if a is not None and b is not None else "-"
        rows.append((f"{split} accuracy", _fmt_acc(b), _fmt_acc(a), diff))
    for batch, lat in report.latency_ms.items():
        rows.append(
            (
                f"latency ms (batch {batch})",
                f"{lat.before:.3f}",
                f"{lat.after:.3f}",
                _ratio(lat.before, lat.after),
            )
        )
    if report.size_bytes is not None:
        size = report.size_bytes
        rows.append(
            (
                "weights file bytes",
                _fmt_int(size.before),
                _fmt_int(size.after),
                _ratio(size.before, size.after),
            )
        )
    factorized = sum(1 for r in report.ranks.values() if r.factorized)
    header = ("", "before", "after", "change")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    lines = [
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in [header, *rows]
    ]
    lines.insert(1, "-" * len(lines[0]))
    lines.append(f"{factorized} of {len(report.ranks)} layers factorized; policy {report.policy}")
    return "\n".join(lines)
