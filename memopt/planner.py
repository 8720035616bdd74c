"""Budget -> plan: chunk counts and offloading for one denoiser, chosen from simulated traces at the real shapes.

How a plan is made (:func:`plan_denoiser`):

1. **Simulate, don't guess.** A fake copy of the denoiser is built from its config (``type(model).from_config``
   under ``FakeTensorMode``, same dtype: nothing is allocated and the real weights are not touched), each candidate
   chunking is applied to it with memopt's own ``apply_*`` functions, and :func:`memopt.simulate` traces one forward
   on fake inputs with the shapes of the real call. The activation peak is therefore the tracer's exact storage
   count for this model class, size and chunking, not a formula. For the classes in :data:`REPEATED_LAYERS` the
   copy has three blocks per block list instead of 40: the blocks are identical and the residual stream has the same
   size after every block, so the activation peak does not depend on the depth (checked against full-depth traces
   for every class there in ``tests/test_planner.py``), and a simulation takes seconds at 720p instead of minutes.
2. **Weights on the device** follow from the module tree (:func:`memopt.hooks.offload.offload_groups`), per phase
   of the forward (:func:`phase_weights`): all of them when the denoiser is resident; with block-level group
   offloading and a prefetch stream, the top-level group plus, inside a block list, the block computing and the next
   one arriving (at most the largest block twice), before the first block the prefetched first block, and after the
   last block nothing else.
3. **Predicted peak** = other resident components + inputs + the largest (weights + activations) over the phases,
   with the activation peak of each phase taken from the simulated timeline.
4. **Predicted time** from a roofline-style model (:class:`DeviceProfile`): FLOPs counted by
   ``torch.utils.flop_counter`` on the same simulated forward (so the pre-attention work sequence chunking re-runs is
   in it), plus a fixed cost per aten op (chunking multiplies small ops), plus the transfer time group offloading
   cannot hide behind a block's compute. It is a model for *ranking* plans; ``benchmarks/gpu_pipeline.py`` measures.
5. **Choice**: among (resident | offloaded) x (no chunking, FeedForward shards, sequence chunks, both), the plan that
   fits the budget with the least predicted time. Memory falls monotonically with the chunk count, so each series is
   walked upwards until it fits, or until its savings, halving with each doubling, can no longer reach the budget
   (:data:`SAVING_MARGIN`). If nothing fits, :class:`BudgetError` says the smallest peak simulated, where more chunks
   would level out, and what dominates it.
6. **Training** (``training=True``): the same for one training step (forward with autograd, then backward), among
   the unmodified model, diffusers' gradient checkpointing and memopt's sequence chunks with their chunked
   recomputation; offloaded (only where the resident model does not fit), memopt's chunks alone, whose blocks onload
   their weights again for the backward. A step's peak grows with the depth (every block saves something for the
   backward), so it is extrapolated from the reduced copy and one copy per list with one block more (exact for
   identical blocks: ``tests/test_planner_training.py``); the trainable parameters' gradients on the device are added
   to the weights.

Example::

    import torch
    from memopt.models import get_family
    from memopt.planner import plan_denoiser

    spec = get_family("wan")
    model = spec.build("tiny")
    inputs = spec.make_inputs(model.config, batch_size=1, height=96, width=160, num_frames=9)
    plan = plan_denoiser(model, (), inputs, budget="320KiB", device="cpu")
    print(plan)                      # chunking chosen, predicted peak and slowdown
    plan.apply(model)                # the hooks; the forward is unchanged up to float reordering
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException, FakeTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.flop_counter import (
    FlopCounterMode,
    flop_registry,
    sdpa_backward_flop_count,
    sdpa_flop_count,
    shape_wrapper,
)

from .hooks._common import remove_memopt_hooks, step_cache_hooks
from .hooks._linear_attention import has_linear_attention
from .hooks.offload import OffloadConfig, OffloadGroups, apply_offloading, module_bytes, offload_groups, place_on
from .trace.simulate import InputValues

GIB = 1024**3

_DUAL = {"num_layers": "transformer_blocks", "num_single_layers": "single_transformer_blocks"}
REPEATED_LAYERS: dict[str, dict[str, str | tuple[str, ...]]] = {
    **{name: {"num_layers": "blocks"} for name in (
        "WanTransformer3DModel", "ChronoEditTransformer3DModel", "SkyReelsV2Transformer3DModel",
        "HeliosTransformer3DModel", "AnyFlowTransformer3DModel")},
    **{name: _DUAL for name in (
        "FluxTransformer2DModel", "Flux2Transformer2DModel", "BriaTransformer2DModel", "LongCatImageTransformer2DModel",
        "OvisImageTransformer2DModel", "HunyuanVideoTransformer3DModel", "HunyuanImageTransformer2DModel",
        "HunyuanVideoFramepackTransformer3DModel")},
    **{name: {"num_layers": "transformer_blocks"} for name in (
        "CogVideoXTransformer3DModel", "LTXVideoTransformer3DModel", "LTX2VideoTransformer3DModel",
        "QwenImageTransformer2DModel", "QwenImage21Transformer2DModel", "SD3Transformer2DModel",
        "MochiTransformer3DModel", "HunyuanVideo15Transformer3DModel", "CogView4Transformer2DModel",
        "GlmImageTransformer2DModel", "CogView3PlusTransformer2DModel", "MiniMaxH3Transformer3DModel",
        "PixArtTransformer2DModel", "AllegroTransformer3DModel", "DiTTransformer2DModel",
        "EasyAnimateTransformer3DModel", "CosmosTransformer3DModel", "Krea2Transformer2DModel",
        "SanaTransformer2DModel", "SanaVideoTransformer3DModel")},
    **{name: {"num_layers": "layers"} for name in (
        "Lumina2Transformer2DModel", "ErnieImageTransformer2DModel", "Ideogram4Transformer2DModel",
        "OmniGenTransformer2DModel")},
    "ZImageTransformer2DModel": {"n_layers": "layers"},
    "Kandinsky5Transformer3DModel": {"num_text_blocks": "text_transformer_blocks",
                                     "num_visual_blocks": "visual_transformer_blocks"},
    "Kandinsky6Transformer3DModel": {"num_visual_blocks": "visual_transformer_blocks"},
    "AuraFlowTransformer2DModel": {"num_mmdit_layers": "joint_transformer_blocks",
                                   "num_single_dit_layers": "single_transformer_blocks"},
    "Cosmos3OmniTransformer": {"num_hidden_layers": "layers"},
    "JoyImageEditTransformer3DModel": {"num_layers": "double_blocks"},
    "JoyImageEditPlusTransformer3DModel": {"num_layers": "double_blocks"},
    "PRXTransformer2DModel": {"depth": "blocks"},
    # one key sizes the text's and each image mode's blocks (the image modes' lists sit in a ModuleDict)
    "Flux3Transformer2DModel": {"num_layers": ("txt_mode_blocks", "mode_blocks.image", "mode_blocks.image_cond"),
                                "num_single_layers": "single_transformer_blocks"},
}
"""Per class: config key -> the ``ModuleList`` of identical blocks it sizes (or the lists, by path, when it sizes
several), in the order they run. Simulations keep
:data:`SIMULATED_BLOCKS` of each list and scale FLOPs and op counts to the real depth; a class not listed is simulated
at its full depth (exact, slower). Each entry is checked against a full-depth simulation (``tests/test_planner.py``).
Left out because a shallower copy is not the same model: Wan VACE and Bria Fibo 2 (config lists of block indices that
take hints or injections), Motif-Video (its last ``num_decoder_layers`` single blocks are decoders), Chroma (its
modulation approximator's output grows with the depth: 6% of the tiny peak), HunyuanDiT (U-ViT skips pair the blocks),
models whose side lists follow the depth (Wan Animate's face adapters, ConsisID's perceiver attention, Bria Fibo's and
HiDream's caption projections: HiDream projects every block's Llama states before the first block, so its peak grows
with the depth), and Nucleus-Image (which blocks are MoE layers, and their capacity factors, follow the depth)."""

SIMULATED_BLOCKS = 3
"""Blocks kept per list in a simulation: a first, a middle and a last block. The first and the last can differ from
the others (the first gets the patch embedding's output, which may be a non-contiguous view, and builds what later
blocks reuse, such as the rotary grid indices of sequence chunks; the last is built without the text-stream update in
SD3 and Mochi, and its output is what a chunked output head reads), and a middle block can differ from the first (with
two blocks, SD3's chunked peak came out 3.8% low and Z-Image's training step 13.7% low at the tiny size). FLOPs and op
counts are scaled from the middle block."""

FEEDFORWARD_SERIES = (2, 4, 8)
SEQUENCE_SERIES = (2, 4, 8, 16, 32, 64)
LOCKSTEP_SERIES = (4, 8, 16)
"""Lock-step holds every chunk's pre-attention state at once, so more chunks lower its peak little (Wan: 7.2 LD per
token at 32 chunks) while each costs a simulation: it is tried at a few counts."""
SEQUENCE_FEEDFORWARD_SERIES = (2, 4, 8)
SAVING_MARGIN = 2
"""Along a series (counts doubling) chunking divides the chunked part of a peak by the count, so each doubling saves
half of what the one before saved and all further doublings together save at most the last saving. A series stops
where even ``SAVING_MARGIN`` times that (room for peaks falling slower than 1/count) leaves its peak over the budget:
Wan2.1-14B at 720p offloaded, asked for 2.1 GiB, stops at 4 sequence chunks (5.88 GiB after savings of 1.82 GiB from
2, then 0.91 GiB, ... down to 4.18 GiB at 64) instead of simulating 8 to 64 chunks, 23 of the 32 s it took to say that
nothing fits."""
SEQUENCE_FEEDFORWARD_CHUNKS = 4
"""FeedForward shards combined with a few sequence chunks, where one chunk's FF intermediate can still be the largest
tensor of a block (with more chunks it is small anyway, and the shards would only add ops)."""
LINEAR_ATTENTION_SERIES = (4, 8, 16)
"""Token chunks (fractions of the tokens) of a linear attention's calls (Sana's), tried with the FeedForward in
:data:`SEQUENCE_FEEDFORWARD_CHUNKS` shards for models with linear attention: a call then holds its output and one
chunk, and nothing else is rerun or streamed."""


CUDA_RUNTIME_OVERHEAD_BYTES = 64 * 1024**2
"""Device memory a CUDA forward holds beyond the tensors the tracer counts: cuBLAS workspaces (one per stream that
runs matmuls) and attention-kernel scratch allocated inside ops. Measured on an H100 with Wan2.1-14B at 720p under
group offloading: 60 MiB above the prediction (``benchmarks/results/gpu_pipeline_h100.md``). Added to every CUDA
prediction so a plan that fits on paper fits on the device."""


# ------------------------------------------------------------------------------------------------ units
_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1000, "kib": 1024, "m": 1024**2, "mb": 1000**2, "mib": 1024**2,
          "g": 1024**3, "gb": 1000**3, "gib": 1024**3, "t": 1024**4, "tb": 1000**4, "tib": 1024**4}


def parse_budget(budget: int | float | str) -> int:
    """Bytes from ``8589934592``, ``"8GiB"``, ``"8 GiB"``, ``"8GB"`` (10^9), ``"8G"`` (binary), ``"512MiB"``.

    Raises ``ValueError`` for anything else (a negative or zero amount, an unknown unit).
    """
    if isinstance(budget, bool) or not isinstance(budget, (int, float, str)):
        raise TypeError(f"budget must be a number of bytes or a string like '8GiB', got {type(budget).__name__}")
    if isinstance(budget, str):
        match = re.fullmatch(r"\s*([+-]?[0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", budget)
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _UNITS:
            raise ValueError(f"cannot read the budget {budget!r}: use bytes (an int) or a number with one of the units "
                             "B, KiB, MiB, GiB, TiB (binary; K/M/G/T too) or KB, MB, GB, TB (decimal), e.g. '8GiB'")
        value = float(match.group(1)) * _UNITS[unit]
    else:
        value = float(budget)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"the budget must be a positive amount of memory, got {budget!r}")
    return int(value)


def format_bytes(nbytes: int | float) -> str:
    """``1.50 GiB``, ``12.0 MiB``, ``512 B``: binary units, three significant digits."""
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.3g} {unit}" if value < 100 else f"{value:.0f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


# ------------------------------------------------------------------------------------------------ time model
@dataclass(frozen=True)
class DeviceProfile:
    """Speeds of the time model (:func:`estimate_time`).

    Attributes:
        name: what the numbers describe (``"H100 defaults"``, ``"measured on NVIDIA H100 80GB HBM3"``).
        flops_per_s: sustained dense-matmul throughput at the model's dtype.
        h2d_bytes_per_s: host-to-device copy bandwidth from pinned memory (what group offloading moves).
        op_overhead_s: fixed cost per aten op (dispatch and kernel launch); what many small chunks pay for.
    """

    name: str
    flops_per_s: float
    h2d_bytes_per_s: float
    op_overhead_s: float

    @classmethod
    def defaults(cls, device: str | torch.device, dtype: torch.dtype = torch.bfloat16) -> "DeviceProfile":
        """Typical figures: an H100 over PCIe 5 for CUDA (400 TFLOP/s bf16, 50 TFLOP/s fp32, 25 GB/s pinned H2D,
        8 us per op); 2 core-years-old CPU figures otherwise (only used to rank chunkings there)."""
        if torch.device(device).type == "cuda":
            flops = 4e14 if dtype in (torch.bfloat16, torch.float16) else 5e13
            return cls("H100 defaults", flops, 2.5e10, 8e-6)
        return cls("CPU defaults", 1e11, 1e10, 2e-5)

    @classmethod
    def measure(cls, device: str | torch.device, dtype: torch.dtype = torch.bfloat16) -> "DeviceProfile":
        """Measure matmul throughput, pinned H2D bandwidth and per-op overhead on a CUDA device (about 0.3 s)."""
        device = torch.device(device)
        if device.type != "cuda":
            return cls.defaults(device, dtype)
        flops, copy_bytes, op = _measure_speeds(device, dtype)
        torch.cuda.empty_cache()  # the test buffers are gone with _measure_speeds' frame
        return cls(f"measured on {torch.cuda.get_device_name(device)}", flops, copy_bytes, op)


def _measure_speeds(device: torch.device, dtype: torch.dtype) -> tuple[float, float, float]:
    """``(matmul FLOP/s, pinned H2D bytes/s, seconds per small op)`` on a CUDA device."""
    a = torch.randn(8192, 8192, device=device, dtype=dtype)
    host = torch.empty(256 * 1024**2, dtype=torch.uint8).pin_memory()
    small = torch.ones(16, device=device)

    def timed(fn: Callable[[], Any], repeats: int) -> float:
        fn()
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize(device)
        return (time.perf_counter() - start) / repeats

    matmul = timed(lambda: a @ a, 10)
    copy = timed(lambda: host.to(device, non_blocking=True), 4)
    op = timed(lambda: small.add_(1), 200)
    return 2 * 8192**3 / matmul, host.numel() / copy, op


# ------------------------------------------------------------------------------------------------ chunking
@dataclass(frozen=True)
class Chunking:
    """The memopt hooks a plan puts on a denoiser (0 = that hook is not used).

    Attributes:
        sequence_chunks: ``apply_sequence_chunking(model, num_chunks=...)``: every block runs over this many
            sequence chunks, one after another; attention still sees every chunk's keys and values.
        feedforward_chunks: ``apply_chunked_feedforward(model, num_chunks=..., split="hidden")``: every FeedForward
            runs as this many TP-equivalent shards of its hidden width, accumulated into one output.
        attention_chunk: ``apply_chunked_attention(model, query_chunk=...)``: linear-attention calls (Sana's) run in
            sweeps of this many tokens, and every attention kernel call in pieces of this many queries.
        chunk_tail: with sequence chunks, also run the output head (norm, modulation, projection after the last
            block) chunk by chunk (``apply_sequence_chunking(chunk_tail=...)``). The head is chunked by re-running
            the model's forward per chunk with the blocks answering from the saved last output, so every block is
            *called* again per chunk: with group offloading that would onload every block again, so offloaded plans
            keep the head whole (it then runs with only the top-level weights on the device).
        schedule: with sequence chunks, ``"two_pass"`` (the part of each block before attention runs twice, at about
            3 LD) or ``"lockstep"`` (nothing rerun, every chunk's pre-attention state alive at once: about twice the
            memory, less time; see :func:`memopt.apply_sequence_chunking`).
        training: planned for a training step (forward with autograd, then backward) instead of a forward: sequence
            chunks are applied with ``training=True`` (blocks save only their inputs and are recomputed chunk by
            chunk in the backward).
        checkpointing: diffusers' own gradient checkpointing (``enable_gradient_checkpointing``, through
            :func:`memopt.hooks.checkpointing.apply_gradient_checkpointing`); training plans only.
        saved_inputs: with training sequence chunks, ``"device"`` or ``"host"``: where the blocks' saved inputs
            wait for the backward (``apply_sequence_chunking(saved_inputs=...)``); planned on CUDA only (on the CPU
            the host is the device).
    """

    sequence_chunks: int = 0
    feedforward_chunks: int = 0
    attention_chunk: int = 0
    chunk_tail: bool = True
    schedule: str = "two_pass"
    training: bool = False
    checkpointing: bool = False
    saved_inputs: str = "device"

    @property
    def is_empty(self) -> bool:
        return not (self.sequence_chunks or self.feedforward_chunks or self.attention_chunk or self.checkpointing)

    def describe(self) -> str:
        parts = []
        if self.checkpointing:
            parts.append("diffusers gradient checkpointing")
        if self.sequence_chunks:
            head = "" if self.chunk_tail else ", output head whole"
            schedule = "lock-step" if self.schedule == "lockstep" else "two-pass"
            backward = ", recomputed in chunks in the backward" if self.training else ""
            backward += ", saved inputs on the host" if self.saved_inputs == "host" else ""
            parts.append(f"{self.sequence_chunks} sequence chunks ({schedule}{head}{backward})")
        if self.feedforward_chunks:
            parts.append(f"FeedForward in {self.feedforward_chunks} hidden shards")
        if self.attention_chunk:
            parts.append(f"attention in {self.attention_chunk}-token chunks")
        return " + ".join(parts) or "no chunking"

    def apply(self, model: torch.nn.Module) -> list[Any]:
        """Register the hooks on ``model``; return the ``apply_*`` reports."""
        reports = []
        # FeedForward first: where its hook sits on a whole block (Flux / HunyuanVideo single blocks) the sequence
        # hook must wrap it, so each sequence chunk runs the sharded FeedForward (the other way round the
        # FeedForward hook skips those blocks: a forward-replacing hook is already on them).
        if self.feedforward_chunks:
            from .hooks.feedforward import apply_chunked_feedforward

            reports.append(apply_chunked_feedforward(model, num_chunks=self.feedforward_chunks, split="hidden"))
        if self.sequence_chunks:
            from .hooks.sequence import apply_sequence_chunking

            reports.append(apply_sequence_chunking(model, num_chunks=self.sequence_chunks, chunk_tail=self.chunk_tail,
                                                   schedule=self.schedule, training=self.training,
                                                   saved_inputs=self.saved_inputs))
        if self.attention_chunk:
            from .hooks.attention import apply_chunked_attention

            reports.append(apply_chunked_attention(model, query_chunk=self.attention_chunk))
        if self.checkpointing:
            from .hooks.checkpointing import apply_gradient_checkpointing

            reports.append(apply_gradient_checkpointing(model))
        return reports


def candidate_series(tokens: int | None = None, training: bool = False, host: bool = False,
                     linear_attention: bool = False) -> list[list[Chunking]]:
    """The chunkings the planner tries, as series ordered by increasing chunk count (memory falls along each).

    ``tokens`` (image tokens per sample) caps the sequence chunk counts: more chunks than tokens run as one chunk per
    token, the same as ``tokens`` chunks. For a training step (``training``): the unmodified model, diffusers' gradient
    checkpointing (blocks save their inputs and are recomputed whole), and memopt's sequence chunks recomputed chunk
    by chunk, which also bound a block's backward workspace by a chunk's; with ``host`` (a CUDA device), the same
    with the blocks' saved inputs in host memory, tried only when nothing before fits (the transfers cost time).
    With ``linear_attention`` (a model whose attention modules include linear ones, Sana's), also the FeedForward
    shards with the attention in token chunks (:data:`LINEAR_ATTENTION_SERIES`, as fractions of ``tokens``).
    """
    def counts(series: tuple[int, ...]) -> list[int]:
        return [n for n in series if tokens is None or n <= tokens]

    if training:
        return [
            [Chunking(training=True)],
            [Chunking(training=True, checkpointing=True)],
            [Chunking(sequence_chunks=n, training=True) for n in counts(SEQUENCE_SERIES)],
            *([[Chunking(sequence_chunks=n, training=True, saved_inputs="host") for n in counts(SEQUENCE_SERIES)]]
              if host else []),
        ]
    return [
        [Chunking()],
        [Chunking(feedforward_chunks=k) for k in FEEDFORWARD_SERIES],
        [Chunking(sequence_chunks=n) for n in counts(SEQUENCE_SERIES)],
        # Lock-step reruns nothing: where its larger peak fits, it is the faster of the two schedules.
        [Chunking(sequence_chunks=n, schedule="lockstep") for n in counts(LOCKSTEP_SERIES)],
        [Chunking(sequence_chunks=n, feedforward_chunks=SEQUENCE_FEEDFORWARD_CHUNKS)
         for n in counts(SEQUENCE_FEEDFORWARD_SERIES)],
        *([[Chunking(feedforward_chunks=SEQUENCE_FEEDFORWARD_CHUNKS, attention_chunk=-(-tokens // n))
            for n in counts(LINEAR_ATTENTION_SERIES)]] if linear_attention and tokens else []),
    ]


# ------------------------------------------------------------------------------------------------ simulation
@dataclass(frozen=True)
class PhasePeak:
    """The largest activation footprint within one phase of the forward, and where it is."""

    bytes: int
    module: str
    op: str


@dataclass(frozen=True)
class Estimate:
    """One chunking simulated at the real input shapes.

    Attributes:
        chunking: what was applied to the fake copy.
        phases: activation peak per phase of the forward, in execution order: ``"before"`` the first block,
            each block list (``"blocks"``, ``"transformer_blocks"``, ...), ``"between"`` two lists, ``"after"``
            the last block. With offloading, each phase has different weights on the device.
        flops: FLOPs of the forward at the real depth (the simulated depth scaled per block list).
        num_ops: aten ops of the forward at the real depth.
        block_flops / block_ops: per block list, one block's FLOPs and ops (for the offloading overlap).
        host_bytes: bytes copied to host memory and back (a training step's saved inputs with
            ``saved_inputs="host"``).
        assumptions: worst cases the simulation assumed for values computed from the weights
            (:mod:`memopt.trace.stand_ins`): the peaks are upper bounds.
        error: why the chunking could not be applied to this model (then the other fields are meaningless).
    """

    chunking: Chunking
    phases: dict[str, PhasePeak] = field(default_factory=dict)
    flops: float = 0.0
    num_ops: int = 0
    block_flops: dict[str, float] = field(default_factory=dict)
    block_ops: dict[str, int] = field(default_factory=dict)
    host_bytes: float = 0.0
    assumptions: tuple[str, ...] = ()
    error: str | None = None

    @property
    def activation(self) -> PhasePeak:
        """The activation peak of the whole forward (the tracer's ``peak_bytes``)."""
        return max(self.phases.values(), key=lambda peak: peak.bytes, default=PhasePeak(0, "", ""))


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype most floating-point weight bytes have (what the model computes in)."""
    counts: dict[torch.dtype, int] = {}
    for param in model.parameters():
        if param.is_floating_point():
            counts[param.dtype] = counts.get(param.dtype, 0) + param.numel()
    return max(counts, key=counts.get) if counts else torch.float32


def trainable_bytes(model: torch.nn.Module) -> int:
    """Bytes of the gradients a training step makes: one per parameter that requires grad."""
    return sum(param.numel() * param.element_size() for param in model.parameters() if param.requires_grad)


def device_gradient_bytes(model: torch.nn.Module, offload: OffloadConfig | None,
                          groups: OffloadGroups | None = None) -> int:
    """Bytes of the gradients a training step keeps on the device: every trainable parameter's when resident;
    offloaded, the top level's and one group's, since each group's travel with its weights
    (:func:`memopt.hooks.offload.onloaded`). ``groups``: the offloading groups, when already computed."""
    if offload is None:
        return trainable_bytes(model)
    groups = groups or offload_groups(model, offload.offload_type, offload.num_blocks_per_group)
    return groups.device_gradient_bytes()


def input_bytes(args: Any, kwargs: Any) -> int:
    """Bytes of the distinct tensor storages among the forward's inputs."""
    seen: dict[Any, int] = {}
    for leaf in tree_flatten((args, kwargs))[0]:
        if isinstance(leaf, torch.Tensor):
            storage = leaf.untyped_storage()
            seen[storage._cdata] = storage.nbytes()
    return sum(seen.values())


def block_lists(model: torch.nn.Module) -> list[str]:
    """Names of the model's top-level ``ModuleList``/``Sequential`` children: the lists group offloading cuts."""
    return [name for name, child in model.named_children()
            if isinstance(child, (torch.nn.ModuleList, torch.nn.Sequential))]


def repeated_lists(class_name: str) -> list[tuple[str, str]]:
    """``(config key, block list path)`` of each list :data:`REPEATED_LAYERS` gives ``class_name``, in order."""
    return [(key, path) for key, paths in REPEATED_LAYERS.get(class_name, {}).items()
            for path in ((paths,) if isinstance(paths, str) else paths)]


def _reduced_config(model: torch.nn.Module) -> tuple[dict[str, Any], dict[str, tuple[str, int, int]]]:
    """The config to simulate with and, per block list (by path), (its config key, real depth, simulated depth). A
    key is reduced when every list it sizes has the config's depth."""
    config = {key: value for key, value in dict(model.config).items() if not key.startswith("_")}
    lists: dict[str, list[tuple[str, torch.nn.Module | None]]] = {}
    for key, path in repeated_lists(type(model).__name__):
        lists.setdefault(key, []).append((path, _submodule(model, path)))
    depths: dict[str, tuple[str, int, int]] = {}
    for key, found in lists.items():
        if key in config and all(isinstance(blocks, torch.nn.ModuleList) and len(blocks) == config[key]
                                 for _, blocks in found):
            real, config[key] = config[key], min(config[key], SIMULATED_BLOCKS)
            depths.update({path: (key, real, config[key]) for path, _ in found})
    return config, depths


def _submodule(model: torch.nn.Module, path: str) -> torch.nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def _phases(modules: list[str], live_bytes: list[int], ops: list[str], lists: list[str]) -> dict[str, PhasePeak]:
    """Split the timeline into before / each block list / between / after and take each phase's peak."""
    def list_of(path: str) -> str | None:
        for name in lists:
            if path.startswith(name + "."):
                return name
        return None

    owners = [list_of(path) for path in modules]
    inside = [index for index, owner in enumerate(owners) if owner is not None]
    first, last = (inside[0], inside[-1]) if inside else (len(modules), -1)
    peaks: dict[str, PhasePeak] = {}
    for index, (owner, path, live, op) in enumerate(zip(owners, modules, live_bytes, ops)):
        phase = owner or ("before" if index < first else "after" if index > last else "between")
        if phase not in peaks or live > peaks[phase].bytes:
            peaks[phase] = PhasePeak(live, path, op)
    return peaks


@dataclass(frozen=True)
class _Run:
    """One traced forward (or training step) of a fake copy: its timeline, FLOPs per module and op count."""

    trace: Any
    flop_counts: dict[str, float]

    @property
    def flops(self) -> float:
        return float(self.flop_counts.get("Global", 0))


def simulate_chunking(
    model: torch.nn.Module,
    args: Sequence[Any],
    kwargs: dict[str, Any],
    chunking: Chunking,
    dtype: torch.dtype | None = None,
    round_to: int = 1,
) -> Estimate:
    """Trace one forward (a training step when ``chunking.training``) of a fake copy of ``model`` with ``chunking``
    applied, on fake inputs shaped like ``args`` / ``kwargs`` (real or fake tensors; only their shapes and dtypes are
    used).

    A forward's activation peak does not depend on the depth, so it is read from the reduced copy (see
    :data:`REPEATED_LAYERS`) and only FLOPs and ops are scaled to the real depth. A training step's peak does: every
    block saves something for the backward (all it computed unmodified, its inputs with checkpointing or memopt's
    recomputation). Its peak, FLOPs and ops are linear in each list's depth, so they are extrapolated from the
    reduced copy and one copy per list with one block more.
    """
    dtype = dtype or model_dtype(model)
    config, depths = _reduced_config(model)
    base = _simulate_once(model, config, args, kwargs, chunking, dtype, round_to)
    if isinstance(base, Estimate):
        return base
    if chunking.training:
        return _extrapolated(model, config, depths, base, args, kwargs, chunking, dtype, round_to)
    prefix = type(model).__name__
    flops, num_ops = base.flops, base.trace.num_ops
    block_flops: dict[str, float] = {}
    block_ops: dict[str, int] = {}
    for list_name, (_, real, simulated) in depths.items():
        middle = f"{list_name}.{simulated // 2}"  # the repeated kind (see SIMULATED_BLOCKS)
        block_flops[list_name] = float(base.flop_counts.get(f"{prefix}.{middle}", 0))
        block_ops[list_name] = _ops_inside(base.trace, middle)
        flops += (real - simulated) * block_flops[list_name]
        num_ops += (real - simulated) * block_ops[list_name]
    phases = _phases(base.trace.modules, base.trace.live_bytes, base.trace.ops, block_lists(model))
    return Estimate(chunking, phases, flops, num_ops, block_flops, block_ops,
                    assumptions=tuple(base.trace.meta["assumptions"]))


def _ops_inside(trace: Any, path: str) -> int:
    """Ops the trace ran inside the module at ``path``."""
    return sum(1 for module in trace.modules if module == path or module.startswith(path + "."))


def _extrapolated(model: torch.nn.Module, config: dict[str, Any], depths: dict[str, tuple[str, int, int]], base: _Run,
                  args: Sequence[Any], kwargs: dict[str, Any], chunking: Chunking, dtype: torch.dtype,
                  round_to: int) -> Estimate:
    """A training step at the real depth from the reduced copy and, per config key, a copy with one block more in
    the lists it sizes (a key sizing several lists shares the step's growth among them, for the offloading overlap,
    as their middle blocks share the reduced copy's ops: a training step counts FLOPs for the whole step only)."""
    trace = base.trace
    peak, flops, num_ops = float(trace.peak_bytes), base.flops, float(trace.num_ops)
    host = float(trace.meta.get("host_bytes", 0))
    block_flops: dict[str, float] = {}
    block_ops: dict[str, int] = {}
    by_key: dict[str, list[str]] = {}
    for list_name, (key, real, simulated) in depths.items():
        if real != simulated:
            by_key.setdefault(key, []).append(list_name)
    for key, list_names in by_key.items():
        _, real, simulated = depths[list_names[0]]
        deeper = _simulate_once(model, {**config, key: simulated + 1}, args, kwargs, chunking, dtype, round_to)
        if isinstance(deeper, Estimate):
            return deeper
        key_flops, key_ops = deeper.flops - base.flops, deeper.trace.num_ops - trace.num_ops
        middles = [_ops_inside(trace, f"{name}.{simulated // 2}") for name in list_names]
        shares = [m / sum(middles) for m in middles] if sum(middles) else [1 / len(list_names)] * len(list_names)
        block_flops.update({name: key_flops * share for name, share in zip(list_names, shares)})
        block_ops.update({name: round(key_ops * share) for name, share in zip(list_names, shares)})
        peak += (real - simulated) * (deeper.trace.peak_bytes - trace.peak_bytes)
        host += (real - simulated) * (deeper.trace.meta.get("host_bytes", 0) - trace.meta.get("host_bytes", 0))
        flops += (real - simulated) * key_flops
        num_ops += (real - simulated) * key_ops
    return Estimate(chunking, {"step": PhasePeak(int(peak), trace.peak_module, trace.peak_op)}, flops, int(num_ops),
                    block_flops, block_ops, host, assumptions=tuple(trace.meta["assumptions"]))


def _on_host(value: Any) -> Any:
    """A small real tensor in host memory, where the simulation reads its values; anything else unchanged."""
    if (not isinstance(value, torch.Tensor) or isinstance(value, FakeTensor) or value.device.type == "meta"
            or value.numel() > InputValues.MAX_ELEMENTS):
        return value
    return value.detach().to("cpu")


def _simulate_once(model: torch.nn.Module, config: dict[str, Any], args: Sequence[Any], kwargs: dict[str, Any],
                   chunking: Chunking, dtype: torch.dtype, round_to: int) -> _Run | Estimate:
    """Trace a fake copy built from ``config``; an :class:`Estimate` with ``error`` when it cannot be simulated."""
    from .trace import simulate

    names = list(_positional_names(model))
    if len(args) > len(names):
        raise TypeError(f"{type(model).__name__}.forward takes {len(names)} positional arguments, got {len(args)}")
    built: list[torch.nn.Module] = []

    def build() -> torch.nn.Module:
        # Frozen for a forward: FlopCounterMode's module tracker asserts on a module input that requires grad without
        # a grad_fn, which a view of a parameter made under no_grad is (FIBO 2's Perceiver queries latent_queries[:n]).
        copy = type(model).from_config(config).eval().requires_grad_(False)
        _mirror_construction(copy, model)
        if chunking.training:
            _mirror_training(copy, model)
        built.append(copy)
        return copy

    # Small real inputs go in as host tensors, whose values the simulation carries (a mask's token counts; see
    # memopt.trace.simulate.InputValues); the others as fake tensors like them.
    host_args, host_kwargs = tree_map(_on_host, (tuple(args), dict(kwargs)))

    def fake_inputs(copy: torch.nn.Module) -> dict[str, Any]:
        def like(value: Any) -> Any:
            if isinstance(value, torch.Tensor) and (isinstance(value, FakeTensor) or value.device.type != "cpu"
                                                    or value.numel() > InputValues.MAX_ELEMENTS):
                return torch.empty_strided(tuple(value.shape), tuple(value.stride()), dtype=value.dtype, device="cpu")
            return value

        fake_args, fake_kwargs = tree_map(like, (host_args, host_kwargs))
        inputs = {**dict(zip(names, fake_args)), **fake_kwargs}
        if chunking.training and not any(param.requires_grad for param in copy.parameters()):
            # Adapters only (LoRA): they are not in the copy, but the backward still runs through every block to
            # reach them, which a gradient for the latents (the forward's first argument: `hidden_states`, Z-Image's
            # list `x`) reproduces.
            inputs[names[0]] = tree_map(
                lambda value: value.requires_grad_() if isinstance(value, torch.Tensor) and value.is_floating_point()
                else value, inputs[names[0]])
        return inputs

    # FlopCounterMode attributes FLOPs to modules (the offloading overlap needs one block's), but its module
    # tracker's autograd hooks keep what a non-reentrant checkpoint frees alive and reject block inputs that are leaves
    # requiring grad (the recomputing backward's): a training step counts only the total.
    counter = _StepFlopCounter() if chunking.training else FlopCounterMode(display=False, custom_mapping=EXTRA_FLOPS)
    try:
        # Functions the model compiles itself (flex attention's kernel) run eagerly here: a compilation under the fake
        # tensors and tracing modes fails, and a failed one leaves dynamo refusing the model's next real forward.
        with counter, torch.compiler.set_stance("force_eager"):
            trace = simulate(build, fake_inputs, dtype=dtype, prepare=chunking.apply, round_to=round_to,
                             name=chunking.describe(), backward=chunking.training)
    except (DataDependentOutputException, DynamicOutputShapeException) as error:
        # The model's own forward branches on tensor values or makes data-dependent shapes from values its inputs do
        # not give, computed from its weights with no worst case known (memopt.trace.stand_ins has those): no fake
        # trace. Values of the inputs are carried (memopt.trace.simulate.InputValues).
        return Estimate(chunking, error=f"the forward of {type(model).__name__} depends on tensor values the "
                                        "simulation does not have (computed from its weights, or of inputs given as "
                                        f"fake tensors) ({type(error).__name__}: {error}), so it cannot be simulated")
    except (NotImplementedError, ValueError, TypeError, RuntimeError) as error:
        # Flex attention: the model's own (Kandinsky 6 SR's NABLA, AnyFlow-FAR's block mask) or a backend set with
        # set_attention_backend("flex"), whose failure sequence chunking re-raises as a RuntimeError naming the block.
        operator = re.search(r"no rule registered for HigherOrderOperator (\w+)", str(error))
        if operator:
            return Estimate(chunking, error=f"the forward of {type(model).__name__} calls the higher-order operator "
                                            f"{operator.group(1)} (its own code or an attention backend set to it), "
                                            "which memopt's memory tracer cannot simulate")
        # A hook that does not support this model (NotImplementedError, ValueError, TypeError), or a lock-step
        # refusal (a RuntimeError: a shared output modified in place while chunks are suspended); any other
        # RuntimeError is a fault, not a reason to try another chunking.
        lockstep_refusal = chunking.schedule == "lockstep"
        if isinstance(error, RuntimeError) and not isinstance(error, NotImplementedError) and not lockstep_refusal:
            raise
        return Estimate(chunking, error=f"{type(error).__name__}: {error}")
    finally:
        for copy in built:
            remove_memopt_hooks(copy)  # hooks may hold global interception state until removed
    if isinstance(counter, _StepFlopCounter):
        return _Run(trace, {"Global": float(counter.flops)})
    return _Run(trace, {name: float(sum(counts.values())) for name, counts in counter.get_flop_counts().items()})


def _cpu_flash_flops(query_shape, key_shape, value_shape, *_, **__) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_flash_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *_, **__) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def _addmm_flops(self_shape, a_shape, b_shape, *_, **__) -> int:
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]


