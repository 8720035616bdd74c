"""ERNIE-Image."""

from __future__ import annotations

from diffusers.hooks._helpers import TransformerBlockMetadata
from diffusers.models._modeling_parallel import ContextParallelOutput

from ._vocabulary import BlockPlan, BroadcastTable, JointAttention, SequencePlan, SequenceSplit

# The model runs its blocks sequence-first: x is (S, B, D), the unified [image | text] sequence of each sample (the
# text padded to the longest prompt), one plain self-attention over it, so (as for Z-Image) the "image" stream here is
# the block's whole sequence, split on dim 0. ErnieImageSharedAdaLNBlock permutes it to (B, S, D) for
# ErnieImageAttention, whose processor projects with to_q / to_k / to_v, RMS-norms Q and K per head, rotates them
# with the (B, S, 1, head_dim) fp32 table and passes the (B, 1, 1, S) boolean key mask (True = image or valid text
# token) to dispatch_attention_fn, which the exchange gathers: a key mask, so padded text queries attend like the
# others. The six modulation tensors are (S, B, D) each: the model expands the per-sample adaLN output to every
# token and makes it contiguous (6 LD through every block); that expansion is deferred (BroadcastTable on
# adaLN_modulation, tokens on dim 0) and each chunk gets its rows, cut like x. No _cp_plan; the block class is not in
# diffusers' TransformerBlockRegistry.
_SEQUENCE_FIRST = SequenceSplit(0, 3)
_ERNIE_IMAGE = BlockPlan(
    inputs={
        "x": _SEQUENCE_FIRST,
        "rotary_pos_emb": SequenceSplit(1, 4),  # (B, S, 1, head_dim) fp32
        "temb": (_SEQUENCE_FIRST,) * 6,  # [shift, scale, gate] x [attention, MLP], (S, B, D) each
        "attention_mask": SequenceSplit(3, 4),  # (B, 1, 1, S) bool
    },
    attention={"self_attention": JointAttention()},
    metadata=TransformerBlockMetadata(return_hidden_states_index=0, hidden_states_argument_name="x"),
)

PLANS: dict[str, SequencePlan] = {
    "ErnieImageTransformer2DModel": SequencePlan(
        {"layers.*": _ERNIE_IMAGE},
        # final_norm(x, c) (LayerNorm, then scale / shift from the timestep embedding c: per token) -> final_linear ->
        # [:N_img] -> unpatchify, on the sequence-first (S, B, D) output of the last block. The model-level tail passes
        # cut and gather batch-first streams, so the head runs as Kandinsky 5's does: final_norm once, on pieces of its
        # (S, B, D) input along dim 0, gathered along dim 0 (its temporaries then one piece's). final_linear (D -> 128
        # channels) runs whole on the gathered output.
        tail="final_norm",
        gather={"final_norm": ContextParallelOutput(gather_dim=0, expected_dims=3)},
        tail_split=0,
        producers={"adaLN_modulation": BroadcastTable(0)},
        num_chunks=32,
    ),
}
