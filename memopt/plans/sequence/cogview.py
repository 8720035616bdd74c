"""CogVideoX and CogView4."""

from __future__ import annotations

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


PLANS: dict[str, SequencePlan] = {
    "CogVideoXTransformer3DModel": SequencePlan(
        {
            "transformer_blocks.*": BlockPlan(
                inputs={
                    "hidden_states": _IMAGE_TOKENS,
                    "encoder_hidden_states": _TEXT_TOKENS,
                    "image_rotary_emb": _pair(SequenceSplit(0, 2)),  # (S_image, head_dim) when RoPE is used
                },
                attention={"attn1": JointAttention(order=("text", "image"))},  # one projection for cat(text, image)
                conditioning=_adaptive_norms("norm1", "norm2"),
            )
        },
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
        {
            "transformer_blocks.*": BlockPlan(
                inputs={
                    "hidden_states": _IMAGE_TOKENS,
                    "encoder_hidden_states": _TEXT_TOKENS,
                    "image_rotary_emb": _pair(SequenceSplit(0, 2)),  # (S_image, head_dim) cos / sin
                    "attention_mask": SequenceSplit(1, 2, ("text",)),  # (B, S_text) text mask; image tokens valid
                },
                attention={"attn1": JointAttention(order=("text", "image"))},  # one projection for cat(text, image)
                conditioning=_adaptive_norms("norm1"),
            )
        },
        # norm_out(hidden_states, temb) -> proj_out -> unpatchify; patch_embed returns (image, text), so the image-token
        # embedding is its proj.
        embed="patch_embed.proj",
    ),
}
