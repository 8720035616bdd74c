"""PixArt-Sigma and PixArt-Alpha."""

from __future__ import annotations

from typing import Any

import torch

from ._spec import _TINY_HEADS, FamilySpec, Inputs, Size, _cfg, _cfg_or, _check_divisible, _randn, _text_mask


# ----------------------------------------------------------------------------------------------- PixArt
def _pixart_tokens(config: Any, size: Size) -> int:
    p = _cfg(config, "patch_size")
    return (size.height // 8 // p) * (size.width // 8 // p)


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
        "encoder_hidden_states": _randn(generator, batch, text_tokens, _cfg(config, "caption_channels"), dtype=dtype,
                                        device=device),
        "encoder_attention_mask": _text_mask(batch, text_tokens, masked, device),
        "timestep": torch.full((batch,), 999, dtype=torch.long, device=device),
        "added_cond_kwargs": added,
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
        num_tokens_fn=_pixart_tokens,
        video=False,
        mask_key="encoder_attention_mask",
    ),
]
