"""``memopt-bench``: memory strategies side by side on one diffusers transformer, with traces on disk.

For every strategy (the unmodified model, diffusers' own options, memopt's) the model is built from the same seed,
the strategy applied, and one forward traced: peak memory (total and activations, also in LD = tokens x hidden width x
bytes per element), where the peak is (aten op, module), the median time of a few untraced forwards, and the output's
relative L2 error against the unmodified model. With ``--training``, one training step instead (the forward with
autograd, then the backward of the squared prediction's mean, into gradients made before it), and the error of the
parameters' gradients. A table goes to the terminal; ``--out`` gets one trace JSON per strategy, a PNG with all
timelines overlaid, and ``summary.csv`` / ``summary.json``.

Examples::

    memopt-bench                                               # a small Wan config on the CPU, every strategy
    memopt-bench --model wan --size 720p --frames 81 --simulate  # Wan2.1-14B at full size under FakeTensorMode
    memopt-bench --model flux --height 1024 --width 1024 --strategies baseline,ffn,sequence,all --simulate
    memopt-bench --model wan --tiny --device cuda              # the allocator's numbers + memory_viz snapshots
    memopt-bench --training                                    # a training step: checkpointing, sequence, ...
    memopt-bench --list                                        # models, sizes, strategies
"""

from __future__ import annotations

import argparse
import csv
import functools
import gc
import inspect
import json
import math
import os
import shlex
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..models import FAMILIES, TINY_WIDTH, FamilySpec, Size, get_family
from ..strategies import ALIASES, STRATEGIES, Strategy, StrategyContext, StrategyUnavailable, get_strategies
from ..trace import MemoryTrace, MemoryTracer, plot_traces, simulate_family
from ..trace.simulate import allocate_gradients, training_step

GIB = 1024**3
MIB = 1024**2

SMALL_CONFIGS: dict[str, tuple[dict[str, Any], Size]] = {
    # Big enough that the peaks mean something (hidden 256, the FeedForward 2.75x as wide like Wan2.1-14B's 2.7x,
    # 2,880 tokens), small enough that every strategy runs on two CPU cores in well under a minute. The blocks are
    # identical, so two of them show the same per-block peak as forty.
    "wan": ({"num_attention_heads": 4, "attention_head_dim": 64, "ffn_dim": 704, "num_layers": 2, "text_dim": 256,
             "freq_dim": 64}, Size(320, 576, 13)),
}
"""``--variant small``: per family, config overrides and the size they run at. The no-argument default is Wan's."""

LAYER_KEYS = ("num_layers", "num_hidden_layers", "n_layers", "depth")
"""Config keys the families give their block count under (Cosmos 3 Omni: ``num_hidden_layers``, Z-Image:
``n_layers``)."""
GENERIC_SIZES: dict[str, tuple[int, int]] = {"480p": (480, 832), "544p": (544, 960), "720p": (720, 1280)}
"""Resolution names accepted for every family (height, width); frames default to the family's own default."""

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


# ------------------------------------------------------------------------------------------------ the run
@dataclass
class Run:
    """Everything one invocation measures, resolved and validated from the command line."""

    spec: FamilySpec
    variant: str
    config: dict[str, Any]
    size: Size
    batch_size: int
    dtype: torch.dtype
    device: torch.device
    simulate: bool
    seed: int
    repeats: int
    num_chunks: int | None
    budget: str | int | None
    training: bool
    strategies: list[Strategy]
    max_timeline_points: int
    out: Path
    name: str
    command: str

    @property
    def tokens(self) -> int:
        return self.spec.num_tokens(self.config, self.size)

    @property
    def hidden(self) -> int:
        return self.spec.hidden_size(self.config)

    @property
    def ld_bytes(self) -> int:
        """One hidden state of the whole batch: tokens x hidden width x bytes per element."""
        return self.tokens * self.batch_size * self.hidden * torch.tensor([], dtype=self.dtype).element_size()

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).replace("torch.", "")

    @property
    def num_layers(self) -> int | None:
        """The config's block count, under the name the class gives it."""
        return next((self.config[key] for key in LAYER_KEYS if key in self.config), None)

    def describe(self) -> str:
        size = f"{self.size.height}x{self.size.width}" + (f", {self.size.num_frames} frames" if self.spec.video else "")
        where = "simulated under FakeTensorMode" if self.simulate else f"on {self.device}"
        where += ", a training step" if self.training else ""
        return (f"{self.spec.name} ({self.spec.class_name}, config {self.variant}: {self.num_layers} "
                f"layers, hidden {self.hidden}), {size} -> {self.tokens:,} tokens, batch {self.batch_size}, "
                f"{self.dtype_name} {where}; 1 LD = {_bytes(self.ld_bytes)}")


