"""Motif-Video: HunyuanVideo-style dual- and single-stream blocks with a text cross-attention, then DDT decoder
blocks."""

from __future__ import annotations

import torch

from ._spec import _TINY_HEADS, FamilySpec, Inputs, Size, _cfg, _check_divisible, _latent_frames, _randn, _text_mask
from .hunyuan import _hunyuan_tokens


# ----------------------------------------------------------------------------------------------- Motif-Video
def _motif_video_inputs(config, batch, size, text_tokens, dtype, device, generator, masked) -> Inputs:
    """Motif-Video text-to-video, as ``MotifVideoPipeline`` calls the transformer: ``cat(latents, condition latents,
    condition mask)`` along channels (16 + 16 + 1 = in_channels 33; zeros in text-to-video, random here), the float
    timestep, T5Gemma2 encoder states padded to ``max_sequence_length`` and their mask. No ``image_embeds`` (the
    image-to-video pipeline's SigLIP tokens; see NOTES.md for why chunking refuses them)."""
    p = _cfg(config, "patch_size")
    _check_divisible("motif_video", size, 8 * p)
    return {
        "hidden_states": _randn(generator, batch, _cfg(config, "in_channels"), _latent_frames(size.num_frames, 4),
                                size.height // 8, size.width // 8, dtype=dtype, device=device),
        "timestep": torch.full((batch,), 999.0, dtype=dtype, device=device),
        "encoder_hidden_states": _randn(generator, batch, text_tokens, _cfg(config, "text_embed_dim"), dtype=dtype,
                                        device=device),
        "encoder_attention_mask": _text_mask(batch, text_tokens, masked, device),
    }


SPECS: list[FamilySpec] = [
    FamilySpec(
        name="motif_video",
        class_name="MotifVideoTransformer3DModel",
        configs={
            # Motif-Technologies/Motif-Video-2B: 12 dual-stream + 16 single-stream + 8 DDT decoder blocks (diffusers
            # docs, model card), Shared Cross-Attention in the dual and encoder single-stream blocks. The width is not
            # in the docs: 12 heads x 128 gives 2.13B parameters (16 x 128 would be 3.8B) and keeps the class's rope
            # axes (16, 56, 56) summing to head_dim; the text width is the class default 4096. Both are estimates: the
            # checkpoint's transformer/config.json could not be read here.
            "full": {"num_attention_heads": 12, "num_layers": 12, "num_single_layers": 24, "num_decoder_layers": 8,
                     "enable_text_cross_attention_dual": True, "enable_text_cross_attention_single": True},
            # One dual-stream block, one encoder single-stream block (with cross-attention), one decoder block.
            "tiny": {**_TINY_HEADS, "in_channels": 4, "out_channels": 4, "num_layers": 1, "num_single_layers": 2,
                     "num_decoder_layers": 1, "mlp_ratio": 2.0, "text_embed_dim": 24, "image_embed_dim": 12,
                     "rope_axes_dim": (4, 6, 6), "enable_text_cross_attention_dual": True,
                     "enable_text_cross_attention_single": True},
        },
        sizes={"default": Size(736, 1280, 121), "tiny": Size(48, 80, 9)},  # MotifVideoPipeline's defaults
        text_tokens=512,  # MotifVideoPipeline's max_sequence_length; the prompt is padded to it
        make_inputs_fn=_motif_video_inputs,
        num_tokens_fn=_hunyuan_tokens,  # the same patching of Wan 2.1 VAE latents
        mask_key="encoder_attention_mask",
    ),
]
