"""A deterministic memory tracer: live tensor-storage bytes after every aten op, attributed to modules.

Why a dispatch mode and not the profiler: ``torch.profiler`` sees nothing under ``FakeTensorMode`` and keys its timeline
on wall-clock time. Counting storages at the dispatcher gives an exact, reproducible byte count per aten op on the
CPU, on ``meta`` and on fake tensors, i.e. for full-size models that do not fit anywhere (see
``memopt.trace.simulate``). On CUDA the caching allocator is the truth, so there the per-op numbers are read from
``torch.cuda.memory_allocated`` instead and the peak from ``torch.cuda.max_memory_allocated``.

Accounting rules (CPU / fake / meta):

* an op's output storage is *new* unless it aliases one of the op's inputs (views, in-place and ``out=`` results
  share storage with an input and cost nothing);
* a storage is released when its last tensor dies (``weakref.finalize`` on the untyped storage, which PyTorch keeps
  alive exactly as long as the storage);
* ``peak_bytes`` is the largest amount of such new memory alive at once, i.e. bytes above what was live before the
  call; weights and inputs are reported separately as ``baseline_bytes``.
* storages made under :func:`host_memory` are host memory beside the device (saved activations moved off it): not
  counted, their bytes reported as ``meta["host_bytes"]``.
"""

from __future__ import annotations

import contextlib
import gc
import math
import threading
import weakref
from collections import defaultdict
from typing import Any, Callable, Iterable, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .result import MemoryTrace, ModuleStats

# FakeTensor routes ``.device`` queries through the mode stack; they allocate nothing and would only pad the timeline.
_IGNORED_OPS = {torch.ops.prim.device.default}
_ACTIVE = threading.local()


def _storage_of(tensor: torch.Tensor) -> torch.UntypedStorage | None:
    try:
        return tensor.untyped_storage()
    except (RuntimeError, NotImplementedError):  # sparse / nested / functional wrappers without a storage
        return None


def _tensors(tree: Any) -> list[torch.Tensor]:
    return [leaf for leaf in tree_flatten(tree)[0] if isinstance(leaf, torch.Tensor)]


def _module_tensors(module: torch.nn.Module) -> Iterable[torch.Tensor]:
    """What the module holds: parameters, their gradients (made before a training step) and buffers."""
    for parameter in module.parameters():
        yield parameter
        if parameter.grad is not None:
            yield parameter.grad
    yield from module.buffers()


class _StorageCounter(TorchDispatchMode):
    """The dispatch mode: counts new storages and records the timeline."""

    def __init__(self, tracer: "MemoryTracer") -> None:
        super().__init__()
        self.tracer = tracer

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in _IGNORED_OPS:
            return out
        self.tracer._after_op(func, (args, kwargs), out)
        return out


