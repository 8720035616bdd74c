"""PixArt-Sigma, PixArt-Alpha, Allegro, Latte and DiT."""

from __future__ import annotations

from typing import Any, Callable

import torch
from diffusers.hooks._helpers import TransformerBlockMetadata
from diffusers.models._modeling_parallel import ContextParallelOutput

from ._vocabulary import (
    _IMAGE_TOKENS,
    BlockPlan,
    ChunkValue,
    JointAttention,
    SequencePlan,
    SequenceSplit,
    _adaptive_norms,
)


def _pixart_cross_attention_has_text(block: torch.nn.Module, argument: Callable[[str], Any]) -> bool:
    """Refuses a forward without text states (only possible with ``caption_channels=None``): BasicTransformerBlock's
    attn2 then attends over the image tokens themselves, a second whole-sequence attention that a chunk would compute
    over its own tokens only. With text (every pipeline) attn2 is chunk-local and attn1 attends over all tokens."""
    if block.attn2 is not None and argument("encoder_hidden_states") is None:
        raise NotImplementedError(
            f"{type(block).__name__}: sequence chunking needs encoder_hidden_states; without them attn2 becomes a "
            "self-attention over the whole image sequence. Pass text states, or run without apply_sequence_chunking."
        )
    return True


def _allegro_rotary_rows(argument: Callable[[str], Any], rows: tuple[int, int], tokens: int) -> Any:
    """The chunk's ``image_rotary_emb``: AllegroPipeline passes ``((t, h, w) (cos, sin) tables per position, (t, h, w)
    (1, S) int64 token positions)``; apply_rotary_emb_allegro looks each token's rows up by its positions, so a chunk
    takes the whole tables and its own columns of the three position rows (views). A nested tuple no SequenceSplit
    entry can describe."""
    value = argument("image_rotary_emb")
    if value is None:
        return None
    tables, positions = value
    if len(positions) != 3 or any(p.shape[-1] != tokens for p in positions):
        raise ValueError(f"AllegroTransformerBlock input 'image_rotary_emb': expected three (1, {tokens}) position "
                         f"rows, got {[tuple(p.shape) for p in positions]}")
    start, end = rows
    return tables, tuple(p[..., start:end] for p in positions)


