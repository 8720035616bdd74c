"""Mochi."""

from __future__ import annotations

from typing import Any, Callable

import torch

from ._vocabulary import (
    _DUAL_STREAM_MODULATION,
    _IMAGE_TOKENS,
    _JOINT,
    _TEXT_TOKENS,
    BlockPlan,
    JointAttention,
    ProducerCall,
    SequencePlan,
    SequenceSplit,
    TokenProducer,
    TokenRanges,
    _pair,
    _take,
)


def _mochi_rope_tokens(rope: torch.nn.Module, call: ProducerCall) -> int:
    return call["num_frames"] * call["height"] * call["width"]


def _mochi_rope_rows(rope: torch.nn.Module, call: ProducerCall, forward: Callable) -> Callable[[TokenRanges], Any]:
    """Mochi tables for some tokens: positions are computed whole once per forward (3 numbers a token), then each
    chunk's rows from its positions."""
    positions = rope._get_positions(call["num_frames"], call["height"], call["width"], call["device"], call["dtype"])
    return lambda ranges: rope._create_rope(call["pos_frequencies"], _take(positions, 0, ranges))


PLANS: dict[str, SequencePlan] = {
    "MochiTransformer3DModel": SequencePlan(
        {
            "transformer_blocks.*": BlockPlan(
                inputs={
                    "hidden_states": _IMAGE_TOKENS,
                    "encoder_hidden_states": _TEXT_TOKENS,
                    "encoder_attention_mask": SequenceSplit(1, 2, ("text",)),
                    "image_rotary_emb": _pair(SequenceSplit(0, 3)),  # (S_image, heads, head_dim / 2)
                },
                attention={"attn1": JointAttention(order=("image", "text"), calls="batch", **_JOINT)},
                split_text=False,
                conditioning=_DUAL_STREAM_MODULATION,
            )
        },
        embed="patch_embed",
        producers={"rope": TokenProducer(_mochi_rope_tokens, _mochi_rope_rows)},
    ),
}