class MemoryTracer:
    """Records memory over one call. Use :func:`trace_memory` for the common case.

    Args:
        round_to: round every allocation up to this many bytes (512 mimics the CUDA caching allocator's
            smallest block). Only used for CPU/fake/meta tensors.
        root: the module whose submodule paths name the timeline (``blocks.0.attn1``). When ``None`` it is taken from
            the traced callable (a module or a module's bound method); other modules met while tracing are named by
            their class.
        record_timeline: keep the per-op timeline (``False`` keeps only peaks, for very long traces).
        record_snapshot: on CUDA, also record the allocator history so ``MemoryTrace.save`` writes the snapshot
            pickle for https://pytorch.org/memory_viz.
        device: ``"auto"`` (CUDA accounting when the callable's tensors are on CUDA), ``"cuda"`` or ``"dispatch"``.
    """

    def __init__(
        self,
        round_to: int = 1,
        root: torch.nn.Module | None = None,
        record_timeline: bool = True,
        record_snapshot: bool = False,
        device: str = "auto",
    ) -> None:
        if round_to < 1:
            raise ValueError(f"round_to must be a positive number of bytes, got {round_to}")
        if device not in ("auto", "cuda", "dispatch"):
            raise ValueError(f"device must be 'auto', 'cuda' or 'dispatch', got {device!r}")
        self.round_to = round_to
        self.root = root
        self.record_timeline = record_timeline
        self.record_snapshot = record_snapshot
        self.device = device

    # ------------------------------------------------------------------------------------------------ public
    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> MemoryTrace:
        """Run ``fn(*args, **kwargs)`` and return its :class:`MemoryTrace` (the result is in ``trace.result``)."""
        if getattr(_ACTIVE, "tracer", None) is not None:
            raise RuntimeError("trace_memory() was called inside another trace_memory(); nested traces are not "
                               "supported (the outer trace already records everything the inner call does)")
        root = self.root or (fn if isinstance(fn, torch.nn.Module) else getattr(fn, "__self__", None))
        if root is not None and not isinstance(root, torch.nn.Module):
            root = None
        self._reset(root)
        external = [*(_module_tensors(root) if root is not None else ()), *_tensors((args, kwargs))]
        use_cuda = self.device == "cuda" or (
            self.device == "auto" and any(t.is_cuda and not _is_fake(t) for t in external)
        )
        self._cuda = use_cuda
        self.baseline_bytes = self._unique_bytes(external, rounded=not use_cuda)
        self._thread = threading.get_ident()
        hooks = self._install_module_hooks()
        _ACTIVE.tracer = self
        gc_was_enabled = gc.isenabled()
        gc.collect()
        gc.disable()  # reference cycles would free on gc's schedule and make the trace non-deterministic
        try:
            if use_cuda:
                result = self._run_cuda(fn, args, kwargs)
            else:
                with _StorageCounter(self):
                    result = fn(*args, **kwargs)
        finally:
            _ACTIVE.tracer = None
            for hook in hooks:
                hook.remove()
            if gc_was_enabled:
                gc.enable()
        return self._result(result, root)

    # ------------------------------------------------------------------------------------------------ state
    def _reset(self, root: torch.nn.Module | None) -> None:
        self._names: dict[int, str] = {}
        if root is not None:
            self._names = {id(m): name for name, m in root.named_modules()}
        self._stack: list[str] = []
        self._entry_live: list[int] = []
        self._live: dict[int, int] = {}
        self.current = 0
        self.peak = 0
        self.peak_index = -1
        self.peak_op = ""
        self.peak_module = ""
        self.num_ops = 0
        self.ops: list[str] = []
        self.modules: list[str] = []
        self.live_bytes: list[int] = []
        self.module_stats: dict[str, ModuleStats] = defaultdict(ModuleStats)
        self._snapshot: dict | None = None
        self._cuda_start = 0
        self._host_depth = 0
        self._host: set[int] = set()
        self.host_bytes = 0

    def _unique_bytes(self, tensors: Iterable[torch.Tensor], rounded: bool) -> int:
        seen: dict[int, int] = {}
        for tensor in tensors:
            storage = _storage_of(tensor)
            if storage is not None:
                seen[storage._cdata] = self._rounded(storage.nbytes()) if rounded else storage.nbytes()
        return sum(seen.values())

    def _rounded(self, nbytes: int) -> int:
        return nbytes if self.round_to == 1 else math.ceil(nbytes / self.round_to) * self.round_to

    # ------------------------------------------------------------------------------------------------ modules
    def _module_name(self, module: torch.nn.Module) -> str:
        name = self._names.get(id(module))
        if name is None:
            # A module outside the root: name it by class, nested under the running module if any.
            parent = self._stack[-1] if self._stack else ""
            name = f"{parent}.{type(module).__name__}" if parent else type(module).__name__
        return name or "<root>"

    def _install_module_hooks(self) -> list[Any]:
        # Global hooks see every thread's modules; only this thread's calls belong to the trace.
        def pre_hook(module: torch.nn.Module, args: Any) -> None:
            if threading.get_ident() != self._thread:
                return
            name = self._module_name(module)
            self._stack.append(name)
            self._entry_live.append(self._current_live())
            self.module_stats[name].calls += 1

        def post_hook(module: torch.nn.Module, args: Any, output: Any) -> None:
            # always_call=True: runs on exceptions too, so the stack never goes stale.
            if threading.get_ident() == self._thread and self._stack:
                self._stack.pop()
                self._entry_live.pop()

        return [
            torch.nn.modules.module.register_module_forward_pre_hook(pre_hook),
            torch.nn.modules.module.register_module_forward_hook(post_hook, always_call=True),
        ]

    # ------------------------------------------------------------------------------------------------ counting
    def _current_live(self) -> int:
        if self._cuda:
            return torch.cuda.memory_allocated() - self._cuda_start
        return self.current

    def _on_free(self, key: int) -> None:
        nbytes = self._live.pop(key, None)
        if nbytes is not None:
            self.current -= nbytes

    def _after_op(self, func: Any, inputs: Any, out: Any) -> None:
        if not self._cuda:
            aliased = set()
            for tensor in _tensors(inputs):
                storage = _storage_of(tensor)
                if storage is not None:
                    aliased.add(storage._cdata)
            for tensor in _tensors(out):
                storage = _storage_of(tensor)
                if storage is None:
                    continue
                key = storage._cdata
                if key in aliased or key in self._live or key in self._host:
                    continue
                nbytes = self._rounded(storage.nbytes())
                if self._host_depth:
                    self._host.add(key)
                    self.host_bytes += nbytes
                    weakref.finalize(storage, self._host.discard, key)
                    continue
                self._live[key] = nbytes
                self.current += nbytes
                weakref.finalize(storage, self._on_free, key)
                for name in self._stack:
                    self.module_stats[name].allocated_bytes += nbytes
        self._record(func.overloadpacket.__name__)

    def _record(self, op_name: str) -> None:
        live = self._current_live()
        module = self._stack[-1] if self._stack else ""
        if live > self.peak:
            self.peak, self.peak_index, self.peak_op, self.peak_module = live, self.num_ops, op_name, module
        for name, entry in zip(self._stack, self._entry_live):
            stats = self.module_stats[name]
            stats.peak_bytes = max(stats.peak_bytes, live)
            stats.peak_above_entry_bytes = max(stats.peak_above_entry_bytes, live - entry)
        if self.record_timeline:
            self.ops.append(op_name)
            self.modules.append(module)
            self.live_bytes.append(live)
        self.num_ops += 1

    # ------------------------------------------------------------------------------------------------ CUDA
    def _run_cuda(self, fn: Callable[..., Any], args: Any, kwargs: Any) -> Any:
        torch.cuda.synchronize()
        self._cuda_start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        if self.record_snapshot:
            torch.cuda.memory._record_memory_history(max_entries=200_000)
        try:
            with _StorageCounter(self):
                result = fn(*args, **kwargs)
            torch.cuda.synchronize()
        finally:
            if self.record_snapshot:
                self._snapshot = torch.cuda.memory._snapshot()
                torch.cuda.memory._record_memory_history(enabled=None)
        cuda_peak = torch.cuda.max_memory_allocated() - self._cuda_start
        if cuda_peak > self.peak:  # a transient inside one op (kernel workspace) that no op boundary saw
            self.peak, self.peak_op, self.peak_module = cuda_peak, f"{self.peak_op} (inside op)", self.peak_module
        return result

    def _result(self, result: Any, root: torch.nn.Module | None) -> MemoryTrace:
        return MemoryTrace(
            peak_bytes=self.peak,
            baseline_bytes=self.baseline_bytes,
            peak_op=self.peak_op,
            peak_module=self.peak_module,
            peak_index=self.peak_index,
            num_ops=self.num_ops,
            ops=self.ops,
            modules=self.modules,
            live_bytes=self.live_bytes,
            module_stats=dict(self.module_stats),
            device="cuda" if self._cuda else "dispatch",
            round_to=1 if self._cuda else self.round_to,
            snapshot=self._snapshot,
            meta={"root": type(root).__name__ if root is not None else None,
                  **({"host_bytes": self.host_bytes} if self.host_bytes else {})},
            result=result,
        )


