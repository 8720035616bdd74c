"""The one-line entry points: apply memopt to a pipeline or a model, planned to a memory budget, and remove it again.

What :func:`apply_memory_optimizations` does with each component of a ``DiffusionPipeline``:

* **denoisers** (``transformer``, ``transformer_2``, ``unet``, and diffusers transformers and UNets under other
  names, such as Ideogram 4's ``unconditional_transformer``): offloaded at once with diffusers' block-level group
  offloading (next block prefetched on a CUDA stream), so the pipeline already computes on the GPU; at the first
  forward, when the input shapes are known, :func:`memopt.planner.plan_denoiser` simulates the denoiser at those
  shapes and chooses sequence chunking / FeedForward shards and whether it may stay resident instead, so that the
  predicted peak fits the budget at the least predicted slowdown. The chunking hooks go *under* the offloading
  hooks: a block's weights are onloaded once and serve every chunk of both passes. A later call with larger inputs
  (a higher resolution, more frames, a longer prompt) is planned again before it runs: a plan holds for the inputs
  it was made for and smaller ones.
* **ControlNets** (``controlnet``, or each net of a multi-ControlNet), which run once per step too: like a denoiser,
  planned at their first forward (their residuals then count among the denoiser's inputs); one whose forward cannot
  be simulated runs as placed, with a warning, instead of failing the pipeline.
* **text and image encoders** (transformers models): resident when everything fits easily, else offloaded whole
  (onloaded for their one forward per prompt), else offloaded layer by layer (leaf-level group offloading).
* **the VAE**: diffusers' tiled (and sliced) encoding and decoding, resident. Tiles are blended, so above the tile
  size decoded pixels, and the latents of an encoded conditioning image or video (image-to-video, editing), differ
  slightly from an untiled VAE's: the one technique here that is not exact (``vae_tiling=False`` keeps them so).
* anything else small stays on the device.

Without CUDA nothing is moved (offloading is skipped with a message) and chunking is still planned and applied.

For training (``training=True``) the denoisers are planned for a training step: the unmodified model, diffusers'
gradient checkpointing or memopt's sequence chunks recomputed chunk by chunk in the backward (on CUDA, where nothing
else fits, with the blocks' saved inputs in host memory, and where the weights do not fit either, group-offloaded
with the blocks onloaded again for their backward), whichever is fastest among those that fit
(:func:`memopt.planner.plan_denoiser`).

Multi-GPU: memopt's sequence chunking is the sequential form of context parallelism (the N "ranks" run one after
another and exchange keys/values through full-length buffers). With N GPUs, run the same model with diffusers' own
engine instead, one process per GPU (``torchrun --nproc-per-node=N generate.py``)::

    import torch, torch.distributed as dist
    from diffusers import ContextParallelConfig
    dist.init_process_group(backend="cpu:gloo,cuda:nccl")
    torch.cuda.set_device(dist.get_rank())
    pipe.to("cuda")
    pipe.transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=dist.get_world_size()))
    video = pipe(prompt, height=720, width=1280, num_frames=81).frames   # each rank holds 1/N of the tokens

This needs the model class to declare a ``_cp_plan`` (Wan, Flux, LTX-Video, QwenImage in diffusers 0.42; pass
``cp_plan=`` for others) and an attention backend with context-parallel support (``native``, ``flash``, ``sage``).
Each GPU then holds all the weights and 1/N of the activations; memopt on one GPU holds a few blocks of weights and
about 3 LD of activations at the price of re-running the pre-attention part of every block.
:func:`apply_memory_optimizations` refuses a model that is already context- or tensor-parallel
(``model._parallel_config`` set, diffusers' ``cp_input---``/``cp_output---`` hooks, or DTensor weights): both
answer the same question (where the sequence lives) in different ways and do not stack.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from diffusers import ModelMixin
from diffusers.hooks import ModelHook

from .hooks._common import has_memopt_hooks, register_memopt_hook, remove_hook, remove_memopt_hooks
from .hooks.offload import (
    OffloadConfig,
    apply_offloading,
    apply_vae_tiling,
    check_not_offloaded_or_parallel,
    module_bytes,
    module_device,
    offload_groups,
    place_on,
    placement,
    remove_offloading,
    remove_vae_tiling,
)
from .planner import (
    BudgetError,
    DenoiserPlan,
    DeviceProfile,
    UnplannableError,
    device_gradient_bytes,
    floor_bytes,
    format_bytes,
    input_bytes,
    parse_budget,
    plan_denoiser,
)

logger = logging.getLogger(__name__)

PLAN_HOOK = "memopt.plan"
DENOISER_NAMES = ("transformer", "transformer_2", "unet")
"""Pipeline components memopt treats as denoisers (what runs once per step)."""

DENOISER_CLASS = re.compile(r"Transformer|UNet")
"""A diffusers model whose class name matches this, under a component name other than :data:`DENOISER_NAMES` (and
not a VAE, encoder or ControlNet), runs once per step too and is a denoiser as well: Ideogram 4's
``unconditional_transformer`` (a second full-size transformer, run at every step for the guidance), a Kandinsky
prior pipeline's ``prior``. Treated as "other", it stayed resident, all its weights on the device."""

