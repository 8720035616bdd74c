"""memopt on diffusers denoisers it has no family spec or sequence plan for (transformers, UNets, ControlNets).

memopt's plans cover the families in ``memopt.models``; users will also point it at every other diffusers
transformer. On those, each technique must be exact or refuse/skip with a clear message, never compute something
else, and ``remove_memory_optimizations`` must restore outputs and ``state_dict`` bit for bit. The table below builds
each class tiny and random (fp32, CPU, batch 2 where the class takes a batch, odd token counts, padded masks where the
model takes one); the parametrized tests apply chunked FeedForward, chunked attention, sequence chunking (refused: no
plan; the Flux, SD3, Qwen-Image and HunyuanDiT ControlNets run their family's plan, exact) and the planner to each,
and compare every tensor the model returns.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any, Callable, NamedTuple

import diffusers
import pytest
import torch

from memopt import (apply_chunked_attention, apply_chunked_feedforward, apply_memory_optimizations,
                    apply_sequence_chunking, remove_memory_optimizations)
from memopt.hooks._common import has_memopt_hooks
from memopt.hooks.attention import CHUNKED_ATTENTION_HOOK
from memopt.planner import BudgetError

Built = tuple[torch.nn.Module, dict[str, Any]]


def _mask(batch: int, length: int, valid: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Key mask over ``length`` text tokens: sample 0 keeps all, sample 1 only the first ``valid``."""
    mask = torch.ones(batch, length, dtype=dtype)
    mask[1, valid:] = 0
    return mask


def _sd_unet_inputs(**extra: torch.Tensor) -> dict[str, torch.Tensor]:
    """A Stable-Diffusion-style UNet call at the builders' sizes: 2 latents of 4 x 9 x 7, 9 prompt tokens 12 wide
    with a padded key mask, and ``extra`` arguments."""
    return dict(sample=torch.randn(2, 4, 9, 7), timestep=torch.tensor([3, 500]),
                encoder_hidden_states=torch.randn(2, 9, 12), encoder_attention_mask=_mask(2, 9, 6), **extra)


# ------------------------------------------------------------------------------------------------ builders
def _sana() -> Built:
    model = diffusers.SanaTransformer2DModel(
        patch_size=1, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=4, num_attention_heads=2,
        num_cross_attention_heads=2, cross_attention_head_dim=4, cross_attention_dim=8, caption_channels=8,
        sample_size=8)
    return model, dict(hidden_states=torch.randn(2, 4, 5, 7), encoder_hidden_states=torch.randn(2, 9, 8),
                       timestep=torch.tensor([3, 500]), encoder_attention_mask=_mask(2, 9, 6))


def _sana_video() -> Built:
    model = diffusers.SanaVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=12, num_layers=2,
        num_cross_attention_heads=2, cross_attention_head_dim=12, cross_attention_dim=24, caption_channels=16,
        mlp_ratio=2.5, sample_size=8, patch_size=(1, 2, 2), qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
    return model, dict(hidden_states=torch.randn(2, 4, 3, 6, 10), encoder_hidden_states=torch.randn(2, 9, 16),
                       timestep=torch.tensor([3, 500]), encoder_attention_mask=_mask(2, 9, 6))




def _omnigen() -> Built:
    model = diffusers.OmniGenTransformer2DModel(
        hidden_size=16, num_attention_heads=4, num_key_value_heads=4, intermediate_size=32, num_layers=2,
        pad_token_id=0, vocab_size=1000, in_channels=4, time_step_dim=4,
        rope_scaling={"long_factor": [1, 2], "short_factor": [1, 2]})
    text, height, width = 23, 10, 14
    tokens = text + 1 + height * width // 4  # text, time, 5 x 7 latent tokens
    mask = torch.ones(2, tokens, tokens)
    mask[1, :, :3] = 0  # sample 1: three padded text tokens at the front
    return model, dict(hidden_states=torch.randn(2, 4, height, width), timestep=torch.rand(2),
                       input_ids=torch.randint(0, 10, (2, text)), input_img_latents=[torch.randn(1, 4, 6, 6)],
                       input_image_sizes={0: [[0, 9]]},  # sample 0's 3 x 3 image tokens replace text tokens 0-8
                       attention_mask=mask, position_ids=torch.arange(tokens).repeat(2, 1))


def _sana_wm() -> Built:
    model = diffusers.SanaWMTransformer3DModel(
        in_channels=4, num_layers=2, hidden_size=32, num_attention_heads=2, linear_head_dim=16, softmax_every_n=2,
        chunk_plucker_channels=6, chunk_plucker_post_attn_blocks=2, caption_channels=16, mlp_ratio=2.5)
    frames, height, width = 3, 5, 7  # 105 tokens, patch 1: one GDN block, one softmax block
    c2w = torch.eye(4).repeat(2, frames, 1, 1)
    c2w[..., :3, 3] = torch.randn(2, frames, 3) * 0.1  # camera moving between frames
    intrinsics = torch.tensor([width * 0.8, height * 0.8, width / 2, height / 2]).repeat(2, frames, 1)
    return model, dict(hidden_states=torch.randn(2, 4, frames, height, width),
                       timestep=torch.tensor([[[3.0] * frames], [[500.0] * frames]]),
                       encoder_hidden_states=torch.randn(2, 1, 9, 16), encoder_attention_mask=_mask(2, 9, 6),
                       camera_conditions=torch.cat([c2w.flatten(2), intrinsics], dim=-1),
                       chunk_plucker=torch.randn(2, 6, frames, height, width))


def _kandinsky6_sr() -> Built:
    # One block, 2 heads x 16; the token grid's height and width must be multiples of 8 (NABLA's 8 x 8 token tiles),
    # so the token count is a multiple of 64: 3 frames x 8 x 16 = 384. pooled_bias is zero-initialised (build()
    # re-randomises it). Window (3, 3, 3) so that the sliding-tile prior leaves blocks out.
    model = diffusers.Kandinsky6SRTransformer3DModel(
        in_visual_dim=4, out_visual_dim=8, time_dim=16, model_dim=32, ff_dim=80, num_visual_blocks=1,
        axes_dims=(4, 4, 8), nabla_window=(3, 3, 3))
    return model, dict(hidden_states=torch.randn(2, 3, 8, 16, 9), timestep=torch.tensor([3.0, 500.0]))


def _anyflow_far() -> Built:
    # Three latent frames as three FAR chunks with full_chunk_limit=2: the first is demoted to compressed context
    # (far_patch_embedding, 4x4 patches: 3 x 5 = 15 tokens), the last two are full resolution (2 x 6 x 10 = 120):
    # 135 tokens, attended under the model's causal flex BlockMask (the training / one-call path, kv_cache=None).
    model = diffusers.AnyFlowFARTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, text_dim=24, freq_dim=16,
        ffn_dim=80, num_layers=2, rope_max_seq_len=64, full_chunk_limit=2, chunk_partition=(1, 1, 1))
    frames = 3
    timestep = torch.tensor([[0.0, 999.0, 999.0], [0.0, 500.0, 500.0]])
    return model, dict(hidden_states=torch.randn(2, frames, 4, 12, 20), timestep=timestep,
                       r_timestep=torch.tensor([[0.0, 749.0, 749.0], [0.0, 250.0, 250.0]]),
                       encoder_hidden_states=torch.randn(2, 9, 24), chunk_partition=[1, 1, 1])


def _nucleus_image() -> Built:
    # One dense block and one expert-choice MoE block (4 experts of width 16, capacity factor 2); the routed experts'
    # packed weights are uninitialised (torch.empty) in the constructor.
    model = diffusers.NucleusMoEImageTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, num_key_value_heads=1, in_channels=16, out_channels=4,
        num_layers=2, joint_attention_dim=24, axes_dims_rope=(4, 6, 6), mlp_ratio=6.0,
        dense_moe_strategy="leave_first_block_dense", num_experts=4, moe_intermediate_dim=16,
        capacity_factors=[0.0, 2.0], use_grouped_mm=False)
    with torch.no_grad():
        for module in model.modules():
            if type(module).__name__ == "SwiGLUExperts":
                module.gate_up_proj.normal_(std=module.hidden_size ** -0.5)
                module.down_proj.normal_(std=module.moe_intermediate_dim ** -0.5)
    height, width = 5, 7
    return model, dict(hidden_states=torch.randn(2, height * width, 16), encoder_hidden_states=torch.randn(2, 9, 24),
                       encoder_hidden_states_mask=_mask(2, 9, 6), timestep=torch.tensor([0.1, 0.9]),
                       img_shapes=[(1, height, width)] * 2)


