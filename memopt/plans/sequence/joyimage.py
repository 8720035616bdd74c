"""JoyAI-Image-Edit and JoyAI-Image-Edit-Plus."""

from __future__ import annotations

from typing import Any, Callable


from ._vocabulary import (
    _IMAGE_TOKENS,
    _TEXT_TOKENS,
    BlockPlan,
    ChunkValue,
    JointAttention,
    SequencePlan,
    SequenceSplit,
    _pair,
    _returns_image_stream_first,
)


def _joyimage_rope_rows(argument: Callable[[str], Any], rows: tuple[int, int], tokens: int) -> Any:
    """The chunk's rows of ``image_rotary_emb = ((cos, sin), text_tables)``: the model's ``(S_image, head_dim)``
    fp32 image tables, cut to the chunk's image tokens (a nested tuple, which a :class:`SequenceSplit` cannot reach).
    The released ``rope_type="rope"`` gives no text tables; ``"mrope"`` gives ``(S_text, head_dim)`` ones for the
    text stream, whose chunk rows this builder is not told: refused, never computed wrong."""
    value = argument("image_rotary_emb")
    if value is None:
        return None
    (cos, sin), text = value
    if text is not None:
        raise ValueError("JoyImageEditTransformer3DModel with rope_type='mrope' (rotary tables for the text tokens) "
                         "cannot run in sequence chunks: the plan cuts only the image tables; use rope_type='rope' "
                         "(the release) or apply_chunked_feedforward / apply_chunked_attention")
    start, end = rows
    if cos.shape[0] != tokens:
        raise ValueError(f"image_rotary_emb: expected ({tokens}, head_dim) image tables, got {tuple(cos.shape)}")
    return (cos[start:end], sin[start:end]), None


# JoyImageAttnProcessor: each stream computes Q, K, V in one fused linear ([Q | K | V] column blocks of width D, cut
# by .chunk(3, -1)), RMS-norms Q and K per head, rotates the image Q and K with the model's (S_image, head_dim) fp32
# tables and makes one dispatch_attention_fn call over cat(image, text) without mask, whose K/V the exchange
# gathers. The fused linears carry no _tp_packed_col_blocks, so the plan gives their (equal) column blocks
# (JointAttention.fused_blocks): a collection pass computes only the K and V columns, the final pass only the Q ones.
_JOYIMAGE_ATTENTION = JointAttention(
    order=("image", "text"),
    query=(),
    key_value=(),
    query_norms=("img_attn_q_norm", "txt_attn_q_norm"),
    key_value_norms=("img_attn_k_norm", "txt_attn_k_norm"),
    fused={"img_attn_qkv": ("query", "key_value", "key_value"), "txt_attn_qkv": ("query", "key_value", "key_value")},
    fused_blocks={"img_attn_qkv": (1, 1, 1), "txt_attn_qkv": (1, 1, 1)},
)

PLANS: dict[str, SequencePlan] = {
    "JoyImageEditTransformer3DModel": SequencePlan(
        # Dual-stream blocks only; the modulation is a per-block table plus the model's (B, 6, D) timestep
        # projection, passed whole (JoyImageModulate: an addition, no matmul to reuse). Multi-item (editing) input is
        # flattened by the model into one token sequence before the blocks, so it is split like any other.
        {
            "double_blocks.*": BlockPlan(
                inputs={
                    "hidden_states": _IMAGE_TOKENS,
                    "encoder_hidden_states": _TEXT_TOKENS,
                    "image_rotary_emb": ChunkValue(_joyimage_rope_rows),
                },
                attention={"attn": _JOYIMAGE_ATTENTION},
                metadata=_returns_image_stream_first(),  # not in diffusers' block registry
            )
        },
        # proj_out(norm_out(img)) (LayerNorm without modulation, linear): per token, gathered at proj_out, then
        # unpatchified whole. img_in (Conv3d patch embedding) is the image embedding. No _cp_plan in diffusers 0.42.
        embed="img_in",
        # A chunk keeps both streams' fused QKV (3D wide), the attention and a 4x MLP: 32 chunks measure 3.50 LD per
        # token (growth), 48 chunks 3.375.
        num_chunks=48,
    ),
    "JoyImageEditPlusTransformer3DModel": SequencePlan(
        # JoyImageEditPlusAttnProcessor: JoyAI-Image-Edit's, with the model's batched rotary tables ((B, S_image,
        # head_dim) fp32 cos / sin: each sample's items get their own grids and temporal offsets, padding rows cos 1 /
        # sin 0) on the image Q and K only, and the (B, 1, 1, S_image + S_text) boolean key mask the model builds from
        # shape_list (padded patches False) and the text mask, passed to its one dispatch_attention_fn call over
        # cat(image, text): a key mask, which the exchange gathers (padded patches still attend as queries, as
        # unchunked). The image stream is the padded patch sequence (target, then references), split like any other.
        {
            "double_blocks.*": BlockPlan(
                inputs={
                    "hidden_states": _IMAGE_TOKENS,
                    "encoder_hidden_states": _TEXT_TOKENS,
                    "image_rotary_emb": _pair(SequenceSplit(1, 3)),  # (B, S_image, head_dim) cos / sin
                    "attention_mask": SequenceSplit(3, 4, ("image", "text")),  # (B, 1, 1, S_image + S_text) key mask
                },
                attention={"attn": _JOYIMAGE_ATTENTION},
                metadata=_returns_image_stream_first(),  # not in diffusers' block registry
            )
        },
        # proj_out(norm_out(img)) (LayerNorm without modulation, linear): per token, gathered at proj_out, then reshaped
        # to (B, max_patches, C, pt, ph, pw) whole. img_in (Conv3d over each (C, 1, 2, 2) patch) is the image embedding.
        # The rotary tables are built per sample in the model forward (no module): computed whole and split (1/32 LD).
        # No _cp_plan in diffusers 0.42.
        embed="img_in",
        # A chunk keeps both streams' fused QKV (3D wide), the attention and a 4x MLP: 32 chunks measure 3.50 LD per
        # token (growth), 48 chunks 3.375.
        num_chunks=48,
    ),
}