CONTROLNET_NAME = "controlnet"
"""A pipeline's ControlNet runs once per step too, before the denoiser: offloaded and planned at its first forward
like a denoiser (its residuals are the denoiser's inputs, counted in the denoiser's plan). A multi-ControlNet wrapper
(``MultiControlNetModel`` and the like, built from its nets, not from a config) stands for its nets: each is a
component of its own, ``controlnet.nets.<i>``."""

RESIDENT_FRACTION = 0.5
"""Encoders stay resident when all components' weights fit in this fraction of the budget (the rest is left for the
denoiser's activations); an encoder is offloaded whole when it fits in this fraction, else layer by layer."""

CUDA_RESERVE_FRACTION = 0.05
CUDA_RESERVE_MIN_BYTES = 512 * 1024**2
"""The default CUDA budget keeps this much of the device free (at least 512 MiB, 5% of the device) for the caching
allocator's fragmentation and cuBLAS/attention workspaces, which the tracer does not see."""


def _components(obj: Any) -> dict[str, torch.nn.Module]:
    """The ``nn.Module`` components of a ``DiffusionPipeline`` (or ``{"": module}`` for a bare model)."""
    if isinstance(obj, torch.nn.Module):
        return {"": obj}
    components = getattr(obj, "components", None)
    if not isinstance(components, dict):
        raise TypeError(f"expected a diffusers DiffusionPipeline or a torch.nn.Module, got {type(obj).__name__}")
    modules = {}
    for name, module in components.items():
        nets = getattr(module, "nets", None)
        if name == CONTROLNET_NAME and isinstance(nets, torch.nn.ModuleList) and "Multi" in type(module).__name__:
            modules.update({f"{name}.nets.{index}": net for index, net in enumerate(nets)})
        elif isinstance(module, torch.nn.Module):
            modules[name] = module
    return modules


def _is_controlnet(name: str) -> bool:
    return name == CONTROLNET_NAME or name.startswith(f"{CONTROLNET_NAME}.nets.")


# ------------------------------------------------------------------------------------------------ the plan
@dataclass
class ComponentPlan:
    """What memopt does with one component.

    Attributes:
        name: the pipeline attribute (``"transformer"``; ``""`` for a bare model).
        kind: ``"denoiser"``, ``"encoder"``, ``"vae"`` or ``"other"``.
        weight_bytes: its parameters and buffers.
        action: what was applied, in words.
        offload: the group offloading applied to it (``None``: not offloaded).
        resident: moved to the device and kept there (``False`` with ``offload`` or where nothing moves).
        device_bytes: its weights on the device while other components compute (0 when offloaded).
        working_bytes: what it holds on the device during its own forward.
        denoiser: the denoiser's plan, once made (at the first forward unless sizes were given).
    """

    name: str
    kind: str
    weight_bytes: int
    action: str = ""
    offload: OffloadConfig | None = None
    resident: bool = False
    device_bytes: int = 0
    working_bytes: int = 0
    denoiser: DenoiserPlan | None = None

    def place(self, module: torch.nn.Module, device: torch.device) -> None:
        """Apply the placement decided before any shape is known (offloading, or residency on the device)."""
        if self.offload is not None:
            apply_offloading(module, self.offload)
        elif self.resident:
            place_on(module, device)