def _wan_animate2() -> Built:
    # The reference pass (kv_cache_mode="extract", the only call without a flex BlockMask): dense self-attention over
    # the reference video's 3 x 3 x 5 = 45 tokens, each block storing its pre-RoPE K/V into the cache (overwritten at
    # every call). Latents and text states are per-sample lists; the two prompts are 8 and 5 tokens long, padded by
    # the model to text_len with zeros (no mask argument exists). CLIP states are 1280 wide (hardcoded in MLPProj).
    from diffusers.models.transformers.transformer_wan_animate_2 import WanAnimate2KVCache

    model = diffusers.WanAnimate2Transformer3DModel(
        dim=32, num_heads=2, ffn_dim=80, freq_dim=16, text_dim=24, text_len=8, in_dim=12, out_dim=4, num_layers=2)
    frames, height, width = 3, 6, 10  # patch (1, 2, 2): 3 x 3 x 5 tokens
    return model, dict(hidden_states=[torch.randn(4, frames, height, width) for _ in range(2)],
                       timestep=torch.tensor([999, 999]),
                       encoder_hidden_states=[torch.randn(8, 24), torch.randn(5, 24)],
                       condition_latents=[torch.randn(8, frames, height, width) for _ in range(2)],
                       encoder_hidden_states_image=torch.randn(2, 5, 1280),
                       kv_cache=WanAnimate2KVCache(2), kv_cache_mode="extract", seq_len=45,
                       offset_grid_sizes=torch.tensor([[3, 3, 5]] * 2))


def _ace_step() -> Built:
    # Two layers: sliding-window self-attention (window 4, a dense additive band mask) then full attention, each with
    # cross-attention over the condition states (the forward takes no padding mask). 21 latent frames are padded to
    # the patch size 2 by the model: 11 tokens. in_channels = context (8) + latent (4) channels.
    model = diffusers.AceStepTransformer1DModel(
        hidden_size=32, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, in_channels=12, audio_acoustic_hidden_dim=4, patch_size=2, sliding_window=4,
        encoder_hidden_size=24)
    return model, dict(hidden_states=torch.randn(2, 21, 4), timestep=torch.tensor([0.3, 0.9]),
                       timestep_r=torch.tensor([0.3, 0.5]), encoder_hidden_states=torch.randn(2, 9, 24),
                       context_latents=torch.randn(2, 21, 8))


def _minimax_music3() -> Built:
    # 22 latent frames + the prepended timestep token: 23 tokens; frame-aligned condition states (no mask).
    model = diffusers.MiniMaxMusic3Transformer1DModel(
        in_channels=4, condition_dim=8, num_layers=2, num_attention_heads=2, attention_head_dim=16, ff_inner_dim=48,
        rotary_dim=8, fourier_embedding_dim=16)
    return model, dict(hidden_states=torch.randn(2, 4, 22), timestep=torch.tensor([0.2, 0.8]),
                       encoder_hidden_states=torch.randn(2, 22, 8))


def _sana_wm_refiner() -> Built:
    # One plain forward (no KV cache): 3 latent frames x 3 x 5 = 45 packed tokens, caller-made rotary tables (the
    # model computes none itself; built here exactly as the refiner pipeline does), a padded text mask. The audio
    # modules exist for the checkpoint but never run.
    model = diffusers.SanaWMLTX2RefinerTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=8, out_channels=8, cross_attention_dim=32,
        caption_channels=24, num_layers=2, audio_num_attention_heads=2, audio_attention_head_dim=8,
        audio_in_channels=8, audio_out_channels=8, audio_cross_attention_dim=16)
    frames, height, width = 3, 3, 5
    rotary = model.build_rotary_emb_for_absolute_positions(batch_size=2, frame_positions=list(range(frames)),
                                                           height=height, width=width, device=torch.device("cpu"),
                                                           fps=24.0)
    return model, dict(hidden_states=torch.randn(2, frames * height * width, 8),
                       encoder_hidden_states=torch.randn(2, 9, 24), timestep=torch.full((2, 1), 600.0),
                       video_rotary_emb=rotary, encoder_attention_mask=_mask(2, 9, 6))


def _unet_2d_condition() -> Built:
    # SD-style: one cross-attention down block (9 x 7 = 63 latent tokens), a plain one (5 x 4 after the stride-2
    # conv; the odd size is restored by the upsampler's forwarded upsample_size), the cross-attention mid block and
    # a cross-attention up block (2 transformers): 4 BasicTransformerBlocks, 4 GEGLU FeedForwards.
    model = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=8, cross_attention_dim=12, attention_head_dim=2)
    return model, _sd_unet_inputs()


def _dreamlite_unet() -> Built:
    # The class defaults' layout shrunk: 320/640-channel stages without self-attention, the last with it (MQA,
    # RMSNorm qk_norm, DreamLiteAttnProcessor2_0 installed by the constructor), depthwise-separable resnets, x6 GEGLU.
    # Down: no-self-attn (1 transformer), self-attn (1); mid (num_mid_layers=1: 1); up: self-attn (2), no-self-attn
    # (2): 7 FeedForwards. 9 x 7 latent (63 tokens), 5 x 4 at the second stage.
    model = diffusers.DreamLiteUNetModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DreamLiteCrossAttnNoSelfAttnDownBlock2D", "DreamLiteCrossAttnDownBlock2D"),
        up_block_types=("DreamLiteCrossAttnUpBlock2D", "DreamLiteCrossAttnNoSelfAttnUpBlock2D"),
        norm_num_groups=8, cross_attention_dim=12, attention_head_dim=2, num_kv_heads=1, ff_mult=2)
    return model, _sd_unet_inputs()


def _svd_unet() -> Built:
    # SVD: spatial transformer (BasicTransformerBlock) + temporal one (TemporalBasicTransformerBlock: ff_in and ff)
    # per TransformerSpatioTemporalModel; 3 frames of 9 x 7. One spatio-temporal down block, a plain one, the mid
    # block, one spatio-temporal up block (2 transformers). No text mask: SVD's conditioning is one image token.
    model = diffusers.UNetSpatioTemporalConditionModel(
        sample_size=8, in_channels=8, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
        addition_time_embed_dim=4, projection_class_embeddings_input_dim=12, cross_attention_dim=12,
        num_attention_heads=(2, 4))
    return model, dict(sample=torch.randn(2, 3, 8, 9, 7), timestep=torch.tensor([3.0, 500.0]),
                       encoder_hidden_states=torch.randn(2, 1, 12),
                       added_time_ids=torch.tensor([[6.0, 127.0, 0.02], [7.0, 100.0, 0.05]]))


def _transformer_2d() -> Built:
    # The legacy generic class, continuous input (GroupNorm, conv proj_in), 2 BasicTransformerBlocks with
    # cross-attention to 9 text tokens under a padded mask; 5 x 7 = 35 tokens.
    model = diffusers.Transformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=16, norm_num_groups=8, num_layers=2,
        cross_attention_dim=12)
    return model, dict(hidden_states=torch.randn(2, 16, 5, 7), encoder_hidden_states=torch.randn(2, 9, 12),
                       encoder_attention_mask=_mask(2, 9, 6))


def _transformer_temporal() -> Built:
    # As in UNet3DConditionModel's temp_attentions: attention over 5 frames at each of the 3 x 3 positions (no text),
    # batch 2 -> 18 sequences of 5 tokens; 2 BasicTransformerBlocks (self-attention only).
    model = diffusers.TransformerTemporalModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=16, norm_num_groups=8, num_layers=2)
    return model, dict(hidden_states=torch.randn(2 * 5, 16, 3, 3), num_frames=5)


def _unet_3d_condition() -> Built:
    # ModelScope T2V layout shrunk: transformer_in (temporal, 1 layer), then per cross-attention block a spatial
    # Transformer2DModel and a temporal TransformerTemporalModel: 3 frames of 9 x 7 (63 tokens; 5 x 4 after the
    # stride-2 conv, restored by the forwarded upsample_size). The forward takes no text mask.
    model = diffusers.UNet3DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"), up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        norm_num_groups=8, cross_attention_dim=12, attention_head_dim=2)
    return model, dict(sample=torch.randn(2, 4, 3, 9, 7), timestep=torch.tensor([3, 500]),
                       encoder_hidden_states=torch.randn(2, 9, 12))


