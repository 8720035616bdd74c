"""The Triton fused chunked FeedForward against diffusers' own FeedForward in fp64.

On CPU the kernels run under Triton's interpreter (see conftest.py), so shapes are tiny; they still span several
tiles, token blocks and hidden chunks with ragged edges. Every buffer the kernels allocate is NaN-filled first, so
an element a kernel forgets to write shows up as NaN in the result.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import os
import subprocess
import sys

import pytest
import torch
from diffusers.models.attention import FeedForward

from memopt.kernels import (
    ACTIVATIONS,
    aligned_chunk_size,
    fused_chunked_ffn,
    fused_chunked_ffn_with_plan,
    fused_ffn_available,
    misaligned_widths,
    plan_fused_ffn,
)
from memopt.kernels import chunked_ffn

KERNEL_MODULE = "memopt.kernels.fused_ffn"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GATED = ("geglu", "swiglu")
DIFFUSERS_ACTIVATION = {
    "gelu": "gelu",
    "gelu_tanh": "gelu-approximate",
    "silu": "linear-silu",
    "geglu": "geglu",
    "swiglu": "swiglu",
}
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


@pytest.fixture(autouse=True, scope="module")
def no_tf32():
    """fp32 must be compared without tf32 (the kernel follows PyTorch's matmul precision setting)."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(previous)


@pytest.fixture(autouse=True)
def kernel_allocations(monkeypatch) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """NaN-fill every buffer the kernels get (output, intermediate slab, accumulator) and record its shape."""
    kernels = importlib.import_module(KERNEL_MODULE)
    allocations = []

    def nan_empty(shape, dtype, device):
        allocations.append((tuple(shape), dtype))
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(kernels, "_empty", nan_empty)
    return allocations


def make_ffn(activation, dim, hidden, dim_out, dtype, bias1=True, bias2=True, seed=0):
    """diffusers' FeedForward in fp64 holding ``dtype``-rounded weights, and those weights as kernel inputs."""
    torch.manual_seed(seed)
    ff = FeedForward(dim, dim_out=dim_out, inner_dim=hidden, activation_fn=DIFFUSERS_ACTIVATION[activation]).double()
    first, second = ff.net[0].proj, ff.net[2]
    if not bias1:
        first.bias = None
    if not bias2:
        second.bias = None
    with torch.no_grad():
        for parameter in ff.parameters():
            parameter.copy_(parameter.to(dtype).double())
    parameters = (first.weight, first.bias, second.weight, second.bias)
    weights = [None if p is None else p.detach().to(DEVICE, dtype) for p in parameters]
    return ff, weights


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.detach().double().cpu() - expected.detach()).norm() / expected.detach().norm()).item()


