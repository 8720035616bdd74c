"""QwenImage and Qwen-Image 2.1."""

from __future__ import annotations

from typing import Any

import torch

from ._spec import _TINY_HEADS, FamilySpec, Inputs, Size, _cfg, _check_divisible, _is_tiny, _randn, _text_mask


# ----------------------------------------------------------------------------------------------- QwenImage
def _qwenimage_tokens(config: Any, size: Size) -> int:
    return (size.height // 16) * (size.width // 16)


def _qwenimage_inputs(config, batch, size, text_tokens, dtype, device, generator, masked) -> Inputs:
    """QwenImage: 2x2-packed latents (B, N, 64), Qwen2.5-VL states + encoder_hidden_states_mask, img_shapes."""
    _check_divisible("qwenimage", size, 16)
    h, w = size.height // 16, size.width // 16
    return {
        "hidden_states": _randn(generator, batch, h * w, _cfg(config, "in_channels"), dtype=dtype, device=device),
        "encoder_hidden_states": _randn(generator, batch, text_tokens, _cfg(config, "joint_attention_dim"),
                                        dtype=dtype, device=device),
        "encoder_hidden_states_mask": _text_mask(batch, text_tokens, masked, device),
        "timestep": torch.full((batch,), 0.9, dtype=dtype, device=device),
        "img_shapes": [[(1, h, w)]] * batch,
    }

# ----------------------------------------------------------------------------------------------- Qwen-Image 2.1
def _qwenimage21_tokens(config: Any, size: Size) -> int:
    """The joint sequence the blocks carry (and memopt chunks): the default prompt (8 tokens for test-sized configs,
    which also get a 2-slot condition image and a vision-end token: see ``_qwenimage21_inputs``) and the target's
    ``H / 16 x W / 16`` latent tokens."""
    text = 8 + 1 + 8 if _is_tiny(config) else 256
    return text + (size.height // 16) * (size.width // 16)


def _qwenimage21_inputs(config, batch, size, text_tokens, dtype, device, generator, masked) -> Inputs:
    """Qwen-Image 2.1: unpatched latents (B, N, 64), Qwen-VL states over the vision-language sequence, img_mask.

    As the pipeline builds them: ``img_mask`` marks the vision-language sequence's image slots (one per 2x2 latent
    tokens) and ends with ``N / 4`` slots for the target image; ``encoder_hidden_states`` (and its mask) cover the
    vision-language sequence without the target slots. Test-sized configs get the editing layout, a condition image
    inside the prompt (``text_tokens / 2`` prompt tokens, 2 image slots = a (1, 2, 4) latent grid, a vision-end token,
    the other prompt tokens), so the block-causal prefix has text / image / text segments and the joint sequence
    ``text_tokens + 1 + 8 + N`` is odd; full-size ones the text-to-image layout (prompt, then the target).
    ``masked`` pads the last quarter of the prompt tokens out, as the pipeline right-pads a batch's shorter prompts.
    """
    _check_divisible("qwenimage21", size, 32)  # the pipeline's multiple: the latent grid has even sides
    h, w = size.height // 16, size.width // 16
    condition = [(1, 2, 4)] if _is_tiny(config) else []
    head = text_tokens // 2
    slots = [False] * text_tokens
    if condition:
        slots = [False] * head + [True] * (8 // 4) + [False] * (1 + text_tokens - head)
    vlm_tokens = len(slots)
    img_mask = torch.tensor(slots + [True] * (h * w // 4), device=device).expand(batch, -1)
    text_mask = torch.ones(batch, vlm_tokens, dtype=torch.long, device=device)
    if masked:
        text_mask[:, vlm_tokens - max(1, text_tokens // 4):] = 0
    image_tokens = sum(c * a * b for c, a, b in condition) + h * w
    return {
        "hidden_states": _randn(generator, batch, image_tokens, _cfg(config, "in_channels"), dtype=dtype,
                                device=device),  # condition latents first, the target's last
        "encoder_hidden_states": _randn(generator, batch, vlm_tokens, _cfg(config, "context_in_dim"), dtype=dtype,
                                        device=device),
        "encoder_hidden_states_mask": text_mask if masked else _text_mask(batch, vlm_tokens, False, device),
        "timestep": torch.full((batch,), 0.9, dtype=dtype, device=device),  # the pipeline's t / 1000
        "img_shapes": [[*condition, (1, h, w)]] * batch,
        "img_mask": img_mask,
    }


SPECS: list[FamilySpec] = [
    FamilySpec(
        name="qwenimage",
        class_name="QwenImageTransformer2DModel",
        configs={
            "full": {},  # class defaults are Qwen-Image (20B)
            "tiny": {**_TINY_HEADS, "in_channels": 16, "out_channels": 4, "num_layers": 2,
                     "joint_attention_dim": 24, "axes_dims_rope": (4, 6, 6)},
        },
        sizes={"default": Size(1328, 1328), "tiny": Size(96, 80)},
        text_tokens=256,
        make_inputs_fn=_qwenimage_inputs,
        num_tokens_fn=_qwenimage_tokens,
        mask_key="encoder_hidden_states_mask",
        video=False,
    ),
    FamilySpec(
        name="qwenimage21",
        class_name="QwenImage21Transformer2DModel",
        configs={
            "full": {},  # class defaults are Qwen-Image 2.1 (32 single-stream layers, 32 x 128, SwiGLU 3x)
            "tiny": {"num_attention_heads": 2, "attention_head_dim": 16, "in_channels": 16, "out_channels": 16,
                     "num_layers": 2, "context_in_dim": 24, "axes_dims_rope": (4, 6, 6)},
        },
        sizes={"default": Size(1024, 1024), "tiny": Size(64, 96)},  # pipeline's output_resolution=1024
        text_tokens=256,
        make_inputs_fn=_qwenimage21_inputs,
        num_tokens_fn=_qwenimage21_tokens,
        mask_key="encoder_hidden_states_mask",
        video=False,
    ),
]
