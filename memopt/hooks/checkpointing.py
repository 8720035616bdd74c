"""diffusers' own gradient checkpointing, switched on as a memopt hook so that removing memopt switches it off again.

The planner (:func:`memopt.planner.plan_denoiser` with ``training=True``) weighs diffusers' checkpointing (each block
recomputed whole in the backward: it saves only the blocks' inputs, at about 1.3x the step time) against memopt's
sequence-chunked recomputation (``apply_sequence_chunking(training=True)``: less memory, more time) and the
unmodified model. When it chooses checkpointing it applies it through this hook: diffusers' switch is
``model.enable_gradient_checkpointing()``, and the hook's ``deinitalize_hook`` (called by ``HookRegistry.remove_hook``)
turns it off again, unless the model had it on before, so :func:`memopt.remove_memory_optimizations` leaves the
model as it found it.
"""

from __future__ import annotations

import torch
from diffusers.hooks import ModelHook

from ._common import register_memopt_hook

CHECKPOINTING_HOOK = "memopt.gradient_checkpointing"


class GradientCheckpointingHook(ModelHook):
    """Turns diffusers' gradient checkpointing on while registered (its default function: non-reentrant
    ``torch.utils.checkpoint``); the forward is the model's own."""

    def __init__(self) -> None:
        super().__init__()
        self.was_enabled = False

    def initialize_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        self.was_enabled = module.is_gradient_checkpointing
        if not self.was_enabled:
            module.enable_gradient_checkpointing()
        return module

    def deinitalize_hook(self, module: torch.nn.Module) -> torch.nn.Module:  # diffusers' spelling
        if not self.was_enabled:
            module.disable_gradient_checkpointing()
        return module


def apply_gradient_checkpointing(model: torch.nn.Module) -> str:
    """Switch on ``model``'s diffusers gradient checkpointing until ``memopt.remove_memory_optimizations(model)``.

    Raises:
        ValueError: ``model`` is not a diffusers model that supports gradient checkpointing (named in the message).
    """
    if not getattr(model, "_supports_gradient_checkpointing", False):
        raise ValueError(f"{type(model).__name__} does not support diffusers' gradient checkpointing "
                         "(`_supports_gradient_checkpointing` is not set)")
    register_memopt_hook(model, GradientCheckpointingHook(), CHECKPOINTING_HOOK)
    return f"diffusers gradient checkpointing on {type(model).__name__}"
