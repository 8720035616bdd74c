"""The model-level passes of sequential context parallelism: the output head and per-token tables in chunks.

:class:`SequenceModelHook` runs the model forward once with the blocks in chunks, stopped where the output head
starts (:class:`SequenceTailHook`), then once per chunk with the blocks answering from the kept output and the
gather module (``proj_out``, :class:`SequenceGatherHook`) collecting the chunks. :class:`SequenceEmbedHook` and
:class:`SequenceReplayHook` keep those extra passes from recomputing the embedding and the conditioning;
:class:`SequenceProducerHook` hands per-token tables (rotary embeddings) to the blocks as
:class:`~memopt.hooks._sequence_chunks.DeferredTokens`. See :mod:`memopt.hooks.sequence`.
"""

from __future__ import annotations

import inspect
import logging
from collections import Counter
from typing import TYPE_CHECKING, Any, Callable

import torch
from diffusers.hooks import ModelHook
from diffusers.hooks._helpers import TransformerBlockMetadata
from diffusers.models._modeling_parallel import ContextParallelOutput
from torch._subclasses.fake_tensor import is_fake

from ..plans.sequence import BroadcastTable, SplitSpec, TokenCount
from ..plans.sequence._vocabulary import Producer
from ._deferred_tokens import DeferredSample
from .offload import offloading_group
from ._sequence_chunks import (
    RUNNING,
    Arguments,
    ChunkLayout,
    DeferredTokens,
    balanced,
    chunk_count,
    cut_arguments,
    positional_index,
    running,
    uncut_count,
    unplanned_arguments,
)

if TYPE_CHECKING:
    from .sequence import SequenceChunkingConfig

logger = logging.getLogger("memopt.hooks.sequence")


class TailReached(Exception):
    """Raised when the model forward reaches its output head after the blocks (first model pass)."""


class TailChunkDone(Exception):
    """Raised at the gather module once a chunk's output is collected (tail passes but the last)."""


# ------------------------------------------------------------------------------------------- model passes
class ModelRun:
    """State of one chunked model forward: the block pass, then one tail pass per chunk."""

    def __init__(self, num_chunks: int, align: int = 1) -> None:
        self.num_chunks = num_chunks
        self.align = align
        self.tail = False
        self.block_calls = 0
        self.last_block: tuple[int, Any, TransformerBlockMetadata] | None = None
        self.last_version: int | None = None  # version counter of the last block's image output when it returned
        self.tail_input: Any = None  # what the output head got in the block pass
        self.tail_fingerprint: torch.Tensor | None = None  # its checksum (if a new tensor), for the fallback
        self.check_tail_input = False  # the fallback pass: the head must get what it got in the block pass
        self.dropped = 0  # leading tokens of the last block's output that the model drops before the head
        self.ranges: list[tuple[int, int]] = []
        self.kept_tokens: int | None = None  # the tail's TokenCount: the head keeps only the last tokens
        self.layout: ChunkLayout | None = None
        self.chunk = 0
        self.gathered: torch.Tensor | None = None
        self.embedded: dict[int, tuple[torch.Size, torch.dtype, torch.device]] = {}
        self.recorded: dict[int, list[Any]] = {}
        self.replayed: dict[int, int] = {}
        self.tail_allowed = False
        self.held: Counter[int] = Counter()  # storages that held block calls read (memopt.hooks._held_blocks)

    def block_finished(self, output: Any, metadata: TransformerBlockMetadata, keep: bool = True) -> None:
        """``keep=False`` for a block that returns an update the model adds to the stream (ConsisID's face
        cross-attention): the tail passes cannot answer from it, and kept it would stay alive through the model's add
        (1 LD). A head right after such a block then runs whole (see :class:`SequenceTailHook`)."""
        if keep:
            self.last_block = (self.block_calls, output, metadata)
            self.last_version = _version(_image_output(output, metadata))
        self.block_calls += 1

    def start_tail(self) -> None:
        _, output, metadata = self.last_block
        image = _image_output(output, metadata)
        if _version(image) != self.last_version:
            # e.g. a ControlNet residual added in place to the last block's output (Chroma): the tail passes would
            # add it again to the kept output.
            raise RuntimeError("the model modified the last block's output in place before its output head; run "
                               "it with apply_sequence_chunking(..., chunk_tail=False)")
        # The head may take a view of the last block's output without its leading tokens (Chroma keeps the image part
        # of cat(text, image)) or its trailing ones (image tokens before reference-image tokens): the tail chunks
        # cover the kept tokens, as many as the tail inputs (per-token modulation) have.
        span = kept_span(image, self.tail_input) if self.kept_tokens is None else None
        self.dropped, total = span or (0, image.shape[1])
        self.tail_fingerprint = new_tensor_fingerprint(self.tail_input, image)
        self.tail_input = None
        first = self.dropped if self.kept_tokens is None else total - self.kept_tokens
        kept = total - first
        pieces = balanced(kept, chunk_count(self.num_chunks, kept), self.align)
        self.set_ranges([(first + a, first + b) for a, b in pieces], total)
        self.tail = True

    def set_ranges(self, ranges: list[tuple[int, int]], total: int) -> None:
        """The tail chunks' token ranges in the last block's output (only the kept tokens: from ``ranges[0][0]``)."""
        self.ranges = ranges
        self.layout = ChunkLayout(len(ranges), {"image": total}, {"image": ranges}, {"image": True})

    @property
    def gather_offset(self) -> int:
        """Where the gathered output starts in the last block's tokens (the tokens the head drops before it)."""
        return self.ranges[0][0]

    def start_tail_chunk(self, chunk: int) -> None:
        self.chunk = chunk
        self.block_calls = 0
        self.replayed.clear()

    def tail_block_output(self, arguments: Arguments, metadata: TransformerBlockMetadata) -> Any:
        """A block in a tail pass: the last block answers with its saved output's chunk, the others pass through."""
        index = self.block_calls
        self.block_calls += 1
        last_index, output, _ = self.last_block
        hs, ehs = metadata.return_hidden_states_index, metadata.return_encoder_hidden_states_index
        start, end = self.ranges[self.chunk]
        if index == last_index:
            # With tokens dropped before the head (``output[:, P:]``), the chunk's tokens are preceded by P others
            # that the model drops again: a view, whatever they are.
            start, length = start - self.dropped, self.dropped + end - start
            if isinstance(output, torch.Tensor):
                return output.narrow(1, start, length)
            output = list(output)
            output[hs] = output[hs].narrow(1, start, length)
            return tuple(output)
        image = arguments.get(metadata.hidden_states_argument_name)
        if ehs is None:
            return image
        result = [None] * (max(hs, ehs) + 1)
        result[hs], result[ehs] = image, arguments.get(metadata.encoder_hidden_states_argument_name)
        return tuple(result)


