"""OmniGen: a Phi-3 decoder over ``[text | time token | image]``, causal over the text, bidirectional over the image."""

from __future__ import annotations

import torch

from ._spec import FamilySpec, Inputs, Size, _cfg, _check_divisible, _image_tokens, _randn


def _omnigen_inputs(config, batch, size, text_tokens, dtype, device, generator, masked) -> Inputs:
    """Text-to-image as ``OmniGenMultiModalProcessor`` lays it out: ``text_tokens`` token ids (left-padded), then the
    time token the model inserts, then the image tokens. The ``(B, S, S)`` 0/1 mask is causal over text and time
    token (padding columns off), and the image rows see every valid token; padding rows see everything. Positions
    run over the valid tokens (padding at 0). ``masked=True`` pads a quarter of the text of every other sample. (The
    forward compares ``max(position_ids)`` with an int: simulations read it from the ids' values.)"""
    _check_divisible("omnigen", size, 16)
    image = _image_tokens(config, size)  # the blocks carry them after the text and time tokens
    total = text_tokens + 1 + image
    mask = torch.zeros(batch, total, total)
    position_ids = torch.zeros(batch, total, dtype=torch.long)
    for sample in range(batch):
        pad = max(1, text_tokens // 4) if masked and sample % 2 == 0 else 0
        valid = text_tokens - pad + 1  # text and the time token
        mask[sample, :pad] = 1  # padding rows attend to everything
        mask[sample, pad:text_tokens + 1, pad:text_tokens + 1] = torch.tril(torch.ones(valid, valid))
        mask[sample, text_tokens + 1:, pad:] = 1
        position_ids[sample, pad:] = torch.arange(valid + image)
    input_ids = torch.randint(1, _cfg(config, "vocab_size"), (batch, text_tokens), generator=generator)
    latents = _randn(generator, batch, _cfg(config, "in_channels"), size.height // 8, size.width // 8, dtype=dtype,
                     device=device)
    return {
        "hidden_states": latents,
        "timestep": torch.full((batch,), 0.4, dtype=dtype, device=device),
        "input_ids": input_ids.to(device),
        "input_img_latents": [],
        "input_image_sizes": {},
        "attention_mask": mask.to(device=device, dtype=dtype),
        "position_ids": position_ids.to(device),
    }


def omnigen_rope_scaling(head_dim: int) -> dict[str, list[float]]:
    """Phi-3's su-scaled rotary factors for heads of ``head_dim``, one per frequency (ones: their values change no
    memory or layout); every OmniGen config at another head size needs its own."""
    return {"short_factor": [1.0] * (head_dim // 2), "long_factor": [1.0] * (head_dim // 2)}


SPECS: list[FamilySpec] = [
    FamilySpec(
        name="omnigen",
        class_name="OmniGenTransformer2DModel",
        configs={
            # Shitao/OmniGen-v1: the class defaults (Phi-3-mini: 32 layers of width 3072, 32 heads of 96, MLP 8192).
            "full": {"rope_scaling": omnigen_rope_scaling(96)},
            "tiny": {"hidden_size": 32, "num_attention_heads": 2, "num_key_value_heads": 2, "intermediate_size": 48,
                     "num_layers": 2, "vocab_size": 64, "pad_token_id": 0, "time_step_dim": 8,
                     "rope_scaling": omnigen_rope_scaling(16)},
        },
        sizes={"default": Size(1024, 1024), "tiny": Size(80, 112)},  # OmniGenPipeline's default: 1024 x 1024
        text_tokens=128,  # a prompt with its chat template; OmniGen pads the batch to its longest prompt
        make_inputs_fn=_omnigen_inputs,
        num_tokens_fn=_image_tokens,
        video=False,
        mask_key="attention_mask",
        width_keys=("hidden_size",),
    ),
]
