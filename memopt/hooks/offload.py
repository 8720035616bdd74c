"""Composition with diffusers' group offloading, VAE tiling/slicing and the placement of a pipeline's components.

memopt does not re-implement offloading: weights move with diffusers' own ``apply_group_offloading`` (block level,
next block prefetched from pinned host copies on a CUDA side stream). This module adds what the one-liner needs
around it:

* **what it costs on the device, before running it** (:func:`offload_groups`): the groups diffusers will form, from
  the module tree alone, so the planner can predict the resident weights of any offloading choice (also for a model
  built under ``FakeTensorMode``);
* **hook order** (:func:`apply_offloading` after memopt's hooks): diffusers' ``HookRegistry`` makes the hook
  registered last the outermost. Group offloading must wrap memopt's sequence hook on a block, so that the block's
  weights are onloaded once and serve both passes over all chunks. Registered the other way round, every chunk's
  call would onload (and offload) the block again, and the prefetch chain would be triggered once per chunk.
  :func:`apply_offloading` therefore runs *after* memopt's chunking hooks; to add chunking to a model that is already
  offloaded, ``remove_offloading(model, restore=False)``, add the hooks, and ``apply_offloading`` again;
* **undo** (:func:`remove_offloading`): diffusers' hooks removed and the module back on the device it came from;
* **refusals**: a model already offloaded by accelerate (``_hf_hook``) or by the user's own group offloading, or
  already context/tensor parallel, is reported with a clear error instead of being offloaded twice;
* **the backward** (:func:`onloaded`, :func:`onloaded_for_backward`): diffusers' hooks move weights around forwards
  only. memopt's chunked training recomputes each block in its backward and onloads the block's group for it with
  the group's own ``onload_`` / ``offload_``, and the top-level group (output head) when the backward starts;
  trainable parameters' gradients travel with their weights.

There is no memopt ``ModelHook`` in this file on purpose: the hooks that move weights are diffusers' (named
``"group_offloading"``, ``"lazy_prefetch_group_offloading"``, ``"layer_execution_tracker"``).

Example::

    import torch
    from memopt.hooks.offload import OffloadConfig, apply_offloading, offload_groups, remove_offloading
    from memopt.models import get_family

    model = get_family("wan").build("tiny")
    groups = offload_groups(model)                    # blocks.0, blocks.1 and the top-level group
    print(groups.describe(use_stream=True))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    apply_offloading(model, OffloadConfig(onload_device=device, use_stream=device == "cuda"))
    remove_offloading(model)                          # hooks gone, weights back where they were
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import torch
from diffusers.hooks import HookRegistry, apply_group_offloading
from diffusers.hooks.group_offloading import ModuleGroup
from torch.utils._pytree import tree_flatten, tree_unflatten

from ._common import remove_hook

GROUP_OFFLOADING_HOOKS = ("layer_execution_tracker", "lazy_prefetch_group_offloading", "group_offloading")
"""diffusers' hook names for group offloading (``hooks/group_offloading.py``), outermost first."""

_CONTEXT_PARALLEL_HOOK_PREFIXES = ("cp_input---", "cp_output---")
"""Prefixes of the hooks diffusers' ``apply_context_parallel`` registers (``hooks/context_parallel.py``)."""

_STATE_ATTR = "_memopt_offload"
_VAE_STATE_ATTR = "_memopt_vae"

# The layer types diffusers' leaf-level offloading makes a group of (``diffusers.hooks._common``).
_LEAF_TYPES = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.ConvTranspose1d, torch.nn.ConvTranspose2d,
               torch.nn.ConvTranspose3d, torch.nn.Linear, torch.nn.Embedding)


