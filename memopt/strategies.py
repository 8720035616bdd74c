"""The strategies ``memopt-bench`` compares, as data: name -> how to apply it to a freshly built model.

A strategy is the unmodified model (``baseline``), one of diffusers' own memory options, or one of memopt's. Each entry
says what it needs (a CUDA device, real tensors, a memopt module) so the benchmark can report "unavailable: <reason>"
for a strategy that cannot run here instead of crashing, and every strategy is applied to a model built from the same
seed, so outputs can be compared with the baseline's.

Example::

    import torch
    import memopt
    from memopt.strategies import StrategyContext, get_strategies
    from memopt.models import get_family
    spec = get_family("wan")
    model = spec.build("tiny")
    context = StrategyContext(device=torch.device("cpu"), tokens=spec.num_tokens(model.config, spec.size("tiny")))
    for strategy in get_strategies("baseline,ffn-hidden,kernel"):
        reason = strategy.unavailable_reason(context)
        if reason:
            print(strategy.name, "unavailable:", reason)       # kernel: needs a CUDA device ...
            continue
        print(strategy.name, strategy.apply(model, context))   # ffn-hidden: the FeedForward report
        memopt.remove_memory_optimizations(model)
"""

from __future__ import annotations

import importlib
import importlib.util
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

CUDA = "cuda"
"""Requirement: a CUDA device (``--device cuda``)."""
REAL = "real"
"""Requirement: real tensors, i.e. not ``--simulate`` (offloading moves real weights between devices)."""
TRAINING = "training"
"""Requirement: a training step (``--training``): the strategy only changes what autograd keeps for the backward."""
INFERENCE = "inference"
"""Requirement: a forward without autograd (not ``--training``)."""


class StrategyUnavailable(Exception):
    """Raised by an ``apply`` function when the strategy cannot run on this model or device; the message says why."""


@dataclass(frozen=True)
class StrategyContext:
    """What an ``apply`` function may need to know besides the model.

    Attributes:
        device: the device the forward runs on (``cpu`` under ``--simulate``: fake tensors carry no data).
        tokens: number of image/video tokens of the run (per sample), to size chunks for small runs.
        simulate: ``True`` when the model holds fake tensors (``FakeTensorMode``).
        num_chunks: user override of the chunk count for the chunked strategies (``None``: each strategy's default).
        height, width, num_frames, batch_size: the generation size, so ``all`` plans for it when applied (planning
            at the first forward would simulate inside the benchmark's own trace).
        budget: device memory the ``all`` strategy plans for (bytes or ``"24GiB"``; ``None``: memopt's default).
        training: the run measures a training step (forward with autograd, then backward) instead of a forward.
    """

    device: torch.device
    tokens: int
    simulate: bool = False
    num_chunks: int | None = None
    height: int | None = None
    width: int | None = None
    num_frames: int | None = None
    batch_size: int = 1
    budget: int | str | None = None
    training: bool = False


ApplyFn = Callable[[torch.nn.Module, StrategyContext], Any]


@dataclass(frozen=True)
class Strategy:
    """One row of the benchmark.

    Attributes:
        name: what ``--strategies`` accepts (``"ffn-hidden"``).
        description: one line for ``--list`` and the summary files.
        apply: ``(model, context) -> report`` changes the model in place (hooks, offloading); the report (any object,
            may be ``None``) is shown in the summary. Raises :class:`StrategyUnavailable` when the model does not
            support it.
        requires: :data:`CUDA`, :data:`REAL`, :data:`TRAINING` or :data:`INFERENCE`.
        modules: memopt modules the strategy imports; while one does not exist the strategy is unavailable.
        places_model: ``apply`` puts the weights where they belong itself (offloading keeps them on the CPU);
            otherwise the runner moves the model to the device before applying.
        report_lines: how many lines of the report ``memopt-bench`` prints under its table (all are in its summary).
    """

    name: str
    description: str
    apply: ApplyFn
    requires: frozenset[str] = field(default_factory=frozenset)
    modules: tuple[str, ...] = ()
    places_model: bool = False
    report_lines: int = 1

    def unavailable_reason(self, context: StrategyContext) -> str | None:
        """Why the strategy cannot run in ``context`` (device, simulation, missing modules), or ``None`` when it can.

        Checked before the model is built; what depends on the model itself, ``apply`` reports by raising
        :class:`StrategyUnavailable`.
        """
        if CUDA in self.requires and context.device.type != "cuda":
            return f"needs a CUDA device (--device cuda); this run is on {context.device.type}"
        if REAL in self.requires and context.simulate:
            return "moves real weights between devices, so it cannot be simulated"
        if TRAINING in self.requires and not context.training:
            return "changes only what autograd keeps for the backward: run with --training"
        if INFERENCE in self.requires and context.training:
            return ("offloads each block's weights after its forward, but the backward needs them again; memopt's "
                    "chunked training onloads them again for the backward: strategy 'sequence-offload'")
        for module in self.modules:
            if importlib.util.find_spec(module) is None:
                return f"{module} is not available in this memopt build"
        return None


