"""Sequential context parallelism: transformer blocks run in sequence chunks, attention still sees every token.

Context parallelism splits the token sequence across GPUs and exchanges keys/values inside attention. On one device
the same split runs as N virtual ranks one after another, and the K/V exchange becomes a schedule. For every block
(with one whole-sequence attention module; a block with more repeats step 1 per module):

1. **collection pass**: each chunk runs the block up to its self/joint attention kernel call; the call's keys,
   values (and key-side mask) are written into full-length buffers and the rest of the block is skipped (a private
   exception caught by the block hook);
2. **final pass**: each chunk runs the whole block; its attention call gets the full buffers instead of its own
   K/V, and the chunk's output is written over its input chunk (no other chunk needs it any more).

A block with an expert-choice MoE layer (Nucleus-Image's, ``BlockPlan.routed``), whose experts choose their tokens
among all of them, runs a **routing pass** between the two: each chunk runs the block, attention answered from the
full K/V, up to that layer, which keeps the chunk's router scores; the choice is made once over all of them, and the
final pass runs each chunk's tokens through the experts that chose them
(:class:`memopt.hooks.experts.SequenceRoutingHook`).

What is alive then is the residual stream, K and V (about 3 LD, LD = tokens x width x bytes) plus one chunk's
workspace, instead of the 10-17 LD an unchunked block peaks at. The price is that the part of the block before
attention runs twice (the projections whose output a pass does not use, the unused columns of fused ones, and the
query/key norms after them, are skipped, see ``SequenceSkipHook`` and ``SequenceFusedSkipHook``; where the processor
takes it, a skipped projection returns an empty batch, so its rotary embedding is skipped too, and in chunks of
``UNREAD_FROM`` elements or more what any processor does with it runs on ``meta`` only, see
:mod:`memopt.hooks._unread`). What would be the same in every chunk, the key/value side of cross-attention to text
and the timestep modulation of adaptive norms, is computed once per block (``SequenceReuseHook``), so chunked blocks
do the matmul work of unchunked ones. Outputs match the unmodified model to rounding (the final pass runs the same
kernels on the same numbers, only with fewer query rows per call).

The **lock-step** schedule (``schedule="lockstep"``) runs the block once per chunk instead: each chunk runs as a
greenlet up to its whole-sequence attention call, writes its K/V into the full buffers and is suspended there;
once every chunk has arrived, they resume one after another with the full K/V. Nothing runs twice, but every
chunk's pre-attention state (its normed input, query, local K/V and whatever else the block keeps across the call)
is alive at the same time, a few LD more than the two-pass floor (measured per family in benchmarks/sequence.py).

Three model-level pieces keep the rest of the forward under that floor:

* **tail**: the output norm, modulation and projection after the last block upcast the whole sequence to fp32 in
  several temporaries (5 LD for Wan). Like a ``_cp_plan``, which gathers at ``proj_out``, memopt stops the model
  forward when the ``tail`` module is reached, keeps the last block's output, and runs the forward again once per
  chunk with the blocks answering from that output; the gather module (``proj_out``) collects the chunks. The
  model code before the blocks (patch embedding, conditioning) reruns each time: cheap next to the blocks.
* **producers**: per-token tables made before the blocks (LTX-Video and Mochi rotary embeddings, 2-4 LD) are
  handed to the blocks as deferred stand-ins that compute only the running chunk's rows.
* **token chains**: per-token model-level modules that feed one another (Ideogram 4's RMSNorm and projection of its
  53248-wide text features), or one alone (Cosmos 3 Omni's output norm), run a token chunk at a time
  (:mod:`memopt.hooks._token_chain`).

What is split and where the exchange happens is data (:mod:`memopt.plans.sequence`); the interception goes through
diffusers' attention dispatch (:mod:`memopt.hooks._attention_dispatch`), so processors run unchanged. Calls that
only need the chunk's own tokens (cross-attention to text) are left alone. With autograd recording a block runs
unchunked, or, with ``training=True``, in chunks that save only the block's inputs and are recomputed chunk by chunk
in the backward (:mod:`memopt.hooks._sequence_backward`).

This module holds the block hook, the schedules and ``apply_sequence_chunking``; the pieces they use live beside it:
:mod:`memopt.hooks._sequence_chunks` (cutting arguments, putting outputs back), :mod:`memopt.hooks._sequence_exchange`
(the K/V buffers and the attention-call handler) and :mod:`memopt.hooks._sequence_model` (the model-level passes).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from diffusers.hooks import ModelHook
from diffusers.hooks._helpers import TransformerBlockMetadata, TransformerBlockRegistry
from diffusers.models._modeling_parallel import ContextParallelOutput
from torch.utils._pytree import tree_flatten

from ..plans.experts import ExpertChoiceLayout, expert_choice_layout
from ..plans.sequence import (
    FUSED_ROLES,
    SEQUENCE_PLANS,
    BlockPlan,
    JointAttention,
    SequencePlan,
    SequenceSplit,
    sequence_plan,
)
from ._attention_dispatch import (
    SEQUENCE_PRIORITY,
    acquire_interception,
    calls_sdpa_directly,
    intercept_attention,
    parked_interception,
    release_interception,
)
from ._common import HOOK_PREFIX, hooks_inside, refuse_under_step_caches, register_memopt_hook, removed_on_error
from ._held_blocks import HeldCall, resolved
from .offload import offloading_group
from ._sequence_backward import SequenceTrainingHook, backward_passes, chunk_output_grads, recorded_forward
from ._sequence_chunks import (
    RUNNING,
    Arguments,
    ChunkLayout,
    ChunkOutputs,
    cut_arguments,
    intersect,
    materialized,
    memory_runs,
    positional_index,
    running,
    uncut_count,
    unplanned_arguments,
)
from ._sequence_exchange import (
    AttentionState,
    BlockRun,
    KeyValuesCollected,
    PairMask,
    ReusedOutput,
    RouterScoresCollected,
    RoutingState,
    modified_under_suspended_chunks,
    output_versions,
    refuse_inactive,
)
from .experts import SEQUENCE_ROUTING_HOOK, SequenceRoutingHook
from ._unread import unread, unread_values
from ._unread import active as unread_active
from ._sequence_model import (
    ModelRun,
    SequenceEmbedHook,
    SequenceGatherHook,
    SequenceHeadHook,
    SequenceModelHook,
    SequenceProducerHook,
    SequenceReplayHook,
    SequenceTailHook,
    offloaded,
)
from ._streamed_blocks import STREAMED_MODELS, ChunkedNormHook, StreamedBlockHook, StreamedModel, streaming_refusal
from ._token_chain import TokenChain, TokenChainHook, TokenChainPassHook

logger = logging.getLogger(__name__)

SEQUENCE_BLOCK_HOOK = "memopt.sequence"
SEQUENCE_ATTENTION_HOOK = "memopt.sequence.attention"
SEQUENCE_MODEL_HOOK = "memopt.sequence.model"
SEQUENCE_TAIL_HOOK = "memopt.sequence.tail"
SEQUENCE_GATHER_HOOK = "memopt.sequence.gather"
SEQUENCE_HEAD_HOOK = "memopt.sequence.head"
SEQUENCE_PRODUCER_HOOK = "memopt.sequence.producer"
SEQUENCE_EMBED_HOOK = "memopt.sequence.embed"
SEQUENCE_SKIP_HOOK = "memopt.sequence.skip"
SEQUENCE_REPLAY_HOOK = "memopt.sequence.replay"
SEQUENCE_TRAINING_HOOK = "memopt.sequence.training"
SEQUENCE_REUSE_HOOK = "memopt.sequence.reuse"
SEQUENCE_CHAIN_HOOK = "memopt.sequence.chain"

REUSED_INPUTS = 2
"""How many inputs' outputs a :class:`SequenceReuseHook` keeps within one block forward: two serve a module called on
two alternating inputs per chunk, and bound what an input that differs in every chunk (a plan naming the wrong module)
can hold."""

SCHEDULES = ("two_pass", "lockstep")
SAVED_INPUTS = ("device", "host")
SMALL_CHUNK_TOKENS = 512
"""Below this many tokens a chunk's kernels are too small to keep a GPU busy: see :func:`warn_if_launch_bound`."""
UNREAD_FROM = 1 << 20
"""Elements of an attention module's input from which its skipped projections return unread stand-ins
(:mod:`memopt.hooks._unread`): each operation on one costs ~15 us of Python instead of a kernel. Measured on the CPU
(two-pass forwards at width 512): chunks of 24,576 elements ran 7% slower with stand-ins, chunks of ~300,000 about as
fast (-4% to +2%); smaller chunks on a GPU are launch-bound, where the Python per operation weighs most."""
# Submodules of a chunk-local (cross-)attention module that only see its key/value tokens: text or image-prompt tokens
# that every chunk passes whole, so the first chunk's outputs serve the others (see `SequenceReuseHook`).
_CROSS_ATTENTION_KEY_VALUE = (
    "to_k", "to_v", "norm_k", "add_k_proj", "add_v_proj", "norm_added_k", "to_kv", "to_added_kv"
)
# diffusers' `fuse_qkv_projections()`: fused linear -> the projections whose weights it concatenates, in column order.
_DIFFUSERS_FUSED_PROJECTIONS = {
    "to_qkv": ("to_q", "to_k", "to_v"),
    "to_kv": ("to_k", "to_v"),
    "to_added_qkv": ("add_q_proj", "add_k_proj", "add_v_proj"),
    "to_added_kv": ("add_k_proj", "add_v_proj"),
}
# Foreign hooks that keep no state between entering and leaving a module: a lock-step chunk may be suspended inside.
_STATELESS_HOOKS = frozenset({"layerwise_casting", "peft_autocast_disable"})

