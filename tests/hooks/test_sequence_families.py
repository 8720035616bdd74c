"""Sequence chunking on the call modes and masks of single families, beyond the parametrized family tests: SkyReels-V2
diffusion forcing (per-frame timesteps, block-causal masks), key masks a plan leaves whole, LTX-2's guidance passes
(attentions that make no kernel call) and per-token timesteps, FLUX.2's fused projection under LoRA, Helios'
history/window token count, Chroma's pairwise masks and in-place ControlNet residuals, Wan VACE's hints, CogView4's
optional text mask, Kandinsky 5's grid-shaped output head and sparse attention, Qwen-Image 2.1's block-causal prefix,
FLUX.3's image-to-image call, Wan Animate's per-frame face adapter, ConsisID's face update before the head,
Cosmos-1.0's per-sample timestep and Predict2's per-frame one, Motif-Video's image-to-video call, Krea 2's text
fusion, ERNIE-Image's sequence-first blocks, Lumina 2's tables inside a tuple output, JoyImage's fused projections
without packed column blocks, GLM-Image's KV cache, HunyuanDiT's long skips, Ideogram 4's per-token timesteps, Cosmos
3 Omni's text-only modules."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Iterator

import pytest
import torch
from diffusers.hooks import apply_group_offloading

from memopt import apply_sequence_chunking, remove_memory_optimizations
from memopt.models import Size, get_family
from memopt.hooks._sequence_chunks import ChunkLayout
from memopt.plans.sequence import SEQUENCE_PLANS, BroadcastTable, ChunkValue, TokenCount
from memopt.trace.growth import activation_growth

from _tiny_cases import rel_err, with_attention_spec  # noqa: E402


def chunked_outputs(model: torch.nn.Module, inputs: dict, chunk_counts: tuple[int, ...] = (4, 16), **options: Any
                    ) -> Iterator[tuple[int, Any, Any]]:
    """``(num_chunks, report, output)`` of the model under ``apply_sequence_chunking(model, num_chunks, **options)``
    for each chunk count, the hooks removed after each call."""
    for num_chunks in chunk_counts:
        report = apply_sequence_chunking(model, num_chunks, **options)
        try:
            output = model(**inputs)
        finally:
            remove_memory_optimizations(model)
        yield num_chunks, report, output


def _skyreels_diffusion_forcing(causal_block_size: int, size: Size, inject_sample_info: bool = False
                                ) -> tuple[torch.nn.Module, dict]:
    """SkyReels-V2 as its diffusion-forcing pipelines call it: one timestep per latent frame (random, so neighbouring
    frames differ), ``enable_diffusion_forcing=True``, ``fps``; ``causal_block_size > 1`` (asynchronous mode) makes the
    model build a block-causal ``(1, 1, S, S)`` self-attention mask. ``inject_sample_info``: DF-1.3B's fps embedding."""
    spec = get_family("skyreels_v2")
    model = spec.build({**spec.config("tiny"), "inject_sample_info": inject_sample_info})
    model._set_ar_attention(causal_block_size)
    inputs = spec.make_inputs(model.config, batch_size=2, height=size.height, width=size.width,
                              num_frames=size.num_frames)
    frames = inputs["hidden_states"].shape[2]
    inputs.update(timestep=torch.randint(0, 1000, (2, frames), generator=torch.Generator().manual_seed(0)),
                  enable_diffusion_forcing=True, fps=[1, 1])
    return model, inputs


@pytest.mark.parametrize("schedule", ["two_pass", "lockstep"])
@pytest.mark.parametrize("causal_block_size, size", [(1, Size(80, 112, 9)), (2, Size(80, 112, 21))])
def test_skyreels_v2_diffusion_forcing(schedule, causal_block_size, size, caplog):
    """Per-frame timesteps: the model repeats its per-frame tables over each frame's tokens, a (B, 6, S, D) block
    ``temb`` split on dim 2 and a per-token output head; the tables and the head's modulation are deferred (the head
    runs in chunks). With causal_block_size > 1 a block-causal mask cut by query rows (105 / 210 tokens)."""
    model, inputs = _skyreels_diffusion_forcing(causal_block_size, size)
    with torch.no_grad():
        reference = model(**inputs)[0]
        for num_chunks in (4, 16):
            report = apply_sequence_chunking(model, num_chunks, schedule=schedule)
            assert report.blocks and report.attention and not report.skipped, report
            assert "condition_embedder" in report.producers
            with caplog.at_level(logging.WARNING, logger="memopt.hooks.sequence"):
                out = model(**inputs)[0]
            remove_memory_optimizations(model)
            assert rel_err(out, reference) <= 1e-5, num_chunks
        assert "output head runs on the whole sequence" not in caplog.text
        if causal_block_size > 1:  # the mask is in effect
            model._set_ar_attention(1)
            assert rel_err(model(**inputs)[0], reference) > 1e-3


def test_skyreels_v2_diffusion_forcing_with_fps_embedding(caplog):
    """DF-1.3B adds its fps embedding, a real per-frame tensor, to the blocks' table before the model expands it: that
    table is then made whole, as the model makes it; the head's table stays deferred, so the head still runs in
    chunks. Exact."""
    model, inputs = _skyreels_diffusion_forcing(1, Size(80, 112, 9), inject_sample_info=True)
    inputs["fps"] = [1]  # one for the batch: diffusers repeats the embedding per frame, (F, 6, D), for any batch size
    with torch.no_grad():
        reference = model(**inputs)[0]
        apply_sequence_chunking(model, 6)
        with caplog.at_level(logging.WARNING, logger="memopt.hooks.sequence"):
            out = model(**inputs)[0]
    assert rel_err(out, reference) <= 1e-5
    assert "output head runs on the whole sequence" not in caplog.text