def random_input(shape, dtype):
    return torch.randn(shape, dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("chunk_size", [None, 32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_forward_matches_diffusers(activation, dtype, chunk_size):
    ff, (w1, b1, w2, b2) = make_ffn(activation, dim=40, hidden=100, dim_out=40, dtype=dtype)
    x = random_input((127, 40), dtype)
    y = fused_chunked_ffn(x.to(DEVICE), w1, b1, w2, b2, activation=activation, chunk_size=chunk_size)
    assert y.shape == (127, 40) and y.dtype == dtype and y.device.type == DEVICE
    assert rel_err(y, ff(x.double())) <= TOLERANCE[dtype]


@pytest.mark.parametrize("activation", ["gelu_tanh", "swiglu"])
def test_forward_fp16(activation):
    ff, (w1, b1, w2, b2) = make_ffn(activation, dim=40, hidden=100, dim_out=16, dtype=torch.float16)
    x = random_input((2, 17, 40), torch.float16)
    y = fused_chunked_ffn(x.to(DEVICE), w1, b1, w2, b2, activation=activation, chunk_size=48)
    assert rel_err(y, ff(x.double())) <= TOLERANCE[torch.float16]


@pytest.mark.parametrize(
    "leading, dim, hidden, dim_out, activation, bias1, bias2, dtype",
    [
        ((1,), 16, 48, 16, "gelu", True, False, torch.float32),
        ((2, 17), 40, 100, 24, "swiglu", False, True, torch.float32),
        ((3, 1, 5), 16, 48, 40, "geglu", False, False, torch.bfloat16),
        ((17,), 40, 48, 16, "silu", True, True, torch.bfloat16),
    ],
)
def test_odd_shapes_and_missing_biases(leading, dim, hidden, dim_out, activation, bias1, bias2, dtype):
    ff, (w1, b1, w2, b2) = make_ffn(activation, dim, hidden, dim_out, dtype, bias1, bias2)
    x = random_input((*leading, dim), dtype)
    y = fused_chunked_ffn(x.to(DEVICE), w1, b1, w2, b2, activation=activation, chunk_size=32)
    assert y.shape == (*leading, dim_out)
    assert rel_err(y, ff(x.double())) <= TOLERANCE[dtype]


def test_empty_input():
    _, (w1, b1, w2, b2) = make_ffn("gelu", 16, 48, 24, torch.float32)
    y = fused_chunked_ffn(torch.empty(2, 0, 16, device=DEVICE), w1, b1, w2, b2, activation="gelu")
    assert y.shape == (2, 0, 24)


@pytest.mark.parametrize("activation, dtype", [("gelu_tanh", torch.float32), ("geglu", torch.bfloat16)])
def test_strided_weight_views_are_used_in_place(activation, dtype):
    """Column-major w1, w2 sliced out of a wider tensor, non-contiguous x: strides are honoured, nothing written."""
    ff, (w1, b1, w2, b2) = make_ffn(activation, dim=40, hidden=100, dim_out=24, dtype=dtype)
    w1_view = w1.t().contiguous().t()
    w2_storage = torch.cat([w2, torch.full_like(w2, float("nan"))], dim=1)
    w2_view = w2_storage[:, : w2.shape[1]]
    b1_view = torch.stack([b1, torch.full_like(b1, float("nan"))], dim=1)[:, 0]
    assert not (w1_view.is_contiguous() or w2_view.is_contiguous() or b1_view.is_contiguous())
    before = [t.clone() for t in (w1_view, w2_storage, b1_view)]
    x = random_input((40, 2, 17), dtype).permute(1, 2, 0)
    y = fused_chunked_ffn(x.to(DEVICE), w1_view, b1_view, w2_view, b2, activation=activation, chunk_size=40)
    assert rel_err(y, ff(x.double())) <= TOLERANCE[dtype]
    for original, now in zip(before, (w1_view, w2_storage, b1_view)):
        torch.testing.assert_close(now, original, equal_nan=True, rtol=0, atol=0)


@pytest.mark.parametrize("chunk_size", [None, 40])
@pytest.mark.parametrize("activation, dtype", [("gelu_tanh", torch.float32), ("geglu", torch.bfloat16)])
def test_token_blocks_and_hidden_chunks(monkeypatch, kernel_allocations, activation, dtype, chunk_size):
    """Shrink the planner's minimum block so 127 tokens run as 4 blocks; the workspace is what the plan says."""
    monkeypatch.setattr(chunked_ffn, "MIN_ROWS_PER_BLOCK", 32)
    monkeypatch.setattr(chunked_ffn, "ROW_ALIGNMENT", 16)
    plan = plan_fused_ffn(127, 100, 24, torch.tensor([], dtype=dtype).element_size(), chunk_size)
    assert plan.rows_per_block == 32
    ff, (w1, b1, w2, b2) = make_ffn(activation, dim=40, hidden=100, dim_out=24, dtype=dtype)
    x = random_input((127, 40), dtype)
    y = fused_chunked_ffn(x.to(DEVICE), w1, b1, w2, b2, activation=activation, chunk_size=chunk_size)
    assert rel_err(y, ff(x.double())) <= TOLERANCE[dtype]
    output, *workspace = kernel_allocations
    assert output == ((127, 24), dtype)
    workspace_bytes = sum(math.prod(shape) * torch.tensor([], dtype=d).element_size() for shape, d in workspace)
    assert workspace_bytes == plan.workspace_bytes


@pytest.mark.parametrize(
    "activation, dtype, bias1, bias2, chunk_size",
    [(activation, torch.float32, True, True, None) for activation in ACTIVATIONS]
    + [
        ("gelu_tanh", torch.bfloat16, True, True, None),
        ("swiglu", torch.bfloat16, True, False, 32),
        ("geglu", torch.float32, False, False, 32),
    ],
)
def test_gradients_match_diffusers(activation, dtype, bias1, bias2, chunk_size):
    ff, weights = make_ffn(activation, dim=40, hidden=100, dim_out=24, dtype=dtype, bias1=bias1, bias2=bias2)
    weights = [None if w is None else w.requires_grad_() for w in weights]
    x = random_input((2, 17, 40), dtype)
    grad_y = random_input((2, 17, 24), dtype)
    x_kernel = x.to(DEVICE).detach().requires_grad_()
    fused_chunked_ffn(x_kernel, *weights, activation=activation, chunk_size=chunk_size).backward(grad_y.to(DEVICE))
    x_ref = x.detach().double().requires_grad_()
    ff(x_ref).backward(grad_y.double())
    references = [x_ref, ff.net[0].proj.weight, ff.net[0].proj.bias, ff.net[2].weight, ff.net[2].bias]
    for name, mine, reference in zip(("x", "w1", "b1", "w2", "b2"), [x_kernel, *weights], references):
        if reference is None:
            assert mine is None
            continue
        assert mine.grad.dtype == dtype, name
        assert rel_err(mine.grad, reference.grad) <= TOLERANCE[dtype], name


def make_llama_mlp(activation, dim, hidden, dim_out, dtype, bias, seed=0):
    """``down(act(gate(x)) * up(x))`` with separate Linears (Z-Image, Kandinsky 5, HiDream...) in fp64 holding
    ``dtype``-rounded weights, and the kernel's ``(w1=up, b1, w2=down, b2, w_gate=gate, b_gate)``."""
    torch.manual_seed(seed)
    up, gate = torch.nn.Linear(dim, hidden, bias=bias).double(), torch.nn.Linear(dim, hidden, bias=bias).double()
    down = torch.nn.Linear(hidden, dim_out).double()
    act = torch.nn.functional.silu if activation == "swiglu" else torch.nn.functional.gelu
    with torch.no_grad():
        for parameter in [*up.parameters(), *gate.parameters(), *down.parameters()]:
            parameter.copy_(parameter.to(dtype).double())

    def reference(x):
        return down(act(gate(x)) * up(x))

    modules = (up.weight, up.bias, down.weight, down.bias, gate.weight, gate.bias)
    weights = [None if p is None else p.detach().to(DEVICE, dtype) for p in modules]
    return reference, (up, down, gate), weights


@pytest.mark.parametrize(
    "activation, dtype, bias, chunk_size",
    [("swiglu", torch.float32, False, None), ("swiglu", torch.float32, True, 32), ("geglu", torch.float32, True, 48),
     ("swiglu", torch.bfloat16, False, 32)],
)
def test_separate_gate_linear_forward_and_gradients(activation, dtype, bias, chunk_size):
    reference, (up, down, gate), (w1, b1, w2, b2, wg, bg) = make_llama_mlp(activation, 40, 100, 24, dtype, bias)
    weights = [None if w is None else w.requires_grad_() for w in (w1, b1, w2, b2, wg, bg)]
    w1, b1, w2, b2, wg, bg = weights
    x = random_input((2, 17, 40), dtype)
    grad_y = random_input((2, 17, 24), dtype)
    x_kernel = x.to(DEVICE).detach().requires_grad_()
    y = fused_chunked_ffn(x_kernel, w1, b1, w2, b2, activation=activation, chunk_size=chunk_size, w_gate=wg,
                          b_gate=bg)
    y.backward(grad_y.to(DEVICE))
    x_ref = x.detach().double().requires_grad_()
    y_ref = reference(x_ref)
    y_ref.backward(grad_y.double())
    assert rel_err(y, y_ref) <= TOLERANCE[dtype]
    expected = [x_ref, up.weight, up.bias, down.weight, down.bias, gate.weight, gate.bias]
    for name, mine, ref in zip(("x", "w1", "b1", "w2", "b2", "w_gate", "b_gate"), [x_kernel, *weights], expected):
        if ref is None:
            assert mine is None
            continue
        assert rel_err(mine.grad, ref.grad) <= TOLERANCE[dtype], name


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda w: {**w, "activation": "gelu"}, "w_gate needs a gated activation"),
        (lambda w: {**w, "w_gate": w["w_gate"].t().contiguous().t()}, "w_gate must have w1's shape and strides"),
        (lambda w: {**w, "b_gate": None}, "b1 and b_gate must both be given"),
        (lambda w: {**w, "w_gate": None}, "w1 must have shape"),
    ],
)
def test_separate_gate_bad_inputs(change, match):
    _, _, (w1, b1, w2, b2, wg, bg) = make_llama_mlp("swiglu", 16, 48, 16, torch.float32, bias=True)
    kwargs = change({"w1": w1, "b1": b1, "w2": w2, "b2": b2, "w_gate": wg, "b_gate": bg, "activation": "swiglu"})
    with pytest.raises(ValueError, match=match):
        fused_chunked_ffn(torch.randn(5, 16, device=DEVICE), **kwargs)


