"""Full-size simulation: build a model and its inputs under ``FakeTensorMode`` and trace a forward without allocating.

A fake tensor has shape, dtype and device but no data, so a 14B-parameter model at 720p costs a few hundred MB of host
memory and seconds of time, and the tracer still sees every storage the real forward would allocate. Pitfalls handled
here (see research/profiler_anchors.md): dtypes are changed by replacing parameters (``module.to`` cannot swap fake
parameters), the forward runs inside the same fake mode, and fake *CPU* tensors are used so SDPA takes the fused
flash kernel (O(S) memory) like a real GPU run, not the math path that ``meta`` tensors take. A fake tensor has no
values; where the forward reads some (a mask's row sums as token counts, boolean indexing by a mask) they come from
the inputs, which the planner has for real: see :class:`InputValues`. An output sized by values no input gives is
taken at its largest: ``nonzero`` as if every element were non-zero, and HiDream's MoE routing as the most tokens any
routing gives one expert (:mod:`memopt.trace.stand_ins`).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch._subclasses.fake_tensor import (
    DataDependentOutputException,
    DynamicOutputShapeException,
    FakeTensor,
    FakeTensorMode,
    unset_fake_temporarily,
)
from torch.multiprocessing.reductions import StorageWeakRef
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_leaves, tree_map
from torch.utils.weak import WeakIdKeyDictionary

from ..models import FamilySpec, Size, cast_floating_, get_family
from .result import MemoryTrace
from .stand_ins import worst_case_values
from .tracer import MemoryTracer

ModelTransform = Callable[[torch.nn.Module], Any]


def simulate(
    build_model: Callable[[], torch.nn.Module],
    build_inputs: Callable[[torch.nn.Module], dict[str, Any]],
    dtype: torch.dtype = torch.bfloat16,
    prepare: ModelTransform | None = None,
    round_to: int = 1,
    name: str = "simulation",
    backward: bool = False,
) -> MemoryTrace:
    """Trace ``model(**inputs)`` for a model too large to allocate.

    Args:
        build_model: returns the model; called under ``FakeTensorMode`` so nothing is allocated.
        build_inputs: ``model -> forward kwargs``; also called under the fake mode.
        dtype: floating dtype of the weights (``_keep_in_fp32_modules`` stay fp32, like ``from_pretrained``).
        prepare: optional ``model -> Any`` applied before tracing, e.g. ``lambda m: apply_sequence_chunking(m, 16)``.
        round_to: allocation rounding (512 mimics the CUDA caching allocator).
        name: trace name.
        backward: trace a training step instead (:func:`training_step`: the forward with autograd recording and the
            backward), into parameter gradients made before it (:func:`allocate_gradients`).

    Returns:
        The :class:`MemoryTrace`; ``baseline_bytes`` is weights + inputs (+ gradients with ``backward``),
        ``peak_bytes`` the activation peak; ``meta["assumptions"]`` lists the worst cases assumed for values computed
        from the weights (:mod:`memopt.trace.stand_ins`), where the peak is an upper bound.

    Example::

        from memopt import simulate
        from memopt.models import get_family
        spec = get_family("wan")
        trace = simulate(lambda: spec.build("full"), lambda m: spec.make_inputs(m.config, dtype=torch.bfloat16))
        print(trace.summary())   # peak 8.02 GiB of activations at blocks.0.attn2.norm_q
    """
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    values = InputValues(fake_mode)
    with fake_mode:
        model = build_model()
        cast_floating_(model, dtype)
        if prepare is not None:
            prepare(model)
        with values:  # small inputs made by factories (a mask, position ids) keep their values too
            inputs = tree_map(values.carry, build_inputs(model))
        if backward:
            allocate_gradients(model)
    tracer = MemoryTracer(round_to=round_to, root=model, device="dispatch")
    # Values computed from the weights, which a fake model has not, at their worst case.
    with worst_case_values(model) as assumptions, torch.set_grad_enabled(backward), fake_mode, values:
        trace = tracer.run(training_step, model, inputs) if backward else tracer.run(model, **inputs)
    trace.name = name
    trace.result = None  # fake outputs are useless outside the mode
    trace.meta.update({"dtype": str(dtype).replace("torch.", ""), "simulated": True, "assumptions": assumptions})
    return trace


def small_inputs_real(make_inputs: Callable[[], Any]) -> Any:
    """``make_inputs()`` without allocating its large tensors: run under a fake mode, its tensors come back fake except
    the small ones (up to :attr:`InputValues.MAX_ELEMENTS` elements), which come back real with the values a real call
    gives them: a mask, timesteps, position ids. What the planner needs to plan a forward that reads such values
    before its first call (``apply_memory_optimizations(..., height=, width=)``)."""
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    values = InputValues(fake_mode)
    with fake_mode, values:
        inputs = make_inputs()

    def real(value: Any) -> Any:
        known = values.value_of(value) if isinstance(value, FakeTensor) else None
        return value if known is None else known

    return tree_map(real, inputs)


class _NoValues(Exception):
    """An argument of the operation has no values."""


class InputValues(TorchDispatchMode):
    """Inside a fake mode: the values of the forward's real inputs, carried through what is computed from them alone.

    Some forwards read values: Lumina 2 and FramePack count each sample's text tokens from its mask (``.tolist()``,
    ``.item()``), HunyuanVideo 1.5 branches on ``torch.all(image_embeds == 0)``, HunyuanImage 2.1 and GLM-Image index
    with boolean masks, Qwen-Image 2.1 repeats a mask by segment lengths, OmniGen compares ``max(position_ids)``. With
    fake tensors alone these raise, and such a model could not be planned. What they read depends on the inputs alone,
    and real inputs (the planner has the first call's) carry their values here, as do small outputs of factories
    (``arange``, ``zeros``): an operation whose tensor arguments all have values also runs on the values (on the host)
    and its outputs get the results; a scalar read returns the value, a data-dependent shape is the real output's;
    a boolean mask with values indexing a fake tensor indexes by the mask's positions. Everything computed from the
    weights stays fake, and ``nonzero`` of a tensor without values is taken at its largest (every element non-zero).
    A mixed operation that writes into a tensor with values drops the values of everything sharing its storage.
    """

    MAX_ELEMENTS = 1 << 22  # larger values are not kept (their tensors go on fake only)
    # Factories of uninitialised memory: their outputs have no values (a fake input made by empty_strided, a buffer
    # the forward fills later), not the garbage a host run would give.
    UNINITIALISED = frozenset({"empty", "empty_like", "empty_strided", "empty_permuted", "new_empty",
                               "new_empty_strided"})

    def __init__(self, fake_mode: FakeTensorMode) -> None:
        super().__init__()
        self.fake_mode = fake_mode
        self.values: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.stale: set[StorageWeakRef] = set()
        self._numpy_reads: list[_NumpyReads] = []

    def __enter__(self) -> "InputValues":
        reads = _NumpyReads(self)
        reads.__enter__()
        self._numpy_reads.append(reads)
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        try:
            super().__exit__(*exc)
        finally:
            self._numpy_reads.pop().__exit__(*exc)

    def carry(self, value: Any) -> Any:
        """A real tensor -> a fake tensor like it that carries a copy of its values (while small: the forward may
        write into its inputs, which must not reach the caller's tensor); anything else unchanged."""
        if not isinstance(value, torch.Tensor) or isinstance(value, FakeTensor) or value.device.type == "meta":
            return value
        fake = self.fake_mode.from_tensor(value)  # requiring grad as the input does (a training step's latents)
        if value.numel() <= self.MAX_ELEMENTS:
            with unset_fake_temporarily():  # carry is called under the fake mode, which would make the copy fake
                self._keep(fake, value.detach().clone())
        return fake

    def _keep(self, fake: Any, real: Any) -> None:
        if isinstance(fake, FakeTensor) and isinstance(real, torch.Tensor) and real.numel() <= self.MAX_ELEMENTS:
            self.values[fake] = real

    def value_of(self, tensor: torch.Tensor) -> torch.Tensor | None:
        """The real values the simulation carries for ``tensor`` (a real tensor: itself); None where it has none or
        they went stale (its storage was written in place by an operation without values)."""
        if not isinstance(tensor, FakeTensor):
            return tensor  # a real tensor the model made or holds
        value = self.values.get(tensor)
        if value is None or (self.stale and StorageWeakRef(tensor.untyped_storage()) in self.stale):
            return None
        return value

    def _real_arguments(self, value: Any) -> Any:
        """``value`` (an argument, or a tuple, list or dict of them) with every tensor replaced by its values; raises
        :class:`_NoValues` at the first tensor without (most operations: the weights')."""
        if isinstance(value, torch.Tensor):
            real = self.value_of(value)
            if real is None:
                raise _NoValues
            return real
        if isinstance(value, (tuple, list)):
            return type(value)(self._real_arguments(item) for item in value)
        if isinstance(value, dict):
            return {key: self._real_arguments(item) for key, item in value.items()}
        return value

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        try:
            if func.overloadpacket.__name__ in self.UNINITIALISED:
                raise _NoValues
            real_args, real_kwargs = self._real_arguments(args), self._real_arguments(kwargs)
        except _NoValues:
            real_args = real_kwargs = None
        has_values = real_args is not None
        try:
            out = func(*args, **kwargs)
        except (DataDependentOutputException, DynamicOutputShapeException):
            if not has_values:
                return self._without_values(func, args, kwargs)
            real = self._real(func, real_args, real_kwargs)
            if func is torch.ops.aten._local_scalar_dense.default:
                return real
            out = tree_map(lambda r: self.fake_mode.from_tensor(r) if isinstance(r, torch.Tensor) else r, real)
            for fake, value in zip(tree_leaves(out), tree_leaves(real)):
                self._keep(fake, value)
            return out
        real = None
        if has_values and all(t.numel() <= self.MAX_ELEMENTS for t in tree_leaves(out) if isinstance(t, FakeTensor)):
            try:
                real = self._real(func, real_args, real_kwargs)
            except (RuntimeError, NotImplementedError, TypeError, ValueError):
                pass  # no host kernel (a factory for another device...): the outputs go on without values
        if real is not None:
            for fake, value in zip(tree_leaves(out), tree_leaves(real)):
                self._keep(fake, value)
        elif func._schema.is_mutable:
            self._drop_written(func, args, kwargs)
        return out

    @staticmethod
    def _real(func, args: tuple, kwargs: dict) -> Any:
        with unset_fake_temporarily(), _disable_current_modes():
            return func(*args, **kwargs)

    def _without_values(self, func, args, kwargs) -> Any:
        """A data-dependent operation on a tensor without values: boolean-mask indices with values become the
        mask's positions; ``nonzero`` is taken at its largest; anything else cannot be simulated (re-raised)."""
        if func in (torch.ops.aten.index.Tensor, torch.ops.aten.index_put.default, torch.ops.aten.index_put_.default):
            indices = [self._positions(index) for index in args[1]]
            if any(isinstance(index, tuple) for index in indices):
                flat_indices = [i for index in indices for i in (index if isinstance(index, tuple) else (index,))]
                if func._schema.is_mutable:
                    self._drop_written(func, args, kwargs)
                return func(args[0], flat_indices, *args[2:], **kwargs)
        if func is torch.ops.aten.nonzero.default:
            (tensor,) = args
            return torch.empty((tensor.numel(), tensor.dim()), dtype=torch.long, device=tensor.device)
        return func(*args, **kwargs)

    def _positions(self, index: Any) -> Any:
        """A boolean mask with values -> its positions, one long index tensor per masked dim (what indexing by the
        mask does); anything else unchanged."""
        if not isinstance(index, torch.Tensor) or index.dtype not in (torch.bool, torch.uint8):
            return index
        value = self.value_of(index)
        if value is None:
            return index
        with unset_fake_temporarily(), _disable_current_modes():
            positions = value.nonzero().unbind(1)
        return tuple(self.carry(position.to(index.device)) for position in positions)

    def _drop_written(self, func, args, kwargs) -> None:
        """Values of the tensors a mixed operation writes into (and of their views) are out of date."""
        schema_args = func._schema.arguments
        for position, argument in enumerate(schema_args):
            if argument.alias_info is None or not argument.alias_info.is_write:
                continue
            value = args[position] if position < len(args) else kwargs.get(argument.name)
            for tensor in tree_leaves(value):
                if isinstance(tensor, FakeTensor) and tensor in self.values:
                    self.stale.add(StorageWeakRef(tensor.untyped_storage()))


class _NumpyReads(TorchFunctionMode):
    """``tensor.numpy()`` of a fake tensor with values (HiDream's expert counts: ``bincount(...).cpu().numpy()``)
    returns a copy of the values; ``numpy`` reads data without dispatching an operation, so :class:`InputValues`
    alone never sees it. Without values it is a data-dependent read, which the simulation cannot answer."""

    def __init__(self, values: InputValues) -> None:
        super().__init__()
        self.input_values = values

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.numpy and isinstance(args[0], FakeTensor):
            value = self.input_values.value_of(args[0])
            if value is None:
                raise DataDependentOutputException(func)
            with unset_fake_temporarily(), _disable_current_modes():
                return value.detach().clone().numpy()
        return func(*args, **(kwargs or {}))


def simulate_family(
    family: str | FamilySpec,
    config: str | dict[str, Any] = "full",
    size: str | Size = "default",
    batch_size: int = 1,
    dtype: torch.dtype = torch.bfloat16,
    prepare: ModelTransform | None = None,
    round_to: int = 1,
    name: str | None = None,
    backward: bool = False,
    masked: bool = False,
) -> MemoryTrace:
    """:func:`simulate` for a zoo family (``"wan"``, ``"hunyuanvideo"``, ``"flux"``, ...) at a named or explicit size.

    ``masked=True`` pads the last quarter of the text tokens out with the family's text mask (as
    :meth:`FamilySpec.make_inputs`); the mask's values are carried (:class:`InputValues`), so forwards that drop
    padded tokens are simulated with fewer. ``trace.meta`` gets the token count, hidden width and the activation peak
    in LD.
    """
    spec = get_family(family) if isinstance(family, str) else family
    pixels = spec.size(size) if isinstance(size, str) else size
    cfg = spec.config(config) if isinstance(config, str) else dict(config)

    def build_inputs(model: torch.nn.Module) -> dict[str, Any]:
        return spec.make_inputs(model.config, batch_size=batch_size, height=pixels.height, width=pixels.width,
                                num_frames=pixels.num_frames, dtype=dtype, masked=masked)

    trace = simulate(lambda: spec.build(cfg), build_inputs, dtype=dtype, prepare=prepare, round_to=round_to,
                     name=name or f"{spec.name}-{config if isinstance(config, str) else 'custom'}", backward=backward)
    tokens = spec.num_tokens(cfg, pixels) * batch_size
    hidden = spec.hidden_size(cfg)
    element = torch.tensor([], dtype=dtype).element_size()
    trace.meta.update({
        "family": spec.name, "class": spec.class_name, "config": config if isinstance(config, str) else "custom",
        "height": pixels.height, "width": pixels.width, "num_frames": pixels.num_frames, "batch_size": batch_size,
        "tokens": tokens, "hidden": hidden, "ld_bytes": tokens * hidden * element,
        "ld": trace.peak_bytes / (tokens * hidden * element),
    })
    return trace


def allocate_gradients(model: torch.nn.Module) -> None:
    """Zero gradients for every trainable parameter, made before a traced training step so that they count in its
    baseline and the step accumulates into them in place, as every step after the first with
    ``zero_grad(set_to_none=False)``."""
    for parameter in model.parameters():
        if parameter.requires_grad:
            parameter.grad = torch.zeros_like(parameter)


def training_step(model: torch.nn.Module, inputs: dict[str, Any]) -> None:
    """One training step's compute: the forward (autograd recording) and the backward of the squared prediction's
    mean (a stand-in loss: its own memory is the prediction's, tiny next to the hidden states)."""
    output = model(**{**inputs, "return_dict": False})[0]
    output = torch.stack(output) if isinstance(output, list) else output  # Z-Image: one tensor per sample
    output.float().square().mean().backward()
