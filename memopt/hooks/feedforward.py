"""Tensor-parallel-equivalent and sequence-chunked FeedForward, run one shard after another on one device.

A DiT FeedForward expands the hidden width D to F = 2.7-4 D, so at video sequence lengths its ``(tokens, F)``
intermediate (twice: before and after the activation) is often the largest activation of the whole forward. This
hook computes the same function without ever holding it whole:

* ``split="hidden"`` does what tensor parallelism does across GPUs, sequentially: the input projection is split by
  output rows (``ColwiseParallel``), the output projection by input columns (``RowwiseParallel``), and the partial
  outputs are summed in place into one output buffer -- the all-reduce becomes an ``addmm_``. For gated activations
  (GEGLU/SwiGLU) the value and gate halves are split consistently (``PackedColwiseParallel([1, 1])``); for Flux and
  HunyuanVideo single blocks, ``proj_out`` consumes ``cat([attn_output, mlp])`` and only its MLP columns are split
  (``PackedRowwiseParallel``), the attention columns are applied once.
* ``split="sequence"`` splits the tokens instead (Mini-Sequence Transformer / TiledMLP): each token chunk runs the
  whole FeedForward and writes its rows of the one output buffer.

Sana's convolutional FeedForwards (``GLUMBConv``: 1x1 convolution, depthwise 3x3, gate, 1x1 convolution) split by
intermediate channels too, since the depthwise convolution never mixes channels (:class:`ChunkedConvFeedForwardHook`);
they take no sequence split, as the convolution mixes neighbouring tokens.

Expert-choice mixture-of-experts layers run their experts in groups instead (:mod:`memopt.hooks.experts`, the
expert-parallel equivalent).

Which modules are split, and how, is data (:mod:`memopt.plans.feedforward`): diffusers' own ``_tp_plan`` where the
model class has one, memopt plans of the same shape otherwise. Weights are read at call time as views of the
original parameters (so group offloading, which swaps ``param.data``, and LoRA adapters added later both work; the
``state_dict`` is untouched). peft LoRA layers are split through: lora_B rows follow a colwise shard, lora_A columns
a rowwise one. Hooks that the chunked computation bypasses on the FeedForward's linears (leaf-level group
offloading, layerwise casting) get their ``pre_forward`` / ``post_forward`` called around it; where that cannot be
honoured the hook runs the original forward and logs why once.

Example::

    import torch
    from memopt import apply_chunked_feedforward, remove_memory_optimizations
    from memopt.models import get_family

    spec = get_family("wan")
    model = spec.build("tiny")
    inputs = spec.make_inputs(model.config, batch_size=2)
    with torch.no_grad():
        reference = model(**inputs)[0]
        report = apply_chunked_feedforward(model, num_chunks=4, split="hidden")
        print(report)
        chunked = model(**inputs)[0]
    remove_memory_optimizations(model)
    print((chunked - reference).norm() / reference.norm())   # ~1e-7 in fp32
"""

from __future__ import annotations

import functools
import importlib
import logging
import re
import sys
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Callable, Iterator, Mapping

import torch
import torch.nn.functional as F
from diffusers.hooks import ModelHook
from diffusers.models.transformers.sana_transformer import GLUMBConv
from diffusers.models.transformers.transformer_bria import BriaSingleTransformerBlock
from diffusers.models.transformers.transformer_chroma import ChromaSingleTransformerBlock
from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock
from diffusers.models.transformers.transformer_hunyuan_video import (
    HunyuanVideoSingleTransformerBlock,
    HunyuanVideoTokenReplaceSingleTransformerBlock,
)
from diffusers.models.transformers.transformer_longcat_image import LongCatImageSingleTransformerBlock
from diffusers.models.transformers.transformer_sana_video import GLUMBTempConv
from torch.utils.checkpoint import checkpoint

from ..plans.experts import ExpertChoiceLayout, expert_choice_layout, expert_count
from ..plans.feedforward import (
    UNKNOWN_FEEDFORWARD,
    ConvFeedForwardLayout,
    FeedForwardLayout,
    Style,
    UnsupportedFeedForward,
    canonical_style,
    expand_plan,
    feedforward_layout,
    feedforward_plan,
    is_feedforward_unit,
    unit_plan,
)
from ._common import HOOK_PREFIX, call_inside, hooks_inside, refuse_if_hooked, register_memopt_hook
from ._sequence_chunks import running

logger = logging.getLogger(__name__)

FEEDFORWARD_HOOK = "memopt.feedforward"
SPLITS = ("hidden", "sequence")
KERNELS = ("auto", "torch", "triton")


@dataclass(frozen=True)
class ChunkedFeedForwardConfig:
    """How each FeedForward is chunked.

    Attributes:
        num_chunks: shards run one after another. ``split="hidden"``: shards of the intermediate width F;
            ``split="sequence"``: shards of the token rows (all leading dimensions flattened, i.e. batch x sequence).
            Sizes need not divide: shard sizes differ by at most one, the last ones smaller. Larger than F (or than
            the number of token rows) is an error naming the module, except for the rows of a call that memopt's
            sequence chunking made small (a chunk's share of the text tokens): one shard per row there.
        split: ``"hidden"`` (tensor-parallel equivalent: the intermediate is split, partial outputs are summed in
            place) or ``"sequence"`` (token chunks written into one output buffer).
        recompute: run each shard under ``torch.utils.checkpoint`` so autograd saves only the shard's inputs and
            recomputes its intermediate in backward. Without it a training forward saves every shard's
            intermediate, i.e. as much as the unchunked FeedForward (the forward's own peak still drops).
        accumulate_dtype: dtype of the output accumulator for ``split="hidden"`` (``torch.float32`` for bf16/fp16
            models sums the partial outputs in fp32 instead of rounding after each shard); ``None`` accumulates in
            the output dtype, in place, with no extra buffer. The result is cast back to the output dtype. The fused
            kernel ignores it: it accumulates 16-bit outputs in fp32 itself.
        kernel: ``"auto"`` uses memopt's fused Triton kernel (:mod:`memopt.kernels`) on CUDA where it applies and is
            available, PyTorch otherwise; ``"torch"`` never uses it; ``"triton"`` always does and raises if it cannot.
    """

    num_chunks: int = 4
    split: str = "hidden"
    recompute: bool = False
    accumulate_dtype: torch.dtype | None = None
    kernel: str = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.num_chunks, bool) or not isinstance(self.num_chunks, int) or self.num_chunks < 1:
            raise ValueError(f"num_chunks must be a positive int, got {self.num_chunks!r}")
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {self.split!r}")
        if self.kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {KERNELS}, got {self.kernel!r}")
        if self.accumulate_dtype is not None and not (
            isinstance(self.accumulate_dtype, torch.dtype) and self.accumulate_dtype.is_floating_point
        ):
            raise TypeError(f"accumulate_dtype must be a floating torch.dtype or None, got {self.accumulate_dtype!r}")


# ------------------------------------------------------------------------------------------------ activations
@dataclass(frozen=True)
class _Activation:
    """An activation as diffusers computes it (``apply``) and an in-place twin with the same values (``apply_``)
    used when no autograd graph is recorded, so a shard's intermediate exists once instead of twice."""

    apply: Callable[..., torch.Tensor]
    apply_: Callable[..., torch.Tensor] | None