def _baddbmm_flops(self_shape, a_shape, b_shape, *_, **__) -> int:
    return 2 * a_shape[0] * a_shape[1] * a_shape[2] * b_shape[2]


EXTRA_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_backward_flops,
    torch.ops.aten.addmm_: _addmm_flops,
    torch.ops.aten.baddbmm_: _baddbmm_flops,
}
"""FLOP formulas (on shapes) for ops torch has none for: the CPU flash kernel a fake forward takes (counted like the
CUDA ones) and its backward, and the in-place matmul accumulation of TP-equivalent FeedForward shards."""


class _StepFlopCounter(TorchDispatchMode):
    """The FLOPs of every op with a formula in ``torch.utils.flop_counter`` or :data:`EXTRA_FLOPS`, in total."""

    def __init__(self) -> None:
        super().__init__()
        self.formulas = {**flop_registry, **{op: shape_wrapper(formula) for op, formula in EXTRA_FLOPS.items()}}
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = self.formulas.get(func._overloadpacket)
        if formula is not None:
            self.flops += formula(*args, **kwargs, out_val=out)
        return out


def _mirror_construction(copy: torch.nn.Module, model: torch.nn.Module) -> None:
    """Give the fake copy what ``model`` was given after its construction, or refuse it by name.

    Attention processors set on the model (a pipeline installing the only processor that handles its grouped-query
    heads, as DreamLite's UNet does; an attention backend set on the processors) are shared with the copy when they
    hold no weights (an IP-Adapter processor's weights are the model's own tensors: such a copy runs its default).
    Fused projections (``fuse_qkv_projections()``: ``to_qkv`` / ``to_added_qkv`` built from the separate ones, which
    the fused processors read) are fused on the copy too. Submodules attached after construction (Z-Image's ControlNet
    takes its embedders and refiners from the transformer with ``from_transformer``) cannot be rebuilt from the
    config: refused, naming them.
    """
    attached = [name for name, child in model.named_children() if getattr(copy, name, None) is None]
    if attached:
        raise ValueError(f"{type(model).__name__}: {attached} were attached after construction (not built from its "
                         "config), so memopt cannot simulate it")
    copied = dict(copy.named_modules())
    for name, module in model.named_modules():
        processor = getattr(module, "processor", None)
        target = copied.get(name)
        if getattr(module, "fused_projections", False) and target is not None and not target.fused_projections:
            target.fuse_projections()
        if processor is None or target is None or not hasattr(target, "set_processor"):
            continue
        if not (isinstance(processor, torch.nn.Module) and any(True for _ in processor.parameters())):
            target.set_processor(processor)


