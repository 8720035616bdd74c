"""ERNIE-Image: one sequence-first stream of [image | text] through shared-adaLN blocks."""

from __future__ import annotations

from typing import Any

import torch

from ._spec import FamilySpec, Inputs, Size, _cfg, _check_divisible, _randn


# ----------------------------------------------------------------------------------------------- ERNIE-Image
_ERNIE_VAE_FACTOR = 16  # the pipeline's vae_scale_factor: FLUX.2 VAE (8x, 32 channels) patchified 2x2 -> 128 channels


def _ernie_image_tokens(config: Any, size: Size) -> int:
    """Image tokens (the ``patch_size`` patches of the 16x-downsampled, already 2x2-patchified latents). The blocks
    carry ``[image | text]``: the text tokens (the prompts padded to the longest) follow the image ones."""
    patch = _cfg(config, "patch_size")
    return (size.height // _ERNIE_VAE_FACTOR // patch) * (size.width // _ERNIE_VAE_FACTOR // patch)


def _ernie_image_inputs(config, batch, size, text_tokens, dtype, device, generator, masked) -> Inputs:
    """ERNIE-Image, as ``ErnieImagePipeline`` calls the transformer.

    ``hidden_states`` are ``(B, in_channels, H/16, W/16)`` latents, ``text_bth`` the text encoder's second-to-last
    hidden states padded to the longest prompt and ``text_lens`` each prompt's length (the model builds its key mask
    from it); ``timestep`` the ``(B,)`` scheduler times in ``[0, 1000]``. ``masked=True`` shortens the odd samples'
    prompts by a quarter (CFG batches prompts with shorter negative prompts), so their last text tokens are padding.
    """
    _check_divisible("ernie_image", size, _ERNIE_VAE_FACTOR * _cfg(config, "patch_size"))
    lengths = [text_tokens - (max(1, text_tokens // 4) if masked and i % 2 else 0) for i in range(batch)]
    return {
        "hidden_states": _randn(generator, batch, _cfg(config, "in_channels"), size.height // _ERNIE_VAE_FACTOR,
                                size.width // _ERNIE_VAE_FACTOR, dtype=dtype, device=device),
        "timestep": torch.full((batch,), 500.0, dtype=dtype, device=device),
        "text_bth": _randn(generator, batch, text_tokens, _cfg(config, "text_in_dim"), dtype=dtype, device=device),
        "text_lens": torch.tensor(lengths, dtype=torch.long, device=device),
    }


def _ernie_image_init(model: torch.nn.Module) -> None:
    """The class zero-initialises the timestep modulation (``adaLN_modulation``: every block's shift / scale / gate)
    and ``final_linear``: with them at zero every block is the identity and the output all zeros."""
    for layer in (model.adaLN_modulation[-1], model.final_linear):
        for param in layer.parameters():
            param.normal_(0.0, 0.05)


SPECS: list[FamilySpec] = [
    FamilySpec(
        name="ernie_image",
        class_name="ErnieImageTransformer2DModel",
        configs={
            # baidu/ERNIE-Image (and ERNIE-Image-Turbo) transformer/config.json: hidden 4096 (32 heads of 128), 36
            # layers, FFN 12288, 128 latent channels, patch 1, 3072-wide text states, rope axes (32, 48, 48), theta
            # 256. The class defaults (3072 wide, 24 layers, text 2560) are not the release.
            "full": {"hidden_size": 4096, "num_attention_heads": 32, "num_layers": 36, "ffn_hidden_size": 12288,
                     "in_channels": 128, "out_channels": 128, "patch_size": 1, "text_in_dim": 3072, "rope_theta": 256,
                     "rope_axes_dim": (32, 48, 48), "eps": 1e-6, "qk_layernorm": True},
            "tiny": {"hidden_size": 32, "num_attention_heads": 2, "num_layers": 2, "ffn_hidden_size": 48,
                     "in_channels": 4, "out_channels": 4, "patch_size": 1, "text_in_dim": 16,
                     "rope_axes_dim": (4, 6, 6)},
        },
        sizes={"default": Size(1024, 1024), "tiny": Size(80, 112)},
        # The pipeline passes each prompt's tokens unpadded (no max length), padded to the longest in the batch; prompts
        # rewritten by its prompt enhancer are long, so 256 stands for a typical batch.
        text_tokens=256,
        make_inputs_fn=_ernie_image_inputs,
        num_tokens_fn=_ernie_image_tokens,
        video=False,
        mask_key="text_lens",
        width_keys=("hidden_size",),
        init_fn=_ernie_image_init,
    ),
]
