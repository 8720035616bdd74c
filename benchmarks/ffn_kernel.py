"""The Triton fused chunked FeedForward against unfused and hidden-chunked PyTorch: time, TFLOP/s, peak memory.

Methods, all computing diffusers' FeedForward ``act(x @ w1.T + b1) @ w2.T + b2`` in bf16:

* ``unfused``: ``F.linear -> act -> F.linear`` (what diffusers runs; the full ``(M, F)`` intermediate, twice).
* ``pytorch F/8 chunks``: the hidden features in 8 chunks, each ``act(F.linear)`` then ``addmm_`` into the output.
* ``fused (default plan)``: :func:`memopt.kernels.fused_chunked_ffn` with ``chunk_size=None`` (token blocks,
  all hidden features per block, workspace <= 1/8 of the ``(M, F)`` intermediate).
* ``fused F/8 chunks``: the kernel with ``chunk_size=F/8`` (hidden chunks with an fp32 accumulator; token blocks
  grow to the same budget) -- the other design, measured side by side.
* ``fused up + cuBLAS down (default plan)`` / ``... F/8 chunks``: the same two plans with
  ``FusedFFNPlan.down_gemm="cublas"``: the Triton up-kernel (GEMM1 + bias + activation) per slab, then
  ``torch.addmm`` into the output rows for GEMM2; same workspace. The environment line says whether this PyTorch
  accumulates the F/8 chunks in fp32 (``out_dtype=torch.float32`` GEMMs) or in bf16.

Time is the median of ``triton.testing.do_bench`` (after a warm-up call that also autotunes); peak is
``torch.cuda.max_memory_allocated()`` during one call minus what was allocated before it (so it includes the output);
"extra" is peak minus the output, relative to the ``(M, F)`` bf16 intermediate. Every row is checked against
``unfused`` (relative Frobenius error <= 1e-2); the script exits 1 if any check fails.

Usage (on a CUDA machine)::

    python benchmarks/ffn_kernel.py --out benchmarks/results        # or $OUT when set
    python benchmarks/ffn_kernel.py --tokens 75600 --only "default plan"   # unfused + the two default-plan rows

Writes ``ffn_kernel.md`` (table + environment + autotuned configs) and ``ffn_kernel.csv``. Without CUDA it prints one
line and exits 0.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import os
import platform
import sys
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memopt.kernels import (  # noqa: E402
    fused_chunked_ffn,
    fused_chunked_ffn_with_plan,
    fused_ffn_available,
    plan_fused_ffn,
)

GIB = 1024**3
DEVICE = "cuda"
DTYPE = torch.bfloat16
TOLERANCE = 1e-2
PYTORCH_CHUNKS = 8

# (name, D, F, activation): Wan2.1-14B, HunyuanVideo / Flux, Wan2.1-1.3B, and one gated FeedForward.
SHAPES = [
    ("Wan2.1-14B", 5120, 13824, "gelu_tanh"),
    ("HunyuanVideo/Flux", 3072, 12288, "gelu_tanh"),
    ("Wan2.1-1.3B", 1536, 8960, "gelu_tanh"),
    ("SwiGLU D3072 F8192", 3072, 8192, "swiglu"),
]
DEFAULT_TOKENS = (16384, 75600)
GATED = ("geglu", "swiglu")


def gated(value: torch.Tensor, gate: torch.Tensor, activation: str) -> torch.Tensor:
    return value * (F.gelu(gate) if activation == "geglu" else F.silu(gate))


def activate(h: torch.Tensor, activation: str) -> torch.Tensor:
    """diffusers' activation of the first projection (GEGLU/SwiGLU: ``value, gate = h.chunk(2, -1)``)."""
    if activation in GATED:
        return gated(*h.chunk(2, dim=-1), activation)
    if activation == "silu":
        return F.silu(h)
    return F.gelu(h, approximate="tanh" if activation == "gelu_tanh" else "none")


def unfused(x, w1, b1, w2, b2, activation):
    return F.linear(activate(F.linear(x, w1, b1), activation), w2, b2)


def pytorch_chunked(x, w1, b1, w2, b2, activation):
    """Hidden-chunked PyTorch: slices of the parameters (views), partial products added into the output."""
    hidden = w2.shape[1]
    chunk = math.ceil(hidden / PYTORCH_CHUNKS)
    out = None
    for start in range(0, hidden, chunk):
        rows = slice(start, min(start + chunk, hidden))
        if activation in GATED:
            gate_rows = slice(hidden + rows.start, hidden + rows.stop)
            h = gated(F.linear(x, w1[rows], b1[rows]), F.linear(x, w1[gate_rows], b1[gate_rows]), activation)
        else:
            h = activate(F.linear(x, w1[rows], b1[rows]), activation)
        if out is None:
            out = torch.addmm(b2, h, w2[:, rows].T)
        else:
            out.addmm_(h, w2[:, rows].T)
        del h
    return out