def test_backward_skips_inputs_without_grad():
    ff, (w1, b1, w2, b2) = make_ffn("swiglu", dim=16, hidden=48, dim_out=16, dtype=torch.float32)
    w2.requires_grad_()
    x = random_input((17, 16), torch.float32).to(DEVICE)
    fused_chunked_ffn(x, w1, b1, w2, b2, activation="swiglu").sum().backward()
    ff(x.double().cpu()).sum().backward()
    assert w1.grad is None and x.grad is None
    assert rel_err(w2.grad, ff.net[2].weight.grad) <= TOLERANCE[torch.float32]


def cublas_plan(num_rows, hidden, dim_out, dtype, chunk_size):
    """The default plan (or one with ``chunk_size``) with the second GEMM run by PyTorch."""
    plan = plan_fused_ffn(num_rows, hidden, dim_out, torch.tensor([], dtype=dtype).element_size(), chunk_size)
    return dataclasses.replace(plan, down_gemm="cublas")


def workspace_bytes(allocations) -> int:
    """Bytes of every kernel buffer but the first (the output)."""
    return sum(math.prod(shape) * torch.tensor([], dtype=dtype).element_size() for shape, dtype in allocations[1:])


@pytest.fixture
def small_token_blocks(monkeypatch):
    """127 tokens run as 4 blocks of 32 (the last one ragged)."""
    monkeypatch.setattr(chunked_ffn, "MIN_ROWS_PER_BLOCK", 32)
    monkeypatch.setattr(chunked_ffn, "ROW_ALIGNMENT", 16)


