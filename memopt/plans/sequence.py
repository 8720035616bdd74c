"""Sequence plans: where each family's transformer blocks cut their inputs into chunks, and which attention calls
need every chunk's keys and values.

This is memopt's counterpart of diffusers' ``_cp_plan`` (``models/_modeling_parallel.py``), one level down. A
``_cp_plan`` splits the *model's* inputs once and lets ring/Ulysses attention exchange K/V between GPUs inside every
block. Sequential context parallelism runs the N "ranks" one after another on one device, so the exchange has to
happen block by block: each block is split on entry and gathered on exit, and the plan therefore names *block*
inputs. The entries keep the ``_cp_plan`` shape (argument name -> split dim + expected number of dims, a tuple of
them for tuple arguments such as ``(cos, sin)`` rotary embeddings), and where a model has a ``_cp_plan`` the split
dims are the ones it declares (Wan ``rope`` dim 1 of 4, LTX ``rope`` dim 1 of 3, QwenImage ``pos_embed`` dim 0 of 2,
Flux ``img_ids``/``txt_ids`` dim 0, QwenImage ``modulate_index`` / ``encoder_hidden_states_mask`` dim 1 of 2, Wan
per-token ``timestep`` dim 1); ``tests/hooks/test_sequence.py`` checks that they agree. HunyuanVideo (1.0, 1.5),
HunyuanImage 2.1, CogVideoX, CogView4, SD3, Mochi, Chroma, SkyReels-V2 and Wan VACE have no ``_cp_plan`` in diffusers
0.42; their plans below are memopt's. Block classes missing from diffusers' ``TransformerBlockRegistry`` (ChronoEdit's
copy of ``WanTransformerBlock``, and others) get their layout from ``BlockPlan.metadata``.

Vocabulary:

* **streams**: the token sequences a block carries. ``"image"`` (the latent tokens, always split) and, in joint
  (MMDiT) blocks, ``"text"`` (the encoder tokens that share the attention). A block's stream lengths are read from
  its ``hidden_states`` / ``encoder_hidden_states`` arguments (names from diffusers' ``TransformerBlockRegistry``).
  The text stream is split like the image stream when every chunk gets at least one text token and the plan allows
  it; otherwise every chunk carries the whole text (computed redundantly, taken once).
* **segments**: what one dim of a block input is made of, in order. Flux's rotary table covers
  ``("text", "image")``; HunyuanVideo's attention mask covers ``("image", "text")``; a chunk gets its piece of each
  segment, concatenated.
* **joint attention**: an attention module whose kernel call attends over the whole sequence (self-attention, or
  MMDiT joint attention); ``order`` is how the streams sit in its key sequence. Every other attention call in the
  block (cross-attention to text or image-prompt tokens) stays chunk-local.
* **tail / gather / embed / producers**: the model-level parts (:class:`SequencePlan`): where the output head starts,
  where its chunks are gathered (the ``ContextParallelOutput`` entries of the model's ``_cp_plan`` when it has one),
  which module embeds the image tokens, and which per-token tables are computed per chunk.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping, Union

import torch
from diffusers.hooks._helpers import TransformerBlockMetadata
from diffusers.models._modeling_parallel import ContextParallelOutput
from diffusers.models.embeddings import get_1d_rotary_pos_embed
from torch._subclasses.fake_tensor import is_fake

STREAMS: tuple[str, ...] = ("image", "text")
FUSED_ROLES: tuple[str, ...] = ("query", "key_value", "other")


@dataclass(frozen=True)
class SequenceSplit:
    """How one block input is cut into chunks (the block-level analogue of diffusers' ``ContextParallelInput``).

    Attributes:
        split_dim: the dim that runs over tokens (negative counts from the end).
        expected_dims: only split tensors with this many dims; others pass whole, exactly like diffusers'
            ``ContextParallelInput.expected_dims`` (this is how Wan's per-token ``temb`` of Wan2.2 TI2V,
            ``(B, S, 6, D)``, is split while the usual ``(B, 6, D)`` is not).
        segments: the streams the split dim is made of, in order. A tensor whose split dim has size 1 is a
            broadcast over tokens and passes whole.
    """

    split_dim: int
    expected_dims: int | None = None
    segments: tuple[str, ...] = ("image",)

    def __post_init__(self) -> None:
        unknown = [s for s in self.segments if s not in STREAMS]
        if unknown or not self.segments:
            raise ValueError(f"SequenceSplit segments must be a non-empty tuple of {STREAMS}, got {self.segments}")


@dataclass(frozen=True)
class TokenCount:
    """An int argument that counts the last tokens of the image stream (a length no ``_cp_plan`` entry can split).

    Helios puts history tokens in front of the noisy window's and passes the window's token count
    (``original_context_length``) to every block and to its output norm, which cut ``hidden_states`` into
    ``[history, window]`` with it: cross-attention to the text runs on the window tokens only, and the output head
    keeps only them. A chunk gets the number of its own tokens among the last ``count`` ones, so the same cut falls
    inside the chunk (chunks are contiguous ranges: its history tokens first, its window tokens after). Among a
    :attr:`SequencePlan.tail_inputs` it also says that the output head keeps only those tokens, so the tail chunks
    cover them alone.
    """

    @property
    def segments(self) -> tuple[str, ...]:
        return ("image",)


@dataclass(frozen=True)
class ChunkValue:
    """A block input each chunk gets built from the block's whole arguments instead of cut from its own value.

    For processors that take the structure of their whole-sequence attention in a form no split can cut: Qwen-Image
    2.1's default processor gets its block-causal mask as global ``(start, end, is_text)`` segments and makes one
    kernel call per segment over a prefix of the keys. A chunk gets ``segments=None`` instead, which selects the
    processor's single-call path, and the mask rows of its own queries as ``attention_mask``: the exchange passes
    such a mask (all keys, the chunk's query rows) on with the full keys and values, as a block-causal mask the plan
    cuts by query rows.

    Attributes:
        build: ``(argument, rows, tokens) -> value``: ``argument(name)`` reads the block's whole forward arguments,
            ``rows`` is the chunk's ``(start, end)`` in the image stream and ``tokens`` that stream's length. It
            must give the chunk's rows of the unmodified block's result (the family's equivalence tests check it),
            or raise for arguments it cannot serve.
    """

    build: Callable[[Callable[[str], Any], tuple[int, int], int], Any]

    @property
    def segments(self) -> tuple[str, ...]:
        return ("image",)


SplitSpec = Union[SequenceSplit, TokenCount, ChunkValue, tuple[Union[SequenceSplit, None], ...]]


@dataclass(frozen=True)
class JointAttention:
    """An attention module whose kernel calls need every chunk's keys and values.

    Attributes:
        order: the streams, in the order the processor concatenates them into the key sequence.
        calls: how many leading kernel calls per module forward attend over the whole sequence: ``1``, or
            ``"batch"`` for processors that loop over the batch (Mochi). Later calls in the same forward (e.g.
            image-prompt adapters) stay chunk-local.
        optional: the module may be absent from a block (SD3.5's second, image-only attention ``attn2``).
        query: projections (relative to the attention module) whose output only feeds the queries. A collection
            pass never uses the queries, so these return a zero-stride stand-in there instead of a matmul.
        key_value: projections whose output only feeds the keys and values. The final pass takes K/V from the
            collected buffers, so these are skipped there the same way.
        query_norms, key_value_norms: shape-preserving norms applied to those projections' outputs (diffusers'
            ``norm_q`` / ``norm_k`` and their text-stream twins); skipped with them, returning their input.
        active: ``(block, argument) -> bool``: whether the module attends over the whole sequence in this block
            forward (``argument(name)`` reads the block's forward arguments); ``None``: always. For blocks that
            switch an attention off by an argument (LTX-2's ``use_a2v_cross_attention``, the ``all_perturbed`` of its
            spatio-temporal guidance): the module then runs chunk-local, and an attention-kernel call from it is an
            error, never a chunk-local result.
        padding_mask: the processor's mask is a boolean self-attention padding mask over the call's own tokens,
            ``valid[query] & valid[key]`` of shape ``(B, 1, S, S)`` (HunyuanVideo 1.5 builds it from a token
            mask). Such a mask depends on the query position, which the exchange otherwise refuses; here its
            diagonal is ``valid``, so the exchange gathers that as the key mask and zeroes the output rows of the
            chunk's invalid queries, which are fully masked rows (zeros from PyTorch's attention) in the
            unmodified call. Nothing of size ``S_query x S`` is built.
        fused: linear projections whose output columns feed several roles -> the role of each column block, in
            order: ``"query"``, ``"key_value"`` or ``"other"`` (used after attention). The block widths are the
            linear's ``_tp_packed_col_blocks`` (diffusers' packed tensor-parallel layout, set at init). A pass that
            does not use a role computes only the other blocks' columns (row slices of the weight, views) and
            leaves zeros in the rest: FLUX.2's single-stream ``to_qkv_mlp_proj`` is ``("query", "key_value",
            "key_value", "other", "other")`` (Q, K, V, SwiGLU gate, SwiGLU value).
        pair_mask: the block argument holding a per-token mask ``m`` over this module's key sequence (its streams
            in ``order``) that the block turns into the query-dependent ``m[:, None, :, None] * m[:, None, None, :]``
            before attention (Chroma, whose pipeline passes a float 0/1 mask: additive, so unlike ``padding_mask``
            its invalid query rows are not fully masked). A chunk sees only its own diagonal block of that mask, so
            it is not gathered: the final call gets the chunk's rows against every key, made from the whole
            argument with the same product (any dtype, bit-exact). The block plan must split the argument over the
            same streams, in the same order.
        collect_with_previous: its keys and values do not depend on the output of the previous module of
            ``BlockPlan.attention`` (LTX-2's audio self-attention after the video one, the video-to-audio attention
            after the audio-to-video one): the two-pass schedule collects both in one pass, and the pass saved is one
            that would rerun every earlier attention. A wrong claim changes the result, which the family's
            equivalence tests catch.
    """

    order: tuple[str, ...] = ("image",)
    calls: int | Literal["batch"] = 1
    optional: bool = False
    query: tuple[str, ...] = ("to_q",)
    key_value: tuple[str, ...] = ("to_k", "to_v")
    query_norms: tuple[str, ...] = ("norm_q", "norm_added_q")
    key_value_norms: tuple[str, ...] = ("norm_k", "norm_added_k")
    active: Callable[[torch.nn.Module, Callable[[str], Any]], bool] | None = None
    padding_mask: bool = False
    fused: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    pair_mask: str | None = None
    collect_with_previous: bool = False

    def __post_init__(self) -> None:
        if sorted(self.order) != sorted(set(self.order)) or any(s not in STREAMS for s in self.order):
            raise ValueError(f"JointAttention order must list distinct streams of {STREAMS}, got {self.order}")
        if self.padding_mask and self.pair_mask is not None:
            raise ValueError("JointAttention takes padding_mask or pair_mask, not both")
        for name, roles in self.fused.items():
            if not roles or any(role not in FUSED_ROLES for role in roles):
                raise ValueError(f"JointAttention fused[{name!r}] must be a non-empty tuple of {FUSED_ROLES}, got "
                                 f"{roles}")


@dataclass(frozen=True)
class BlockPlan:
    """How one kind of transformer block runs in sequence chunks.

    Attributes:
        inputs: block forward argument name -> how it is split (a tuple of specs for tuple arguments, ``None``
            entries pass whole; a :class:`TokenCount` for an int counting the last image tokens). Must split the
            block's hidden states (the image stream) along dim 1, and its encoder hidden states along dim 1 when the
            block carries a text stream. Arguments not listed pass whole to every chunk.
        attention: attention module path relative to the block -> :class:`JointAttention`. A block with several
            runs one collection pass per module (in this order), then the final pass.
        split_text: whether the text stream may be split across chunks. ``False`` when the processor reshapes
            text tokens per batch item (Mochi drops masked text tokens per sample, so piece sizes would depend on
            the mask): the text is then carried whole by every chunk.
        unused_before_attention: modules (relative to the block) that run before the first whole-sequence attention
            but whose output is not needed to reach it (the MLP branch of Flux / HunyuanVideo single blocks, which is
            computed before attention). Skipped, like the query projections, in the first collection pass.
        conditioning: modules (relative to the block) whose input is the same in every chunk: the SiLU and linear
            of adaptive norms, which turn the timestep embedding into shift/scale/gate vectors. Their first output
            in a block forward serves every chunk and pass (a ``(B, 6D)`` GEMV that reads the whole weight matrix,
            otherwise repeated per chunk). Names missing from a block are ignored (block variants differ); the
            key/value side of chunk-local cross-attention is found without being listed.
        metadata: the block's argument names and output layout, for block classes diffusers'
            ``TransformerBlockRegistry`` does not list (ChronoEdit's own copy of ``WanTransformerBlock``); ``None``
            takes the registry's entry. A block in neither is skipped and reported.
        token_groups: ``argument -> G``: the image stream is ``G`` equal groups of tokens (latent frames) that a
            chunk-local attention of the block treats apart (Wan Animate's face adapter: each frame's tokens attend to
            that frame's face tokens, its processor cutting the queries into ``G`` equal groups). Chunks then cover
            whole groups, or lie inside one group, so that the chunk's queries are again equal groups; ``None``:
            balanced chunks.
        returns_update: the block returns an update that the model adds to the block's hidden states (Wan Animate's
            face adapter), not the new hidden states: its output is never written over its input. A block whose
            attention is all chunk-local (``attention`` empty) runs once per chunk.
    """

    inputs: Mapping[str, SplitSpec] = field(default_factory=dict)
    attention: Mapping[str, JointAttention] = field(default_factory=dict)
    split_text: bool = True
    unused_before_attention: tuple[str, ...] = ()
    conditioning: tuple[str, ...] = ()
    metadata: TransformerBlockMetadata | None = None
    token_groups: Callable[[Callable[[str], Any]], int] | None = None
    returns_update: bool = False

    @property
    def has_text_stream(self) -> bool:
        return any(
            "text" in spec.segments
            for entry in self.inputs.values()
            for spec in (entry if isinstance(entry, tuple) else (entry,))
            if spec is not None
        ) or any("text" in attention.order for attention in self.attention.values())


ProducerCall = Mapping[str, Any]
"""A producer module's forward arguments by name (defaults filled in)."""

TokenRanges = list[tuple[int, int]]
"""Token ranges ``[(start, end), ...]`` in a producer's output, taken in this order."""


@dataclass(frozen=True)
class TokenProducer:
    """A model-level module whose output is per-token tables (rotary embeddings) that a chunk can compute alone.

    Families build per-token tables before the blocks and keep them alive through all of them: LTX-Video's rotary
    ``(cos, sin)`` are ``(B, S, D)`` fp32 each (4 LD in a bf16 model), Mochi's ``(S, heads, head_dim / 2)`` fp32
    (2 LD), the others' ``(S, head_dim)`` (0.1-0.2 LD). While a chunked forward runs, memopt hands the blocks a
    deferred stand-in instead, and each chunk computes only its own rows (bit-identical: the tables are per token).

    Attributes:
        tokens: ``(module, call) -> number of tokens the output covers``.
        rows: ``(module, call, forward) -> rows_of``, called once per chunked forward (``forward`` is the module's
            original forward); ``rows_of(ranges)`` returns the output for the tokens in ranges, concatenated along
            the token dim. Every chunk of every block asks for its rows, so what does not depend on the chunk (the
            per-axis tables of a factorised rotary embedding, the token positions) is built once, in ``rows``.
    """

    tokens: Callable[[torch.nn.Module, ProducerCall], int]
    rows: Callable[[torch.nn.Module, ProducerCall, Callable[..., Any]], Callable[[TokenRanges], Any]]


@dataclass(frozen=True)
class SequencePlan:
    """How a model class runs in sequence chunks.

    Attributes:
        blocks: block module path pattern (``"blocks.*"``, ``*`` = one path component) -> :class:`BlockPlan`.
        tail: the first model-level module after the blocks (``"norm_out"``). The model code from there to the
            ``gather`` modules (output norm, modulation, projection) then also runs chunk by chunk, in a second pass
            over the model forward (see :mod:`memopt.hooks.sequence`); ``None`` runs it on the whole sequence.
        gather: module path -> ``ContextParallelOutput`` where the chunks of the tail are gathered, exactly as in a
            ``_cp_plan``; ``None`` takes the ``ContextParallelOutput`` entries of the model's own ``_cp_plan``.
        embed: the model-level module that turns the latents into image tokens (a tuple of them for models that embed
            several token sequences, as Wan VACE's video and control latents). In the tail passes its output is
            never read (the blocks answer from the kept output), so it returns a zero-stride stand-in instead of
            recomputing a full hidden state, and is not kept from the block pass for replay.
        producers: model-level module path -> :class:`TokenProducer` for per-token tables computed per chunk.
        tail_inputs: arguments of the ``tail`` module other than the hidden states that run over the image tokens
            (a per-token modulation, like Helios' ``temb``), cut for each tail chunk as block inputs are. A
            :class:`TokenCount` among them (Helios' ``original_context_length``) makes the tail chunks cover only the
            last tokens it counts, the ones the output head keeps, and the gather module place them from 0.
        tail_split: for a head the model feeds a grid-shaped view of the last block's output (Kandinsky 5 reshapes
            its ``(B, S, D)`` tokens to ``(B, F, H, W, D)`` with the full sizes before ``out_layer``), which a tail
            pass's chunk cannot take: the ``tail`` module runs once, on pieces of its first argument cut along this
            dim, and ``gather`` names the tail module itself, with the dim its output pieces go along (each piece
            scaled by the same factor, e.g. a patch size). No second model pass; the head must be per token.
        num_chunks: the default number of chunks. A chunk's workspace is the unmodified block's per-token peak
            (8-15 LD for these families) divided by the number of chunks, on top of the ~3 LD floor; the defaults
            keep it near 0.4 LD (measured growth at the defaults: 3.2-3.45 LD per token, fp32).
        source: where the plan comes from (shown in reports).
    """

    blocks: Mapping[str, BlockPlan]
    tail: str | None = "norm_out"
    gather: Mapping[str, ContextParallelOutput] | None = field(
        default_factory=lambda: {"proj_out": ContextParallelOutput(gather_dim=1, expected_dims=3)}
    )
    embed: str | tuple[str, ...] | None = None
    producers: Mapping[str, TokenProducer] = field(default_factory=dict)
    tail_inputs: Mapping[str, SplitSpec] = field(default_factory=dict)
    tail_split: int | None = None
    num_chunks: int = 32
    source: str = "memopt"

    def __post_init__(self) -> None:
        if self.tail_split is not None and (
            self.tail is None or self.gather is None or set(self.gather) != {self.tail} or self.tail_inputs
        ):
            raise ValueError(f"SequencePlan.tail_split needs a tail module, gather naming only it and no tail_inputs, "
                             f"got tail {self.tail!r}, gather {self.gather}, tail_inputs {dict(self.tail_inputs)}")

    def match(self, path: str) -> BlockPlan | None:
        """The plan of the block at ``path`` (``*`` stands for one path component, as in a ``_cp_plan``)."""
        for pattern, plan in self.blocks.items():
            if re.fullmatch(re.escape(pattern).replace(r"\*", r"[^.]+"), path):
                return plan
        return None


def _take(tensor: torch.Tensor, dim: int, ranges: TokenRanges) -> torch.Tensor:
    pieces = [tensor.narrow(dim, start, end - start) for start, end in ranges]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim)


