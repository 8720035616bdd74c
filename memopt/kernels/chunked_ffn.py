"""Autograd op around the Triton fused chunked FeedForward, its workspace planner and its availability check.

Plain tensors in and out (Liger-Kernel style): the caller passes the model's own ``nn.Linear`` weights in their
``(out_features, in_features)`` layout and gets ``act(x @ w1.T + b1) @ w2.T + b2`` back. Triton is imported only
when the kernel is first needed, so this module (and ``import memopt``) works without Triton.

Where the kernel cannot run (no Triton, a CPU tensor without ``TRITON_INTERPRET=1``, an old GPU),
:func:`fused_chunked_ffn` raises ``RuntimeError`` with the reason; callers that want a fallback ask
:func:`fused_ffn_available` first and use the PyTorch chunked FeedForward of :mod:`memopt.hooks` instead.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from types import ModuleType

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

ACTIVATIONS = ("gelu", "gelu_tanh", "silu", "geglu", "swiglu")
"""Supported activations. ``geglu``/``swiglu`` are diffusers' GEGLU/SwiGLU: ``w1`` is ``(2F, D)``, its rows
``[0:F]`` give the value and ``[F:2F]`` the gate, the result is ``value * gelu_erf(gate)`` / ``value * silu(gate)``."""

WORKSPACE_FRACTION = 8
"""The default plan keeps the kernel's workspace at or below ``1 / WORKSPACE_FRACTION`` of the unfused ``(M, F)``
intermediate."""

MIN_ROWS_PER_BLOCK = 2048
"""Smallest token block the default plan uses: fewer rows leave an H100 partly idle in the second GEMM, and below
this size the whole intermediate is small in absolute terms anyway."""

ROW_ALIGNMENT = 128
"""Token blocks are multiples of the usual ``BLOCK_M`` so only the last block has partial tiles (a 256-row tile, which
autotuning may pick, can leave one partial tile per block)."""

DOWN_GEMMS = ("triton", "cublas")
"""Implementations of the second GEMM, :attr:`FusedFFNPlan.down_gemm`."""

MIN_CUDA_CAPABILITY = (8, 0)
"""Oldest NVIDIA GPUs the kernel runs on (Ampere). On Turing (7.5) Triton compiles ``tl.dot`` to FMA instructions, no
tensor cores and no asynchronous copies, whatever the dtype (``benchmarks/results/ffn_kernel_codegen.md``): many
times slower than cuBLAS, so the hooks keep the PyTorch path there."""

ALIGNED_WIDTH = 16
"""Widths (elements) the kernel's fast path needs: with every width and offset a multiple of 16, Triton vectorises the
loads and pipelines them with ``cp.async``; otherwise it compiles scalar loads without pipelining and spills registers
(``benchmarks/results/ffn_kernel_codegen.md``, the odd 1000 x 2731 case): correct, much slower than cuBLAS."""


def misaligned_widths(widths: dict[str, int]) -> str | None:
    """The widths (name -> elements) that are not multiples of :data:`ALIGNED_WIDTH`, as a sentence, or None."""
    odd = [f"{name} {width}" for name, width in widths.items() if width % ALIGNED_WIDTH]
    if not odd:
        return None
    return (f"{', '.join(odd)} not a multiple of {ALIGNED_WIDTH}: the kernel would compile without vectorised, "
            "pipelined loads and run slower than cuBLAS")


def aligned_chunk_size(width: int, num_chunks: int) -> int:
    """Hidden features per shard for ``num_chunks`` shards of ``width``, rounded up to a multiple of
    :data:`ALIGNED_WIDTH` (8960 in 3 shards: 2992, 2992, 2976, not 2987 each), so that every shard's weight slice
    starts aligned and stays on the fast path; at most ``num_chunks`` shards."""
    size = -(-width // num_chunks)
    return min(width, -(-size // ALIGNED_WIDTH) * ALIGNED_WIDTH)


_GATED = frozenset({"geglu", "swiglu"})
_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class KernelAvailability:
    """Whether the fused kernel can run on a device, and why (not). Truthy exactly when it can.

    Attributes:
        available: True when :func:`fused_chunked_ffn` will run the Triton kernel for this device and dtype.
        reason: One line for logs: what will run, or what is missing and what to use instead.
    """

    available: bool
    reason: str

    def __bool__(self) -> bool:
        return self.available


@dataclass(frozen=True)
class FusedFFNPlan:
    """How the kernel slabs the FeedForward: ``rows_per_block`` tokens by ``chunk_size`` hidden features at a time.

    Attributes:
        rows_per_block: Tokens per block; the host loop runs the two GEMM kernels once per block and hidden chunk.
        chunk_size: Hidden features per chunk (of ``F``, the width after gating). ``chunk_size == F`` writes each
            output tile once; smaller chunks add partial products into an fp32 accumulator (16-bit) or into the
            output itself (fp32).
        workspace_bytes: Bytes the kernel allocates besides its output: one ``rows_per_block x chunk_size`` slab of
            the activated intermediate, plus a ``rows_per_block x D_out`` fp32 accumulator when a 16-bit output is
            built from several chunks (an upper bound for ``down_gemm="cublas"``, which goes without the
            accumulator where PyTorch cannot write a 16-bit GEMM into fp32, e.g. before PyTorch 2.8).
        down_gemm: Who runs the second GEMM, one of :data:`DOWN_GEMMS`. ``"triton"`` (the default): this package's
            down kernel. ``"cublas"``: PyTorch's matmul (cuBLAS on CUDA), ``addmm`` into the output's row block, the
            weight chunk read in place as ``w2[:, chunk].T``. The first GEMM carries the bias and activation epilogue
            that makes fusing worthwhile; the second has none, and on an H100 the all-Triton kernel reached only
            0.71-0.94x of unfused cuBLAS throughput (``benchmarks/results/ffn_kernel_h100.md``), so this switch
            exists to choose by measurement (``benchmarks/ffn_kernel.py``). Same workspace and same results within
            rounding: 16-bit outputs of several hidden chunks accumulate in fp32 with ``out_dtype=torch.float32``
            GEMMs where PyTorch has them, otherwise in the output dtype (one 16-bit rounding per chunk, as PyTorch's
            own chunked FeedForward). The backward is PyTorch either way.
    """

    rows_per_block: int
    chunk_size: int
    workspace_bytes: int
    down_gemm: str = "triton"


def plan_fused_ffn(
    num_rows: int, hidden: int, out_features: int, element_size: int, chunk_size: int | None = None
) -> FusedFFNPlan:
    """Pick the token block so the workspace stays within ``1/WORKSPACE_FRACTION`` of the unfused intermediate.

    With ``chunk_size=None`` every block covers all ``hidden`` features: no accumulator traffic, each output tile is
    written once, and the two GEMMs per block are large (>= :data:`MIN_ROWS_PER_BLOCK` tokens). A given
    ``chunk_size`` cuts the hidden features too, and the token block grows to use the same budget. Blocks are
    balanced so the last one is not a sliver.

    Example:
        >>> plan_fused_ffn(num_rows=75600, hidden=13824, out_features=5120, element_size=2)
        FusedFFNPlan(rows_per_block=8448, chunk_size=13824, workspace_bytes=233570304, down_gemm='triton')
    """
    chunk = hidden if chunk_size is None else min(chunk_size, hidden)
    accumulator_bytes_per_row = 4 * out_features if chunk < hidden and element_size < 4 else 0
    bytes_per_row = chunk * element_size + accumulator_bytes_per_row
    budget = num_rows * hidden * element_size // WORKSPACE_FRACTION
    rows = max(budget // bytes_per_row // ROW_ALIGNMENT * ROW_ALIGNMENT, MIN_ROWS_PER_BLOCK)
    if rows >= num_rows:
        rows = max(num_rows, 1)
    else:
        num_blocks = -(-num_rows // rows)
        rows = _round_up(-(-num_rows // num_blocks), ROW_ALIGNMENT)
    return FusedFFNPlan(rows_per_block=rows, chunk_size=chunk, workspace_bytes=rows * bytes_per_row)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _load_kernels() -> ModuleType:
    """Import the Triton module on first use (it reads TRITON_INTERPRET when its kernels are decorated)."""
    return importlib.import_module("memopt.kernels.fused_ffn")


def fused_ffn_available(
    device: torch.device | str | int | None = None, dtype: torch.dtype | None = None
) -> KernelAvailability:
    """Tell whether :func:`fused_chunked_ffn` can run on ``device`` (default: the current CUDA device, else CPU).

    CPU tensors run only under Triton's interpreter (``TRITON_INTERPRET=1`` set before the kernels are imported),
    which is exact but slow and meant for tests. ``dtype`` is accepted for callers that know it; every GPU the kernel
    runs on (:data:`MIN_CUDA_CAPABILITY`) has bf16, fp16 and fp32 tensor-core GEMMs, so it changes nothing today.

    Example:
        >>> availability = fused_ffn_available("cpu")
        >>> bool(availability), availability.reason  # doctest: +SKIP
        (False, 'the fused FeedForward kernel needs a CUDA GPU; ...')
    """
    try:
        kernels = _load_kernels()
    except ImportError as error:
        return KernelAvailability(
            False, f"Triton is not importable ({error}); pip install triton, or use the PyTorch chunked FFN"
        )
    except Exception as error:  # a broken Triton install must not break callers that only ask
        return KernelAvailability(False, f"Triton failed to import ({type(error).__name__}: {error})")
    if device is None:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        return KernelAvailability(False, f"the fused FeedForward kernel supports CUDA devices only, got {device}")
    if kernels.INTERPRETED:
        return KernelAvailability(True, "Triton interpreter (TRITON_INTERPRET=1): correct but slow, meant for tests")
    if device.type == "cpu":
        return KernelAvailability(
            False,
            "the fused FeedForward kernel needs a CUDA GPU; on CPU it runs only under Triton's interpreter "
            "(TRITON_INTERPRET=1 set before memopt.kernels.fused_ffn is imported); use the PyTorch chunked FFN",
        )
    if not torch.cuda.is_available():
        return KernelAvailability(False, f"{device} was requested but torch.cuda.is_available() is False")
    capability = torch.cuda.get_device_capability(device)
    if torch.version.hip is None and capability < MIN_CUDA_CAPABILITY:
        return KernelAvailability(
            False,
            f"the fused FFN kernel needs compute capability >= {MIN_CUDA_CAPABILITY}, got {capability}: below it "
            "Triton compiles its GEMMs to FMA instructions, without tensor cores; use the PyTorch chunked FFN (cuBLAS)",
        )
    import triton

    return KernelAvailability(True, f"Triton {triton.__version__} on {torch.cuda.get_device_name(device)}")


def _activate(value: torch.Tensor, gate: torch.Tensor | None, activation: str) -> torch.Tensor:
    """The activation in PyTorch, exactly as diffusers computes it; the backward differentiates through this."""
    if activation in ("gelu", "geglu"):
        activated = F.gelu(value if gate is None else gate)
    elif activation == "gelu_tanh":
        activated = F.gelu(value, approximate="tanh")
    else:
        activated = F.silu(value if gate is None else gate)
    return activated if gate is None else value * activated


def _backward_chunk_size(plan: FusedFFNPlan, hidden: int) -> int:
    """Hidden chunk of the recompute backward: the forward's chunk, or 1/WORKSPACE_FRACTION of F if it had none."""
    if plan.chunk_size < hidden:
        return plan.chunk_size
    return _round_up(-(-hidden // WORKSPACE_FRACTION), 64)


class FusedChunkedFFNFunction(torch.autograd.Function):
    """Forward: the Triton kernel. Backward: PyTorch, recomputing each hidden chunk's pre-activation from ``x``.

    Only ``x`` and the weights (the model's own parameters) are saved, so training keeps no ``(M, F)`` activation.
    The backward walks the hidden features in chunks over all tokens: each weight-gradient slice comes from one
    GEMM over all tokens (as in PyTorch), and ``grad_x`` accumulates over chunks. Its workspace is a few
    ``(M, chunk)`` tensors (pre-activation, activation, their gradients); with the default chunk of ``F/8`` that is
    about half of one unfused ``(M, F)`` intermediate.
    """

    @staticmethod
    def forward(ctx, x2d, w1, b1, w2, b2, w_gate, b_gate, activation: str, plan: FusedFFNPlan):
        ctx.save_for_backward(x2d, w1, b1, w2, b2, w_gate, b_gate)
        ctx.activation, ctx.plan = activation, plan
        return _load_kernels().fused_ffn_forward(
            x2d, w1, b1, w2, b2, activation, plan.chunk_size, plan.rows_per_block, down_gemm=plan.down_gemm,
            w_gate=w_gate, b_gate=b_gate,
        )

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x2d, w1, b1, w2, b2, w_gate, b_gate = ctx.saved_tensors
        need_x, need_w1, need_b1, need_w2, need_b2, need_wg, need_bg = ctx.needs_input_grad[:7]
        hidden = w2.shape[1]
        gated = ctx.activation in _GATED
        grad_out = grad_out.reshape(-1, w2.shape[0])

        def empty_like(tensor: torch.Tensor | None, needed: bool) -> torch.Tensor | None:
            return torch.empty(tensor.shape, dtype=tensor.dtype, device=tensor.device) if needed else None

        grad_x = torch.zeros_like(x2d) if need_x else None
        grad_w1, grad_b1, grad_w2 = empty_like(w1, need_w1), empty_like(b1, need_b1), empty_like(w2, need_w2)
        grad_wg, grad_bg = empty_like(w_gate, need_wg), empty_like(b_gate, need_bg)
        chunk = _backward_chunk_size(ctx.plan, hidden)
        for f_start in range(0, hidden, chunk):
            value_rows = slice(f_start, min(f_start + chunk, hidden))
            # (weight, bias, rows, weight grad, bias grad) of each input projection this chunk reads.
            projections = [(w1, b1, value_rows, grad_w1, grad_b1)]
            if gated and w_gate is not None:
                projections.append((w_gate, b_gate, value_rows, grad_wg, grad_bg))
            elif gated:
                gate_rows = slice(hidden + f_start, hidden + min(f_start + chunk, hidden))
                projections.append((w1, b1, gate_rows, grad_w1, grad_b1))
            pre = [F.linear(x2d, w[rows], None if b is None else b[rows]) for w, b, rows, _, _ in projections]
            with torch.enable_grad():
                pre = [tensor.detach().requires_grad_() for tensor in pre]
                h = _activate(pre[0], pre[1] if gated else None, ctx.activation)
            if need_w2:
                grad_w2[:, value_rows] = grad_out.T @ h.detach()
            if not (need_x or need_w1 or need_b1 or need_wg or need_bg):
                continue
            grad_pre = torch.autograd.grad(h, pre, grad_out @ w2[:, value_rows])
            for (weight, _, rows, grad_weight, grad_bias), grad in zip(projections, grad_pre):
                if grad_weight is not None:
                    grad_weight[rows] = grad.T @ x2d
                if grad_bias is not None:
                    grad_bias[rows] = grad.sum(0)
                if need_x:
                    grad_x.addmm_(grad, weight[rows])
        grad_b2 = grad_out.sum(0) if need_b2 else None
        return grad_x, grad_w1, grad_b1, grad_w2, grad_b2, grad_wg, grad_bg, None, None


def _check_inputs(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    activation: str,
    chunk_size: int | None,
    w_gate: torch.Tensor | None = None,
    b_gate: torch.Tensor | None = None,
) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"fused_chunked_ffn: activation must be one of {ACTIVATIONS}, got {activation!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"fused_chunked_ffn: chunk_size must be a positive int or None, got {chunk_size!r}")
    tensors = {"x": x, "w1": w1, "b1": b1, "w2": w2, "b2": b2, "w_gate": w_gate, "b_gate": b_gate}
    for name, tensor in tensors.items():
        if tensor is None:
            continue
        if tensor.dtype != x.dtype or tensor.device != x.device:
            raise TypeError(
                f"fused_chunked_ffn: {name} is {tensor.dtype} on {tensor.device} but x is {x.dtype} on {x.device}; "
                "all tensors must share one dtype and device"
            )
    if x.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"fused_chunked_ffn: dtype must be one of {_SUPPORTED_DTYPES}, got {x.dtype}")
    if w1.dim() != 2 or w2.dim() != 2 or x.dim() < 1:
        raise ValueError(
            f"fused_chunked_ffn: expected x (..., D), w1 (F, D) and w2 (D_out, F), got x {tuple(x.shape)}, "
            f"w1 {tuple(w1.shape)}, w2 {tuple(w2.shape)}"
        )
    hidden = w2.shape[1]
    packed = activation in _GATED and w_gate is None
    expected_w1 = (2 * hidden if packed else hidden, x.shape[-1])
    if tuple(w1.shape) != expected_w1:
        raise ValueError(
            f"fused_chunked_ffn: with activation={activation!r}, x {tuple(x.shape)} and w2 {tuple(w2.shape)}, w1 must "
            f"have shape {expected_w1}, got {tuple(w1.shape)}"
        )
    biases = (("b1", b1, w1.shape[0]), ("b2", b2, w2.shape[0]), ("b_gate", b_gate, hidden))
    for name, bias, features in biases:
        if bias is not None and tuple(bias.shape) != (features,):
            raise ValueError(f"fused_chunked_ffn: {name} must have shape ({features},), got {tuple(bias.shape)}")
    if w_gate is None:
        if b_gate is not None:
            raise ValueError("fused_chunked_ffn: b_gate was given without w_gate")
        return
    if activation not in _GATED:
        raise ValueError(f"fused_chunked_ffn: w_gate needs a gated activation {sorted(_GATED)}, got {activation!r}")
    reason = separate_gate_reason(w1, b1, w_gate, b_gate)
    if reason is not None:
        raise ValueError(f"fused_chunked_ffn: {reason}")


def separate_gate_reason(w1: torch.Tensor, b1: torch.Tensor | None, w_gate: torch.Tensor,
                         b_gate: torch.Tensor | None) -> str | None:
    """Why a gate Linear of its own (``w_gate``, ``b_gate``) cannot go with the value projection ``w1``, ``b1``, or
    None: the up kernel reads the value and gate tiles through one set of strides (free for ``nn.Linear`` weights)."""
    if w_gate.shape != w1.shape or w_gate.stride() != w1.stride():
        return (f"w_gate must have w1's shape and strides, got {tuple(w_gate.shape)} / {w_gate.stride()} vs "
                f"{tuple(w1.shape)} / {w1.stride()}")
    if (b1 is None) != (b_gate is None) or (b1 is not None and b1.stride() != b_gate.stride()):
        return "b1 and b_gate must both be given (with equal strides) or both be None"
    return None


def fused_chunked_ffn_with_plan(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    activation: str,
    plan: FusedFFNPlan,
    *,
    w_gate: torch.Tensor | None = None,
    b_gate: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`fused_chunked_ffn` with an explicit :class:`FusedFFNPlan` (e.g. a planner's smaller token blocks, or
    the cuBLAS down GEMM).

    Example:
        >>> import dataclasses
        >>> plan = plan_fused_ffn(num_rows=75600, hidden=13824, out_features=5120, element_size=2)
        >>> dataclasses.replace(plan, down_gemm="cublas")
        FusedFFNPlan(rows_per_block=8448, chunk_size=13824, workspace_bytes=233570304, down_gemm='cublas')
    """
    _check_inputs(x, w1, b1, w2, b2, activation, plan.chunk_size, w_gate, b_gate)
    if plan.rows_per_block < 1:
        raise ValueError(f"fused_chunked_ffn: plan.rows_per_block must be >= 1, got {plan.rows_per_block}")
    if plan.down_gemm not in DOWN_GEMMS:
        raise ValueError(f"fused_chunked_ffn: plan.down_gemm must be one of {DOWN_GEMMS}, got {plan.down_gemm!r}")
    availability = fused_ffn_available(x.device, x.dtype)
    if not availability:
        raise RuntimeError(f"fused_chunked_ffn cannot run on {x.device} ({x.dtype}): {availability.reason}")
    x2d = x.reshape(-1, x.shape[-1])
    out = FusedChunkedFFNFunction.apply(x2d, w1, b1, w2, b2, w_gate, b_gate, activation, plan)
    return out.reshape(*x.shape[:-1], w2.shape[0])


def fused_chunked_ffn(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    activation: str = "gelu_tanh",
    chunk_size: int | None = None,
    *,
    w_gate: torch.Tensor | None = None,
    b_gate: torch.Tensor | None = None,
) -> torch.Tensor:
    """``act(x @ w1.T + b1) @ w2.T + b2`` without materialising the ``(M, F)`` intermediate; differentiable.

    Args:
        x: ``(..., D)`` activations, fp32 / fp16 / bf16; any leading shape.
        w1: ``(F, D)`` weight of the first ``nn.Linear`` (``(2F, D)`` for geglu/swiglu), used in place through its
            strides -- views and slices of parameters work, nothing is copied.
        b1: ``(F,)`` / ``(2F,)`` bias or None.
        w2: ``(D_out, F)`` weight of the second ``nn.Linear``.
        b2: ``(D_out,)`` bias or None.
        activation: One of :data:`ACTIVATIONS` (``"gelu"`` is the erf form, ``"gelu_tanh"`` the tanh approximation).
        chunk_size: Hidden features per chunk; None lets :func:`plan_fused_ffn` cut tokens into blocks instead,
            which keeps the workspace within 1/8 of the unfused intermediate.
        w_gate: for geglu/swiglu whose gate is a Linear of its own (LLaMA-style ``down(silu(gate(x)) * up(x))``,
            e.g. Z-Image, Kandinsky 5, HiDream): the ``(F, D)`` gate weight, with ``w1`` the ``(F, D)`` value
            weight. Same shape and strides as ``w1``.
        b_gate: the gate's ``(F,)`` bias, given exactly when ``b1`` is.

    Raises:
        RuntimeError: The kernel cannot run on ``x.device`` (see :func:`fused_ffn_available`); no silent fallback.

    Example:
        >>> import torch
        >>> from memopt.kernels import fused_chunked_ffn, fused_ffn_available
        >>> x = torch.randn(2, 77, 64)
        >>> w1, b1, w2, b2 = torch.randn(256, 64), torch.randn(256), torch.randn(64, 256), torch.randn(64)
        >>> if fused_ffn_available(x.device):  # a GPU, or TRITON_INTERPRET=1 on CPU
        ...     y = fused_chunked_ffn(x, w1, b1, w2, b2, activation="gelu_tanh")
    """
    _check_inputs(x, w1, b1, w2, b2, activation, chunk_size, w_gate, b_gate)
    num_rows = math.prod(x.shape[:-1])
    plan = plan_fused_ffn(num_rows, w2.shape[1], w2.shape[0], x.element_size(), chunk_size)
    return fused_chunked_ffn_with_plan(x, w1, b1, w2, b2, activation, plan, w_gate=w_gate, b_gate=b_gate)
