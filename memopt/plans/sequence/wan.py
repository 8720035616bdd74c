"""Wan2.1 / 2.2 and the families built on its blocks: Wan VACE, ChronoEdit, SkyReels-V2, Helios, Wan Animate."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch
from diffusers.hooks._helpers import TransformerBlockMetadata
from diffusers.models._modeling_parallel import ContextParallelOutput

from ._vocabulary import (
    _IMAGE_TOKENS,
    _TEXT_TOKENS,
    BlockPlan,
    BroadcastTable,
    ChunkValue,
    JointAttention,
    ProducerCall,
    SequencePlan,
    SequenceSplit,
    TokenCount,
    TokenProducer,
    TokenRanges,
    _AxisGather,
    _pair,
    _returns_text_stream_first,
    _take,
    distinct_timestep_rows,
)


def _wan_rope_tokens(rope: torch.nn.Module, call: ProducerCall) -> int:
    _, _, frames, height, width = call["hidden_states"].shape
    p_t, p_h, p_w = rope.patch_size
    return frames // p_t * (height // p_h) * (width // p_w)


def _wan_rope_rows(rope: torch.nn.Module, call: ProducerCall, forward: Callable) -> Callable[[TokenRanges], Any]:
    """Wan's ``(1, S, 1, head_dim)`` tables for some tokens: the per-axis rows of its frequency buffers, gathered."""
    _, _, frames, height, width = call["hidden_states"].shape
    p_t, p_h, p_w = rope.patch_size
    sizes = [rope.t_dim, rope.h_dim, rope.w_dim]
    axes = list(zip(rope.freqs_cos.split(sizes, dim=1), rope.freqs_sin.split(sizes, dim=1)))  # views, no copies
    gather = _AxisGather(axes, (frames // p_t, height // p_h, width // p_w))

    def rows_of(ranges: TokenRanges) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = gather(ranges)
        return cos[None, :, None, :], sin[None, :, None, :]

    return rows_of


def _wan_timestep_tokens(embedder: torch.nn.Module, call: ProducerCall) -> int | None:
    """Wan2.2 TI2V's call has one timestep per token (``timestep_seq_len``); others one per sample."""
    return call["timestep_seq_len"]


def _wan_timesteps(call: ProducerCall) -> torch.Tensor:
    return call["timestep"].view(-1, call["timestep_seq_len"])


def _wan_one_timestep(call: ProducerCall) -> ProducerCall:
    """The embedder's call with each sample's first timestep only (its text and image embeddings as in the call)."""
    return {**call, "timestep": _wan_timesteps(call)[:, 0], "timestep_seq_len": 1}


def _wan_timestep_tables(embedder: torch.nn.Module, call: ProducerCall, forward: Callable[..., Any],
                         values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The embedder itself on timestep ``values`` (one row each): ``temb`` ``(U, D)`` and its projection ``(U, 6 D)``
    (its text embedding made from one text token, and dropped)."""
    temb, projection, _, _ = forward(values, call["encoder_hidden_states"][:1, :1], None, timestep_seq_len=None)
    return temb, projection


_WAN_TIMESTEP_TABLES = tuple(
    # Wan2.2 TI2V: the (B, S, D) timestep embedding the output head reads and its (B, S, 6 D) projection every block
    # reads (7 LD alive through the blocks, made whole), computed per chunk; the model's own unflatten of the
    # projection and its head's shift / scale are deferred with them (memopt.hooks._deferred_tokens).
    TokenProducer(_wan_timestep_tokens, distinct_timestep_rows(_wan_timesteps, _wan_timestep_tables, index),
                  output=index, sliver=_wan_one_timestep)
    for index in (0, 1)
)


# Wan's processors apply their own rotary embedding (``unflatten`` of the head dim), which takes an empty batch.
_WAN_SELF_ATTENTION = JointAttention(empty_stand_ins=True)

_WAN = BlockPlan(
    inputs={
        "hidden_states": _IMAGE_TOKENS,
        "temb": SequenceSplit(1, 4),  # Wan2.2 TI2V per-token timesteps: (B, S, 6, D); (B, 6, D) passes whole
        "rotary_emb": _pair(SequenceSplit(1, 4)),  # (1, S, 1, head_dim) cos / sin, as _cp_plan["rope"]
    },
    attention={"attn1": _WAN_SELF_ATTENTION},  # attn2 is cross-attention to text (and image) tokens: chunk-local
)


def _wan_animate_face_frames(argument: Callable[[str], Any]) -> int:
    """The face adapter's token groups: one per latent frame, as many as the motion vector's frames (B, T, N, D)."""
    return argument("encoder_hidden_states").shape[1]


def _wan_animate_face_tokens(argument: Callable[[str], Any], rows: tuple[int, int], tokens: int) -> torch.Tensor:
    """The face tokens of the frames a chunk's rows cover (a view): the processor cuts the chunk's queries into as
    many equal groups as it gets frames, so a chunk must be whole frames or lie inside one (``token_groups``)."""
    motion = argument("encoder_hidden_states")
    size = tokens // motion.shape[1]
    start, end = rows
    first, last = start // size, (end - 1) // size + 1
    if last - first > 1 and (start % size or end % size):
        raise ValueError(f"face adapter chunk {rows} is neither whole frames of {size} tokens nor inside one")
    return motion.narrow(1, first, last - first)


def _anyflow_rotary_rows(argument: Callable[[str], Any], rows: tuple[int, int], tokens: int) -> Any:
    """The chunk's ``rotary_emb``: AnyFlow passes ``{"query": freqs, "key": freqs}``, complex
    ``(1, 1, S, head_dim / 2)`` tables (tokens on dim 2, the processor applying them in (B, H, S, D) layout), a dict no
    SequenceSplit entry can describe; the chunk gets its rows of each (views)."""
    value = argument("rotary_emb")
    if value is None:
        return None
    start, end = rows
    pieces = {}
    for key, table in value.items():
        if not isinstance(table, torch.Tensor) or table.dim() != 4 or table.shape[2] != tokens:
            shape = tuple(table.shape) if isinstance(table, torch.Tensor) else type(table).__name__
            raise ValueError(f"AnyFlow rotary_emb[{key!r}]: expected a (1, 1, {tokens}, head_dim / 2) table, "
                             f"got {shape}")
        pieces[key] = table.narrow(2, start, end - start)
    return pieces


def _anyflow_frame_tokens(embedder: torch.nn.Module, call: ProducerCall) -> int:
    """AnyFlow's per-frame timesteps ``(B, F)`` expanded to each frame's tokens."""
    return call["timestep"].shape[1] * call["layout_cfg"]["full_token_per_frame"]


def _anyflow_one_token_per_frame(call: ProducerCall) -> ProducerCall:
    """The embedder's call with one token per frame: its (t, r) tables per frame, its text and image embeddings."""
    return {**call, "layout_cfg": {**call["layout_cfg"], "full_token_per_frame": 1}}


def _anyflow_frame_rows(index: int) -> Callable[[torch.nn.Module, ProducerCall, Callable],
                                                Callable[[TokenRanges], Any]]:
    """:attr:`TokenProducer.rows` for entry ``index`` of AnyFlow's embedder (``temb`` ``(B, S, D)``, its projection
    ``(B, S, 6 D)``): the per-frame table made once per forward (the embedder on one token per frame and one text
    token), each chunk's rows gathered by frame, the rows the embedder's ``repeat_interleave`` gives."""

    def rows(embedder: torch.nn.Module, call: ProducerCall, forward: Callable) -> Callable[[TokenRanges], Any]:
        per_frame = {**_anyflow_one_token_per_frame(call), "encoder_hidden_states_image": None,
                     "encoder_hidden_states": call["encoder_hidden_states"][:1, :1]}
        table = forward(**per_frame)[index]  # (B, F, ...)
        tokens_per_frame = call["layout_cfg"]["full_token_per_frame"]

        def rows_of(ranges: TokenRanges) -> torch.Tensor:
            tokens = torch.cat([torch.arange(start, end, device=table.device) for start, end in ranges])
            return table[:, tokens // tokens_per_frame]

        return rows_of

    return rows


_ANYFLOW_TIMESTEP_TABLES = tuple(
    TokenProducer(_anyflow_frame_tokens, _anyflow_frame_rows(index), output=index, sliver=_anyflow_one_token_per_frame)
    for index in (0, 1)
)


def _skyreels_frames(embedder: torch.nn.Module, call: ProducerCall) -> int | None:
    """SkyReels-V2's diffusion-forcing call gives one timestep per latent frame, ``(B, F)``; others one per sample."""
    timestep = call["timestep"]
    return timestep.shape[1] if timestep.dim() == 2 else None


def _skyreels_frame_rows(index: int) -> Callable[[torch.nn.Module, ProducerCall, Callable],
                                                 Callable[[TokenRanges], Any]]:
    """:attr:`TokenProducer.rows` for entry ``index`` of SkyReels-V2's embedder (``temb`` ``(B, F, D)``, its
    projection ``(B, F, 6 D)``): the per-frame table (small) made once per forward, from one text token, and sliced."""

    def rows(embedder: torch.nn.Module, call: ProducerCall, forward: Callable) -> Callable[[TokenRanges], Any]:
        table = forward(call["timestep"], call["encoder_hidden_states"][:1, :1], None)[index]
        return lambda ranges: _take(table, 1, ranges)

    return rows


_SKYREELS_FRAME_TABLES = tuple(
    # The tables are per frame; the model forward repeats them over each frame's tokens, flattens them to (B, S, ...)
    # and keeps them through all blocks (7 LD). Deferred here, those operations are deferred with them
    # (memopt.hooks._deferred_tokens.DeferredGroups): each chunk gets its tokens' rows, and the head runs in chunks.
    TokenProducer(_skyreels_frames, _skyreels_frame_rows(index), output=index, sliver=lambda call: call)
    for index in (0, 1)
)


PLANS: dict[str, SequencePlan] = {
    "WanTransformer3DModel": SequencePlan(
        {"blocks.*": _WAN},
        gather=None,
        embed="patch_embedding",
        producers={"rope": TokenProducer(_wan_rope_tokens, _wan_rope_rows), "condition_embedder": _WAN_TIMESTEP_TABLES},
        source="memopt + WanTransformer3DModel._cp_plan",
    ),
    "WanVACETransformer3DModel": SequencePlan(
        # Wan's blocks as Wan's. A VACE block carries the control tokens as its main stream (split; attn1 exchanges
        # their K/V; its output written back over its input) and also reads the video tokens and returns a per-token
        # hint: those go in the text stream's place, the same length as the control stream, so cut into the same
        # ranges and exchanged by no attention. The model runs every VACE block before the main blocks and keeps all
        # hints until the main block each is added after (8 for Wan2.1-VACE-14B, 15 for 1.3B): the VACE blocks read
        # only the embedded video tokens, the text, the timestep tables and each other's control state, so each runs
        # when its hint is first used (runs_when_used): one hint and one control state at a time. The model keeps the
        # video tokens and the last control state alive through the main blocks (~2 LD no plan removes).
        {
            "blocks.*": _WAN,
            "vace_blocks.*": dataclasses.replace(
                _WAN,
                inputs={
                    **_WAN.inputs,
                    "control_hidden_states": _IMAGE_TOKENS,
                    "hidden_states": _TEXT_TOKENS,  # the video tokens
                },
                metadata=_returns_text_stream_first("control_hidden_states", "hidden_states"),  # (hint, control)
                runs_when_used=True,
            ),
        },
        embed=("patch_embedding", "vace_patch_embedding"),
        producers={"rope": TokenProducer(_wan_rope_tokens, _wan_rope_rows)},
    ),
    "ChronoEditTransformer3DModel": SequencePlan(
        # ChronoEdit's blocks are its own copy of WanTransformerBlock (not in diffusers' TransformerBlockRegistry).
        # Its rotary tables skip frames for two-frame edits, so they are computed whole (0.1 LD) and split.
        {"blocks.*": dataclasses.replace(_WAN, metadata=TransformerBlockMetadata(return_hidden_states_index=0))},
        gather=None,
        embed="patch_embedding",
        producers={"condition_embedder": _WAN_TIMESTEP_TABLES},
        source="memopt + ChronoEditTransformer3DModel._cp_plan",
    ),
    "SkyReelsV2Transformer3DModel": SequencePlan(
        # Wan2.1 blocks with diffusion forcing, under their own class. The diffusion-forcing call modulates every
        # token with its frame's timestep, a (B, 6, S, D) temb (tokens on dim 2, deferred: see
        # _SKYREELS_FRAME_TABLES); with causal_block_size > 1 the
        # self-attention gets a block-causal (1, 1, S, S) mask, cut per chunk by query rows (the chunk's final call
        # sees the full K/V with exactly its rows). No _cp_plan; the rotary module has Wan's layout.
        {
            "blocks.*": dataclasses.replace(
                _WAN,
                inputs={
                    "hidden_states": _IMAGE_TOKENS,
                    "temb": SequenceSplit(2, 4),  # diffusion forcing (B, 6, S, D); (B, 6, D) passes whole
                    "rotary_emb": _pair(SequenceSplit(1, 4)),
                    "attention_mask": SequenceSplit(2, 4),  # block-causal (1, 1, S_q, S_kv): the chunk's query rows
                },
                metadata=TransformerBlockMetadata(return_hidden_states_index=0),
            )
        },
        embed="patch_embedding",
        producers={"rope": TokenProducer(_wan_rope_tokens, _wan_rope_rows),
                   "condition_embedder": _SKYREELS_FRAME_TABLES},
    ),
    "HeliosTransformer3DModel": SequencePlan(
        # Wan's block with per-token modulation and a history prefix: hidden_states is [history | window] and
        # original_context_length (an int, the window's token count) says where the window starts. attn1 runs over
        # all tokens; attn2 (text cross-attention) on the window tokens only, chunk-local; the output norm keeps only
        # the window tokens. Split dims as _cp_plan["blocks.*.attn1"]; its gathers sit at attn1/attn2/ffn, so the
        # gather is memopt's proj_out.
        {
            "blocks.*": BlockPlan(
                inputs={
                    "hidden_states": _IMAGE_TOKENS,
                    "temb": SequenceSplit(1, 4),  # (B, S, 6, D) per token (zero timestep on history tokens)
                    "rotary_emb": SequenceSplit(1, 3),  # (1, S, 2 x head_dim) cos | sin
                    "original_context_length": TokenCount(),  # the window tokens at the end of the sequence
                },
                attention={"attn1": _WAN_SELF_ATTENTION},
                metadata=TransformerBlockMetadata(return_hidden_states_index=0),
            )
        },
        gather={"proj_out": ContextParallelOutput(gather_dim=1, expected_dims=3)},
        embed="patch_embedding",
        # HeliosOutputNorm(hidden_states, temb, original_context_length): per-token shift / scale from temb (B, S, D),
        # and only the window tokens are kept.
        tail_inputs={"temb": _IMAGE_TOKENS, "original_context_length": TokenCount()},
        # The embedder's (B, D) temb and (B, 6 D) projection, expanded over the history tokens (from a zero
        # timestep) and the window's, then concatenated: (B, S, D) and (B, 6, S, D), 7 LD through every block,
        # deferred (tokens on dim 1 and 2 of the expansions).
        producers={"condition_embedder": (BroadcastTable(1, output=0), BroadcastTable(2, output=1))},
        source="memopt + HeliosTransformer3DModel._cp_plan",
    ),
    "WanAnimateTransformer3DModel": SequencePlan(
        # Wan's blocks (the module's own copy of WanTransformerBlock, not in diffusers' TransformerBlockRegistry): attn1
        # exchanges K/V, attn2 (text + CLIP image tokens) is chunk-local. The face adapter that the model runs after
        # every inject_face_latents_blocks-th block is per-frame cross-attention (each latent frame's tokens attend to
        # its frame's N face tokens): chunk-local, run as a block of its own whose chunks are whole frames or lie
        # inside one frame, each given its frames' face tokens; its output is an update the model adds to the hidden
        # states, so it is not written over them. No _cp_plan in diffusers 0.42. The patch embedding is written in
        # place (pose latents added to frames 1..T), so it cannot be a zero-stride stand-in in the tail passes: only
        # the pose embedding is.
        {
            "blocks.*": dataclasses.replace(_WAN, metadata=TransformerBlockMetadata(return_hidden_states_index=0)),
            "face_adapter.*": BlockPlan(
                inputs={"hidden_states": _IMAGE_TOKENS, "encoder_hidden_states": ChunkValue(_wan_animate_face_tokens)},
                conditioning=("pre_norm_kv",),  # chunks inside one frame share its face tokens: normed once
                metadata=TransformerBlockMetadata(return_hidden_states_index=0),
                token_groups=_wan_animate_face_frames,
                returns_update=True,
            ),
        },
        embed="pose_patch_embedding",
        producers={"rope": TokenProducer(_wan_rope_tokens, _wan_rope_rows)},
    ),
    "AnyFlowTransformer3DModel": SequencePlan(
        # Wan2.1's block under its own class (not in diffusers' TransformerBlockRegistry): attn1 is bidirectional
        # self-attention over all video tokens (K/V exchanged; its processor calls dispatch_attention_fn with no mask),
        # attn2 cross-attention to the umT5 tokens (chunk-local; its key/value side computed once per block). The model
        # expands its per-frame (t, r) timestep embedding to every token in its conditioning embedder: temb (B, S, D)
        # and its projection (B, S, 6 D), deferred (per-frame tables gathered per chunk), the model's unflatten and
        # its output head's per-token shift / scale with them, so the head runs in chunks. The rotary tables are
        # computed whole (complex, 2 / heads LD) and cut per chunk. No _cp_plan in diffusers 0.42: gathered at
        # proj_out (the default), whose (B, S, C) output the model only reshapes.
        {
            # Wan's block plan with AnyFlow's inputs (its processor applies its own rotary embedding, an unflatten of
            # the head dim and a complex product, which takes Wan's empty stand-ins too)
            "blocks.*": dataclasses.replace(
                _WAN,
                inputs={
                    "hidden_states": _IMAGE_TOKENS,
                    "temb": SequenceSplit(1, 4),  # (B, S, 6, D): per-frame timesteps repeated over each frame's tokens
                    "rotary_emb": ChunkValue(_anyflow_rotary_rows),  # {"query", "key"}: (1, 1, S, head_dim / 2)
                },
                metadata=TransformerBlockMetadata(return_hidden_states_index=0),
            )
        },
        embed="patch_embedding",
        producers={"condition_embedder": _ANYFLOW_TIMESTEP_TABLES},
    ),
}
