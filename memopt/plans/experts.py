"""Expert-choice mixture-of-experts layers: where a layer's router, packed experts and shared expert live.

In an expert-choice MoE (Nucleus-Image's ``NucleusMoELayer``) each expert picks its top ``capacity`` tokens over the
whole sequence, so the layer gathers ``capacity_factor`` copies of the tokens (8 in Nucleus-Image: 8 LD), runs every
expert on its rows and keeps all their outputs, then scatters them back: about 40 LD at the layer's peak, four times a
dense DiT's whole forward. An expert-parallel engine would send each GPU its experts' rows and sum what comes back;
:mod:`memopt.hooks.experts` does that one expert group after another on one device, so only one group's rows exist at
a time. The routing (a ``(tokens, experts)`` score table and the chosen rows) is small and is computed first, whole,
with the same ops as the model, so the same tokens are chosen.

A layout says where the parts are; its ``route`` function is the model's routing, written once per class (no diffusers
hook exposes it), and matched to the class exactly, as :data:`memopt.plans.FEEDFORWARD_UNITS` matches its units.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .feedforward import _resolve


@dataclass(frozen=True)
class Routing:
    """Which token rows each expert computes, and the weight its output rows are added with.

    Attributes:
        inputs: ``(..., D)`` tokens the experts read (flattened to rows ``0 .. N-1`` over the leading dims).
        rows: ``(E, R)`` int64 row indices into the flattened ``inputs``, expert by expert.
        weights: ``(E, R)`` gate each routed output row is multiplied by (in fp32) before it is added.
    """

    inputs: torch.Tensor
    rows: torch.Tensor
    weights: torch.Tensor


TokensFn = Callable[..., torch.Tensor]
"""``tokens(layer, *args, **kwargs)`` with the layer's forward arguments -> the ``(B, S, D)`` tokens the experts
read."""

RouterFn = Callable[..., torch.Tensor]
"""``router(layer, *args, **kwargs)`` with the layer's forward arguments -> the router's ``(B, S, E)`` logits for its
tokens. Row-wise: a chunk of the tokens gets the chunk's rows."""