def _i2vgen_xl() -> Built:
    # UNet3D's layout plus the image conditioning: image latents (4 channels, hardcoded) are concatenated to the
    # sample and, pooled to 8 x 8, appended as 64 context tokens; image_embeddings become in_channels more tokens.
    model = diffusers.I2VGenXLUNet(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"), up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        norm_num_groups=8, cross_attention_dim=12, attention_head_dim=2)
    return model, dict(sample=torch.randn(2, 4, 3, 9, 7), timestep=torch.tensor([3, 500]), fps=torch.tensor([8, 16]),
                       image_latents=torch.randn(2, 4, 3, 9, 7), image_embeddings=torch.randn(2, 12),
                       encoder_hidden_states=torch.randn(2, 9, 12))


def _unet_motion() -> Built:
    # AnimateDiff with its own motion-module config (no MotionAdapter needed): a spatial transformer per
    # cross-attention block and a motion module (temporal transformer over the 3 frames) after every resnet.
    model = diffusers.UNetMotionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlockMotion", "DownBlockMotion"),
        up_block_types=("UpBlockMotion", "CrossAttnUpBlockMotion"), norm_num_groups=8, cross_attention_dim=12,
        num_attention_heads=2, motion_num_attention_heads=2, motion_max_seq_length=8)
    # the pipeline repeats the text states per frame (batch x frames rows)
    return model, dict(sample=torch.randn(2, 4, 3, 9, 7), timestep=torch.tensor([3, 500]),
                       encoder_hidden_states=torch.randn(2, 9, 12).repeat_interleave(3, dim=0))


def _kandinsky3() -> Built:
    # Two levels: the first without attention, the second (5 x 7 = 35 tokens) with cross- and self-attention; the
    # pooled-text time condition is attention with one query. layers_per_block=1 breaks the class's channel
    # bookkeeping, and odd latents are silently cropped (9 x 7 -> 8 x 6), hence 10 x 14.
    model = diffusers.Kandinsky3UNet(in_channels=4, time_embedding_dim=16, groups=4, attention_head_dim=4,
                                     layers_per_block=2, block_out_channels=(16, 32), cross_attention_dim=16,
                                     encoder_hid_dim=12)
    return model, dict(sample=torch.randn(2, 4, 10, 14), timestep=torch.tensor([3, 500]),
                       encoder_hidden_states=torch.randn(2, 9, 12), encoder_attention_mask=_mask(2, 9, 6))


def _stable_cascade() -> Built:
    # Two levels of (ResBlock, TimestepBlock, AttnBlock): self-attention over the 9 x 7 map (63 tokens) concatenated
    # with the 2 x 9 text + 2 pooled-text condition tokens as K/V. sca/crp stay None (the forward tests them with
    # `cond or ...`, which a tensor cannot pass).
    model = diffusers.StableCascadeUNet(
        in_channels=4, out_channels=4, timestep_ratio_embedding_dim=8, patch_size=1, conditioning_dim=16,
        block_out_channels=(16, 32), num_attention_heads=(2, 2), down_num_layers_per_block=(1, 1),
        up_num_layers_per_block=(1, 1), down_blocks_repeat_mappers=(1, 1), up_blocks_repeat_mappers=(1, 1),
        clip_text_in_channels=12, clip_text_pooled_in_channels=12, clip_seq=2, dropout=(0.0, 0.0))
    return model, dict(sample=torch.randn(2, 4, 9, 7), timestep_ratio=torch.tensor([0.2, 0.9]),
                       clip_text_pooled=torch.randn(2, 1, 12), clip_text=torch.randn(2, 9, 12))


def _audioldm2() -> Built:
    # Each cross-attention block holds three transformers: self-attention only (None), cross to
    # encoder_hidden_states (12 wide, 9 tokens, padded mask), cross to encoder_hidden_states_1 (16 wide, 5 tokens).
    model = diffusers.AudioLDM2UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=8, cross_attention_dim=([None, 12, 16], [None, 12, 16]),
        attention_head_dim=2)
    return model, _sd_unet_inputs(encoder_hidden_states_1=torch.randn(2, 5, 16),
                                  encoder_attention_mask_1=_mask(2, 5, 3))


def _controlnet_xs() -> Built:
    # Base UNet and a thin control UNet run side by side, exchanging features at every block; odd latents break the
    # ctrl -> base additions, so 10 x 14 (140 tokens, 5 x 7 = 35 at the second level). Control image at 2x.
    model = diffusers.UNetControlNetXSModel(
        sample_size=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), block_out_channels=(16, 32), norm_num_groups=8,
        cross_attention_dim=12, num_attention_heads=2, ctrl_conditioning_embedding_out_channels=(4, 8),
        ctrl_block_out_channels=(4, 8), ctrl_num_attention_heads=2, ctrl_max_norm_num_groups=2)
    return model, dict(sample=torch.randn(2, 4, 10, 14), timestep=torch.tensor([3, 500]),
                       encoder_hidden_states=torch.randn(2, 9, 12), controlnet_cond=torch.randn(2, 3, 20, 28))


def _unet_1d() -> Built:
    # Dance Diffusion's layout: SelfAttention1d (channels // 32 heads, its own bmm + softmax, not a diffusers
    # Attention) in the last down block, the mid block and the first up block; no FeedForward. The length is halved
    # four times (mid block included), so it must be a multiple of 8 and at least 24: no odd length is valid.
    model = diffusers.UNet1DModel(sample_size=24, in_channels=2, out_channels=2, block_out_channels=(32, 32, 32),
                                  extra_in_channels=8, time_embedding_dim=8, norm_num_groups=8)
    return model, dict(sample=torch.randn(2, 2, 24), timestep=torch.tensor([3, 500]))


def _unet_2d() -> Built:
    # Unconditional DDPM-style: resnets and, at the second level (5 x 7 = 35 tokens) and in the mid block, Attention
    # without FeedForward. Odd latents are not valid (the up blocks get no upsample_size).
    model = diffusers.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8, attention_head_dim=4)
    return model, dict(sample=torch.randn(2, 3, 10, 14), timestep=torch.tensor([3, 500]))


def _ideogram4() -> Built:
    model = diffusers.Ideogram4Transformer2DModel(
        in_channels=16, num_layers=2, attention_head_dim=8, num_attention_heads=4, intermediate_size=48,
        adaln_dim=16, llm_features_dim=24, mrope_section=(2, 1, 1))
    tokens, height, width = 45, 5, 7
    indicator = torch.full((2, tokens), -1)  # per sample: text tokens, the 5 x 7 image, then padding (segment 1)
    segment_ids = torch.ones(2, tokens, dtype=torch.long)
    position_ids = torch.zeros(2, tokens, 3, dtype=torch.long)
    for sample, text in enumerate((9, 6)):
        image = slice(text, text + height * width)
        indicator[sample, :text], indicator[sample, image] = 3, 2
        segment_ids[sample, :image.stop] = 0
        position_ids[sample, :text, 0] = torch.arange(text)
        position_ids[sample, image, 0] = text
        position_ids[sample, image, 1] = torch.arange(height).repeat_interleave(width)
        position_ids[sample, image, 2] = torch.arange(width).repeat(height)
    return model, dict(hidden_states=torch.randn(2, tokens, 16), timestep=torch.tensor([0.1, 0.7]),
                       encoder_hidden_states=torch.randn(2, tokens, 24), position_ids=position_ids,
                       segment_ids=segment_ids, indicator=indicator)


def _lumina_next() -> Built:
    # 4 query heads over 2 KV heads (GQA repeated in the processor), head_dim 8; 5 x 7 = 35 image tokens; the cross
    # attention's padded key mask; the self- and cross-attention outputs (B, S, H, D) are mixed per head by the tanh
    # gate before attn2.to_out. Proportional attention (the pipeline's default): base_sequence_length rescales the
    # self-attention softmax. Rotary table for a 16 x 16 grid as LuminaText2ImgPipeline builds it (384 x 384 there).
    from diffusers.models.embeddings import get_2d_rotary_pos_embed_lumina

    model = diffusers.LuminaNextDiT2DModel(
        sample_size=8, patch_size=2, in_channels=4, hidden_size=32, num_layers=2, num_attention_heads=4,
        num_kv_heads=2, multiple_of=16, cross_attention_dim=24)
    with torch.no_grad():
        model.pad_token.normal_()  # torch.empty (unused in forward): no NaN garbage in the state_dict comparison
    return model, dict(hidden_states=torch.randn(2, 4, 10, 14), timestep=torch.tensor([0.1, 0.7]),
                       encoder_hidden_states=torch.randn(2, 9, 24), encoder_mask=_mask(2, 9, 6),
                       image_rotary_emb=get_2d_rotary_pos_embed_lumina(8, 16, 16),
                       cross_attention_kwargs={"base_sequence_length": 16})