def _gelu_(h: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    return torch.ops.aten.gelu_(h, approximate=approximate)


ACTIVATIONS: dict[str, _Activation] = {
    "gelu": _Activation(F.gelu, _gelu_),
    "gelu_tanh": _Activation(lambda h: F.gelu(h, approximate="tanh"), lambda h: _gelu_(h, "tanh")),
    "gelu_sigmoid": _Activation(lambda h: h * torch.sigmoid(1.702 * h), None),  # diffusers' ApproximateGELU
    "silu": _Activation(F.silu, lambda h: F.silu(h, inplace=True)),
    "relu": _Activation(F.relu, F.relu_),
    "mish": _Activation(F.mish, lambda h: F.mish(h, inplace=True)),
    # Gated: (value, gate). Multiplication commutes exactly, so act(gate) * value orders need no special case.
    "geglu": _Activation(lambda v, g: v * F.gelu(g), lambda v, g: v.mul_(_gelu_(g))),
    "swiglu": _Activation(lambda v, g: v * F.silu(g), lambda v, g: v.mul_(F.silu(g, inplace=True))),
    # LuminaFeedForward: FP32SiLU(gate) * value.
    "swiglu_fp32": _Activation(
        lambda v, g: v * F.silu(g.float()).to(g.dtype), lambda v, g: v.mul_(F.silu(g.float()).to(g.dtype))
    ),
}
"""Activation name (as in :class:`memopt.plans.FeedForwardLayout`) -> implementation."""


# ------------------------------------------------------------------------------------------------ weights (per call)
@dataclass(frozen=True)
class _LowRank:
    """One active peft LoRA adapter on a Linear: ``lora_B(lora_A(dropout(x))) * scaling``."""

    a: torch.Tensor
    b: torch.Tensor
    b_bias: torch.Tensor | None
    scaling: float
    dropout: torch.nn.Module


@dataclass(frozen=True)
class _Linear:
    """A Linear's weight, bias and active LoRA adapters, as the tensors the module holds right now."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    adapters: tuple[_LowRank, ...] = ()
    cast_input: bool = True  # peft casts the input to lora_A's dtype unless told not to

    def tensors(self) -> Iterator[torch.Tensor]:
        yield self.weight
        if self.bias is not None:
            yield self.bias
        for adapter in self.adapters:
            yield adapter.a
            yield adapter.b

    def adapter_inputs(self, x: torch.Tensor, cols: slice | None = None) -> list[torch.Tensor]:
        """``lora_A(dropout(x))`` per adapter (``lora_A`` restricted to input ``cols``), x cast the way peft does."""
        outputs = []
        for adapter in self.adapters:
            if self.cast_input and x.dtype != adapter.a.dtype:
                x = x.to(adapter.a.dtype)
            weight = adapter.a if cols is None else adapter.a[:, cols]
            outputs.append(F.linear(adapter.dropout(x), weight))
        return outputs


def _peft_lora_linear() -> type | None:
    """peft's LoRA ``Linear`` class if peft has been imported (no LoRA layer can exist otherwise)."""
    layer = sys.modules.get("peft.tuners.lora.layer")
    return getattr(layer, "Linear", None)


def _read_linear(module: torch.nn.Module, path: str) -> _Linear:
    """The weights ``module`` computes with now; :class:`UnsupportedFeedForward` for what cannot be split exactly."""
    if type(module) is torch.nn.Linear:
        return _Linear(module.weight, module.bias)
    lora_linear = _peft_lora_linear()
    if lora_linear is None or not isinstance(module, lora_linear):
        raise UnsupportedFeedForward(f"{path} is a {type(module).__name__}, not an nn.Linear or a peft LoRA Linear")
    base = module.base_layer
    if type(base) is not torch.nn.Linear:
        raise UnsupportedFeedForward(f"{path}: the LoRA base layer is a {type(base).__name__}, not an nn.Linear")
    if module.disable_adapters and module.merged:
        raise UnsupportedFeedForward(f"{path}: LoRA adapters are merged but disabled (peft unmerges on the next call)")
    if module.disable_adapters or module.merged:  # peft then runs the base layer only
        return _Linear(base.weight, base.bias)
    adapters = []
    for name in module.active_adapters:
        if name not in module.lora_A:
            continue
        if name in module.lora_variant:
            raise UnsupportedFeedForward(
                f"{path}: LoRA adapter {name!r} is a {type(module.lora_variant[name]).__name__}, which does not split "
                "by rows/columns"
            )
        lora_a, lora_b = module.lora_A[name], module.lora_B[name]
        if type(lora_a) is not torch.nn.Linear or type(lora_b) is not torch.nn.Linear:
            raise UnsupportedFeedForward(f"{path}: LoRA adapter {name!r} is not a pair of nn.Linear")
        adapters.append(_LowRank(lora_a.weight, lora_b.weight, lora_b.bias, module.scaling[name],
                                 module.lora_dropout[name]))
    return _Linear(base.weight, base.bias, tuple(adapters), getattr(module, "cast_input_dtype_enabled", True))


def _active_dropout(module: torch.nn.Module, path: str | None) -> float:
    """The dropout probability in effect now (0.0 in eval mode or without a dropout)."""
    if path is None:
        return 0.0
    dropout = module.get_submodule(path)
    return dropout.p if dropout.training else 0.0


@dataclass(frozen=True)
class _Parts:
    """Everything one chunked call computes with, read from the unit at call time."""

    up: tuple[tuple[_Linear, int], ...]  # (linear, first row of its F-wide block), activation argument order
    down: _Linear
    down_offset: int
    width: int
    activation: str
    dropout: float  # probability between the projections (applied per shard: same distribution, other masks)
    final_dropout: float

    @classmethod
    def read(cls, unit: torch.nn.Module, layout: FeedForwardLayout, path: str) -> "_Parts":
        linears = {rel: _read_linear(unit.get_submodule(rel), f"{path}.{rel}") for rel, _ in layout.up}
        return cls(
            up=tuple((linears[rel], offset) for rel, offset in layout.up),
            down=_read_linear(unit.get_submodule(layout.down), f"{path}.{layout.down}"),
            down_offset=layout.down_offset,
            width=layout.width,
            activation=layout.activation,
            dropout=_active_dropout(unit, layout.dropout),
            final_dropout=_active_dropout(unit, layout.final_dropout),
        )

    def tensors(self) -> Iterator[torch.Tensor]:
        for linear, _ in self.up:
            yield from linear.tensors()
        yield from self.down.tensors()

    @property
    def has_adapters(self) -> bool:
        return bool(self.down.adapters) or any(linear.adapters for linear, _ in self.up)

    @property
    def adapted_up(self) -> list[_Linear]:
        """The distinct input projections carrying LoRA adapters (a packed one appears once)."""
        return list({id(linear): linear for linear, _ in self.up if linear.adapters}.values())

    def up_adapter_inputs(self, x: torch.Tensor) -> dict[int, list[torch.Tensor]]:
        """``lora_A(dropout(x))`` of the input projections' adapters: once per call, shared by every shard."""
        return {id(linear): linear.adapter_inputs(x) for linear in self.adapted_up}

    def activate(self, x: torch.Tensor, start: int, stop: int, adapter_inputs: Mapping[int, list[torch.Tensor]],
                 inplace: bool) -> torch.Tensor:
        """Intermediate columns ``[start, stop)`` after the activation: colwise shards of the input projections."""
        pre = []
        for linear, offset in self.up:
            rows = slice(offset + start, offset + stop)
            h = F.linear(x, linear.weight[rows], None if linear.bias is None else linear.bias[rows])
            if linear.adapters:  # as peft: base + lora_B(lora_A(dropout(x))) * scaling, cast back
                dtype = h.dtype
                for adapter, z in zip(linear.adapters, adapter_inputs[id(linear)]):
                    b_bias = None if adapter.b_bias is None else adapter.b_bias[rows]
                    h = h + F.linear(z, adapter.b[rows], b_bias) * adapter.scaling
                h = h.to(dtype)
            pre.append(h)
        activation = ACTIVATIONS[self.activation]
        out = activation.apply_(*pre) if inplace and activation.apply_ is not None else activation.apply(*pre)
        return F.dropout(out, self.dropout, training=True) if self.dropout else out


class _RowwiseSum:
    """The output projection applied to column shards of its input, partial products summed into one buffer.

    The bias is added once, with the first contribution. Without an accumulation dtype, autocast or autograd, every
    contribution after the first is an in-place ``addmm_`` (no partial-output temporary); ``dest`` (a row block of
    a larger output) receives the first one through ``out=``. LoRA adapters on the output projection accumulate
    their ``lora_A`` products per shard and add ``lora_B(.) * scaling`` once at the end, as peft does.
    """

    def __init__(self, down: _Linear, dest: torch.Tensor | None, accumulate_dtype: torch.dtype | None,
                 fused: bool) -> None:
        self.down = down
        self.dest = dest
        self.accumulate_dtype = accumulate_dtype
        self.fused = fused  # in-place/out= GEMMs allowed (no autograd, no autocast)
        self.out: torch.Tensor | None = None
        self.result_dtype: torch.dtype | None = None
        self.adapter_sums: list[torch.Tensor | None] = [None] * len(down.adapters)

    def add(self, a: torch.Tensor, cols: slice) -> None:
        """Add ``a @ down.weight[:, cols].T`` (+ the adapters' ``lora_A`` products of ``a``)."""
        weight = self.down.weight[:, cols]
        if self.out is None:
            self._start(a, weight)
        elif self.fused and self.out.dtype == a.dtype:
            self.out.addmm_(a, weight.t())
        else:
            self.out.add_(F.linear(a, weight))
        self._add_adapters(self.down.adapter_inputs(a, cols))

    def add_partial(self, partial: torch.Tensor, adapter_partials: list[torch.Tensor]) -> None:
        """Add a precomputed ``a @ down.weight[:, cols].T`` (from a recomputed shard)."""
        if self.out is None:
            self.result_dtype = partial.dtype
            out = partial if self.accumulate_dtype is None else partial.to(self.accumulate_dtype)
            self.out = out if self.down.bias is None else out + self.down.bias
        else:
            self.out.add_(partial)
        self._add_adapters(adapter_partials)

    def _start(self, a: torch.Tensor, weight: torch.Tensor) -> None:
        bias = self.down.bias
        if self.dest is not None and self.fused and self.accumulate_dtype is None:
            self.out = torch.mm(a, weight.t(), out=self.dest) if bias is None else torch.addmm(
                bias, a, weight.t(), out=self.dest
            )
            self.result_dtype = self.out.dtype
            return
        out = F.linear(a, weight, bias)
        self.result_dtype = out.dtype
        if self.accumulate_dtype is not None:
            out = out.to(self.accumulate_dtype)
        self.out = out

    def _add_adapters(self, partials: list[torch.Tensor]) -> None:
        for k, partial in enumerate(partials):
            self.adapter_sums[k] = partial if self.adapter_sums[k] is None else self.adapter_sums[k].add_(partial)

    def finish(self) -> torch.Tensor:
        out = self.out
        for adapter, z in zip(self.down.adapters, self.adapter_sums):
            out.add_(F.linear(z, adapter.b, adapter.b_bias) * adapter.scaling)
        out = out.to(self.result_dtype)
        if self.dest is not None and out is not self.dest:
            self.dest.copy_(out)
            return self.dest
        return out


def split_sizes(total: int, num_chunks: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of ``num_chunks`` shards of ``total`` whose sizes differ by at most one (last ones smaller),
    the split ``torch.tensor_split`` makes."""
    base, extra = divmod(total, num_chunks)
    bounds, start = [], 0
    for index in range(num_chunks):
        stop = start + base + (1 if index < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def _shard_partial(parts: _Parts, start: int, stop: int, x: torch.Tensor, *adapter_inputs: torch.Tensor):
    """One hidden shard's contribution to the output projection, as a function of tensors (for checkpointing)."""
    flat = iter(adapter_inputs)
    inputs = {id(linear): [next(flat) for _ in linear.adapters] for linear in parts.adapted_up}
    a = parts.activate(x, start, stop, inputs, inplace=False)
    cols = slice(parts.down_offset + start, parts.down_offset + stop)
    return (F.linear(a, parts.down.weight[:, cols]), *parts.down.adapter_inputs(a, cols))


def _hidden_split(x: torch.Tensor, prefix: torch.Tensor | None, parts: _Parts, bounds: list[tuple[int, int]],
                  dest: torch.Tensor | None, accumulate_dtype: torch.dtype | None, grad: bool, recompute: bool,
                  fused: bool) -> torch.Tensor:
    """``down(cat([prefix, act(up(x))], -1))`` for 2-D ``x`` with the intermediate split at ``bounds``."""
    total = _RowwiseSum(parts.down, dest, accumulate_dtype, fused and not grad)
    if prefix is not None:  # the non-FeedForward input columns of a packed output projection, applied once
        total.add(prefix, slice(0, parts.down_offset))
    adapter_inputs = parts.up_adapter_inputs(x)
    for start, stop in bounds:
        if recompute and grad:
            flat = [z for zs in adapter_inputs.values() for z in zs]
            partial, *adapter_partials = checkpoint(
                functools.partial(_shard_partial, parts, start, stop), x, *flat, use_reentrant=False
            )
            total.add_partial(partial, adapter_partials)
        else:
            a = parts.activate(x, start, stop, adapter_inputs, inplace=not grad)
            total.add(a, slice(parts.down_offset + start, parts.down_offset + stop))
            del a  # free this shard's intermediate before the next one is built
    return total.finish()


def _sequence_split(x: torch.Tensor, prefix: torch.Tensor | None, parts: _Parts, row_bounds: list[tuple[int, int]],
                    out_dtype: torch.dtype, grad: bool, recompute: bool, fused: bool) -> torch.Tensor:
    """The whole FeedForward on each block of token rows, written into one ``(rows, D_out)`` buffer."""
    out = x.new_empty((x.shape[0], parts.down.weight.shape[0]), dtype=out_dtype)
    whole = [(0, parts.width)]
    for start, stop in row_bounds:
        rows = slice(start, stop)
        x_rows, prefix_rows = x[rows], None if prefix is None else prefix[rows]
        if recompute and grad:
            run = functools.partial(_hidden_split, parts=parts, bounds=whole, dest=None, accumulate_dtype=None,
                                    grad=True, recompute=False, fused=False)
            out[rows].copy_(checkpoint(run, x_rows, prefix_rows, use_reentrant=False))
        else:
            _hidden_split(x_rows, prefix_rows, parts, whole, out[rows], None, grad, False, fused)
    return out


@dataclass(frozen=True)
class _ConvParts:
    """A GLU convolution FeedForward's convolutions (:class:`ConvFeedForwardLayout`). Their weights are read where
    they are used, inside the bypassed hooks' ``pre_forward`` (which may swap ``param.data``): the 1x1 convolutions
    as linears over the channels (views of their weights)."""

    up: torch.nn.Conv2d  # 2F output channels: value, then gate
    depthwise: torch.nn.Conv2d
    down: torch.nn.Conv2d
    width: int

    @classmethod
    def read(cls, unit: torch.nn.Module, layout: ConvFeedForwardLayout, path: str) -> "_ConvParts":
        convs = []
        for rel in (layout.up, layout.depthwise, layout.down):
            conv = unit.get_submodule(rel)
            if type(conv) is not torch.nn.Conv2d:  # e.g. a peft LoRA layer added after apply
                kind = f"{type(conv).__module__}.{type(conv).__name__}"
                raise UnsupportedFeedForward(f"{path}.{rel} is a {kind}, not an nn.Conv2d")
            convs.append(conv)
        return cls(*convs, layout.width)

    def tensors(self) -> Iterator[torch.Tensor]:
        for conv in (self.up, self.depthwise, self.down):
            yield from conv.parameters()

    def down_linear(self) -> _Linear:
        return _Linear(self.down.weight.flatten(1), self.down.bias)

    def activate(self, rows: torch.Tensor, start: int, stop: int, inplace: bool) -> torch.Tensor:
        """Intermediate channels ``[start, stop)`` of channels-last ``rows`` ``(N, H, W, D)``, as a
        ``(N * H * W, stop - start)`` matrix: the value and gate shards of ``up`` and of the depthwise convolution."""
        up, conv, halves = self.up, self.depthwise, []
        for offset in (0, self.width):
            channels = slice(offset + start, offset + stop)
            h = F.linear(rows, up.weight.flatten(1)[channels], None if up.bias is None else up.bias[channels])
            h = F.silu(h, inplace=inplace).permute(0, 3, 1, 2)  # NCHW shape, channels-last memory
            halves.append(F.conv2d(h, conv.weight[channels], None if conv.bias is None else conv.bias[channels],
                                   conv.stride, conv.padding, conv.dilation, stop - start))
            del h
        value, gate = halves
        out = value.mul_(F.silu(gate, inplace=True)) if inplace else value * F.silu(gate)
        return out.permute(0, 2, 3, 1).reshape(-1, stop - start)


def _conv_shard_partial(parts: _ConvParts, start: int, stop: int, rows: torch.Tensor) -> torch.Tensor:
    """One channel shard's contribution to the output convolution, as a function of tensors (for checkpointing)."""
    return F.linear(parts.activate(rows, start, stop, inplace=False), parts.down_linear().weight[:, start:stop])


def _conv_hidden_split(rows: torch.Tensor, parts: _ConvParts, bounds: list[tuple[int, int]],
                       accumulate_dtype: torch.dtype | None, grad: bool, recompute: bool,
                       fused: bool) -> torch.Tensor:
    """``down(value * silu(gate))`` of channels-last ``rows`` ``(N, H, W, D)`` with the intermediate channels split at
    ``bounds``, the shards' outputs summed into one ``(N, H, W, D_out)`` buffer."""
    total = _RowwiseSum(parts.down_linear(), None, accumulate_dtype, fused and not grad)
    for start, stop in bounds:
        if recompute and grad:
            partial = checkpoint(functools.partial(_conv_shard_partial, parts, start, stop), rows, use_reentrant=False)
            total.add_partial(partial, [])
        else:
            a = parts.activate(rows, start, stop, inplace=not grad)
            total.add(a, slice(start, stop))
            del a  # free this shard's intermediate before the next one is built
    return total.finish().reshape(*rows.shape[:-1], -1)


# ------------------------------------------------------------------------------------------------ fused kernel
def _kernels() -> ModuleType | None:
    """memopt's Triton kernels package, or None where it does not exist (it never imports Triton itself)."""
    try:
        kernels = importlib.import_module("memopt.kernels")
    except ImportError:
        return None
    return kernels if hasattr(kernels, "fused_chunked_ffn") and hasattr(kernels, "fused_ffn_available") else None


def _kernel_layout_reason(layout: FeedForwardLayout | ConvFeedForwardLayout, kernels: ModuleType) -> str | None:
    """Why the fused kernel cannot compute this unit at all, or None."""
    if isinstance(layout, ConvFeedForwardLayout):
        return "it is a convolutional FeedForward (a depthwise convolution between the projections)"
    if layout.activation not in kernels.ACTIVATIONS:
        return f"activation {layout.activation!r} is not one of the kernel's {tuple(kernels.ACTIVATIONS)}"
    paths, offsets = [path for path, _ in layout.up], [offset for _, offset in layout.up]
    packed = len(set(paths)) == 1 and offsets in ([0], [0, layout.width])
    separate = len(set(paths)) == 2 and offsets == [0, 0]  # (value, gate) Linears of their own
    if not (packed or separate):
        return "the input projection is neither one Linear with (value, gate) halves in diffusers' order nor two"
    return None


def _kernel_call_reason(parts: _Parts, x: torch.Tensor, kernels: ModuleType) -> str | None:
    """Why the fused kernel cannot run this call, or None."""
    if parts.has_adapters:
        return "LoRA adapters are active"
    if parts.dropout or parts.final_dropout:
        return "dropout is active (training mode with p > 0)"
    if torch.is_autocast_enabled(x.device.type):
        return "autocast is enabled"
    if any(t.dtype != x.dtype or t.device != x.device for t in parts.tensors()):
        return "the weights and the input differ in dtype or device"
    if len(parts.up) == 2 and parts.up[0][0] is not parts.up[1][0]:
        (value, _), (gate, _) = parts.up
        reason = kernels.separate_gate_reason(value.weight, value.bias, gate.weight, gate.bias)
        if reason is not None:
            return reason
    availability = kernels.fused_ffn_available(x.device, x.dtype)
    return None if availability else availability.reason


def _kernel_run(kernels: ModuleType, x: torch.Tensor, prefix: torch.Tensor | None, parts: _Parts,
                config: ChunkedFeedForwardConfig) -> torch.Tensor:
    linear = parts.up[0][0]
    gate = parts.up[1][0] if len(parts.up) == 2 and parts.up[1][0] is not linear else None
    separate_gate = {} if gate is None else {"w_gate": gate.weight, "b_gate": gate.bias}
    cols = slice(parts.down_offset, parts.down_offset + parts.width)
    w2, b2 = parts.down.weight[:, cols], parts.down.bias if prefix is None else None
    if config.split == "hidden":
        out = kernels.fused_chunked_ffn(x, linear.weight, linear.bias, w2, b2, activation=parts.activation,
                                        chunk_size=kernels.aligned_chunk_size(parts.width, config.num_chunks),
                                        **separate_gate)
    else:
        rows = -(-x.shape[0] // config.num_chunks)
        plan = kernels.FusedFFNPlan(rows_per_block=rows, chunk_size=parts.width,
                                    workspace_bytes=rows * parts.width * x.element_size())
        out = kernels.fused_chunked_ffn_with_plan(x, linear.weight, linear.bias, w2, b2, parts.activation, plan,
                                                  **separate_gate)
    if prefix is not None:
        out = F.linear(prefix, parts.down.weight[:, : parts.down_offset], parts.down.bias).add_(out)
    return out


# ------------------------------------------------------------------------------------------------ bypassed hooks
_SAFE_TO_BYPASS = frozenset({"memopt.sequence.skip"})
"""Hooks a chunked run may compute through: memopt's sequence chunking returns zeros from a projection in passes
that never read its output (e.g. Flux's ``proj_mlp`` while collecting K/V), so the real output is always correct."""


def _bypassed_hooks(unit: torch.nn.Module, layout: FeedForwardLayout | ConvFeedForwardLayout,
                    path: str) -> list[tuple[torch.nn.Module, list]]:
    """diffusers hooks on the modules whose forwards the chunked computation replaces (the FeedForward path).

    Their ``pre_forward`` / ``post_forward`` can be honoured around the computation (group offloading onloads and
    offloads, layerwise casting casts); a hook that replaces a forward, or a plain PyTorch / accelerate hook, cannot.
    """
    found = []
    for rel in layout.ff_modules:
        for name, module in unit.get_submodule(rel).named_modules(prefix=f"{path}.{rel}"):
            if module._forward_hooks or module._forward_pre_hooks or hasattr(module, "_hf_hook"):
                raise UnsupportedFeedForward(f"{name} has PyTorch/accelerate forward hooks memopt would bypass")
            registry = getattr(module, "_diffusers_hook", None)
            if registry is None or not registry._hook_order:
                continue
            names = [hook_name for hook_name in registry._hook_order if hook_name not in _SAFE_TO_BYPASS]
            for hook_name in names:
                if hasattr(registry.hooks[hook_name], "new_forward"):
                    raise UnsupportedFeedForward(f"{name} has the hook {hook_name!r}, which replaces its forward")
            if names:
                found.append((module, [registry.hooks[hook_name] for hook_name in names]))
    return found


@contextmanager
def _honour_hooks(bypassed: list[tuple[torch.nn.Module, list]]) -> Iterator[None]:
    """Run bypassed hooks as the hook chain would: ``pre_forward`` outermost first, ``post_forward`` innermost first."""
    for module, hooks in bypassed:
        for hook in reversed(hooks):
            hook.pre_forward(module)
    try:
        yield
    finally:
        for module, hooks in bypassed:
            for hook in hooks:
                hook.post_forward(module, None)


# ------------------------------------------------------------------------------------------------ unit forwards
FeedForwardFn = Callable[..., torch.Tensor]
"""``ffn(x, prefix=None)``: the chunked ``down(cat([prefix, act(up(x))], -1))`` of a unit."""


def _feedforward_forward(module: torch.nn.Module, ffn: FeedForwardFn, hidden_states: torch.Tensor, *args: Any,
                         **kwargs: Any) -> torch.Tensor:
    # FeedForward's extra arguments are the deprecated, ignored `scale`.
    return ffn(hidden_states)


def _flux_single_forward(block: FluxSingleTransformerBlock, ffn: FeedForwardFn, hidden_states: torch.Tensor,
                         encoder_hidden_states: torch.Tensor, temb: torch.Tensor,
                         image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
                         joint_attention_kwargs: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``FluxSingleTransformerBlock.forward`` (diffusers 0.42) with ``proj_out(cat([attn, mlp]))`` chunked.

    The MLP branch runs after attention here, not before it, so no part of it is alive during attention, and the
    ``(tokens, D + F)`` concatenation is never built."""
    text_seq_len = encoder_hidden_states.shape[1]
    hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
    residual = hidden_states
    norm_hidden_states, gate = block.norm(hidden_states, emb=temb)
    joint_attention_kwargs = joint_attention_kwargs or {}
    attn_output = block.attn(hidden_states=norm_hidden_states, image_rotary_emb=image_rotary_emb,
                             **joint_attention_kwargs)
    hidden_states = gate.unsqueeze(1) * ffn(norm_hidden_states, prefix=attn_output)
    hidden_states = residual + hidden_states
    if hidden_states.dtype == torch.float16:
        hidden_states = hidden_states.clip(-65504, 65504)
    encoder_hidden_states, hidden_states = hidden_states[:, :text_seq_len], hidden_states[:, text_seq_len:]
    return encoder_hidden_states, hidden_states


def _bria_single_forward(block: BriaSingleTransformerBlock, ffn: FeedForwardFn, hidden_states: torch.Tensor,
                         encoder_hidden_states: torch.Tensor, temb: torch.Tensor,
                         image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
                         attention_kwargs: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``BriaSingleTransformerBlock.forward`` (diffusers 0.42): Flux's single block with the keyword
    ``attention_kwargs`` for ``joint_attention_kwargs``."""
    return _flux_single_forward(block, ffn, hidden_states, encoder_hidden_states, temb, image_rotary_emb,
                                attention_kwargs)


def _chroma_single_forward(block: ChromaSingleTransformerBlock, ffn: FeedForwardFn, hidden_states: torch.Tensor,
                           temb: torch.Tensor, image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
                           attention_mask: torch.Tensor | None = None,
                           joint_attention_kwargs: dict[str, Any] | None = None) -> torch.Tensor:
    """``ChromaSingleTransformerBlock.forward`` (diffusers 0.42) with ``proj_out(cat([attn, mlp]))`` chunked, as
    :func:`_flux_single_forward` (the model passes ``cat(text, image)`` and the token mask it squares here)."""
    residual = hidden_states
    norm_hidden_states, gate = block.norm(hidden_states, emb=temb)
    joint_attention_kwargs = joint_attention_kwargs or {}
    if attention_mask is not None:
        attention_mask = attention_mask[:, None, None, :] * attention_mask[:, None, :, None]
    attn_output = block.attn(hidden_states=norm_hidden_states, image_rotary_emb=image_rotary_emb,
                             attention_mask=attention_mask, **joint_attention_kwargs)
    hidden_states = residual + gate.unsqueeze(1) * ffn(norm_hidden_states, prefix=attn_output)
    if hidden_states.dtype == torch.float16:
        hidden_states = hidden_states.clip(-65504, 65504)
    return hidden_states


def _hunyuan_attention(block: torch.nn.Module, norm_hidden_states: torch.Tensor, text_seq_length: int,
                       attention_mask: torch.Tensor | None, image_rotary_emb: Any) -> torch.Tensor:
    attn_output, context_attn_output = block.attn(
        hidden_states=norm_hidden_states[:, :-text_seq_length, :],
        encoder_hidden_states=norm_hidden_states[:, -text_seq_length:, :],
        attention_mask=attention_mask,
        image_rotary_emb=image_rotary_emb,
    )
    return torch.cat([attn_output, context_attn_output], dim=1)


def _hunyuan_single_forward(block: HunyuanVideoSingleTransformerBlock, ffn: FeedForwardFn,
                            hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, temb: torch.Tensor,
                            attention_mask: torch.Tensor | None = None, image_rotary_emb: Any = None, *args: Any,
                            **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``HunyuanVideoSingleTransformerBlock.forward`` (diffusers 0.42) with the packed MLP path chunked."""
    text_seq_length = encoder_hidden_states.shape[1]
    hidden_states = torch.cat([hidden_states, encoder_hidden_states], dim=1)
    residual = hidden_states
    norm_hidden_states, gate = block.norm(hidden_states, emb=temb)
    attn_output = _hunyuan_attention(block, norm_hidden_states, text_seq_length, attention_mask, image_rotary_emb)
    hidden_states = gate.unsqueeze(1) * ffn(norm_hidden_states, prefix=attn_output)
    hidden_states = hidden_states + residual
    return hidden_states[:, :-text_seq_length, :], hidden_states[:, -text_seq_length:, :]


def _hunyuan_token_replace_single_forward(
    block: HunyuanVideoTokenReplaceSingleTransformerBlock, ffn: FeedForwardFn, hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor, temb: torch.Tensor, attention_mask: torch.Tensor | None = None,
    image_rotary_emb: Any = None, token_replace_emb: torch.Tensor | None = None, num_tokens: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``HunyuanVideoTokenReplaceSingleTransformerBlock.forward`` (diffusers 0.42) with the MLP path chunked."""
    text_seq_length = encoder_hidden_states.shape[1]
    hidden_states = torch.cat([hidden_states, encoder_hidden_states], dim=1)
    residual = hidden_states
    norm_hidden_states, gate, tr_gate = block.norm(hidden_states, temb, token_replace_emb, num_tokens)
    attn_output = _hunyuan_attention(block, norm_hidden_states, text_seq_length, attention_mask, image_rotary_emb)
    proj_output = ffn(norm_hidden_states, prefix=attn_output)
    hidden_states_zero = proj_output[:, :num_tokens] * tr_gate.unsqueeze(1)
    hidden_states_orig = proj_output[:, num_tokens:] * gate.unsqueeze(1)
    hidden_states = torch.cat([hidden_states_zero, hidden_states_orig], dim=1)
    hidden_states = hidden_states + residual
    return hidden_states[:, :-text_seq_length, :], hidden_states[:, -text_seq_length:, :]


UNIT_FORWARDS: dict[type, Callable[..., Any]] = {
    FluxSingleTransformerBlock: _flux_single_forward,
    LongCatImageSingleTransformerBlock: _flux_single_forward,  # Flux's forward, unchanged
    BriaSingleTransformerBlock: _bria_single_forward,
    ChromaSingleTransformerBlock: _chroma_single_forward,
    HunyuanVideoSingleTransformerBlock: _hunyuan_single_forward,
    HunyuanVideoTokenReplaceSingleTransformerBlock: _hunyuan_token_replace_single_forward,
}
"""Unit class -> its forward with the FeedForward path delegated to ``ffn``; FeedForward-like units (the whole
module is the FeedForward) are not listed and use :func:`_feedforward_forward`."""


def _glumb_conv_forward(module: GLUMBConv, ffn: FeedForwardFn, hidden_states: torch.Tensor) -> torch.Tensor:
    """``GLUMBConv.forward`` (diffusers 0.42) on ``(B, D, H, W)``, ``conv_inverted`` to ``conv_point`` chunked."""
    out = ffn(hidden_states.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    if module.norm_type == "rms_norm":
        out = module.norm(out.movedim(1, -1)).movedim(-1, 1)
    return out + hidden_states if module.residual_connection else out


def _glumb_temp_conv_forward(module: GLUMBTempConv, ffn: FeedForwardFn, hidden_states: torch.Tensor) -> torch.Tensor:
    """``GLUMBTempConv.forward`` (diffusers 0.42) on ``(B, T, H, W, D)``: the per-frame convolutions chunked, then
    the residual temporal convolution over the summed output."""
    batch, frames, height, width, channels = hidden_states.shape
    out = ffn(hidden_states.reshape(batch * frames, height, width, channels))
    temporal = out.reshape(batch, frames, height * width, -1).permute(0, 3, 1, 2)  # (B, D, T, H * W)
    out = module.conv_temp(temporal).add_(temporal)  # temporal + conv_temp(temporal), without a third buffer
    del temporal
    out = out.permute(0, 2, 3, 1).reshape(batch, frames, height, width, -1)
    if module.norm_type == "rms_norm":
        out = module.norm(out.movedim(1, -1)).movedim(-1, 1)
    return out + hidden_states if module.residual_connection else out


CONV_UNIT_FORWARDS: dict[type, Callable[..., torch.Tensor]] = {
    GLUMBConv: _glumb_conv_forward,
    GLUMBTempConv: _glumb_temp_conv_forward,
}
"""Convolutional unit class (:data:`memopt.plans.feedforward.CONV_FEEDFORWARD_UNITS`) -> its forward, with
``ffn(rows)`` computing the chunked convolutions on channels-last ``(N, H, W, D)`` rows."""


def _check_unit_forward(module: torch.nn.Module, layout: FeedForwardLayout) -> None:
    """A unit with parts outside its FeedForward path (a block with attention and norms) needs its own forward in
    :data:`UNIT_FORWARDS`; run through the FeedForward-only forward it would compute the wrong function."""
    if type(module) in UNIT_FORWARDS:
        return
    on_path = {path.split(".")[0] for path in layout.ff_modules}
    outside = [name for name, child in module.named_children()
               if name not in on_path and (any(True for _ in child.parameters()) or len(child._modules))]
    if outside:
        raise UnsupportedFeedForward(
            f"{type(module).__name__} is registered as a FeedForward unit, but {outside} lie outside its FeedForward "
            "path and memopt.hooks.feedforward.UNIT_FORWARDS has no forward for it"
        )


# ------------------------------------------------------------------------------------------------ the hook
class ChunkedFeedForwardHook(ModelHook):
    """Replaces a FeedForward-like module's forward with the chunked computation (see the module docstring).

    Weights, LoRA adapters and bypassed hooks are read on every call. When something makes an exact chunked run
    impossible at call time (e.g. a DoRA adapter loaded after apply), the original forward runs and the reason is
    logged once.
    """

    _is_stateful = False

    def __init__(self, path: str, layout: FeedForwardLayout, config: ChunkedFeedForwardConfig) -> None:
        super().__init__()
        self.path = path
        self.layout = layout
        self.config = config
        self._fallback_reasons: set[str] = set()

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        try:
            parts = self._read(module)
            bypassed = _bypassed_hooks(module, self.layout, self.path)
            inner = self._inner_hooks(module)
        except UnsupportedFeedForward as reason:
            if str(reason) not in self._fallback_reasons:
                self._fallback_reasons.add(str(reason))
                logger.warning("memopt: %s runs unchunked: %s", self.path, reason)
            return self.fn_ref.original_forward(*args, **kwargs)
        ffn = functools.partial(self._feedforward, parts, bypassed)
        return call_inside(inner, module, functools.partial(self._unit_forward(module), module, ffn), *args, **kwargs)

    def _read(self, module: torch.nn.Module) -> _Parts:
        return _Parts.read(module, self.layout, self.path)

    def _unit_forward(self, module: torch.nn.Module) -> Callable[..., Any]:
        return UNIT_FORWARDS.get(type(module), _feedforward_forward)

    def _inner_hooks(self, module: torch.nn.Module) -> list[ModelHook]:
        """Hooks registered on this module before ours: they sit inside ``original_forward``, which a chunked run
        does not call, so their ``pre_forward`` / ``post_forward`` are run here (e.g. block-level group offloading)."""
        inner = hooks_inside(module, FEEDFORWARD_HOOK)
        for name, hook in inner.items():
            if hasattr(hook, "new_forward"):
                raise UnsupportedFeedForward(f"the hook {name!r}, registered before memopt's, replaces the forward")
        return list(inner.values())

    def _feedforward(self, parts: _Parts, bypassed: list, x: torch.Tensor,
                     prefix: torch.Tensor | None = None) -> torch.Tensor:
        config = self.config
        lead, out_features = x.shape[:-1], parts.down.weight.shape[0]
        x2d = x.reshape(-1, x.shape[-1])
        prefix2d = None if prefix is None else prefix.reshape(-1, prefix.shape[-1])
        num_rows = x2d.shape[0]
        num_chunks = config.num_chunks
        if config.split == "sequence" and num_chunks > num_rows:
            if running("block_run") is None:
                raise ValueError(
                    f"{self.path}: num_chunks={num_chunks} is larger than the {num_rows} token rows "
                    f"(batch x sequence) this FeedForward received; use at most {num_rows} chunks"
                )
            # memopt's sequence chunks, not the caller, made this call small (a chunk's share of 8 text tokens):
            # one shard per row computes the same values.
            num_chunks = num_rows
        with _honour_hooks(bypassed):
            kernels = self._kernel_for(parts, x2d)
            if kernels is not None:
                out = _kernel_run(kernels, x2d, prefix2d, parts, config)
            else:
                inputs = [x2d] if prefix2d is None else [x2d, prefix2d]
                grad = torch.is_grad_enabled() and any(t.requires_grad for t in [*inputs, *parts.tensors()])
                fused = not torch.is_autocast_enabled(x.device.type)
                if config.split == "hidden":
                    out = _hidden_split(x2d, prefix2d, parts, split_sizes(parts.width, config.num_chunks), None,
                                        config.accumulate_dtype, grad, config.recompute, fused)
                else:
                    out_dtype = torch.get_autocast_dtype(x.device.type) if not fused else x.dtype
                    out = _sequence_split(x2d, prefix2d, parts, split_sizes(num_rows, num_chunks), out_dtype,
                                          grad, config.recompute, fused)
        if parts.final_dropout:
            out = F.dropout(out, parts.final_dropout, training=True)
        return out.reshape(*lead, out_features)

    def _kernel_for(self, parts: _Parts, x: torch.Tensor) -> ModuleType | None:
        """The kernels package when this call should use the fused kernel, else None (``kernel="triton"`` raises)."""
        if self.config.kernel == "torch" or (self.config.kernel == "auto" and not x.is_cuda):
            return None
        kernels = _kernels()
        if kernels is None:
            if self.config.kernel == "triton":
                raise RuntimeError(f"{self.path}: kernel='triton' but memopt.kernels.fused_chunked_ffn is missing")
            return None
        reason = _kernel_layout_reason(self.layout, kernels) or _kernel_call_reason(parts, x, kernels)
        if reason is None and self.config.kernel == "auto":
            # The kernel would run, but slowly: "auto" picks the kernel for memory at near cuBLAS speed, not at any cost
            # (kernel="triton" still forces it).
            reason = kernels.misaligned_widths({"model width": x.shape[-1], "FeedForward inner width": parts.width,
                                                "down-projection column offset": parts.down_offset})
        if reason is None:
            return kernels
        if self.config.kernel == "triton":
            raise RuntimeError(f"{self.path}: kernel='triton' cannot run here: {reason}")
        return None


class ChunkedConvFeedForwardHook(ChunkedFeedForwardHook):
    """The hook for GLU convolution FeedForwards (Sana's ``GLUMBConv``, :class:`ConvFeedForwardLayout`): the
    intermediate channels are split as ``split="hidden"`` splits a linear FeedForward's (the only split it takes:
    the depthwise convolution mixes neighbouring tokens), with PyTorch ops (the fused kernel computes linear
    FeedForwards only)."""

    def _read(self, module: torch.nn.Module) -> _ConvParts:
        return _ConvParts.read(module, self.layout, self.path)

    def _unit_forward(self, module: torch.nn.Module) -> Callable[..., Any]:
        return CONV_UNIT_FORWARDS[type(module)]

    def _feedforward(self, parts: _ConvParts, bypassed: list, rows: torch.Tensor) -> torch.Tensor:
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in [rows, *parts.tensors()])
        fused = not torch.is_autocast_enabled(rows.device.type)
        with _honour_hooks(bypassed):
            return _conv_hidden_split(rows, parts, split_sizes(parts.width, self.config.num_chunks),
                                      self.config.accumulate_dtype, grad, self.config.recompute, fused)


def sharded_convolutions(module: torch.nn.Module, rows: torch.Tensor) -> torch.Tensor | None:
    """``down(value * silu(gate))`` of a GLU convolution unit carrying memopt's FeedForward hook, on channels-last
    ``rows`` ``(N, H, W, D)``, in the channel shards the hook is configured with; None where the hook is absent or
    would not run it chunked now (other hooks inside it, a layer it cannot read). For callers that run the unit's
    steps themselves (Sana Video's streamed blocks run its temporal convolution across bands)."""
    registry = getattr(module, "_diffusers_hook", None)
    hook = None if registry is None else registry.get_hook(FEEDFORWARD_HOOK)
    if not isinstance(hook, ChunkedConvFeedForwardHook):
        return None
    try:
        parts, bypassed = hook._read(module), _bypassed_hooks(module, hook.layout, hook.path)
        if hook._inner_hooks(module):
            return None
    except UnsupportedFeedForward:
        return None
    return hook._feedforward(parts, bypassed, rows)


# ------------------------------------------------------------------------------------------------ apply + report
@dataclass
class FeedForwardReport:
    """What :func:`apply_chunked_feedforward` did.

    Attributes:
        config: the configuration the hooks run with.
        plan_source: where the split plan came from (a diffusers ``_tp_plan``, a memopt plan, or module types).
        applied: paths of the modules that got the hook.
        skipped: path -> reason, for FeedForward-like modules left unchanged.
    """

    config: ChunkedFeedForwardConfig
    plan_source: str
    applied: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        config = self.config
        lines = [
            f"chunked FeedForward (split={config.split!r}, num_chunks={config.num_chunks}, "
            f"recompute={config.recompute}, kernel={config.kernel!r}); plan: {self.plan_source}",
            f"  applied to {len(self.applied)} module(s):",
            *(f"    {pattern}  x{count}" for pattern, count in _group_paths(self.applied).items()),
        ]
        if self.skipped:
            lines.append(f"  skipped {len(self.skipped)} module(s):")
            by_reason: dict[str, list[str]] = defaultdict(list)
            for path, reason in self.skipped.items():
                by_reason[reason].append(path)
            for reason, paths in by_reason.items():
                for pattern, count in _group_paths(paths).items():
                    lines.append(f"    {pattern}  x{count}: {reason}")
        return "\n".join(lines)


def _group_paths(paths: list[str]) -> dict[str, int]:
    """``blocks.0.ffn``, ``blocks.1.ffn`` -> ``{"blocks.*.ffn": 2}`` (block indices folded, order kept)."""
    groups: dict[str, int] = {}
    for path in paths:
        pattern = re.sub(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.|$)", "*", path)
        groups[pattern] = groups.get(pattern, 0) + 1
    return groups


def _check_plan(unit: torch.nn.Module, path: str, layout: FeedForwardLayout, expanded: Mapping[str, Style],
                source: str) -> None:
    """Raise :class:`UnsupportedFeedForward` unless the plan splits every linear of the unit the way it needs."""
    if isinstance(layout, ConvFeedForwardLayout):  # diffusers' styles name linears: the plan need only list the unit
        for rel in (layout.up, layout.down):
            if f"{path}.{rel}" not in expanded:
                raise UnsupportedFeedForward(f"not in the plan ({source} has no entry for {f'{path}.{rel}'!r})")
        return
    for rel, wanted in unit_plan(layout).items():
        full = f"{path}.{rel}" if path else rel
        if full not in expanded:
            raise UnsupportedFeedForward(f"not in the plan ({source} has no entry for {full!r})")
        linear = unit.get_submodule(rel)
        default = [layout.down_offset, layout.width] if rel == layout.down and layout.down_offset else None
        have, want = canonical_style(expanded[full], linear, default), canonical_style(wanted, linear)
        if have != want:
            raise UnsupportedFeedForward(f"{source} splits {full!r} as {have}, but this module's layout needs {want}")


def _unknown_feedforwards(model: torch.nn.Module, unit_paths: list[str]) -> dict[str, str]:
    """Modules that look like FeedForwards (:data:`UNKNOWN_FEEDFORWARD`) but have no layout, so the report says they
    were left unchanged; those inside a known unit or containing one (experts of a mixture) are accounted for."""

    def related(a: str, b: str) -> bool:
        return a == b or not a or not b or a.startswith(b + ".") or b.startswith(a + ".")

    return {
        path or type(module).__name__: (
            f"no FeedForward layout for {type(module).__module__}.{type(module).__name__} "
            "(memopt.plans.FEEDFORWARD_UNITS); left unchanged"
        )
        for path, module in model.named_modules()
        if UNKNOWN_FEEDFORWARD.search(type(module).__name__) and not is_feedforward_unit(module)
        and not any(related(path, unit) for unit in unit_paths)
    }


def _refuse_forward_replaced(module: torch.nn.Module) -> None:
    """A unit whose forward another hook already replaces (memopt's sequence chunks on a Flux single block, whose
    FeedForward path is inline) would never reach its original forward, and ours would have to bypass that hook: skip
    it at apply time, where the report can say so, rather than fall back on every call."""
    registry = getattr(module, "_diffusers_hook", None)
    for name in [] if registry is None else registry._hook_order:
        if hasattr(registry.hooks[name], "new_forward"):
            advice = "; apply the FeedForward hooks first to have both" if name.startswith(HOOK_PREFIX) else ""
            raise UnsupportedFeedForward(f"the hook {name!r}, registered before, replaces its forward{advice}")


def _select_mixtures(mixtures: list[tuple[str, torch.nn.Module]], given: Mapping[str, Style] | None, num_chunks: int,
                     report: FeedForwardReport) -> list[tuple[str, torch.nn.Module, ExpertChoiceLayout]]:
    """The expert-choice MoE layers to stream in ``num_chunks`` expert groups; the others go to ``report.skipped``.

    A plan passed by the caller (``given``, expanded) selects a layer with the style ``"experts"`` (diffusers'
    ``_tp_plan`` has no style for experts); without one, every layer with a layout is selected.
    """
    selected = []
    for path, module in mixtures:
        name = path or type(module).__name__
        layout = expert_choice_layout(module)
        try:
            if given is not None and given.get(path) != "experts":
                raise UnsupportedFeedForward(f"not in the plan (the plan passed has no {name!r}: 'experts' entry)")
            _bypassed_hooks(module, layout, name)
            _refuse_forward_replaced(module)
        except UnsupportedFeedForward as reason:
            report.skipped[name] = str(reason)
            continue
        experts = expert_count(layout, module)
        if num_chunks > experts:
            raise ValueError(f"{name}: num_chunks={num_chunks} is larger than the layer's {experts} experts (its "
                             f"expert groups); use at most {experts} chunks")
        selected.append((name, module, layout))
    return selected


def apply_chunked_feedforward(
    model: torch.nn.Module,
    num_chunks: int = 4,
    split: str = "hidden",
    *,
    recompute: bool = False,
    accumulate_dtype: torch.dtype | None = None,
    kernel: str = "auto",
    plan: Mapping[str, Style] | None = None,
) -> FeedForwardReport:
    """Run every planned FeedForward of ``model`` in ``num_chunks`` sequential shards (see
    :class:`ChunkedFeedForwardConfig` for the options).

    Modules are found by type (diffusers ``FeedForward`` with any of its activations, ``LuminaFeedForward``,
    ``Flux2FeedForward``, the Flux / Chroma / HunyuanVideo single blocks' ``proj_mlp -> act -> proj_out`` path and
    the model-specific MLP classes in :data:`memopt.plans.FEEDFORWARD_UNITS`) and chunked when ``plan`` -- by default
    the model class's ``_tp_plan``, else memopt's plan for the family, else all of them -- splits their linears as
    their layout needs. Everything else that looks like a FeedForward is listed in the report with the reason.

    Expert-choice mixture-of-experts layers (Nucleus-Image's, :mod:`memopt.plans.experts`) run their routed experts in
    ``num_chunks`` groups, one after another (:mod:`memopt.hooks.experts`), whatever ``split`` says: the experts
    are the layer's hidden dimension, and its routing spans the whole sequence. A ``plan`` passed in streams the layers
    it lists with the style ``"experts"``.

    Args:
        model: a diffusers transformer (or any module containing FeedForwards, or a FeedForward itself).
        num_chunks: number of shards.
        split: ``"hidden"`` (shard the intermediate width, TP-equivalent) or ``"sequence"`` (shard the tokens).
        recompute: recompute each shard in backward instead of saving its intermediate.
        accumulate_dtype: accumulator dtype for ``split="hidden"`` (e.g. ``torch.float32`` for bf16 models).
        kernel: ``"auto"``, ``"torch"`` or ``"triton"``.
        plan: ``{module pattern: style}`` in diffusers ``_tp_plan`` form, overriding the default plan.

    Returns:
        A :class:`FeedForwardReport`; ``print`` it for a summary.

    Raises:
        ValueError: bad options, or ``num_chunks`` larger than a planned FeedForward's intermediate width or an MoE
            layer's number of experts (the message names the module); ``kernel="triton"`` on a module the kernel
            cannot compute.
        RuntimeError: the model already has memopt's FeedForward hooks (call ``remove_memory_optimizations``
            first), or ``kernel="triton"`` without memopt's kernels.

    Example::

        import torch
        from memopt import apply_chunked_feedforward, remove_memory_optimizations
        from memopt.models import get_family

        spec = get_family("flux")
        model = spec.build("tiny")
        inputs = spec.make_inputs(model.config, batch_size=2)
        report = apply_chunked_feedforward(model, num_chunks=4, split="hidden")
        print(report)          # transformer_blocks.*.ff, .ff_context and single_transformer_blocks.* (proj_mlp path)
        with torch.no_grad():
            out = model(**inputs)[0]
        remove_memory_optimizations(model)
    """
    config = ChunkedFeedForwardConfig(num_chunks, split, recompute, accumulate_dtype, kernel)
    kernels = _kernels() if kernel == "triton" else None
    if kernel == "triton" and kernels is None:
        raise RuntimeError("kernel='triton' needs memopt.kernels (fused_chunked_ffn), which could not be imported")
    given = plan is not None
    if given:
        source = "the plan passed to apply_chunked_feedforward"
    else:
        plan, source = feedforward_plan(model)
    expanded = None if plan is None else expand_plan(model, plan)

    units: list[tuple[str, torch.nn.Module]] = []
    for path, module in model.named_modules():  # parents first: a unit inside another (the nn.Sequential of
        if is_feedforward_unit(module) and not any(  # LongCat's AudioDiTFeedForward) is computed by the outer one
                not outer or path.startswith(outer + ".") for outer, _ in units):
            units.append((path, module))
    mixtures = [(path, module) for path, module in model.named_modules() if expert_choice_layout(module) is not None]
    refuse_if_hooked(units + mixtures, FEEDFORWARD_HOOK, "chunked FeedForward")

    report = FeedForwardReport(config, source)
    selected = []
    for path, module in units:
        name = path or type(module).__name__
        try:
            layout = feedforward_layout(module)
            conv = isinstance(layout, ConvFeedForwardLayout)
            if conv and split != "hidden":
                raise UnsupportedFeedForward(
                    f"its depthwise convolution mixes neighbouring tokens, so split={split!r} would change its "
                    "output; split='hidden' chunks it")
            if not conv:
                _check_unit_forward(module, layout)
            if expanded is not None:
                _check_plan(module, path, layout, expanded, source)
            (_ConvParts if conv else _Parts).read(module, layout, name)
            _bypassed_hooks(module, layout, name)
            _refuse_forward_replaced(module)
        except UnsupportedFeedForward as reason:
            report.skipped[name] = str(reason)
            continue
        if split == "hidden" and num_chunks > layout.width:
            raise ValueError(
                f"{name}: num_chunks={num_chunks} is larger than the FeedForward's intermediate width "
                f"F={layout.width}; use at most {layout.width} chunks"
            )
        if kernels is not None and (reason := _kernel_layout_reason(layout, kernels)) is not None:
            raise ValueError(f"{name}: kernel='triton' cannot compute this module: {reason}")
        selected.append((name, module, layout))

    streamed = _select_mixtures(mixtures, expanded if given else None, num_chunks, report)
    report.skipped.update(_unknown_feedforwards(model, [path for path, _ in units]))
    for name, module, layout in selected:
        hook = (ChunkedConvFeedForwardHook if isinstance(layout, ConvFeedForwardLayout) else ChunkedFeedForwardHook)
        register_memopt_hook(module, hook(name, layout, config), FEEDFORWARD_HOOK)
        report.applied.append(name)
    from .experts import StreamedExpertsHook  # memopt.hooks.experts builds on this module

    for name, module, layout in streamed:
        hook = StreamedExpertsHook(name, layout, num_chunks, FEEDFORWARD_HOOK, recompute, accumulate_dtype)
        register_memopt_hook(module, hook, FEEDFORWARD_HOOK)
        report.applied.append(name)
    if not units and not mixtures:
        logger.warning("memopt: no FeedForward-like module found in %s", type(model).__name__)
    return report