@dataclass
class Result:
    """One strategy's row."""

    strategy: Strategy
    status: str = "ok"  # "ok" | "unavailable" | "error"
    reason: str = ""
    report: str = ""
    trace: MemoryTrace | None = None
    total_peak_bytes: int | None = None
    resident_bytes: int | None = None
    times_s: list[float] = field(default_factory=list)
    rel_error: float | None = None
    trace_file: str | None = None

    @property
    def time_s(self) -> float | None:
        return statistics.median(self.times_s) if self.times_s else None


# ------------------------------------------------------------------------------------------------ arguments
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="memopt-bench",
        description="Compare memory strategies (unmodified, diffusers' options, memopt's) on one diffusers "
                    "transformer: peak memory, where the peak is, time and exactness, with traces written to disk. "
                    "Without arguments: a small Wan config on the CPU, every strategy.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    model = parser.add_argument_group("model")
    model.add_argument("--model", help=f"model family: {', '.join(FAMILIES)} (default: wan, --variant small)")
    model.add_argument("--variant", help="named config of the family (full, tiny, small, 1.3b, ...; default full)")
    model.add_argument("--tiny", action="store_true", help="the family's tiny test config (same as --variant tiny)")
    model.add_argument("--config", type=Path, metavar="PATH.json",
                       help="a diffusers transformer config.json (class from its _class_name) instead of --model")
    size = parser.add_argument_group("size")
    size.add_argument("--size", help="named size: the family's (default, tiny, ...) or "
                                     f"{', '.join(GENERIC_SIZES)}; --height/--width/--frames override it")
    size.add_argument("--height", type=int, help="pixels")
    size.add_argument("--width", type=int, help="pixels")
    size.add_argument("--frames", type=int, help="video frames (video families only)")
    size.add_argument("--batch-size", type=int, default=1)
    how = parser.add_argument_group("how")
    how.add_argument("--strategies", help="comma list of strategies or shorthands (see --list); default: all of them "
                                          "(for a forward, or with --training for a training step)")
    how.add_argument("--training", action="store_true",
                     help="measure a training step (forward with autograd, then backward) instead of a forward")
    how.add_argument("--simulate", action="store_true",
                     help="trace a full-size model under FakeTensorMode: exact bytes, nothing allocated, no timing")
    how.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    how.add_argument("--dtype", choices=sorted(DTYPES), help="default: fp32 on the CPU, bf16 on CUDA or --simulate")
    how.add_argument("--repeats", type=int, help="timed forwards per strategy, median reported "
                                                 "(default 3; 0 under --simulate)")
    how.add_argument("--num-chunks", type=int, help="chunk count for ffn-*, sequence, attention, kernel "
                                                    "(default: each strategy's own)")
    how.add_argument("--budget", help="device memory the 'all' strategy plans for, e.g. 24GiB (default: the "
                                      "baseline's weights + inputs + half its activation peak, i.e. 'halve the "
                                      "activations')")
    how.add_argument("--seed", type=int, default=0, help="weights and inputs")
    how.add_argument("--out", type=Path, help="output folder (default: traces/<run name>)")
    how.add_argument("--max-timeline-points", type=int, default=8192,
                     help="trace JSONs keep each bucket's lowest and highest op beyond this many ops (0: all ops)")
    parser.add_argument("--list", action="store_true", help="list models, sizes and strategies, then exit")
    return parser


def _positive(parser: argparse.ArgumentParser, name: str, value: int | None, minimum: int = 1) -> None:
    if value is not None and value < minimum:
        parser.error(f"{name} must be >= {minimum}, got {value}")