def test_skyreels_v2_diffusion_forcing_stays_near_the_floor():
    """Activation growth of the diffusion-forcing call (fp32, LD per token, 9 latent frames): unmodified 20.6 (its
    (B, 6, S, D) table, the block's fp32 copy of it and the head's (B, S, D) one); chunked 4.54 (each chunk's rows are
    made from whole frames of 64 tokens; the plain call's 3.2 otherwise)."""
    def diffusion_forcing(inputs: dict, tokens: int) -> dict:
        frames = inputs["hidden_states"].shape[2]
        return {**inputs, "timestep": torch.linspace(900, 100, frames).long()[None], "enable_diffusion_forcing": True}

    sizes = (Size(64, 64, 33), Size(128, 128, 33))
    assert activation_growth("skyreels_v2", inputs=diffusion_forcing, sizes=sizes) > 20
    assert activation_growth("skyreels_v2", apply_sequence_chunking, inputs=diffusion_forcing, sizes=sizes) <= 4.7


def _without_input(plan, name: str):
    blocks = {pattern: dataclasses.replace(block, inputs={k: v for k, v in block.inputs.items() if k != name})
              for pattern, block in plan.blocks.items()}
    return dataclasses.replace(plan, blocks=blocks)


def test_a_query_dependent_mask_must_be_cut_by_the_plan():
    """A block-causal mask passed whole to every chunk is an error naming the fix, not a wrong result."""
    model, inputs = _skyreels_diffusion_forcing(2, Size(80, 112, 21))
    apply_sequence_chunking(model, 4, plan=_without_input(SEQUENCE_PLANS[type(model).__name__], "attention_mask"))
    with torch.no_grad(), pytest.raises(ValueError, match="the plan must split its query dim"):
        model(**inputs)


def test_a_key_mask_the_plan_leaves_whole_is_used_whole():
    """A mask over all keys that every chunk receives whole needs no gathering: used as is, never read at the
    chunk's offsets (HunyuanVideo's (B, 1, 1, S_image + S_text) mask, left out of its plan)."""
    spec = get_family("hunyuanvideo")
    model = spec.build("tiny")
    inputs = spec.make_inputs(model.config, batch_size=2, height=80, width=112, num_frames=5, masked=True)
    with torch.no_grad():
        reference = model(**inputs)[0]
        apply_sequence_chunking(model, 4, plan=_without_input(SEQUENCE_PLANS[type(model).__name__], "attention_mask"))
        out = model(**inputs)[0]
    assert rel_err(out, reference) <= 1e-5


def _ltx2(config: str = "tiny") -> tuple[torch.nn.Module, dict]:
    spec = get_family("ltx2")
    model = spec.build(config)
    inputs = spec.make_inputs(model.config, batch_size=2, height=96, width=160, num_frames=17, masked=True)
    return model, inputs  # 45 video tokens, 18 audio tokens


def _video_and_audio_close(out, reference) -> bool:
    return rel_err(out[0], reference[0]) <= 1e-5 and rel_err(out[1], reference[1]) <= 1e-5


@pytest.mark.parametrize("schedule", ["two_pass", "lockstep"])
@pytest.mark.parametrize("config, extra", [
    ("tiny-2.3", {"spatio_temporal_guidance_blocks": [1], "perturbation_mask": torch.tensor([0.0, 1.0])}),
    ("tiny-2.3", {"spatio_temporal_guidance_blocks": [1]}),  # every sample perturbed: no self-attention kernel call
    ("tiny", {"isolate_modalities": True}),  # modality guidance: no audio<->video attention
    ("tiny-2.3", {"spatio_temporal_guidance_blocks": [0, 1], "isolate_modalities": True}),
])
def test_ltx2_guidance_passes(schedule, config, extra):
    """LTX-2's pipelines run guidance passes in which some whole-sequence attentions make no kernel call
    (``JointAttention.active``); LTX-2.3's perturbed processor mixes each sample's own values in after the kernel.
    Video and audio outputs both match, in 4 chunks (audio split) and 32 (audio carried whole)."""
    model, inputs = _ltx2(config)
    with torch.no_grad():
        reference = model(**inputs, **extra)
        for num_chunks, _, out in chunked_outputs(model, {**inputs, **extra}, (4, 32), schedule=schedule):
            assert _video_and_audio_close(out, reference), num_chunks


def test_ltx2_per_token_timesteps():
    """Image-to-video conditions the first latent frame at t = 0: per-token video timesteps, split per chunk."""
    model, inputs = _ltx2("tiny-2.3")
    timestep = torch.full((2, get_family("ltx2").num_tokens(model.config, Size(96, 160, 17))), 999.0)
    timestep[:, :15] = 0.0  # the first latent frame: 3 x 5 tokens
    inputs.update(timestep=timestep, audio_timestep=torch.full((2,), 999.0), use_cross_timestep=True)
    with torch.no_grad():
        reference = model(**inputs)
        apply_sequence_chunking(model, 6)
        assert _video_and_audio_close(model(**inputs), reference)


def test_a_plan_saying_an_attention_is_inactive_when_it_attends_is_an_error():
    model, inputs = _ltx2()
    wrong = with_attention_spec(SEQUENCE_PLANS[type(model).__name__], "transformer_blocks.*", "video_to_audio_attn",
                                active=lambda block, argument: False)
    apply_sequence_chunking(model, 5, plan=wrong)
    with torch.no_grad(), pytest.raises(RuntimeError, match="video_to_audio_attn: made an attention-kernel call"):
        model(**inputs)


@pytest.mark.parametrize("schedule", ["two_pass", "lockstep"])
def test_flux2_fused_projection_with_lora(schedule):
    """FLUX.2's single-stream blocks compute Q, K, V and the MLP input in one linear; each pass computes only the
    column blocks it reads (``JointAttention.fused``), also under a LoRA adapter on that linear (the hook sits on its
    base layer; the adapter's delta lands in every column, read or not)."""
    from peft import LoraConfig

    spec = get_family("flux2")
    model = spec.build("tiny")
    inputs = spec.make_inputs(model.config, batch_size=2, height=80, width=112)
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_qkv_mlp_proj", "to_q", "to_k"],
                                 init_lora_weights=False))
    with torch.no_grad():
        reference = model(**inputs)[0]
        apply_sequence_chunking(model, 5, schedule=schedule)
        out = model(**inputs)[0]
        remove_memory_optimizations(model)
    assert rel_err(out, reference) <= 1e-5