@pytest.mark.parametrize(
    "activation, dtype, chunk_size, bias2",
    [
        ("gelu_tanh", torch.float32, None, True),
        ("gelu_tanh", torch.float32, 96, True),
        ("swiglu", torch.float32, 96, False),
        ("gelu", torch.bfloat16, None, False),
        ("silu", torch.bfloat16, 96, True),
        ("geglu", torch.bfloat16, 96, True),
    ],
)
def test_cublas_down_matches_diffusers(small_token_blocks, kernel_allocations, activation, dtype, chunk_size, bias2):
    """Triton up-kernel + PyTorch down GEMM: odd sizes, 4 token blocks, 1 or 3 hidden chunks (273 = 96 + 96 + 81)."""
    ff, (w1, b1, w2, b2) = make_ffn(activation, dim=100, hidden=273, dim_out=70, dtype=dtype, bias2=bias2)
    x = random_input((127, 100), dtype)
    plan = cublas_plan(127, 273, 70, dtype, chunk_size)
    assert plan.rows_per_block == 32
    y = fused_chunked_ffn_with_plan(x.to(DEVICE), w1, b1, w2, b2, activation, plan)
    assert y.shape == (127, 70) and y.dtype == dtype
    assert rel_err(y, ff(x.double())) <= TOLERANCE[dtype]
    assert kernel_allocations[0] == ((127, 70), dtype)
    assert workspace_bytes(kernel_allocations) <= plan.workspace_bytes


@pytest.mark.parametrize("bias2", [True, False])
@pytest.mark.parametrize("fp32_gemm", [True, False], ids=["fp32-accumulator", "bf16-accumulation"])
def test_cublas_down_bf16_hidden_chunks(small_token_blocks, kernel_allocations, monkeypatch, fp32_gemm, bias2):
    """Several bf16 hidden chunks sum in the fp32 accumulator where PyTorch has ``out_dtype=torch.float32`` GEMMs,
    else in bf16 without one. Both paths run on every machine: a CPU (no such GEMMs) emulates the fp32 one in fp32
    (exact products of bf16 values, fp32 sums, as cuBLAS), a GPU is told it lacks them for the other."""
    kernels = importlib.import_module(KERNEL_MODULE)
    calls = []
    if fp32_gemm and not kernels.fp32_output_gemm_supported(torch.device(DEVICE)):

        def emulated_fp32_output_gemm(h, w_t, acc, accumulate):
            calls.append(accumulate)
            product = h.float() @ w_t.float()
            acc.copy_(acc + product if accumulate else product)

        monkeypatch.setattr(kernels, "_fp32_output_gemm", emulated_fp32_output_gemm)
    monkeypatch.setattr(kernels, "fp32_output_gemm_supported", lambda device: fp32_gemm)
    ff, (w1, b1, w2, b2) = make_ffn("swiglu", dim=40, hidden=100, dim_out=24, dtype=torch.bfloat16, bias2=bias2)
    x = random_input((127, 40), torch.bfloat16)
    plan = cublas_plan(127, 100, 24, torch.bfloat16, chunk_size=40)
    assert plan.rows_per_block == 32
    y = fused_chunked_ffn_with_plan(x.to(DEVICE), w1, b1, w2, b2, "swiglu", plan)
    assert rel_err(y, ff(x.double())) <= TOLERANCE[torch.bfloat16]
    slab_bytes = 32 * 40 * 2
    assert workspace_bytes(kernel_allocations) == (plan.workspace_bytes if fp32_gemm else slab_bytes)
    if DEVICE == "cpu" and fp32_gemm:
        assert calls == [False, True, True] * 4  # 4 token blocks x 3 hidden chunks


