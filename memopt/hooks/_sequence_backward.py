"""Training through sequence-chunked blocks: a chunked forward that saves only the block's inputs, and a backward
that recomputes the block chunk by chunk (``apply_sequence_chunking(model, training=True)``).

This is gradient checkpointing at the granularity of context parallelism. Unchunked, a block's backward needs every
activation of the block for the whole sequence at once (its recomputation under ``torch.utils.checkpoint`` too);
chunked, it needs the saved inputs, the full-length K/V with their gradients and one chunk's activations. The
backward of a block whose whole-sequence attentions form stages ``0..n`` (see ``SequenceChunkingHook._stages``):

1. the collection passes of the forward, without autograd, fill the K/V buffers; the buffers are then made leaves
   that require grad, in groups of heads (:func:`backward_head_groups`) that the recorded attention calls attend
   over one after another, so that an attention backward's transient K/V gradients are a group's, not 2 LD;
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

With ``saved_inputs="host"`` the saved inputs wait in pinned host memory (:class:`SavedOnHost`), so the device holds
one block's backward workspace whatever the depth; so do the tensors the rest of the model (embedders, the output
head, which runs whole under autograd) saves, each brought back when its own backward runs. Under diffusers'
block-level group offloading (applied after this hook, as for inference) each block onloads its weights again for
its backward, and the model's top-level group is onloaded when the backward starts, so the device also holds only a
few blocks' weights: the training counterpart of offloaded inference. :class:`SequenceTrainingHook`, on the model,
does both.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch
from diffusers.hooks import ModelHook
from diffusers.models.embeddings import LabelEmbedding
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..trace.tracer import host_memory
from ._sequence_chunks import RUNNING, Arguments, ChunkLayout, intersect, materialized, memory_runs
from ._sequence_exchange import BlockRun
from .offload import offloading_group, onloaded, onloaded_for_backward

if TYPE_CHECKING:
    from .sequence import SequenceChunkingHook


BACKWARD_HEAD_GROUPS = 8
"""The recorded passes attend over the full-length keys and values in up to this many groups of heads, one after
another, so that each attention backward's transient key/value gradients are a group's share of 2 LD
(:meth:`~memopt.hooks._sequence_exchange.GatheredKeyValues.recorded`)."""

CHUNKS_PER_HEAD_GROUP = 4
"""One group of heads per this many chunks (:func:`backward_head_groups`)."""


def backward_head_groups(num_chunks: int) -> int:
    """Groups of heads for a chunked backward in ``num_chunks`` chunks: one per :data:`CHUNKS_PER_HEAD_GROUP`, at most
    :data:`BACKWARD_HEAD_GROUPS`. With few chunks a chunk's own activations dwarf the 2 LD of transient K/V gradients
    (Wan2.1-1.3B 480p at 4 chunks: 8 groups saved nothing), while every group is one more attention call per chunk;
    with Wan2.1-14B 720p at 32 chunks, 8 groups take its step from 10.41 to 8.69 LD."""
    return max(1, min(BACKWARD_HEAD_GROUPS, num_chunks // CHUNKS_PER_HEAD_GROUP))


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
    with SavedOnHost() if hook.config.saved_inputs == "host" else contextlib.nullcontext():
        outputs = _RecomputedBlock.apply(call, anchor, *(flat[i] for i in positions))
    return call.rebuild_output(outputs)


class SequenceTrainingHook(ModelHook):
    """On the model, with ``training=True``: makes a group-offloaded model trainable through the chunked blocks.

    The chunked blocks onload themselves for their backward (:func:`memopt.hooks.offload.onloaded`); the rest of the
    model (embedders, output head: the top-level group of block-level offloading) runs under plain autograd, so its
    group is onloaded when the backward reaches the model's output (:func:`~memopt.hooks.offload.onloaded_for_backward`)
    and offloaded when the backward ends. Any other offloaded module would find its weights on the host in the
    backward: refused by name before a forward under autograd runs.

    With ``saved_inputs="host"`` it also puts what the rest of the model saves for its backward on the host
    (:class:`SavedOnHost` around the whole forward; the blocks save only their inputs): the output head, which runs
    whole, would otherwise hold its fp32 normalisation and modulation (about 4 LD in Wan) through its backward.
    """

    def __init__(self, blocks: list[torch.nn.Module], saved_inputs: str) -> None:
        super().__init__()
        self.blocks = {id(block) for block in blocks}
        self.saved_inputs = saved_inputs

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return self.fn_ref.original_forward(*args, **kwargs)
        offloaded = [(path, sub) for path, sub in module.named_modules() if offloading_group(sub) is not None]
        unchunked = [path for path, sub in offloaded if sub is not module and id(sub) not in self.blocks]
        if unchunked:
            raise NotImplementedError(
                f"{type(module).__name__}: training through group offloading needs every offloaded module to be a "
                f"block memopt recomputes in chunks (block-level offloading), but {unchunked[:4]} are offloaded and "
                "not chunked: their backward would find their weights on the host"
            )
        with SavedOnHost() if self.saved_inputs == "host" else contextlib.nullcontext():
            output = self.fn_ref.original_forward(*args, **kwargs)
        return onloaded_for_backward(module, output)


class SavedOnHost(torch.autograd.graph.saved_tensors_hooks):
    """Saved tensors copied to (pinned) host memory when saved and back to their device when the backward unpacks
    them, like ``torch.autograd.graph.save_on_cpu``, with two differences. A tensor saved again while its host copy
    lives (the same tensor object, unchanged: rotary tables and timestep embeddings every block is given) reuses the
    copy. And the copies are made under :func:`memopt.trace.tracer.host_memory`, so a traced or simulated step counts
    them as host memory. The copies run on the current stream, in order with the compute (no synchronisation).
    Parameters (and views of them, such as the transposed weight a linear layer saves) stay where they are.
    """

    _copies: dict[int, tuple[weakref.ref, int, torch.Tensor]] = {}
    """``id(tensor)`` -> (the tensor, its version when copied, the host copy), while the tensor lives."""

    def __init__(self) -> None:
        super().__init__(self._pack, self._unpack)

    @classmethod
    def _pack(cls, tensor: torch.Tensor) -> tuple[torch.device | None, torch.Tensor]:
        if isinstance(tensor, torch.nn.Parameter) or isinstance(tensor._base, torch.nn.Parameter):
            return None, tensor  # a weight (or its transpose, which a linear layer saves): it stays where it is
        key = id(tensor)
        known = cls._copies.get(key)
        if known is not None and known[0]() is tensor and known[1] == tensor._version:
            return tensor.device, known[2]
        with host_memory():
            copy = torch.empty(tensor.size(), dtype=tensor.dtype, layout=tensor.layout, device="cpu",
                               pin_memory=tensor.is_cuda)
            copy.copy_(tensor, non_blocking=tensor.is_cuda)
        cls._copies[key] = (weakref.ref(tensor, lambda _: cls._copies.pop(key, None)), tensor._version, copy)
        return tensor.device, copy

    @staticmethod
    def _unpack(packed: tuple[torch.device | None, torch.Tensor]) -> torch.Tensor:
        device, copy = packed
        return copy if device is None else copy.to(device, non_blocking=True, copy=True)


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
        with recomputing(call.hook.path, call.module, ctx) as gradients, gradients:
            call.hook.chunked_backward(call.module, call.arguments(gradients.inputs), call.rebuild_output(grads))
        return (None, None, *gradients.gradients())


@contextlib.contextmanager
def recomputing(path: str, module: torch.nn.Module, ctx: Any) -> Iterator["InputGradients"]:
    """Where a block's chunked backward runs, from inside a ``torch.autograd.Function``'s backward whose forward
    saved the block's input tensors (after two non-tensor arguments) and the autocast state: autograd recording,
    the forward's autocast, the block's weights onloaded (group-offloaded, they went back to the host when its
    forward returned); yields the inputs' :class:`InputGradients`."""
    if not torch.autograd._is_checkpoint_valid():
        raise RuntimeError(
            f"{path}: sequence chunking with training=True accumulates parameter gradients with a backward inside the "
            "backward (like reentrant checkpointing): use loss.backward() without `inputs`, not torch.autograd.grad"
        )
    with onloaded(module), torch.enable_grad(), _autocast(ctx.autocast):
        yield InputGradients(ctx.saved_tensors, ctx.needs_input_grad[2:])


