"""Triton kernels of the fused chunked FeedForward and the host loop that drives them.

This module imports Triton at the top; import it only through :mod:`memopt.kernels.chunked_ffn`, which guards the
import so that ``import memopt`` works without Triton.

The FeedForward ``y = act(x @ W1.T + b1) @ W2.T + b2`` is cut into slabs of ``rows_per_block`` tokens by
``chunk_size`` hidden features. Per slab two kernels run:

* ``_ffn_up_kernel`` -- the first GEMM with bias and activation in its epilogue. For the gated activations (GEGLU,
  SwiGLU) one program accumulates the value half and the gate half of its tile side by side and stores only
  ``value * act(gate)``, so the ``2F``-wide projection never reaches HBM.
* ``_ffn_down_kernel`` -- the second GEMM over that slab's hidden features. With several hidden chunks it adds its
  partial product to a running fp32 accumulator (the output itself for fp32) and the last chunk writes the output.
  With ``down_gemm="cublas"`` PyTorch's matmul (cuBLAS on CUDA) does this GEMM instead, into the same output rows and
  accumulator (see :func:`_cublas_down`): the second GEMM has no epilogue worth fusing, and cuBLAS runs it faster than
  this kernel on an H100; which one to use is decided by measurement (``benchmarks/ffn_kernel.py``).

A single kernel doing both GEMMs would have to keep a ``BLOCK_M x D`` fp32 output tile on chip (2.5 MiB for
D=5120), which does not fit; two GEMM kernels per slab keep each one at full tensor-core efficiency while the
intermediate exists one slab at a time.

All kernels take explicit strides, so the weights are used as the model's own parameters (views and slices, never
copies). When ``TRITON_INTERPRET=1`` is set before this module is imported, Triton's interpreter runs the kernels
on CPU tensors with one small tile configuration; that is how CI checks them.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.runtime import driver
from triton.runtime.interpreter import InterpretedFunction

ACTIVATION_IDS = {"gelu": 0, "gelu_tanh": 1, "silu": 2, "geglu": 0, "swiglu": 2}
"""Activation name -> the elementwise function the epilogue applies (0 gelu-erf, 1 gelu-tanh, 2 silu)."""

GATED_ACTIVATIONS = frozenset({"geglu", "swiglu"})
"""Activations whose first projection is ``2F`` wide and split into ``(value, gate)`` like diffusers' GEGLU/SwiGLU."""


