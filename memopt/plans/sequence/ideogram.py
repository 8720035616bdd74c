"""Ideogram 4."""

from __future__ import annotations

from diffusers.hooks._helpers import TransformerBlockMetadata

from ._vocabulary import _IMAGE_TOKENS, BlockPlan, JointAttention, SequencePlan, SequenceSplit, _pair

# One packed sequence, [left padding | text | image], is the blocks' only ("image") stream: the model adds the text
# features into the text slots before the blocks. Ideogram4AttnProcessor projects it with to_q / to_k / to_v,
# RMS-norms Q and K per head, rotates both with the (B, S, head_dim) cos / sin of the model's MRoPE and makes one
# dispatch_attention_fn call with the model's (B, 1, S, S) boolean block-diagonal mask (segment_ids[q] ==
# segment_ids[k]: padding attends to padding, text and image to each other). That mask depends on the query, so the
# plan cuts its query rows (dim 2) and the exchange passes a chunk's rows over all keys on with the gathered K/V.
# adaln_input is (B, 1, adaln_dim) for one timestep per sample (passes whole: dim 1 of size 1) and (B, S, adaln_dim)
# for a per-token timestep (split). The block returns the hidden states alone. Not in diffusers'
# TransformerBlockRegistry; no _cp_plan.
_IDEOGRAM4 = BlockPlan(
    inputs={
        "hidden_states": _IMAGE_TOKENS,
        "attention_mask": SequenceSplit(2, 4),
        "image_rotary_emb": _pair(SequenceSplit(1, 3)),
        "adaln_input": SequenceSplit(1, 3),
    },
    attention={"attention": JointAttention()},
    conditioning=("adaln_modulation",),  # on adaln_input, the same (B, 1, adaln_dim) in every chunk: computed once
    metadata=TransformerBlockMetadata(return_hidden_states_index=0),
)

PLANS: dict[str, SequencePlan] = {
    # The output head (final_layer: LayerNorm, AdaLN scale, linear to the latent channels) runs whole: chunking it
    # needs the model forward replayed per chunk, which would keep the text features' RMSNorm output (B, S,
    # llm_features_dim), 11.6 LD at the release's width, alive through the blocks. Whole, it adds the LayerNorm output
    # and its scaled copy over the residual stream, about what a chunked block holds.
    # The text features' RMSNorm (fp32 inside) and projection from llm_features_dim to the width, each token alone and
    # the norm's output read only by the projection: a token chain, so their wide intermediates exist a chunk at a time.
    "Ideogram4Transformer2DModel": SequencePlan({"layers.*": _IDEOGRAM4}, tail=None, gather=None,
                                                token_chains=(("llm_cond_norm", "llm_cond_proj"),)),
}
