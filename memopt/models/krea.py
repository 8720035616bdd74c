"""Krea 2: single-stream blocks over [text | image], with a text fusion of tapped Qwen3-VL layers."""

from __future__ import annotations

from typing import Any

import torch

from ._spec import _TINY_HEADS, FamilySpec, Inputs, Size, _cfg, _check_divisible, _grid_ids, _randn


# ----------------------------------------------------------------------------------------------- Krea 2
def _krea2_tokens(config: Any, size: Size) -> int:
    """Image tokens: 2x2 patches of the Qwen-Image VAE latents (8x downsampled). The blocks carry
    ``[text | image]``, the text tokens first."""
    return (size.height // 16) * (size.width // 16)


def _krea2_inputs(config, batch, size, text_tokens, dtype, device, generator, masked) -> Inputs:
    """Krea 2: 2x2-packed latents (B, N, 64), a stack of ``num_text_layers`` tapped Qwen3-VL-4B hidden states per
    text token (B, T, 12, 2560), the flow time ``t / 1000`` in ``[0, 1]`` and the ``(T + N, 3)`` rotary coordinates of
    ``Krea2Pipeline.prepare_position_ids`` (text rows zero, image rows ``(0, row, column)``).

    The pipeline always passes the boolean text mask: it pads to ``max_sequence_length`` (512) in the middle of the
    template (``[prompt | PAD | suffix]``). ``masked=True`` pads a quarter of the tokens before the last one (the
    suffix) out, so the valid tokens are not a prefix; otherwise every token is valid.
    """
    _check_divisible("krea2", size, 16)
    h, w = size.height // 16, size.width // 16
    mask = torch.ones(batch, text_tokens, dtype=torch.bool, device=device)
    if masked:
        pad = max(1, text_tokens // 4)
        mask[:, max(0, text_tokens - 1 - pad) : text_tokens - 1] = False
    position_ids = torch.cat([torch.zeros(text_tokens, 3), _grid_ids(h, w, 3)]).to(device)
    return {
        "hidden_states": _randn(generator, batch, h * w, _cfg(config, "in_channels"), dtype=dtype, device=device),
        "encoder_hidden_states": _randn(generator, batch, text_tokens, _cfg(config, "num_text_layers"),
                                        _cfg(config, "text_hidden_dim"), dtype=dtype, device=device),
        "timestep": torch.full((batch,), 0.9, dtype=dtype, device=device),
        "position_ids": position_ids,
        "encoder_attention_mask": mask,
    }


def _krea2_init(model: torch.nn.Module) -> None:
    """Krea 2 zero-initialises every block's and the output layer's ``scale_shift_table`` (the learned modulation
    tables added to the shared timestep modulation) and every ``Krea2RMSNorm`` scale (the effective scale is
    ``1 + weight``): random-weight models would give each block the same modulation and every norm the unit scale,
    so tests could not see a chunk taking another block's or channel's values. Give them small random values."""
    for name, param in model.named_parameters():
        if name.endswith("scale_shift_table"):
            param.normal_(std=0.5)
        elif name.endswith("weight") and type(model.get_submodule(name.rsplit(".", 1)[0])).__name__ == "Krea2RMSNorm":
            param.normal_(std=0.1)


SPECS: list[FamilySpec] = [
    FamilySpec(
        name="krea2",
        class_name="Krea2Transformer2DModel",
        configs={
            # krea/Krea-2-Raw transformer: the class defaults (width 6144 = 48 heads x 128, 12 KV heads, 28 blocks,
            # SwiGLU 16384; text fusion over 12 tapped Qwen3-VL-4B layers of width 2560, 2 layerwise + 2 refiner
            # blocks of 20 heads). The single-file converter (convert_krea2_transformer_checkpoint_to_diffusers) only
            # renames keys.
            "full": {},
            "tiny": {"in_channels": 16, "num_layers": 2, **_TINY_HEADS, "num_key_value_heads": 1,
                     "intermediate_size": 48, "timestep_embed_dim": 16, "text_hidden_dim": 24, "num_text_layers": 3,
                     "text_num_attention_heads": 2, "text_num_key_value_heads": 2, "text_intermediate_size": 32,
                     "num_layerwise_text_blocks": 1, "num_refiner_text_blocks": 1, "axes_dims_rope": (4, 6, 6)},
        },
        sizes={"default": Size(1024, 1024), "tiny": Size(48, 80)},  # Krea2Pipeline's default: 1024 x 1024
        text_tokens=512,  # the pipeline pads every prompt to max_sequence_length (512) and passes the mask
        make_inputs_fn=_krea2_inputs,
        num_tokens_fn=_krea2_tokens,
        video=False,
        mask_key="encoder_attention_mask",
        init_fn=_krea2_init,
    ),
]