# ------------------------------------------------------------------------------------------- hooks
class SequenceModelHook(ModelHook):
    """On the model: one forward with the blocks in chunks, stopped at the output head; then one per chunk for it.

    The tail passes call every block again (each answers at once), so they are skipped when the blocks carry
    diffusers' group offloading, which would move every block's weights again per chunk: the output head then runs
    on the whole sequence. It also runs whole (one more pass, with a warning) when the first chunk's head fails
    because the model code mixes it with full-length tensors, e.g. per-token modulation the model builds inline
    (SkyReels-V2's diffusion-forcing call; per-token tables a producer defers, as Wan2.2 TI2V's, are cut to the chunk).
    """

    def __init__(self, config: SequenceChunkingConfig, blocks: list[torch.nn.Module], tail: bool) -> None:
        super().__init__()
        self.config = config
        self.blocks = blocks
        self.tail = tail
        self._warned = False

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        original = self.fn_ref.original_forward
        if running("model_run") is not None or (
            torch.is_grad_enabled() and any(p.requires_grad for p in module.parameters())
        ):
            return original(*args, **kwargs)
        run = ModelRun(self.config.num_chunks, self.config.align)
        run.tail_allowed = self.tail and not any(offloaded(block) for block in self.blocks)
        RUNNING.model_run = run
        try:
            try:
                return original(*args, **kwargs)  # returns here when the output head was not reached
            except TailReached:
                pass
            run.start_tail()
            try:
                return self._tail_passes(module, run, args, kwargs)
            except RuntimeError as error:
                if run.chunk != 0 or len(run.ranges) == 1:
                    raise
                message = str(error)
            # The head mixes the chunk with full-length tensors (per-token modulation the model builds inline:
            # SkyReels-V2's diffusion forcing): run it once on the whole sequence instead.
            if not self._warned:
                logger.warning("%s: the output head runs on the whole sequence (%s)", type(module).__name__, message)
                self._warned = True
            run.set_ranges([(run.ranges[0][0], run.ranges[-1][1])], run.layout.lengths["image"])
            run.gathered = None
            run.check_tail_input = True
            return self._tail_passes(module, run, args, kwargs)
        finally:
            RUNNING.model_run = None

    def _tail_passes(self, module: torch.nn.Module, run: ModelRun, args: tuple, kwargs: dict) -> Any:
        original = self.fn_ref.original_forward
        for chunk in range(len(run.ranges)):
            run.start_tail_chunk(chunk)
            try:
                result = original(*args, **kwargs)
            except TailChunkDone:
                continue
            if chunk == len(run.ranges) - 1:
                return result
            raise RuntimeError(f"{type(module).__name__}: the forward finished without reaching the gather module")
        raise RuntimeError(f"{type(module).__name__}: the gather module did not return the gathered output")


