"""The result of a memory trace, and its JSON form.

JSON schema (``version`` 1), written by :meth:`MemoryTrace.save` and read back by :meth:`MemoryTrace.load`::

    {"version": 1, "name": str, "device": "dispatch" | "cuda", "round_to": int,
     "baseline_bytes": int, "peak_bytes": int, "total_peak_bytes": int,
     "peak_op": str, "peak_module": str, "peak_index": int, "num_ops": int,
     "meta": {...},                                   # e.g. model, dtype, tokens, hidden, ld
     "modules": {path: {"calls", "peak_bytes", "peak_above_entry_bytes", "allocated_bytes"}},
     "timeline": {"op": [str], "module": [str], "live_bytes": [int]}}
"""

from __future__ import annotations

import json
import pickle
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

SCHEMA_VERSION = 1
GIB = 1024**3


@dataclass
class ModuleStats:
    """Memory while one module ran (all its calls), in bytes above the trace's baseline."""

    calls: int = 0
    peak_bytes: int = 0
    peak_above_entry_bytes: int = 0
    allocated_bytes: int = 0


class TimelineEntry(NamedTuple):
    index: int
    op: str
    module: str
    live_bytes: int


@dataclass
class MemoryTrace:
    """Memory over one call.

    Attributes:
        peak_bytes: peak of memory allocated during the call, above what was live before it.
        baseline_bytes: bytes of the weights and inputs that were live before the call (unique storages).
        peak_op / peak_module / peak_index: the aten op, module path and op index where the peak happened.
        num_ops: number of aten ops seen.
        ops / modules / live_bytes: the timeline as parallel lists (see :attr:`timeline`).
        module_stats: per module path, see :class:`ModuleStats`.
        device: ``"dispatch"`` (storage counting on CPU/fake/meta tensors) or ``"cuda"`` (the caching allocator).
        round_to: allocation rounding used for the counts.
        snapshot: the CUDA allocator snapshot when one was recorded.
        meta: free-form facts about the run (model, dtype, tokens, hidden width, ...).
        result: what the traced callable returned (not saved).
    """

    peak_bytes: int
    baseline_bytes: int
    peak_op: str
    peak_module: str
    peak_index: int
    num_ops: int
    ops: list[str]
    modules: list[str]
    live_bytes: list[int]
    module_stats: dict[str, ModuleStats]
    device: str = "dispatch"
    round_to: int = 1
    snapshot: dict | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    result: Any = None
    name: str = "trace"

    @property
    def total_peak_bytes(self) -> int:
        """Weights + inputs + the activation peak: what the device must hold at the worst moment."""
        return self.baseline_bytes + self.peak_bytes

    @property
    def timeline(self) -> list[TimelineEntry]:
        """Per aten op: index, op name, module path, live bytes above the baseline."""
        return [TimelineEntry(i, op, mod, live) for i, (op, mod, live) in
                enumerate(zip(self.ops, self.modules, self.live_bytes))]

    def by_module(self) -> dict[str, ModuleStats]:
        """Per module path: peak bytes while inside it, peak above its entry, bytes it allocated; sorted by peak."""
        return dict(sorted(self.module_stats.items(), key=lambda item: -item[1].peak_bytes))

    def ld(self, tokens: int, hidden: int, bytes_per_element: int) -> float:
        """The activation peak in LD units (tokens x hidden width x bytes per element)."""
        return self.peak_bytes / (tokens * hidden * bytes_per_element)

    def summary(self) -> str:
        text = (f"{self.name}: activation peak {self.peak_bytes:,} B ({self.peak_bytes / GIB:.2f} GiB) at op "
                f"#{self.peak_index} {self.peak_op} in {self.peak_module or '<top level>'}; weights+inputs "
                f"{self.baseline_bytes / GIB:.2f} GiB, total {self.total_peak_bytes / GIB:.2f} GiB")
        if "ld" in self.meta:
            text += f"; {self.meta['ld']:.2f} LD"
        return text

    __str__ = summary

    # ------------------------------------------------------------------------------------------------ files
    def to_dict(self) -> dict[str, Any]:
        return {
            "version": SCHEMA_VERSION,
            "name": self.name,
            "device": self.device,
            "round_to": self.round_to,
            "baseline_bytes": self.baseline_bytes,
            "peak_bytes": self.peak_bytes,
            "total_peak_bytes": self.total_peak_bytes,
            "peak_op": self.peak_op,
            "peak_module": self.peak_module,
            "peak_index": self.peak_index,
            "num_ops": self.num_ops,
            "meta": self.meta,
            "modules": {name: asdict(stats) for name, stats in self.module_stats.items()},
            "timeline": {"op": self.ops, "module": self.modules, "live_bytes": self.live_bytes},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MemoryTrace":
        if data.get("version") != SCHEMA_VERSION:
            raise ValueError(f"unsupported memory trace version {data.get('version')!r} (expected {SCHEMA_VERSION})")
        timeline = data["timeline"]
        return cls(
            peak_bytes=data["peak_bytes"], baseline_bytes=data["baseline_bytes"], peak_op=data["peak_op"],
            peak_module=data["peak_module"], peak_index=data["peak_index"], num_ops=data["num_ops"],
            ops=timeline["op"], modules=timeline["module"], live_bytes=timeline["live_bytes"],
            module_stats={name: ModuleStats(**stats) for name, stats in data["modules"].items()},
            device=data["device"], round_to=data["round_to"], meta=data.get("meta", {}), name=data["name"],
        )

    def save(self, path: str | Path, plot: bool = True) -> list[Path]:
        """Write ``<path>.json`` (+ ``<path>.png`` and, with a CUDA snapshot, ``<path>.pickle``); return the paths.

        The pickle opens in https://pytorch.org/memory_viz.
        """
        base = Path(path)
        if base.name.endswith(".json"):
            base = base.with_name(base.name[: -len(".json")])
        base.parent.mkdir(parents=True, exist_ok=True)

        def sibling(suffix: str) -> Path:  # not with_suffix(): names like "wan-1.3b" contain dots
            return base.with_name(base.name + suffix)

        written = [sibling(".json")]
        written[0].write_text(json.dumps(self.to_dict(), separators=(",", ":")))
        if plot:
            written.append(self.plot(sibling(".png")))
        if self.snapshot is not None:
            snapshot_path = sibling(".pickle")
            with open(snapshot_path, "wb") as handle:
                pickle.dump(self.snapshot, handle)
            written.append(snapshot_path)
        return written

    @classmethod
    def load(cls, path: str | Path) -> "MemoryTrace":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def plot(self, path: str | Path | None = None, title: str | None = None):
        """Live bytes vs op index with the weights floor and the annotated peak; saves a PNG when ``path`` is given."""
        from .plot import plot_traces

        return plot_traces({self.name: self}, path=path, title=title)
