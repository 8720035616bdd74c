"""Flux and its relatives: FLUX.2, FLUX.3, Chroma, Bria, LongCat-Image, Ovis-Image."""

from __future__ import annotations

import dataclasses

from typing import Any, Callable

import torch
from diffusers.hooks._helpers import TransformerBlockMetadata
from torch._subclasses.fake_tensor import is_fake

from ._vocabulary import (
    _DUAL_STREAM_MODULATION,
    _IMAGE_TOKENS,
    _JOINT,
    _SINGLE_STREAM_MLP,
    _SINGLE_STREAM_MODULATION,
    _TEXT_FIRST,
    _TEXT_TOKENS,
    BlockPlan,
    BroadcastTable,
    JointAttention,
    ProducerCall,
    SequencePlan,
    SequenceSplit,
    TokenProducer,
    TokenRanges,
    _pair,
    _returns_text_stream_first,
    _take,
)


def _flux_rope_tokens(pos_embed: torch.nn.Module, call: ProducerCall) -> int:
    return call["ids"].shape[0]


def _flux_rope_rows(pos_embed: torch.nn.Module, call: ProducerCall, forward: Callable) -> Callable[[TokenRanges], Any]:
    """Flux's tables are a function of each token's position ids: run the module on the chunk's ids."""
    return lambda ranges: forward(_take(call["ids"], 0, ranges))


_FLUX_INPUTS = {
    "hidden_states": _IMAGE_TOKENS,
    "encoder_hidden_states": _TEXT_TOKENS,
    "image_rotary_emb": _pair(SequenceSplit(0, 2, ("text", "image"))),  # pos_embed(cat(txt_ids, img_ids))
}


def _flux3_modulation_tokens(modulation: torch.nn.Module, call: ProducerCall) -> int:
    return call["temb"].shape[1]


def _flux3_modulation_rows(modulation: torch.nn.Module, call: ProducerCall,
                           forward: Callable) -> Callable[[TokenRanges], Any]:
    """FLUX.3's per-token modulation ``linear(temb)`` for some tokens.

    The model makes ``temb`` by expanding one timestep embedding per sample over a mode's tokens (then a SiLU, which
    materializes it), so its rows are all equal: then every row of the table is the linear of the first one, computed
    once (a GEMV) and expanded, and a chunk's rows are a zero-stride view, with no GEMM per chunk and pass. In a
    chunked forward ``temb`` is itself deferred (the timestep embedder is a ``BroadcastTable``), and says so
    (``uniform``) without comparing values, also in simulations. Otherwise (per-token timesteps, or a fake tensor
    whose values cannot be compared) each chunk computes the linear of its own rows (row-wise: the same numbers).
    """
    temb = call["temb"]
    if isinstance(temb, torch.Tensor):
        uniform = not is_fake(temb) and torch.equal(temb, temb[:, :1].expand_as(temb))
        rows_of = lambda ranges: _take(temb, 1, ranges)  # noqa: E731
    else:  # deferred itself (the timestep embedder is a BroadcastTable)
        uniform, rows_of = temb.uniform, temb.rows
    if uniform:
        row = forward(rows_of([(0, 1)]))
        return lambda ranges: row.expand(-1, sum(end - start for start, end in ranges), -1)
    return lambda ranges: forward(rows_of(ranges))


# FLUX.3 per-mode blocks: parallel attention + SwiGLU MLP from one modulated input, self-attention within one token
# mode (the text context, the image, or the reference images: each is the block's only, "image", stream). The
# modulation is per token, (B, S, 3D), made at model level; the rotary tables are (S, head_dim) cos / sin.
_FLUX3_MODE = BlockPlan(
    inputs={
        "hidden_states": _IMAGE_TOKENS,
        "temb_mod": SequenceSplit(1, 3),
        "image_rotary_emb": _pair(SequenceSplit(0, 2)),
    },
    attention={"attn": JointAttention()},
    metadata=TransformerBlockMetadata(return_hidden_states_index=0),
)


