"""Timestep tables per token at full size, simulated: the activation peak with and without memopt's deferred tables.

Wan2.2 TI2V (image-to-video: the conditioning frame's tokens at timestep 0, the rest at the step's) and LTX-Video
(frame conditioning) call their transformer with one timestep per token. The conditioning embedder then makes
``(B, S, 6 D)`` and ``(B, S, D)`` tables that live through every block (7 LD in the model's dtype), and the output head
modulates each token with its own shift and scale. memopt's plans defer both tables and the head's use of them
(``memopt.hooks._deferred_tokens``): each chunk's rows are gathered from the tables of the distinct timesteps.
SkyReels-V2's diffusion forcing gives one timestep per latent frame; its embedder makes per-frame tables and the model
forward repeats them over each frame's tokens into the same ``(B, 6, S, D)`` and ``(B, S, D)`` tables, an expansion
deferred with them (``DeferredGroups``). Helios and ERNIE-Image get one timestep per sample, but their forwards expand
the per-sample tables over the tokens and materialise them (Helios concatenates the history tokens' zero-timestep
tables with the window's, ERNIE-Image makes its six tables contiguous): deferred from the expansion on
(``BroadcastTable``).

Per model and chunk count, bf16 under FakeTensorMode (2 blocks: the peak is per block), the activation peak of:

* ``unmodified``: diffusers' forward;
* ``tables made whole``: the family plan without the timestep producers (memopt before them: the blocks chunked,
  the tables whole; the output head run on the whole sequence where the model modulates it per token);
* ``memopt``: the family plan.

Run::

    python benchmarks/per_token_timesteps.py        # -> results/per_token_timesteps.md
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

import torch

from memopt import apply_sequence_chunking
from memopt.models import Size, get_family
from memopt.plans.sequence import SEQUENCE_PLANS, TokenProducer
from memopt.trace import simulate

RESULTS = Path(__file__).parent / "results"

WAN22_TI2V_5B = {"patch_size": (1, 2, 2), "num_attention_heads": 24, "attention_head_dim": 128, "in_channels": 48,
                 "out_channels": 48, "ffn_dim": 14336, "num_layers": 2}
"""Wan2.2-TI2V-5B's released config (30 blocks; 2 simulated)."""

DIFFUSION_FORCING = None
"""Instead of a clean frame's token count: SkyReels-V2's diffusion-forcing call, one timestep per latent frame."""

PER_SAMPLE = "per sample"
"""Instead of a clean frame's token count: the family's own call, one timestep per sample (the model expands it)."""

MODELS = {
    # Wan's family inputs assume Wan2.1's 8x VAE; TI2V's 16x VAE turns 704x1280 into the latents of 352x640 there.
    "Wan2.2-TI2V-5B 704x1280x121": ("wan", WAN22_TI2V_5B, Size(352, 640, 121), 704 // 16 * 1280 // 16 // 4),
    "LTX-Video 0.9 (2B) 512x768x121": ("ltx", {"num_layers": 2}, Size(512, 768, 121), 512 // 32 * 768 // 32),
    "LTX-2 (19B) 512x768x121": ("ltx2", {"num_layers": 2}, Size(512, 768, 121), 512 // 32 * 768 // 32),
    "SkyReels-V2-DF-14B 544x960x97 (per frame)": ("skyreels_v2", {"num_layers": 2}, Size(544, 960, 97),
                                                  DIFFUSION_FORCING),
    "Helios (14B) 384x640x33, 3 history terms": ("helios", {"num_layers": 2}, Size(384, 640, 33), PER_SAMPLE),
    "ERNIE-Image 1024x1024": ("ernie_image", {"num_layers": 2}, Size(1024, 1024), PER_SAMPLE),
}
"""label -> (family, config over the family's full one, size, tokens of the clean conditioning frame,
:data:`DIFFUSION_FORCING` or :data:`PER_SAMPLE`)."""


def per_token_inputs(family: str, size: Size, clean_tokens: int | str | None) -> Any:
    spec = get_family(family)

    def make(model: torch.nn.Module) -> dict[str, Any]:
        inputs = spec.make_inputs(model.config, batch_size=1, height=size.height, width=size.width,
                                  num_frames=size.num_frames, dtype=torch.bfloat16)
        if clean_tokens == PER_SAMPLE:
            return inputs
        if clean_tokens is DIFFUSION_FORCING:  # the frames' noise levels fall from the first frame on
            frames = inputs["hidden_states"].shape[2]
            return {**inputs, "timestep": torch.linspace(999, 0, frames).long()[None],
                    "enable_diffusion_forcing": True}
        timesteps = torch.full((1, spec.num_tokens(model.config, size)), 999.0)
        timesteps[:, :clean_tokens] = 0
        audio = {"audio_timestep": inputs["timestep"]} if "audio_hidden_states" in inputs else {}  # one per sample
        return {**inputs, **audio, "timestep": timesteps}

    return make


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-chunks", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--output", type=Path, default=RESULTS / "per_token_timesteps.md")
    args = parser.parse_args()
    lines = ["| model | tokens | chunks | unmodified | tables made whole | memopt |", "|---|---|---|---|---|---|"]
    for label, (family, overrides, size, clean_tokens) in MODELS.items():
        spec = get_family(family)
        config = {**spec.config("full"), **overrides}
        build = lambda: spec.build(config)  # noqa: E731  (called under the fake mode: nothing is allocated)
        inputs = per_token_inputs(family, size, clean_tokens)
        plan = SEQUENCE_PLANS[spec.class_name]
        whole = dataclasses.replace(plan, producers={path: producer for path, producer in plan.producers.items()
                                                     if isinstance(producer, TokenProducer)})  # rotary tables
        unmodified = simulate(build, inputs)
        with torch.device("meta"):
            tokens = spec.num_tokens(spec.model_class(**config).config, size)
        ld = tokens * spec.hidden_size(config) * 2

        def cell(trace: Any) -> str:
            return f"{trace.peak_bytes / 2**30:.2f} GiB ({trace.peak_bytes / ld:.1f} LD)"

        for chunks in args.num_chunks:
            before = simulate(build, inputs, prepare=lambda m: apply_sequence_chunking(m, chunks, plan=whole,
                                                                                        inplace=True))
            after = simulate(build, inputs, prepare=lambda m: apply_sequence_chunking(m, chunks))
            lines.append(f"| {label} | {tokens:,} | {chunks} | {cell(unmodified)} | {cell(before)} | "
                         f"**{cell(after)}** |")
            print(lines[-1], flush=True)
    args.output.write_text(
        "# Timestep tables per token at full size (simulated, bf16, activation peak; 2 blocks)\n\n"
        f"torch {torch.__version__}; `python benchmarks/per_token_timesteps.py`. "
        "LD = tokens x hidden width x 2 bytes.\n"
        "Timesteps: the first latent frame's tokens at 0 (the conditioning image), the rest at 999; SkyReels-V2's "
        "diffusion forcing: one per latent frame, from 999 down to 0; Helios and ERNIE-Image: one per sample (their "
        "forwards expand the tables over the tokens).\n\n"
        + "\n".join(lines) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
