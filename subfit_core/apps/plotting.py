"""The few lines every SubFit plot shares: a headless backend, one way to draw ratio curves, and
one way to finish and save."""

from __future__ import annotations

from pathlib import Path


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_ratio_plot(fig, ax, path: Path, xlabel: str, ylabel: str) -> None:
    """Log-scale ratio axis, grid, legend; written at 120 dpi and closed."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot().close(fig)


def ratio_lines(ax, series: dict[str, list[tuple[float, float]]], ceiling: float = 100.0, ordered: bool = False) -> list[str]:
    """One line per name, each with its own colour/marker pair (more names than colours stay apart),
    through its points sorted by x, or in the given order with ``ordered``. A series above
    ``ceiling`` anywhere would flatten the others on a log axis: it is left out and named in the
    title. Returns the names left out."""
    off = []
    for i, (name, pts) in enumerate(series.items()):
        pts = pts if ordered else sorted(pts)
        if max(y for _, y in pts) > ceiling:
            off.append(name)
            continue
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="osD^v<>"[i % 7], color=f"C{i % 10}",
                linestyle="-" if i < 10 else "--", label=name)
    if off:
        ax.set_title(f"off the chart (> {ceiling:g}x): {', '.join(off)}", fontsize=9)
    return off
