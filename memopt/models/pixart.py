"""PixArt-Sigma, PixArt-Alpha, the video DiTs with PixArt's block layout (Allegro, Latte) and the class-conditional
DiT."""

from __future__ import annotations

import math
from typing import Any

import torch
from diffusers.models.embeddings import get_3d_rotary_pos_embed_allegro

from ._spec import (
    _TINY_HEADS,
    FamilySpec,
    Inputs,
    Size,
    _caption_inputs,
    _cfg,
    _cfg_or,
    _check_divisible,
    _image_tokens,
    _randn,
)


# ----------------------------------------------------------------------------------------------- PixArt
def _pixart_micro_conditions(config: Any) -> bool:
    """Whether the model embeds resolution and aspect ratio into its timestep embedding (PixArt-Alpha 1024-MS): the
    class resolves ``use_additional_conditions=None`` to ``sample_size == 128``."""
    use = _cfg_or(config, "use_additional_conditions", None)
    return _cfg(config, "sample_size") == 128 if use is None else bool(use)


def _pixart_inputs(config, batch, size, text_tokens, dtype, device, generator, masked) -> Inputs:
    """PixArt: latents (B, 4, H/8, W/8), T5 states (4096 wide at the release) + their 0/1 mask, the integer timestep
    per sample, and ``added_cond_kwargs`` as the pipelines pass it: ``{"resolution": None, "aspect_ratio": None}``
    (PixArt-Sigma), the (B, 2) pixel size and (B, 1) aspect ratio for PixArt-Alpha's micro-conditions."""
    _check_divisible("pixart", size, 8 * _cfg(config, "patch_size"))
    added: dict[str, torch.Tensor | None] = {"resolution": None, "aspect_ratio": None}
    if _pixart_micro_conditions(config):
        added = {
            "resolution": torch.tensor([[size.height, size.width]], dtype=dtype, device=device).repeat(batch, 1),
            "aspect_ratio": torch.tensor([[size.height / size.width]], dtype=dtype, device=device).repeat(batch, 1),
        }
    return {
        "hidden_states": _randn(generator, batch, _cfg(config, "in_channels"), size.height // 8, size.width // 8,
                                dtype=dtype, device=device),
        **_caption_inputs(config, batch, text_tokens, dtype, device, generator, masked),
        "added_cond_kwargs": added,
    }


# ----------------------------------------------------------------------------------------------- Allegro
def _allegro_latent_frames(num_frames: int) -> int:
    """AllegroPipeline.prepare_latents with the VAE's temporal ratio 4: ``ceil(F / 4)`` for an even frame count (88
    frames -> 22 latent frames), ``ceil((F - 1) / 4) + 1`` for an odd one."""
    return math.ceil(num_frames / 4) if num_frames % 2 == 0 else math.ceil((num_frames - 1) / 4) + 1


def _allegro_tokens(config: Any, size: Size) -> int:
    return _allegro_latent_frames(size.num_frames) // _cfg(config, "patch_size_t") * _image_tokens(config, size)


def _allegro_rotary(config: Any, size: Size, device: torch.device) -> tuple:
    """``image_rotary_emb`` exactly as AllegroPipeline._prepare_rotary_positional_embeddings builds it: per axis the
    (cos, sin) rows of every position (tables, a few KiB), and per axis the (1, S) int64 position of every token."""
    p = _cfg(config, "patch_size")
    grid_height, grid_width = size.height // 8 // p, size.width // 8 // p
    freqs_t, freqs_h, freqs_w, grid_t, grid_h, grid_w = get_3d_rotary_pos_embed_allegro(
        embed_dim=_cfg(config, "attention_head_dim"),
        crops_coords=((0, 0), (grid_height, grid_width)),
        grid_size=(grid_height, grid_width),
        temporal_size=_allegro_latent_frames(size.num_frames),
        interpolation_scale=(_cfg(config, "interpolation_scale_t"), _cfg(config, "interpolation_scale_h"),
                             _cfg(config, "interpolation_scale_w")),
        device=device,
    )
    pos = torch.cartesian_prod(grid_t.to(torch.long), grid_h.to(torch.long), grid_w.to(torch.long))
    pos = pos.reshape(-1, 3).transpose(0, 1).reshape(3, 1, -1).contiguous()
    return (freqs_t, freqs_h, freqs_w), tuple(pos)


