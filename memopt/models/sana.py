"""Sana (image, DC-AE 32x latents) and Sana Video (Wan 2.1 VAE latents): linear attention and a convolutional
FeedForward, chunked by memopt's streamed blocks rather than a sequence plan (:mod:`memopt.hooks._streamed_blocks`)."""

from __future__ import annotations

import math
from typing import Any

from ._spec import FamilySpec, Inputs, Size, _caption_inputs, _cfg, _check_divisible, _latent_frames, _randn

# Sana's tiny configs: width 32 (2 heads x 16), RMS-normed queries and keys (Sana 1.5 and Sana Video), cross-attention
# to 24-wide captions projected to the width.
_TINY = {"num_attention_heads": 2, "attention_head_dim": 16, "num_cross_attention_heads": 2,
         "cross_attention_head_dim": 16, "cross_attention_dim": 32, "caption_channels": 24, "num_layers": 2,
         "qk_norm": "rms_norm_across_heads"}


def _sana_inputs(config, batch, size, text_tokens, dtype, device, generator, masked) -> Inputs:
    """Sana: DC-AE latents (B, 32, H/32, W/32), Gemma-2 states (2304 wide) and their mask, a timestep per sample."""
    _check_divisible("sana", size, 32 * _cfg(config, "patch_size"))
    return {
        "hidden_states": _randn(generator, batch, _cfg(config, "in_channels"), size.height // 32, size.width // 32,
                                dtype=dtype, device=device),
        **_caption_inputs(config, batch, text_tokens, dtype, device, generator, masked),
    }


def _sana_tokens(config: Any, size: Size) -> int:
    p = _cfg(config, "patch_size")
    return (size.height // 32 // p) * (size.width // 32 // p)


def _video_inputs(config, batch, size, text_tokens, dtype, device, generator, masked) -> Inputs:
    """Sana Video: Wan 2.1 VAE latents (B, 16, (F - 1) / 4 + 1, H/8, W/8), Gemma-2 states and their mask."""
    _check_divisible("sana_video", size, 8 * _cfg(config, "patch_size")[-1])
    return {
        "hidden_states": _randn(generator, batch, _cfg(config, "in_channels"), _latent_frames(size.num_frames, 4),
                                size.height // 8, size.width // 8, dtype=dtype, device=device),
        **_caption_inputs(config, batch, text_tokens, dtype, device, generator, masked),
    }


def _video_tokens(config: Any, size: Size) -> int:
    p_t, p_h, p_w = _cfg(config, "patch_size")
    return math.ceil(_latent_frames(size.num_frames, 4) / p_t) * (size.height // 8 // p_h) * (size.width // 8 // p_w)


SPECS = [
    FamilySpec(
        name="sana",
        class_name="SanaTransformer2DModel",
        configs={
            # Efficient-Large-Model/Sana_1600M_1024px_diffusers transformer/config.json: the class defaults (1.6B: 20
            # blocks, 70 x 32 = 2240 wide, Gemma-2 captions of 2304, DC-AE 32x latents of 32 channels).
            "full": {},
            # Sana_1600M_4Kpx_BF16_diffusers: the same blocks at 128 x 128 latents (4096 px).
            "4k": {"sample_size": 128},
            "tiny": {**_TINY, "in_channels": 4, "out_channels": 4, "sample_size": 8},
        },
        sizes={"default": Size(1024, 1024), "tiny": Size(288, 224)},
        extra_sizes={"4k": Size(4096, 4096)},
        text_tokens=300,  # SanaPipeline's max_sequence_length
        make_inputs_fn=_sana_inputs,
        num_tokens_fn=_sana_tokens,
        video=False,
        mask_key="encoder_attention_mask",
    ),
    FamilySpec(
        name="sana_video",
        class_name="SanaVideoTransformer3DModel",
        configs={
            # Efficient-Large-Model/SANA-Video_2B_480p_diffusers transformer/config.json: the class defaults (2B: 20
            # blocks, 20 x 112 = 2240 wide, patch 1 x 2 x 2 over Wan 2.1 VAE latents of 16 channels).
            "full": {},
            "tiny": {**_TINY, "in_channels": 4, "out_channels": 4, "sample_size": 8, "rope_max_seq_len": 32},
        },
        sizes={"default": Size(480, 832, 81), "tiny": Size(48, 80, 9)},
        extra_sizes={"720p": Size(720, 1280, 81)},
        text_tokens=300,  # SanaVideoPipeline's max_sequence_length
        make_inputs_fn=_video_inputs,
        num_tokens_fn=_video_tokens,
        mask_key="encoder_attention_mask",
    ),
]