def _prior() -> Built:
    # Kandinsky 2.2 prior layout (layer-norm in / on the projected embedding, the prd token): 9 text tokens + the
    # projected embedding, time and noisy-embedding tokens + prd = 13 tokens under a causal additive mask plus the
    # text key-padding mask, repeated per head into a (B * heads, 13, 13) mask. zero-init positional_embedding and
    # prd_embedding re-randomised by build().
    model = diffusers.PriorTransformer(
        num_attention_heads=2, attention_head_dim=8, num_layers=2, embedding_dim=12, num_embeddings=9,
        additional_embeddings=4, norm_in_type="layer", embedding_proj_norm_type="layer")
    return model, dict(hidden_states=torch.randn(2, 12), timestep=torch.tensor([3, 500]),
                       proj_embedding=torch.randn(2, 12), encoder_hidden_states=torch.randn(2, 9, 12),
                       attention_mask=_mask(2, 9, 6, torch.bool))


def _uvit() -> Built:
    # aMUSEd layout shrunk: 10 x 14 token ids, a conv-stem UVitBlock (1 ConvNeXt block + SkipFFTransformerBlock, at
    # 140 tokens), 2x2 downsample to 5 x 7 = 35 tokens for the two BasicTransformerBlocks (ada_norm_continuous, the
    # pooled text embedding), then the up UVitBlock and 2x2 upsample. 5 micro-conditions x 4 = micro_cond_embed_dim.
    # No mask argument exists.
    model = diffusers.UVit2DModel(
        hidden_size=32, cond_embed_dim=8, micro_cond_encode_dim=4, micro_cond_embed_dim=20, encoder_hidden_size=24,
        vocab_size=33, codebook_size=32, in_channels=8, block_out_channels=16, num_res_blocks=1, downsample=True,
        upsample=True, block_num_heads=2, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        sample_size=8)
    return model, dict(input_ids=torch.randint(0, 33, (2, 10, 14)), encoder_hidden_states=torch.randn(2, 9, 24),
                       pooled_text_emb=torch.randn(2, 8),
                       micro_conds=torch.tensor([[256.0, 256.0, 0.0, 0.0, 6.0], [320.0, 448.0, 0.0, 0.0, 6.0]]))