@dataclass(frozen=True)
class OffloadConfig:
    """How one module is offloaded (passed through to diffusers' ``apply_group_offloading``).

    Attributes:
        onload_device: where the module computes (``"cuda"``). Weights live on the CPU between uses.
        offload_type: ``"block_level"`` (every ``ModuleList``/``Sequential`` child of the model is cut into groups of
            ``num_blocks_per_group``; the rest of the top level is one group, onloaded for the whole forward) or
            ``"leaf_level"`` (one group per Linear/Conv/Embedding). memopt uses block level for denoisers: its
            FeedForward hook reads weight slices without calling the Linear layers, so leaf-level hooks (which onload
            a layer when *it* is called) would leave them on the CPU.
        num_blocks_per_group: blocks per group at block level (diffusers forces 1 with streams).
        use_stream: prefetch the next group on a CUDA side stream while the current one computes (CUDA only).
        record_stream: diffusers' ``record_stream``. Kept ``False`` by the planner: without it each block's offload
            waits for the compute stream, which is what bounds the device to two blocks; with it the CPU can run
            many blocks ahead and freed blocks stay reserved until the GPU catches up.
        low_cpu_mem_usage: pin host copies on the fly instead of keeping a pinned copy of every weight (about half
            the host RAM, slower transfers); chosen from the free host RAM by the planner.
    """

    onload_device: str | torch.device
    offload_type: str = "block_level"
    num_blocks_per_group: int = 1
    use_stream: bool = False
    record_stream: bool = False
    low_cpu_mem_usage: bool = False

    def __post_init__(self) -> None:
        if self.offload_type not in ("block_level", "leaf_level"):
            raise ValueError(f"offload_type must be 'block_level' or 'leaf_level', got {self.offload_type!r}")
        if self.num_blocks_per_group < 1:
            raise ValueError(f"num_blocks_per_group must be >= 1, got {self.num_blocks_per_group}")
        if self.use_stream and torch.device(self.onload_device).type != "cuda":
            raise ValueError(f"use_stream needs a CUDA onload device, got {self.onload_device!r}")
        if self.record_stream and not self.use_stream:
            raise ValueError("record_stream needs use_stream=True")

    def describe(self) -> str:
        level = (f"block level, {self.num_blocks_per_group} block(s) per group" if self.offload_type == "block_level"
                 else "leaf level")
        parts = [f"group offloading ({level}"]
        if self.use_stream:
            parts.append("next group prefetched on a CUDA stream")
        if self.low_cpu_mem_usage:
            parts.append("low_cpu_mem_usage")
        return ", ".join(parts) + ")"


@dataclass(frozen=True)
class OffloadGroups:
    """The groups diffusers' group offloading forms for a module, with their weight bytes.

    Attributes:
        groups: ``(name, bytes)`` of every offloaded group, in module order (``"blocks.3"``, or
            ``"blocks.0-1"`` with several blocks per group).
        top_level_bytes: weights that are not in any group (embedders, final norm and projection, loose parameters):
            diffusers onloads them for the whole forward of the module.
        total_bytes: all weights of the module.
        group_gradient_bytes: per group (in the order of ``groups``), the gradients of its trainable parameters.
        top_level_gradient_bytes: the gradients of the top level's trainable parameters.
    """

    groups: tuple[tuple[str, int], ...]
    top_level_bytes: int
    total_bytes: int
    group_gradient_bytes: tuple[int, ...] = ()
    top_level_gradient_bytes: int = 0

    def device_gradient_bytes(self) -> int:
        """Gradient bytes on the device during a training step's backward through offloaded blocks: the top level's,
        plus those of the group being recomputed (each group's gradients travel with its weights, see
        :func:`onloaded`)."""
        return self.top_level_gradient_bytes + max(self.group_gradient_bytes, default=0)

    @property
    def largest(self) -> tuple[str, int]:
        return max(self.groups, key=lambda item: item[1]) if self.groups else ("", 0)

    def resident_bytes(self, use_stream: bool) -> int:
        """Device bytes of weights during a forward: the top-level group plus one group, or two with streams.

        With a side stream the next group is copied while the current one computes, so two groups are on the device
        at once; the largest group counted twice bounds any pair. (The top-level group is onloaded on entry and
        offloaded on exit of the module's forward.)
        """
        return self.top_level_bytes + (2 if use_stream else 1) * self.largest[1]

    def describe(self, use_stream: bool) -> str:
        name, nbytes = self.largest
        if not self.groups:
            return f"one group of {_gib(self.top_level_bytes)} (the whole module)"
        times = "2 x " if use_stream else ""
        return (f"{times}{name} ({_gib(nbytes)}) + top level ({_gib(self.top_level_bytes)}) = "
                f"{_gib(self.resident_bytes(use_stream))} of {_gib(self.total_bytes)} "
                f"({len(self.groups)} groups)")


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct tensors (shared/tied parameters counted once); works on fake and meta tensors."""
    seen: dict[int, int] = {}
    for tensor in tensors:
        seen.setdefault(id(tensor), tensor.numel() * tensor.element_size())
    return sum(seen.values())


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers."""
    return tensor_bytes([*module.parameters(), *module.buffers()])


