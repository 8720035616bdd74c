"""memopt under diffusers' step caches (First Block Cache, Pyramid Attention Broadcast, FasterCache, TaylorSeer,
MagCache; ``model.enable_cache``) on a tiny Wan over six denoiser calls whose caches hit and miss.

FeedForward and attention chunking run under them exactly in either order, and removing memopt (or the cache) leaves
the other working: diffusers' ``HookRegistry.remove_hook`` dropped an outer hook's ``new_forward`` when splicing out an
inner one, so removing memopt from under a cache silently turned the cache off, and ``disable_cache()`` under memopt's
hooks let memopt's removal reinstate the cache (:func:`memopt.hooks._common.remove_hook`). Sequence chunking cannot
run under them (each call would see one chunk): refused by name, at apply time or at the first forward; the planner
leaves it out.
"""

from __future__ import annotations

import pytest
import torch
from diffusers.hooks import (
    FasterCacheConfig,
    FirstBlockCacheConfig,
    MagCacheConfig,
    PyramidAttentionBroadcastConfig,
    TaylorSeerCacheConfig,
)

import memopt
from memopt.hooks._common import iter_memopt_hooks
from memopt.models import get_family
from memopt.planner import BudgetError

TIMESTEPS = [999, 750, 650, 550, 450, 50]
_now = {"t": 999}


def _config(cache: str):
    def timestep() -> int:
        return _now["t"]

    if cache == "fbc":
        return FirstBlockCacheConfig(threshold=0.08)
    if cache == "pab":
        return PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=2, cross_attention_block_skip_range=2,
            spatial_attention_timestep_skip_range=(100, 800), cross_attention_timestep_skip_range=(100, 800),
            current_timestep_callback=timestep)
    if cache == "faster":
        return FasterCacheConfig(
            spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 901),
            unconditional_batch_skip_range=2, unconditional_batch_timestep_skip_range=(-1, 901),
            low_frequency_weight_update_timestep_range=(99, 901), high_frequency_weight_update_timestep_range=(-1, 301),
            attention_weight_callback=lambda _: 0.5, tensor_format="BCFHW", current_timestep_callback=timestep)
    if cache == "taylor":
        return TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=2, max_order=1,
                                     taylor_factors_dtype=torch.float32, cache_identifiers=[r"blocks\.\d+\.attn1"])
    return MagCacheConfig(threshold=0.5, max_skip_steps=2, retention_ratio=0.2, num_inference_steps=6,
                          mag_ratios=[1.0, 1.05, 1.03, 1.02, 1.01, 1.0])


CACHES = ["fbc", "pab", "faster", "taylor", "mag"]


def _build() -> torch.nn.Module:
    torch.manual_seed(0)
    return get_family("wan").build("tiny")


def _calls(model: torch.nn.Module) -> list[dict]:
    base = get_family("wan").make_inputs(model.config, batch_size=2, height=48, width=80, num_frames=5)
    noise = torch.randn(base["hidden_states"].shape, generator=torch.Generator().manual_seed(1))
    return [dict(base, hidden_states=base["hidden_states"] + 0.02 * k * noise,
                 timestep=torch.full_like(base["timestep"], t)) for k, t in enumerate(TIMESTEPS)]


def _run(model: torch.nn.Module, steps: range) -> list[torch.Tensor]:
    calls = _calls(model)
    outputs = []
    with torch.no_grad():
        for k in steps:
            _now["t"] = TIMESTEPS[k]
            with model.cache_context("cond"):
                outputs.append(model(**calls[k])[0])
    return outputs


def _cached_reference(cache: str) -> list[torch.Tensor]:
    model = _build()
    model.enable_cache(_config(cache))
    return _run(model, range(6))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _chunk_feedforward_and_attention(model: torch.nn.Module) -> None:
    memopt.apply_chunked_feedforward(model, num_chunks=4, split="hidden")
    memopt.apply_chunked_attention(model, query_chunk=16, head_chunks=2)


