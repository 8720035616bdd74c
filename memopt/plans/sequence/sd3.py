"""Stable Diffusion 3."""

from __future__ import annotations

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