def _cosmos3_omni() -> Built:
    # One packed sequence with no batch dimension: a causal 9-token text prefix, then 2 latent frames of 5 x 7 in
    # 2 x 2 patches (3 x 4 per frame, the odd latent padded: 24 tokens; frame 1 noisy and predicted) and 5 noisy sound
    # tokens, with 3-axis mRoPE positions. Outputs: the vision and the sound predictions.
    model = diffusers.Cosmos3OmniTransformer(
        head_dim=8, hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
        num_hidden_layers=2, latent_channel=4, latent_patch_size=2, patch_latent_dim=16, vocab_size=64,
        rope_axes_dim=(2, 1, 1), rope_theta=10000.0, sound_gen=True, sound_dim=4)
    text, frames, height, width, sound = 9, 2, 5, 7, 5
    grid_h, grid_w = (height + 1) // 2, (width + 1) // 2  # 3 x 4 patches per frame (odd latent padded)
    vision = frames * grid_h * grid_w
    length = text + vision + sound
    position_ids = torch.zeros(3, length, dtype=torch.long)
    position_ids[:, :text] = torch.arange(text)
    t, h, w = torch.meshgrid(torch.arange(frames), torch.arange(grid_h), torch.arange(grid_w), indexing="ij")
    position_ids[0, text:text + vision] = text + 15 + t.flatten()
    position_ids[1, text:text + vision], position_ids[2, text:text + vision] = h.flatten(), w.flatten()
    position_ids[0, text + vision:] = text + 15 + torch.arange(sound)
    noisy = torch.tensor([1])
    vision_indexes = torch.arange(text, text + vision)
    sound_indexes = torch.arange(text + vision, length)
    return model, dict(
        input_ids=torch.randint(0, 64, (text,)), text_indexes=torch.arange(text), position_ids=position_ids,
        und_len=text, sequence_length=length, vision_tokens=[torch.randn(1, 4, frames, height, width)],
        vision_token_shapes=[(frames, grid_h, grid_w)], vision_sequence_indexes=vision_indexes,
        vision_mse_loss_indexes=vision_indexes[grid_h * grid_w:], vision_timesteps=torch.full((vision // 2,), 600.0),
        vision_noisy_frame_indexes=[noisy], sound_tokens=[torch.randn(4, sound)], sound_token_shapes=[(sound, 1, 1)],
        sound_sequence_indexes=sound_indexes, sound_mse_loss_indexes=sound_indexes,
        sound_timesteps=torch.full((sound,), 600.0), sound_noisy_frame_indexes=[torch.arange(sound)])


def _dreamlite_transformer() -> Built:
    # As DreamLiteUNetModel sets it up: DreamLiteAttnProcessor2_0 (4 query heads over 1 KV head, which the default
    # processor cannot run) installed on every Attention after construction. 5 x 7 = 35 tokens, cross-attention to
    # 9 text tokens under a padded mask.
    from diffusers.models.unets.unet_dreamlite import DreamLiteAttnProcessor2_0

    model = diffusers.DreamLiteTransformer2DModel(
        num_attention_heads=4, attention_head_dim=8, in_channels=16, norm_num_groups=8, num_layers=2,
        cross_attention_dim=12, qk_norm="rms_norm", num_kv_heads=1, ff_mult=2)
    for module in model.modules():
        if isinstance(module, diffusers.models.attention_processor.Attention):
            module.set_processor(DreamLiteAttnProcessor2_0())
    return model, dict(hidden_states=torch.randn(2, 16, 5, 7), encoder_hidden_states=torch.randn(2, 9, 12),
                       encoder_attention_mask=_mask(2, 9, 6))


def _rfd4_proteina() -> Built:
    # 11 tokens (sample 1: 8 valid under padding_mask) in two molecules, the first 2 in-context conditioning;
    # per-token features (CA coordinates, local latents, token type) and a pair representation (CA distances, bond
    # path lengths, molecule pairs).
    model = diffusers.RFD4ProteinaTransformer(
        nlayers=2, token_dim=32, nheads=4, dim_cond=16, pair_repr_dim=8, latent_dim=4, token_type_emb_dim=4,
        cath_emb_dim=2, t_emb_dim=8, seq_sep_dim=6, xt_pair_dist_dim=5,
        feats_seq=("xt_bb_ca", "xt_local_latents", "token_type"),
        feats_cond_seq=("time_emb_bb_ca", "time_emb_local_latents"),
        feats_pair_repr=("xt_bb_ca_pair_dists", "token_bond_path_length", "molecule_idx_pair"),
        feats_pair_cond=("time_emb_bb_ca",), tri_mult_c=8, num_sequence_classes=10)
    tokens = 11
    padding = _mask(2, tokens, 8, torch.bool)
    in_context = torch.zeros(2, tokens, dtype=torch.bool)
    in_context[:, :2] = True
    return model, dict(bb_ca=torch.randn(2, tokens, 3), local_latents=torch.randn(2, tokens, 4),
                       bb_ca_time=torch.tensor([0.2, 0.7]), local_latents_time=torch.tensor([0.3, 0.6]),
                       padding_mask=padding, token_type=torch.randint(0, 7, (2, tokens)),
                       conditioning={"token_bond_path_length": torch.randint(0, 8, (2, tokens, tokens)),
                                     "molecule_iid": torch.tensor([[0] * 6 + [1] * 5, [0] * 4 + [1] * 7]),
                                     "is_in_context_conditioning": in_context,
                                     "supports_local_latent": torch.ones(2, tokens, dtype=torch.bool)})


def _ltx2_diffusion_decoder() -> Built:
    # The LTX-2 diffusion decoder shrunk: 8-channel latents of 2 frames x 3 x 4 through deterministic stages and
    # diffusion blocks (neighborhood attention under flex BlockMasks). The forward draws noise from ``generator``: a
    # pre-hook reseeds it before every call, so that every call (reference, chunked, planned) sees the same noise.
    model = diffusers.LTX2VideoDiffusionDecoderModel(
        out_channels=3, latent_channels=8, patch_size=2, decoder_head_dim=8, decoder_stage_channels=(32, 16, 16),
        decoder_stage_depths=(1, 1, 2), decoder_stage_kernels=((3, 3, 3), (3, 3, 3)),
        decoder_upsample_strides=((1, 2, 2), (2, 2, 2)), decoder_upsample_channel_reductions=(2, 1),
        decoder_stage5_kernel=(3, 3, 3), decoder_t_emb_dim=16, temporal_compression_ratio=2,
        spatial_compression_ratio=8)
    generator = torch.Generator().manual_seed(0)
    model.register_forward_pre_hook(lambda module, args: generator.manual_seed(0) and None)
    return model, dict(z=torch.randn(2, 8, 2, 3, 4), generator=generator)


def _stable_audio() -> Built:
    # Self-attention over 1 global token + 20 latent frames = 21 tokens (partial RoPE on half of each 8-wide head,
    # built as the pipeline does), padded bool key mask; GQA cross-attention (4 query / 2 KV heads) over 9 text
    # tokens under a padded bool mask (a 0/1 float mask would be additive here). SwiGLU FeedForward per block.
    from diffusers.models.embeddings import get_1d_rotary_pos_embed

    model = diffusers.StableAudioDiTModel(
        sample_size=20, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=4,
        num_key_value_attention_heads=2, out_channels=4, cross_attention_dim=16, time_proj_dim=8,
        global_states_input_dim=12, cross_attention_input_dim=12)
    frames = 20
    rotary = get_1d_rotary_pos_embed(8 // 2, frames + 1, use_real=True, repeat_interleave_real=False)
    return model, dict(hidden_states=torch.randn(2, 4, frames), timestep=torch.tensor([0.3, 0.9]),
                       encoder_hidden_states=torch.randn(2, 9, 12), global_hidden_states=torch.randn(2, 1, 12),
                       rotary_embedding=rotary, attention_mask=_mask(2, frames, 14, torch.bool),
                       encoder_attention_mask=_mask(2, 9, 6, torch.bool))


def _stable_audio3() -> Built:
    # Differential attention (two kernel calls per attention module, q1/k1 - q2/k2 sharing v), RMS QK-norm, partial
    # RoPE (8 of 16 head channels); 3 memory tokens + 21 latent frames = 24 tokens. The text mask only swaps padded
    # positions for the learned padding embedding (cross-attention runs unmasked); local_add_cond (inpainting) is
    # added after cross-attention. Zero-initialised convs, padding embedding and to_local_embed are re-randomised.
    model = diffusers.StableAudio3DiTModel(
        io_channels=4, patch_size=1, embed_dim=32, depth=2, num_heads=2, cond_token_dim=12, global_cond_dim=12,
        local_add_cond_dim=5, timestep_features_dim=16, ff_mult=2.0, num_memory_tokens=3)
    frames = 21
    return model, dict(hidden_states=torch.randn(2, 4, frames), timestep=torch.tensor([0.3, 0.9]),
                       encoder_hidden_states=torch.randn(2, 9, 12), global_hidden_states=torch.randn(2, 12),
                       encoder_attention_mask=_mask(2, 9, 6, torch.bool), local_add_cond=torch.randn(2, 5, frames))


def _longcat_audio() -> Built:
    # 21 latent frames (sample 1: 15 valid, bool key mask; the attention output and the model output are zeroed at
    # padded frames), 9 text tokens (sample 1: 6 valid) through 4 ConvNeXtV2 blocks (GRN: statistics over the
    # sequence), RoPE on audio queries/keys and on text keys, global AdaLN, latent conditioning, long skip.
    model = diffusers.LongCatAudioDiTTransformer(
        dit_dim=32, dit_depth=2, dit_heads=2, dit_text_dim=12, latent_dim=4, ff_mult=2.0)
    frames = 21
    return model, dict(hidden_states=torch.randn(2, frames, 4), encoder_hidden_states=torch.randn(2, 9, 12),
                       encoder_attention_mask=_mask(2, 9, 6, torch.bool), timestep=torch.tensor([0.3, 0.9]),
                       attention_mask=_mask(2, frames, 15, torch.bool), latent_cond=torch.randn(2, frames, 4))


def _unidiffuser() -> Built:
    # U-ViT: 2 timestep tokens, 9 text tokens, 1 CLIP-image token and 5 x 5 latent patches (the class assumes a
    # square latent) = 37 tokens of self-attention only (post-LayerNorm blocks: in 1, mid 1, out 1 with a skip
    # linear); GEGLU FeedForwards with a final dropout. No mask argument exists. Its forward takes no return_dict and
    # returns three predictions (VAE latent, CLIP image, text), all compared.
    model = diffusers.UniDiffuserModel(
        text_dim=12, clip_img_dim=8, num_text_tokens=9, num_attention_heads=2, attention_head_dim=8, in_channels=4,
        out_channels=4, num_layers=2, sample_size=10, patch_size=2)
    return model, dict(latent_image_embeds=torch.randn(2, 4, 10, 10), image_embeds=torch.randn(2, 1, 8),
                       prompt_embeds=torch.randn(2, 9, 12), timestep_img=torch.tensor([3, 500]),
                       timestep_text=torch.tensor([0, 800]))


# ------------------------------------------------------------------------------------------------ ControlNets
def _flux_controlnet() -> Built:
    # InstantX-Union layout (num_mode): the mode embedding is prepended to the 9 text tokens (10 text + 35 image
    # tokens, joint attention over 45); packed latents (patch_size=1, 4 channels); no mask argument exists. One
    # FluxTransformerBlock and one FluxSingleTransformerBlock: 3 residuals (one per block, each 35 tokens x 32).
    model = diffusers.FluxControlNetModel(
        in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=24, pooled_projection_dim=16, axes_dims_rope=[4, 6, 6], num_mode=3)
    height, width = 5, 7
    img_ids = torch.zeros(height, width, 3)
    img_ids[..., 1] = torch.arange(height)[:, None]
    img_ids[..., 2] = torch.arange(width)[None, :]
    return model, dict(hidden_states=torch.randn(2, height * width, 4),
                       controlnet_cond=torch.randn(2, height * width, 4), controlnet_mode=torch.tensor([[0], [2]]),
                       encoder_hidden_states=torch.randn(2, 9, 24), pooled_projections=torch.randn(2, 16),
                       timestep=torch.tensor([0.3, 0.9]), img_ids=img_ids.reshape(-1, 3), txt_ids=torch.zeros(9, 3),
                       conditioning_scale=0.7)


def _sd3_controlnet() -> Built:
    # Two JointTransformerBlocks (the first with SD3.5's dual attention), 10 x 14 latents in 2 x 2 patches (35 image
    # tokens), 9 text tokens; no mask argument exists. A residual per block.
    model = diffusers.SD3ControlNetModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=4,
        joint_attention_dim=24, caption_projection_dim=32, pooled_projection_dim=16, out_channels=4,
        pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm")
    return model, dict(hidden_states=torch.randn(2, 4, 10, 14), controlnet_cond=torch.randn(2, 4, 10, 14),
                       encoder_hidden_states=torch.randn(2, 9, 24), pooled_projections=torch.randn(2, 16),
                       timestep=torch.tensor([3.0, 500.0]), conditioning_scale=0.7)


def _qwenimage_controlnet() -> Built:
    # Two QwenImageTransformerBlocks over 9 text + 35 image tokens (packed 2 x 2 latents, 16 channels), padded text
    # mask; returns the plain list of the 2 residuals when return_dict=False.
    model = diffusers.QwenImageControlNetModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=24, axes_dims_rope=(4, 6, 6))
    height, width = 5, 7
    return model, dict(hidden_states=torch.randn(2, height * width, 16),
                       controlnet_cond=torch.randn(2, height * width, 16), encoder_hidden_states=torch.randn(2, 9, 24),
                       encoder_hidden_states_mask=_mask(2, 9, 6), timestep=torch.tensor([0.3, 0.9]),
                       img_shapes=[[(1, height, width)]] * 2, conditioning_scale=0.7)


def _zimage_controlnet() -> Built:
    # Z-Image-Turbo-Fun-Controlnet layout: the controlnet shares the transformer's embedders, noise refiner and
    # context refiner (from_transformer), runs its own control_noise_refiner (1 ZImageTransformerBlock, its copy of
    # the class) over the control tokens and 2 ZImageControlTransformerBlocks over [control | caption]. Per-sample
    # lists: 5 x 7 = 35 image tokens (padded to 64 by the model) and captions of 9 and 41 tokens (padded to 32 and
    # 64), so the unified sequences are 96 and 128 long under a boolean key mask. Returns {layer: residual}.
    from diffusers.models.transformers.transformer_z_image import ZImageTransformer2DModel

    transformer = ZImageTransformer2DModel(dim=32, n_heads=2, n_kv_heads=2, n_layers=2, n_refiner_layers=1,
                                           in_channels=4, cap_feat_dim=24, axes_dims=[4, 6, 6],
                                           axes_lens=[256, 64, 64])
    model = diffusers.ZImageControlNetModel(
        control_layers_places=[0, 1], control_refiner_layers_places=[0], control_in_dim=4, dim=32,
        n_refiner_layers=1, n_heads=2, n_kv_heads=2)
    model = diffusers.ZImageControlNetModel.from_transformer(model, transformer)
    return model, dict(x=[torch.randn(4, 1, 10, 14) for _ in range(2)], t=torch.tensor([0.3, 0.9]),
                       cap_feats=[torch.randn(9, 24), torch.randn(41, 24)],
                       control_context=[torch.randn(4, 1, 10, 14) for _ in range(2)], conditioning_scale=0.7)


def _sana_controlnet() -> Built:
    # Two SanaTransformerBlocks (linear self-attention, cross-attention to 9 text tokens under a padded mask, GLUMBConv)
    # over 5 x 7 = 35 tokens; a residual per block.
    model = diffusers.SanaControlNetModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=4, num_layers=2,
        num_cross_attention_heads=2, cross_attention_head_dim=4, cross_attention_dim=8, caption_channels=8,
        sample_size=8, patch_size=1)
    return model, dict(hidden_states=torch.randn(2, 4, 5, 7), encoder_hidden_states=torch.randn(2, 9, 8),
                       timestep=torch.tensor([3, 500]), controlnet_cond=torch.randn(2, 4, 5, 7),
                       encoder_attention_mask=_mask(2, 9, 6), conditioning_scale=0.7)


def _hunyuandit_controlnet() -> Built:
    # transformer_num_layers // 2 - 1 = 2 HunyuanDiTBlocks (self-attention with 2-D RoPE, cross-attention to the
    # 9 CLIP + 7 T5 tokens, whose padded positions the model replaces by learned padding: no mask reaches attention);
    # 10 x 14 latents in 2 x 2 patches (35 tokens). The T5 pooler is F.multi_head_attention_forward, not an Attention.
    from diffusers.models.embeddings import get_2d_rotary_pos_embed

    model = diffusers.HunyuanDiT2DControlNetModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, patch_size=2, sample_size=8, hidden_size=16,
        transformer_num_layers=6, mlp_ratio=2.0, cross_attention_dim=16, cross_attention_dim_t5=16,
        pooled_projection_dim=8, text_len=9, text_len_t5=7)
    rotary = get_2d_rotary_pos_embed(8, ((0, 0), (5, 7)), (5, 7), output_type="pt")
    return model, dict(hidden_states=torch.randn(2, 4, 10, 14), timestep=torch.tensor([3.0, 500.0]),
                       controlnet_cond=torch.randn(2, 4, 10, 14), encoder_hidden_states=torch.randn(2, 9, 16),
                       text_embedding_mask=_mask(2, 9, 6), encoder_hidden_states_t5=torch.randn(2, 7, 16),
                       text_embedding_mask_t5=_mask(2, 7, 4),
                       image_meta_size=torch.tensor([[80.0, 112, 80, 112, 0, 0]] * 2), style=torch.tensor([0, 0]),
                       image_rotary_emb=rotary, conditioning_scale=0.7)


