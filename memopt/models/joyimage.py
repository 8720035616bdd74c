"""JoyAI-Image-Edit and JoyAI-Image-Edit-Plus: dual-stream MMDiTs (image and text streams, one joint attention over
cat(image, text)) with Wan-style modulation tables, on Wan-VAE latents; Plus runs a flat sequence of independently
patchified items (the target, then the reference images at their own resolutions), padded per batch."""

from __future__ import annotations

from typing import Any

import torch

from ._spec import FamilySpec, Inputs, Size, _cfg, _check_divisible, _randn, _text_mask

_JOYIMAGE_VAE_FACTOR = 8  # AutoencoderKLWan: 8x spatial, 16 latent channels (one latent frame per image)


def _joyimage_tokens(config: Any, size: Size) -> int:
    """Image tokens of one item (the target latents): ``patch_size`` (1, 2, 2) patches of the 8x-downsampled
    latents. The text tokens follow them in the joint attention. Reference-image editing stacks the reference as a
    second item of the same size (twice the tokens)."""
    _, ph, pw = _cfg(config, "patch_size")
    return (size.height // _JOYIMAGE_VAE_FACTOR // ph) * (size.width // _JOYIMAGE_VAE_FACTOR // pw)


def _joyimage_inputs(config, batch, size, text_tokens, dtype, device, generator, masked) -> Inputs:
    """JoyAI-Image-Edit as ``JoyImageEditPipeline`` calls the transformer for text-to-image (no reference image):
    latents ``(B, num_items = 1, 16, 1, H/8, W/8)``, the Qwen3-VL prompt states ``(B, L, 4096)`` and the ``(B,)``
    timestep. The pipeline passes no text mask (the prompt states are cut to the longest prompt), so ``masked``
    changes nothing. With a reference image the pipeline passes two items of the target's size (reference first,
    which the model rotates to the end), which doubles the image tokens: see :func:`joyimage_edit_inputs`."""
    return joyimage_edit_inputs(config, batch, size, text_tokens, dtype, device, generator, items=1)


def joyimage_edit_inputs(config, batch, size, text_tokens, dtype, device, generator, items: int = 2) -> Inputs:
    """The transformer's inputs with ``items`` latent items (2: the pipeline's reference-image editing)."""
    _check_divisible("joyimage_edit", size, _JOYIMAGE_VAE_FACTOR * 2)
    return {
        "hidden_states": _randn(generator, batch, items, _cfg(config, "in_channels"), 1,
                                size.height // _JOYIMAGE_VAE_FACTOR, size.width // _JOYIMAGE_VAE_FACTOR, dtype=dtype,
                                device=device),
        "timestep": torch.full((batch,), 500.0, dtype=dtype, device=device),
        "encoder_hidden_states": _randn(generator, batch, text_tokens, _cfg(config, "text_dim"), dtype=dtype,
                                        device=device),
    }


def _joyimage_plus_grids(config: Any, size: Size) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """``(t, h, w)`` patch grids of the target and of the one reference image: the reference one patch column
    narrower than the target (references keep their own resolution; this also makes the tiny token counts odd)."""
    _, ph, pw = _cfg(config, "patch_size")
    rows, columns = size.height // _JOYIMAGE_VAE_FACTOR // ph, size.width // _JOYIMAGE_VAE_FACTOR // pw
    return (1, rows, columns), (1, rows, columns - 1)


def _joyimage_plus_tokens(config: Any, size: Size) -> int:
    """Image tokens: the target's patches, then the reference's (the padded ``max_patches`` of the batch). The text
    tokens follow them in the joint attention."""
    return sum(t * h * w for t, h, w in _joyimage_plus_grids(config, size))


def _joyimage_plus_inputs(config, batch, size, text_tokens, dtype, device, generator, masked) -> Inputs:
    """JoyAI-Image-Edit-Plus as ``JoyImageEditPlusPipeline`` calls the transformer: ``(B, max_patches, 16, 1, 2, 2)``
    patches (target first, then one reference image), the Qwen3-VL prompt states ``(B, L, 4096)`` with their
    ``(B, L)`` mask, ``shape_list`` (each sample's ``(t, h, w)`` patch grids) and the ``(B,)`` timestep.
    ``masked=True`` pads the last quarter of the text tokens out and gives the odd samples a reference half as high
    (their last patches are padding, masked out as keys by the model)."""
    _check_divisible("joyimage_edit_plus", size, _JOYIMAGE_VAE_FACTOR * 2)
    pt, ph, pw = _cfg(config, "patch_size")
    target, reference = _joyimage_plus_grids(config, size)
    short = (reference[0], max(1, reference[1] // 2), reference[2])
    shape_list = [[target, short if masked and i % 2 else reference] for i in range(batch)]
    max_patches = _joyimage_plus_tokens(config, size)
    patches = _randn(generator, batch, max_patches, _cfg(config, "in_channels"), pt, ph, pw, dtype=dtype,
                     device=device)
    for i, shapes in enumerate(shape_list):
        patches[i, sum(t * h * w for t, h, w in shapes):] = 0  # the pipeline pads with zeros
    return {
        "hidden_states": patches,
        "timestep": torch.full((batch,), 500.0, dtype=dtype, device=device),
        "encoder_hidden_states": _randn(generator, batch, text_tokens, _cfg(config, "text_dim"), dtype=dtype,
                                        device=device),
        "encoder_hidden_states_mask": _text_mask(batch, text_tokens, masked, device),
        "shape_list": shape_list,
    }


# jdopensource/JoyAI-Image-Edit-Diffusers transformer/config.json (as mirrored by vllm-omni's JoyAI loader): hidden 4096
# (32 heads of 128), 40 layers, MLP ratio 4, 16 latent channels, patch (1, 2, 2), 4096-wide Qwen3-VL states, rope "rope"
# with axes (16, 56, 56), theta 10000; the class defaults (3072 wide, 20 layers, theta 256) are not the release. Plus
# shares the layout (trained from the same base).
_JOYIMAGE_CONFIGS = {
    "full": {"hidden_size": 4096, "num_attention_heads": 32, "num_layers": 40, "mlp_width_ratio": 4.0,
             "in_channels": 16, "out_channels": 16, "patch_size": [1, 2, 2], "text_dim": 4096,
             "rope_dim_list": [16, 56, 56], "rope_type": "rope", "theta": 10000},
    "tiny": {"hidden_size": 32, "num_attention_heads": 2, "num_layers": 2, "mlp_width_ratio": 2.0,
             "in_channels": 4, "out_channels": 4, "patch_size": [1, 2, 2], "text_dim": 16, "rope_dim_list": [4, 6, 6]},
}

SPECS: list[FamilySpec] = [
    FamilySpec(
        name="joyimage_edit",
        class_name="JoyImageEditTransformer3DModel",
        configs=_JOYIMAGE_CONFIGS,
        sizes={"default": Size(1024, 1024), "tiny": Size(80, 112)},
        # The pipeline keeps each prompt's tokens (system template + instruction, the Qwen3-VL image tokens of the
        # reference when editing) up to max_sequence_length 4096, padded to the longest; 512 stands for a typical
        # prompt.
        text_tokens=512,
        make_inputs_fn=_joyimage_inputs,
        num_tokens_fn=_joyimage_tokens,
        video=False,
        width_keys=("hidden_size",),
    ),
    FamilySpec(
        name="joyimage_edit_plus",
        class_name="JoyImageEditPlusTransformer3DModel",
        configs=_JOYIMAGE_CONFIGS,
        # 1024 x 1024 target + a 1024 x 1008 reference: 4096 + 4032 = 8128 image tokens.
        sizes={"default": Size(1024, 1024), "tiny": Size(80, 112)},
        text_tokens=512,  # prompt template + instruction + the Qwen3-VL tokens of the reference images
        make_inputs_fn=_joyimage_plus_inputs,
        num_tokens_fn=_joyimage_plus_tokens,
        video=False,
        mask_key="encoder_hidden_states_mask",
        width_keys=("hidden_size",),
    ),
]
