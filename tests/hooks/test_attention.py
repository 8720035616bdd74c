"""Chunked attention (memopt.hooks.attention) and the dispatch interception it shares with sequence chunking."""

from __future__ import annotations

import logging

import pytest
import torch
from diffusers.models.attention_dispatch import attention_backend

from memopt import apply_chunked_attention, apply_sequence_chunking, remove_memory_optimizations, trace_memory
from memopt.hooks import _attention_dispatch
from memopt.hooks._common import has_memopt_hooks
from memopt.hooks.attention import CHUNKED_ATTENTION_HOOK
from memopt.models import Size, get_family

from _tiny_cases import FAMILIES, SIZES, OffloadLike, prediction, rel_err, sana  # noqa: E402


def build(family: str, size: Size | None = None):
    spec = get_family(family)
    model = spec.build("tiny")
    size = size or SIZES[family]
    inputs = spec.make_inputs(model.config, batch_size=2, height=size.height, width=size.width,
                              num_frames=size.num_frames, masked=True)
    return spec, model, inputs


def chunk_counters(model: torch.nn.Module) -> tuple[int, int]:
    hooks = [
        module._diffusers_hook.get_hook(CHUNKED_ATTENTION_HOOK)
        for module in model.modules()
        if getattr(module, "_diffusers_hook", None) is not None
        and module._diffusers_hook.get_hook(CHUNKED_ATTENTION_HOOK) is not None
    ]
    return sum(h.calls for h in hooks), sum(h.chunked_calls for h in hooks)


# Calls too short to chunk by queries at the tiny size (head chunks still split them): Qwen-Image 2.1's processor calls
# the kernel once per prompt segment, and its two 4-token text segments (x 2 blocks) fit in one query piece; Krea 2's
# layerwise text-fusion block attends across the 3 tapped layers of each text token.
UNCHUNKED_CALLS = {"qwenimage21": 4, "krea2": 1, "latte": 1,  # Latte: its temporal block attends over 3 frames
                   "bria_fibo2": 2}  # FIBO 2: the Perceiver's two attentions over 4 gist queries


@pytest.mark.parametrize("family", FAMILIES)
def test_matches_unmodified_model(family):
    _, model, inputs = build(family)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    users_before = _attention_dispatch._installed_users
    with torch.no_grad():
        reference = prediction(model(**inputs))
        for options in ({"query_chunk": 7}, {"query_chunk": 5, "kv_chunk": 6, "head_chunks": 2}):
            report = apply_chunked_attention(model, **options)
            assert report.attention
            out = prediction(model(**inputs))
            calls, chunked = chunk_counters(model)
            remove_memory_optimizations(model)
            short = UNCHUNKED_CALLS.get(family, 0) if options.get("head_chunks", 1) == 1 else 0
            assert calls and chunked == calls - short, options
            assert rel_err(out, reference) <= 1e-5, options
        assert not has_memopt_hooks(model)
        assert torch.equal(prediction(model(**inputs)), reference)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert _attention_dispatch._installed_users == users_before  # every hook released the dispatch wrappers


@pytest.mark.parametrize("family", ["wan", "hunyuanvideo", "sd3", "mochi"])
def test_combines_with_sequence_chunking(family):
    """Sequence chunking hands the chunked math the full K/V (and key mask), in either application order."""
    _, model, inputs = build(family)
    with torch.no_grad():
        reference = prediction(model(**inputs))
        for first_sequence in (True, False):
            if first_sequence:
                apply_sequence_chunking(model, 4)
            apply_chunked_attention(model, query_chunk=3, kv_chunk=11, head_chunks=2)
            if not first_sequence:
                apply_sequence_chunking(model, 4)
            out = prediction(model(**inputs))
            _, chunked = chunk_counters(model)
            remove_memory_optimizations(model)
            assert chunked and rel_err(out, reference) <= 1e-5


def test_kv_chunks_bound_the_math_path():
    """On the math backend the S x S scores dominate; K/V chunks with the log-sum-exp merge remove them."""
    spec = get_family("wan")
    model = spec.build("tiny")
    inputs = spec.make_inputs(model.config, batch_size=1, height=128, width=256, num_frames=5)  # 256 tokens
    with torch.no_grad(), attention_backend("_native_math"):
        reference = trace_memory(model, **inputs)
        apply_chunked_attention(model, query_chunk=64, kv_chunk=64)
        chunked = trace_memory(model, **inputs)
    assert rel_err(chunked.result[0], reference.result[0]) <= 1e-5
    assert chunked.peak_bytes < reference.peak_bytes / 2


def test_bad_options_and_models_are_refused():
    _, model, _ = build("wan")
    for options in ({"query_chunk": 0}, {"kv_chunk": -3}, {"head_chunks": 0}, {"query_chunk": 2.5}):
        with pytest.raises(ValueError):
            apply_chunked_attention(model, **options)
    assert not has_memopt_hooks(model)
    with pytest.raises(ValueError, match="no diffusers attention modules"):
        apply_chunked_attention(torch.nn.Linear(3, 3))
    apply_chunked_attention(model)
    with pytest.raises(RuntimeError, match=r"blocks\.0\.attn1 already has memopt.s chunked attention hook"):
        apply_chunked_attention(model)