@pytest.mark.parametrize("order", ["cache_first", "memopt_first"])
@pytest.mark.parametrize("cache", CACHES)
def test_feedforward_and_attention_chunks_run_under_a_cache_and_come_off_cleanly(cache: str, order: str) -> None:
    reference = _cached_reference(cache)
    plain = _run(_build(), range(6))
    assert any(_rel(r, p) > 1e-3 for r, p in zip(reference, plain))  # the cache does skip work in these calls
    model = _build()
    if order == "cache_first":
        model.enable_cache(_config(cache))
    _chunk_feedforward_and_attention(model)
    if order == "memopt_first":
        model.enable_cache(_config(cache))
    outputs = _run(model, range(3))
    memopt.remove_memory_optimizations(model)  # the cache goes on as if memopt had never been there
    outputs += _run(model, range(3, 6))
    for k, (out, ref) in enumerate(zip(outputs, reference)):
        assert _rel(out, ref) <= 1e-5, f"call {k}"


@pytest.mark.parametrize("cache", ["pab", "faster"])
def test_disabling_the_cache_under_memopt_then_removing_memopt_leaves_the_plain_model(cache: str) -> None:
    """``disable_cache()`` splices the cache's hooks out from under memopt's attention hooks; memopt's removal then
    restored the cache's wrapper (it kept running with no hook registered)."""
    plain = _build()
    model = _build()
    model.enable_cache(_config(cache))
    _chunk_feedforward_and_attention(model)
    _run(model, range(3))
    model.disable_cache()
    memopt.remove_memory_optimizations(model)
    state = {key: value.clone() for key, value in plain.state_dict().items()}
    assert all(torch.equal(value, state[key]) for key, value in model.state_dict().items())
    for out, ref in zip(_run(model, range(3, 6)), _run(plain, range(3, 6))):
        assert torch.equal(out, ref)


@pytest.mark.parametrize("cache", CACHES)
def test_sequence_chunking_refuses_a_cache_in_either_order(cache: str) -> None:
    model = _build()
    model.enable_cache(_config(cache))
    with pytest.raises(ValueError, match="carries diffusers' step-cache hooks .* disable the cache"):
        memopt.apply_sequence_chunking(model, num_chunks=3)
    assert not list(iter_memopt_hooks(model))
    model = _build()
    memopt.apply_sequence_chunking(model, num_chunks=3)
    model.enable_cache(_config(cache))
    with pytest.raises(ValueError, match="^blocks.0 carries diffusers' step-cache hooks"):
        _run(model, range(1))


@pytest.mark.parametrize("cache", ["fbc", "pab"])
def test_the_planner_leaves_sequence_chunks_out_under_a_cache(cache: str) -> None:
    """With the cache on first, a budget below the unmodified peak is met by FeedForward shards (exact, the cache
    working); one that only sequence chunks would meet is refused, saying why they are out."""
    reference = _cached_reference(cache)
    probe = _build()
    with torch.no_grad():
        trace = memopt.trace_memory(probe, **_calls(probe)[0])
    model = _build()
    model.enable_cache(_config(cache))
    memopt.apply_memory_optimizations(model, budget=trace.baseline_bytes + trace.peak_bytes - 1)
    outputs = _run(model, range(6))
    hooks = {name for _, _, name in iter_memopt_hooks(model)}
    assert hooks and not any(name.startswith("memopt.sequence") for name in hooks)
    for k, (out, ref) in enumerate(zip(outputs, reference)):
        assert _rel(out, ref) <= 1e-5, f"call {k}"
    memopt.remove_memory_optimizations(model)
    memopt.apply_memory_optimizations(model, budget=trace.baseline_bytes + trace.peak_bytes // 3)
    with pytest.raises(BudgetError, match="sequence chunking does not run under diffusers' step caches"):
        _run(model, range(1))


def test_a_cache_enabled_after_planning_is_refused_at_the_first_forward() -> None:
    """FasterCache's denoiser hook sits on the model, outside the planning hook: the planned call, run through the
    rebuilt chain, would count the step twice (its schedule silently shifted by one). Refused, saying the order."""
    model = _build()
    memopt.apply_memory_optimizations(model, budget="4GiB")
    model.enable_cache(_config("faster"))
    with pytest.raises(ValueError, match=r"got the hooks \['faster_cache_denoiser'\] .* after enabling the cache"):
        _run(model, range(1))