class InputGradients:
    """The block inputs of a recomputation, each that requires grad sending its gradient into a full-size buffer of
    its own, in place.

    Not leaves whose ``.grad`` autograd accumulates: the backward runs once per chunk and pass, and autograd may make
    the first ``.grad`` of two leaves views of one tensor (both given views of one gradient, e.g. a modulation table
    parameter and a per-sample timestep embedding added with no broadcast over a batch of 1), after which it
    accumulates into both in place: each would count the other's gradients (found on LTX-Video at batch 1). And a
    chunk's rows cut from an input (``ChunkLayout.cut`` calls :meth:`narrow` while installed) add their gradient to
    the buffer's rows directly, instead of through ``narrow``'s backward, which allocates a full-size zero tensor per
    chunk for autograd to add up: one more hidden state at the peak, and its zero-fill for every chunk.
    """

    def __init__(self, tensors: tuple[torch.Tensor, ...], needs: tuple[bool, ...]) -> None:
        anchor = torch.empty(0, requires_grad=True)  # makes the stand-ins require grad; receives none
        self.inputs: list[torch.Tensor] = []
        self._gradients: list[_Gradient | None] = []
        self._by_input: dict[int, _Gradient] = {}
        for tensor, need in zip(tensors, needs):
            tensor = tensor.detach()
            gradient = _Gradient(torch.zeros_like(tensor)) if need else None
            if gradient is not None:
                tensor = _GradientInto.apply(tensor, anchor, gradient)
                self._by_input[id(tensor)] = gradient
            self.inputs.append(tensor)
            self._gradients.append(gradient)

    def __enter__(self) -> "InputGradients":
        RUNNING.narrow_rows = self.narrow
        return self

    def __exit__(self, *exc_info: Any) -> None:
        RUNNING.narrow_rows = None

    def narrow(self, value: torch.Tensor, dim: int, start: int, length: int) -> torch.Tensor:
        gradient = self._by_input.get(id(value))
        if gradient is None:
            return value.narrow(dim, start, length)
        return _RowsGradientInto.apply(value, dim, start, length, gradient)

    def gradients(self) -> list[torch.Tensor | None]:
        """Per input, its gradient; ``None`` where none reached it (as autograd leaves it, so nothing upstream gets
        zero gradients an optimizer would step on)."""
        return [g.buffer if g is not None and g.reached else None for g in self._gradients]