PLANS: dict[str, SequencePlan] = {
    "PixArtTransformer2DModel": SequencePlan(
        # diffusers' generic BasicTransformerBlock with norm_type="ada_norm_single": LayerNorm + shift / scale from the
        # block's scale_shift_table and the model's (B, 6D) timestep embedding (the same for every chunk, passed whole),
        # self-attention attn1 (AttnProcessor2_0, which calls F.scaled_dot_product_attention itself), cross-attention
        # attn2 to the projected T5 tokens under the (B, 1, S_text) bias the model makes from encoder_attention_mask
        # (keys and values from the text only: chunk-local, its K/V projections computed once per block), a gelu-tanh
        # FeedForward. No _cp_plan in diffusers 0.42.
        {
            "transformer_blocks.*": BlockPlan(
                inputs={
                    "hidden_states": _IMAGE_TOKENS,
                    # The forward's optional (B, S) self-attention mask (no pipeline passes one), turned by the model
                    # into a (B, 1, S) additive key bias: attn1's mask over the chunk's own keys, which the exchange
                    # gathers.
                    "attention_mask": SequenceSplit(2, 3),
                },
                # attn1 always attends over the whole sequence; the check refuses the one case where attn2 would too.
                attention={"attn1": JointAttention(active=_pixart_cross_attention_has_text)},
            )
        },
        # The model computes shift / scale ((B, 1, D) each, from its scale_shift_table and the embedded timestep), then
        # norm_out (LayerNorm) -> modulation -> proj_out -> unpatchify.
        embed="pos_embed",  # PatchEmbed: conv projection + the 2-D sin-cos position table
    ),
    "AllegroTransformer3DModel": SequencePlan(
        # AllegroTransformerBlock: LayerNorm (no affine) + shift / scale from the block's scale_shift_table and the
        # model's (B, 6D) timestep embedding (the same for every chunk, passed whole; the block has no modulation layer
        # of its own), self-attention attn1 with the pipeline's 3-axis RoPE applied to Q and K inside
        # AllegroAttnProcessor2_0 (which calls F.scaled_dot_product_attention itself), cross-attention attn2 to the
        # projected T5 tokens with no norm in front, under the (B, 1, S_text) additive bias the model makes from
        # encoder_attention_mask (keys and values from the text only: chunk-local), a gelu-tanh FeedForward. Not in
        # diffusers' TransformerBlockRegistry; returns the hidden states alone. No _cp_plan in diffusers 0.42.
        {
            "transformer_blocks.*": BlockPlan(
                inputs={
                    "hidden_states": _IMAGE_TOKENS,
                    # The forward's optional (B, F', H', W') video mask (no pipeline passes one), max-pooled per
                    # patch by the model into a (B, 1, S) additive key bias: attn1's mask over the chunk's own keys,
                    # which the exchange gathers. A (B, S) or (B, 1, S) mask passes through the model unchanged: cut
                    # on its last dim whatever its rank.
                    "attention_mask": SequenceSplit(-1),
                    "image_rotary_emb": ChunkValue(_allegro_rotary_rows),
                },
                # attn1 always attends over the whole sequence: the model always passes text states (attn2 never
                # self-attends).
                attention={"attn1": JointAttention()},
                metadata=TransformerBlockMetadata(return_hidden_states_index=0),
            )
        },
        # The model computes shift / scale ((B, 1, D) each, from its scale_shift_table and the embedded timestep), then
        # norm_out (LayerNorm) -> modulation -> proj_out -> unpatchify.
        embed="pos_embed",  # PatchEmbed per frame (conv projection, no position table: positions come from the RoPE)
    ),
    "LatteTransformer3DModel": SequencePlan(
        # Two kinds of diffusers' generic BasicTransformerBlock (norm_type="ada_norm_single", as PixArt's), alternating.
        # The model reshapes the residual stream between them, in its own forward on the whole tensor: a spatial block
        # sees (B x F, P, D) (each frame's P positions one sequence), a temporal block (B x P, F, D) (each position's F
        # frames one sequence). memopt chunks each block on its own, with the whole stream in between, so the two kinds
        # are cut along different axes: a spatial block by position ranges of every frame (dim 1; attn1 attends over the
        # whole frame, so its K/V are exchanged), a temporal block by ranges of its (B x P) rows (dim 0; nothing to
        # exchange). The per-row timestep modulation ((B x F, 6D) spatial, passed whole; (B x P, 6D) temporal, cut with
        # the rows) and the text (repeated per frame, passed whole) line up with every chunk. The model keeps the
        # (B x P, 6D) temporal timesteps through all blocks, 6 / F LD per token (0.375 at 16 frames), hence 64 chunks by
        # default (growth 3.49 LD per token; 3.72 with 32). No _cp_plan in diffusers 0.42.
        {
            # Spatial: self-attention attn1 over a frame's positions (AttnProcessor2_0, which calls
            # F.scaled_dot_product_attention itself), cross-attention attn2 to the projected T5 tokens (keys and values
            # from the text only: chunk-local, computed once per block), a gelu-tanh FeedForward. No self-attention mask
            # (the model passes None) and no text mask (the pipeline passes none; the processor could not take one).
            "transformer_blocks.*": BlockPlan(
                inputs={"hidden_states": _IMAGE_TOKENS},
                attention={"attn1": JointAttention(active=_pixart_cross_attention_has_text)},
            ),
            # Temporal: self-attention attn1 over a position's F frames (16 at the release), no cross-attention
            # (cross_attention_dim=None: no attn2), a gelu-tanh FeedForward. Chunked along dim 0, the (B x P) rows, with
            # the per-row timestep embedding cut alike: attention never mixes rows, so every chunk runs the whole block
            # on its own positions (all frames), nothing is exchanged and the chunks can be as many as the spatial
            # blocks' (frame chunks would stop at one frame each: a 1/16 chunk of a 14 LD block).
            "temporal_transformer_blocks.*": BlockPlan(
                inputs={"hidden_states": SequenceSplit(0), "timestep": SequenceSplit(0)},
                chunk_local=True,
            ),
        },
        # The output head runs whole: the last block is a temporal one, whose output the model reshapes back to (B x F,
        # P, D) before norm_out and modulates with a (B x F, 1, D) shift / scale made from the whole frame count. A tail
        # pass answering the last block with a chunk of its frames would meet a (B x F) modulation against (B x F_chunk)
        # rows (and with enable_temporal_attentions=False the last block is a spatial one, chunked on another axis), so
        # the head cannot be replayed in chunks; it is per token but only ~2-3 LD (norm, modulation, projection to 32
        # channels), under what the blocks keep.
        tail=None,
        num_chunks=64,
        gather=None,
    ),
    "DiTTransformer2DModel": SequencePlan(
        # diffusers' generic BasicTransformerBlock with norm_type="ada_norm_zero": each block's norm1 embeds the
        # timestep and the class label itself (norm1.emb, then SiLU -> linear to six modulations; the same call in
        # every chunk, so run once per block), self-attention attn1 (AttnProcessor2_0, which calls
        # F.scaled_dot_product_attention itself; no mask) and a gelu-tanh FeedForward; no cross-attention. The head
        # embeds the conditioning again with block 0's norm1.emb, then norm_out -> modulation -> proj_out_2 per token,
        # and unpatchifies a square grid. No _cp_plan.
        {
            "transformer_blocks.*": BlockPlan(
                inputs={"hidden_states": _IMAGE_TOKENS},
                attention={"attn1": JointAttention()},
                conditioning=("norm1.emb", *_adaptive_norms("norm1")),
            )
        },
        tail="norm_out",
        gather={"proj_out_2": ContextParallelOutput(gather_dim=1, expected_dims=3)},
        embed="pos_embed",  # PatchEmbed: conv projection + the 2-D sin-cos position table
    ),
}
