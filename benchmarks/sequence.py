"""Sequential context parallelism (``apply_sequence_chunking``): activation growth per token and forward time.

Two measurements per family and schedule (``two_pass``, ``lockstep``: see ``memopt.hooks.sequence``), each against
the unmodified model in the same run:

* **growth**: activation peak between two sequence lengths, ``(peak(L2) - peak(L1)) / ((L2 - L1) x D x 4 B)`` in LD
  per token, measured by ``memopt.trace.activation_growth`` (fp32, storage-counting tracer; the difference removes
  constant terms; tiny configs widened to 128, one block of each kind), default chunking. The floor is 3.
* **time**: forward time of the chunked model / the unmodified one, median over ``--repeats`` rounds, each round one
  forward of each variant back to back (all see the same load on a shared machine), with the activation peak, the
  number of aten ops the tracer sees (composite ops such as RMSNorm decomposed, views included: more than the
  kernels a GPU launches) and the busy share of one profiled forward of each variant. On the CPU (one thread by
  default):
  a wider bench config (8 heads x 64 = 512, two blocks) at the largest of a few sizes whose runs fit in
  ``--budget`` seconds; chunks there hold 100-300 tokens, so per-op costs weigh more than on a GPU. On CUDA
  (``--device cuda``): the released configs (``--config full``) at the family's default size in bf16, with the
  allocator's activation peaks beside the times.

Run::

    python benchmarks/sequence.py                                   # CPU, all families -> results/sequence_cpu.md
    python benchmarks/sequence.py --device cuda --families wan hunyuanvideo --repeats 2 \\
        --output benchmarks/results/sequence_h100.md                # full-size Wan2.1-14B 720p, HunyuanVideo 720p
    python benchmarks/sequence.py --device cuda --families wan --num-chunks 8 16 32   # time against chunk count
    python benchmarks/sequence.py --device cuda --families hunyuanvideo --unread-from 1000000000000  # dense stand-ins
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import os
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from memopt import apply_sequence_chunking, remove_memory_optimizations, trace_memory
from memopt.hooks import sequence as sequence_hooks
from memopt.hooks.sequence import SCHEDULES
from memopt.models import Size, cast_floating_, get_family
from memopt.models.omnigen import omnigen_rope_scaling
from memopt.plans.sequence import SEQUENCE_PLANS
from memopt.trace.growth import activation_growth, sized_config

RESULTS = Path(__file__).parent / "results" / "sequence_cpu.md"
UNMODIFIED = "unmodified"
GIB, MIB = 2**30, 2**20

BENCH_HEADS = {"num_attention_heads": 8, "attention_head_dim": 64}
# Per family: tiny-config overrides that keep the model valid at the bench width (rope axes summing to head_dim, dims
# that must equal the width).
BENCH_CONFIGS: dict[str, dict] = {
    "wan": {"ffn_dim": 2208},
    "flux": {"axes_dims_rope": (16, 24, 24)},
    "hunyuanvideo": {"rope_axes_dim": (16, 24, 24)},
    "hunyuanvideo_i2v": {"rope_axes_dim": (16, 24, 24)},
    "cogvideox": {"max_text_seq_length": 64},
    "ltx": {"cross_attention_dim": 512},
    "qwenimage": {"axes_dims_rope": (16, 24, 24)},
    "sd3": {"caption_projection_dim": 512, "pos_embed_max_size": 128, "sample_size": 128},
    "mochi": {"max_sequence_length": 64},
    "chronoedit": {"ffn_dim": 2208, "added_kv_proj_dim": 512},
    "skyreels_v2": {"ffn_dim": 2208},
    "helios": {"ffn_dim": 2208, "rope_dim": (16, 24, 24)},
    "flux2": {"axes_dims_rope": (16, 16, 16, 16)},
    "chroma": {"axes_dims_rope": (16, 24, 24)},
    "hunyuanvideo15": {"rope_axes_dim": (16, 24, 24)},
    "ltx2": {"cross_attention_dim": 512, "audio_num_attention_heads": 8, "audio_attention_head_dim": 32,
             "audio_cross_attention_dim": 256},
    "wan_vace": {"ffn_dim": 2208},
    "hunyuanimage": {"rope_axes_dim": (32, 32)},
    "cogview4": {},
    "glm_image": {"text_embed_dim": 64},
    "prx": {"hidden_size": 512, "num_heads": 8, "axes_dim": [32, 32], "context_in_dim": 64},
    "hunyuandit": {"hidden_size": 512, "cross_attention_dim": 64, "cross_attention_dim_t5": 64,
                   "pooled_projection_dim": 64, "text_len": 64, "text_len_t5": 64},
    "dit": {},
    "zimage": {"dim": 512, "n_heads": 8, "n_kv_heads": 8, "axes_dims": [16, 24, 24], "axes_lens": [1536, 512, 512]},
    "kandinsky5": {"model_dim": 512, "ff_dim": 2048, "axes_dims": (16, 24, 24)},
    "minimax_h3": {"hidden_size": 512, **BENCH_HEADS, "ffn_dim": 1376, "rope_freq_dim": 10},
    "qwenimage21": {"axes_dims_rope": (16, 24, 24)},
    "flux3": {"axes_dims_rope": (16, 16, 16, 16)},
    "auraflow": {"caption_projection_dim": 512, "pos_embed_max_size": 9216},
    "pixart": {"cross_attention_dim": 512, "use_additional_conditions": False},
    "allegro": {"attention_head_dim": 66, "cross_attention_dim": 528},  # RoPE: head_dim % 6 == 0
    "easyanimate": {"text_embed_dim": 64},
    "consisid": {"LFE_output_dim": 341, "max_text_seq_length": 64},  # face K/V width int(2/3 x 512)
    "cosmos": {"text_embed_dim": 64, "max_size": (16, 64, 64)},  # learnable positions for the bench sizes
    "motif_video": {"rope_axes_dim": (16, 24, 24)},
    "krea2": {"axes_dims_rope": (16, 24, 24), "num_key_value_heads": 2, "intermediate_size": 1376},
    "ernie_image": {"hidden_size": 512, "num_attention_heads": 8, "ffn_hidden_size": 1536,
                    "rope_axes_dim": (16, 24, 24)},
    "lumina2": {"hidden_size": 512, "num_attention_heads": 8, "num_kv_heads": 4, "axes_dim_rope": (16, 24, 24),
                "axes_lens": (300, 300, 300)},  # rotary positions for the bench sizes
    "cogview3plus": {"pos_embed_max_size": 128},
    "latte": {"cross_attention_dim": 512, "video_length": 16, "sample_size": 64},
    "hidream": {"axes_dims_rope": (32, 16, 16), "caption_channels": [64, 64], "text_emb_dim": 64},
    "bria": {"axes_dims_rope": (16, 24, 24)},
    "longcat_image": {"axes_dims_rope": (16, 24, 24)},
    "ovis_image": {"axes_dims_rope": (16, 24, 24)},
    "framepack": {"rope_axes_dim": (16, 24, 24)},
    "wan_animate": {"ffn_dim": 2208},
    "kandinsky6": {"model_dim": 512, "ff_dim": 2048, "axes_dims": (16, 24, 24)},
    "joyimage_edit": {"hidden_size": 512, "num_attention_heads": 8, "rope_dim_list": (16, 24, 24)},
    "joyimage_edit_plus": {"hidden_size": 512, "num_attention_heads": 8, "rope_dim_list": (16, 24, 24)},
    "bria_fibo": {"axes_dims_rope": (16, 24, 24)},
    "bria_fibo2": {"dim": 512, "n_heads": 8, "axes_dims": (16, 24, 24), "axes_lens": (1024, 512, 512)},
    "anyflow": {"ffn_dim": 2208},
    # Cosmos 3 Omni: width 512 as hidden_size (8 query heads, 2 K/V heads of 64), SwiGLU ratio 3, a small vocabulary.
    "cosmos3_omni": {"hidden_size": 512, "head_dim": 64, "num_attention_heads": 8, "num_key_value_heads": 2,
                     "intermediate_size": 1536, "rope_axes_dim": (12, 10, 10), "latent_channel": 48,
                     "patch_latent_dim": 192},
    # OmniGen: width 512 as hidden_size (8 heads of 64), Phi-3's MLP ratio 8 / 3.
    "omnigen": {"hidden_size": 512, "num_attention_heads": 8, "num_key_value_heads": 8, "intermediate_size": 1365,
                "rope_scaling": omnigen_rope_scaling(64)},
    # Ideogram 4 at the release's proportions: text features 11.56x the width, SwiGLU 8 / 3, MRoPE (12, 10, 10).
    "ideogram4": {"llm_features_dim": 5917, "intermediate_size": 1365, "adaln_dim": 64, "mrope_section": (12, 10, 10)},
}
BENCH_TEXT_TOKENS = 64
# CPU timing sizes, smallest first (about 1k, 2k, 4k and 8k image tokens).
VIDEO_SIZES = [Size(128, 256, 33), Size(256, 256, 33), Size(256, 512, 33), Size(512, 512, 33)]
IMAGE_SIZES = [Size(512, 512), Size(768, 768), Size(1024, 1024), Size(1536, 1024)]
BENCH_SIZES: dict[str, list[Size]] = {
    "wan": VIDEO_SIZES, "hunyuanvideo": VIDEO_SIZES, "hunyuanvideo_i2v": VIDEO_SIZES, "cogvideox": VIDEO_SIZES,
    "ltx": [Size(512, 512, 33), Size(512, 1024, 33), Size(1024, 1024, 33), Size(1024, 1024, 65)],
    "mochi": [Size(256, 256, 25), Size(256, 512, 25), Size(512, 512, 25), Size(512, 512, 49)],
    "flux": IMAGE_SIZES, "qwenimage": IMAGE_SIZES, "sd3": IMAGE_SIZES,
    "chronoedit": VIDEO_SIZES, "skyreels_v2": VIDEO_SIZES, "helios": VIDEO_SIZES, "hunyuanvideo15": VIDEO_SIZES,
    "flux2": IMAGE_SIZES, "chroma": IMAGE_SIZES, "cogview4": IMAGE_SIZES, "glm_image": IMAGE_SIZES, "prx": IMAGE_SIZES,
    "hunyuandit": IMAGE_SIZES,
    "dit": [Size(512, 512), Size(768, 768), Size(1024, 1024), Size(1536, 1536)],  # square images only
    "ltx2": [Size(512, 512, 33), Size(512, 1024, 33), Size(1024, 1024, 33), Size(1024, 1024, 65)],
    "wan_vace": VIDEO_SIZES,
    "hunyuanimage": [Size(1024, 1024), Size(1536, 1536), Size(2048, 2048), Size(2048, 3072)],  # 32x VAE
    "zimage": IMAGE_SIZES,
    "kandinsky5": VIDEO_SIZES,
    "minimax_h3": [Size(256, 512, 39), Size(512, 512, 39), Size(512, 1024, 39), Size(1024, 1024, 39)],
    "qwenimage21": IMAGE_SIZES,
    "flux3": IMAGE_SIZES,
    "auraflow": IMAGE_SIZES,
    "pixart": IMAGE_SIZES,
    "allegro": VIDEO_SIZES,
    "easyanimate": VIDEO_SIZES,
    "consisid": VIDEO_SIZES,
    "cosmos": VIDEO_SIZES,
    "motif_video": VIDEO_SIZES,
    "krea2": IMAGE_SIZES,
    "ideogram4": IMAGE_SIZES,
    "omnigen": IMAGE_SIZES,
    # Cosmos 3 Omni's 16x VAE: 9 latent frames of 8 x 16 to 32 x 32 patches (1,152 to 9,216 tokens).
    "cosmos3_omni": [Size(256, 512, 33), Size(512, 512, 33), Size(512, 1024, 33), Size(1024, 1024, 33)],
    "ernie_image": IMAGE_SIZES,
    "lumina2": IMAGE_SIZES,
    "cogview3plus": IMAGE_SIZES,
    "latte": [Size(128, 256, 16), Size(256, 256, 16), Size(256, 512, 16), Size(512, 512, 16)],  # 16 frames
    "hidream": [Size(256, 256), Size(512, 512), Size(768, 768), Size(1024, 1024)],  # square: no padding
    "bria": IMAGE_SIZES,
    "longcat_image": IMAGE_SIZES,
    "ovis_image": IMAGE_SIZES,
    "framepack": VIDEO_SIZES,
    "wan_animate": [Size(128, 256, 33), Size(256, 256, 33), Size(256, 512, 33), Size(512, 512, 33)],
    "kandinsky6": VIDEO_SIZES,
    "joyimage_edit": IMAGE_SIZES,
    "joyimage_edit_plus": [Size(512, 512), Size(768, 768), Size(1024, 768), Size(1024, 1024)],  # target + reference
    "bria_fibo": [Size(1024, 1024), Size(1536, 1536), Size(2048, 2048), Size(2048, 3072)],  # 16x VAE
    "bria_fibo2": IMAGE_SIZES,
    "anyflow": VIDEO_SIZES,
}


def _inputs(spec, model, size: Size, device: str, dtype: torch.dtype = torch.float32,
            text_tokens: int | None = None) -> dict:
    return spec.make_inputs(model.config, batch_size=1, height=size.height, width=size.width,
                            num_frames=size.num_frames, text_tokens=text_tokens, masked=spec.mask_key is not None,
                            dtype=dtype, device=device)


def _forward_seconds(model: torch.nn.Module, inputs: dict, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.no_grad():
        model(**inputs)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _trace(model: torch.nn.Module, inputs: dict) -> tuple[int, int]:
    """``(activation peak above weights and inputs, aten ops)``: the peak from the tracer on the CPU, from the caching
    allocator on CUDA; the op count is a proxy for the per-op (dispatch, launch) cost the chunks multiply."""
    with torch.no_grad():
        trace = trace_memory(model, **inputs)
    return trace.peak_bytes, trace.num_ops


def _busy(model: torch.nn.Module, inputs: dict, device: str) -> tuple[float, float | None]:
    """``(wall seconds, busy seconds)`` of one forward under ``torch.profiler``; busy is None (with a warning) when the
    profiler's numbers are not usable.

    Busy is the time the device spent in kernels: on CUDA the summed durations of the CUDA kernels, on the CPU the
    time inside aten ops (self time summed over every op). The rest of the wall time the device waited for the host
    (Python, module calls, hooks, op dispatch): what separates a launch-bound chunked forward (the remedy is fewer
    or larger ops, CUDA graphs) from one whose kernels themselves got slower (smaller GEMMs, wave quantisation).
    The profiler adds about a microsecond per op to both.
    """
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        wall = _forward_seconds(model, inputs, device)
    if device == "cuda":
        busy_us = sum(event.time_range.elapsed_us() for event in prof.events() if event.device_type == DeviceType.CUDA)
    else:
        busy_us = sum(event.self_cpu_time_total for event in prof.events())
    busy = busy_us / 1e6
    if not 0 < busy <= 1.05 * wall:
        print(f"warning: the profiler reports {busy:.3f} s busy in a {wall:.3f} s forward on {device}; not reported")
        return wall, None
    return wall, min(busy, wall)


@contextlib.contextmanager
def _variant(model: torch.nn.Module, schedule: str, num_chunks: int | None, align: int) -> Iterator[Any]:
    """``model`` as the variant runs it (sequence chunking with ``schedule``, or unmodified), restored afterwards;
    yields the chunking report (None when unmodified)."""
    report = None if schedule == UNMODIFIED else apply_sequence_chunking(model, num_chunks, schedule=schedule,
                                                                         align=align)
    try:
        yield report
    finally:
        remove_memory_optimizations(model)


def timing(model: torch.nn.Module, inputs: dict, device: str, repeats: int, num_chunks: int | None,
           schedules: tuple[str, ...] = SCHEDULES, align: int = 128) -> dict[str, Any]:
    """Unmodified vs each schedule on the same model and inputs: times per round, activation peaks, op counts, and
    the share of one profiled forward the device was busy."""
    variants: dict[str, dict[str, Any]] = {}
    for schedule in (UNMODIFIED, *schedules):
        with _variant(model, schedule, num_chunks, align) as report:
            peak, ops = _trace(model, inputs)  # also warms the path up
        if report is not None:
            configured_chunks = report.num_chunks
        variants[schedule] = {"peak": peak, "ops": ops, "times": [], "ratios": []}
    for _ in range(repeats):
        base = None
        for schedule, variant in variants.items():
            with _variant(model, schedule, num_chunks, align):
                seconds = _forward_seconds(model, inputs, device)
            base = seconds if base is None else base  # the unmodified model runs first in each round
            variant["times"].append(seconds)
            variant["ratios"].append(seconds / base)
    for schedule, variant in variants.items():
        variant["seconds"] = statistics.median(variant.pop("times"))
        variant["ratio"] = statistics.median(variant.pop("ratios"))
        with _variant(model, schedule, num_chunks, align):
            wall, busy = _busy(model, inputs, device)
        variant["busy"], variant["idle"] = busy, None if busy is None else 1 - busy / wall
    return {"num_chunks": configured_chunks, "variants": variants}


def bench_cpu(family: str, repeats: int, budget: float, chunk_counts: list[int | None],
              schedules: tuple[str, ...], align: int = 128) -> list[dict[str, Any]]:
    """The largest bench size whose baseline forward leaves room for the timed rounds within ``budget`` seconds; one
    row per chunk count (``None``: the family plan's)."""
    spec = get_family(family)
    chosen = None
    for size in BENCH_SIZES[family]:
        heads = BENCH_HEADS if set(spec.width_keys) <= set(BENCH_HEADS) else {}
        config = sized_config(family, {**spec.config("tiny"), **heads, **BENCH_CONFIGS[family]}, size)
        model = spec.build(config).to(torch.float32)
        inputs = _inputs(spec, model, size, "cpu", text_tokens=BENCH_TEXT_TOKENS)
        seconds = _forward_seconds(model, inputs, "cpu")
        # per chunk count: rounds of (baseline + two schedules at ~1.5x) plus three traced runs, several forwards each
        if chosen is not None and seconds * len(chunk_counts) * (4 * repeats + 9) > budget:
            break
        chosen = (size, model, inputs)
    size, model, inputs = chosen
    row = {"family": family, "config": "bench", "tokens": spec.num_tokens(model.config, size),
           "hidden": spec.hidden_size(model.config), "size": size, "dtype": "fp32"}
    return [{**row, **timing(model, inputs, "cpu", repeats, num_chunks, schedules, align)}
            for num_chunks in chunk_counts]


def bench_cuda(family: str, repeats: int, config_name: str, size_name: str, dtype: torch.dtype,
               chunk_counts: list[int | None], schedules: tuple[str, ...], align: int = 128) -> list[dict[str, Any]]:
    """The released config at a real size, built once; one row per chunk count (``None``: the family plan's)."""
    spec = get_family(family)
    config, size = spec.config(config_name), spec.size(size_name)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("cuda"):  # random weights made on the GPU directly: no 50 GB fp32 copy on the host
            model = spec.model_class(**config).eval()
    finally:
        torch.set_default_dtype(default_dtype)
    cast_floating_(model, dtype)  # _keep_in_fp32_modules back to fp32, as from_pretrained(torch_dtype=dtype)
    inputs = _inputs(spec, model, size, "cuda", dtype)
    _forward_seconds(model, inputs, "cuda")  # warm-up (kernels, allocator)
    row = {"family": family, "config": config_name, "tokens": spec.num_tokens(model.config, size),
           "hidden": spec.hidden_size(model.config), "size": size, "dtype": str(dtype).replace("torch.", "")}
    return [{**row, **timing(model, inputs, "cuda", repeats, num_chunks, schedules, align)}
            for num_chunks in chunk_counts]


def _maybe(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def markdown(growth_rows: list[dict], timing_rows: list[dict], device: str) -> str:
    lines = []
    if growth_rows:
        schedules = [name for name in growth_rows[0] if name in SCHEDULES]
        lines += [
            "### Activation growth per token (fp32, CPU tracer, width 128, default chunking)",
            "",
            "| family | chunks | unmodified LD/token | " + " | ".join(f"{name} LD/token" for name in schedules) + " |",
            "|---|---|---|" + "---|" * len(schedules),
        ]
        lines += [f"| {r['family']} | {r['num_chunks']} | {r[UNMODIFIED]:.2f} | "
                  + " | ".join(f"{r[name]:.2f}" for name in schedules) + " |" for r in growth_rows]
        lines.append("")
    unit = GIB if device == "cuda" else MIB
    unit_name = "GiB" if device == "cuda" else "MiB"
    lines += [
        f"### Forward time, activation peak and aten ops ({device})",
        "",
        f"| family | config | size | tokens | D | dtype | chunks | schedule | seconds | time ratio | "
        f"peak {unit_name} | peak LD | aten ops | busy s (profiled) | idle |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in timing_rows:
        size = r["size"]
        size_text = f"{size.height}x{size.width}" + (f"x{size.num_frames}f" if size.num_frames > 1 else "")
        element = 2 if r["dtype"] in ("bfloat16", "float16") else 4
        ld = r["tokens"] * r["hidden"] * element
        for name, v in r["variants"].items():
            chunks = "-" if name == UNMODIFIED else r["num_chunks"]
            lines.append(
                f"| {r['family']} | {r['config']} | {size_text} | {r['tokens']:,} | {r['hidden']} | {r['dtype']} | "
                f"{chunks} | {name} | {v['seconds']:.2f} | {v['ratio']:.2f} | {v['peak'] / unit:.2f} | "
                f"{v['peak'] / ld:.2f} | {v['ops']:,} | {_maybe(v['busy'], '.2f')} | {_maybe(v['idle'], '.0%')} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # Families with a bench config: Sana's streamed blocks take neither schedule pair nor align (benchmarks/sana.py)
    parser.add_argument("--families", nargs="*", default=None, choices=sorted(BENCH_CONFIGS))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (one forward of each variant per round)")
    parser.add_argument("--budget", type=float, default=60.0, help="CPU: seconds allowed per family for the timing")
    parser.add_argument("--num-chunks", type=int, nargs="+", default=None,
                        help="one timing row per count (each against the unmodified model); default: the family plan's")
    parser.add_argument("--schedules", nargs="+", default=list(SCHEDULES), choices=SCHEDULES,
                        help="sequence-chunking schedules to measure beside the unmodified model")
    parser.add_argument("--align", type=int, default=128,
                        help="token multiple the chunk boundaries fall on (apply_sequence_chunking's align; 1: even)")
    parser.add_argument("--config", default="full", help="CUDA: zoo config name (full, 1.3b, ...)")
    parser.add_argument("--size", default="default", help="CUDA: zoo size name (default, 480p, ...)")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (1: on a shared 2-core box a second thread turns the chunked run's many "
                             "small ops into waits for the busy core, and the ratio measures the neighbours)")
    parser.add_argument("--unread-from", type=int, default=None,
                        help="elements of a chunk's attention input from which the projections a pass skips return "
                             "unread stand-ins (memopt.hooks._unread; default: memopt.hooks.sequence.UNREAD_FROM); a "
                             "huge value keeps dense zeros, for comparing the two")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    if args.unread_from is not None:
        sequence_hooks.UNREAD_FROM = args.unread_from
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA GPU; this machine has none")
    schedules = tuple(args.schedules)
    families = args.families or (sorted(BENCH_CONFIGS) if args.device == "cpu" else ["wan", "hunyuanvideo"])
    output = args.output or (RESULTS if args.device == "cpu" else RESULTS.with_name("sequence_cuda.md"))
    logging.getLogger("diffusers").setLevel(logging.ERROR)

    start, load = time.perf_counter(), os.getloadavg()[0]
    growth_rows, timing_rows = [], []
    chunk_counts: list[int | None] = args.num_chunks or [None]
    for family in families:
        if args.device == "cpu":
            growth = {"family": family, "num_chunks": SEQUENCE_PLANS[get_family(family).class_name].num_chunks,
                      UNMODIFIED: activation_growth(family)}
            for schedule in schedules:
                growth[schedule] = activation_growth(family, functools.partial(apply_sequence_chunking,
                                                                               schedule=schedule))
            growth_rows.append(growth)
            rows = bench_cpu(family, args.repeats, args.budget, chunk_counts, schedules, args.align)
        else:
            rows = bench_cuda(family, args.repeats, args.config, args.size, torch.bfloat16, chunk_counts, schedules,
                              args.align)
            torch.cuda.empty_cache()
        timing_rows += rows
        print(markdown(growth_rows[-1:], rows, args.device), flush=True)
    threads = torch.get_num_threads()
    cpu_name = f"CPU, {threads} thread{'s' * (threads > 1)}"
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else cpu_name
    text = "\n".join([
        f"# Sequential context parallelism ({device_name})",
        "",
        f"torch {torch.__version__}, load average {load:.1f} at the start; generated by "
        f"`{shlex.join(['python', 'benchmarks/sequence.py', *sys.argv[1:]])}` in "
        f"{time.perf_counter() - start:.0f} s. Peaks: activation bytes above weights and inputs "
        f"({'CUDA caching allocator' if args.device == 'cuda' else 'storage-counting tracer'}); LD = tokens x D x "
        "bytes per element. Time ratio: median over rounds of chunked / unmodified, one forward of each variant per "
        "round. Busy: time the device spent in kernels during one forward under torch.profiler (CUDA kernels; on the "
        "CPU, time inside aten ops); idle: the rest of that forward's wall time, spent waiting for the host (Python, "
        "hooks, op dispatch). Schedules: two_pass (the default: K/V collected in a first pass, the part before "
        "attention rerun) and "
        "lockstep (chunks suspended at their attention call until all K/V exist: nothing rerun, every chunk's "
        "pre-attention state alive at once).",
        "",
        markdown(growth_rows, timing_rows, args.device),
        "",
    ])
    print(text)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text)


if __name__ == "__main__":
    main()