def offload_groups(module: torch.nn.Module, offload_type: str = "block_level",
                   num_blocks_per_group: int = 1) -> OffloadGroups:
    """The groups ``apply_group_offloading(module, offload_type=..., num_blocks_per_group=...)`` will form.

    Mirrors diffusers' grouping (``_apply_group_offloading_block_level`` / ``_leaf_level``): at block level each
    ``ModuleList``/``Sequential`` child is cut into groups, children named in ``module._group_offload_block_modules``
    are recursed into, everything else at a level is that level's top-level group (counted as resident for the
    whole forward). At leaf level each Linear/Conv/Embedding is a group and parameters held directly by other
    modules are small groups of their own (counted with the top level here).
    """
    total = module_bytes(module)
    groups: list[tuple[str, int]] = []
    gradients: list[int] = []

    def add(name: str, tensors: list[torch.Tensor]) -> None:
        groups.append((name, tensor_bytes(tensors)))
        gradients.append(_gradient_bytes(tensors))

    def result(grouped_ids: set[int]) -> OffloadGroups:
        rest = [t for t in [*module.parameters(), *module.buffers()] if id(t) not in grouped_ids]
        return OffloadGroups(tuple(groups), tensor_bytes(rest), total, tuple(gradients), _gradient_bytes(rest))

    if offload_type == "leaf_level":
        grouped: set[int] = set()
        for name, sub in module.named_modules():
            if isinstance(sub, _LEAF_TYPES):
                tensors = [*sub.parameters(), *sub.buffers()]
                add(name, tensors)
                grouped.update(id(t) for t in tensors)
        return result(grouped)
    if offload_type != "block_level":
        raise ValueError(f"offload_type must be 'block_level' or 'leaf_level', got {offload_type!r}")

    grouped_ids: set[int] = set()

    def visit(parent: torch.nn.Module, prefix: str) -> None:
        block_modules = set(getattr(module, "_group_offload_block_modules", None) or ())
        for name, child in parent.named_children():
            if name in block_modules:
                visit(child, f"{prefix}{name}.")
            elif isinstance(child, (torch.nn.ModuleList, torch.nn.Sequential)):
                for start in range(0, len(child), num_blocks_per_group):
                    members = list(child)[start:start + num_blocks_per_group]
                    tensors = [t for m in members for t in (*m.parameters(), *m.buffers())]
                    last = start + len(members) - 1
                    label = f"{prefix}{name}.{start}" + (f"-{last}" if last != start else "")
                    add(label, tensors)
                    grouped_ids.update(id(t) for t in tensors)

    visit(module, "")
    return result(grouped_ids)


