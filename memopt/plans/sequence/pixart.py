"""PixArt-Sigma and PixArt-Alpha."""

from __future__ import annotations

from typing import Any, Callable

import torch

from ._vocabulary import _IMAGE_TOKENS, BlockPlan, JointAttention, SequencePlan, SequenceSplit


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
}
