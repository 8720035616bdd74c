"""Z-Image."""

from __future__ import annotations

from diffusers.hooks._helpers import TransformerBlockMetadata
from diffusers.models._modeling_parallel import ContextParallelOutput

from ._vocabulary import _IMAGE_TOKENS, BlockPlan, JointAttention, SequencePlan, SequenceSplit


# One block class, three uses: noise_refiner (image tokens, timestep-modulated), context_refiner (caption tokens, no
# modulation) and layers (the unified [image | caption] sequence of each sample, padded to the longest; omni mode:
# [caption | images | SigLIP]). Each is a plain self-attention over its own (B, S, D) sequence, whatever the tokens
# are: the "image" stream here is just the block's sequence. ZSingleStreamAttnProcessor projects it with to_q / to_k /
# to_v, RMS-norms Q and K per head, applies the complex rotary tables and turns the (B, S) boolean token mask (None when
# every sample has the same length) into the key mask [:, None, None, :], which the exchange gathers. Padded queries
# attend to the valid keys like the others (a key mask, not a padding mask), so nothing query-dependent. No _cp_plan.
_ZIMAGE = BlockPlan(
    inputs={
        "x": _IMAGE_TOKENS,
        "attn_mask": SequenceSplit(1, 2),  # (B, S) bool, True = valid token
        "freqs_cis": SequenceSplit(1, 3),  # (B, S, head_dim / 2) complex64, one row per token (the model pads them too)
        "noise_mask": SequenceSplit(1, 2),  # omni: (B, S) long, per-token choice of the noisy / clean modulation
    },
    attention={"attention": JointAttention()},
    conditioning=("adaLN_modulation",),  # Linear of the timestep embedding (B, 256) -> (B, 4D), absent in refiners
    # diffusers' TransformerBlockRegistry lists ZImageTransformerBlock, but under the default argument name
    # "hidden_states"; its forward calls it x.
    metadata=TransformerBlockMetadata(return_hidden_states_index=0, hidden_states_argument_name="x"),
)


PLANS: dict[str, SequencePlan] = {
    "ZImageTransformer2DModel": SequencePlan(
        {"noise_refiner.*": _ZIMAGE, "context_refiner.*": _ZIMAGE, "siglip_refiner.*": _ZIMAGE,
         "layers.*": _ZIMAGE},
        # FinalLayer(unified, c) for the released patch size 2 (all_patch_size=(2,), all_f_patch_size=(1,)): LayerNorm,
        # scale from c, linear; the unpatchify after it slices each sample's image tokens from the gathered output.
        tail="all_final_layer.2-1",
        gather={"all_final_layer.2-1.linear": ContextParallelOutput(gather_dim=1, expected_dims=3)},
        # The tail passes rebuild the unified sequence from stand-ins (the blocks answer from the kept output).
        embed=("all_x_embedder.2-1", "cap_embedder"),
        tail_inputs={"noise_mask": SequenceSplit(1, 2)},  # omni: FinalLayer's per-token scale choice
    ),
}
