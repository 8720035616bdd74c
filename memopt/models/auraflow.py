"""AuraFlow."""

from __future__ import annotations

import torch

from ._spec import _TINY_HEADS, FamilySpec, Inputs, Size, _cfg, _check_divisible, _image_tokens, _randn


# ----------------------------------------------------------------------------------------------- AuraFlow
def _auraflow_inputs(config, batch, size, text_tokens, dtype, device, generator, masked) -> Inputs:
    """AuraFlow: latents (B, 4, H/8, W/8), Pile-T5 (UMT5) states (B, T, 2048), timestep ``t / 1000`` in [0, 1], as
    ``AuraFlowPipeline`` calls the transformer. No mask argument: the pipeline multiplies the prompt states by the
    tokenizer mask instead (padded tokens are zero vectors that are still attended to)."""
    p = _cfg(config, "patch_size")
    _check_divisible("auraflow", size, 8 * p)
    latent_grid = int(_cfg(config, "pos_embed_max_size") ** 0.5)
    if max(size.height, size.width) // 8 // p > latent_grid:
        raise ValueError(f"auraflow: {size.height}x{size.width} needs more than the {latent_grid}x{latent_grid} "
                         "learned positions (pos_embed_max_size)")
    return {
        "hidden_states": _randn(generator, batch, _cfg(config, "in_channels"), size.height // 8, size.width // 8,
                                dtype=dtype, device=device),
        "encoder_hidden_states": _randn(generator, batch, text_tokens, _cfg(config, "joint_attention_dim"),
                                        dtype=dtype, device=device),
        "timestep": torch.full((batch,), 0.9, dtype=dtype, device=device),
    }


def _auraflow_init(model: torch.nn.Module) -> None:
    """Make the random-weight blocks matter. AuraFlow zero-initialises nothing, but its attention reaches the residual
    stream only through the MLP input (``norm2(residual + gate * attn)`` feeds ``ff``; the block adds only
    ``gate * ff``), and bias-free SwiGLU MLPs at PyTorch's default init output little: at the tiny config, switching
    every attention off changes the output by 2.4e-4 relative, too close to the tests' 1e-5 tolerance. Scaling the
    MLP output projections by 8 and the attention output projections by 4 makes that 8e-3 (the prompt: 2.8e-3)."""
    for name, param in model.named_parameters():
        if name.endswith("out_projection.weight"):
            param.mul_(8.0)
        elif name.endswith(("to_out.0.weight", "to_add_out.weight")):
            param.mul_(4.0)


SPECS: list[FamilySpec] = [
    FamilySpec(
        name="auraflow",
        class_name="AuraFlowTransformer2DModel",
        configs={
            # fal/AuraFlow-v0.3 transformer/config.json: the class defaults (4 MMDiT + 32 single DiT blocks, 12 x
            # 256 = 3072, Pile-T5 width 2048) except pos_embed_max_size 9216 (a 96 x 96 learned-position grid; v0.3
            # centres the latent's patch grid in it for any aspect ratio up to 1536 px a side).
            "full": {"pos_embed_max_size": 9216},
            # caption_projection_dim must equal the width (the text stream enters the blocks at it).
            "tiny": {**_TINY_HEADS, "num_mmdit_layers": 1, "num_single_dit_layers": 2, "joint_attention_dim": 24,
                     "caption_projection_dim": 32, "sample_size": 16, "pos_embed_max_size": 64},
        },
        sizes={"default": Size(1024, 1024), "tiny": Size(80, 112)},
        text_tokens=256,  # the pipeline's max_sequence_length; the model prepends 8 register tokens
        make_inputs_fn=_auraflow_inputs,
        num_tokens_fn=_image_tokens,  # the single DiT blocks carry 8 register and the text tokens in front
        video=False,
        init_fn=_auraflow_init,
    ),
]
