"""Compile the fused FeedForward's Triton kernels for NVIDIA GPUs on a machine without one, and report what each runs.

The interpreter tests (``tests/kernels``) check the kernels' arithmetic on the CPU but never compile them, so a tile
that does not fit a GPU's shared memory, spills registers or misses the tensor cores would first show on a user's GPU.
This script compiles them as a GPU would, without one: it swaps Triton's active driver for an offline one that names
an architecture and its shared-memory limit, and runs the real host loop (``fused_ffn_forward``) on CPU tensors with
each autotuner launch turned into compilations. Every autotuning configuration is compiled through Triton's own JIT
specialization (pointer alignment, unit strides) to PTX and a cubin by the ``ptxas`` that ships with Triton, and
marked with whether the pruner (``_prune_configs``) keeps it there. Nothing is launched; no output is computed.

Per compiled kernel the table gives: registers per thread and spilled bytes (``ptxas -v`` with Triton's flags),
shared memory as compiled, as the pruner predicts it and the architecture's opt-in limit (the check a GPU makes when
the kernel loads), and the tensor-core instructions and asynchronous copies of its main loop (``wgmma`` on Hopper,
``tcgen05`` on data-centre Blackwell, ``mma.sync`` elsewhere; ``cp.async`` for the software pipeline).

Usage::

    python benchmarks/kernel_codegen.py --out benchmarks/results   # every architecture and case, ~30 min on 2 cores
    python benchmarks/kernel_codegen.py --arch sm_90 --case "Wan2.1-14B default"

Writes ``ffn_kernel_codegen.md`` and the same rows as ``ffn_kernel_codegen.json``. Exits 1 when the pruner's rules
disagree with the compiler (see :meth:`CompiledKernel.problems`), 2 under ``TRITON_INTERPRET=1`` (the kernels would
be interpreted, not compiled).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@dataclasses.dataclass(frozen=True)
class Architecture:
    """An NVIDIA compute capability and the shared memory one block may use there (the opt-in maximum)."""

    name: str
    capability: int
    max_shared_bytes: int
    gpus: str

    @property
    def target(self):
        """Triton's name for the architecture (what its driver reports for such a GPU)."""
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", self.capability, 32)

    @property
    def supported(self) -> bool:
        """Whether ``fused_ffn_available`` runs the kernel there; rows of the others are reported, not checked."""
        from memopt.kernels.chunked_ffn import MIN_CUDA_CAPABILITY

        return divmod(self.capability, 10) >= MIN_CUDA_CAPABILITY


ARCHITECTURES = [
    Architecture("sm_75", 75, 64 * 1024, "T4, RTX 20xx"),
    Architecture("sm_80", 80, 163 * 1024, "A100, A800"),
    Architecture("sm_86", 86, 99 * 1024, "RTX 30xx, A6000, A10"),
    Architecture("sm_89", 89, 99 * 1024, "RTX 40xx, L4, L40S"),
    Architecture("sm_90", 90, 227 * 1024, "H100, H200"),
    Architecture("sm_100", 100, 227 * 1024, "B200, GB200"),
    Architecture("sm_120", 120, 99 * 1024, "RTX 50xx"),
]


