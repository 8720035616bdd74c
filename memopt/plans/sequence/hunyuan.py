"""HunyuanVideo, FramePack, HunyuanVideo 1.5, HunyuanImage 2.1 and HunyuanDiT (and its ControlNet)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable

import torch
from diffusers.hooks._helpers import TransformerBlockMetadata
from diffusers.models._modeling_parallel import ContextParallelOutput
from diffusers.models.embeddings import get_1d_rotary_pos_embed

from ._vocabulary import (
    _AxisGather,
    _DUAL_STREAM_MODULATION,
    _IMAGE_FIRST,
    _IMAGE_TOKENS,
    _JOINT,
    _SINGLE_STREAM_MLP,
    _SINGLE_STREAM_MODULATION,
    _TEXT_TOKENS,
    BlockPlan,
    JointAttention,
    ProducerCall,
    SequencePlan,
    SequenceSplit,
    TokenCount,
    TokenProducer,
    TokenRanges,
    _adaptive_norms,
    _pair,
    _returns_image_stream_first,
)


def _hunyuan_rope_tokens(rope: torch.nn.Module, call: ProducerCall) -> int:
    _, _, frames, height, width = call["hidden_states"].shape
    return frames // rope.patch_size_t * (height // rope.patch_size) * (width // rope.patch_size)


def _hunyuan_rope_rows(rope: torch.nn.Module, call: ProducerCall, forward: Callable) -> Callable[[TokenRanges], Any]:
    """HunyuanVideo's ``(S, head_dim)`` tables for some tokens: its per-axis 1-D embeddings of their positions, made
    once per axis position and gathered (elementwise functions of the position, so the same numbers)."""
    _, _, frames, height, width = call["hidden_states"].shape
    sizes = (frames // rope.patch_size_t, height // rope.patch_size, width // rope.patch_size)
    return _AxisGather(_rope_axis_tables(rope, sizes, call["hidden_states"].device), sizes)


def _rope_axis_tables(
    rope: torch.nn.Module, sizes: tuple[int, ...], device: torch.device
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(cos, sin)`` per grid axis, one row per position: the 1-D rotary embedding of ``rope.rope_dim[axis]``
    features (HunyuanVideo's and HunyuanImage's modules build their tables from these)."""
    return [
        get_1d_rotary_pos_embed(dim, torch.arange(size, device=device, dtype=torch.float32), rope.theta, use_real=True)
        for dim, size in zip(rope.rope_dim, sizes)
    ]


