"""Wan VACE at full size, simulated: the activation peak with its VACE blocks run as called and held until used.

Wan VACE runs every VACE block before the main blocks and keeps each block's hint, a full ``(B, S, D)`` tensor, until
the main block it is added after: 8 hints for Wan2.1-VACE-14B, 15 for the 1.3B model, all alive through the main
blocks. With ``BlockPlan.runs_when_used`` (memopt's VACE plan) each VACE block runs when its hint is first used, so one
hint and one control state exist at a time (``memopt.hooks._held_blocks``).

Per model, bf16 under FakeTensorMode, the activation peak of:

* ``unmodified``: diffusers' forward;
* ``VACE blocks run as called``: the family plan without ``runs_when_used`` (memopt before it);
* ``memopt``: the family plan.

The VACE layers are placed on the first main blocks, one main block after them (the peak is the same as with the
releases' placement: after the VACE loop every hint is alive until its main block runs), so that a simulation runs a
few blocks instead of 40.

Run::

    python benchmarks/vace_hints.py        # -> results/vace_hints.md
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

import torch

from memopt import apply_sequence_chunking
from memopt.models import Size, get_family
from memopt.plans.sequence import SEQUENCE_PLANS
from memopt.trace import simulate_family

RESULTS = Path(__file__).parent / "results"

MODELS = {
    "Wan2.1-VACE-14B 480x832x81": ("full", 8, Size(480, 832, 81)),
    "Wan2.1-VACE-14B 720x1280x81": ("full", 8, Size(720, 1280, 81)),
    "Wan2.1-VACE-1.3B 480x832x81": ("1.3b", 15, Size(480, 832, 81)),
}
"""label -> (config of the family, its number of VACE layers, size)."""


def run_as_called() -> Any:
    """Wan VACE's plan without ``runs_when_used``."""
    plan = SEQUENCE_PLANS["WanVACETransformer3DModel"]
    vace = dataclasses.replace(plan.blocks["vace_blocks.*"], runs_when_used=False)
    return dataclasses.replace(plan, blocks={**plan.blocks, "vace_blocks.*": vace})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-chunks", type=int, default=32)
    parser.add_argument("--output", type=Path, default=RESULTS / "vace_hints.md")
    args = parser.parse_args()
    spec = get_family("wan_vace")
    eager = run_as_called()
    lines = ["| model | tokens | hints | unmodified | VACE blocks run as called | memopt |",
             "|---|---|---|---|---|---|"]
    for label, (config_name, hints, size) in MODELS.items():
        config = {**spec.config(config_name), "num_layers": hints + 1, "vace_layers": list(range(hints))}
        variants = {
            "unmodified": None,
            "as called": lambda m: apply_sequence_chunking(m, args.num_chunks, plan=eager, inplace=True),
            "memopt": lambda m: apply_sequence_chunking(m, args.num_chunks),
        }
        cells = []
        for prepare in variants.values():
            trace = simulate_family(spec, config=config, size=size, prepare=prepare)
            cells.append(f"{trace.peak_bytes / 2**30:.2f} GiB ({trace.peak_bytes / trace.meta['ld_bytes']:.1f} LD)")
        tokens = trace.meta["tokens"]
        lines.append(f"| {label} | {tokens:,} | {hints} | {cells[0]} | {cells[1]} | **{cells[2]}** |")
        print(lines[-1], flush=True)
    args.output.write_text(
        f"# Wan VACE hints at full size (simulated, bf16, activation peak; {args.num_chunks} chunks)\n\n"
        f"torch {torch.__version__}; `python benchmarks/vace_hints.py`. LD = tokens x hidden width x 2 bytes. The VACE "
        "layers on the first main blocks, one main block after them.\n\n" + "\n".join(lines) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
