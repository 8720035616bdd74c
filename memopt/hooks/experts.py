"""Expert-parallel-equivalent mixture of experts: the experts of an expert-choice MoE layer run one group at a time.

Expert parallelism places a layer's experts on different GPUs: each GPU receives the token rows its experts chose,
computes them, and sends the outputs back to be summed into the tokens' rows. Run sequentially on one device, the
all-to-all becomes a gather and the combine an ``index_add_``, so only one expert group's rows and intermediates exist
at a time instead of every expert's (an expert-choice layer gathers ``capacity_factor`` copies of the sequence: see
:mod:`memopt.plans.experts`). The routing is computed first, whole and with the model's own ops, so every expert
chooses the same tokens; each group's experts then run as one batched matmul (the grouped GEMM of the layer's
``use_grouped_mm`` path, restricted to the group).

:func:`memopt.apply_chunked_feedforward` applies :class:`StreamedExpertsHook` to every layer with a layout, in
``num_chunks`` expert groups: the experts are the MoE's hidden dimension, as the intermediate width is a FeedForward's
(a shared expert inside the layer is a FeedForward of its own and gets that hook).
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.hooks import ModelHook
from torch.utils.checkpoint import checkpoint

from ..plans.experts import ExpertChoiceLayout
from ..plans.feedforward import UnsupportedFeedForward
from ._common import call_inside, hooks_inside
from ._sequence_chunks import running
from .feedforward import _bypassed_hooks, _honour_hooks, split_sizes

logger = logging.getLogger(__name__)


def _expert_group(tokens: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor,
                  down: torch.Tensor) -> torch.Tensor:
    """``weights * down(silu(gate) * up)`` of ``g`` experts on their ``(g, R)`` rows of the ``(N, D)`` ``tokens``:
    the ``(g R, D)`` outputs, in the tokens' dtype (scaled in fp32, as the layer does)."""
    picked = tokens[rows.reshape(-1)].view(*rows.shape, tokens.shape[-1])
    hidden = torch.bmm(picked, gate_up)
    del picked
    gate, up = hidden.chunk(2, dim=-1)
    if torch.is_grad_enabled():
        activated = F.silu(gate) * up
    else:
        activated = F.silu(gate).mul_(up)
    del hidden, gate, up
    out = torch.bmm(activated, down)
    del activated
    scaled = out.float() * weights.unsqueeze(-1) if torch.is_grad_enabled() else out.float().mul_(weights.unsqueeze(-1))
    del out
    return scaled.to(tokens.dtype).reshape(-1, tokens.shape[-1])


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
        layout = self.layout
        routing = layout.route(module, *args, **kwargs)
        inputs = routing.inputs
        tokens = inputs.reshape(-1, inputs.shape[-1])
        if layout.shared is not None:
            out = module.get_submodule(layout.shared)(inputs).reshape(tokens.shape)
        else:
            out = torch.zeros_like(tokens)
        dtype = out.dtype
        if self.accumulate_dtype is not None:
            out = out.to(self.accumulate_dtype)
        grad = torch.is_grad_enabled()
        with _honour_hooks(bypassed):
            experts = module.get_submodule(layout.experts)
            gate_up, down = getattr(experts, layout.gate_up), getattr(experts, layout.down)
            for start, stop in split_sizes(routing.rows.shape[0], self.num_chunks):
                group = (tokens, routing.rows[start:stop], routing.weights[start:stop], gate_up[start:stop],
                         down[start:stop])
                if self.recompute and grad:
                    outputs = checkpoint(_expert_group, *group, use_reentrant=False)
                else:
                    outputs = _expert_group(*group)
                out = out.index_add_(0, routing.rows[start:stop].reshape(-1), outputs.to(out.dtype))
                del outputs
        return out.to(dtype).reshape(inputs.shape)
