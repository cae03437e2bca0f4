"""Figures of a job: the Pareto curve of the rank search and each layer's spectrum.

matplotlib runs headless (the Agg backend, set on a private figure, never globally), so
these work in the worker and in tests alike.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from core.svt import Spectrum

PARETO_FILE = "pareto.png"
SPECTRA_FILE = "spectra.png"


def _figure(ncols: int, width: float, height: float) -> tuple[Any, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, constrained_layout=True)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, axes


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    fig.savefig(tmp, format="png")
    tmp.replace(path)
    return path


def plot_pareto(points: Sequence[Mapping[str, Any]], path: str | Path, title: str = "") -> Path:
    """Validation accuracy against the parameter and the FLOP fraction, the chosen point marked."""
    fig, axes = _figure(2, 10.0, 4.0)
    for ax, key, label in (
        (axes[0], "params_fraction", "fraction of parameters kept"),
        (axes[1], "flops_fraction", "fraction of FLOPs kept"),
    ):
        pts = sorted(points, key=lambda p: (p[key], -p["val_accuracy"]))
        front = pareto_front(pts, key)
        ax.plot(
            [p[key] for p in front],
            [100 * p["val_accuracy"] for p in front],
            "-",
            color="0.6",
            label="Pareto front",
            zorder=1,
        )
        inside = [p for p in pts if p.get("within_budget", True)]
        outside = [p for p in pts if not p.get("within_budget", True)]
        ax.scatter(
            [p[key] for p in inside],
            [100 * p["val_accuracy"] for p in inside],
            s=18,
            color="tab:blue",
            label="evaluated (within budget)",
            zorder=2,
        )
        if outside:
            ax.scatter(
                [p[key] for p in outside],
                [100 * p["val_accuracy"] for p in outside],
                s=18,
                marker="x",
                color="tab:red",
                label="evaluated (over budget)",
                zorder=2,
            )
        for p in pts:
            if p.get("chosen"):
                ax.scatter(
                    [p[key]],
                    [100 * p["val_accuracy"]],
                    s=120,
                    facecolors="none",
                    edgecolors="black",
                    linewidths=1.5,
                    label=f"chosen ({p[key]:.3f}, {100 * p['val_accuracy']:.2f}%)",
                    zorder=3,
                )
        ax.set_xlabel(label)
        ax.set_ylabel("validation accuracy (%)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    if title:
        fig.suptitle(title)
    return _save(fig, Path(path))


def pareto_front(points: Sequence[Mapping[str, Any]], key: str) -> list[Mapping[str, Any]]:
    """The points no other point beats on both ``key`` (smaller) and accuracy (larger)."""
    front: list[Mapping[str, Any]] = []
    best = float("-inf")
    for p in sorted(points, key=lambda p: (p[key], -p["val_accuracy"])):
        if p["val_accuracy"] > best:
            front.append(p)
            best = p["val_accuracy"]
    return front


def plot_spectra(spectra: Mapping[str, Spectrum], path: str | Path, title: str = "") -> Path:
    """Each layer's singular values divided by its largest, on a log scale."""
    fig, axes = _figure(1, 6.5, 4.0)
    ax = axes[0]
    for name, sp in spectra.items():
        values = sp.normalized.clamp(min=1e-12).tolist()
        ax.plot(range(1, len(values) + 1), values, label=f"{name} ({sp.m}x{sp.n})", linewidth=1.2)
    ax.set_yscale("log")
    ax.set_xlabel("index of singular value")
    ax.set_ylabel("sigma_i / sigma_1")
    ax.grid(True, which="both", alpha=0.3)
    if len(spectra) <= 12:
        ax.legend(fontsize=7)
    ax.set_title(title or "normalized singular values per layer")
    return _save(fig, Path(path))