class SequenceTailHook(ModelHook):
    """On the first module of the output head: ends the block pass there (the last block's output is kept); in the
    tail passes it cuts the plan's ``tail_inputs`` to the running chunk."""

    def __init__(self, path: str, inputs: dict[str, SplitSpec]) -> None:
        super().__init__()
        self.path = path
        self.inputs = inputs
        self.index: dict[str, int] = {}
        self.unplanned: list[str] = []  # named forward arguments tail_inputs does not list (initialize_hook)
        self._warned: set[str] = set()  # why the head ran whole, once each

    def initialize_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        self.index = positional_index(type(module))
        missing = [name for name in self.inputs if name not in self.index]
        if missing:
            raise ValueError(f"{self.path}: {type(module).__name__}.forward has no argument(s) {missing} (plan)")
        self.unplanned = unplanned_arguments(type(module), self.inputs)
        return module

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        run: ModelRun | None = running("model_run")
        block_pass = run is not None and run.tail_allowed and not run.tail
        if block_pass and run.last_block is None and run.block_calls and "update" not in self._warned:
            logger.warning("%s: the output head runs on the whole sequence (the block before it returns an update the "
                           "model adds to its input, which the tail passes cannot answer from)", self.path)
            self._warned.add("update")
        arguments = Arguments(self.index, args, kwargs)
        uncut = uncut_count(arguments, self.unplanned) if block_pass else None
        if uncut is not None and "uncut" not in self._warned:
            logger.warning("%s: the output head gets the int %s, which the plan's tail_inputs do not cut (a count of "
                           "tokens would be wrong in every chunk): it runs on the whole sequence", self.path, uncut)
            self._warned.add("uncut")
        if block_pass and run.last_block is not None and uncut is None:
            run.tail_input = _first_argument(args, kwargs)
            counts = [arguments.get(name) for name, spec in self.inputs.items()
                      if isinstance(spec, TokenCount) and not spec.leading]
            run.kept_tokens = next((count for count in counts if count is not None), None)
            raise TailReached
        if run is not None and run.tail and run.check_tail_input:
            kept = _image_output(*run.last_block[1:])
            if not _same_fingerprint(new_tensor_fingerprint(_first_argument(args, kwargs), kept), run.tail_fingerprint):
                raise RuntimeError(
                    f"{self.path}: the output head's input differs from the block pass's, so the model mixes values "
                    "from before its last block into it (e.g. a residual or hint added after the last block), which "
                    "the tail passes do not recompute; run it with apply_sequence_chunking(..., chunk_tail=False)"
                )
        if run is not None and run.tail and self.inputs:
            args, kwargs = cut_arguments(arguments, self.inputs, run.layout, run.chunk,
                                         self.path)
        return self.fn_ref.original_forward(*args, **kwargs)


class SequenceGatherHook(ModelHook):
    """On the gather module (``proj_out``): collects each tail pass's chunk; the last pass returns the whole."""

    def __init__(self, path: str, spec: ContextParallelOutput) -> None:
        super().__init__()
        self.path = path
        self.spec = spec

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        output = self.fn_ref.original_forward(*args, **kwargs)
        run: ModelRun | None = running("model_run")
        if run is None or not run.tail:
            return output
        start, end = (index - run.gather_offset for index in run.ranges[run.chunk])
        dim = self.spec.gather_dim
        if not isinstance(output, torch.Tensor) or output.dim() <= dim or output.shape[dim] != end - start:
            shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
            raise RuntimeError(
                f"{self.path}: expected chunk {run.chunk} with {end - start} tokens on dim {dim}, got {shape}; the "
                "model code after the blocks mixes in full-length tensors"
            )
        if run.gathered is None:
            shape = list(output.shape)
            shape[dim] = run.ranges[-1][1] - run.gather_offset
            run.gathered = output.new_empty(shape)
        run.gathered.narrow(dim, start, end - start).copy_(output)
        if run.chunk < len(run.ranges) - 1:
            raise TailChunkDone
        return run.gathered


