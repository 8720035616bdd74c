"""Z-Image, Lumina-Image 2.0 and Bria FIBO 2."""

from __future__ import annotations

from typing import Any, Callable

import torch
from diffusers.hooks._helpers import TransformerBlockMetadata
from diffusers.models._modeling_parallel import ContextParallelOutput

from ._vocabulary import (
    _IMAGE_TOKENS,
    BlockPlan,
    JointAttention,
    ProducerCall,
    SequencePlan,
    SequenceSplit,
    TokenProducer,
    TokenRanges,
    _adaptive_norms,
)


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


# One block class, three uses: context_refiner (caption tokens, unmodulated, with the caption's (B, L) token mask),
# noise_refiner (image tokens, timestep-modulated, no mask) and layers (each sample's [valid caption | image] tokens,
# padded to the longest sample, with a (B, S) bool mask only when the lengths differ). Each is a plain self-attention
# over its own (B, S, D) sequence: the "image" stream here is just the block's sequence. Lumina2AttnProcessor2_0
# projects it with to_q / to_k / to_v (GQA: fewer K/V heads, repeated to the query heads before the kernel), RMS-norms
# Q and K per head, applies the complex rotary table (B, S, head_dim / 2), one row per token, and calls
# F.scaled_dot_product_attention itself with the token mask viewed as a key mask (B, 1, 1, S). The (B, S) token mask
# (the caption's int64 tokenizer mask in the context refiner, the joint bool mask in the layers, None elsewhere) is
# not split: every chunk gets it whole, so its kernel call's mask already covers every key and the exchange passes it
# on with the gathered K/V (B x S bools, nothing to gather). Padded queries attend to the valid keys like the others
# (a key mask, not a padding mask): nothing query-dependent. Proportional attention (base_sequence_length, which would
# read the chunk's length) is never passed by the block. No _cp_plan.
_LUMINA2 = BlockPlan(
    inputs={
        "hidden_states": _IMAGE_TOKENS,
        "image_rotary_emb": SequenceSplit(1, 3),  # (B, S, head_dim / 2) complex128 (the model's tables are fp64)
    },
    attention={"attn": JointAttention()},
    conditioning=_adaptive_norms("norm1"),  # LuminaRMSNormZero's silu + linear of temb (B, 1024); absent in context
    # Lumina2TransformerBlock is not in diffusers' TransformerBlockRegistry; it returns the hidden states alone.
    metadata=TransformerBlockMetadata(return_hidden_states_index=0),
)

