"""Kandinsky 5 and Kandinsky 6 (video + audio)."""

from __future__ import annotations

import math
from typing import Any

import torch

from ._spec import FamilySpec, Inputs, Size, _cfg, _check_divisible, _latent_frames, _randn, _text_mask


# ----------------------------------------------------------------------------------------------- Kandinsky 5 and 6
def _kandinsky_tokens(config: Any, size: Size) -> int:
    """Video tokens (Kandinsky 6's audio tokens come on top, in their own stream)."""
    pt, ph, pw = _cfg(config, "patch_size")
    return _latent_frames(size.num_frames, 4) // pt * (size.height // 8 // ph) * (size.width // 8 // pw)


def _kandinsky5_scale_factor(size: Size) -> tuple[float, float, float]:
    """The rotary position scale ``Kandinsky5T2VPipeline._get_scale_factor`` picks (the T2I pipeline passes 1s)."""
    if size.num_frames == 1:
        return (1.0, 1.0, 1.0)
    return (1, 2, 2) if 480 <= size.height <= 854 and 480 <= size.width <= 854 else (1, 3.16, 3.16)


def _kandinsky_latents(config: Any, batch: int, size: Size, dtype, device, generator) -> torch.Tensor:
    """Channels-last latents ``(B, F', H/8, W/8, C)``; ``visual_cond`` models take ``[latents | condition latents |
    mask]`` (2C + 1 channels)."""
    frames, height, width = _latent_frames(size.num_frames, 4), size.height // 8, size.width // 8
    channels = _cfg(config, "in_visual_dim")
    if _cfg(config, "visual_cond"):
        channels = 2 * channels + 1
    return _randn(generator, batch, frames, height, width, channels, dtype=dtype, device=device)


