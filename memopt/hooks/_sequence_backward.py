"""Training through sequence-chunked blocks: a chunked forward that saves only the block's inputs, and a backward
that recomputes the block chunk by chunk (``apply_sequence_chunking(model, training=True)``).

This is gradient checkpointing at the granularity of context parallelism. Unchunked, a block's backward needs every
activation of the block for the whole sequence at once (its recomputation under ``torch.utils.checkpoint`` too);
chunked, it needs the saved inputs, the full-length K/V with their gradients and one chunk's activations. The
backward of a block whose whole-sequence attentions form stages ``0..n`` (see ``SequenceChunkingHook._stages``):

1. the collection passes of the forward, without autograd, fill the K/V buffers; the buffers are then made leaves
   that require grad;
2. the final pass, recorded: each chunk runs the whole block with its attention over the buffers, and its output
   rows are back-propagated at once (into the chunk's inputs, the parameters and the buffers' ``.grad``);
3. for each stage from the last to the first, its collection pass, recorded: each chunk runs to the stage's
   attention call, where its own keys and values are back-propagated with their rows of the buffers' gradients. A
   later stage's keys depend on an earlier stage's attention output, which read the earlier buffers; going backwards
   through the stages, every buffer's gradient is complete before its own pass runs.

Every chunk sees the same numbers as in the forward, so the gradients are the unmodified model's up to rounding. Like
``torch.utils.checkpoint(use_reentrant=True)``, the parameters' gradients are accumulated into ``.grad`` by a
backward run inside the backward: ``loss.backward()`` works; ``torch.autograd.grad`` through a chunked block is
refused with an error (the parameters' gradients would not reach it).
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from ._sequence_chunks import Arguments, ChunkLayout, materialized
from ._sequence_exchange import BlockRun, KeyValuesCollected

if TYPE_CHECKING:
    from .sequence import SequenceChunkingHook


def recorded_forward(hook: SequenceChunkingHook, module: torch.nn.Module, arguments: Arguments) -> Any:
    """The block's output, computed in chunks without autograd and recorded as one node whose backward recomputes
    the block in chunks (module docstring)."""
    _refuse_dropout(hook.path, module)
    args, kwargs = materialized(arguments.args, arguments.kwargs)  # deferred per-token tables: computed, recorded
    flat, spec = tree_flatten((args, kwargs))
    positions = [i for i, value in enumerate(flat) if isinstance(value, torch.Tensor)]
    # A tensor that requires grad among the inputs makes autograd record the node even when no block input does
    # (only the parameters), as in reentrant checkpointing.
    anchor = torch.empty(0, requires_grad=True)
    call = _Call(hook, module, flat, spec, positions)
    outputs = _RecomputedBlock.apply(call, anchor, *(flat[i] for i in positions))
    return call.rebuild_output(outputs)


class _Call:
    """One recorded block call: what its backward needs to rebuild the arguments and rerun the block."""

    def __init__(self, hook: SequenceChunkingHook, module: torch.nn.Module, flat: list[Any], spec: Any,
                 positions: list[int]) -> None:
        self.hook, self.module, self.spec, self.positions = hook, module, spec, positions
        # The tensors themselves are saved by autograd (``save_for_backward``), so saved-tensor hooks see them.
        self.flat = [None if isinstance(value, torch.Tensor) else value for value in flat]
        self.output_flat: list[Any] = []
        self.output_spec: Any = None
        self.output_positions: list[int] = []

    def arguments(self, tensors: tuple[torch.Tensor, ...]) -> Arguments:
        flat = list(self.flat)
        for position, tensor in zip(self.positions, tensors):
            flat[position] = tensor
        args, kwargs = tree_unflatten(flat, self.spec)
        return Arguments(self.hook.index, args, kwargs)

    def rebuild_output(self, tensors: tuple) -> Any:
        """The block's output structure (a tensor, or a tuple that may hold ``None``) around ``tensors``."""
        flat = list(self.output_flat)
        for position, tensor in zip(self.output_positions, tensors):
            flat[position] = tensor
        return tree_unflatten(flat, self.output_spec)