def test_fp32_output_gemm_probe_says_no_on_cpu():
    assert importlib.import_module(KERNEL_MODULE).fp32_output_gemm_supported(torch.device("cpu")) is False


@pytest.mark.parametrize(
    "activation, dtype, chunk_size",
    [("gelu_tanh", torch.float32, None), ("swiglu", torch.bfloat16, 32), ("geglu", torch.float32, 32)],
)
def test_cublas_down_gradients_match_diffusers(activation, dtype, chunk_size):
    """The backward (PyTorch, recomputing per hidden chunk) is the same for both down GEMMs; the plan reaches it."""
    ff, weights = make_ffn(activation, dim=40, hidden=100, dim_out=24, dtype=dtype)
    weights = [w.requires_grad_() for w in weights]
    x = random_input((2, 17, 40), dtype)
    grad_y = random_input((2, 17, 24), dtype)
    x_kernel = x.to(DEVICE).detach().requires_grad_()
    plan = cublas_plan(34, 100, 24, dtype, chunk_size)
    fused_chunked_ffn_with_plan(x_kernel, *weights, activation, plan).backward(grad_y.to(DEVICE))
    x_ref = x.detach().double().requires_grad_()
    ff(x_ref).backward(grad_y.double())
    references = [x_ref, ff.net[0].proj.weight, ff.net[0].proj.bias, ff.net[2].weight, ff.net[2].bias]
    for name, mine, reference in zip(("x", "w1", "b1", "w2", "b2"), [x_kernel, *weights], references):
        assert mine.grad.dtype == dtype, name
        assert rel_err(mine.grad, reference.grad) <= TOLERANCE[dtype], name


def test_unknown_down_gemm_is_refused():
    _, (w1, b1, w2, b2) = make_ffn("gelu", 16, 48, 16, torch.float32)
    plan = dataclasses.replace(plan_fused_ffn(3, 48, 16, 4), down_gemm="cutlass")
    with pytest.raises(ValueError, match=r"plan.down_gemm must be one of \('triton', 'cublas'\), got 'cutlass'"):
        fused_chunked_ffn_with_plan(torch.zeros(3, 16, device=DEVICE), w1, b1, w2, b2, "gelu", plan)


BENCHMARK_SHAPES = {
    "wan2.1-14b": (5120, 13824),
    "hunyuanvideo/flux": (3072, 12288),
    "wan2.1-1.3b": (1536, 8960),
    "gated d3072 f8192": (3072, 8192),
}


@pytest.mark.parametrize("chunk_fraction", [None, 8])
@pytest.mark.parametrize("num_tokens", [16384, 75600])
@pytest.mark.parametrize("shape", BENCHMARK_SHAPES.values(), ids=BENCHMARK_SHAPES.keys())
def test_plan_workspace_is_an_eighth_of_the_intermediate(shape, num_tokens, chunk_fraction):
    dim, hidden = shape
    chunk_size = None if chunk_fraction is None else hidden // chunk_fraction
    plan = plan_fused_ffn(num_tokens, hidden, dim, element_size=2, chunk_size=chunk_size)
    assert plan.workspace_bytes <= num_tokens * hidden * 2 // 8
    assert plan.rows_per_block % chunked_ffn.ROW_ALIGNMENT == 0
    assert plan.rows_per_block >= chunked_ffn.MIN_ROWS_PER_BLOCK


