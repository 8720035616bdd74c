"""OmniGen."""

from __future__ import annotations

from diffusers.hooks._helpers import TransformerBlockMetadata

from ._vocabulary import _IMAGE_TOKENS, BlockPlan, JointAttention, SequencePlan, SequenceSplit, _pair

# One sequence [text | time token | image] is the blocks' only ("image") stream. OmniGenAttnProcessor2_0 projects it
# with to_q / to_k / to_v, rotates Q and K with the model's (S, head_dim) cos / sin (made from sample 0's positions)
# and calls F.scaled_dot_product_attention itself (memopt intercepts the direct call) with the model's (B, 1, S, S)
# additive mask: causal over the text, bidirectional over the image, so it depends on the query; the plan cuts its
# query rows (dim 2) and the exchange passes a chunk's rows over all keys on. The block returns the hidden states
# alone; not in diffusers' TransformerBlockRegistry; no _cp_plan.
_OMNIGEN = BlockPlan(
    inputs={
        "hidden_states": _IMAGE_TOKENS,
        "attention_mask": SequenceSplit(2, 4),
        "image_rotary_emb": _pair(SequenceSplit(0, 2)),
    },
    attention={"self_attn": JointAttention()},
    metadata=TransformerBlockMetadata(return_hidden_states_index=0),
)

PLANS: dict[str, SequencePlan] = {
    # The head (RMSNorm of every token, the image tokens kept, AdaLN, projection) runs whole.
    "OmniGenTransformer2DModel": SequencePlan({"layers.*": _OMNIGEN}, tail=None, gather=None),
}