def _controlnet_union() -> Built:
    # SDXL ControlNet-Union (ProMax) layout shrunk: text_time added embedding, two control images (types 1 and 3)
    # fused by the control-type transformer (ResidualAttentionBlock: torch's nn.MultiheadAttention and a QuickGELU
    # Mlp), then the SD down path (one cross-attention down block, a plain one, the cross-attention mid block) on
    # 9 x 7 latents (63 tokens, 5 x 4 after the stride-2 conv). attention_mask would be a self-attention mask (the
    # pipelines pass none). Outputs: 4 down residuals + the mid residual.
    model = diffusers.ControlNetUnionModel(
        in_channels=4, conditioning_channels=3, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, cross_attention_dim=12,
        attention_head_dim=2, addition_embed_type="text_time", addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=8 + 6 * 4, conditioning_embedding_out_channels=(8, 16),
        num_control_type=6, num_trans_channel=16, num_trans_head=2, num_trans_layer=1, num_proj_channel=16)
    control_type = torch.zeros(2, 6)
    control_type[:, [1, 3]] = 1
    return model, dict(sample=torch.randn(2, 4, 9, 7), timestep=torch.tensor([3, 500]),
                       encoder_hidden_states=torch.randn(2, 9, 12),
                       controlnet_cond=[torch.randn(2, 3, 18, 14), torch.randn(2, 3, 18, 14)],
                       control_type=control_type, control_type_idx=[1, 3], conditioning_scale=[0.7, 1.0],
                       added_cond_kwargs={"text_embeds": torch.randn(2, 8),
                                          "time_ids": torch.tensor([[72.0, 56, 0, 0, 72, 56]] * 2)})


def _sparse_controlnet() -> Built:
    # AnimateDiff SparseCtrl (RGB variant's layout, simplified condition embedding): 3 frames of 9 x 7, a spatial
    # transformer per cross-attention block and a motion module after every down resnet, the cross-attention mid
    # block; the control latents are concatenated with their per-frame mask (frame 1 unconditioned). The text states
    # are repeated per frame, as the pipeline does. Outputs: 3 down residuals + the mid residual, (B x F) rows each.
    model = diffusers.SparseControlNetModel(
        in_channels=4, conditioning_channels=4, down_block_types=("CrossAttnDownBlockMotion", "DownBlockMotion"),
        block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, cross_attention_dim=12,
        attention_head_dim=2, motion_max_seq_length=8, motion_num_attention_heads=2)
    frames = 3
    conditioning_mask = torch.ones(2, 1, frames, 9, 7)
    conditioning_mask[:, :, 1] = 0
    return model, dict(sample=torch.randn(2, 4, frames, 9, 7), timestep=torch.tensor([3, 500]),
                       encoder_hidden_states=torch.randn(2, 9, 12).repeat_interleave(frames, dim=0),
                       controlnet_cond=torch.randn(2, 4, frames, 9, 7) * conditioning_mask,
                       conditioning_mask=conditioning_mask, conditioning_scale=0.7)


def _controlnet() -> Built:
    # SD 1.5 ControlNet shrunk: one cross-attention down block (9 x 7 = 63 tokens), a plain one (5 x 4), the
    # cross-attention mid block; control image at 2x (2-level conditioning embedding). attention_mask would be a
    # self-attention mask (the pipelines pass none). Outputs: 4 down residuals + the mid residual.
    model = diffusers.ControlNetModel(
        in_channels=4, conditioning_channels=3, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, cross_attention_dim=12,
        attention_head_dim=2, conditioning_embedding_out_channels=(8, 16))
    return model, dict(sample=torch.randn(2, 4, 9, 7), timestep=torch.tensor([3, 500]),
                       encoder_hidden_states=torch.randn(2, 9, 12), controlnet_cond=torch.randn(2, 3, 18, 14),
                       conditioning_scale=0.7)


class Case(NamedTuple):
    """One class: its builder, how many FeedForwards apply_chunked_feedforward hooks in the tiny model (0: none it
    knows, and the report must say why), how many of its attention-kernel calls pass flex attention's ``BlockMask``
    (chunked attention leaves those to their backend, and the planner cannot trace them either), and whether it has
    any diffusers ``Attention`` module at all (without one, apply_chunked_attention refuses: UNet1DModel's
    SelfAttention1d computes its own softmax).
    ``planner_refusal``: part of the message with which the planner refuses the class for another reason at the first
    call (empty: it plans it, or refuses it for its flex attention). ``sequence_plan``: a ControlNet made
    of a planned family's blocks, which memopt chunks with that family's plan (out of place: it returns every block's
    output), or a class that has a plan of its own since; the others are refused. ``convolutional``: its FeedForwards
    are GLU convolutions, which ``split="sequence"`` skips (their depthwise convolution mixes neighbouring tokens);
    ``streamed``: its blocks run in sequence chunks streamed (Sana's, :mod:`memopt.hooks._streamed_blocks`): no K/V
    exchange. ``routed``: its plan exchanges the router scores of expert-choice MoE layers (``BlockPlan.routed``),
    which the lock-step schedule refuses."""

    build: Callable[[], Built]
    feedforwards: int
    flex_calls: int = 0
    attention: bool = True
    planner_refusal: str = ""
    sequence_plan: bool = False
    convolutional: bool = False
    streamed: bool = False
    routed: bool = False


