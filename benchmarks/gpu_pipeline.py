"""One denoiser forward of a full-size random-weight Wan2.1-14B on one GPU: memopt against diffusers' offloading.

Strategies, run one after another on the same model (built once, bf16, on the CPU):

* ``model-offload``: accelerate's ``cpu_offload_with_hook`` (what ``enable_model_cpu_offload`` does for the
  transformer): the whole model moves to the GPU for its forward. Its output is the reference.
* ``group-offload``: diffusers' ``enable_group_offload(block_level, num_blocks_per_group=1, use_stream=True)``.
* ``memopt <budget>``: ``memopt.apply_memory_optimizations(model, budget=...)``: group offloading + the chunking
  planned at the first forward.

Each strategy runs a first forward (diffusers traces the block order for prefetching there, memopt plans there) and
a measured second one: ``torch.cuda.max_memory_allocated()`` over it (weights on the device + inputs + activations,
reset before the call) and its time (CUDA events). The model is built with ``torch.set_default_dtype(bfloat16)`` on
the CPU, so weights are initialised in place in bf16 (no fp32 host copy of 57 GB); ``_keep_in_fp32_modules`` are
then cast to fp32 as ``from_pretrained(torch_dtype=bf16)`` leaves them.

Writes ``gpu_pipeline.md`` (table, device, versions, the memopt plan) and ``gpu_pipeline_memopt.pickle`` (CUDA
allocator snapshot of the measured memopt forward, last ``--snapshot-entries`` events; open it in
https://pytorch.org/memory_viz) to ``--out`` or ``$OUT``.

Usage::

    python benchmarks/gpu_pipeline.py                        # Wan2.1-14B, 720x1280, 81 frames, budget 4.5GiB
    python benchmarks/gpu_pipeline.py --height 480 --width 832 --budgets 4.5GiB,8GiB
    python benchmarks/gpu_pipeline.py --dry-run              # tiny model on the CPU: checks the logic in seconds
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import diffusers
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import memopt  # noqa: E402
from memopt.hooks.offload import remove_group_offloading_hooks  # noqa: E402
from memopt.models import Size, cast_floating_, get_family  # noqa: E402
from memopt.planner import format_bytes  # noqa: E402
from memopt.trace import MemoryTracer  # noqa: E402

@dataclass
class Result:
    name: str
    status: str = "ok"
    peak_bytes: int | None = None
    seconds: float | None = None
    first_seconds: float | None = None
    rel_error: float | None = None
    predicted_peak_bytes: int | None = None
    note: str = ""
    output: torch.Tensor | None = field(default=None, repr=False)


def build_model(family: str, config: str, seed: int) -> torch.nn.Module:
    """The model on the CPU in bf16, initialised in place by its constructors (no fp32 copy)."""
    spec = get_family(family)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = spec.model_class(**spec.config(config))
    finally:
        torch.set_default_dtype(previous)
    return cast_floating_(model.eval(), torch.bfloat16)  # _keep_in_fp32_modules back to fp32


def measure(model: torch.nn.Module, inputs: dict[str, Any], device: torch.device,
            snapshot: Path | None = None, snapshot_entries: int = 20_000) -> tuple[torch.Tensor, int, float, float]:
    """(output on the CPU, peak bytes of the second forward, its seconds, the first forward's seconds)."""
    cuda = device.type == "cuda"
    with torch.no_grad():
        start = time.perf_counter()
        model(**inputs)
        if cuda:
            torch.cuda.synchronize(device)
        first = time.perf_counter() - start
        gc.collect()
        if not cuda:  # the tracer counts storages: weights + inputs + activations
            start = time.perf_counter()
            trace = MemoryTracer(root=model, device="dispatch").run(model, **inputs)
            return trace.result[0].float(), trace.total_peak_bytes, time.perf_counter() - start, first
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        if snapshot is not None:
            # Python stacks only: symbolising C++ frames at dump time can take minutes.
            torch.cuda.memory._record_memory_history(max_entries=snapshot_entries, stacks="python")
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        output = model(**inputs)[0]
        end.record()
        torch.cuda.synchronize(device)
        if snapshot is not None:
            torch.cuda.memory._dump_snapshot(str(snapshot))
            torch.cuda.memory._record_memory_history(enabled=None)
        return output.float().cpu(), torch.cuda.max_memory_allocated(device), begin.elapsed_time(end) / 1000, first


def model_offload(model: torch.nn.Module, device: torch.device) -> Callable[[], None]:
    from accelerate import cpu_offload_with_hook
    from accelerate.hooks import remove_hook_from_module

    _, hook = cpu_offload_with_hook(model, execution_device=device)

    def undo() -> None:
        hook.offload()
        remove_hook_from_module(model, recurse=True)

    return undo


def group_offload(model: torch.nn.Module, device: torch.device) -> Callable[[], None]:
    model.enable_group_offload(onload_device=device, offload_device=torch.device("cpu"), offload_type="block_level",
                               num_blocks_per_group=1, use_stream=device.type == "cuda")

    def undo() -> None:
        remove_group_offloading_hooks(model)
        model.to("cpu")

    return undo


def run_strategy(name: str, apply: Callable[[], Any], undo: Callable[[], None] | None, model: torch.nn.Module,
                 inputs: dict[str, Any], device: torch.device, snapshot: Path | None, entries: int) -> Result:
    result = Result(name)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    try:
        applied = apply()
        undo = undo or applied
        try:
            result.output, result.peak_bytes, result.seconds, result.first_seconds = measure(
                model, inputs, device, snapshot, entries)
        finally:
            undo()
    except Exception as error:  # one failing strategy must not hide the others' numbers
        result.status, result.note = "error", f"{type(error).__name__}: {error}"[:500]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="wan")
    parser.add_argument("--config", default="full", help="zoo config (default: the released checkpoint's)")
    parser.add_argument("--height", type=int, default=720)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--budgets", default="4.5GiB", help="comma list of memopt budgets ('default': free memory)")
    parser.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    parser.add_argument("--dry-run", action="store_true", help="tiny config and size on the CPU: checks the logic")
    parser.add_argument("--max-seconds", type=float, default=450.0,
                        help="skip a strategy that would end after this many seconds of the run, judged by the longest "
                             "strategy so far (the whole run must stay under 8 minutes)")
    parser.add_argument("--snapshot-entries", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "benchmarks/results")))
    args = parser.parse_args()
    started = time.perf_counter()
    if args.dry_run:
        args.config, args.device = "tiny", args.device or "cpu"
        args.height, args.width, args.frames = 48, 80, 5
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available (use --dry-run or --device cpu)")
    spec = get_family(args.family)
    size = Size(args.height, args.width, args.frames if spec.video else 1)
    args.out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    model = build_model(args.family, args.config, args.seed)
    build_seconds = time.perf_counter() - t0
    inputs = spec.make_inputs(model.config, batch_size=1, height=size.height, width=size.width,
                              num_frames=size.num_frames, dtype=torch.bfloat16, device=device, seed=args.seed)
    tokens = spec.num_tokens(model.config, size)
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    print(f"built {spec.class_name} ({format_bytes(weights)}) in {build_seconds:.0f} s; {tokens:,} tokens", flush=True)

    snapshot = args.out / "gpu_pipeline_memopt.pickle" if device.type == "cuda" else None
    strategies: list[tuple[str, Callable[[], Any], Callable[[], None] | None]] = [
        ("model-offload (accelerate cpu_offload_with_hook)", lambda: model_offload(model, device), None),
        ("group-offload (diffusers, block level, stream)", lambda: group_offload(model, device), None),
    ]
    plans: dict[str, Any] = {}
    for budget in [b.strip() for b in args.budgets.split(",") if b.strip()]:
        name = f"memopt, budget {budget}"

        def apply(budget: str = budget, name: str = name) -> None:
            plans[name] = memopt.apply_memory_optimizations(
                model, budget=None if budget == "default" else budget, device=device)

        strategies.append((name, apply, lambda: memopt.remove_memory_optimizations(model)))

    results: list[Result] = []
    longest = 0.0
    for name, apply, undo in strategies:
        elapsed = time.perf_counter() - started
        if elapsed + 1.2 * longest > args.max_seconds:
            results.append(Result(name, status="skipped", note=f"would end after --max-seconds {args.max_seconds:.0f}"))
            continue
        is_memopt = name.startswith("memopt")
        result = run_strategy(name, apply, undo, model, inputs, device,
                              snapshot if is_memopt and not any(r.name.startswith("memopt") for r in results) else None,
                              args.snapshot_entries)
        if name in plans and result.status == "ok":
            plan = plans[name]
            result.predicted_peak_bytes = plan.predicted_peak_bytes
            result.note = " / ".join(line.strip() for line in str(plan).splitlines()[1:] if line.strip())
        if results and results[0].output is not None and result.output is not None:
            reference = results[0].output
            result.rel_error = float((result.output - reference).norm() / reference.norm())
        results.append(result)
        longest = max(longest, time.perf_counter() - started - elapsed)
        print(f"{name}: {result.status}, peak {format_bytes(result.peak_bytes or 0)}, {result.seconds} s, first call "
              f"{result.first_seconds} s; {result.note[:300]}", flush=True)

    write(args, device, spec, size, tokens, weights, build_seconds, results, time.perf_counter() - started, snapshot)


