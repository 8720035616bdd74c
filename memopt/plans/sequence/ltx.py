"""LTX-Video and LTX-2."""

from __future__ import annotations

from typing import Any, Callable

import torch

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
    _pair,
    _returns_image_stream_first,
    _take,
    distinct_timestep_rows,
)


def _ltx_rope_tokens(rope: torch.nn.Module, call: ProducerCall) -> int:
    if call["video_coords"] is not None:
        return call["video_coords"].shape[-1]
    return call["num_frames"] * call["height"] * call["width"]


def _ltx_rope_rows(rope: torch.nn.Module, call: ProducerCall, forward: Callable) -> Callable[[TokenRanges], Any]:
    """LTX tables for some tokens: the module's own ``video_coords`` path on those tokens.

    Without ``video_coords`` the module builds a latent grid and uses it as is; with them it divides them by its base
    sizes. Multiplying the grid rows by the base sizes first gives the same grid (exactly for integer positions).
    The grid is rebuilt per chunk rather than kept: it is ``(B, S, 3)`` fp32, the size of a per-token table.
    """

    def rows_of(ranges: TokenRanges) -> Any:
        coords = call["video_coords"]
        if coords is None:
            hidden_states = call["hidden_states"]
            grid = rope._prepare_video_coords(
                hidden_states.size(0), call["num_frames"], call["height"], call["width"],
                rope_interpolation_scale=call["rope_interpolation_scale"], device=hidden_states.device,
            )
            grid = _take(grid, 1, ranges)
            bases = (rope.base_num_frames, rope.base_height, rope.base_width)
            coords = torch.stack([grid[..., axis] * base for axis, base in enumerate(bases)], dim=1)
        else:
            coords = _take(coords, -1, ranges)
        return forward(call["hidden_states"], video_coords=coords)

    return rows_of


# LTX-2 blocks carry two token streams: the video tokens (the "image" stream, always split) and the audio tokens, in
# the "text" stream's place (the plan's metadata names ``audio_hidden_states`` as the encoder hidden states, output
# index 1): split like a text stream when every chunk gets at least one audio token, else carried whole. The prompt
# (``encoder_hidden_states`` / ``audio_encoder_hidden_states``) is only the key/value side of the chunk-local
# cross-attentions ``attn2`` / ``audio_attn2`` and passes whole. Four modules attend over a whole stream, in call
# order: ``attn1`` (video self-attention), ``audio_attn1`` (audio self-attention), ``audio_to_video_attn`` (video
# queries, audio keys) and ``video_to_audio_attn`` (audio queries, video keys).
def _ltx2_rope_tokens(rope: torch.nn.Module, call: ProducerCall) -> int:
    return call["coords"].shape[2]


def _ltx2_rope_rows(rope: torch.nn.Module, call: ProducerCall, forward: Callable) -> Callable[[TokenRanges], Any]:
    """LTX-2 tables for some tokens: the module on those tokens' coordinates (``(B, axes, S[, 2])``, patch bounds
    or positions), which it maps to rows one token at a time (elementwise), so the same numbers."""
    return lambda ranges: forward(_take(call["coords"], 2, ranges), device=call["device"])


# The rotary tables are (B, S, D) cos / sin for rope_type="interleaved" (dim 1 of 3, as _cp_plan["rope"]) and
# (B, heads, S, D / heads / 2) for "split" (the released checkpoints), which _cp_plan's expected_dims=3 would pass
# whole: dim -2 is the token dim of both.
_VIDEO_ROPE = _pair(SequenceSplit(-2))
_AUDIO_ROPE = _pair(SequenceSplit(-2, segments=("text",)))
_AUDIO_TOKENS = SequenceSplit(1, 3, ("text",))  # (B, S_audio, k D_audio) per-token modulation; (B, 1, ...) whole


def _self_attention_runs(block: torch.nn.Module, argument: Callable[[str], Any]) -> bool:
    """Spatio-temporal guidance with the perturbed processor (``perturbed_attn``, LTX-2.3 / 2.5) replaces the
    self-attentions of its blocks by their value projections when every sample is perturbed (the pipelines' STG
    pass): chunk-local, no kernel call. Mirrors ``LTX2PerturbedAttnProcessor``."""
    if not block.perturbed_attn:
        return True
    all_perturbed, mask = argument("all_perturbed"), argument("perturbation_mask")
    if all_perturbed is None:
        all_perturbed = torch.all(mask == 0) if mask is not None else False
    return not bool(all_perturbed)


def _switch(name: str) -> Callable[[torch.nn.Module, Callable[[str], Any]], bool]:
    """a2v / v2a run unless their block argument is false (``isolate_modalities``: modality guidance)."""
    return lambda block, argument: argument(name) is None or bool(argument(name))


# LTX2PerturbedAttnProcessor also reads the self-attention's own values after the kernel (STG mixes them in per
# sample), so to_v is not skipped in the final pass there. to_gate_logits (gated attention, LTX-2.3) only feeds the
# output gates, like a query projection.
_QUERY = ("to_q", "to_gate_logits")
_SELF = JointAttention(order=("image",), query=_QUERY, key_value=("to_k",), active=_self_attention_runs)
# The audio self-attention's K/V come from the audio stream, which the video self-attention does not touch; the
# video-to-audio attention's video K/V are normed before the audio-to-video output is added: each is collected in
# the same two-pass collection pass as the module before it (two passes instead of four).
_AUDIO_SELF = JointAttention(order=("text",), query=_QUERY, key_value=("to_k",), active=_self_attention_runs,
                             collect_with_previous=True)
