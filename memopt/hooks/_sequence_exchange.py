"""The K/V exchange of sequential context parallelism: full-length keys and values gathered chunk by chunk.

A :class:`BlockRun` is the state of one block forward in chunks. Its :meth:`BlockRun.handle` sits in the attention
dispatch chain (:mod:`memopt.hooks._attention_dispatch`) of every whole-sequence attention module of the block: in a
collection pass it writes the chunk's keys, values and key-side mask into full-length buffers and stops the block
(:class:`KeyValuesCollected`); in the final pass it swaps the buffers in for the chunk's own K/V; in the lock-step
schedule it writes them and suspends the chunk until every chunk has.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..plans.experts import ExpertChoiceLayout
from ..plans.sequence import JointAttention, SequenceSplit
from ._attention_dispatch import AttentionCall, Proceed
from ._sequence_chunks import ChunkLayout


class KeyValuesCollected(Exception):
    """Raised at the attention call of a collection pass: the rest of the block is not needed."""


class RouterScoresCollected(Exception):
    """Raised at an expert-choice MoE layer in the routing pass, once its router scores are kept: the rest of the
    block is not needed."""


@dataclass
class RoutingState:
    """One expert-choice MoE layer of the running block (``BlockPlan.routed``): its router logits, filled chunk by
    chunk in the routing pass, then the choice made over all of them (see :mod:`memopt.hooks.experts`)."""

    path: str
    module: torch.nn.Module
    layout: ExpertChoiceLayout
    logits: torch.Tensor | None = None  # (B, S, E)
    rows: torch.Tensor | None = None  # (E, B C): row b * S + s of each expert's choices
    weights: torch.Tensor | None = None  # (E, B C)
    length: int = 0  # S
    chunks_seen: set[int] = field(default_factory=set)

    def choose(self, num_chunks: int) -> None:
        """The layer's choice over the logits every chunk left (the table is dropped)."""
        if self.logits is None or len(self.chunks_seen) != num_chunks:
            raise RuntimeError(f"{self.path}: its router scores came from chunks {sorted(self.chunks_seen)} of "
                               f"{num_chunks}; the block skipped the layer in a chunk?")
        self.length = self.logits.shape[1]
        self.rows, self.weights = self.layout.choose(self.module, self.logits)
        self.logits = None


# ------------------------------------------------------------------------------------------- K/V exchange
@dataclass
class HeadGroup:
    """Leaves of a chunked backward: one group of heads of the full-length keys and values (views of the buffers)."""

    heads: slice  # of the key/value heads
    key: torch.Tensor
    value: torch.Tensor