def test_joyimage_fused_qkv_without_packed_blocks_computes_only_the_columns_a_pass_reads():
    """JoyImage's fused [Q | K | V] linears carry no ``_tp_packed_col_blocks``; the plan gives their column blocks as
    proportions (``JointAttention.fused_blocks``, like diffusers' ``PackedColwiseParallel``), so a collection pass
    computes only K and V and the final pass only Q: the block's matmul work equals the unmodified one. Proportions
    that do not fit the plan's roles are refused when the plan is made, ones that do not divide the width when
    applied (and nothing stays hooked)."""
    from torch.utils.flop_counter import FlopCounterMode

    from memopt.plans.sequence import JointAttention

    spec = get_family("joyimage_edit")
    model = spec.build("tiny")
    inputs = spec.make_inputs(model.config, batch_size=2, height=80, width=112)

    def block_flops() -> tuple[torch.Tensor, int]:
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            out = model(**inputs)[0]
        return out, sum(counter.get_flop_counts()["JoyImageEditTransformer3DModel.double_blocks.0"].values())

    reference, reference_flops = block_flops()
    apply_sequence_chunking(model, 4)
    out, flops = block_flops()
    remove_memory_optimizations(model)
    assert rel_err(out, reference) <= 1e-5 and flops == reference_flops

    with pytest.raises(ValueError, match="fused_blocks\\['qkv'\\] must give one positive integer per role"):
        JointAttention(fused={"qkv": ("query", "key_value")}, fused_blocks={"qkv": (1, 1, 1)})
    plan = SEQUENCE_PLANS["JoyImageEditTransformer3DModel"]
    fused_blocks = plan.blocks["double_blocks.*"].attention["attn"].fused_blocks
    bad = with_attention_spec(plan, "double_blocks.*", "attn", fused_blocks={**fused_blocks, "img_attn_qkv": (1, 2, 2)})
    with pytest.raises(ValueError, match="img_attn_qkv: the plan's fused_blocks \\(1, 2, 2\\) do not divide its 96"):
        apply_sequence_chunking(model, 4, plan=bad)
    assert remove_memory_optimizations(model) == 0


@pytest.mark.parametrize("case", ["amplified history", "no history"])
def test_helios_history(case):
    """Helios cuts [history | window] tokens by the int ``original_context_length`` (``TokenCount``: each chunk gets
    the count of its own window tokens), in the blocks and in the output head, which keeps only the window. With
    per-head amplified history keys, and without history (the window alone)."""
    spec = get_family("helios")
    config = {**spec.config("tiny"), "is_amplify_history": case == "amplified history"}
    model = spec.build(config)
    inputs = spec.make_inputs(model.config, batch_size=2, height=48, width=80, num_frames=9)
    if case == "amplified history":
        with torch.no_grad():
            for block in model.blocks:  # initialised to ones: make the scale differ per head
                block.attn1.history_key_scale.copy_(torch.randn(2))
    else:
        inputs = {key: value for key, value in inputs.items() if "history" not in key}
    with torch.no_grad():
        reference = model(**inputs)[0]
        for schedule in ("two_pass", "lockstep"):
            report = apply_sequence_chunking(model, 4, schedule=schedule)
            assert report.tail, report
            out = model(**inputs)[0]
            remove_memory_optimizations(model)
            assert rel_err(out, reference) <= 1e-5, schedule


def test_a_token_count_is_shared_out_by_chunk_and_checked():
    """10 image tokens in 4 chunks (3, 3, 2, 2): the last 5 are counted 0, 1, 2, 2 per chunk; a count that is not an
    int in [0, 10] is an error naming where it came from."""
    layout = ChunkLayout.build(4, 10, None, True)
    assert [layout.cut(5, TokenCount(), chunk, "here") for chunk in range(4)] == [0, 1, 2, 2]
    for bad in (11, -1, True, 2.0):
        with pytest.raises(ValueError, match="here: expected a count of the last tokens of the 10 image tokens"):
            layout.cut(bad, TokenCount(), 0, "here")


def _chroma() -> tuple[torch.nn.Module, dict]:
    spec = get_family("chroma")
    model = spec.build("tiny")
    return model, spec.make_inputs(model.config, batch_size=2, height=80, width=112, masked=True)  # 35 + 8 tokens


@pytest.mark.parametrize("dtype", [torch.float32, torch.bool])
def test_chroma_per_sample_pair_masks(dtype):
    """Chroma squares its (B, text + image) token mask into m[q] * m[k] inside the blocks (``pair_mask``): each
    chunk's final call gets its rows against all keys, rebuilt from the whole token mask; float (the pipeline's,
    additive) and bool masks, text split (4 chunks) and carried whole (16)."""
    model, inputs = _chroma()
    text = torch.tensor([[1, 1, 1, 0, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1, 0, 0]], dtype=torch.float32)
    inputs["attention_mask"] = torch.cat([text, torch.ones(2, 35)], dim=1).to(dtype)
    with torch.no_grad():
        reference = model(**inputs)[0]
        for num_chunks, _, out in chunked_outputs(model, inputs):
            assert rel_err(out[0], reference) <= 1e-5, num_chunks


def test_an_output_modified_in_place_before_the_head_is_refused():
    """Chroma's ControlNet adds its single-stream residuals in place, also to the last block's output: the chunked
    output head would add it a second time (rel err 8e-2 when it did), so that is an error pointing to
    ``chunk_tail=False``, which is exact."""
    model, inputs = _chroma()
    inputs["controlnet_block_samples"] = [torch.randn(2, 35, 32)]
    inputs["controlnet_single_block_samples"] = [torch.randn(2, 35, 32)]
    with torch.no_grad():
        reference = model(**inputs)[0]
        apply_sequence_chunking(model, 4)
        with pytest.raises(RuntimeError, match="modified the last block's output in place .* chunk_tail=False"):
            model(**inputs)
        remove_memory_optimizations(model)
        apply_sequence_chunking(model, 4, chunk_tail=False)
        out = model(**inputs)[0]
    assert rel_err(out, reference) <= 1e-5