# The dual-stream block of Flux copies outside diffusers' TransformerBlockRegistry (returning text, then image).
_FLUX_COPY_DUAL_STREAM = BlockPlan(
    inputs=_FLUX_INPUTS,
    attention={"attn": _TEXT_FIRST},
    conditioning=_DUAL_STREAM_MODULATION,
    metadata=_returns_text_stream_first(),
)


def _flux_copy(num_chunks: int = 48) -> SequencePlan:
    """Flux's plan for classes copied from Flux that diffusers' ``TransformerBlockRegistry`` does not list (or lists
    wrongly) and that have no ``_cp_plan``: both block kinds get Flux's metadata ((text, image) returned), and the
    output head is gathered at ``proj_out``. Single-stream blocks keep attention, the MLP branch and their
    concatenation per chunk: Flux needs 48 chunks to reach the floor."""
    return SequencePlan(
        {
            "transformer_blocks.*": _FLUX_COPY_DUAL_STREAM,
            "single_transformer_blocks.*": BlockPlan(
                inputs=_FLUX_INPUTS,
                attention={"attn": JointAttention(order=("text", "image"))},  # one projection for cat(text, image)
                unused_before_attention=_SINGLE_STREAM_MLP,
                conditioning=_SINGLE_STREAM_MODULATION,
                metadata=_returns_text_stream_first(),
            ),
        },
        embed="x_embedder",
        producers={"pos_embed": TokenProducer(_flux_rope_tokens, _flux_rope_rows)},
        num_chunks=num_chunks,
    )


