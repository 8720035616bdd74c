"""The one-line entry points: apply memopt to a pipeline or a model, and remove it again."""

from __future__ import annotations

from typing import Any

import torch

from .hooks._common import remove_memopt_hooks


def _components(obj: Any) -> dict[str, torch.nn.Module]:
    """The ``nn.Module`` components of a ``DiffusionPipeline`` (or ``{"": module}`` for a bare model)."""
    if isinstance(obj, torch.nn.Module):
        return {"": obj}
    components = getattr(obj, "components", None)
    if not isinstance(components, dict):
        raise TypeError(f"expected a diffusers DiffusionPipeline or a torch.nn.Module, got {type(obj).__name__}")
    return {name: module for name, module in components.items() if isinstance(module, torch.nn.Module)}


def remove_memory_optimizations(pipe_or_model: Any) -> int:
    """Undo every memopt hook on a pipeline's components or on a model; return how many hooks were removed.

    The original forwards are restored exactly (diffusers' ``HookRegistry`` splices memopt's hooks out of the chain,
    other hooks such as group offloading stay), so outputs are bit-identical to before ``apply_*``.
    """
    return sum(remove_memopt_hooks(module) for module in _components(pipe_or_model).values())