def _gradient_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the gradients of the distinct tensors among ``tensors`` that require grad (trainable parameters)."""
    return tensor_bytes(t for t in tensors if t.requires_grad)


# ------------------------------------------------------------------------------------------------ checks
def check_not_offloaded_or_parallel(module: torch.nn.Module, name: str = "") -> None:
    """Raise ``ValueError`` when ``module`` is already offloaded (accelerate or diffusers) or context/tensor parallel.

    memopt plans the device memory of a model itself; a second offloading mechanism underneath would make both its
    plan and the other mechanism's assumptions wrong, and a parallel model already splits its sequence/weights
    across GPUs (see :func:`memopt.apply_memory_optimizations` for how the two relate).
    """
    label = name or type(module).__name__
    if getattr(module, "_parallel_config", None) is not None:
        raise ValueError(
            f"{label} is already parallel (diffusers `enable_parallelism`, `_parallel_config` is set); memopt's "
            "sequential chunking is the single-GPU counterpart of context/tensor parallelism and does not run on top "
            "of it. Build the model without `enable_parallelism` to use memopt, or keep the parallel setup without it."
        )
    for path, sub in module.named_modules():
        where = f"{label}.{path}" if path else label
        if hasattr(sub, "_hf_hook"):
            raise ValueError(
                f"{where} already has an accelerate hook ({type(sub._hf_hook).__name__}: enable_model_cpu_offload, "
                "enable_sequential_cpu_offload or a device_map); call `pipe.remove_all_hooks()` (or accelerate's "
                "`remove_hook_from_module(model, recurse=True)`) first, memopt plans offloading itself"
            )
        registry = getattr(sub, "_diffusers_hook", None)
        hooks = list(registry.hooks) if registry is not None else []
        if any(hook.startswith(_CONTEXT_PARALLEL_HOOK_PREFIXES) for hook in hooks):
            raise ValueError(f"{where} has diffusers context-parallel hooks ({hooks}); memopt does not run on a "
                             "context-parallel model")
        if any(hook in GROUP_OFFLOADING_HOOKS for hook in hooks) and placement(module) is None:
            raise ValueError(f"{where} already has diffusers group offloading (hooks {hooks}); memopt plans "
                             "offloading itself: load the model again (or remove those hooks) before applying memopt")
    if any(_is_dtensor(param) for param in module.parameters()):
        raise ValueError(f"{label} holds DTensor parameters (tensor parallel); memopt does not run on a sharded model")


def _is_dtensor(tensor: torch.Tensor) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


# ------------------------------------------------------------------------------------------------ placement
@dataclass(frozen=True)
class Placement:
    """Where a module was before memopt moved it, and how it is offloaded now (``None``: resident on a device)."""

    original_device: torch.device
    offload: OffloadConfig | None = None


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of the module's first parameter or buffer (CPU for a module without tensors)."""
    for tensor in [*module.parameters(), *module.buffers()]:
        return tensor.device
    return torch.device("cpu")


def placement(module: torch.nn.Module) -> Placement | None:
    """The :class:`Placement` memopt recorded on ``module``, or ``None`` if memopt has not moved it."""
    return module.__dict__.get(_STATE_ATTR)


def apply_offloading(module: torch.nn.Module, config: OffloadConfig) -> None:
    """Offload ``module`` with diffusers' group offloading; call it *after* memopt's chunking hooks (see module doc).

    The module's current device is remembered (across re-applications) so :func:`remove_offloading` can put it back.
    """
    previous = placement(module)
    if previous is not None and previous.offload is not None:
        raise ValueError(f"{type(module).__name__} is already offloaded by memopt; call remove_offloading() first")
    original = previous.original_device if previous is not None else module_device(module)
    apply_group_offloading(
        module,
        onload_device=torch.device(config.onload_device),
        offload_device=torch.device("cpu"),
        offload_type=config.offload_type,
        num_blocks_per_group=config.num_blocks_per_group,
        non_blocking=config.use_stream,
        use_stream=config.use_stream,
        record_stream=config.record_stream,
        low_cpu_mem_usage=config.low_cpu_mem_usage,
    )
    module.__dict__[_STATE_ATTR] = Placement(original, config)


def place_on(module: torch.nn.Module, device: str | torch.device) -> None:
    """Keep ``module`` resident on ``device`` (removing memopt's offloading of it, if any), remembering where it was."""
    previous = placement(module)
    original = previous.original_device if previous is not None else module_device(module)
    if previous is not None and previous.offload is not None:
        remove_group_offloading_hooks(module)
    module.to(device)
    module.__dict__[_STATE_ATTR] = Placement(original, None)


