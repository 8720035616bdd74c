"""Sequence chunking on the call modes and masks of single families, beyond the parametrized family tests: SkyReels-V2
diffusion forcing (per-frame timesteps, block-causal masks) and key masks a plan leaves whole."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

from memopt import apply_sequence_chunking, remove_memory_optimizations
from memopt.models import Size, get_family
from memopt.plans.sequence import SEQUENCE_PLANS

from _tiny_cases import rel_err  # noqa: E402


def _skyreels_diffusion_forcing(causal_block_size: int, size: Size) -> tuple[torch.nn.Module, dict]:
    """SkyReels-V2 as its diffusion-forcing pipelines call it: one timestep per latent frame (random, so neighbouring
    frames differ), ``enable_diffusion_forcing=True``, ``fps``; ``causal_block_size > 1`` (asynchronous mode) makes the
    model build a block-causal ``(1, 1, S, S)`` self-attention mask."""
    spec = get_family("skyreels_v2")
    model = spec.build("tiny")
    model._set_ar_attention(causal_block_size)
    inputs = spec.make_inputs(model.config, batch_size=2, height=size.height, width=size.width,
                              num_frames=size.num_frames)
    frames = inputs["hidden_states"].shape[2]
    inputs.update(timestep=torch.randint(0, 1000, (2, frames), generator=torch.Generator().manual_seed(0)),
                  enable_diffusion_forcing=True, fps=[1, 1])
    return model, inputs


@pytest.mark.parametrize("schedule", ["two_pass", "lockstep"])
@pytest.mark.parametrize("causal_block_size, size", [(1, Size(80, 112, 9)), (2, Size(80, 112, 21))])
def test_skyreels_v2_diffusion_forcing(schedule, causal_block_size, size, caplog):
    """Per-frame timesteps: a (B, 6, S, D) block ``temb`` split on dim 2 and a per-token output head (run whole, with
    a warning); with causal_block_size > 1 a block-causal mask cut by query rows (105 / 210 tokens)."""
    model, inputs = _skyreels_diffusion_forcing(causal_block_size, size)
    with torch.no_grad():
        reference = model(**inputs)[0]
        for num_chunks in (4, 16):
            report = apply_sequence_chunking(model, num_chunks, schedule=schedule)
            assert report.blocks and report.attention and not report.skipped, report
            with caplog.at_level(logging.WARNING, logger="memopt.hooks.sequence"):
                out = model(**inputs)[0]
            remove_memory_optimizations(model)
            assert rel_err(out, reference) <= 1e-5, num_chunks
        assert "output head runs on the whole sequence" in caplog.text
        if causal_block_size > 1:  # the mask is in effect
            model._set_ar_attention(1)
            assert rel_err(model(**inputs)[0], reference) > 1e-3


def _without_input(plan, name: str):
    blocks = {pattern: dataclasses.replace(block, inputs={k: v for k, v in block.inputs.items() if k != name})
              for pattern, block in plan.blocks.items()}
    return dataclasses.replace(plan, blocks=blocks)


def test_a_query_dependent_mask_must_be_cut_by_the_plan():
    """A block-causal mask passed whole to every chunk is an error naming the fix, not a wrong result."""
    model, inputs = _skyreels_diffusion_forcing(2, Size(80, 112, 21))
    apply_sequence_chunking(model, 4, plan=_without_input(SEQUENCE_PLANS[type(model).__name__], "attention_mask"))
    with torch.no_grad(), pytest.raises(ValueError, match="the plan must split its query dim"):
        model(**inputs)


def test_a_key_mask_the_plan_leaves_whole_is_used_whole():
    """A mask over all keys that every chunk receives whole needs no gathering: used as is, never read at the
    chunk's offsets (HunyuanVideo's (B, 1, 1, S_image + S_text) mask, left out of its plan)."""
    spec = get_family("hunyuanvideo")
    model = spec.build("tiny")
    inputs = spec.make_inputs(model.config, batch_size=2, height=80, width=112, num_frames=5, masked=True)
    with torch.no_grad():
        reference = model(**inputs)[0]
        apply_sequence_chunking(model, 4, plan=_without_input(SEQUENCE_PLANS[type(model).__name__], "attention_mask"))
        out = model(**inputs)[0]
    assert rel_err(out, reference) <= 1e-5
