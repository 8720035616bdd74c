"""Chunked attention: each attention kernel call computed in query, key/value and head pieces.

The whole-sequence attention of a video model materialises nothing larger than its inputs on a fused kernel, but
many calls do not get one: the math path (masks on backends without mask support, fp32 on some devices, old
PyTorch), additive masks that force the memory-efficient kernel's padded bias, or SDPA backends that copy K/V per
head group. Splitting the call sequentially is exact and bounds every temporary:

* **query chunks** and **head chunks**: independent pieces, written into one output;
* **K/V chunks**: partial softmaxes merged with their log-sum-exp in fp32 (the ring-attention merge), so an
  ``S_q x S_kv`` score matrix never exists, only ``query_chunk x kv_chunk`` pieces.

The math is :func:`memopt.ops.attention.chunked_attention`; this module only routes the kernel calls of diffusers'
attention modules to it, through the same dispatch interception as sequence chunking
(:mod:`memopt.hooks._attention_dispatch`), so processors run unchanged and both techniques combine (sequence
chunking swaps in the full K/V, then the call is computed in pieces). Linear attention (Sana's ReLU kernel) makes no
kernel call and needs no S x S scores, but its processors project and upcast the whole sequence: those calls run in
token chunks, the key sums first (:mod:`memopt.hooks._linear_attention`).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from diffusers.hooks import ModelHook
from diffusers.hooks._common import _ATTENTION_CLASSES

from ..ops.attention import chunked_attention
from ._attention_dispatch import (
    CHUNKED_ATTENTION_PRIORITY,
    AttentionCall,
    Proceed,
    acquire_interception,
    calls_sdpa_directly,
    intercept_attention,
    release_interception,
)
from ._common import call_inside, hooks_inside, refuse_if_hooked, register_memopt_hook
from ._linear_attention import LINEAR_ATTENTION

logger = logging.getLogger(__name__)

CHUNKED_ATTENTION_HOOK = "memopt.chunked_attention"


def _check_chunk(name: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be a positive int or None, got {value!r}")


@dataclass(frozen=True)
class ChunkedAttentionConfig:
    """How each attention kernel call is split.

    Attributes:
        query_chunk: queries per piece; ``None`` keeps all queries together. Bounds the output and score
            temporaries of one piece to ``query_chunk`` rows.
        kv_chunk: keys/values per piece, merged by log-sum-exp; ``None`` keeps all keys together. Needed when a
            call would otherwise build ``S_q x S_kv`` scores (math path, masks).
        head_chunks: number of head groups run one after another (1: all heads at once).
    """

    query_chunk: int | None = 4096
    kv_chunk: int | None = None
    head_chunks: int = 1

    def __post_init__(self) -> None:
        _check_chunk("query_chunk", self.query_chunk)
        _check_chunk("kv_chunk", self.kv_chunk)
        if isinstance(self.head_chunks, bool) or not isinstance(self.head_chunks, int) or self.head_chunks < 1:
            raise ValueError(f"head_chunks must be a positive int, got {self.head_chunks!r}")


@dataclass
class ChunkedAttentionReport:
    """What :func:`apply_chunked_attention` did.

    Attributes:
        model: the model's class name.
        config: the chunking applied.
        attention: module paths of the attention modules whose kernel calls are chunked.
    """

    model: str
    config: ChunkedAttentionConfig
    attention: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        c = self.config
        return (
            f"chunked attention on {self.model}: {len(self.attention)} attention modules, query_chunk={c.query_chunk}, "
            f"kv_chunk={c.kv_chunk}, head_chunks={c.head_chunks}"
        )


class ChunkedAttentionHook(ModelHook):
    """On an attention module: computes its attention kernel calls with :func:`chunked_attention`.

    Calls that the chunked math does not cover pass to the original backend unchanged: ``return_lse`` requests,
    diffusers context parallelism, dropout together with K/V chunks, masks of a dtype SDPA itself would not
    take, and masks that are not tensors (flex attention's ``BlockMask``, logged once). ``calls`` and
    ``chunked_calls`` count what happened, for reports and tests. Sana's linear-attention processors make no
    kernel call: their calls are computed in ``query_chunk``-token sweeps instead (:mod:`._linear_attention`). Any
    other module whose forward makes no kernel call is logged once: there is nothing to chunk.
    """

    def __init__(self, config: ChunkedAttentionConfig, path: str = "") -> None:
        super().__init__()
        self.config = config
        self.path = path
        self.calls = 0
        self.chunked_calls = 0
        self._reported_no_calls = False
        self._reported_block_mask = False

    def initialize_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        acquire_interception()
        return module

    def deinitalize_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        release_interception()
        return module

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        linear = LINEAR_ATTENTION.get(type(getattr(module, "processor", None)))
        if linear is not None:
            return self._linear_attention(linear, module, *args, **kwargs)
        calls_before = self.calls
        with intercept_attention(self._handle, CHUNKED_ATTENTION_PRIORITY, sdpa=calls_sdpa_directly(module)):
            output = self.fn_ref.original_forward(*args, **kwargs)
        if self.calls == calls_before and not self._reported_no_calls:
            self._reported_no_calls = True
            processor = type(getattr(module, "processor", None)).__name__
            logger.warning("memopt: %s (%s) made no attention kernel call, so chunked attention has nothing to split "
                           "there", self.path or type(module).__name__, processor)
        return output

    def _linear_attention(self, linear: Callable[..., torch.Tensor], module: torch.nn.Module,
                          hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """A linear-attention processor's call (no kernel call: see :mod:`memopt.hooks._linear_attention`), in
        ``query_chunk``-token sweeps over the queries and over the keys and values."""
        chunk = self.config.query_chunk
        inner = list(hooks_inside(module, CHUNKED_ATTENTION_HOOK).values())
        if chunk is None or chunk >= hidden_states.shape[1] or any(hasattr(hook, "new_forward") for hook in inner):
            return self.fn_ref.original_forward(hidden_states, *args, **kwargs)
        # The chunks call the module's projections, not its forward: hooks registered on it before this one get
        # their pre_forward / post_forward around the whole call (one that replaces the forward runs it whole).
        self.calls += 1
        self.chunked_calls += 1
        return call_inside(inner, module, functools.partial(linear, module, chunk), hidden_states, *args, **kwargs)

    def _handle(self, call: AttentionCall, proceed: Proceed) -> torch.Tensor:
        self.calls += 1
        config = self.config
        seq_q, seq_kv, heads = call.query.shape[1], call.key.shape[1], call.query.shape[2]
        query_chunk = None if config.query_chunk is None or config.query_chunk >= seq_q else config.query_chunk
        kv_chunk = None if config.kv_chunk is None or config.kv_chunk >= seq_kv else config.kv_chunk
        head_chunks = min(config.head_chunks, heads)
        mask = call.attn_mask
        if mask is not None and not isinstance(mask, torch.Tensor):
            if not self._reported_block_mask:
                self._reported_block_mask = True
                logger.warning("memopt: %s passes a %s attention mask (backend %s), which chunked attention does not "
                               "cover: its kernel calls run unchunked", self.path or "attention", type(mask).__name__,
                               call.route)
            return proceed(call)
        if (
            (query_chunk is None and kv_chunk is None and head_chunks == 1)
            or call.extras.get("return_lse")
            or call.extras.get("_parallel_config") is not None
            or (call.dropout_p and kv_chunk is not None)
            or (mask is not None and mask.dtype not in (torch.bool, torch.float32, call.query.dtype))
        ):
            return proceed(call)
        self.chunked_calls += 1
        return chunked_attention(
            call.query,
            call.key,
            call.value,
            attn_mask=mask,
            scale=call.scale,
            query_chunk=query_chunk,
            kv_chunk=kv_chunk,
            head_chunks=head_chunks,
            dropout_p=call.dropout_p,
            is_causal=call.is_causal,
            enable_gqa=call.enable_gqa,
        )


def apply_chunked_attention(
    model: torch.nn.Module,
    query_chunk: int | None = 4096,
    head_chunks: int = 1,
    *,
    kv_chunk: int | None = None,
) -> ChunkedAttentionReport:
    """Compute the attention kernel call of every attention module of ``model`` in pieces (exact).

    Args:
        model: any diffusers model (or module tree) with attention modules (``Attention``, ``AttentionModuleMixin``
            subclasses, ``MochiAttention``) whose processors go through diffusers' attention dispatch or call
            ``F.scaled_dot_product_attention``.
        query_chunk: queries per piece (``None``: all); for linear attention (Sana), the tokens of each chunk of
            both sweeps, keys and values then queries.
        head_chunks: head groups run one after another.
        kv_chunk: keys/values per piece, merged by log-sum-exp in fp32 (``None``: all).

    Returns:
        A :class:`ChunkedAttentionReport` listing the hooked attention modules.

    Raises:
        ValueError: a chunk value that is not a positive int, or a model without attention modules.
        RuntimeError: the model already has memopt's chunked attention hooks (nothing is changed then).

    Undo with ``memopt.remove_memory_optimizations(model)``. Combines with :func:`apply_sequence_chunking` (in
    either order) and with diffusers' group offloading.

    Example::

        import torch
        from memopt import apply_chunked_attention, remove_memory_optimizations
        from memopt.models import get_family

        spec = get_family("flux")
        model = spec.build("tiny")
        inputs = spec.make_inputs(model.config, batch_size=2)
        with torch.no_grad():
            reference = model(**inputs)[0]
            print(apply_chunked_attention(model, query_chunk=16, kv_chunk=24, head_chunks=2))
            chunked = model(**inputs)[0]
        print(((chunked - reference).norm() / reference.norm()).item())   # ~1e-7
        remove_memory_optimizations(model)
    """
    config = ChunkedAttentionConfig(query_chunk=query_chunk, kv_chunk=kv_chunk, head_chunks=head_chunks)
    report = ChunkedAttentionReport(type(model).__name__, config)
    modules = [(path, module) for path, module in model.named_modules() if isinstance(module, _ATTENTION_CLASSES)]
    if not modules:
        raise ValueError(f"{type(model).__name__} has no diffusers attention modules to chunk")
    refuse_if_hooked(modules, CHUNKED_ATTENTION_HOOK, "chunked attention")
    for path, module in modules:
        register_memopt_hook(module, ChunkedAttentionHook(config, path), CHUNKED_ATTENTION_HOOK)
        report.attention.append(path)
    return report