def remove_offloading(module: torch.nn.Module, restore: bool = True) -> Placement | None:
    """Undo :func:`apply_offloading` / :func:`place_on`; return the placement that was undone (``None``: nothing).

    With ``restore`` the module goes back to the device it had before memopt moved it and memopt forgets it;
    without, only the offloading hooks are removed (the weights stay on the CPU) and the original device is kept,
    so the caller can add hooks underneath and :func:`apply_offloading` again.
    """
    state = placement(module)
    if state is None:
        return None
    if state.offload is not None:
        remove_group_offloading_hooks(module)
    if restore:
        module.to(state.original_device)
        del module.__dict__[_STATE_ATTR]
    else:
        module.__dict__[_STATE_ATTR] = Placement(state.original_device, None)
    return state


def remove_group_offloading_hooks(module: torch.nn.Module) -> None:
    """Remove diffusers' group offloading hooks from ``module`` and its submodules (weights stay where they are).

    diffusers has no public undo for ``apply_group_offloading``; this is it, for memopt's own offloading and for
    benchmarks that compare with diffusers' (outermost hook first on each module, see :func:`memopt.api`).
    """
    for sub in module.modules():
        registry = getattr(sub, "_diffusers_hook", None)
        if registry is None:
            continue
        for name in reversed(list(registry._hook_order)):
            if name in GROUP_OFFLOADING_HOOKS:
                remove_hook(sub, name)


def has_group_offloading(module: torch.nn.Module) -> bool:
    return any(offloading_group(sub) is not None for sub in module.modules())


# ------------------------------------------------------------------------------------------------ backward
def offloading_group(module: torch.nn.Module) -> ModuleGroup | None:
    """The diffusers ``ModuleGroup`` whose hook sits on ``module`` itself (``None``: not group-offloaded there)."""
    registry = getattr(module, "_diffusers_hook", None)
    hook = registry.get_hook("group_offloading") if isinstance(registry, HookRegistry) else None
    return hook.group if hook is not None else None


def _group_parameters(group: ModuleGroup) -> list[torch.nn.Parameter]:
    unique = {id(p): p for m in group.modules for p in m.parameters()} | {id(p): p for p in group.parameters}
    return list(unique.values())


def _gradients_follow(group: ModuleGroup) -> None:
    """Move each trainable parameter's ``.grad`` to where the parameter now is.

    diffusers moves a group by swapping ``param.data`` (with a stream: to the pinned host copy and back), which
    leaves ``.grad`` behind; an optimizer step would then meet a host parameter with a device gradient, and the next
    backward would accumulate a device gradient into a host one. Gradients therefore travel with their parameters,
    as ``nn.Module.to`` moves them (which diffusers uses without a stream).
    """
    for param in _group_parameters(group):
        if param.grad is not None and param.grad.device != param.device:
            param.grad = param.grad.to(param.device)


def _onload(group: ModuleGroup) -> None:
    group.onload_()
    if group.stream is not None:
        group.stream.synchronize()  # the copies ran on the side stream: done before the compute reads them
    _gradients_follow(group)


def _offload(group: ModuleGroup) -> None:
    group.offload_()
    _gradients_follow(group)


@contextlib.contextmanager
def onloaded(module: torch.nn.Module) -> Iterator[None]:
    """``module``'s offloading group on its onload device for the duration, offloaded again after (nothing when
    ``module`` carries no group offloading hook).

    For a backward that reruns an offloaded block: diffusers' hooks onload a group when its forward is called and
    offload it when that returns, so by the backward every block is back on the host. memopt's chunked training
    (``apply_sequence_chunking(..., training=True)``) recomputes each block inside its backward and onloads it here
    for that (synchronously: a block's backward at a size worth offloading takes far longer than its copy). The
    parameters' gradients come and go with them (:func:`_gradients_follow`).
    """
    group = offloading_group(module)
    if group is None:
        yield
        return
    _onload(group)
    try:
        yield
    finally:
        _offload(group)