CASES: dict[str, Case] = {
    # AceStepMLP: memopt's gated-MLP layout (gate/up/down); the sliding band is a dense additive mask.
    "AceStepTransformer1DModel": Case(_ace_step, 2),
    "AnyFlowFARTransformer3DModel": Case(_anyflow_far, 2, flex_calls=2),  # causal block mask; KV caches
    # 2 BasicTransformerBlocks per Transformer2DModel-in-a-list (self-attention-only, cross to encoder_hidden_states,
    # cross to encoder_hidden_states_1), x (down 1, mid 1, up 2): 12 GEGLU FeedForwards
    "AudioLDM2UNet2DConditionModel": Case(_audioldm2, 12),
    "ControlNetModel": Case(_controlnet, 2),  # BasicTransformerBlock ff in the down and the mid block
    # likewise (down 1, mid 1); the control-type transformer's ResidualAttentionMlp (c_fc, QuickGELU, c_proj) has no
    # memopt layout: skipped
    "ControlNetUnionModel": Case(_controlnet_union, 2),
    # Cosmos3VLTextMLP (gated gate/up/down): mlp (und) + mlp_moe_gen (gen) per layer, 2 layers; one packed sequence
    # (no batch dim): causal text-prefix attention + full generation attention over [und K/V, gen K/V], GQA.
    "Cosmos3OmniTransformer": Case(_cosmos3_omni, 4, sequence_plan=True),
    "DreamLiteTransformer2DModel": Case(_dreamlite_transformer, 2),  # GEGLU FeedForward per block; MQA + qk RMSNorm
    "DreamLiteUNetModel": Case(_dreamlite_unet, 7),
    "FluxControlNetModel": Case(_flux_controlnet, 3, sequence_plan=True),  # ff + ff_context, the single block's proj_mlp/proj_out
    "HunyuanDiT2DControlNetModel": Case(_hunyuandit_controlnet, 2, sequence_plan=True),  # one FF per block
    # UNet3D's 9 + the image-latents temporal encoder's gelu FeedForward
    "I2VGenXLUNet": Case(_i2vgen_xl, 10),
    # A family since (memopt.models.ideogram): its plan on this layout (trailing padding, per-sample timesteps).
    "Ideogram4Transformer2DModel": Case(_ideogram4, 2, sequence_plan=True),
    "Kandinsky3UNet": Case(_kandinsky3, 0),  # feed_forward is a 1x1-conv nn.Sequential: "no FeedForward-like module"
    "Kandinsky6SRTransformer3DModel": Case(_kandinsky6_sr, 1, flex_calls=1),  # NABLA sparse attention only
    # LTX2VideoVaeSwiGLU (w_down(silu(w_gate) * w_up)): 1 + 1 deterministic-stage blocks + 2 diffusion blocks;
    # every attention call is neighborhood attention under a flex BlockMask (1 + 1 + 2 calls).
    "LTX2VideoDiffusionDecoderModel": Case(_ltx2_diffusion_decoder, 4, flex_calls=4),
    # AudioDiTFeedForward (ff: Linear, GELU-tanh, Dropout, Linear) per block; AudioDiTAdaLNMLP (SiLU -> Linear, the
    # AdaLN projection) and the ConvNeXtV2 text blocks (GRN) are no FeedForwards
    "LongCatAudioDiTTransformer": Case(_longcat_audio, 2),
    "LuminaNextDiT2DModel": Case(_lumina_next, 2),  # LuminaFeedForward: gated SiLU (linear_1 / linear_3 / linear_2)
    "MiniMaxMusic3Transformer1DModel": Case(_minimax_music3, 0),  # MLP inline in the block's forward
    # Experts choose their top tokens over the whole sequence (not chunkable); FeedForward chunking: the dense block's
    # MLP and the MoE block's shared expert (the routed experts are not FeedForwards); routing reads .tolist().
    # Its dense FeedForward, the MoE layer (experts streamed in groups) and its shared expert. A plan since
    # (memopt.plans.sequence.nucleus): the MoE layer's router scores are exchanged between chunks.
    "NucleusMoEImageTransformer2DModel": Case(_nucleus_image, 3, sequence_plan=True, routed=True),
    # A tensor read as a number (its rotary embedding compares max(position_ids) with an int). A family since
    # (memopt.models.omnigen), chunked by its plan on this layout (an input image's tokens among the text).
    "OmniGenTransformer2DModel": Case(_omnigen, 2, sequence_plan=True),
    "PriorTransformer": Case(_prior, 2),  # BasicTransformerBlock gelu FeedForwards
    "QwenImageControlNetModel": Case(_qwenimage_controlnet, 4, sequence_plan=True),  # img_mlp + txt_mlp per block
    # RFD4ProteinaTransition (packed SwiGLU, forward(values, mask)) has no memopt layout and no FeedForward-like name:
    # nothing hooked; attention takes a dense (B, H, T, T) pair bias with the padded keys at -1e4.
    "RFD4ProteinaTransformer": Case(_rfd4_proteina, 0),
    "SD3ControlNetModel": Case(_sd3_controlnet, 4, sequence_plan=True),  # ff + ff_context per JointTransformerBlock
    "SanaControlNetModel": Case(_sana_controlnet, 2, convolutional=True, streamed=True),  # out of place
    "SanaTransformer2DModel": Case(_sana, 2, convolutional=True, streamed=True),  # GLUMBConv (a convolutional FFN)
    "SanaVideoTransformer3DModel": Case(_sana_video, 2, convolutional=True, streamed=True),  # GLUMBTempConv
    "SanaWMLTX2RefinerTransformer3DModel": Case(_sana_wm_refiner, 4),  # ff + audio_ff per block (audio never runs)
    "SanaWMTransformer3DModel": Case(_sana_wm, 1),  # gated delta-net linear attention; GLUMBConvTemp skipped
    # spatial (down 1, mid 1) + motion modules (down 2)
    "SparseControlNetModel": Case(_sparse_controlnet, 4),
    "StableAudio3DiTModel": Case(_stable_audio3, 2),  # StableAudio3FeedForward (packed value/gate SwiGLU) per block
    "StableAudioDiTModel": Case(_stable_audio, 2),  # swiglu FeedForward per block
    # ResBlock's channelwise MLP is an nn.Sequential around GlobalResponseNorm (statistics over all positions)
    "StableCascadeUNet": Case(_stable_cascade, 0),
    "Transformer2DModel": Case(_transformer_2d, 2),  # the legacy generic class
    "TransformerTemporalModel": Case(_transformer_temporal, 2),
    # SelfAttention1d computes its own bmm/softmax: no diffusers Attention, apply_chunked_attention refuses (test.patch)
    "UNet1DModel": Case(_unet_1d, 0, attention=False),
    "UNet2DConditionModel": Case(_unet_2d_condition, 4),
    "UNet2DModel": Case(_unet_2d, 0),  # unconditional: attention blocks without FeedForward
    # transformer_in + spatial (down 1, mid 1, up 2) + temporal (down 1, mid 1, up 2)
    "UNet3DConditionModel": Case(_unet_3d_condition, 9),
    # base + ctrl transformers in the down (2 + 2) and mid (1 + 1) blocks, base only in the up block (3)
    "UNetControlNetXSModel": Case(_controlnet_xs, 9),
    # spatial (down 1, mid 1, up 2) + motion modules (down 2, mid 1, up 4)
    "UNetMotionModel": Case(_unet_motion, 11),
    "UNetSpatioTemporalConditionModel": Case(_svd_unet, 12),  # 4 spatial ff + 4 temporal (ff_in, ff)
    # BasicTransformerBlock ff x 2; SkipFFTransformerBlock has none; ConvNextBlock's channelwise MLP goes through
    # GlobalResponseNorm (statistics over all positions): not a FeedForward
    "UVit2DModel": Case(_uvit, 2),
    "UniDiffuserModel": Case(_unidiffuser, 3),  # GEGLU FeedForward in the in, mid and out block
    # ffn is an nn.Sequential (no FeedForward); the rotary embedding reads grid_sizes.tolist(): data dependent.
    "WanAnimate2Transformer3DModel": Case(_wan_animate2, 2),  # an nn.Sequential ffn per block
    # control_layers (2) + control_noise_refiner (1) + the transformer's noise_refiner and context_refiner (1 + 1).
    # from_transformer attaches the latter with the embedders, which a copy built from the config lacks: the planner
    # refuses.
    "ZImageControlNetModel": Case(_zimage_controlnet, 5, planner_refusal="were attached after construction"),
}


