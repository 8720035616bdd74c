"""Wan2.1 / 2.2 and the families built on its blocks: Wan VACE, ChronoEdit, SkyReels-V2, Helios, Wan Animate."""

from __future__ import annotations

import math
from typing import Any

import torch

from ._spec import (
    _TINY_HEADS,
    FamilySpec,
    Inputs,
    Size,
    _cfg,
    _cfg_or,
    _check_divisible,
    _is_tiny,
    _latent_frames,
    _randn,
)


# ----------------------------------------------------------------------------------------------- Wan
def _wan_tokens(config: Any, size: Size) -> int:
    pt, ph, pw = _cfg(config, "patch_size")
    return _latent_frames(size.num_frames, 4) // pt * (size.height // 8 // ph) * (size.width // 8 // pw)


def _wan_inputs(config, batch, size, text_tokens, dtype, device, generator, masked) -> Inputs:
    """Wan and its derivatives (ChronoEdit, SkyReels-V2's plain call): latents (B, C, F', H/8, W/8) (image-conditioned
    models concatenate the condition latents on C), umT5 text states, one integer timestep per sample, and for models
    with an image encoder (``image_dim``: Wan I2V, ChronoEdit) its CLIP states: 257 tokens at full size, 5 at tiny
    configs."""
    _check_divisible("wan", size, 16)
    latents = _randn(generator, batch, _cfg(config, "in_channels"), _latent_frames(size.num_frames, 4),
                     size.height // 8, size.width // 8, dtype=dtype, device=device)
    inputs = {
        "hidden_states": latents,
        "timestep": torch.full((batch,), 999, dtype=torch.long, device=device),
        "encoder_hidden_states": _randn(generator, batch, text_tokens, _cfg(config, "text_dim"), dtype=dtype,
                                        device=device),
    }
    image_dim = _cfg_or(config, "image_dim", None)
    if image_dim:
        image_tokens = 5 if _is_tiny(config) else 257
        inputs["encoder_hidden_states_image"] = _randn(generator, batch, image_tokens, image_dim, dtype=dtype,
                                                       device=device)
    if _cfg_or(config, "inject_sample_info", False):  # SkyReels-V2 DF-1.3B: fps 1 stands for 24 fps, as its pipelines
        inputs["fps"] = [1] * batch
    return inputs

# ----------------------------------------------------------------------------------------------- Wan VACE
def _wan_vace_inputs(config, batch, size, text_tokens, dtype, device, generator, masked) -> Inputs:
    """Wan VACE: Wan's latents (B, C, F', H/8, W/8), umT5 states and integer timestep, plus the VACE context latents
    ``control_hidden_states`` at the same latent size (as ``WanVACEPipeline`` without reference images) and
    ``control_hidden_states_scale``, one per VACE layer (not all 1 here, so that a scale applied to the wrong hint
    shows)."""
    inputs = _wan_inputs(config, batch, size, text_tokens, dtype, device, generator, masked)
    num_vace = len(_cfg(config, "vace_layers"))
    return {
        **inputs,
        "control_hidden_states": _randn(generator, batch, _cfg(config, "vace_in_channels"),
                                        *inputs["hidden_states"].shape[2:], dtype=dtype, device=device),
        "control_hidden_states_scale": torch.linspace(1.0, 0.5, num_vace, dtype=torch.float32).to(device, dtype),
    }

# ----------------------------------------------------------------------------------------------- Wan Animate
# WanAnimatePipeline calls the denoiser per segment (segment_frame_length=77 frames, 20 latent frames) with: the noisy
# latents concatenated with the reference/condition latents on C (2 x 16 + 4 = 36 channels) and the reference image's
# latent frame in front (T + 1 frames); the pose video latents (16 channels, T frames, added to the patch embedding of
# frames 1..T); the face video in pixels (B, 3, 77, 512, 512), which the motion and face encoders turn into T + 1
# frames of face tokens (the first zero: the reference frame's); umT5 states and the CLIP states of the reference image.
def _wan_animate_tokens(config: Any, size: Size) -> int:
    pt, ph, pw = _cfg(config, "patch_size")
    frames = _latent_frames(size.num_frames, 4) + 1  # the reference image's latent frame in front
    return frames // pt * (size.height // 8 // ph) * (size.width // 8 // pw)


def _wan_animate_inputs(config, batch, size, text_tokens, dtype, device, generator, masked) -> Inputs:
    """Wan Animate's segment call: latents (B, 2C + 4, T + 1, H/8, W/8), pose latents (B, C, T, H/8, W/8), the face
    video (B, 3, num_frames, S, S) in [-1, 1] at the motion encoder's size S (num_frames = 4T - 3 pixel frames: the
    face encoder's two stride-2 convolutions give T frames, plus the zero one in front), umT5 states, integer timestep
    and the CLIP states of the reference image (257 tokens, 5 at tiny configs)."""
    _check_divisible("wan_animate", size, 16)
    if (size.num_frames - 1) % 4:
        raise ValueError(f"wan_animate: num_frames must be 4k + 1, got {size.num_frames}")
    frames = _latent_frames(size.num_frames, 4)
    latent_channels = _cfg(config, "latent_channels") or (_cfg(config, "in_channels") - 4) // 2
    in_channels = _cfg(config, "in_channels") or 2 * latent_channels + 4
    grid = (size.height // 8, size.width // 8)
    face = _cfg(config, "motion_encoder_size")
    inputs = {
        "hidden_states": _randn(generator, batch, in_channels, frames + 1, *grid, dtype=dtype, device=device),
        "timestep": torch.full((batch,), 999, dtype=torch.long, device=device),
        "encoder_hidden_states": _randn(generator, batch, text_tokens, _cfg(config, "text_dim"), dtype=dtype,
                                        device=device),
        "pose_hidden_states": _randn(generator, batch, latent_channels, frames, *grid, dtype=dtype, device=device),
        "face_pixel_values": _randn(generator, batch, 3, size.num_frames, face, face, dtype=dtype,
                                    device=device).clamp_(-1, 1),
    }
    image_dim = _cfg(config, "image_dim")
    if image_dim:
        inputs["encoder_hidden_states_image"] = _randn(generator, batch, 5 if _is_tiny(config) else 257, image_dim,
                                                       dtype=dtype, device=device)
    return inputs


def _wan_animate_init(model: torch.nn.Module) -> None:
    """The face encoder's padding token (the last face token of every frame) starts at zero; trained it is not."""
    torch.nn.init.normal_(model.face_encoder.padding_tokens)


# One face adapter, after block 0 (inject_face_latents_blocks 2): the last block is a Wan block, as
# in the release (40 blocks, adapters after 0, 5, ..., 35). No added K/V projections at the tiny size: the attention
# processor hardcodes 512 text tokens to find the image tokens, so the tiny 8-token prompt concatenates the image
# tokens with the text instead (the call of the released config, added_kv_proj_dim 5120, is simulated at full size).
_TINY_WAN_ANIMATE = {
    **_TINY_HEADS, "in_channels": 12, "latent_channels": 4, "out_channels": 4, "text_dim": 24, "freq_dim": 16,
    "ffn_dim": 80, "num_layers": 2, "rope_max_seq_len": 64, "image_dim": 20, "added_kv_proj_dim": None,
    "motion_encoder_channel_sizes": {"8": 8, "4": 8}, "motion_encoder_size": 8, "motion_style_dim": 16,
    "motion_dim": 4, "motion_encoder_dim": 16, "face_encoder_hidden_dim": 16, "face_encoder_num_heads": 2,
    "inject_face_latents_blocks": 2, "motion_encoder_batch_size": 4,
}

# ----------------------------------------------------------------------------------------------- Helios
# Helios generates a long video window by window (33 frames = 9 latent frames per call) and conditions each window on
# compressed history latents: short (the first frame + the last generated one, patchified like the window), mid (2
# frames, 2x coarser patches) and long (16 frames, 4x coarser), as HeliosPipeline passes them. The model
# concatenates [long, mid, short, window] tokens, so the sequence memopt chunks is all of them.
# HeliosPipeline defaults: history_sizes=[16, 2, 1] (long, mid, 1x), keep_first_frame=True (the 1x history gets the
# first frame in front: 2 short frames).
_HISTORY_FRAMES = {"long": 16, "mid": 2, "short": 2}


def _helios_history_tokens(config: Any, size: Size) -> dict[str, int]:
    """Tokens per history term: short like the window, mid and long through 2x / 4x coarser patches (padded up)."""
    pt, ph, pw = _cfg(config, "patch_size")
    h, w = size.height // 8, size.width // 8
    tokens = {"short": _HISTORY_FRAMES["short"] // pt * (h // ph) * (w // pw)}
    for name, factor in (("mid", 2), ("long", 4)):
        frames = math.ceil(_HISTORY_FRAMES[name] / (factor * pt))
        tokens[name] = frames * math.ceil(h / (factor * ph)) * math.ceil(w / (factor * pw))
    return tokens


def _helios_tokens(config: Any, size: Size) -> int:
    pt, ph, pw = _cfg(config, "patch_size")
    window = _latent_frames(size.num_frames, 4) // pt * (size.height // 8 // ph) * (size.width // 8 // pw)
    return window + sum(_helios_history_tokens(config, size).values())


def _helios_inputs(config, batch, size, text_tokens, dtype, device, generator, masked) -> Inputs:
    """Helios: window latents (B, C, F', H/8, W/8), umT5 text states, the flow-matching timestep (float, as the
    pipeline passes it), the three history latents and their frame indices, laid out as ``HeliosPipeline`` does:
    ``[prefix | long | mid | 1x | window]`` with the short history = prefix + 1x (indices carry a batch dim of 1)."""
    _check_divisible("helios", size, 16)
    channels, h, w = _cfg(config, "in_channels"), size.height // 8, size.width // 8
    frames = _latent_frames(size.num_frames, 4)
    indices = torch.arange(1 + _HISTORY_FRAMES["long"] + _HISTORY_FRAMES["mid"] + 1 + frames, device=device)
    prefix, long, mid, one_x, window = indices.split(
        [1, _HISTORY_FRAMES["long"], _HISTORY_FRAMES["mid"], 1, frames]
    )

    def latents(num_frames: int) -> torch.Tensor:
        return _randn(generator, batch, channels, num_frames, h, w, dtype=dtype, device=device)

    return {
        "hidden_states": latents(frames),
        "timestep": torch.full((batch,), 999.0, dtype=torch.float32, device=device),
        "encoder_hidden_states": _randn(generator, batch, text_tokens, _cfg(config, "text_dim"), dtype=dtype,
                                        device=device),
        "indices_hidden_states": window[None],
        "indices_latents_history_short": torch.cat([prefix, one_x])[None],
        "indices_latents_history_mid": mid[None],
        "indices_latents_history_long": long[None],
        "latents_history_short": latents(_HISTORY_FRAMES["short"]),
        "latents_history_mid": latents(_HISTORY_FRAMES["mid"]),
        "latents_history_long": latents(_HISTORY_FRAMES["long"]),
    }


def _anyflow_inputs(config, batch, size, text_tokens, dtype, device, generator, masked) -> Inputs:
    """AnyFlow: per-frame latents laid out (B, F', C, H/8, W/8) (frames before channels, unlike Wan), umT5 text states
    and a source / target timestep pair per latent frame, (B, F') each, as AnyFlowPipeline passes them. The first
    latent frame gets timestep 0, as the pipeline's video-continuation call sets it on its context frames, so that the
    per-token modulation the model expands from the per-frame timesteps differs across frames (a chunk given another
    frame's rows shows). No text mask: the forward takes none."""
    _check_divisible("anyflow", size, 16)
    frames = _latent_frames(size.num_frames, 4)
    latents = _randn(generator, batch, frames, _cfg(config, "in_channels"), size.height // 8, size.width // 8,
                     dtype=dtype, device=device)
    timestep = torch.full((batch, frames), 999.0, device=device)
    timestep[:, 0] = 0.0
    return {
        "hidden_states": latents,
        "timestep": timestep,
        "r_timestep": torch.full((batch, frames), 749.0, device=device),  # the next sigma of a 4-step schedule
        "encoder_hidden_states": _randn(generator, batch, text_tokens, _cfg(config, "text_dim"), dtype=dtype,
                                        device=device),
    }


SPECS: list[FamilySpec] = [
    FamilySpec(
        name="wan",
        class_name="WanTransformer3DModel",
        configs={
            "full": {},  # class defaults are Wan2.1-T2V-14B
            "1.3b": {"num_attention_heads": 12, "ffn_dim": 8960, "num_layers": 30},
            "tiny": {**_TINY_HEADS, "in_channels": 4, "out_channels": 4, "text_dim": 24, "freq_dim": 16,
                     "ffn_dim": 80, "num_layers": 2, "rope_max_seq_len": 64},
        },
        sizes={"default": Size(720, 1280, 81), "tiny": Size(48, 80, 5)},
        extra_sizes={"480p": Size(480, 832, 81)},
        text_tokens=512,
        make_inputs_fn=_wan_inputs,
        num_tokens_fn=_wan_tokens,
    ),
    FamilySpec(
        name="wan_vace",
        class_name="WanVACETransformer3DModel",
        configs={
            # class defaults are Wan2.1-VACE-14B (40 blocks, VACE layers 0, 5, ..., 35, 96 context channels)
            "full": {},
            "1.3b": {"num_attention_heads": 12, "ffn_dim": 8960, "num_layers": 30,
                     "vace_layers": [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28]},  # Wan2.1-VACE-1.3B
            # Two Wan blocks and one VACE block (layer 0: it has the input projection); the last Wan block is not a
            # VACE layer, as in the releases (a hint added after the last block keeps the output head whole).
            "tiny": {**_TINY_HEADS, "in_channels": 4, "out_channels": 4, "text_dim": 24, "freq_dim": 16,
                     "ffn_dim": 80, "num_layers": 2, "rope_max_seq_len": 64, "vace_layers": [0],
                     "vace_in_channels": 8},
        },
        sizes={"default": Size(720, 1280, 81), "tiny": Size(48, 80, 5)},
        extra_sizes={"480p": Size(480, 832, 81)},  # WanVACEPipeline's default size (and the 1.3B model's)
        text_tokens=512,
        make_inputs_fn=_wan_vace_inputs,
        num_tokens_fn=_wan_tokens,
    ),
    FamilySpec(
        name="chronoedit",
        class_name="ChronoEditTransformer3DModel",
        configs={
            "full": {"in_channels": 36, "image_dim": 1280, "added_kv_proj_dim": 5120},  # ChronoEdit-14B (Wan I2V)
            "tiny": {**_TINY_HEADS, "in_channels": 8, "out_channels": 4, "text_dim": 24, "freq_dim": 16,
                     "ffn_dim": 80, "num_layers": 2, "rope_max_seq_len": 64, "image_dim": 20,
                     "added_kv_proj_dim": 32},
        },
        # An edit is 5 frames (2 latent frames: the input image and the edited one) unless temporal reasoning
        # is on, which generates a short video between them.
        sizes={"default": Size(720, 1280, 5), "tiny": Size(96, 160, 5)},
        extra_sizes={"reasoning": Size(720, 1280, 29)},
        text_tokens=512,
        make_inputs_fn=_wan_inputs,
        num_tokens_fn=_wan_tokens,
    ),
    FamilySpec(
        name="skyreels_v2",
        class_name="SkyReelsV2Transformer3DModel",
        configs={
            # SkyReels-V2-{T2V,DF}-14B-{540P,720P} (Wan2.1-14B sizes; the class defaults are not a release).
            "full": {"num_attention_heads": 40, "ffn_dim": 13824, "num_layers": 40},
            "1.3b": {"num_attention_heads": 12, "ffn_dim": 8960, "num_layers": 30, "inject_sample_info": True},
            "tiny": {**_TINY_HEADS, "in_channels": 4, "out_channels": 4, "text_dim": 24, "freq_dim": 16,
                     "ffn_dim": 80, "num_layers": 2, "rope_max_seq_len": 64},
        },
        sizes={"default": Size(544, 960, 97), "tiny": Size(48, 80, 5)},  # 540P at the DF base_num_frames
        extra_sizes={"720p": Size(720, 1280, 121)},
        text_tokens=512,
        make_inputs_fn=_wan_inputs,  # the T2V / I2V call; diffusion forcing adds per-frame timesteps
        num_tokens_fn=_wan_tokens,
    ),
    FamilySpec(
        name="helios",
        class_name="HeliosTransformer3DModel",
        configs={
            "full": {},  # class defaults are Helios-Base / -Mid / -Distilled (14B, Wan2.1-14B widths)
            "tiny": {**_TINY_HEADS, "in_channels": 4, "out_channels": 4, "text_dim": 24, "freq_dim": 16,
                     "ffn_dim": 80, "num_layers": 2, "rope_dim": (4, 6, 6)},
        },
        # One denoiser call generates a 33-frame window (9 latent frames) at the pipeline's 384x640.
        sizes={"default": Size(384, 640, 33), "tiny": Size(48, 80, 5)},
        text_tokens=512,
        make_inputs_fn=_helios_inputs,
        num_tokens_fn=_helios_tokens,
    ),
    FamilySpec(
        name="wan_animate",
        class_name="WanAnimateTransformer3DModel",
        configs={
            # Wan2.2-Animate-14B: the class defaults (Wan2.1-14B widths, 40 blocks, face adapter every 5th block,
            # 512 px motion encoder) with the I2V image-token K/V projections.
            "full": {"added_kv_proj_dim": 5120},
            "tiny": _TINY_WAN_ANIMATE,
        },
        # WanAnimatePipeline's defaults: 720 x 1280, segments of 77 frames (20 latent frames + the reference frame).
        sizes={"default": Size(720, 1280, 77), "tiny": Size(48, 80, 5)},
        text_tokens=512,
        make_inputs_fn=_wan_animate_inputs,
        num_tokens_fn=_wan_animate_tokens,
        init_fn=_wan_animate_init,
    ),
    FamilySpec(
        name="anyflow",
        class_name="AnyFlowTransformer3DModel",
        configs={
            # nvidia/AnyFlow-Wan2.1-T2V-14B-Diffusers: Wan2.1-T2V-14B widths; the class defaults are those values
            # (gate_value 0.25, deltatime_type "r" as the paper's stage-1 distillation); config.json not compared.
            "full": {},
            "tiny": {**_TINY_HEADS, "in_channels": 4, "out_channels": 4, "text_dim": 24, "freq_dim": 16,
                     "ffn_dim": 80, "num_layers": 2, "rope_max_seq_len": 64},
        },
        sizes={"default": Size(480, 832, 81), "tiny": Size(48, 80, 5)},  # AnyFlowPipeline's default 480x832, 81 frames
        extra_sizes={"720p": Size(720, 1280, 81)},
        text_tokens=512,
        make_inputs_fn=_anyflow_inputs,
        num_tokens_fn=_wan_tokens,
    ),
]
