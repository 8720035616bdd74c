"""Z-Image, Lumina-Image 2.0 (refiners, then joint blocks over padded per-sample sequences) and Bria FIBO 2 (Z-Image's
blocks behind a Perceiver that turns the prompt into gist tokens)."""

from __future__ import annotations

from typing import Any

import torch

from ._spec import FamilySpec, Inputs, Size, _cfg, _check_divisible, _image_tokens, _randn, _text_mask


# ----------------------------------------------------------------------------------------------- Z-Image
_ZIMAGE_SEQ_MULTI_OF = 32  # transformer_z_image.SEQ_MULTI_OF: the model pads every sequence to a multiple of it


def _zimage_tokens(config: Any, size: Size) -> int:
    """Image tokens (the 2x2 patches of the 8x-downsampled latents). The blocks carry more: the model pads the image
    tokens to a multiple of 32 with a learned pad token, and its main layers run on ``[image | caption]`` (the caption
    padded to a multiple of 32 too), padded to the longest sample."""
    patch = _cfg(config, "all_patch_size")[0]
    return (size.height // 8 // patch) * (size.width // 8 // patch)


def _zimage_inputs(config, batch, size, text_tokens, dtype, device, generator, masked) -> Inputs:
    """Z-Image: per-sample lists, as ``ZImagePipeline`` calls the transformer.

    ``x`` is a list of ``(C, 1, H/8, W/8)`` latents (the pipeline's ``latents.unsqueeze(2).unbind(0)``), ``cap_feats``
    a list of ``(L_i, cap_feat_dim)`` Qwen3 hidden states holding only each prompt's valid tokens (the pipeline drops
    the padding with the tokenizer mask, so there is no mask argument), ``t`` the ``(B,)`` flow time
    ``(1000 - timestep) / 1000`` in ``[0, 1]``. The model pads each caption to a multiple of 32 and builds ``(B, S)``
    boolean key masks itself when the padded lengths differ (CFG batches prompts with negative prompts).
    ``masked=True`` gives the odd samples ``text_tokens + 32`` caption tokens, so the padded lengths differ and the
    caption refiner and main layers run with those masks.
    """
    patch = _cfg(config, "all_patch_size")[0]
    _check_divisible("zimage", size, 8 * patch)
    lengths = [text_tokens + (_ZIMAGE_SEQ_MULTI_OF if masked and i % 2 else 0) for i in range(batch)]
    latents = [_randn(generator, _cfg(config, "in_channels"), 1, size.height // 8, size.width // 8, dtype=dtype,
                      device=device) for _ in range(batch)]
    captions = [_randn(generator, length, _cfg(config, "cap_feat_dim"), dtype=dtype, device=device)
                for length in lengths]
    return {
        "x": latents,
        "t": torch.full((batch,), 0.5, dtype=dtype, device=device),
        "cap_feats": captions,
    }


# ----------------------------------------------------------------------------------------------- Lumina-Image 2.0
def _lumina2_inputs(config, batch, size, text_tokens, dtype, device, generator, masked) -> Inputs:
    """Lumina-Image 2.0: latents ``(B, C, H/8, W/8)``, Gemma-2 hidden states ``(B, L, cap_feat_dim)`` padded to
    ``max_sequence_length``, their tokenizer mask ``(B, L)`` (int64, valid tokens first, as ``Lumina2Pipeline`` passes
    it) and the time ``1 - t / 1000`` in ``[0, 1]`` (the model embeds it as is).

    The model reads the mask's row sums (a tensor read as a number): each sample's joint sequence is its valid caption
    tokens then its image tokens, padded to the longest, with a boolean key mask when the lengths differ.
    ``masked=True`` pads out the last quarter of the text of even samples and the last half of odd ones, so the
    batch's lengths differ and the joint blocks run with that mask.
    """
    patch = _cfg(config, "patch_size")
    _check_divisible("lumina2", size, 8 * patch)
    mask = torch.ones(batch, text_tokens, dtype=torch.int64, device=device)
    if masked:
        quarter = max(1, text_tokens // 4)
        for i in range(batch):
            mask[i, text_tokens - quarter * (1 + i % 2):] = 0
    return {
        "hidden_states": _randn(generator, batch, _cfg(config, "in_channels"), size.height // 8, size.width // 8,
                                dtype=dtype, device=device),
        "timestep": torch.full((batch,), 0.5, dtype=dtype, device=device),
        "encoder_hidden_states": _randn(generator, batch, text_tokens, _cfg(config, "cap_feat_dim"), dtype=dtype,
                                        device=device),
        "encoder_attention_mask": mask,
    }


def _bria_fibo2_inputs(config, batch, size, text_tokens, dtype, device, generator, masked) -> Inputs:
    """Bria FIBO 2: latents ``(B, C, H/8, W/8)`` (the model patchifies 2x2), the time ``t / 1000`` in ``[0, 1]``,
    Qwen3-VL bundles ``(B, 1 + len(injection_layer_ids), L, cap_feat_dim)`` (three RMS-normalised layers concatenated
    per bundle: the Perceiver's, then one per injection block) and the tokenizer mask ``(B, L)`` bool, which
    ``BriaFibo2Pipeline`` passes always (``padding="longest"``).

    The model reads the mask's row sums as numbers (the gist-token count of each prompt). ``masked=True`` pads out the
    last quarter of the text of odd samples: their gist count is then smaller, so the model pads the gist tokens, puts
    them after the image tokens and attends with a ``(B, S)`` key mask; the injection blocks' cross-attention and the
    Perceiver get the text mask. Without ``masked`` no mask is passed (every prompt as long as the longest).
    """
    patch = _cfg(config, "patch_size")
    _check_divisible("bria_fibo2", size, 8 * patch)
    bundles = 1 + len(_cfg(config, "injection_layer_ids"))
    inputs = {
        "hidden_states": _randn(generator, batch, _cfg(config, "in_channels"), size.height // 8, size.width // 8,
                                dtype=dtype, device=device),
        "timestep": torch.full((batch,), 0.9, dtype=dtype, device=device),
        "encoder_hidden_states": _randn(generator, batch, bundles, text_tokens, _cfg(config, "cap_feat_dim"),
                                        dtype=dtype, device=device),
    }
    if masked:
        mask = _text_mask(batch, text_tokens, False, device).bool()
        mask[1::2] = _text_mask(len(range(1, batch, 2)), text_tokens, True, device).bool()
        inputs["encoder_attention_mask"] = mask
    return inputs


def _unit_cross_attention_gates(model: torch.nn.Module) -> None:
    """The injection blocks' ``cross_attn_gate`` starts at 0 (tanh(0) = 0: the cross-attention to the text adds nothing
    until trained weights load), so random-weight models would not test it: open the gates."""
    for module in model.modules():
        if type(module).__name__ == "BriaFibo2TransformerBlock" and module.cross_attention is not None:
            module.cross_attn_gate.fill_(1.0)


SPECS: list[FamilySpec] = [
    FamilySpec(
        name="zimage",
        class_name="ZImageTransformer2DModel",
        configs={
            # Tongyi-MAI/Z-Image-Turbo (and Z-Image) transformer/config.json: the class defaults (dim 3840, 30
            # layers, 2 noise- and 2 context-refiner layers, 30 heads, Qwen3-4B captions of width 2560).
            "full": {},
            "tiny": {"dim": 32, "n_heads": 2, "n_kv_heads": 2, "n_layers": 2, "n_refiner_layers": 1,
                     "in_channels": 4, "cap_feat_dim": 24, "axes_dims": [4, 6, 6], "axes_lens": [256, 64, 64]},
        },
        sizes={"default": Size(1024, 1024), "tiny": Size(48, 80)},
        text_tokens=512,  # the pipeline's max_sequence_length, an upper bound: only valid tokens are passed
        make_inputs_fn=_zimage_inputs,
        num_tokens_fn=_zimage_tokens,
        video=False,
        width_keys=("dim",),
    ),
    FamilySpec(
        name="lumina2",
        class_name="Lumina2Transformer2DModel",
        configs={
            # Alpha-VLLM/Lumina-Image-2.0 transformer/config.json: the class defaults (hidden 2304 = 24 heads x 96, 8
            # KV heads, 26 layers, 2 noise- and 2 context-refiner layers, rope axes 32/32/32) but for the Gemma-2-2B
            # caption width 2304 (the class default is 1024).
            "full": {"cap_feat_dim": 2304},
            "tiny": {"hidden_size": 32, "num_attention_heads": 2, "num_kv_heads": 1, "num_layers": 2,
                     "num_refiner_layers": 1, "in_channels": 4, "multiple_of": 16, "cap_feat_dim": 24,
                     "axes_dim_rope": (4, 6, 6), "axes_lens": (64, 64, 64), "sample_size": 16},
        },
        sizes={"default": Size(1024, 1024), "tiny": Size(80, 112)},
        text_tokens=256,  # Lumina2Pipeline's max_sequence_length (padding="max_length", the mask marks the valid ones)
        make_inputs_fn=_lumina2_inputs,
        num_tokens_fn=_image_tokens,  # the joint blocks add each sample's valid caption tokens in front
        video=False,
        mask_key="encoder_attention_mask",
        width_keys=("hidden_size",),
    ),
    FamilySpec(
        name="bria_fibo2",
        class_name="BriaFibo2Transformer2DModel",
        configs={
            # The class defaults (dim 3584 = 28 heads x 128, 44 layers with cross-attention injection at 6, 14, 22, 30,
            # 38, 2 noise-refiner layers, a 2-layer Perceiver making 256-512 gist tokens, Qwen3-VL bundles of 3 x 2560,
            # 32 VAE channels patched 2x2); the release's config.json could not be read here.
            "full": {},
            "tiny": {"dim": 32, "n_heads": 2, "n_layers": 2, "n_refiner_layers": 1, "in_channels": 4,
                     "cap_feat_dim": 24, "injection_layer_ids": (1,), "perceiver_num_layers": 1,
                     "min_num_gist_tokens": 2, "max_num_gist_tokens": 6, "gist_step": 1, "gist_min_text_len": 4,
                     "gist_max_text_len": 12,
                     "axes_dims": (4, 6, 6), "axes_lens": (64, 64, 64)},
        },
        sizes={"default": Size(1024, 1024), "tiny": Size(48, 80)},  # default_sample_size 128 x VAE 8
        text_tokens=1024,  # padding="longest" (max 4096); structured JSON captions run ~1k tokens: 384 gist tokens
        make_inputs_fn=_bria_fibo2_inputs,
        num_tokens_fn=_image_tokens,  # the main layers add the gist tokens (in front, or behind when padded)
        video=False,
        mask_key="encoder_attention_mask",
        width_keys=("dim",),
        init_fn=_unit_cross_attention_gates,
    ),
]