def _load_config(parser: argparse.ArgumentParser, path: Path) -> tuple[FamilySpec, dict[str, Any]]:
    """A diffusers config.json -> (family, complete config dict); keys the class does not take are dropped."""
    try:
        raw = json.loads(path.read_text())
    except OSError as error:
        parser.error(f"--config {path}: {error.strerror or error}")
    except json.JSONDecodeError as error:
        parser.error(f"--config {path} is not valid JSON: {error}")
    if not isinstance(raw, dict) or "_class_name" not in raw:
        parser.error(f"--config {path} has no '_class_name' (diffusers configs name their class there)")
    class_name = raw["_class_name"]
    spec = next((s for s in FAMILIES.values() if s.class_name == class_name), None)
    if spec is None:
        parser.error(f"--config {path}: memopt-bench can build inputs for "
                     f"{', '.join(sorted(s.class_name for s in FAMILIES.values()))}, not {class_name}")
    params = inspect.signature(spec.model_class.__init__).parameters
    defaults = {k: p.default for k, p in params.items() if k != "self" and p.default is not inspect.Parameter.empty}
    values = {k: (tuple(v) if isinstance(v, list) else v) for k, v in raw.items() if k in params and k != "self"}
    return spec, {**defaults, **values}


def _variant_config(parser: argparse.ArgumentParser, spec: FamilySpec, variant: str) -> tuple[dict[str, Any], Size]:
    """The named config and its natural size."""
    if variant == "small":
        if spec.name not in SMALL_CONFIGS:
            parser.error(f"--variant small exists for {', '.join(SMALL_CONFIGS)}, not {spec.name}; "
                         f"{spec.name} has {', '.join(spec.configs)}")
        overrides, natural = SMALL_CONFIGS[spec.name]
        return {**spec.config("full"), **overrides}, natural
    if variant not in spec.configs:
        extra = ", small" if spec.name in SMALL_CONFIGS else ""
        parser.error(f"{spec.name} has no config {variant!r}; choose from {', '.join(spec.configs)}{extra}")
    return spec.config(variant), spec.size("tiny" if variant == "tiny" else "default")


def _resolve_size(parser: argparse.ArgumentParser, spec: FamilySpec, natural: Size, args: argparse.Namespace) -> Size:
    base = natural
    if args.size is not None:
        named = {**spec.sizes, **spec.extra_sizes}
        if args.size in named:
            base = named[args.size]
        elif args.size in GENERIC_SIZES:
            height, width = GENERIC_SIZES[args.size]
            base = Size(height, width, spec.size("default").num_frames)
        else:
            parser.error(f"unknown size {args.size!r} for {spec.name}; choose from "
                         f"{', '.join([*named, *(k for k in GENERIC_SIZES if k not in named)])} "
                         "or give --height/--width/--frames")
    if not spec.video and args.frames not in (None, 1):
        parser.error(f"{spec.name} is an image model: --frames does not apply (got {args.frames})")
    for name in ("height", "width", "frames"):
        _positive(parser, f"--{name}", getattr(args, name))
    size = Size(args.height or base.height, args.width or base.width,
                (args.frames or base.num_frames) if spec.video else 1)
    return size


def _check_inputs(parser: argparse.ArgumentParser, spec: FamilySpec, config: dict[str, Any], size: Size,
                  batch_size: int) -> None:
    """Build the inputs on the meta device so impossible sizes fail here, with the family's own message."""
    try:
        spec.make_inputs(config, batch_size=batch_size, height=size.height, width=size.width,
                         num_frames=size.num_frames, device="meta")
        tokens = spec.num_tokens(config, size)
    except (ValueError, ZeroDivisionError) as error:
        parser.error(f"impossible size {size.height}x{size.width}x{size.num_frames} for {spec.name}: {error}")
    if tokens <= 0:
        parser.error(f"{size.height}x{size.width}x{size.num_frames} gives no tokens for {spec.name}")


