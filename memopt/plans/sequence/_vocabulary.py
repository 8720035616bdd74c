"""The sequence-plan vocabulary (the dataclasses a plan is made of) and the pieces several family lineages share:
token slicing, per-axis rotary gathers, the dual-stream block metadata, common splits, joint attentions and
conditioning layers."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping, Union

import torch
from diffusers.hooks._helpers import TransformerBlockMetadata
from diffusers.models._modeling_parallel import ContextParallelOutput

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
    """An int argument that counts the last (or, ``leading``, the first) tokens of the image stream (a length no
    ``_cp_plan`` entry can split).

    Helios puts history tokens in front of the noisy window's and passes the window's token count
    (``original_context_length``) to every block and to its output norm, which cut ``hidden_states`` into
    ``[history, window]`` with it: cross-attention to the text runs on the window tokens only, and the output head
    keeps only them. A chunk gets the number of its own tokens among the last ``count`` ones, so the same cut falls
    inside the chunk (chunks are contiguous ranges: its history tokens first, its window tokens after). Among a
    :attr:`SequencePlan.tail_inputs` it also says that the output head keeps only those tokens, so the tail chunks
    cover them alone.

    ``leading``: the count of the first tokens instead. HunyuanVideo-I2V (``image_condition_type="token_replace"``)
    passes its blocks the first latent frame's token count (``num_tokens``), whose tokens the blocks modulate with the
    clean image's timestep table and the rest with the noisy one's; a chunk gets the number of its own tokens among the
    first ``count``. Passed whole, every chunk would take its own first tokens for the first frame's.
    """

    leading: bool = False

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
        local_calls_first: how many kernel calls of each module forward come before those and stay chunk-local
            (Cosmos 3's causal self-attention of the text prefix, which every chunk carries whole, precedes the
            generation tokens' call over [text | generation] keys).
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
        fused_blocks: for fused linears that carry no ``_tp_packed_col_blocks`` (JoyImage's ``img_attn_qkv``, cut by
            ``.chunk(3, -1)``): their column blocks as proportional integers, one per role, like diffusers'
            ``PackedColwiseParallel(blocks)`` (``(1, 1, 1)``: three equal blocks). A linear's own
            ``_tp_packed_col_blocks`` takes precedence.
        pair_mask: the block argument holding a per-token mask ``m`` over this module's key sequence (its streams
            in ``order``) that the block turns into the query-dependent ``m[:, None, :, None] * m[:, None, None, :]``
            before attention (Chroma, whose pipeline passes a float 0/1 mask: additive, so unlike ``padding_mask``
            its invalid query rows are not fully masked). A chunk sees only its own diagonal block of that mask, so
            it is not gathered: the final call gets the chunk's rows against every key, made from the whole
            argument with the same product (any dtype, bit-exact). The block plan must split the argument over the
            same streams, in the same order.
        empty_stand_ins: the stand-ins of skipped projections are empty along dim 0 (the batch), so the norms,
            rotary embedding and reshapes the processor applies to them before the attention call cost nothing; with
            the default full-size zeros they cost what the real projection's post-processing does (Wan at 720p: the
            rotary embedding of the discarded Q or K moves ~30 GB per block, over half of what the second pass
            adds). Only for processors that take an empty batch: diffusers' shared ``apply_rotary_emb`` reshapes
            with ``-1`` and ``view(batch_size, -1, heads, dim)`` infers from the element count, both impossible for
            an empty tensor (an error, never a different result: the stand-in's values are never read).
        collect_with_previous: its keys and values do not depend on the output of the previous module of
            ``BlockPlan.attention`` (LTX-2's audio self-attention after the video one, the video-to-audio attention
            after the audio-to-video one): the two-pass schedule collects both in one pass, and the pass saved is one
            that would rerun every earlier attention. A wrong claim changes the result, which the family's
            equivalence tests catch.
    """

    order: tuple[str, ...] = ("image",)
    calls: int | Literal["batch"] = 1
    local_calls_first: int = 0
    optional: bool = False
    query: tuple[str, ...] = ("to_q",)
    key_value: tuple[str, ...] = ("to_k", "to_v")
    query_norms: tuple[str, ...] = ("norm_q", "norm_added_q")
    key_value_norms: tuple[str, ...] = ("norm_k", "norm_added_k")
    active: Callable[[torch.nn.Module, Callable[[str], Any]], bool] | None = None
    padding_mask: bool = False
    fused: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    fused_blocks: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    pair_mask: str | None = None
    empty_stand_ins: bool = False
    collect_with_previous: bool = False

    def __post_init__(self) -> None:
        if sorted(self.order) != sorted(set(self.order)) or any(s not in STREAMS for s in self.order):
            raise ValueError(f"JointAttention order must list distinct streams of {STREAMS}, got {self.order}")
        if self.padding_mask and self.pair_mask is not None:
            raise ValueError("JointAttention takes padding_mask or pair_mask, not both")
        if self.local_calls_first < 0:
            raise ValueError(f"JointAttention local_calls_first counts calls, got {self.local_calls_first}")
        for name, roles in self.fused.items():
            if not roles or any(role not in FUSED_ROLES for role in roles):
                raise ValueError(f"JointAttention fused[{name!r}] must be a non-empty tuple of {FUSED_ROLES}, got "
                                 f"{roles}")
        for name, blocks in self.fused_blocks.items():
            if name not in self.fused or len(blocks) != len(self.fused[name]) or any(b <= 0 for b in blocks):
                raise ValueError(f"JointAttention fused_blocks[{name!r}] must give one positive integer per role of "
                                 f"fused[{name!r}], got {blocks}")