class _RecomputedBlock(torch.autograd.Function):
    """Forward: the chunked block without autograd; backward: :func:`backward_passes` (a Function takes and returns
    flat tensors, so the call's structure travels in :class:`_Call`)."""

    @staticmethod
    def forward(ctx: Any, call: _Call, anchor: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None: no zeros sent backwards
        ctx.call = call
        ctx.autocast = _autocast_state()
        ctx.save_for_backward(*tensors)
        output = call.hook.chunked(call.module, call.arguments(tensors), in_place=False)
        flat, call.output_spec = tree_flatten(output)
        call.output_positions = [i for i, value in enumerate(flat) if isinstance(value, torch.Tensor)]
        call.output_flat = [None if isinstance(value, torch.Tensor) else value for value in flat]
        return tuple(flat[i] for i in call.output_positions)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        call: _Call = ctx.call
        if not torch.autograd._is_checkpoint_valid():
            raise RuntimeError(
                f"{call.hook.path}: sequence chunking with training=True accumulates parameter gradients with a "
                "backward inside the backward (like reentrant checkpointing): use loss.backward() without `inputs`, "
                "not torch.autograd.grad"
            )
        needs = ctx.needs_input_grad[2:]
        leaves = tuple(
            tensor.detach().requires_grad_(need) if tensor.is_floating_point() or tensor.is_complex() else tensor
            for tensor, need in zip(ctx.saved_tensors, needs)
        )
        grad_output = call.rebuild_output(grads)
        with torch.enable_grad(), _autocast(ctx.autocast):
            call.hook.chunked_backward(call.module, call.arguments(leaves), grad_output)
        return (None, None, *(leaf.grad if need else None for leaf, need in zip(leaves, needs)))


def backward_passes(path: str, original: Callable[..., Any], run: BlockRun, chunk_arguments: Callable[[int], tuple],
                    output_grads: Callable[[int, Any], tuple[list, list]]) -> None:
    """Steps 1-3 of the module docstring, with ``run`` installed as the running block."""
    num_chunks = run.layout.num_chunks
    stages = sorted({state.stage for state in run.attention.values()})
    with torch.no_grad():
        for stage in stages:
            run.collecting = stage
            for chunk in range(num_chunks):
                _collect(path, original, run, chunk, chunk_arguments)
    run.reused.clear()  # computed without autograd: the recorded passes compute (and share) their own
    for state in run.attention.values():
        for gathered in state.gathered.values():
            gathered.key.requires_grad_()
            gathered.value.requires_grad_()
    run.collecting = None
    for chunk in range(num_chunks):
        run.start_chunk(chunk)
        chunk_args, chunk_kwargs = chunk_arguments(chunk)
        output = original(*chunk_args, **chunk_kwargs)
        run.check_answered(path)
        _backward(*output_grads(chunk, output))
        del output
    run.key_value_grads = []
    for stage in reversed(stages):
        run.collecting = stage
        for chunk in range(num_chunks):
            _collect(path, original, run, chunk, chunk_arguments)
            _backward([t for t, _ in run.key_value_grads], [g for _, g in run.key_value_grads])
            run.key_value_grads.clear()
    run.key_value_grads = None


def chunk_output_grads(layout: ChunkLayout, hs_index: int | None, ehs_index: int | None, dim: int, grad_output: Any
                       ) -> Callable[[int, Any], tuple[list, list]]:
    """For each chunk's output: the pieces the forward kept (see ``ChunkOutputs.add``) and their gradient rows."""
    returns_tensor = isinstance(grad_output, torch.Tensor)
    grads = (grad_output,) if returns_tensor else tuple(grad_output)

    def pieces(chunk: int, output: Any) -> tuple[list, list]:
        outputs = (output,) if returns_tensor else tuple(output)
        tensors, piece_grads = [], []
        start, end = layout.ranges["image"][chunk]
        index = 0 if returns_tensor else hs_index
        if grads[index] is not None:
            tensors.append(outputs[index])
            piece_grads.append(grads[index].narrow(dim, start, end - start))
        text = not returns_tensor and "text" in layout.lengths and ehs_index is not None
        if text and outputs[ehs_index] is not None and grads[ehs_index] is not None and layout.owns("text", chunk):
            text_start, text_end = layout.ranges["text"][chunk]
            tensors.append(outputs[ehs_index])
            piece_grads.append(grads[ehs_index].narrow(dim, text_start, text_end - text_start))
        return tensors, piece_grads

    return pieces


def _collect(path: str, original: Callable[..., Any], run: BlockRun, chunk: int,
             chunk_arguments: Callable[[int], tuple]) -> None:
    run.start_chunk(chunk)
    chunk_args, chunk_kwargs = chunk_arguments(chunk)
    try:
        original(*chunk_args, **chunk_kwargs)
    except KeyValuesCollected:
        run.check_answered(path)
        return
    raise RuntimeError(f"{path}: chunk {chunk} finished without reaching the attention kernel of stage "
                       f"{run.collecting} (skipped by a cache or processor?)")


def _backward(tensors: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
    pairs = [(t, g) for t, g in zip(tensors, grads) if t.requires_grad]
    if pairs:
        # Outputs shared by the chunks (SequenceReuseHook: a cross-attention's text K/V, a modulation table) are
        # back-propagated once per chunk: their graph must outlive the first chunk's backward.
        torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs], retain_graph=True)


def _refuse_dropout(path: str, module: torch.nn.Module) -> None:
    """A dropout draws different masks in the chunked forward and its recomputation: refused while it is active."""
    for name, child in module.named_modules():
        if child.training and isinstance(child, torch.nn.modules.dropout._DropoutNd) and child.p > 0:
            raise NotImplementedError(
                f"{path}.{name}: dropout p={child.p} in training mode; the chunked backward recomputes the block "
                "and would draw other masks (set its p to 0 or call model.eval())"
            )


def _autocast_state() -> list[tuple[str, bool, torch.dtype]]:
    return [(device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)) for device in ("cpu", "cuda")]


@contextlib.contextmanager
def _autocast(state: list[tuple[str, bool, torch.dtype]]) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        for device, enabled, dtype in state:
            if enabled:
                stack.enter_context(torch.autocast(device, dtype=dtype))
        yield