def _available_host_bytes() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _check_fits_on_cpu(parser: argparse.ArgumentParser, spec: FamilySpec, config: dict[str, Any],
                       dtype: torch.dtype) -> None:
    """Refuse a real CPU run whose weights alone would not fit in host memory (build on ``meta`` to count them)."""
    with torch.device("meta"):
        model = spec.model_class(**config)
    weight_bytes = sum(p.numel() for p in model.parameters()) * torch.tensor([], dtype=dtype).element_size()
    available = _available_host_bytes()
    if weight_bytes > available // 2:
        parser.error(f"{spec.name} with this config has {weight_bytes / GIB:.1f} GiB of {dtype} weights, more than "
                     f"half the {available / GIB:.1f} GiB of free host memory; add --simulate to trace it under "
                     "FakeTensorMode, or use --tiny / --variant small")


def _run_name(spec: FamilySpec, variant: str, size: Size, batch_size: int, dtype: torch.dtype, simulate: bool,
              device: torch.device, training: bool) -> str:
    parts = [spec.name] + ([variant] if variant != "full" else [])
    parts.append(f"{size.height}x{size.width}" + (f"x{size.num_frames}f" if spec.video else ""))
    if batch_size != 1:
        parts.append(f"b{batch_size}")
    parts.append({torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype])
    parts.append("simulated" if simulate else device.type)
    if training:
        parts.append("training")
    return "-".join(parts)


def resolve(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: Sequence[str]) -> Run:
    """Validate the arguments (``parser.error``: message on stderr, exit code 2) and resolve defaults."""
    _positive(parser, "--batch-size", args.batch_size)
    _positive(parser, "--repeats", args.repeats, minimum=0)
    _positive(parser, "--num-chunks", args.num_chunks)
    _positive(parser, "--max-timeline-points", args.max_timeline_points, minimum=0)
    if args.config is not None and (args.model or args.variant or args.tiny):
        parser.error("--config replaces --model/--variant/--tiny; give one or the other")
    if args.tiny and args.variant not in (None, "tiny"):
        parser.error(f"--tiny and --variant {args.variant} contradict each other")
    try:
        device = torch.device(args.device)
    except RuntimeError as error:
        parser.error(f"bad --device {args.device!r}: {error}")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device must be cpu or cuda[:N], got {args.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda was requested but torch.cuda.is_available() is False on this machine")
    if args.simulate and device.type != "cpu":
        parser.error("--simulate traces fake tensors on the host; it takes no --device")
    try:
        strategies = get_strategies(args.strategies, training=args.training)
    except ValueError as error:
        parser.error(str(error))
    if args.budget is not None:
        try:
            from ..planner import parse_budget
        except ImportError:  # the planner is optional for every other strategy
            parse_budget = None
        if parse_budget is not None:
            try:
                parse_budget(args.budget)
            except (TypeError, ValueError) as error:
                parser.error(f"--budget: {error}")

    if args.config is not None:
        spec, config = _load_config(parser, args.config)
        # A test-sized config at the family's full size would be all attention; small configs get the tiny size.
        variant = args.config.stem
        natural = spec.size("tiny" if spec.hidden_size(config) <= TINY_WIDTH else "default")
    else:
        default_run = args.model is None and args.variant is None and not args.tiny
        try:
            spec = get_family(args.model or "wan")
        except ValueError as error:
            parser.error(str(error))
        variant = "tiny" if args.tiny else (args.variant or ("small" if default_run else "full"))
        config, natural = _variant_config(parser, spec, variant)
    size = _resolve_size(parser, spec, natural, args)
    _check_inputs(parser, spec, config, size, args.batch_size)

    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if args.simulate or device.type == "cuda"
                                                   else torch.float32)
    if not args.simulate and device.type == "cpu":
        _check_fits_on_cpu(parser, spec, config, dtype)
    name = _run_name(spec, variant, size, args.batch_size, dtype, args.simulate, device, args.training)
    return Run(
        spec=spec, variant=variant, config=config, size=size, batch_size=args.batch_size, dtype=dtype, device=device,
        simulate=args.simulate, seed=args.seed,
        repeats=0 if args.simulate else (3 if args.repeats is None else args.repeats),
        num_chunks=args.num_chunks, budget=args.budget, training=args.training, strategies=strategies,
        max_timeline_points=args.max_timeline_points,
        out=args.out or Path("traces") / name, name=name,
        command=" ".join(["memopt-bench", *map(shlex.quote, argv)]),
    )