@contextlib.contextmanager
def host_memory() -> Iterator[None]:
    """Storages made inside are host memory standing in for the device's (saved activations moved off the GPU): the
    tracer active in this thread does not count them, and reports their bytes as ``trace.meta["host_bytes"]``.

    On a CUDA trace they are not CUDA memory anyway. On a CPU or fake trace, which is how a CUDA run is simulated,
    the host and the device are one memory, and this is what keeps them apart. What is made from them outside (the
    copy back to the device) is counted as usual.
    """
    tracer = getattr(_ACTIVE, "tracer", None)
    if tracer is None or tracer._cuda:
        yield
        return
    tracer._host_depth += 1
    try:
        yield
    finally:
        tracer._host_depth -= 1


def _is_fake(tensor: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(tensor, FakeTensor)


def trace_memory(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> MemoryTrace:
    """Run ``fn(*args, **kwargs)`` and return its :class:`MemoryTrace`.

    ``trace.peak_bytes`` is the peak of memory allocated during the call above what was live before it (weights and
    inputs are ``trace.baseline_bytes``); ``trace.peak_op`` / ``trace.peak_module`` say where it happened. Use
    :class:`MemoryTracer` for options (allocator rounding, snapshot recording, the root module for naming).

    Example::

        import torch
        from memopt import trace_memory
        mlp = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64))
        with torch.no_grad():
            trace = trace_memory(mlp, torch.randn(32, 64))
        print(trace.peak_bytes, trace.peak_op, trace.peak_module)   # 65536 gelu 1
    """
    return MemoryTracer().run(fn, *args, **kwargs)
