"""HiDream-I1."""

from __future__ import annotations

from typing import Any, Callable

import torch
from diffusers.hooks._helpers import TransformerBlockMetadata
from diffusers.models._modeling_parallel import ContextParallelOutput

from ._vocabulary import (
    _IMAGE_TOKENS,
    _TEXT_TOKENS,
    BlockPlan,
    JointAttention,
    ProducerCall,
    SequencePlan,
    SequenceSplit,
    TokenProducer,
    TokenRanges,
    _take,
)


def _hidream_rope_tokens(pe_embedder: torch.nn.Module, call: ProducerCall) -> int:
    return call["ids"].shape[1]


def _hidream_rope_rows(pe_embedder: torch.nn.Module, call: ProducerCall,
                       forward: Callable) -> Callable[[TokenRanges], Any]:
    """HiDream's (B, S, 1, head_dim / 2, 2, 2) fp32 rotary table is a function of each token's (B, S, 3) ids: run
    the module on the chunk's ids."""
    return lambda ranges: forward(_take(call["ids"], 1, ranges))


# The processor (HiDreamAttnProcessor) calls F.scaled_dot_product_attention itself: the exchange catches it. Its
# projections are to_q / to_k / to_v (+ the text stream's *_t twins), normed by q_rms_norm / k_rms_norm (+ *_t).
_HIDREAM_NORMS = {"query_norms": ("q_rms_norm", "q_rms_norm_t"), "key_value_norms": ("k_rms_norm", "k_rms_norm_t")}
_HIDREAM_MODULATION = ("adaLN_modulation.0", "adaLN_modulation.1")  # nn.Sequential(SiLU, Linear)

PLANS: dict[str, SequencePlan] = {
    "HiDreamImageTransformer2DModel": SequencePlan(
        # The blocks are wrapped (double_stream_blocks.i is a HiDreamBlock passing its arguments to .block): the plan
        # targets the inner blocks, which diffusers' TransformerBlockRegistry does not list.
        # Dual-stream blocks: image tokens + text = cat(T5, last Llama layer, this block's Llama layer), attention over
        # cat(image, text) with one rotary table over the same tokens (all text ids are 0). The image FeedForward is a
        # MoE (per-token top-2 of 4 routed experts + a shared expert, no capacity limit: chunk-local), the text one a
        # SwiGLU. hidden_states_masks (non-square latents only) multiplies the image keys by the token's 0/1: per token.
        # Single-stream blocks: one stream cat(image, T5, Llama, this block's Llama), with the mask and rotary table
        # over the same tokens. The model drops the trailing text tokens before final_layer (kept span: the image).
        {
            "double_stream_blocks.*.block": BlockPlan(
                inputs={
                    "hidden_states": _IMAGE_TOKENS,
                    "encoder_hidden_states": _TEXT_TOKENS,
                    "hidden_states_masks": SequenceSplit(1, 2),
                    "image_rotary_emb": SequenceSplit(1, 6, ("image", "text")),
                },
                attention={"attn1": JointAttention(
                    order=("image", "text"), query=("to_q", "to_q_t"), key_value=("to_k", "to_v", "to_k_t", "to_v_t"),
                    **_HIDREAM_NORMS)},
                conditioning=_HIDREAM_MODULATION,
                metadata=TransformerBlockMetadata(return_hidden_states_index=0, return_encoder_hidden_states_index=1),
            ),
            "single_stream_blocks.*.block": BlockPlan(
                inputs={
                    "hidden_states": _IMAGE_TOKENS,
                    "hidden_states_masks": SequenceSplit(1, 2),
                    "image_rotary_emb": SequenceSplit(1, 6),
                },
                attention={"attn1": JointAttention(**_HIDREAM_NORMS)},
                conditioning=_HIDREAM_MODULATION,
                metadata=TransformerBlockMetadata(return_hidden_states_index=0),
            ),
        },
        tail="final_layer",
        gather={"final_layer.linear": ContextParallelOutput(gather_dim=1, expected_dims=3)},
        embed="x_embedder",
        producers={"pe_embedder": TokenProducer(_hidream_rope_tokens, _hidream_rope_rows)},
        num_chunks=48,
    ),
}