def _import(module: str, name: str) -> Any:
    """``getattr(import_module(module), name)``, turning an import failure into :class:`StrategyUnavailable`."""
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as error:
        raise StrategyUnavailable(f"{module}.{name} cannot be imported ({type(error).__name__}: {error})") from error


def _chunks(context: StrategyContext, default: int) -> int:
    return context.num_chunks or default


# ------------------------------------------------------------------------------------------------ the apply functions
def _baseline(model: torch.nn.Module, context: StrategyContext) -> None:
    return None


def _diffusers_chunking(model: torch.nn.Module, context: StrategyContext) -> str:
    enable = getattr(model, "enable_forward_chunking", None)
    if enable is None:
        raise StrategyUnavailable(f"enable_forward_chunking is not supported by {type(model).__name__}")
    # diffusers' defaults, as users call it: one sample at a time along the batch dimension (chunk_size=1, dim=0).
    # Sequence chunking (dim=1) needs a chunk size dividing both the image and the text token counts.
    enable()
    return "enable_forward_chunking() (diffusers' defaults: chunk_size=1, dim=0)"


def _group_offload(use_stream: bool) -> ApplyFn:
    def apply(model: torch.nn.Module, context: StrategyContext) -> str:
        if not hasattr(model, "enable_group_offload"):
            raise StrategyUnavailable(f"enable_group_offload is not supported by {type(model).__name__}")
        model.to("cpu")
        model.enable_group_offload(onload_device=context.device, offload_device=torch.device("cpu"),
                                   offload_type="block_level", num_blocks_per_group=1, use_stream=use_stream)
        return f"enable_group_offload(block_level, num_blocks_per_group=1, use_stream={use_stream})"

    return apply


def _model_cpu_offload(model: torch.nn.Module, context: StrategyContext) -> str:
    from accelerate import cpu_offload_with_hook

    model.to("cpu")
    cpu_offload_with_hook(model, execution_device=context.device)
    return "accelerate cpu_offload_with_hook: onloaded whole at the first forward, stays while it is the only component"


def _feedforward(split: str, kernel: str, default_chunks: int) -> ApplyFn:
    def apply(model: torch.nn.Module, context: StrategyContext) -> Any:
        if kernel == "triton":
            available = _import("memopt.kernels", "fused_ffn_available")(context.device)
            if not available:
                raise StrategyUnavailable(available.reason)
        apply_chunked_feedforward = _import("memopt.hooks.feedforward", "apply_chunked_feedforward")
        return apply_chunked_feedforward(model, num_chunks=_chunks(context, default_chunks), split=split,
                                         kernel=kernel)

    return apply


def _sequence(schedule: str, saved_inputs: str = "device") -> ApplyFn:
    def apply(model: torch.nn.Module, context: StrategyContext) -> Any:
        apply_sequence_chunking = _import("memopt.hooks.sequence", "apply_sequence_chunking")
        streamed = _import("memopt.hooks._streamed_blocks", "STREAMED_MODELS")
        if type(model).__name__ in streamed and schedule != "two_pass":
            raise StrategyUnavailable(f"{type(model).__name__}'s blocks stream (Sana): two-pass only")
        # num_chunks None: the family plan's default
        return apply_sequence_chunking(model, num_chunks=context.num_chunks, schedule=schedule,
                                       training=context.training, saved_inputs=saved_inputs)

    return apply


def _sequence_offload(model: torch.nn.Module, context: StrategyContext) -> Any:
    report = _sequence("two_pass", saved_inputs="host")(model, context)
    # Applied after the chunking hooks, so that it wraps them (memopt.hooks.offload).
    _group_offload(use_stream=True)(model, context)
    return report


def _checkpointing(model: torch.nn.Module, context: StrategyContext) -> str:
    apply_gradient_checkpointing = _import("memopt.hooks.checkpointing", "apply_gradient_checkpointing")
    try:
        return apply_gradient_checkpointing(model)
    except ValueError as error:
        raise StrategyUnavailable(str(error)) from error


def _attention(model: torch.nn.Module, context: StrategyContext) -> Any:
    apply_chunked_attention = _import("memopt.hooks.attention", "apply_chunked_attention")
    # 4096-query chunks at full size; small runs get at least 4 chunks so the strategy does something measurable.
    num_chunks = context.num_chunks or 4
    query_chunk = min(4096, math.ceil(context.tokens / num_chunks))
    return apply_chunked_attention(model, query_chunk=query_chunk)


def _all(model: torch.nn.Module, context: StrategyContext) -> Any:
    apply_memory_optimizations = _import("memopt.api", "apply_memory_optimizations")
    return apply_memory_optimizations(model, budget=context.budget, device=context.device, height=context.height,
                                      width=context.width, num_frames=context.num_frames,
                                      batch_size=context.batch_size, training=context.training)


