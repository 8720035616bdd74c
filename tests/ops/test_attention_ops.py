"""Chunked attention equals SDPA: masks, causal, GQA, head/query/K-V chunks, empty rows, gradients, fake tensors."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from memopt.ops import attention_with_lse, chunked_attention, merge_attention_partials
from memopt.ops.attention import _math_attend

B, S_Q, S_K, H, D = 2, 37, 53, 4, 16
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float64: 1e-10}


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def make_qkv(dtype=torch.float32, seq_q=S_Q, seq_k=S_K, heads=H, kv_heads=H, seed=0, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, seq_q, heads, D, generator=gen).to(dtype)
    k = torch.randn(B, seq_k, kv_heads, D, generator=gen).to(dtype)
    v = torch.randn(B, seq_k, kv_heads, D, generator=gen).to(dtype)
    return tuple(t.requires_grad_(requires_grad) for t in (q, k, v))


def make_mask(kind: str, seq_q=S_Q, seq_k=S_K, heads=H, seed=1) -> torch.Tensor | None:
    gen = torch.Generator().manual_seed(seed)
    if kind == "none":
        return None
    if kind == "key_padding_bool":  # (B, 1, 1, S_k), batch 1 pads its last 20 keys
        mask = torch.ones(B, 1, 1, seq_k, dtype=torch.bool)
        mask[1, ..., -20:] = False
        return mask
    if kind == "key_padding_2d":  # (B, S_k): diffusers' native backend reads it as key padding
        mask = torch.ones(B, seq_k, dtype=torch.bool)
        mask[0, :7] = False
        return mask
    if kind == "full_bool":  # (B, 1, S_q, S_k)
        return torch.rand(B, 1, seq_q, seq_k, generator=gen) > 0.3
    if kind == "additive":  # (B, 1, S_q, S_k) float with -inf holes
        mask = torch.randn(B, 1, seq_q, seq_k, generator=gen)
        return mask.masked_fill(torch.rand(mask.shape, generator=gen) > 0.8, float("-inf"))
    if kind == "per_head_additive":  # (B, H, S_q, S_k)
        return torch.randn(B, heads, seq_q, seq_k, generator=gen)
    raise AssertionError(kind)


def reference(q, k, v, mask=None, is_causal=False, enable_gqa=False, scale=None):
    """SDPA on permuted tensors; masks combined explicitly (SDPA's math backend refuses mask + causal)."""
    if mask is not None and mask.ndim == 2:
        mask = mask[:, None, None, :]
    if is_causal:
        causal = torch.ones(q.shape[1], k.shape[1], dtype=torch.bool).tril()
        if mask is None:
            mask = causal
        elif mask.dtype == torch.bool:
            mask = mask & causal
        else:
            mask = mask.masked_fill(~causal, float("-inf"))
    out = F.scaled_dot_product_attention(
        *(t.transpose(1, 2) for t in (q, k, v)), attn_mask=mask, scale=scale, enable_gqa=enable_gqa
    )
    return out.transpose(1, 2)


def reference_lse(q, k, mask=None, scale=None):
    """log-sum-exp of the masked scores, (B, S_q, H), in float64."""
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.double()
    return torch.logsumexp(scores, dim=-1).transpose(1, 2)


CHUNKINGS = [
    dict(query_chunk=8),
    dict(kv_chunk=10),
    dict(kv_chunk=S_K),
    dict(head_chunks=3),
    dict(query_chunk=16, kv_chunk=7, head_chunks=2),
    dict(query_chunk=S_Q, kv_chunk=32, head_chunks=H),
]
MASKS = ["none", "key_padding_bool", "key_padding_2d", "full_bool", "additive", "per_head_additive"]


@pytest.mark.parametrize("chunking", CHUNKINGS, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_matches_sdpa_fp32(chunking, mask_kind, is_causal):
    q, k, v = make_qkv()
    mask = make_mask(mask_kind)
    out = chunked_attention(q, k, v, attn_mask=mask, is_causal=is_causal, **chunking)
    expected = reference(q, k, v, mask, is_causal)
    assert out.shape == expected.shape and out.dtype == q.dtype
    assert rel_err(out, expected) <= TOL[torch.float32]


@pytest.mark.parametrize("chunking", CHUNKINGS[1:], ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
@pytest.mark.parametrize("mask_kind", ["none", "full_bool", "additive"])
def test_matches_sdpa_bf16(chunking, mask_kind):
    q, k, v = make_qkv(torch.bfloat16)
    mask = make_mask(mask_kind)
    out = chunked_attention(q, k, v, attn_mask=mask, scale=0.2, **chunking)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, reference(q, k, v, mask, scale=0.2)) <= TOL[torch.bfloat16]


@pytest.mark.parametrize("head_chunks", [1, 2, 3, 6], ids=lambda n: f"heads{n}")  # 3 and 6 cut through K/V groups
@pytest.mark.parametrize("kv_chunk", [None, 11])
@pytest.mark.parametrize("mask_kind", ["none", "full_bool", "per_head_additive"])
def test_grouped_query_attention(head_chunks, kv_chunk, mask_kind):
    q, k, v = make_qkv(heads=6, kv_heads=2)
    mask = make_mask(mask_kind, heads=6)
    for is_causal in (False, True):
        out = chunked_attention(
            q, k, v, attn_mask=mask, query_chunk=9, kv_chunk=kv_chunk, head_chunks=head_chunks,
            is_causal=is_causal, enable_gqa=True,
        )
        assert rel_err(out, reference(q, k, v, mask, is_causal, enable_gqa=True)) <= TOL[torch.float32]


def test_causal_with_more_queries_than_keys():
    q, k, v = make_qkv(seq_q=S_K, seq_k=S_Q)
    for chunking in (dict(query_chunk=8), dict(kv_chunk=10), dict(query_chunk=16, kv_chunk=7, head_chunks=2)):
        out = chunked_attention(q, k, v, is_causal=True, **chunking)
        assert rel_err(out, reference(q, k, v, is_causal=True)) <= TOL[torch.float32]


def test_fully_masked_rows_give_zero_like_sdpa():
    """torch 2.13 SDPA returns 0 (not NaN) for a query row whose keys are all masked; so do we."""
    q, k, v = make_qkv()
    bool_mask = torch.rand(B, 1, S_Q, S_K, generator=torch.Generator().manual_seed(2)) > 0.5
    bool_mask[0, :, 3] = False  # empty rows
    bool_mask[1, :, 20:25] = False
    bool_mask[0, :, 6, :10] = False  # empty in the first K/V chunks only
    additive = torch.zeros(B, 1, S_Q, S_K).masked_fill(~bool_mask, float("-inf"))
    padding = torch.ones(B, 1, 1, S_K, dtype=torch.bool)
    padding[1] = False  # every row of batch 1 is empty
    for mask in (bool_mask, additive, padding):
        expected = reference(q, k, v, mask)
        empty = reference_lse(q, k, mask).isneginf()  # (B, S_q, H)
        assert empty.any() and expected[empty].abs().max() == 0
        for chunking in CHUNKINGS:
            out = chunked_attention(q, k, v, attn_mask=mask, **chunking)
            assert not out.isnan().any()
            assert rel_err(out, expected) <= TOL[torch.float32]
            assert out[empty].abs().max() == 0
        out, lse = attention_with_lse(q, k, v, attn_mask=mask)
        assert torch.equal(lse.isneginf(), empty) and out[empty].abs().max() == 0


@pytest.mark.parametrize("mask_kind", ["none", "full_bool", "additive"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_with_lse(mask_kind, dtype):
    q, k, v = make_qkv(dtype)
    mask = make_mask(mask_kind)
    out, lse = attention_with_lse(q, k, v, attn_mask=mask)
    assert out.shape == (B, S_Q, H, D) and lse.shape == (B, S_Q, H) and lse.dtype == torch.float32
    assert rel_err(out, reference(q, k, v, mask)) <= TOL[dtype]
    assert rel_err(lse, reference_lse(q, k, mask)) <= TOL[dtype]


def test_attention_with_lse_causal_and_gqa():
    q, k, v = make_qkv(heads=6, kv_heads=3)
    out, lse = attention_with_lse(q, k, v, is_causal=True, enable_gqa=True)
    assert rel_err(out, reference(q, k, v, is_causal=True, enable_gqa=True)) <= TOL[torch.float32]
    causal = torch.ones(S_Q, S_K, dtype=torch.bool).tril()
    assert rel_err(lse, reference_lse(q, k.repeat_interleave(2, dim=2), causal)) <= TOL[torch.float32]


@pytest.mark.parametrize("mask_kind", ["none", "full_bool", "additive"])
def test_math_fallback_matches_sdpa(mask_kind):
    """The explicit-scores path (used where no fused kernel applies) is exact too, empty rows included."""
    q, k, v = make_qkv()
    mask = make_mask(mask_kind)
    if mask is not None:
        mask = mask.clone()
        mask[0, :, 5] = False if mask.dtype == torch.bool else float("-inf")
    for is_causal in (False, True) if mask is None else (False,):
        out, lse = _math_attend(*(t.transpose(1, 2) for t in (q, k, v)), mask, None, is_causal)
        causal = torch.ones(S_Q, S_K, dtype=torch.bool).tril() if is_causal else mask
        assert rel_err(out.transpose(1, 2), reference(q, k, v, mask, is_causal)) <= TOL[torch.float32]
        assert torch.equal(lse.isneginf(), reference_lse(q, k, causal).transpose(1, 2).isneginf())


def test_merge_attention_partials_is_exact_and_differentiable():
    q, k, v = make_qkv(torch.float64, requires_grad=True)
    mask = make_mask("full_bool")
    mask[:, :, 4, :30] = False  # row 4 is empty in the first two pieces only
    splits = [(0, 13), (13, 30), (30, S_K)]
    partials = [attention_with_lse(q, k[:, a:b], v[:, a:b], attn_mask=mask[..., a:b]) for a, b in splits]
    out, lse = merge_attention_partials(partials)
    assert out.dtype == torch.float64
    assert rel_err(out, reference(q, k, v, mask)) <= TOL[torch.float64]
    assert rel_err(lse, reference_lse(q, k, mask)) <= TOL[torch.float64]

    grads = torch.autograd.grad((out * out).sum() + lse.sum(), (q, k, v))
    q2, k2, v2 = (t.detach().requires_grad_() for t in (q, k, v))
    expected = reference(q2, k2, v2, mask)
    expected_lse = reference_lse(q2, k2, mask)
    expected_grads = torch.autograd.grad((expected * expected).sum() + expected_lse.sum(), (q2, k2, v2))
    for grad, expected_grad in zip(grads, expected_grads):
        assert rel_err(grad, expected_grad) <= 1e-9


def test_merge_attention_partials_rejects_bad_input():
    with pytest.raises(ValueError, match="at least one"):
        merge_attention_partials([])
    out, lse = torch.zeros(1, 3, 2, 4), torch.zeros(1, 3, 2)
    with pytest.raises(ValueError, match="partial 1"):
        merge_attention_partials([(out, lse), (out[:, :2], lse[:, :2])])


GRAD_CASES = {
    "query_head_chunks_sdpa": dict(query_chunk=10, head_chunks=3),
    "kv_chunks": dict(kv_chunk=10),
    "all_chunks": dict(query_chunk=16, kv_chunk=7, head_chunks=2),
}


@pytest.mark.parametrize("chunking", GRAD_CASES.values(), ids=GRAD_CASES.keys())
@pytest.mark.parametrize("mask_kind", ["none", "full_bool", "additive"])
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_gradients_match_sdpa(chunking, mask_kind, is_causal):
    q, k, v = make_qkv(requires_grad=True)
    mask = make_mask(mask_kind)
    if mask is not None:
        mask[1, :, 2] = False if mask.dtype == torch.bool else float("-inf")  # an empty row
    grad_out = torch.randn(B, S_Q, H, D, generator=torch.Generator().manual_seed(3))
    out = chunked_attention(q, k, v, attn_mask=mask, is_causal=is_causal, **chunking)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    expected = reference(q, k, v, mask, is_causal)
    expected_grads = torch.autograd.grad(expected, (q, k, v), grad_out)
    for grad, expected_grad in zip(grads, expected_grads):
        assert not grad.isnan().any()
        assert rel_err(grad, expected_grad) <= TOL[torch.float32]


def test_gradients_gqa_kv_chunks():
    q, k, v = make_qkv(heads=6, kv_heads=2, requires_grad=True)
    mask = make_mask("per_head_additive", heads=6)
    for head_chunks in (2, 4):
        out = chunked_attention(q, k, v, attn_mask=mask, kv_chunk=12, head_chunks=head_chunks, enable_gqa=True)
        grads = torch.autograd.grad(out.square().sum(), (q, k, v))
        expected = reference(q, k, v, mask, enable_gqa=True)
        expected_grads = torch.autograd.grad(expected.square().sum(), (q, k, v))
        for grad, expected_grad in zip(grads, expected_grads):
            assert rel_err(grad, expected_grad) <= TOL[torch.float32]


def test_gradcheck_kv_chunked_path():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, n, 2, 4, generator=gen, dtype=torch.float64, requires_grad=True) for n in (5, 7, 7))
    mask = torch.randn(1, 2, 5, 7, generator=gen, dtype=torch.float64)

    def fn(q, k, v):
        return chunked_attention(q, k, v, attn_mask=mask, kv_chunk=3, query_chunk=2, is_causal=True)

    assert torch.autograd.gradcheck(fn, (q, k, v))
    assert torch.autograd.gradcheck(lambda q, k, v: attention_with_lse(q, k, v, attn_mask=mask), (q, k, v))


def test_dropout_runs_without_kv_chunks():
    q, k, v = make_qkv()
    torch.manual_seed(0)
    out = chunked_attention(q, k, v, query_chunk=10, dropout_p=0.5)
    assert out.shape == q.shape and not torch.allclose(out, reference(q, k, v))
    with pytest.raises(ValueError, match="dropout_p=0.5"):
        chunked_attention(q, k, v, kv_chunk=10, dropout_p=0.5)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(query_chunk=0), ValueError, "query_chunk must be positive, got 0"),
        (dict(query_chunk=-3), ValueError, "query_chunk must be positive, got -3"),
        (dict(query_chunk=S_Q + 1), ValueError, f"query_chunk={S_Q + 1} is larger than the query sequence length"),
        (dict(kv_chunk=S_K + 5), ValueError, f"kv_chunk={S_K + 5} is larger than the key/value sequence length"),
        (dict(kv_chunk=0), ValueError, "kv_chunk must be positive"),
        (dict(head_chunks=H + 1), ValueError, f"head_chunks={H + 1} is larger than the number of query heads"),
        (dict(head_chunks=0), ValueError, "head_chunks must be positive"),
        (dict(query_chunk=2.5), TypeError, "query_chunk must be an int"),
        (dict(kv_chunk=True), TypeError, "kv_chunk must be an int"),
        (dict(attn_mask=torch.ones(B, 1, 5, S_K, dtype=torch.bool)), ValueError, "does not broadcast"),
        (dict(attn_mask=torch.ones(B, 1, 1, S_K, dtype=torch.int64)), TypeError, "attn_mask must be bool"),
    ],
)
def test_bad_arguments(kwargs, error, message):
    q, k, v = make_qkv()
    with pytest.raises(error, match=message):
        chunked_attention(q, k, v, **kwargs)