@dataclass
class MemoryPlan:
    """What :func:`apply_memory_optimizations` applied; ``print`` it. Denoiser entries are completed in place at the
    first forward (when their input shapes are known) unless sizes were given.

    Attributes:
        device: where the pipeline computes.
        budget_bytes: the device memory planned for.
        budget_source: where the budget came from.
        training: the denoisers are planned for training steps (see :func:`apply_memory_optimizations`).
        components: per component, in pipeline order.
        messages: notes (e.g. offloading skipped without CUDA).
    """

    device: torch.device
    budget_bytes: int
    budget_source: str
    training: bool = False
    components: dict[str, ComponentPlan] = field(default_factory=dict)
    messages: list[str] = field(default_factory=list)

    @property
    def predicted_peak_bytes(self) -> int | None:
        """The largest predicted peak over the planned denoisers (``None`` before any is planned)."""
        peaks = [c.denoiser.predicted_peak_bytes for c in self.components.values() if c.denoiser is not None]
        return max(peaks) if peaks else None

    def __str__(self) -> str:
        lines = [f"memopt plan on {self.device}, budget {format_bytes(self.budget_bytes)} ({self.budget_source})"]
        for component in self.components.values():
            label = component.name or "model"
            lines.append(f"- {label} [{component.kind}, {format_bytes(component.weight_bytes)}]: {component.action}")
            if component.denoiser is not None:
                lines += [f"    {component.denoiser.peak_line()}", f"    {component.denoiser.time_line()}"]
        peak = self.predicted_peak_bytes
        if peak is not None:
            lines.append(f"predicted peak {format_bytes(peak)} of {format_bytes(self.budget_bytes)}")
        lines += [f"note: {message}" for message in self.messages]
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ first-call planning
class PlanForInputsHook(ModelHook):
    """On a denoiser: at its first forward, plan for the actual inputs and apply the plan; at any later forward whose
    tensor inputs are larger than those planned for, plan again (the old plan's peak grows with the tokens). Smaller
    inputs run with the plan as it is.

    Kept outermost: planning takes it out of the chain, rebuilds the chain below (the previous plan's hooks and
    placement removed, chunking hooks added, offloading re-applied on top of them) and registers it again. The size
    check on every call is plain Python on the input shapes, which ``torch.compile`` traces (a guard); planning
    itself runs eagerly.
    """

    def __init__(self, owner: Any, plan: MemoryPlan, name: str, offload: OffloadConfig | None,
                 planned_bytes: int | None = None) -> None:
        super().__init__()
        self.owner = owner
        self.plan = plan
        self.name = name
        self.offload = offload
        self.planned_bytes = planned_bytes  # the tensor inputs the applied plan was made for (None: no plan yet)

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        if self.planned_bytes is None or input_bytes(args, kwargs) > self.planned_bytes:
            return self._plan_and_run(module, args, kwargs)
        return self.fn_ref.original_forward(*args, **kwargs)

    @torch.compiler.disable
    def _plan_and_run(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> Any:
        registry = module._diffusers_hook
        outer = registry._hook_order[registry._hook_order.index(PLAN_HOOK) + 1:]
        stateful = [name for name in outer if registry.hooks[name]._is_stateful]
        if stateful:
            # Planned, the call goes through the whole chain again (its hooks rebuilt): these would count it twice.
            raise ValueError(
                f"{self.name or type(module).__name__} got the hooks {stateful} (a step cache: model.enable_cache) "
                "after apply_memory_optimizations, which plans at the first forward and would run them twice; call "
                "memopt.remove_memory_optimizations, then apply_memory_optimizations after enabling the cache")
        remove_hook(module, PLAN_HOOK)
        component = self.plan.components[self.name]
        if self.planned_bytes is not None:  # the old plan's hooks go, and its placement (weights back where they were)
            logger.info("memopt: %s gets larger inputs than planned for (%s > %s): planning again",
                        self.name or type(module).__name__, format_bytes(input_bytes(args, kwargs)),
                        format_bytes(self.planned_bytes))
            remove_memopt_hooks(module)
            remove_offloading(module)
        other_resident, other_working = _other_device_bytes(self.plan, self.name)
        try:
            denoiser_plan = _isolated(lambda: plan_denoiser(
                module, args, kwargs, self.plan.budget_bytes, self.plan.device, offload=self.offload,
                other_resident_bytes=other_resident, idle_reserve_bytes=other_working, profile=_profile(self.plan),
                training=self.plan.training,
            ))
            _apply_denoiser_plan(module, component, denoiser_plan)
        except UnplannableError as error:
            if not _is_controlnet(self.name):
                remove_memory_optimizations(self.owner)
                raise
            # The denoiser is what the budget is about: the pipeline goes on with the ControlNet as placed.
            if placement(module) is None:  # planning again took the previous plan's placement away
                component.place(module, self.plan.device)
            component.action += "; not planned: its forward cannot be simulated"
            logger.warning("memopt: %s. The ControlNet runs unchunked; its activations are outside the budget.", error)
            return module.forward(*args, **kwargs)
        except BaseException:
            remove_memory_optimizations(self.owner)  # nothing fits (BudgetError) or planning failed: undo all
            raise
        self.planned_bytes = input_bytes(args, kwargs)
        register_memopt_hook(module, self, PLAN_HOOK)
        return module.forward(*args, **kwargs)


def _isolated(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` in a fresh thread: the planner's simulation must not be seen by a ``trace_memory`` (or a fake
    mode) active around the first forward. Both are thread-local; the planner's tracer and fake mode are its own."""
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["value"] = fn()
        except BaseException as error:  # re-raised in the caller's thread
            result["error"] = error

    thread = threading.Thread(target=target, name="memopt-planner")
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["value"]


def _profile(plan: MemoryPlan) -> DeviceProfile:
    if plan.device.type == "cuda" and torch.cuda.is_available():
        return DeviceProfile.measure(plan.device)
    return DeviceProfile.defaults(plan.device)


def _other_device_bytes(plan: MemoryPlan, name: str) -> tuple[int, int]:
    """Other components' weights on the device meanwhile, and the largest working set of another offloaded one."""
    others = [c for key, c in plan.components.items() if key != name]
    resident = sum(c.device_bytes for c in others)
    working = max((c.working_bytes - c.device_bytes for c in others), default=0)
    return resident, working


def _apply_denoiser_plan(module: torch.nn.Module, component: ComponentPlan, plan: DenoiserPlan) -> None:
    if placement(module) is not None:
        remove_offloading(module, restore=False)  # chunking hooks must go under the offloading hooks
    plan.apply(module)
    component.denoiser = plan
    component.offload, component.resident = plan.offload, plan.move_to_device
    component.action = f"{plan.chunking.describe()}; {plan.describe_placement()}"
    component.device_bytes = plan.weight_bytes if plan.offload is None else 0
    component.working_bytes = plan.predicted_peak_bytes - plan.other_resident_bytes


# ------------------------------------------------------------------------------------------------ apply / remove
def apply_memory_optimizations(
    pipe_or_model: Any,
    budget: int | str | None = None,
    *,
    device: str | torch.device | None = None,
    height: int | None = None,
    width: int | None = None,
    num_frames: int | None = None,
    batch_size: int = 1,
    vae_tiling: bool = True,
    training: bool = False,
) -> MemoryPlan:
    """Plan and apply memopt to a ``DiffusionPipeline`` or a bare diffusers denoiser so it fits ``budget``.

    Args:
        pipe_or_model: a pipeline (components are found in ``pipe.components``) or a denoiser model.
        budget: device memory for the whole pipeline, in bytes or as ``"8GiB"`` / ``"8GB"``. Default: the free
            memory of the device plus what the pipeline already holds there, less a reserve
            (:data:`CUDA_RESERVE_MIN_BYTES`); on the CPU, the available host RAM plus the weights already in it.
        device: where to compute (default ``cuda`` when available, else ``cpu``, where nothing is moved).
        height, width, num_frames: plan now for this generation size (a family memopt knows is needed); by default
            each denoiser is planned at its first forward, from the shapes it is called with.
        batch_size: the denoiser's batch for ``height``/``width`` planning (2 for pipelines that batch CFG).
        vae_tiling: turn on the VAE's tiled/sliced decoding (and encoding: diffusers' flag covers both). Not exact
            above the tile size: decoded pixels, and the latents of a conditioning image or video the pipeline
            encodes, differ slightly from an untiled VAE's (Wan image-to-video at 256x448: latents rel err 2.9e-3,
            as with diffusers' own ``enable_tiling``). ``False`` keeps every output identical to the unoptimized
            pipeline's.
        training: plan the denoisers for training steps (the forward with autograd, then ``loss.backward()``) instead
            of forwards: the planner chooses, by a simulated step, the fastest of the unmodified model, diffusers'
            gradient checkpointing and memopt's sequence chunks recomputed chunk by chunk in the backward
            (``apply_sequence_chunking(training=True)``; on CUDA, where nothing else fits, with the blocks' saved
            inputs in host memory, and, where the weights do not fit either, with the blocks group-offloaded: each
            block is onloaded again for its backward) that fits. The gradients of the trainable parameters count in
            the budget (offloaded, a block's travel with its weights: an optimizer then steps those parameters on
            the host); an optimizer's state does not: the default budget leaves room for Adam's (two fp32 values
            per trainable parameter), a given one is for the step alone.

    Returns:
        A :class:`MemoryPlan`; ``print(plan)`` shows per component what was applied and the predicted peak (the
        denoiser lines appear after the first forward when planning at the first call).

    Raises:
        ValueError: an unreadable budget, a budget below the floor (the weights that must be on the device), a
            pipeline without a denoiser, a component already offloaded (accelerate ``_hf_hook`` or diffusers group
            offloading) or parallel, or memopt already applied. :class:`memopt.planner.BudgetError` (a
            ``ValueError``) when no plan fits at the given size; at the first forward it is raised from the
            pipeline call, after memopt has removed itself. Nothing is changed when an error is raised.
        TypeError: not a pipeline or a module.

    Example::

        import memopt
        plan = memopt.apply_memory_optimizations(pipe, budget="8GiB")
        video = pipe(prompt, height=720, width=1280, num_frames=81).frames   # planned at the first step
        print(plan)
        memopt.remove_memory_optimizations(pipe)
    """
    components = _components(pipe_or_model)
    denoisers = _denoisers(pipe_or_model, components)
    for name, module in components.items():
        label = name or type(module).__name__
        if has_memopt_hooks(module) or placement(module) is not None:
            raise ValueError(f"{label} already has memopt applied; call memopt.remove_memory_optimizations() first")
        check_not_offloaded_or_parallel(module, label)
    sizes = (height, width, num_frames)
    if any(size is not None for size in sizes) and (height is None or width is None):
        raise ValueError(f"give both height and width to plan for a size (got height={height}, width={width})")
    device = _device(device)
    budget_bytes, source = _budget(budget, device, components)
    if training and budget is None:
        state = sum(8 * param.numel() for name in denoisers for param in components[name].parameters()
                    if param.requires_grad)
        budget_bytes -= state
        source += f" - Adam's state of the trainable parameters {format_bytes(state)}"
    movable = device.type != "cpu"
    plan = MemoryPlan(device, budget_bytes, source, training)
    if not movable:
        message = "no CUDA device: offloading skipped, weights stay where they are; chunking is planned and applied"
        plan.messages.append(message)
        logger.warning("memopt: %s", message)

    _plan_components(plan, components, denoisers, movable)
    _check_floor(plan, components, denoisers)
    explicit = {}
    if height is not None:
        for name in denoisers:  # plans (and may raise) before anything is changed
            if not _is_controlnet(name):  # no family spec makes a ControlNet's inputs: planned at its first forward
                explicit[name] = _plan_for_size(components[name], plan, name, height, width, num_frames, batch_size)
    try:
        for name, module in components.items():
            entry = plan.components[name]
            if name in explicit:  # planned now; planned again at a call with larger inputs than those simulated
                hook = PlanForInputsHook(pipe_or_model, plan, name, entry.offload, explicit[name].input_bytes)
                _apply_denoiser_plan(module, entry, explicit[name])
                register_memopt_hook(module, hook, PLAN_HOOK)
                continue
            entry.place(module, device)
            if name in denoisers:
                register_memopt_hook(module, PlanForInputsHook(pipe_or_model, plan, name, entry.offload), PLAN_HOOK)
                entry.action += "; chunking planned at the first forward" + (" for training" if plan.training else "")
            if vae_tiling and entry.kind == "vae":
                tiling = apply_vae_tiling(module)
                if tiling:
                    entry.action += f"; {tiling}"
                    if "tiling" in tiling:
                        plan.messages.append(
                            f"{name or 'vae'}: tiled encoding and decoding change decoded pixels and encoded "
                            "conditioning latents slightly above the tile size; vae_tiling=False keeps them exact")
    except BaseException:
        remove_memory_optimizations(pipe_or_model)
        raise
    return plan


def remove_memory_optimizations(pipe_or_model: Any) -> int:
    """Undo memopt on a pipeline's components or on a model; return how many memopt hooks were removed.

    memopt's hooks are spliced out of diffusers' ``HookRegistry`` chains (other hooks stay), the group offloading
    memopt applied is removed and every module memopt moved goes back to its original device, and VAE tiling/slicing
    flags are restored, so outputs are bit-identical to before ``apply_*``.
    """
    removed = 0
    for module in _components(pipe_or_model).values():
        removed += remove_memopt_hooks(module)
        remove_offloading(module)
        remove_vae_tiling(module)
    return removed


# ------------------------------------------------------------------------------------------------ helpers
def _denoisers(obj: Any, components: dict[str, torch.nn.Module]) -> list[str]:
    if isinstance(obj, torch.nn.Module):
        if not hasattr(obj, "config") or not hasattr(type(obj), "from_config"):
            raise TypeError(f"{type(obj).__name__} is not a diffusers model (memopt simulates it from its config); "
                            "pass a diffusers transformer or a DiffusionPipeline")
        return [""]
    found = [name for name in DENOISER_NAMES if name in components]
    found += [name for name, module in components.items() if name not in found and _runs_per_step(name, module)]
    if not found:
        raise ValueError(f"{type(obj).__name__} has no denoiser (none of {list(DENOISER_NAMES)} among its components "
                         f"{sorted(components)}); memopt plans around the denoiser")
    return found + [name for name in components if _is_controlnet(name)]


def _runs_per_step(name: str, module: torch.nn.Module) -> bool:
    """A diffusers transformer or UNet under another component name (see :data:`DENOISER_CLASS`)."""
    return (isinstance(module, ModelMixin) and DENOISER_CLASS.search(type(module).__name__) is not None
            and not _is_controlnet(name) and _kind(name, module, []) == "other")


def _device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device} requested but CUDA is not available")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device


def _budget(budget: int | str | None, device: torch.device, components: dict[str, torch.nn.Module]) -> tuple[int, str]:
    if budget is not None:
        return parse_budget(budget), "given"
    held = sum(module_bytes(m) for m in components.values() if module_device(m) == device)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        reserve = max(CUDA_RESERVE_MIN_BYTES, int(CUDA_RESERVE_FRACTION * total))
        return free + held - reserve, (f"free memory of {device} {format_bytes(free)} + the pipeline's "
                                       f"{format_bytes(held)} there - {format_bytes(reserve)} reserve")
    available = available_host_bytes()
    return available + held, f"available host RAM {format_bytes(available)} + the weights already in it"


def available_host_bytes() -> int:
    """MemAvailable from /proc/meminfo (Linux), else free physical pages."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _kind(name: str, module: torch.nn.Module, denoisers: list[str]) -> str:
    if name in denoisers:
        return "denoiser"
    if "vae" in name or hasattr(module, "use_tiling"):
        return "vae"
    try:
        from transformers import PreTrainedModel
    except ImportError:  # transformers is optional at runtime
        PreTrainedModel = ()
    if isinstance(module, PreTrainedModel) or "encoder" in name:
        return "encoder"
    return "other"


def _plan_components(plan: MemoryPlan, components: dict[str, torch.nn.Module], denoisers: list[str],
                     movable: bool) -> None:
    """Decide, from the weights alone, where every component lives; fill ``plan.components``."""
    device = plan.device
    host_free = available_host_bytes()
    denoiser_bytes = sum(module_bytes(components[name]) for name in denoisers)
    total = sum(module_bytes(m) for m in components.values())
    all_resident = total <= RESIDENT_FRACTION * plan.budget_bytes
    for name, module in components.items():
        kind = _kind(name, module, denoisers)
        weights = module_bytes(module)
        entry = ComponentPlan(name, kind, weights)
        plan.components[name] = entry
        if not movable:
            entry.action = f"stays on {module_device(module)}"
            entry.device_bytes = entry.working_bytes = weights
        elif kind == "denoiser":
            # Offloaded now so the pipeline computes on the device from its first step; the first forward may make
            # it resident instead. Pinned host copies need about the model's size of free host RAM. (Training too:
            # memopt's recorded blocks onload their weights again for their backward.)
            entry.offload = OffloadConfig(device, "block_level", 1, use_stream=device.type == "cuda",
                                          low_cpu_mem_usage=host_free < 1.1 * denoiser_bytes)
            entry.action = entry.offload.describe()
            entry.working_bytes = offload_groups(module).resident_bytes(entry.offload.use_stream)
        elif kind == "encoder" and not all_resident:
            whole = weights <= RESIDENT_FRACTION * plan.budget_bytes
            stream = device.type == "cuda" and not whole
            entry.offload = OffloadConfig(device, "block_level" if whole else "leaf_level", 1, use_stream=stream,
                                          low_cpu_mem_usage=stream and host_free < 1.1 * (weights + denoiser_bytes))
            entry.action = ("offloaded, onloaded for its forward: " if whole else "") + entry.offload.describe()
            groups = offload_groups(module, entry.offload.offload_type)
            entry.working_bytes = groups.resident_bytes(entry.offload.use_stream)
        else:
            entry.action = f"resident on {device}"
            entry.resident = True
            entry.device_bytes = entry.working_bytes = weights


def _check_floor(plan: MemoryPlan, components: dict[str, torch.nn.Module], denoisers: list[str]) -> None:
    """Refuse a budget the weights alone cannot fit in, before changing anything: during each component's forward,
    the other components' resident weights plus its own working set (a denoiser's smallest one) must fit."""
    for name, entry in plan.components.items():
        other_resident = sum(c.device_bytes for key, c in plan.components.items() if key != name)
        if name in denoisers:
            working, what = floor_bytes(components[name], entry.offload)
            if plan.training:
                gradients = device_gradient_bytes(components[name], entry.offload)
                working += gradients
                what += f" + the gradients of its trainable parameters ({format_bytes(gradients)})"
        else:
            working, what = entry.working_bytes, f"{entry.action} ({format_bytes(entry.working_bytes)})"
        floor = other_resident + working
        if floor > plan.budget_bytes:
            label = name or type(components[name]).__name__
            others = f" + other components on the device {format_bytes(other_resident)}" if other_resident else ""
            raise BudgetError(
                f"the budget {format_bytes(plan.budget_bytes)} is below the floor of {format_bytes(floor)} for "
                f"{label}: weights that must be on the device during its forward: {what}{others}; activations come "
                "on top"
            )


def _plan_for_size(model: torch.nn.Module, plan: MemoryPlan, name: str, height: int, width: int,
                   num_frames: int | None, batch_size: int) -> DenoiserPlan:
    from .models import get_family
    from .planner import model_dtype
    from .trace.simulate import small_inputs_real

    try:
        family = get_family(model)
    except ValueError as error:
        raise ValueError(f"planning for height/width needs a model family memopt knows ({error}); omit the sizes to "
                         "plan at the first forward instead") from error
    # Fake latents and text states (nothing allocated), real masks and timesteps: some forwards read their values.
    inputs = small_inputs_real(lambda: family.make_inputs(model.config, batch_size=batch_size, height=height,
                                                          width=width, num_frames=num_frames,
                                                          dtype=model_dtype(model)))
    other_resident, other_working = _other_device_bytes(plan, name)
    return _isolated(lambda: plan_denoiser(model, (), inputs, plan.budget_bytes, plan.device,
                                           offload=plan.components[name].offload, other_resident_bytes=other_resident,
                                           idle_reserve_bytes=other_working, profile=_profile(plan),
                                           training=plan.training))