def _hunyuanimage_rope_grid(rope: torch.nn.Module, call: ProducerCall) -> tuple[int, ...]:
    """The (rows, columns) or (frames, rows, columns) token grid of HunyuanImage's 4-D (base) / 5-D (refiner) input."""
    return tuple(size // patch for size, patch in zip(call["hidden_states"].shape[2:], rope.patch_size))


def _hunyuanimage_rope_tokens(rope: torch.nn.Module, call: ProducerCall) -> int:
    return int(torch.Size(_hunyuanimage_rope_grid(rope, call)).numel())


def _hunyuanimage_rope_rows(rope: torch.nn.Module, call: ProducerCall, forward: Callable) -> Callable[[TokenRanges],
                                                                                                      Any]:
    """HunyuanImage's ``(S, head_dim)`` tables for some tokens: per-axis 1-D embeddings of their positions (as
    HunyuanVideo's), gathered. A 2-D grid is one frame whose table has no columns, so the concatenation is the module's
    two-axis one."""
    sizes = _hunyuanimage_rope_grid(rope, call)
    device = call["hidden_states"].device
    axes = _rope_axis_tables(rope, sizes, device)
    if len(sizes) == 2:
        empty = torch.empty(1, 0, device=device)
        axes, sizes = [(empty, empty), *axes], (1, *sizes)
    return _AxisGather(axes, sizes)


_HUNYUAN_INPUTS = {
    "hidden_states": _IMAGE_TOKENS,
    "encoder_hidden_states": _TEXT_TOKENS,
    "attention_mask": SequenceSplit(3, 4, ("image", "text")),  # (B, 1, 1, S_image + S_text) key mask
}
_HUNYUAN_ROPE = _pair(SequenceSplit(0, 2))  # (S_image, head_dim); text tokens get no rotary embedding
# HunyuanVideo-I2V (image_condition_type="token_replace") has token-replace blocks at the same paths, which also get
# the clean image's timestep embedding, (B, D), whole, and the first latent frame's token count, whose tokens they
# modulate with it: a count of the first image tokens (the single-stream blocks' cat(image, text) puts them first too).
_TOKEN_REPLACE = {"num_tokens": TokenCount(leading=True)}


def _with_token_replace(plan: BlockPlan, variant: str) -> BlockPlan:
    return replace(plan, variants={variant: replace(plan, inputs={**plan.inputs, **_TOKEN_REPLACE})})


def _hunyuan_blocks(dual_rope: str) -> dict[str, BlockPlan]:
    """HunyuanVideo's layout (HunyuanImage 2.1 shares it): MMDiT blocks, then parallel attention + MLP single-stream
    blocks that take the streams separately and concatenate cat(image, text) themselves; ``dual_rope`` is the dual
    blocks' name for the rotary tables."""
    return {
        "transformer_blocks.*": _with_token_replace(BlockPlan(
            inputs={**_HUNYUAN_INPUTS, dual_rope: _HUNYUAN_ROPE},
            attention={"attn": _IMAGE_FIRST},
            conditioning=_DUAL_STREAM_MODULATION,
        ), "HunyuanVideoTokenReplaceTransformerBlock"),
        "single_transformer_blocks.*": _with_token_replace(BlockPlan(
            inputs={**_HUNYUAN_INPUTS, "image_rotary_emb": _HUNYUAN_ROPE},
            attention={"attn": JointAttention(order=("image", "text"))},  # one projection for cat(image, text)
            unused_before_attention=_SINGLE_STREAM_MLP,
            conditioning=_SINGLE_STREAM_MODULATION,
        ), "HunyuanVideoTokenReplaceSingleTransformerBlock"),
    }


PLANS: dict[str, SequencePlan] = {
    "HunyuanVideoTransformer3DModel": SequencePlan(
        _hunyuan_blocks(dual_rope="freqs_cis"),
        embed="x_embedder",
        producers={"rope": TokenProducer(_hunyuan_rope_tokens, _hunyuan_rope_rows)},
        num_chunks=48,  # single-stream blocks keep attention + a 4x MLP + their concatenation per chunk
    ),
    "HunyuanVideo15Transformer3DModel": SequencePlan(
        {
            "transformer_blocks.*": BlockPlan(
                inputs={
                    "hidden_states": _IMAGE_TOKENS,
                    "encoder_hidden_states": _TEXT_TOKENS,  # Qwen2.5-VL + byT5 glyph + SigLIP image tokens
                    "attention_mask": SequenceSplit(1, 2, ("text",)),  # (B, S_text) token mask; image tokens valid
                    "freqs_cis": _HUNYUAN_ROPE,  # (S_image, head_dim) cos / sin
                },
                # The processor turns the token mask into valid[q] & valid[k], (B, 1, S, S): a padding mask.
                attention={"attn": JointAttention(order=("image", "text"), padding_mask=True, **_JOINT)},
                conditioning=_DUAL_STREAM_MODULATION,
                metadata=_returns_image_stream_first(),
            )
        },
        embed="x_embedder",
        # HunyuanVideo15RotaryPosEmbed has HunyuanVideo's attributes and per-axis tables.
        producers={"rope": TokenProducer(_hunyuan_rope_tokens, _hunyuan_rope_rows)},
    ),
    "HunyuanImageTransformer2DModel": SequencePlan(
        # HunyuanVideo's layout: dual-stream blocks, then single-stream blocks that take the streams separately and
        # concatenate cat(image, text) themselves; one (B, 1, 1, S_image + S_text) key mask (the text mask padded with
        # True for the image tokens) and (S_image, head_dim) rotary tables for both kinds. The text stream is the token
        # refiner's Qwen2.5-VL tokens and the byT5 glyph tokens, reordered per sample (valid first) before the blocks.
        _hunyuan_blocks(dual_rope="image_rotary_emb"),
        embed="x_embedder",
        producers={"rope": TokenProducer(_hunyuanimage_rope_tokens, _hunyuanimage_rope_rows)},
        num_chunks=48,  # single-stream blocks keep attention + a 4x MLP + their concatenation per chunk
    ),
    "HunyuanVideoFramepackTransformer3DModel": SequencePlan(
        # HunyuanVideo's blocks (the same classes, called the same way): MMDiT blocks, then parallel attention + MLP
        # single-stream blocks; one (B, 1, 1, S_image + S_text) key mask, None for batch 1, and (S_image, head_dim)
        # rotary tables. The image stream is [4x | 2x | clean history | window] tokens, split like any other: every
        # token attends to all of them. The text stream is the SigLIP image projection (729 tokens) then the refined
        # Llama tokens (the model concatenates them, in that order, with the mask padded by True for the image tokens).
        # The rotary tables are the model's concatenation of four rope calls (the history ones down-sampled by
        # avg_pool3d): computed whole and split (no producer: the model pads, pools and concatenates them itself).
        # No _cp_plan in diffusers 0.42.
        _hunyuan_blocks(dual_rope="freqs_cis"),
        # The model feeds its head hidden_states[:, -original_context_length:]: the window's tokens, the last ones of
        # the last block's output. Tail passes cannot serve that cut: it counts from the end, so a tail pass's last
        # block would have to answer with the chunk alone (memopt answers with the dropped history tokens in front of
        # it, for cuts like Chroma's [:, P:]) and the head then gets too many tokens (memopt falls back to a whole
        # head, with a warning). norm_out (LayerNorm, shift / scale from temb) is per token, so it runs on pieces of
        # its own input instead, written into its (B, window, D) output; proj_out (D -> 64 channels) runs whole on that.
        tail="norm_out",
        gather={"norm_out": ContextParallelOutput(gather_dim=1, expected_dims=3)},
        tail_split=1,
        embed="x_embedder",
        num_chunks=48,  # single-stream blocks keep attention + a 4x MLP + their concatenation per chunk
    ),
}

# HunyuanDiT's blocks (not in diffusers' TransformerBlockRegistry; they return the image tokens alone): long skip
# connections first (the second half's blocks take an earlier block's output, concatenated per token and projected:
# skip_norm / skip_linear), then self-attention attn1 over the image tokens (HunyuanAttnProcessor2_0: LayerNorm on Q
# and K, 2-D rotary on both; K/V exchanged), cross-attention attn2 to the CLIP + mT5 tokens (rotary on its queries
# only; keys from the text: chunk-local, its K/V side computed once per block) and the FeedForward. The rotary tables
# (S, head_dim) cos / sin come from the pipeline and feed both attentions: split. The model keeps the first half's
# outputs in a list until the second half uses them (the ControlNet returns its blocks' outputs), so the blocks write
# out of place. No _cp_plan.
_HUNYUAN_DIT = BlockPlan(
    inputs={
        "hidden_states": _IMAGE_TOKENS,
        "image_rotary_emb": _pair(SequenceSplit(0, 2)),
        "skip": _IMAGE_TOKENS,  # an earlier block's output, (B, S_image, D)
    },
    attention={"attn1": JointAttention()},
    conditioning=_adaptive_norms("norm1"),  # AdaLayerNormShift: silu -> linear of the timestep embedding
    metadata=TransformerBlockMetadata(return_hidden_states_index=0),
)
PLANS["HunyuanDiT2DModel"] = SequencePlan(
    # norm_out(hidden_states, temb) -> proj_out -> unpatchify (the default tail / gather).
    {"blocks.*": _HUNYUAN_DIT}, embed="pos_embed", keeps_block_outputs=True,
)
PLANS["HunyuanDiT2DControlNetModel"] = SequencePlan(
    # The first half of HunyuanDiT's blocks under the ControlNet's own class (the latents and the control image both
    # through pos_embed, summed), every output returned through its controlnet_blocks projections; no output head.
    {"blocks.*": _HUNYUAN_DIT}, tail=None, keeps_block_outputs=True,
)
