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
    given = report.training
    if given is not None and given.given_val_accuracy is not None:
        lines.append(
            f"your model as given, before LoRITa training: val {_fmt_acc(given.given_val_accuracy)}, "
            f"test {_fmt_acc(given.given_test_accuracy)}"
        )
    lines.extend(f"warning: {w}" for w in report.warnings)
    speed = format_speed_table(report)
    if speed:
        lines.extend(["", speed])
    return "\n".join(lines)


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1e6:.2f} MB" if n >= 100_000 else f"{n / 1e3:.1f} kB"


def _align(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    return lines


def format_speed_table(report: JobReport) -> str:
    """Dense / compressed / compressed INT8 as deployed (the report's ``summary``), with what the
    latency budget predicted and measured and what INT8 cost; empty for reports without it."""
    summary = report.summary
    if summary is None:
        return ""
    batches = sorted({b for row in summary.rows.values() for b in row.latency_ms}, key=int)
    header = (
        "",
        "params",
        "FLOPs",
        "file",
        *[h for b in batches for h in (f"ms @{b} median/fastest", f"x dense @{b}")],
        "val acc",
        "test acc",
    )
    names = {"dense": "dense", "compressed": "compressed", "int8": "compressed INT8"}
    dense = summary.rows.get("dense")
    rows: list[tuple[str, ...]] = [header]
    for key, label in names.items():
        row = summary.rows.get(key)
        if row is None:
            continue
        lat: list[str] = []
        for b in batches:
            ms, fastest = row.latency_ms.get(b), row.fastest_ms.get(b)
            ref = dense.fastest_ms.get(b) if dense is not None else None
            lat.append(
                "-" if ms is None else f"{ms:.3f}/{fastest:.3f}" if fastest is not None else f"{ms:.3f}"
            )
            lat.append(f"{fastest / ref:.2f}x" if fastest is not None and ref else "-")
        rows.append(
            (
                label,
                _fmt_int(row.params),
                _fmt_int(row.flops),
                _fmt_bytes(row.bytes),
                *lat,
                _fmt_acc(row.val_accuracy),
                _fmt_acc(row.test_accuracy),
            )
        )
    runtime = summary.runtime if batches else "latency not measured"
    lines = [
        f"as deployed ({runtime}, {summary.threads} thread(s), {summary.repeats} interleaved runs; "
        "'x dense' compares the fastest runs, the stable figure on a shared machine)"
    ]
    lines.extend(_align(rows))
    lines.extend(f"warning: {w}" for w in summary.warnings)
    ls = report.latency_search
    if ls is not None and ls.measured_fraction is not None:
        lines.append(
            f"latency_budget {ls.budget:g} at batch {ls.batch_size}: predicted {ls.predicted_ms or 0:.3f} ms, "
            f"measured {ls.measured_ms or 0:.3f} ms = {ls.measured_fraction:.2f}x dense "
            f"({len(ls.confirmations)} measurement(s)); thin pairs slower than dense: "
            f"{', '.join(ls.slow_layers) or 'none'}"
        )
    if report.rounding is not None:
        moved = len(report.rounding.changed)
        lines.append(
            f"ranks rounded to multiples of {report.rounding.round_to} ({report.rounding.source}); "
            + (f"{moved} layer(s) moved" if moved else report.rounding.applied)
        )
    int8 = report.int8
    if int8 is not None:
        if int8.file is None:
            lines.append(f"INT8: {int8.error}")
        else:
            agree = f"{100 * int8.agreement:.1f}%" if int8.agreement is not None else "-"
            lines.append(
                f"INT8: {int8.size_ratio or 0:.2f}x the FP32 file, top-1 agreement with FP32 on validation {agree}; "
                f"main artifact {int8.main_artifact}"
            )
            if int8.message:
                lines.append(f"INT8: {int8.message}")
    return "\n".join(lines)
