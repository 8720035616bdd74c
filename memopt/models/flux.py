"""Flux and its relatives: FLUX.2, FLUX.3, Chroma, Bria, LongCat-Image, Ovis-Image."""

from __future__ import annotations

from typing import Any

import torch

from ._spec import _TINY_HEADS, FamilySpec, Inputs, Size, _cfg, _check_divisible, _grid_ids, _randn


# ----------------------------------------------------------------------------------------------- Flux
def _flux_tokens(config: Any, size: Size) -> int:
    return (size.height // 16) * (size.width // 16)


def _flux_inputs(config, batch, size, text_tokens, dtype, device, generator, masked) -> Inputs:
    """Flux: 2x2-packed latents (B, N, 64), T5 states, pooled CLIP, position ids, guidance for dev."""
    _check_divisible("flux", size, 16)
    h, w = size.height // 16, size.width // 16
    inputs = {
        "hidden_states": _randn(generator, batch, h * w, _cfg(config, "in_channels"), dtype=dtype, device=device),
        "encoder_hidden_states": _randn(generator, batch, text_tokens, _cfg(config, "joint_attention_dim"),
                                        dtype=dtype, device=device),
        "pooled_projections": _randn(generator, batch, _cfg(config, "pooled_projection_dim"), dtype=dtype,
                                     device=device),
        "timestep": torch.full((batch,), 0.9, dtype=dtype, device=device),
        "img_ids": _grid_ids(h, w, 3).to(device=device, dtype=dtype),
        "txt_ids": torch.zeros(text_tokens, 3, device=device, dtype=dtype),
    }
    if _cfg(config, "guidance_embeds"):
        inputs["guidance"] = torch.full((batch,), 3.5, dtype=torch.float32, device=device)
    return inputs

# ----------------------------------------------------------------------------------------------- FLUX.2
def _flux2_tokens(config: Any, size: Size) -> int:
    return (size.height // 16) * (size.width // 16)


def _flux2_inputs(config, batch, size, text_tokens, dtype, device, generator, masked) -> Inputs:
    """FLUX.2: 2x2-patchified latents (B, N, 128) (32 VAE channels x 4), Mistral-Small-3.1 states (3 layers
    stacked: 15360), timestep in [0, 1] (the model scales it by 1000), guidance for dev, and 4-axis (t, h, w, l)
    position ids as the pipeline builds them: (B, N, 4) for the image, (B, T, 4) with l = token index for the text.
    No text mask: the forward takes none."""
    _check_divisible("flux2", size, 16)
    h, w = size.height // 16, size.width // 16
    txt_ids = torch.zeros(text_tokens, 4, dtype=torch.long)
    txt_ids[:, 3] = torch.arange(text_tokens)
    inputs = {
        "hidden_states": _randn(generator, batch, h * w, _cfg(config, "in_channels"), dtype=dtype, device=device),
        "encoder_hidden_states": _randn(generator, batch, text_tokens, _cfg(config, "joint_attention_dim"),
                                        dtype=dtype, device=device),
        "timestep": torch.full((batch,), 0.9, dtype=dtype, device=device),
        "img_ids": _grid_ids(h, w, 4, torch.long)[None].expand(batch, -1, -1).to(device),
        "txt_ids": txt_ids.reshape(1, text_tokens, 4).expand(batch, -1, -1).to(device),
    }
    if _cfg(config, "guidance_embeds"):
        inputs["guidance"] = torch.full((batch,), 4.0, dtype=torch.float32, device=device)
    return inputs

# ----------------------------------------------------------------------------------------------- FLUX.3
def _flux3_grid_ids(height: int, width: int, image_rope_scale: float = 0.5, l_coord: int = 0) -> torch.Tensor:
    """``(height x width, 4)`` fp32 (t, h, w, l) ids as the modular pipeline's ``_prepare_image_ids`` builds them:
    t = 0, rows and columns scaled by the image RoPE scale (0.5), l = 0 for the generated image, -1 - i for the i-th
    reference image."""
    ids = torch.cartesian_prod(torch.arange(1), torch.arange(height), torch.arange(width),
                               torch.tensor([l_coord])).to(torch.float32)
    ids[:, 1:3] = ids[:, 1:3] * image_rope_scale
    return ids


def _flux3_tokens(config: Any, size: Size) -> int:
    return (size.height // 16) * (size.width // 16)


def _flux3_inputs(config, batch, size, text_tokens, dtype, device, generator, masked) -> Inputs:
    """FLUX.3 text-to-image: 2x2-patchified latents (B, N, 128), stacked Qwen3-VL states (8 layers: 20480), timestep
    in [0, 1] (the model scales it by 1000), and 4-axis (t, h, w, l) fp32 ids shared by the batch: (N, 4) for the
    image, (T, 4) with l = token index for the text. No text mask: the forward takes none (the pipeline pads the
    prompt window to a multiple of 80 tokens and lets the transformer attend to the padding). ``target_timestep``
    for flow-map (step-distilled) configs. See :func:`flux3_reference_inputs` for image-to-image."""
    _check_divisible("flux3", size, 16)
    h, w = size.height // 16, size.width // 16
    txt_ids = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1),
                                   torch.arange(text_tokens)).to(torch.float32)
    inputs = {
        "hidden_states": _randn(generator, batch, h * w, _cfg(config, "in_channels"), dtype=dtype, device=device),
        "encoder_hidden_states": _randn(generator, batch, text_tokens, _cfg(config, "joint_attention_dim"),
                                        dtype=dtype, device=device),
        "timestep": torch.full((batch,), 0.9, dtype=dtype, device=device),
        "img_ids": _flux3_grid_ids(h, w).to(device=device, dtype=dtype),
        "txt_ids": txt_ids.to(device=device, dtype=dtype),
    }
    if _cfg(config, "flow_map"):
        inputs["target_timestep"] = torch.full((batch,), 0.8, dtype=dtype, device=device)
    return inputs


def flux3_reference_inputs(config: Any, inputs: Inputs, size: Size, num_images: int = 1, seed: int = 1) -> Inputs:
    """``inputs`` plus ``num_images`` VAE-encoded reference images of ``size`` (image-to-image), as the pipeline's
    ``Flux3PrepareImageLatentsStep`` passes them: tokens concatenated, ids with l = -1 - index."""
    _check_divisible("flux3", size, 16)
    h, w = size.height // 16, size.width // 16
    hidden = inputs["hidden_states"]
    generator = torch.Generator("cpu").manual_seed(seed)
    cond = _randn(generator, hidden.shape[0], num_images * h * w, _cfg(config, "cond_in_channels"),
                  dtype=hidden.dtype, device=hidden.device)
    ids = torch.cat([_flux3_grid_ids(h, w, l_coord=-(1 + index)) for index in range(num_images)])
    return {**inputs, "image_cond_hidden_states": cond,
            "image_cond_ids": ids.to(device=hidden.device, dtype=inputs["img_ids"].dtype)}

# ----------------------------------------------------------------------------------------------- Bria
def _bria_tokens(config: Any, size: Size) -> int:
    return (size.height // 16) * (size.width // 16)


def _bria_inputs(config, batch, size, text_tokens, dtype, device, generator, masked) -> Inputs:
    """Bria 3.x: 2x2-packed latents (B, N, 4 x 4) of its 4-channel VAE (8x), T5 states, position ids.

    No pooled projection, no guidance embedding and no text mask: ``BriaPipeline`` zero-pads the T5 states of a short
    prompt to ``max_sequence_length`` (128) instead, which ``masked`` reproduces on the last quarter of the text. The
    timestep is the scheduler's, in [0, 1000] (not divided by 1000 as Flux's pipeline does).
    """
    _check_divisible("bria", size, 16)
    h, w = size.height // 16, size.width // 16
    text = _randn(generator, batch, text_tokens, _cfg(config, "joint_attention_dim"), dtype=dtype, device=device)
    if masked:
        text[:, text_tokens - max(1, text_tokens // 4) :] = 0
    return {
        "hidden_states": _randn(generator, batch, h * w, _cfg(config, "in_channels"), dtype=dtype, device=device),
        "encoder_hidden_states": text,
        "timestep": torch.full((batch,), 900.0, dtype=dtype, device=device),
        "img_ids": _grid_ids(h, w, 3).to(device=device, dtype=dtype),
        "txt_ids": torch.zeros(text_tokens, 3, device=device, dtype=dtype),
    }

# ----------------------------------------------------------------------------------------------- Chroma
def _chroma_tokens(config: Any, size: Size) -> int:
    return (size.height // 16) * (size.width // 16)


def _chroma_inputs(config, batch, size, text_tokens, dtype, device, generator, masked) -> Inputs:
    """Chroma: 2x2-packed latents (B, N, 64), T5 states, position ids, and the pipeline's attention mask.

    ``ChromaPipeline`` passes a ``(B, text + image)`` mask in the latents' dtype: ones for the prompt's tokens and the
    first padding token, zeros for the other padding, ones for every image token (``_prepare_attention_mask``). The
    blocks turn it into the query-dependent ``m[q] * m[k]``. ``masked`` pads the last quarter of the text out.
    """
    _check_divisible("chroma", size, 16)
    h, w = size.height // 16, size.width // 16
    prompt_tokens = text_tokens - max(1, text_tokens // 4) if masked else text_tokens
    text_mask = (torch.arange(text_tokens) <= prompt_tokens).to(dtype)  # the pipeline keeps one padding token
    mask = torch.cat([text_mask, torch.ones(h * w, dtype=dtype)]).expand(batch, -1).contiguous()
    return {
        "hidden_states": _randn(generator, batch, h * w, _cfg(config, "in_channels"), dtype=dtype, device=device),
        "encoder_hidden_states": _randn(generator, batch, text_tokens, _cfg(config, "joint_attention_dim"),
                                        dtype=dtype, device=device),
        "timestep": torch.full((batch,), 0.9, dtype=dtype, device=device),  # the pipeline passes t / 1000
        "img_ids": _grid_ids(h, w, 3).to(device=device, dtype=dtype),
        "txt_ids": torch.zeros(text_tokens, 3, device=device, dtype=dtype),
        "attention_mask": mask.to(device),
    }


# ----------------------------------------------------------------------------------------------- LongCat-Image
def _longcat_image_ids(height: int, width: int, text_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(image ids (h x w, 3), text ids (T, 3))`` as ``LongCatImagePipeline``'s ``prepare_pos_ids`` builds them:
    text tokens ``(0, i, i)``, image tokens ``(1, T + row, T + column)`` (the grid starts after the text window)."""
    text = torch.arange(text_tokens, dtype=torch.float32)
    txt_ids = torch.stack([torch.zeros(text_tokens), text, text], dim=-1)
    img_ids = torch.ones(height, width, 3)
    img_ids[..., 1] = text_tokens + torch.arange(height)[:, None]
    img_ids[..., 2] = text_tokens + torch.arange(width)[None, :]
    return img_ids.reshape(height * width, 3), txt_ids


def _longcat_image_inputs(config, batch, size, text_tokens, dtype, device, generator, masked) -> Inputs:
    """LongCat-Image: 2x2-packed latents (B, N, 64), Qwen2.5-VL states (3584), timestep in [0, 1] (the model scales
    it by 1000), 3-axis (modality, row, column) position ids.

    No pooled projection (``pooled_projection_dim`` is stored, never used), no guidance embedding (``guidance`` is
    accepted and ignored) and no text mask: the pipeline pads the prompt to 512 tokens and passes the encoder's states
    of the padding tokens (not zeroed), so ``masked`` changes nothing.
    """
    _check_divisible("longcat_image", size, 16)
    h, w = size.height // 16, size.width // 16
    img_ids, txt_ids = _longcat_image_ids(h, w, text_tokens)
    return {
        "hidden_states": _randn(generator, batch, h * w, _cfg(config, "in_channels"), dtype=dtype, device=device),
        "encoder_hidden_states": _randn(generator, batch, text_tokens, _cfg(config, "joint_attention_dim"),
                                        dtype=dtype, device=device),
        "timestep": torch.full((batch,), 0.9, dtype=dtype, device=device),  # the pipeline passes t / 1000
        "img_ids": img_ids.to(device=device, dtype=dtype),
        "txt_ids": txt_ids.to(device=device, dtype=dtype),
    }


# ----------------------------------------------------------------------------------------------- Ovis-Image
def _ovis_image_inputs(config, batch, size, text_tokens, dtype, device, generator, masked) -> Inputs:
    """Ovis-Image: 2x2-packed latents (B, N, 64), Ovis-U1 (Qwen3) states (2048), timestep in [0, 1] (the model scales
    it by 1000), position ids: text ``(0, i, i)``, image ``(0, row, column)``.

    No pooled projection, no guidance and no text mask: ``OvisImagePipeline`` pads the prompt to
    ``max_sequence_length`` (256) and multiplies the states by the tokenizer mask (padding states are zeros), which
    ``masked`` reproduces on the last quarter of the text.
    """
    _check_divisible("ovis_image", size, 16)
    h, w = size.height // 16, size.width // 16
    text = _randn(generator, batch, text_tokens, _cfg(config, "joint_attention_dim"), dtype=dtype, device=device)
    if masked:
        text[:, text_tokens - max(1, text_tokens // 4) :] = 0
    txt_ids = torch.zeros(text_tokens, 3)
    txt_ids[:, 1] = txt_ids[:, 2] = torch.arange(text_tokens, dtype=torch.float32)
    return {
        "hidden_states": _randn(generator, batch, h * w, _cfg(config, "in_channels"), dtype=dtype, device=device),
        "encoder_hidden_states": text,
        "timestep": torch.full((batch,), 0.9, dtype=dtype, device=device),  # the pipeline passes t / 1000
        "img_ids": _grid_ids(h, w, 3).to(device=device, dtype=dtype),
        "txt_ids": txt_ids.to(device=device, dtype=dtype),
    }


def _bria_fibo_tokens(config: Any, size: Size) -> int:
    """Latents of the Wan 2.2 VAE (16x, 48 channels), one token per ``patch_size`` x ``patch_size`` latent pixels
    (the pipeline's default ``do_patching=False`` with patch size 1)."""
    p = _cfg(config, "patch_size")
    return (size.height // 16 // p) * (size.width // 16 // p)


def _bria_fibo_inputs(config, batch, size, text_tokens, dtype, device, generator, masked) -> Inputs:
    """Bria FIBO: latent tokens (B, N, 48) of the Wan 2.2 VAE (16x, not patched), SmolLM3 states (the last two layers
    concatenated: 2 x 2048) plus one SmolLM3 layer per block (``text_encoder_layers``, 2048 wide, projected to D / 2
    per block), position ids, a timestep in [0, 1000] (the scheduler's, passed as is).

    The mask is not a forward argument of its own: ``BriaFiboPipeline`` pads a batch of prompts to the longest and
    then passes a bool key-padding mask ``(B, 1, 1, text + image)`` as ``joint_attention_kwargs["attention_mask"]``
    (only when something is padded). ``masked`` pads the last quarter of the text out that way (and zeroes those
    states, as ``pad_embedding`` does).
    """
    _check_divisible("bria_fibo", size, 16 * _cfg(config, "patch_size"))
    p = _cfg(config, "patch_size")
    h, w = size.height // 16 // p, size.width // 16 // p
    layers = _cfg(config, "num_layers") + _cfg(config, "num_single_layers")
    text = _randn(generator, batch, text_tokens, _cfg(config, "joint_attention_dim"), dtype=dtype, device=device)
    text_layers = [_randn(generator, batch, text_tokens, _cfg(config, "text_encoder_dim"), dtype=dtype, device=device)
                   for _ in range(layers)]
    valid = torch.ones(batch, text_tokens + h * w, dtype=torch.bool, device=device)
    if masked:
        pad = slice(text_tokens - max(1, text_tokens // 4), text_tokens)
        valid[:, pad] = False
        text[:, pad] = 0
    inputs = {
        "hidden_states": _randn(generator, batch, h * w, _cfg(config, "in_channels"), dtype=dtype, device=device),
        "encoder_hidden_states": text,
        "text_encoder_layers": text_layers,
        "timestep": torch.full((batch,), 900.0, dtype=dtype, device=device),
        "img_ids": _grid_ids(h, w, 3).to(device=device, dtype=dtype),
        "txt_ids": torch.zeros(text_tokens, 3, device=device, dtype=dtype),
    }
    if masked:
        inputs["joint_attention_kwargs"] = {"attention_mask": valid[:, None, None, :]}
    return inputs


SPECS: list[FamilySpec] = [
    FamilySpec(
        name="flux",
        class_name="FluxTransformer2DModel",
        configs={
            "full": {"guidance_embeds": True},  # FLUX.1-dev
            "tiny": {**_TINY_HEADS, "in_channels": 16, "num_layers": 1, "num_single_layers": 2,
                     "joint_attention_dim": 24, "pooled_projection_dim": 12, "guidance_embeds": True,
                     "axes_dims_rope": (4, 6, 6)},
        },
        sizes={"default": Size(1024, 1024), "tiny": Size(96, 80)},
        text_tokens=512,
        make_inputs_fn=_flux_inputs,
        num_tokens_fn=_flux_tokens,
        video=False,
    ),
    FamilySpec(
        name="flux2",
        class_name="Flux2Transformer2DModel",
        configs={
            "full": {},  # class defaults are FLUX.2-dev (32B: 8 double-stream + 48 single-stream blocks, 48 x 128)
            "tiny": {**_TINY_HEADS, "in_channels": 16, "num_layers": 1, "num_single_layers": 2,
                     "joint_attention_dim": 24, "timestep_guidance_channels": 16, "axes_dims_rope": (4, 4, 4, 4)},
        },
        sizes={"default": Size(1024, 1024), "tiny": Size(96, 80)},
        text_tokens=512,
        make_inputs_fn=_flux2_inputs,
        num_tokens_fn=_flux2_tokens,
        video=False,
    ),
    FamilySpec(
        name="flux3",
        class_name="Flux3Transformer2DModel",
        configs={
            # class defaults are FLUX.3 (5 per-mode + 28 joint single blocks, 24 x 128; the distilled
            # checkpoints add flow_map=True)
            "full": {},
            "tiny": {**_TINY_HEADS, "in_channels": 16, "cond_in_channels": 16, "num_layers": 1,
                     "num_single_layers": 2, "joint_attention_dim": 24, "timestep_channels": 16,
                     "axes_dims_rope": (4, 4, 4, 4)},
        },
        sizes={"default": Size(1024, 1024), "tiny": Size(96, 80)},
        text_tokens=480,  # the prompt window is padded to a multiple of 80 tokens (Flux3TextEncoderStep)
        make_inputs_fn=_flux3_inputs,
        num_tokens_fn=_flux3_tokens,
        video=False,
    ),
    FamilySpec(
        name="chroma",
        class_name="ChromaTransformer2DModel",
        configs={
            "full": {},  # class defaults are Chroma1-HD (8.9B)
            "tiny": {**_TINY_HEADS, "in_channels": 16, "num_layers": 1, "num_single_layers": 2,
                     "joint_attention_dim": 24, "axes_dims_rope": (4, 6, 6), "approximator_num_channels": 16,
                     "approximator_hidden_dim": 32, "approximator_layers": 2},
        },
        sizes={"default": Size(1024, 1024), "tiny": Size(96, 80)},
        text_tokens=512,
        make_inputs_fn=_chroma_inputs,
        num_tokens_fn=_chroma_tokens,
        video=False,
        mask_key="attention_mask",
    ),
    FamilySpec(
        name="bria",
        class_name="BriaTransformer2DModel",
        configs={
            # BRIA-3.2 transformer/config.json (4B: 8 double-stream + 28 single-stream blocks, 24 x 96)
            "full": {"in_channels": 16, "num_layers": 8, "num_single_layers": 28, "attention_head_dim": 96,
                     "num_attention_heads": 24, "joint_attention_dim": 4096, "axes_dims_rope": (0, 48, 48)},
            "tiny": {**_TINY_HEADS, "in_channels": 16, "num_layers": 1, "num_single_layers": 2,
                     "joint_attention_dim": 24, "axes_dims_rope": (4, 6, 6)},
        },
        sizes={"default": Size(1024, 1024), "tiny": Size(96, 80)},
        text_tokens=128,  # BriaPipeline's max_sequence_length
        make_inputs_fn=_bria_inputs,
        num_tokens_fn=_bria_tokens,
        video=False,
    ),
    FamilySpec(
        name="longcat_image",
        class_name="LongCatImageTransformer2DModel",
        configs={
            # LongCat-Image's transformer (6B: 10 double-stream + 20 single-stream blocks, 24 x 128; from public ports
            # of its config.json, which could not be read here); the class defaults are Flux.1's depth (19 + 38)
            "full": {"num_layers": 10, "num_single_layers": 20},
            "tiny": {**_TINY_HEADS, "in_channels": 16, "num_layers": 1, "num_single_layers": 2,
                     "joint_attention_dim": 24, "pooled_projection_dim": 24, "axes_dims_rope": (4, 6, 6)},
        },
        sizes={"default": Size(1024, 1024), "tiny": Size(96, 80)},  # the pipeline's default_sample_size 128 x VAE 8
        text_tokens=512,  # LongCatImagePipeline.tokenizer_max_length: the prompt is padded to it
        make_inputs_fn=_longcat_image_inputs,
        num_tokens_fn=_flux_tokens,
        video=False,
    ),
    FamilySpec(
        name="ovis_image",
        class_name="OvisImageTransformer2DModel",
        configs={
            # The class defaults: Ovis-Image-7B's transformer (6 double + 27 single blocks, 24 x 128, SwiGLU MLPs)
            "full": {},
            "tiny": {**_TINY_HEADS, "in_channels": 16, "out_channels": 16, "num_layers": 1, "num_single_layers": 2,
                     "joint_attention_dim": 24, "axes_dims_rope": (4, 6, 6)},
        },
        sizes={"default": Size(1024, 1024), "tiny": Size(96, 80)},  # the pipeline's default_sample_size 128 x VAE 8
        text_tokens=256,  # OvisImagePipeline's max_sequence_length (its maximum too)
        make_inputs_fn=_ovis_image_inputs,
        num_tokens_fn=_flux_tokens,
        video=False,
    ),
    FamilySpec(
        name="bria_fibo",
        class_name="BriaFiboTransformer2DModel",
        configs={
            # briaai/FIBO transformer (8B: 8 double-stream + 38 single-stream blocks, 24 x 128, the Wan 2.2 VAE's 48
            # latent channels unpatched, SmolLM3-3B text states: 2 x 2048 joint, 2048 per block). Its config.json could
            # not be read here: the class defaults (Flux.1's 19 + 38 blocks, 64 channels) are not the release.
            "full": {"in_channels": 48, "num_layers": 8, "num_single_layers": 38},
            "tiny": {**_TINY_HEADS, "in_channels": 16, "num_layers": 1, "num_single_layers": 2,
                     "joint_attention_dim": 24, "text_encoder_dim": 12, "axes_dims_rope": (4, 6, 6)},
        },
        sizes={"default": Size(1024, 1024), "tiny": Size(96, 80)},  # default_sample_size 64 x VAE 16
        text_tokens=1024,  # prompts are padded to the batch's longest; FIBO's structured JSON prompts run ~1k tokens
        make_inputs_fn=_bria_fibo_inputs,
        num_tokens_fn=_bria_fibo_tokens,
        video=False,
        mask_key="joint_attention_kwargs",  # {"attention_mask": (B, 1, 1, text + image) bool}
    ),
]