def test_head_mismatch_needs_enable_gqa():
    q, k, v = make_qkv(heads=6, kv_heads=2)
    with pytest.raises(ValueError, match="enable_gqa=True"):
        chunked_attention(q, k, v)
    q, k, v = make_qkv(heads=5, kv_heads=2)
    with pytest.raises(ValueError, match="divisible"):
        chunked_attention(q, k, v, enable_gqa=True)


def test_fake_tensor_mode():
    """Full-size simulations run the same code on fake tensors: no data-dependent control flow."""
    with FakeTensorMode():
        q, k, v = (torch.empty(B, 4096, 8, 64, dtype=torch.bfloat16) for _ in range(3))
        mask = torch.empty(B, 1, 1, 4096, dtype=torch.bool)
        out = chunked_attention(q, k, v, attn_mask=mask, query_chunk=1000, kv_chunk=1500, head_chunks=3)
        assert out.shape == q.shape and out.dtype == torch.bfloat16
        out = chunked_attention(q, k[:, :, :2], v[:, :, :2], query_chunk=999, kv_chunk=777, head_chunks=3,
                                is_causal=True, enable_gqa=True)
        assert out.shape == q.shape
        q.requires_grad_()
        out, lse = attention_with_lse(q, k, v, attn_mask=mask)
        (out.float().sum() + lse.sum()).backward()
        assert q.grad.shape == q.shape and lse.shape == (B, 4096, 8)