def _mirror_training(copy: torch.nn.Module, model: torch.nn.Module) -> None:
    """Give the fake copy ``model``'s trainable parameters (by name; a PEFT-wrapped ``base_layer`` counts as the
    plain layer) and its diffusers gradient checkpointing switch."""
    trainable = {name.replace(".base_layer.", ".") for name, param in model.named_parameters() if param.requires_grad}
    for name, param in copy.named_parameters():
        param.requires_grad_(name in trainable)
    if getattr(model, "is_gradient_checkpointing", False):
        copy.enable_gradient_checkpointing()


def _positional_names(model: torch.nn.Module) -> Iterable[str]:
    forward = getattr(type(model), "forward")
    for name, param in list(inspect.signature(forward).parameters.items())[1:]:
        if param.kind in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD):
            yield name


def phase_weights(groups: OffloadGroups, offload: OffloadConfig | None, phases: Iterable[str]) -> dict[str, int]:
    """Weight bytes on the device in each phase of the forward.

    Resident: all of them throughout. Block-level offloading: the top-level group throughout, plus, in a block list,
    the block computing and (with a prefetch stream) the next one, which is the list's next block or the first of
    the next list; before the first block, the first block (prefetched while the embedders run); after the last
    block, nothing else (each block is offloaded when it returns). Between two lists, conservatively two of the
    largest blocks.
    """
    phases = list(phases)
    if offload is None:
        return {phase: groups.total_bytes for phase in phases}
    stream = 1 if offload.use_stream else 0
    largest: dict[str, int] = {}
    counts: dict[str, int] = {}
    for label, nbytes in groups.groups:
        list_name = label.rsplit(".", 1)[0]
        largest[list_name] = max(largest.get(list_name, 0), nbytes)
        counts[list_name] = counts.get(list_name, 0) + 1
    lists = [phase for phase in phases if phase in largest]
    top, overall = groups.top_level_bytes, groups.largest[1]
    weights = {"before": top + stream * (largest[lists[0]] if lists else 0), "after": top,
               "between": top + (1 + stream) * overall}
    for position, name in enumerate(lists):
        following = largest[lists[position + 1]] if position + 1 < len(lists) else 0
        same = largest[name] if counts[name] > 1 else 0
        weights[name] = top + largest[name] + stream * max(same, following)
    return {phase: weights.get(phase, top + (1 + stream) * overall) for phase in phases}