def _config(block_m: int, block_n: int, block_k: int, num_warps: int, num_stages: int) -> triton.Config:
    return triton.Config(
        {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": 8},
        num_warps=num_warps,
        num_stages=num_stages,
    )


# Hopper-class tiles first; the last one fits GPUs with ~64 KB of shared memory per block (and fp32 gated tiles).
# _prune_configs keeps, for 16-bit non-gated GEMMs without an accumulator to load, all six on an H100 (227 KB) and an
# A100 (163 KB), all but the 4-stage 128x256 tile on ~100 KB GPUs (RTX 30xx-50xx) and the last one on 64 KB GPUs;
# the gated up-kernel and the accumulating down-kernel, with two fp32 tiles, keep none of the three 128x256 / 256x128
# tiles anywhere, and the gated one no 8-warp tile on mma.sync GPUs. benchmarks/kernel_codegen.py compiles every one of
# them for each architecture without a GPU and checks these rules against the compiler.
_GPU_CONFIGS = [
    _config(128, 256, 64, num_warps=8, num_stages=4),
    _config(256, 128, 64, num_warps=8, num_stages=3),
    _config(128, 256, 64, num_warps=8, num_stages=3),
    _config(128, 128, 64, num_warps=8, num_stages=4),
    _config(64, 128, 64, num_warps=4, num_stages=4),
    _config(64, 64, 32, num_warps=4, num_stages=3),
]
# The interpreter runs every program in Python: one small config, no autotuning, yet several tiles per test shape.
_INTERPRETER_CONFIGS = [_config(32, 32, 16, num_warps=4, num_stages=1)]

MAX_FP32_TILE_REGISTERS = 128
"""Registers per thread the fp32 tiles of one program may take: its accumulators and, in the accumulating down kernel,
the accumulator it loads in the epilogue. Half of the 255 a thread can address; the rest holds addresses, operand
fragments and the activation. Above it ptxas spills: two 128 x 256 fp32 tiles at 8 warps (256 registers a thread)
spill 16-336 bytes on sm_80, sm_86 and sm_90 (``benchmarks/results/ffn_kernel_codegen.md``)."""


def shared_memory_bytes(config: triton.Config, num_weight_tiles: int, element_size: int, target) -> int:
    """Shared memory a compiled kernel takes: one buffer of the input tile and its weight tiles per stage in flight.

    Triton's software pipeline keeps ``num_stages`` buffers where the tensor cores read both operands from shared memory
    asynchronously (Hopper's wgmma, compute capability 9.x; Blackwell's tcgen05, 10.x and 11.x, which also keeps
    :data:`TCGEN05_BARRIER_BYTES` of barriers there); GPUs with ``mma.sync`` (Ampere through RTX 50xx) load a stage
    into registers before its buffer is refilled, so ``num_stages - 1`` buffers are live. Other targets (AMD) get the
    ``num_stages`` upper bound. The compiler's own figure for aligned 16-bit tiles (checked for every config and
    architecture by ``benchmarks/kernel_codegen.py``); an upper bound where the loads are not pipelined.
    """
    block_m, block_n, block_k = (config.kwargs[name] for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
    stage_bytes = (block_m + num_weight_tiles * block_n) * block_k * element_size
    if _uses_mma_sync(target):
        return (config.num_stages - 1) * stage_bytes
    barriers = TCGEN05_BARRIER_BYTES * num_weight_tiles if _uses_tcgen05(target) else 0
    return config.num_stages * stage_bytes + barriers


TCGEN05_BARRIER_BYTES = 16
"""The two mbarriers (8 bytes each) a Blackwell kernel waits on for each accumulator's tcgen05 MMAs, in shared memory
(measured with Triton 3.9 for sm_100 by ``benchmarks/kernel_codegen.py``: 16 bytes, 32 in the gated kernel, for every
tile and stage count)."""


def _uses_tcgen05(target) -> bool:
    """Data-centre Blackwell (compute capability 10.x, 11.x): tcgen05 MMAs with the accumulator in tensor memory."""
    return target.backend == "cuda" and isinstance(target.arch, int) and 100 <= target.arch < 120


def _uses_mma_sync(target) -> bool:
    """NVIDIA GPUs whose tensor-core instruction is ``mma.sync`` (operands in registers): all but Hopper and
    data-centre Blackwell."""
    return target.backend == "cuda" and isinstance(target.arch, int) and (target.arch < 90 or target.arch >= 120)


def fp32_tile_registers(config: triton.Config, num_fp32_tiles: int) -> int:
    """Registers per thread that ``num_fp32_tiles`` fp32 tiles of ``BLOCK_M x BLOCK_N`` take, spread over the warps."""
    return num_fp32_tiles * config.kwargs["BLOCK_M"] * config.kwargs["BLOCK_N"] // (32 * config.num_warps)


def spills_registers(config: triton.Config, num_weight_tiles: int, num_fp32_tiles: int, target) -> bool:
    """Whether the tile's fp32 tiles leave too few registers, so that ptxas spills.

    Above :data:`MAX_FP32_TILE_REGISTERS` every GPU spills. With ``mma.sync`` the weight fragments of each k-step are
    in registers too, and the gated kernel's two at 8 warps tip the 128 x 128 tile over (168-196 spilled bytes on
    sm_80 / sm_86; the same tile at 4 warps, 64 x 128, does not spill). Both observed by
    ``benchmarks/kernel_codegen.py``, which checks that the pruner keeps exactly the tiles that do not spill.
    """
    if fp32_tile_registers(config, num_fp32_tiles) > MAX_FP32_TILE_REGISTERS:
        return True
    return _uses_mma_sync(target) and num_weight_tiles == 2 and config.num_warps > 4


def _prune_configs(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Drop tiles that cannot fit the device's shared memory or would spill their fp32 tiles out of registers.

    The gated up-kernel streams two weight tiles and keeps two accumulators; the accumulating down-kernel
    (``LOAD_ACC``) loads a second fp32 tile in its epilogue; fp32 inputs take twice the bytes.
    """
    args = {**named_args, **kwargs}
    target = driver.active.get_current_target()
    num_weight_tiles = 2 if args.get("GATED", False) else 1
    num_fp32_tiles = num_weight_tiles + (1 if args.get("LOAD_ACC", False) else 0)
    if _uses_tcgen05(target) and "out_ptr" in args and args["out_ptr"].element_size() == 4:
        # Blackwell moves the accumulator from tensor memory to registers for the epilogue, and storing it as fp32 (the
        # down kernel's first hidden chunk) takes as many registers as loading a second tile: 128 x 256 at 8 warps
        # spills 36 bytes on sm_100, 256 x 128 takes 253 of the 255 registers.
        num_fp32_tiles = max(num_fp32_tiles, 2)
    element_size = args["x_ptr"].element_size() if "x_ptr" in args else args["h_ptr"].element_size()
    device = (args["x_ptr"] if "x_ptr" in args else args["h_ptr"]).device
    max_shared = driver.active.utils.get_device_properties(device.index or 0)["max_shared_mem"]
    kept = [
        config
        for config in configs
        if shared_memory_bytes(config, num_weight_tiles, element_size, target) <= max_shared
        and not spills_registers(config, num_weight_tiles, num_fp32_tiles, target)
    ]
    return kept or [configs[-1]]


@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped tile order: GROUP_M row tiles sweep the columns together so their weight tiles stay in L2."""
    pid = tl.program_id(0)
    num_pid_m = (M + BLOCK_M - 1) // BLOCK_M
    num_pid_n = (N + BLOCK_N - 1) // BLOCK_N
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_size_m
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


INTERPRETED: bool = isinstance(_tile_ids, InterpretedFunction)
"""True when this module's kernels run under Triton's CPU interpreter (TRITON_INTERPRET=1 when it was imported)."""

_CONFIGS = _INTERPRETER_CONFIGS if INTERPRETED else _GPU_CONFIGS


@triton.jit
def _activation(x, ACTIVATION: tl.constexpr):
    """Elementwise activation in fp32, matching torch.nn.functional (gelu erf / gelu tanh / silu).

    Only Triton builtins here and in the kernels (no ``tl.sigmoid`` / ``tl.cdiv`` / ``tl.zeros``): those are
    ``@triton.jit`` functions of triton.language, compiled-only when Triton was imported before TRITON_INTERPRET was
    set (diffusers imports Triton), so the interpreter could not call them.
    """
    if ACTIVATION == 0:
        return 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))
    elif ACTIVATION == 1:
        # 0.5 * x * (1 + tanh(u)) == x * sigmoid(2u) with u = sqrt(2/pi) * (x + 0.044715 x^3).
        return x / (1.0 + tl.exp(-1.5957691216057308 * (x + 0.044715 * x * x * x)))
    else:
        return x / (1.0 + tl.exp(-x))


@triton.autotune(configs=_CONFIGS, key=["N", "K", "GATED"], prune_configs_by={"early_config_prune": _prune_configs})
@triton.jit
def _ffn_up_kernel(
    x_ptr, w_value_ptr, w_gate_ptr, b_value_ptr, b_gate_ptr, h_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_b, stride_hm, stride_hn,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, GATED: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """h[M, N] = act(x[M, K] @ w_value[N, K].T + b_value), or for GATED value * act(gate) with both halves here."""
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Wrapped row/column indices keep every load in bounds without masks; the store masks the edges.
    rows = (offs_m % M).to(tl.int64)
    cols = offs_n % N
    x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_offsets = offs_k[:, None] * stride_wk + cols[None, :] * stride_wn
    w_value_ptrs = w_value_ptr + w_offsets
    acc_value = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)
    if GATED:
        w_gate_ptrs = w_gate_ptr + w_offsets
        acc_gate = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)
    for k in range(0, (K + BLOCK_K - 1) // BLOCK_K):
        k_mask = offs_k < K - k * BLOCK_K
        x_tile = tl.load(x_ptrs, mask=k_mask[None, :], other=0.0)
        w_tile = tl.load(w_value_ptrs, mask=k_mask[:, None], other=0.0)
        if DOT_IN_FP32:
            x_tile = x_tile.to(tl.float32)
            w_tile = w_tile.to(tl.float32)
        acc_value = tl.dot(x_tile, w_tile, acc_value, input_precision=INPUT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_value_ptrs += BLOCK_K * stride_wk
        if GATED:
            w_tile = tl.load(w_gate_ptrs, mask=k_mask[:, None], other=0.0)
            if DOT_IN_FP32:
                w_tile = w_tile.to(tl.float32)
            acc_gate = tl.dot(x_tile, w_tile, acc_gate, input_precision=INPUT_PRECISION)
            w_gate_ptrs += BLOCK_K * stride_wk
    if HAS_BIAS:
        acc_value += tl.load(b_value_ptr + cols * stride_b).to(tl.float32)[None, :]
        if GATED:
            acc_gate += tl.load(b_gate_ptr + cols * stride_b).to(tl.float32)[None, :]
    if GATED:
        h = acc_value * _activation(acc_gate, ACTIVATION)
    else:
        h = _activation(acc_value, ACTIVATION)
    h_ptrs = h_ptr + offs_m[:, None].to(tl.int64) * stride_hm + offs_n[None, :] * stride_hn
    tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.autotune(
    configs=_CONFIGS,
    key=["N", "K", "LOAD_ACC"],  # the accumulating variant holds a second fp32 tile: pruned and timed on its own
    prune_configs_by={"early_config_prune": _prune_configs},
    restore_value=["acc_ptr"],  # autotuning re-runs the kernel; an in-place accumulation must start over each time
)
@triton.jit
def _ffn_down_kernel(
    h_ptr, w_ptr, b_ptr, acc_ptr, out_ptr,
    M, N, K,
    stride_hm, stride_hk, stride_wn, stride_wk, stride_b, stride_accm, stride_accn, stride_om, stride_on,
    HAS_BIAS: tl.constexpr, LOAD_ACC: tl.constexpr, INPUT_PRECISION: tl.constexpr, DOT_IN_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """out[M, N] = h[M, K] @ w[N, K].T (+ acc[M, N] if LOAD_ACC) (+ b if HAS_BIAS), summed in fp32, cast on store."""
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    rows = (offs_m % M).to(tl.int64)
    cols = offs_n % N
    h_ptrs = h_ptr + rows[:, None] * stride_hm + offs_k[None, :] * stride_hk
    w_ptrs = w_ptr + offs_k[:, None] * stride_wk + cols[None, :] * stride_wn
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, dtype=tl.float32)
    for k in range(0, (K + BLOCK_K - 1) // BLOCK_K):
        k_mask = offs_k < K - k * BLOCK_K
        h_tile = tl.load(h_ptrs, mask=k_mask[None, :], other=0.0)
        w_tile = tl.load(w_ptrs, mask=k_mask[:, None], other=0.0)
        if DOT_IN_FP32:
            h_tile = h_tile.to(tl.float32)
            w_tile = w_tile.to(tl.float32)
        acc = tl.dot(h_tile, w_tile, acc, input_precision=INPUT_PRECISION)
        h_ptrs += BLOCK_K * stride_hk
        w_ptrs += BLOCK_K * stride_wk
    out_rows = offs_m[:, None].to(tl.int64)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if LOAD_ACC:
        acc += tl.load(acc_ptr + out_rows * stride_accm + offs_n[None, :] * stride_accn, mask=mask).to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols * stride_b).to(tl.float32)[None, :]
    out_ptrs = out_ptr + out_rows * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _grid(num_rows: int, num_cols: int):
    return lambda meta: (triton.cdiv(num_rows, meta["BLOCK_M"]) * triton.cdiv(num_cols, meta["BLOCK_N"]),)


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer the kernels write goes through here: the tests swap in NaN-filled buffers to catch unwritten
    elements."""
    return torch.empty(shape, dtype=dtype, device=device)


def _input_precision(dtype: torch.dtype) -> str | None:
    """fp32 GEMMs follow PyTorch's matmul precision setting (tf32 only where PyTorch would use it); None keeps
    Triton's default for 16-bit operands."""
    if dtype != torch.float32:
        return None
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


@functools.cache
def fp32_output_gemm_supported(device: torch.device) -> bool:
    """Whether ``torch.mm`` / ``torch.addmm`` with ``out_dtype=torch.float32`` accumulate 16-bit GEMMs into an fp32
    tensor on ``device``; cached per device.

    That lets the cuBLAS down GEMM keep the fp32 accumulator of several hidden chunks, as the Triton one does. The
    overloads are CUDA-only and new (PyTorch 2.8), and before PyTorch accepted an fp32 ``self`` for ``addmm`` they
    refused the accumulation, so this asks the device once instead of trusting a version number: a 16x16 bf16
    product of small integers (exact in every precision) is written, then accumulated, and checked. Deterministic
    inputs leave the caller's RNG alone.
    """
    if device.type != "cuda":
        return False
    values = (torch.arange(256, device=device).reshape(16, 16) % 7 - 3).to(torch.bfloat16)
    acc = torch.empty(16, 16, dtype=torch.float32, device=device)
    try:
        _fp32_output_gemm(values, values.T, acc, accumulate=False)
        _fp32_output_gemm(values, values.T, acc, accumulate=True)
    except (RuntimeError, TypeError):  # no such overload / a CPU-only build / an fp32 self refused
        return False
    return torch.equal(acc, 2 * (values.float() @ values.float().T))


def _fp32_output_gemm(h: torch.Tensor, w_t: torch.Tensor, acc: torch.Tensor, accumulate: bool) -> None:
    """``acc = h @ w_t`` (or ``acc += h @ w_t``) for 16-bit ``h``, ``w_t`` and an fp32 ``acc``, in one cuBLAS call:
    the products are summed in fp32 and never rounded to 16 bits."""
    if accumulate:
        torch.addmm(acc, h, w_t, out_dtype=torch.float32, out=acc)
    else:
        torch.mm(h, w_t, out_dtype=torch.float32, out=acc)


def _cublas_down(
    h: torch.Tensor,
    w_t: torch.Tensor,
    bias: torch.Tensor | None,
    out: torch.Tensor,
    acc: torch.Tensor | None,
    is_first: bool,
    is_last: bool,
) -> None:
    """The down GEMM of one slab and hidden chunk through PyTorch: ``out (+)= h @ w_t (+ bias)``.

    ``w_t`` is ``w2[:, chunk].T``, a transposed view cuBLAS reads in place (no copy for the ``nn.Linear`` layout).
    Without ``acc`` the partial products are added into ``out`` itself: exact for fp32 and for a single chunk; for a
    16-bit output built from several chunks (only when :func:`fp32_output_gemm_supported` is False, e.g. PyTorch
    < 2.8) each chunk's sum is rounded to 16 bits, the extra rounding PyTorch's own hidden-chunked FeedForward has
    (relative error ~``2**-8 * sqrt(num_chunks)`` in bf16, within the 1e-2 bf16 tolerance). With ``acc`` (fp32,
    several chunks) the chunks sum in fp32 and the last one adds the bias there and writes ``out`` once.
    """
    if acc is None:
        if not is_first:
            out.addmm_(h, w_t)
        elif bias is not None:
            torch.addmm(bias, h, w_t, out=out)
        else:
            torch.mm(h, w_t, out=out)
        return
    _fp32_output_gemm(h, w_t, acc, accumulate=not is_first)
    if is_last:
        if bias is None:
            out.copy_(acc)
        else:
            torch.add(acc, bias, out=out)


def fused_ffn_forward(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    activation: str,
    chunk_size: int,
    rows_per_block: int,
    down_gemm: str = "triton",
    w_gate: torch.Tensor | None = None,
    b_gate: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run the fused FeedForward on a 2-D ``x`` of shape ``(M, D)``; arguments are validated by the caller.

    For gated activations the gate rows are ``w1[F:]`` (diffusers' packed GEGLU/SwiGLU), or ``w_gate`` when the gate
    is a Linear of its own (LLaMA-style MLPs); the up kernel reads both through one set of strides.

    ``chunk_size`` hidden features and ``rows_per_block`` tokens make one slab; the workspace is one slab of the
    activated intermediate plus, when a 16-bit output is built from several hidden chunks, an fp32 accumulator of
    ``rows_per_block x D_out`` (not allocated by the ``"cublas"`` down GEMM where the device cannot accumulate into
    fp32, see :func:`_cublas_down`). ``down_gemm`` runs the second GEMM with ``_ffn_down_kernel`` (``"triton"``) or
    PyTorch's matmul (``"cublas"``). Returns a new ``(M, D_out)`` tensor in ``x.dtype``.
    """
    num_rows, in_features = x.shape
    out_features, hidden = w2.shape
    gated = activation in GATED_ACTIVATIONS
    device, dtype = x.device, x.dtype
    out = _empty((num_rows, out_features), dtype, device)
    if num_rows == 0:
        return out
    chunk_size = min(chunk_size, hidden)
    rows_per_block = min(rows_per_block, num_rows)
    num_chunks = triton.cdiv(hidden, chunk_size)
    use_fp32_accumulator = num_chunks > 1 and dtype != torch.float32
    if down_gemm == "cublas" and use_fp32_accumulator:
        use_fp32_accumulator = fp32_output_gemm_supported(device)
    h_buffer = _empty((rows_per_block, chunk_size), dtype, device)
    acc_buffer = _empty((rows_per_block, out_features), torch.float32, device) if use_fp32_accumulator else None
    precision = _input_precision(dtype)
    # Triton's interpreter multiplies the raw bits of bfloat16 dot operands (triton-lang/triton#11584): there the
    # tiles go to fp32 first, which gives the GPU's result (exact products, fp32 sums).
    dot_in_fp32 = INTERPRETED and dtype == torch.bfloat16
    b_stride1 = b1.stride(0) if b1 is not None else 0
    b_stride2 = b2.stride(0) if b2 is not None else 0

    for row_start in range(0, num_rows, rows_per_block):
        block_rows = min(rows_per_block, num_rows - row_start)
        x_block = x[row_start : row_start + block_rows]
        out_block = out[row_start : row_start + block_rows]
        acc_block = acc_buffer[:block_rows] if use_fp32_accumulator else out_block
        for chunk_index, f_start in enumerate(range(0, hidden, chunk_size)):
            width = min(chunk_size, hidden - f_start)
            value_rows = slice(f_start, f_start + width)
            if w_gate is not None:
                gate_weight, gate_bias = w_gate[value_rows], None if b_gate is None else b_gate[value_rows]
            else:
                gate_rows = slice(hidden + f_start, hidden + f_start + width) if gated else value_rows
                gate_weight, gate_bias = w1[gate_rows], None if b1 is None else b1[gate_rows]
            h = h_buffer[:block_rows, :width]
            _ffn_up_kernel[_grid(block_rows, width)](
                x_block, w1[value_rows], gate_weight,
                b1[value_rows] if b1 is not None else None, gate_bias, h,
                block_rows, width, in_features,
                x_block.stride(0), x_block.stride(1), w1.stride(0), w1.stride(1), b_stride1, h.stride(0), h.stride(1),
                HAS_BIAS=b1 is not None, ACTIVATION=ACTIVATION_IDS[activation], GATED=gated,
                INPUT_PRECISION=precision, DOT_IN_FP32=dot_in_fp32,
            )  # fmt: skip
            is_first, is_last = chunk_index == 0, chunk_index == num_chunks - 1
            w2_chunk = w2[:, value_rows]
            if down_gemm == "cublas":
                accumulator = acc_block if use_fp32_accumulator else None
                _cublas_down(h, w2_chunk.T, b2, out_block, accumulator, is_first, is_last)
                continue
            target = out_block if is_last or not use_fp32_accumulator else acc_block
            _ffn_down_kernel[_grid(block_rows, out_features)](
                h, w2_chunk, b2, acc_block, target,
                block_rows, out_features, width,
                h.stride(0), h.stride(1), w2.stride(0), w2.stride(1), b_stride2,
                acc_block.stride(0), acc_block.stride(1), target.stride(0), target.stride(1),
                HAS_BIAS=is_first and b2 is not None, LOAD_ACC=not is_first, INPUT_PRECISION=precision,
                DOT_IN_FP32=dot_in_fp32,
            )  # fmt: skip
    return out
