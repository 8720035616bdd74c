"""memopt: run large diffusion transformers on one modest GPU.

Sequential equivalents of tensor and sequence parallelism (chunks run one after another on one device), composed with
diffusers' group offloading, plus a Triton fused chunked-FFN kernel and a deterministic memory tracer.

Example::

    import memopt
    plan = memopt.apply_memory_optimizations(pipe)   # a DiffusionPipeline or a bare diffusers model
    print(plan)
    memopt.remove_memory_optimizations(pipe)
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Public names -> the module defining them. Imported lazily so `import memopt` stays cheap and never fails on optional
# parts (e.g. triton).
_EXPORTS = {
    "apply_memory_optimizations": "memopt.api",
    "remove_memory_optimizations": "memopt.api",
    "apply_chunked_feedforward": "memopt.hooks.feedforward",
    "apply_sequence_chunking": "memopt.hooks.sequence",
    "apply_chunked_attention": "memopt.hooks.attention",
    "trace_memory": "memopt.trace",
    "MemoryTrace": "memopt.trace",
    "MemoryTracer": "memopt.trace",
    "simulate": "memopt.trace",
    "simulate_family": "memopt.trace",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'memopt' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