class SequenceHeadHook(ModelHook):
    """On an output head fed a grid-shaped view of the last block's output (``SequencePlan.tail_split``): runs it on
    pieces of its first argument along ``split_dim`` and writes each piece's output at its place along the gather
    dim, so only one piece's temporaries (the fp32 upcasts of the output norm) are alive."""

    def __init__(self, path: str, split_dim: int, spec: ContextParallelOutput, num_chunks: int) -> None:
        super().__init__()
        self.path = path
        self.split_dim = split_dim
        self.spec = spec
        self.num_chunks = num_chunks

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        original = self.fn_ref.original_forward
        x = args[0] if args else None
        if (not isinstance(x, torch.Tensor) or x.dim() <= self.split_dim or x.shape[self.split_dim] < 2 or (
            torch.is_grad_enabled() and any(p.requires_grad for p in module.parameters())
        )):
            return original(*args, **kwargs)
        total, dim = x.shape[self.split_dim], self.spec.gather_dim
        output, scale = None, 0
        for start, end in balanced(total, min(self.num_chunks, total)):
            piece = original(x.narrow(self.split_dim, start, end - start), *args[1:], **kwargs)
            if output is None and isinstance(piece, torch.Tensor) and piece.dim() > dim:
                scale = piece.shape[dim] // (end - start)
                shape = list(piece.shape)
                shape[dim] = total * scale
                output = piece.new_empty(shape)
            if output is None or piece.shape[dim] != scale * (end - start) or (
                piece.shape[:dim] + piece.shape[dim + 1:] != output.shape[:dim] + output.shape[dim + 1:]
            ):
                shape = tuple(piece.shape) if isinstance(piece, torch.Tensor) else type(piece).__name__
                raise RuntimeError(
                    f"{self.path}: rows {start}:{end} of dim {self.split_dim} of its input gave {shape}, not a piece "
                    f"of its output along dim {dim}; the plan's tail_split is wrong"
                )
            output.narrow(dim, start * scale, (end - start) * scale).copy_(piece)
            del piece
        return output