def test_attentions_collected_in_one_pass_must_not_depend_on_each_other():
    """``collect_with_previous`` puts a module's K/V collection in the previous module's pass, whose output is then a
    stand-in: claimed for LTX-2's video-to-audio attention (its video K/V are normed before the audio-to-video output
    is added) it is exact with fewer passes; claimed for the audio-to-video attention, whose audio K/V come after the
    audio self-attention's output, the result changes (which is why the claim is the plan's, per module)."""
    model, inputs = _ltx2()
    wrong_plan = with_attention_spec(SEQUENCE_PLANS[type(model).__name__], "transformer_blocks.*",
                                     "audio_to_video_attn", collect_with_previous=True)
    with torch.no_grad():
        reference = model(**inputs)
        apply_sequence_chunking(model, 4)
        assert _video_and_audio_close(model(**inputs), reference)
        remove_memory_optimizations(model)
        apply_sequence_chunking(model, 4, plan=wrong_plan)
        assert not _video_and_audio_close(model(**inputs), reference)


@pytest.mark.parametrize("schedule", ["two_pass", "lockstep"])
def test_hunyuanimage_refiner(schedule):
    """HunyuanImage-2.1's refiner is the same class with 3-D patches on (B, 2 x 64, 1, H/16, W/16) latents and no
    glyph states: its rotary rows come from three axes instead of two (117 tokens)."""
    spec = get_family("hunyuanimage")
    model = spec.build("tiny-refiner")
    inputs = spec.make_inputs(model.config, batch_size=2, height=144, width=208, masked=True)
    with torch.no_grad():
        reference = model(**inputs)[0]
        for num_chunks, report, out in chunked_outputs(model, inputs, schedule=schedule):
            assert report.tail and not report.skipped, report
            assert rel_err(out[0], reference) <= 1e-5, num_chunks


def test_wan_vace_hints_and_a_hint_after_the_last_block():
    """Wan VACE adds its control hints (scaled per layer) to the Wan blocks' outputs: exact, and the hints really
    count. When the last Wan block is itself a VACE layer the model adds that hint after the last block, so the
    output head's input is not the last block's output: the chunked head refuses it (it once ran whole and returned
    rel err 0.33 with a warning) and ``chunk_tail=False`` is exact."""
    spec = get_family("wan_vace")
    for layers, chunk_tail in (([0], True), ([0, 1], False)):
        model = spec.build({**spec.config("tiny"), "vace_layers": layers})
        inputs = spec.make_inputs(model.config, batch_size=2, height=80, width=112, num_frames=9)
        with torch.no_grad():
            reference = model(**inputs)[0]
            apply_sequence_chunking(model, 4, chunk_tail=chunk_tail)
            out = model(**inputs)[0]
            remove_memory_optimizations(model)
            assert rel_err(out, reference) <= 1e-5, layers
            unhinted = model(**{**inputs, "control_hidden_states_scale": torch.zeros(len(layers))})[0]
            assert rel_err(unhinted, reference) > 1e-3
    apply_sequence_chunking(model, 4)
    with torch.no_grad(), pytest.raises(RuntimeError, match="output head's input differs .* chunk_tail=False"):
        model(**inputs)


def _vace(layers: list[int]) -> tuple[torch.nn.Module, dict]:
    spec = get_family("wan_vace")
    model = spec.build({**spec.config("tiny"), "num_layers": max(layers) + 2, "vace_layers": layers})
    return model, spec.make_inputs(model.config, batch_size=2, height=80, width=112, num_frames=9)


def test_wan_vace_blocks_run_when_their_hint_is_used():
    """Wan VACE runs every VACE block before the main blocks and keeps all hints (8 for Wan2.1-VACE-14B): with three
    or more VACE blocks, each is held and runs when its hint is first used (BlockPlan.runs_when_used), after the main
    block it belongs to. Exact at batch 2, odd chunk counts, both schedules, in inference mode and under group
    offloading (which runs them as called); growth 1 LD per hint run at once, ~6.2 LD held at any count (break-even
    at two: one and two blocks run as called)."""
    model, inputs = _vace([0, 1, 3])
    with torch.no_grad():
        reference = model(**inputs)[0]
        for schedule in ("two_pass", "lockstep"):
            for num_chunks in (3, 7):
                report = apply_sequence_chunking(model, num_chunks, schedule=schedule)
                assert report.held == [f"vace_blocks.{i}" for i in range(3)] and report.tail, report
                out = model(**inputs)[0]
                remove_memory_optimizations(model)
                assert rel_err(out, reference) <= 1e-5, (schedule, num_chunks)
        apply_sequence_chunking(model, 3)
        with torch.inference_mode():  # tensors without version counters
            assert rel_err(model(**inputs)[0], reference) <= 1e-5
        cpu = torch.device("cpu")
        apply_group_offloading(model, onload_device=cpu, offload_device=cpu, offload_type="block_level",
                               num_blocks_per_group=1)
        assert rel_err(model(**inputs)[0], reference) <= 1e-5
        remove_memory_optimizations(model)

    def growth(layers: list[int], hold: bool) -> float:
        overrides = {"num_layers": max(layers) + 2, "vace_layers": layers}
        plan = SEQUENCE_PLANS["WanVACETransformer3DModel"]
        if not hold:
            vace = dataclasses.replace(plan.blocks["vace_blocks.*"], runs_when_used=False)
            plan = dataclasses.replace(plan, blocks={**plan.blocks, "vace_blocks.*": vace})
        return activation_growth("wan_vace", prepare=lambda m: apply_sequence_chunking(m, plan=plan, inplace=True),
                                 overrides=overrides)

    assert growth([0, 1, 2, 3], hold=False) >= 8.0 and growth([0, 1, 2, 3], hold=True) <= 6.3  # 8.19 / 6.19
    assert growth([0], hold=True) <= 5.3  # one VACE block: run as called (5.19; held it would be 6.22)


def test_a_held_block_input_changed_before_it_runs_is_an_error():
    """A held VACE block reads the embedded video tokens when its hint is used; memopt's first main block is written
    out of place for it, and a change by anything else (here a forward pre-hook adding to them in place) is an error
    naming the block, not a hint from other inputs."""
    model, inputs = _vace([0, 1, 2])
    apply_sequence_chunking(model, 3)

    def touch(module: torch.nn.Module, args: tuple) -> None:
        args[0].add_(0)  # the same numbers, a new version

    handle = model.blocks[0].register_forward_pre_hook(touch)
    with torch.no_grad(), pytest.raises(RuntimeError, match="vace_blocks.0: an input of this block, held"):
        model(**inputs)
    handle.remove()
    remove_memory_optimizations(model)


