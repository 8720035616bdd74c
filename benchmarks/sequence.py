"""Sequential context parallelism (``apply_sequence_chunking``): activation growth per token and forward time.

Two measurements per family, each against the unmodified model in the same run:

* **growth**: activation peak between two sequence lengths, ``(peak(L2) - peak(L1)) / ((L2 - L1) x D x 4 B)`` in LD
  per token, measured by ``memopt.trace.activation_growth`` (fp32, storage-counting tracer; the difference removes
  constant terms; tiny configs widened to 128, one block of each kind), default chunking. The floor is 3.
* **time**: forward time of the chunked model / the unmodified one, median over ``--repeats`` rounds, each round one
  forward of each back to back (both see the same load on a shared machine). On the CPU (one thread by default):
  a wider bench config (8 heads x 64 = 512, two blocks) at the largest of a few sizes whose runs fit in
  ``--budget`` seconds; chunks there hold 100-300 tokens, so per-op costs weigh more than on a GPU. On CUDA
  (``--device cuda``): the released configs (``--config full``) at the family's default size in bf16, with the
  allocator's activation peaks beside the times.

Run::

    python benchmarks/sequence.py                                   # CPU, all families -> results/sequence_cpu.md
    python benchmarks/sequence.py --device cuda --families wan hunyuanvideo --repeats 2 \\
        --output benchmarks/results/sequence_h100.md                # full-size Wan2.1-14B 720p, HunyuanVideo 720p
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from memopt import apply_sequence_chunking, remove_memory_optimizations, trace_memory
from memopt.models import FAMILIES, Size, cast_floating_, get_family
from memopt.plans.sequence import SEQUENCE_PLANS
from memopt.trace.growth import activation_growth, sized_config

RESULTS = Path(__file__).parent / "results" / "sequence_cpu.md"
GIB, MIB = 2**30, 2**20

BENCH_HEADS = {"num_attention_heads": 8, "attention_head_dim": 64}
# Per family: tiny-config overrides that keep the model valid at the bench width (rope axes summing to head_dim, dims
# that must equal the width).
BENCH_CONFIGS: dict[str, dict] = {
    "wan": {"ffn_dim": 2208},
    "flux": {"axes_dims_rope": (16, 24, 24)},
    "hunyuanvideo": {"rope_axes_dim": (16, 24, 24)},
    "cogvideox": {"max_text_seq_length": 64},
    "ltx": {"cross_attention_dim": 512},
    "qwenimage": {"axes_dims_rope": (16, 24, 24)},
    "sd3": {"caption_projection_dim": 512, "pos_embed_max_size": 128, "sample_size": 128},
    "mochi": {"max_sequence_length": 64},
}
BENCH_TEXT_TOKENS = 64
# CPU timing sizes, smallest first (about 1k, 2k, 4k and 8k image tokens).
VIDEO_SIZES = [Size(128, 256, 33), Size(256, 256, 33), Size(256, 512, 33), Size(512, 512, 33)]
IMAGE_SIZES = [Size(512, 512), Size(768, 768), Size(1024, 1024), Size(1536, 1024)]
BENCH_SIZES: dict[str, list[Size]] = {
    "wan": VIDEO_SIZES, "hunyuanvideo": VIDEO_SIZES, "cogvideox": VIDEO_SIZES,
    "ltx": [Size(512, 512, 33), Size(512, 1024, 33), Size(1024, 1024, 33), Size(1024, 1024, 65)],
    "mochi": [Size(256, 256, 25), Size(256, 512, 25), Size(512, 512, 25), Size(512, 512, 49)],
    "flux": IMAGE_SIZES, "qwenimage": IMAGE_SIZES, "sd3": IMAGE_SIZES,
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


def _peak(model: torch.nn.Module, inputs: dict) -> int:
    """Activation peak above weights and inputs: the tracer on the CPU, the caching allocator on CUDA."""
    with torch.no_grad():
        return trace_memory(model, **inputs).peak_bytes


def timing(model: torch.nn.Module, inputs: dict, device: str, repeats: int, num_chunks: int | None) -> dict[str, Any]:
    """Chunked vs unmodified on the same model and inputs: times per round and activation peaks."""
    report = apply_sequence_chunking(model, num_chunks)
    chunked_peak = _peak(model, inputs)  # also warms the chunked path up
    remove_memory_optimizations(model)
    baseline_peak = _peak(model, inputs)
    ratios, base_times, chunk_times = [], [], []
    for _ in range(repeats):
        base = _forward_seconds(model, inputs, device)
        apply_sequence_chunking(model, num_chunks)
        chunk = _forward_seconds(model, inputs, device)
        remove_memory_optimizations(model)
        base_times.append(base)
        chunk_times.append(chunk)
        ratios.append(chunk / base)
    return {"num_chunks": report.num_chunks, "baseline_s": statistics.median(base_times),
            "chunked_s": statistics.median(chunk_times), "ratio": statistics.median(ratios),
            "baseline_peak": baseline_peak, "chunked_peak": chunked_peak}


def bench_cpu(family: str, repeats: int, budget: float, num_chunks: int | None) -> dict[str, Any]:
    """The largest bench size whose baseline forward leaves room for the timed rounds within ``budget`` seconds."""
    spec = get_family(family)
    chosen = None
    for size in BENCH_SIZES[family]:
        config = sized_config(family, {**spec.config("tiny"), **BENCH_HEADS, **BENCH_CONFIGS[family]}, size)
        model = spec.build(config).to(torch.float32)
        inputs = _inputs(spec, model, size, "cpu", text_tokens=BENCH_TEXT_TOKENS)
        seconds = _forward_seconds(model, inputs, "cpu")
        # rounds of (baseline + chunked at ~1.5x) plus two traced runs, which cost several forwards each
        if chosen is not None and seconds * (2.5 * repeats + 6) > budget:
            break
        chosen = (size, model, inputs)
    size, model, inputs = chosen
    result = timing(model, inputs, "cpu", repeats, num_chunks)
    return {"family": family, "config": "bench", "tokens": spec.num_tokens(model.config, size),
            "hidden": spec.hidden_size(model.config), "size": size, "dtype": "fp32", **result}


def bench_cuda(family: str, repeats: int, config_name: str, size_name: str, dtype: torch.dtype,
               num_chunks: int | None) -> dict[str, Any]:
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
    result = timing(model, inputs, "cuda", repeats, num_chunks)
    return {"family": family, "config": config_name, "tokens": spec.num_tokens(model.config, size),
            "hidden": spec.hidden_size(model.config), "size": size, "dtype": str(dtype).replace("torch.", ""),
            **result}


def markdown(growth_rows: list[dict], timing_rows: list[dict], device: str) -> str:
    lines = []
    if growth_rows:
        lines += [
            "### Activation growth per token (fp32, CPU tracer, width 128, default chunking)",
            "",
            "| family | unmodified LD/token | chunked LD/token | chunks |",
            "|---|---|---|---|",
        ]
        lines += [f"| {r['family']} | {r['baseline']:.2f} | {r['chunked']:.2f} | {r['num_chunks']} |"
                  for r in growth_rows]
        lines.append("")
    unit = GIB if device == "cuda" else MIB
    unit_name = "GiB" if device == "cuda" else "MiB"
    lines += [
        f"### Forward time and activation peak ({device})",
        "",
        f"| family | config | size | tokens | D | dtype | chunks | unmodified s | chunked s | time ratio | "
        f"unmodified peak {unit_name} | chunked peak {unit_name} | chunked LD |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in timing_rows:
        size = r["size"]
        size_text = f"{size.height}x{size.width}" + (f"x{size.num_frames}f" if size.num_frames > 1 else "")
        element = 2 if r["dtype"] in ("bfloat16", "float16") else 4
        ld = r["tokens"] * r["hidden"] * element
        lines.append(
            f"| {r['family']} | {r['config']} | {size_text} | {r['tokens']:,} | {r['hidden']} | {r['dtype']} | "
            f"{r['num_chunks']} | {r['baseline_s']:.2f} | {r['chunked_s']:.2f} | {r['ratio']:.2f} | "
            f"{r['baseline_peak'] / unit:.2f} | {r['chunked_peak'] / unit:.2f} | {r['chunked_peak'] / ld:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", nargs="*", default=None, choices=sorted(FAMILIES))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (one forward of each variant per round)")
    parser.add_argument("--budget", type=float, default=60.0, help="CPU: seconds allowed per family for the timing")
    parser.add_argument("--num-chunks", type=int, default=None, help="default: the family plan's")
    parser.add_argument("--config", default="full", help="CUDA: zoo config name (full, 1.3b, ...)")
    parser.add_argument("--size", default="default", help="CUDA: zoo size name (default, 480p, ...)")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (1: on a shared 2-core box a second thread turns the chunked run's many "
                             "small ops into waits for the busy core, and the ratio measures the neighbours)")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda needs a CUDA GPU; this machine has none")
    families = args.families or (sorted(FAMILIES) if args.device == "cpu" else ["wan", "hunyuanvideo"])
    output = args.output or (RESULTS if args.device == "cpu" else RESULTS.with_name("sequence_cuda.md"))
    logging.getLogger("diffusers").setLevel(logging.ERROR)

    start, load = time.perf_counter(), os.getloadavg()[0]
    growth_rows, timing_rows = [], []
    for family in families:
        if args.device == "cpu":
            growth_rows.append({"family": family, "baseline": activation_growth(family),
                                "chunked": activation_growth(family, apply_sequence_chunking),
                                "num_chunks": SEQUENCE_PLANS[get_family(family).class_name].num_chunks})
            timing_rows.append(bench_cpu(family, args.repeats, args.budget, args.num_chunks))
        else:
            timing_rows.append(
                bench_cuda(family, args.repeats, args.config, args.size, torch.bfloat16, args.num_chunks)
            )
            torch.cuda.empty_cache()
        print(markdown(growth_rows[-1:], timing_rows[-1:], args.device), flush=True)
    threads = torch.get_num_threads()
    cpu_name = f"CPU, {threads} thread{'s' * (threads > 1)}"
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else cpu_name
    text = "\n".join([
        f"# Sequential context parallelism ({device_name})",
        "",
        f"torch {torch.__version__}, load average {load:.1f} at the start; generated by "
        f"`python benchmarks/sequence.py{' --device cuda' if args.device == 'cuda' else ''}` in "
        f"{time.perf_counter() - start:.0f} s. Peaks: activation bytes above weights and inputs "
        f"({'CUDA caching allocator' if args.device == 'cuda' else 'storage-counting tracer'}); LD = tokens x D x "
        "bytes per element. Time ratio: median over rounds of chunked / unmodified, one forward of each per round.",
        "",
        markdown(growth_rows, timing_rows, args.device),
        "",
    ])
    print(text)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text)


if __name__ == "__main__":
    main()
