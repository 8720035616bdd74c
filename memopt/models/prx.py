"""PRX (Photoroom): image-only blocks attending over [text | image] keys."""

from __future__ import annotations

import torch

from ._spec import FamilySpec, Inputs, Size, _cfg, _check_divisible, _image_tokens, _randn, _text_mask


# ----------------------------------------------------------------------------------------------- PRX
def _prx_inputs(config, batch, size, text_tokens, dtype, device, generator, masked) -> Inputs:
    """PRX, as ``PRXPipeline`` calls the transformer: latents ``(B, C, H/8, W/8)`` (the Flux VAE's), the T5Gemma
    encoder's states padded to the tokenizer's length with their boolean ``(B, S_text)`` mask, and the flow time
    ``t / 1000`` in ``[0, 1]``. ``masked=True`` pads the last quarter of the text out."""
    _check_divisible("prx", size, 8 * _cfg(config, "patch_size"))
    return {
        "hidden_states": _randn(generator, batch, _cfg(config, "in_channels"), size.height // 8, size.width // 8,
                                dtype=dtype, device=device),
        "timestep": torch.full((batch,), 0.9, dtype=torch.float32, device=device),
        "encoder_hidden_states": _randn(generator, batch, text_tokens, _cfg(config, "context_in_dim"), dtype=dtype,
                                        device=device),
        "attention_mask": _text_mask(batch, text_tokens, masked, device).bool(),
    }


def _prx_init(model: torch.nn.Module) -> None:
    """PRX zero-initialises every block's modulation (``Modulation.lin``): with random weights each block's gates
    would be zero and the block the identity. Trained weights fill them; random ones of the linears' scale do here."""
    for block in model.blocks:
        torch.nn.init.normal_(block.modulation.lin.weight, std=block.modulation.lin.in_features ** -0.5)
        torch.nn.init.normal_(block.modulation.lin.bias, std=0.5)


SPECS: list[FamilySpec] = [
    FamilySpec(
        name="prx",
        class_name="PRXTransformer2DModel",
        configs={
            # Photoroom/prx-1024-t2i-beta: the class defaults (16 blocks of 28 x 64 = 1792, MLP ratio 3.5, T5Gemma
            # states of width 2304, 2x2 patches of the Flux VAE's 16-channel latents).
            "full": {},
            "tiny": {"in_channels": 4, "patch_size": 2, "context_in_dim": 24, "hidden_size": 32, "mlp_ratio": 2.0,
                     "num_heads": 2, "depth": 2, "axes_dim": [8, 8]},
        },
        sizes={"default": Size(1024, 1024), "tiny": Size(80, 112)},
        text_tokens=256,
        make_inputs_fn=_prx_inputs,
        num_tokens_fn=_image_tokens,
        video=False,
        mask_key="attention_mask",
        width_keys=("hidden_size",),
        init_fn=_prx_init,
    ),
]