@dataclasses.dataclass(frozen=True)
class Case:
    """One call of the fused FeedForward: shapes, activation, dtype and how many hidden chunks the plan cuts.

    ``hidden_chunks > 1`` exercises the down kernel's accumulating variant (``LOAD_ACC``; for 16-bit outputs the fp32
    accumulator). Rows are one token block, so each kernel is specialised once.
    """

    name: str
    dim: int
    hidden: int
    activation: str
    dtype: torch.dtype
    hidden_chunks: int = 1
    rows: int = 2048

    def runs_on(self, arch: Architecture) -> bool:
        """Whether to compile this case for ``arch``: no bf16 before sm_80 (no bf16 tensor cores), and on the
        architectures the kernel does not run on only the fast path, which is enough to show why."""
        if not arch.supported:
            return self.fast_path and self.dtype != torch.bfloat16
        return True

    @property
    def fast_path(self) -> bool:
        """16-bit with every width a multiple of 16 elements, as in every diffusers model: Triton then vectorises and
        pipelines the loads, so its kernels should neither spill nor differ from the pruner's shared-memory model.
        Odd widths and fp32 (no tensor cores without TF32) are correct but slow paths, reported only."""
        chunk = -(-self.hidden // self.hidden_chunks)
        return self.dtype != torch.float32 and all(width % 16 == 0 for width in (self.dim, self.hidden, chunk))


CASES = [
    Case("Wan2.1-14B default", 5120, 13824, "gelu_tanh", torch.bfloat16),
    Case("Wan2.1-14B F/8 chunks", 5120, 13824, "gelu_tanh", torch.bfloat16, hidden_chunks=8),
    Case("SwiGLU D3072 F8192 F/4 chunks", 3072, 8192, "swiglu", torch.bfloat16, hidden_chunks=4),
    Case("CogVideoX-2b fp16 F/2 chunks", 1920, 7680, "gelu_tanh", torch.float16, hidden_chunks=2),
    Case("fp16 odd 1000x2731 F/2 chunks", 1000, 2731, "gelu", torch.float16, hidden_chunks=2, rows=127),
    Case("fp32 GEGLU 1536x8960 F/2 chunks", 1536, 8960, "geglu", torch.float32, hidden_chunks=2),
]

SPILL_ALLOWANCE_BYTES = 8
"""Spilled bytes tolerated in a kept fast-path kernel: a register or two saved around the activation's epilogue
(ptxas does this for the 256 x 128 up tile on sm_90). An accumulator that does not fit spills 100+ bytes."""


AT_REGISTER_LIMIT = 250
"""Registers per thread (of the 255 a thread can address) from which a kernel that does not spill is at the limit: the
pruner may drop it (sm_100's 256 x 128 down tile storing fp32, 253 registers, beside the 128 x 256 one that spills)."""


@dataclasses.dataclass
class CompiledKernel:
    """What one compiled kernel configuration asks of the GPU, and what the pruner predicted for it."""

    arch: str
    case: str
    checked: bool
    fast_path: bool
    kernel: str
    variant: str
    tile: str
    num_warps: int
    num_stages: int
    kept: bool
    shared_bytes: int
    predicted_shared_bytes: int
    max_shared_bytes: int
    registers: int
    spill_stores: int
    spill_loads: int
    tensor_core_ops: str
    async_copies: int

    @property
    def fits(self) -> bool:
        return self.shared_bytes <= self.max_shared_bytes

    @property
    def spilled_bytes(self) -> int:
        return max(self.spill_stores, self.spill_loads)

    def problems(self) -> list[str]:
        """Where the pruner's verdict disagrees with the compiler's (empty when they agree, and on architectures where
        the kernel does not run). On the fast path the pruner must keep exactly the tiles that fit and do not spill."""
        if not self.checked:
            return []
        found = []
        if self.kept and not self.fits:
            found.append("kept but over the shared memory limit")
        if self.predicted_shared_bytes < self.shared_bytes:
            found.append("pruner predicts less shared memory than the compiler")
        if self.fast_path and self.predicted_shared_bytes != self.shared_bytes:
            found.append("pruner's shared memory differs from the compiler's")
        spills = self.spilled_bytes > SPILL_ALLOWANCE_BYTES
        if self.fast_path and self.kept and spills:
            found.append("kept but spills registers")
        if self.fast_path and not self.kept and self.fits and not spills and self.registers < AT_REGISTER_LIMIT:
            found.append("dropped but fits without spilling")
        return found


class OfflineDriver:
    """Stands in for Triton's CUDA driver: names the target architecture and its limits; launches nothing."""

    def __init__(self, arch: Architecture) -> None:
        self.target = arch.target
        max_shared = arch.max_shared_bytes

        class Utils:
            @staticmethod
            def get_device_properties(index: int) -> dict[str, int]:
                return {"max_shared_mem": max_shared}

        self.utils = Utils()

    def get_current_device(self) -> int:
        return self.target.arch  # one JIT cache per architecture

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self):
        return self.target