def _allegro_inputs(config, batch, size, text_tokens, dtype, device, generator, masked) -> Inputs:
    """Allegro: latents (B, 4, F', H/8, W/8) (F' as AllegroPipeline), T5-XXL states (4096 wide at the release) + their
    0/1 mask, one integer timestep per sample, and the pipeline's 3-axis rotary embedding ``image_rotary_emb`` (the
    model computes no positions itself: without it the attention is position-free). No video ``attention_mask``: the
    pipeline never passes one."""
    _check_divisible("allegro", size, 8 * _cfg(config, "patch_size"))
    return {
        "hidden_states": _randn(generator, batch, _cfg(config, "in_channels"), _allegro_latent_frames(size.num_frames),
                                size.height // 8, size.width // 8, dtype=dtype, device=device),
        **_caption_inputs(config, batch, text_tokens, dtype, device, generator, masked),
        "image_rotary_emb": _allegro_rotary(config, size, device),
    }


# ----------------------------------------------------------------------------------------------- Latte
def _latte_frames(config: Any, size: Size) -> int:
    """LattePipeline encodes every frame with the image VAE (no temporal compression): one latent frame per frame. The
    model adds its (1, video_length, D) temporal position table to the (B x positions, frames, D) tokens, so a video
    must have ``video_length`` frames (or one: an image, where the table is not added)."""
    frames, length = size.num_frames, _cfg(config, "video_length")
    if frames not in (1, length):
        raise ValueError(f"latte: {frames} frames, but the model's temporal position table has video_length={length} "
                         "rows (a video must have video_length frames, or 1)")
    return frames


def _latte_tokens(config: Any, size: Size) -> int:
    return _latte_frames(config, size) * _image_tokens(config, size)


def _latte_inputs(config, batch, size, text_tokens, dtype, device, generator, masked) -> Inputs:
    """Latte: latents (B, 4, F, H/8, W/8), T5 states (4096 wide at the release), one integer timestep per sample.
    No text mask: LattePipeline passes none (and diffusers' AttnProcessor2_0 cannot take the model's (B, 1, S_text)
    bias against its (B x F) spatial batch), so ``masked`` has nothing to mask."""
    _check_divisible("latte", size, 8 * _cfg(config, "patch_size"))
    return {
        "hidden_states": _randn(generator, batch, _cfg(config, "in_channels"), _latte_frames(config, size),
                                size.height // 8, size.width // 8, dtype=dtype, device=device),
        "encoder_hidden_states": _randn(generator, batch, text_tokens, _cfg(config, "caption_channels"), dtype=dtype,
                                        device=device),
        "timestep": torch.full((batch,), 999, dtype=torch.long, device=device),
        "enable_temporal_attentions": True,
    }


# ----------------------------------------------------------------------------------------------- DiT
def _dit_inputs(config, batch, size, text_tokens, dtype, device, generator, masked) -> Inputs:
    """DiT, as ``DiTPipeline`` calls it: latents ``(B, C, H/8, W/8)`` of a square image (the model unpatchifies a
    square grid), the integer timestep and ImageNet class labels. No text (``text_tokens`` and ``masked`` are
    ignored)."""
    _check_divisible("dit", size, 8 * _cfg(config, "patch_size"))
    if size.height != size.width:
        raise ValueError(f"dit: DiTTransformer2DModel generates square images, got {size.height}x{size.width}")
    labels = torch.randint(0, _cfg(config, "num_embeds_ada_norm"), (batch,), generator=generator)
    return {
        "hidden_states": _randn(generator, batch, _cfg(config, "in_channels"), size.height // 8, size.width // 8,
                                dtype=dtype, device=device),
        "timestep": torch.full((batch,), 999, dtype=torch.long, device=device),
        "class_labels": labels.to(device),
    }


SPECS: list[FamilySpec] = [
    FamilySpec(
        name="pixart",
        class_name="PixArtTransformer2DModel",
        configs={
            # PixArt-alpha/PixArt-Sigma-XL-2-1024-MS transformer/config.json (0.6B: 28 blocks, 16 x 72, T5-XXL
            # captions; scripts/convert_pixart_sigma_to_diffusers.py: interpolation_scale 2 at 1024 px, no
            # micro-conditions). The other values are the class defaults.
            "full": {"caption_channels": 4096, "interpolation_scale": 2, "use_additional_conditions": False},
            # PixArt-alpha/PixArt-XL-2-1024-MS: the same blocks; sample_size 128 turns the micro-conditions on.
            "alpha": {"caption_channels": 4096},
            # cross_attention_dim must be the width (the caption projection maps the text to it); micro-conditions
            # need a width divisible by 3, so the tiny config runs PixArt-Sigma's path.
            "tiny": {**_TINY_HEADS, "in_channels": 4, "out_channels": 8, "num_layers": 2, "cross_attention_dim": 32,
                     "caption_channels": 24, "sample_size": 16},
        },
        sizes={"default": Size(1024, 1024), "tiny": Size(96, 80)},
        text_tokens=300,  # PixArtSigmaPipeline's max_sequence_length (PixArt-Alpha: 120)
        make_inputs_fn=_pixart_inputs,
        num_tokens_fn=_image_tokens,
        video=False,
        mask_key="encoder_attention_mask",
    ),
    FamilySpec(
        name="allegro",
        class_name="AllegroTransformer3DModel",
        configs={
            # rhymes-ai/Allegro transformer/config.json: the class defaults are the release (2.8B DiT: 32 blocks,
            # 24 x 96 = 2304 wide, T5-XXL captions of 4096, patch 1 x 2 x 2, sample 22 x 90 x 160 latents = 88 x 720 x
            # 1280 px, interpolation scales 2.2 / 2 / 2).
            "full": {},
            # The 3-axis RoPE cuts a head into three equal parts, each rotated by halves: head_dim must be a multiple of
            # 6, so 2 heads x 18 (not 16). cross_attention_dim must be the width (the caption projection maps the text
            # to it). sample_* only size PatchEmbed, which has no position table here (pos_embed_type=None).
            "tiny": {"num_attention_heads": 2, "attention_head_dim": 18, "in_channels": 4, "out_channels": 4,
                     "num_layers": 2, "cross_attention_dim": 36, "caption_channels": 24, "sample_height": 8,
                     "sample_width": 8, "sample_frames": 8},
        },
        sizes={"default": Size(720, 1280, 88), "tiny": Size(48, 80, 9)},
        text_tokens=512,  # AllegroPipeline's max_sequence_length
        make_inputs_fn=_allegro_inputs,
        num_tokens_fn=_allegro_tokens,
        mask_key="encoder_attention_mask",
    ),
    FamilySpec(
        name="latte",
        class_name="LatteTransformer3DModel",
        configs={
            # maxin-cn/Latte-1 transformer/config.json (28 spatial + 28 temporal blocks, 16 x 72 = 1152 wide, T5-XXL
            # captions, patch 2, 64 x 64 latents = 512 px, 16 frames).
            "full": {"num_attention_heads": 16, "attention_head_dim": 72, "in_channels": 4, "out_channels": 8,
                     "num_layers": 28, "cross_attention_dim": 1152, "attention_bias": True, "sample_size": 64,
                     "patch_size": 2, "activation_fn": "gelu-approximate", "num_embeds_ada_norm": 1000,
                     "norm_type": "ada_norm_single", "norm_elementwise_affine": False, "norm_eps": 1e-6,
                     "caption_channels": 4096, "video_length": 16},
            # cross_attention_dim must be the width (the caption projection maps the text to it); video_length = the
            # tiny size's frames.
            "tiny": {**_TINY_HEADS, "in_channels": 4, "out_channels": 8, "num_layers": 1, "cross_attention_dim": 32,
                     "attention_bias": True, "sample_size": 8, "patch_size": 2, "activation_fn": "gelu-approximate",
                     "num_embeds_ada_norm": 1000, "norm_type": "ada_norm_single", "norm_elementwise_affine": False,
                     "norm_eps": 1e-6, "caption_channels": 24, "video_length": 3},
        },
        sizes={"default": Size(512, 512, 16), "tiny": Size(80, 112, 3)},
        text_tokens=120,  # LattePipeline's max_sequence_length
        make_inputs_fn=_latte_inputs,
        num_tokens_fn=_latte_tokens,
    ),
    FamilySpec(
        name="dit",
        class_name="DiTTransformer2DModel",
        configs={
            # facebook/DiT-XL-2-512 transformer/config.json: the class defaults (28 blocks, 16 x 72, 2x2 patches of the
            # SD VAE's latents) with a 64 x 64 latent grid and the learned variance's 8 output channels.
            "full": {"sample_size": 64, "out_channels": 8},
            "tiny": {**_TINY_HEADS, "in_channels": 4, "out_channels": 8, "num_layers": 2, "sample_size": 14},
        },
        sizes={"default": Size(512, 512), "tiny": Size(112, 112)},
        text_tokens=0,
        make_inputs_fn=_dit_inputs,
        num_tokens_fn=_image_tokens,
        video=False,
    ),
]
