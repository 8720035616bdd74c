"""Device-independent work of a forward: what a GPU would compute and move, counted per aten op.

A chunked forward does the matmul and attention FLOPs of the unchunked one (tests check that), so where its extra
time goes is elsewhere: memory-bound ops run again (the part before attention in the two-pass schedule), tensors
copied into and out of the K/V buffers, part-empty kernel tiles at every chunk's edge, and more kernel launches.
:class:`WorkCounter` counts all of these on any device, including under ``FakeTensorMode`` for full-size models:

* **matmul / attention FLOPs**, exact and *tiled*: rounded up to whole ``tile`` x ``tile`` output tiles (and, for
  attention, whole key tiles), the work a tiled GPU kernel actually does;
* **memory bytes** of every other op that launches a kernel: the bytes of its tensor inputs (no more than their
  storage holds, so a broadcast table counts once) plus its outputs; views, metadata and ``empty`` cost nothing;
* **kernels**: ops that launch one (views and metadata excluded).

:meth:`Work.seconds` turns them into a roofline estimate for a :class:`Roofline` device. The estimate ranks variants of
one model on one device; ``benchmarks/sequence.py --device cuda`` measures.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

MATMULS = {"mm", "addmm", "addmm_", "bmm", "baddbmm", "baddbmm_"}
NO_WORK = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "lift_fresh",
           "_local_scalar_dense", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "is_contiguous", "dim",
           "device"}


@dataclass(frozen=True)
class Roofline:
    """Sustained speeds of a device for :meth:`Work.seconds`.

    Attributes:
        name: what the figures describe.
        matmul_flops_per_s: large dense GEMMs at the model's dtype.
        attention_flops_per_s: the fused attention kernel.
        memory_bytes_per_s: achieved HBM bandwidth of elementwise and reduction kernels.
        launch_s: host time per kernel launch (Python, dispatch and hooks included); overlaps device time.
    """

    name: str
    matmul_flops_per_s: float
    attention_flops_per_s: float
    memory_bytes_per_s: float
    launch_s: float


H100_BF16 = Roofline("H100 bf16", 6.6e14, 5.9e14, 2.8e12, 1e-5)
"""Three rates typical of an H100 SXM in bf16, chosen so that the unmodified Wan2.1-14B 720p/81f forward, counted
here, takes the 12.8 s measured on an H100 80GB HBM3 (``benchmarks/results/sequence_h100.md``): one measured point
for three rates, so they are plausible, not determined. The 10 us per launch is an assumed figure for a PyTorch eager
op with memopt's hooks around it, not a measurement. The ratios this predicts are a model (the measured 32-chunk Wan
ratio, 1.15, is above the 1.08 it predicts for that run's unaligned chunks)."""


@dataclass
class Work:
    """Counts of one forward (see the module docstring)."""

    matmul_flops: int = 0
    matmul_tiled_flops: int = 0
    attention_flops: int = 0
    attention_tiled_flops: int = 0
    memory_bytes: int = 0
    kernels: int = 0

    def _values(self) -> tuple[int, ...]:
        return (self.matmul_flops, self.matmul_tiled_flops, self.attention_flops, self.attention_tiled_flops,
                self.memory_bytes, self.kernels)

    def __add__(self, other: "Work") -> "Work":
        return Work(*(a + b for a, b in zip(self._values(), other._values())))

    def __sub__(self, other: "Work") -> "Work":
        return Work(*(a - b for a, b in zip(self._values(), other._values())))

    def __mul__(self, factor: int) -> "Work":
        return Work(*(value * factor for value in self._values()))

    def device_seconds(self, device: Roofline) -> float:
        """Kernel time: tiled FLOPs at the matmul and attention rates plus memory bytes at the bandwidth."""
        return (self.matmul_tiled_flops / device.matmul_flops_per_s
                + self.attention_tiled_flops / device.attention_flops_per_s
                + self.memory_bytes / device.memory_bytes_per_s)

    def seconds(self, device: Roofline) -> float:
        """Roofline time: the device's kernel time, or the host's launch time where that is longer (launches are
        asynchronous, so the two overlap)."""
        return max(self.device_seconds(device), self.kernels * device.launch_s)