def write(args, device, spec, size, tokens, weights, build_seconds, results, total_seconds, snapshot) -> None:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU"
    versions = (f"torch {torch.__version__}, diffusers {diffusers.__version__}, python {platform.python_version()}"
                + (f", CUDA {torch.version.cuda}" if device.type == "cuda" else ""))
    frames = f", {size.num_frames} frames" if spec.video else ""
    memory = ("`torch.cuda.max_memory_allocated()` over the second forward (reset before it)" if device.type == "cuda"
              else "tracer total (weights + inputs + activations; CPU dry run, no offloading happens)")
    def number(value: float | None, fmt: str) -> str:
        return format(value, fmt) if value is not None else "-"

    def size_text(value: int | None) -> str:
        return format_bytes(value) if value is not None else "-"

    rows = [f"| {r.name} | {r.status} | {size_text(r.peak_bytes)} | "
            f"{size_text(r.predicted_peak_bytes)} | {number(r.seconds, '.2f')} | "
            f"{number(r.first_seconds, '.1f')} | {number(r.rel_error, '.2e')} | {r.note.replace('|', '/')} |"
            for r in results]
    lines = [
        f"# One denoiser forward: memopt vs diffusers offloading ({spec.class_name})",
        "",
        f"device: {name}; {versions}. Model: {spec.class_name} `{args.config}` config, random weights, bf16 "
        f"({format_bytes(weights)}), built in {build_seconds:.0f} s. Input: {size.height}x{size.width}{frames}, "
        "batch 1 "
        f"({tokens:,} tokens), one denoising step (one forward), `torch.no_grad()`. Peak = {memory}. Time = the "
        "second forward (CUDA events); first = the first forward (diffusers traces the block order there, memopt "
        "plans there). rel. error = ||out - ref|| / ||ref|| against model-offload (the unmodified computation). "
        f"Whole run {total_seconds:.0f} s. Regenerate: `python benchmarks/gpu_pipeline.py`.",
        "",
        "| strategy | status | peak | memopt predicted peak | time s | first call s | rel. error | notes |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
    ]
    if snapshot is not None and snapshot.exists():
        lines += ["", f"Allocator snapshot of the measured memopt forward: `{snapshot.name}` "
                      "(https://pytorch.org/memory_viz)."]
    out = args.out / "gpu_pipeline.md"
    out.write_text("\n".join(lines) + "\n")
    (args.out / "gpu_pipeline.json").write_text(json.dumps({
        "device": name, "versions": versions, "size": [size.height, size.width, size.num_frames], "tokens": tokens,
        "weights_bytes": weights, "results": [{k: v for k, v in vars(r).items() if k != "output"} for r in results],
    }, indent=1))
    print("\n".join(lines))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
