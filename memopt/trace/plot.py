"""Plots of memory traces: live memory against aten-op index (deterministic, unlike a wall-clock axis)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Mapping

if TYPE_CHECKING:
    from .result import MemoryTrace

GIB = 1024**3


def plot_traces(
    traces: Mapping[str, "MemoryTrace"],
    path: str | Path | None = None,
    title: str | None = None,
    include_baseline: bool = True,
):
    """Overlay the timelines of several traces (one per strategy), each with its peak annotated.

    The y axis is total device memory (weights + inputs + live activations) when ``include_baseline``, so the weights
    floor shows as a dashed line. The x axis is each trace's op index normalised to [0, 1], so strategies with
    different op counts (chunked runs have more ops) line up. Returns the saved path, or the figure when ``path`` is
    ``None``.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 4.8), dpi=110)
    single = len(traces) == 1
    for label, trace in traces.items():
        base = trace.baseline_bytes if include_baseline else 0
        count = max(len(trace.live_bytes) - 1, 1)
        xs = [i / count for i in range(len(trace.live_bytes))] if not single else list(range(len(trace.live_bytes)))
        ys = [(base + live) / GIB for live in trace.live_bytes]
        line, = ax.step(xs, ys, where="post", linewidth=1.0, label=f"{label}: peak {(base + trace.peak_bytes) / GIB:.2f} GiB")
        if trace.peak_index >= 0:
            peak_x = trace.peak_index / count if not single else trace.peak_index
            peak_y = (base + trace.peak_bytes) / GIB
            ax.plot([peak_x], [peak_y], "o", color=line.get_color(), markersize=4)
            ax.annotate(f"{trace.peak_op} @ {trace.peak_module or '<top>'}", (peak_x, peak_y),
                        textcoords="offset points", xytext=(6, 4), fontsize=7, color=line.get_color())
        if include_baseline and base:
            ax.axhline(base / GIB, linestyle="--", linewidth=0.8, color=line.get_color(), alpha=0.6)
    ax.set_xlabel("aten op index" if single else "fraction of the forward (aten-op index, normalised)")
    ax.set_ylabel("live memory (GiB)" + (" incl. weights + inputs" if include_baseline else " above baseline"))
    ax.set_title(title or ", ".join(traces))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    if path is None:
        return fig
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
