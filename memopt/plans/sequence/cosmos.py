"""NVIDIA Cosmos (Cosmos Predict2, Cosmos-1.0 Diffusion, Cosmos Predict2.5, Cosmos 3 Omni)."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from diffusers.hooks._helpers import TransformerBlockMetadata

from ._vocabulary import (
    _IMAGE_TOKENS,
    BlockPlan,
    JointAttention,
    ProducerCall,
    SequencePlan,
    SequenceSplit,
    TokenProducer,
    TokenRanges,
    _pair,
    _take,
    _token_grid,
)


def _cosmos_grid(module: torch.nn.Module, call: ProducerCall) -> tuple[int, int, int]:
    _, _, frames, height, width = call["hidden_states"].shape
    p_t, p_h, p_w = module.patch_size
    return frames // p_t, height // p_h, width // p_w


def _cosmos_positions_tokens(module: torch.nn.Module, call: ProducerCall) -> int:
    frames, rows, columns = _cosmos_grid(module, call)
    return frames * rows * columns


def _cosmos_positions_rows(module: torch.nn.Module, call: ProducerCall,
                           forward: Callable) -> Callable[[TokenRanges], Any]:
    """Cosmos-1.0's learnable position table for some tokens, ``(B, tokens, D)``: a token's row is its frame's, row's
    and column's parameter rows summed, divided by its own norm (plus eps), the same operations the module does on
    the whole ``(B, S, D)`` grid (which it builds in fp32 from three repeated ``(B, S, D)`` tables, ~5 LD of fp32
    temporaries, and keeps alive through every block)."""
    hidden_states = call["hidden_states"]
    batch, sizes = hidden_states.shape[0], _cosmos_grid(module, call)

    def rows_of(ranges: TokenRanges) -> torch.Tensor:
        t, h, w = _token_grid(ranges, sizes, module.pos_emb_t.device).unbind()
        emb = module.pos_emb_t[t] + module.pos_emb_h[h] + module.pos_emb_w[w]
        norm = torch.linalg.vector_norm(emb, dim=-1, keepdim=True, dtype=torch.float32)
        norm = torch.add(module.eps, norm, alpha=np.sqrt(norm.numel() / emb.numel()))
        return (emb / norm).type_as(hidden_states)[None].expand(batch, -1, -1)

    return rows_of


def _cosmos_rope_rows(rope: torch.nn.Module, call: ProducerCall, forward: Callable) -> Callable[[TokenRanges], Any]:
    """Cosmos' rotary ``(cos, sin)``, each ``(tokens, head_dim)`` fp32, for some tokens. The module builds per-axis
    angle tables (frame angles scaled by ``fps``), repeats them over the whole grid, concatenates
    ``[t, h, w, t, h, w]`` and takes cos / sin: a token's row is the cos / sin of its frame's, row's and column's angle
    rows, so the per-axis cos / sin tables are made once here and each chunk gathers its rows (the module's
    operations on the same numbers; the equivalence checks compare with ``torch.equal``)."""
    frames, rows, columns = sizes = _cosmos_grid(rope, call)
    fps, device = call["fps"], call["hidden_states"].device
    seq = torch.arange(max(rope.max_size), device=device, dtype=torch.float32)

    def angles(dim: int, factor: float, positions: torch.Tensor) -> torch.Tensor:
        theta = 10000.0 * factor
        dim_range = torch.arange(0, dim, 2, device=device, dtype=torch.float32)[: (dim // 2)] / dim
        return torch.outer(positions, 1.0 / (theta**dim_range))

    time = seq[:frames] if fps is None else seq[:frames] / fps * rope.base_fps
    axes = [angles(rope.dim_t, rope.t_ntk_factor, time), angles(rope.dim_h, rope.h_ntk_factor, seq[:rows]),
            angles(rope.dim_w, rope.w_ntk_factor, seq[:columns])]
    cos_axes, sin_axes = [torch.cos(a) for a in axes], [torch.sin(a) for a in axes]

    def rows_of(ranges: TokenRanges) -> tuple[torch.Tensor, torch.Tensor]:
        index = _token_grid(ranges, sizes, device).unbind()
        cos = torch.cat([table[i] for table, i in zip(cos_axes, index)] * 2, dim=-1)
        sin = torch.cat([table[i] for table, i in zip(sin_axes, index)] * 2, dim=-1)
        return cos, sin

    return rows_of


def _cosmos_rope_tokens(rope: torch.nn.Module, call: ProducerCall) -> int:
    return _cosmos_positions_tokens(rope, call)


def _cosmos_timestep_frames(embedder: torch.nn.Module, call: ProducerCall) -> int | None:
    """Cosmos Predict2's per-frame timestep reaches the embedder flattened, ``(B T)``; Cosmos-1.0's is ``(B,)``."""
    per_sample = call["hidden_states"].shape[0]
    frames = call["timestep"].numel() // per_sample
    return frames if frames > 1 else None


def _cosmos_timestep_rows(index: int) -> Callable[[torch.nn.Module, ProducerCall, Callable],
                                                  Callable[[TokenRanges], Any]]:
    """:attr:`TokenProducer.rows` for entry ``index`` of Cosmos' timestep embedder (``temb`` ``(B T, 3 D)``, the
    embedded timestep ``(B T, D)``): the per-frame table (small) made once per forward, rows batch-major as the
    module returns them."""

    def rows(embedder: torch.nn.Module, call: ProducerCall, forward: Callable) -> Callable[[TokenRanges], Any]:
        table = forward(**call)[index]
        table = table.view(call["hidden_states"].shape[0], -1, *table.shape[1:])
        return lambda ranges: _take(table, 1, ranges).flatten(0, 1)

    return rows


_COSMOS_FRAME_TABLES = tuple(
    # Predict2's forward views the per-frame tables as (B, T, 1, 1, C), expands them over each frame's H x W tokens and
    # flattens them to (B, S, C), kept through all blocks to the head (4 LD): deferred with the tables
    # (memopt.hooks._deferred_tokens.DeferredGroups), each chunk and the head's chunks get their tokens' rows.
    TokenProducer(_cosmos_timestep_frames, _cosmos_timestep_rows(index), output=index, sliver=lambda call: call)
    for index in (0, 1)
)


_PER_TOKEN = SequenceSplit(1, 3)  # Predict2's per-frame timestep makes (B, S, D) tables; a (B, D) one passes whole

_COSMOS = BlockPlan(
    inputs={
        "hidden_states": _IMAGE_TOKENS,
        "embedded_timestep": _PER_TOKEN,  # (B, S, D) with a (B, 1, T, 1, 1) timestep, (B, D) with a (B,) one
        "temb": _PER_TOKEN,  # (B, S, 3D) / (B, 3D) likewise
        "image_rotary_emb": _pair(SequenceSplit(0, 2)),  # (S, head_dim) fp32 cos / sin
        "extra_pos_emb": _IMAGE_TOKENS,  # Cosmos-1.0's learnable positions (B, S, D), added to the block input
        "controlnet_residual": _IMAGE_TOKENS,  # Cosmos Transfer's control residual (B, S, D), added after the MLP
    },
    # attn2 is cross-attention to the T5 tokens (Predict2.5: plus image-context tokens through q_img / k_img / v_img)
    # under the (B, 1, 1, S_text) text mask: chunk-local, its key / value side computed once per block.
    attention={"attn1": JointAttention()},
    # CosmosAdaLayerNormZero's adaLN-LoRA: SiLU -> linear_1 (D -> 256) -> linear_2 (256 -> 3D) on the embedded timestep.
    # Computed once per block when the timestep is per sample; with Predict2's per-frame timestep the input is the
    # chunk's own rows, so each chunk computes its own (reuse needs the very same tensor).
    conditioning=tuple(f"{norm}.{layer}" for norm in ("norm1", "norm2", "norm3")
                       for layer in ("activation", "linear_1", "linear_2")),
    # Not in diffusers' TransformerBlockRegistry; returns the hidden states alone (a ControlNet block with after_proj
    # returns a pair, but those live in CosmosControlNetModel, not in this class).
    metadata=TransformerBlockMetadata(return_hidden_states_index=0),
)


# Cosmos 3 Omni runs one packed sequence with no batch dimension, (S, D), cut by the model into a causal text prefix
# (und_seq, its "understanding" pathway) and the generation tokens (gen_seq: video, then sound or action tokens), each
# with its own projections, norms and MLP in every decoder layer. Cosmos3AttnProcessor makes two kernel calls: the
# text's causal self-attention (to_q / to_k / to_v), then the generation tokens' attention (add_q_proj ...) over [text K
# | generation K], unmasked, GQA. The generation tokens are the split ("image") stream, along dim 0; the text prefix, a
# prompt's few hundred tokens that every generation token reads, is carried whole by every chunk (split_text=False: its
# output taken from chunk 0, which alone runs most of its pathway), so its causal call stays chunk-local
# (local_calls_first=1) and the second call is exchanged with the text's keys first. The rotary tables are passed as
# (cos_text, sin_text, cos_gen, sin_gen), (S', head_dim) each. Not in diffusers' TransformerBlockRegistry; returns
# (text, generation). The forward concatenates both pathways' outputs and reads the predicted tokens by index before its
# heads, so the head runs whole (tail=None). No _cp_plan (the class has its own context-parallel seams).
_GEN_TOKENS = SequenceSplit(0, 2)
_TEXT_PREFIX = SequenceSplit(0, 2, ("text",))
_COSMOS3 = BlockPlan(
    inputs={"gen_seq": _GEN_TOKENS, "und_seq": _TEXT_PREFIX,
            "rotary_emb": (_TEXT_PREFIX, _TEXT_PREFIX, _GEN_TOKENS, _GEN_TOKENS)},
    attention={"self_attn": JointAttention(
        order=("text", "image"), local_calls_first=1, query=("add_q_proj",), key_value=("add_k_proj", "add_v_proj"),
        query_norms=("norm_added_q",), key_value_norms=("norm_added_k",))},
    split_text=False,
    # The text's query and everything after its attention feed only its own output: chunk 0's final pass computes
    # them, the others get zeros (its norms and causal attention on them stay, a few percent of its work).
    text_only=("self_attn.to_q", "self_attn.to_out", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
    metadata=TransformerBlockMetadata(return_hidden_states_index=1, return_encoder_hidden_states_index=0,
                                      hidden_states_argument_name="gen_seq",
                                      encoder_hidden_states_argument_name="und_seq"),
)

PLANS: dict[str, SequencePlan] = {
    "CosmosTransformer3DModel": SequencePlan(
        {"transformer_blocks.*": _COSMOS},
        # norm_out(hidden_states, embedded_timestep, temb): CosmosAdaLayerNorm, per-token shift / scale with Predict2's
        # per-frame timestep, then proj_out and the unpatchify. No _cp_plan in diffusers 0.42.
        tail_inputs={"embedded_timestep": _PER_TOKEN, "temb": _PER_TOKEN},
        embed="patch_embed",
        producers={
            "rope": TokenProducer(_cosmos_rope_tokens, _cosmos_rope_rows),  # (S, head_dim) fp32 cos / sin: 0.25 LD bf16
            "learnable_pos_embed": TokenProducer(_cosmos_positions_tokens, _cosmos_positions_rows),
            "time_embed": _COSMOS_FRAME_TABLES,
        },
    ),
    # The generation tokens' output norm (RMSNorm, fp32 inside: two (S, D) fp32 temporaries, the simulated peak at 720p)
    # runs in token chunks.
    "Cosmos3OmniTransformer": SequencePlan({"layers.*": _COSMOS3}, tail=None, gather=None,
                                           token_chains=(("norm_moe_gen",),)),
}