def onloaded_for_backward(module: torch.nn.Module, output: Any) -> Any:
    """``output`` with its tensors passed through a node whose backward onloads ``module``'s group (the top-level
    group of block-level offloading: embedders, output head) and offloads it again when that backward pass ends.

    The backward starts at the model's output, so the output head's weights, which autograd saved as the parameters
    themselves, are back on the device before any of its gradients are computed. The node returns copies (the size of
    the model's prediction, a small fraction of one hidden state): views would refuse the caller's in-place ops, and a
    hook on the output tensor would be bypassed by an in-place op on it when it is a view (an unpatchified
    prediction).
    """
    group = offloading_group(module)
    if group is None:
        return output
    flat, spec = tree_flatten(output)
    positions = [i for i, value in enumerate(flat) if isinstance(value, torch.Tensor) and value.requires_grad]
    if not positions:
        return output
    copies = _OnloadInBackward.apply(group, *(flat[i] for i in positions))
    for position, tensor in zip(positions, copies):
        flat[position] = tensor
    return tree_unflatten(flat, spec)


class _OnloadInBackward(torch.autograd.Function):
    """Copies its inputs; its backward onloads a group and queues the group's offload for the end of the backward."""

    @staticmethod
    def forward(ctx: Any, group: ModuleGroup, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.group = group
        return tuple(tensor.clone() for tensor in tensors)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        group: ModuleGroup = ctx.group
        if not getattr(group, _ONLOADED_FOR_BACKWARD, False):  # the model called twice before one backward
            setattr(group, _ONLOADED_FOR_BACKWARD, True)
            _onload(group)

            def offload() -> None:
                setattr(group, _ONLOADED_FOR_BACKWARD, False)
                _offload(group)

            torch.autograd.Variable._execution_engine.queue_callback(offload)
        return (None, *grads)


_ONLOADED_FOR_BACKWARD = "_memopt_onloaded_for_backward"


# ------------------------------------------------------------------------------------------------ VAE
@dataclass(frozen=True)
class _VaeState:
    use_tiling: bool | None
    use_slicing: bool | None


def apply_vae_tiling(vae: torch.nn.Module) -> str | None:
    """Turn on diffusers' tiled (and, where the VAE has it, sliced) decoding; return what was enabled, or ``None``.

    Tiling decodes overlapping spatial tiles and blends them, which bounds the decoder's activations by the tile size
    instead of the frame size (the VAE decode is the step that runs out of memory at 720p, Wan-Video/Wan2.2#42). The
    blend makes decoded pixels differ slightly from an untiled decode above the tile size. diffusers' flag tiles the
    encoder too, so the latents of a conditioning image or video a pipeline encodes (image-to-video, editing) differ
    likewise, and with them the denoiser's output; a text-to-image or text-to-video pipeline's latents are unaffected.
    Slicing decodes one sample of the batch at a time and is exact.
    """
    if hasattr(vae, _VAE_STATE_ATTR):
        raise ValueError(f"{type(vae).__name__} already has memopt's VAE settings; remove them first")
    state = _VaeState(getattr(vae, "use_tiling", None), getattr(vae, "use_slicing", None))
    enabled = []
    if state.use_tiling is not None and hasattr(vae, "enable_tiling"):
        vae.enable_tiling()
        enabled.append("tiling")
    if state.use_slicing is not None and hasattr(vae, "enable_slicing"):
        vae.enable_slicing()
        enabled.append("slicing")
    if not enabled:
        return None
    vae.__dict__[_VAE_STATE_ATTR] = state
    return " + ".join(enabled)


def remove_vae_tiling(vae: torch.nn.Module) -> bool:
    """Restore the tiling/slicing flags :func:`apply_vae_tiling` changed; ``True`` if there was anything to restore."""
    state = vae.__dict__.pop(_VAE_STATE_ATTR, None)
    if state is None:
        return False
    if state.use_tiling is not None:
        vae.use_tiling = state.use_tiling
    if state.use_slicing is not None:
        vae.use_slicing = state.use_slicing
    return True


def _gib(nbytes: int | float) -> str:
    from ..planner import format_bytes  # planner imports this module

    return format_bytes(nbytes)
