"""Stand-ins for values a pass computes but never reads: what the processor does with them costs no kernels.

In a two-pass collection pass the query projection's output is never read (the pass stops at the attention call),
and in the final pass neither are the key/value projections' (the call gets the collected buffers): their skip
hooks return stand-ins instead of computing them. Plain zeros of the projection's shape would still go through what
the processor does with them before the attention call, the query/key norms aside (skipped too): diffusers' shared
rotary embedding alone reads and writes each one about ten times in fp32, over a third of what the second pass adds
to a HunyuanVideo block at 720p. While :func:`unread_values` is active (around the attention module's forward in
such a pass), a stand-in is a zero-stride zero tensor (:func:`unread`: no memory) and an operation on it is not run:
its output shapes come from running it on ``meta`` tensors (once per operation and shapes: the same ones repeat in
every chunk and block), and its outputs are unread stand-ins again. So the rotary embedding, reshapes and casts of a
discarded query cost ~15 microseconds of Python each, and no kernel: worth it for large chunks only
(:data:`memopt.hooks.sequence.UNREAD_FROM`; below, dense zeros are cheaper; Wan-lineage processors take empty
stand-ins, which cost nothing at all).

An operation runs as usual (on dense zeros in place of the stand-ins, what the skip hooks returned before) where its
result might be read after all:

* it writes into a tensor that is not a stand-in (in place, ``out=``, ``copy_``, ``__setitem__``); into a stand-in,
  it is skipped (the stand-in stays unread), but overwriting a stand-in with values of a tensor that is not one is
  an error (those values would be lost);
* it routes values of another tensor into its output (``cat``, ``stack``, ``where``, scatters, ...), unless every
  tensor it takes is a stand-in;
* it reads values to Python (``item``, ``bool``, ``tolist``), or ``meta`` cannot run it (data-dependent shapes);
* it makes new values from a stand-in's metadata alone (``new_ones``, ``zeros_like``, ...) or is an attention kernel
  (memopt's exchange reads only the stand-in's shape there).

Everything else is value arithmetic over a stand-in (elementwise, reductions, matmuls, views and reshapes): every
element of its output depends on a stand-in's elements, so nothing the pass reads can come out of it.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import _disable_current_modes

_MARK = "_memopt_unread"

# Values routed from other tensors into the output: unread only if every tensor taken is unread.
_ROUTING = {"cat", "concat", "concatenate", "stack", "hstack", "vstack", "dstack", "column_stack", "where",
            "masked_scatter", "index_put", "index_copy", "index_add", "scatter", "scatter_add", "scatter_reduce",
            "block_diag"}
# New values made from metadata alone, values read to Python, and attention kernels (memopt's exchange): run as usual.
_AS_USUAL = {"new_zeros", "new_ones", "new_full", "new_tensor", "zeros_like", "ones_like", "full_like", "rand_like",
             "randn_like", "randint_like", "item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__",
             "__len__", "__iter__", "__repr__", "__format__", "equal", "allclose", "data_ptr", "untyped_storage",
             "storage_offset", "stride", "is_contiguous"}
_ATTENTION = {F.scaled_dot_product_attention}
# In-place writes whose result does not depend on the old values: writing values of a used tensor this way into a
# stand-in would lose them (an error); in-place arithmetic on a stand-in (``addcmul_``) leaves it unread.
_OVERWRITES = {"__setitem__", "copy_", "set_", "index_put_", "index_copy_", "masked_scatter_", "scatter_", "put_"}
_IN_PLACE_OPERATORS = {f"__i{name}__" for name in ("add", "sub", "mul", "matmul", "truediv", "floordiv", "mod", "pow",
                                                  "and", "or", "xor", "lshift", "rshift")}


class _Active(threading.local):
    def __init__(self) -> None:
        self.depth = 0
        self.zeros: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}  # what stand-ins expand: no kernel each


_ACTIVE = _Active()


def is_unread(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and getattr(value, _MARK, False)


def unread(shape: torch.Size | tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A stand-in of ``shape``: zeros that take no memory (stride 0), marked as never read."""
    zero = _ACTIVE.zeros.get((dtype, device))
    if zero is None:
        zero = torch.zeros((), dtype=dtype, device=device)
        if _ACTIVE.depth:
            _ACTIVE.zeros[dtype, device] = zero
    stand_in = zero.expand(shape)
    setattr(stand_in, _MARK, True)
    return stand_in


def _dense(value: Any) -> Any:
    return torch.zeros(value.shape, dtype=value.dtype, device=value.device) if is_unread(value) else value


def _meta(value: Any) -> Any:
    if not isinstance(value, torch.Tensor):
        return value
    if is_unread(value):
        return torch.empty((), dtype=value.dtype, device="meta").expand(value.shape)
    return torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device="meta")


