"""EasyAnimate."""

from __future__ import annotations


from ._vocabulary import (
    _IMAGE_TOKENS,
    _TEXT_FIRST,
    _TEXT_TOKENS,
    BlockPlan,
    SequencePlan,
    SequenceSplit,
    _adaptive_norms,
    _pair,
    _returns_image_stream_first,
)

PLANS: dict[str, SequencePlan] = {
    "EasyAnimateTransformer3DModel": SequencePlan(
        # Two kinds of block share one class: the first ``mmdit_layers`` are MMDiT (add_q/k/v_proj with their own
        # LayerNorms for the text, to_add_out, txt_ff); the later ones (V5.1 7B: 18 of 36; 12B: none) project
        # cat(text, video) with to_q / to_k / to_v and run ``ff`` on both streams. EasyAnimateAttnProcessor2_0 puts
        # the text first in either case, rotates the video part of Q and K in place and calls
        # F.scaled_dot_product_attention itself, with no mask (the forward takes none). The projections a kind lacks
        # are simply absent, so one JointAttention serves both. The modulation (norm1 / norm2:
        # EasyAnimateLayerNormZero's SiLU + linear of temb) is the same for every chunk. No _cp_plan; the block class
        # is not in diffusers' TransformerBlockRegistry and returns (video, text).
        {
            "transformer_blocks.*": BlockPlan(
                inputs={
                    "hidden_states": _IMAGE_TOKENS,
                    "encoder_hidden_states": _TEXT_TOKENS,
                    "image_rotary_emb": _pair(SequenceSplit(0, 2)),  # (S_video, head_dim) fp32 cos / sin
                },
                attention={"attn1": _TEXT_FIRST},
                conditioning=_adaptive_norms("norm1", "norm2"),
                metadata=_returns_image_stream_first(),
            )
        },
        # norm_final (LayerNorm) -> norm_out(hidden_states, temb) (AdaLayerNorm: per-token) -> proj_out -> unpatchify,
        # all on the video tokens alone: the tail runs chunk by chunk, gathered at proj_out (the default gather).
        tail="norm_final",
        # The video-token embedding: a Conv2d over (B x F', C, H, W), reshaped to tokens by the forward.
        embed="proj",
    ),
}
