"""Exact chunked attention on plain tensors, in diffusers' attention-dispatch layout ``(B, S, H, D)``.

Why this exists: sequence-parallel and head-parallel attention split the work across GPUs; on one GPU
the same splits run one after another and only one piece's workspace is alive at a time.

* **Query chunks** and **head chunks** are independent problems: each block is one plain
  ``F.scaled_dot_product_attention`` call and the results are written into one preallocated output.
  Exact, differentiable through PyTorch's own SDPA backward, dropout supported.
* **Key/value chunks** need the log-sum-exp (LSE) of every partial softmax. Each chunk runs a fused
  kernel that returns its LSE (``_scaled_dot_product_flash_attention_for_cpu`` on CPU; flash or
  memory-efficient attention on CUDA), and partial outputs are merged exactly in fp32 with
  ``out = sum_i exp(lse_i - lse) * out_i`` (the ring-attention / PyTorch ``_SDPAMerger`` math).
  A math fallback (chunk-sized ``S_q x S_kv`` scores only) covers what the fused kernels do not.
  The K/V path is an ``autograd.Function`` whose backward recomputes each chunk's probabilities from
  the merged output and LSE (the flash-attention backward, written with plain matmuls in fp32), so
  training keeps chunk-sized scores too and the gradient is exact.

Conventions matched to ``diffusers.models.attention_dispatch._native_attention`` / torch 2.13 SDPA:

* ``attn_mask``: bool (True = attend) or additive float (fp32 or the query dtype), broadcastable to
  ``(B, H, S_q, S_kv)``; a 2-D ``(B, S_kv)`` mask is read as a key-padding mask ``(B, 1, 1, S_kv)``
  exactly like the native backend does.
* ``is_causal`` is top-left aligned (query ``i`` sees keys ``j <= i``), as SDPA. Given together with a
  mask, both apply (the intersection), which is what SDPA's fused CPU kernel does.
* A query row with no visible key returns **0** (SDPA in torch 2.13 returns 0 for bool and ``-inf``
  masks alike); its LSE is ``-inf``. Rows masked only by a *finite* additive value (e.g.
  ``finfo.min``) are not "empty" for SDPA either: it averages V over them. Under K/V chunking such
  rows lose the per-chunk key counts to fp32 rounding and average per-chunk means instead; the
  result is garbage in both cases and only differs for those degenerate rows.
* ``enable_gqa``: K/V may have ``H_kv`` heads with ``H % H_kv == 0``; query head ``h`` uses K/V head
  ``h // (H // H_kv)``. The K/V path folds each group's query heads into the query sequence
  (``(B, H_kv, group * S_q, D)``) so fused kernels run without copying K/V per query head.

Accumulation dtype: fp32 for fp16/bf16/fp32 inputs, fp64 for fp64 inputs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["attention_with_lse", "chunked_attention", "merge_attention_partials"]

_CPU_FLASH_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
# PyTorch's SDPA front-end pads additive biases so every non-last stride is a multiple of this
# before calling the memory-efficient kernel (``preprocess_mask`` in aten attention.cpp).
_MEM_EFF_BIAS_ALIGNMENT = 8

Range = tuple[int, int]


# ----------------------------------------------------------------------------------------------
# Validation and normalisation
# ----------------------------------------------------------------------------------------------


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _check_qkv(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, enable_gqa: bool) -> int:
    """Validate ``(B, S, H, D)`` inputs and return the GQA group size (query heads per K/V head)."""
    for name, tensor in (("query", query), ("key", key), ("value", value)):
        if tensor.ndim != 4:
            raise ValueError(f"{name} must have shape (batch, seq, heads, head_dim), got {tuple(tensor.shape)}")
    if key.shape[:3] != value.shape[:3]:
        raise ValueError(f"key {tuple(key.shape)} and value {tuple(value.shape)} must agree in batch, seq and heads")
    if query.shape[0] != key.shape[0] or query.shape[3] != key.shape[3]:
        raise ValueError(
            f"query {tuple(query.shape)} and key {tuple(key.shape)} must agree in batch and head_dim"
        )
    num_heads, num_kv_heads = query.shape[2], key.shape[2]
    if num_heads == num_kv_heads:
        return 1
    if not enable_gqa:
        raise ValueError(
            f"query has {num_heads} heads but key/value have {num_kv_heads}; "
            "pass enable_gqa=True for grouped-query attention"
        )
    if num_heads % num_kv_heads != 0:
        raise ValueError(f"enable_gqa needs query heads ({num_heads}) divisible by key/value heads ({num_kv_heads})")
    return num_heads // num_kv_heads


def _check_chunk(name: str, value: int | None, limit: int, limit_name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int or None, got {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")
    if value > limit:
        raise ValueError(f"{name}={value} is larger than the {limit_name} ({limit})")
    return value


def _normalize_mask(
    attn_mask: torch.Tensor | None, query: torch.Tensor, key: torch.Tensor
) -> torch.Tensor | None:
    """Return the mask as a 4-D view broadcastable to ``(B, H, S_q, S_kv)``, or None."""
    if attn_mask is None:
        return None
    if attn_mask.dtype not in (torch.bool, torch.float32, query.dtype):
        raise TypeError(
            f"attn_mask must be bool, float32 or the query dtype ({query.dtype}), got {attn_mask.dtype}"
        )
    batch, seq_q, num_heads, _ = query.shape
    seq_kv = key.shape[1]
    # diffusers' native backend turns a (B, S_kv) mask into a key-padding mask; SDPA itself would
    # read a 2-D mask as (S_q, S_kv). Match the backend we stand in for.
    if attn_mask.ndim == 2 and attn_mask.shape[0] == batch and attn_mask.shape[1] == seq_kv:
        attn_mask = attn_mask[:, None, None, :]
    if not 2 <= attn_mask.ndim <= 4:
        raise ValueError(f"attn_mask must have 2 to 4 dims, got shape {tuple(attn_mask.shape)}")
    attn_mask = attn_mask.reshape((1,) * (4 - attn_mask.ndim) + tuple(attn_mask.shape))
    target = (batch, num_heads, seq_q, seq_kv)
    if any(size not in (1, full) for size, full in zip(attn_mask.shape, target)):
        raise ValueError(
            f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to (B, H, S_q, S_kv)={target}"
        )
    return attn_mask


def _narrow(mask: torch.Tensor | None, dim: int, start: int, end: int) -> torch.Tensor | None:
    """Slice a 4-D mask along ``dim`` unless that dim is broadcast (size 1)."""
    if mask is None or mask.shape[dim] == 1:
        return mask
    return mask.narrow(dim, start, end - start)


def _ranges(total: int, chunk: int | None) -> list[Range]:
    if chunk is None:
        return [(0, total)]
    return [(start, min(start + chunk, total)) for start in range(0, total, chunk)]


def _head_ranges(num_heads: int, num_kv_heads: int, head_chunks: int) -> list[Range]:
    """Split query heads into ``head_chunks`` near-equal groups, on K/V-group boundaries when possible."""
    group = num_heads // num_kv_heads
    units, per_unit = (num_kv_heads, group) if head_chunks <= num_kv_heads else (num_heads, 1)
    bounds = [index * units // head_chunks * per_unit for index in range(head_chunks + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def _select_kv_heads(
    key: torch.Tensor, value: torch.Tensor, head_start: int, head_end: int, group: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """K/V heads serving query heads ``[head_start, head_end)`` and the group size between them.

    Aligned ranges are views; a range that cuts through a K/V group gets its K/V heads copied
    (one per query head), which is the only case that costs K/V memory.
    """
    if group == 1:
        return key[:, :, head_start:head_end], value[:, :, head_start:head_end], 1
    if head_start % group == 0 and head_end % group == 0:
        kv_slice = slice(head_start // group, head_end // group)
        return key[:, :, kv_slice], value[:, :, kv_slice], group
    index = torch.arange(head_start, head_end, device=key.device) // group
    return key.index_select(2, index), value.index_select(2, index), 1


# ----------------------------------------------------------------------------------------------
# Masks for one (query block, key chunk)
# ----------------------------------------------------------------------------------------------


def _block_mask(
    mask: torch.Tensor | None,
    is_causal: bool,
    query_range: Range,
    key_range: Range,
    allow_kernel_causal: bool,
    device: torch.device,
) -> tuple[bool, torch.Tensor | None, bool]:
    """Mask for queries ``query_range`` (global positions) against keys ``key_range``.

    ``mask`` is already restricted to the block's query rows and heads. Returns
    ``(skip, block_mask, kernel_is_causal)``: ``skip`` when causality hides every key of the chunk;
    ``kernel_is_causal`` when the chunk is a top-left causal square the kernel can mask itself.
    Only chunk-sized masks are built.
    """
    key_start, key_end = key_range
    query_start, query_end = query_range
    block = _narrow(mask, 3, key_start, key_end)
    if not is_causal or key_end - 1 <= query_start:
        return False, block, False
    if key_start > query_end - 1:
        return True, None, False
    if allow_kernel_causal and block is None and key_start == query_start:
        return False, None, True
    rows = torch.arange(query_start, query_end, device=device)[:, None]
    cols = torch.arange(key_start, key_end, device=device)[None, :]
    causal = cols <= rows
    if block is None:
        return False, causal[None, None], False
    if block.dtype == torch.bool:
        return False, block & causal, False
    return False, torch.where(causal, block, float("-inf")), False


def _fold_mask(mask: torch.Tensor | None, group: int, seq_q: int) -> torch.Tensor | None:
    """Reshape a ``(B', H'|1, S_q|1, S_kv)`` mask to the folded GQA query layout."""
    if mask is None or group == 1:
        return mask
    batch, heads, rows, cols = mask.shape
    if heads == 1:
        if rows == 1:
            return mask
        return mask.unsqueeze(2).expand(batch, 1, group, rows, cols).reshape(batch, 1, group * rows, cols)
    return mask.expand(batch, heads, seq_q, cols).reshape(batch, heads // group, group * seq_q, cols)


def _fold_heads(tensor: torch.Tensor, group: int) -> torch.Tensor:
    """``(B, H, S, D)`` -> ``(B, H // group, group * S, D)``: a GQA group's queries become one sequence."""
    if group == 1:
        return tensor
    batch, heads, seq, dim = tensor.shape
    return tensor.reshape(batch, heads // group, group * seq, dim)


def _unfold_heads(tensor: torch.Tensor, group: int) -> torch.Tensor:
    """Inverse of :func:`_fold_heads`; also accepts LSE-shaped ``(B, H_kv, group * S)`` tensors."""
    if group == 1:
        return tensor
    batch, kv_heads, rows = tensor.shape[:3]
    return tensor.reshape(batch, kv_heads * group, rows // group, *tensor.shape[3:])


def _rows_with_keys(mask: torch.Tensor) -> torch.Tensor:
    """Bool ``(B', H', S_q')``: which query rows see at least one key under ``mask``."""
    if mask.dtype == torch.bool:
        return mask.any(-1)
    return (mask != float("-inf")).any(-1)


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bool mask -> additive bias in ``dtype`` (what SDPA's ``convert_boolean_attn_mask`` does)."""
    if mask.dtype != torch.bool:
        return mask
    zero = torch.zeros((), dtype=dtype, device=mask.device)
    return torch.where(mask, zero, torch.full((), float("-inf"), dtype=dtype, device=mask.device))


# ----------------------------------------------------------------------------------------------
# One chunk: fused kernel (with LSE) or math fallback. Layout (B, H, S, D), no GQA.
# ----------------------------------------------------------------------------------------------


def _math_attend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float | None,
    is_causal: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention with explicit ``S_q x S_kv`` scores in the accumulation dtype."""
    acc = _accumulation_dtype(query.dtype)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    scores = torch.matmul(query.to(acc), key.to(acc).transpose(-1, -2)).mul_(scale)
    if is_causal:
        mask = torch.ones(query.shape[-2], key.shape[-2], dtype=torch.bool, device=query.device).tril()
    if mask is not None:
        if mask.dtype == torch.bool:
            scores.masked_fill_(~mask, float("-inf"))
        else:
            scores.add_(mask.to(acc))
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, 0.0)
    probs = scores.sub_(row_max).exp_()
    row_sum = probs.sum(dim=-1, keepdim=True)
    nonempty = row_sum > 0
    safe_sum = torch.where(nonempty, row_sum, 1.0)
    out = torch.matmul(probs, value.to(acc)).div_(safe_sum)
    lse = torch.where(nonempty, row_max + torch.log(safe_sum), float("-inf")).squeeze(-1)
    return out.to(query.dtype), lse


def _cuda_attend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float | None,
    is_causal: bool,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Flash (no mask) or memory-efficient (additive bias) kernel with LSE; None if neither applies."""
    bias = None if mask is None else _additive(mask, query.dtype)
    if bias is not None and bias.dtype != query.dtype:
        bias = bias.to(query.dtype)
    params = torch.backends.cuda.SDPAParams(query, key, value, bias, 0.0, is_causal, False)
    head_dim = query.shape[-1]
    same_head_dims = value.shape[-1] == head_dim and head_dim % 8 == 0
    if bias is None and same_head_dims and torch.backends.cuda.can_use_flash_attention(params):
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(
            query, key, value, 0.0, is_causal, False, scale=scale
        )[:2]
        return out, lse
    if torch.backends.cuda.can_use_efficient_attention(params):
        if bias is not None:
            if any(stride % _MEM_EFF_BIAS_ALIGNMENT for stride in bias.stride()[:-1]):
                pad = -bias.shape[-1] % _MEM_EFF_BIAS_ALIGNMENT or _MEM_EFF_BIAS_ALIGNMENT
                bias = F.pad(bias, (0, pad))[..., : bias.shape[-1]]
            bias = bias.expand(query.shape[0], query.shape[1], query.shape[2], key.shape[2])
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
            query, key, value, bias, True, 0.0, is_causal, scale=scale
        )[:2]
        return out, lse[..., : query.shape[2]]  # the kernel pads the LSE to a multiple of 32 rows
    return None


def _attend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float | None,
    is_causal: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over one chunk returning ``(out (B,H,S_q,Dv), lse (B,H,S_q))``, fused when possible.

    Rows with no visible key come back as out 0 / lse ``-inf`` regardless of the kernel used, so
    the merge never gives them weight.
    """
    result = None
    if query.device.type == "cpu" and query.dtype in _CPU_FLASH_DTYPES and value.shape[-1] == query.shape[-1]:
        bias = None if mask is None else _additive(mask, query.dtype)
        result = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, 0.0, is_causal, attn_mask=bias, scale=scale
        )
    elif query.device.type == "cuda":
        result = _cuda_attend(query, key, value, mask, scale, is_causal)
    if result is None:
        return _math_attend(query, key, value, mask, scale, is_causal)
    out, lse = result
    lse = lse.to(_accumulation_dtype(query.dtype))
    if mask is not None:
        # Fused kernels report lse = 0 (CPU) for rows whose keys are all masked; pin them to -inf.
        # In place: this only runs inside _KVChunkedAttention.forward, on the kernel's fresh outputs.
        hidden = ~_rows_with_keys(mask)
        lse.masked_fill_(hidden, float("-inf"))
        out.masked_fill_(hidden[..., None], 0.0)
    return out, lse


# ----------------------------------------------------------------------------------------------
# LSE merge
# ----------------------------------------------------------------------------------------------


def _merge_step(
    acc_out: torch.Tensor, acc_lse: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, inplace: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge one partial ``(out, lse)`` into the running ``(acc_out, acc_lse)`` (accumulation dtype).

    ``out = (exp(acc_lse - m) * acc_out + exp(lse - m) * out) / total``, ``m`` the row max; rows that
    are empty in both stay at lse ``-inf`` with zero output. ``inplace`` reuses ``acc_out`` (forward
    loops without autograd); otherwise every op is out of place and differentiable.
    """
    row_max = torch.maximum(acc_lse, lse)
    row_max = torch.where(torch.isfinite(row_max), row_max, 0.0)
    weight_acc = torch.exp(acc_lse - row_max)
    weight_new = torch.exp(lse - row_max)
    total = weight_acc + weight_new
    nonempty = total > 0
    safe_total = torch.where(nonempty, total, 1.0)
    merged_lse = torch.where(nonempty, row_max + torch.log(safe_total), float("-inf"))
    weight_acc = (weight_acc / safe_total).unsqueeze(-1)
    weight_new = (weight_new / safe_total).unsqueeze(-1)
    if inplace:
        return acc_out.mul_(weight_acc).addcmul_(out, weight_new), merged_lse
    return acc_out * weight_acc + out.to(acc_out.dtype) * weight_new, merged_lse


def merge_attention_partials(
    partials: Sequence[tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exactly merge attention results computed over disjoint key/value sets.

    Args:
        partials: ``(out, lse)`` pairs as returned by :func:`attention_with_lse`: ``out`` of shape
            ``(B, S_q, H, D)``, ``lse`` of shape ``(B, S_q, H)``. Every pair must cover the same
            queries; together their keys must be the full key set.

    Returns:
        ``(out, lse)``: ``out`` in the first partial's dtype, ``lse`` in fp32 (fp64 for fp64 inputs).
        The merge runs in that accumulation dtype and is differentiable.

    Example:
        >>> import torch
        >>> from memopt.ops.attention import attention_with_lse, merge_attention_partials
        >>> q, k, v = (torch.randn(1, 8, 2, 16) for _ in range(3))
        >>> parts = [attention_with_lse(q, k[:, :5], v[:, :5]), attention_with_lse(q, k[:, 5:], v[:, 5:])]
        >>> out, lse = merge_attention_partials(parts)
        >>> ref = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)))
        >>> torch.allclose(out, ref.transpose(1, 2), atol=1e-6)
        True
    """
    if len(partials) == 0:
        raise ValueError("merge_attention_partials needs at least one (out, lse) pair")
    first_out, first_lse = partials[0]
    for index, (out, lse) in enumerate(partials):
        if out.shape != first_out.shape or lse.shape != out.shape[:-1]:
            raise ValueError(
                f"partial {index}: out {tuple(out.shape)} / lse {tuple(lse.shape)} do not match "
                f"out {tuple(first_out.shape)} / lse {tuple(first_out.shape[:-1])}"
            )
    acc = _accumulation_dtype(first_out.dtype)
    acc_out, acc_lse = first_out.to(acc), first_lse.to(acc)
    for out, lse in partials[1:]:
        acc_out, acc_lse = _merge_step(acc_out, acc_lse, out, lse.to(acc), inplace=False)
    return acc_out.to(first_out.dtype), acc_lse


# ----------------------------------------------------------------------------------------------
# K/V-chunked attention for one (head group, query block), with a recomputing backward
# ----------------------------------------------------------------------------------------------


class _KVChunkedAttention(torch.autograd.Function):
    """Attention of one query block over K/V chunks, merged by LSE; returns ``(out, lse)``.

    Inputs are ``(B, S, H, D)`` views; ``mask`` is restricted to the block's queries and heads.
    Backward recomputes each chunk's probabilities ``P = exp(S - lse)`` from the saved merged
    ``lse`` and uses ``dS = P * (dP - rowsum(dO * O) + dlse)``: scores stay chunk-sized.
    """

    @staticmethod
    def forward(
        ctx,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        mask: torch.Tensor | None,
        scale: float | None,
        is_causal: bool,
        query_start: int,
        kv_ranges: list[Range],
        group: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        seq_q = query.shape[1]
        query_range = (query_start, query_start + seq_q)
        folded_query = _fold_heads(query.transpose(1, 2), group)
        acc_out = acc_lse = None
        for key_start, key_end in kv_ranges:
            skip, block_mask, kernel_causal = _block_mask(
                mask, is_causal, query_range, (key_start, key_end), allow_kernel_causal=group == 1, device=query.device
            )
            if skip:
                continue
            out, lse = _attend(
                folded_query,
                key[:, key_start:key_end].transpose(1, 2),
                value[:, key_start:key_end].transpose(1, 2),
                _fold_mask(block_mask, group, seq_q),
                scale,
                kernel_causal,
            )
            if acc_out is None:
                acc_out, acc_lse = out, lse
                if len(kv_ranges) > 1:
                    acc_out = acc_out.to(_accumulation_dtype(query.dtype))
            else:
                acc_out, acc_lse = _merge_step(acc_out, acc_lse, out, lse, inplace=True)
        out = _unfold_heads(acc_out.to(query.dtype), group).transpose(1, 2)
        lse = _unfold_heads(acc_lse, group).transpose(1, 2)
        ctx.save_for_backward(query, key, value, mask, out, lse)
        ctx.scale, ctx.is_causal, ctx.query_start, ctx.kv_ranges, ctx.group = (
            scale,
            is_causal,
            query_start,
            kv_ranges,
            group,
        )
        return out, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor, grad_lse: torch.Tensor):
        query, key, value, mask, out, lse = ctx.saved_tensors
        group = ctx.group
        acc = _accumulation_dtype(query.dtype)
        seq_q = query.shape[1]
        scale = 1.0 / math.sqrt(query.shape[-1]) if ctx.scale is None else ctx.scale

        def fold(tensor: torch.Tensor) -> torch.Tensor:
            return _fold_heads(tensor.transpose(1, 2).to(acc), group)

        folded_query, folded_grad = fold(query), fold(grad_out)
        folded_lse = _fold_heads(lse.transpose(1, 2).unsqueeze(-1), group).squeeze(-1)
        folded_grad_lse = _fold_heads(grad_lse.transpose(1, 2).unsqueeze(-1).to(acc), group).squeeze(-1)
        delta = (folded_grad * fold(out)).sum(-1) - folded_grad_lse
        # exp(score - (+inf)) = 0 for rows that saw no key (their output is 0 and so is the gradient).
        lse_for_probs = torch.where(folded_lse == float("-inf"), float("inf"), folded_lse)

        grad_query = torch.zeros_like(folded_query)
        grad_key = torch.zeros(key.shape, dtype=acc, device=key.device)
        grad_value = torch.zeros(value.shape, dtype=acc, device=value.device)
        query_range = (ctx.query_start, ctx.query_start + seq_q)
        for key_start, key_end in ctx.kv_ranges:
            skip, block_mask, _ = _block_mask(
                mask, ctx.is_causal, query_range, (key_start, key_end), allow_kernel_causal=False, device=query.device
            )
            if skip:
                continue
            block_mask = _fold_mask(block_mask, group, seq_q)
            key_chunk = key[:, key_start:key_end].transpose(1, 2).to(acc)
            value_chunk = value[:, key_start:key_end].transpose(1, 2).to(acc)
            scores = torch.matmul(folded_query, key_chunk.transpose(-1, -2)).mul_(scale)
            if block_mask is not None:
                if block_mask.dtype == torch.bool:
                    scores.masked_fill_(~block_mask, float("-inf"))
                else:
                    scores.add_(block_mask.to(acc))
            probs = scores.sub_(lse_for_probs.unsqueeze(-1)).exp_()
            grad_value_chunk = torch.matmul(probs.transpose(-1, -2), folded_grad)
            grad_scores = torch.matmul(folded_grad, value_chunk.transpose(-1, -2))
            grad_scores = grad_scores.sub_(delta.unsqueeze(-1)).mul_(probs).mul_(scale)
            grad_query.add_(torch.matmul(grad_scores, key_chunk))
            grad_key[:, key_start:key_end] = torch.matmul(grad_scores.transpose(-1, -2), folded_query).transpose(1, 2)
            grad_value[:, key_start:key_end] = grad_value_chunk.transpose(1, 2)
        grad_query = _unfold_heads(grad_query, group).transpose(1, 2).to(query.dtype)
        return grad_query, grad_key.to(key.dtype), grad_value.to(value.dtype), None, None, None, None, None, None


def _check_mask_grad(mask: torch.Tensor | None) -> None:
    if mask is not None and mask.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            "attn_mask requires grad, but the K/V-chunked path does not differentiate the mask; "
            "use kv_chunk=None (plain SDPA per block) or detach the mask"
        )


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------


def attention_with_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
    is_causal: bool = False,
    enable_gqa: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention plus the log-sum-exp of each query row, for exact merging across K/V pieces.

    Args:
        q: ``(B, S_q, H, D)``. k, v: ``(B, S_kv, H_kv, D)`` / ``(B, S_kv, H_kv, D_v)``.
        attn_mask: bool or additive float mask broadcastable to ``(B, H, S_q, S_kv)`` (or a
            ``(B, S_kv)`` key-padding mask), as for ``chunked_attention``.
        scale: softmax scale; default ``1 / sqrt(D)``.
        is_causal: top-left causal mask (query ``i`` sees keys ``j <= i`` of *these* keys).
        enable_gqa: allow ``H_kv`` dividing ``H``.

    Returns:
        ``(out, lse)``: ``out`` ``(B, S_q, H, D_v)`` in the query dtype, ``lse`` ``(B, S_q, H)`` in fp32
        (fp64 for fp64 inputs); rows with no visible key give out 0 and lse ``-inf``.

    Uses ``_scaled_dot_product_flash_attention_for_cpu`` on CPU, flash / memory-efficient attention
    on CUDA when they apply, else explicit ``S_q x S_kv`` scores (so pass chunk-sized K/V).
    Differentiable in ``q``, ``k``, ``v`` (through ``out`` and ``lse``), with a recomputing backward.

    Example:
        >>> import torch
        >>> from memopt.ops.attention import attention_with_lse
        >>> q, k, v = (torch.randn(2, 7, 4, 16) for _ in range(3))
        >>> out, lse = attention_with_lse(q, k, v)
        >>> out.shape, lse.shape, lse.dtype
        (torch.Size([2, 7, 4, 16]), torch.Size([2, 7, 4]), torch.float32)
    """
    group = _check_qkv(q, k, v, enable_gqa)
    mask = _normalize_mask(attn_mask, q, k)
    _check_mask_grad(mask)
    return _KVChunkedAttention.apply(q, k, v, mask, scale, is_causal, 0, [(0, k.shape[1])], group)


def chunked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
    query_chunk: int | None = None,
    kv_chunk: int | None = None,
    head_chunks: int = 1,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """Exact attention computed in query, key/value and head pieces; drop-in for diffusers' native backend.

    Args:
        q: ``(B, S_q, H, D)`` (diffusers' dispatch layout). k, v: ``(B, S_kv, H_kv, D)`` /
            ``(B, S_kv, H_kv, D_v)``.
        attn_mask: bool (True = attend) or additive float (fp32 or the query dtype) mask broadcastable
            to ``(B, H, S_q, S_kv)``; a 2-D ``(B, S_kv)`` mask means key padding, as in diffusers'
            native backend. Only its chunk-sized slices are touched.
        scale: softmax scale; default ``1 / sqrt(D)``.
        query_chunk: queries per piece (None: all). Exact without any merge.
        kv_chunk: keys/values per piece (None: all). Pieces are merged by log-sum-exp in fp32.
        head_chunks: number of head groups run one after another (uneven split allowed; with GQA the
            split follows K/V-head groups while ``head_chunks <= H_kv``).
        dropout_p: attention dropout; only without ``kv_chunk`` (plain SDPA per block).
        is_causal: top-left causal mask like SDPA; combined with ``attn_mask`` if both are given.
            Fully hidden key chunks are skipped; only chunk-sized causal masks are built.
        enable_gqa: allow ``H_kv`` dividing ``H`` (query head ``h`` uses K/V head ``h // (H // H_kv)``).

    Returns:
        ``(B, S_q, H, D_v)`` in the query dtype, as ``_native_attention`` returns. Fully masked rows are
        0, like torch 2.13 SDPA.

    Raises:
        ValueError: a chunk value that is not positive or exceeds its dimension (named in the
            message), mismatched shapes, a mask that does not broadcast, dropout with ``kv_chunk``.

    Memory: the output is preallocated once; each block's workspace is bounded by
    ``query_chunk x kv_chunk`` (and ``H / head_chunks`` heads). Without ``kv_chunk`` each block is a
    plain SDPA call, whose backward is PyTorch's. With ``kv_chunk`` the backward recomputes per chunk.

    Example:
        >>> import torch
        >>> from memopt.ops.attention import chunked_attention
        >>> q, k, v = (torch.randn(2, 37, 4, 16) for _ in range(3))
        >>> out = chunked_attention(q, k, v, query_chunk=16, kv_chunk=10, head_chunks=3)
        >>> ref = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)))
        >>> torch.allclose(out, ref.transpose(1, 2), atol=1e-5)
        True
    """
    group = _check_qkv(q, k, v, enable_gqa)
    batch, seq_q, num_heads, _ = q.shape
    seq_kv, num_kv_heads = k.shape[1], k.shape[2]
    query_chunk = _check_chunk("query_chunk", query_chunk, seq_q, "query sequence length")
    kv_chunk = _check_chunk("kv_chunk", kv_chunk, seq_kv, "key/value sequence length")
    head_chunks = _check_chunk("head_chunks", head_chunks, num_heads, "number of query heads")
    if head_chunks is None:
        raise TypeError("head_chunks must be an int >= 1, got None")
    mask = _normalize_mask(attn_mask, q, k)
    if kv_chunk is not None:
        if dropout_p > 0.0:
            raise ValueError(f"dropout_p={dropout_p} is not supported with kv_chunk={kv_chunk}; use kv_chunk=None")
        _check_mask_grad(mask)

    query_ranges = _ranges(seq_q, query_chunk)
    kv_ranges = _ranges(seq_kv, kv_chunk)
    blocks = [
        (head_range, query_range)
        for head_range in _head_ranges(num_heads, num_kv_heads, head_chunks)
        for query_range in query_ranges
    ]

    def run_block(head_range: Range, query_range: Range) -> torch.Tensor:
        (head_start, head_end), (query_start, query_end) = head_range, query_range
        key, value, block_group = _select_kv_heads(k, v, head_start, head_end, group)
        block_mask = _narrow(_narrow(mask, 1, head_start, head_end), 2, query_start, query_end)
        query = q[:, query_start:query_end, head_start:head_end]
        if kv_chunk is not None:
            return _KVChunkedAttention.apply(
                query, key, value, block_mask, scale, is_causal, query_start, kv_ranges, block_group
            )[0]
        # Keys after the block's last query are invisible under a causal mask: do not touch them.
        visible_keys = min(seq_kv, query_end) if is_causal else seq_kv
        _, block_mask, kernel_causal = _block_mask(
            block_mask, is_causal, query_range, (0, visible_keys), allow_kernel_causal=True, device=q.device
        )
        out = F.scaled_dot_product_attention(
            query.transpose(1, 2),
            key[:, :visible_keys].transpose(1, 2),
            value[:, :visible_keys].transpose(1, 2),
            attn_mask=block_mask,
            dropout_p=dropout_p,
            is_causal=kernel_causal,
            scale=scale,
            enable_gqa=block_group > 1,
        )
        return out.transpose(1, 2)

    if len(blocks) == 1:
        return run_block(*blocks[0])
    output = q.new_empty(batch, seq_q, num_heads, v.shape[-1])
    for head_range, query_range in blocks:
        output[:, query_range[0] : query_range[1], head_range[0] : head_range[1]] = run_block(head_range, query_range)
    return output
