"""Krea 2."""

from __future__ import annotations

from dataclasses import replace

from diffusers.hooks._helpers import TransformerBlockMetadata
from diffusers.models._modeling_parallel import ContextParallelOutput

from ._vocabulary import _IMAGE_TOKENS, BlockPlan, JointAttention, SequencePlan, SequenceSplit, TokenProducer, _pair
from .flux import _flux_rope_rows, _flux_rope_tokens

# Single-stream blocks over the model's cat(text, image) (the block's only, "image", stream). Krea2AttnProcessor
# projects it with to_q / to_k / to_v (GQA: K/V heads repeated to the query heads before the kernel), RMS-norms Q and K
# per head, rotates both with the (S, head_dim) fp32 cos / sin of rotary_emb(position_ids) and makes one
# dispatch_attention_fn call with the (B, 1, 1, S) boolean key mask (padded text tokens masked out as keys; every
# query row keeps valid keys, so nothing query-dependent), which the exchange gathers. The sigmoid output gate
# to_gate is computed before the kernel call but only used after it: skipped in the collection pass. The timestep
# modulation is made once at model level ((B, 1, 6D), passes whole) plus a per-block table added inline (no module
# to reuse). Not in diffusers' TransformerBlockRegistry; returns the hidden states alone. No _cp_plan.
_KREA2 = BlockPlan(
    inputs={
        "hidden_states": _IMAGE_TOKENS,
        "image_rotary_emb": _pair(SequenceSplit(0, 2)),  # rotary_emb(position_ids): (S, head_dim) cos / sin
        "attention_mask": SequenceSplit(3, 4),  # (B, 1, 1, S) bool key mask, True = valid
    },
    attention={"attn": JointAttention()},
    unused_before_attention=("attn.to_gate",),
    metadata=TransformerBlockMetadata(return_hidden_states_index=0),
)

# The text fusion's blocks: pre-norm self-attention (the same processor, no rotary tables, no modulation) and a SwiGLU,
# on text alone, before the image blocks. The refiner blocks attend across the text tokens, (B, T, 2560), with the
# (B, 1, 1, T) key mask. The layerwise blocks attend across the tapped-layer axis of every text token, a (B x T, 12,
# 2560) sequence without mask, split along those 12 entries (the exchange gathers the 12 K/V; a chunk is one or more
# tapped layers of every text token). Their input is encoder_hidden_states.reshape(...).contiguous(), a view of the
# model's own input (which the pipeline passes again at every step), so their output must not be written over it
# (input_is_view, core.patch). Unchunked, they peak above the chunked image blocks at 1024 x 1024: 7.5 LD vs 3.9 LD.
_TEXT_FUSION = BlockPlan(
    inputs={"hidden_states": _IMAGE_TOKENS, "attention_mask": SequenceSplit(3, 4)},
    attention={"attn": JointAttention()},
    unused_before_attention=("attn.to_gate",),
    metadata=TransformerBlockMetadata(return_hidden_states_index=0),
)


PLANS: dict[str, SequencePlan] = {
    "Krea2Transformer2DModel": SequencePlan(
        {"transformer_blocks.*": _KREA2, "text_fusion.layerwise_blocks.*": replace(_TEXT_FUSION, input_is_view=True),
         "text_fusion.refiner_blocks.*": _TEXT_FUSION},
        # The model keeps hidden_states[:, text:] (a view: the tail chunks cover the image tokens) and runs final_layer
        # (RMSNorm, (B, 1, D) scale / shift, linear): per token, gathered at its linear. The text fusion, txt_in and the
        # timestep layers are replayed from the block pass; img_in is the image embedding.
        tail="final_layer",
        gather={"final_layer.linear": ContextParallelOutput(gather_dim=1, expected_dims=3)},
        embed="img_in",
        producers={"rotary_emb": TokenProducer(_flux_rope_tokens, _flux_rope_rows)},  # FluxPosEmbed's copy: ids -> rows
    ),
}