def test_plan_small_inputs_use_one_block():
    plan = plan_fused_ffn(num_rows=300, hidden=100, out_features=40, element_size=4)
    assert (plan.rows_per_block, plan.chunk_size, plan.workspace_bytes) == (300, 100, 300 * 100 * 4)


@pytest.mark.parametrize(
    "change, error, match",
    [
        ({"activation": "relu"}, ValueError, "activation must be one of"),
        ({"chunk_size": 0}, ValueError, "chunk_size must be a positive int"),
        ({"w1": torch.zeros(99, 16)}, ValueError, "w1 must have shape"),
        ({"b2": torch.zeros(7)}, ValueError, r"b2 must have shape \(16,\)"),
        ({"w2": torch.zeros(16, 48, dtype=torch.float64)}, TypeError, "w2 is torch.float64"),
        ({"x": torch.zeros(3, 16, dtype=torch.int32)}, TypeError, "x is torch.int32"),
    ],
)
def test_bad_inputs_raise_clear_errors(change, error, match):
    arguments = {
        "x": torch.zeros(3, 16),
        "w1": torch.zeros(48, 16),
        "b1": torch.zeros(48),
        "w2": torch.zeros(16, 48),
        "b2": torch.zeros(16),
        "activation": "gelu",
        "chunk_size": None,
    }
    arguments.update(change)
    with pytest.raises(error, match=match):
        fused_chunked_ffn(**arguments)


def test_available_here():
    availability = fused_ffn_available(DEVICE)
    assert availability and availability.reason
    if DEVICE == "cpu":
        assert "TRITON_INTERPRET=1" in availability.reason


def test_shards_and_widths_stay_on_the_fast_path():
    """Shards of the hidden width are cut at multiples of 16 (the fast path of ``benchmarks/kernel_codegen.py``),
    never more of them than asked for; widths off that grid are named, so that ``kernel="auto"`` keeps cuBLAS."""
    assert aligned_chunk_size(13824, 8) == 1728  # already a multiple of 16
    assert aligned_chunk_size(8960, 3) == 2992  # ceil(8960 / 3) = 2987: three shards 2992, 2992, 2976
    assert aligned_chunk_size(80, 3) == 32 and aligned_chunk_size(10, 4) == 10
    for width in (8960, 80, 2731, 10):
        for shards in (1, 2, 3, 5, 8):
            size = aligned_chunk_size(width, shards)
            assert -(-width // size) <= shards and (size % 16 == 0 or size == width)
    assert misaligned_widths({"model width": 5120, "inner width": 13824}) is None
    reason = misaligned_widths({"model width": 1000, "inner width": 2731, "column offset": 3072})
    assert "model width 1000, inner width 2731 not a multiple of 16" in reason and "3072" not in reason


def test_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setattr(importlib.import_module(KERNEL_MODULE), "INTERPRETED", False)
    availability = fused_ffn_available("cpu")
    assert not availability
    assert "needs a CUDA GPU" in availability.reason and "TRITON_INTERPRET=1" in availability.reason
    _, (w1, b1, w2, b2) = make_ffn("gelu", 16, 48, 16, torch.float32)
    with pytest.raises(RuntimeError, match="cannot run on cpu.*needs a CUDA GPU"):
        fused_chunked_ffn(torch.zeros(3, 16), w1.cpu(), b1.cpu(), w2.cpu(), b2.cpu(), activation="gelu")
    assert "CUDA devices only" in fused_ffn_available("meta").reason


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without CUDA")
def test_cuda_requested_without_cuda(monkeypatch):
    monkeypatch.setattr(importlib.import_module(KERNEL_MODULE), "INTERPRETED", False)
    availability = fused_ffn_available("cuda")
    assert not availability and "torch.cuda.is_available() is False" in availability.reason


def test_missing_triton_is_reported(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)
    monkeypatch.delitem(sys.modules, KERNEL_MODULE)
    availability = fused_ffn_available(DEVICE)
    assert not availability and "Triton is not importable" in availability.reason
    with pytest.raises(RuntimeError, match="Triton is not importable"):
        fused_chunked_ffn(torch.zeros(3, 16), torch.zeros(48, 16), None, torch.zeros(16, 48), None, "gelu")


def test_import_memopt_kernels_without_triton():
    """A fresh interpreter where ``import triton`` fails can still import memopt.kernels and ask."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import memopt.kernels as kernels\n"
        "availability = kernels.fused_ffn_available()\n"
        "assert not availability, availability\n"
        "print(availability.reason)\n"
    )
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "Triton is not importable" in result.stdout
