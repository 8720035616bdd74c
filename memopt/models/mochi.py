"""Mochi."""

from __future__ import annotations

from typing import Any

import torch

from ._spec import _TINY_HEADS, FamilySpec, Inputs, Size, _cfg, _check_divisible, _latent_frames, _randn, _text_mask


# ----------------------------------------------------------------------------------------------- Mochi
def _mochi_tokens(config: Any, size: Size) -> int:
    p = _cfg(config, "patch_size")
    return _latent_frames(size.num_frames, 6) * (size.height // 8 // p) * (size.width // 8 // p)


def _mochi_inputs(config, batch, size, text_tokens, dtype, device, generator, masked) -> Inputs:
    """Mochi: latents (B, C, F', H/8, W/8), T5 states + encoder mask, timestep."""
    _check_divisible("mochi", size, 16)
    latents = _randn(generator, batch, _cfg(config, "in_channels"), _latent_frames(size.num_frames, 6),
                     size.height // 8, size.width // 8, dtype=dtype, device=device)
    return {
        "hidden_states": latents,
        "encoder_hidden_states": _randn(generator, batch, text_tokens, _cfg(config, "text_embed_dim"), dtype=dtype,
                                        device=device),
        "timestep": torch.full((batch,), 999, dtype=torch.long, device=device),
        "encoder_attention_mask": _text_mask(batch, text_tokens, masked, device),
    }


SPECS: list[FamilySpec] = [
    FamilySpec(
        name="mochi",
        class_name="MochiTransformer3DModel",
        configs={
            "full": {},  # class defaults are Mochi-1 (10B)
            "tiny": {**_TINY_HEADS, "in_channels": 4, "num_layers": 2, "pooled_projection_dim": 16,
                     "text_embed_dim": 24, "time_embed_dim": 16, "max_sequence_length": 8},
        },
        sizes={"default": Size(480, 848, 163), "tiny": Size(48, 80, 13)},
        text_tokens=256,
        make_inputs_fn=_mochi_inputs,
        num_tokens_fn=_mochi_tokens,
        mask_key="encoder_attention_mask",
    ),
]
