"""EasyAnimate (Alibaba PAI): MMDiT video blocks with text and video in one attention."""

from __future__ import annotations

from typing import Any

import torch

from ._spec import (
    _TINY_HEADS,
    FamilySpec,
    Inputs,
    Size,
    _cfg,
    _check_divisible,
    _image_tokens,
    _latent_frames,
    _randn,
)


# ----------------------------------------------------------------------------------------------- EasyAnimate
def _easyanimate_tokens(config: Any, size: Size) -> int:
    """Video tokens: 2x2 patches of the MagViT latents (8x spatial, 4x temporal compression, first frame alone)."""
    return _latent_frames(size.num_frames, 4) * _image_tokens(config, size)


def _easyanimate_inputs(config, batch, size, text_tokens, dtype, device, generator, masked) -> Inputs:
    """EasyAnimate: latents (B, C, F', H/8, W/8) (channels before frames), Qwen2-VL states (its second-to-last hidden
    layer, B x T x 3584), timestep as ``EasyAnimatePipeline`` calls the transformer (``t`` in the latents' dtype).

    The pipeline pads the prompt to ``max_sequence_length`` (256) and uses the tokenizer mask only inside the text
    encoder: the transformer's forward takes no mask, and the padded tokens are attended to. ``masked`` is therefore
    ignored (``mask_key`` is ``None``).
    """
    p = _cfg(config, "patch_size")
    _check_divisible("easyanimate", size, 8 * p)
    return {
        "hidden_states": _randn(generator, batch, _cfg(config, "in_channels"), _latent_frames(size.num_frames, 4),
                                size.height // 8, size.width // 8, dtype=dtype, device=device),
        "timestep": torch.full((batch,), 999.0, dtype=dtype, device=device),
        "encoder_hidden_states": _randn(generator, batch, text_tokens, _cfg(config, "text_embed_dim"), dtype=dtype,
                                        device=device),
    }


SPECS: list[FamilySpec] = [
    FamilySpec(
        name="easyanimate",
        class_name="EasyAnimateTransformer3DModel",
        configs={
            # alibaba-pai/EasyAnimateV5.1-12b-zh transformer: the class defaults (48 heads x 64, 48 layers, all MMDiT,
            # time_embed_dim 512, Qwen2-VL width 3584) plus what the class leaves None: 16 latent channels in and out
            # (the text-to-video model; the InP / Control variants take 33 / 48 input channels) and 2x2 patches. The
            # V5.1 diffusers configs set add_norm_text_encoder (an RMSNorm before text_proj), as the 7B one does.
            "full": {"in_channels": 16, "out_channels": 16, "patch_size": 2, "add_norm_text_encoder": True},
            # The V5.1 7B layout: 36 layers of which the first 18 are MMDiT (the rest project cat(text, video) with one
            # set of projections and one FeedForward), in_channels 48 (Control).
            "7b": {"num_layers": 36, "mmdit_layers": 18, "in_channels": 48, "out_channels": 16, "patch_size": 2,
                   "add_norm_text_encoder": True},
            # One block of each kind: an MMDiT block (separate text projections and txt_ff) and a shared-weight one.
            "tiny": {**_TINY_HEADS, "in_channels": 4, "out_channels": 4, "patch_size": 2, "time_embed_dim": 16,
                     "text_embed_dim": 24, "num_layers": 2, "mmdit_layers": 1, "add_norm_text_encoder": True},
        },
        sizes={"default": Size(512, 512, 49), "tiny": Size(48, 80, 9)},  # the pipeline's defaults: 512 x 512, 49 frames
        text_tokens=256,  # EasyAnimatePipeline's max_sequence_length; the prompt is padded to it
        make_inputs_fn=_easyanimate_inputs,
        num_tokens_fn=_easyanimate_tokens,
    ),
]
