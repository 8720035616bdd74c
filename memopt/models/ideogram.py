"""Ideogram 4: single-stream blocks over one packed ``[left padding | text | image]`` sequence."""

from __future__ import annotations

from typing import Any

import torch

from ._spec import _TINY_HEADS, FamilySpec, Inputs, Size, _cfg, _check_divisible, _grid_ids, _randn

# The indicator and position-offset values Ideogram4Pipeline._prepare_ids packs the sequence with.
_TEXT, _IMAGE, _PADDING_SEGMENT, _IMAGE_POSITION_OFFSET = 3, 2, -1, 65536


def _ideogram4_tokens(config: Any, size: Size) -> int:
    """Image tokens: 2x2 patches of the 8x-downsampled latents (``vae_scale_factor * patch_size = 16``). The blocks
    carry them after the pipeline's ``max_sequence_length`` text slots, in one sequence."""
    return (size.height // 16) * (size.width // 16)


def _ideogram4_inputs(config, batch, size, text_tokens, dtype, device, generator, masked) -> Inputs:
    """The conditional pass of ``Ideogram4Pipeline``: every input is over the packed ``T + N`` tokens (``T`` text
    slots, ``N`` image tokens). ``hidden_states`` holds zeros in the text slots and the patchified latents after them;
    ``encoder_hidden_states`` the ``llm_features_dim`` text features in the text slots (left-padded: a prompt of
    ``n`` tokens fills the last ``n``) and zeros elsewhere; ``indicator`` marks text (3), image (2) and padding (0);
    ``segment_ids`` is 1 for text and image, -1 for padding (the model's block-diagonal mask lets padding attend only
    to padding); ``position_ids`` are ``(i, i, i)`` for the i-th text token and ``(0, row, column) + 65536`` for the
    image. ``masked=True`` gives the samples prompts of different lengths (a quarter, and none, of the slots padded);
    otherwise every slot is text."""
    _check_divisible("ideogram4", size, 16)
    h, w = size.height // 16, size.width // 16
    total = text_tokens + h * w
    indicator = torch.full((batch, total), _IMAGE, dtype=torch.long)
    segment_ids = torch.ones(batch, total, dtype=torch.long)
    position_ids = torch.zeros(batch, total, 3, dtype=torch.long)
    position_ids[:, text_tokens:] = _grid_ids(h, w, 3, torch.long) + _IMAGE_POSITION_OFFSET
    features = torch.zeros(batch, total, _cfg(config, "llm_features_dim"))
    for sample in range(batch):
        padding = max(1, text_tokens // 4) if masked and sample % 2 == 0 else 0
        indicator[sample, :padding], segment_ids[sample, :padding] = 0, _PADDING_SEGMENT
        indicator[sample, padding:text_tokens] = _TEXT
        position_ids[sample, padding:text_tokens] = torch.arange(text_tokens - padding)[:, None]
        features[sample, padding:text_tokens] = _randn(generator, text_tokens - padding, features.shape[-1],
                                                       dtype=torch.float32, device=torch.device("cpu"))
    latents = torch.zeros(batch, total, _cfg(config, "in_channels"))
    latents[:, text_tokens:] = _randn(generator, batch, h * w, latents.shape[-1], dtype=torch.float32,
                                      device=torch.device("cpu"))
    return {
        "hidden_states": latents.to(device=device, dtype=dtype),
        "timestep": torch.full((batch,), 0.3, dtype=dtype, device=device),  # model time in [0, 1]
        "encoder_hidden_states": features.to(device=device, dtype=dtype),
        "position_ids": position_ids.to(device),
        "segment_ids": segment_ids.to(device),
        "indicator": indicator.to(device),
    }


SPECS: list[FamilySpec] = [
    FamilySpec(
        name="ideogram4",
        class_name="Ideogram4Transformer2DModel",
        configs={
            # The class defaults: 34 blocks of width 4608 (18 heads x 256), SwiGLU 12288, AdaLN 512, text features of
            # 53248 (tapped text-encoder layers, concatenated), MRoPE sections (24, 20, 20).
            "full": {},
            "tiny": {"in_channels": 16, "num_layers": 2, **_TINY_HEADS, "intermediate_size": 48, "adaln_dim": 16,
                     "llm_features_dim": 40, "mrope_section": (2, 2, 2)},
        },
        sizes={"default": Size(2048, 2048), "tiny": Size(80, 112)},  # Ideogram4Pipeline's default: 2048 x 2048
        text_tokens=2048,  # the pipeline left-pads every prompt to max_sequence_length (2048) text slots
        make_inputs_fn=_ideogram4_inputs,
        num_tokens_fn=_ideogram4_tokens,
        video=False,
    ),
]