# diffusers hooks that only move or cast weights: a module carrying them is still chunked, and a block's output may
# be written over its input. Any other foreign hook may keep, compare or skip inputs (caches): see `_foreign_hooks`.
_WEIGHT_ONLY_HOOKS = frozenset(
    {
        "group_offloading",
        "lazy_prefetch_group_offloading",
        "layer_execution_tracker",
        "layerwise_casting",
        "peft_autocast_disable",
    }
)


@dataclass(frozen=True)
class SequenceChunkingConfig:
    """Settings of sequential context parallelism.

    Attributes:
        num_chunks: how many chunks (virtual ranks) each block's image tokens are cut into. More chunks lower the
            per-chunk workspace (about 8-15 LD / num_chunks on top of the ~3 LD floor) and add per-call overhead
            (small while a chunk keeps ~1000+ tokens; on a GPU, chunks under :data:`SMALL_CHUNK_TOKENS` are
            launch-bound and warned about). Sequences shorter than twice ``num_chunks`` get chunks of two tokens
            (:data:`~memopt.hooks._sequence_chunks.MIN_CHUNK_TOKENS`). :func:`apply_sequence_chunking` defaults it to
            the plan's ``num_chunks`` (32, or 48 for Flux and HunyuanVideo, whose single-stream blocks have the
            largest workspace).
        inplace: write each chunk's block output over its input chunk, saving one full hidden state. Safe for
            diffusers' transformer forwards, which rebind ``hidden_states`` to each block's output; memopt turns it
            off by itself for inputs whose elements overlap (expanded tensors) or overlap another block argument
            (views into one text + image tensor that do not overlap are fine), and when a non-memopt hook that may
            keep block inputs (a cache) wraps the block. Set ``False`` when calling blocks yourself on tensors you
            still need afterwards.
        chunk_tail: also run the model code after the blocks (output norm and projection) chunk by chunk, by
            running the forward a second time per chunk (see the module docstring). Set ``False`` for forwards that
            mix the last block's output with other full-length tensors there (e.g. a ControlNet residual added to
            the last block).
        schedule: ``"two_pass"`` (the memory floor: the part before attention runs twice per chunk) or
            ``"lockstep"`` (every chunk suspended at its attention until all K/V exist: no recomputation, fewer
            kernel launches, but all chunks' pre-attention state alive at once; needs the ``greenlet`` package and
            a block that enters no grad/autocast/mode context around its attention call).
        align: chunk boundaries fall on multiples of this many tokens where that changes no chunk by more than an
            eighth (chunks of ``8 * align`` tokens or more): GPU kernels compute whole tiles of 64-128 rows, so an
            unaligned chunk pays for a part-empty tile. 1 splits as evenly as possible. Chunks that must be whole
            token groups (``BlockPlan.token_groups``) are not moved.
        training: while autograd records, run the blocks in chunks too, saving only each block's inputs, and
            recompute them chunk by chunk in the backward (:mod:`memopt.hooks._sequence_backward`: gradient
            checkpointing at the memory of sequence chunks; ``loss.backward()`` only, like reentrant checkpointing).
            Without it a recorded block runs unchunked, with a warning.
        saved_inputs: with ``training``, where the inputs a recorded block saves for its backward wait: ``"device"``
            (about one hidden state per block, the part of a training step that grows with the depth, as with any
            gradient checkpointing) or ``"host"`` (copied to pinned host memory in the forward and back, one block
            at a time, in the backward: the device then holds one block's backward workspace whatever the depth,
            for two transfers of the block's inputs on the compute stream; a tensor several blocks save, such as
            the rotary tables, is copied once). On the CPU, where the host is the device, it only adds copies.
    """

    num_chunks: int = 32
    inplace: bool = True
    chunk_tail: bool = True
    schedule: str = "two_pass"
    align: int = 128
    training: bool = False
    saved_inputs: str = "device"

    def __post_init__(self) -> None:
        for name in ("num_chunks", "align"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(self.training, bool):
            raise ValueError(f"training must be a bool, got {self.training!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.saved_inputs not in SAVED_INPUTS:
            raise ValueError(f"saved_inputs must be one of {SAVED_INPUTS}, got {self.saved_inputs!r}")
        if self.saved_inputs == "host" and not self.training:
            raise ValueError("saved_inputs='host' places what recorded blocks save for their backward; it needs "
                             "training=True")


@dataclass
class SequenceChunkingReport:
    """What :func:`apply_sequence_chunking` did.

    Attributes:
        model: the model's class name.
        num_chunks: the configured number of chunks.
        plan_source: where the split plan came from.
        schedule: the configured schedule (see :class:`SequenceChunkingConfig`).
        blocks: module paths of the chunked blocks.
        attention: module paths of the attention modules whose K/V are exchanged between chunks.
        tail: ``"<tail module> -> <gather module>"`` when the output head runs in chunks, else ``None``.
        producers: model-level modules whose per-token output is computed per chunk.
        token_chains: model-level module chains run a token chunk at a time (``SequencePlan.token_chains``).
        held: blocks whose calls are held until their output is used (``BlockPlan.runs_when_used``).
        routed: expert-choice MoE layers whose router scores are exchanged between chunks (``BlockPlan.routed``).
        skipped: ``(module path, reason)`` for blocks and model-level pieces that run unchunked.
    """

    model: str
    num_chunks: int
    plan_source: str
    schedule: str = "two_pass"
    blocks: list[str] = field(default_factory=list)
    attention: list[str] = field(default_factory=list)
    tail: str | None = None
    producers: list[str] = field(default_factory=list)
    token_chains: list[str] = field(default_factory=list)
    held: list[str] = field(default_factory=list)
    routed: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [
            f"sequence chunking on {self.model}: {len(self.blocks)} blocks in {self.num_chunks} chunks "
            f"({self.schedule}), {len(self.attention)} attention modules exchange K/V (plan: {self.plan_source})",
            f"  output head in chunks: {self.tail or 'no'}; per-chunk producers: {', '.join(self.producers) or 'none'}",
        ]
        if self.token_chains:
            lines.append(f"  token chains in chunks: {'; '.join(self.token_chains)}")
        if self.held:
            lines.append(f"  run when their output is used: {', '.join(self.held)}")
        if self.routed:
            lines.append(f"  expert-choice layers exchanging router scores: {len(self.routed)}")
        lines += [f"  skipped {path}: {reason}" for path, reason in self.skipped]
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------- lock-step
@dataclass
class _ChunkFinished:
    """What a lock-step chunk's greenlet returns: its block output (a barrier is a ``(stage, call)`` tuple)."""

    output: Any


def _greenlet_class() -> type:
    try:
        from greenlet import greenlet
    except ImportError as error:  # pragma: no cover - greenlet is a dependency of memopt
        raise ImportError("memopt: schedule='lockstep' needs the greenlet package (pip install greenlet)") from error
    return greenlet


def _context_state() -> tuple:
    """The thread state a suspended chunk shares with the others: it must not change across a suspension."""
    return (
        torch.is_grad_enabled(),
        torch.is_inference_mode_enabled(),
        torch._C._len_torch_function_stack(),
        torch._C._len_torch_dispatch_stack(),
        tuple(torch.is_autocast_enabled(device) for device in ("cpu", "cuda")),
    )


# ------------------------------------------------------------------------------------------- hooks
class SequenceAttentionHook(ModelHook):
    """On a whole-sequence attention module: routes its kernel calls to the running block's K/V exchange."""

    def initialize_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        acquire_interception()
        return module

    def deinitalize_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        release_interception()
        return module

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        run: BlockRun | None = running("block_run")
        state = run.attention.get(id(module)) if run is not None else None
        if state is None and run is not None and id(module) in run.inactive:
            with intercept_attention(functools.partial(refuse_inactive, run.inactive[id(module)]), SEQUENCE_PRIORITY,
                                     calls_sdpa_directly(module)):
                return self.fn_ref.original_forward(*args, **kwargs)
        if state is None:  # called outside a chunked block run: the module is untouched
            return self.fn_ref.original_forward(*args, **kwargs)
        state.calls_seen[run.chunk] = 0
        handler = functools.partial(run.handle, state)
        stand_ins = unread_values() if self._unread(run, state, module, args, kwargs) else contextlib.nullcontext()
        with intercept_attention(handler, SEQUENCE_PRIORITY, calls_sdpa_directly(module)), stand_ins:
            return self.fn_ref.original_forward(*args, **kwargs)

    @staticmethod
    def _unread(run: BlockRun, state: AttentionState, module: torch.nn.Module, args: tuple, kwargs: dict) -> bool:
        """Whether the skipped projections of this call return unread stand-ins: where they are large enough for the
        memory traffic saved to outweigh the Python cost per operation (``UNREAD_FROM``), and the plan does not
        make them empty (``JointAttention.empty_stand_ins``: free already)."""
        if state.spec.empty_stand_ins or not (run.skips("query", id(module)) or run.skips("key_value", id(module))):
            return False
        hidden = args[0] if args else kwargs.get("hidden_states")
        return isinstance(hidden, torch.Tensor) and hidden.numel() >= UNREAD_FROM


class SequenceChunkingHook(ModelHook):
    """On a transformer block: runs it chunk by chunk in collection passes and a final pass (module docstring)."""

    def __init__(
        self,
        config: SequenceChunkingConfig,
        path: str,
        plan: BlockPlan,
        metadata: TransformerBlockMetadata,
        attention: list[tuple[str, torch.nn.Module, JointAttention]],
        routed: list[tuple[str, torch.nn.Module, ExpertChoiceLayout]] | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.path = path
        self.plan = plan
        self.metadata = metadata
        self.attention = attention
        self.routed = routed or []
        self.index: dict[str, int] = {}
        self.hold = False  # set by apply_sequence_chunking (BlockPlan.runs_when_used, HOLD_FROM)
        self.unplanned: list[str] = []  # named forward arguments the plan does not list (initialize_hook)
        self._warned: set[str] = set()  # reasons for running unchunked already warned about (_unchunked)

    def initialize_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        self.index = positional_index(type(module))
        missing = [name for name in self.plan.inputs if name not in self.index]
        if missing:
            raise ValueError(f"{self.path}: {type(module).__name__}.forward has no argument(s) {missing} (plan)")
        self.unplanned = unplanned_arguments(type(module), self.plan.inputs)
        return module

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        refuse_under_step_caches(module, "sequence chunking", self.path)  # a cache enabled after memopt
        model_run: ModelRun | None = running("model_run")
        if model_run is not None and not model_run.tail and self._holds(module):
            output = self._held(module, args, kwargs, model_run)
            model_run.block_finished(output, self.metadata, keep=False)
            return output
        arguments = Arguments(self.index, *resolved(args, kwargs))
        if model_run is not None and model_run.tail:
            return model_run.tail_block_output(arguments, self.metadata)
        if model_run is not None:
            # A new block runs: the previous one's output is no longer the last. Kept, it would stay alive through
            # this block when the model makes a new tensor in between (Chroma's cat(text, image)).
            model_run.last_block = None
        output = self._forward(module, arguments)
        if model_run is not None:
            model_run.block_finished(output, self.metadata, keep=not self.plan.returns_update)
        return output

    def _holds(self, module: torch.nn.Module) -> bool:
        """Whether this call is held until its output is used (``BlockPlan.runs_when_used``): in inference, and only
        when no other hook sits on the block (an offloading or casting hook would have moved its weights back by
        then)."""
        return (self.hold and not torch.is_grad_enabled() and offloading_group(module) is None
                and not _foreign_hooks(module, allowed=frozenset()))

    def _held(self, module: torch.nn.Module, args: tuple, kwargs: dict, model_run: ModelRun) -> Any:
        """Stand-ins of the block's output entries (the layout its metadata gives), run when first used."""
        call = HeldCall(self.path, lambda a, k: self._forward(module, Arguments(self.index, a, k)), args, kwargs,
                        model_run.held)
        hs, ehs = self.metadata.return_hidden_states_index, self.metadata.return_encoder_hidden_states_index
        if ehs is None:
            return call.output(None)
        return tuple(call.output(index) for index in range(max(hs, ehs) + 1))

    def _forward(self, module: torch.nn.Module, arguments: Arguments) -> Any:
        image = self._image(arguments)
        whole = self.plan.runs_whole(arguments.get) if self.plan.runs_whole is not None else None
        if whole is not None:
            return self._unchunked(arguments, f"plan: {whole}", f"{whole}: running unchunked (BlockPlan.runs_whole)")
        uncut = uncut_count(arguments, self.unplanned)
        if uncut is not None:
            return self._unchunked(arguments, "uncut", f"{type(module).__name__}.forward gets the int {uncut}, which "
                                   "the sequence plan does not cut (a count of tokens would be wrong in every chunk): "
                                   "running unchunked. A plan gives such an argument a TokenCount or ChunkValue in "
                                   "BlockPlan.inputs.")
        if torch.is_grad_enabled() and (image.requires_grad or any(p.requires_grad for p in module.parameters())):
            if self.config.training:
                return recorded_forward(self, module, arguments)
            return self._unchunked(arguments, "autograd", "autograd is recording, running unchunked "
                                   "(apply_sequence_chunking(..., training=True) chunks it; or wrap the call in "
                                   "torch.no_grad())")
        return self.chunked(module, arguments, in_place=self.config.inplace)

    def _unchunked(self, arguments: Arguments, reason: str, message: str) -> Any:
        """The block on the whole sequence, with a warning the first time for each ``reason``."""
        if reason not in self._warned:
            logger.warning("%s: %s", self.path, message)
            self._warned.add(reason)
        args, kwargs = materialized(arguments.args, arguments.kwargs)
        return self.fn_ref.original_forward(*args, **kwargs)

    def _image(self, arguments: Arguments) -> torch.Tensor:
        image = arguments.get(self.metadata.hidden_states_argument_name)
        if not isinstance(image, torch.Tensor):
            raise TypeError(f"{self.path}: expected a tensor for {self.metadata.hidden_states_argument_name!r}")
        return image

    def chunked(self, module: torch.nn.Module, arguments: Arguments, in_place: bool) -> Any:
        """The block's output computed in chunks, in the configured schedule (``in_place``: the output may be written
        over the input, see :class:`SequenceChunkingConfig`)."""
        original = self.fn_ref.original_forward
        image = self._image(arguments)
        prepared = self._prepare(module, arguments, image)
        if prepared is None:
            args, kwargs = materialized(arguments.args, arguments.kwargs)
            return original(*args, **kwargs)
        run, chunk_arguments, dim = prepared
        outputs = ChunkOutputs(self.path, self.metadata, run.layout, image, in_place
                               and not self.plan.returns_update and not self.plan.input_is_view
                               and self._can_overwrite(module, image, arguments), dim)
        RUNNING.block_run = run
        try:
            if self.config.schedule == "lockstep":
                self._lockstep(module, original, run, chunk_arguments, outputs)
            else:
                self._two_pass(original, run, chunk_arguments, outputs)
            return outputs.result()
        finally:
            RUNNING.block_run = None

    def chunked_backward(self, module: torch.nn.Module, arguments: Arguments, grad_output: Any) -> None:
        """Back-propagates ``grad_output`` through the block in chunks (:mod:`memopt.hooks._sequence_backward`):
        into the parameters' ``.grad`` and along the autograd graphs of the tensors in ``arguments``."""
        original = self.fn_ref.original_forward
        prepared = self._prepare(module, arguments, self._image(arguments))
        if prepared is None:
            args, kwargs = materialized(arguments.args, arguments.kwargs)
            output = original(*args, **kwargs)
            pairs = [(o, g) for o, g in zip(tree_flatten(output)[0], tree_flatten(grad_output)[0])
                     if isinstance(o, torch.Tensor) and o.requires_grad and g is not None]
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
            return
        run, chunk_arguments, dim = prepared
        grads = chunk_output_grads(run.layout, self.metadata.return_hidden_states_index,
                                   self.metadata.return_encoder_hidden_states_index, dim, grad_output)
        RUNNING.block_run = run
        try:
            backward_passes(run, functools.partial(self._collect, original, run, chunk_arguments),
                            functools.partial(self._final, original, run, chunk_arguments), grads,
                            [p for p in module.parameters() if p.requires_grad])
        finally:
            RUNNING.block_run = None

    def _prepare(self, module: torch.nn.Module, arguments: Arguments, image: torch.Tensor
                 ) -> tuple[BlockRun, Callable[[int], tuple], int] | None:
        """The chunked run of this call (``None`` when it has a single chunk), its per-chunk arguments and the token
        dim."""
        text = arguments.get(self.metadata.encoder_hidden_states_argument_name) if self.plan.has_text_stream else None
        groups = self.plan.token_groups(arguments.get) if self.plan.token_groups is not None else None
        joint = any({"image", "text"} <= set(spec.order) for spec in self.plan.attention.values())
        dim = self.plan.inputs[self.metadata.hidden_states_argument_name].split_dim  # 1, or 0 (sequence-first)
        layout = ChunkLayout.build(
            self.config.num_chunks, image.shape[dim], None if text is None else text.shape[dim], self.plan.split_text,
            groups, self.config.align, joint,
        )
        if layout.num_chunks <= 1:
            return None
        warn_if_launch_bound(image.device, min(end - start for start, end in layout.ranges["image"]), image.shape[dim])
        if running("block_run") is not None:
            raise RuntimeError(f"{self.path}: nested chunked block runs are not supported")

        active, inactive = self._stages(module, arguments)
        run = BlockRun(
            layout,
            {
                id(attention_module): AttentionState(
                    path=f"{self.path}.{name}",
                    spec=spec,
                    stage=stage,
                    expected_calls=image.shape[1 - dim] if spec.calls == "batch" else spec.calls,
                    pair_mask=self._pair_mask(arguments, spec),
                )
                for stage, name, attention_module, spec in active
            },
            inactive,
        )
        run.routing = {id(layer): RoutingState(f"{self.path}.{name}", layer, spec) for name, layer, spec in self.routed}
        return run, functools.partial(self._chunk_arguments, arguments, layout), dim

    def _stages(
        self, module: torch.nn.Module, arguments: Arguments
    ) -> tuple[list[tuple[int, str, torch.nn.Module, JointAttention]], dict[int, str]]:
        """The attention modules that attend over the whole sequence in this forward (``JointAttention.active``),
        each with its stage, in call order, and the others by id -> path. Two-pass collects one stage per pass; a
        module whose keys/values do not depend on the previous module's output (``collect_with_previous``, that module
        active too) shares its stage. Lock-step suspends each module on its own."""
        active: list[tuple[int, str, torch.nn.Module, JointAttention]] = []
        inactive: dict[int, str] = {}
        previous_active = False
        for name, attention_module, spec in self.attention:
            if spec.active is not None and not spec.active(module, arguments.get):
                inactive[id(attention_module)] = f"{self.path}.{name}"
                previous_active = False
                continue
            shared = self.config.schedule == "two_pass" and spec.collect_with_previous and previous_active
            stage = active[-1][0] if shared else (active[-1][0] + 1 if active else 0)
            active.append((stage, name, attention_module, spec))
            previous_active = True
        return active, inactive

    def _two_pass(self, original: Callable[..., Any], run: BlockRun, chunk_arguments: Callable[[int], tuple],
                  outputs: ChunkOutputs) -> None:
        """Collection passes (one per attention stage, each stopped at the stage's last call), then the final pass."""
        for stage in sorted({state.stage for state in run.attention.values()}):
            run.collecting = stage
            for chunk in range(run.layout.num_chunks):
                self._collect(original, run, chunk_arguments, chunk)
        run.collecting = None
        if run.routing:
            run.routing_pass = True
            try:
                for chunk in range(run.layout.num_chunks):
                    self._route(original, run, chunk_arguments, chunk)
            finally:
                run.routing_pass = False
            for state in run.routing.values():
                state.choose(run.layout.num_chunks)
        for chunk in range(run.layout.num_chunks):
            output = self._final(original, run, chunk_arguments, chunk)
            outputs.add(chunk, output)
            del output

    def _route(self, original: Callable[..., Any], run: BlockRun, chunk_arguments: Callable[[int], tuple],
               chunk: int) -> None:
        """Runs ``chunk`` in the routing pass, with the full K/V, up to its expert-choice layer
        (``BlockPlan.routed``), which keeps the chunk's router scores."""
        paths = ", ".join(state.path for state in run.routing.values())
        self._run_until(original, run, chunk_arguments, chunk, RouterScoresCollected,
                        f"its expert-choice layer {paths}")

    def _collect(self, original: Callable[..., Any], run: BlockRun, chunk_arguments: Callable[[int], tuple],
                 chunk: int) -> None:
        """Runs ``chunk`` in the collection pass of stage ``run.collecting``, up to the stage's last attention call."""
        paths = ", ".join(state.path for state in run.attention.values() if state.stage == run.collecting)
        self._run_until(original, run, chunk_arguments, chunk, KeyValuesCollected,
                        f"the attention kernel of {paths} (skipped by a cache or processor?)")

    def _run_until(self, original: Callable[..., Any], run: BlockRun, chunk_arguments: Callable[[int], tuple],
                   chunk: int, stop: type[Exception], target: str) -> None:
        """Runs ``chunk`` until the block is stopped by ``stop`` (raised where the pass has what it came for); a
        chunk that finishes instead never reached ``target``."""
        run.start_chunk(chunk)
        chunk_args, chunk_kwargs = chunk_arguments(chunk)
        try:
            with self._stand_in_errors(run):
                original(*chunk_args, **chunk_kwargs)
        except stop:
            run.check_answered(self.path)
            return
        raise RuntimeError(f"{self.path}: chunk {chunk} finished without reaching {target}")

    def _final(self, original: Callable[..., Any], run: BlockRun, chunk_arguments: Callable[[int], tuple],
               chunk: int) -> Any:
        """``chunk``'s block output in the final pass (its attention calls answered from the full K/V)."""
        run.start_chunk(chunk)
        chunk_args, chunk_kwargs = chunk_arguments(chunk)
        with self._stand_in_errors(run):
            output = original(*chunk_args, **chunk_kwargs)
        run.check_answered(self.path)
        return output

    @contextlib.contextmanager
    def _stand_in_errors(self, run: BlockRun) -> Iterator[None]:
        """Names the empty stand-ins (``JointAttention.empty_stand_ins``) in a shape error of a two-pass chunk: a
        processor that bypasses diffusers' attention dispatch computes with them and fails there, before the check
        that would have said so."""
        try:
            yield
        except RuntimeError as error:
            empty = [state.path for state in run.attention.values() if state.spec.empty_stand_ins]
            if not empty:
                raise
            kind = "final" if run.collecting is None else "collection"
            raise RuntimeError(
                f"{self.path}: chunk {run.chunk} failed in a {kind} pass, where the projections it does not use "
                f"return empty stand-ins ({', '.join(empty)}: JointAttention.empty_stand_ins). Does a processor "
                f"bypass diffusers' attention dispatch, or reshape them by a batch size of its own? {error}"
            ) from error

    def _lockstep(self, module: torch.nn.Module, original: Callable[..., Any], run: BlockRun,
                  chunk_arguments: Callable[[int], tuple], outputs: ChunkOutputs) -> None:
        """One greenlet per chunk, all suspended at each whole-sequence attention call until every chunk's K/V are
        written, then resumed in order (see the module docstring)."""
        greenlet = _greenlet_class()
        self._check_lockstep_hooks(module)
        scheduler = greenlet.getcurrent()
        entry_state = _context_state()

        def suspend(barrier: tuple[int, int]) -> None:
            with parked_interception():
                if _context_state() != entry_state:
                    raise NotImplementedError(
                        f"{self.path}: the block changes grad mode, autocast or a torch mode stack around its "
                        f"attention call ({entry_state} -> {_context_state()}), so its chunks cannot be suspended "
                        "there; use schedule='two_pass'"
                    )
                scheduler.switch(barrier)

        def body(chunk: int) -> _ChunkFinished:
            chunk_args, chunk_kwargs = chunk_arguments(chunk)
            return _ChunkFinished(original(*chunk_args, **chunk_kwargs))

        num_chunks = run.layout.num_chunks
        runners = [greenlet(functools.partial(body, chunk), parent=scheduler) for chunk in range(num_chunks)]
        run.suspend = suspend
        try:
            for chunk in range(num_chunks):
                run.start_chunk(chunk)
            finished = 0
            while finished < num_chunks:
                barriers: list[tuple[int, Any]] = []
                for chunk, runner in enumerate(runners):
                    run.chunk = chunk
                    result = runner.switch()
                    if isinstance(result, _ChunkFinished):
                        run.check_answered(self.path)
                        outputs.add(chunk, result.output)
                        finished += 1
                    else:
                        barriers.append((chunk, result))
                    del result
                if barriers and (finished or any(b != barriers[0][1] for _, b in barriers)):
                    names = {state.stage: state.path for state in run.attention.values()}
                    where = ", ".join(f"chunk {c} at {names[b[0]]} call {b[1]}" for c, b in barriers)
                    raise RuntimeError(f"{self.path}: the chunks took different paths through the block ({finished} "
                                       f"finished; {where}); refusing to exchange K/V between them")
            run.check_reused()
        finally:
            run.suspend = None
            for runner in runners:
                if runner and not runner.dead:
                    runner.throw()  # unwind a suspended chunk (GreenletExit) so its contexts exit in order

    def _check_lockstep_hooks(self, module: torch.nn.Module) -> None:
        """Hooks on the block's submodules must not keep per-call state across the suspension (group offloading at
        leaf level would offload a module's weights while another chunk is suspended inside it)."""
        for name, child in module.named_modules():
            stateful = _foreign_hooks(child, allowed=_STATELESS_HOOKS) if name else []
            if stateful:
                raise ValueError(
                    f"{self.path}.{name} carries hooks {stateful}: a chunk suspended inside it would find their state "
                    "changed by the other chunks; use schedule='two_pass', or offload whole blocks"
                )

    def _pair_mask(self, arguments: Arguments, spec: JointAttention) -> PairMask | None:
        """The whole per-token mask the block squares into this attention's mask (``JointAttention.pair_mask``)."""
        tokens = arguments.get(spec.pair_mask) if spec.pair_mask is not None else None
        if tokens is None:
            return None
        split = self.plan.inputs[spec.pair_mask]
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != split.expected_dims:
            shape = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
            raise NotImplementedError(f"{self.path}: pair mask {spec.pair_mask!r} must be a {split.expected_dims}-D "
                                      f"per-token tensor, got {shape}")
        return PairMask(tokens, split)

    def _chunk_arguments(self, arguments: Arguments, layout: ChunkLayout, chunk: int) -> tuple[tuple, dict]:
        return cut_arguments(arguments, self.plan.inputs, layout, chunk, self.path)

    def _can_overwrite(self, module: torch.nn.Module, image: torch.Tensor, arguments: Arguments) -> bool:
        if _foreign_hooks(module, outer_of=SEQUENCE_BLOCK_HOOK):
            return False
        model_run: ModelRun | None = running("model_run")
        if model_run is not None and model_run.held[image.untyped_storage()._cdata] > 0:
            return False  # a held block call reads it (BlockPlan.runs_when_used)
        runs = memory_runs(image)
        if runs is None or any(a[1] > b[0] for a, b in zip(runs, runs[1:])):
            return False  # elements sharing memory (an expanded tensor), or too irregular to tell
        storage = image.untyped_storage()._cdata
        for other in arguments.tensors():
            if other is image or other.untyped_storage()._cdata != storage:
                continue
            other_runs = memory_runs(other)
            if other_runs is None or intersect(runs, other_runs):
                return False
        return True


class SequenceSkipHook(ModelHook):
    """On a module whose output the running pass never uses: returns a stand-in of its output's shape instead.

    ``kind`` is ``"query"`` (unused in its attention's collection pass), ``"key_value"`` (unused once its attention's
    K/V are collected), ``"before_attention"`` (a branch computed before the first attention and used after it) or
    ``"text_only"`` (on a text stream every chunk carries whole, kept from chunk 0's final pass alone:
    ``BlockPlan.text_only``).
    Projections return zeros: with ``empty`` (``JointAttention.empty_stand_ins``) an empty batch of them, so whatever
    the processor does with them before the attention call is free too; under
    :func:`~memopt.hooks._unread.unread_values` (set by the attention hook for large chunks) zero-stride
    :func:`~memopt.hooks._unread.unread` stand-ins, whose processing runs on ``meta`` only; else dense zeros (the code
    after them may write into them). A ``"before_attention"`` branch (its output is used only after the attention,
    which the pass never reaches) and parameter-free (elementwise) modules return a zero-stride view. A norm
    (``norm=True``: the query/key norms after skipped projections) returns its own input, the zeros, cast to the dtype
    the norm returns for that input dtype and its own parameter dtypes (learned from one real call each), so the
    normalisation of numbers nobody reads costs no kernels either.
    """

    def __init__(self, kind: str, attention_id: int | None, path: str, norm: bool = False, empty: bool = False
                 ) -> None:
        super().__init__()
        self.kind = kind
        self.attention_id = attention_id
        self.path = path
        self.norm = norm
        self.empty = empty
        # (input dtype, the norm's parameter dtypes) -> output dtype of the norm
        self._norm_dtypes: dict[tuple[torch.dtype, ...], torch.dtype] = {}

    def stands_in(self, run: BlockRun | None) -> bool:
        """Whether this call returns a stand-in in the running pass."""
        return run is not None and (self.attention_id is None or self.attention_id in run.attention) and run.skips(
            self.kind, self.attention_id)

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        if not self.stands_in(running("block_run")):
            return self.fn_ref.original_forward(*args, **kwargs)
        x = args[0] if args else next(iter(kwargs.values()))
        if self.norm:
            return self._norm_stand_in(module, x, args, kwargs)
        out_features = getattr(module, "out_features", None)
        if out_features is not None and self.kind != "before_attention":
            if unread_active():
                return unread((*x.shape[:-1], out_features), x.dtype, x.device)
            return x.new_zeros(0 if self.empty else x.shape[0], *x.shape[1:-1], out_features)
        shape = x.shape if out_features is None else (*x.shape[:-1], out_features)
        return torch.zeros((), dtype=x.dtype, device=x.device).expand(shape)

    def _norm_stand_in(self, module: torch.nn.Module, x: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        key = (x.dtype, *(parameter.dtype for parameter in module.parameters(recurse=False)))
        dtype = self._norm_dtypes.get(key)
        if dtype is not None:
            return x if dtype == x.dtype else x.to(dtype)
        output = self.fn_ref.original_forward(*args, **kwargs)
        if not isinstance(output, torch.Tensor) or output.shape != x.shape:
            shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
            raise ValueError(f"{self.path}: the plan names it as a query/key norm, but it maps {tuple(x.shape)} to "
                             f"{shape}; only shape-preserving norms can be skipped")
        self._norm_dtypes[key] = output.dtype
        return output


class SequenceFusedSkipHook(ModelHook):
    """On a linear whose output column blocks feed different roles (``JointAttention.fused``): in a pass that does
    not use some roles, computes only the other blocks' columns, from row slices of the weight (views), and returns
    zeros in the rest, so the pass does the matmul work of the columns it reads.

    The module must compute ``F.linear(x, weight, bias)`` itself (``torch.nn.Linear.forward``: other linears, e.g.
    quantized ones, get no hook) with no hook inside this one (those could move or cast the weight first); otherwise
    it runs whole. On a LoRA layer the hook sits on its base layer: the LoRA delta is added to every column, which
    changes only columns nobody reads.
    """

    def __init__(self, attention_id: int, path: str, blocks: list[tuple[str, int, int]]) -> None:
        super().__init__()
        self.attention_id = attention_id
        self.path = path
        self.blocks = blocks  # (role, first column, end column)

    def _unused_roles(self, run: BlockRun | None) -> set[str]:
        """The roles whose columns the running pass does not read."""
        if run is None or self.attention_id not in run.attention:
            return set()
        return {role for role in FUSED_ROLES if run.skips(role, self.attention_id)}

    def stands_in(self, run: BlockRun | None) -> bool:
        """Whether some column blocks of this call are zeros in the running pass."""
        unused = self._unused_roles(run)
        return any(role in unused for role, _, _ in self.blocks)

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        unused = self._unused_roles(running("block_run"))
        if not unused or not self._computes_itself(module, args, kwargs):
            return self.fn_ref.original_forward(*args, **kwargs)
        x = args[0]
        output = x.new_zeros(*x.shape[:-1], module.out_features)
        for role, start, end in self.blocks:
            if role not in unused:
                bias = module.bias[start:end] if module.bias is not None else None
                output[..., start:end] = torch.nn.functional.linear(x, module.weight[start:end], bias)
        return output

    def _computes_itself(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> bool:
        return (not hooks_inside(module, SEQUENCE_SKIP_HOOK) and len(args) == 1 and not kwargs
                and isinstance(args[0], torch.Tensor))


class SequenceReuseHook(ModelHook):
    """On a module whose input every chunk shares: computes it once per block forward, not once per chunk and pass.

    The key/value side of chunk-local cross-attention reads the text or image-prompt tokens, and the modulation
    layers of adaptive norms the timestep embedding; both are block arguments passed whole to every chunk, so the same
    tensor arrives each time and the first output serves the others (bit-identical to recomputing, and what the
    unmodified model computes once). Reuse needs the very same inputs (tensors of the same storage, offset, shape,
    strides and version counter, the storage kept referenced so its memory cannot be handed to another tensor; other
    arguments equal plain values, see :func:`_call_key`) and an output (a tensor, or
    tuples of tensors such as the six modulation tables of one projection, nested in PRX's) not modified in place since;
    anything else, including inference tensors (no version counter), is computed as usual. In the
    lock-step schedule an output modified in place is an error instead (suspended chunks hold it), checked again when
    the block finishes. The outputs of the last :data:`REUSED_INPUTS` inputs are kept: HunyuanVideo-I2V's token-replace
    norms call one modulation layer on the timestep embedding and then on the clean image's, in every chunk.
    """

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        run: BlockRun | None = running("block_run")
        key = _call_key(args, kwargs) if run is not None else None
        skip = module._diffusers_hook.get_hook(SEQUENCE_SKIP_HOOK)
        if key is None or (skip is not None and skip.stands_in(run)):
            # A projection the plan also skips (PRX's text K/V projection) returns a stand-in in passes that do not
            # read it: neither served from nor kept for the passes that do.
            return self.fn_ref.original_forward(*args, **kwargs)
        entries = run.reused.setdefault(id(self), [])
        reused = next((entry for entry in entries if entry.input_key == key), None)
        if reused is not None:
            if output_versions(reused.output) == reused.output_version:
                return reused.output
            if run.suspend is not None:
                raise modified_under_suspended_chunks(self.path)
        output = self.fn_ref.original_forward(*args, **kwargs)
        versions = output_versions(output)
        if versions is not None:
            inputs = tuple(value for value in (*args, *kwargs.values()) if isinstance(value, torch.Tensor))
            entries[:] = [ReusedOutput(self.path, inputs, key, output, versions),
                          *(entry for entry in entries if entry is not reused)][:REUSED_INPUTS]
        return output


_PLAIN_ARGUMENTS = (type(None), bool, int, float, str, torch.dtype, torch.device)


def _call_key(args: tuple, kwargs: dict) -> tuple | None:
    """What makes two calls of a module compute the same numbers: the same tensors (:func:`_tensor_key`) and equal
    plain arguments (DiT's per-block embedding takes the timestep, the class labels and a dtype). ``None`` for a call
    without tensors, with a tensor that has no version counter or with an argument of another kind."""
    parts, tensors = [], 0
    for name, value in (*enumerate(args), *sorted(kwargs.items())):
        if isinstance(value, torch.Tensor):
            key = _tensor_key(value)
            if key is None:
                return None
            parts.append((name, key))
            tensors += 1
        elif isinstance(value, _PLAIN_ARGUMENTS):
            parts.append((name, type(value), value))
        else:
            return None
    return tuple(parts) if tensors else None


def _tensor_key(tensor: torch.Tensor) -> tuple | None:
    """What makes two tensors hold the same numbers: same storage, view and version; None without a version counter."""
    if tensor.is_inference():
        return None
    return (tensor.untyped_storage()._cdata, tensor.storage_offset(), tuple(tensor.shape), tensor.stride(),
            tensor.dtype, tensor._version)


# ------------------------------------------------------------------------------------------- apply
def _contains(module: torch.nn.Module, other: torch.nn.Module) -> bool:
    return any(child is other for child in module.modules())


HOLD_FROM = 3
"""Blocks of one ``runs_when_used`` plan are held only when the model has at least this many: run at once, the
model keeps all N outputs; held, one output and the inputs they read (Wan VACE's video tokens, which the first main
block then cannot be written over): N - 2 full-size tensors fewer, nothing saved below 3."""


def _hold_when_used(blocks: list[torch.nn.Module]) -> list[str]:
    """Marks the hooks of ``runs_when_used`` blocks for holding where there are :data:`HOLD_FROM` or more of one
    plan; their paths."""
    hooks = [block._diffusers_hook.get_hook(SEQUENCE_BLOCK_HOOK) for block in blocks]
    held: list[str] = []
    for plan in {id(hook.plan): hook.plan for hook in hooks if hook.plan.runs_when_used}.values():
        group = [hook for hook in hooks if hook.plan is plan]
        if len(group) >= HOLD_FROM:
            for hook in group:
                hook.hold = True
            held += [hook.path for hook in group]
    return held


def _foreign_hooks(
    module: torch.nn.Module, outer_of: str | None = None, allowed: frozenset[str] = _WEIGHT_ONLY_HOOKS
) -> list[str]:
    """Non-memopt hooks on ``module`` other than ``allowed`` ones (by default those that may look at its inputs):
    all of them, or only those wrapping ``outer_of``'s."""
    registry = getattr(module, "_diffusers_hook", None)
    if registry is None:
        return []
    order = list(registry._hook_order)
    if outer_of is not None:
        order = order[order.index(outer_of) + 1 :] if outer_of in order else []
    return [name for name in order if not name.startswith(HOOK_PREFIX) and name not in allowed]


def _iter_blocks(model: torch.nn.Module, plan: SequencePlan) -> Iterator[tuple[str, torch.nn.Module, BlockPlan | None]]:
    registered = set(TransformerBlockRegistry._registry)
    for path, module in model.named_modules():
        if not path:
            continue
        block_plan = plan.match(path)
        if block_plan is not None:
            block_plan = block_plan.for_block(module)
        if block_plan is not None or type(module) in registered:
            yield path, module, block_plan


def _block_metadata(block: torch.nn.Module, plan: BlockPlan) -> TransformerBlockMetadata | None:
    """The block's argument names and output layout: the plan's, else diffusers' registry entry, else ``None``."""
    if plan.metadata is not None:
        return dataclasses.replace(plan.metadata, _cls=type(block), _cached_parameter_indices=None)
    try:
        return TransformerBlockRegistry.get(type(block))
    except ValueError:
        return None


def _prepare_block(
    path: str, block: torch.nn.Module, plan: BlockPlan, metadata: TransformerBlockMetadata | None
) -> tuple[str | None, list[tuple[str, torch.nn.Module, JointAttention]]]:
    """Check one block against its plan: ``(reason to skip or None, [(name, attention module, spec)])``."""
    if metadata is None:
        return (f"{type(block).__name__} is not in diffusers' TransformerBlockRegistry and its plan gives no metadata "
                "(output layout unknown)"), []
    image_spec = plan.inputs.get(metadata.hidden_states_argument_name)
    if not isinstance(image_spec, SequenceSplit) or image_spec.segments != ("image",) or image_spec.split_dim not in (
        0, 1
    ):
        raise ValueError(
            f"{path}: the plan must split {metadata.hidden_states_argument_name!r} as the image stream on dim 1 (dim 0 "
            "for blocks taking sequence-first (S, B, D) hidden states)"
        )
    if plan.has_text_stream:
        text_spec = plan.inputs.get(metadata.encoder_hidden_states_argument_name)
        if not isinstance(text_spec, SequenceSplit) or text_spec.segments != ("text",) or (
            text_spec.split_dim != image_spec.split_dim
        ):
            raise ValueError(
                f"{path}: the plan uses a text stream, so it must split "
                f"{metadata.encoder_hidden_states_argument_name!r} as the text stream on dim {image_spec.split_dim}"
            )
    if not plan.attention and not (plan.returns_update or plan.chunk_local):
        return "the plan names no whole-sequence attention module", []
    for name, spec in plan.attention.items():
        split = plan.inputs.get(spec.pair_mask) if spec.pair_mask is not None else None
        if spec.pair_mask is not None and (
            not isinstance(split, SequenceSplit) or split.segments != spec.order or split.expected_dims is None
        ):
            raise ValueError(
                f"{path}: {name}'s pair mask {spec.pair_mask!r} must be split by the plan over its key streams "
                f"{spec.order} (a SequenceSplit with expected_dims), got {split!r}"
            )
    attention = []
    for name, spec in plan.attention.items():
        try:
            attention.append((name, block.get_submodule(name), spec))
        except AttributeError:
            if not spec.optional:
                return f"has no attention module {name!r} named in the plan", []
    foreign = _foreign_hooks(block)
    if foreign:
        return f"carries hooks {foreign} that may keep or skip its inputs; apply memopt first or remove them", []
    return None, attention


def _routed_layers(path: str, block: torch.nn.Module, plan: BlockPlan, config: SequenceChunkingConfig
                   ) -> list[tuple[str, torch.nn.Module, ExpertChoiceLayout]]:
    """The block's expert-choice MoE layers that ``BlockPlan.routed`` names (those with a layout: a dense block's
    FeedForward at the same path is not one); at most one per block, in the two-pass schedule, for inference. One the
    plan does not name would route each chunk among its own tokens: refused."""
    undeclared = [name for name, module in block.named_modules()
                  if expert_choice_layout(module) is not None and name not in plan.routed]
    if undeclared:
        raise ValueError(f"{path}: its expert-choice MoE layers {undeclared} choose their tokens among the whole "
                         "sequence, which a chunk alone would not see; the block plan must name them in "
                         "BlockPlan.routed")
    routed = []
    for name in plan.routed:
        layer = _submodule(block, name)
        layout = None if layer is None else expert_choice_layout(layer)
        if layout is not None:
            routed.append((name, layer, layout))
    if routed and (len(routed) > 1 or config.schedule != "two_pass" or config.training):
        raise ValueError(
            f"{path}: its expert-choice MoE layers {[name for name, _, _ in routed]} route over the whole sequence, "
            "which sequence chunking supports with one such layer per block, in the two-pass schedule and for "
            f"inference (got schedule={config.schedule!r}, training={config.training})")
    return routed


def _skippable(path: str, module: torch.nn.Module) -> torch.nn.Module:
    """A module the plan lets memopt skip must have an output shape known from its input (linear or elementwise)."""
    linear = getattr(module, "out_features", None) is not None
    if not linear and (any(True for _ in module.parameters()) or len(module._modules)):
        raise ValueError(f"{path}: {type(module).__name__} is neither linear nor a parameter-free elementwise module; "
                         "the plan cannot mark it as skippable")
    return module


def _skip_hooks(
    path: str, block: torch.nn.Module, plan: BlockPlan, attention: list[tuple[str, torch.nn.Module, JointAttention]]
) -> Iterator[tuple[torch.nn.Module, SequenceSkipHook | SequenceFusedSkipHook]]:
    for name in plan.unused_before_attention:
        module_path = f"{path}.{name}"
        hook = SequenceSkipHook("before_attention", None, module_path)
        yield _skippable(module_path, block.get_submodule(name)), hook
    for name in plan.text_only:
        module_path, module = f"{path}.{name}", block.get_submodule(name)
        if getattr(module, "out_features", None) is None:
            raise ValueError(f"{path}: the plan names {name} ({type(module).__name__}) as text-only; only linear "
                             "modules can be")
        yield module, SequenceSkipHook("text_only", None, module_path)
    for name, attention_module, spec in attention:
        for kind, projections, norms in (
            ("query", spec.query, spec.query_norms),
            ("key_value", spec.key_value, spec.key_value_norms),
        ):
            for child in (*projections, *norms):
                module = getattr(attention_module, child, None)
                if isinstance(module, torch.nn.Module):
                    module_path = f"{path}.{name}.{child}"
                    hook = SequenceSkipHook(kind, id(attention_module), module_path, norm=child in norms,
                                            empty=spec.empty_stand_ins)
                    yield (module if child in norms else _skippable(module_path, module)), hook
        for child, roles, proportions in _fused_projections(attention_module, spec):
            module = getattr(attention_module, child, None)
            module_path = f"{path}.{name}.{child}"
            while isinstance(getattr(module, "base_layer", None), torch.nn.Module):  # a LoRA layer: hook its base
                module, module_path = module.base_layer, f"{module_path}.base_layer"
            if isinstance(module, torch.nn.Module) and type(module).forward is torch.nn.Linear.forward:
                # other linears (quantized) run whole
                blocks = _column_blocks(module_path, module, roles, proportions)
                yield module, SequenceFusedSkipHook(id(attention_module), module_path, blocks)


def _fused_projections(
    attention_module: torch.nn.Module, spec: JointAttention
) -> Iterator[tuple[str, tuple[str, ...], tuple[int, ...] | None]]:
    """``(child, column roles, column proportions or None)`` of the attention module's fused linears: the plan's
    (``JointAttention.fused``), and those diffusers' ``fuse_qkv_projections()`` built, whose roles follow from the
    plan's roles of the projections they concatenate and whose column blocks are those projections' widths (which
    fusing keeps). Without these, a fused projection would compute every column in every pass, 1.2-1.3x the block's
    matmul work (tiny Flux and Wan)."""
    for child, roles in spec.fused.items():
        yield child, roles, spec.fused_blocks.get(child)
    for child, parts in _DIFFUSERS_FUSED_PROJECTIONS.items():
        fused, projections = getattr(attention_module, child, None), [getattr(attention_module, p, None) for p in parts]
        if child in spec.fused or not isinstance(fused, torch.nn.Linear) or not all(
            isinstance(projection, torch.nn.Linear) for projection in projections
        ):
            continue
        widths = tuple(projection.out_features for projection in projections)
        roles = tuple("query" if p in spec.query else "key_value" if p in spec.key_value else "other" for p in parts)
        if sum(widths) == fused.out_features and set(roles) != {"other"}:  # else not a fusion of these: runs whole
            yield child, roles, widths


def _column_blocks(path: str, module: torch.nn.Module, roles: tuple[str, ...],
                   proportions: tuple[int, ...] | None = None) -> list[tuple[str, int, int]]:
    """``[(role, first column, end column)]`` of a fused linear, adjacent blocks of one role merged. The widths are
    the linear's ``_tp_packed_col_blocks``, else the plan's proportions (``JointAttention.fused_blocks``) scaled to
    its output features."""
    widths = getattr(module, "_tp_packed_col_blocks", None)
    if widths is None and proportions is None:
        raise ValueError(f"{path}: the plan names it as a fused projection, but it has no _tp_packed_col_blocks "
                         "(its column layout) and the plan gives no fused_blocks for it")
    if widths is None:
        if module.out_features % sum(proportions):
            raise ValueError(f"{path}: the plan's fused_blocks {proportions} do not divide its "
                             f"{module.out_features} output features")
        widths = [module.out_features // sum(proportions) * part for part in proportions]
    if len(widths) != len(roles) or sum(widths) != module.out_features:
        raise ValueError(f"{path}: the plan gives {len(roles)} column roles {roles}, but its column blocks are "
                         f"{list(widths)} for {module.out_features} output features")
    blocks: list[tuple[str, int, int]] = []
    start = 0
    for role, width in zip(roles, widths):
        if blocks and blocks[-1][0] == role:
            blocks[-1] = (role, blocks[-1][1], start + width)
        else:
            blocks.append((role, start, start + width))
        start += width
    return blocks


def _reuse_hooks(
    path: str, block: torch.nn.Module, plan: BlockPlan, attention: list[tuple[str, torch.nn.Module, JointAttention]]
) -> Iterator[tuple[torch.nn.Module, SequenceReuseHook]]:
    """Reuse hooks for the plan's conditioning modules and for the key/value side of every attention module in the
    block that does not exchange K/V (cross-attention)."""
    for name in plan.conditioning:
        module = _submodule(block, name)
        if module is not None:
            yield module, SequenceReuseHook(f"{path}.{name}")
    exchanged = {id(module) for _, module, _ in attention}
    for name, module in block.named_modules():
        if id(module) in exchanged or not hasattr(module, "processor"):
            continue
        for child in _CROSS_ATTENTION_KEY_VALUE:
            submodule = getattr(module, child, None)
            if isinstance(submodule, torch.nn.Module):
                yield submodule, SequenceReuseHook(f"{path}.{name}.{child}")


def _called_children(module: torch.nn.Module, prefix: str = "") -> Iterator[tuple[str, torch.nn.Module]]:
    """The model's children by path, containers (``ModuleDict`` / ``ModuleList``, never called themselves) replaced by
    their elements (a model calling ``embedders["image"]`` calls the element, never the dict)."""
    for name, child in module.named_children():
        if isinstance(child, (torch.nn.ModuleDict, torch.nn.ModuleList)):
            yield from _called_children(child, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", child


def _submodule(model: torch.nn.Module, path: str) -> torch.nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def _apply_model_level(model: torch.nn.Module, plan: SequencePlan, config: SequenceChunkingConfig,
                       report: SequenceChunkingReport, blocks: list[torch.nn.Module]) -> None:
    """Hooks for the output head and the per-token producers (only when every block is chunked)."""
    if report.skipped:
        report.skipped.append(("<model>", "output head and producers run whole because some blocks are unchunked"))
        return
    foreign = _foreign_hooks(model)
    if foreign:
        report.skipped.append(("<model>", f"carries hooks {foreign}; output head and producers run whole"))
        return
    for path, producer in plan.producers.items():
        module = _submodule(model, path)
        if module is None:
            report.skipped.append((path, "producer named in the plan does not exist"))
            continue
        register_memopt_hook(module, SequenceProducerHook(path, producer), SEQUENCE_PRODUCER_HOOK)
        report.producers.append(path)
    for paths in plan.token_chains:
        modules = [_submodule(model, path) for path in paths]
        if None in modules:
            report.skipped.append((paths[modules.index(None)], "token-chain module named in the plan does not exist"))
            continue
        chain = TokenChain(paths, config.num_chunks)
        register_memopt_hook(modules[0], TokenChainHook(chain, modules[1:]), SEQUENCE_CHAIN_HOOK)
        for position, (path, module) in enumerate(zip(paths[1:], modules[1:]), start=1):
            register_memopt_hook(module, TokenChainPassHook(chain, path, position), SEQUENCE_CHAIN_HOOK)
        report.token_chains.append(chain.name)
    gather = plan.gather
    if gather is None:
        cp_plan = getattr(model, "_cp_plan", None) or {}
        gather = {k: v for k, v in cp_plan.items() if isinstance(v, ContextParallelOutput)}
    tail = _submodule(model, plan.tail) if config.chunk_tail and plan.tail else None
    gather_modules = {path: _submodule(model, path) for path in gather}
    head = tail is not None and plan.tail_split is not None
    if head:  # the head runs in pieces of its own input (SequencePlan.tail_split): no tail passes
        register_memopt_hook(tail, SequenceHeadHook(plan.tail, plan.tail_split, gather[plan.tail], config.num_chunks),
                             SEQUENCE_HEAD_HOOK)
        report.tail = f"{plan.tail} in pieces of dim {plan.tail_split}"
    elif tail is not None and len(gather_modules) == 1 and None not in gather_modules.values():
        (gather_path, gather_module), = gather_modules.items()
        register_memopt_hook(tail, SequenceTailHook(plan.tail, dict(plan.tail_inputs)), SEQUENCE_TAIL_HOOK)
        register_memopt_hook(gather_module, SequenceGatherHook(gather_path, gather[gather_path]), SEQUENCE_GATHER_HOOK)
        report.tail = f"{plan.tail} -> {gather_path}"
        if any(offloaded(block) for block in blocks):
            report.skipped.append(("<model>", "blocks are group-offloaded: the output head runs whole while they are"))
    elif config.chunk_tail:
        report.skipped.append(("<model>", f"output head runs whole (tail {plan.tail!r}, gather {sorted(gather)})"))
    if report.tail and not head:
        embeds = (plan.embed,) if isinstance(plan.embed, str) else tuple(plan.embed or ())
        for embed_path in embeds:
            embed = _submodule(model, embed_path)
            if embed is not None:
                register_memopt_hook(embed, SequenceEmbedHook(), SEQUENCE_EMBED_HOOK)
            else:
                report.skipped.append((embed_path, "embedding named in the plan does not exist"))
        chained = (path for chain in plan.token_chains for path in chain)
        special = {*embeds, plan.tail, *gather, *plan.producers, *chained}
        for name, child in _called_children(model):
            if name not in special and not any(block is child or _contains(child, block) for block in blocks):
                register_memopt_hook(child, SequenceReplayHook(), SEQUENCE_REPLAY_HOOK)
    if (report.tail and not head) or report.producers:
        register_memopt_hook(model, SequenceModelHook(config, blocks, report.tail is not None and not head),
                             SEQUENCE_MODEL_HOOK)


def warn_if_launch_bound(device: torch.device, chunk_tokens: int, tokens: int) -> None:
    """Warn (once per message) when chunks on an accelerator are smaller than :data:`SMALL_CHUNK_TOKENS`.

    Each chunk launches the block's kernels again, on a few hundred rows: the device then waits for the host.
    Counted by ``benchmarks/sequence_work.py``: Flux.1 at 1024x1024 in its default 48 chunks (85 image tokens each)
    launches 499,000 kernels instead of 3,700, most of them a few microseconds long.
    """
    if device.type == "cpu" or chunk_tokens >= SMALL_CHUNK_TOKENS:
        return
    fewer = max(1, tokens // 1024)
    warnings.warn(
        f"sequence chunks of {chunk_tokens} tokens on {device.type}: kernels this small are launch-bound, so the "
        f"chunked forward can take several times the unchunked one; use fewer chunks (num_chunks={fewer} keeps 1,024 "
        "or more tokens in each) or memopt.apply_memory_optimizations, which takes the fewest chunks that fit the "
        "memory budget", stacklevel=2)


def apply_sequence_chunking(
    model: torch.nn.Module,
    num_chunks: int | None = None,
    *,
    inplace: bool | None = None,
    chunk_tail: bool = True,
    schedule: str = "two_pass",
    align: int = 128,
    training: bool = False,
    saved_inputs: str = "device",
    plan: SequencePlan | None = None,
) -> SequenceChunkingReport:
    """Run every transformer block of ``model`` in ``num_chunks`` sequence chunks with a K/V exchange.

    Args:
        model: a diffusers transformer with a plan in :data:`memopt.plans.sequence.SEQUENCE_PLANS` (59 classes:
            Wan, Flux, HunyuanVideo, CogVideoX, LTX-Video, QwenImage, SD3, Mochi, their kin, Nucleus-Image and four
            ControlNets),
            or any model with ``plan`` given; or Sana, Sana Video and the Sana ControlNet, whose blocks stream
            instead (one schedule, a banded backward with ``training``; ``align`` does not apply: bands are whole
            rows or frames; see :mod:`memopt.hooks._streamed_blocks`).
        num_chunks: chunks per block; ``None`` takes the plan's default. See :class:`SequenceChunkingConfig`.
        inplace: see :class:`SequenceChunkingConfig`. ``None`` (default): on with the model's built-in plan unless
            it says the model keeps its blocks' outputs (``SequencePlan.keeps_block_outputs``: a ControlNet returns
            them all as residuals; written over, each would be the next block's output), off with a ``plan`` given
            for another class, whose forward may do the same. ``True`` with such a plan is refused.
        chunk_tail: see :class:`SequenceChunkingConfig`.
        schedule: ``"two_pass"`` (default, the memory floor) or ``"lockstep"`` (no recomputation, more memory);
            see :class:`SequenceChunkingConfig`.
        align: token multiple the chunk boundaries fall on (1: the most even split); see
            :class:`SequenceChunkingConfig`.
        training: also chunk blocks while autograd records, with a chunked recomputing backward; see
            :class:`SequenceChunkingConfig`.
        saved_inputs: with ``training``, ``"device"`` or ``"host"``: where the blocks' saved inputs wait for the
            backward; see :class:`SequenceChunkingConfig`.
        plan: a :class:`~memopt.plans.sequence.SequencePlan` to use instead of the built-in one.

    Returns:
        A :class:`SequenceChunkingReport` listing the chunked blocks, the attention modules exchanging K/V, the
        model-level pieces and what runs unchunked (with the reason).

    Raises:
        ValueError: no plan for the model, a plan naming arguments the blocks do not take, no block matched,
            ``inplace=True`` for a model that keeps its blocks' outputs, or diffusers' step caches on the model
            (First Block Cache, FasterCache, ...; also at a forward, for a cache enabled after this call).
            Hooks already registered by the call are removed again: nothing stays half-applied.

    Undo with ``memopt.remove_memory_optimizations(model)``. Under autograd only with ``training=True``. Combines
    with memopt's FeedForward chunking (apply that first: where its hook sits on a whole block, this one must wrap
    it) and with diffusers' group offloading (apply that after, as ``memopt.hooks.offload.apply_offloading`` does,
    so it wraps the block hook and a block's weights move once for all chunks; while blocks are offloaded the output
    head runs whole, see :class:`SequenceModelHook`).

    Example::

        import torch
        from memopt import apply_sequence_chunking, remove_memory_optimizations
        from memopt.models import get_family

        spec = get_family("wan")
        model = spec.build("tiny")
        inputs = spec.make_inputs(model.config, batch_size=2)
        with torch.no_grad():
            reference = model(**inputs)[0]
            print(apply_sequence_chunking(model, num_chunks=4))
            chunked = model(**inputs)[0]
        print(((chunked - reference).norm() / reference.norm()).item())   # ~1e-7
        remove_memory_optimizations(model)
    """
    refuse_under_step_caches(model, "sequence chunking")
    streamed = STREAMED_MODELS.get(type(model).__name__) if plan is None else None
    own_plan = plan is None or plan is SEQUENCE_PLANS.get(type(model).__name__)
    plan = plan if plan is not None or streamed is not None else sequence_plan(model)
    keeps_block_outputs = (streamed or plan).keeps_block_outputs
    if inplace is None:
        inplace = own_plan and not keeps_block_outputs
    elif inplace and keeps_block_outputs:
        raise ValueError(f"{type(model).__name__} keeps its blocks' outputs (SequencePlan.keeps_block_outputs: "
                         "residuals it returns, or long skip connections), which inplace=True would overwrite with the "
                         "next block's; leave inplace at None")
    if streamed is not None:
        config = SequenceChunkingConfig(num_chunks=STREAMED_CHUNKS if num_chunks is None else num_chunks,
                                        inplace=inplace, chunk_tail=chunk_tail, schedule=schedule, align=align,
                                        training=training, saved_inputs=saved_inputs)
        return _apply_streamed(model, streamed, config)
    num_chunks = plan.num_chunks if num_chunks is None else num_chunks
    config = SequenceChunkingConfig(num_chunks=num_chunks, inplace=inplace, chunk_tail=chunk_tail, schedule=schedule,
                                    align=align, training=training, saved_inputs=saved_inputs)
    if schedule == "lockstep":
        _greenlet_class()  # fail at apply time, not at the first forward
    report = SequenceChunkingReport(type(model).__name__, config.num_chunks, plan.source, config.schedule)
    with removed_on_error(model):
        TransformerBlockRegistry._register()
        chunked_prefixes: list[str] = []
        blocks: list[torch.nn.Module] = []
        for path, block, block_plan in _iter_blocks(model, plan):
            if any(path.startswith(prefix + ".") for prefix in chunked_prefixes):
                continue
            if block_plan is None:
                report.skipped.append((path, f"{type(block).__name__} is not in the plan"))
                continue
            metadata = _block_metadata(block, block_plan)
            reason, attention = _prepare_block(path, block, block_plan, metadata)
            if reason is not None:
                report.skipped.append((path, reason))
                continue
            routed = _routed_layers(path, block, block_plan, config)
            hook = SequenceChunkingHook(config, path, block_plan, metadata, attention, routed)
            register_memopt_hook(block, hook, SEQUENCE_BLOCK_HOOK)
            for name, layer, _ in routed:
                register_memopt_hook(layer, SequenceRoutingHook(f"{path}.{name}"), SEQUENCE_ROUTING_HOOK)
                report.routed.append(f"{path}.{name}")
            for name, attention_module, _ in attention:
                register_memopt_hook(attention_module, SequenceAttentionHook(), SEQUENCE_ATTENTION_HOOK)
                report.attention.append(f"{path}.{name}")
            for module, skip_hook in _skip_hooks(path, block, block_plan, attention):
                register_memopt_hook(module, skip_hook, SEQUENCE_SKIP_HOOK)
            for module, reuse_hook in _reuse_hooks(path, block, block_plan, attention):
                register_memopt_hook(module, reuse_hook, SEQUENCE_REUSE_HOOK)
            report.blocks.append(path)
            blocks.append(block)
            chunked_prefixes.append(path)
        if not report.blocks:
            raise ValueError(f"no block of {type(model).__name__} matched the sequence plan {sorted(plan.blocks)}:\n"
                             f"{report}")
        report.held = _hold_when_used(blocks)
        _apply_model_level(model, plan, config, report, blocks)
        if training:
            register_memopt_hook(model, SequenceTrainingHook(blocks, saved_inputs), SEQUENCE_TRAINING_HOOK)
    return report


STREAMED_CHUNKS = 8
"""Default bands of a streamed model (Sana's): its blocks hold one band, so a few suffice."""


def _apply_streamed(model: torch.nn.Module, streamed: StreamedModel,
                    config: SequenceChunkingConfig) -> SequenceChunkingReport:
    """Sana's models: every block streamed in bands of whole rows (frames) (:mod:`._streamed_blocks`), the linear
    attention's key sums taken in a first sweep, no K/V to exchange; with ``chunk_tail`` the output norm runs in
    token chunks."""
    name = type(model).__name__
    if config.schedule != "two_pass":
        raise ValueError(f"{name}'s blocks are streamed (Sana's FeedForward convolves neighbouring tokens), in the one "
                         f"schedule; got schedule={config.schedule!r}")
    report = SequenceChunkingReport(name, config.num_chunks, "memopt.hooks._streamed_blocks (streamed bands)")
    with removed_on_error(model):
        blocks = []
        for index, block in enumerate(model.get_submodule(streamed.blocks)):
            path = f"{streamed.blocks}.{index}"
            reason = streaming_refusal(block)
            if reason is not None:
                report.skipped.append((path, reason))
                continue
            hook = StreamedBlockHook(path, config.num_chunks, config.inplace, SEQUENCE_BLOCK_HOOK, config.training,
                                     config.saved_inputs)
            register_memopt_hook(block, hook, SEQUENCE_BLOCK_HOOK)
            report.blocks.append(path)
            blocks.append(block)
        if not report.blocks:
            raise ValueError(f"no block of {name} can stream:\n{report}")
        if config.chunk_tail and streamed.norm is not None:
            norm = model.get_submodule(streamed.norm)
            register_memopt_hook(norm, ChunkedNormHook(config.num_chunks), SEQUENCE_TAIL_HOOK)
            report.tail = f"{streamed.norm} (token chunks)"
        if config.training:
            register_memopt_hook(model, SequenceTrainingHook(blocks, config.saved_inputs), SEQUENCE_TRAINING_HOOK)
    return report
