"""PRX (Photoroom)."""

from __future__ import annotations

from diffusers.hooks._helpers import TransformerBlockMetadata
from diffusers.models._modeling_parallel import ContextParallelOutput

from ._vocabulary import _IMAGE_TOKENS, _TEXT_TOKENS, BlockPlan, JointAttention, SequencePlan, SequenceSplit

PLANS: dict[str, SequencePlan] = {
    "PRXTransformer2DModel": SequencePlan(
        # Image-only blocks that attend over cat(text, image) keys: PRXAttnProcessor2_0 projects the image tokens with
        # one fused img_qkv_proj (Q, K, V thirds, no _tp_packed_col_blocks), the text tokens with txt_kv_proj (K, V
        # only: the text makes no queries and the block returns the image tokens alone), RMS-norms Q, K and the text
        # K, rotates the image Q and K with the (B, 1, S_image, head_dim / 2, 2, 2) fp32 table, and makes one
        # dispatch_attention_fn call under the (B, 1, 1, S_text + S_image) boolean key mask made from the pipeline's
        # (B, S_text) text mask (image keys valid), which the exchange gathers. The text stream is the model's
        # txt_in output, the same tensor for every block and never updated: every chunk carries it whole
        # (split_text=False), and its K/V projection, like the timestep modulation, runs once per block
        # (conditioning). The MLP is inline (gate / up / down projections, no FeedForward module). Not in diffusers'
        # TransformerBlockRegistry. No _cp_plan.
        {
            "blocks.*": BlockPlan(
                inputs={
                    "hidden_states": _IMAGE_TOKENS,
                    "encoder_hidden_states": _TEXT_TOKENS,
                    "image_rotary_emb": SequenceSplit(2, 6),
                    "attention_mask": SequenceSplit(1, 2, ("text",)),  # (B, S_text) boolean text mask
                },
                attention={
                    "attention": JointAttention(
                        order=("text", "image"),
                        query=(),
                        key_value=("txt_kv_proj",),
                        fused={"img_qkv_proj": ("query", "key_value", "key_value")},
                        fused_blocks={"img_qkv_proj": (1, 1, 1)},
                    )
                },
                split_text=False,
                conditioning=("modulation", "attention.txt_kv_proj"),
                metadata=TransformerBlockMetadata(return_hidden_states_index=0),
            )
        },
        # final_layer(img, vec): its adaLN modulation of vec, LayerNorm and the per-token projection, then seq2img.
        tail="final_layer",
        gather={"final_layer": ContextParallelOutput(gather_dim=1, expected_dims=3)},
        embed="img_in",
    ),
}