class _Gradient:
    """A full-size gradient buffer and whether any gradient reached it."""

    def __init__(self, buffer: torch.Tensor) -> None:
        self.buffer, self.reached = buffer, False

    def add(self, grad: torch.Tensor, dim: int = 0, start: int = 0, length: int | None = None) -> None:
        rows = self.buffer if length is None else self.buffer.narrow(dim, start, length)
        rows.add_(grad)
        self.reached = True


class _GradientInto(torch.autograd.Function):
    """``value`` as is, its gradient added into ``gradient`` (see :class:`InputGradients`)."""

    @staticmethod
    def forward(ctx: Any, value: torch.Tensor, anchor: torch.Tensor, gradient: _Gradient) -> torch.Tensor:
        ctx.gradient = gradient
        # Where the block uses the input only in chunk rows (_RowsGradientInto), no gradient reaches this node:
        # materialized, that would be a full-size zero tensor added into the buffer per chunk and pass.
        ctx.set_materialize_grads(False)
        return value.view_as(value)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor | None) -> tuple[None, ...]:
        if grad is not None:
            ctx.gradient.add(grad)
        return None, None, None


class _RowsGradientInto(torch.autograd.Function):
    """``value.narrow(dim, start, length)``, its gradient added into ``gradient``'s rows (see
    :class:`InputGradients`)."""

    @staticmethod
    def forward(ctx: Any, value: torch.Tensor, dim: int, start: int, length: int, gradient: _Gradient
                ) -> torch.Tensor:
        ctx.gradient, ctx.rows = gradient, (dim, start, length)
        return value.narrow(dim, start, length)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, ...]:
        ctx.gradient.add(grad, *ctx.rows)
        return None, None, None, None, None