class _LargestIntermediate(TorchDispatchMode):
    """Records the largest tensor any aten op produces (excluding views of existing storage)."""

    def __init__(self):
        super().__init__()
        self.largest = (0, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        inputs = {t.untyped_storage().data_ptr() for t in tensors}
        for tensor in tree_flatten(result)[0]:
            if isinstance(tensor, torch.Tensor) and tensor.untyped_storage().data_ptr() not in inputs:
                size = tensor.untyped_storage().nbytes()
                if size > self.largest[0]:
                    self.largest = (size, str(func))
        return result


@pytest.mark.parametrize("mask_kind", ["full_bool", "additive", "none_causal"])
def test_kv_chunks_keep_intermediates_chunk_sized(mask_kind):
    """Forward and backward with kv_chunk never build an S_q x S_k tensor (the mask itself is an input)."""
    seq, heads, query_chunk, kv_chunk = 128, 2, 32, 32
    q, k, v = (torch.randn(1, seq, heads, 8, requires_grad=True) for _ in range(3))
    mask = None if mask_kind == "none_causal" else make_mask(mask_kind, seq_q=seq, seq_k=seq, heads=heads)[:1]
    scores_bytes = heads * seq * seq * 4
    recorder = _LargestIntermediate()
    with recorder:
        out = chunked_attention(q, k, v, attn_mask=mask, query_chunk=query_chunk, kv_chunk=kv_chunk,
                                is_causal=mask is None)
        out.sum().backward()
    largest, op = recorder.largest
    chunk_scores = heads * query_chunk * kv_chunk * 4
    assert largest <= max(chunk_scores, q.numel() * 4), (largest, op)
    assert largest * 8 <= scores_bytes


def test_causal_without_chunks_builds_no_mask():
    """is_causal on an unchunked block goes to the kernel as is_causal: no S x S bool mask."""
    seq = 512
    q, k, v = (torch.randn(1, seq, 2, 8) for _ in range(3))
    recorder = _LargestIntermediate()
    with recorder:
        chunked_attention(q, k, v, is_causal=True, head_chunks=2)
        attention_with_lse(q, k, v, is_causal=True)
    assert recorder.largest[0] < seq * seq


def test_traced_peak_is_chunk_sized():
    """memopt's tracer: a full bool mask makes SDPA build an S x S additive mask; K/V chunks do not."""
    from memopt import trace_memory

    seq, heads, head_dim, query_chunk, kv_chunk = 512, 2, 16, 128, 64
    q, k, v = (torch.randn(1, seq, heads, head_dim) for _ in range(3))
    mask = torch.rand(1, 1, seq, seq) > 0.2
    with torch.no_grad():
        plain = trace_memory(chunked_attention, q, k, v, attn_mask=mask)
        chunked = trace_memory(chunked_attention, q, k, v, attn_mask=mask, query_chunk=query_chunk, kv_chunk=kv_chunk)
    output_bytes = q.numel() * 4
    chunk_out_bytes = heads * query_chunk * head_dim * 4  # fp32 accumulator, a kernel output, ...
    chunk_mask_bytes = query_chunk * kv_chunk * 4  # additive copy of one bool mask chunk
    assert plain.peak_bytes >= seq * seq * 4  # SDPA's additive copy of the whole mask
    assert chunked.peak_bytes <= output_bytes + 3 * chunk_out_bytes + 2 * chunk_mask_bytes
    assert chunked.peak_bytes * 5 < plain.peak_bytes


def test_chunk_grid_combinations_small():
    """Every combination of small chunk sizes on a tiny problem (catches off-by-one range bugs)."""
    q, k, v = make_qkv(seq_q=7, seq_k=5)
    mask = make_mask("full_bool", seq_q=7, seq_k=5)
    for query_chunk, kv_chunk, head_chunks in itertools.product((1, 3, 6, 7), (1, 2, 4, 5), (1, 4)):
        out = chunked_attention(q, k, v, attn_mask=mask, query_chunk=query_chunk, kv_chunk=kv_chunk,
                                head_chunks=head_chunks, is_causal=True)
        assert rel_err(out, reference(q, k, v, mask, is_causal=True)) <= TOL[torch.float32]


def test_non_contiguous_inputs():
    """(B, H, S, D)-contiguous tensors viewed as (B, S, H, D), as some processors produce them."""
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in make_qkv())
    assert not q.is_contiguous()
    mask = make_mask("full_bool")
    out = chunked_attention(q, k, v, attn_mask=mask, query_chunk=10, kv_chunk=9, head_chunks=2)
    assert rel_err(out, reference(q, k, v, mask)) <= TOL[torch.float32]


def test_mask_requiring_grad_is_refused_on_kv_path():
    q, k, v = make_qkv()
    mask = make_mask("additive").requires_grad_()
    with pytest.raises(ValueError, match="attn_mask requires grad"):
        chunked_attention(q, k, v, attn_mask=mask, kv_chunk=10)
    out = chunked_attention(q, k, v, attn_mask=mask, query_chunk=10)  # plain SDPA blocks differentiate it
    (grad,) = torch.autograd.grad(out.sum(), mask)
    (expected,) = torch.autograd.grad(reference(q, k, v, mask).sum(), mask)
    assert rel_err(grad, expected) <= TOL[torch.float32]
