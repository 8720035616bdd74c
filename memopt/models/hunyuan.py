"""HunyuanVideo, FramePack, HunyuanVideo 1.5, HunyuanImage 2.1 and HunyuanDiT."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import torch

from ._spec import (
    _TINY_HEADS,
    FamilySpec,
    Inputs,
    Size,
    _cfg,
    _check_divisible,
    _glyph_mask,
    _image_tokens,
    _is_tiny,
    _latent_frames,
    _randn,
    _text_mask,
)


# ----------------------------------------------------------------------------------------------- HunyuanVideo
def _hunyuan_tokens(config: Any, size: Size) -> int:
    return _latent_frames(size.num_frames, 4) // _cfg(config, "patch_size_t") * _image_tokens(config, size)


def _hunyuan_inputs(config, batch, size, text_tokens, dtype, device, generator, masked) -> Inputs:
    """HunyuanVideo: latents (B, C, F', H/8, W/8), Llama states + encoder mask, pooled CLIP, guidance."""
    _check_divisible("hunyuanvideo", size, 16)
    latents = _randn(generator, batch, _cfg(config, "in_channels"), _latent_frames(size.num_frames, 4),
                     size.height // 8, size.width // 8, dtype=dtype, device=device)
    inputs = {
        "hidden_states": latents,
        "timestep": torch.full((batch,), 999, dtype=torch.long, device=device),
        "encoder_hidden_states": _randn(generator, batch, text_tokens, _cfg(config, "text_embed_dim"), dtype=dtype,
                                        device=device),
        "encoder_attention_mask": _text_mask(batch, text_tokens, masked, device),
        "pooled_projections": _randn(generator, batch, _cfg(config, "pooled_projection_dim"), dtype=dtype,
                                     device=device),
    }
    if _cfg(config, "guidance_embeds"):
        inputs["guidance"] = torch.full((batch,), 6000.0, dtype=dtype, device=device)
    return inputs

# ----------------------------------------------------------------------------------------------- FramePack
# HunyuanVideoFramepackPipeline for the released checkpoints (lllyasviel/FramePackI2V_HY, FramePack_F1_I2V_HY): one
# denoiser call generates a window of latent_window_size = 9 latent frames (33 pixel frames) conditioned on history
# latents at three compressions: 1 + 1 clean frames (the start image and the nearest history frame, 1x), 2 frames at
# 2x and 16 frames at 4x (history_sizes [1, 2, 16]). HunyuanVideoHistoryPatchEmbed projects them with (1, 2, 2),
# (2, 4, 4) and (4, 8, 8) convolutions (2x / 4x padded to whole kernels by replication) and the model puts them in
# front of the window's tokens: [4x | 2x | clean | window]. The SigLIP image embedding (729 tokens of 1152) goes in
# front of the text tokens.
_FRAMEPACK_CLEAN_FRAMES = 2
_FRAMEPACK_HISTORY_2X = 2
_FRAMEPACK_HISTORY_4X = 16
_FRAMEPACK_IMAGE_TOKENS = 729  # SigLIP so400m-patch14-384 last_hidden_state (27 x 27 patches)


def _framepack_token_counts(config: Any, size: Size) -> tuple[int, int, int, int]:
    """(4x history, 2x history, clean, window) tokens, in the order the model concatenates them."""
    p, pt = _cfg(config, "patch_size"), _cfg(config, "patch_size_t")
    h, w = size.height // 8, size.width // 8
    window = _latent_frames(size.num_frames, 4) // pt * (h // p) * (w // p)
    clean = _FRAMEPACK_CLEAN_FRAMES * (h // 2) * (w // 2)
    history_2x = math.ceil(_FRAMEPACK_HISTORY_2X / 2) * math.ceil(h / 4) * math.ceil(w / 4)
    history_4x = math.ceil(_FRAMEPACK_HISTORY_4X / 4) * math.ceil(h / 8) * math.ceil(w / 8)
    return history_4x, history_2x, clean, window


def _framepack_tokens(config: Any, size: Size) -> int:
    """All the tokens the blocks carry: the history tokens and the window's (the output head keeps the window's)."""
    return sum(_framepack_token_counts(config, size))


def _framepack_inputs(config, batch, size, text_tokens, dtype, device, generator, masked) -> Inputs:
    """FramePack (one window of the inverted anti-drifting sampler, the pipeline's default, at its last section:
    no padding frames): window latents (B, 16, F', H/8, W/8), clean / 2x / 4x history latents, their frame indices
    (1-D, as the pipeline passes them), Llama states + mask, pooled CLIP, SigLIP image states (729 tokens at full
    size, 3 at tiny configs), guidance (scale 6 x 1000)."""
    _check_divisible("framepack", size, 16)
    channels, frames = _cfg(config, "in_channels"), _latent_frames(size.num_frames, 4)
    h, w = size.height // 8, size.width // 8

    def latents(num_frames: int) -> torch.Tensor:
        return _randn(generator, batch, channels, num_frames, h, w, dtype=dtype, device=device)

    # indices.split([1, latent_padding_size = 0, latent_window_size, *history_sizes]) of the pipeline
    sizes = [1, frames, 1, _FRAMEPACK_HISTORY_2X, _FRAMEPACK_HISTORY_4X]
    prefix, window, history_1x, history_2x, history_4x = torch.arange(sum(sizes), device=device).split(sizes)
    image_tokens = 3 if _is_tiny(config) else _FRAMEPACK_IMAGE_TOKENS
    inputs = {
        "hidden_states": latents(frames),
        "timestep": torch.full((batch,), 999.0, dtype=torch.float32, device=device),
        "encoder_hidden_states": _randn(generator, batch, text_tokens, _cfg(config, "text_embed_dim"), dtype=dtype,
                                        device=device),
        "encoder_attention_mask": _text_mask(batch, text_tokens, masked, device),
        "pooled_projections": _randn(generator, batch, _cfg(config, "pooled_projection_dim"), dtype=dtype,
                                     device=device),
        "image_embeds": _randn(generator, batch, image_tokens, _cfg(config, "image_proj_dim"), dtype=dtype,
                               device=device),
        "indices_latents": window,
        "latents_clean": latents(_FRAMEPACK_CLEAN_FRAMES),
        "indices_latents_clean": torch.cat([prefix, history_1x]),
        "latents_history_2x": latents(_FRAMEPACK_HISTORY_2X),
        "indices_latents_history_2x": history_2x,
        "latents_history_4x": latents(_FRAMEPACK_HISTORY_4X),
        "indices_latents_history_4x": history_4x,
    }
    if _cfg(config, "guidance_embeds"):
        inputs["guidance"] = torch.full((batch,), 6000.0, dtype=dtype, device=device)
    return inputs

# ----------------------------------------------------------------------------------------------- HunyuanVideo 1.5
_HUNYUAN15_GLYPH_TOKENS = 256  # HunyuanVideo15Pipeline.tokenizer_2_max_length (byT5 glyph tokens)
_HUNYUAN15_VISION_TOKENS = 729  # HunyuanVideo15Pipeline.vision_num_semantic_tokens (SigLIP image tokens)


def _hunyuan15_tokens(config: Any, size: Size) -> int:
    p, pt = _cfg(config, "patch_size"), _cfg(config, "patch_size_t")
    return _latent_frames(size.num_frames, 4) // pt * (size.height // 16 // p) * (size.width // 16 // p)


def _hunyuan15_inputs(config, batch, size, text_tokens, dtype, device, generator, masked) -> Inputs:
    """HunyuanVideo 1.5 (text-to-video pipeline): latents + condition latents + mask (B, 65, F', H/16, W/16) from its
    16x VAE, Qwen2.5-VL states + mask, byT5 glyph states + mask, and the SigLIP image embeds the T2V pipeline passes
    as zeros (which the model turns into masked-out image tokens). The block text stream is all three: 1000 + 256 +
    729 tokens at the released size. ``masked`` pads the last quarter of the Qwen tokens and the last half of the
    glyph tokens (prompts rarely quote much text)."""
    _check_divisible("hunyuanvideo15", size, 16)
    tiny = _is_tiny(config)
    glyph_tokens = max(1, text_tokens // 2) if tiny else _HUNYUAN15_GLYPH_TOKENS
    vision_tokens = 3 if tiny else _HUNYUAN15_VISION_TOKENS
    latents = _randn(generator, batch, _cfg(config, "in_channels"), _latent_frames(size.num_frames, 4),
                     size.height // 16, size.width // 16, dtype=dtype, device=device)
    glyph_mask = _glyph_mask(batch, glyph_tokens, masked, device)
    return {
        "hidden_states": latents,
        "timestep": torch.full((batch,), 999.0, dtype=dtype, device=device),
        "encoder_hidden_states": _randn(generator, batch, text_tokens, _cfg(config, "text_embed_dim"), dtype=dtype,
                                        device=device),
        "encoder_attention_mask": _text_mask(batch, text_tokens, masked, device),
        "encoder_hidden_states_2": _randn(generator, batch, glyph_tokens, _cfg(config, "text_embed_2_dim"),
                                          dtype=dtype, device=device),
        "encoder_attention_mask_2": glyph_mask,
        "image_embeds": torch.zeros(batch, vision_tokens, _cfg(config, "image_embed_dim"), dtype=dtype, device=device),
    }

# ----------------------------------------------------------------------------------------------- HunyuanImage 2.1
_HUNYUANIMAGE_GLYPH_TOKENS = 128  # HunyuanImagePipeline.tokenizer_2_max_length (byT5 glyph tokens)


def _hunyuanimage_vae_ratio(config: Any) -> int:
    """The base model's 32x VAE (latents (B, 64, H/32, W/32)) or the refiner's 16x video VAE (latents (B, 2 x 64, 1,
    H/16, W/16): noisy + condition latents); a 3-D patch size marks the refiner."""
    return 16 if len(_cfg(config, "patch_size")) == 3 else 32


def _hunyuanimage_tokens(config: Any, size: Size) -> int:
    ratio, patch = _hunyuanimage_vae_ratio(config), _cfg(config, "patch_size")
    return (size.height // ratio // patch[-2]) * (size.width // ratio // patch[-1])


def _hunyuanimage_inputs(config, batch, size, text_tokens, dtype, device, generator, masked) -> Inputs:
    """HunyuanImage-2.1: latents (B, 64, H/32, W/32), Qwen2.5-VL states + mask, byT5 glyph states + mask (the pipeline
    always passes them, zeros with an all-zero mask when the prompt quotes no text), and for the distilled / refiner
    checkpoints the guidance scale and the MeanFlow ``timestep_r``. The refiner (3-D patch size) takes
    (B, 128, 1, H/16, W/16) (noisy and condition latents concatenated) and no glyph states. The model reorders the
    text stream per sample as [valid glyph, valid Qwen, padding glyph, padding Qwen]: 1000 + 128 tokens at the
    released size. ``masked`` pads the last quarter of the Qwen tokens and the last half of the glyph tokens."""
    refiner = _hunyuanimage_vae_ratio(config) == 16
    ratio = _hunyuanimage_vae_ratio(config)
    _check_divisible("hunyuanimage", size, ratio)
    shape = (1, size.height // ratio, size.width // ratio) if refiner else (size.height // ratio, size.width // ratio)
    inputs = {
        "hidden_states": _randn(generator, batch, _cfg(config, "in_channels"), *shape, dtype=dtype, device=device),
        "timestep": torch.full((batch,), 999.0, dtype=dtype, device=device),
        "encoder_hidden_states": _randn(generator, batch, text_tokens, _cfg(config, "text_embed_dim"), dtype=dtype,
                                        device=device),
        "encoder_attention_mask": _text_mask(batch, text_tokens, masked, device),
    }
    if _cfg(config, "text_embed_2_dim") is not None:
        glyph_tokens = max(1, text_tokens // 2) if _is_tiny(config) else _HUNYUANIMAGE_GLYPH_TOKENS
        glyph_mask = _glyph_mask(batch, glyph_tokens, masked, device)
        inputs["encoder_hidden_states_2"] = _randn(generator, batch, glyph_tokens, _cfg(config, "text_embed_2_dim"),
                                                   dtype=dtype, device=device)
        inputs["encoder_attention_mask_2"] = glyph_mask
    if _cfg(config, "guidance_embeds"):
        inputs["guidance"] = torch.full((batch,), 3250.0, dtype=dtype, device=device)  # 1000 x distilled scale 3.25
    if _cfg(config, "use_meanflow"):
        inputs["timestep_r"] = torch.full((batch,), 500.0, dtype=dtype, device=device)  # the next step's timestep
    return inputs


# HunyuanImage-2.1 refiner (HYImageDiffusionTransformer hunyuanimage_refiner_cfg): 26 x 128 heads, 3-D patches,
# guidance-distilled with MeanFlow, no glyph states.


_HUNYUANIMAGE_REFINER = {"in_channels": 128, "num_attention_heads": 26, "patch_size": (1, 1, 1),
                         "rope_axes_dim": (16, 56, 56), "guidance_embeds": True, "use_meanflow": True}
_TINY_HUNYUANIMAGE = {**_TINY_HEADS, "in_channels": 4, "out_channels": 4, "num_layers": 1, "num_single_layers": 2,
                      "num_refiner_layers": 1, "text_embed_dim": 24, "text_embed_2_dim": 20, "rope_axes_dim": (8, 8)}


_HUNYUANVIDEO = FamilySpec(
    name="hunyuanvideo",
    class_name="HunyuanVideoTransformer3DModel",
    configs={
        "full": {},  # class defaults are HunyuanVideo (13B)
        "tiny": {**_TINY_HEADS, "in_channels": 4, "out_channels": 4, "num_layers": 1, "num_single_layers": 2,
                 "num_refiner_layers": 1, "text_embed_dim": 24, "pooled_projection_dim": 12,
                 "rope_axes_dim": (4, 6, 6)},
    },
    sizes={"default": Size(720, 1280, 129), "tiny": Size(48, 80, 5)},
    extra_sizes={"544p": Size(544, 960, 129)},
    text_tokens=256,
    make_inputs_fn=_hunyuan_inputs,
    num_tokens_fn=_hunyuan_tokens,
    mask_key="encoder_attention_mask",
)
# HunyuanVideo-I2V (hunyuanvideo-community/HunyuanVideo-I2V): the same class and inputs with token-replace blocks, which
# modulate the first latent frame (the clean image's latents) with a timestep-zero table; the -33ch release concatenates
# the image latents on the channels instead (in_channels 33) and has the plain blocks.
_HUNYUANVIDEO_I2V = replace(
    _HUNYUANVIDEO,
    name="hunyuanvideo_i2v",
    configs={name: {**config, "image_condition_type": "token_replace"}
             for name, config in _HUNYUANVIDEO.configs.items()},
    extra_sizes={},
)


# ----------------------------------------------------------------------------------------------- HunyuanDiT
def _hunyuandit_inputs(config, batch, size, text_tokens, dtype, device, generator, masked) -> Inputs:
    """HunyuanDiT, as ``HunyuanDiTPipeline`` calls it: latents ``(B, C, H/8, W/8)``, the bilingual CLIP states
    ``(B, text_len, cross_attention_dim)`` and the mT5 states ``(B, text_len_t5, cross_attention_dim_t5)`` at the
    config's fixed lengths (the model's attention pooler and learned text padding are sized for them; ``text_tokens``
    is ignored) with their masks (padded tokens are replaced by learned padding, no attention mask), the timestep in
    the latents' dtype, the SDXL-style ``image_meta_size`` ``(B, 6)`` and ``style`` ``(B,)`` (used by v1.1 and
    earlier), and the pipeline's 2-D rotary ``(cos, sin)`` tables, ``(S, head_dim)``, for the latent grid cropped into
    a 512 px base grid. ``masked=True`` pads the last quarter of both prompts out."""
    from diffusers.models.embeddings import get_2d_rotary_pos_embed
    from diffusers.pipelines.hunyuandit.pipeline_hunyuandit import get_resize_crop_region_for_grid

    p = _cfg(config, "patch_size")
    _check_divisible("hunyuandit", size, 8 * p)
    grid = (size.height // 8 // p, size.width // 8 // p)
    head_dim = _cfg(config, "attention_head_dim")
    crops = get_resize_crop_region_for_grid(grid, 512 // 8 // p)
    meta = torch.tensor([[size.height, size.width, size.height, size.width, 0, 0]], dtype=dtype, device=device)
    clip, t5 = _cfg(config, "text_len"), _cfg(config, "text_len_t5")
    return {
        "hidden_states": _randn(generator, batch, _cfg(config, "in_channels"), size.height // 8, size.width // 8,
                                dtype=dtype, device=device),
        "timestep": torch.full((batch,), 999.0, dtype=dtype, device=device),  # the model embeds it in its dtype
        "encoder_hidden_states": _randn(generator, batch, clip, _cfg(config, "cross_attention_dim"), dtype=dtype,
                                        device=device),
        "text_embedding_mask": _text_mask(batch, clip, masked, device),
        "encoder_hidden_states_t5": _randn(generator, batch, t5, _cfg(config, "cross_attention_dim_t5"), dtype=dtype,
                                           device=device),
        "text_embedding_mask_t5": _text_mask(batch, t5, masked, device),
        "image_meta_size": meta.repeat(batch, 1),
        "style": torch.zeros(batch, dtype=torch.long, device=device),
        "image_rotary_emb": get_2d_rotary_pos_embed(head_dim, crops, grid, device=device, output_type="pt"),
    }


SPECS: list[FamilySpec] = [
    _HUNYUANVIDEO,
    _HUNYUANVIDEO_I2V,
    FamilySpec(
        name="hunyuanvideo15",
        class_name="HunyuanVideo15Transformer3DModel",
        configs={
            "full": {},  # class defaults are HunyuanVideo-1.5 (8.3B, 480p; 720p differs only in target_size)
            "tiny": {**_TINY_HEADS, "in_channels": 4, "out_channels": 4, "num_layers": 2, "num_refiner_layers": 1,
                     "text_embed_dim": 24, "text_embed_2_dim": 20, "image_embed_dim": 12,
                     "rope_axes_dim": (4, 6, 6)},
        },
        sizes={"default": Size(480, 848, 121), "tiny": Size(48, 80, 5)},
        extra_sizes={"720p": Size(720, 1280, 121)},
        text_tokens=1000,
        make_inputs_fn=_hunyuan15_inputs,
        num_tokens_fn=_hunyuan15_tokens,
        mask_key="encoder_attention_mask",
    ),
    FamilySpec(
        name="hunyuanimage",
        class_name="HunyuanImageTransformer2DModel",
        configs={
            # HunyuanImage-2.1 (17B): the class defaults plus the byT5-small glyph encoder's width (d_model 1472)
            "full": {"text_embed_2_dim": 1472},
            "distilled": {"text_embed_2_dim": 1472, "guidance_embeds": True, "use_meanflow": True},
            "refiner": _HUNYUANIMAGE_REFINER,
            "tiny": _TINY_HUNYUANIMAGE,
            "tiny-refiner": {**_TINY_HUNYUANIMAGE, "in_channels": 8, "patch_size": (1, 1, 1),
                             "rope_axes_dim": (4, 6, 6), "text_embed_2_dim": None, "guidance_embeds": True,
                             "use_meanflow": True},
        },
        sizes={"default": Size(2048, 2048), "tiny": Size(160, 224)},
        text_tokens=1000,
        make_inputs_fn=_hunyuanimage_inputs,
        num_tokens_fn=_hunyuanimage_tokens,
        video=False,
        mask_key="encoder_attention_mask",
    ),
    FamilySpec(
        name="framepack",
        class_name="HunyuanVideoFramepackTransformer3DModel",
        configs={
            # lllyasviel/FramePackI2V_HY (and FramePack_F1_I2V_HY) transformer config: HunyuanVideo's 13B widths (20
            # dual-stream + 40 single-stream blocks, 24 x 128) with the SigLIP image projection and the history
            # embedder; the class defaults but for those two switches.
            "full": {"has_image_proj": True, "image_proj_dim": 1152, "has_clean_x_embedder": True},
            "tiny": {**_TINY_HEADS, "in_channels": 4, "out_channels": 4, "num_layers": 1, "num_single_layers": 2,
                     "num_refiner_layers": 1, "text_embed_dim": 24, "pooled_projection_dim": 12,
                     "rope_axes_dim": (4, 6, 6), "has_image_proj": True, "image_proj_dim": 20,
                     "has_clean_x_embedder": True},
        },
        # The pipeline's default size (720 x 1280) for one window of latent_window_size 9 (33 frames): 32 400 window
        # tokens + 9 080 history tokens. "480p" is the pipeline docs' example (832 x 480, FramePack's 640 bucket).
        sizes={"default": Size(720, 1280, 33), "tiny": Size(48, 80, 9)},
        extra_sizes={"480p": Size(832, 480, 33)},
        text_tokens=256,  # max_sequence_length (+ the 729 SigLIP tokens the model puts in front of them)
        make_inputs_fn=_framepack_inputs,
        num_tokens_fn=_framepack_tokens,
        mask_key="encoder_attention_mask",
    ),
    FamilySpec(
        name="hunyuandit",
        class_name="HunyuanDiT2DModel",
        configs={
            # Tencent-Hunyuan/HunyuanDiT-v1.2-Diffusers transformer/config.json: 2x2 patches of the SD VAE's 4-channel
            # latents, 40 blocks of 16 x 88 = 1408 (its hidden_size, the patch embedding's width, equals it), MLP ratio
            # 4.3637, no style / image-size conditioning (v1.2); CLIP 77 x 1024 and mT5 256 x 2048 text states, as the
            # class defaults.
            "full": {"in_channels": 4, "patch_size": 2, "hidden_size": 1408, "num_layers": 40, "mlp_ratio": 4.3637,
                     "sample_size": 128, "use_style_cond_and_image_meta_size": False},
            # Four blocks, so that the long skip connection runs (block 3 takes block 0's output); the mT5 width a
            # multiple of the attention pooler's 8 heads.
            "tiny": {**_TINY_HEADS, "in_channels": 4, "patch_size": 2, "sample_size": 16, "hidden_size": 32,
                     "num_layers": 4, "cross_attention_dim": 16, "cross_attention_dim_t5": 16,
                     "pooled_projection_dim": 8, "text_len": 9, "text_len_t5": 7},
        },
        sizes={"default": Size(1024, 1024), "tiny": Size(80, 112)},
        text_tokens=77 + 256,  # CLIP + mT5, at the config's fixed lengths
        make_inputs_fn=_hunyuandit_inputs,
        num_tokens_fn=_image_tokens,
        video=False,
        mask_key="text_embedding_mask",
    ),
]
