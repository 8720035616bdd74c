"""CogVideoX, ConsisID, CogView3-Plus, CogView4 and GLM-Image."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from diffusers.hooks._helpers import TransformerBlockMetadata

from ._vocabulary import (
    _IMAGE_TOKENS,
    _TEXT_TOKENS,
    BlockPlan,
    JointAttention,
    SequencePlan,
    SequenceSplit,
    _adaptive_norms,
    _pair,
)


def _glm_image_cache_in_use(argument: Callable[[str], Any]) -> str | None:
    """GLM-Image's block ``kv_cache`` in ``"write"`` or ``"read"`` mode (``BlockPlan.runs_whole``)."""
    mode = getattr(argument("kv_cache"), "mode", None)
    if mode == "write":
        return ("its KV cache is in 'write' mode: the processor appends the call's keys and values to it (the "
                "condition-image pass of GLM-Image's editing pipeline)")
    if mode == "read":
        return ("its KV cache is in 'read' mode: the processor puts the stored condition-image keys and values in "
                "front of the call's")
    return None


_COGVIDEOX = BlockPlan(
    inputs={
        "hidden_states": _IMAGE_TOKENS,
        "encoder_hidden_states": _TEXT_TOKENS,
        "image_rotary_emb": _pair(SequenceSplit(0, 2)),  # (S_image, head_dim) when RoPE is used
    },
    attention={"attn1": JointAttention(order=("text", "image"))},  # one projection for cat(text, image)
    conditioning=_adaptive_norms("norm1", "norm2"),
)

# CogView4's MMDiT block (GLM-Image's is a copy with its own modulation module, which has no SiLU: the name is skipped).
_COGVIEW4 = BlockPlan(
    inputs={
        "hidden_states": _IMAGE_TOKENS,
        "encoder_hidden_states": _TEXT_TOKENS,
        "image_rotary_emb": _pair(SequenceSplit(0, 2)),  # (S_image, head_dim) cos / sin
        "attention_mask": SequenceSplit(1, 2, ("text",)),  # (B, S_text) text mask; image tokens valid
    },
    attention={"attn1": JointAttention(order=("text", "image"))},  # one projection for cat(text, image)
    conditioning=_adaptive_norms("norm1"),
)

