"""Expert-parallel-equivalent mixture of experts: the experts of an expert-choice MoE layer run one group at a time.

Expert parallelism places a layer's experts on different GPUs: each GPU receives the token rows its experts chose,
computes them, and sends the outputs back to be summed into the tokens' rows. Run sequentially on one device, the
all-to-all becomes a gather and the combine an accumulating ``index_put_``, so only one expert group's rows and
intermediates exist at a time instead of every expert's (an expert-choice layer gathers ``capacity_factor`` copies of
the sequence: see :mod:`memopt.plans.experts`). The routing is computed first, whole and with the model's own ops, so
every expert chooses the same tokens; each group's experts then run as one batched matmul (the grouped GEMM of the
layer's ``use_grouped_mm`` path, restricted to the group).

:func:`memopt.apply_chunked_feedforward` applies :class:`StreamedExpertsHook` to every layer with a layout, in
``num_chunks`` expert groups: the experts are the MoE's hidden dimension, as the intermediate width is a FeedForward's
(a shared expert inside the layer is a FeedForward of its own and gets that hook).

In memopt's sequence chunks a chunk cannot route alone: :class:`SequenceRoutingHook` exchanges the router scores
between the chunks (see :mod:`memopt.hooks.sequence`) and runs each chunk's tokens through the experts that chose
them.
"""

from __future__ import annotations

import functools
import itertools
import logging
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from diffusers.hooks import ModelHook
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils.checkpoint import checkpoint

from ..plans.experts import ExpertChoiceLayout
from ..plans.feedforward import UnsupportedFeedForward
from ._common import call_inside, hooks_inside
from ._sequence_chunks import running
from ._sequence_exchange import BlockRun, RouterScoresCollected, RoutingState
from .feedforward import _bypassed_hooks, _honour_hooks, split_sizes

SEQUENCE_ROUTING_HOOK = "memopt.sequence.routing"

logger = logging.getLogger(__name__)


def _run_experts(tokens: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor,
                 down: torch.Tensor, counts: list[int], grouped: bool) -> torch.Tensor:
    """``weights * down(silu(gate) * up)`` of consecutive experts on their rows of the ``(N, D)`` ``tokens``: ``rows``
    and ``weights`` hold ``counts[i]`` entries for expert ``i`` after another. The ``(len(rows), D)`` outputs, in the
    tokens' dtype (scaled in fp32, as the layer does)."""
    picked = tokens[rows]
    gate, up = _matmul_by_expert(picked, gate_up, counts, grouped).chunk(2, dim=-1)
    del picked
    activated = F.silu(gate) * up if torch.is_grad_enabled() else F.silu(gate).mul_(up)
    del gate, up
    out = _matmul_by_expert(activated, down, counts, grouped)
    del activated
    scaled = out.float() * weights.unsqueeze(-1) if torch.is_grad_enabled() else out.float().mul_(weights.unsqueeze(-1))
    del out
    return scaled.to(tokens.dtype)


def _shared_output(module: torch.nn.Module, layout: ExpertChoiceLayout, inputs: torch.Tensor) -> torch.Tensor:
    """The ``(N, D)`` rows the experts' outputs are added to: the shared expert's output, or zeros."""
    if layout.shared is None:
        return inputs.new_zeros(inputs[..., 0].numel(), inputs.shape[-1])
    return module.get_submodule(layout.shared)(inputs).reshape(-1, inputs.shape[-1])