def test_calls_outside_hooked_modules_are_untouched():
    """The interception is scoped to the hooked module's forward: other SDPA users see the plain function."""
    _, model, inputs = build("flux", size=Size(48, 80))
    apply_chunked_attention(model, query_chunk=2)
    q, k, v = (torch.randn(1, 2, 9, 4) for _ in range(3))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    with torch.no_grad():
        model(**inputs)
    assert chunk_counters(model)[1] > 0
    assert torch.equal(out, torch.nn.functional.scaled_dot_product_attention(q, k, v))


def test_applying_twice_changes_nothing_and_names_the_module():
    _, model, _ = build("flux")
    apply_chunked_attention(model, query_chunk=7)
    first = {path for path, module in model.named_modules()
             if getattr(module, "_diffusers_hook", None) is not None
             and module._diffusers_hook.get_hook(CHUNKED_ATTENTION_HOOK) is not None}
    with pytest.raises(RuntimeError, match=r"transformer_blocks\.0\.attn already has memopt's chunked attention hook"):
        apply_chunked_attention(model, query_chunk=5)
    assert all(module._diffusers_hook.get_hook(CHUNKED_ATTENTION_HOOK).config.query_chunk == 7
               for path, module in model.named_modules() if path in first)
    remove_memory_optimizations(model)
    assert not has_memopt_hooks(model)


@pytest.mark.parametrize("name", ["sana", "sana_video"])
def test_linear_attention_runs_in_token_chunks(name):
    """Sana's ReLU linear attention makes no kernel call: memopt computes it in query_chunk-token sweeps (the key
    sums first, then the queries), exact in the forward and every gradient, with chunks that do not divide the
    sequence (63 and 45 tokens in chunks of 17)."""
    model, inputs = sana(name)
    latents = inputs["hidden_states"].requires_grad_(True)
    reference = model(**inputs)[0]
    grads_ref = torch.autograd.grad(reference.square().sum(), [latents, *model.parameters()])
    report = apply_chunked_attention(model, query_chunk=17)
    out = model(**inputs)[0]
    grads = torch.autograd.grad(out.square().sum(), [latents, *model.parameters()])
    assert chunk_counters(model) == (4, 4)  # attn1 (linear) and attn2 (the cross-attention's kernel) per block
    remove_memory_optimizations(model)
    assert len(report.attention) == 4 and rel_err(out, reference) <= 1e-5
    assert all(rel_err(g, g_ref) <= 1e-5 for g, g_ref in zip(grads, grads_ref))


def test_linear_attention_honours_hooks_registered_before_it():
    """A hook on the attention module registered before memopt's (one that swaps the weights in, as offloading does)
    gets its pre_forward / post_forward around the chunked call, which reads the projections directly."""
    from diffusers.hooks import HookRegistry

    model, inputs = sana("sana")
    with torch.no_grad():
        reference = model(**inputs)[0]
        for block in model.transformer_blocks:
            HookRegistry.check_if_exists_or_initialize(block.attn1).register_hook(OffloadLike(), "offload_like")
        apply_chunked_attention(model, query_chunk=17)
        assert rel_err(model(**inputs)[0], reference) <= 1e-5
    assert chunk_counters(model) == (4, 4)


def test_linear_attention_memory_exact_bytes():
    """The processor holds the queries, keys and values, their ReLUs and the padded values at once: over 6 LD.
    Chunked: the output, plus one chunk's output projection (the normalised chunk and the linear's matmul and bias
    add) and the (C + 1) x C key sums per head."""
    from diffusers.models.attention_processor import Attention, SanaLinearAttnProcessor2_0

    torch.manual_seed(0)
    d, heads, tokens, chunk, fp32 = 64, 8, 4096, 512, 4
    attn = Attention(query_dim=d, heads=heads, dim_head=d // heads, processor=SanaLinearAttnProcessor2_0()).eval()
    x = torch.randn(1, tokens, d)
    head_dim = d // heads
    with torch.no_grad():
        assert trace_memory(attn, x).peak_bytes > 6 * tokens * d * fp32
        apply_chunked_attention(attn, query_chunk=chunk)
        chunked = trace_memory(attn, x).peak_bytes
    assert chunked == (tokens + 3 * chunk) * d * fp32 + heads * (head_dim + 1) * head_dim * fp32


def test_a_module_without_attention_kernel_calls_is_logged(caplog):
    """Sana's PAG processors (linear attention with the batch split into guidance branches) make no kernel call and
    are not chunked: exact, and the log says nothing was split."""
    from diffusers.models.attention_processor import PAGIdentitySanaLinearAttnProcessor2_0

    model, inputs = sana("sana")
    for block in model.transformer_blocks:
        block.attn1.set_processor(PAGIdentitySanaLinearAttnProcessor2_0())
    with torch.no_grad():
        reference = model(**inputs)[0]
        apply_chunked_attention(model, query_chunk=7, kv_chunk=6, head_chunks=2)
        with caplog.at_level(logging.WARNING, logger="memopt.hooks.attention"):
            out = model(**inputs)[0]
    remove_memory_optimizations(model)
    assert rel_err(out, reference) <= 1e-5
    assert "transformer_blocks.0.attn1 (PAGIdentitySanaLinearAttnProcessor2_0) made no attention kernel call" in (
        caplog.text)
    assert "transformer_blocks.0.attn2" not in caplog.text  # the cross-attention is chunked
