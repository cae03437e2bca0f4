"""Charts drawn on the server as inline SVG: no chart library, nothing to load, works offline.

Each function returns markup that templates insert with ``|safe``; every value that reaches the
markup is a number or passes through :func:`html.escape`. The same figures are also shown as a
table next to each chart (templates), so nothing is only visible as a picture.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from html import escape
from typing import Any

WIDTH, HEIGHT = 640, 320
MARGIN = {"left": 64, "right": 16, "top": 16, "bottom": 48}


def _ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / count
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.ceil(lo / step) * step
    ticks = []
    t = start
    while t <= hi + step * 1e-9:
        ticks.append(round(t, 12))
        t += step
    return ticks


def _fmt(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1e6:
        return f"{value / 1e6:.3g}M"
    if abs(value) >= 1e3:
        return f"{value / 1e3:.3g}k"
    return f"{value:.3g}"


class _Frame:
    """Scales from data to pixels for one chart."""

    def __init__(self, x: tuple[float, float], y: tuple[float, float]) -> None:
        self.x0, self.x1 = x
        self.y0, self.y1 = y
        self.left = MARGIN["left"]
        self.right = WIDTH - MARGIN["right"]
        self.top = MARGIN["top"]
        self.bottom = HEIGHT - MARGIN["bottom"]

    def px(self, x: float) -> float:
        span = (self.x1 - self.x0) or 1.0
        return self.left + (x - self.x0) / span * (self.right - self.left)

    def py(self, y: float) -> float:
        span = (self.y1 - self.y0) or 1.0
        return self.bottom - (y - self.y0) / span * (self.bottom - self.top)

    def axes(self, x_label: str, y_label: str, y_percent: bool = False) -> list[str]:
        parts = [
            f'<line class="axis" x1="{self.left}" y1="{self.bottom}" x2="{self.right}" y2="{self.bottom}"/>',
            f'<line class="axis" x1="{self.left}" y1="{self.top}" x2="{self.left}" y2="{self.bottom}"/>',
        ]
        for t in _ticks(self.x0, self.x1):
            x = self.px(t)
            parts.append(
                f'<line class="tick" x1="{x:.1f}" y1="{self.bottom}" x2="{x:.1f}" y2="{self.bottom + 4}"/>'
            )
            parts.append(
                f'<text class="tick-label" x="{x:.1f}" y="{self.bottom + 16}" text-anchor="middle">{_fmt(t)}</text>'
            )
        for t in _ticks(self.y0, self.y1):
            y = self.py(t)
            label = f"{t * 100:.3g}%" if y_percent else _fmt(t)
            parts.append(f'<line class="grid" x1="{self.left}" y1="{y:.1f}" x2="{self.right}" y2="{y:.1f}"/>')
            parts.append(
                f'<text class="tick-label" x="{self.left - 6}" y="{y + 4:.1f}" text-anchor="end">{label}</text>'
            )
        parts.append(
            f'<text class="axis-label" x="{(self.left + self.right) / 2:.0f}" y="{HEIGHT - 8}" '
            f'text-anchor="middle">{escape(x_label)}</text>'
        )
        parts.append(
            f'<text class="axis-label" transform="rotate(-90)" x="{-(self.top + self.bottom) / 2:.0f}" y="14" '
            f'text-anchor="middle">{escape(y_label)}</text>'
        )
        return parts


def _padded(values: Sequence[float], pad: float = 0.05, floor: float | None = None) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    span = (hi - lo) or max(abs(hi), 1e-9) * 0.1 or 1.0
    lo, hi = lo - span * pad, hi + span * pad
    if floor is not None:
        lo = max(lo, floor)
    return lo, hi


def pareto_points(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The report's evaluated points, each with its index, sorted by parameters (for the table)."""
    points = []
    for i, p in enumerate(report.get("pareto") or []):
        if p.get("val_accuracy") is None or p.get("params") is None:
            continue
        points.append(
            {
                "index": i,
                "params": int(p["params"]),
                "flops": int(p.get("flops") or 0),
                "params_fraction": float(p.get("params_fraction") or 0.0),
                "flops_fraction": float(p.get("flops_fraction") or 0.0),
                "val_accuracy": float(p["val_accuracy"]),
                "stage": str(p.get("stage") or ""),
                "chosen": bool(p.get("chosen")),
            }
        )
    return sorted(points, key=lambda p: (p["params"], p["index"]))