class SequenceProducerHook(ModelHook):
    """On a model-level producer of per-token tables (or of per-sample tables the model expands over the tokens):
    defers them to the chunks during a chunked forward. The tail passes get the block pass's output again (the
    stand-ins compute rows on demand; nothing is recomputed)."""

    def __init__(self, path: str, producer: Producer | tuple[Producer, ...]) -> None:
        super().__init__()
        self.path = path
        self.producer = producer
        self.signature: inspect.Signature | None = None

    def initialize_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        self.signature = inspect.signature(type(module).forward)
        return module

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        run: ModelRun | None = running("model_run")
        if run is None:
            return self.fn_ref.original_forward(*args, **kwargs)
        return replayed(run, id(self), lambda: self._deferred(module, args, kwargs))

    def _deferred(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> Any:
        forward = self.fn_ref.original_forward
        entries = self.producer if isinstance(self.producer, tuple) else (self.producer,)
        if isinstance(entries[0], BroadcastTable):
            # Per-sample tables: computed as they are; the model's expansion over the tokens is deferred.
            output = forward(*args, **kwargs)
            if not isinstance(self.producer, tuple):
                return DeferredSample(self.path, output, self.producer.token_dim)
            output = list(output)
            for entry in entries:
                output[entry.output] = DeferredSample(f"{self.path}[{entry.output}]", output[entry.output],
                                                      entry.token_dim)
            return tuple(output)
        bound = self.signature.bind(module, *args, **kwargs)
        bound.apply_defaults()
        call = dict(list(bound.arguments.items())[1:])
        if not isinstance(self.producer, tuple):
            return DeferredTokens(self.path, self.producer, module, forward, call)
        sliver = self.producer[0].sliver
        if sliver is not None:
            tokens = self.producer[0].tokens(module, call)
            if tokens is None:  # no per-token tables in this call
                return forward(*args, **kwargs)
            # The other entries, from a call with one token per sample: the full tables are never computed.
            output = list(forward(**sliver(call)))
            for producer in self.producer:
                output[producer.output] = DeferredTokens(f"{self.path}[{producer.output}]", producer, module, forward,
                                                         call, tokens=tokens)
            return tuple(output)
        # Tables inside a tuple output: the module runs, then its tables are dropped for stand-ins (the full ones
        # live only until this returns).
        output = list(forward(*args, **kwargs))
        for producer in self.producer:
            table = output[producer.output]
            output[producer.output] = DeferredTokens(f"{self.path}[{producer.output}]", producer, module, forward, call,
                                                     tokens=table.shape[1])
            del table
        return tuple(output)


class SequenceEmbedHook(ModelHook):
    """On the model's image-token embedding: in tail passes (whose blocks answer from the kept output) it returns a
    zero-stride stand-in of the same shape instead of computing a full hidden state that nothing reads."""

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        run: ModelRun | None = running("model_run")
        if run is not None and run.tail and id(self) in run.embedded:
            shape, dtype, device = run.embedded[id(self)]
            return torch.zeros((), dtype=dtype, device=device).expand(shape)
        output = self.fn_ref.original_forward(*args, **kwargs)
        if run is not None and isinstance(output, torch.Tensor):
            run.embedded[id(self)] = (output.shape, output.dtype, output.device)
        return output


class SequenceReplayHook(ModelHook):
    """On a model-level module that runs before the blocks (conditioning embedders): the tail passes reuse its
    outputs from the block pass instead of recomputing them (they are alive through the block pass anyway)."""

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        run: ModelRun | None = running("model_run")
        if run is None:
            return self.fn_ref.original_forward(*args, **kwargs)
        return replayed(run, id(self), lambda: self.fn_ref.original_forward(*args, **kwargs))


def replayed(run: ModelRun, key: int, compute: Callable[[], Any]) -> Any:
    """``compute()`` in the block pass (before the first block), recorded; in the tail passes the recorded outputs in
    call order, as long as there are any."""
    if run.block_calls:
        return compute()
    if run.tail:
        index = run.replayed.get(key, 0)
        recorded = run.recorded.get(key, [])
        if index < len(recorded):
            run.replayed[key] = index + 1
            return recorded[index]
        return compute()
    output = compute()
    run.recorded.setdefault(key, []).append(output)
    return output


def _image_output(output: Any, metadata: TransformerBlockMetadata) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output[metadata.return_hidden_states_index]


def _version(tensor: torch.Tensor) -> int | None:
    return None if tensor.is_inference() else tensor._version


def kept_span(output: torch.Tensor, tail_input: Any) -> tuple[int, int] | None:
    """``(P, N)`` when the output head's input is the view ``output[:, P:N]`` of the last block's output dropping its
    leading tokens (``N`` its length) or its trailing ones (``P = 0``), else ``None`` (the head takes it whole, or
    something the tail passes cannot serve)."""
    if not isinstance(tail_input, torch.Tensor) or tail_input.dim() != output.dim() or output.dim() < 2:
        return None
    if tail_input.untyped_storage()._cdata != output.untyped_storage()._cdata or tail_input.stride() != output.stride():
        return None
    shift, stride, total = tail_input.storage_offset() - output.storage_offset(), output.stride(1), output.shape[1]
    if stride <= 0 or shift < 0 or shift % stride:
        return None
    start, kept = shift // stride, tail_input.shape[1]
    if tail_input.shape != (output.shape[0], kept, *output.shape[2:]) or not 0 < kept < total:
        return None
    return (start, total) if start + kept == total else (0, kept) if start == 0 else None


def _first_argument(args: tuple, kwargs: dict) -> Any:
    return args[0] if args else next(iter(kwargs.values()), None)


def new_tensor_fingerprint(tensor: Any, block_output: torch.Tensor) -> torch.Tensor | None:
    """Float64 sum of the output head's input (token slices at a time, so that no full-size fp64 copy is made) when
    the model made it as a new tensor after the last block; ``None`` for a view of the last block's output (which
    the tail passes reproduce by construction: no reduction on every forward), non-tensors and fake tensors
    (simulations carry no values)."""
    if not isinstance(tensor, torch.Tensor) or is_fake(tensor) or tensor.dim() < 2 or not tensor.is_floating_point():
        return None
    if tensor.untyped_storage()._cdata == block_output.untyped_storage()._cdata:
        return None
    pieces = tensor.split(max(1, -(-tensor.shape[1] // 64)), dim=1)
    return torch.stack([piece.sum(dtype=torch.float64) for piece in pieces]).sum()


def _same_fingerprint(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return bool(torch.equal(a, b) or (torch.isnan(a) and torch.isnan(b)))


def offloaded(module: torch.nn.Module) -> bool:
    return offloading_group(module) is not None