@dataclass
class GatheredKeyValues:
    """Full-length keys, values and key-side mask of one attention call, filled chunk by chunk."""

    key: torch.Tensor
    value: torch.Tensor
    mask: torch.Tensor | None
    head_groups: list[HeadGroup] | None = None  # the recorded passes of a chunked backward (see ``recorded``)

    def recorded(self, num_groups: int) -> list[torch.Tensor]:
        """Make the buffers leaves of the recorded passes, in up to ``num_groups`` groups of heads; return them.

        Each chunk's attention backward returns gradients for all keys and values, which autograd then adds into
        the leaves' ``.grad``: as one leaf that is a second full-length K/V at once (2 LD at the peak of the
        backward), as groups of heads, run one after another (:meth:`BlockRun.handle`), a group's share. Heads are
        independent in attention, so the results are the same.
        """
        heads = self.key.shape[2]
        bounds = [heads * i // min(num_groups, heads) for i in range(min(num_groups, heads) + 1)]
        self.head_groups = [
            HeadGroup(slice(a, b), self.key[:, :, a:b].detach().requires_grad_(),
                      self.value[:, :, a:b].detach().requires_grad_())
            for a, b in zip(bounds, bounds[1:])
        ]
        return [tensor for group in self.head_groups for tensor in (group.key, group.value)]


@dataclass
class PairMask:
    """The whole per-token mask a block squares into its query-dependent attention mask (``JointAttention.pair_mask``),
    and how its tokens are cut into chunks."""

    tokens: torch.Tensor  # (B, S): one entry per key, streams in the attention's key order
    split: SequenceSplit

    def rows(self, layout: ChunkLayout, chunk: int, path: str) -> torch.Tensor:
        """``(B, 1, chunk queries, S)``: the block's ``m[:, None, None, :] * m[:, None, :, None]`` for the chunk's
        query rows (the same products of the same numbers)."""
        rows = layout.cut(self.tokens, self.split, chunk, f"{path} pair mask")
        return self.tokens[:, None, None, :] * rows[:, None, :, None]


@dataclass
class AttentionState:
    """One whole-sequence attention module of the running block."""

    path: str
    spec: JointAttention
    stage: int
    expected_calls: int
    pair_mask: PairMask | None = None
    calls_seen: dict[int, int] = field(default_factory=dict)  # per chunk: kernel calls in the current module forward
    handled: dict[int, int] = field(default_factory=dict)  # per chunk: calls answered with the full K/V
    gathered: dict[int, GatheredKeyValues] = field(default_factory=dict)


@dataclass
class ReusedOutput:
    """A module output computed in one chunk and valid for the others while its input stays the same tensor."""

    path: str
    inputs: tuple[torch.Tensor, ...]  # kept referenced: their storage cannot be freed and reused while the block runs
    input_key: tuple
    output: Any  # a tensor, or (nested) tuples of tensors (one projection returning several modulation tables)
    output_version: tuple[int, ...]


def output_versions(output: Any) -> tuple[int, ...] | None:
    """The version counters of a module output that is a tensor or (nested) tuples of tensors (PRX's modulation
    returns two tuples of three tables; ``None`` for anything else, or an inference tensor, which has no version
    counter): what says that it was not modified in place since."""
    tensors = _tuple_leaves(output)
    if not tensors or not all(isinstance(t, torch.Tensor) and not t.is_inference() for t in tensors):
        return None
    return tuple(t._version for t in tensors)


def _tuple_leaves(output: Any) -> list[Any]:
    if isinstance(output, tuple):
        return [leaf for item in output for leaf in _tuple_leaves(item)]
    return [output]


class BlockRun:
    """State of one block forward in chunks; the attention hooks find it through the thread-local ``RUNNING``."""

    def __init__(self, layout: ChunkLayout, attention: dict[int, AttentionState],
                 inactive: dict[int, str] | None = None) -> None:
        self.layout = layout
        self.attention = attention
        # Whole-sequence attention modules the plan switches off in this forward (``JointAttention.active``), by id
        # -> path: they must make no kernel call (see ``refuse_inactive``).
        self.inactive = inactive or {}
        self.reused: dict[int, list[ReusedOutput]] = {}  # per reuse hook, newest first (see ``SequenceReuseHook``)
        self.chunk = 0
        self.collecting: int | None = None  # stage being collected, None in the final pass
        # Lock-step schedule: suspends the running chunk at a whole-sequence attention call until all chunks have
        # written that call's K/V (None in the two-pass schedule).
        self.suspend: Callable[[tuple[int, int]], None] | None = None
        # The recorded collection passes of a chunked backward (memopt.hooks._sequence_backward): the chunk's keys and
        # values with their rows of the full buffers' gradients, instead of writes into the buffers.
        self.key_value_grads: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        # Expert-choice MoE layers by id (``BlockPlan.routed``), and whether the routing pass runs.
        self.routing: dict[int, RoutingState] = {}
        self.routing_pass = False

    def start_chunk(self, chunk: int) -> None:
        self.chunk = chunk
        for state in self.attention.values():
            state.handled[chunk] = 0
            state.calls_seen[chunk] = 0  # a module not reached yet in this pass has not collected in it

    def skips(self, kind: str, attention_id: int | None) -> bool:
        """Whether a projection of ``kind`` is unused in the running pass (see ``JointAttention.query``; ``"other"``:
        the columns of a fused projection that are used after the attention, see ``JointAttention.fused``;
        ``"text_only"``: see ``BlockPlan.text_only``)."""
        if kind == "text_only":  # kept from chunk 0's final pass alone (BlockPlan.text_only)
            return self.collecting is not None or self.chunk != 0
        if self.suspend is not None:
            return False  # lock-step: one pass uses everything
        if kind == "before_attention":
            return self.collecting == 0
        stage = self.attention[attention_id].stage
        if kind == "query":
            return self.collecting == stage
        if kind == "other":  # used after the attention: a collection pass stops at or before it
            return self.collecting is not None and self.collecting <= stage
        return self.collecting is None or self.collecting > stage  # key_value: already collected

    def check_reused(self) -> None:
        """Lock-step: chunks suspended at a barrier hold the outputs they were given; one modified in place since
        (by a later chunk) would have changed under them."""
        for reused in (entry for entries in self.reused.values() for entry in entries):
            if output_versions(reused.output) != reused.output_version:
                raise modified_under_suspended_chunks(reused.path)

    def check_answered(self, block_path: str) -> None:
        """Every attention module of an earlier stage must have seen the full K/V in this chunk."""
        for state in self.attention.values():
            handled = state.handled.get(self.chunk, 0)
            if (self.collecting is None or state.stage < self.collecting) and handled != state.expected_calls:
                raise RuntimeError(
                    f"{block_path}: {state.path} made {handled} whole-sequence attention calls through "
                    f"diffusers' attention dispatch in chunk {self.chunk}, expected {state.expected_calls}. Its "
                    "processor (or another hook) bypassed the dispatch; refusing to return a chunk-local result."
                )

    def handle(self, state: AttentionState, call: AttentionCall, proceed: Proceed) -> torch.Tensor:
        chunk = self.chunk
        seen = state.calls_seen.get(chunk, 0)
        state.calls_seen[chunk] = seen + 1
        index = seen - state.spec.local_calls_first
        if not 0 <= index < state.expected_calls:
            return proceed(call)  # e.g. an image-prompt adapter's cross-attention: chunk-local
        check_call(state.path, call)
        if self.suspend is not None:
            self._gather(state, index, call)
            self.suspend((state.stage, index))  # returns once every chunk has written this call's K/V
        elif self.collecting == state.stage:
            self._gather(state, index, call)
            if index == state.expected_calls - 1 and self._stage_collected(state.stage, chunk):
                raise KeyValuesCollected
            # Never read: the collection pass stops at this stage's last call, and the other modules of the stage
            # (JointAttention.collect_with_previous) take their keys/values from before this output.
            return call.output_like()
        gathered = state.gathered.get(index)
        if gathered is None:
            raise RuntimeError(f"{state.path}: attention call {index} reached before its keys/values were collected")
        state.handled[chunk] = state.handled.get(chunk, 0) + 1
        if state.pair_mask is not None:
            mask = state.pair_mask.rows(self.layout, chunk, state.path)
            if mask.shape[-2] != call.query.shape[1] or mask.shape[-1] != gathered.key.shape[1]:
                raise RuntimeError(
                    f"{state.path}: the pair mask {state.spec.pair_mask!r} gives {mask.shape[-2]} query rows x "
                    f"{mask.shape[-1]} keys, the call has {call.query.shape[1]} queries and "
                    f"{gathered.key.shape[1]} keys"
                )
        else:
            mask = gathered.mask if gathered.mask is not None else call.attn_mask
        groups = gathered.head_groups
        if groups is None or len(groups) == 1:  # one group: the whole buffers, as leaves of the recorded passes
            key, value = (gathered.key, gathered.value) if groups is None else (groups[0].key, groups[0].value)
            output = proceed(call.replace(key=key, value=value, attn_mask=mask))
        else:
            output = torch.cat([proceed(_heads_of(call, group, mask)) for group in groups], dim=2)
        if state.spec.padding_mask:
            # The query side of the padding mask: invalid queries are fully masked rows in the unmodified call.
            valid_queries = padding_mask_validity(state.path, call).transpose(1, 2)  # (B, S_q, 1 | H)
            invalid = ~valid_queries[..., None]
            # In place unless autograd records: the attention kernel saves its output for its backward.
            output = output.masked_fill(invalid, 0) if output.requires_grad else output.masked_fill_(invalid, 0)
        return output

    def _stage_collected(self, stage: int, chunk: int) -> bool:
        return all(other.calls_seen.get(chunk, 0) >= other.spec.local_calls_first + other.expected_calls
                   for other in self.attention.values() if other.stage == stage)

    def _gather(self, state: AttentionState, index: int, call: AttentionCall) -> None:
        key, value, mask = call.key, call.value, call.attn_mask
        if state.spec.padding_mask:
            mask = padding_mask_validity(state.path, call)[:, :, None, :]  # the key side: (B, 1 | H, 1, S_kv)
        pieces, full_length = self._key_pieces(state, key.shape[1])
        gathered = state.gathered.get(index)
        if state.spec.pair_mask is not None:
            if (mask is None) != (state.pair_mask is None):
                raise RuntimeError(
                    f"{state.path}: the plan names {state.spec.pair_mask!r} as the block argument its attention mask "
                    f"is made from, but the kernel call has {'no' if mask is None else 'a'} mask while the argument is "
                    f"{'None' if state.pair_mask is None else 'given'}"
                )
            mask = None  # rebuilt from the whole argument in the final pass
        # A size-1 key dim is a broadcast over keys, unless the chunk has a single key of several: then it is that
        # key's entry of a key mask the plan split (text chunks of one token when num_chunks >= text tokens).
        has_key_mask = mask is not None and (mask.shape[-1] != 1 or key.shape[1] == 1 < full_length)
        if has_key_mask and mask.shape[-1] == full_length != key.shape[1]:
            # The mask already covers every chunk's keys (a block-causal mask whose query rows the plan cut per
            # chunk): nothing to gather, each chunk's final call passes its own rows on with the full K/V.
            if mask.shape[-2] not in (1, call.query.shape[1]):
                raise ValueError(
                    f"{state.path}: attention mask of shape {tuple(mask.shape)} covers all {full_length} keys but has "
                    f"{mask.shape[-2]} query rows for the chunk's {call.query.shape[1]} queries; the plan must split "
                    "its query dim"
                )
            has_key_mask = False
        elif has_key_mask and mask.shape[-1] != key.shape[1]:
            raise ValueError(
                f"{state.path}: attention mask of shape {tuple(mask.shape)} covers neither the chunk's "
                f"{key.shape[1]} keys nor all {full_length}; the plan splits it wrongly"
            )
        elif has_key_mask and mask.shape[-2] != 1:
            raise NotImplementedError(
                f"{state.path}: attention mask of shape {tuple(mask.shape)} depends on the query position; sequence "
                "chunking supports masks over the chunk's keys, or over all keys with the query dim split by the plan"
            )
        if gathered is None:
            gathered = GatheredKeyValues(
                key=key.new_empty(key.shape[0], full_length, *key.shape[2:]),
                value=value.new_empty(value.shape[0], full_length, *value.shape[2:]),
                mask=mask.new_empty(*mask.shape[:-1], full_length) if has_key_mask else None,
            )
            state.gathered[index] = gathered
        elif gathered.key.shape[1] != full_length or gathered.key.shape[0] != key.shape[0]:
            raise RuntimeError(
                f"{state.path}: attention call {index} has {full_length} keys in chunk {self.chunk}, "
                f"{gathered.key.shape[1]} in chunk 0"
            )
        if self.key_value_grads is not None:
            if gathered.mask is not None and call.attn_mask.requires_grad:
                raise NotImplementedError(f"{state.path}: its attention mask requires grad; the chunked backward "
                                          "gathers key masks without autograd")
            for local, length, target in pieces:
                for group in gathered.head_groups:
                    for own, leaf in ((key, group.key), (value, group.value)):
                        if leaf.grad is not None:
                            self.key_value_grads.append((own[:, :, group.heads].narrow(1, local, length),
                                                         leaf.grad.narrow(1, target, length)))
            return
        for local, length, target in pieces:
            gathered.key.narrow(1, target, length).copy_(key.narrow(1, local, length))
            gathered.value.narrow(1, target, length).copy_(value.narrow(1, local, length))
            if gathered.mask is not None:
                source = mask.expand(*mask.shape[:-1], key.shape[1]) if mask.shape[-1] == 1 else mask
                gathered.mask.narrow(-1, target, length).copy_(source.narrow(-1, local, length))

    def _key_pieces(self, state: AttentionState, key_length: int) -> tuple[list[tuple[int, int, int]], int]:
        """``([(position in the chunk's keys, length, position in the full keys)], full key length)``.

        The pieces this chunk writes: its slice of each split stream, and the whole of a stream carried by every
        chunk when this is the chunk that owns it. A stream carried whole takes whatever key positions the split
        streams leave (Mochi drops masked text tokens per sample, so that count is only known from the call).
        """
        layout, chunk = self.layout, self.chunk
        sizes = {
            s: layout.ranges[s][chunk][1] - layout.ranges[s][chunk][0] for s in state.spec.order if layout.split[s]
        }
        whole = [s for s in state.spec.order if not layout.split[s]]
        remaining = key_length - sum(sizes.values())
        if remaining < 0 or (not whole and remaining):
            raise ValueError(
                f"{state.path}: the attention call has {key_length} keys, but chunk {self.chunk} carries "
                f"{', '.join(f'{s} {n}' for s, n in sizes.items())} tokens (key order {state.spec.order})"
            )
        for stream in whole:
            sizes[stream] = remaining
        pieces, local, full = [], 0, 0
        for stream in state.spec.order:
            start = layout.ranges[stream][chunk][0] if layout.split[stream] else 0
            if layout.owns(stream, chunk):
                pieces.append((local, sizes[stream], full + start))
            local += sizes[stream]
            full += layout.lengths[stream] if layout.split[stream] else sizes[stream]
        return pieces, full


def _heads_of(call: AttentionCall, group: HeadGroup, mask: torch.Tensor | None) -> AttentionCall:
    """The call restricted to one group of key/value heads, with the query heads that attend to them (``enable_gqa``:
    several per key head) and the mask's heads where it has them."""
    per_key_head = call.query.shape[2] // call.key.shape[2]
    queries = slice(group.heads.start * per_key_head, group.heads.stop * per_key_head)
    if mask is not None and mask.dim() == 4 and mask.shape[1] != 1:
        mask = mask[:, queries]
    return call.replace(query=call.query[:, :, queries], key=group.key, value=group.value, attn_mask=mask)


def refuse_inactive(path: str, call: AttentionCall, proceed: Proceed) -> torch.Tensor:
    """Handler for a module whose plan says it makes no whole-sequence attention call in this forward."""
    raise RuntimeError(
        f"{path}: made an attention-kernel call in a block forward where its plan (JointAttention.active) says it "
        "does not attend over the whole sequence; refusing to return a chunk-local result"
    )


def padding_mask_validity(path: str, call: AttentionCall) -> torch.Tensor:
    """``valid`` of a ``valid[query] & valid[key]`` self-attention padding mask (see ``JointAttention.padding_mask``):
    its diagonal, ``(B, 1 | H, S)``."""
    mask, tokens = call.attn_mask, call.key.shape[1]
    if mask is None or mask.dtype != torch.bool or mask.shape[-2:] != (call.query.shape[1], tokens) or (
        call.query.shape[1] != tokens
    ):
        shape = None if mask is None else (tuple(mask.shape), mask.dtype)
        raise NotImplementedError(
            f"{path}: the plan declares a boolean self-attention padding mask (B, 1, S, S) over the call's "
            f"{tokens} tokens, got {shape} for {call.query.shape[1]} queries"
        )
    return mask.diagonal(dim1=-2, dim2=-1)


def modified_under_suspended_chunks(path: str) -> RuntimeError:
    return RuntimeError(
        f"{path}: its output, computed once and shared by all chunks, was modified in place by the block while "
        "other chunks were suspended holding it (lock-step schedule); use schedule='two_pass'"
    )


def check_call(path: str, call: AttentionCall) -> None:
    problems = []
    if call.is_causal:
        problems.append("is_causal=True")
    if call.dropout_p:
        problems.append(f"dropout_p={call.dropout_p}")
    if call.extras.get("return_lse"):
        problems.append("return_lse=True")
    if call.extras.get("_parallel_config") is not None:
        problems.append("diffusers context parallelism is enabled")
    if call.attn_mask is not None and not isinstance(call.attn_mask, torch.Tensor):
        problems.append(f"a {type(call.attn_mask).__name__} mask ({call.route}), which no chunk can cut")
    if problems:
        raise NotImplementedError(f"{path}: sequence chunking does not support attention with {', '.join(problems)}")