@pytest.mark.parametrize("family", ["cogview4", "glm_image"])
def test_cogview4_text_mask_is_refused_not_computed_wrong(family):
    """CogView4's forward takes an optional text mask (no pipeline passes one) that its processor squares into the
    additive 0/1 mask m[q] * m[k] > 0 over cat(text, image): query-dependent, so chunking refuses it, naming the
    module, and the unchunked model still runs. GLM-Image's processor does the same."""
    spec = get_family(family)
    model = spec.build("tiny")
    inputs = spec.make_inputs(model.config, batch_size=2, height=80, width=112)
    mask = torch.ones(2, 8)
    mask[:, 6:] = 0
    inputs["attention_mask"] = mask
    apply_sequence_chunking(model, 4)
    with torch.no_grad(), pytest.raises(NotImplementedError, match="transformer_blocks.0.attn1: attention mask"):
        model(**inputs)
    remove_memory_optimizations(model)
    with torch.no_grad():
        assert torch.isfinite(model(**inputs)[0]).all()


def test_glm_image_kv_cache_calls_run_whole_and_the_others_chunked(caplog):
    """GLM-Image's editing pipeline runs the condition image through the blocks with the KV cache in "write" mode (the
    processor appends the call's keys and values) and then denoises in "read" mode (it puts them in front of the
    call's). Chunks would append their own pieces, in both passes, or bring keys that are no chunk's: those calls run
    whole (BlockPlan.runs_whole), exact, with a warning naming the block and the mode. A cache in "skip" mode (the
    unconditional pass) or with no mode (text-to-image) is ignored by the processor, and the blocks run chunked."""
    from diffusers.models.transformers.transformer_glm_image import GlmImageKVCache

    spec = get_family("glm_image")
    model = spec.build("tiny")
    inputs = spec.make_inputs(model.config, batch_size=2, height=80, width=112)
    inputs["prior_token_drop"][1, :5] = True  # sample 1 drops five prior tokens
    condition = spec.make_inputs(model.config, batch_size=1, height=48, width=80)
    condition["encoder_hidden_states"] = condition["encoder_hidden_states"][:, :0]  # the pipeline passes no text

    attention_calls = []  # of the first block's attention module, per model call
    model.transformer_blocks[0].attn1.register_forward_pre_hook(lambda module, args: attention_calls.append(1))

    def edit() -> tuple[list[torch.Tensor], list[int]]:
        cache = GlmImageKVCache(model.config.num_layers)
        cache.set_mode("write")
        model(**condition, kv_caches=cache)
        calls = [len(attention_calls)]
        cache.next_sample()
        outputs = []
        for mode in ("read", "skip", None):
            cache.set_mode(mode)
            outputs.append(model(**inputs, kv_caches=cache)[0])
            calls.append(len(attention_calls) - sum(calls))
        return outputs, calls

    with torch.no_grad():
        reference, calls = edit()
        assert calls == [1, 1, 1, 1]
        assert rel_err(reference[0], reference[1]) > 1e-3  # the cached condition keys change the result
        attention_calls.clear()
        apply_sequence_chunking(model, 5, align=1)
        with caplog.at_level(logging.WARNING, logger="memopt"):
            chunked, calls = edit()
        remove_memory_optimizations(model)
    assert calls == [1, 1, 10, 10]  # write and read whole; skip and no mode: 5 chunks x (collection + final pass)
    for output, expected in zip(chunked, reference):
        assert rel_err(output, expected) <= 1e-5
    for mode in ("write", "read"):
        assert f"transformer_blocks.0: its KV cache is in '{mode}' mode" in caplog.text
    assert "'skip' mode" not in caplog.text


def test_hunyuandit_long_skips_keep_the_blocks_out_of_place():
    """HunyuanDiT keeps its first-half blocks' outputs for the second half's long skip connections (block 3 takes block
    0's output here): the blocks write out of place by default, exactly, and an explicit inplace=True, which would
    overwrite a kept output with the next block's (rel err 0.53 when it was allowed), is refused."""
    spec = get_family("hunyuandit")
    model = spec.build("tiny")
    inputs = spec.make_inputs(model.config, batch_size=2, height=80, width=112, masked=True)
    with torch.no_grad():
        reference = model(**inputs)[0]
        with pytest.raises(ValueError, match="HunyuanDiT2DModel keeps its blocks' outputs"):
            apply_sequence_chunking(model, 5, inplace=True)
        report = apply_sequence_chunking(model, 5)
        assert len(report.blocks) == 4
        chunked = model(**inputs)[0]
        remove_memory_optimizations(model)
    assert rel_err(chunked, reference) <= 1e-5


def test_kandinsky5_head_runs_on_pieces_of_its_grid_input():
    """Kandinsky 5 reshapes the last block's tokens to a (B, F, H, W, D) grid before its head, so the head runs once
    on pieces of H (``tail_split``) and writes each piece in place: exact, and the head sees no whole grid."""
    spec = get_family("kandinsky5")
    model = spec.build("tiny")
    inputs = spec.make_inputs(model.config, batch_size=2, height=80, width=112, num_frames=9)  # 3 x 5 x 7 tokens
    pieces = []
    model.out_layer.norm.register_forward_pre_hook(lambda module, args: pieces.append(args[0].shape))
    with torch.no_grad():
        reference = model(**inputs)
        pieces.clear()
        report = apply_sequence_chunking(model, 4)
        assert report.tail == "out_layer in pieces of dim 2" and not report.skipped, report
        out = model(**inputs)
    remove_memory_optimizations(model)
    assert rel_err(out, reference) <= 1e-5
    assert [shape[2] for shape in pieces] == [2, 1, 1, 1] and {shape[:2] + shape[3:] for shape in pieces} == {
        (2, 3, 7, 32)}


def test_kandinsky5_sparse_attention_is_refused():
    spec = get_family("kandinsky5")
    model = spec.build("tiny")
    inputs = spec.make_inputs(model.config, batch_size=1, height=48, width=80, num_frames=9)
    apply_sequence_chunking(model, 4)
    with torch.no_grad(), pytest.raises(NotImplementedError, match="dense attention only"):
        model(**{**inputs, "sparse_params": {"to_fractal": False, "sta_mask": None, "P": 0.9}})
    remove_memory_optimizations(model)


