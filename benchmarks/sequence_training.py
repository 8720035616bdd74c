"""Training through sequence-chunked blocks (``apply_sequence_chunking(model, training=True)``): memory, time, error.

Three variants of one training step (forward with autograd recording, then the backward of the squared prediction's
mean), each against the unmodified model in the same run:

* ``unmodified``: diffusers' forward and backward;
* ``checkpointing``: diffusers' own ``model.enable_gradient_checkpointing()`` (each block recomputed whole in the
  backward), switched on through memopt's removable hook (``memopt.hooks.checkpointing``);
* ``memopt``: ``apply_sequence_chunking(model, training=True)``, the family plan's chunk count and 8 chunks (the
  blocks run in chunks and save only their inputs; the backward recomputes them chunk by chunk), and 8 chunks with a
  lock-step forward (nothing rerun in the forward; the backward is the same); at full size (simulated) and on CUDA
  also with ``saved_inputs="host"`` (the saved block inputs wait in host memory).

And what ``apply_memory_optimizations(model, budget, training=True)`` chooses for full-size models (simulated for a
CUDA device under FakeTensorMode: :func:`memopt.planner.plan_denoiser` with ``training=True``).

Per family: the activation growth of a step in LD per token (``memopt.trace.activation_growth(..., backward=True)``:
fp32 tracer, width 128, one block of each kind, parameter gradients allocated before the step), the relative error
of the input and parameter gradients against the unmodified model, and the CPU time of a step at the bench width
(``benchmarks/sequence.py``'s config, 8 heads x 64) at about 2k tokens, median of ``--repeats`` rounds.

Run::

    python benchmarks/sequence_training.py                      # -> results/sequence_training_cpu.md
    python benchmarks/sequence_training.py --planned            # -> results/sequence_training_planned.md
    python benchmarks/sequence_training.py --device cuda --families wan --config 1.3b --size 480p \\
        --num-chunks 8 16                                        # -> results/sequence_training_cuda_1.3b.md

On CUDA: a released config at a real size in bf16 (Wan2.1-1.3B at 480x832 x 81 frames by default), the device peak
of a step and its time per variant against diffusers' gradient checkpointing (unmodified where it fits).
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import triton

from torch._subclasses.fake_tensor import FakeTensorMode

from memopt import apply_sequence_chunking, remove_memory_optimizations, simulate_family
from memopt.hooks.checkpointing import apply_gradient_checkpointing
from memopt.hooks.offload import OffloadConfig, apply_offloading, remove_offloading
from memopt.models import cast_floating_, get_family
from memopt.planner import BudgetError, plan_denoiser
from memopt.trace.growth import activation_growth, sized_config
from memopt.trace.simulate import training_step

sys.path.insert(0, str(Path(__file__).parent))
from sequence import BENCH_CONFIGS, BENCH_HEADS, BENCH_SIZES, BENCH_TEXT_TOKENS  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "sequence_training_cpu.md"
DEFAULT_FAMILIES = ["wan", "flux", "hunyuanvideo", "cogvideox", "ltx", "qwenimage", "sd3", "mochi"]
# Deeper configs for the growth at depth: every block adds what autograd saves for it.
DEPTH: dict[str, dict[str, int]] = {"wan": {"num_layers": 8}, "hunyuanvideo": {"num_layers": 4, "num_single_layers": 4}}


def _memopt(num_chunks: int | None, schedule: str = "two_pass", saved_inputs: str = "device"
            ) -> Callable[[torch.nn.Module], Any]:
    return lambda model: apply_sequence_chunking(model, num_chunks, training=True, schedule=schedule,
                                                 saved_inputs=saved_inputs)


VARIANTS: dict[str, Callable[[torch.nn.Module], Any] | None] = {
    "unmodified": None, "checkpointing": apply_gradient_checkpointing, "memopt": _memopt(None),
    "memopt 8": _memopt(8), "memopt 8 lockstep": _memopt(8, "lockstep"),
}


def _step(model: torch.nn.Module, inputs: dict, key: str) -> tuple[float, torch.Tensor, torch.Tensor]:
    """``(seconds, input gradient, parameter gradients concatenated)`` of one training step."""
    model.zero_grad(set_to_none=True)
    latents = inputs[key]  # Z-Image lineage: a list with one latent per sample
    x = [t.detach().clone().requires_grad_() for t in latents] if isinstance(latents, list) else (
        latents.detach().clone().requires_grad_())
    device = (latents[0] if isinstance(latents, list) else latents).device  # the weights may be offloaded
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    training_step(model, {**inputs, key: x})
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    grads = [p.grad.flatten().to(device) for p in model.parameters() if p.grad is not None]  # offloaded: host
    return seconds, torch.stack([t.grad for t in x]) if isinstance(x, list) else x.grad, torch.cat(grads)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def bench(family: str, repeats: int) -> dict[str, Any]:
    spec = get_family(family)
    row: dict[str, Any] = {"family": family}
    for name, prepare in VARIANTS.items():
        row[f"growth {name}"] = activation_growth(family, prepare, backward=True)
    if family in DEPTH:
        row["depth"] = DEPTH[family]
        for name in ("unmodified", "checkpointing", "memopt"):
            row[f"depth growth {name}"] = activation_growth(family, VARIANTS[name], backward=True,
                                                            overrides=DEPTH[family])
    size = BENCH_SIZES[family][1]
    heads = BENCH_HEADS if set(spec.width_keys) <= set(BENCH_HEADS) else {}
    config = sized_config(family, {**spec.config("tiny"), **heads, **BENCH_CONFIGS[family]}, size)
    model = spec.build(config).to(torch.float32)
    inputs = spec.make_inputs(model.config, batch_size=1, height=size.height, width=size.width,
                              num_frames=size.num_frames, text_tokens=BENCH_TEXT_TOKENS,
                              masked=spec.mask_key is not None)
    key = "hidden_states" if "hidden_states" in inputs else "x"  # Z-Image family: `x`
    row["tokens"] = spec.num_tokens(model.config, size)
    _, reference_x, reference_params = _step(model, inputs, key)
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for round_index in range(repeats + 1):  # round 0 warms up and gives the gradients
        for name, prepare in VARIANTS.items():
            if prepare is not None:
                prepare(model)
            seconds, grad_x, grad_params = _step(model, inputs, key)
            remove_memory_optimizations(model)
            if round_index == 0:
                row[f"error {name}"] = max(_rel(grad_x, reference_x), _rel(grad_params, reference_params))
            else:
                times[name].append(seconds)
    base = statistics.median(times["unmodified"])
    for name in VARIANTS:
        row[f"time {name}"] = statistics.median(times[name]) / base
    row["seconds"] = base
    return row


def bench_device(family: str, device: str, config_name: str, size_name: str, repeats: int, chunk_counts: list[int]
                 ) -> dict[str, Any]:
    """A released config at a real size in bf16 on ``device`` (``cuda``; ``cpu`` runs the same steps without peaks,
    which checks the code at a tiny config): per variant the device peak of a step above the weights
    (``torch.cuda.max_memory_allocated``; the parameters' gradients included), its time and its gradient error
    against diffusers' checkpointing; unmodified where it fits."""
    spec = get_family(family)
    config, size = spec.config(config_name), spec.size(size_name)
    cuda = device == "cuda"
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):  # random weights made on the device directly
            model = spec.model_class(**config).train()
    finally:
        torch.set_default_dtype(default_dtype)
    cast_floating_(model, torch.bfloat16)  # _keep_in_fp32_modules back to fp32, as from_pretrained(torch_dtype=...)
    inputs = spec.make_inputs(model.config, batch_size=1, height=size.height, width=size.width,
                              num_frames=size.num_frames, masked=spec.mask_key is not None, dtype=torch.bfloat16,
                              device=device)
    key = "hidden_states" if "hidden_states" in inputs else "x"
    host = _memopt(chunk_counts[0], saved_inputs="host")

    def offloaded(model: torch.nn.Module) -> None:  # the blocks onloaded again for their backward
        host(model)
        apply_offloading(model, OffloadConfig(device, use_stream=cuda))

    variants = {"checkpointing": apply_gradient_checkpointing, **{f"memopt {n}": _memopt(n) for n in chunk_counts},
                f"memopt {chunk_counts[0]}, saved inputs on the host": host,
                f"memopt {chunk_counts[0]}, saved inputs on the host, blocks group-offloaded": offloaded,
                "unmodified": None}
    row: dict[str, Any] = {"family": family, "config": config_name, "size": size,
                           "tokens": spec.num_tokens(model.config, size), "variants": {}}
    reference = None
    for name, prepare in variants.items():
        if prepare is not None:
            prepare(model)
        try:
            times, peak, device_peak = [], None, None
            for _ in range(repeats + 1):  # the first step warms up
                model.zero_grad(set_to_none=True)
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                    baseline = torch.cuda.memory_allocated()
                seconds, grad_x, grad_params = _step(model, inputs, key)
                times.append(seconds)
                if cuda:
                    peak = max(peak or 0, torch.cuda.max_memory_allocated() - baseline)
                    device_peak = max(device_peak or 0, torch.cuda.max_memory_allocated())
            result = {"seconds": statistics.median(times[1:]), "peak": peak, "device_peak": device_peak}
            if reference is None:
                reference = (grad_x, grad_params)
            result["error"] = max(_rel(grad_x, reference[0]), _rel(grad_params, reference[1]))
            del grad_x, grad_params
        except torch.cuda.OutOfMemoryError:
            result = {"oom": True}
        finally:
            remove_memory_optimizations(model)
            remove_offloading(model)  # back on the device (nothing when not offloaded)
            model.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.empty_cache()
        row["variants"][name] = result
        print(name, result, flush=True)
    return row


