"""Sana and Sana Video: the FeedForward in channel shards, the linear attention in token chunks, streamed blocks.

Sana's blocks have neither a linear FeedForward nor a softmax self-attention: ``GLUMBConv`` puts a depthwise 3x3
convolution between its projections (Sana Video's ``GLUMBTempConv`` adds a temporal one after them), and the
self-attention is ReLU linear attention, which makes no attention-kernel call. memopt splits the first by intermediate
channels (``apply_chunked_feedforward(split="hidden")``: the depthwise convolution never mixes channels), the second
into token chunks (``apply_chunked_attention(query_chunk=...)``: the key sums first, then the queries), and whole
blocks into streamed bands of rows (``apply_sequence_chunking``, :mod:`memopt.hooks._streamed_blocks`). diffusers has
no FeedForward chunking for these blocks (``enable_forward_chunking`` needs a block ``_chunk_size`` they lack), so the
comparison is with the unmodified model, in the same run.

* **Full size, simulated** (bf16, ``FakeTensorMode``, storage-counting tracer, nothing allocated): Sana 1.6B at
  4096^2 (DC-AE 32x: 16,384 tokens) and Sana Video 2B at 720p x 81 frames (75,600 tokens), the diffusers default
  configs.
* **Real CPU forwards** (fp32): the same classes at D = 256, 2 blocks, about 4,000 tokens: exact peaks, relative
  error against the unmodified model, and time ratios (median over ``--repeats`` rounds of variant / original, each
  round one untraced forward of every variant back to back).

Run::

    python benchmarks/sana.py                 # writes benchmarks/results/sana_cpu.md
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch
from diffusers import SanaTransformer2DModel, SanaVideoTransformer3DModel

from memopt import (
    apply_chunked_attention,
    apply_chunked_feedforward,
    apply_sequence_chunking,
    remove_memory_optimizations,
    simulate,
    trace_memory,
)

RESULTS = Path(__file__).parent / "results" / "sana_cpu.md"
GIB, MIB = 2**30, 2**20
Inputs = Callable[[torch.nn.Module, torch.dtype], dict[str, Any]]


def _image_inputs(side: int, text: int = 300) -> Inputs:
    def make(model: torch.nn.Module, dtype: torch.dtype) -> dict[str, Any]:
        config = model.config
        return dict(hidden_states=torch.randn(1, config.in_channels, side, side, dtype=dtype),
                    encoder_hidden_states=torch.randn(1, text, config.caption_channels, dtype=dtype),
                    timestep=torch.tensor([500]), return_dict=False)
    return make


def _video_inputs(frames: int, height: int, width: int, text: int = 300) -> Inputs:
    def make(model: torch.nn.Module, dtype: torch.dtype) -> dict[str, Any]:
        config = model.config
        return dict(hidden_states=torch.randn(1, config.in_channels, frames, height, width, dtype=dtype),
                    encoder_hidden_states=torch.randn(1, text, config.caption_channels, dtype=dtype),
                    timestep=torch.tensor([500]), return_dict=False)
    return make


# name -> (model class, config, inputs, image/video tokens)
FULL = {
    "Sana 1.6B, 4096^2": (SanaTransformer2DModel, dict(sample_size=128), _image_inputs(128), 128 * 128),
    "Sana Video 2B, 720p x 81f": (SanaVideoTransformer3DModel, {}, _video_inputs(21, 90, 160), 21 * 45 * 80),
}
SMALL_CONFIG = dict(num_layers=2, num_attention_heads=8, attention_head_dim=32, num_cross_attention_heads=8,
                    cross_attention_head_dim=32, cross_attention_dim=256, caption_channels=64, in_channels=8,
                    out_channels=8, qk_norm="rms_norm_across_heads")
SMALL = {
    "Sana, 64 x 63": (SanaTransformer2DModel, dict(SMALL_CONFIG, sample_size=64), _image_inputs(63, 20), 63 * 63),
    "Sana Video, 5 x 48 x 34": (SanaVideoTransformer3DModel, dict(SMALL_CONFIG, rope_max_seq_len=64),
                                _video_inputs(5, 48, 34, 20), 5 * 24 * 17),
}
FEEDFORWARD_SHARDS, ATTENTION_CHUNK = 4, 4096
VARIANTS: dict[str, Callable[[torch.nn.Module, int], None] | None] = {
    "original": None,
    "FeedForward x4": lambda model, chunk: apply_chunked_feedforward(model, num_chunks=FEEDFORWARD_SHARDS),
    "FeedForward x4 + linear attention": lambda model, chunk: (
        apply_chunked_feedforward(model, num_chunks=FEEDFORWARD_SHARDS),
        apply_chunked_attention(model, query_chunk=chunk)),
    "sequence x8 (streamed)": lambda model, chunk: apply_sequence_chunking(model, num_chunks=8),
    "sequence x16 (streamed)": lambda model, chunk: apply_sequence_chunking(model, num_chunks=16),
}


def _width(model: torch.nn.Module) -> int:
    return model.config.num_attention_heads * model.config.attention_head_dim


def full_size_rows() -> list[str]:
    """Simulated bf16 activation peaks of each variant at full size."""
    rows = []
    for name, (cls, config, make_inputs, tokens) in FULL.items():
        cells, width = [], 0
        for variant, apply in VARIANTS.items():
            def prepare(model: torch.nn.Module) -> None:
                nonlocal width
                width = _width(model)
                if apply is not None:
                    apply(model, ATTENTION_CHUNK)

            trace = simulate(lambda: cls(**config), lambda model: make_inputs(model, torch.bfloat16), prepare=prepare,
                             name=variant)
            cells.append(f"{trace.peak_bytes / GIB:.2f} GiB ({trace.peak_bytes / (tokens * width * 2):.1f} LD) at "
                         f"`{trace.peak_module or '<root>'}`")
        rows.append(f"| {name} | {tokens:,} | {width} | " + " | ".join(cells) + " |")
    return rows


def _forward(model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs)[0]


def cpu_rows(repeats: int) -> list[str]:
    """Real fp32 forwards at the small configs: peak, error and time ratio of each variant."""
    rows = []
    for name, (cls, config, make_inputs, tokens) in SMALL.items():
        torch.manual_seed(0)
        model = cls(**config).eval()
        with torch.no_grad():  # every weight random (Sana's default init zeroes some output layers)
            for param in model.parameters():
                param.normal_(0, 0.05)
        inputs = make_inputs(model, torch.float32)
        chunk = -(-tokens // 8)  # eight token chunks at this size
        reference = _forward(model, inputs)
        peaks, errors = {}, {}
        for variant, apply in VARIANTS.items():
            if apply is not None:
                apply(model, chunk)
            with torch.no_grad():
                trace = trace_memory(model, **inputs)
            peaks[variant] = trace.peak_bytes
            out = trace.result[0]
            errors[variant] = ((out - reference).norm() / reference.norm()).item()
            remove_memory_optimizations(model)
        ratios: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
        for _ in range(repeats):
            seconds = {}
            for variant, apply in VARIANTS.items():
                if apply is not None:
                    apply(model, chunk)
                start = time.perf_counter()
                _forward(model, inputs)
                seconds[variant] = time.perf_counter() - start
                remove_memory_optimizations(model)
            for variant in VARIANTS:
                ratios[variant].append(seconds[variant] / seconds["original"])
        ld = tokens * _width(model) * 4
        cells = [f"{peaks[v] / MIB:.1f} MiB ({peaks[v] / ld:.2f} LD), err {errors[v]:.1e}, "
                 f"x{statistics.median(ratios[v]):.2f}" for v in VARIANTS]
        rows.append(f"| {name} | {tokens:,} | {_width(model)} | " + " | ".join(cells) + " |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (one forward of each variant per round)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    start = time.perf_counter()
    header = "| model | tokens | D | " + " | ".join(VARIANTS) + " |"
    rule = "|---" * (3 + len(VARIANTS)) + "|"
    full, cpu = full_size_rows(), cpu_rows(args.repeats)
    load = os.getloadavg()[0]
    lines = [
        "# Sana and Sana Video: convolutional FeedForward shards, chunked linear attention, streamed blocks",
        "",
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {load:.1f} at the end; generated "
        f"by `python benchmarks/sana.py` in {time.perf_counter() - start:.0f} s. Peaks: activation bytes above "
        f"weights and inputs (storage-counting tracer). Variants: FeedForward in {FEEDFORWARD_SHARDS} channel shards "
        "(`apply_chunked_feedforward`), then also the linear self-attention in token chunks "
        f"(`apply_chunked_attention`, {ATTENTION_CHUNK:,} tokens at full size, an eighth of the tokens on the CPU); "
        "and the blocks in 8 or 16 streamed sequence chunks (`apply_sequence_chunking`: bands of whole rows, whole "
        "frames for Sana Video).",
        "",
        "### Full size, simulated (bf16, batch 1; LD = tokens x D x 2 B)",
        "",
        header, rule, *full,
        "",
        "### Real CPU forwards (fp32, batch 1; LD = tokens x D x 4 B): peak, relative error vs the unmodified "
        "model, time / original",
        "",
        header, rule, *cpu,
        "",
    ]
    args.output.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