class StreamedExpertsHook(ModelHook):
    """Replaces an expert-choice MoE layer's forward with its experts run in ``num_chunks`` groups (see the module
    docstring). Weights are read per call (views of the packed parameters); hooks on the experts module that the run
    bypasses (leaf-level group offloading) get their ``pre_forward`` / ``post_forward`` around it, and where that
    cannot be honoured the layer's own forward runs and the reason is logged once."""

    _is_stateful = False

    def __init__(self, path: str, layout: ExpertChoiceLayout, num_chunks: int, name: str, recompute: bool = False,
                 accumulate_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.path = path
        self.layout = layout
        self.num_chunks = num_chunks
        self.name = name
        self.recompute = recompute
        self.accumulate_dtype = accumulate_dtype
        self._fallback_reasons: set[str] = set()

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        if running("block_run") is not None:
            raise ValueError(
                f"{self.path}: its experts choose their tokens over the whole sequence, so it cannot run inside "
                "memopt's sequence chunks (each chunk would route among its own tokens only)")
        try:
            bypassed = _bypassed_hooks(module, self.layout, self.path)
            inner = hooks_inside(module, self.name)
            for hook_name, hook in inner.items():
                if hasattr(hook, "new_forward"):
                    raise UnsupportedFeedForward(f"the hook {hook_name!r}, registered before memopt's, replaces the "
                                                 "forward")
        except UnsupportedFeedForward as reason:
            if str(reason) not in self._fallback_reasons:
                self._fallback_reasons.add(str(reason))
                logger.warning("memopt: %s runs its experts unchunked: %s", self.path, reason)
            return self.fn_ref.original_forward(*args, **kwargs)
        return call_inside(list(inner.values()), module, functools.partial(self._forward, module, bypassed),
                           *args, **kwargs)

    def _forward(self, module: torch.nn.Module, bypassed: list, *args: Any, **kwargs: Any) -> torch.Tensor:
        routing = self.layout.route(module, *args, **kwargs)
        inputs = routing.inputs
        tokens = inputs.reshape(-1, inputs.shape[-1])
        out = _shared_output(module, self.layout, inputs)
        dtype = out.dtype
        if self.accumulate_dtype is not None:
            out = out.to(self.accumulate_dtype)
        per_expert = routing.rows.shape[1]  # every expert chooses the same number of rows
        with _honour_hooks(bypassed):
            gate_up, down = self.layout.weights(module)
            for start, stop in split_sizes(routing.rows.shape[0], self.num_chunks):
                rows = routing.rows[start:stop].reshape(-1)
                group = (tokens, rows, routing.weights[start:stop].reshape(-1), gate_up[start:stop],
                         down[start:stop], [per_expert] * (stop - start), False)
                if self.recompute and torch.is_grad_enabled():
                    outputs = checkpoint(_run_experts, *group, use_reentrant=False)
                else:
                    outputs = _run_experts(*group)
                out = out.index_put_((rows,), outputs.to(out.dtype), accumulate=True)
                del outputs
        return out.to(dtype).reshape(inputs.shape)


class SequenceRoutingHook(ModelHook):
    """On an expert-choice MoE layer of a block in memopt's sequence chunks (``BlockPlan.routed``).

    The layer's experts choose among all tokens, so a chunk cannot route alone; the router scores are exchanged like
    keys and values (:meth:`memopt.hooks.sequence.SequenceChunkingHook._two_pass`): in the routing pass each chunk
    reaches the layer, which keeps the chunk's router logits in a full-length table and stops the block
    (:class:`RouterScoresCollected`); the choice is then made once over the table, with the model's own ops
    (``ExpertChoiceLayout.choose``), and in the final pass each chunk's tokens go through the experts that chose them,
    in groups of experts of at most a chunk's token rows, added to the shared expert's output in the layer's order.
    Outside a chunked block run (an unchunked call) the layer's own forward runs, with any hook inside it.
    """

    _is_stateful = False

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        run: BlockRun | None = running("block_run")
        state = None if run is None else run.routing.get(id(module))
        if state is None:
            return self.fn_ref.original_forward(*args, **kwargs)
        bypassed = _bypassed_hooks(module, state.layout, self.path)
        inner = list(hooks_inside(module, SEQUENCE_ROUTING_HOOK).values())  # offloading's pre/post_forward
        return call_inside(inner, module, functools.partial(self._chunk, module, run, state, bypassed),
                           *args, **kwargs)

    def _chunk(self, module: torch.nn.Module, run: BlockRun, state: RoutingState, bypassed: list, *args: Any,
               **kwargs: Any) -> torch.Tensor:
        start, end = run.layout.ranges["image"][run.chunk]
        inputs = state.layout.tokens(module, *args, **kwargs)
        if inputs.dim() != 3 or inputs.shape[1] != end - start:
            raise RuntimeError(f"{self.path}: expected the chunk's {end - start} image tokens along dim 1, got "
                               f"{tuple(inputs.shape)}")
        if run.routing_pass:
            logits = state.layout.router(module, *args, **kwargs)
            if state.logits is None:
                state.logits = logits.new_empty(logits.shape[0], run.layout.lengths["image"], logits.shape[2])
            state.logits[:, start:end] = logits
            state.chunks_seen.add(run.chunk)
            raise RouterScoresCollected
        if state.rows is None:
            raise RuntimeError(f"{self.path}: reached in chunk {run.chunk} before its routing was made")
        tokens = inputs.reshape(-1, inputs.shape[-1])
        layout = state.layout
        out = _shared_output(module, layout, inputs)
        counts, rows, weights = _chunk_choices(state, start, end, inputs.shape[0])
        with _honour_hooks(bypassed):
            gate_up, down = layout.weights(module)
            grouped = layout.runs_grouped_mm(module)
            for first, last, begin, stop in _groups(counts, max(inputs.shape[0] * (end - start), *counts)):
                outputs = _run_experts(tokens, rows[begin:stop], weights[begin:stop], gate_up[first:last],
                                       down[first:last], counts[first:last], grouped)
                out = out.index_put_((rows[begin:stop],), outputs.to(out.dtype), accumulate=True)
                del outputs
        return out.reshape(inputs.shape)


def _chunk_choices(state: RoutingState, start: int, end: int, batch: int
                   ) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """The chunk's share of the layer's choices: per expert how many of its rows lie in the chunk, and those rows
    (``b * (end - start) + s - start`` in the chunk's tokens) with their weights, expert after expert.

    In a simulation (fake tensors: the choice depends on values the weights would give) the first experts get the
    most rows any routing can give them in the first chunk, up to a group's worth (the chunk's token rows), and the
    rest spread evenly over the chunks: the peak, one group's, is then an upper bound, and the FLOPs are every
    routing's but for that one group."""
    length, room = state.length, batch * (end - start)
    experts, per_expert = state.rows.shape
    position = state.rows % length  # also in a simulation, for their memory
    inside = (position >= start) & (position < end)
    local = (state.rows // length) * (end - start) + position - start
    if isinstance(state.rows, FakeTensor):
        even = -(-per_expert * (end - start) // length)
        counts, left = [], room if start == 0 else 0
        for _ in range(experts):
            counts.append(max(even, min(per_expert, left)))
            left -= counts[-1]
        rows = torch.arange(sum(counts), device=state.rows.device) % room
        weights = torch.cat([state.weights[expert, :count] for expert, count in enumerate(counts)])
        return counts, rows, weights
    return inside.sum(1).tolist(), local[inside], state.weights[inside]


def _groups(counts: list[int], cap: int) -> Iterator[tuple[int, int, int, int]]:
    """Consecutive experts ``[first, last)`` and their rows ``[begin, stop)``, each group at most ``cap`` rows (an
    expert with more is a group of its own); experts without rows are skipped."""
    first, begin, stop = 0, 0, 0
    for expert, count in enumerate(counts):
        if stop - begin + count > cap and stop > begin:
            yield first, expert, begin, stop
            first, begin = expert, stop
        elif stop == begin:
            first = expert
        stop += count
    if stop > begin:
        yield first, len(counts), begin, stop


def _matmul_by_expert(x: torch.Tensor, weights: torch.Tensor, counts: list[int], grouped: bool) -> torch.Tensor:
    """``x``'s rows, ``counts[i]`` after another, times ``weights[i]``: one batched matmul where every expert has as
    many rows, else one ``F.grouped_mm`` where the model runs its experts with it (``use_grouped_mm``), else one matmul
    per expert into one output."""
    if len(set(counts)) == 1:
        return torch.bmm(x.view(len(counts), counts[0], x.shape[-1]), weights).view(x.shape[0], -1)
    if grouped:
        offsets = torch.tensor(list(itertools.accumulate(counts)), dtype=torch.int32, device=x.device)
        return F.grouped_mm(x, weights, offs=offsets).type_as(x)
    out = x.new_empty(x.shape[0], weights.shape[-1])
    begin = 0
    for index, count in enumerate(counts):
        if count:
            torch.mm(x[begin:begin + count], weights[index], out=out[begin:begin + count])
        begin += count
    return out