PLANS: dict[str, SequencePlan] = {
    "FluxTransformer2DModel": SequencePlan(
        {
            "transformer_blocks.*": BlockPlan(
                inputs=_FLUX_INPUTS, attention={"attn": _TEXT_FIRST}, conditioning=_DUAL_STREAM_MODULATION
            ),
            "single_transformer_blocks.*": BlockPlan(
                inputs=_FLUX_INPUTS,
                attention={"attn": JointAttention(order=("text", "image"))},  # one projection for cat(text, image)
                unused_before_attention=_SINGLE_STREAM_MLP,
                conditioning=_SINGLE_STREAM_MODULATION,
            ),
        },
        gather=None,
        embed="x_embedder",
        producers={"pos_embed": TokenProducer(_flux_rope_tokens, _flux_rope_rows)},
        num_chunks=48,  # single-stream blocks keep attention + a 4x MLP + their concatenation per chunk
        source="memopt + FluxTransformer2DModel._cp_plan",
    ),
    "Flux2Transformer2DModel": SequencePlan(
        # The timestep modulation is computed once at model level and passed whole ((B, 6D) / (B, 3D)). The model
        # concatenates cat(text, image) before the single-stream blocks (called without encoder_hidden_states): one
        # token stream to them, split with its (S_text + S_image, head_dim) rotary tables. Their attention computes
        # Q, K, V and the MLP input in one fused linear: no whole projection to skip, only its column blocks. The
        # rotary tables come from two pos_embed calls the model concatenates itself: kept whole (1/12 LD).
        {
            "transformer_blocks.*": BlockPlan(
                inputs={
                    "hidden_states": _IMAGE_TOKENS,
                    "encoder_hidden_states": _TEXT_TOKENS,
                    "image_rotary_emb": _pair(SequenceSplit(0, 2, ("text", "image"))),  # cat(pos(txt), pos(img))
                },
                attention={"attn": _TEXT_FIRST},
            ),
            "single_transformer_blocks.*": BlockPlan(
                inputs={"hidden_states": _IMAGE_TOKENS, "image_rotary_emb": _pair(SequenceSplit(0, 2))},
                attention={"attn": JointAttention(
                    query=(), key_value=(),
                    # column blocks Q, K, V, SwiGLU gate, SwiGLU value
                    fused={"to_qkv_mlp_proj": ("query", "key_value", "key_value", "other", "other")},
                )},
            ),
        },
        gather=None,
        embed="x_embedder",
        num_chunks=48,  # single-stream blocks keep attention + a 3x SwiGLU MLP (9D fused projection) per chunk
        source="memopt + Flux2Transformer2DModel._cp_plan",
    ),
    "ChromaTransformer2DModel": SequencePlan(
        # Flux's layout with an approximator's per-block modulation (passed whole) and the pipeline's (B, text +
        # image) token mask, which the blocks square into the query-dependent m[q] * m[k] (pair_mask). The model
        # feeds the single-stream blocks cat(text, image) as one sequence, and so the rotary tables and the mask.
        {
            "transformer_blocks.*": BlockPlan(
                inputs={
                    **_FLUX_INPUTS,
                    "attention_mask": SequenceSplit(1, 2, ("text", "image")),
                },
                attention={"attn": JointAttention(order=("text", "image"), pair_mask="attention_mask", **_JOINT)},
                metadata=_returns_text_stream_first(),
            ),
            "single_transformer_blocks.*": BlockPlan(
                inputs={
                    "hidden_states": _IMAGE_TOKENS,
                    "image_rotary_emb": _pair(SequenceSplit(0, 2)),
                    "attention_mask": SequenceSplit(1, 2),
                },
                attention={"attn": JointAttention(pair_mask="attention_mask")},
                unused_before_attention=_SINGLE_STREAM_MLP,
                metadata=TransformerBlockMetadata(return_hidden_states_index=0),
            ),
        },
        embed="x_embedder",
        producers={"pos_embed": TokenProducer(_flux_rope_tokens, _flux_rope_rows)},
        num_chunks=48,  # single-stream blocks keep attention + a 4x MLP + their concatenation per chunk, as Flux
    ),
    "Flux3Transformer2DModel": SequencePlan(
        # Three token modes: per-mode blocks first (txt_mode_blocks, mode_blocks.image, mode_blocks.image_cond), then
        # joint single blocks that take the text and the content (image, then reference tokens: one "image" stream)
        # separately, modulate each with its own per-token (B, S, 3D) table and project cat(text, content) with one
        # to_q / to_k / to_v (the MLP runs after the attention, on the same input). Neither block class is in diffusers'
        # TransformerBlockRegistry. No _cp_plan. The rotary tables (tuples) are concatenated by the model from three
        # pos_embed calls (cat(text, image, reference)): kept whole (1/12 LD). The head keeps the image tokens, the
        # first of the content stream, and modulates them per token with the (B, S_image, D) timestep embedding (an
        # expanded view).
        {
            "txt_mode_blocks.*": _FLUX3_MODE,
            "mode_blocks.*.*": _FLUX3_MODE,
            "single_transformer_blocks.*": BlockPlan(
                inputs={
                    "hidden_states": _IMAGE_TOKENS,  # the content: image tokens, then the reference tokens
                    "encoder_hidden_states": _TEXT_TOKENS,
                    "temb_mod": SequenceSplit(1, 3),
                    "temb_mod_context": _TEXT_TOKENS,
                    "image_rotary_emb": _pair(SequenceSplit(0, 2, ("text", "image"))),
                },
                attention={"attn": JointAttention(order=("text", "image"))},  # one projection for cat(text, content)
                metadata=_returns_text_stream_first(),  # (encoder_hidden_states, hidden_states)
            ),
        },
        embed=("x_embedders.image", "x_embedders.image_cond"),
        # The per-token (B, S, 3D) modulation tables of every mode, made before the blocks (3 LD each in a bf16 model,
        # two per mode): deferred, computed per chunk. The joint blocks' image and reference-image tables are
        # concatenated by the model, which a deferred table supports (torch.cat along its token dim). Their input,
        # silu of the per-sample timestep embedding expanded over a mode's tokens (1 LD alive through the blocks), is
        # deferred from the expansion on (the embedder a BroadcastTable; tokens on dim 1 of [:, None, :].expand).
        producers={
            **{
                f"{stage}_stream_modulations.{mode}": TokenProducer(_flux3_modulation_tokens, _flux3_modulation_rows)
                for stage in ("early", "single")
                for mode in ("image", "image_cond", "txt")
            },
            "timestep_embedder": BroadcastTable(1),
        },
        tail_inputs={"temb": _IMAGE_TOKENS},  # Flux3AdaLayerNorm(hidden_states, temb): per-token scale / shift
        num_chunks=48,
    ),
    # Bria: the class is a copy of FluxTransformer2DModel without pooled / guidance inputs. diffusers'
    # TransformerBlockRegistry records BriaTransformerBlock as returning the image stream alone at index 0, while it
    # returns (text, image) like Flux's blocks, and does not list BriaSingleTransformerBlock.
    "BriaTransformer2DModel": _flux_copy(),
    # LongCat-Image: attention processor, block forwards and rotary module are copies of Flux's; no pooled projection
    # or guidance embedding, and the timestep is multiplied by 1000.
    "LongCatImageTransformer2DModel": _flux_copy(),
    # Ovis-Image: Flux's layout with SwiGLU MLPs. The single-stream blocks' proj_mlp makes (value, gate) at 2 x 4D
    # and act_mlp is a SiLU (silu(gate) * value into proj_out): still run before the attention and not needed to
    # reach it, so skipped in the collection pass like Flux's. Per chunk they keep the 8D projection, the 4D product
    # and the 5D concatenation (Flux: 4D + 4D + 5D): 48 chunks measure 3.51 LD per token, 64 chunks 3.39. The text
    # states go through an RMSNorm before context_embedder (model level, whole).
    "OvisImageTransformer2DModel": _flux_copy(num_chunks=64),
    # Bria FIBO: Flux's layout (dual-stream blocks, then parallel attention + MLP single-stream blocks) with a per-block
    # text refresh: before every block the model keeps the first D / 2 channels of the text stream and concatenates the
    # block's own projected text-encoder layer (model level, text-sized, whole). Like FLUX.2 and Chroma it feeds the
    # single-stream blocks cat(text, image) as one sequence (and splits it again after each), so the rotary tables of
    # cat(txt_ids, img_ids) are cut as one stream there. The pipeline's mask is a bool key-padding mask
    # (B, 1, 1, text + image) in joint_attention_kwargs: it passes whole (a dict), covers every key of both block kinds'
    # attention in their order (text, then image) and does not depend on the query, so the final call uses it as it is.
    # Neither block class is in diffusers' TransformerBlockRegistry; no _cp_plan. The head gets the image part of the
    # last single block's output (the model drops the leading text tokens).
    "BriaFiboTransformer2DModel": SequencePlan(
        {
            "transformer_blocks.*": _FLUX_COPY_DUAL_STREAM,
            "single_transformer_blocks.*": BlockPlan(
                inputs={"hidden_states": _IMAGE_TOKENS, "image_rotary_emb": _pair(SequenceSplit(0, 2))},
                attention={"attn": JointAttention()},  # cat(text, image) is the block's one stream
                unused_before_attention=_SINGLE_STREAM_MLP,
                conditioning=_SINGLE_STREAM_MODULATION,
                metadata=TransformerBlockMetadata(return_hidden_states_index=0),
            ),
        },
        embed="x_embedder",
        producers={"pos_embed": TokenProducer(_flux_rope_tokens, _flux_rope_rows)},
        num_chunks=48,  # single-stream blocks keep attention + a 4x MLP + their concatenation per chunk, as Flux
    ),
}

PLANS["FluxControlNetModel"] = dataclasses.replace(
    # Flux's double and single blocks under the ControlNet's own class: it returns every block's output (through its
    # controlnet_blocks projections) as a residual, so the blocks write out of place; it has no output head.
    PLANS["FluxTransformer2DModel"], tail=None, keeps_block_outputs=True,
    source="memopt: FluxTransformer2DModel's plan",
)