_AUDIO_KEYS = JointAttention(order=("text",), query=_QUERY, active=_switch("use_a2v_cross_attention"))
_VIDEO_KEYS = JointAttention(order=("image",), query=_QUERY, active=_switch("use_v2a_cross_attention"),
                             collect_with_previous=True)

_LTX2 = BlockPlan(
    inputs={
        "hidden_states": _IMAGE_TOKENS,
        "audio_hidden_states": _TEXT_TOKENS,
        # Per-token timesteps (image-to-video conditions the first frame at t = 0): (B, S, k D); (B, 1, k D) whole.
        "temb": SequenceSplit(1, 3),
        "temb_audio": _AUDIO_TOKENS,
        "temb_ca_scale_shift": SequenceSplit(1, 3),
        "temb_ca_audio_scale_shift": _AUDIO_TOKENS,
        "temb_ca_gate": SequenceSplit(1, 3),
        "temb_ca_audio_gate": _AUDIO_TOKENS,
        "video_rotary_emb": _VIDEO_ROPE,
        "audio_rotary_emb": _AUDIO_ROPE,
        "ca_video_rotary_emb": _VIDEO_ROPE,
        "ca_audio_rotary_emb": _AUDIO_ROPE,
    },
    attention={
        "attn1": _SELF,
        "audio_attn1": _AUDIO_SELF,
        "audio_to_video_attn": _AUDIO_KEYS,
        "video_to_audio_attn": _VIDEO_KEYS,
    },  # attn2 / audio_attn2: cross-attention to the prompt, chunk-local
    metadata=_returns_image_stream_first(text="audio_hidden_states"),
)


def _ltx_timestep_tokens(time_embed: torch.nn.Module, call: ProducerCall) -> int | None:
    """LTX-Video's call has one timestep per token when it conditions on frames (its flattened ``(B, S)``
    timesteps); one per sample otherwise."""
    batch = call["batch_size"]
    tokens = call["timestep"].numel() // batch if batch else 1
    return tokens if tokens > 1 else None


def _ltx_timesteps(call: ProducerCall) -> torch.Tensor:
    return call["timestep"].view(call["batch_size"], -1)


def _ltx_one_timestep(call: ProducerCall) -> ProducerCall:
    return {**call, "timestep": _ltx_timesteps(call)[:, 0]}


def _ltx_timestep_tables(time_embed: torch.nn.Module, call: ProducerCall, forward: Callable[..., Any],
                         values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``AdaLayerNormSingle`` itself on timestep ``values``: the blocks' ``(U, 6 D)`` modulation and the head's
    ``(U, D)`` embedding."""
    return forward(values, call["added_cond_kwargs"], batch_size=values.numel(), hidden_dtype=call["hidden_dtype"])


_LTX_TIMESTEP_TABLES = tuple(
    # Per-token timesteps (frame conditioning): (B S, 6 D) and (B S, D) tables, viewed as (B, S, ...) by the model
    # (7 LD alive through the blocks), computed per chunk; the views and the head's shift / scale are deferred too.
    TokenProducer(_ltx_timestep_tokens, distinct_timestep_rows(_ltx_timesteps, _ltx_timestep_tables, index, flat=True),
                  output=index, sliver=_ltx_one_timestep)
    for index in (0, 1)
)


PLANS: dict[str, SequencePlan] = {
    "LTXVideoTransformer3DModel": SequencePlan(
        {
            "transformer_blocks.*": BlockPlan(
                inputs={
                    "hidden_states": _IMAGE_TOKENS,
                    "temb": SequenceSplit(1, 3),  # (B, S, 6D) per-token timesteps; (B, 1, 6D) passes whole
                    "image_rotary_emb": _pair(SequenceSplit(1, 3)),  # (B, S, D) cos / sin, as _cp_plan["rope"]
                },
                attention={"attn1": JointAttention()},  # attn2: cross-attention to text, chunk-local
            )
        },
        gather=None,
        embed="proj_in",
        producers={"rope": TokenProducer(_ltx_rope_tokens, _ltx_rope_rows), "time_embed": _LTX_TIMESTEP_TABLES},
        source="memopt + LTXVideoTransformer3DModel._cp_plan",
    ),
    "LTX2VideoTransformer3DModel": SequencePlan(
        {"transformer_blocks.*": _LTX2},
        gather=None,
        embed="proj_in",
        # The video tables: self-attention (3 LD in a bf16 model at the split layout, 6 at interleaved) and a2v / v2a
        # (1 / 2 LD). The audio ones are 2 % of that (126 tokens against 6144) and are computed whole.
        producers={
            "rope": TokenProducer(_ltx2_rope_tokens, _ltx2_rope_rows),
            "cross_attn_rope": TokenProducer(_ltx2_rope_tokens, _ltx2_rope_rows),
            # Image-to-video: one timestep per video token (the conditioning frame's at 0). The video modulation
            # tables (temb (B, S, 6 D), the head's embedding (B, S, D), the a2v cross-attention's scale / shift
            # (B, S, 4 D) and gate (B, S, D)) are made like LTX-Video's, by the same AdaLayerNormSingle call; the
            # audio ones cover 2 % of the tokens and are made whole.
            "time_embed": _LTX_TIMESTEP_TABLES,
            "av_cross_attn_video_scale_shift": _LTX_TIMESTEP_TABLES,
            "av_cross_attn_video_a2v_gate": _LTX_TIMESTEP_TABLES,
        },
        source="memopt + LTX2VideoTransformer3DModel._cp_plan",
    ),
}
