"""LTX-Video and LTX-2."""

from __future__ import annotations

from typing import Any

import torch

from ._spec import _TINY_HEADS, FamilySpec, Inputs, Size, _cfg, _check_divisible, _latent_frames, _randn, _text_mask


# ----------------------------------------------------------------------------------------------- LTX-Video
def _ltx_tokens(config: Any, size: Size) -> int:
    return _latent_frames(size.num_frames, 8) * (size.height // 32) * (size.width // 32)


def _ltx_inputs(config, batch, size, text_tokens, dtype, device, generator, masked) -> Inputs:
    """LTX-Video: packed latents (B, N, 128), T5 states + encoder mask, latent frames/height/width."""
    _check_divisible("ltx", size, 32)
    frames, h, w = _latent_frames(size.num_frames, 8), size.height // 32, size.width // 32
    return {
        "hidden_states": _randn(generator, batch, frames * h * w, _cfg(config, "in_channels"), dtype=dtype,
                                device=device),
        "encoder_hidden_states": _randn(generator, batch, text_tokens, _cfg(config, "caption_channels"),
                                        dtype=dtype, device=device),
        "timestep": torch.full((batch,), 999, dtype=torch.long, device=device),
        "encoder_attention_mask": _text_mask(batch, text_tokens, masked, device),
        "num_frames": frames,
        "height": h,
        "width": w,
    }

# ----------------------------------------------------------------------------------------------- LTX-2
def _ltx2_tokens(config: Any, size: Size) -> int:
    temporal, spatial, _ = _cfg(config, "vae_scale_factors")
    p, pt = _cfg(config, "patch_size"), _cfg(config, "patch_size_t")
    frames = _latent_frames(size.num_frames, temporal) // pt
    return frames * (size.height // spatial // p) * (size.width // spatial // p)


def _ltx2_audio_frames(config: Any, size: Size, frame_rate: float) -> int:
    """Audio latents the pipeline makes for the clip: ``round(seconds x sampling_rate / hop / audio_scale_factor)``
    (25 a second at the released config: 126 for 121 frames at 24 fps)."""
    per_second = _cfg(config, "audio_sampling_rate") / _cfg(config, "audio_hop_length") / _cfg(config,
                                                                                               "audio_scale_factor")
    return round(size.num_frames / frame_rate * per_second)


def _ltx2_inputs(config, batch, size, text_tokens, dtype, device, generator, masked) -> Inputs:
    """LTX-2: packed video latents (B, N, 128) and audio latents (B, L, 128) (8 channels x 16 mel bins) as
    ``pipeline_ltx2`` builds them at 24 fps, the connectors' text states for video and audio (caption-channel wide
    for LTX-2.0, already at the stream widths when ``use_prompt_embeddings=False``, LTX-2.3) with their shared mask,
    timestep (also passed as ``sigma``, as the pipelines do) and the latent sizes the rotary embeddings are made
    from."""
    temporal, spatial, _ = _cfg(config, "vae_scale_factors")
    _check_divisible("ltx2", size, spatial)
    frame_rate = 24.0
    frames, h, w = _latent_frames(size.num_frames, temporal), size.height // spatial, size.width // spatial
    tokens = _ltx2_tokens(config, size)
    audio_frames = _ltx2_audio_frames(config, size, frame_rate)
    if _cfg(config, "use_prompt_embeddings"):
        text_dim = audio_text_dim = _cfg(config, "caption_channels")
    else:
        text_dim = _cfg(config, "num_attention_heads") * _cfg(config, "attention_head_dim")
        audio_text_dim = _cfg(config, "audio_num_attention_heads") * _cfg(config, "audio_attention_head_dim")
    timestep = torch.full((batch,), 999.0, dtype=torch.float32, device=device)
    mask = _text_mask(batch, text_tokens, masked, device)
    return {
        "hidden_states": _randn(generator, batch, tokens, _cfg(config, "in_channels"), dtype=dtype, device=device),
        "audio_hidden_states": _randn(generator, batch, audio_frames, _cfg(config, "audio_in_channels"), dtype=dtype,
                                      device=device),
        "encoder_hidden_states": _randn(generator, batch, text_tokens, text_dim, dtype=dtype, device=device),
        "audio_encoder_hidden_states": _randn(generator, batch, text_tokens, audio_text_dim, dtype=dtype,
                                              device=device),
        "timestep": timestep,
        "sigma": timestep,
        "encoder_attention_mask": mask,
        "audio_encoder_attention_mask": mask,
        "num_frames": frames,
        "height": h,
        "width": w,
        "fps": frame_rate,
        "audio_num_frames": audio_frames,
    }


_TINY_LTX2 = {
    "num_attention_heads": 2, "attention_head_dim": 16, "in_channels": 8, "out_channels": 8,
    "cross_attention_dim": 32, "caption_channels": 24, "num_layers": 2,
    # Audio at half the video width, as released (2048 vs 4096); the a2v / v2a rotary tables are
    # audio_cross_attention_dim wide and split over the video heads, so it equals the audio width.
    "audio_num_attention_heads": 2, "audio_attention_head_dim": 8, "audio_in_channels": 8, "audio_out_channels": 8,
    "audio_cross_attention_dim": 16, "rope_type": "split",
}
# LTX-2.3: gated attention, prompt (cross-attention) AdaLN, per-modality connectors (text states at the stream
# widths), the perturbed (STG) attention processor.
_LTX23 = {"gated_attn": True, "cross_attn_mod": True, "audio_gated_attn": True, "audio_cross_attn_mod": True,
          "use_prompt_embeddings": False, "perturbed_attn": True, "rope_type": "split"}


SPECS: list[FamilySpec] = [
    FamilySpec(
        name="ltx",
        class_name="LTXVideoTransformer3DModel",
        configs={
            "full": {},  # class defaults are LTX-Video 0.9 (2B)
            "tiny": {**_TINY_HEADS, "in_channels": 8, "out_channels": 8, "cross_attention_dim": 32,
                     "num_layers": 2, "caption_channels": 24},
        },
        sizes={"default": Size(512, 704, 161), "tiny": Size(96, 160, 9)},
        text_tokens=128,
        make_inputs_fn=_ltx_inputs,
        num_tokens_fn=_ltx_tokens,
        mask_key="encoder_attention_mask",
    ),
    FamilySpec(
        name="ltx2",
        class_name="LTX2VideoTransformer3DModel",
        configs={
            "full": {"rope_type": "split"},  # LTX-2 (19B): the class defaults but for the split rotary layout
            "2.3": _LTX23,  # LTX-2.3 (22B)
            "tiny": _TINY_LTX2,
            "tiny-2.3": {**_TINY_LTX2, **_LTX23},
        },
        # pipeline_ltx2 defaults: 512 x 768, 121 frames at 24 fps (6144 video tokens, 126 audio tokens)
        sizes={"default": Size(512, 768, 121), "tiny": Size(96, 160, 17)},
        text_tokens=1024,  # the connectors' output length (max_sequence_length)
        make_inputs_fn=_ltx2_inputs,
        num_tokens_fn=_ltx2_tokens,
        mask_key="encoder_attention_mask",
    ),
]
