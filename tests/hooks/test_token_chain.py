"""Model-level token chains (``SequencePlan.token_chains``, memopt.hooks._token_chain): exact, a chunk's wide
intermediates at a time, refused when the model does not feed the chain's modules to each other."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers.models.normalization import RMSNorm

from memopt import apply_sequence_chunking, remove_memory_optimizations, trace_memory
from memopt.hooks._common import register_memopt_hook
from memopt.hooks._token_chain import TokenChain, TokenChainHook, TokenChainPassHook
from memopt.hooks.sequence import SEQUENCE_CHAIN_HOOK
from memopt.models import get_family
from memopt.plans.sequence import SEQUENCE_PLANS, SequencePlan

from _tiny_cases import rel_err  # noqa: E402


class WideConditioning(torch.nn.Module):
    """A model prologue narrowing wide per-token features: RMSNorm (fp32 inside), then a projection."""

    def __init__(self, wide: int = 96, width: int = 8) -> None:
        super().__init__()
        self.norm = RMSNorm(wide, eps=1e-6)
        self.proj = torch.nn.Linear(wide, width)
        with torch.no_grad():
            self.norm.weight.normal_()

    def forward(self, features: torch.Tensor, scale_between: bool = False) -> torch.Tensor:
        normed = self.norm(features)
        if scale_between:  # the norm's output no longer feeds the projection directly
            normed = normed * 2
        return self.proj(normed)


def chained(model: WideConditioning, num_chunks: int) -> TokenChain:
    chain = TokenChain(("norm", "proj"), num_chunks)
    register_memopt_hook(model.norm, TokenChainHook(chain, [model.proj]), SEQUENCE_CHAIN_HOOK)
    register_memopt_hook(model.proj, TokenChainPassHook(chain, "proj", 1), SEQUENCE_CHAIN_HOOK)
    return chain


def test_a_chain_is_exact_and_holds_a_chunk_of_its_wide_intermediates():
    """7 chunks of 45 tokens (not divisible), batch 2: the same values; the traced peak drops from the whole
    sequence's norm temporaries to the output and a chunk's."""
    model = WideConditioning()
    features = torch.randn(2, 45, 96)
    with torch.no_grad():
        reference = model(features)
        unchained = trace_memory(model, features).peak_bytes
        chain = chained(model, 7)
        out = model(features)
        traced = trace_memory(model, features).peak_bytes
    assert rel_err(out, reference) <= 1e-6 and chain.pending is None
    assert traced < unchained / 3, (traced, unchained)
    assert remove_memory_optimizations(model) == 2


def test_a_model_not_feeding_the_chain_directly_is_an_error_and_autograd_runs_as_written():
    model = WideConditioning()
    features = torch.randn(2, 45, 96)
    with torch.no_grad():
        plain, expected = model(features), model(features, scale_between=True)
    chained(model, 4)
    with torch.no_grad(), pytest.raises(RuntimeError, match="proj: the sequence plan's token chain norm -> proj"):
        model(features, scale_between=True)
    with torch.no_grad():  # the pending output of the failed call is dropped by the next chain call
        assert torch.equal(model(features), plain)
    out = model(features.requires_grad_(), scale_between=True)  # under autograd the chain is not used
    assert torch.equal(out, expected) and out.grad_fn is not None
    remove_memory_optimizations(model)


def test_ideogram4_plans_its_text_feature_chain():
    """The plan's chain is applied and reported; a chain naming a module the model lacks is skipped and reported;
    a chain naming a module twice is refused when the plan is made."""
    spec = get_family("ideogram4")
    model = spec.build("tiny")
    inputs = spec.make_inputs(model.config, batch_size=2, masked=True)
    with torch.no_grad():
        reference = model(**inputs)[0]
        report = apply_sequence_chunking(model, 5)
        out = model(**inputs)[0]
    assert report.token_chains == ["llm_cond_norm -> llm_cond_proj"] and "token chains in chunks" in str(report)
    assert rel_err(out, reference) <= 1e-5
    remove_memory_optimizations(model)
    plan = SEQUENCE_PLANS["Ideogram4Transformer2DModel"]
    report = apply_sequence_chunking(model, 5, plan=dataclasses.replace(plan, token_chains=(("text_norm", "proj"),)))
    assert ("text_norm", "token-chain module named in the plan does not exist") in report.skipped
    remove_memory_optimizations(model)
    with pytest.raises(ValueError, match="token_chains must list chains of distinct module paths"):
        SequencePlan(plan.blocks, token_chains=(("llm_cond_norm", "llm_cond_norm"),))


def test_a_chain_of_one_module_runs_it_in_chunks_of_a_batchless_sequence():
    """A chain of one module is a per-token module in chunks: on a batchless ``(S, D)`` input (Cosmos 3 Omni's output
    norm) the tokens run along dim 0. Exact, a chunk's fp32 temporaries at a time, nothing left pending."""
    model = WideConditioning()
    features = torch.randn(45, 96)
    with torch.no_grad():
        reference = model.norm(features)
        whole = trace_memory(model.norm, features).peak_bytes
        chain = TokenChain(("norm",), 5)
        register_memopt_hook(model.norm, TokenChainHook(chain, []), SEQUENCE_CHAIN_HOOK)
        out = model.norm(features)
        chunked = trace_memory(model.norm, features).peak_bytes
    assert rel_err(out, reference) <= 1e-6 and chain.pending is None and chunked < whole
    assert remove_memory_optimizations(model) == 1
