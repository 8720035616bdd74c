"""Stable Diffusion 3."""

from __future__ import annotations

import dataclasses

from ._vocabulary import (
    _DUAL_STREAM_MODULATION,
    _IMAGE_FIRST,
    _IMAGE_TOKENS,
    _TEXT_TOKENS,
    BlockPlan,
    JointAttention,
    SequencePlan,
)


PLANS: dict[str, SequencePlan] = {
    "SD3Transformer2DModel": SequencePlan(
        {
            "transformer_blocks.*": BlockPlan(
                inputs={"hidden_states": _IMAGE_TOKENS, "encoder_hidden_states": _TEXT_TOKENS},
                attention={
                    "attn": _IMAGE_FIRST,
                    "attn2": JointAttention(optional=True),  # SD3.5 dual-attention layers: image-only
                },
                conditioning=_DUAL_STREAM_MODULATION,
            )
        },
        embed="pos_embed",
    ),
}

PLANS["SD3ControlNetModel"] = dataclasses.replace(
    # SD3's joint blocks under the ControlNet's own class: it returns every block's output (through its
    # controlnet_blocks projections) as a residual, so the blocks write out of place; it has no output head.
    PLANS["SD3Transformer2DModel"], tail=None, keeps_block_outputs=True,
    source="memopt: SD3Transformer2DModel's plan",
)