def measure_peak(fn: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Run ``fn`` once; return its output and the allocator peak above what was allocated before."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    return out, torch.cuda.max_memory_allocated() - before


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).norm() / expected.float().norm()).item()


def environment() -> str:
    import triton

    from memopt.kernels import fused_ffn

    fp32_gemm = fused_ffn.fp32_output_gemm_supported(torch.device(DEVICE, torch.cuda.current_device()))
    return (
        f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}; triton {triton.__version__}; "
        f"python {platform.python_version()}; dtype bf16; cuBLAS down GEMM accumulates hidden chunks in "
        f"{'fp32 (out_dtype GEMMs)' if fp32_gemm else 'bf16 (no out_dtype GEMMs in this PyTorch)'}"
    )


def run_shape(name, dim, hidden, activation, num_tokens, do_bench, only=()) -> list[dict]:
    """Time every method on one shape; ``only`` (substrings of method names) narrows them, ``unfused`` always runs
    as the reference."""
    torch.manual_seed(0)
    width1 = 2 * hidden if activation in GATED else hidden
    x = torch.randn(num_tokens, dim, device=DEVICE, dtype=DTYPE)
    w1 = (torch.randn(width1, dim, device=DEVICE) * dim**-0.5).to(DTYPE)
    b1 = (torch.randn(width1, device=DEVICE) * 0.1).to(DTYPE)
    w2 = (torch.randn(dim, hidden, device=DEVICE) * hidden**-0.5).to(DTYPE)
    b2 = (torch.randn(dim, device=DEVICE) * 0.1).to(DTYPE)
    args = (x, w1, b1, w2, b2, activation)
    flops = 2 * num_tokens * dim * width1 + 2 * num_tokens * hidden * dim
    intermediate_bytes = num_tokens * hidden * x.element_size()
    output_bytes = num_tokens * dim * x.element_size()
    default_plan = plan_fused_ffn(num_tokens, hidden, dim, 2)
    chunked_plan = plan_fused_ffn(num_tokens, hidden, dim, 2, chunk_size=hidden // 8)
    cublas_default_plan = dataclasses.replace(default_plan, down_gemm="cublas")
    cublas_chunked_plan = dataclasses.replace(chunked_plan, down_gemm="cublas")
    methods = {
        "unfused": (lambda: unfused(*args), "full intermediate"),
        f"pytorch F/{PYTORCH_CHUNKS} chunks": (
            lambda: pytorch_chunked(*args),
            f"{num_tokens} tokens x {math.ceil(hidden / PYTORCH_CHUNKS)} features",
        ),
        "fused (default plan)": (lambda: fused_chunked_ffn(*args), default_plan),
        "fused F/8 chunks": (lambda: fused_chunked_ffn(*args, chunk_size=hidden // 8), chunked_plan),
        "fused up + cuBLAS down (default plan)": (
            lambda: fused_chunked_ffn_with_plan(*args, cublas_default_plan),
            cublas_default_plan,
        ),
        "fused up + cuBLAS down F/8 chunks": (
            lambda: fused_chunked_ffn_with_plan(*args, cublas_chunked_plan),
            cublas_chunked_plan,
        ),
    }
    methods = {
        method: value
        for method, value in methods.items()
        if method == "unfused" or not only or any(part.lower() in method.lower() for part in only)
    }
    rows, reference = [], None
    for method, (fn, plan) in methods.items():
        row = {"shape": name, "D": dim, "F": hidden, "activation": activation, "tokens": num_tokens, "method": method}
        if not isinstance(plan, str):
            plan = f"{plan.rows_per_block} tokens x {plan.chunk_size} features"
        row["plan"] = plan
        try:
            fn()  # warm-up: compiles and autotunes the kernels, creates the cuBLAS workspace
            out, peak = measure_peak(fn)
            if reference is None:
                reference = out
            error = rel_err(out, reference)
            del out
            ms = do_bench(fn, warmup=50, rep=300, quantiles=(0.5, 0.2, 0.8))
        except torch.cuda.OutOfMemoryError:
            row.update(status="OOM")
            rows.append(row)
            torch.cuda.empty_cache()
            continue
        row.update(
            ms=ms[0],
            ms_p20=ms[1],
            ms_p80=ms[2],
            tflops=flops / (ms[0] * 1e-3) / 1e12,
            peak_gib=peak / GIB,
            extra_gib=(peak - output_bytes) / GIB,
            extra_vs_intermediate=(peak - output_bytes) / intermediate_bytes,
            rel_err=error,
            status="ok" if error <= TOLERANCE else "FAIL",
        )
        rows.append(row)
        torch.cuda.empty_cache()
    del reference, x, w1, b1, w2, b2
    torch.cuda.empty_cache()
    return rows


def format_table(rows: list[dict]) -> str:
    header = (
        "| shape | tokens | method | plan | time (ms) | TFLOP/s | x unfused time | peak (GiB) | extra over output "
        "(GiB) | extra / (M,F) intermediate | rel err vs unfused | check |"
    )
    lines = [header, "|" + "---|" * 12]
    unfused_ms = {}
    for row in rows:
        key = (row["shape"], row["tokens"])
        if row.get("status") == "OOM":
            lines.append(f"| {row['shape']} | {row['tokens']:,} | {row['method']} | {row['plan']} | OOM |||||||")
            continue
        unfused_ms.setdefault(key, row["ms"])
        lines.append(
            f"| {row['shape']} | {row['tokens']:,} | {row['method']} | {row['plan']} | {row['ms']:.2f} | "
            f"{row['tflops']:.0f} | {row['ms'] / unfused_ms[key]:.2f} | {row['peak_gib']:.3f} | "
            f"{row['extra_gib']:.3f} | "
            f"{row['extra_vs_intermediate']:.3f} | {row['rel_err']:.1e} | {row['status']} |"
        )
    return "\n".join(lines)


def autotuned_configs() -> list[str]:
    """The configs Triton's autotuner picked per key (N, K, ..., dtypes), for follow-up tuning."""
    from memopt.kernels import fused_ffn

    lines = []
    for name in ("_ffn_up_kernel", "_ffn_down_kernel"):
        for key, config in getattr(getattr(fused_ffn, name), "cache", {}).items():
            lines.append(f"- `{name}` key {key}: {config}")
    return lines or ["- (none: a single config per kernel)"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "benchmarks/results"))
    parser.add_argument("--tokens", type=int, nargs="+", default=list(DEFAULT_TOKENS))
    parser.add_argument(
        "--only",
        nargs="+",
        default=[],
        metavar="TEXT",
        help="run only the methods whose names contain one of these (case-insensitive); unfused always runs",
    )
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/ffn_kernel.py needs CUDA (no GPU found); nothing measured")
        return 0
    availability = fused_ffn_available("cuda", DTYPE)
    if not availability:
        print(f"benchmarks/ffn_kernel.py: the fused kernel cannot run here: {availability.reason}")
        return 0
    from triton.testing import do_bench

    env = environment()
    print(env, flush=True)
    rows = []
    for num_tokens in args.tokens:
        for name, dim, hidden, activation in SHAPES:
            rows.extend(run_shape(name, dim, hidden, activation, num_tokens, do_bench, args.only))
            print(format_table([r for r in rows if r["shape"] == name and r["tokens"] == num_tokens]), flush=True)

    table = format_table(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    markdown = [
        "# Fused chunked FeedForward kernel vs PyTorch",
        "",
        env + ".",
        "",
        "Time: median of `triton.testing.do_bench` (p20/p80 in the CSV). Peak: `max_memory_allocated` during one call "
        "minus what was allocated before (includes the output). Extra: peak minus the output, and that over the "
        "`(M, F)` bf16 intermediate the unfused FeedForward materialises (the target for the fused default plan is "
        "<= 0.125). Rel err: relative Frobenius error against `unfused`.",
        "",
        table,
        "",
        "Autotuned kernel configs:",
        "",
        *autotuned_configs(),
        "",
        "Regenerate with `python benchmarks/ffn_kernel.py --out benchmarks/results` on a CUDA machine.",
    ]
    (args.out / "ffn_kernel.md").write_text("\n".join(markdown) + "\n")
    fields = ["device", "torch", "triton", "shape", "D", "F", "activation", "tokens", "method", "plan", "ms", "ms_p20",
              "ms_p80", "tflops", "peak_gib", "extra_gib", "extra_vs_intermediate", "rel_err", "status"]
    import triton

    versions = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    with open(args.out / "ffn_kernel.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({**versions, **row})
    print(f"wrote {args.out / 'ffn_kernel.md'} and {args.out / 'ffn_kernel.csv'}")
    return 1 if any(row.get("status") != "ok" for row in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
