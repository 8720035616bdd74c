"""QwenImage and Qwen-Image 2.1."""

from __future__ import annotations

import dataclasses

from typing import Any, Callable

import torch
from diffusers.hooks._helpers import TransformerBlockMetadata

from ._vocabulary import (
    _IMAGE_TOKENS,
    _TEXT_FIRST,
    _TEXT_TOKENS,
    BlockPlan,
    ChunkValue,
    JointAttention,
    SequencePlan,
    SequenceSplit,
)


def _qwenimage21_prefill(argument: Callable[[str], Any], rows: tuple[int, int], tokens: int) -> None:
    """``segments`` for a chunk: ``None``, the processor's single-call path (see :func:`_qwenimage21_mask_rows`).

    The prefix K/V cache is refused: ``"extract"`` stores ``key[:, slice]`` with a slice of the whole sequence (a
    chunk's keys would be cached wrongly), ``"cached"`` prepends cached keys the exchange does not know.
    """
    if argument("kv_cache_mode") is not None:
        raise NotImplementedError(
            "QwenImage21TransformerBlock: sequence chunking does not support "
            f"kv_cache_mode={argument('kv_cache_mode')!r} (the prefix K/V cache); call the model without kv_cache"
        )
    return None


def _qwenimage21_mask_rows(argument: Callable[[str], Any], rows: tuple[int, int], tokens: int) -> torch.Tensor:
    """The chunk's query rows of the block-causal mask, ``(B | 1, 1, rows, S)`` bool.

    The default ``QwenImage21AttnProcessor`` gets the mask as the prefix ``segments`` (global ``(start, end,
    is_text)`` runs of text / condition-image tokens) and makes one kernel call per segment, each segment's queries
    against the keys ``[0, end)`` (text: causal within the segment), then one for the target image against all keys,
    padded text keys (``key_valid``) dropped. That is ``(q >= k or same image block) and key_valid[k]``
    (``build_qwenimage21_block_causal_mask``); here densely, for the chunk's rows only.
    """
    segments, key_valid = argument("segments"), argument("key_valid")
    if segments is None:
        raise NotImplementedError(
            "QwenImage21TransformerBlock: sequence chunking needs the block-causal segments of "
            "QwenImage21AttnProcessor; QwenImage21FlexAttnProcessor's BlockMask cannot be cut by query rows (set "
            "QwenImage21AttnProcessor)"
        )
    device = argument("hidden_states").device
    block = torch.full((tokens,), -1, dtype=torch.long, device=device)  # -1: text; else the image block's number
    for number, (start, end, is_text) in enumerate(segments):
        if not is_text:
            block[start:end] = number
    block[segments[-1][1] if segments else 0:] = len(segments)  # the target image
    start, end = rows
    query_block = block[start:end, None]
    causal = torch.arange(start, end, device=device)[:, None] >= torch.arange(tokens, device=device)[None, :]
    mask = (causal | ((query_block == block[None, :]) & (query_block >= 0)))[None, None]
    return mask if key_valid is None else mask & key_valid.bool()[:, None, None, :]


PLANS: dict[str, SequencePlan] = {
    "QwenImageTransformer2DModel": SequencePlan(
        {
            "transformer_blocks.*": BlockPlan(
                inputs={
                    "hidden_states": _IMAGE_TOKENS,
                    "encoder_hidden_states": _TEXT_TOKENS,
                    "encoder_hidden_states_mask": SequenceSplit(1, 2, ("text",)),
                    "image_rotary_emb": (SequenceSplit(0, 2), SequenceSplit(0, 2, ("text",))),  # (img, txt) freqs
                    "modulate_index": SequenceSplit(1, 2),  # zero_cond_t: per-token modulation choice
                },
                attention={"attn": _TEXT_FIRST},
                conditioning=("img_mod", "txt_mod"),  # SiLU + Linear of the timestep embedding per stream
            )
        },
        gather=None,
        embed="img_in",
        source="memopt + QwenImageTransformer2DModel._cp_plan",
    ),
    "QwenImage21Transformer2DModel": SequencePlan(
        # One kind of single-stream block over the joint sequence (prompt with condition images in place, then the
        # target image): all of it is the "image" stream, split in chunks. The model computes one shared modulation
        # (B | B + 1, 4D) and passes it whole; under causal_condition target_token_mask (S,) picks each token's row
        # (t = 0 for text and condition images), so it is cut like the tokens, as are the complex rotary table
        # (S, head_dim / 2) and, in the tail, norm_out's target_token_mask. Attention is block-causal: a chunk gets the
        # single-call path of the default processor with its rows of the dense mask (ChunkValue), and the exchange
        # passes them on with every chunk's keys and values. No _cp_plan in diffusers 0.42.
        {
            "transformer_blocks.*": BlockPlan(
                inputs={
                    "hidden_states": _IMAGE_TOKENS,
                    "rotary_emb": SequenceSplit(0, 2),  # (S, head_dim / 2) complex64
                    "target_token_mask": SequenceSplit(0, 1),  # (S,) bool: the target image's tokens
                    "segments": ChunkValue(_qwenimage21_prefill),
                    "attention_mask": ChunkValue(_qwenimage21_mask_rows),
                },
                attention={"attn": JointAttention()},
                metadata=TransformerBlockMetadata(return_hidden_states_index=0),  # not in diffusers' registry
            )
        },
        embed="img_in",
        # norm_out(hidden_states, temb, target_token_mask) -> proj_out (the output covers the joint sequence; the
        # pipeline keeps its last target tokens).
        tail_inputs={"target_token_mask": SequenceSplit(0, 1)},
    ),
}

PLANS["QwenImageControlNetModel"] = dataclasses.replace(
    # Qwen-Image's blocks under the ControlNet's own class: it returns every block's output (through its
    # controlnet_blocks projections) as a residual, so the blocks write out of place; it has no output head.
    PLANS["QwenImageTransformer2DModel"], tail=None, keeps_block_outputs=True,
    source="memopt: QwenImageTransformer2DModel's plan",
)