def test_a_tail_split_needs_the_head_as_its_only_gather_module():
    plan = SEQUENCE_PLANS["Kandinsky5Transformer3DModel"]
    with pytest.raises(ValueError, match="tail_split needs a tail module, gather naming only it"):
        dataclasses.replace(plan, gather={"norm": plan.gather["out_layer"]})


def _qwenimage21():
    spec = get_family("qwenimage21")
    model = spec.build("tiny")
    return model, spec.make_inputs(model.config, batch_size=2, height=64, width=96, masked=True)


def test_qwenimage21_block_causal_mask_rows_are_what_makes_it_exact():
    """Each chunk gets its rows of the dense block-causal mask (``ChunkValue``) instead of the processor's
    whole-sequence segments; rows with only the key padding (no causal prefix) give a different result."""
    model, inputs = _qwenimage21()
    plan = SEQUENCE_PLANS["QwenImage21Transformer2DModel"]
    block = plan.blocks["transformer_blocks.*"]
    key_padding_only = ChunkValue(lambda argument, rows, tokens: argument("key_valid").bool()[:, None, None, :])
    wrong = dataclasses.replace(plan, blocks={"transformer_blocks.*": dataclasses.replace(
        block, inputs={**block.inputs, "attention_mask": key_padding_only})})
    with torch.no_grad():
        reference = model(**inputs)[0]
        for schedule in ("two_pass", "lockstep"):
            apply_sequence_chunking(model, 4, schedule=schedule)
            assert rel_err(model(**inputs)[0], reference) <= 1e-5
            remove_memory_optimizations(model)
        apply_sequence_chunking(model, 4, plan=wrong)
        assert rel_err(model(**inputs)[0], reference) > 1e-3
        remove_memory_optimizations(model)


def test_qwenimage21_prefix_cache_and_flex_attention_are_refused():
    from diffusers.models.transformers.transformer_qwenimage21 import QwenImage21FlexAttnProcessor, QwenImage21KVCache

    model, inputs = _qwenimage21()
    apply_sequence_chunking(model, 4)
    with torch.no_grad():
        with pytest.raises(NotImplementedError, match="kv_cache_mode='extract'"):
            model(**inputs, kv_cache=QwenImage21KVCache(len(model.transformer_blocks)), kv_cache_mode="extract")
        model.set_attn_processor(QwenImage21FlexAttnProcessor())
        with pytest.raises(NotImplementedError, match="FlexAttnProcessor's BlockMask cannot be cut"):
            model(**inputs)
    remove_memory_optimizations(model)


@pytest.mark.parametrize("schedule", ["two_pass", "lockstep"])
def test_flux3_image_to_image(schedule):
    """FLUX.3 with a reference image: the model concatenates the image and reference per-token modulation tables
    (deferred tables concatenate lazily) and its head keeps the leading image tokens of the content stream."""
    from memopt.models import flux3_reference_inputs

    spec = get_family("flux3")
    model = spec.build("tiny")
    size = Size(80, 112)
    inputs = flux3_reference_inputs(model.config, spec.make_inputs(model.config, batch_size=2, height=size.height,
                                                                   width=size.width), Size(48, 80))
    with torch.no_grad():
        reference = model(**inputs)[0]
        assert reference.shape[1] == 35  # the image tokens only
        for num_chunks, report, out in chunked_outputs(model, inputs, schedule=schedule):
            assert report.tail and report.producers and not report.skipped, report
            assert rel_err(out[0], reference) <= 1e-5, num_chunks