def pareto_svg(points: Sequence[Mapping[str, Any]], axis: str = "params") -> str:
    """Validation accuracy against parameters (or FLOPs); the chosen point is marked.

    Each point is a focusable button carrying its figures in data attributes; the page's script
    shows them on hover or focus and offers "use this point" on click or Enter.
    """
    if not points:
        return '<p class="muted">No evaluated points.</p>'
    label = {"params": "parameters", "flops": "FLOPs (per sample)"}[axis]
    xs = [float(p[axis]) for p in points]
    ys = [float(p["val_accuracy"]) for p in points]
    frame = _Frame(_padded(xs, floor=0.0), _padded(ys, pad=0.12, floor=0.0))
    parts = [
        f'<svg class="chart pareto" viewBox="0 0 {WIDTH} {HEIGHT}" role="group" '
        f'aria-label="Validation accuracy against {label}; each point is a button">'
    ]
    parts += frame.axes(label, "validation accuracy", y_percent=True)
    front = sorted(points, key=lambda p: float(p[axis]))
    best = -1.0
    line = []
    for p in front:  # the Pareto front: points no smaller point beats
        if float(p["val_accuracy"]) > best:
            best = float(p["val_accuracy"])
            line.append(f"{frame.px(float(p[axis])):.1f},{frame.py(best):.1f}")
    parts.append(f'<polyline class="front" points="{" ".join(line)}"/>')
    for p in points:
        x, y = frame.px(float(p[axis])), frame.py(float(p["val_accuracy"]))
        cls = "point chosen" if p["chosen"] else "point"
        title = (
            f"{p['params']:,} parameters ({p['params_fraction']:.1%}), {p['flops']:,} FLOPs "
            f"({p['flops_fraction']:.1%}), val accuracy {p['val_accuracy']:.2%}"
            + (" (chosen)" if p["chosen"] else "")
        )
        parts.append(
            f'<circle class="{cls}" cx="{x:.1f}" cy="{y:.1f}" r="{8 if p["chosen"] else 6}" tabindex="0" '
            f'role="button" aria-label="{escape(title)}" data-index="{p["index"]}" data-params="{p["params"]}" '
            f'data-flops="{p["flops"]}" data-params-fraction="{p["params_fraction"]:.6f}" '
            f'data-flops-fraction="{p["flops_fraction"]:.6f}" data-accuracy="{p["val_accuracy"]:.6f}" '
            f'data-chosen="{str(p["chosen"]).lower()}"><title>{escape(title)}</title></circle>'
        )
    parts.append("</svg>")
    return "".join(parts)


def rank_rows(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for name, r in (report.get("ranks") or {}).items():
        rows.append(
            {
                "name": str(name),
                "kind": str(r.get("kind", "")),
                "shape": "x".join(str(d) for d in r.get("shape", [])),
                "full": int(r.get("full_rank", 0)),
                "kept": int(r.get("kept_rank", 0)),
                "factorized": bool(r.get("factorized")),
            }
        )
    return rows


def ranks_svg(rows: Sequence[Mapping[str, Any]]) -> str:
    """Per layer, a bar of the full rank with the kept rank drawn over it."""
    if not rows:
        return '<p class="muted">No compressible layers.</p>'
    bar, gap, left, right = 18, 8, 180, 60
    height = len(rows) * (bar + gap) + 40
    top = max(int(r["full"]) for r in rows) or 1
    span = WIDTH - left - right
    parts = [
        f'<svg class="chart ranks" viewBox="0 0 {WIDTH} {height}" role="img" '
        f'aria-label="Full and kept rank per layer">'
    ]
    for i, r in enumerate(rows):
        y = 10 + i * (bar + gap)
        full_w = span * int(r["full"]) / top
        kept_w = span * int(r["kept"]) / top
        name = escape(str(r["name"]))
        parts.append(f'<text class="tick-label" x="{left - 8}" y="{y + 13}" text-anchor="end">{name}</text>')
        parts.append(
            f'<rect class="bar-full" x="{left}" y="{y}" width="{full_w:.1f}" height="{bar}"><title>{name}: full rank {r["full"]}</title></rect>'
        )
        parts.append(
            f'<rect class="bar-kept" x="{left}" y="{y + 4}" width="{kept_w:.1f}" height="{bar - 8}">'
            f"<title>{name}: kept {r['kept']} of {r['full']}</title></rect>"
        )
        parts.append(
            f'<text class="tick-label" x="{left + full_w + 6:.1f}" y="{y + 13}">{r["kept"]}/{r["full"]}</text>'
        )
    legend_y = height - 14
    parts.append(f'<rect class="bar-full" x="{left}" y="{legend_y - 10}" width="14" height="12"/>')
    parts.append(f'<text class="tick-label" x="{left + 20}" y="{legend_y}">full rank</text>')
    parts.append(f'<rect class="bar-kept" x="{left + 110}" y="{legend_y - 10}" width="14" height="12"/>')
    parts.append(f'<text class="tick-label" x="{left + 130}" y="{legend_y}">kept rank</text>')
    parts.append("</svg>")
    return "".join(parts)
