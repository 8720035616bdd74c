"""The kernels compile for real GPUs, checked without one: ``benchmarks/kernel_codegen.py`` on three architectures.

The interpreter tests next to this file check the arithmetic; this one compiles every autotuning configuration of both
kernels for a consumer GPU (sm_86, ~99 KB of shared memory, ``mma.sync``), an H100 (sm_90, 227 KB, ``wgmma``) and a
B200 (sm_100, 227 KB, ``tcgen05`` with the accumulator in tensor memory) with the ``ptxas`` shipped in Triton's wheel, through the real host loop, and checks the autotuner's pruner against the
compiler. The script runs in a subprocess without ``TRITON_INTERPRET`` (this directory's fixture sets it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "kernel_codegen.py"
CASES = ("Wan2.1-14B default", "SwiGLU D3072 F8192 F/4 chunks")
ARCHS = ("sm_86", "sm_90", "sm_100")
TENSOR_CORE_INSTRUCTION = {"sm_86": "mma.sync", "sm_90": "wgmma", "sm_100": "tcgen05"}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> list[dict]:
    pytest.importorskip("triton.backends.nvidia.compiler", reason="Triton without its NVIDIA backend")
    out = tmp_path_factory.mktemp("codegen")
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--arch", *ARCHS, "--case", *CASES, "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=1200,
    )  # fmt: skip
    assert result.returncode in (0, 1), result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads((out / "ffn_kernel_codegen.json").read_text())["kernels"]


def test_the_pruner_agrees_with_the_compiler(compiled):
    """The pruner keeps exactly the tiles that fit the GPU's shared memory and do not spill, and predicts the
    compiler's shared memory to the byte."""
    assert {(row["arch"], row["case"]) for row in compiled} == {(arch, case) for arch in ARCHS for case in CASES}
    problems = [(row["arch"], row["kernel"], row["variant"], row["tile"], row["num_stages"], row["problems"])
                for row in compiled if row["problems"]]
    assert problems == []
    assert any(not row["kept"] and not row["fits"] for row in compiled)  # both reasons to drop occur here
    assert any(not row["kept"] and row["fits"] and row["spill_stores"] > 64 for row in compiled)


def test_what_is_kept_runs_on_tensor_cores_with_pipelined_loads(compiled):
    """wgmma on the H100, tcgen05 on the B200, mma.sync on the consumer GPU, and cp.async copies in every kept kernel
    of both variants of both kernels."""
    variants = {(row["kernel"], row["variant"]) for row in compiled}
    assert variants == {("up", "-"), ("up", "GATED"), ("down", "-"), ("down", "LOAD_ACC")}
    for row in compiled:
        if row["kept"]:
            instruction = TENSOR_CORE_INSTRUCTION[row["arch"]]
            assert row["tensor_core_ops"].startswith(instruction) and row["async_copies"] > 0, row
    for arch in ARCHS:
        assert {(row["kernel"], row["variant"]) for row in compiled if row["arch"] == arch and row["kept"]} == variants


def test_consumer_gpus_keep_the_128_x_128_tile(compiled):
    """mma.sync pipelines keep num_stages - 1 shared buffers: the 4-stage 128 x 128 x 64 tile takes 96 KiB and fits
    a ~99 KiB GPU (the earlier rule counted 128 KiB and left those GPUs two small tiles)."""
    rows = [row for row in compiled if row["arch"] == "sm_86" and row["tile"] == "128x128x64" and row["variant"] == "-"]
    assert rows and all(row["kept"] and row["shared_bytes"] == 96 * 1024 for row in rows)


def test_two_fp32_tiles_of_128_x_256_are_dropped_because_they_spill(compiled):
    """The accumulating down-kernel loads its fp32 accumulator beside the product: at 128 x 256 (8 warps) that is 256
    registers a thread and ptxas spills (16-336 bytes); the pruner drops those tiles. It kept them before, and the
    autotuner's key lacked ``LOAD_ACC``, so the middle hidden chunks ran whatever the first chunk's timing chose."""
    rows = [row for row in compiled if row["variant"] == "LOAD_ACC" and row["tile"] in ("128x256x64", "256x128x64")]
    assert rows and all(not row["kept"] for row in rows)
    assert all(row["spill_stores"] > 8 for row in rows if row["fits"])  # kernel_codegen.SPILL_ALLOWANCE_BYTES


def test_blackwell_barriers_and_fp32_stores(compiled):
    """On sm_100 the kernels keep an 8-byte mbarrier pair per accumulator in shared memory (16 bytes, 32 in the gated
    kernel; the pruner counts them), and the down kernel storing its first hidden chunk as fp32 spills the 128 x 256
    tile at 8 warps (36 bytes), which the pruner drops; the same tile writing bf16 (one hidden chunk) is kept."""
    rows = [row for row in compiled if row["arch"] == "sm_100"]
    for row in rows:
        tiles = 2 if row["variant"] == "GATED" else 1
        assert row["shared_bytes"] % 1024 == 16 * tiles, row
    fp32_store = [row for row in rows if row["kernel"] == "down" and row["variant"] == "-"
                  and row["case"].endswith("chunks") and row["tile"] == "128x256x64"]
    assert fp32_store and all(not row["kept"] and row["spill_stores"] > 8 for row in fp32_store)
    bf16_store = [row for row in rows if row["kernel"] == "down" and row["case"] == "Wan2.1-14B default"
                  and row["tile"] == "128x256x64"]
    assert bf16_store and all(row["kept"] and row["spill_stores"] == 0 for row in bf16_store)