def _tiles(size: int, tile: int) -> int:
    return -(-size // tile) * tile


def _read_bytes(tensor: torch.Tensor) -> int:
    """Bytes an op reads from ``tensor``: its elements, but no more than its storage holds (a broadcast view of a
    small table is read once, from cache)."""
    dense = tensor.numel() * tensor.element_size()
    try:
        return min(dense, tensor.untyped_storage().nbytes())
    except (RuntimeError, NotImplementedError):  # tensors without storage (sparse, some subclasses)
        return dense


class WorkCounter(TorchDispatchMode):
    """Counts :class:`Work` of the aten ops run under it (nests inside ``FakeTensorMode`` like any dispatch mode).

    With ``root``, also per module: ``by_module[path]`` (paths as in ``root.named_modules()``; the root is ``""``)
    is the work of the ops run while that module's forward was running, in all its calls.

    Example::

        from memopt.trace.work import H100_BF16, WorkCounter
        with torch.no_grad(), WorkCounter() as counter:
            model(**inputs)
        print(counter.work, counter.work.seconds(H100_BF16))
    """

    def __init__(self, tile: int = 128, root: torch.nn.Module | None = None) -> None:
        super().__init__()
        self.tile = tile
        self.work = Work()
        self.by_module: dict[str, Work] = {}
        self._names = {id(module): name for name, module in root.named_modules()} if root is not None else None
        self._stack: list[str] = []
        self._hooks: list[Any] = []

    def __enter__(self) -> "WorkCounter":
        if self._names is not None:
            def enter(module: torch.nn.Module, args: Any) -> None:
                name = self._names.get(id(module))
                if name is not None:
                    self._stack.append(name)

            def leave(module: torch.nn.Module, args: Any, output: Any) -> None:
                if self._names.get(id(module)) is not None and self._stack:
                    self._stack.pop()

            # always_call: the exit runs when the forward raises too (memopt's model passes stop that way)
            self._hooks = [torch.nn.modules.module.register_module_forward_pre_hook(enter),
                           torch.nn.modules.module.register_module_forward_hook(leave, always_call=True)]
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        super().__exit__(*exc)

    def __torch_dispatch__(self, func: torch._ops.OpOverload, types: Any, args: tuple = (), kwargs: dict | None = None
                           ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        work = op_work(func, args, kwargs, out, self.tile)
        if work is not None:
            self.work += work
            for name in self._stack:
                self.by_module[name] = self.by_module.get(name, Work()) + work
        return out


def op_work(func: torch._ops.OpOverload, args: tuple, kwargs: dict, out: Any, tile: int = 128) -> Work | None:
    """The :class:`Work` of one aten op (``None`` for views and metadata, which launch no kernel)."""
    name = func.__name__.split(".")[0]
    if func.is_view or name in NO_WORK:
        return None
    if name in MATMULS:
        a, b = args[-2], args[-1]
        rows, inner, columns = a.shape[-2], a.shape[-1], b.shape[-1]
        batch = a.numel() // max(1, rows * inner)
        return Work(matmul_flops=2 * batch * rows * inner * columns,
                    matmul_tiled_flops=2 * batch * _tiles(rows, tile) * inner * _tiles(columns, tile), kernels=1)
    if name.startswith("_scaled_dot_product") or name == "scaled_dot_product_attention":
        query, key, value = args[:3]
        queries, head_dim = query.shape[-2:]
        keys, value_dim = key.shape[-2], value.shape[-1]
        heads = query.numel() // max(1, queries * head_dim)
        tiles = _tiles(queries, tile) * _tiles(keys, tile)
        return Work(attention_flops=2 * heads * queries * keys * (head_dim + value_dim),
                    attention_tiled_flops=2 * heads * tiles * (head_dim + value_dim), kernels=1)
    inputs = [] if name.startswith(("new_", "zeros", "ones", "full", "arange")) else [
        x for x in tree_flatten((args, kwargs))[0] if isinstance(x, torch.Tensor)]
    outputs = [x for x in tree_flatten(out)[0] if isinstance(x, torch.Tensor)]
    return Work(memory_bytes=sum(map(_read_bytes, inputs)) + sum(x.numel() * x.element_size() for x in outputs),
                kernels=1)


def count_work(run: Callable[[], Any], tile: int = 128) -> Work:
    """:class:`Work` of ``run()`` (called under ``torch.no_grad()``)."""
    with torch.no_grad(), WorkCounter(tile) as counter:
        run()
    return counter.work
