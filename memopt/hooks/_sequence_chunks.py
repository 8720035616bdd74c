"""How a transformer block's arguments are cut into sequence chunks and its outputs put back together.

Shared by the block hook and the model-level hooks of :mod:`memopt.hooks.sequence`: reading arguments by name,
the chunk ranges of each token stream (:class:`ChunkLayout`; deferred per-token tables, see
:mod:`memopt.hooks._deferred_tokens`, give a chunk its rows), the full-length outputs written chunk by chunk
(:class:`ChunkOutputs`), the memory-overlap test that decides whether an output may be written over its input, and the
thread-local state of the running chunked forward."""

from __future__ import annotations

import inspect
import itertools
import threading
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from diffusers.hooks._helpers import TransformerBlockMetadata
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..plans.sequence import ChunkValue, SequenceSplit, SplitSpec, TokenCount
from ._deferred_tokens import DeferredTokens


# ------------------------------------------------------------------------------------------- arguments
class Arguments:
    """Read and replace a module's forward arguments by name, whether passed by position or keyword."""

    def __init__(self, index: dict[str, int], args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.index, self.args, self.kwargs = index, args, kwargs

    def get(self, name: str) -> Any:
        if name in self.kwargs:
            return self.kwargs[name]
        position = self.index.get(name)
        return self.args[position] if position is not None and position < len(self.args) else None

    def replaced(self, values: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        args, kwargs = list(self.args), dict(self.kwargs)
        for name, value in values.items():
            position = self.index.get(name)
            if name in kwargs or position is None or position >= len(args):
                kwargs[name] = value  # a ChunkValue for an argument the caller left at its default
            else:
                args[position] = value
        return tuple(args), kwargs

    def tensors(self) -> list[torch.Tensor]:
        return [x for x in tree_flatten((self.args, self.kwargs))[0] if isinstance(x, torch.Tensor)]


def positional_index(cls: type) -> dict[str, int]:
    index = {}
    for position, parameter in enumerate(list(inspect.signature(cls.forward).parameters.values())[1:]):
        if parameter.kind not in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD):
            break
        index[parameter.name] = position
    return index


def unplanned_arguments(cls: type, inputs: Mapping[str, SplitSpec]) -> list[str]:
    """The named forward arguments of ``cls`` (not ``*args`` / ``**kwargs``) that ``inputs`` does not list."""
    parameters = list(inspect.signature(cls.forward).parameters.values())[1:]
    return [p.name for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name not in inputs]


def uncut_count(arguments: Arguments, names: list[str]) -> str | None:
    """``name=value`` of an int among the arguments ``names``, if any: passed whole, every chunk would get it, which
    is wrong where it counts tokens (HunyuanVideo-I2V's first-frame token count, before its plan cut it) and gives no
    error. Plans give such arguments a :class:`TokenCount` or :class:`ChunkValue`."""
    for name in names:
        value = arguments.get(name)
        if isinstance(value, int) and not isinstance(value, bool):
            return f"{name}={value}"
    return None


MIN_CHUNK_TOKENS = 2
"""Fewest image tokens a chunk gets: a chunk of one is a sequence of length 1, which some models squeeze away
(Allegro's blocks and output head call ``squeeze(1)`` on their ``(B, S, D)`` tokens). Sequences shorter than twice the
chunk count get fewer chunks."""


def chunk_count(num_chunks: int, tokens: int) -> int:
    """How many chunks ``tokens`` image tokens are cut into: ``num_chunks``, fewer where chunks would hold fewer than
    :data:`MIN_CHUNK_TOKENS`, at least one."""
    return max(1, min(num_chunks, tokens // MIN_CHUNK_TOKENS))


def balanced(total: int, pieces: int, align: int = 1, before: list[int] | None = None) -> list[tuple[int, int]]:
    """``pieces`` contiguous ranges covering ``range(total)``, sizes differing by at most one (like tensor_split).

    With ``align`` > 1 and ranges of at least ``8 * align``, every inner boundary moves by at most ``align / 2`` so
    that it falls on a multiple of ``align``, which changes no range by more than an eighth. GPU matmul and attention
    kernels compute whole tiles of 64-128 rows: 32 chunks of Wan's 75,600 tokens at 720p hold 2,362 or 2,363 tokens,
    whose last partial tile makes every chunk cost as much as 2,432 tokens (3% more matmul and attention work than the
    unchunked forward); at multiples of 128 only the very last tile is partial, as without chunks. ``before[i]``:
    rows that chunks before ``i`` add to these in the same kernels (their text tokens in joint attention); the sums
    are aligned then, so every chunk's kernels see whole tiles.
    """
    bounds = [index * (total // pieces) + min(index, total % pieces) for index in range(pieces + 1)]
    if before is not None and len(before) != pieces + 1:
        raise ValueError(f"before must give the rows ahead of each of the {pieces + 1} boundaries, got {len(before)}")
    if align > 1 and total // pieces >= 8 * align:
        extra = before or [0] * (pieces + 1)
        bounds[1:-1] = [round((bound + rows) / align) * align - rows for bound, rows in zip(bounds[1:-1], extra[1:-1])]
    return list(zip(bounds[:-1], bounds[1:]))


def grouped(total: int, pieces: int, groups: int) -> list[tuple[int, int]]:
    """About ``pieces`` contiguous ranges covering ``range(total)`` made of ``groups`` equal groups, each range whole
    groups (``pieces <= groups``) or inside one group (``BlockPlan.token_groups``)."""
    if groups < 1 or total % groups:
        raise ValueError(f"{total} image tokens cannot be cut into {groups} equal token groups")
    size = total // groups
    if pieces <= groups:
        return [(start * size, end * size) for start, end in balanced(groups, pieces)]
    return [(group * size + start, group * size + end)
            for group, (first, last) in enumerate(balanced(pieces, groups))
            for start, end in balanced(size, chunk_count(last - first, size))]


def materialized(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Replace deferred producer outputs by their full value (for a block that runs unchunked), also inside lists
    and tuples (ERNIE-Image passes its six modulation tables as one list)."""
    flat, spec = tree_flatten((args, kwargs))
    if not any(isinstance(v, DeferredTokens) for v in flat):
        return args, kwargs
    return tree_unflatten([v.full() if isinstance(v, DeferredTokens) else v for v in flat], spec)


@dataclass
class ChunkLayout:
    """Where chunk ``i``'s tokens come from, per stream.

    ``ranges[stream][i]`` is the chunk's slice of the stream; for a text stream carried whole by every chunk it is
    the whole stream, and only chunk 0 writes its keys/values and output (``split[stream]`` is False).
    """

    num_chunks: int
    lengths: dict[str, int]
    ranges: dict[str, list[tuple[int, int]]]
    split: dict[str, bool]

    @classmethod
    def build(cls, num_chunks: int, image_tokens: int, text_tokens: int | None, split_text: bool,
              groups: int | None = None, align: int = 1, joint: bool = False) -> "ChunkLayout":
        """``joint``: each chunk's text rows join its image rows in the same kernels (joint attention), so the
        image boundaries are aligned with the text rows of the chunks before them counted in."""
        num_chunks = chunk_count(num_chunks, image_tokens)
        image_ranges = grouped(image_tokens, num_chunks, groups) if groups is not None else None
        num_chunks = len(image_ranges) if image_ranges is not None else num_chunks
        text_ranges: list[tuple[int, int]] = []
        text_split = text_tokens is not None and split_text and text_tokens >= num_chunks
        if text_tokens is not None:
            text_ranges = balanced(text_tokens, num_chunks, align) if text_split else [(0, text_tokens)] * num_chunks
        if image_ranges is None:
            rows = (end - start for start, end in text_ranges)
            before = [0, *itertools.accumulate(rows)] if joint and text_ranges else None
            image_ranges = balanced(image_tokens, num_chunks, align, before)
        layout = cls(num_chunks, {"image": image_tokens}, {"image": image_ranges}, {"image": True})
        if text_tokens is not None:
            layout.lengths["text"] = text_tokens
            layout.split["text"] = text_split
            layout.ranges["text"] = text_ranges
        return layout

    def owns(self, stream: str, chunk: int) -> bool:
        return self.split[stream] or chunk == 0

    def cut(self, value: Any, spec: SequenceSplit | TokenCount, chunk: int, where: str) -> Any:
        """Chunk ``chunk``'s piece of a block input tensor per ``spec`` (views unless several segments), or its share
        of a :class:`TokenCount`."""
        if isinstance(spec, TokenCount):
            return self.count(value, chunk, where, spec.leading)
        deferred = isinstance(value, DeferredTokens)
        if not deferred and not isinstance(value, torch.Tensor):
            return value
        if not deferred and spec.expected_dims is not None and value.dim() != spec.expected_dims:
            return value
        lengths = []
        for segment in spec.segments:
            if segment not in self.lengths:
                raise ValueError(f"{where}: the plan splits over the {segment!r} stream, which the block lacks")
            lengths.append(self.lengths[segment])
        total = sum(lengths)
        size = value.tokens if deferred else value.shape[spec.split_dim]
        if size == 1 and total != 1 and not deferred:
            return value  # broadcast over tokens
        if size != total:
            raise ValueError(
                f"{where}: has {size} entries along its token dim {spec.split_dim}, but the plan expects "
                f"{' + '.join(f'{s} {n}' for s, n in zip(spec.segments, lengths))} = {total} tokens"
            )
        ranges, offset = [], 0
        for segment, length in zip(spec.segments, lengths):
            start, end = self.ranges[segment][chunk]
            ranges.append((offset + start, offset + end))
            offset += length
        if deferred:
            return value.rows(ranges)
        narrow = running("narrow_rows") or torch.narrow  # a chunked backward's: see _sequence_backward.InputGradients
        pieces = [narrow(value, spec.split_dim, start, end - start) for start, end in ranges]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, spec.split_dim)


    def count(self, value: Any, chunk: int, where: str, leading: bool = False) -> int:
        """How many of chunk ``chunk``'s image tokens are among the last (``leading``: the first) ``value`` ones."""
        total = self.lengths["image"]
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= total:
            which = "first" if leading else "last"
            raise ValueError(f"{where}: expected a count of the {which} tokens of the {total} image tokens, "
                             f"got {value!r}")
        start, end = self.ranges["image"][chunk]
        if leading:
            return max(0, min(end, value) - start)
        return max(0, end - max(start, total - value))


def cut_arguments(arguments: Arguments, inputs: dict[str, SplitSpec], layout: ChunkLayout, chunk: int,
                  path: str) -> tuple[tuple, dict]:
    """A module's forward arguments with those named in ``inputs`` cut to chunk ``chunk`` (block or tail inputs)."""
    values = {}
    for name, spec in inputs.items():
        if isinstance(spec, ChunkValue):  # built for the chunk, whether or not the block got the argument
            values[name] = spec.build(arguments.get, layout.ranges["image"][chunk], layout.lengths["image"])
            continue
        value = arguments.get(name)
        if value is None:
            continue
        where = f"{path} input {name!r}"
        if isinstance(value, DeferredTokens):
            # A producer's stand-in: all of its tables cover the same tokens, so one spec locates them.
            value = layout.cut(value, next(s for s in spec if s is not None) if isinstance(spec, tuple) else spec,
                               chunk, where)
        elif isinstance(spec, tuple):
            if not isinstance(value, (tuple, list)) or len(value) != len(spec):
                raise ValueError(f"{where}: expected a tuple of {len(spec)} tensors, got {type(value).__name__}")
            value = type(value)(
                layout.cut(item, item_spec, chunk, where) if item_spec is not None else item
                for item, item_spec in zip(value, spec)
            )
        else:
            value = layout.cut(value, spec, chunk, where)
        values[name] = value
    return arguments.replaced(values)


# ------------------------------------------------------------------------------------------- block outputs
class ChunkOutputs:
    """Writes each chunk's block output into the full-length outputs, over the input when ``in_place``."""

    def __init__(self, path: str, metadata: TransformerBlockMetadata, layout: ChunkLayout, image_in: torch.Tensor,
                 in_place: bool, dim: int = 1) -> None:
        self.path, self.metadata, self.layout = path, metadata, layout
        self.image_in, self.in_place = image_in, in_place
        self.dim = dim  # the token dim of the streams: 1, or 0 for sequence-first (S, B, D) blocks
        self.image_out: torch.Tensor | None = None
        self.text_out: torch.Tensor | None = None
        self.returns_tensor, self.num_outputs = True, 1

    def add(self, chunk: int, output: Any) -> None:
        layout, image_in, dim = self.layout, self.image_in, self.dim
        hs_index, ehs_index = self.metadata.return_hidden_states_index, self.metadata.return_encoder_hidden_states_index
        self.returns_tensor = isinstance(output, torch.Tensor)
        outputs = (output,) if self.returns_tensor else tuple(output)
        self.num_outputs = len(outputs)
        start, end = layout.ranges["image"][chunk]
        piece = self._piece(outputs, hs_index, "hidden states", end - start)
        if self.image_out is None:
            same = piece.dtype == image_in.dtype and piece.shape == image_in.shape[:dim] + (
                end - start,) + image_in.shape[dim + 1:]
            self.image_out = image_in if self.in_place and same else piece.new_empty(
                self._full(piece, layout.lengths["image"])
            )
        self.image_out.narrow(dim, start, end - start).copy_(piece)
        if "text" in layout.lengths and ehs_index is not None and outputs[ehs_index] is not None:
            text_start, text_end = layout.ranges["text"][chunk]
            text_piece = self._piece(outputs, ehs_index, "encoder hidden states", text_end - text_start)
            if not layout.split["text"]:
                self.text_out = text_piece if chunk == 0 else self.text_out
                return
            if self.text_out is None:
                self.text_out = text_piece.new_empty(self._full(text_piece, layout.lengths["text"]))
            self.text_out.narrow(dim, text_start, text_end - text_start).copy_(text_piece)

    def result(self) -> Any:
        if self.returns_tensor:
            return self.image_out
        result: list[Any] = [None] * self.num_outputs
        result[self.metadata.return_hidden_states_index] = self.image_out
        if self.metadata.return_encoder_hidden_states_index is not None:
            result[self.metadata.return_encoder_hidden_states_index] = self.text_out
        return tuple(result)

    def _full(self, piece: torch.Tensor, tokens: int) -> list[int]:
        shape = list(piece.shape)
        shape[self.dim] = tokens
        return shape

    def _piece(self, outputs: tuple, index: int | None, what: str, tokens: int) -> torch.Tensor:
        piece = outputs[index] if index is not None and index < len(outputs) else None
        if not isinstance(piece, torch.Tensor) or piece.dim() < 2 or piece.shape[self.dim] != tokens:
            shape = tuple(piece.shape) if isinstance(piece, torch.Tensor) else type(piece).__name__
            raise RuntimeError(f"{self.path}: expected the {what} output (index {index}), {tokens} tokens; got {shape}")
        return piece


# ------------------------------------------------------------------------------------------- memory overlap
def memory_runs(tensor: torch.Tensor, limit: int = 4096) -> list[tuple[int, int]] | None:
    """The byte ranges a strided tensor occupies in its storage, sorted; ``None`` when more than ``limit`` ranges.

    The innermost dims that are contiguous together form one run; the outer dims enumerate the runs (a batch of
    views into a joint text + image tensor is a handful of runs).
    """
    dims = sorted(((stride, size) for stride, size in zip(tensor.stride(), tensor.shape) if size != 1), reverse=True)
    run = 1
    while dims and dims[-1][0] == run:
        run *= dims.pop()[1]
    starts = [tensor.storage_offset()]
    for stride, size in dims:
        if len(starts) * size > limit:
            return None
        starts = [start + index * stride for start in starts for index in range(size)]
    element = tensor.element_size()
    return sorted((start * element, (start + run) * element) for start in starts)


def intersect(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> bool:
    i = j = 0
    while i < len(a) and j < len(b):
        if a[i][0] < b[j][1] and b[j][0] < a[i][1]:
            return True
        if a[i][1] <= b[j][1]:
            i += 1
        else:
            j += 1
    return False


# ------------------------------------------------------------------------------------------- running state
RUNNING = threading.local()


def running(name: str) -> Any:
    return getattr(RUNNING, name, None)