ChooseFn = Callable[[torch.nn.Module, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""``choose(layer, logits)`` over the whole ``(B, S, E)`` logits -> ``(rows, weights)`` of :class:`Routing`."""


@dataclass(frozen=True)
class ExpertChoiceLayout:
    """The parts of one expert-choice MoE layer, as paths relative to it (weights are read per call).

    Attributes:
        tokens: the tokens its experts read (:data:`TokensFn`).
        router: the layer's router scores (:data:`RouterFn`), token by token.
        choose: the layer's choice over the whole sequence (:data:`ChooseFn`): the one step no chunk can take alone
            (see :class:`memopt.plans.sequence.BlockPlan` ``routed``).
        experts: the module holding the packed expert weights.
        gate_up: its ``(E, D, 2F)`` parameter, ``[gate | up]`` along the last dim (SwiGLU: ``silu(gate) * up``).
        down: its ``(E, F, D)`` parameter.
        shared: a module computing every token (its output is what the experts' rows are added to), or None.
        grouped_mm: the experts module's flag saying the model computes them with ``F.grouped_mm`` (which a chunk's
            uneven share of rows per expert then uses too), or None.
    """

    tokens: TokensFn
    router: RouterFn
    choose: ChooseFn
    experts: str
    gate_up: str
    down: str
    shared: str | None
    grouped_mm: str | None = None

    @property
    def ff_modules(self) -> tuple[str, ...]:
        """The modules whose forwards a streamed run replaces (their diffusers hooks are honoured)."""
        return (self.experts,)

    def weights(self, layer: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's packed ``(gate_up, down)`` expert weights (the parameters themselves)."""
        experts = layer.get_submodule(self.experts)
        return getattr(experts, self.gate_up), getattr(experts, self.down)

    def runs_grouped_mm(self, layer: torch.nn.Module) -> bool:
        """Whether the model computes the layer's experts with ``F.grouped_mm``."""
        return self.grouped_mm is not None and bool(getattr(layer.get_submodule(self.experts), self.grouped_mm, False))

    def route(self, layer: torch.nn.Module, *args: Any, **kwargs: Any) -> Routing:
        logits = self.router(layer, *args, **kwargs)
        return Routing(self.tokens(layer, *args, **kwargs), *self.choose(layer, logits))


def _nucleus_tokens(layer: torch.nn.Module, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """``NucleusMoELayer.forward``'s experts (and shared expert) read the modulated tokens."""
    return hidden_states


def _nucleus_router(layer: torch.nn.Module, hidden_states: torch.Tensor, hidden_states_unmodulated: torch.Tensor,
                    timestep: torch.Tensor | None = None) -> torch.Tensor:
    """``NucleusMoELayer.forward``'s router: a linear of the timestep embedding beside the unmodulated tokens."""
    if timestep is not None:
        length = hidden_states.shape[1]
        router_input = torch.cat([timestep.unsqueeze(1).expand(-1, length, -1), hidden_states_unmodulated], dim=-1)
    else:
        router_input = hidden_states_unmodulated
    return layer.gate(router_input)


def _nucleus_choose(layer: torch.nn.Module, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``NucleusMoELayer.forward`` from its logits to its gather: each expert's top ``ceil(capacity_factor * S / E)``
    tokens of its sample by softmax (or sigmoid) score, their scores normalised over the experts that chose each
    token."""
    batch, length, _ = logits.shape
    if layer.use_sigmoid:
        scores = torch.sigmoid(logits.float()).to(logits.dtype)
    else:
        scores = F.softmax(logits.float(), dim=-1).to(logits.dtype)
    affinity = scores.transpose(1, 2)  # (B, E, S)
    capacity = max(1, math.ceil(layer.capacity_factor * length / layer.num_experts))
    chosen = torch.topk(affinity, k=capacity, dim=-1).indices  # (B, E, C)
    gating = affinity.gather(dim=-1, index=chosen)
    offsets = torch.arange(batch, device=logits.device, dtype=torch.long).view(batch, 1, 1) * length
    rows = (offsets + chosen).transpose(0, 1).reshape(layer.num_experts, -1)  # (E, B C): expert, sample, rank
    weights = gating.transpose(0, 1).reshape(layer.num_experts, -1)
    sums = torch.zeros(batch * length, device=logits.device, dtype=weights.dtype)
    sums.scatter_add_(0, rows.reshape(-1), weights.reshape(-1))
    weights = weights / (sums[rows] + 1e-12)
    return rows, weights * layer.route_scale


_EXPERT_CHOICE_LAYERS: dict[str, ExpertChoiceLayout] = {
    "diffusers.models.transformers.transformer_nucleusmoe_image.NucleusMoELayer": ExpertChoiceLayout(
        tokens=_nucleus_tokens, router=_nucleus_router, choose=_nucleus_choose, experts="experts",
        gate_up="gate_up_proj", down="down_proj", shared="shared_expert", grouped_mm="use_grouped_mm"),
}

EXPERT_CHOICE_LAYERS: dict[type, ExpertChoiceLayout] = {
    cls: layout for name, layout in _EXPERT_CHOICE_LAYERS.items() if (cls := _resolve(name)) is not None
}
"""Expert-choice MoE layer class (matched exactly) -> its :class:`ExpertChoiceLayout`, for the classes the installed
diffusers has."""


def expert_choice_layout(module: torch.nn.Module) -> ExpertChoiceLayout | None:
    return EXPERT_CHOICE_LAYERS.get(type(module))


def expert_count(layout: ExpertChoiceLayout, module: torch.nn.Module) -> int:
    """The number of experts of ``module`` (the leading dim of its packed weights)."""
    return layout.weights(module)[0].shape[0]
