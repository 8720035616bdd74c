"""Plots of memory traces: live memory against aten-op index (deterministic, unlike a wall-clock axis)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Mapping

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from .result import MemoryTrace

_UNITS = (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024))


def _unit(max_bytes: int) -> tuple[str, int]:
    """The largest binary unit in which ``max_bytes`` is at least 1, so small traces don't read as 0.00 GiB."""
    for name, size in _UNITS:
        if max_bytes >= size:
            return name, size
    return "B", 1


def plot_traces(
    traces: Mapping[str, "MemoryTrace"],
    path: str | Path | None = None,
    title: str | None = None,
    include_baseline: bool = True,
) -> "Path | Figure":
    """Overlay the timelines of several traces (one per strategy), each with its peak annotated.

    The y axis is total device memory (weights + inputs + live activations) when ``include_baseline``, so the weights
    floor shows as a dashed line. With several traces the x axis is each trace's op index normalised to [0, 1], so
    strategies with different op counts (chunked runs have more ops) line up. Returns the saved path, or the figure
    when ``path`` is ``None``. Uses matplotlib's object API only, so it never changes the caller's backend (inline
    plots in notebooks keep working).
    """
    from matplotlib.figure import Figure

    single = len(traces) == 1
    top = max((t.baseline_bytes if include_baseline else 0) + t.peak_bytes for t in traces.values())
    unit, scale = _unit(top)
    fig = Figure(figsize=(11, 4.8) if len(traces) <= 3 else (13, 5.2), dpi=110)
    ax = fig.add_subplot()
    for label, trace in traces.items():
        base = trace.baseline_bytes if include_baseline else 0
        count = max(len(trace.live_bytes) - 1, 1)
        xs = list(range(len(trace.live_bytes))) if single else [i / count for i in range(len(trace.live_bytes))]
        ys = [(base + live) / scale for live in trace.live_bytes]
        peak = (base + trace.peak_bytes) / scale
        (line,) = ax.step(xs, ys, where="post", linewidth=1.0, label=f"{label}: peak {peak:.2f} {unit}")
        if trace.peak_index >= 0:
            peak_x = trace.peak_index if single else trace.peak_index / count
            ax.plot([peak_x], [peak], "o", color=line.get_color(), markersize=4)
            ax.annotate(f"{trace.peak_op} @ {trace.peak_module or '<top>'}", (peak_x, peak),
                        textcoords="offset points", xytext=(6, 4), fontsize=7, color=line.get_color())
        if include_baseline and base:
            ax.axhline(base / scale, linestyle="--", linewidth=0.8, color=line.get_color(), alpha=0.6)
    ax.set_xlabel("aten op index" if single else "fraction of the forward (aten-op index, normalised)")
    ax.set_ylabel(f"live memory ({unit})" + (" incl. weights + inputs" if include_baseline else " above baseline"))
    ax.set_title(title or ", ".join(traces))
    ax.grid(alpha=0.3)
    if len(traces) <= 3:
        ax.legend(fontsize=8, loc="best")
    else:  # many strategies: keep the legend off the curves
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    if path is None:
        return fig
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path