def estimate_time(estimate: Estimate, profile: DeviceProfile, groups: OffloadGroups | None,
                  offload: OffloadConfig | None) -> float:
    """Predicted seconds of one forward (or training step): compute (FLOPs and ops) plus the weight transfers compute
    cannot hide, plus the saved inputs' round trip to the host (on the compute stream)."""
    compute = (estimate.flops / profile.flops_per_s + estimate.num_ops * profile.op_overhead_s
               + 2 * estimate.host_bytes / profile.h2d_bytes_per_s)
    if offload is None or groups is None:
        return compute
    bandwidth = profile.h2d_bytes_per_s
    if estimate.chunking.training:
        # The backward onloads the top level and every block again, without prefetching, and moves each group's
        # gradients to the device and back (memopt.hooks.offload.onloaded).
        gradient_bytes = sum(groups.group_gradient_bytes) + groups.top_level_gradient_bytes
        compute += (groups.total_bytes + 2 * gradient_bytes) / bandwidth
    if not offload.use_stream:
        return compute + groups.total_bytes / bandwidth
    exposed = groups.top_level_bytes / bandwidth  # onloaded synchronously on entry
    for name, nbytes in groups.groups:
        list_name = name.rsplit(".", 1)[0]
        block = (estimate.block_flops.get(list_name, 0.0) / profile.flops_per_s
                 + estimate.block_ops.get(list_name, 0) * profile.op_overhead_s)
        exposed += max(0.0, nbytes / bandwidth - block)  # the next block arrives while this one computes
    return compute + exposed