def _kandinsky5_inputs(config, batch, size, text_tokens, dtype, device, generator, masked) -> Inputs:
    """Kandinsky 5: channels-last latents (B, F', H/8, W/8, C) (``visual_cond`` models concatenate the condition latents
    and a 1-channel mask: 2C + 1), Qwen2.5-VL text states padded to the longest prompt (no mask: the pipelines pass
    none), CLIP pooled states, one float timestep per sample, the rotary positions of the latent grid and text tokens
    and the pipeline's rotary scale. ``sparse_params`` stays ``None`` (the dense ``attention_type="regular"`` path)."""
    _check_divisible("kandinsky5", size, 16)
    pt, ph, pw = _cfg(config, "patch_size")
    frames, height, width = _latent_frames(size.num_frames, 4), size.height // 8, size.width // 8
    return {
        "hidden_states": _kandinsky_latents(config, batch, size, dtype, device, generator),
        "encoder_hidden_states": _randn(generator, batch, text_tokens, _cfg(config, "in_text_dim"), dtype=dtype,
                                        device=device),
        "timestep": torch.full((batch,), 999.0, dtype=dtype, device=device),
        "pooled_projections": _randn(generator, batch, _cfg(config, "in_text_dim2"), dtype=dtype, device=device),
        "visual_rope_pos": [torch.arange(n, device=device) for n in (frames // pt, height // ph, width // pw)],
        "text_rope_pos": torch.arange(text_tokens, device=device),
        "scale_factor": _kandinsky5_scale_factor(size),
        "sparse_params": None,
    }


def _reset_zero_init(model: torch.nn.Module) -> None:
    """Kandinsky5Modulation zero-initialises its linear (shift = scale = gate = 0: every block is the identity until
    trained weights load), so random-weight models would test nothing: give it the default nn.Linear init."""
    for module in model.modules():
        if type(module).__name__ == "Kandinsky5Modulation":
            module.out_layer.reset_parameters()


def _kandinsky6_audio_tokens(size: Size, frame_rate: float = 24.0) -> int:
    """Audio latents ``Kandinsky6TI2VAPipeline`` makes for the clip: ``ceil(frames / fps x 44100 / 1024)`` (the audio
    VAE's sample rate and latent hop length), frames counted back from the latent frames."""
    frames = (_latent_frames(size.num_frames, 4) - 1) * 4 + 1
    return math.ceil(frames / frame_rate * 44_100 / 1024)


def _kandinsky6_inputs(config, batch, size, text_tokens, dtype, device, generator, masked) -> Inputs:
    """Kandinsky 6 text-to-video-and-audio, as ``Kandinsky6TI2VAPipeline`` calls the transformer (``sample_audio=True``,
    its default): channels-last video latents ``[latents | condition latents | mask]`` (2C + 1 channels with
    ``visual_cond``), audio latents (B, L, in_audio_dim) for the clip's length at 24 fps, Qwen2.5-VL text states with
    their boolean padding mask (the pipeline passes ``None`` when no prompt is padded), CLIP pooled states, one float
    timestep per sample. ``visual_rope_pos`` / ``visual_token_type_ids`` stay ``None`` (text-to-video: no appended
    reference frame)."""
    _check_divisible("kandinsky6", size, 16)
    return {
        "hidden_states": _kandinsky_latents(config, batch, size, dtype, device, generator),
        "audio_hidden_states": _randn(generator, batch, _kandinsky6_audio_tokens(size), _cfg(config, "in_audio_dim"),
                                      dtype=dtype, device=device),
        "encoder_hidden_states": _randn(generator, batch, text_tokens, _cfg(config, "in_text_dim"), dtype=dtype,
                                        device=device),
        "pooled_projections": _randn(generator, batch, _cfg(config, "in_text_dim2"), dtype=dtype, device=device),
        "timestep": torch.full((batch,), 999.0, dtype=dtype, device=device),
        "encoder_attention_mask": _text_mask(batch, text_tokens, masked, device).bool(),
    }


# The released checkpoints' four architecture flags (the class docstring: "Released checkpoints set
# text_token_padding, ca_rope, cross_gates, and fix_modulation to True").
_RELEASED = {"text_token_padding": True, "ca_rope": True, "cross_gates": True, "fix_modulation": True}

SPECS: list[FamilySpec] = [
    FamilySpec(
        name="kandinsky5",
        class_name="Kandinsky5Transformer3DModel",
        configs={
            # Kandinsky-5.0-T2V-Lite-sft-5s-Diffusers (2B): 32 visual blocks of width 1792 (28 heads x 64), 2
            # text blocks, HunyuanVideo VAE latents (16 channels) with the visual-conditioning channels.
            "full": {"in_visual_dim": 16, "out_visual_dim": 16, "model_dim": 1792, "ff_dim": 7168,
                     "visual_cond": True},
            "tiny": {"in_visual_dim": 4, "out_visual_dim": 4, "in_text_dim": 24, "in_text_dim2": 20,
                     "time_dim": 16, "model_dim": 32, "ff_dim": 80, "num_text_blocks": 1, "num_visual_blocks": 2,
                     "axes_dims": (4, 4, 8), "visual_cond": True},  # 2 heads x 16
        },
        # Kandinsky5T2VPipeline's default: 512 x 768, 121 frames (5 s at 24 fps).
        sizes={"default": Size(512, 768, 121), "tiny": Size(48, 80, 5)},
        extra_sizes={"10s": Size(512, 768, 241)},
        text_tokens=256,
        make_inputs_fn=_kandinsky5_inputs,
        num_tokens_fn=_kandinsky_tokens,
        width_keys=("model_dim",),
        init_fn=_reset_zero_init,
    ),
    FamilySpec(
        name="kandinsky6",
        class_name="Kandinsky6Transformer3DModel",
        configs={
            # Kandinsky 6 Pro: the class defaults (60 fused video/audio blocks of width 4096 = 32 heads x 128, 4 text
            # blocks per modality, audio branch at the video's widths) with the four flags the class docstring says
            # the released checkpoints set; the checkpoint's own config.json was not available to compare.
            "full": dict(_RELEASED),
            # 2 heads x 16 in both branches (rope axes summing to 16), one text block per modality, two fused blocks.
            "tiny": {"in_visual_dim": 4, "out_visual_dim": 4, "in_text_dim": 24, "in_text_dim2": 20,
                     "time_dim": 16, "model_dim": 32, "ff_dim": 80, "num_text_blocks": 1, "num_visual_blocks": 2,
                     "axes_dims": (4, 4, 8), "in_audio_dim": 6, "out_audio_dim": 6, **_RELEASED},
        },
        # Kandinsky6TI2VAPipeline's default: 512 x 768, 121 frames (5 s at 24 fps, 218 audio latents).
        sizes={"default": Size(512, 768, 121), "tiny": Size(48, 80, 5)},
        text_tokens=256,
        make_inputs_fn=_kandinsky6_inputs,
        num_tokens_fn=_kandinsky_tokens,
        mask_key="encoder_attention_mask",
        width_keys=("model_dim",),
    ),
]