# ------------------------------------------------------------------------------------------------ helpers
def build(name: str) -> Built:
    """The tiny model in eval mode, with every all-zero parameter re-randomised: several diffusers classes zero-init
    modulation, output or position-embedding weights (as ERNIE-Image's adaLN and final linear, whose output was then
    all zeros), and with them at zero a technique could be wrong and still match."""
    torch.manual_seed(0)
    model, inputs = CASES[name].build()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.numel() > 1 and not param.any():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    assert type(model).__name__ == name
    # UVit2DModel, UniDiffuserModel and ZImageControlNetModel take no return_dict: pass it only where accepted
    if "return_dict" in inspect.signature(model.forward).parameters:
        inputs = {**inputs, "return_dict": False}
    return model.eval(), inputs


def _flatten_outputs(out: Any) -> list[torch.Tensor]:
    """Every tensor in a model's output (tuples, lists, dicts, BaseOutputs, in order; None skipped), flattened."""
    if isinstance(out, torch.Tensor):
        return [out.flatten()]
    if isinstance(out, dict):  # also diffusers' BaseOutput (an OrderedDict)
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [tensor for item in out for tensor in _flatten_outputs(item)]
    assert out is None, type(out)
    return []


def forward(model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    """Every output tensor (ControlNets return several residuals, UniDiffuserModel three predictions, Cosmos3 one per
    modality), flattened and concatenated."""
    with torch.no_grad():
        out = model(**inputs)
    return torch.cat(_flatten_outputs(out))


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.clone() for key, value in model.state_dict().items()}


def assert_restored(model: torch.nn.Module, inputs: dict[str, Any], reference: torch.Tensor,
                    state_before: dict[str, torch.Tensor]) -> None:
    """No memopt hook left, the output and every state_dict entry bit-identical to before."""
    assert not has_memopt_hooks(model)
    assert torch.equal(forward(model, inputs), reference)
    state_after = model.state_dict()
    assert state_after.keys() == state_before.keys()
    assert all(torch.equal(value, state_before[key]) for key, value in state_after.items())


def attention_calls(model: torch.nn.Module) -> tuple[int, int]:
    """(kernel calls seen, calls computed chunked) over all chunked-attention hooks."""
    hooks = [module._diffusers_hook.get_hook(CHUNKED_ATTENTION_HOOK) for module in model.modules()
             if getattr(module, "_diffusers_hook", None) is not None]
    hooks = [hook for hook in hooks if hook is not None]
    return sum(hook.calls for hook in hooks), sum(hook.chunked_calls for hook in hooks)


NAMES = sorted(CASES)


# ------------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("name", NAMES)
def test_reference_output_is_finite_and_not_zero(name):
    """A zero-initialised output layer would make every output zero and every check trivial (see build)."""
    reference = forward(*build(name))
    assert torch.isfinite(reference).all() and reference.abs().amax() > 1e-3


@pytest.mark.parametrize("name", NAMES)
def test_chunked_feedforward_is_exact_or_says_why_not(name, caplog):
    model, inputs = build(name)
    reference, state_before = forward(model, inputs), state(model)
    for split, num_chunks in [("hidden", 3), ("sequence", 2)]:
        expected = 0 if split == "sequence" and CASES[name].convolutional else CASES[name].feedforwards
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="memopt"):
            report = apply_chunked_feedforward(model, num_chunks=num_chunks, split=split)
        assert len(report.applied) == expected, str(report)
        if expected == 0:  # nothing hooked: the report lists what was skipped and why, or the log says none exist
            assert report.skipped or "no FeedForward-like module found" in caplog.text, str(report)
            assert all(reason for reason in report.skipped.values())
        chunked = forward(model, inputs)
        assert remove_memory_optimizations(model) == expected
        assert rel_err(chunked, reference) <= 1e-5, (split, num_chunks)
    assert_restored(model, inputs, reference, state_before)


@pytest.mark.parametrize("name", NAMES)
def test_chunked_attention_is_exact(name):
    model, inputs = build(name)
    reference, state_before = forward(model, inputs), state(model)
    if not CASES[name].attention:
        with pytest.raises(ValueError, match=f"{name} has no diffusers attention modules to chunk"):
            apply_chunked_attention(model, query_chunk=7, kv_chunk=6, head_chunks=2)
        assert_restored(model, inputs, reference, state_before)
        return
    report = apply_chunked_attention(model, query_chunk=7, kv_chunk=6, head_chunks=2)
    assert report.attention
    chunked = forward(model, inputs)
    calls, chunked_calls = attention_calls(model)
    # the chunked math really ran, on every call but those of flex attention
    assert calls > 0 and calls - chunked_calls == CASES[name].flex_calls, (calls, chunked_calls)
    assert remove_memory_optimizations(model) == len(report.attention)
    assert rel_err(chunked, reference) <= 1e-5
    assert_restored(model, inputs, reference, state_before)


@pytest.mark.parametrize("name", NAMES)
def test_sequence_chunking_is_refused_or_exact(name):
    model, inputs = build(name)
    reference, state_before = forward(model, inputs), state(model)
    if CASES[name].streamed:
        for num_chunks in (2, 5):
            report = apply_sequence_chunking(model, num_chunks)
            assert len(report.blocks) == 2 and not report.attention, str(report)
            assert rel_err(forward(model, inputs), reference) <= 1e-5, num_chunks
            remove_memory_optimizations(model)
        with pytest.raises(ValueError, match=f"{name}'s blocks are streamed"):
            apply_sequence_chunking(model, schedule="lockstep")
        assert_restored(model, inputs, reference, state_before)
        return
    if not CASES[name].sequence_plan:
        with pytest.raises(ValueError, match=f"no sequence plan for {name}"):
            apply_sequence_chunking(model)
        assert_restored(model, inputs, reference, state_before)
        return
    if CASES[name].routed:
        with pytest.raises(ValueError, match="route over the whole sequence"):
            apply_sequence_chunking(model, schedule="lockstep")
    for num_chunks, schedule in ((2, "two_pass"), (5, "two_pass"), (5, "lockstep")):
        if CASES[name].routed and schedule == "lockstep":
            continue
        report = apply_sequence_chunking(model, num_chunks, align=1, schedule=schedule)
        assert report.blocks and report.attention, str(report)
        assert rel_err(forward(model, inputs), reference) <= 1e-5, (num_chunks, schedule)  # every residual
        remove_memory_optimizations(model)
    assert_restored(model, inputs, reference, state_before)


@pytest.mark.parametrize("name", NAMES)
def test_remove_restores_after_stacked_techniques(name):
    """FeedForward (hidden split) and attention chunking together, then removed: bit-identical again, and the
    weights were used in place throughout (state_dict unchanged while the hooks are on)."""
    model, inputs = build(name)
    reference, state_before = forward(model, inputs), state(model)
    hooks = len(apply_chunked_feedforward(model, num_chunks=3, split="hidden").applied)
    if CASES[name].attention:
        hooks += len(apply_chunked_attention(model, query_chunk=7, kv_chunk=6, head_chunks=2).attention)
    assert rel_err(forward(model, inputs), reference) <= 1e-5
    assert all(torch.equal(value, state_before[key]) for key, value in model.state_dict().items())
    assert remove_memory_optimizations(model) == hooks
    assert_restored(model, inputs, reference, state_before)


@pytest.mark.parametrize("name", NAMES)
def test_memory_optimizations_plan_is_exact_or_refused_at_first_call(name):
    model, inputs = build(name)
    reference, state_before = forward(model, inputs), state(model)
    apply_memory_optimizations(model)  # CPU, default budget: planned at the first forward
    case = CASES[name]
    if case.planner_refusal or case.flex_calls:
        reason = case.planner_refusal or "higher-order operator flex_attention"
        with pytest.raises(BudgetError, match=f"memopt cannot plan {name}: .*{reason}"):
            forward(model, inputs)
        assert_restored(model, inputs, reference, state_before)  # memopt removed itself: the next call is unmodified
        return
    assert rel_err(forward(model, inputs), reference) <= 1e-5
    remove_memory_optimizations(model)
    assert_restored(model, inputs, reference, state_before)
