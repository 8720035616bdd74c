"""MiniMax-H3."""

from __future__ import annotations

from typing import Any

import torch

from ._spec import FamilySpec, Inputs, Size, _cfg, _check_divisible, _randn


# ----------------------------------------------------------------------------------------------- MiniMax-H3
# The modular pipeline's constants (diffusers/modular_pipelines/minimax_h3/modular_pipeline.py): the video VAE
# compresses 16x spatially and encodes 17 n + 5 frames to 5 n + 2 latent frames; the audio VAE makes 40 latents a
# second of a 24 fps clip, stereo, packed channel-major (one row per channel and latent); modality tags.
_MINIMAX_SPATIAL = 16
_MINIMAX_FPS = 24
_MINIMAX_AUDIO_LATENTS_PER_SECOND = 40
_MINIMAX_AUDIO_CHANNELS = 2
_MINIMAX_VIDEO_TAG, _MINIMAX_TEXT_TAG, _MINIMAX_AUDIO_TAG = 0, 1, 2


def _minimax_latent_frames(num_frames: int) -> int:
    """``video_latent_num_frames``: 5 n + 2 latent frames for 17 n + 5 frames (the pipeline rounds up to that form)."""
    return (num_frames - 5) // 17 * 5 + 2


def _minimax_streams(config: Any, size: Size, text_tokens: int) -> tuple[int, int, int]:
    """``(text rows, audio rows, video rows)`` of the packed sequence."""
    _, ph, pw = _cfg(config, "patch_size")
    video = _minimax_latent_frames(size.num_frames) * (size.height // _MINIMAX_SPATIAL // ph) * (
        size.width // _MINIMAX_SPATIAL // pw)
    audio = round(size.num_frames / _MINIMAX_FPS * _MINIMAX_AUDIO_LATENTS_PER_SECOND) * _MINIMAX_AUDIO_CHANNELS
    return text_tokens, audio, video


def _minimax_h3_tokens(config: Any, size: Size) -> int:
    """The audio + video rows of the packed sequence the blocks run over (the prompt's rows come on top, as text
    tokens do for the joint-attention families)."""
    return sum(_minimax_streams(config, size, 0))


def _minimax_h3_inputs(config, batch, size, text_tokens, dtype, device, generator, masked) -> Inputs:
    """MiniMax-H3 text-to-video+audio (``t2va``), as the modular pipeline's ``MiniMaxH3PrepareLayoutStep`` packs it:
    one sequence ``[text | audio | video]``; patchified video latents (B, N_video, 24 x 1 x 2 x 2), stereo audio
    latents packed channel-major (B, 2 x L_audio, 32), Qwen3-VL hidden states (B, S_text, 5120) (no padding, so no
    mask), and the layout's structural tensors: per-row modality tags, ``(t, h, w)`` rotary coordinates (fp64, as the
    pipeline builds them), row indices of each modality, and ``MiniMaxH3SetTimestepsStep``'s distinct timesteps
    (sorted: audio 0.8, video 0.9; the text rows take the video's) with each row's index into them. Built from
    ``arange`` / ``full`` only (no ``torch.unique``), so it also runs under ``FakeTensorMode``."""
    _check_divisible("minimax_h3", size, _MINIMAX_SPATIAL * _cfg(config, "patch_size")[2])
    text, audio, video = _minimax_streams(config, size, text_tokens)
    _, ph, pw = _cfg(config, "patch_size")
    frames, rows, columns = (_minimax_latent_frames(size.num_frames), size.height // _MINIMAX_SPATIAL // ph,
                             size.width // _MINIMAX_SPATIAL // pw)
    latents = audio // _MINIMAX_AUDIO_CHANNELS
    length = text + audio + video
    f64 = dict(dtype=torch.float64, device=device)
    # Text rows on the time axis at their index; audio and video rows continue the time axis from there. Audio rows
    # have no height and sit at the two extremes of the width grid, one per channel.
    position_ids = torch.cat([
        torch.stack([torch.arange(text, **f64), torch.zeros(text, **f64), torch.zeros(text, **f64)], dim=-1),
        torch.stack([(text + torch.arange(latents, **f64)).repeat(_MINIMAX_AUDIO_CHANNELS), torch.zeros(audio, **f64),
                     torch.cat([torch.zeros(latents, **f64), torch.full((audio - latents,), columns - 1.0, **f64)])],
                    dim=-1),
        torch.stack(torch.meshgrid(text + torch.arange(frames, **f64), torch.arange(rows, **f64),
                                   torch.arange(columns, **f64), indexing="ij"), dim=-1).reshape(video, 3),
    ])
    long = dict(dtype=torch.long, device=device)
    token_tags = torch.cat([torch.full((text,), _MINIMAX_TEXT_TAG, **long), torch.full((audio,), _MINIMAX_AUDIO_TAG,
                            **long), torch.full((video,), _MINIMAX_VIDEO_TAG, **long)])
    timestep_indices = torch.cat([torch.ones(text, **long), torch.zeros(audio, **long), torch.ones(video, **long)])
    return {
        "hidden_states": _randn(generator, batch, video, _cfg(config, "in_channels") * ph * pw, dtype=dtype,
                                device=device),
        "audio_hidden_states": _randn(generator, batch, audio, _cfg(config, "audio_in_channels"), dtype=dtype,
                                      device=device),
        "encoder_hidden_states": _randn(generator, batch, text, _cfg(config, "text_dim"), dtype=dtype, device=device),
        "timestep": torch.tensor([0.8, 0.9], dtype=torch.float32, device=device),
        "timestep_indices": timestep_indices,
        "token_tags": token_tags,
        "position_ids": position_ids,
        "video_indices": torch.arange(text + audio, length, **long),
        "audio_indices": torch.arange(text, text + audio, **long),
        "text_indices": torch.arange(text, **long),
    }


_MINIMAX_TEXT_TOKENS = 256  # a prompt in the Qwen3-VL chat template (the pipeline does not pad it)

_TINY_MINIMAX_H3 = {
    "num_attention_heads": 2, "attention_head_dim": 16, "hidden_size": 32, "num_layers": 2, "num_refiner_layers": 1,
    "ffn_dim": 80, "in_channels": 4, "audio_in_channels": 8, "text_dim": 24, "freq_dim": 16,
    "time_embed_hidden_dim": 32, "time_embed_dim": 16, "rope_freq_dim": 2,  # 2 x 3 x 2 = 12 rotated of 16 channels
}


SPECS: list[FamilySpec] = [
    FamilySpec(
        name="minimax_h3",
        class_name="MiniMaxH3Transformer3DModel",
        configs={
            "full": {},  # class defaults: the released MiniMax-H3 (50 blocks, hidden 5376, 56 x 128 heads)
            "tiny": _TINY_MINIMAX_H3,
        },
        # The pipeline's defaults: 124 frames (5.2 s at 24 fps) on its 16:9 canvas, 768 x 1344 (37 296 video rows,
        # 414 audio rows, plus the prompt's).
        sizes={"default": Size(768, 1344, 124), "tiny": Size(96, 96, 22)},
        text_tokens=_MINIMAX_TEXT_TOKENS,
        make_inputs_fn=_minimax_h3_inputs,
        num_tokens_fn=_minimax_h3_tokens,
        width_keys=("hidden_size",),  # the residual stream; heads x head_dim (7168) is wider
    ),
]
