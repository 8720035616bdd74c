"""CogVideoX and CogView4."""

from __future__ import annotations

import math
from typing import Any

import torch

from ._spec import _TINY_HEADS, FamilySpec, Inputs, Size, _cfg, _check_divisible, _latent_frames, _randn


# ----------------------------------------------------------------------------------------------- CogVideoX
def _cogvideox_tokens(config: Any, size: Size) -> int:
    p, pt = _cfg(config, "patch_size"), _cfg(config, "patch_size_t") or 1
    frames = _latent_frames(size.num_frames, 4)
    return math.ceil(frames / pt) * (size.height // 8 // p) * (size.width // 8 // p)


def _cogvideox_inputs(config, batch, size, text_tokens, dtype, device, generator, masked) -> Inputs:
    """CogVideoX: latents (B, F', C, H/8, W/8) (frames before channels), T5 states, timestep."""
    _check_divisible("cogvideox", size, 16)
    latents = _randn(generator, batch, _latent_frames(size.num_frames, 4), _cfg(config, "in_channels"),
                     size.height // 8, size.width // 8, dtype=dtype, device=device)
    return {
        "hidden_states": latents,
        "encoder_hidden_states": _randn(generator, batch, text_tokens, _cfg(config, "text_embed_dim"), dtype=dtype,
                                        device=device),
        "timestep": torch.full((batch,), 999, dtype=torch.long, device=device),
    }

# ----------------------------------------------------------------------------------------------- CogView4
def _cogview4_tokens(config: Any, size: Size) -> int:
    patch = _cfg(config, "patch_size")
    return (size.height // 8 // patch) * (size.width // 8 // patch)


def _cogview4_inputs(config, batch, size, text_tokens, dtype, device, generator, masked) -> Inputs:
    """CogView4: latents (B, C, H/8, W/8), GLM-4 states, timestep and the SDXL-style size conditions.

    ``CogView4Pipeline`` passes ``original_size`` / ``target_size`` ``(B, 2)`` = ``(height, width)`` and
    ``crop_coords`` ``(B, 2)`` = ``(0, 0)`` in the prompt's dtype, a float timestep in ``[1, 1000]``, and **no**
    ``attention_mask``: it left-pads the prompt with pad tokens to a multiple of 16 and lets them attend. The forward
    also takes an optional ``(B, S_text)`` text mask (1 = token, 0 = padding), which its processor turns into the
    additive 0/1 mask ``m[q] * m[k] > 0`` (image tokens count as 1). As no pipeline passes it, ``masked`` is ignored
    here (``mask_key`` is ``None``); sequence chunking refuses that mask (it depends on the query position).
    """
    _check_divisible("cogview4", size, 8 * _cfg(config, "patch_size"))
    sizes = torch.tensor([[size.height, size.width]], dtype=dtype, device=device).repeat(batch, 1)
    return {
        "hidden_states": _randn(generator, batch, _cfg(config, "in_channels"), size.height // 8, size.width // 8,
                                dtype=dtype, device=device),
        "encoder_hidden_states": _randn(generator, batch, text_tokens, _cfg(config, "text_embed_dim"), dtype=dtype,
                                        device=device),
        "timestep": torch.full((batch,), 999.0, dtype=torch.float32, device=device),
        "original_size": sizes,
        "target_size": sizes.clone(),
        "crop_coords": torch.zeros(batch, 2, dtype=dtype, device=device),
    }


SPECS: list[FamilySpec] = [
    FamilySpec(
        name="cogvideox",
        class_name="CogVideoXTransformer3DModel",
        configs={
            "full": {},  # class defaults are CogVideoX-2B
            "5b": {"num_attention_heads": 48, "num_layers": 42, "use_rotary_positional_embeddings": False},
            "tiny": {**_TINY_HEADS, "in_channels": 4, "out_channels": 4, "time_embed_dim": 16, "text_embed_dim": 24,
                     "num_layers": 2, "sample_width": 10, "sample_height": 6, "sample_frames": 5,
                     "max_text_seq_length": 8},
        },
        sizes={"default": Size(480, 720, 49), "tiny": Size(48, 80, 5)},
        text_tokens=226,
        make_inputs_fn=_cogvideox_inputs,
        num_tokens_fn=_cogvideox_tokens,
    ),
    FamilySpec(
        name="cogview4",
        class_name="CogView4Transformer2DModel",
        configs={
            # THUDM/CogView4-6B transformer/config.json (the class defaults are a 64 x 40, 30-layer variant).
            "full": {"num_attention_heads": 32, "attention_head_dim": 128, "num_layers": 28},
            "tiny": {**_TINY_HEADS, "in_channels": 4, "out_channels": 4, "num_layers": 2, "text_embed_dim": 24,
                     "time_embed_dim": 16, "condition_dim": 8},
        },
        sizes={"default": Size(1024, 1024), "tiny": Size(96, 80)},
        text_tokens=224,  # the pipeline pads the prompt to a multiple of 16; 224 is its documented default
        make_inputs_fn=_cogview4_inputs,
        num_tokens_fn=_cogview4_tokens,
        video=False,
    ),
]
