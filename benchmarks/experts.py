"""Nucleus-Image's expert-choice MoE layers with their experts streamed in groups: peaks at full size, time on CPU.

Part 1, simulated (FakeTensorMode, bf16): the released Nucleus-Image transformer config (D = 2048, 64 experts of
width 1344, a shared expert; capacity factor 4 in blocks 3-4 and 2 after; ``use_grouped_mm`` as released and the
for-loop path diffusers runs without it) with its first five blocks (three dense, one MoE of each capacity factor:
the peak is per block), 256 text tokens. Activation peaks above weights and inputs; LD = image tokens x 2048 x 2 B.
``experts in k groups`` is ``apply_chunked_feedforward(model, num_chunks=k)``: the dense FeedForwards and shared
experts in k shards, the routed experts in k groups; ``+ attention`` adds ``apply_chunked_attention`` (4,096-query
pieces); ``sequence chunks`` is ``apply_sequence_chunking``, the router scores exchanged between the chunks (simulated:
one expert at its worst routing, so those peaks are upper bounds).

Part 2, measured (CPU, fp32, real tensors): the same blocks at width 512 (4 heads x 128, one K/V head, experts of
width 336), 4,096 image tokens, unmodified vs streamed in the same run: median time ratio over ``--repeats`` rounds
and the output's relative error.

    python benchmarks/experts.py --output benchmarks/results/experts.md
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Callable

import diffusers
import torch

from memopt import (apply_chunked_attention, apply_chunked_feedforward, apply_sequence_chunking,
                    remove_memory_optimizations, simulate)

GIB = 2**30
TEXT_TOKENS = 256
RELEASED = dict(  # FenomAI/Nucleus-Image transformer/config.json, first five blocks
    patch_size=2, in_channels=64, out_channels=16, num_layers=5, attention_head_dim=128, num_attention_heads=16,
    num_key_value_heads=4, joint_attention_dim=4096, axes_dims_rope=(16, 56, 56), mlp_ratio=4.0, moe_enabled=True,
    dense_moe_strategy="leave_first_three_blocks_dense", num_experts=64, moe_intermediate_dim=1344,
    capacity_factors=[0.0, 0.0, 0.0, 4.0, 2.0], use_sigmoid=False, route_scale=2.5)
CPU_CONFIG = {**RELEASED, "num_attention_heads": 4, "num_key_value_heads": 1, "moe_intermediate_dim": 336,
              "joint_attention_dim": 512}


def inputs(config: dict, side: int, dtype: torch.dtype, batch: int = 1) -> dict:
    """The pipeline's call: 2x2-packed latents of a ``side``-pixel square (VAE factor 8), Qwen3-VL text states."""
    grid = side // 16
    return dict(hidden_states=torch.randn(batch, grid * grid, config["in_channels"], dtype=dtype),
                encoder_hidden_states=torch.randn(batch, TEXT_TOKENS, config["joint_attention_dim"], dtype=dtype),
                timestep=torch.full((batch,), 0.5, dtype=dtype), img_shapes=[(1, grid, grid)] * batch)


def build(config: dict) -> torch.nn.Module:
    model = diffusers.NucleusMoEImageTransformer2DModel(**config).eval()
    with torch.no_grad():
        for module in model.modules():
            if type(module).__name__ == "SwiGLUExperts" and module.gate_up_proj.device.type != "meta":
                module.gate_up_proj.normal_(std=module.hidden_size ** -0.5)
                module.down_proj.normal_(std=module.moe_intermediate_dim ** -0.5)
    return model


def variants() -> dict[str, Callable[[torch.nn.Module], object] | None]:
    return {
        "unmodified": None,
        **{f"experts in {k} groups": (lambda m, k=k: apply_chunked_feedforward(m, num_chunks=k)) for k in (4, 16, 64)},
        "experts in 64 groups + attention": lambda m: (apply_chunked_feedforward(m, num_chunks=64),
                                                        apply_chunked_attention(m, query_chunk=4096)),
        "16 sequence chunks": lambda m: apply_sequence_chunking(m, 16),
        "16 sequence chunks + experts in 16 groups": lambda m: (apply_chunked_feedforward(m, num_chunks=16),
                                                                 apply_sequence_chunking(m, 16)),
    }


def simulated(side: int, grouped_mm: bool) -> list[str]:
    config = {**RELEASED, "use_grouped_mm": grouped_mm}
    tokens = (side // 16) ** 2
    ld = tokens * config["num_attention_heads"] * config["attention_head_dim"] * 2
    rows = []
    for name, prepare in variants().items():
        trace = simulate(lambda: build(config), lambda m: inputs(config, side, torch.bfloat16), prepare=prepare,
                         name=name)
        rows.append(f"| {side}x{side} | {tokens:,} | {'grouped_mm' if grouped_mm else 'for loop'} | {name} | "
                    f"{trace.peak_bytes / GIB:.3f} | {trace.peak_bytes / ld:.1f} | {trace.peak_module} |")
        print(rows[-1], flush=True)
    return rows


def measured(side: int, repeats: int) -> list[str]:
    torch.manual_seed(0)
    model = build(CPU_CONFIG)
    call = inputs(CPU_CONFIG, side, torch.float32)
    with torch.no_grad():
        reference = model(**call)[0]
        times: dict[str, list[float]] = {name: [] for name in variants()}
        errors = {}
        for _ in range(repeats):
            for name, prepare in variants().items():
                if prepare is not None:
                    prepare(model)
                start = time.perf_counter()
                out = model(**call)[0]
                times[name].append(time.perf_counter() - start)
                errors[name] = float((out - reference).norm() / reference.norm())
                remove_memory_optimizations(model)
    base = times["unmodified"]
    rows = []
    for name, samples in times.items():
        ratio = statistics.median(t / b for t, b in zip(samples, base))
        rows.append(f"| {name} | {statistics.median(samples):.2f} | {ratio:.2f}x | {errors[name]:.1e} |")
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sides", nargs="*", type=int, default=[1024, 2048])
    parser.add_argument("--cpu-side", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    lines = ["# Nucleus-Image: expert-choice MoE layers with streamed experts", "",
             f"torch {torch.__version__}, diffusers {diffusers.__version__}; generated by "
             "`python benchmarks/experts.py`. See the script's docstring for the set-up.", "",
             "## Activation peaks at full size (simulated, bf16, first five blocks)", "",
             "| size | image tokens | expert path | memopt | peak GiB | LD | peak at |",
             "|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    for side in args.sides:
        for grouped_mm in (True, False):
            lines += simulated(side, grouped_mm)
    header = [f"## Time on this CPU (fp32, width 512, {(args.cpu_side // 16) ** 2:,} image tokens, median of "
              f"{args.repeats})", "", "| memopt | seconds | vs unmodified | rel. error |", "|---|---|---|---|"]
    print("\n".join(["", *header]), flush=True)
    lines += ["", *header, *measured(args.cpu_side, args.repeats)]
    if args.output is not None:
        args.output.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