# ------------------------------------------------------------------------------------------------ plans
class BudgetError(ValueError):
    """Nothing memopt can do fits the budget; the message says the smallest peak simulated and what dominates it."""


class UnplannableError(BudgetError):
    """The model's own forward cannot be simulated (it depends on values computed from its weights or of fake inputs,
    calls flex attention, or holds modules attached after construction), so no plan is made at any budget; the message
    says what applies directly."""


@dataclass
class Option:
    """One (placement, chunking) combination the planner considered, with its predicted peak.

    Attributes:
        chunking / offload: the combination (``offload=None``: the weights are not offloaded).
        phase: the phase of the forward where the predicted peak is.
        weight_bytes / activation_bytes: weights on the device and activations at that moment.
        peak_bytes: ``other resident + inputs + weights + activations`` at that moment.
        bound_bytes: the same with the most weights of any phase and the largest activations of any phase (the
            phase-blind upper bound: 2 x largest block + top-level group + activation peak with streams).
        time_s: the time model's forward time.
        peak: where the activations of ``phase`` peak.
    """

    chunking: Chunking
    offload: OffloadConfig | None
    phase: str
    weight_bytes: int
    activation_bytes: int
    peak_bytes: int
    bound_bytes: int
    time_s: float
    peak: PhasePeak

    @property
    def placement(self) -> str:
        return "offloaded" if self.offload is not None else "resident"


