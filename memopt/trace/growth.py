"""Activation growth per token: how a forward's activation peak scales with the sequence, in LD per token.

Measured between two sequence lengths, ``(peak(L2) - peak(L1)) / ((L2 - L1) x D x 4 B)`` (fp32, storage-counting
tracer), so constant terms (embeddings, weight-sized temporaries) cancel. The floor of an inference forward is 3 (the
residual stream plus K and V). The models are the zoo's tiny configs widened to 16 heads x 8 = 128, so the ratio of
rotary tables and head width to the hidden width stays close to the released models', with one block of each kind.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from ..models import Size, get_family
from ..models.omnigen import omnigen_rope_scaling
from .simulate import allocate_gradients, training_step
from .tracer import trace_memory

GROWTH_HEADS = {"num_attention_heads": 16, "attention_head_dim": 8}
"""Width 128 for families whose width is ``heads x head_dim``; others set their width in :data:`GROWTH_CONFIGS`."""
# Per family: tiny-config overrides that keep the model valid at the wider width (rope axes summing to head_dim,
# dims that must equal the width), one block of each kind.
GROWTH_CONFIGS: dict[str, dict[str, Any]] = {
    "wan": {"num_layers": 1},
    "chronoedit": {"num_layers": 1, "added_kv_proj_dim": 128},
    "skyreels_v2": {"num_layers": 1},
    # Wan VACE: a Wan block after the VACE one (with num_layers 1 the last block would be a VACE layer, whose hint is
    # added after it and keeps the output head whole).
    "wan_vace": {"num_layers": 2, "vace_layers": [0]},
    "helios": {"num_layers": 1, "rope_dim": (2, 2, 4)},
    "flux": {"axes_dims_rope": (2, 2, 4), "num_layers": 1, "num_single_layers": 1},
    "flux2": {"axes_dims_rope": (2, 2, 2, 2), "num_layers": 1, "num_single_layers": 1},
    "chroma": {"axes_dims_rope": (2, 2, 4), "num_layers": 1, "num_single_layers": 1},
    "hunyuanvideo": {"rope_axes_dim": (2, 2, 4), "num_layers": 1, "num_single_layers": 1},
    "hunyuanvideo_i2v": {"rope_axes_dim": (2, 2, 4), "num_layers": 1, "num_single_layers": 1},
    "hunyuanvideo15": {"rope_axes_dim": (2, 2, 4), "num_layers": 1},
    "hunyuanimage": {"rope_axes_dim": (4, 4), "num_layers": 1, "num_single_layers": 1},
    "cogvideox": {"num_layers": 1},
    "cogview4": {"num_layers": 1},
    "glm_image": {"num_layers": 1},
    "prx": {"hidden_size": 128, "num_heads": 16, "axes_dim": [4, 4], "depth": 1},
    # HunyuanDiT: four blocks, so that one long skip connection (block 0's output, kept until block 3) is counted.
    "hunyuandit": {"hidden_size": 128, "num_layers": 4},
    "dit": {"num_layers": 1},
    "sana": {"num_cross_attention_heads": 16, "cross_attention_head_dim": 8, "cross_attention_dim": 128,
             "num_layers": 1},
    "sana_video": {"num_cross_attention_heads": 16, "cross_attention_head_dim": 8, "cross_attention_dim": 128,
                   "num_layers": 1, "rope_max_seq_len": 64},
    "ltx": {"cross_attention_dim": 128, "num_layers": 1},
    # LTX-2: audio at half the video width (16 x 4), the a2v / v2a rotary width equal to it; both sizes are the same
    # clip length, so the audio stream is the same and cancels out.
    "ltx2": {"cross_attention_dim": 128, "num_layers": 1, "audio_num_attention_heads": 16,
             "audio_attention_head_dim": 4, "audio_cross_attention_dim": 64},
    "qwenimage": {"axes_dims_rope": (2, 2, 4), "num_layers": 1},
    "sd3": {"caption_projection_dim": 128, "num_layers": 1},
    "mochi": {"num_layers": 1},
    # Z-Image stores its width as `dim` (16 heads x 8, rope axes summing to 8); one refiner of each kind.
    "zimage": {"dim": 128, "n_heads": 16, "n_kv_heads": 16, "axes_dims": [2, 2, 4], "n_layers": 1,
               "n_refiner_layers": 1},
    # Kandinsky 5 stores its width as `model_dim` (16 heads of 8, rope axes summing to 8).
    "kandinsky5": {"model_dim": 128, "ff_dim": 320, "axes_dims": (2, 2, 4), "num_text_blocks": 1,
                   "num_visual_blocks": 1},
    # MiniMax-H3: width 128 as hidden_size (heads 16 x 8, 6 of 8 channels rotated), the released SwiGLU ratio 8 / 3.
    "minimax_h3": {"hidden_size": 128, "num_attention_heads": 16, "attention_head_dim": 8, "rope_freq_dim": 1,
                   "ffn_dim": 344, "num_layers": 1, "num_refiner_layers": 1},
    "qwenimage21": {"axes_dims_rope": (2, 2, 4), "num_layers": 1},
    "flux3": {"axes_dims_rope": (2, 2, 2, 2), "num_layers": 1, "num_single_layers": 1},
    # AuraFlow: the text projection at the width; learned positions for 24 x 24 patches. Measured at 256 and 576 image
    # tokens: at smaller sizes the text MLP every chunk carries whole is the peak and the slope reads low (3.48).
    "auraflow": {"caption_projection_dim": 128, "num_mmdit_layers": 1, "num_single_dit_layers": 1,
                 "pos_embed_max_size": 576},
    "pixart": {"cross_attention_dim": 128, "num_layers": 1},
    # ConsisID: 8 heads x 16 (its 3-D rotary table splits head_dim in 16ths); face K/V width int(2/3 x 128).
    "consisid": {"num_attention_heads": 8, "attention_head_dim": 16, "LFE_output_dim": 85},
    # Cosmos: 8 heads x 16 (its rotary divides by head_dim // 6 * 2 - 2, zero at head_dim 8).
    "cosmos": {"num_attention_heads": 8, "attention_head_dim": 16, "num_layers": 1},
    "motif_video": {"rope_axes_dim": (2, 2, 4)},  # one dual, one encoder single and one decoder block
    # Krea 2: rotary axes summing to 8, the release's 4:1 GQA and SwiGLU ratio 8 / 3, one block.
    "krea2": {"axes_dims_rope": (2, 2, 4), "num_key_value_heads": 4, "intermediate_size": 344, "num_layers": 1},
    # Cosmos 3 Omni: width 128 as hidden_size (16 query heads, 4 K/V heads of 8), its SwiGLU ratio 3, one layer.
    "cosmos3_omni": {"hidden_size": 128, "head_dim": 8, "num_attention_heads": 16, "num_key_value_heads": 4,
                     "intermediate_size": 384, "num_hidden_layers": 1},
    # OmniGen: width 128 as hidden_size (16 heads of 8), Phi-3's MLP ratio 8 / 3, one layer.
    "omnigen": {"hidden_size": 128, "num_attention_heads": 16, "num_key_value_heads": 16, "intermediate_size": 344,
                "num_layers": 1, "rope_scaling": omnigen_rope_scaling(8)},
    # Ideogram 4: text features 11.56x the width (53248 / 4608, as released), MRoPE sections for head_dim 8, one block.
    "ideogram4": {"llm_features_dim": 1479, "mrope_section": (1, 1, 1), "intermediate_size": 344, "num_layers": 1},
    # HiDream: one block of each kind fed one Llama layer; rope axes summing to 8.
    "hidream": {"axes_dims_rope": (4, 2, 2), "num_layers": 1, "num_single_layers": 1, "llama_layers": (0, 0),
                "caption_channels": [32, 32], "text_emb_dim": 32, "patch_size": 2, "in_channels": 4, "out_channels": 4},
    # ERNIE-Image stores its width as hidden_size (16 heads of 8), the released FFN ratio 3.
    "ernie_image": {"hidden_size": 128, "num_attention_heads": 16, "ffn_hidden_size": 384, "rope_axes_dim": (2, 2, 4),
                    "num_layers": 1},
    # Lumina 2 stores its width as hidden_size (16 heads x 8, GQA 2:1); one refiner of each kind.
    "lumina2": {"hidden_size": 128, "num_attention_heads": 16, "num_kv_heads": 8, "axes_dim_rope": (2, 2, 4),
                "num_layers": 1, "num_refiner_layers": 1},
    "cogview3plus": {"num_layers": 1},
    # Latte: 16 frames (the release's): the model keeps a per-position timestep copy, 6 / F LD per token.
    "latte": {"cross_attention_dim": 128, "num_layers": 1, "video_length": 16},
    # EasyAnimate: 8 heads x 16 (its 3-D rotary table needs head_dim // 8 even); one block of each kind.
    "easyanimate": {"num_attention_heads": 8, "attention_head_dim": 16, "num_layers": 2, "mmdit_layers": 1},
    # Allegro: its 3-axis RoPE needs head_dim % 6 == 0, so 10 heads x 12 = 120 wide.
    "allegro": {"num_attention_heads": 10, "attention_head_dim": 12, "cross_attention_dim": 120, "num_layers": 1},
    "bria": {"axes_dims_rope": (2, 2, 4), "num_layers": 1, "num_single_layers": 1},
    "longcat_image": {"axes_dims_rope": (2, 2, 4), "num_layers": 1, "num_single_layers": 1},
    "ovis_image": {"axes_dims_rope": (2, 2, 4), "num_layers": 1, "num_single_layers": 1},
    "framepack": {"rope_axes_dim": (2, 2, 4), "num_layers": 1, "num_single_layers": 1},
    "wan_animate": {"num_layers": 2},  # a Wan block, the face adapter, the last Wan block
    # Kandinsky 6: as Kandinsky 5, with the audio branch (its length depends on the frame count only: it cancels out).
    "kandinsky6": {"model_dim": 128, "ff_dim": 320, "axes_dims": (2, 2, 4), "num_text_blocks": 1,
                   "num_visual_blocks": 1},
    "joyimage_edit": {"hidden_size": 128, "num_attention_heads": 16, "rope_dim_list": [2, 2, 4], "num_layers": 1},
    "joyimage_edit_plus": {"hidden_size": 128, "num_attention_heads": 16, "rope_dim_list": [2, 2, 4], "num_layers": 1},
    "bria_fibo": {"axes_dims_rope": (2, 2, 4), "num_layers": 1, "num_single_layers": 1},
    "bria_fibo2": {"dim": 128, "n_heads": 16, "axes_dims": (2, 2, 4), "n_layers": 2},
    "anyflow": {"num_layers": 1},
}
GROWTH_SIZES: dict[str, tuple[Size, Size]] = {
    "wan": (Size(64, 128, 5), Size(128, 256, 5)),
    "chronoedit": (Size(64, 128, 5), Size(128, 256, 5)),
    "skyreels_v2": (Size(64, 128, 5), Size(128, 256, 5)),
    "wan_vace": (Size(64, 128, 5), Size(128, 256, 5)),
    "helios": (Size(64, 128, 5), Size(128, 256, 5)),
    "flux": (Size(128, 128), Size(256, 256)),
    "flux2": (Size(128, 128), Size(256, 256)),
    "chroma": (Size(128, 128), Size(256, 256)),
    "hunyuanvideo": (Size(64, 128, 5), Size(128, 256, 5)),
    "hunyuanvideo_i2v": (Size(64, 128, 5), Size(128, 256, 5)),
    "hunyuanvideo15": (Size(128, 256, 5), Size(256, 512, 5)),
    "hunyuanimage": (Size(512, 512), Size(1024, 1024)),
    "cogvideox": (Size(64, 128, 5), Size(128, 256, 5)),
    "cogview4": (Size(128, 128), Size(256, 256)),
    "glm_image": (Size(128, 128), Size(256, 256)),
    "prx": (Size(128, 128), Size(256, 256)),
    "hunyuandit": (Size(128, 128), Size(256, 256)),
    "dit": (Size(128, 128), Size(256, 256)),
    "sana": (Size(512, 512), Size(1024, 1024)),  # DC-AE 32x: 256 and 1,024 tokens
    "sana_video": (Size(128, 128, 33), Size(256, 256, 33)),  # 9 latent frames: 576 and 2,304 tokens
    "ltx": (Size(128, 256, 9), Size(256, 512, 9)),
    "ltx2": (Size(128, 256, 9), Size(256, 512, 9)),
    "qwenimage": (Size(128, 128), Size(256, 256)),
    "sd3": (Size(128, 128), Size(256, 256)),
    "mochi": (Size(64, 128, 13), Size(128, 256, 13)),
    "zimage": (Size(128, 128), Size(256, 256)),
    "kandinsky5": (Size(64, 128, 5), Size(128, 256, 5)),
    "minimax_h3": (Size(128, 256, 22), Size(256, 512, 22)),  # same clip length: the text and audio rows cancel
    "qwenimage21": (Size(128, 128), Size(256, 256)),
    "flux3": (Size(128, 128), Size(256, 256)),
    "auraflow": (Size(256, 256), Size(384, 384)),
    "pixart": (Size(128, 128), Size(256, 256)),
    "easyanimate": (Size(64, 128, 5), Size(128, 256, 5)),
    "consisid": (Size(64, 128, 5), Size(128, 256, 5)),
    "cosmos": (Size(64, 128, 5), Size(128, 256, 5)),
    "motif_video": (Size(64, 128, 5), Size(128, 256, 5)),
    "krea2": (Size(128, 128), Size(256, 256)),
    "ideogram4": (Size(128, 128), Size(256, 256)),
    "omnigen": (Size(128, 128), Size(256, 256)),
    "cosmos3_omni": (Size(256, 256, 9), Size(256, 512, 9)),  # 192 and 384 tokens of its 16x VAE's latents
    "hidream": (Size(128, 128), Size(256, 256)),
    "ernie_image": (Size(128, 128), Size(256, 256)),
    "lumina2": (Size(128, 128), Size(256, 256)),
    "cogview3plus": (Size(128, 128), Size(256, 256)),
    "latte": (Size(64, 128, 16), Size(128, 256, 16)),
    "allegro": (Size(64, 128, 5), Size(128, 256, 5)),  # 2 latent frames: 64 and 256 tokens
    "bria": (Size(128, 128), Size(256, 256)),
    "longcat_image": (Size(128, 128), Size(256, 256)),
    "ovis_image": (Size(128, 128), Size(256, 256)),
    "framepack": (Size(64, 128, 33), Size(128, 256, 33)),  # one window: the history tokens ~22% of the sequence
    "wan_animate": (Size(64, 128, 5), Size(128, 256, 5)),
    "kandinsky6": (Size(64, 128, 5), Size(128, 256, 5)),
    "joyimage_edit": (Size(128, 128), Size(256, 256)),
    "joyimage_edit_plus": (Size(128, 128), Size(256, 256)),
    "bria_fibo": (Size(128, 128), Size(256, 256)),
    "bria_fibo2": (Size(128, 128), Size(256, 256)),
    "anyflow": (Size(64, 128, 5), Size(128, 256, 5)),
}


def sized_config(family: str, config: dict[str, Any], size: Size) -> dict[str, Any]:
    """Families whose position tables are sized from the config: match the input, as at their native size."""
    if family == "cogvideox":  # its sin-cos position table then comes from the buffer
        config.update(sample_height=size.height // 8, sample_width=size.width // 8, sample_frames=size.num_frames)
    if family in ("pixart", "dit"):  # its sin-cos position table is then the buffer made at init, as at native size
        config.update(sample_size=size.height // 8)
    if family == "sana":  # likewise, over DC-AE's 32x latents
        config.update(sample_size=size.height // 32)
    if family == "sd3":
        config.update(sample_size=size.height // 8, pos_embed_max_size=max(size.height, size.width) // 8)
    return config


def activation_growth(family: str, prepare: Callable[[torch.nn.Module], Any] | None = None,
                      backward: bool = False, overrides: dict[str, Any] | None = None,
                      inputs: Callable[[dict[str, Any], int], dict[str, Any]] | None = None,
                      sizes: tuple[Size, Size] | None = None) -> float:
    """Activation growth of ``family`` in LD per token; ``prepare`` (e.g. ``apply_sequence_chunking``) is applied to
    each model before its trace. ``backward``: of a training step instead, the forward with autograd recording and
    the backward of the squared prediction's mean, into parameter gradients that exist before it (as in every step
    after the first with ``zero_grad(set_to_none=False)``). ``overrides``: config entries over
    :data:`GROWTH_CONFIGS` (e.g. more blocks). ``inputs``: ``(inputs, tokens) -> inputs``, the family's inputs at a
    size changed for the call (e.g. per-token timesteps). ``sizes``: the two sizes instead of :data:`GROWTH_SIZES`
    (e.g. more frames, for per-frame tables)."""
    spec = get_family(family)
    peaks, tokens = [], []
    for size in sizes or GROWTH_SIZES[family]:
        if backward:  # 4x the tokens: a training step's chunks at the small size hold a token or two
            size = Size(2 * size.height, 2 * size.width, size.num_frames)
        heads = GROWTH_HEADS if set(spec.width_keys) <= set(GROWTH_HEADS) else {}
        config = sized_config(family, {**spec.config("tiny"), **heads, **GROWTH_CONFIGS[family], **(overrides or {})},
                              size)
        model = spec.build(config).to(torch.float32)  # as from_pretrained(torch_dtype=float32): fp64 buffers cast
        if prepare is not None:
            prepare(model)
        call = spec.make_inputs(model.config, batch_size=1, height=size.height, width=size.width,
                                num_frames=size.num_frames, masked=True)
        tokens.append(spec.num_tokens(model.config, size))
        if inputs is not None:
            call = inputs(call, tokens[-1])
        if backward:
            allocate_gradients(model)
            peaks.append(trace_memory(training_step, model, call).peak_bytes)
        else:
            with torch.no_grad():
                peaks.append(trace_memory(model, **call).peak_bytes)
    return (peaks[1] - peaks[0]) / ((tokens[1] - tokens[0]) * spec.hidden_size(model.config) * 4)
