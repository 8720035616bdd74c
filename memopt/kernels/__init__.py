"""Triton kernels with autograd wrappers, plain tensors in and out.

Importing this package never imports Triton; the kernels load on first use, so ``import memopt`` works on machines
without Triton or CUDA. Ask :func:`fused_ffn_available` before calling a kernel and fall back to the PyTorch paths
of :mod:`memopt.hooks` when it says no.
"""

from .chunked_ffn import (
    ACTIVATIONS,
    ALIGNED_WIDTH,
    FusedFFNPlan,
    KernelAvailability,
    aligned_chunk_size,
    fused_chunked_ffn,
    fused_chunked_ffn_with_plan,
    fused_ffn_available,
    misaligned_widths,
    plan_fused_ffn,
    separate_gate_reason,
)

__all__ = [
    "ACTIVATIONS",
    "ALIGNED_WIDTH",
    "FusedFFNPlan",
    "KernelAvailability",
    "aligned_chunk_size",
    "fused_chunked_ffn",
    "fused_chunked_ffn_with_plan",
    "fused_ffn_available",
    "misaligned_widths",
    "plan_fused_ffn",
    "separate_gate_reason",
]