STRATEGIES: dict[str, Strategy] = {
    strategy.name: strategy
    for strategy in [
        Strategy("baseline", "the unmodified diffusers model", _baseline),
        Strategy("diffusers-chunking", "diffusers' enable_forward_chunking (only some classes have it)",
                 _diffusers_chunking),
        Strategy("group-offload", "diffusers' enable_group_offload, block level, no streams", _group_offload(False),
                 requires=frozenset({CUDA, REAL, INFERENCE}), places_model=True),
        Strategy("group-offload-stream", "diffusers' enable_group_offload, block level, prefetch on a CUDA stream",
                 _group_offload(True), requires=frozenset({CUDA, REAL, INFERENCE}), places_model=True),
        Strategy("model-cpu-offload", "accelerate's model offload hook (enable_model_cpu_offload's per-component "
                 "step): onloaded whole at its forward, stays until another component runs",
                 _model_cpu_offload, requires=frozenset({CUDA, REAL}), places_model=True),
        Strategy("ffn-hidden", "memopt: FeedForward split along its hidden width (TP-equivalent shards), 4 shards",
                 _feedforward("hidden", "torch", 4), modules=("memopt.hooks.feedforward",)),
        Strategy("ffn-sequence", "memopt: FeedForward over sequence chunks, 8 chunks",
                 _feedforward("sequence", "torch", 8), modules=("memopt.hooks.feedforward",)),
        Strategy("checkpointing", "diffusers' enable_gradient_checkpointing (blocks save their inputs and are "
                 "recomputed whole in the backward)", _checkpointing, requires=frozenset({TRAINING}),
                 modules=("memopt.hooks.checkpointing",)),
        Strategy("sequence", "memopt: blocks over sequence chunks (the family plan's count), attention sees all "
                 "chunks' K/V (two-pass schedule: the part before attention runs twice; with --training, blocks save "
                 "their inputs and are recomputed chunk by chunk in the backward)",
                 _sequence("two_pass"), modules=("memopt.hooks.sequence",)),
        Strategy("sequence-host", "memopt: sequence, and the blocks' saved inputs wait in host memory for the backward",
                 _sequence("two_pass", saved_inputs="host"), requires=frozenset({TRAINING}),
                 modules=("memopt.hooks.sequence",)),
        Strategy("sequence-offload", "memopt: sequence-host, and the blocks group-offloaded (diffusers' "
                 "enable_group_offload with a prefetch stream; each block onloaded again for its backward)",
                 _sequence_offload, requires=frozenset({CUDA, REAL, TRAINING}), places_model=True,
                 modules=("memopt.hooks.sequence",)),
        Strategy("sequence-lockstep", "memopt: blocks over sequence chunks, lock-step schedule (chunks suspended at "
                 "attention until all K/V exist: nothing runs twice, more memory)",
                 _sequence("lockstep"), modules=("memopt.hooks.sequence",)),
        Strategy("attention", "memopt: chunked attention, 4096-query chunks (at least 4 chunks)", _attention,
                 modules=("memopt.hooks.attention",)),
        Strategy("kernel", "memopt: FeedForward through the fused Triton chunked-FFN kernel, 4 shards",
                 _feedforward("hidden", "triton", 4), requires=frozenset({CUDA}),
                 modules=("memopt.hooks.feedforward", "memopt.kernels")),
        Strategy("all", "memopt: apply_memory_optimizations(model, budget), the planner's choice for the budget", _all,
                 modules=("memopt.api",), report_lines=2),
    ]
}

ALIASES: dict[str, tuple[str, ...]] = {
    "ffn": ("ffn-hidden",),
    "offload": ("group-offload", "group-offload-stream", "model-cpu-offload"),
    "memopt": ("ffn-hidden", "ffn-sequence", "sequence", "sequence-lockstep", "attention", "kernel", "all"),
    "training": ("checkpointing", "sequence", "sequence-host", "sequence-offload", "all"),
}
"""Shorthands accepted by :func:`get_strategies` besides the strategy names."""


def get_strategies(spec: str | None = None, training: bool = False) -> list[Strategy]:
    """Parse a comma list of strategy names / aliases (``None``, ``""`` or ``"all-strategies"``: every strategy for a
    forward, or with ``training`` every strategy for a training step).

    ``baseline`` is always run first (errors are measured against it) even when the list omits it. Unknown names
    raise ``ValueError`` listing the valid ones.
    """
    if spec is None or spec.strip() in ("", "all-strategies"):
        excluded = INFERENCE if training else TRAINING
        return [strategy for strategy in STRATEGIES.values() if excluded not in strategy.requires]
    names: list[str] = []
    for raw in spec.split(","):
        name = raw.strip().lower()
        if not name:
            raise ValueError(f"empty strategy name in {spec!r}")
        expanded = ALIASES.get(name, (name,))
        for item in expanded:
            if item not in STRATEGIES:
                raise ValueError(f"unknown strategy {raw.strip()!r}; choose from {', '.join(STRATEGIES)} "
                                 f"(or the shorthands {', '.join(ALIASES)})")
            if item not in names:
                names.append(item)
    if "baseline" in names:
        names.remove("baseline")
    return [STRATEGIES["baseline"], *(STRATEGIES[name] for name in names)]
