"""Blocks run when their output is first used (:attr:`~memopt.plans.sequence.BlockPlan.runs_when_used`).

Wan VACE runs all of its VACE blocks in a loop of their own before the main blocks, and keeps every block's hint (a
full ``(B, S, D)`` tensor) until the main block it is added after: 8 hints through the main blocks of Wan2.1-VACE-14B,
15 of the 1.3B model, far above everything sequence chunking leaves (3 LD). The VACE blocks read only what the model
made before that loop (the embedded video tokens, the text, the timestep tables) and each other's control state, so
each can run when its hint is first used instead: the block hook answers the call with a :class:`HeldCall` (the
block's arguments, held) and a :class:`HeldOutput` stand-in per output entry; the first use of a stand-in runs the
block (after the calls it depends on), and its other outputs are kept for their own uses. Only one hint and one
control state exist at a time: the same numbers, computed in another order.

The held arguments must not change before the block runs: memopt's own blocks do not write their output over a
tensor a held call reads (the first main block's input is the VACE blocks' video tokens), and a change by the model
itself (the tensors' version counters; inference tensors have none) is an error naming the block, never a result
from other inputs.
"""

from __future__ import annotations

import weakref
from collections import Counter
from typing import Any, Callable

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from ._deferred_tokens import OPERATORS, DeferredSample, _operator

Forward = Callable[[tuple, dict], Any]


class HeldCall:
    """A block call held until one of its outputs is used: ``forward(args, kwargs)`` runs the block (chunked, by the
    block hook). ``held`` counts the storages of the tensors held calls read (shared by one model forward), which
    memopt's blocks never write over."""

    def __init__(self, path: str, forward: Forward, args: tuple, kwargs: dict, held: Counter) -> None:
        self.path, self.forward, self.held = path, forward, held
        self.flat, self.spec = tree_flatten((args, kwargs))
        self.tensors = [(value, _version(value)) for value in self.flat if isinstance(value, torch.Tensor)]
        held.update(_storage(tensor) for tensor, _ in self.tensors)
        self.stand_ins: list[weakref.ref[HeldOutput]] = []
        self.ran = False

    def output(self, index: int | None) -> HeldOutput:
        """The stand-in of output entry ``index`` (``None``: the output itself)."""
        stand_in = HeldOutput(self, index)
        self.stand_ins.append(weakref.ref(stand_in))
        return stand_in

    def run(self) -> None:
        """Runs the block on its held arguments (running the held calls they come from first) and hands each live
        stand-in its entry; the arguments and the outputs nobody holds are dropped."""
        if self.ran:
            return
        for tensor, version in self.tensors:
            if _version(tensor) != version:
                raise RuntimeError(f"{self.path}: an input of this block, held until its output is used "
                                   "(BlockPlan.runs_when_used), was modified in place before it ran; run it with a "
                                   "plan without runs_when_used")
        args, kwargs = tree_unflatten([resolve(value) for value in self.flat], self.spec)
        self.held.subtract(_storage(tensor) for tensor, _ in self.tensors)
        self.flat = self.tensors = None
        self.ran = True
        outputs = self.forward(args, kwargs)
        del args, kwargs
        for reference in self.stand_ins:
            stand_in = reference()
            if stand_in is not None:
                stand_in.value = outputs if stand_in.index is None else outputs[stand_in.index]


class HeldOutput:
    """Stand-in for one output entry of a :class:`HeldCall`: any use runs the call and is then the tensor's."""

    def __init__(self, call: HeldCall, index: int | None) -> None:
        self.call, self.index = call, index
        self.value: torch.Tensor | None = None

    def tensor(self) -> torch.Tensor:
        if self.value is None:
            self.call.run()
        return self.value

    @classmethod
    def __torch_function__(cls, func: Callable, types: tuple, args: tuple = (), kwargs: dict | None = None) -> Any:
        return _on_tensors(func, args, kwargs or {})

    def __getattr__(self, name: str) -> Any:
        if name in ("call", "index", "value"):  # not set yet (copy, pickle)
            raise AttributeError(name)
        return getattr(self.tensor(), name)

    def __bool__(self) -> bool:
        return bool(self.tensor())

    def __len__(self) -> int:
        return len(self.tensor())

    def __iter__(self) -> Any:
        return iter(self.tensor())


def _on_tensors(func: Callable, args: tuple, kwargs: dict) -> Any:
    """``func`` with the stand-ins among its arguments replaced by what they stand for."""
    args, kwargs = resolved(args, kwargs)
    return func(*args, **kwargs)


for _name in (*OPERATORS, "__matmul__", "__rmatmul__"):
    setattr(HeldOutput, _name, _operator(_name, _on_tensors))


def resolve(value: Any) -> Any:
    """``value``, or the tensor a stand-in stands for: a held output (its block run if it has not), a per-sample
    table (:class:`~memopt.hooks._deferred_tokens.DeferredSample`)."""
    if isinstance(value, HeldOutput):
        return value.tensor()
    if isinstance(value, DeferredSample):
        return value.value
    return value


def resolved(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """A block's arguments with the stand-ins among them (:func:`resolve`) replaced by what they stand for."""
    flat, spec = tree_flatten((args, kwargs))
    if not any(isinstance(value, (HeldOutput, DeferredSample)) for value in flat):
        return args, kwargs
    return tree_unflatten([resolve(value) for value in flat], spec)


def _storage(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage()._cdata


def _version(tensor: torch.Tensor) -> int | None:
    """The version counter (``None`` for inference tensors, which have none: a change cannot be seen there)."""
    return None if tensor.is_inference() else tensor._version
