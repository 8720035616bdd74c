"""AuraFlow."""

from __future__ import annotations

from diffusers.hooks._helpers import TransformerBlockMetadata

from ._vocabulary import (
    _DUAL_STREAM_MODULATION,
    _IMAGE_TOKENS,
    _TEXT_FIRST,
    _TEXT_TOKENS,
    BlockPlan,
    JointAttention,
    SequencePlan,
    _adaptive_norms,
    _returns_text_stream_first,
)


PLANS: dict[str, SequencePlan] = {
    "AuraFlowTransformer2DModel": SequencePlan(
        # SD3-like MMDiT blocks, then single DiT blocks over cat(text, image). The text stream is the 8 learned register
        # tokens followed by the projected prompt. AuraFlowAttnProcessor2_0 projects each stream (bias-free to_q / to_k
        # / to_v and add_*_proj), LayerNorms Q and K per head (fp32), concatenates cat(text, image) and calls
        # F.scaled_dot_product_attention itself, without a mask; no rotary embedding (learned positions are added by the
        # patch embedding). The timestep modulation (AdaLayerNormZero's SiLU + Linear of temb, (B, D)) is the same for
        # every chunk. Neither block class is in diffusers' TransformerBlockRegistry. No _cp_plan in diffusers 0.42.
        {
            "joint_transformer_blocks.*": BlockPlan(
                inputs={"hidden_states": _IMAGE_TOKENS, "encoder_hidden_states": _TEXT_TOKENS},
                attention={"attn": _TEXT_FIRST},
                conditioning=_DUAL_STREAM_MODULATION,
                metadata=_returns_text_stream_first(),  # (encoder_hidden_states, hidden_states)
            ),
            # The model feeds these blocks cat(register + text, image) as one sequence: one stream to them, split in
            # chunks; a plain self-attention over it.
            "single_transformer_blocks.*": BlockPlan(
                inputs={"hidden_states": _IMAGE_TOKENS},
                attention={"attn": JointAttention()},
                conditioning=_adaptive_norms("norm1"),
                metadata=TransformerBlockMetadata(return_hidden_states_index=0),
            ),
        },
        # The model drops the text tokens of the last block's output (combined[:, encoder_seq_len:]), then
        # norm_out(hidden_states, temb) (AuraFlowPreFinalBlock: scale / shift from temb) -> proj_out -> unpatchify.
        embed="pos_embed",
        # Single blocks keep attention + a 2.67x SwiGLU MLP per chunk, as Flux's single-stream ones; and the model's
        # forward keeps the last MMDiT block's image output (its `hidden_states`) alive through every single block
        # (it concatenates into `combined_hidden_states`), 1 LD above the 3 LD floor that no plan removes.
        num_chunks=48,
    ),
}
