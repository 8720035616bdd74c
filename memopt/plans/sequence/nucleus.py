"""Nucleus-Image."""

from __future__ import annotations

from typing import Any, Callable

import torch
from diffusers.hooks._helpers import TransformerBlockMetadata

from ._vocabulary import _IMAGE_TOKENS, _TEXT_TOKENS, BlockPlan, ChunkValue, JointAttention, SequencePlan, SequenceSplit


def _nucleus_attention_kwargs(argument: Callable[[str], Any], rows: tuple[int, int], tokens: int) -> Any:
    """The block's ``attention_kwargs`` for a chunk: the joint key mask ``(B, S + T)`` (image tokens, then text) cut to
    the chunk's image tokens and the whole text, as the chunk's keys are."""
    kwargs = argument("attention_kwargs")
    if not kwargs:
        return kwargs
    cached = sorted(set(kwargs) & {"cached_txt_key", "cached_txt_value"})
    if cached:
        raise NotImplementedError(f"NucleusMoEImageTransformerBlock: sequence chunking does not support {cached} (a "
                                  "text K/V cache); call the model without it")
    mask = kwargs.get("attention_mask")
    if mask is None:
        return kwargs
    start, end = rows
    return {**kwargs, "attention_mask": torch.cat([mask[:, start:end], mask[:, tokens:]], dim=1)}


PLANS = {
    "NucleusMoEImageTransformer2DModel": SequencePlan(
        # Single-stream blocks: image queries attend to [image, text] keys; the text (B, T, joint dim) is projected by
        # each block's encoder_proj into keys and values only, so every chunk carries it whole.
        {
            "transformer_blocks.*": BlockPlan(
                inputs={
                    "hidden_states": _IMAGE_TOKENS,
                    "encoder_hidden_states": _TEXT_TOKENS,  # carried whole (split_text=False)
                    "image_rotary_emb": (SequenceSplit(0, 2), None),  # (image, text) complex tables
                    "attention_kwargs": ChunkValue(_nucleus_attention_kwargs),
                },
                attention={"attn": JointAttention(order=("image", "text"),
                                                  key_value=("to_k", "to_v", "add_k_proj", "add_v_proj"),
                                                  query_norms=("norm_q",), key_value_norms=("norm_k", "norm_added_k"))},
                split_text=False,
                routed=("img_mlp",),  # NucleusMoELayer in the MoE blocks (a FeedForward in the dense ones)
                conditioning=("img_mod.0", "img_mod.1", "encoder_proj"),
                metadata=TransformerBlockMetadata(return_hidden_states_index=0),
            )
        },
        embed="img_in",
    ),
}