def test_token_groups_give_chunks_of_whole_groups_or_inside_one():
    from memopt.hooks._sequence_chunks import grouped

    assert grouped(45, 3, 3) == [(0, 15), (15, 30), (30, 45)]
    assert grouped(45, 2, 3) == [(0, 30), (30, 45)]
    ranges = grouped(45, 7, 3)
    assert ranges[0][0] == 0 and ranges[-1][1] == 45 and all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert all(start // 15 == (end - 1) // 15 for start, end in ranges)  # each inside one frame
    with pytest.raises(ValueError, match="cannot be cut into 4 equal token groups"):
        grouped(45, 3, 4)


@pytest.mark.parametrize("schedule", ["two_pass", "lockstep"])
def test_wan_animate_face_adapter_runs_per_frame_chunk(schedule):
    """The face adapter attends per latent frame: it runs as a chunked block of its own whose chunks are whole frames
    or lie inside one, and its output is an update the model adds (never written over its input). Without the frame
    grouping a chunk straddling two frames is refused, not computed."""
    spec = get_family("wan_animate")
    model = spec.build("tiny")
    inputs = spec.make_inputs(model.config, batch_size=2, height=48, width=80, num_frames=5)  # 3 frames x 15
    plan = SEQUENCE_PLANS["WanAnimateTransformer3DModel"]
    with torch.no_grad():
        reference = model(**inputs)[0]
        for num_chunks, report, out in chunked_outputs(model, inputs, (2, 7), schedule=schedule):
            assert "face_adapter.0" in report.blocks and not report.skipped, report
            assert rel_err(out[0], reference) <= 1e-5, num_chunks
        ungrouped = dataclasses.replace(plan, blocks={**plan.blocks, "face_adapter.*": dataclasses.replace(
            plan.blocks["face_adapter.*"], token_groups=None)})
        apply_sequence_chunking(model, 4, plan=ungrouped, schedule=schedule)
        with pytest.raises(ValueError, match="neither whole frames of 15 tokens nor inside one"):
            model(**inputs)
        remove_memory_optimizations(model)


@pytest.mark.parametrize("schedule", ["two_pass", "lockstep"])
def test_consisid_face_update_right_before_the_head(schedule, caplog):
    """ConsisID adds a face cross-attention update after every ``cross_attn_interval``-th block; with interval 1 the
    last module before the output head is that update (a ``returns_update`` block, never kept as the last block's
    output): the head then runs on the whole sequence, with a warning, exact."""
    spec = get_family("consisid")
    model = spec.build({**spec.config("tiny"), "cross_attn_interval": 1})
    inputs = spec.make_inputs(model.config, batch_size=2, height=48, width=80, num_frames=9)
    with torch.no_grad():
        reference = model(**inputs)[0]
        report = apply_sequence_chunking(model, 4, schedule=schedule)
        assert len(report.blocks) == 4 and not report.skipped, report  # 2 blocks + 2 face cross-attentions
        with caplog.at_level(logging.WARNING, logger="memopt.hooks.sequence"):
            out = model(**inputs)[0]
    assert rel_err(out, reference) <= 1e-5
    assert "the output head runs on the whole sequence (the block before it returns an update" in caplog.text


@pytest.mark.parametrize("schedule", ["two_pass", "lockstep"])
def test_cosmos_per_sample_timestep(schedule):
    """Cosmos-1.0 passes one timestep per sample ((B,) instead of Predict2's per-frame (B, 1, T, 1, 1)): its
    modulation tables are then (B, D) and pass whole, the adaLN-LoRA layers run once per block; exact either way."""
    spec = get_family("cosmos")
    model = spec.build("tiny")
    inputs = spec.make_inputs(model.config, batch_size=2, height=48, width=80, num_frames=9, masked=True)
    inputs["timestep"] = torch.tensor([0.3, 0.9])
    with torch.no_grad():
        reference = model(**inputs)[0]
        for num_chunks, report, out in chunked_outputs(model, inputs, schedule=schedule):
            assert report.tail and report.producers and not report.skipped, report
            assert rel_err(out[0], reference) <= 1e-5, num_chunks


def test_cosmos_per_frame_timestep_tables_are_deferred(caplog):
    """Cosmos Predict2's per-frame timestep (B, 1, T, 1, 1), a different value per frame and sample: the model expands
    its (B T, C) tables over each frame's tokens; memopt defers them with that expansion (time_embed is a producer),
    so the blocks and the output head get their chunks' rows; exact, the head in chunks."""
    spec = get_family("cosmos")
    model = spec.build("tiny")
    inputs = spec.make_inputs(model.config, batch_size=2, height=48, width=80, num_frames=9, masked=True)
    frames = inputs["timestep"].shape[2]
    inputs["timestep"] = torch.rand(2, 1, frames, 1, 1, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(**inputs)[0]
        with caplog.at_level(logging.WARNING, logger="memopt.hooks.sequence"):
            for num_chunks, report, out in chunked_outputs(model, inputs, chunk_counts=(5, 16)):
                assert "time_embed" in report.producers and report.tail and not report.skipped, report
                assert rel_err(out[0], reference) <= 1e-5, num_chunks
    assert "output head runs on the whole sequence" not in caplog.text


def test_motif_video_image_to_video_is_refused_not_computed_wrong():
    """Motif-Video's image-to-video call puts image tokens in front of the text stream, which its cross-attention
    drops by count; chunks split that stream, so no chunk can drop them: a clear error, never a wrong result."""
    spec = get_family("motif_video")
    model = spec.build("tiny")
    inputs = spec.make_inputs(model.config, batch_size=2, height=48, width=80, num_frames=9, masked=True)
    inputs["image_embeds"] = torch.randn(2, 3, model.config.image_embed_dim, generator=torch.Generator().manual_seed(0))
    apply_sequence_chunking(model, 4)
    with torch.no_grad(), pytest.raises(NotImplementedError, match="does not support image_embeds .*embed_seq_len"):
        model(**inputs)


def test_krea2_text_fusion_keeps_the_callers_prompt_embeddings():
    """Krea 2's layerwise text-fusion blocks get a view of the model's own ``encoder_hidden_states``
    (``BlockPlan.input_is_view``): their chunks' outputs must not be written over it, since the pipeline passes the
    same prompt embeddings at every step. Its refiner blocks' 8 text tokens in 16 chunks make one-token chunks, whose
    (B, 1, 1, 1) key mask is that token's entry, not a broadcast."""
    spec = get_family("krea2")
    model = spec.build("tiny")
    inputs = spec.make_inputs(model.config, batch_size=2, height=80, width=112, masked=True)
    prompt = inputs["encoder_hidden_states"].clone()
    with torch.no_grad():
        reference = model(**inputs)[0]
        apply_sequence_chunking(model, 16)
        first, second = model(**inputs)[0], model(**inputs)[0]
    assert torch.equal(inputs["encoder_hidden_states"], prompt)
    assert rel_err(first, reference) <= 1e-5 and torch.equal(first, second)


def test_sequence_first_blocks_need_a_head_run_on_its_own_input():
    """ERNIE-Image's blocks take (S, B, D) hidden states (split on dim 0). The model-level tail passes cut and gather
    batch-first streams, so a sequence-first plan must run its head whole or on pieces of its input (tail_split)."""
    plan = SEQUENCE_PLANS["ErnieImageTransformer2DModel"]
    with pytest.raises(ValueError, match=r"take sequence-first hidden states .*\(tail=None\) or in pieces"):
        dataclasses.replace(plan, tail_split=None)
    spec = get_family("ernie_image")
    model = spec.build("tiny")
    inputs = spec.make_inputs(model.config, batch_size=2, height=80, width=112, masked=True)
    with torch.no_grad():
        reference = model(**inputs)[0]
        report = apply_sequence_chunking(model, 4)
        out = model(**inputs)[0]
    assert report.blocks and report.tail and rel_err(out, reference) <= 1e-5


# family -> (the BroadcastTable producer, config over the tiny one, size, growth bound with it, growth without it at
# least): measured 4.93 / 11.70, 4.70 / 10.51, 3.57 / 4.57 (FLUX.3 with its flow-map target embedding added).
BROADCAST_TABLES = {
    "helios": ("condition_embedder", {}, Size(48, 80, 9), 5.0, 11.0),
    "ernie_image": ("adaLN_modulation", {}, Size(80, 112), 4.8, 10.0),
    "flux3": ("timestep_embedder", {"flow_map": True}, Size(80, 112), 3.7, 4.4),
}


@pytest.mark.parametrize("family", sorted(BROADCAST_TABLES))
def test_per_sample_tables_the_model_materialises_are_deferred(family, caplog):
    """Helios concatenates the per-sample modulation of its history tokens (zero timestep) with the window's after
    expanding both over the tokens; ERNIE-Image makes its six expanded tables contiguous; FLUX.3 applies a SiLU to
    its expanded timestep embedding (after adding the flow-map target's) before its per-token modulations. Each kept
    1-7 LD through every block; their plans defer them from the expansion on (BroadcastTable): exact at batch 2, odd
    chunk counts and both schedules, the head in chunks, and the growth measured with and without the producer."""
    caplog.set_level(logging.ERROR)
    producer, overrides, size, bound, whole_at_least = BROADCAST_TABLES[family]
    spec = get_family(family)
    model = spec.build({**spec.config("tiny"), **overrides})
    inputs = spec.make_inputs(model.config, batch_size=2, height=size.height, width=size.width,
                              num_frames=size.num_frames, masked=True)
    if "timestep" in inputs and inputs["timestep"].numel() == 2:
        inputs["timestep"] = inputs["timestep"] * torch.tensor([0.3, 1.0])  # the samples' tables differ
    with torch.no_grad():
        reference = model(**inputs)[0]
        for schedule in ("two_pass", "lockstep"):
            for num_chunks in (3, 7):
                report = apply_sequence_chunking(model, num_chunks, schedule=schedule)
                assert producer in report.producers and report.tail and not report.skipped, report
                out = model(**inputs)[0]
                remove_memory_optimizations(model)
                assert rel_err(out, reference) <= 1e-5, (schedule, num_chunks)
    plan = SEQUENCE_PLANS[spec.class_name]
    whole = dataclasses.replace(plan, producers={path: p for path, p in plan.producers.items() if path != producer})
    deferred = activation_growth(family, prepare=apply_sequence_chunking, overrides=overrides)
    made_whole = activation_growth(family, prepare=lambda m: apply_sequence_chunking(m, plan=whole, inplace=True),
                                   overrides=overrides)
    assert deferred <= bound and made_whole >= whole_at_least, (deferred, made_whole)


def test_a_per_sample_table_handed_to_blocks_unexpanded_is_its_value():
    """Wan's embedder named a BroadcastTable: the model never expands its tables, it hands the (B, 6, D) projection to
    every block (the block hook hands the block the value) and builds the head's shift / scale from temb and a
    (1, 2, D) table (a plain tensor then). The output and a training step's gradients, through the embedder too,
    match the unmodified model's. Mixed producer kinds for one module are an error."""
    spec = get_family("wan")
    model = spec.build("tiny").train()
    inputs = spec.make_inputs(model.config, batch_size=2, height=80, width=112, num_frames=5)
    plan = SEQUENCE_PLANS[spec.class_name]
    samples = dataclasses.replace(plan, producers={**plan.producers, "condition_embedder": (
        BroadcastTable(1, output=0), BroadcastTable(1, output=1))})

    def step() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        out = model(**inputs)[0]
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        return out.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    reference, reference_grads = step()
    report = apply_sequence_chunking(model, 3, plan=samples, training=True)
    assert "condition_embedder" in report.producers and report.tail, report
    out, grads = step()
    remove_memory_optimizations(model)
    assert rel_err(out, reference) <= 1e-5 and grads.keys() == reference_grads.keys()
    assert any(name.startswith("condition_embedder.time_embedder") for name in grads)
    for name, grad in reference_grads.items():
        assert rel_err(grads[name], grad) <= 1e-4, name
    with pytest.raises(ValueError, match="all TokenProducer or all BroadcastTable"):
        dataclasses.replace(plan, producers={"condition_embedder": (
            BroadcastTable(1, output=0), dataclasses.replace(plan.producers["condition_embedder"][1]))})


def test_producers_of_tuple_entries_name_their_index():
    """TokenProducer.output (Lumina 2's rotary embedder returns three tables inside a tuple): every producer of a
    tuple names its entry, a single producer none."""
    plan = SEQUENCE_PLANS["Lumina2Transformer2DModel"]
    (path, producers), = plan.producers.items()
    with pytest.raises(ValueError, match="each with its output index"):
        dataclasses.replace(plan, producers={path: (producers[0], dataclasses.replace(producers[1], output=None))})
    with pytest.raises(ValueError, match="a single producer for a module returning its table, without one"):
        dataclasses.replace(plan, producers={path: producers[0]})


@pytest.mark.parametrize("schedule", ["two_pass", "lockstep"])
def test_ideogram4_per_token_timesteps(schedule):
    """Ideogram 4 takes a ``(B, S)`` timestep too: its AdaLN input is then ``(B, S, adaln_dim)``, which the plan cuts
    with the tokens (a ``(B, 1, adaln_dim)`` one passes whole). Prompts of different lengths, 4 and 16 chunks."""
    spec = get_family("ideogram4")
    model = spec.build("tiny")
    inputs = spec.make_inputs(model.config, batch_size=2, masked=True)
    inputs["timestep"] = torch.rand(2, inputs["hidden_states"].shape[1], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(**inputs)[0]
        for num_chunks, report, output in chunked_outputs(model, inputs, schedule=schedule):
            assert report.blocks and rel_err(output[0], reference) <= 1e-5, num_chunks


def test_cosmos3_text_only_modules_are_refused_where_they_cannot_hold():
    """``BlockPlan.text_only`` (Cosmos 3 Omni's text query, attention output and MLP projections, run by chunk 0's
    final pass alone) needs a text stream carried whole, and only linear modules return zeros of a known shape; the
    equivalence and matmul-work tests run the family's plan."""
    from memopt.plans.sequence import BlockPlan

    with pytest.raises(ValueError, match="text_only needs split_text=False"):
        BlockPlan(text_only=("mlp.down_proj",))
    spec = get_family("cosmos3_omni")
    model = spec.build("tiny")
    plan = SEQUENCE_PLANS["Cosmos3OmniTransformer"]
    block = dataclasses.replace(plan.blocks["layers.*"], text_only=("post_attention_layernorm",))
    with pytest.raises(ValueError, match="layers.0: the plan names post_attention_layernorm .* as text-only"):
        apply_sequence_chunking(model, 4, plan=dataclasses.replace(plan, blocks={"layers.*": block}))
    assert remove_memory_optimizations(model) == 0
