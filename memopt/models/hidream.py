"""HiDream-I1: dual- and single-stream blocks with MoE FeedForwards, fed T5 and per-block Llama-3.1 states."""

from __future__ import annotations

from typing import Any

import torch

from ._spec import _TINY_HEADS, FamilySpec, Inputs, Size, _cfg, _check_divisible, _randn


# ----------------------------------------------------------------------------------------------- HiDream-I1
def _hidream_tokens(config: Any, size: Size) -> int:
    """Square latents give ``(H / 16) x (W / 16)`` tokens; any other shape is padded by the model to
    ``max_resolution[0] x max_resolution[1] / patch_size^2`` tokens (the padding is keyed out by its
    ``hidden_states_masks``)."""
    patch = _cfg(config, "patch_size")
    if size.height == size.width:
        return (size.height // (8 * patch)) * (size.width // (8 * patch))
    max_h, max_w = _cfg(config, "max_resolution")
    return max_h * max_w // (patch * patch)


def _hidream_inputs(config, batch, size, text_tokens, dtype, device, generator, masked) -> Inputs:
    """HiDream-I1: VAE latents (B, C, H / 8, W / 8) (the model patchifies them), T5 states (B, S, 4096), the stacked
    Llama-3.1 hidden states of every layer (L, B, S, 4096) (the model feeds layer ``llama_layers[i]`` to block ``i``),
    pooled CLIP-L + CLIP-G embeddings (B, 2048) and the timestep in [0, 1000].

    The pipeline passes no text mask (padding states are the encoders' own), so ``masked`` changes nothing. The
    model's own mask is for non-square latents: it pads the tokens to ``max_resolution`` and multiplies the padding
    keys by 0 (``hidden_states_masks``), built inside the forward from the latents' shape.
    """
    _check_divisible("hidream", size, 8 * _cfg(config, "patch_size"))
    t5_dim, llama_dim = _cfg(config, "caption_channels")
    llama_states = max(_cfg(config, "llama_layers")) + 1
    return {
        "hidden_states": _randn(generator, batch, _cfg(config, "in_channels"), size.height // 8, size.width // 8,
                                dtype=dtype, device=device),
        "timesteps": torch.full((batch,), 900.0, dtype=dtype, device=device),
        "encoder_hidden_states_t5": _randn(generator, batch, text_tokens, t5_dim, dtype=dtype, device=device),
        "encoder_hidden_states_llama3": _randn(generator, llama_states, batch, text_tokens, llama_dim, dtype=dtype,
                                               device=device),
        "pooled_embeds": _randn(generator, batch, _cfg(config, "text_emb_dim"), dtype=dtype, device=device),
    }


SPECS: list[FamilySpec] = [
    FamilySpec(
        name="hidream",
        class_name="HiDreamImageTransformer2DModel",
        configs={
            # HiDream-I1-Full's transformer/config.json (17B): 16 dual-stream + 32 single-stream blocks of width 2560
            # (20 heads x 128), MoE FeedForwards (4 routed experts, top-2, plus a shared expert), Llama-3.1-8B layers
            # 0..31 then 31 for the last 16 blocks.
            "full": {"patch_size": 2, "in_channels": 16, "out_channels": 16, "caption_channels": [4096, 4096],
                     "axes_dims_rope": (64, 32, 32), "llama_layers": list(range(32)) + [31] * 16},
            "tiny": {**_TINY_HEADS, "patch_size": 2, "in_channels": 4, "out_channels": 4, "num_layers": 1,
                     "num_single_layers": 2, "caption_channels": [24, 16], "text_emb_dim": 16,
                     "axes_dims_rope": (8, 4, 4), "max_resolution": (14, 18), "llama_layers": (0, 1, 1),
                     "force_inference_output": True},
        },
        sizes={"default": Size(1024, 1024), "tiny": Size(80, 112)},  # pipeline default_sample_size 128 x VAE 8
        text_tokens=128,  # the pipeline's max_sequence_length for T5 and Llama (each); the single blocks see 3 x 128
        make_inputs_fn=_hidream_inputs,
        num_tokens_fn=_hidream_tokens,
        video=False,
    ),
]