def autotune_key(kernel, args: tuple, kwargs: dict) -> tuple:
    """The key under which ``triton.autotune`` caches its choice for a call (as ``Autotuner.run`` builds it): the
    values of its ``key`` arguments and the dtypes of the tensor arguments. Calls with equal keys share one pruning."""
    named = {name: value for name, value in {**dict(zip(kernel.arg_names, args)), **kwargs}.items()
             if name in kernel.arg_names}
    values = [named[name] for name in kernel.keys if name in named]
    return tuple(values + [str(value.dtype) for value in named.values() if hasattr(value, "dtype")])


def _compile_instead_of_launch(kernel, compiled: list[tuple[object, bool]]):
    """A replacement for ``kernel.run`` (an autotuner) that compiles every config of the call instead of timing the
    pruned ones, marking those the pruner keeps for the call's autotuning key (computed at the key's first call, as
    the autotuner does, and reused for later calls with the same key)."""
    kept_by_key: dict[tuple, list] = {}

    def compile_only(*args, grid, warmup=False, **kwargs):
        key = autotune_key(kernel, args, kwargs)
        if key not in kept_by_key:
            kernel.nargs = dict(zip(kernel.arg_names, args))  # what Autotuner.run sets before pruning
            kept_by_key[key] = kernel.prune_configs(kwargs)
            kernel.nargs = None
        for config in kernel.configs:
            binary = kernel.fn.warmup(*args, grid=grid, **kwargs, **config.all_kwargs())
            compiled.append((binary, config in kept_by_key[key]))

    return compile_only


@contextlib.contextmanager
def compiling_for(arch: Architecture, kernels) -> Iterator[list[tuple[object, bool]]]:
    """Within the block, Triton targets ``arch`` and each launch of ``kernels`` compiles instead of running.

    Yields the list that ``(compiled kernel, kept by the pruner)`` pairs are appended to. Every configuration of the
    autotuner is compiled, the ones its pruner drops too, so the pruner's rules can be checked against the compiler;
    the kept ones are what the first real launch would compile and time.
    """
    from triton.runtime import driver

    compiled: list[tuple[object, bool]] = []
    saved_driver = driver._active
    driver.set_active(OfflineDriver(arch))
    for kernel in kernels:
        kernel.run = _compile_instead_of_launch(kernel, compiled)
    try:
        yield compiled
    finally:
        for kernel in kernels:
            del kernel.run
        driver._active = saved_driver