def _token_grid(ranges: TokenRanges, sizes: tuple[int, int, int], device: torch.device) -> torch.Tensor:
    """``(3, tokens)`` int32 (frame, row, column) indices of the given tokens of a row-major ``sizes`` grid (one
    small tensor, as it is kept)."""
    index = torch.cat([torch.arange(start, end, device=device, dtype=torch.int32) for start, end in ranges])
    _, rows, columns = sizes
    return torch.stack([index // (rows * columns), index // columns % rows, index % columns])


class _AxisGather:
    """Rows of a rotary table that factorises over a row-major (frames, rows, columns) token grid.

    A token's ``cos`` (``sin``) row is the concatenation of its frame's, row's and column's rows of three per-axis
    tables (Wan, HunyuanVideo), so a chunk's rows are a gather per axis and a concatenation: the same numbers the
    module computes for those tokens. Each chunk's grid indices (three int32 a token, one tensor) are kept for the
    forward: every block asks for the same chunks twice.
    """

    def __init__(self, axes: list[tuple[torch.Tensor, torch.Tensor]], sizes: tuple[int, int, int]) -> None:
        self.axes, self.sizes = axes, sizes  # per axis: (cos, sin) rows per position
        self.grids: dict[tuple[tuple[int, int], ...], torch.Tensor] = {}

    def __call__(self, ranges: TokenRanges) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)``, each ``(tokens, head dim)``."""
        key = tuple(ranges)
        grid = self.grids.get(key)
        if grid is None:
            grid = self.grids[key] = _token_grid(ranges, self.sizes, self.axes[0][0].device)
        indices = grid.unbind()
        cos = torch.cat([axis_cos[index] for (axis_cos, _), index in zip(self.axes, indices)], dim=-1)
        sin = torch.cat([axis_sin[index] for (_, axis_sin), index in zip(self.axes, indices)], dim=-1)
        return cos, sin


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


def _flux_rope_tokens(pos_embed: torch.nn.Module, call: ProducerCall) -> int:
    return call["ids"].shape[0]


def _flux_rope_rows(pos_embed: torch.nn.Module, call: ProducerCall, forward: Callable) -> Callable[[TokenRanges], Any]:
    """Flux's tables are a function of each token's position ids: run the module on the chunk's ids."""
    return lambda ranges: forward(_take(call["ids"], 0, ranges))


def _hunyuan_rope_tokens(rope: torch.nn.Module, call: ProducerCall) -> int:
    _, _, frames, height, width = call["hidden_states"].shape
    return frames // rope.patch_size_t * (height // rope.patch_size) * (width // rope.patch_size)


def _hunyuan_rope_rows(rope: torch.nn.Module, call: ProducerCall, forward: Callable) -> Callable[[TokenRanges], Any]:
    """HunyuanVideo's ``(S, head_dim)`` tables for some tokens: its per-axis 1-D embeddings of their positions, made
    once per axis position and gathered (elementwise functions of the position, so the same numbers)."""
    _, _, frames, height, width = call["hidden_states"].shape
    sizes = (frames // rope.patch_size_t, height // rope.patch_size, width // rope.patch_size)
    return _AxisGather(_rope_axis_tables(rope, sizes, call["hidden_states"].device), sizes)


def _rope_axis_tables(
    rope: torch.nn.Module, sizes: tuple[int, ...], device: torch.device
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(cos, sin)`` per grid axis, one row per position: the 1-D rotary embedding of ``rope.rope_dim[axis]``
    features (HunyuanVideo's and HunyuanImage's modules build their tables from these)."""
    return [
        get_1d_rotary_pos_embed(dim, torch.arange(size, device=device, dtype=torch.float32), rope.theta, use_real=True)
        for dim, size in zip(rope.rope_dim, sizes)
    ]


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


def _mochi_rope_tokens(rope: torch.nn.Module, call: ProducerCall) -> int:
    return call["num_frames"] * call["height"] * call["width"]


def _mochi_rope_rows(rope: torch.nn.Module, call: ProducerCall, forward: Callable) -> Callable[[TokenRanges], Any]:
    """Mochi tables for some tokens: positions are computed whole once per forward (3 numbers a token), then each
    chunk's rows from its positions."""
    positions = rope._get_positions(call["num_frames"], call["height"], call["width"], call["device"], call["dtype"])
    return lambda ranges: rope._create_rope(call["pos_frequencies"], _take(positions, 0, ranges))


def _hunyuanimage_rope_grid(rope: torch.nn.Module, call: ProducerCall) -> tuple[int, ...]:
    """The (rows, columns) or (frames, rows, columns) token grid of HunyuanImage's 4-D (base) / 5-D (refiner) input."""
    return tuple(size // patch for size, patch in zip(call["hidden_states"].shape[2:], rope.patch_size))


def _hunyuanimage_rope_tokens(rope: torch.nn.Module, call: ProducerCall) -> int:
    return int(torch.Size(_hunyuanimage_rope_grid(rope, call)).numel())


def _hunyuanimage_rope_rows(rope: torch.nn.Module, call: ProducerCall, forward: Callable) -> Callable[[TokenRanges],
                                                                                                      Any]:
    """HunyuanImage's ``(S, head_dim)`` tables for some tokens: per-axis 1-D embeddings of their positions (as
    HunyuanVideo's), gathered. A 2-D grid is one frame whose table has no columns, so the concatenation is the module's
    two-axis one."""
    sizes = _hunyuanimage_rope_grid(rope, call)
    device = call["hidden_states"].device
    axes = _rope_axis_tables(rope, sizes, device)
    if len(sizes) == 2:
        empty = torch.empty(1, 0, device=device)
        axes, sizes = [(empty, empty), *axes], (1, *sizes)
    return _AxisGather(axes, sizes)


def _returns_text_stream_first(image: str = "hidden_states",
                               text: str = "encoder_hidden_states") -> TransformerBlockMetadata:
    """Metadata of a block taking its image and text streams as the arguments ``image`` and ``text`` and returning
    ``(text, image)``: the signature diffusers' ``TransformerBlockRegistry`` records for dual-stream blocks."""
    return TransformerBlockMetadata(return_hidden_states_index=1, return_encoder_hidden_states_index=0,
                                    hidden_states_argument_name=image, encoder_hidden_states_argument_name=text)


_IMAGE_TOKENS = SequenceSplit(1, 3)
_TEXT_TOKENS = SequenceSplit(1, 3, ("text",))


def _pair(spec: SequenceSplit) -> tuple[SequenceSplit, SequenceSplit]:
    return (spec, spec)


_JOINT = {"query": ("to_q", "add_q_proj"), "key_value": ("to_k", "to_v", "add_k_proj", "add_v_proj")}
_TEXT_FIRST = JointAttention(order=("text", "image"), **_JOINT)
_IMAGE_FIRST = JointAttention(order=("image", "text"), **_JOINT)

_WAN = BlockPlan(
    inputs={
        "hidden_states": _IMAGE_TOKENS,
        "temb": SequenceSplit(1, 4),  # Wan2.2 TI2V per-token timesteps: (B, S, 6, D); (B, 6, D) passes whole
        "rotary_emb": _pair(SequenceSplit(1, 4)),  # (1, S, 1, head_dim) cos / sin, as _cp_plan["rope"]
    },
    attention={"attn1": JointAttention()},  # attn2 is cross-attention to text (and image) tokens: chunk-local
)

_FLUX_INPUTS = {
    "hidden_states": _IMAGE_TOKENS,
    "encoder_hidden_states": _TEXT_TOKENS,
    "image_rotary_emb": _pair(SequenceSplit(0, 2, ("text", "image"))),  # pos_embed(cat(txt_ids, img_ids))
}

_HUNYUAN_INPUTS = {
    "hidden_states": _IMAGE_TOKENS,
    "encoder_hidden_states": _TEXT_TOKENS,
    "attention_mask": SequenceSplit(3, 4, ("image", "text")),  # (B, 1, 1, S_image + S_text) key mask
}
_HUNYUAN_ROPE = _pair(SequenceSplit(0, 2))  # (S_image, head_dim); text tokens get no rotary embedding

# The MLP branch of the parallel attention + MLP single-stream blocks runs before their attention.
_SINGLE_STREAM_MLP = ("proj_mlp", "act_mlp")


def _adaptive_norms(*norms: str) -> tuple[str, ...]:
    """The timestep-modulation layers of diffusers' adaptive norms (``AdaLayerNormZero`` and kin): ``silu`` and
    ``linear``."""
    return tuple(f"{norm}.{layer}" for norm in norms for layer in ("silu", "linear"))


_DUAL_STREAM_MODULATION = _adaptive_norms("norm1", "norm1_context")
_SINGLE_STREAM_MODULATION = _adaptive_norms("norm")


def _hunyuan_blocks(dual_rope: str) -> dict[str, BlockPlan]:
    """HunyuanVideo's layout (HunyuanImage 2.1 shares it): MMDiT blocks, then parallel attention + MLP single-stream
    blocks that take the streams separately and concatenate cat(image, text) themselves; ``dual_rope`` is the dual
    blocks' name for the rotary tables."""
    return {
        "transformer_blocks.*": BlockPlan(
            inputs={**_HUNYUAN_INPUTS, dual_rope: _HUNYUAN_ROPE},
            attention={"attn": _IMAGE_FIRST},
            conditioning=_DUAL_STREAM_MODULATION,
        ),
        "single_transformer_blocks.*": BlockPlan(
            inputs={**_HUNYUAN_INPUTS, "image_rotary_emb": _HUNYUAN_ROPE},
            attention={"attn": JointAttention(order=("image", "text"))},  # one projection for cat(image, text)
            unused_before_attention=_SINGLE_STREAM_MLP,
            conditioning=_SINGLE_STREAM_MODULATION,
        ),
    }

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
    metadata=TransformerBlockMetadata(
        return_hidden_states_index=0,
        return_encoder_hidden_states_index=1,
        hidden_states_argument_name="hidden_states",
        encoder_hidden_states_argument_name="audio_hidden_states",
    ),
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


# MiniMax-H3 runs one stack of blocks over one packed sequence [text | audio | video] (the model scatters the three
# projected modalities into it with index_copy before the first block): to the blocks it is a single token stream,
# the "image" stream here, split like any other, and one self-attention over all of it (no cross-attention). The
# modality only shows in a per-row index (adaln_indices = timestep_indices x 3 + token_tags) into a per-block table of
# (timestep, modality) modulation rows, split with the rows as _cp_plan["transformer_blocks.*"] does.
def _minimax_h3_rope_tokens(rope: Any, call: ProducerCall) -> int:
    return call["position_ids"].shape[0]


def _minimax_h3_rope_rows(rope: Any, call: ProducerCall, forward: Callable) -> Callable[[TokenRanges], Any]:
    """MiniMax-H3 tables for some rows: the module on those rows' ``(t, h, w)`` coordinates, which it maps to ``(cos,
    sin)`` one row at a time (elementwise), so the same numbers."""
    return lambda ranges: forward(_take(call["position_ids"], 0, ranges))


_MINIMAX_ROWS = SequenceSplit(0, 1)  # (S,) per-row index tensors, as _cp_plan's adaln_indices / timestep_indices


def _qwenimage21_prefill(argument: Callable[[str], Any], rows: tuple[int, int], tokens: int) -> None:
    """``segments`` for a chunk: ``None``, the processor's single-call path (see :func:`_qwenimage21_mask_rows`).

    The prefix K/V cache is refused: ``"extract"`` stores ``key[:, slice]`` with a slice of the whole sequence (a
    chunk's keys would be cached wrongly), ``"cached"`` prepends cached keys the exchange does not know.
    """
    if argument("kv_cache_mode") is not None:
        raise NotImplementedError(
            "QwenImage21TransformerBlock: sequence chunking does not support "
            f"kv_cache_mode={argument('kv_cache_mode')!r} (the prefix K/V cache); call the model without kv_cache"
        )
    return None


def _qwenimage21_mask_rows(argument: Callable[[str], Any], rows: tuple[int, int], tokens: int) -> torch.Tensor:
    """The chunk's query rows of the block-causal mask, ``(B | 1, 1, rows, S)`` bool.

    The default ``QwenImage21AttnProcessor`` gets the mask as the prefix ``segments`` (global ``(start, end,
    is_text)`` runs of text / condition-image tokens) and makes one kernel call per segment, each segment's queries
    against the keys ``[0, end)`` (text: causal within the segment), then one for the target image against all keys,
    padded text keys (``key_valid``) dropped. That is ``(q >= k or same image block) and key_valid[k]``
    (``build_qwenimage21_block_causal_mask``); here densely, for the chunk's rows only.
    """
    segments, key_valid = argument("segments"), argument("key_valid")
    if segments is None:
        raise NotImplementedError(
            "QwenImage21TransformerBlock: sequence chunking needs the block-causal segments of "
            "QwenImage21AttnProcessor; QwenImage21FlexAttnProcessor's BlockMask cannot be cut by query rows (set "
            "QwenImage21AttnProcessor)"
        )
    device = argument("hidden_states").device
    block = torch.full((tokens,), -1, dtype=torch.long, device=device)  # -1: text; else the image block's number
    for number, (start, end, is_text) in enumerate(segments):
        if not is_text:
            block[start:end] = number
    block[segments[-1][1] if segments else 0:] = len(segments)  # the target image
    start, end = rows
    query_block = block[start:end, None]
    causal = torch.arange(start, end, device=device)[:, None] >= torch.arange(tokens, device=device)[None, :]
    mask = (causal | ((query_block == block[None, :]) & (query_block >= 0)))[None, None]
    return mask if key_valid is None else mask & key_valid.bool()[:, None, None, :]


def _flux3_modulation_tokens(modulation: torch.nn.Module, call: ProducerCall) -> int:
    return call["temb"].shape[1]


def _flux3_modulation_rows(modulation: torch.nn.Module, call: ProducerCall,
                           forward: Callable) -> Callable[[TokenRanges], Any]:
    """FLUX.3's per-token modulation ``linear(temb)`` for some tokens.

    The model makes ``temb`` by expanding one timestep embedding per sample over a mode's tokens (then a SiLU, which
    materializes it), so its rows are all equal: then every row of the table is the linear of the first one, computed
    once (a GEMV) and expanded, and a chunk's rows are a zero-stride view, with no GEMM per chunk and pass. Otherwise
    (per-token timesteps, or a fake tensor whose values cannot be compared in a simulation) each chunk computes the
    linear of its own rows (row-wise: the same numbers).
    """
    temb = call["temb"]
    if not is_fake(temb) and torch.equal(temb, temb[:, :1].expand_as(temb)):
        row = forward(temb[:, :1])
        return lambda ranges: row.expand(-1, sum(end - start for start, end in ranges), -1)
    return lambda ranges: forward(_take(temb, 1, ranges))


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


SEQUENCE_PLANS: dict[str, SequencePlan] = {
    "WanTransformer3DModel": SequencePlan(
        {"blocks.*": _WAN},
        gather=None,
        embed="patch_embedding",
        producers={"rope": TokenProducer(_wan_rope_tokens, _wan_rope_rows)},
        source="memopt + WanTransformer3DModel._cp_plan",
    ),
    "WanVACETransformer3DModel": SequencePlan(
        # Wan's blocks as Wan's. A VACE block carries the control tokens as its main stream (split; attn1 exchanges
        # their K/V; its output written back over its input) and also reads the video tokens and returns a per-token
        # hint: those go in the text stream's place, the same length as the control stream, so cut into the same
        # ranges and exchanged by no attention. The model keeps the video tokens, the last control state and the
        # last hint alive between blocks (~5 LD no plan removes).
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
        source="memopt + ChronoEditTransformer3DModel._cp_plan",
    ),
    "SkyReelsV2Transformer3DModel": SequencePlan(
        # Wan2.1 blocks with diffusion forcing, under their own class. The diffusion-forcing call modulates every
        # token with its frame's timestep, a (B, 6, S, D) temb (tokens on dim 2); with causal_block_size > 1 the
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
        producers={"rope": TokenProducer(_wan_rope_tokens, _wan_rope_rows)},
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
                attention={"attn1": JointAttention()},
                metadata=TransformerBlockMetadata(return_hidden_states_index=0),
            )
        },
        gather={"proj_out": ContextParallelOutput(gather_dim=1, expected_dims=3)},
        embed="patch_embedding",
        # HeliosOutputNorm(hidden_states, temb, original_context_length): per-token shift / scale from temb (B, S, D),
        # and only the window tokens are kept.
        tail_inputs={"temb": _IMAGE_TOKENS, "original_context_length": TokenCount()},
        source="memopt + HeliosTransformer3DModel._cp_plan",
    ),
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
    "HunyuanVideoTransformer3DModel": SequencePlan(
        _hunyuan_blocks(dual_rope="freqs_cis"),
        embed="x_embedder",
        producers={"rope": TokenProducer(_hunyuan_rope_tokens, _hunyuan_rope_rows)},
        num_chunks=48,  # single-stream blocks keep attention + a 4x MLP + their concatenation per chunk
    ),
    "HunyuanVideo15Transformer3DModel": SequencePlan(
        {
            "transformer_blocks.*": BlockPlan(
                inputs={
                    "hidden_states": _IMAGE_TOKENS,
                    "encoder_hidden_states": _TEXT_TOKENS,  # Qwen2.5-VL + byT5 glyph + SigLIP image tokens
                    "attention_mask": SequenceSplit(1, 2, ("text",)),  # (B, S_text) token mask; image tokens valid
                    "freqs_cis": _HUNYUAN_ROPE,  # (S_image, head_dim) cos / sin
                },
                # The processor turns the token mask into valid[q] & valid[k], (B, 1, S, S): a padding mask.
                attention={"attn": JointAttention(order=("image", "text"), padding_mask=True, **_JOINT)},
                conditioning=_DUAL_STREAM_MODULATION,
                metadata=TransformerBlockMetadata(return_hidden_states_index=0, return_encoder_hidden_states_index=1),
            )
        },
        embed="x_embedder",
        # HunyuanVideo15RotaryPosEmbed has HunyuanVideo's attributes and per-axis tables.
        producers={"rope": TokenProducer(_hunyuan_rope_tokens, _hunyuan_rope_rows)},
    ),
    "HunyuanImageTransformer2DModel": SequencePlan(
        # HunyuanVideo's layout: dual-stream blocks, then single-stream blocks that take the streams separately and
        # concatenate cat(image, text) themselves; one (B, 1, 1, S_image + S_text) key mask (the text mask padded with
        # True for the image tokens) and (S_image, head_dim) rotary tables for both kinds. The text stream is the token
        # refiner's Qwen2.5-VL tokens and the byT5 glyph tokens, reordered per sample (valid first) before the blocks.
        _hunyuan_blocks(dual_rope="image_rotary_emb"),
        embed="x_embedder",
        producers={"rope": TokenProducer(_hunyuanimage_rope_tokens, _hunyuanimage_rope_rows)},
        num_chunks=48,  # single-stream blocks keep attention + a 4x MLP + their concatenation per chunk
    ),
    "CogVideoXTransformer3DModel": SequencePlan(
        {
            "transformer_blocks.*": BlockPlan(
                inputs={
                    "hidden_states": _IMAGE_TOKENS,
                    "encoder_hidden_states": _TEXT_TOKENS,
                    "image_rotary_emb": _pair(SequenceSplit(0, 2)),  # (S_image, head_dim) when RoPE is used
                },
                attention={"attn1": JointAttention(order=("text", "image"))},  # one projection for cat(text, image)
                conditioning=_adaptive_norms("norm1", "norm2"),
            )
        },
        tail="norm_final",
        embed="patch_embed",
    ),
    "CogView4Transformer2DModel": SequencePlan(
        # One kind of MMDiT block: CogView4AttnProcessor projects cat(text, image) with one to_q / to_k / to_v (per-head
        # LayerNorm on Q and K, rotary on the image part only) and calls F.scaled_dot_product_attention itself. The
        # timestep modulation (norm1.linear of the model's SiLU(temb)) is the same for every chunk. No _cp_plan. The
        # rotary tables are (S_image, head_dim) fp32 cos / sin, 1/16 LD at the released width: computed whole and split.
        # The forward's optional (B, S_text) text mask (no pipeline passes one) becomes the processor's additive
        # (m[q] * m[k] > 0).to(query dtype) over cat(text, image): query-dependent, so the exchange refuses it
        # (NotImplementedError naming the module).
        {
            "transformer_blocks.*": BlockPlan(
                inputs={
                    "hidden_states": _IMAGE_TOKENS,
                    "encoder_hidden_states": _TEXT_TOKENS,
                    "image_rotary_emb": _pair(SequenceSplit(0, 2)),  # (S_image, head_dim) cos / sin
                    "attention_mask": SequenceSplit(1, 2, ("text",)),  # (B, S_text) text mask; image tokens valid
                },
                attention={"attn1": JointAttention(order=("text", "image"))},  # one projection for cat(text, image)
                conditioning=_adaptive_norms("norm1"),
            )
        },
        # norm_out(hidden_states, temb) -> proj_out -> unpatchify; patch_embed returns (image, text), so the image-token
        # embedding is its proj.
        embed="patch_embed.proj",
    ),
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
        producers={"rope": TokenProducer(_ltx_rope_tokens, _ltx_rope_rows)},
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
        },
        source="memopt + LTX2VideoTransformer3DModel._cp_plan",
    ),
    "QwenImageTransformer2DModel": SequencePlan(
        {
            "transformer_blocks.*": BlockPlan(
                inputs={
                    "hidden_states": _IMAGE_TOKENS,
                    "encoder_hidden_states": _TEXT_TOKENS,
                    "encoder_hidden_states_mask": SequenceSplit(1, 2, ("text",)),
                    "image_rotary_emb": (SequenceSplit(0, 2), SequenceSplit(0, 2, ("text",))),  # (img, txt) freqs
                    "modulate_index": SequenceSplit(1, 2),  # zero_cond_t: per-token modulation choice
                },
                attention={"attn": _TEXT_FIRST},
                conditioning=("img_mod", "txt_mod"),  # SiLU + Linear of the timestep embedding per stream
            )
        },
        gather=None,
        embed="img_in",
        source="memopt + QwenImageTransformer2DModel._cp_plan",
    ),
    "SD3Transformer2DModel": SequencePlan(
        {
            "transformer_blocks.*": BlockPlan(
                inputs={"hidden_states": _IMAGE_TOKENS, "encoder_hidden_states": _TEXT_TOKENS},
                attention={
                    "attn": _IMAGE_FIRST,
                    "attn2": JointAttention(optional=True),  # SD3.5 dual-attention layers: image-only
                },
                conditioning=_DUAL_STREAM_MODULATION,
            )
        },
        embed="pos_embed",
    ),
    "MochiTransformer3DModel": SequencePlan(
        {
            "transformer_blocks.*": BlockPlan(
                inputs={
                    "hidden_states": _IMAGE_TOKENS,
                    "encoder_hidden_states": _TEXT_TOKENS,
                    "encoder_attention_mask": SequenceSplit(1, 2, ("text",)),
                    "image_rotary_emb": _pair(SequenceSplit(0, 3)),  # (S_image, heads, head_dim / 2)
                },
                attention={"attn1": JointAttention(order=("image", "text"), calls="batch", **_JOINT)},
                split_text=False,
                conditioning=_DUAL_STREAM_MODULATION,
            )
        },
        embed="patch_embed",
        producers={"rope": TokenProducer(_mochi_rope_tokens, _mochi_rope_rows)},
    ),
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
    "MiniMaxH3Transformer3DModel": SequencePlan(
        {
            "transformer_blocks.*": BlockPlan(
                inputs={
                    "hidden_states": _IMAGE_TOKENS,
                    "adaln_indices": _MINIMAX_ROWS,  # row -> (timestep, modality) modulation row
                    "rotary_emb": _pair(SequenceSplit(0, 2)),  # (S, 6 rope_freq_dim) cos / sin, as _cp_plan["rope"]
                },
                attention={"attn": JointAttention()},
                # adaln_proj: SiLU + one Linear of the shared temb into all six (timestep, modality) tables
                # (time_embed_dim x 18 hidden_size: 260 M weights a block at the release), the same for every chunk.
                conditioning=("adaln_proj",),
                metadata=TransformerBlockMetadata(return_hidden_states_index=0),
            )
        },
        # norm_out(hidden_states, temb, timestep_indices) modulates per row; then both heads (proj_out to 96 video
        # channels, audio_proj_out to 32 audio channels) run over every row and the model picks each modality's rows
        # with sequence-wide indices. memopt's tail gathers at one module, and _cp_plan gathers at two (proj_out and
        # audio_proj_out): the chunks are gathered at norm_out's output instead, so the norm and its modulation
        # temporaries run per chunk and the two narrow heads (0.02 D wide together) run whole.
        gather={"norm_out": ContextParallelOutput(gather_dim=1, expected_dims=3)},
        embed=("proj_in", "audio_proj_in"),
        producers={"rope": TokenProducer(_minimax_h3_rope_tokens, _minimax_h3_rope_rows)},
        tail_inputs={"timestep_indices": _MINIMAX_ROWS},
        source="memopt + MiniMaxH3Transformer3DModel._cp_plan",
    ),
    "QwenImage21Transformer2DModel": SequencePlan(
        # One kind of single-stream block over the joint sequence (prompt with condition images in place, then the
        # target image): all of it is the "image" stream, split in chunks. The model computes one shared modulation
        # (B | B + 1, 4D) and passes it whole; under causal_condition target_token_mask (S,) picks each token's row
        # (t = 0 for text and condition images), so it is cut like the tokens, as are the complex rotary table
        # (S, head_dim / 2) and, in the tail, norm_out's target_token_mask. Attention is block-causal: a chunk gets the
        # single-call path of the default processor with its rows of the dense mask (ChunkValue), and the exchange
        # passes them on with every chunk's keys and values. No _cp_plan in diffusers 0.42.
        {
            "transformer_blocks.*": BlockPlan(
                inputs={
                    "hidden_states": _IMAGE_TOKENS,
                    "rotary_emb": SequenceSplit(0, 2),  # (S, head_dim / 2) complex64
                    "target_token_mask": SequenceSplit(0, 1),  # (S,) bool: the target image's tokens
                    "segments": ChunkValue(_qwenimage21_prefill),
                    "attention_mask": ChunkValue(_qwenimage21_mask_rows),
                },
                attention={"attn": JointAttention()},
                metadata=TransformerBlockMetadata(return_hidden_states_index=0),  # not in diffusers' registry
            )
        },
        embed="img_in",
        # norm_out(hidden_states, temb, target_token_mask) -> proj_out (the output covers the joint sequence; the
        # pipeline keeps its last target tokens).
        tail_inputs={"target_token_mask": SequenceSplit(0, 1)},
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
        # concatenated by the model, which a deferred table supports (torch.cat along its token dim).
        producers={
            f"{stage}_stream_modulations.{mode}": TokenProducer(_flux3_modulation_tokens, _flux3_modulation_rows)
            for stage in ("early", "single")
            for mode in ("image", "image_cond", "txt")
        },
        tail_inputs={"temb": _IMAGE_TOKENS},  # Flux3AdaLayerNorm(hidden_states, temb): per-token scale / shift
        num_chunks=48,
    ),
    "AuraFlowTransformer2DModel": SequencePlan(
        # SD3-like MMDiT blocks, then single DiT blocks over cat(text, image). The text stream is the 8 learned register
        # tokens followed by the projected prompt. AuraFlowAttnProcessor2_0 projects each stream (bias-free to_q / to_k
        # / to_v and add_*_proj), LayerNorms Q and K per head (fp32), concatenates cat(text, image) and calls
        # F.scaled_dot_product_attention itself, without a mask; no rotary embedding (learned positions are added by the
        # patch embedding). The timestep modulation (AdaLayerNormZero's SiLU + Linear of temb, (B, D)) is the same for
        # every chunk. Neither block class is in diffusers' TransformerBlockRegistry. No _cp_plan in diffusers 0.42.
        {
            "joint_transformer_blocks.*": BlockPlan(
                inputs={"hidden_states": _IMAGE_TOKENS, "encoder_hidden_states": _TEXT_TOKENS},
                attention={"attn": _TEXT_FIRST},
                conditioning=_DUAL_STREAM_MODULATION,
                metadata=_returns_text_stream_first(),  # (encoder_hidden_states, hidden_states)
            ),
            # The model feeds these blocks cat(register + text, image) as one sequence: one stream to them, split in
            # chunks; a plain self-attention over it.
            "single_transformer_blocks.*": BlockPlan(
                inputs={"hidden_states": _IMAGE_TOKENS},
                attention={"attn": JointAttention()},
                conditioning=_adaptive_norms("norm1"),
                metadata=TransformerBlockMetadata(return_hidden_states_index=0),
            ),
        },
        # The model drops the text tokens of the last block's output (combined[:, encoder_seq_len:]), then
        # norm_out(hidden_states, temb) (AuraFlowPreFinalBlock: scale / shift from temb) -> proj_out -> unpatchify.
        embed="pos_embed",
        # Single blocks keep attention + a 2.67x SwiGLU MLP per chunk, as Flux's single-stream ones; and the model's
        # forward keeps the last MMDiT block's image output (its `hidden_states`) alive through every single block
        # (it concatenates into `combined_hidden_states`), 1 LD above the 3 LD floor that no plan removes.
        num_chunks=48,
    ),
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
    "BriaTransformer2DModel": SequencePlan(
        # Flux's layout (the class is a copy of FluxTransformer2DModel without pooled / guidance inputs). diffusers'
        # TransformerBlockRegistry records BriaTransformerBlock as returning the image stream alone at index 0, while it
        # returns (text, image) like Flux's blocks, and does not list BriaSingleTransformerBlock: both get Flux's
        # metadata. No _cp_plan: gathered at proj_out.
        {
            "transformer_blocks.*": BlockPlan(
                inputs=_FLUX_INPUTS,
                attention={"attn": _TEXT_FIRST},
                conditioning=_DUAL_STREAM_MODULATION,
                metadata=_returns_text_stream_first(),
            ),
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
        num_chunks=48,  # single-stream blocks keep attention + a 4x MLP + their concatenation per chunk, as Flux
    ),
    "HunyuanVideoFramepackTransformer3DModel": SequencePlan(
        # HunyuanVideo's blocks (the same classes, called the same way): MMDiT blocks, then parallel attention + MLP
        # single-stream blocks; one (B, 1, 1, S_image + S_text) key mask, None for batch 1, and (S_image, head_dim)
        # rotary tables. The image stream is [4x | 2x | clean history | window] tokens, split like any other: every
        # token attends to all of them. The text stream is the SigLIP image projection (729 tokens) then the refined
        # Llama tokens (the model concatenates them, in that order, with the mask padded by True for the image tokens).
        # The rotary tables are the model's concatenation of four rope calls (the history ones down-sampled by
        # avg_pool3d): computed whole and split (no producer: the model pads, pools and concatenates them itself).
        # No _cp_plan in diffusers 0.42.
        _hunyuan_blocks(dual_rope="freqs_cis"),
        # The model feeds its head hidden_states[:, -original_context_length:]: the window's tokens, the last ones of
        # the last block's output. Tail passes cannot serve that cut: it counts from the end, so a tail pass's last
        # block would have to answer with the chunk alone (memopt answers with the dropped history tokens in front of
        # it, for cuts like Chroma's [:, P:]) and the head then gets too many tokens (memopt falls back to a whole
        # head, with a warning). norm_out (LayerNorm, shift / scale from temb) is per token, so it runs on pieces of
        # its own input instead, written into its (B, window, D) output; proj_out (D -> 64 channels) runs whole on that.
        tail="norm_out",
        gather={"norm_out": ContextParallelOutput(gather_dim=1, expected_dims=3)},
        tail_split=1,
        embed="x_embedder",
        num_chunks=48,  # single-stream blocks keep attention + a 4x MLP + their concatenation per chunk
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
}
"""Model class name -> :class:`SequencePlan` for the families memopt supports."""


def sequence_plan(model: torch.nn.Module) -> SequencePlan:
    """The :class:`SequencePlan` for ``model``'s class, or a ``ValueError`` naming the supported classes."""
    name = type(model).__name__
    if name not in SEQUENCE_PLANS:
        raise ValueError(
            f"memopt has no sequence plan for {name}; supported: {sorted(SEQUENCE_PLANS)}. Pass plan=SequencePlan(...) "
            "to apply_sequence_chunking for other models."
        )
    return SEQUENCE_PLANS[name]