def markdown_cuda(rows: list[dict[str, Any]]) -> str:
    lines = ["| family | config, size | tokens | variant | step peak above what the device held before it | "
             "device peak (all allocations) | step time | vs checkpointing | gradient error vs checkpointing |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        base = row["variants"]["checkpointing"].get("seconds")
        for name, result in row["variants"].items():
            where = f"| {row['family']} | {row['config']}, {row['size'].height}x{row['size'].width}x" \
                    f"{row['size'].num_frames} | {row['tokens']:,} | {name} |"
            if result.get("oom"):
                lines.append(f"{where} out of memory | | | | |")
                continue
            ratio = f"{result['seconds'] / base:.3f}x" if base else "n/a"
            peak, device_peak = ("n/a" if result[key] is None else f"{result[key] / 2**30:.2f} GiB"
                                 for key in ("peak", "device_peak"))
            lines.append(f"{where} {peak} | {device_peak} | {result['seconds']:.3f} s | {ratio} | "
                         f"{result['error']:.1e} |")
    return "\n".join(lines)


SIMULATED_VARIANTS: dict[str, Callable[[torch.nn.Module], Any] | None] = {
    "unmodified": None, "checkpointing": apply_gradient_checkpointing, "memopt": _memopt(None),
    "memopt host": _memopt(None, saved_inputs="host"),
}

# Full-size configs simulated under FakeTensorMode (memopt.simulate_family(..., backward=True)), bf16: a few blocks
# (peaks per block) and Wan2.1-14B whole.
SIMULATED: dict[str, list[dict[str, int]]] = {
    "wan": [{"num_layers": 2}, {"num_layers": 40}],
    "hunyuanvideo": [{"num_layers": 1, "num_single_layers": 1}],
}


def simulated_rows() -> list[dict[str, Any]]:
    """The activation peak of a full-size training step (above the weights, their gradients and the inputs) per
    variant, at each family's default size."""
    rows = []
    for family, configs in SIMULATED.items():
        spec = get_family(family)
        for overrides in configs:
            config = {**spec.config("full"), **overrides}
            row: dict[str, Any] = {"family": family, "blocks": overrides, "size": spec.size("default")}
            for name, prepare in SIMULATED_VARIANTS.items():
                trace = simulate_family(family, config, backward=True, prepare=prepare)
                row[name], row["ld"] = trace.peak_bytes, trace.meta["ld_bytes"]
                row.setdefault("host_bytes", {})[name] = trace.meta.get("host_bytes", 0)
            rows.append(row)
            print(row, flush=True)
    return rows


def _table(headers: list[str], rows: list[list[str]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in rows])


def markdown_simulated(rows: list[dict[str, Any]]) -> str:
    cells = []
    for row in rows:
        size = row["size"]
        peaks = [f"{row[name] / 2**30:.2f} GiB ({row[name] / row['ld']:.1f} LD)" for name in SIMULATED_VARIANTS]
        cells.append([f"{row['family']}, {size.height}x{size.width}x{size.num_frames}",
                      ", ".join(f"{k}={v}" for k, v in row["blocks"].items()), peaks[0], peaks[1], f"**{peaks[2]}**",
                      f"{peaks[3]} ({row['host_bytes']['memopt host'] / 2**30:.2f} GiB)"])
    return _table(["model, size", "blocks", "unmodified", "diffusers checkpointing", "**memopt** (plan's chunks)",
                   "memopt, saved inputs on the host (host memory)"], cells)


# apply_memory_optimizations(model, budget, training=True) at full size: (family, config, size, LoRA, budgets). LoRA:
# the base frozen, the adapters (not simulated: rank-sized) take their gradients from a backward through every block.
PLANNED: list[tuple[str, str, str, bool, list[str]]] = [
    ("wan", "full", "default", True, ["80GiB", "48GiB", "40GiB", "24GiB", "16GiB"]),
    ("wan", "1.3b", "480p", False, ["24GiB", "12GiB", "8GiB", "6GiB"]),
]
PLANNED_RESULTS = Path(__file__).parent / "results" / "sequence_training_planned.md"


def planned_rows() -> list[dict[str, Any]]:
    """What the training planner chooses per budget, simulated for a CUDA device (H100 speeds for its time model),
    with block-level group offloading on a prefetch stream allowed, as ``apply_memory_optimizations`` allows it."""
    rows = []
    for family, config_name, size_name, lora, budgets in PLANNED:
        spec = get_family(family)
        size = spec.size(size_name)
        with FakeTensorMode(allow_non_fake_inputs=True):
            model = cast_floating_(spec.build(config_name), torch.bfloat16)
            model.requires_grad_(not lora)
            inputs = spec.make_inputs(model.config, height=size.height, width=size.width, num_frames=size.num_frames,
                                      dtype=torch.bfloat16)
        for budget in budgets:
            row: dict[str, Any] = {"family": family, "config": config_name, "size": size, "lora": lora,
                                   "budget": budget}
            try:
                plan = plan_denoiser(model, (), inputs, budget=budget, device="cuda", training=True,
                                     offload=OffloadConfig("cuda", use_stream=True))
            except BudgetError as error:
                row["error"] = str(error)
            else:
                row.update(chosen=plan.chunking.describe(), placement=plan.describe_placement(),
                           peak=plan.predicted_peak_bytes, weights=plan.option.weight_bytes,
                           gradients=plan.gradient_bytes,
                           activations=plan.option.activation_bytes, slowdown=plan.predicted_slowdown,
                           ld=plan.ld(plan.option.activation_bytes),
                           checkpointing=next((o.peak_bytes for o in plan.considered if o.chunking.checkpointing),
                                              None))
            rows.append(row)
            print(row, flush=True)
    return rows


def markdown_planned(rows: list[dict[str, Any]]) -> str:
    cells = []
    gib = 2**30
    for row in rows:
        size = row["size"]
        where = [f"{row['family']} {row['config']}, {size.height}x{size.width}x{size.num_frames}",
                 "LoRA (base frozen)" if row["lora"] else "all parameters", row["budget"]]
        if "error" in row:
            cells.append(where + [row["error"].split(": ", 1)[-1], "", "", "", ""])  # BudgetError, after its class
            continue
        checkpointing = "-" if row["checkpointing"] is None else f"{row['checkpointing'] / gib:.2f} GiB"
        cells.append(where + [
            row["chosen"], row["placement"],
            f"{row['peak'] / gib:.2f} GiB: {row['weights'] / gib:.2f} + {row['gradients'] / gib:.2f} + "
            f"{row['activations'] / gib:.2f} ({row['ld']:.1f} LD)", f"x{row['slowdown']:.2f}", checkpointing])
    return _table(["model, size", "training", "budget", "chosen", "weights",
                   "predicted peak: weights on the device + gradients on the device + activations",
                   "predicted step time", "diffusers checkpointing would need"], cells)


def main_planned(output: Path) -> None:
    start = time.perf_counter()
    rows = planned_rows()
    text = "\n".join([
        "# Training steps planned at full size (simulated for CUDA)",
        "",
        f"torch {torch.__version__}; generated by `python benchmarks/sequence_training.py --planned` in "
        f"{time.perf_counter() - start:.0f} s. `apply_memory_optimizations(model, budget, training=True)` at full "
        "size: `plan_denoiser(..., device='cuda', training=True, offload=OffloadConfig('cuda', use_stream=True))` "
        "under FakeTensorMode, bf16. The budget holds the weights on the device (all of them resident; offloaded: "
        "the top-level group and two blocks), the trainable parameters' gradients on the device (offloaded: the top "
        "level's and one block's; the others wait on the host with their weights), the inputs and the step's "
        "activations; an optimizer's state comes on top. Step time relative to the unmodified model's, from the "
        "planner's H100 time model (offloaded: the backward onloads every block again, unprefetched). The last "
        "column is the peak of diffusers' checkpointing where the planner simulated it.",
        "",
        markdown_planned(rows),
        "",
    ])
    print(text)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text)


