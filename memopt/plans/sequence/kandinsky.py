"""Kandinsky 5."""

from __future__ import annotations

from typing import Any, Callable

import torch
from diffusers.hooks._helpers import TransformerBlockMetadata
from diffusers.models._modeling_parallel import ContextParallelOutput

from ._vocabulary import _IMAGE_TOKENS, BlockPlan, JointAttention, SequencePlan, SequenceSplit


def _dense_attention(block: torch.nn.Module, argument: Callable[[str], Any]) -> bool:
    """Refuses NABLA sparse attention (``sparse_params``, ``attention_type="nabla"``, the 10 s checkpoints): its block
    mask is estimated from the whole sequence's pooled queries and keys (``nablaT_v2``), which a chunk does not have,
    and the model reorders the tokens into 8 x 8 tiles for it (``fractal_flatten``)."""
    if argument("sparse_params") is not None:
        raise NotImplementedError(
            f"{type(block).__name__}: sequence chunking supports Kandinsky 5's dense attention only "
            "(attention_type='regular', sparse_params=None); NABLA sparse attention estimates its block mask from the "
            "whole sequence's queries and keys. Run without apply_sequence_chunking, or with a dense checkpoint."
        )
    return True


PLANS: dict[str, SequencePlan] = {
    "Kandinsky5Transformer3DModel": SequencePlan(
        # The text encoder blocks (text_transformer_blocks) run first on the text tokens alone and are left whole (a
        # few hundred tokens). The visual (decoder) blocks carry only the video tokens, flattened (B, F' x H' x W', D):
        # a self-attention over all of them (exchanges K/V), a cross-attention to the text embeddings (keys/values only
        # from the text: chunk-local, its K/V projections computed once per block), a GELU MLP.
        # Kandinsky5AttnProcessor calls dispatch_attention_fn with (B, S, heads, head_dim) Q/K/V after per-head RMSNorm
        # and rotary. The timestep modulation (time_embed (B, time_dim) -> 9 D) is the same for every chunk.
        {
            "visual_transformer_blocks.*": BlockPlan(
                inputs={
                    "visual_embed": _IMAGE_TOKENS,
                    "rope": SequenceSplit(1, 6),  # (B, S, 1, head_dim / 2, 2, 2) fp32 rotation matrices
                },
                attention={"self_attention": JointAttention(
                    query=("to_query",), key_value=("to_key", "to_value"),
                    query_norms=("query_norm",), key_value_norms=("key_norm",),
                    active=_dense_attention,
                )},
                # cross_attention's key/value side has Kandinsky's names (not found by memopt's to_k / to_v defaults).
                conditioning=("visual_modulation", "cross_attention.to_key", "cross_attention.to_value",
                              "cross_attention.key_norm"),
                metadata=TransformerBlockMetadata(return_hidden_states_index=0,
                                                  hidden_states_argument_name="visual_embed"),
            )
        },
        # The model reshapes the last block's (B, S, D) output to the (B, F', H', W', D) grid with the full sizes before
        # out_layer (fractal_unflatten), which a tail pass's chunk cannot take. out_layer is per token (fp32 LayerNorm
        # with timestep shift / scale, a linear, the unpatchify permute), so it runs on pieces of latent rows H' (dim 2
        # of its input; there for images too, F' = 1), each piece's output rows (x patch size) in place along dim 2 of
        # its (B, F, H, W, C) output.
        tail="out_layer",
        gather={"out_layer": ContextParallelOutput(gather_dim=2, expected_dims=5)},
        tail_split=2,
        embed="visual_embeddings",
    ),
}
