"""Full-size simulation: build a model and its inputs under ``FakeTensorMode`` and trace a forward without allocating.

A fake tensor has shape, dtype and device but no data, so a 14B-parameter model at 720p costs a few hundred MB of host
memory and seconds of time, and the tracer still sees every storage the real forward would allocate. Pitfalls handled
here (see research/profiler_anchors.md): dtypes are changed by replacing parameters (``module.to`` cannot swap fake
parameters), the forward runs inside the same fake mode, and fake *CPU* tensors are used so SDPA takes the fused
flash kernel (O(S) memory) like a real GPU run, not the math path that ``meta`` tensors take. A fake tensor has no
values, so an output sized by them is taken at its largest: ``nonzero`` as if every element were non-zero (Mochi's
attention keeps each sample's valid text tokens with it: all valid, the most memory), which makes the simulated peak
an upper bound where a mask pads tokens out.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from ..models import FamilySpec, Size, cast_floating_, get_family
from .result import MemoryTrace
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
        ``peak_bytes`` the activation peak.

    Example::

        from memopt import simulate
        from memopt.models import get_family
        spec = get_family("wan")
        trace = simulate(lambda: spec.build("full"), lambda m: spec.make_inputs(m.config, dtype=torch.bfloat16))
        print(trace.summary())   # peak 8.02 GiB of activations at blocks.0.attn2.norm_q
    """
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    with fake_mode:
        model = build_model()
        cast_floating_(model, dtype)
        if prepare is not None:
            prepare(model)
        inputs = build_inputs(model)
        if backward:
            allocate_gradients(model)
    tracer = MemoryTracer(round_to=round_to, root=model, device="dispatch")
    with torch.set_grad_enabled(backward), fake_mode, LargestDataDependentSizes():
        trace = tracer.run(training_step, model, inputs) if backward else tracer.run(model, **inputs)
    trace.name = name
    trace.result = None  # fake outputs are useless outside the mode
    trace.meta.update({"dtype": str(dtype).replace("torch.", ""), "simulated": True})
    return trace


class LargestDataDependentSizes(TorchDispatchMode):
    """Inside a fake mode: ``nonzero``, whose output size is its input's count of non-zero elements, as if every
    element were non-zero (fake tensors have no values; the fake mode alone refuses the op)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.nonzero.default:
            (tensor,) = args
            return torch.empty((tensor.numel(), tensor.dim()), dtype=torch.long, device=tensor.device)
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
) -> MemoryTrace:
    """:func:`simulate` for a zoo family (``"wan"``, ``"hunyuanvideo"``, ``"flux"``, ...) at a named or explicit size.

    ``trace.meta`` gets the token count, hidden width and the activation peak in LD.
    """
    spec = get_family(family) if isinstance(family, str) else family
    pixels = spec.size(size) if isinstance(size, str) else size
    cfg = spec.config(config) if isinstance(config, str) else dict(config)

    def build_inputs(model: torch.nn.Module) -> dict[str, Any]:
        return spec.make_inputs(model.config, batch_size=batch_size, height=pixels.height, width=pixels.width,
                                num_frames=pixels.num_frames, dtype=dtype)

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