def _option(estimate: Estimate, groups: OffloadGroups, offload: OffloadConfig | None, fixed: int,
            profile: DeviceProfile) -> Option:
    weights = phase_weights(groups, offload, estimate.phases)
    phase = max(estimate.phases, key=lambda name: weights[name] + estimate.phases[name].bytes)
    peak = estimate.phases[phase]
    bound = fixed + max(weights.values()) + estimate.activation.bytes
    return Option(estimate.chunking, offload, phase, weights[phase], peak.bytes, fixed + weights[phase] + peak.bytes,
                  bound, estimate_time(estimate, profile, groups, offload), peak)


@dataclass
class DenoiserPlan:
    """What the planner chose for one denoiser, and the numbers it chose by.

    Attributes:
        chunking: memopt hooks to apply.
        offload: diffusers group offloading to apply after them (``None``: not offloaded).
        device: the device the forward runs on.
        move_to_device: make the denoiser resident on ``device`` (``False`` on the CPU: nothing moves).
        budget_bytes: the budget planned for (the whole device, other resident components included).
        other_resident_bytes: other components' weights on the device during this forward.
        weight_bytes: the denoiser's weights.
        input_bytes: the forward's inputs.
        option: the chosen option (its phase, weights and activations at the predicted peak).
        activation: the activation peak of the whole forward with ``chunking`` (for LD).
        baseline_time_s: the time model's forward time of the unmodified model kept resident.
        shapes: the input shapes planned for.
        groups: the offloading groups of the denoiser.
        considered: every option evaluated.
        profile: the time model's speeds.
        tokens / hidden_size / element_size: for LD = tokens x hidden x bytes per element (known families).
        reports: the ``apply_*`` reports once applied.
        note: why nothing was moved, when nothing was.
        planning_seconds: how long planning took (simulations included).
        gradient_bytes: the trainable parameters' gradients (training plans; in the predicted peak).
        training: planned for a training step rather than a forward.
        assumptions: worst cases the simulation assumed for values computed from the weights (HiDream's MoE
            routing): the predicted peak is an upper bound rather than the forward's to the byte.
    """

    chunking: Chunking
    offload: OffloadConfig | None
    device: torch.device
    move_to_device: bool
    budget_bytes: int
    other_resident_bytes: int
    weight_bytes: int
    input_bytes: int
    option: Option
    activation: PhasePeak
    baseline_time_s: float
    shapes: dict[str, tuple[int, ...]]
    groups: OffloadGroups
    considered: list[Option]
    profile: DeviceProfile
    tokens: int | None = None
    hidden_size: int | None = None
    element_size: int = 2
    reports: list[Any] = field(default_factory=list)
    note: str = ""
    planning_seconds: float = 0.0
    gradient_bytes: int = 0
    training: bool = False
    assumptions: tuple[str, ...] = ()

    @property
    def predicted_peak_bytes(self) -> int:
        return self.option.peak_bytes

    @property
    def predicted_time_s(self) -> float:
        return self.option.time_s

    @property
    def predicted_slowdown(self) -> float:
        return self.predicted_time_s / self.baseline_time_s if self.baseline_time_s else 1.0

    def ld(self, nbytes: int) -> float | None:
        if not self.tokens or not self.hidden_size:
            return None
        return nbytes / (self.tokens * self.hidden_size * self.element_size)

    def describe_placement(self) -> str:
        if self.offload is not None:
            return f"{self.offload.describe()}, {len(self.groups.groups)} groups"
        if self.move_to_device:
            return f"resident on {self.device}"
        return f"stays on {self.device}"

    def peak_line(self) -> str:
        option = self.option
        ld = self.ld(option.activation_bytes)
        ld_text = f", {ld:.1f} LD" if ld is not None else ""
        others = f" + other components {format_bytes(self.other_resident_bytes)}" if self.other_resident_bytes else ""
        gradients = f" + gradients {format_bytes(self.gradient_bytes)}" if self.gradient_bytes else ""
        where = f"{option.peak.module or '<top level>'} {option.peak.op}"
        return (f"predicted peak {format_bytes(option.peak_bytes)} of {format_bytes(self.budget_bytes)} "
                f"({option.phase} phase): weights {format_bytes(option.weight_bytes)}{gradients} + inputs "
                f"{format_bytes(self.input_bytes)} + activations {format_bytes(option.activation_bytes)}{ld_text} at "
                f"{where}{others}")

    def time_line(self) -> str:
        shape = self.shapes.get("hidden_states")
        at = f"hidden_states {tuple(shape)}" if shape is not None else "the call's shapes"
        baseline = "the unmodified model's training step" if self.training else "the unmodified model kept resident"
        return (f"predicted time x{self.predicted_slowdown:.2f} of {baseline} "
                f"({self.profile.name}; {len(self.considered)} options simulated at {at} in "
                f"{self.planning_seconds:.1f} s)")

    def __str__(self) -> str:
        lines = [f"placement: {self.describe_placement()}", f"chunking: {self.chunking.describe()}",
                 self.peak_line(), self.time_line()]
        lines += [f"assumes {assumption}" for assumption in self.assumptions]
        if self.note:
            lines.append(self.note)
        return "\n".join(lines)

    def apply(self, model: torch.nn.Module) -> None:
        """Chunking hooks first, then offloading (outermost: a block's weights serve all its chunks)."""
        self.reports = self.chunking.apply(model)
        if self.offload is not None:
            apply_offloading(model, self.offload)
        elif self.move_to_device:
            place_on(model, self.device)