@dataclass(frozen=True)
class BlockPlan:
    """How one kind of transformer block runs in sequence chunks.

    Attributes:
        inputs: block forward argument name -> how it is split (a tuple of specs for tuple arguments, ``None``
            entries pass whole; a :class:`TokenCount` for an int counting the last or first image tokens). Must split
            the block's hidden states (the image stream) along dim 1, and its encoder hidden states along dim 1 when the
            block carries a text stream. Arguments not listed pass whole to every chunk.
        attention: attention module path relative to the block -> :class:`JointAttention`. A block with several
            runs one collection pass per module (in this order), then the final pass.
        split_text: whether the text stream may be split across chunks. ``False`` when the processor reshapes
            text tokens per batch item (Mochi drops masked text tokens per sample, so piece sizes would depend on
            the mask): the text is then carried whole by every chunk.
        unused_before_attention: modules (relative to the block) that run before the first whole-sequence attention
            but whose output is not needed to reach it (the MLP branch of Flux / HunyuanVideo single blocks, which is
            computed before attention). Skipped, like the query projections, in the first collection pass.
        text_only: linear modules (relative to the block) on the text stream whose outputs feed only the block's text
            output, never the keys and values of a whole-sequence call (Cosmos 3's text query, attention output and
            MLP projections). With the text carried whole (``split_text=False``) every chunk computes that stream
            and only chunk 0's output is kept, so the other chunks, and every collection pass, get zeros instead;
            the text's work is then done about once per block. A wrong claim changes the result, which the family's
            equivalence tests catch.
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
        chunk_local: the block's attention never mixes the tokens the chunks split (Latte's temporal blocks attend
            over the frames of one position; the chunks split the positions): with ``attention`` empty it runs once
            per chunk, nothing exchanged. Without this flag (or ``returns_update``) a block that names no
            whole-sequence attention is skipped and reported, so that a plan forgetting one is not silently wrong.
        input_is_view: the block's hidden states can be a view of a tensor its caller still reads (Krea 2's layerwise
            text-fusion blocks get ``encoder_hidden_states.reshape(...)``, the model's own input, which the pipeline
            passes again at every step): its output is never written over its input.
        runs_when_used: the model runs these blocks in a loop of their own and keeps every output until a later
            block uses it (Wan VACE: one hint per VACE layer, 8-15 full-size tensors through the main blocks), and
            their inputs are made before that loop (or are each other's outputs): in inference each call is held and
            runs when its output is first used (:mod:`memopt.hooks._held_blocks`), so one output exists at a time.
            Not with another hook on the block (offloading, casting): those run as called.
        variants: block class name -> the plan for blocks of that class at the same paths (a model config that swaps
            the block class: HunyuanVideo-I2V's token-replace blocks take the first frame's token count too).
        routed: expert-choice mixture-of-experts layers (relative to the block; ignored where the module has no
            :class:`~memopt.plans.experts.ExpertChoiceLayout`: a dense block's FeedForward at the same path), whose
            experts each choose their tokens over the whole sequence (Nucleus-Image). The router scores are the second
            cross-chunk exchange: after the K/V collection, a routing pass runs each chunk up to such a layer and keeps
            its router logits; the layer's choice is made over all of them, and the final pass runs each chunk's
            tokens through the experts that chose them. The routing pass reruns the block up to the layer (its
            attention included). Two-pass schedule and inference only.
        runs_whole: ``argument -> reason or None``: why this call must run on the whole sequence (``argument(name)``
            reads the block's forward arguments). For state a block carries from call to call that chunks would
            corrupt: GLM-Image's per-block KV cache, which its processor fills with the call's keys in ``"write"``
            mode (every chunk and pass would append its own) and prepends in ``"read"`` mode (keys that are not the
            chunks'). The call then runs unchunked with a warning naming the block and the reason.
    """

    inputs: Mapping[str, SplitSpec] = field(default_factory=dict)
    attention: Mapping[str, JointAttention] = field(default_factory=dict)
    split_text: bool = True
    unused_before_attention: tuple[str, ...] = ()
    text_only: tuple[str, ...] = ()
    conditioning: tuple[str, ...] = ()
    metadata: TransformerBlockMetadata | None = None
    token_groups: Callable[[Callable[[str], Any]], int] | None = None
    returns_update: bool = False
    chunk_local: bool = False
    input_is_view: bool = False
    runs_when_used: bool = False
    variants: Mapping[str, BlockPlan] = field(default_factory=dict)
    routed: tuple[str, ...] = ()
    runs_whole: Callable[[Callable[[str], Any]], str | None] | None = None

    def __post_init__(self) -> None:
        if self.text_only and self.split_text:
            raise ValueError("BlockPlan.text_only needs split_text=False: only a text stream that every chunk carries "
                             "whole is computed again by each")

    def for_block(self, block: torch.nn.Module) -> BlockPlan:
        """The plan for ``block``: its class's variant, else this one."""
        return self.variants.get(type(block).__name__, self)

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
        output: for a module returning a tuple that holds tables among other values (Lumina 2's rotary embedder
            returns the patchified latents, three tables and Python lengths): the index of this table in it. The
            module then runs (the other entries are needed as computed) and only this entry is deferred, its token
            count read from the computed table (``tokens`` is not called). A plan lists one producer per table, as a
            tuple, for such a module.
        sliver: with ``output``, for a module whose other entries do not depend on the tokens (Wan's conditioning
            embedder: the text embedding next to the per-token timestep tables): ``call -> call`` for one token per
            sample, which the module runs instead, so that its full tables are never computed; ``tokens`` then gives
            the count, and may return ``None`` for a call that has no per-token tables (one timestep per sample):
            the module then runs as is. The call itself where the tables are small already: per-frame tables that
            the model forward expands to every token (SkyReels-V2, Cosmos Predict2; ``tokens`` counts frames).
    """

    tokens: Callable[[torch.nn.Module, ProducerCall], int | None]
    rows: Callable[[torch.nn.Module, ProducerCall, Callable[..., Any]], Callable[[TokenRanges], Any]]
    output: int | None = None
    sliver: Callable[[ProducerCall], ProducerCall] | None = None


@dataclass(frozen=True)
class BroadcastTable:
    """A model-level module's per-sample output that the model forward expands over the tokens and then materialises.

    Expanding a ``(B, D)`` modulation to ``(B, S, D)`` costs nothing (a zero-stride view); what some models do next
    does: Helios concatenates its history tokens' zero-timestep tables with the window's (``torch.cat``), ERNIE-Image
    makes its six expanded tables contiguous, and both keep the result through every block (7 and 6 LD). While a
    chunked forward runs, memopt hands the model a stand-in of the output that behaves as the value until the model
    expands it along ``token_dim``; from there the expansion and the concatenation or copy after it are deferred, and
    each chunk gets its rows (:mod:`memopt.hooks._deferred_tokens`).

    Attributes:
        token_dim: the dim (counted from 0) where the model's ``expand`` puts the tokens; the value must have size 1
            there by then (an ``expand`` that does not expand that dim leaves a plain tensor, computed as the model
            computes it).
        output: for a module returning a tuple, the index of this entry (a plan lists one per entry, as a tuple);
            ``None`` for a module returning the table itself.
    """

    token_dim: int
    output: int | None = None

    def __post_init__(self) -> None:
        if self.token_dim < 0:
            raise ValueError(f"BroadcastTable.token_dim counts from 0, got {self.token_dim}")


Producer = Union[TokenProducer, BroadcastTable]
"""What :attr:`SequencePlan.producers` names a model-level module for."""


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
        producers: model-level module path -> :class:`TokenProducer` for per-token tables computed per chunk (a tuple
            of them, each with its ``output`` index, for a module returning several tables in a tuple), or
            :class:`BroadcastTable` for per-sample tables the model forward expands over the tokens.
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
        keeps_block_outputs: the model keeps block outputs past the next block (a ControlNet returns them all as
            residuals, HunyuanDiT holds its first half's for its long skip connections), so the blocks write their
            outputs out of place (``apply_sequence_chunking``'s default ``inplace``; ``inplace=True`` is refused).
        token_chains: model-level modules, each chain in call order, that act on each token alone and feed each
            other directly (the first one's output goes only to the second, ...), run on one token chunk (along dim 1,
            dim 0 of a batchless 2-D input) after another (in inference) so their wide intermediates exist a chunk at
            a time: Ideogram 4's RMSNorm and projection of its (B, S, 53248) text features; a chain of one module is
            a per-token module in chunks (Cosmos 3 Omni's output norm). See :mod:`memopt.hooks._token_chain`.
        source: where the plan comes from (shown in reports).
    """

    blocks: Mapping[str, BlockPlan]
    tail: str | None = "norm_out"
    gather: Mapping[str, ContextParallelOutput] | None = field(
        default_factory=lambda: {"proj_out": ContextParallelOutput(gather_dim=1, expected_dims=3)}
    )
    embed: str | tuple[str, ...] | None = None
    producers: Mapping[str, Producer | tuple[Producer, ...]] = field(default_factory=dict)
    tail_inputs: Mapping[str, SplitSpec] = field(default_factory=dict)
    tail_split: int | None = None
    num_chunks: int = 32
    keeps_block_outputs: bool = False
    token_chains: tuple[tuple[str, ...], ...] = ()
    source: str = "memopt"

    def __post_init__(self) -> None:
        if self.tail_split is not None and (
            self.tail is None or self.gather is None or set(self.gather) != {self.tail} or self.tail_inputs
        ):
            raise ValueError(f"SequencePlan.tail_split needs a tail module, gather naming only it and no tail_inputs, "
                             f"got tail {self.tail!r}, gather {self.gather}, tail_inputs {dict(self.tail_inputs)}")
        for pattern, block in self.blocks.items():
            stream = block.metadata.hidden_states_argument_name if block.metadata is not None else "hidden_states"
            spec = block.inputs.get(stream)
            sequence_first = isinstance(spec, SequenceSplit) and spec.split_dim == 0
            if sequence_first and self.tail is not None and self.tail_split is None:
                # The tail passes answer from the last block's output cut along dim 1 (batch-first streams).
                raise ValueError(f"SequencePlan: blocks {pattern!r} take sequence-first hidden states (split dim 0), "
                                 f"so the output head runs whole (tail=None) or in pieces of its input (tail_split)")
        if any(not chain or len(set(chain)) != len(chain) for chain in self.token_chains):
            raise ValueError(f"SequencePlan.token_chains must list chains of distinct module paths, got "
                             f"{self.token_chains}")
        for path, producer in self.producers.items():
            entries = producer if isinstance(producer, tuple) else (producer,)
            indexed = [entry.output is not None for entry in entries]
            if indexed != [isinstance(producer, tuple)] * len(indexed):
                raise ValueError(f"SequencePlan.producers[{path!r}]: a tuple of producers for a module returning a "
                                 "tuple, each with its output index; a single producer for a module returning its "
                                 "table, without one")
            if len({type(entry) for entry in entries}) != 1:
                raise ValueError(f"SequencePlan.producers[{path!r}]: the entries of one module are all TokenProducer "
                                 "or all BroadcastTable")

    def match(self, path: str) -> BlockPlan | None:
        """The plan of the block at ``path`` (``*`` stands for one path component, as in a ``_cp_plan``)."""
        for pattern, plan in self.blocks.items():
            if re.fullmatch(re.escape(pattern).replace(r"\*", r"[^.]+"), path):
                return plan
        return None