def ptxas_report(ptx: str, capability: int) -> tuple[int, int, int]:
    """(registers, spill-store bytes, spill-load bytes) from ``ptxas -v``, with the flags Triton compiles with."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "kernel.ptx"
        source.write_text(ptx)
        command = [get_ptxas(capability).path, "-v", "--regAllocOptLevel=2", "-lineinfo",
                   f"--gpu-name={sm_arch_from_capability(capability)}", str(source), "-o", str(source) + ".o"]
        log = subprocess.run(command, capture_output=True, text=True, check=True).stderr
    registers = int(re.search(r"Used (\d+) registers", log).group(1))
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    stores, loads = int(spills.group(1)), int(spills.group(2))
    return registers, stores, loads


def describe(binary, kept: bool, arch: Architecture, case: Case) -> CompiledKernel:
    """Read one compiled kernel: its configuration from the source's constants, its resources from ptxas, and the
    pruner's shared-memory prediction for it."""
    import triton

    from memopt.kernels import fused_ffn

    names = binary.src.fn.arg_names
    constants = {names[path[0]]: value for path, value in binary.src.constants.items()}
    config = triton.Config({name: constants[name] for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K")},
                           num_warps=binary.metadata.num_warps, num_stages=binary.metadata.num_stages)
    element_size = case.dtype.itemsize
    num_weight_tiles = 2 if constants.get("GATED") else 1
    predicted = fused_ffn.shared_memory_bytes(config, num_weight_tiles, element_size, arch.target)
    ptx = binary.asm["ptx"]
    registers, stores, loads = ptxas_report(ptx, arch.capability)
    tensor_core = {f"{'wgmma' if op != 'mma' else 'mma.sync'} {shape}"
                   for op, shape in re.findall(r"\b(wgmma\.mma_async|mma)\.sync\.aligned\.(\w+)", ptx)}
    tensor_core |= {f"tcgen05 {kind}" for kind in re.findall(r"\btcgen05\.mma\.cta_group::\d\.kind::(\w+)", ptx)}
    tensor_core_ops = ", ".join(sorted(tensor_core)) or "none (FMA)"
    return CompiledKernel(
        arch=arch.name,
        case=case.name,
        checked=arch.supported,
        fast_path=case.fast_path,
        kernel=binary.metadata.name.removeprefix("_ffn_").removesuffix("_kernel"),
        variant=", ".join(name for name in ("GATED", "LOAD_ACC") if constants.get(name)) or "-",
        tile="x".join(str(constants[name]) for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K")),
        num_warps=binary.metadata.num_warps,
        num_stages=binary.metadata.num_stages,
        kept=kept,
        shared_bytes=binary.metadata.shared,
        predicted_shared_bytes=predicted,
        max_shared_bytes=arch.max_shared_bytes,
        registers=registers,
        spill_stores=stores,
        spill_loads=loads,
        tensor_core_ops=tensor_core_ops,
        async_copies=len(re.findall(r"\bcp\.async\.(?:ca|cg)\b", ptx)),
    )


def compile_case(arch: Architecture, case: Case) -> list[CompiledKernel]:
    """Compile every kernel configuration ``fused_ffn_forward`` would autotune for ``case`` on ``arch``."""
    from memopt.kernels import fused_ffn

    gated = case.activation in fused_ffn.GATED_ACTIVATIONS
    generator = torch.Generator().manual_seed(0)

    def tensor(*shape: int) -> torch.Tensor:
        return torch.empty(shape, dtype=case.dtype).uniform_(-1, 1, generator=generator)

    x = tensor(case.rows, case.dim)
    w1, b1 = tensor(case.hidden * (2 if gated else 1), case.dim), tensor(case.hidden * (2 if gated else 1))
    w2, b2 = tensor(case.dim, case.hidden), tensor(case.dim)
    chunk_size = -(-case.hidden // case.hidden_chunks)
    kernels = (fused_ffn._ffn_up_kernel, fused_ffn._ffn_down_kernel)
    with compiling_for(arch, kernels) as compiled:
        fused_ffn.fused_ffn_forward(x, w1, b1, w2, b2, case.activation, chunk_size, rows_per_block=case.rows)
    unique: dict[str, tuple[object, bool]] = {}  # later hidden chunks reuse the first chunk's kernels
    for binary, kept in compiled:
        unique[binary.hash] = (binary, kept or unique.get(binary.hash, (None, False))[1])
    return [describe(binary, kept, arch, case) for binary, kept in unique.values()]


def format_table(rows: list[CompiledKernel]) -> str:
    header = ("| arch | case | kernel | variant | tile (MxNxK) | warps | stages | pruner | shared KiB: compiled / "
              "predicted / limit | registers | spilled bytes | tensor-core ops | cp.async | problems |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for row in rows:
        shared = (f"{row.shared_bytes / 1024:g} / {row.predicted_shared_bytes / 1024:g} / "
                  f"{row.max_shared_bytes // 1024}")
        lines.append(
            f"| {row.arch} | {row.case} | {row.kernel} | {row.variant} | {row.tile} | {row.num_warps} | "
            f"{row.num_stages} | {'kept' if row.kept else 'dropped'} | {shared} | {row.registers} | "
            f"{row.spilled_bytes or ''} | {row.tensor_core_ops} | {row.async_copies} | {'; '.join(row.problems())} |"
        )
    return "\n".join(lines)


def environment() -> str:
    import triton
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = subprocess.run([get_ptxas(90).path, "--version"], capture_output=True, text=True).stdout.strip()
    return (f"compiled offline (no GPU) with triton {triton.__version__}, torch {torch.__version__}; "
            f"ptxas: {ptxas.splitlines()[-1]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "benchmarks/results"))
    parser.add_argument("--arch", nargs="+", default=[arch.name for arch in ARCHITECTURES],
                        choices=[arch.name for arch in ARCHITECTURES])
    parser.add_argument("--case", nargs="+", default=[case.name for case in CASES],
                        choices=[case.name for case in CASES])
    parser.add_argument("--update", action="store_true",
                        help="keep the other architectures' rows of the ffn_kernel_codegen.json already in --out")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("benchmarks/kernel_codegen.py compiles the kernels; unset TRITON_INTERPRET")
        return 2
    rows = read_results(args.out / "ffn_kernel_codegen.json", exclude=args.arch) if args.update else []
    for arch in ARCHITECTURES:
        if arch.name not in args.arch:
            continue
        for case in CASES:
            if case.name in args.case and case.runs_on(arch):
                rows.extend(compile_case(arch, case))
                print(format_table([row for row in rows if row.arch == arch.name and row.case == case.name]),
                      flush=True)
    return write_results(args.out, rows)


def read_results(path: Path, exclude: list[str]) -> list[CompiledKernel]:
    """The rows of an earlier run's JSON, but those of the architectures in ``exclude`` (compiled anew)."""
    names = [field.name for field in dataclasses.fields(CompiledKernel)]
    records = json.loads(path.read_text())["kernels"]
    return [CompiledKernel(**{name: record[name] for name in names}) for record in records
            if record["arch"] not in exclude]


def write_results(out: Path, rows: list[CompiledKernel]) -> int:
    """Write the table (``ffn_kernel_codegen.md``) and its rows (``.json``) to ``out``, architectures in
    :data:`ARCHITECTURES` order; 1 when a row has problems, else 0."""
    order = [arch.name for arch in ARCHITECTURES]
    rows = sorted(rows, key=lambda row: order.index(row.arch))  # stable: cases and kernels keep their order
    archs = {row.arch for row in rows}
    env = environment()
    failures = [row for row in rows if row.problems()]
    markdown = [
        "# Fused FeedForward kernels compiled for NVIDIA GPUs, offline",
        "",
        env + ".",
        "",
        "Every autotuning configuration of each kernel for each architecture, compiled through the real host loop "
        "and Triton's JIT specialization; nothing launched. `pruner`: whether `_prune_configs` keeps the config "
        "there (only kept ones are timed by the autotuner). Shared memory: the compiler's figure, the pruner's "
        "prediction (`shared_memory_bytes`) and the architecture's opt-in limit per block. Registers and spilled "
        "bytes: `ptxas -v` with Triton's flags. Fast path: 16-bit with widths that are multiples of 16 (every "
        "diffusers model); there the pruner must keep exactly the configs that fit and do not spill (more than "
        f"{SPILL_ALLOWANCE_BYTES} bytes), and its shared memory must equal the compiler's figure; elsewhere it must "
        "not be below it. Architectures the kernel does not run on are reported, not checked.",
        "",
        "| arch | GPUs | shared memory limit | fused kernel |",
        "|---|---|---|---|",
        *(f"| {arch.name} | {arch.gpus} | {arch.max_shared_bytes // 1024} KiB | "
          f"{'runs' if arch.supported else 'refused (`MIN_CUDA_CAPABILITY`): no tensor cores'} |"
          for arch in ARCHITECTURES if arch.name in archs),
        "",
        format_table(rows),
        "",
        f"{len(rows)} kernels compiled, {sum(row.kept for row in rows)} of them kept by the pruner; "
        f"{len(failures)} with problems.",
        "",
        "Regenerate with `python benchmarks/kernel_codegen.py --out benchmarks/results` (no GPU needed; `--arch sm_100 "
        "--update` recompiles one architecture and keeps the others' rows).",
    ]
    out.mkdir(parents=True, exist_ok=True)
    (out / "ffn_kernel_codegen.md").write_text("\n".join(markdown) + "\n")
    records = [{**dataclasses.asdict(row), "fits": row.fits, "problems": row.problems()} for row in rows]
    (out / "ffn_kernel_codegen.json").write_text(json.dumps({"environment": env, "kernels": records}, indent=1))
    print(f"wrote {out / 'ffn_kernel_codegen.md'}; {len(rows)} kernels, {len(failures)} failing")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