def backward_passes(run: BlockRun, collect: Callable[[int], None], final: Callable[[int], Any],
                    output_grads: Callable[[int, Any], tuple[list, list]], parameters: list[torch.Tensor]) -> None:
    """Steps 1-3 of the module docstring, with ``run`` installed as the running block: ``collect(chunk)`` runs a
    chunk in the collection pass of ``run.collecting``, ``final(chunk)`` returns its output in the final pass
    (``SequenceChunkingHook``'s, as in the forward); ``parameters``: the block's, whose ``.grad`` the passes
    accumulate."""
    chunks = range(run.layout.num_chunks)
    stages = sorted({state.stage for state in run.attention.values()})
    with torch.no_grad():
        for stage in stages:
            run.collecting = stage
            for chunk in chunks:
                collect(chunk)
    run.reused.clear()  # computed without autograd: the recorded passes compute (and share) their own
    leaves = list(parameters)
    for state in run.attention.values():
        for gathered in state.gathered.values():
            leaves += gathered.recorded(backward_head_groups(run.layout.num_chunks))
    run.collecting = None
    for chunk in chunks:
        _backward(*output_grads(chunk, final(chunk)), leaves)
    run.key_value_grads = []
    for stage in reversed(stages):
        run.collecting = stage
        for chunk in chunks:
            collect(chunk)
            _backward([t for t, _ in run.key_value_grads], [g for _, g in run.key_value_grads], leaves)
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


def _backward(tensors: list[torch.Tensor], grads: list[torch.Tensor], leaves: list[torch.Tensor]) -> None:
    pairs = [(t, g) for t, g in zip(tensors, grads) if t.requires_grad]
    if pairs:
        # Outputs shared by the chunks (SequenceReuseHook: a cross-attention's text K/V, a modulation table) are
        # back-propagated once per chunk: their graph must outlive the first chunk's backward.
        torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs], retain_graph=True)
        separate_shared_gradients(leaves)


def separate_shared_gradients(leaves: list[torch.Tensor]) -> None:
    """Give every leaf whose ``.grad`` overlaps another's memory a copy of its own.

    A leaf's first gradient may be taken by autograd as is, and two leaves given views of one gradient tensor (a
    parameter and another leaf added with no broadcast to reduce over) end up sharing it; the next backward then
    accumulates into both in place, and each counts the other's gradient. A single backward per step never
    accumulates twice; the chunked backward runs one per chunk and pass, so the sharing is undone after each.
    """
    kept: dict[int, list[torch.Tensor]] = {}
    for leaf in leaves:
        grad = leaf.grad
        if grad is None or grad.numel() == 0:
            continue
        same_storage = kept.setdefault(grad.untyped_storage()._cdata, [])
        runs = memory_runs(grad)
        if any(runs is None or (other := memory_runs(g)) is None or intersect(runs, other) for g in same_storage):
            leaf.grad = grad.clone()
        else:
            same_storage.append(grad)


def _refuse_dropout(path: str, module: torch.nn.Module) -> None:
    """A dropout draws different masks in the chunked forward and its recomputation: refused while it is active. So is
    a label dropout (diffusers' ``LabelEmbedding``, which DiT's blocks call with their class labels: ``dropout_prob``
    of the labels replaced by the unconditional one in training mode, a fresh draw in every call)."""
    for name, child in module.named_modules():
        if not child.training:
            continue
        if isinstance(child, torch.nn.modules.dropout._DropoutNd) and child.p > 0:
            raise NotImplementedError(
                f"{path}.{name}: dropout p={child.p} in training mode; the chunked backward recomputes the block "
                "and would draw other masks (set its p to 0 or call model.eval())"
            )
        if isinstance(child, LabelEmbedding) and child.dropout_prob > 0:
            raise NotImplementedError(
                f"{path}.{name}: label dropout dropout_prob={child.dropout_prob} in training mode; every chunk and the "
                "chunked backward would draw other labels to drop (set its dropout_prob to 0, dropping labels in the "
                "data instead, or call eval() on it)"
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

