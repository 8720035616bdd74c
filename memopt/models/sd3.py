"""Stable Diffusion 3."""

from __future__ import annotations

import torch

from ._spec import _TINY_HEADS, FamilySpec, Inputs, Size, _cfg, _check_divisible, _image_tokens, _randn


# ----------------------------------------------------------------------------------------------- SD3
def _sd3_inputs(config, batch, size, text_tokens, dtype, device, generator, masked) -> Inputs:
    """SD3: latents (B, C, H/8, W/8), CLIP+T5 joint states, pooled projections, timestep."""
    _check_divisible("sd3", size, 16)
    return {
        "hidden_states": _randn(generator, batch, _cfg(config, "in_channels"), size.height // 8, size.width // 8,
                                dtype=dtype, device=device),
        "encoder_hidden_states": _randn(generator, batch, text_tokens, _cfg(config, "joint_attention_dim"),
                                        dtype=dtype, device=device),
        "pooled_projections": _randn(generator, batch, _cfg(config, "pooled_projection_dim"), dtype=dtype,
                                     device=device),
        "timestep": torch.full((batch,), 999, dtype=torch.long, device=device),
    }


SPECS: list[FamilySpec] = [
    FamilySpec(
        name="sd3",
        class_name="SD3Transformer2DModel",
        configs={
            "full": {"num_layers": 24, "num_attention_heads": 24, "caption_projection_dim": 1536,
                     "pos_embed_max_size": 192},  # SD3-medium
            "tiny": {**_TINY_HEADS, "sample_size": 16, "in_channels": 4, "out_channels": 4, "num_layers": 2,
                     "joint_attention_dim": 24, "caption_projection_dim": 32, "pooled_projection_dim": 12,
                     "pos_embed_max_size": 16},
        },
        sizes={"default": Size(1024, 1024), "tiny": Size(96, 80)},
        text_tokens=333,
        make_inputs_fn=_sd3_inputs,
        num_tokens_fn=_image_tokens,
        video=False,
    ),
]