def plan_denoiser(
    model: torch.nn.Module,
    args: Sequence[Any],
    kwargs: dict[str, Any],
    budget: int | str,
    device: str | torch.device,
    offload: OffloadConfig | None = None,
    other_resident_bytes: int = 0,
    idle_reserve_bytes: int = 0,
    profile: DeviceProfile | None = None,
    series: list[list[Chunking]] | None = None,
    runtime_overhead_bytes: int | None = None,
    training: bool = False,
) -> DenoiserPlan:
    """Choose chunking and placement for ``model`` so one forward on ``args``/``kwargs`` (with ``training``: one
    training step) fits ``budget``.

    Args:
        model: the denoiser (real or built under ``FakeTensorMode``); only its config, class and weight sizes are
            read.
        args / kwargs: the forward's inputs (real or fake tensors; shapes and dtypes matter, and the values of small
            real ones where the forward reads them: a mask's token counts. The plan is made for those values; a call
            whose masks keep more text tokens can need those tokens' share more).
        budget: bytes (or a string like ``"8GiB"``) for everything on the device during the forward.
        device: where the forward runs. On the CPU nothing is moved (the weights stay where they are).
        offload: the offloading to consider besides keeping the model resident (``None``: resident only).
        other_resident_bytes: weights of other components that stay on the device meanwhile.
        idle_reserve_bytes: what another component's forward needs on the device beyond its resident weights (an
            offloaded text encoder's working set). A resident denoiser keeps its weights there during that forward
            too, so it may only stay resident if ``other_resident + weights + idle_reserve`` fits.
        profile: speeds for the time model (default: :meth:`DeviceProfile.defaults`).
        series: chunking series to try (default :func:`candidate_series`). For the offloaded placement they are
            tried with ``chunk_tail=False`` (see :class:`Chunking`).
        runtime_overhead_bytes: device memory outside the traced tensors (default:
            :data:`CUDA_RUNTIME_OVERHEAD_BYTES` on CUDA, 0 elsewhere).
        training: plan a training step (the forward with autograd, then the backward) instead of a forward: the
            gradients of the trainable parameters count in the peak (an optimizer's state does not: leave room for
            it), and the candidates are the unmodified model, diffusers' gradient checkpointing and memopt's sequence
            chunks with their chunked recomputation (:func:`candidate_series`). Trainable parameters are the model's
            (``requires_grad``); with adapters only (LoRA), the step back-propagates through every block to them, as
            simulated. With ``offload``, the offloaded placement takes only memopt's sequence chunks (its recorded
            blocks onload their weights again for their backward, :func:`memopt.hooks.offload.onloaded`; diffusers'
            checkpointing and plain autograd would find them on the host), and each group's gradients travel with its
            weights, so the device holds the top level's and one group's.

    Raises:
        BudgetError: no option fits; the message names the smallest peak simulated and what dominates it, or,
            where the weights that must be on the device and the inputs already exceed ``budget``, that floor.
    """
    start = time.perf_counter()
    budget_bytes = parse_budget(budget)
    device = torch.device(device)
    dtype = model_dtype(model)
    profile = profile or DeviceProfile.defaults(device, dtype)
    round_to = 512 if device.type == "cuda" else 1
    weights = module_bytes(model)
    inputs = input_bytes(args, kwargs)
    groups = offload_groups(model, "block_level", offload.num_blocks_per_group if offload else 1)
    movable = device.type != "cpu"
    if runtime_overhead_bytes is None:
        runtime_overhead_bytes = CUDA_RUNTIME_OVERHEAD_BYTES if device.type == "cuda" else 0

    def device_gradients(placement: OffloadConfig | None) -> int:
        return device_gradient_bytes(model, placement, groups) if training else 0

    def fixed_bytes(placement: OffloadConfig | None) -> int:
        return other_resident_bytes + inputs + device_gradients(placement) + runtime_overhead_bytes

    shapes = {name: tuple(value.shape) for name, value in _named_tensors(model, args, kwargs)}
    token_info = _tokens(model, shapes)
    batch = shapes["hidden_states"][0] if "hidden_states" in shapes else 1
    per_sample = token_info["tokens"] // batch if token_info["tokens"] else None
    placements: list[OffloadConfig | None] = []
    if not movable or other_resident_bytes + weights + device_gradients(None) + idle_reserve_bytes <= budget_bytes:
        placements.append(None)
    if offload is not None and movable:
        placements.append(offload)
    phases = ["before", "after", *block_lists(model)]
    floors = [fixed_bytes(placement) + max(phase_weights(groups, placement, phases).values())
              for placement in placements]
    if floors and min(floors) >= budget_bytes:  # chunking cannot help: say so rather than simulate
        placement = placements[floors.index(min(floors))]
        raise BudgetError(_below_floor(model, budget_bytes, placement, {
            "the forward's inputs": inputs, "other components kept on the device": other_resident_bytes,
            "the trainable parameters' gradients": device_gradients(placement),
            "the CUDA runtime's workspaces": runtime_overhead_bytes}))
    cache: dict[Chunking, Estimate] = {}

    caches = step_cache_hooks(model)

    def estimate(chunking: Chunking) -> Estimate:
        if chunking not in cache:
            cache[chunking] = (
                Estimate(chunking, error=f"sequence chunking does not run under diffusers' step caches ({caches[0]})")
                if caches and chunking.sequence_chunks else
                simulate_chunking(model, args, kwargs, chunking, dtype=dtype, round_to=round_to))
        return cache[chunking]

    considered: list[Option] = []
    reachable: list[int] = []  # where the series stopped early would level out (their last peak less its last saving)

    def something_fits() -> bool:
        return any(option.peak_bytes <= budget_bytes for option in considered)

    for placement in placements:
        if training and placement is not None and something_fits():
            break  # resident fits: offloading a training step only adds transfers
        fixed = fixed_bytes(placement)
        floor = floors[placements.index(placement)]
        unchunked_fits = False
        two_pass_fits: list[int] = []  # sequence chunk counts at which the two-pass schedule fits
        for chunkings in series or candidate_series(per_sample, training, host=movable,
                                                    linear_attention=has_linear_attention(model)):
            if getattr(model, "is_gradient_checkpointing", False):  # already on: the simulated copies have it too
                chunkings = [chunking for chunking in chunkings if not chunking.checkpointing]
            if training and placement is not None:
                # Only memopt's recorded blocks onload their weights again for the backward (hooks.offload.onloaded).
                chunkings = [chunking for chunking in chunkings if chunking.sequence_chunks]
            if chunkings and chunkings[0].saved_inputs == "host" and something_fits():
                continue  # the same chunks with their transfers: only worth it where nothing else fits
            if chunkings and chunkings[0].schedule == "lockstep":
                # Lock-step holds more than two-pass at any count: start where two-pass fits, and only when the
                # series' lowest peak (its most chunks) fits at all.
                chunkings = [c for c in chunkings if c.sequence_chunks >= min(two_pass_fits, default=0)]
                probe = estimate(_placed(chunkings[-1], placement)) if chunkings else None
                if probe is None or probe.error is not None or (
                        _option(probe, groups, placement, fixed, profile).peak_bytes > budget_bytes):
                    continue
            previous: Option | None = None
            for chunking in chunkings:
                chunking = _placed(chunking, placement)
                result = estimate(chunking)
                if result.error is not None:
                    break  # this hook does not support the model: the rest of the series neither
                option = _option(result, groups, placement, fixed, profile)
                considered.append(option)
                fits = option.peak_bytes <= budget_bytes
                # Checkpointing, which reruns each block once, is faster than memopt's chunked recomputation.
                unchunked_fits = unchunked_fits or (
                    fits and not (chunking.sequence_chunks or chunking.feedforward_chunks or chunking.attention_chunk))
                if fits and chunking.sequence_chunks and chunking.schedule == "two_pass":
                    two_pass_fits.append(chunking.sequence_chunks)
                if fits:
                    break
                if previous is not None:
                    saving = max(previous.peak_bytes - option.peak_bytes, 0)
                    if option.peak_bytes - SAVING_MARGIN * saving > budget_bytes:
                        reachable.append(option.peak_bytes - saving)
                        break  # more chunks of this kind cannot lower the peak to the budget (SAVING_MARGIN)
                previous = option
            # Stop when the weights alone do not fit this placement (chunking cannot help), or when nothing needs
            # chunking: chunking never lowers the predicted time (it adds FLOPs and ops, and under offloading the
            # extra compute can at most hide as much transfer as it costs).
            if floor >= budget_bytes or unchunked_fits:
                break
        if placement is None and unchunked_fits:
            break  # resident and unchunked: nothing is faster
    fitting = [option for option in considered if option.peak_bytes <= budget_bytes]
    if not fitting:
        unplannable = not considered and any(estimate.error for chunking, estimate in cache.items()
                                             if chunking.is_empty)
        raise (UnplannableError if unplannable else BudgetError)(_nothing_fits(
            model, budget_bytes, considered, groups, inputs, other_resident_bytes, cache,
            device_gradients(offload if movable else None), min(reachable, default=None)))
    # Within 1% of the fastest (the time model's resolution), prefer fewer hooks, then the lower peak.
    fastest = min(option.time_s for option in fitting)
    best = min((option for option in fitting if option.time_s <= 1.01 * fastest),
               key=lambda option: (option.chunking.sequence_chunks + option.chunking.feedforward_chunks
                                   + bool(option.chunking.attention_chunk), option.peak_bytes))
    baseline = estimate(Chunking(training=training))
    return DenoiserPlan(
        chunking=best.chunking, offload=best.offload, device=device, move_to_device=movable and best.offload is None,
        budget_bytes=budget_bytes, other_resident_bytes=other_resident_bytes, weight_bytes=weights,
        input_bytes=inputs, option=best, activation=cache[best.chunking].activation,
        baseline_time_s=estimate_time(baseline, profile, None, None) if baseline.error is None else best.time_s,
        shapes=shapes, groups=groups, considered=considered, profile=profile,
        note="" if movable else "no CUDA device: nothing moved (weights stay where they are); chunking only",
        element_size=torch.tensor([], dtype=dtype).element_size(), planning_seconds=time.perf_counter() - start,
        gradient_bytes=device_gradients(best.offload), training=training,
        assumptions=cache[best.chunking].assumptions, **token_info,
    )