# Lumina2RotaryPosEmbed returns (patchified latents, caption table, image table, joint table, caption lengths, joint
# lengths); the three complex128 tables (B, tokens, head_dim / 2) live through the whole forward (0.33 LD at the
# release in bf16). A token's row is the concatenation of the per-axis rows of its (axis-0, row, column) position:
# caption token t of sample i is (t, 0, 0), its image token k (caption_i, k // W, k % W), a padding position (0, 0, 0)
# in the joint table and a zero row in the caption table. Each chunk's rows are rebuilt from the caption lengths
# (mask sums, kept as tensors: no value is read, so the rows also trace under FakeTensorMode) by the module's own
# gather, the same numbers.
def _lumina2_rows(table: str) -> Callable[[torch.nn.Module, ProducerCall, Callable[..., Any]],
                                          Callable[[TokenRanges], torch.Tensor]]:
    def rows(rope: torch.nn.Module, call: ProducerCall, forward: Callable[..., Any]) -> Callable[[TokenRanges], Any]:
        hidden, mask = call["hidden_states"], call["attention_mask"]
        width = hidden.shape[-1] // rope.patch_size
        image = hidden.shape[-2] // rope.patch_size * width
        caption = mask.sum(dim=1, keepdim=True).to(torch.int64)  # (B, 1)

        def rows_of(ranges: TokenRanges) -> torch.Tensor:
            tokens = torch.cat([torch.arange(start, end, device=hidden.device) for start, end in ranges])[None]
            if table == "image":
                patch = tokens.expand(caption.shape[0], -1)
                axis0, valid = caption.expand_as(patch), None
            else:
                patch = tokens - caption  # (B, T): the image patch index past the caption
                in_caption = tokens < caption
                in_image = ~in_caption & (patch < image)
                axis0 = torch.where(in_caption, tokens, torch.where(in_image, caption, 0))
                patch = torch.where(in_image, patch, 0)
                valid = in_caption
            ids = torch.stack([axis0, patch // width, patch % width], dim=-1)
            if table != "image":
                ids = torch.where((valid | in_image)[..., None], ids, 0)
            freqs = rope._get_freqs_cis(ids)
            if table == "caption":  # the model's caption table is zero past each caption
                freqs = torch.where(valid[..., None], freqs, torch.zeros((), dtype=freqs.dtype, device=freqs.device))
            return freqs

        return rows_of

    return rows


def _from_table(module: torch.nn.Module, call: ProducerCall) -> int:
    raise RuntimeError("a TokenProducer with an output index takes its token count from the computed table")


_LUMINA2_ROPE = tuple(TokenProducer(_from_table, _lumina2_rows(table), output=index)
                      for index, table in ((1, "caption"), (2, "image"), (3, "joint")))


# One block class (Z-Image's), two uses: noise_refiner (the image tokens, then any context-image tokens) and layers
# (the gist tokens then the image and context tokens; the gist tokens last when the batch pads them). Its self-attention
# is a plain one over the block's own (B, S, D) sequence, the "image" stream here: to_q / to_k / to_v, RMS-norms of Q
# and K per head, the complex rotary table (1, S, head_dim / 2), and the (B, S) bool key mask of padded gist tokens
# (None otherwise), viewed as [:, None, None, :]: a key mask, gathered by the exchange. The modulation is per token
# when noise_mask is given (always in the layers, with context images in the refiner): adaLN_modulation of the noisy
# and of the clean timestep embedding, picked per token by the (B, S) noise mask, which is split with the tokens.
# The injection layers add a gated cross-attention from the chunk's tokens to the whole text (chunk-local, its K/V
# computed once per block forward). The Perceiver (gist tokens reading the text) runs at model level, whole (gist
# tokens: 256-512). Not in diffusers' TransformerBlockRegistry; its forward calls the hidden states x. No _cp_plan.
_FIBO2 = BlockPlan(
    inputs={
        "x": _IMAGE_TOKENS,
        "attn_mask": SequenceSplit(1, 2),  # (B, S) bool, True = valid token (padded gist tokens only)
        "freqs_cis": SequenceSplit(1, 3),  # (1, S, head_dim / 2) complex64, one row per token
        "noise_mask": SequenceSplit(1, 2),  # (B, S) long, per-token choice of the noisy / clean modulation
    },
    attention={"attention": JointAttention()},
    conditioning=("adaLN_modulation",),  # Linear of the timestep embedding (B, 256) -> (B, 4D)
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
    "Lumina2Transformer2DModel": SequencePlan(
        {"context_refiner.*": _LUMINA2, "noise_refiner.*": _LUMINA2, "layers.*": _LUMINA2},
        # LuminaLayerNormContinuous(x, temb): silu + linear_1 of temb (a per-sample scale), LayerNorm, then the output
        # projection linear_2; the unpatchify after it slices each sample's image tokens from the gathered output.
        tail="norm_out",
        gather={"norm_out.linear_2": ContextParallelOutput(gather_dim=1, expected_dims=3)},
        # The tail passes rebuild the joint sequence from stand-ins (the blocks answer from the kept output).
        embed=("x_embedder", "time_caption_embed.caption_embedder"),
        producers={"rope_embedder": _LUMINA2_ROPE},  # needs core.patch (TokenProducer.output)
        num_chunks=48,  # 32 gives 3.51 LD/token of growth, 48 below 3.5 (the FF workspace: inner 4D, fp32 SiLU)
    ),
    "BriaFibo2Transformer2DModel": SequencePlan(
        {"noise_refiner.*": _FIBO2, "layers.*": _FIBO2},
        # FinalLayer(x, c): LayerNorm, a per-sample scale from c, linear, on the image tokens of the last layer's output
        # (a view dropping the gist tokens before them, or the padded gist and context tokens after them); the model
        # unpatchifies the gathered output.
        tail="final_layer",
        gather={"final_layer.linear": ContextParallelOutput(gather_dim=1, expected_dims=3)},
        embed="x_embedder",
        # The layers always modulate per token (noise_mask): four (B, S, D) tables picked by torch.where per block, on
        # top of the SwiGLU FFN's 2 x 8/3 D. Measured growth (width 128): 32 chunks 3.85 LD/token, 64 3.57, 96 3.48.
        num_chunks=96,
    ),
}
