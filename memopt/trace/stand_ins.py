"""Worst-case stand-ins for values a simulated forward computes from its weights.

:class:`~memopt.trace.simulate.InputValues` carries the values of a simulated forward's inputs, but values computed
from the weights cannot be carried: a simulation's weights are fake. Where such values decide only *how much* memory a
forward needs, through a choice whose worst case is known, the simulation makes that choice itself, and its peak is an
upper bound for every value the weights could give.

HiDream-I1's MoE is the case: its router (``MoEGate``) picks each token's top-k experts from scores computed with its
weights, and ``moe_infer`` gathers each expert's tokens by ``bincount`` of those choices, so the memory of an expert's
pass grows with how many tokens chose it. A token picks an expert at most once, so no routing gives an expert more
tokens than every token choosing the same k experts: that routing is the stand-in. The FLOPs are the same for every
routing (each token goes through k experts).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch.utils.hooks import RemovableHandle


@dataclass(frozen=True)
class StandIn:
    """Replaces, in a simulated forward, the output of every module of one class.

    Attributes:
        module_class: the module's class as ``module.qualname`` (matched exactly, without importing it).
        assumption: what the simulation assumes instead of the real values (for a plan's report).
        output: ``(module, output) -> output`` computing the stand-in, under the simulation's modes (so that its
            factories carry values).
    """

    module_class: str
    assumption: str
    output: Callable[[torch.nn.Module, Any], Any]


def _every_token_to_the_first_experts(gate: torch.nn.Module, output: Any) -> Any:
    """HiDream's router output ``(topk_idx, topk_weight, aux_loss)`` with every token sent to experts ``0..k-1``."""
    topk_idx, topk_weight, aux_loss = output
    rows, top_k = topk_idx.shape
    worst = torch.arange(top_k, dtype=topk_idx.dtype, device=topk_idx.device).repeat(rows, 1)
    return worst, topk_weight, aux_loss


STAND_INS: tuple[StandIn, ...] = (
    StandIn(
        "diffusers.models.transformers.transformer_hidream_image.MoEGate",
        "MoE routing at its worst case (every token to the same top-k experts, the most tokens any routing gives one "
        "expert), so the predicted peak is an upper bound",
        _every_token_to_the_first_experts,
    ),
)


def _class_name(module: torch.nn.Module) -> str:
    return f"{type(module).__module__}.{type(module).__qualname__}"


@contextmanager
def worst_case_values(model: torch.nn.Module) -> Iterator[list[str]]:
    """Within the block, :data:`STAND_INS` replace the outputs of ``model``'s modules they name (forward hooks,
    removed on exit); yields the assumptions made (one per stand-in class present, in :data:`STAND_INS` order)."""
    by_class = {stand_in.module_class: stand_in for stand_in in STAND_INS}
    handles: list[RemovableHandle] = []
    used: set[str] = set()
    for module in model.modules():
        stand_in = by_class.get(_class_name(module))
        if stand_in is None:
            continue
        handles.append(module.register_forward_hook(
            lambda module, args, output, stand_in=stand_in: stand_in.output(module, output)))
        used.add(stand_in.module_class)
    try:
        yield [stand_in.assumption for stand_in in STAND_INS if stand_in.module_class in used]
    finally:
        for handle in handles:
            handle.remove()