def _placed(chunking: Chunking, placement: OffloadConfig | None) -> Chunking:
    """Offloaded plans keep the output head whole (see :class:`Chunking`)."""
    return chunking if placement is None else dataclasses.replace(chunking, chunk_tail=False)


def _nothing_fits(model: torch.nn.Module, budget: int, considered: list[Option], groups: OffloadGroups, inputs: int,
                  other: int, cache: dict[Chunking, Estimate], gradients: int, reachable: int | None = None) -> str:
    """Why nothing fits: the lowest peak simulated and what dominates it, or why nothing could be simulated.
    ``reachable``: the lowest peak the series that stopped early would level out at (see :data:`SAVING_MARGIN`)."""
    name = type(model).__name__
    failed: dict[str, list[str]] = {}  # why a chunking could not be simulated -> the chunkings, in order
    for chunking, estimate in cache.items():
        if estimate.error:
            failed.setdefault(estimate.error, []).append(chunking.describe())
    if not considered:
        baseline = next((estimate.error for chunking, estimate in cache.items() if chunking.is_empty), None)
        if baseline:  # the unmodified forward itself cannot be simulated: no option can, whatever the budget
            return f"memopt cannot plan {name}: {baseline.rstrip('.')}. {_apply_directly(model)}"
        if failed:
            errors = "; ".join(f"{', '.join(chunkings)}: {error.rstrip('.')}" for error, chunkings in failed.items())
            return f"no memopt option could be simulated for {name}: {errors}. {_apply_directly(model)}"
        weights = f"its weights ({format_bytes(groups.total_bytes)})"
        if gradients:
            weights += f" and the gradients on the device ({format_bytes(gradients)})"
        return (f"{name}: nothing fits the budget of {format_bytes(budget)}: {weights} with the other components "
                f"({format_bytes(other)}) leave no room, and it cannot be offloaded here")
    best = min(considered, key=lambda option: option.peak_bytes)
    weights = ("the whole model" if best.offload is None
               else f"{best.phase} phase of block-level offloading (top-level group "
                    f"{format_bytes(groups.top_level_bytes)} + blocks, largest {groups.largest[0]} "
                    f"{format_bytes(groups.largest[1])})")
    parts = {
        f"activations at {best.peak.module or '<top level>'} ({best.peak.op})": best.activation_bytes,
        f"weights on the device ({weights})": best.weight_bytes,
        "the forward's inputs": inputs,
    }
    if gradients:
        parts["the trainable parameters' gradients"] = gradients
    if other:
        parts["other components kept on the device"] = other
    dominant = max(parts, key=parts.get)
    breakdown = " + ".join(f"{label} {format_bytes(nbytes)}" for label, nbytes in parts.items())
    # the supported-class list of a missing sequence plan helps a direct call, not this summary
    reasons = [error.split("; supported: ")[0] + "." if "; supported: " in error else error for error in failed]
    unavailable = f" Not available for this model: {'; '.join(reasons)}" if failed else ""
    further = (f" More chunks would lower it to about {format_bytes(reachable)} at best, still over the budget."
               if reachable is not None and reachable < best.peak_bytes else "")
    return (f"{name}: nothing fits the budget of {format_bytes(budget)}. The smallest peak memopt simulated is "
            f"{format_bytes(best.peak_bytes)} ({best.placement}, {best.chunking.describe()}): {breakdown}. "
            f"It is dominated by {dominant}.{further}{unavailable} Give a larger budget, or generate at a smaller "
            "size or batch.")


def _below_floor(model: torch.nn.Module, budget: int, placement: OffloadConfig | None, fixed: dict[str, int]) -> str:
    """The error for a budget that the best placement's weights and the ``fixed`` bytes (by what they are) exhaust
    before any activation: no chunking can help, so nothing is simulated."""
    weights, what = floor_bytes(model, placement)
    others = "".join(f" + {label} {format_bytes(nbytes)}" for label, nbytes in fixed.items() if nbytes)
    return (f"{type(model).__name__}: the budget {format_bytes(budget)} is below the floor of "
            f"{format_bytes(weights + sum(fixed.values()))}: weights that must be on the device during its forward: "
            f"{what}{others}; activations come on top, so no chunking can fit")


def _apply_directly(model: torch.nn.Module) -> str:
    """What a user can apply without the planner's simulation (sequence chunking only where a plan exists)."""
    from .plans.sequence import SEQUENCE_PLANS

    techniques = ["memopt.apply_chunked_feedforward(model)", "memopt.apply_chunked_attention(model)",
                  "diffusers' enable_group_offload"]
    if type(model).__name__ in SEQUENCE_PLANS:
        techniques.insert(0, "memopt.apply_sequence_chunking(model)")
    return f"Apply the techniques directly instead, which need no simulation: {', '.join(techniques)}"


def floor_bytes(model: torch.nn.Module, offload: OffloadConfig | None) -> tuple[int, str]:
    """The weights that must be on the device during a forward at best (no activations), and what they are."""
    if offload is None:
        weights = module_bytes(model)
        return weights, f"the whole {type(model).__name__} stays on the device ({format_bytes(weights)})"
    groups = offload_groups(model, "block_level", offload.num_blocks_per_group)
    weights = phase_weights(groups, offload, ["before", "after", *block_lists(model)])
    return max(weights.values()), groups.describe(offload.use_stream)


def _named_tensors(model: torch.nn.Module, args: Sequence[Any], kwargs: dict[str, Any]):
    for name, value in [*zip(_positional_names(model), args), *kwargs.items()]:
        if isinstance(value, torch.Tensor):
            yield name, value


def _tokens(model: torch.nn.Module, shapes: dict[str, tuple[int, ...]]) -> dict[str, int | None]:
    """Tokens and width for LD: tokens from the latent shape and the config's patch size, the width from the family
    where memopt knows it, else from the config's heads x head dim (diffusers' transformers name them alike)."""
    from .models import get_family

    latent = shapes.get("hidden_states")
    if latent is None:
        return {"tokens": None, "hidden_size": None}
    try:
        family = get_family(model)
    except ValueError:
        family = None
    config = getattr(model, "config", None)  # None outside diffusers: no patch size, no width
    if len(latent) == 3:  # packed latents (B, N, C): one token per row
        tokens = latent[0] * latent[1]
    else:
        patch = getattr(config, "patch_size", 1) or 1
        patch_t = getattr(config, "patch_size_t", None) or 1
        if isinstance(patch, (tuple, list)):
            patch_t, patch = patch[0], patch[-1]
        frames_dim = 1 if family is not None and family.name == "cogvideox" else 2
        frames = latent[frames_dim] if len(latent) == 5 else 1
        tokens = latent[0] * math.ceil(frames / patch_t) * (latent[-2] // patch) * (latent[-1] // patch)
    if family is not None:
        hidden = family.hidden_size(config)
    else:
        heads, head_dim = getattr(config, "num_attention_heads", None), getattr(config, "attention_head_dim", None)
        hidden = heads * head_dim if isinstance(heads, int) and isinstance(head_dim, int) else None
    return {"tokens": tokens, "hidden_size": hidden}
