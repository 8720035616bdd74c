"""Motif-Video."""

from __future__ import annotations

from typing import Any, Callable

import torch
from diffusers.models.embeddings import get_1d_rotary_pos_embed
from diffusers.utils.torch_utils import maybe_adjust_dtype_for_device

from ._vocabulary import (
    _DUAL_STREAM_MODULATION,
    _IMAGE_FIRST,
    _IMAGE_TOKENS,
    _SINGLE_STREAM_MLP,
    _SINGLE_STREAM_MODULATION,
    _TEXT_TOKENS,
    BlockPlan,
    ChunkValue,
    JointAttention,
    ProducerCall,
    SequencePlan,
    SequenceSplit,
    TokenProducer,
    TokenRanges,
    _AxisGather,
    _pair,
)
from .hunyuan import _hunyuan_rope_tokens


def _motif_rope_rows(rope: torch.nn.Module, call: ProducerCall, forward: Callable) -> Callable[[TokenRanges], Any]:
    """Motif-Video's ``(S, head_dim)`` tables for some tokens: HunyuanVideo's per-axis 1-D embeddings, but made in
    fp64 where the device has it (``maybe_adjust_dtype_for_device``) as the module does, then gathered."""
    hidden_states = call["hidden_states"]
    _, _, frames, height, width = hidden_states.shape
    sizes = (frames // rope.patch_size_t, height // rope.patch_size, width // rope.patch_size)
    dtype = maybe_adjust_dtype_for_device(torch.float64, hidden_states.device)
    axes = [
        get_1d_rotary_pos_embed(dim, torch.arange(size, device=hidden_states.device, dtype=torch.float32), rope.theta,
                                use_real=True, freqs_dtype=dtype)
        for dim, size in zip(rope.rope_dim, sizes)
    ]
    return _AxisGather(axes, sizes)


def _text_only_stream(argument: Callable[[str], Any], rows: tuple[int, int], tokens: int) -> int:
    """``image_embed_seq_len`` for a chunk: 0, the only value a chunk can serve.

    The image-to-video pipeline puts SigLIP image tokens in front of the text tokens and the cross-attention drops
    the first ``image_embed_seq_len`` tokens of the text stream it gets. A chunk carries only its piece of that stream,
    and the gathered keys cover all of it: no per-chunk count makes the cross-attention's keys the text tokens only.
    """
    count = argument("image_embed_seq_len")
    if count:
        raise NotImplementedError(
            f"MotifVideoTransformer3DModel: sequence chunking does not support image_embeds (image-to-video: "
            f"image_embed_seq_len={count}); the cross-attention drops the leading image tokens of the text stream, "
            "which chunks split. Run it with apply_memory_optimizations (FeedForward / attention chunking) or "
            "without image_embeds"
        )
    return 0


# Shared Cross-Attention: the image stream's (rotary) queries against the text tokens of the block's normed text
# stream; its keys/values do not depend on the joint attention's output, so two-pass collects both in one pass.
_CROSS = JointAttention(order=("text",), optional=True, collect_with_previous=True)
_INPUTS = {
    "hidden_states": _IMAGE_TOKENS,
    "encoder_hidden_states": _TEXT_TOKENS,
    "attention_mask": SequenceSplit(3, 4, ("image", "text")),  # (B, 1, 1, S_image + S_text) key mask
    "image_rotary_emb": _pair(SequenceSplit(0, 2)),  # (S_image, head_dim) cos / sin; text tokens get none
    "image_embed_seq_len": ChunkValue(_text_only_stream),
}


PLANS: dict[str, SequencePlan] = {
    "MotifVideoTransformer3DModel": SequencePlan(
        # HunyuanVideo's layout (MMDiT blocks, then parallel attention + MLP single-stream blocks concatenating
        # cat(image, text) themselves) with a cross-attention to the text after each joint attention. The last
        # num_decoder_layers single-stream blocks (DDT decoder) take a copy of the patch embedding as their image stream
        # and the encoder's image tokens (full length, no mask) as their "text" stream, split like text; their
        # cross-attention is None (optional).
        {
            "transformer_blocks.*": BlockPlan(
                inputs=_INPUTS,
                attention={"attn": _IMAGE_FIRST, "cross_attn": _CROSS},
                # The joint attention's output projections run between its kernel call and the cross-attention's, whose
                # keys/values the same collection pass gathers: their output only feeds the cross-attention's queries,
                # unused there, so that pass skips them (two-pass would otherwise do one D x D matmul per token more).
                unused_before_attention=("attn.to_out.0", "attn.to_add_out"),
                conditioning=_DUAL_STREAM_MODULATION,
            ),
            "single_transformer_blocks.*": BlockPlan(
                inputs=_INPUTS,
                attention={"attn": JointAttention(order=("image", "text")), "cross_attn": _CROSS},
                unused_before_attention=_SINGLE_STREAM_MLP,
                conditioning=_SINGLE_STREAM_MODULATION,
            ),
        },
        embed="x_embedder",
        # MotifVideoRotaryPosEmbed has HunyuanVideo's attributes (patch_size, patch_size_t, rope_dim, theta) and
        # per-axis 1-D tables concatenated per token.
        producers={"rope": TokenProducer(_hunyuan_rope_tokens, _motif_rope_rows)},
        num_chunks=48,  # single-stream blocks keep attention + a 4x MLP + their concatenation per chunk
    ),
}