def markdown(rows: list[dict[str, Any]]) -> str:
    names = list(VARIANTS)
    lines = [
        "| family | tokens timed | unmodified step | " + " | ".join(
            f"{name}: growth, time, gradient error" for name in names) + " |",
        "|---|---|---|" + "---|" * len(names),
    ]
    for row in rows:
        cells = [f"{row[f'growth {name}']:.2f} LD, {row[f'time {name}']:.2f}x, {row[f'error {name}']:.0e}"
                 for name in names]
        lines.append(f"| {row['family']} | {row['tokens']:,} | {row['seconds']:.2f} s | " + " | ".join(cells) + " |")
    deep = [row for row in rows if "depth" in row]
    if deep:
        lines += ["", "| family, deeper | unmodified | checkpointing | memopt |", "|---|---|---|---|"]
        lines += [f"| {row['family']}, {', '.join(f'{k}={v}' for k, v in row['depth'].items())} | "
                  + " | ".join(f"{row[f'depth growth {name}']:.2f} LD" for name in ("unmodified", "checkpointing",
                                                                                   "memopt")) + " |"
                  for row in deep]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", nargs="*", default=None, choices=sorted(BENCH_CONFIGS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--config", default="1.3b", help="CUDA: zoo config name (Wan2.1-1.3B by default)")
    parser.add_argument("--size", default="480p", help="CUDA: zoo size name")
    parser.add_argument("--num-chunks", type=int, nargs="+", default=[8, 16], help="CUDA: memopt variants")
    parser.add_argument("--no-simulate", action="store_true", help="CPU: skip the full-size simulations")
    parser.add_argument("--planned", action="store_true",
                        help=f"only the training planner's choices at full size -> {PLANNED_RESULTS.name}")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    if args.planned:
        main_planned(args.output or PLANNED_RESULTS)
        return
    if args.device == "cuda":
        if not torch.cuda.is_available():
            parser.error("--device cuda needs a CUDA GPU; this machine has none")
        main_cuda(args)
        return
    torch.set_num_threads(args.threads)
    args.output = args.output or RESULTS
    args.families = args.families or DEFAULT_FAMILIES
    start, load = time.perf_counter(), os.getloadavg()[0]
    rows = []
    for family in args.families:
        rows.append(bench(family, args.repeats))
        print(markdown(rows[-1:]), flush=True)
    simulated = [] if args.no_simulate else simulated_rows()
    text = "\n".join([
        f"# Training through sequence-chunked blocks (CPU, {torch.get_num_threads()} thread(s))",
        "",
        f"torch {torch.__version__}, load average {load:.1f} at the start; generated by "
        f"`{shlex.join(['python', 'benchmarks/sequence_training.py', *sys.argv[1:]])}` in "
        f"{time.perf_counter() - start:.0f} s. Step growth: the activation peak of a training step (forward with "
        "autograd, backward of the squared prediction's mean) between two sequence lengths, in LD per token (fp32 "
        "tracer, width 128, one block of each kind, parameter gradients allocated before the step); every further "
        "block adds the activations autograd saves for it: all of them unmodified (the growth above, again), its "
        "inputs (about 1 LD) with checkpointing or memopt. Step time: median over rounds of one training step of "
        "each variant / the unmodified one, at the bench width (8 heads x 64, two blocks of each kind). Gradient "
        "error: the larger of the input's and the parameters' relative error against the unmodified model. The "
        "second table: the step growth of deeper configs.",
        "",
        markdown(rows),
        "",
        *(["Full size, simulated under FakeTensorMode (bf16, `memopt.simulate_family(..., backward=True)`): the "
           "activation peak of a training step above the weights, their gradients and the inputs; with a few blocks "
           "the peak is one block's backward plus the saved inputs of the others.", "",
           markdown_simulated(simulated), "",
           f"What the training planner chooses at full size: `{PLANNED_RESULTS.name}` (`--planned`).", ""]
          if simulated else []),
    ])
    print(text)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)


def main_cuda(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    rows = [bench_device(family, "cuda", args.config, args.size, args.repeats, args.num_chunks)
            for family in args.families or ["wan"]]
    text = "\n".join([
        f"# Training through sequence-chunked blocks ({torch.cuda.get_device_name()})",
        "",
        f"torch {torch.__version__}, triton {triton.__version__}; generated by "
        f"`{shlex.join(['python', 'benchmarks/sequence_training.py', *sys.argv[1:]])}` in "
        f"{time.perf_counter() - start:.0f} s. One training step (forward with autograd, backward of the squared "
        "prediction's mean) of a random-weight bf16 model, batch 1; peak: torch.cuda.max_memory_allocated above "
        "what was allocated before the step (weights, inputs), the parameters' gradients included; time: median of "
        f"{args.repeats} steps after a warm-up; gradient error: input and parameters against diffusers' "
        "gradient checkpointing (bf16 rounding).",
        "",
        markdown_cuda(rows),
        "",
    ])
    print(text)
    output = args.output or RESULTS.with_name(f"sequence_training_cuda_{args.config}.md")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text)


if __name__ == "__main__":
    main()
