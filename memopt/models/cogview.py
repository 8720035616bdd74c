"""CogVideoX, its identity-preserving derivative ConsisID, CogView3-Plus, CogView4 and GLM-Image's diffusion decoder."""

from __future__ import annotations

import math
from typing import Any

import torch
from diffusers.models.embeddings import get_3d_rotary_pos_embed
from diffusers.pipelines.consisid.pipeline_consisid import get_resize_crop_region_for_grid

from ._spec import (
    _TINY_HEADS,
    FamilySpec,
    Inputs,
    Size,
    _cfg,
    _cfg_or,
    _check_divisible,
    _image_tokens,
    _is_tiny,
    _latent_frames,
    _randn,
)


# ----------------------------------------------------------------------------------------------- CogVideoX
def _cogvideox_tokens(config: Any, size: Size) -> int:
    pt = _cfg_or(config, "patch_size_t", None) or 1  # ConsisID has no patch_size_t
    return math.ceil(_latent_frames(size.num_frames, 4) / pt) * _image_tokens(config, size)


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

# ----------------------------------------------------------------------------------------------- ConsisID
# CogVideoX-5B-I2V with identity conditioning: the Local Facial Extractor turns the face embedding (id_cond, ArcFace +
# EVA-CLIP, (B, 1280)) and LFE_num_scale EVA-CLIP hidden states ((B, 577, 1024) each) into LFE_num_querie face tokens,
# and after every cross_attn_interval-th block the model adds a PerceiverCrossAttention update (video tokens attend to
# the face tokens) to the video tokens.
def _consisid_rotary(config: Any, size: Size, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``ConsisIDPipeline._prepare_rotary_positional_embeddings``: fp32 ``(S_image, head_dim)`` cos / sin."""
    p = _cfg(config, "patch_size")
    grid = (size.height // 8 // p, size.width // 8 // p)
    crops = get_resize_crop_region_for_grid(grid, _cfg(config, "sample_width") // p, _cfg(config, "sample_height") // p)
    return get_3d_rotary_pos_embed(embed_dim=_cfg(config, "attention_head_dim"), crops_coords=crops, grid_size=grid,
                                   temporal_size=_latent_frames(size.num_frames, 4), device=device)


def _consisid_inputs(config, batch, size, text_tokens, dtype, device, generator, masked) -> Inputs:
    """ConsisIDPipeline's call: latents (B, F', C, H/8, W/8) with the image latents concatenated on C (in_channels =
    2 x 16), T5 states, an integer timestep, the rotary tables (when the config uses them), and with is_train_face the
    identity inputs: id_cond (B, LFE_id_dim) and id_vit_hidden, LFE_num_scale EVA-CLIP hidden states (B, 577,
    LFE_vit_dim) (5 tokens at tiny configs). The forward takes no text mask."""
    _check_divisible("consisid", size, 8 * _cfg(config, "patch_size"))
    inputs = {
        "hidden_states": _randn(generator, batch, _latent_frames(size.num_frames, 4), _cfg(config, "in_channels"),
                                size.height // 8, size.width // 8, dtype=dtype, device=device),
        "encoder_hidden_states": _randn(generator, batch, text_tokens, _cfg(config, "text_embed_dim"), dtype=dtype,
                                        device=device),
        "timestep": torch.full((batch,), 999, dtype=torch.long, device=device),
    }
    if _cfg(config, "use_rotary_positional_embeddings"):
        inputs["image_rotary_emb"] = _consisid_rotary(config, size, device)
    if _cfg(config, "is_train_face"):
        vit_tokens = 5 if _is_tiny(config) else 577
        inputs["id_cond"] = _randn(generator, batch, _cfg(config, "LFE_id_dim"), dtype=dtype, device=device)
        inputs["id_vit_hidden"] = [
            _randn(generator, batch, vit_tokens, _cfg(config, "LFE_vit_dim"), dtype=dtype, device=device)
            for _ in range(_cfg(config, "LFE_num_scale"))
        ]
    return inputs


# Two blocks and one face cross-attention after block 0 (cross_attn_interval 2, as released: 42 blocks, face
# cross-attention after 0, 2, ..., 40). The face cross-attention's K/V width is int(2/3 x width) (21 here) and must
# equal LFE_output_dim. No learned position table (the release's, use_learned_positional_embeddings, only allows the
# sample size): rotary tables only, as the release's blocks see them.
_TINY_CONSISID = {
    **_TINY_HEADS, "in_channels": 8, "out_channels": 4, "time_embed_dim": 16, "text_embed_dim": 24, "num_layers": 2,
    "sample_width": 10, "sample_height": 6, "sample_frames": 9, "max_text_seq_length": 8,
    "use_rotary_positional_embeddings": True, "is_train_face": True, "cross_attn_interval": 2,
    "cross_attn_dim_head": 8, "cross_attn_num_heads": 2, "LFE_id_dim": 12, "LFE_vit_dim": 16, "LFE_depth": 2,
    "LFE_dim_head": 8, "LFE_num_heads": 2, "LFE_num_id_token": 2, "LFE_num_querie": 3, "LFE_output_dim": 21,
    "LFE_ff_mult": 2, "LFE_num_scale": 2,
}


# ----------------------------------------------------------------------------------------------- CogView4
def _cogview4_inputs(config, batch, size, text_tokens, dtype, device, generator, masked) -> Inputs:
    """CogView4: latents (B, C, H/8, W/8), GLM-4 states, timestep and the SDXL-style size conditions.

    ``CogView4Pipeline`` passes ``original_size`` / ``target_size`` ``(B, 2)`` = ``(height, width)`` and
    ``crop_coords`` ``(B, 2)`` = ``(0, 0)`` in the prompt's dtype, a float timestep in ``[1, 1000]``, and **no**
    ``attention_mask``: it left-pads the prompt with pad tokens to a multiple of 16 and lets them attend. The forward
    also takes an optional ``(B, S_text)`` text mask (1 = token, 0 = padding), which its processor turns into the
    additive 0/1 mask ``m[q] * m[k] > 0`` (image tokens count as 1). As no pipeline passes it, ``masked`` is ignored
    here (``mask_key`` is ``None``); sequence chunking refuses that mask (it depends on the query position).
    """
    timestep = torch.full((batch,), 999.0, dtype=torch.float32, device=device)
    return _size_conditioned_inputs("cogview4", config, batch, size, text_tokens, timestep, dtype, device, generator)


def _size_conditioned_inputs(name: str, config: Any, batch: int, size: Size, text_tokens: int, timestep: torch.Tensor,
                             dtype: torch.dtype, device: Any, generator: Any) -> Inputs:
    """CogView latents (B, C, H/8, W/8), text states and the SDXL-style size conditions its pipelines pass:
    ``original_size`` / ``target_size`` ``(B, 2)`` = ``(height, width)``, ``crop_coords`` ``(0, 0)``."""
    _check_divisible(name, size, 8 * _cfg(config, "patch_size"))
    sizes = torch.tensor([[size.height, size.width]], dtype=dtype, device=device).repeat(batch, 1)
    return {
        "hidden_states": _randn(generator, batch, _cfg(config, "in_channels"), size.height // 8, size.width // 8,
                                dtype=dtype, device=device),
        "encoder_hidden_states": _randn(generator, batch, text_tokens, _cfg(config, "text_embed_dim"), dtype=dtype,
                                        device=device),
        "timestep": timestep,
        "original_size": sizes,
        "target_size": sizes.clone(),
        "crop_coords": torch.zeros(batch, 2, dtype=dtype, device=device),
    }


# ----------------------------------------------------------------------------------------------- GLM-Image
def _glm_image_inputs(config, batch, size, text_tokens, dtype, device, generator, masked) -> Inputs:
    """GLM-Image's diffusion decoder: latents (B, C, H/8, W/8), the glyph encoder's states of the prompt's quoted text,
    the autoregressive model's prior image tokens and the SDXL-style size conditions.

    ``GlmImagePipeline`` passes ``prior_token_id`` ``(B, S_image)`` (codebook ids, one per image token),
    ``prior_token_drop`` ``(B, S_image)`` bool (all ``False`` in the conditional pass, all ``True`` in the
    unconditional one), a float timestep ``t - 1``, ``target_size`` ``(B, 2)`` = ``(height, width)`` and
    ``crop_coords`` ``(0, 0)`` in the prompt's dtype, its KV cache (no mode in text-to-image: the processor ignores
    it; left out here) and no ``attention_mask`` (``masked`` is ignored, as CogView4's). No ``original_size``.
    """
    timestep = torch.full((batch,), 999.0, dtype=torch.float32, device=device)
    inputs = _size_conditioned_inputs("glm_image", config, batch, size, text_tokens, timestep, dtype, device,
                                      generator)
    del inputs["original_size"]
    tokens = _image_tokens(config, size)
    prior = torch.randint(0, _cfg(config, "prior_vq_quantizer_codebook_size"), (batch, tokens), generator=generator)
    inputs["prior_token_id"] = prior.to(device)
    inputs["prior_token_drop"] = torch.zeros(batch, tokens, dtype=torch.bool, device=device)
    return inputs


# ----------------------------------------------------------------------------------------------- CogView3-Plus
def _cogview3plus_inputs(config, batch, size, text_tokens, dtype, device, generator, masked) -> Inputs:
    """CogView3-Plus: latents (B, C, H/8, W/8), T5 states, an integer timestep and the SDXL-style size conditions.

    ``CogView3PlusPipeline`` pads the T5 prompt to ``max_sequence_length`` 224 and passes no text mask (the forward
    takes none, so ``masked`` is ignored), ``original_size`` / ``target_size`` ``(B, 2)`` = ``(height, width)`` and
    ``crop_coords`` ``(B, 2)`` = ``(0, 0)`` in the prompt's dtype, and the CogVideoX DDIM scheduler's integer timesteps.
    The learned-free sin-cos position table (``pos_embed_max_size``^2 patches) bounds the size: 2048 px at release.
    """
    timestep = torch.full((batch,), 999, dtype=torch.long, device=device)
    return _size_conditioned_inputs("cogview3plus", config, batch, size, text_tokens, timestep, dtype, device,
                                    generator)


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
        num_tokens_fn=_image_tokens,
        video=False,
    ),
    FamilySpec(
        name="glm_image",
        class_name="GlmImageTransformer2DModel",
        configs={
            # zai-org/GLM-Image's 7B diffusion decoder (transformer/config.json): 30 blocks of 32 x 128, the class's
            # other defaults (the class defaults themselves are a 64 x 40 variant).
            "full": {"num_attention_heads": 32, "attention_head_dim": 128},
            "tiny": {**_TINY_HEADS, "in_channels": 4, "out_channels": 4, "num_layers": 2, "text_embed_dim": 24,
                     "time_embed_dim": 16, "condition_dim": 8, "prior_vq_quantizer_codebook_size": 64},
        },
        sizes={"default": Size(1024, 1024), "tiny": Size(96, 80)},
        text_tokens=64,  # glyph tokens: the byte-level tokens of the prompt's quoted text, a few dozen typically
        make_inputs_fn=_glm_image_inputs,
        num_tokens_fn=_image_tokens,
        video=False,
    ),
    FamilySpec(
        name="consisid",
        class_name="ConsisIDTransformer3DModel",
        configs={
            # BestWishYsh/ConsisID-preview transformer/config.json: CogVideoX-5B-I2V widths (48 x 64, 42 blocks, 32
            # input channels, rotary + learned positions) with the face modules; the LFE / cross-attention values are
            # the class defaults (LFE_output_dim 2048 = 2/3 x 3072).
            "full": {"num_attention_heads": 48, "num_layers": 42, "in_channels": 32,
                     "use_rotary_positional_embeddings": True, "use_learned_positional_embeddings": True,
                     "is_train_face": True},
            "tiny": _TINY_CONSISID,
        },
        # ConsisIDPipeline's defaults: 480 x 720, 49 frames (13 latent frames).
        sizes={"default": Size(480, 720, 49), "tiny": Size(48, 80, 9)},
        text_tokens=226,
        make_inputs_fn=_consisid_inputs,
        num_tokens_fn=_cogvideox_tokens,
    ),
    FamilySpec(
        name="cogview3plus",
        class_name="CogView3PlusTransformer2DModel",
        configs={
            "full": {},  # class defaults are THUDM/CogView3-Plus-3B's transformer/config.json (64 x 40, 30 blocks)
            # pos_embed_max_size 16: the sin-cos table covers up to 256 px (16 x 16 patches), the growth sizes included.
            "tiny": {**_TINY_HEADS, "in_channels": 4, "out_channels": 4, "num_layers": 2, "text_embed_dim": 24,
                     "time_embed_dim": 16, "condition_dim": 8, "pos_embed_max_size": 16, "sample_size": 16},
        },
        sizes={"default": Size(1024, 1024), "tiny": Size(96, 80)},
        text_tokens=224,  # CogView3PlusPipeline's max_sequence_length
        make_inputs_fn=_cogview3plus_inputs,
        num_tokens_fn=_image_tokens,
        video=False,
    ),
]
