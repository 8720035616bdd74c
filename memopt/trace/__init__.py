"""Memory tracing: exact live-storage peaks on CPU/fake tensors, the allocator's own numbers on CUDA."""

from .growth import activation_growth
from .plot import plot_traces
from .result import MemoryTrace, ModuleStats, TimelineEntry
from .simulate import simulate, simulate_family
from .tracer import MemoryTracer, trace_memory

__all__ = ["MemoryTrace", "MemoryTracer", "ModuleStats", "TimelineEntry", "activation_growth", "plot_traces",
           "simulate", "simulate_family", "trace_memory"]