def _take(tensor: torch.Tensor, dim: int, ranges: TokenRanges) -> torch.Tensor:
    pieces = [tensor.narrow(dim, start, end - start) for start, end in ranges]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim)


def distinct_timestep_rows(
    timesteps: Callable[[ProducerCall], torch.Tensor],
    tables: Callable[[torch.nn.Module, ProducerCall, Callable[..., Any], torch.Tensor], tuple[torch.Tensor, ...]],
    index: int,
    flat: bool = False,
) -> Callable[[torch.nn.Module, ProducerCall, Callable[..., Any]], Callable[[TokenRanges], torch.Tensor]]:
    """:attr:`TokenProducer.rows` for a conditioning module's per-token timestep tables (Wan2.2 TI2V, LTX-Video's
    conditioning tokens): ``timesteps(call)`` gives the ``(B, S)`` timesteps, ``tables(module, call, forward, values)``
    the module's tables for a 1-D tensor of timestep values, one row each, of which entry ``index`` is deferred.

    The tables are computed once per forward, for the distinct timesteps (two in a TI2V call: the clean first frame's
    and the noisy rest's), and a chunk's rows are gathered from them: the same numbers as the module's own per-token
    rows, without the embedding MLP run again per block and chunk (for Wan, 7 D^2 multiply-adds per token against the
    block's ~15). Under a fake mode (the planner's simulation: no values to compare) each chunk's rows are computed
    instead, which holds the same memory. ``flat``: rows as ``(B s, ...)``, batch-major, as the module returns them
    for flattened timesteps (LTX-Video), instead of ``(B, s, ...)``.
    """
    from torch._subclasses.fake_tensor import is_fake

    def rows(module: torch.nn.Module, call: ProducerCall, forward: Callable[..., Any]
             ) -> Callable[[TokenRanges], torch.Tensor]:
        per_token = timesteps(call)
        if is_fake(per_token):
            def computed(ranges: TokenRanges) -> torch.Tensor:
                picked = _take(per_token, 1, ranges)
                table = tables(module, call, forward, picked.flatten())[index]
                return table if flat else table.unflatten(0, picked.shape)

            return computed
        values, inverse = torch.unique(per_token, return_inverse=True)
        table = tables(module, call, forward, values)[index]

        def gathered(ranges: TokenRanges) -> torch.Tensor:
            picked = _take(inverse, 1, ranges)
            out = table[picked.flatten()]
            return out if flat else out.unflatten(0, picked.shape)

        return gathered

    return rows


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