PLANS: dict[str, SequencePlan] = {
    "CogVideoXTransformer3DModel": SequencePlan(
        {"transformer_blocks.*": _COGVIDEOX},
        tail="norm_final",
        embed="patch_embed",
    ),
    "CogView4Transformer2DModel": SequencePlan(
        # One kind of MMDiT block: CogView4AttnProcessor projects cat(text, image) with one to_q / to_k / to_v (per-head
        # LayerNorm on Q and K, rotary on the image part only) and calls F.scaled_dot_product_attention itself. The
        # timestep modulation (norm1.linear of the model's SiLU(temb)) is the same for every chunk. No _cp_plan. The
        # rotary tables are (S_image, head_dim) fp32 cos / sin, 1/16 LD at the released width: computed whole and split.
        # The forward's optional (B, S_text) text mask (no pipeline passes one) becomes the processor's additive
        # (m[q] * m[k] > 0).to(query dtype) over cat(text, image): query-dependent, so the exchange refuses it
        # (NotImplementedError naming the module).
        {"transformer_blocks.*": _COGVIEW4},
        # norm_out(hidden_states, temb) -> proj_out -> unpatchify; patch_embed returns (image, text), so the image-token
        # embedding is its proj.
        embed="patch_embed.proj",
    ),
    "GlmImageTransformer2DModel": SequencePlan(
        # CogView4's MMDiT block and processor (GlmImageAttnProcessor projects cat(text, image) with one to_q / to_k /
        # to_v, per-head LayerNorm on Q and K, rotary on the image part only), with its own modulation (norm1.linear of
        # the model's conditioning, no SiLU module: the same for every chunk) and the same optional (B, S_text) text
        # mask, refused as CogView4's. Rotary tables: (S_image, head_dim) fp32 cos / sin, split. The editing
        # pipeline runs the condition images through the blocks with a KV cache in "write" mode, then denoises with
        # it in "read" mode; those calls run whole (runs_whole). Text-to-image passes a cache with no mode (or
        # "skip"), which the processor ignores. Not in diffusers' TransformerBlockRegistry. No _cp_plan.
        {
            "transformer_blocks.*": dataclasses.replace(
                _COGVIEW4,
                metadata=TransformerBlockMetadata(return_hidden_states_index=0, return_encoder_hidden_states_index=1),
                runs_whole=_glm_image_cache_in_use,
            )
        },
        # norm_out(hidden_states, temb) -> proj_out -> unpatchify (the default tail / gather). The image tokens are
        # image_projector's output plus the prior tokens' embedding projected by prior_projector.
        embed="image_projector",
    ),
    "ConsisIDTransformer3DModel": SequencePlan(
        # CogVideoX's blocks (ConsisIDBlock is a copy of CogVideoXBlock, not in diffusers' TransformerBlockRegistry):
        # CogVideoXAttnProcessor2_0 projects cat(text, image) with one to_q / to_k / to_v, rotary on the image part
        # only, and exchanges K/V. The identity conditioning runs at model level: after every cross_attn_interval-th
        # block the model adds perceiver_cross_attention[i](face_tokens, video_tokens) to the video tokens. Its queries
        # are the video tokens and its keys / values only the LFE_num_querie face tokens (its own matmul + softmax, no
        # dispatch call), so it is chunk-local: a block with no whole-sequence attention that returns an update. Its
        # key/value side (norm1 and to_kv of the face tokens) is the same for every chunk: computed once per call. The
        # text stream never sees it. Rotary tables come from the pipeline, (S_image, head_dim) fp32 cos / sin: split. No
        # _cp_plan.
        {
            "transformer_blocks.*": dataclasses.replace(_COGVIDEOX, metadata=TransformerBlockMetadata(
                return_hidden_states_index=0, return_encoder_hidden_states_index=1)),
            "perceiver_cross_attention.*": BlockPlan(
                inputs={"hidden_states": _IMAGE_TOKENS},  # forward(image_embeds, hidden_states): image_embeds whole
                conditioning=("norm1", "to_kv"),  # LayerNorm + K/V projection of the face tokens
                metadata=TransformerBlockMetadata(return_hidden_states_index=0),
                returns_update=True,
            ),
        },
        # cat(text, image) -> norm_final -> image slice -> norm_out(hidden, temb) -> proj_out -> unpatchify, as
        # CogVideoX.
        tail="norm_final",
        # patch_embed gives cat(text, image); embedding_dropout (identity in eval) returns that same tensor. Named as an
        # embedding too, so that it is not a replayed conditioning module: replay would keep its output (the embedding,
        # 1 LD) alive through the block pass, and after the first face cross-attention the residual stream is a new
        # tensor (hidden + scale * update), so the kept embedding would be 1 LD on top of it.
        embed=("patch_embed", "embedding_dropout"),
    ),
    "CogView3PlusTransformer2DModel": SequencePlan(
        # One kind of MMDiT block (CogView3PlusTransformerBlock, not in diffusers' TransformerBlockRegistry: returns
        # (hidden_states, encoder_hidden_states)). Its attn1 is CogVideoX's: CogVideoXAttnProcessor2_0 projects
        # cat(text, image) with one to_q / to_k / to_v (per-head LayerNorm on Q and K), no rotary (image_rotary_emb is
        # never passed), no mask. norm1 (CogView3PlusAdaLayerNormZeroTextImage) computes all twelve modulations of both
        # streams from the model's emb (SiLU -> linear): the same for every chunk. The FeedForward runs over cat(text,
        # image) token-wise. The position table is added in patch_embed, before the blocks. No _cp_plan.
        {
            "transformer_blocks.*": BlockPlan(
                inputs={"hidden_states": _IMAGE_TOKENS, "encoder_hidden_states": _TEXT_TOKENS},  # emb: (B, D_t), whole
                attention={"attn1": JointAttention(order=("text", "image"))},  # one projection for cat(text, image)
                conditioning=_adaptive_norms("norm1"),
                metadata=TransformerBlockMetadata(return_hidden_states_index=0, return_encoder_hidden_states_index=1),
            )
        },
        # norm_out(hidden_states, emb) -> proj_out -> unpatchify (the default tail / gather); patch_embed returns
        # cat(text, image) with the position table added, which the model slices into the two streams, as CogVideoX.
        embed="patch_embed",
    ),
}