# ------------------------------------------------------------------------------------------------ measuring
def _relative_error(output: torch.Tensor, reference: torch.Tensor) -> float:
    """||output - reference|| / ||reference|| in float64."""
    output, reference = output.detach().double().cpu(), reference.detach().double().cpu()
    return float((output - reference).norm() / reference.norm().clamp_min(torch.finfo(torch.float64).tiny))


def _first_tensor(output: Any) -> torch.Tensor:
    """The prediction in a forward's output: ``.sample`` or the first entry, where a list of per-sample tensors
    (Z-Image, Cosmos 3 Omni) is flattened into one."""
    value = output[0] if isinstance(output, (tuple, list)) else getattr(output, "sample", output)
    if isinstance(value, (tuple, list)):
        return torch.cat([tensor.flatten() for tensor in value])
    return value


def _report_text(report: Any) -> str:
    return "" if report is None else str(report).strip()


def _context(run: Run) -> StrategyContext:
    return StrategyContext(device=run.device if not run.simulate else torch.device("cpu"),
                           tokens=run.tokens * run.batch_size, simulate=run.simulate, num_chunks=run.num_chunks,
                           height=run.size.height, width=run.size.width,
                           num_frames=run.size.num_frames if run.spec.video else None, batch_size=run.batch_size,
                           budget=run.budget, training=run.training)


def _apply(strategy: Strategy, model: torch.nn.Module, run: Run, result: Result) -> None:
    context = _context(run)
    if not strategy.places_model and not run.simulate:
        model.to(run.device)
    result.report = _report_text(strategy.apply(model, context))


def _measure_simulated(run: Run, result: Result) -> None:
    trace = simulate_family(run.spec, config=run.config, size=run.size, batch_size=run.batch_size, dtype=run.dtype,
                            prepare=lambda model: _apply(result.strategy, model, run, result),
                            name=result.strategy.name, backward=run.training)
    result.trace = trace
    result.total_peak_bytes = trace.total_peak_bytes
    result.resident_bytes = trace.baseline_bytes


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_call(call: Callable[[], Any], device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        call()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1000
    begin = time.perf_counter()
    call()
    return time.perf_counter() - begin


def _measure_real(run: Run, result: Result, reference: torch.Tensor | None) -> torch.Tensor:
    model = run.spec.build(run.config, dtype=run.dtype, device="cpu", seed=run.seed)
    _apply(result.strategy, model, run, result)
    inputs = run.spec.make_inputs(model.config, batch_size=run.batch_size, height=run.size.height,
                                  width=run.size.width, num_frames=run.size.num_frames, dtype=run.dtype,
                                  device=run.device, seed=run.seed)
    cuda = run.device.type == "cuda"
    if run.training:
        allocate_gradients(model)  # as every step after the first (zero_grad(set_to_none=False)): in the baseline
    call = functools.partial(training_step, model, inputs) if run.training else functools.partial(model, **inputs)

    with torch.set_grad_enabled(run.training):
        if cuda:
            # One untraced call first: CUDA allocates lazily and keeps what it allocated (the cuBLAS workspace,
            # Triton autotuning's copies, offloading's streams), and the strategy run first must not be charged for
            # what every later one finds already there.
            call()
            model.zero_grad(set_to_none=False)
            gc.collect()
            torch.cuda.empty_cache()
            _synchronize(run.device)
            resident = torch.cuda.memory_allocated(run.device)
        tracer = MemoryTracer(root=model, record_snapshot=cuda)
        trace = tracer.run(call)
        if run.training:  # the parameters' gradients of the one step
            output = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]).clone()
        else:
            output = _first_tensor(trace.result).detach()
        trace.result = None
        gc.collect()  # the trace's garbage, so no collection lands inside a timed call
        result.times_s = [_time_call(call, run.device) for _ in range(run.repeats)]
    trace.name = result.strategy.name
    result.trace = trace
    if cuda:  # what the device held before the call: offloaded weights are not there, the cuBLAS workspace is
        trace.meta["weights_and_inputs_bytes"] = trace.baseline_bytes
        trace.baseline_bytes = resident
    result.resident_bytes = trace.baseline_bytes
    result.total_peak_bytes = trace.total_peak_bytes
    output = output.float().cpu()
    if result.strategy.name == "baseline":
        result.rel_error = 0.0
    elif reference is not None:
        result.rel_error = _relative_error(output, reference)
    del model, inputs, call
    return output