def _returns_text_stream_first(image: str = "hidden_states",
                               text: str = "encoder_hidden_states") -> TransformerBlockMetadata:
    """Metadata of a block taking its image and text streams as the arguments ``image`` and ``text`` and returning
    ``(text, image)``: the signature diffusers' ``TransformerBlockRegistry`` records for dual-stream blocks."""
    return TransformerBlockMetadata(return_hidden_states_index=1, return_encoder_hidden_states_index=0,
                                    hidden_states_argument_name=image, encoder_hidden_states_argument_name=text)


def _returns_image_stream_first(image: str = "hidden_states",
                                text: str = "encoder_hidden_states") -> TransformerBlockMetadata:
    """Metadata of a block taking its image and text (or second) streams as the arguments ``image`` and ``text`` and
    returning ``(image, text)``, the other order (blocks outside diffusers' registry: HunyuanVideo 1.5, EasyAnimate,
    JoyImage, LTX-2, Kandinsky 6)."""
    return TransformerBlockMetadata(return_hidden_states_index=0, return_encoder_hidden_states_index=1,
                                    hidden_states_argument_name=image, encoder_hidden_states_argument_name=text)


_IMAGE_TOKENS = SequenceSplit(1, 3)
_TEXT_TOKENS = SequenceSplit(1, 3, ("text",))


def _pair(spec: SequenceSplit) -> tuple[SequenceSplit, SequenceSplit]:
    return (spec, spec)


_JOINT = {"query": ("to_q", "add_q_proj"), "key_value": ("to_k", "to_v", "add_k_proj", "add_v_proj")}
_TEXT_FIRST = JointAttention(order=("text", "image"), **_JOINT)
_IMAGE_FIRST = JointAttention(order=("image", "text"), **_JOINT)


# The MLP branch of the parallel attention + MLP single-stream blocks runs before their attention.
_SINGLE_STREAM_MLP = ("proj_mlp", "act_mlp")


def _adaptive_norms(*norms: str) -> tuple[str, ...]:
    """The timestep-modulation layers of diffusers' adaptive norms (``AdaLayerNormZero`` and kin): ``silu`` and
    ``linear``."""
    return tuple(f"{norm}.{layer}" for norm in norms for layer in ("silu", "linear"))


_DUAL_STREAM_MODULATION = _adaptive_norms("norm1", "norm1_context")
_SINGLE_STREAM_MODULATION = _adaptive_norms("norm")