def _tensors(value: Any, found: list[torch.Tensor]) -> list[torch.Tensor]:
    """The tensors in ``value`` (nested tuples, lists and dicts): faster than pytree, which every torch call under
    :class:`UnreadValues` would pay for."""
    if isinstance(value, torch.Tensor):
        found.append(value)
    elif isinstance(value, (tuple, list)):
        for item in value:
            _tensors(item, found)
    elif isinstance(value, dict):
        for item in value.values():
            _tensors(item, found)
    return found


def _map(fn: Callable[[torch.Tensor], Any], value: Any) -> Any:
    """``value`` with every tensor replaced by ``fn(tensor)`` (tuples, named tuples, lists and dicts rebuilt)."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, list):
        return [_map(fn, item) for item in value]
    if isinstance(value, tuple):
        items = [_map(fn, item) for item in value]
        if hasattr(value, "_fields"):  # a named tuple
            return type(value)(*items)
        return type(value)(items) if hasattr(type(value), "n_fields") else tuple(items)  # torch.return_types
    if isinstance(value, dict):
        return {key: _map(fn, item) for key, item in value.items()}
    return value


def _writes_into(name: str, args: tuple, kwargs: dict) -> Any:
    """The tensor an in-place or ``out=`` call writes into, else None."""
    if kwargs.get("out") is not None:
        return kwargs["out"]
    in_place = name.endswith("_") and not name.endswith("__") or name in _IN_PLACE_OPERATORS or name == "__setitem__"
    return args[0] if in_place and args else None


def _key(value: Any) -> Any:
    """What the ``meta`` result of an operation depends on, hashable: shapes, dtypes, strides and the other args."""
    if isinstance(value, torch.Tensor):
        unread_value = getattr(value, _MARK, False)
        return unread_value, value.shape, value.dtype, value.device, None if unread_value else value.stride()
    if isinstance(value, (tuple, list)):
        return type(value), tuple(_key(item) for item in value)
    if isinstance(value, dict):
        return dict, tuple((name, _key(item)) for name, item in value.items())
    if isinstance(value, slice):
        return slice, _key(value.start), _key(value.stop), _key(value.step)
    return value


_NO_META = object()  # meta cannot run it (data-dependent shapes, an op without a meta kernel)
# (func, args key) -> meta result: the same operations on the same shapes repeat in every chunk and block, and most
# meta kernels are Python (tens to hundreds of microseconds each)
_META_RESULTS: dict[Any, Any] = {}
_MAX_META_RESULTS = 4096


def _meta_result(func: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    try:
        key = (func, _key(args), _key(kwargs))
        result = _META_RESULTS.get(key)
    except TypeError:  # an unhashable argument: computed every time
        key, result = None, None
    if result is None:
        try:
            with _disable_current_modes():
                result = func(*_map(_meta, args), **_map(_meta, kwargs))
        except (RuntimeError, NotImplementedError, TypeError, ValueError):  # data-dependent, or not meta-capable
            result = _NO_META
        if key is not None:
            if len(_META_RESULTS) >= _MAX_META_RESULTS:
                _META_RESULTS.clear()
            _META_RESULTS[key] = result
    return result


class UnreadValues(TorchFunctionMode):
    """Runs operations on :func:`unread` stand-ins on ``meta`` only (see the module docstring)."""

    def __torch_function__(self, func: Callable[..., Any], types: Any, args: tuple = (), kwargs: dict | None = None
                           ) -> Any:
        kwargs = kwargs or {}
        tensors = _tensors(kwargs, _tensors(args, []))
        if not any(getattr(tensor, _MARK, False) for tensor in tensors):
            return func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        if name == "__get__" or func in _ATTENTION or name in _AS_USUAL:  # properties: metadata
            return func(*args, **kwargs)
        target = _writes_into(name, args, kwargs)
        if target is not None:
            if not is_unread(target):
                return self._as_usual(func, args, kwargs)
            if name in _OVERWRITES and any(not is_unread(tensor) and tensor.is_floating_point() for tensor in tensors):
                raise RuntimeError(f"memopt: {name} writes values the pass uses into a stand-in of a projection it "
                                   "skips (sequence chunking); those values would be lost")
            return None if name == "__setitem__" else target
        if name in _ROUTING and not all(is_unread(tensor) for tensor in tensors if tensor.is_floating_point()):
            return self._as_usual(func, args, kwargs)
        result = _meta_result(func, args, kwargs)
        if result is _NO_META:
            return self._as_usual(func, args, kwargs)
        device = tensors[0].device
        return _map(lambda meta: unread(meta.shape, meta.dtype, device), result)

    @staticmethod
    def _as_usual(func: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        return func(*_map(_dense, args), **_map(_dense, kwargs))


def active() -> bool:
    """Whether :func:`unread_values` is active (skip hooks then return :func:`unread` stand-ins)."""
    return _ACTIVE.depth > 0


@contextlib.contextmanager
def unread_values() -> Iterator[None]:
    """Operations on :func:`unread` stand-ins made inside this context run on ``meta`` only."""
    _ACTIVE.depth += 1
    try:
        with UnreadValues():
            yield
    finally:
        _ACTIVE.depth -= 1
        if not _ACTIVE.depth:
            _ACTIVE.zeros.clear()
