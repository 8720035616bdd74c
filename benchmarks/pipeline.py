"""What ``apply_memory_optimizations`` plans for full-size denoisers, simulated on the CPU (no GPU, nothing allocated).

For Wan2.1-14B T2V at 720p/81 frames, HunyuanVideo at 720p/129 frames and Flux.1-dev at 1024x1024 (bf16, weights as
``from_pretrained(torch_dtype=bf16)`` leaves them), the model is built under ``FakeTensorMode`` and
:func:`memopt.planner.plan_denoiser` plans one denoiser forward (one denoising step, batch 1) for a CUDA device with
block-level group offloading and stream prefetch available, to a budget (default 4.5 GiB). The table compares:

* **unmodified, resident**: all weights + inputs + the unchunked activation peak (what ``pipe.to("cuda")`` needs);
* **diffusers group offloading** (block level, stream prefetch, no chunking), the same memory model as memopt's;
* **memopt**: the plan (chunking chosen by the planner, offloading), predicted peak.

Resident-weights model for block-level offloading with a prefetch stream (computed from the module tree,
:func:`memopt.hooks.offload.offload_groups`): the top-level group (embedders, output norm/projection: onloaded for the
whole forward) + the block computing + the next block arriving on the side stream. The "bound" column is the
phase-blind bound ``2 x largest block + top-level group + activation peak``; the "predicted" column applies the
weights per phase of the forward (before the first block: top level + the prefetched first block; inside a block
list: top level + this block + the next; after the last block: top level only, since every block is offloaded when
it returns), which is what the planner budgets with.

Usage::

    python benchmarks/pipeline.py                       # writes benchmarks/results/pipeline.md
    python benchmarks/pipeline.py --budget 8GiB --families wan
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import diffusers
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memopt.hooks.offload import OffloadConfig, module_bytes  # noqa: E402
from memopt.models import Size, cast_floating_, get_family  # noqa: E402
from memopt.planner import (  # noqa: E402
    Chunking,
    DenoiserPlan,
    Estimate,
    format_bytes,
    phase_weights,
    plan_denoiser,
    simulate_chunking,
)

GIB = 1024**3

CASES = [
    ("Wan2.1-T2V-14B", "wan", "full", Size(720, 1280, 81)),
    ("HunyuanVideo", "hunyuanvideo", "full", Size(720, 1280, 129)),
    ("FLUX.1-dev", "flux", "full", Size(1024, 1024)),
]

DIFFUSERS_FIGURES = {
    "wan": "~13 GB VRAM for the pipeline: T5 block-level group offloading + transformer leaf-level with streams "
           "(docs `api/pipelines/wan.md`)",
    "hunyuanvideo": "no group-offloading figure; ~14 GB quantized (pipeline docs)",
    "flux": "transformer block-level 10.59 GB / leaf-level 0.53 GB (diffusers PR #11106, 5 forwards)",
}


def plan_case(family: str, config: str, size: Size, budget: str) -> tuple[DenoiserPlan, float, int, Estimate]:
    """The plan, the planning time, the weights, and the unchunked simulation (for the comparison columns)."""
    spec = get_family(family)
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = cast_floating_(spec.build(config), torch.bfloat16)
        inputs = spec.make_inputs(model.config, height=size.height, width=size.width, num_frames=size.num_frames,
                                  dtype=torch.bfloat16)
    start = time.perf_counter()
    plan = plan_denoiser(model, (), inputs, budget=budget, device="cuda",
                         offload=OffloadConfig("cuda", use_stream=True))
    seconds = time.perf_counter() - start
    return plan, seconds, module_bytes(model), simulate_chunking(model, (), inputs, Chunking(), round_to=512)


def _gib(nbytes: int) -> str:
    return f"{nbytes / GIB:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", default="4.5GiB", help="device budget to plan for (default 4.5GiB)")
    parser.add_argument("--families", default=",".join(case[1] for case in CASES),
                        help="comma list among " + ", ".join(case[1] for case in CASES))
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "pipeline.md")
    args = parser.parse_args()
    wanted = [name.strip() for name in args.families.split(",") if name.strip()]
    unknown = sorted(set(wanted) - {case[1] for case in CASES})
    if unknown:
        parser.error(f"unknown families {unknown}")

    rows, details = [], []
    for label, family, config, size in [case for case in CASES if case[1] in wanted]:
        plan, seconds, weights, unchunked = plan_case(family, config, size, args.budget)
        resident = weights + plan.input_bytes + unchunked.activation.bytes
        offload_weights = phase_weights(plan.groups, OffloadConfig("cuda", use_stream=True), unchunked.phases)
        diffusers_peak = plan.input_bytes + max(offload_weights[p] + peak.bytes for p, peak in unchunked.phases.items())
        diffusers_bound = plan.input_bytes + plan.groups.resident_bytes(True) + unchunked.activation.bytes
        ld = plan.ld(plan.activation.bytes)
        frames = f"/{size.num_frames}f" if size.num_frames > 1 else ""
        rows.append(
            f"| {label} {size.height}x{size.width}{frames} | {plan.tokens:,} | {_gib(weights)} | {_gib(resident)} | "
            + f"{_gib(diffusers_peak)} (bound {_gib(diffusers_bound)})"
            + f" | {plan.chunking.describe()} | **{_gib(plan.predicted_peak_bytes)}** | {_gib(plan.option.bound_bytes)}"
            f" | {plan.option.phase} | {_gib(plan.groups.resident_bytes(True))} | "
            f"{_gib(plan.activation.bytes)} ({ld:.1f} LD) | x{plan.predicted_slowdown:.2f} | {seconds:.0f} s |"
        )
        details.append(f"### {label}\n\n```\n{plan}\n```\n\nOptions simulated:\n\n"
                       "| placement | chunking | peak phase | predicted GiB | bound GiB | time model s |\n"
                       "|---|---|---|---|---|---|\n"
                       + "\n".join(f"| {o.placement} | {o.chunking.describe()} | {o.phase} | {_gib(o.peak_bytes)} | "
                                   f"{_gib(o.bound_bytes)} | {o.time_s:.2f} |" for o in plan.considered)
                       + f"\n\ndiffusers' figure: {DIFFUSERS_FIGURES[family]}\n")
        print(f"{label}: {plan.chunking.describe()}, predicted {format_bytes(plan.predicted_peak_bytes)} "
              f"(bound {format_bytes(plan.option.bound_bytes)}), planned in {seconds:.0f} s", flush=True)

    text = "\n".join([
        "# Full-size denoiser forward with `apply_memory_optimizations`, simulated",
        "",
        f"Simulated on the CPU under FakeTensorMode (no GPU): torch {torch.__version__}, diffusers "
        f"{diffusers.__version__}, python {platform.python_version()}. bf16, one denoiser forward (one denoising "
        f"step), batch 1, budget {args.budget}, planned for a CUDA device with block-level group offloading and "
        "stream prefetch. Sizes in GiB; device peak = weights on the device + inputs + activations. Regenerate with "
        "`python benchmarks/pipeline.py`.",
        "",
        "| model, size | tokens | weights | unmodified, resident | diffusers group offloading (stream), no chunking | "
        "memopt chunking | **memopt predicted peak** | memopt bound | peak phase | 2 x block + top level | "
        "memopt activation peak (whole forward) | predicted time vs unmodified | planning time |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "diffusers' documented figures: " + "; ".join(f"{family}: {figure}" for family, figure in
                                                       DIFFUSERS_FIGURES.items()) + ".",
        "",
        "Memory model (see the module docstring of `benchmarks/pipeline.py`): resident weights per phase of the "
        "forward under block-level offloading with a prefetch stream = top-level group + the block computing + the "
        "next block (before the first block: top level + the prefetched first block; after the last block: top level "
        "only). The bound column uses `2 x largest block + top-level group` with the activation peak of the whole "
        "forward; the planner keeps the predicted column under the budget. The predicted time is the planner's "
        "roofline-style model (H100 defaults: 400 TFLOP/s bf16, 25 GB/s pinned host-to-device, 8 us per op), a ranking "
        "tool; `benchmarks/gpu_pipeline.py` measures on a GPU.",
        "",
        *details,
    ])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