def measure(run: Run, result: Result, reference: torch.Tensor | None) -> torch.Tensor | None:
    """Fill ``result`` (never raises): status ok / unavailable / error. Returns the output for real runs."""
    output = None
    try:
        reason = result.strategy.unavailable_reason(_context(run))
        if reason is not None:
            raise StrategyUnavailable(reason)
        if run.simulate:
            _measure_simulated(run, result)
        else:
            output = _measure_real(run, result, reference)
    except StrategyUnavailable as reason:
        result.status, result.reason = "unavailable", str(reason)
    except Exception as error:  # one failing strategy must not hide the others' numbers
        result.status, result.reason = "error", f"{type(error).__name__}: {error}"
        result.report = traceback.format_exc(limit=-3)
    finally:
        gc.collect()
        if run.device.type == "cuda":
            torch.cuda.empty_cache()
    if result.trace is not None:
        result.trace.meta.update({
            "strategy": result.strategy.name, "family": run.spec.name, "class": run.spec.class_name,
            "config": run.variant, "height": run.size.height, "width": run.size.width,
            "num_frames": run.size.num_frames, "batch_size": run.batch_size, "dtype": run.dtype_name,
            "device": "simulated" if run.simulate else str(run.device), "tokens": run.tokens * run.batch_size,
            "hidden": run.hidden, "ld_bytes": run.ld_bytes, "ld": result.trace.peak_bytes / run.ld_bytes,
            "resident_bytes": result.resident_bytes, "total_peak_bytes": result.total_peak_bytes,
        })
    return output


# ------------------------------------------------------------------------------------------------ output
SUMMARY_FIELDS = ["strategy", "status", "reason", "total_peak_bytes", "resident_bytes", "activation_peak_bytes",
                  "activation_peak_ld", "vs_baseline", "peak_op", "peak_module", "num_ops", "time_s",
                  "time_vs_baseline", "rel_error", "description", "report", "trace_file"]
"""Columns of ``summary.csv`` and keys of each ``summary.json`` row."""


def _rows(run: Run, results: list[Result]) -> list[dict[str, Any]]:
    baseline = results[0]
    rows = []
    for result in results:
        trace = result.trace
        row = {
            "strategy": result.strategy.name, "status": result.status, "reason": result.reason,
            "total_peak_bytes": result.total_peak_bytes, "resident_bytes": result.resident_bytes,
            "activation_peak_bytes": trace.peak_bytes if trace else None,
            "activation_peak_ld": round(trace.peak_bytes / run.ld_bytes, 3) if trace else None,
            "vs_baseline": None, "peak_op": trace.peak_op if trace else None,
            "peak_module": trace.peak_module if trace else None, "num_ops": trace.num_ops if trace else None,
            "time_s": result.time_s, "time_vs_baseline": None, "rel_error": result.rel_error,
            "description": result.strategy.description, "report": result.report, "trace_file": result.trace_file,
        }
        if trace and baseline.trace and baseline.trace.peak_bytes:
            row["vs_baseline"] = round(trace.peak_bytes / baseline.trace.peak_bytes, 4)
        if result.time_s is not None and baseline.time_s:
            row["time_vs_baseline"] = round(result.time_s / baseline.time_s, 3)
        rows.append(row)
    return rows


