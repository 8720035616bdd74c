"""The work counter (memopt.trace.work): exact FLOP, tile and byte counts, and what it shows of sequence chunking."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from memopt import apply_sequence_chunking, remove_memory_optimizations, trace_memory
from memopt.hooks import sequence
from memopt.models import Size, get_family
from memopt.trace.work import H100_BF16, Roofline, Work, WorkCounter, count_work


def test_counts_matmul_attention_and_memory_bound_ops_exactly():
    linear = torch.nn.Linear(100, 300)
    x = torch.randn(2, 130, 100)
    work = count_work(lambda: F.gelu(linear(x)))
    # addmm over 260 rows: 2 x 260 x 100 x 300 FLOPs; tiled, rows and columns up to 384; gelu reads and writes 260 x 300
    assert work == Work(matmul_flops=2 * 260 * 100 * 300, matmul_tiled_flops=2 * 384 * 100 * 384,
                        memory_bytes=2 * 260 * 300 * 4, kernels=2)
    q = torch.randn(2, 3, 130, 16)
    work = count_work(lambda: F.scaled_dot_product_attention(q, q, q))
    assert (work.attention_flops, work.attention_tiled_flops) == (2 * 6 * 130 * 130 * 32, 2 * 6 * 256 * 256 * 32)
    assert work.memory_bytes == 0 and work.kernels == 1


def test_views_cost_nothing_and_a_broadcast_table_is_read_once():
    x = torch.randn(64, 32)
    table = torch.randn(32)
    work = count_work(lambda: (x.view(32, 64).t().reshape(64, 32) * table.expand(64, 32)))
    assert work.kernels == 1 and work.memory_bytes == (64 * 32 + 32 + 64 * 32) * 4


def test_runs_under_fake_tensors():
    with FakeTensorMode():
        linear = torch.nn.Linear(5120, 5120, dtype=torch.bfloat16)
        x = torch.empty(75_600, 5120, dtype=torch.bfloat16)
        with torch.no_grad(), WorkCounter() as counter:
            linear(x)
    assert counter.work.matmul_flops == 2 * 75_600 * 5120 * 5120


def test_work_per_module_includes_submodules_and_survives_exceptions():
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8))
    x = torch.randn(4, 8)
    with torch.no_grad(), WorkCounter(root=model) as counter:
        model(x)
        try:
            model[1](torch.ones(2))
            raise KeyError("stop")
        except KeyError:
            pass
        model[2](torch.randn(3, 16))  # after the exception, attributed to "2" alone, not to "1"
    assert counter.by_module["0"].matmul_flops == 2 * 4 * 8 * 16
    assert counter.by_module["1"] == Work(memory_bytes=2 * 4 * 16 * 4 + 2 * 2 * 4, kernels=2)
    assert counter.by_module["2"].matmul_flops == 2 * 4 * 16 * 8 + 2 * 3 * 16 * 8
    assert counter.by_module[""].kernels == 3 and counter.work.kernels == 3 + 1 + 1 + 2  # + ones, randn outside


def test_roofline_overlaps_launches_with_kernels():
    device = Roofline("test", matmul_flops_per_s=1e12, attention_flops_per_s=1e12, memory_bytes_per_s=1e9,
                      launch_s=1e-3)
    kernel_bound = Work(matmul_tiled_flops=10**12, memory_bytes=10**9, kernels=10)
    assert kernel_bound.seconds(device) == 2.0
    assert Work(memory_bytes=10**6, kernels=100).seconds(device) == 0.1  # launch-bound
    assert H100_BF16.matmul_flops_per_s > 0


def test_aligned_chunks_do_the_tile_work_of_the_unchunked_forward():
    """Sequence chunking does the FLOPs of the unmodified forward; with chunk boundaries on tile multiples it also
    wastes no more tiles than that forward, where unaligned chunks leave a part-empty tile at every chunk."""
    spec = get_family("wan")
    model = spec.build("tiny")
    inputs = spec.make_inputs(model.config, batch_size=1, height=320, width=448, num_frames=5)  # 1,120 tokens
    unmodified = count_work(lambda: model(**inputs), tile=16)
    chunked = {}
    for align in (1, 16):
        apply_sequence_chunking(model, 6, align=align)  # 186-187 tokens a chunk; aligned, 176 or 192
        chunked[align] = count_work(lambda: model(**inputs), tile=16)
        remove_memory_optimizations(model)
    for work in chunked.values():
        assert work.attention_flops == unmodified.attention_flops
        assert work.kernels > unmodified.kernels and work.memory_bytes > unmodified.memory_bytes
    assert chunked[16].attention_tiled_flops == unmodified.attention_tiled_flops
    assert chunked[1].attention_tiled_flops > unmodified.attention_tiled_flops
    assert chunked[16].matmul_tiled_flops < chunked[1].matmul_tiled_flops


@pytest.mark.parametrize("family, attention, size", [
    ("wan", "blocks.0.attn1", (320, 448, 5)),
    ("hunyuanvideo", "transformer_blocks.0.attn", (320, 448, 5)),
    ("flux", "transformer_blocks.0.attn", (320, 448, 1)),
    ("ltx", "transformer_blocks.0.attn1", (640, 896, 9)),
])
def test_the_rotary_embedding_of_unused_projections_is_left_undone(family, attention, size, monkeypatch):
    """The two-pass schedule skips Q in the collection pass and K/V in the final one. With stand-ins that take no
    work (Wan's empty batch, ``JointAttention.empty_stand_ins``; the others' unread stand-ins, ``memopt.hooks._unread``,
    here with their threshold lowered to this size) the attention module moves what the unmodified one does plus the
    K/V it gathers (copy_ reads the chunk and the buffer and writes the buffer: 3 x (K + V) = 6 units; HunyuanVideo's
    text tokens add a little, Wan re-reads its rotary tables). Below the threshold, dense zero stand-ins go through
    the shared ``apply_rotary_emb`` of HunyuanVideo, Flux and LTX: 35-39 units. The activation peak (tracer) is the
    same with either stand-in, under half the unmodified one's (Wan 2.1x lower, the others 2.7-3.0x)."""
    spec = get_family(family)
    model = spec.build("tiny")
    inputs = spec.make_inputs(model.config, batch_size=2, height=size[0], width=size[1], num_frames=size[2])
    unit = 2 * spec.num_tokens(model.config, Size(*size)) * spec.hidden_size(model.config) * 4  # K of batch 2, fp32

    def attention_bytes() -> int:
        with torch.no_grad(), WorkCounter(root=model) as counter:
            model(**inputs)
        return counter.by_module[attention].memory_bytes

    unmodified = attention_bytes()
    with torch.no_grad():
        unmodified_peak = trace_memory(model, **inputs).peak_bytes
    extra, peak, default = {}, {}, sequence.UNREAD_FROM
    for unread_from in (default, 0):
        monkeypatch.setattr(sequence, "UNREAD_FROM", unread_from)
        apply_sequence_chunking(model, 6)
        extra[unread_from] = attention_bytes() - unmodified
        with torch.no_grad():
            peak[unread_from] = trace_memory(model, **inputs).peak_bytes
        remove_memory_optimizations(model)
    assert peak[0] == peak[default] < unmodified_peak / 2
    assert 6 * unit <= extra[0] <= (7.5 if family == "wan" else 6.5) * unit
    if family == "wan":
        assert extra[default] == extra[0]  # empty stand-ins either way
    else:
        assert extra[default] > 30 * unit
