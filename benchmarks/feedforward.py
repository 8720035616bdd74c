"""Peak activation memory and time of memopt's chunked FeedForward, per model family and for one FeedForward (CPU).

Device: CPU (the 2-core CI box), fp32, storage-counting tracer (``memopt.trace_memory``): peaks are exact bytes of
activations above weights and inputs, and LD = image/video tokens x hidden width x 4 bytes. Time ratios are the
median over ``--repeats`` rounds of (variant / original), each round running one untraced forward of every variant
back to back, so both sides of a ratio see the same load on a shared machine. At D = 128 per-op overhead dominates the
whole-model times; the single-FeedForward rows (D = 1024) show the cost of chunking itself.

Models are the real diffusers classes at a bench config (the zoo's tiny config widened to 8 heads x 16 = 128, the
families' own FeedForward ratios, 2 blocks or 1 + 2 single blocks) and about 2,300 image/video tokens, so the
FeedForward's (tokens, 4 D) intermediate is as large relative to the hidden state as in the full-size models.

Run::

    python benchmarks/feedforward.py                 # all families, writes benchmarks/results/feedforward_cpu.md
    python benchmarks/feedforward.py --families wan flux --repeats 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
from diffusers.models.attention import FeedForward

from memopt import apply_chunked_feedforward, remove_memory_optimizations, trace_memory
from memopt.models import Size, get_family

RESULTS = Path(__file__).parent / "results" / "feedforward_cpu.md"
MIB = 2**20

# Widen the tiny configs to D = 8 x 16 = 128 (head_dim stays 16, so the tiny rope settings stay valid); dims that
# must equal D follow. FeedForward widths are each family's own ratio (Wan's ffn_dim is set to its real 4.3 D).
BENCH_CONFIGS: dict[str, dict] = {
    "wan": {"num_attention_heads": 8, "ffn_dim": 552},
    "flux": {"num_attention_heads": 8},
    "hunyuanvideo": {"num_attention_heads": 8},
    "cogvideox": {"num_attention_heads": 8},
    "ltx": {"num_attention_heads": 8, "cross_attention_dim": 128},
    "qwenimage": {"num_attention_heads": 8},
    "sd3": {"num_attention_heads": 8, "caption_projection_dim": 128, "pos_embed_max_size": 64, "sample_size": 64},
    "mochi": {"num_attention_heads": 8},
}
BENCH_SIZES: dict[str, Size] = {
    "wan": Size(256, 256, 33),  # 9 x 16 x 16 = 2,304 tokens
    "flux": Size(768, 768),  # 48 x 48 = 2,304
    "hunyuanvideo": Size(256, 256, 33),  # 2,304
    "cogvideox": Size(256, 256, 33),  # 2,304
    "ltx": Size(512, 512, 57),  # 8 x 16 x 16 = 2,048
    "qwenimage": Size(768, 768),  # 2,304
    "sd3": Size(768, 768),  # 2,304
    "mochi": Size(256, 256, 49),  # 9 x 16 x 16 = 2,304
}
VARIANTS = {"original": None, "hidden x4": ("hidden", 4), "sequence x8": ("sequence", 8)}


def _seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _measure(model: torch.nn.Module, args: tuple, kwargs: dict, repeats: int) -> dict[str, dict]:
    """Trace each variant once (which also warms it up), then time them interleaved, one forward of each per round."""
    results: dict[str, dict] = {}
    for name, variant in VARIANTS.items():
        if variant is not None:
            apply_chunked_feedforward(model, num_chunks=variant[1], split=variant[0])
        with torch.no_grad():
            trace = trace_memory(model, *args, **kwargs)
        remove_memory_optimizations(model)
        results[name] = {"peak": trace.peak_bytes, "at": trace.peak_module or trace.peak_op, "times": []}
    for _ in range(repeats):
        for name, variant in VARIANTS.items():
            if variant is not None:
                apply_chunked_feedforward(model, num_chunks=variant[1], split=variant[0])
            with torch.no_grad():
                results[name]["times"].append(_seconds(lambda: model(*args, **kwargs)))
            remove_memory_optimizations(model)
    original = results["original"]["times"]
    for result in results.values():  # per-round ratios: neighbours in time see the same load on a shared machine
        result["ratio"] = statistics.median(t / t0 for t, t0 in zip(result["times"], original))
    return results


def bench_family(name: str, repeats: int) -> dict:
    spec = get_family(name)
    config = {**spec.config("tiny"), **BENCH_CONFIGS[name]}
    model = spec.build(config)
    size = BENCH_SIZES[name]
    inputs = spec.make_inputs(model.config, batch_size=1, height=size.height, width=size.width,
                              num_frames=size.num_frames, masked=spec.mask_key is not None)
    tokens, hidden = spec.num_tokens(model.config, size), spec.hidden_size(model.config)
    results = _measure(model, (), inputs, repeats)
    return {"name": name, "tokens": tokens, "hidden": hidden, "ld": tokens * hidden * 4, "results": results}


def bench_single_feedforward(activation: str, repeats: int) -> dict:
    """One FeedForward at L=4096, D=1024, F=4096, fp32."""
    tokens, hidden, inner = 4096, 1024, 4096
    torch.manual_seed(0)
    ff = FeedForward(hidden, inner_dim=inner, activation_fn=activation).eval()
    x = torch.randn(1, tokens, hidden)
    results = _measure(ff, (x,), {}, repeats)
    return {"name": f"FeedForward {activation} (L=4096, D=1024, F=4096)", "tokens": tokens, "hidden": hidden,
            "ld": tokens * hidden * 4, "results": results}


def markdown(rows: list[dict], title: str) -> str:
    head = ["model", "tokens", "D"]
    for variant in VARIANTS:
        head += [f"{variant} peak MiB", f"{variant} LD"]
    head += [f"time {v} / original" for v in list(VARIANTS)[1:]] + ["original peak at", "hidden x4 peak at"]
    lines = [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        res = row["results"]
        cells = [row["name"], f"{row['tokens']:,}", str(row["hidden"])]
        for variant in VARIANTS:
            cells += [f"{res[variant]['peak'] / MIB:.1f}", f"{res[variant]['peak'] / row['ld']:.2f}"]
        cells += [f"{res[v]['ratio']:.2f}" for v in list(VARIANTS)[1:]]
        cells += [f"`{res['original']['at']}`", f"`{res['hidden x4']['at']}`"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", nargs="*", default=sorted(BENCH_CONFIGS), choices=sorted(BENCH_CONFIGS))
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (one forward of each variant per round)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()

    start, load = time.perf_counter(), os.getloadavg()[0]
    families = [bench_family(name, args.repeats) for name in args.families]
    single = [bench_single_feedforward(activation, args.repeats) for activation in ("gelu-approximate", "swiglu")]
    text = "\n".join([
        "# Chunked FeedForward on CPU (fp32, batch 1)",
        "",
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {load:.1f} at the start; generated"
        f" by `python benchmarks/feedforward.py` in {time.perf_counter() - start:.0f} s. Peaks: activation bytes"
        " above weights and inputs (storage-counting tracer); LD = tokens x D x 4 B. Time ratios: median over rounds"
        " of (variant / original), each round one untraced forward of every variant back to back.",
        "",
        markdown(families, "Whole forward, bench configs (D = 128, 2 blocks)"),
        "",
        markdown(single, "One FeedForward"),
        "",
    ])
    print(text)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)


if __name__ == "__main__":
    main()