def compact_timeline(trace: MemoryTrace, max_points: int) -> MemoryTrace:
    """A copy of ``trace`` whose timeline keeps at most about ``max_points`` ops: each bucket's lowest and highest.

    Chunked strategies run 10-30x more aten ops than the unmodified model (167k for Wan-14B in 16 sequence chunks,
    6 MB of JSON); the envelope of the timeline, the peak itself (its index is remapped) and every other field stay
    exact, and ``meta["timeline_compacted_from"]`` records the original op count. ``max_points=0`` keeps everything.
    """
    count = len(trace.live_bytes)
    if max_points <= 0 or count <= max_points:
        return trace
    bucket = math.ceil(count / max(max_points // 2, 1))
    keep: list[int] = []
    for start in range(0, count, bucket):
        indices = range(start, min(start + bucket, count))
        low = min(indices, key=trace.live_bytes.__getitem__)
        high = max(indices, key=trace.live_bytes.__getitem__)
        keep += sorted({low, high})
    if trace.peak_index >= 0 and trace.peak_index not in keep:  # ties: the bucket's max may be an equal earlier op
        keep = sorted({*keep, trace.peak_index})
    return replace(
        trace,
        ops=[trace.ops[i] for i in keep], modules=[trace.modules[i] for i in keep],
        live_bytes=[trace.live_bytes[i] for i in keep],
        peak_index=keep.index(trace.peak_index) if trace.peak_index >= 0 else -1,
        meta={**trace.meta, "timeline_compacted_from": count},
    )


def write_outputs(run: Run, results: list[Result]) -> list[Path]:
    """Trace JSONs (+ CUDA snapshot pickles), ``timelines.png``, ``summary.csv``, ``summary.json`` under ``run.out``."""
    run.out.mkdir(parents=True, exist_ok=True)
    for stale in STRATEGIES:  # files of strategies an earlier run in this folder measured and this one did not
        if all(result.strategy.name != stale or result.trace is None for result in results):
            for suffix in (".json", ".pickle", ".png"):
                (run.out / f"{stale}{suffix}").unlink(missing_ok=True)
    written: list[Path] = []
    traced: dict[str, MemoryTrace] = {}
    for result in results:
        if result.trace is not None:
            traced[result.strategy.name] = compact_timeline(result.trace, run.max_timeline_points)
            paths = traced[result.strategy.name].save(run.out / result.strategy.name, plot=False)
            result.trace_file = paths[0].name
            written += paths
    if traced:
        title = f"{run.spec.class_name} ({run.variant}), {run.size.height}x{run.size.width}" + (
            f"x{run.size.num_frames}f" if run.spec.video else "") + f", {run.dtype_name}, " + (
            "simulated" if run.simulate else str(run.device)) + (", a training step" if run.training else "")
        written.append(plot_traces(traced, run.out / "timelines.png", title=title))
    rows = _rows(run, results)
    with open(run.out / "summary.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=SUMMARY_FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow({key: ("" if value is None else value) for key, value in row.items()})
    written.append(run.out / "summary.csv")
    summary = {
        "version": 1,
        "command": run.command,
        "run": {
            "name": run.name, "family": run.spec.name, "class": run.spec.class_name, "config": run.variant,
            "height": run.size.height, "width": run.size.width, "num_frames": run.size.num_frames,
            "batch_size": run.batch_size, "dtype": run.dtype_name, "simulated": run.simulate,
            "device": "simulated" if run.simulate else _device_name(run.device), "seed": run.seed,
            "budget": run.budget, "training": run.training,
            "repeats": run.repeats, "tokens": run.tokens * run.batch_size, "hidden": run.hidden,
            "ld_bytes": run.ld_bytes, "num_layers": run.num_layers,
            "versions": _versions(),
        },
        "strategies": rows,
    }
    (run.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    written.append(run.out / "summary.json")
    return written


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return "cpu"


def _versions() -> dict[str, str]:
    import diffusers

    from .. import __version__

    return {"memopt": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__}


def _bytes(value: int | None) -> str:
    if value is None:
        return "–"
    if value >= GIB / 10:
        return f"{value / GIB:,.2f} GiB"
    return f"{value / MIB:,.1f} MiB" if value >= MIB / 10 else f"{value / 1024:,.1f} KiB"


def render_table(run: Run, results: list[Result]):
    """The rich table of one run."""
    from rich.table import Table

    table = Table(title=run.describe(), title_justify="left", show_lines=False)
    for header, justify in [("strategy", "left"), ("total peak", "right"), ("activations", "right"),
                            ("LD", "right"), ("vs base", "right"), ("time", "right"), ("rel. error", "right"),
                            ("peak at (op @ module) / why not run", "left")]:
        table.add_column(header, justify=justify, overflow="fold", no_wrap=header == "strategy")
    for row, result in zip(_rows(run, results), results):
        if result.status != "ok":
            style = "yellow" if result.status == "unavailable" else "bold red"
            table.add_row(row["strategy"], *["–"] * 6, f"[{style}]{result.status}: {result.reason}[/]")
            continue
        time_text = "–" if row["time_s"] is None else f"{row['time_s']:.3f} s" + (
            f" ({row['time_vs_baseline']:.2f}x)" if row["time_vs_baseline"] is not None else "")
        error = "–" if row["rel_error"] is None else (
            "0 (ref)" if result is results[0] else f"{row['rel_error']:.1e}")
        table.add_row(
            row["strategy"], _bytes(row["total_peak_bytes"]), _bytes(row["activation_peak_bytes"]),
            f"{row['activation_peak_ld']:.2f}", "–" if row["vs_baseline"] is None else f"{row['vs_baseline']:.0%}",
            time_text, error, f"{row['peak_op']} @ {row['peak_module'] or '<top>'}",
        )
    return table


def print_listing(console) -> None:
    from rich.table import Table

    models = Table(title="models (--model; --tiny or --variant picks a config)", title_justify="left")
    for header in ("model", "class", "configs", "sizes (--size)"):
        models.add_column(header)
    for spec in FAMILIES.values():
        configs = list(spec.configs)
        if spec.name in SMALL_CONFIGS:
            small = SMALL_CONFIGS[spec.name][1]
            configs.append(f"small (at {small.height}x{small.width}x{small.num_frames}f; the default run)")
        sizes = {**spec.sizes, **spec.extra_sizes}
        models.add_row(spec.name, spec.class_name, ", ".join(configs), ", ".join(
            f"{name} {s.height}x{s.width}" + (f"x{s.num_frames}f" if spec.video else "") for name, s in sizes.items()))
    console.print(models)
    console.print("generic sizes for every model: " + ", ".join(f"{k} = {h}x{w}" for k, (h, w) in
                                                                 GENERIC_SIZES.items()))
    strategies = Table(title="strategies (--strategies a,b,c)", title_justify="left")
    for header in ("strategy", "needs", "what it does"):
        strategies.add_column(header)
    for strategy in STRATEGIES.values():
        strategies.add_row(strategy.name, ", ".join(sorted(strategy.requires)) or "–", strategy.description)
    console.print(strategies)
    console.print("shorthands: " + "; ".join(f"{k} = {','.join(v)}" for k, v in ALIASES.items()))


# ------------------------------------------------------------------------------------------------ main
def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``memopt-bench`` console script; returns 0, or 1 when a strategy failed with an error."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    # A log or a pipe gets a wide table (rich would otherwise assume 80 columns there).
    console = Console(width=None if sys.stdout.isatty() else 160)
    if args.list:
        print_listing(console)
        return 0
    run = resolve(parser, args, argv)
    torch.manual_seed(run.seed)

    results = [Result(strategy) for strategy in run.strategies]
    reference = None
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=Console(stderr=True), transient=False) as progress:
        task = progress.add_task(run.name, total=len(results))
        for result in results:
            progress.update(task, description=f"{run.name}: {result.strategy.name}")
            output = measure(run, result, reference)
            if result is results[0]:
                reference = output
                if run.budget is None and result.status == "ok":
                    # Ask the planner to halve the activations: a budget that means the same for every model and size
                    # (memopt's own default, the free device memory, makes it choose nothing for a model that fits).
                    run.budget = result.resident_bytes + result.trace.peak_bytes // 2
            progress.advance(task)
        progress.update(task, description=f"{run.name}: done")

    written = write_outputs(run, results)
    console.print(render_table(run, results))
    for result in results:
        if result.status == "ok" and result.report:
            lines = [line.strip() for line in result.report.splitlines()[: result.strategy.report_lines]]
            console.print(f"  {result.strategy.name}: {'; '.join(lines)}", highlight=False, soft_wrap=True)
    for result in results:
        if result.status == "error":
            console.print(f"[bold red]{result.strategy.name} failed[/]:\n{result.report}")
    console.print(f"wrote {len(written)} files to {run.out}/ (one trace JSON per strategy, timelines.png, "
                  "summary.csv, summary.json)")
    return 1 if any(result.status == "error" for result in results) else 0


if __name__ == "__main__":
    sys.exit(main())
