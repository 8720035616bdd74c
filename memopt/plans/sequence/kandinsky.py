"""Kandinsky 5 and Kandinsky 6 (video + audio)."""

from __future__ import annotations

from typing import Any, Callable

import torch
from diffusers.hooks._helpers import TransformerBlockMetadata
from diffusers.models._modeling_parallel import ContextParallelOutput

from ._vocabulary import (
    _IMAGE_TOKENS,
    _TEXT_TOKENS,
    BlockPlan,
    JointAttention,
    SequencePlan,
    SequenceSplit,
    _returns_image_stream_first,
)


# Kandinsky's attention module names (both generations' processors): to_query / to_key / to_value, per-head RMSNorm
# (query_norm / key_norm), rotary on the queries and keys, then one dispatch_attention_fn call with
# (B, S, heads, head_dim) Q/K/V.
_KANDINSKY_PROJECTIONS = {"query": ("to_query",), "key_value": ("to_key", "to_value"), "query_norms": ("query_norm",),
                          "key_value_norms": ("key_norm",)}


def _dense_attention(block: torch.nn.Module, argument: Callable[[str], Any]) -> bool:
    """Refuses NABLA sparse attention (``sparse_params``, ``attention_type="nabla"``, the 10 s checkpoints): its block
    mask is estimated from the whole sequence's pooled queries and keys (``nablaT_v2``), which a chunk does not have,
    and the model reorders the tokens into 8 x 8 tiles for it (``fractal_flatten``)."""
    if argument("sparse_params") is not None:
        raise NotImplementedError(
            f"{type(block).__name__}: sequence chunking supports Kandinsky 5's dense attention only "
            "(attention_type='regular', sparse_params=None); NABLA sparse attention estimates its block mask from the "
            "whole sequence's queries and keys. Run without apply_sequence_chunking, or with a dense checkpoint."
        )
    return True


def _with_audio(block: torch.nn.Module, argument: Callable[[str], Any]) -> bool:
    """The audio self-attention and the two cross-modal attentions run only when the model got
    ``audio_hidden_states`` (the fused block skips its audio path when ``aud`` is ``None``)."""
    return argument("aud") is not None


# The fused block carries two token streams: the video tokens (the "image" stream, always split) and the audio tokens
# in the "text" stream's place (split like one when every chunk gets at least one audio token, else carried whole),
# as LTX-2's. The prompt states (text_v / text_a) are only the key/value side of the chunk-local cross-attentions and
# pass whole with their mask. Four modules attend over a whole stream, in call order:
_K6_FUSED = BlockPlan(
    inputs={
        "vis": _IMAGE_TOKENS,
        "aud": _TEXT_TOKENS,
        # Rotary tables without a batch dim: (S, 1, head_dim / 2, 2, 2) fp32 rotation matrices.
        "vis_rope": SequenceSplit(0, 5),
        "aud_rope": SequenceSplit(0, 5, ("text",)),
    },
    attention={
        # video self-attention
        "video_dec_block.self_attention": JointAttention(**_KANDINSKY_PROJECTIONS),
        # audio self-attention: its K/V come from the block's audio input, which the video one does not touch
        "audio_dec_block.self_attention": JointAttention(order=("text",), active=_with_audio,
                                                         collect_with_previous=True, **_KANDINSKY_PROJECTIONS),
        # video queries, keys / values from the audio stream (aud_pre_ca, after the audio self-attention)
        "va_cross_attention": JointAttention(order=("text",), active=_with_audio, **_KANDINSKY_PROJECTIONS),
        # audio queries, keys / values from the video stream (vis_pre_ca, made before va_cross_attention's output is
        # added): collected in the same pass as va_cross_attention's
        "av_cross_attention": JointAttention(active=_with_audio, collect_with_previous=True, **_KANDINSKY_PROJECTIONS),
    },
    # The timestep modulations (time embeddings (B, time_dim) -> 9 D, and the cross-modal gates) are the same for every
    # chunk; the cross-attentions' key/value side has Kandinsky's names (not found by memopt's to_k / to_v defaults).
    conditioning=("video_dec_block.visual_modulation", "audio_dec_block.visual_modulation", "va_modulation",
                  "av_modulation",
                  "video_dec_block.cross_attention.to_key", "video_dec_block.cross_attention.to_value",
                  "video_dec_block.cross_attention.key_norm",
                  "audio_dec_block.cross_attention.to_key", "audio_dec_block.cross_attention.to_value",
                  "audio_dec_block.cross_attention.key_norm"),
    metadata=_returns_image_stream_first("vis", "aud"),
)

PLANS: dict[str, SequencePlan] = {
    "Kandinsky5Transformer3DModel": SequencePlan(
        # The text encoder blocks (text_transformer_blocks) run first on the text tokens alone and are left whole (a
        # few hundred tokens). The visual (decoder) blocks carry only the video tokens, flattened (B, F' x H' x W', D):
        # a self-attention over all of them (exchanges K/V), a cross-attention to the text embeddings (keys/values only
        # from the text: chunk-local, its K/V projections computed once per block), a GELU MLP.
        # Kandinsky5AttnProcessor calls dispatch_attention_fn with (B, S, heads, head_dim) Q/K/V after per-head RMSNorm
        # and rotary. The timestep modulation (time_embed (B, time_dim) -> 9 D) is the same for every chunk.
        {
            "visual_transformer_blocks.*": BlockPlan(
                inputs={
                    "visual_embed": _IMAGE_TOKENS,
                    "rope": SequenceSplit(1, 6),  # (B, S, 1, head_dim / 2, 2, 2) fp32 rotation matrices
                },
                attention={"self_attention": JointAttention(active=_dense_attention, **_KANDINSKY_PROJECTIONS)},
                # cross_attention's key/value side has Kandinsky's names (not found by memopt's to_k / to_v defaults).
                conditioning=("visual_modulation", "cross_attention.to_key", "cross_attention.to_value",
                              "cross_attention.key_norm"),
                metadata=TransformerBlockMetadata(return_hidden_states_index=0,
                                                  hidden_states_argument_name="visual_embed"),
            )
        },
        # The model reshapes the last block's (B, S, D) output to the (B, F', H', W', D) grid with the full sizes before
        # out_layer (fractal_unflatten), which a tail pass's chunk cannot take. out_layer is per token (fp32 LayerNorm
        # with timestep shift / scale, a linear, the unpatchify permute), so it runs on pieces of latent rows H' (dim 2
        # of its input; there for images too, F' = 1), each piece's output rows (x patch size) in place along dim 2 of
        # its (B, F, H, W, C) output.
        tail="out_layer",
        gather={"out_layer": ContextParallelOutput(gather_dim=2, expected_dims=5)},
        tail_split=2,
        embed="visual_embeddings",
    ),
    "Kandinsky6Transformer3DModel": SequencePlan(
        # The text encoder blocks (video_ / audio_text_transformer_blocks) run first on the prompt tokens alone and are
        # left whole (a few hundred tokens).
        {"visual_transformer_blocks.*": _K6_FUSED},
        # As Kandinsky 5: the model reshapes the last block's (B, S, D) video output to the (B, F', H', W', D) grid
        # before out_layer, which is per token (fp32 LayerNorm with timestep shift / scale, a linear, the unpatchify
        # permute): it runs on pieces of latent rows H' (dim 2), each piece's output rows (x patch size) in place along
        # dim 2. The audio head (audio_out_layer) runs whole on the gathered audio stream.
        tail="out_layer",
        gather={"out_layer": ContextParallelOutput(gather_dim=2, expected_dims=5)},
        tail_split=2,
        embed="visual_embeddings",
    ),
}
