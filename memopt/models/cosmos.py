"""NVIDIA Cosmos: Cosmos Predict2 Video2World / Text2Image and Cosmos-1.0 Diffusion (one diffusers class); Cosmos 3
Omni."""

from __future__ import annotations

from typing import Any

import torch
from torch._subclasses.fake_tensor import unset_fake_temporarily

from ._spec import _TINY_HEADS, FamilySpec, Inputs, Size, _cfg, _check_divisible, _latent_frames, _randn


# ----------------------------------------------------------------------------------------------- Cosmos
def _cosmos_tokens(config: Any, size: Size) -> int:
    p_t, p_h, p_w = _cfg(config, "patch_size")
    return _latent_frames(size.num_frames, 4) // p_t * (size.height // 8 // p_h) * (size.width // 8 // p_w)


def _cosmos_inputs(config, batch, size, text_tokens, dtype, device, generator, masked) -> Inputs:
    """Cosmos Predict2 Video2World as its pipeline calls the transformer: Wan-VAE latents (B, 16, F', H/8, W/8), the
    condition mask (B, 1, F', H/8, W/8) marking the conditioning frame (the model concatenates it to the latents: the
    release's in_channels 17 = 16 + 1), a per-frame timestep (B, 1, F', 1, 1) (conditioning frames carry their own
    noise level), T5-11B states (1024 wide), fps, and, with ``concat_padding_mask``, the (1, 1, H, W) zero padding mask
    the model resizes to the latent grid with torchvision and concatenates too. ``masked=True`` adds the optional text
    mask (bool, last quarter padded), which the model applies in the text cross-attention (no pipeline passes one)."""
    _check_divisible("cosmos", size, 16)
    frames, height, width = _latent_frames(size.num_frames, 4), size.height // 8, size.width // 8
    if _cfg(config, "extra_pos_embed_type"):
        # Cosmos-1.0's learnable position tables have max_size / patch_size rows per axis.
        rows = [m // p for m, p in zip(_cfg(config, "max_size"), _cfg(config, "patch_size"))]
        needed = [count // p for count, p in zip((frames, height, width), _cfg(config, "patch_size"))]
        if any(n > r for n, r in zip(needed, rows)):
            raise ValueError(f"cosmos: {size.num_frames} frames at {size.height}x{size.width} need {needed} (frames, "
                             f"rows, columns) learnable positions, more than the model's {rows} (max_size)")
    latent_channels = _cfg(config, "in_channels") - 1  # the condition mask is the last input channel
    condition_mask = torch.zeros(batch, 1, frames, height, width, dtype=dtype, device=device)
    condition_mask[:, :, 0] = 1  # the first latent frame is the conditioning image
    timestep = torch.full((batch, 1, frames, 1, 1), 0.9, dtype=dtype, device=device)
    timestep[:, :, 0] = 0.0001 / 1.0001  # sigma_conditioning / (sigma_conditioning + 1)
    inputs: Inputs = {
        "hidden_states": _randn(generator, batch, latent_channels, frames, height, width, dtype=dtype, device=device),
        "timestep": timestep,
        "encoder_hidden_states": _randn(generator, batch, text_tokens, _cfg(config, "text_embed_dim"), dtype=dtype,
                                        device=device),
        "fps": 16,
        "condition_mask": condition_mask,
    }
    if _cfg(config, "concat_padding_mask"):
        inputs["padding_mask"] = torch.zeros(1, 1, size.height, size.width, dtype=dtype, device=device)
    if masked:
        mask = torch.ones(batch, text_tokens, dtype=torch.bool, device=device)
        mask[:, text_tokens - max(1, text_tokens // 4) :] = False
        inputs["attention_mask"] = mask
    return inputs


def _cosmos_init(model: torch.nn.Module) -> None:
    """The learnable position tables (Cosmos-1.0, ``extra_pos_embed_type="learnable"``) are zeros at init."""
    if model.learnable_pos_embed is not None:
        for param in model.learnable_pos_embed.parameters():
            param.normal_(std=0.5)


# ----------------------------------------------------------------------------------------------- Cosmos 3 Omni
_COSMOS3_MODALITY_MARGIN = 15000  # the class default unified_3d_mrope_temporal_modality_margin


def _cosmos3_grid(config: Any, size: Size) -> tuple[int, int, int]:
    """Latent frames and patch rows / columns: the Wan2.2 VAE's 16x spatial, 4x temporal latents in ``p x p`` patches
    (an odd latent side padded, as the model does)."""
    p = _cfg(config, "latent_patch_size")
    return _latent_frames(size.num_frames, 4), -(-size.height // 16 // p), -(-size.width // 16 // p)


def _cosmos3_tokens(config: Any, size: Size) -> int:
    """Generation (video) tokens; the text prefix comes before them in the packed sequence."""
    frames, rows, columns = _cosmos3_grid(config, size)
    return frames * rows * columns


def _cosmos3_inputs(config, batch, size, text_tokens, dtype, device, generator, masked) -> Inputs:
    """One packed sequence as ``Cosmos3OmniPipeline`` builds it for a video (no sound, no action): ``text_tokens``
    causal text tokens, then the ``(1, C, F', H/16, W/16)`` latents in ``p x p`` patches, with float 3-axis mRoPE
    positions (text ``i``; video ``(frame + T + margin, row, column)`` at the base fps). The model takes no batch
    dimension (the pipeline calls it once per guidance branch), so ``batch`` is not used. Text-to-video: every latent
    frame noisy; ``masked=True``: image-to-video, the first frame a clean condition (no timestep, not predicted).

    The forward reads its integer inputs as values (``.tolist()``, ``.item()``), so they are real tensors even when
    built under ``FakeTensorMode`` (planning or simulating at a size): one small int per token."""
    _check_divisible("cosmos3_omni", size, 16)
    with unset_fake_temporarily():
        return _cosmos3_layout(config, size, text_tokens, dtype, device, generator, masked)


def _cosmos3_layout(config, size, text_tokens, dtype, device, generator, masked) -> Inputs:
    frames, rows, columns = _cosmos3_grid(config, size)
    per_frame = rows * columns
    vision = frames * per_frame
    t, h, w = torch.meshgrid(torch.arange(frames), torch.arange(rows), torch.arange(columns), indexing="ij")
    vision_positions = torch.stack([t.flatten() + text_tokens + _COSMOS3_MODALITY_MARGIN, h.flatten(), w.flatten()])
    position_ids = torch.cat([torch.arange(text_tokens).expand(3, -1), vision_positions], dim=1).float()
    noisy = torch.arange(1 if masked and frames > 1 else 0, frames)
    vision_indexes = torch.arange(text_tokens, text_tokens + vision)
    latents = _randn(generator, 1, _cfg(config, "latent_channel"), frames, size.height // 16, size.width // 16,
                     dtype=dtype, device=device)
    return {
        "input_ids": torch.randint(0, _cfg(config, "vocab_size"), (text_tokens,), generator=generator).to(device),
        "text_indexes": torch.arange(text_tokens, device=device),
        "position_ids": position_ids.to(device),
        "und_len": text_tokens,
        "sequence_length": text_tokens + vision,
        "vision_tokens": [latents],
        "vision_token_shapes": [(frames, rows, columns)],
        "vision_sequence_indexes": vision_indexes.to(device),
        "vision_mse_loss_indexes": vision_indexes[noisy[0] * per_frame:].to(device),
        "vision_timesteps": torch.full((len(noisy) * per_frame,), 600.0, dtype=dtype, device=device),
        "vision_noisy_frame_indexes": [noisy.to(device)],
    }


SPECS: list[FamilySpec] = [
    FamilySpec(
        name="cosmos",
        class_name="CosmosTransformer3DModel",
        configs={
            # nvidia/Cosmos-Predict2-2B-Video2World transformer/config.json (diffusers'
            # scripts/convert_cosmos_to_diffusers.py, "Cosmos-2.0-Diffusion-2B-Video2World"): 28 blocks of 16 x 128,
            # T5-11B text (1024), 16 latent channels + the condition mask, the padding mask concatenated inside, no
            # learnable position table.
            "full": {"in_channels": 17, "out_channels": 16, "num_attention_heads": 16, "attention_head_dim": 128,
                     "num_layers": 28, "mlp_ratio": 4.0, "text_embed_dim": 1024, "adaln_lora_dim": 256,
                     "max_size": (128, 240, 240), "patch_size": (1, 2, 2), "rope_scale": (1.0, 3.0, 3.0),
                     "concat_padding_mask": True, "extra_pos_embed_type": None},
            # The padding mask needs torchvision (not installed here): off, so in_channels is 4 latent + 1 condition
            # channel. The learnable position table (Cosmos-1.0) is on, so the per-token extra_pos_emb is exercised.
            "tiny": {**_TINY_HEADS, "in_channels": 5, "out_channels": 4, "num_layers": 2, "mlp_ratio": 2.0,
                     "text_embed_dim": 16, "adaln_lora_dim": 4, "max_size": (4, 32, 32), "patch_size": (1, 2, 2),
                     "rope_scale": (1.0, 3.0, 3.0), "concat_padding_mask": False, "extra_pos_embed_type": "learnable"},
        },
        sizes={"default": Size(704, 1280, 93), "tiny": Size(48, 80, 9)},  # Cosmos2VideoToWorldPipeline defaults
        text_tokens=512,
        make_inputs_fn=_cosmos_inputs,
        num_tokens_fn=_cosmos_tokens,
        mask_key="attention_mask",
        init_fn=_cosmos_init,
    ),
    FamilySpec(
        name="cosmos3_omni",
        class_name="Cosmos3OmniTransformer",
        configs={
            # The class defaults: 36 Qwen3-style decoder layers of width 4096 (32 query heads, 8 K/V heads of 128),
            # each with a text and a generation pathway (own projections, norms and SwiGLU 12288), Wan2.2-VAE latents
            # of 48 channels in 2 x 2 patches, fps-modulated float mRoPE.
            "full": {},
            "tiny": {"head_dim": 8, "hidden_size": 32, "intermediate_size": 48, "num_attention_heads": 4,
                     "num_key_value_heads": 2, "num_hidden_layers": 2, "latent_channel": 4, "patch_latent_dim": 16,
                     "vocab_size": 64, "rope_axes_dim": (2, 1, 1)},
        },
        # Cosmos3OmniPipeline's default video: 720 x 1280, 189 frames (48 latent frames of 23 x 40 patches).
        sizes={"default": Size(720, 1280, 189), "tiny": Size(80, 80, 21)},
        text_tokens=512,  # the system prompt, the chat template and the prompt (no padding)
        make_inputs_fn=_cosmos3_inputs,
        num_tokens_fn=_cosmos3_tokens,
        width_keys=("hidden_size",),
    ),
]
