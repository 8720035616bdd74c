"""Sequential context parallelism (memopt.hooks.sequence): exactness, memory growth, composition, refusals."""

from __future__ import annotations

import dataclasses
import itertools
import logging
import warnings

import pytest
import torch
from diffusers.hooks import HookRegistry, ModelHook, apply_group_offloading
from diffusers.models._modeling_parallel import ContextParallelInput
from diffusers.models.attention_dispatch import _AttentionBackendRegistry
from torch.utils.flop_counter import FlopCounterMode

from memopt import apply_sequence_chunking, remove_memory_optimizations, simulate
from memopt.hooks import _attention_dispatch, sequence
from memopt.hooks._common import has_memopt_hooks, register_memopt_hook
from memopt.hooks._deferred_tokens import DeferredGroups, DeferredSample, DeferredTokens
from memopt.hooks._held_blocks import resolved
from memopt.hooks._sequence_chunks import RUNNING, ChunkLayout, balanced
from memopt.hooks._sequence_exchange import AttentionState, BlockRun
from memopt.hooks.sequence import (
    SEQUENCE_REUSE_HOOK,
    SEQUENCE_SKIP_HOOK,
    SequenceChunkingConfig,
    SequenceReuseHook,
    SequenceSkipHook,
    warn_if_launch_bound,
)
from memopt.models import Size, get_family
from memopt.plans.sequence import SEQUENCE_PLANS, JointAttention, SequenceSplit, TokenProducer, sequence_plan
from memopt.trace.growth import activation_growth

from _tiny_cases import FAMILIES, SIZES, chunked_completely, prediction, rel_err, with_attention_spec  # noqa: E402


def build(family: str, config: str | dict = "tiny", size: Size | None = None, batch_size: int = 2):
    spec = get_family(family)
    model = spec.build(config)
    size = size or SIZES[family]
    inputs = spec.make_inputs(model.config, batch_size=batch_size, height=size.height, width=size.width,
                              num_frames=size.num_frames, masked=True)
    return spec, model, inputs


@pytest.mark.parametrize("family", FAMILIES)
def test_matches_unmodified_model(family, monkeypatch):
    """At 4 chunks the skipped projections return unread stand-ins (``memopt.hooks._unread``; at these tiny sizes only
    with their threshold lowered to 0), at 16 the dense zeros (or empty batches) small chunks get."""
    spec, model, inputs = build(family)
    tokens = spec.num_tokens(model.config, SIZES[family])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    users_before = _attention_dispatch._installed_users
    with torch.no_grad():
        reference = prediction(model(**inputs))
        # 4 chunks split the 8 text tokens of joint-attention blocks too; 16 chunks carry them whole.
        for num_chunks, unread_from in ((4, 0), (16, sequence.UNREAD_FROM)):
            assert tokens % num_chunks
            monkeypatch.setattr(sequence, "UNREAD_FROM", unread_from)
            report = apply_sequence_chunking(model, num_chunks)
            assert chunked_completely(report, family), report
            out = prediction(model(**inputs))
            assert remove_memory_optimizations(model) > 0
            assert rel_err(out, reference) <= 1e-5, (family, num_chunks)
        assert not has_memopt_hooks(model)
        assert torch.equal(prediction(model(**inputs)), reference)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert _attention_dispatch._installed_users == users_before  # every hook released the dispatch wrappers
    if users_before == 0:  # no other model with attention hooks alive in this process: diffusers' registry restored
        assert not any(hasattr(fn, "memopt_original") for fn in _AttentionBackendRegistry._backends.values())


@pytest.mark.parametrize("family", ["wan", "hunyuanvideo"])
def test_options_keep_the_result(family):
    _, model, inputs = build(family)
    with torch.no_grad():
        reference = prediction(model(**inputs))
        for options in ({"inplace": False}, {"chunk_tail": False}):
            report = apply_sequence_chunking(model, **options)
            assert (report.tail is None) == (options.get("chunk_tail") is False)
            out = prediction(model(**inputs))
            remove_memory_optimizations(model)
            assert rel_err(out, reference) <= 1e-5, options


def test_chunk_boundaries_fall_on_tile_multiples_only_where_chunks_stay_even():
    # Wan2.1 at 720p/81f in 32 chunks: 2,362-2,363 tokens each, one part-empty 128-row tile per chunk; aligned, every
    # chunk but the last is whole tiles and no chunk grows by more than an eighth.
    ranges = balanced(75_600, 32, 128)
    assert ranges[0][0] == 0 and ranges[-1][1] == 75_600 and all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    assert all(end % 128 == 0 for _, end in ranges[:-1])
    assert max(end - start for start, end in ranges) <= 75_600 // 32 * 9 // 8
    assert balanced(75_600, 32) == balanced(75_600, 32, 1) and len({e - s for s, e in balanced(75_600, 32)}) == 2
    assert balanced(4_000, 32, 128) == balanced(4_000, 32)  # 125-token chunks: a tile would unbalance them
    # HunyuanVideo 720p/129f in 48 chunks: each chunk's 5-6 text tokens join its image tokens in joint attention
    before = [0, *itertools.accumulate(end - start for start, end in balanced(256, 48))]
    ranges = balanced(118_800, 48, 128, before)
    assert all((end + before[index + 1]) % 128 == 0 for index, (_, end) in enumerate(ranges[:-1]))
    assert ranges[-1][1] == 118_800 and max(end - start for start, end in ranges) <= 118_800 // 48 * 9 // 8
    # a joint block called without its text stream aligns the image tokens alone
    assert ChunkLayout.build(32, 75_600, None, True, None, 128, True).ranges["image"] == balanced(75_600, 32, 128)
    with pytest.raises(ValueError, match="before must give the rows ahead of each of the 33 boundaries, got 1"):
        balanced(75_600, 32, 128, [0])
    with pytest.raises(ValueError, match="align must be a positive int, got 0"):
        SequenceChunkingConfig(align=0)


# Learned positions (AuraFlow) and the padded latent size (HiDream) for the doubled height and width.
LARGER_TINY = {"auraflow": {"pos_embed_max_size": 256}, "hidream": {"max_resolution": (28, 36)}}


@pytest.mark.parametrize("family", FAMILIES)
def test_aligned_chunks_match_unmodified_model(family, monkeypatch):
    """Chunks of uneven sizes (boundaries moved to multiples of ``align``) at twice the test height and width."""
    size = SIZES[family]
    config = {**get_family(family).config("tiny"), **LARGER_TINY.get(family, {})}
    spec, model, inputs = build(family, config, Size(size.height * 2, size.width * 2, size.num_frames))
    layouts = []
    original = ChunkLayout.build.__func__

    def build_layout(cls, *args):
        layout = original(cls, *args)
        if args[4] is None:  # chunks free to move (not kept to whole token groups: Wan Animate's face adapter)
            joint = args[6] and "text" in layout.ranges  # text rows in the same kernels: their sum is aligned
            text_rows = layout.ranges["text"][0][1] - layout.ranges["text"][0][0] if joint else 0
            layouts.append((layout, text_rows))
        return layout

    monkeypatch.setattr(ChunkLayout, "build", classmethod(build_layout))
    moved = 0
    with torch.no_grad():
        reference = prediction(model(**inputs))
        for align in (8, 7):  # one of them moves the middle boundary of every token count here
            layouts.clear()
            apply_sequence_chunking(model, 2, align=align)
            out = prediction(model(**inputs))
            remove_memory_optimizations(model)
            assert rel_err(out, reference) <= 1e-5, align
            aligned = [(layout.ranges["image"], text_rows) for layout, text_rows in layouts
                       if layout.ranges["image"] != balanced(layout.lengths["image"], layout.num_chunks)]
            assert all((ranges[0][1] + text_rows) % align == 0 for ranges, text_rows in aligned)
            moved += len(aligned)
    assert moved


def test_small_chunks_on_an_accelerator_are_warned_about():
    with pytest.warns(UserWarning, match=r"chunks of 85 tokens on cuda: .*\(num_chunks=4 keeps 1,024"):
        warn_if_launch_bound(torch.device("cuda"), 85, 4096)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_if_launch_bound(torch.device("cpu"), 85, 4096)  # the CPU's kernels are slow enough
        warn_if_launch_bound(torch.device("cuda"), 2363, 75_600)


def test_more_chunks_than_tokens():
    _, model, inputs = build("wan", size=Size(48, 80, 1))  # 15 tokens
    with torch.no_grad():
        reference = prediction(model(**inputs))
        apply_sequence_chunking(model, 40)
        assert rel_err(prediction(model(**inputs)), reference) <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_chunks_of_two_tokens_when_there_are_more_chunks_than_pairs(family, caplog):
    """Chunks never hold a single token: Allegro's blocks and head ``squeeze(1)`` their tokens (a chunk of one was a
    ValueError), AnyFlow's head fell back to the whole sequence; and the output head still runs in chunks."""
    _, model, inputs = build(family, batch_size=1)
    with torch.no_grad():
        reference = prediction(model(**inputs))
        apply_sequence_chunking(model, 1000, align=1)
        with caplog.at_level(logging.INFO, logger="memopt"):
            result = prediction(model(**inputs))
    assert rel_err(result, reference) <= 1e-5
    assert "whole sequence" not in caplog.text


def _first_frame_clean(batch: int, tokens: int, frame_tokens: int) -> torch.Tensor:
    """Per-token timesteps as Wan2.2 TI2V's image-to-video call makes them: the conditioning frame's tokens at 0,
    the rest at the step's timestep (one per sample)."""
    timesteps = torch.tensor([700.0, 300.0][:batch])[:, None].repeat(1, tokens)
    timesteps[:, :frame_tokens] = 0
    return timesteps


@pytest.mark.parametrize("schedule", ["two_pass", "lockstep"])
def test_per_token_timesteps_are_split(schedule, caplog):
    """Wan2.2 TI2V, ChronoEdit and LTX-Video condition every token on its own timestep: the conditioning embedder's
    per-token tables (7 LD made whole) are computed a chunk at a time, the model's own view of them and its output
    head's per-token shift and scale deferred with them, so the head runs in chunks too. Distinct timesteps per
    token and the image-to-video pattern (two values), batch 2, 6 chunks over an odd token count."""
    for family in ("wan", "chronoedit", "ltx", "ltx2"):
        spec, model, inputs = build(family)
        tokens = spec.num_tokens(model.config, SIZES[family])
        if family == "ltx2":  # the audio keeps one timestep per sample (it would default to the video's)
            inputs["audio_timestep"] = inputs["timestep"]
        for timesteps in (torch.randint(0, 1000, (2, tokens)), _first_frame_clean(2, tokens, tokens // 3)):
            inputs["timestep"] = timesteps
            with torch.no_grad():
                reference = prediction(model(**inputs))
                report = apply_sequence_chunking(model, 6, schedule=schedule)
                with caplog.at_level(logging.WARNING, logger="memopt.hooks.sequence"):
                    out = prediction(model(**inputs))
                    out_again = prediction(model(**inputs))
            remove_memory_optimizations(model)
            assert rel_err(out, reference) <= 1e-5, family
            assert torch.equal(out, out_again)
            assert report.tail is not None and {"condition_embedder", "time_embed"} & set(report.producers), family
            assert not report.skipped, family
    assert "output head runs on the whole sequence" not in caplog.text


def test_per_token_timesteps_stay_near_the_floor():
    """Activation growth with image-to-video timesteps (fp32, LD per token): unmodified, the per-token tables and the
    head's per-token modulation add 13 LD (Wan 7.62 -> 20.62, LTX 14.00 -> 27.00); chunked, they add under 1 LD
    (Wan 3.41 -> 4.17, LTX 3.81 -> 4.59 at 16 chunks), where the whole tables would be 13.00 for both. LTX-2 at its
    default chunks: 39.55 unmodified, 19.93 with its video tables whole, 5.17 deferred (4.42 with one timestep per
    sample)."""
    def image_to_video(inputs: dict, tokens: int) -> dict:
        audio = {"audio_timestep": inputs["timestep"]} if "audio_hidden_states" in inputs else {}
        return {**inputs, **audio, "timestep": _first_frame_clean(1, tokens, tokens // 5)}

    sixteen = lambda model: apply_sequence_chunking(model, 16)  # noqa: E731
    cases = (("wan", sixteen, 4.3), ("ltx", sixteen, 4.7), ("ltx2", apply_sequence_chunking, 5.3))
    for family, chunked, bound in cases:
        assert activation_growth(family, inputs=image_to_video) > 20
        assert activation_growth(family, chunked, inputs=image_to_video) <= bound, family


@pytest.mark.parametrize("schedule", ["two_pass", "lockstep"])
def test_wan_image_to_video_cross_attention_stays_chunk_local(schedule):
    """Wan I2V: attn2 attends to 257 image-encoder + 512 text tokens in two calls; only attn1 exchanges K/V."""
    config = {**get_family("wan").config("tiny"), "added_kv_proj_dim": 32, "image_dim": 20}
    spec, model, inputs = build("wan", config)
    inputs["encoder_hidden_states"] = torch.randn(2, 512, 24)
    inputs["encoder_hidden_states_image"] = torch.randn(2, 257, 20)
    with torch.no_grad():
        reference = prediction(model(**inputs))
        report = apply_sequence_chunking(model, 5, schedule=schedule)
        out = prediction(model(**inputs))
    assert report.attention == ["blocks.0.attn1", "blocks.1.attn1"]
    assert rel_err(out, reference) <= 1e-5


def test_split_dims_follow_the_models_cp_plan():
    """Where diffusers ships a `_cp_plan`, memopt's block plan splits the rotary tables on the same dims."""
    expected = {  # model class -> (its _cp_plan entry, memopt's block input)
        "WanTransformer3DModel": ("rope", "blocks.*", "rotary_emb"),
        "ChronoEditTransformer3DModel": ("rope", "blocks.*", "rotary_emb"),
        "LTXVideoTransformer3DModel": ("rope", "transformer_blocks.*", "image_rotary_emb"),
        "QwenImageTransformer2DModel": ("pos_embed", "transformer_blocks.*", "image_rotary_emb"),
    }
    for class_name, (cp_module, pattern, argument) in expected.items():
        cp_plan = getattr(__import__("diffusers"), class_name)._cp_plan[cp_module]
        specs = SEQUENCE_PLANS[class_name].blocks[pattern].inputs[argument]
        for index, spec in enumerate(specs):
            cp_input: ContextParallelInput = cp_plan[index]
            assert (spec.split_dim, spec.expected_dims) == (cp_input.split_dim, cp_input.expected_dims)
    flux = __import__("diffusers").FluxTransformer2DModel._cp_plan[""]
    flux_rope = SEQUENCE_PLANS["FluxTransformer2DModel"].blocks["transformer_blocks.*"].inputs["image_rotary_emb"][0]
    assert flux_rope.split_dim == flux["img_ids"].split_dim == flux["txt_ids"].split_dim
    assert flux_rope.segments == ("text", "image")  # ids = cat(txt_ids, img_ids)


# LTX-2's blocks hold the residual, the video self-attention's K/V and the video-to-audio attention's video K/V at
# once in the two-pass schedule (measured 4.42; unmodified 16.55). Reaching ~3.4 would need the video-to-audio
# attention merged over video chunks (log-sum-exp) instead of gathering its K/V.
# Helios concatenates its history tokens' modulation (B, 6, S_history, D) with the window's before the blocks and
# keeps the result through all of them (7 LD with the (B, S, D) head table; measured 11.70 so): deferred from the
# expansion of the per-sample tables on (BroadcastTable; measured 4.93, unmodified 21.25). What stays above the floor
# are the forward's locals: the embedded history latents (80 of the 144 tokens at this config) and rotary pieces.
# Wan VACE keeps the video tokens, the last control state and the last hint alive between its blocks as Python
# variables of the model forward (~5 LD; measured 5.26, unmodified 9.62). One VACE block here: with three or more
# their hints would add 1 LD each, and the blocks are held until used instead (test_wan_vace_blocks_run_when_...).
# Cosmos Predict2 gets a per-frame timestep: the model forward expands its temb (B, S, 3D) and embedded timestep
# (B, S, D) to every token before the blocks and keeps them until the head (4 LD), deferred with the per-frame tables
# (measured 4.22, 7.90 with them whole, unmodified 18.25; with Cosmos-1.0's per-sample timestep 3.43): each chunk's
# rows are made from whole frames, and this config's frames are large against its chunks.
# Motif-Video's decoder blocks take the encoder's whole image output as a second stream, attended to jointly: two full
# streams and their gathered K/V (measured 7.49; unmodified 24.13).
# AnyFlow's per-frame (t, r) tables are deferred (measured 3.70; 13.12 with them whole, unmodified 23.12): its
# complex rotary tables are computed whole.
# FLUX.3 applies a SiLU to its timestep embedding expanded over the image tokens and keeps the result (1 LD; measured
# 4.57 so): deferred (BroadcastTable; measured 3.57, unmodified 23.25).
# ERNIE-Image's forward expands its six per-sample modulation tensors to every token and makes them contiguous,
# (S, B, D) each, kept through all blocks (6 LD; measured 10.51 so): deferred (BroadcastTable; measured 4.70, unmodified
# 21.10); it also keeps the embedded image tokens (a local) and its fp32 rotary table.
# GLM-Image's forward keeps the prior tokens' embedding and its projection as locals through all blocks (2 LD; measured
# 5.25, unmodified 14.12): CogView4's blocks otherwise (3.25).
# HunyuanDiT's model keeps the first half's block outputs for its long skip connections (one here, block 0's, until
# block 3), and so its blocks write out of place (measured 5.44, unmodified 16.00).
# Ideogram 4's forward multiplies its (B, S, 53248) text features by the text mask before the norm (a copy 11.56x the
# width, alive until the norm returns): the prologue, not the blocks, holds the peak (measured 14.29; unmodified 35.69,
# the norm's fp32 temporaries of the whole sequence, which its token chain makes a chunk's).
# Cosmos 3 Omni's forward keeps the projected video tokens and their per-token timestep embeddings as locals through
# the blocks (2 LD), and its head concatenates both pathways' outputs and gathers the predicted rows by index (two
# more copies): measured 5.55 with the peak in that head (the chunked blocks peak at 3.78), unmodified 15.80.
# OmniGen's forward turns its (B, S, S) 0/1 mask into an additive (B, 1, S, S) one and keeps it through all blocks:
# quadratic in the tokens (about 2.6 of these LD per token between the two sizes; measured 6.20, unmodified 17.52).
GROWTH_BOUND = {"ideogram4": 14.5, "cosmos3_omni": 5.6, "omnigen": 6.3,
                "ltx2": 4.5, "helios": 5.0, "wan_vace": 5.5, "zimage": 4.7, "minimax_h3": 4.6,
                "qwenimage21": 4.7, "flux3": 3.7, "auraflow": 4.6,
                "framepack": 4.0, "wan_animate": 6.0, "cosmos": 4.3, "motif_video": 7.6,
                "ernie_image": 4.8, "kandinsky6": 5.5, "joyimage_edit_plus": 3.7, "anyflow": 3.8,
                "glm_image": 5.3, "hunyuandit": 5.5}


@pytest.mark.parametrize("family", FAMILIES)
def test_activation_growth_is_near_the_floor(family, caplog):
    """Default chunking: <= 3.5 LD per token (floor: residual + K + V = 3; unmodified: 7.6-16.7 at this config)."""
    caplog.set_level(logging.ERROR)
    growth = activation_growth(family, prepare=apply_sequence_chunking)
    assert growth <= GROWTH_BOUND.get(family, 3.5), f"{family}: {growth:.2f} LD per token"


@pytest.mark.parametrize("family", ["wan", "hunyuanvideo"])
def test_runs_under_fake_tensors(family):
    """memopt.simulate traces full-size models under FakeTensorMode: no data-dependent Python in the hooks."""
    spec = get_family(family)
    size = SIZES[family]

    def inputs(model):
        return spec.make_inputs(model.config, height=size.height, width=size.width, num_frames=size.num_frames,
                                dtype=torch.bfloat16)

    baseline = simulate(lambda: spec.build("tiny"), inputs, dtype=torch.bfloat16)
    chunked = simulate(lambda: spec.build("tiny"), inputs, dtype=torch.bfloat16,
                       prepare=lambda m: apply_sequence_chunking(m, 4))
    assert 0 < chunked.peak_bytes < baseline.peak_bytes


@pytest.mark.parametrize("family, per_token", [("wan", False), ("flux", False), ("wan", True), ("ltx", True),
                                               ("helios", False), ("ernie_image", False), ("flux3", False)])
def test_combines_with_group_offloading(family, per_token):
    """With per-token timesteps under block-level offloading the head runs whole (no tail passes): the deferred head
    modulation meets the whole hidden states and is computed for all tokens; the offloading hooks move the deferred
    tables' rows."""
    spec, model, inputs = build(family)
    if per_token:
        tokens = spec.num_tokens(model.config, SIZES[family])
        inputs["timestep"] = _first_frame_clean(2, tokens, tokens // 3)
    with torch.no_grad():
        reference = prediction(model(**inputs))
        apply_sequence_chunking(model, 5)
        cpu = torch.device("cpu")
        apply_group_offloading(model, onload_device=cpu, offload_device=cpu, offload_type="block_level",
                               num_blocks_per_group=1)
        assert rel_err(prediction(model(**inputs)), reference) <= 1e-5
        remove_memory_optimizations(model)
        assert torch.equal(prediction(model(**inputs)), reference)


@pytest.mark.parametrize("family", ["flux", "hunyuanvideo", "chroma"])
@pytest.mark.parametrize("split", ["hidden", "sequence"])
def test_combines_with_chunked_feedforward(family, split):
    """With ``split="sequence"``, 5 shards of FeedForwards that the sequence chunks hand 3-4 rows (2 samples x their
    share of the 8 text tokens): one shard per row there, not the error a caller passing too few rows gets."""
    from memopt import apply_chunked_feedforward

    _, model, inputs = build(family)
    with torch.no_grad():
        reference = prediction(model(**inputs))
        apply_chunked_feedforward(model, num_chunks=5, split=split)
        report = apply_sequence_chunking(model, 5)
        assert not report.skipped
        assert rel_err(prediction(model(**inputs)), reference) <= 1e-5


def test_unknown_model_is_refused():
    with pytest.raises(ValueError, match="no sequence plan for Linear"):
        apply_sequence_chunking(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="positive int"):
        SequenceChunkingConfig(num_chunks=0)
    _, model, _ = build("wan")
    apply_sequence_chunking(model)
    with pytest.raises(RuntimeError, match="already has the hook"):
        apply_sequence_chunking(model)


def test_block_with_a_foreign_hook_is_skipped_and_reported():
    class KeepsInputs(ModelHook):
        def pre_forward(self, module, *args, **kwargs):
            self.seen = args
            return args, kwargs

    _, model, inputs = build("wan")
    HookRegistry.check_if_exists_or_initialize(model.blocks[1]).register_hook(KeepsInputs(), "some_cache")
    with torch.no_grad():
        reference = prediction(model(**inputs))
        report = apply_sequence_chunking(model, 4)
        out = prediction(model(**inputs))
    assert report.blocks == ["blocks.0"]
    assert [path for path, _ in report.skipped] == ["blocks.1", "<model>"]
    assert report.tail is None and "blocks.1" in str(report)
    assert rel_err(out, reference) <= 1e-5


class ManualAttention:
    """A Wan attention processor computing attention with plain matmuls: invisible to any dispatch interception."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        q, k, v = (proj(hidden_states).unflatten(2, (attn.heads, -1)).transpose(1, 2)
                   for proj in (attn.to_q, attn.to_k, attn.to_v))
        weights = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(-1)
        return attn.to_out[0]((weights @ v).transpose(1, 2).flatten(2))


@pytest.mark.parametrize("empty_stand_ins", [True, False])
def test_a_processor_that_bypasses_the_dispatcher_is_an_error_not_a_wrong_result(empty_stand_ins):
    """With Wan's empty stand-ins the manual attention fails on them (named in the error); with full-size zeros it
    runs through and the missing kernel call is caught."""
    _, model, inputs = build("wan")
    model.blocks[0].attn1.set_processor(ManualAttention())
    plan = sequence_plan(model)
    assert plan.blocks["blocks.*"].attention["attn1"].empty_stand_ins
    if not empty_stand_ins:
        plan = with_attention_spec(plan, "blocks.*", "attn1", empty_stand_ins=False)
    apply_sequence_chunking(model, 4, plan=plan)
    message = "empty stand-ins .*blocks.0.attn1" if empty_stand_ins else "without reaching the attention kernel"
    with torch.no_grad(), pytest.raises(RuntimeError, match=message):
        model(**inputs)


def test_plan_errors_name_the_block():
    from memopt.plans.sequence import BlockPlan, JointAttention, SequencePlan

    _, model, _ = build("wan")
    bad = SequencePlan({"blocks.*": BlockPlan(inputs={"hidden_states": SequenceSplit(2, 3)},
                                              attention={"attn1": JointAttention()})})
    with pytest.raises(ValueError, match="blocks.0: the plan must split 'hidden_states'"):
        apply_sequence_chunking(model, plan=bad)
    missing = SequencePlan({"blocks.*": BlockPlan(inputs={"hidden_states": SequenceSplit(1, 3)},
                                                  attention={"attn9": JointAttention()})})
    with pytest.raises(ValueError, match="no block of WanTransformer3DModel matched"):
        apply_sequence_chunking(model, plan=missing)


@pytest.mark.parametrize("family", ["flux", "wan"])
@pytest.mark.parametrize("schedule", ["two_pass", "lockstep"])
def test_save_pretrained_and_lora_on_attention_projections(family, schedule, tmp_path):
    """save_pretrained works with the hooks in place and saves the unchanged weights; LoRA adapters on the
    projections sequence chunking skips, exchanges (to_q/to_k/to_v) or reuses across chunks (Wan's cross-attention
    to_k/to_v), added before or after applying, keep the result."""
    from peft import LoraConfig

    _, model, inputs = build(family)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    apply_sequence_chunking(model, 4, schedule=schedule)
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path).state_dict()
    assert reloaded.keys() == state.keys() and all(torch.equal(reloaded[k], v) for k, v in state.items())
    remove_memory_optimizations(model)

    lora = dict(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    model.add_adapter(LoraConfig(**lora), adapter_name="before")
    with torch.no_grad():
        reference = prediction(model(**inputs))
        apply_sequence_chunking(model, 4, schedule=schedule)
        assert rel_err(prediction(model(**inputs)), reference) <= 1e-5
        model.add_adapter(LoraConfig(**lora), adapter_name="after")  # wraps projections that carry memopt hooks
        model.set_adapter(["before", "after"])
        chunked = prediction(model(**inputs))
        remove_memory_optimizations(model)
        unchunked = prediction(model(**inputs))
    assert rel_err(chunked, unchunked) <= 1e-5 and rel_err(unchunked, reference) > 1e-3  # "after" is active


# Blocks whose text stream every chunk carries whole (BlockPlan.split_text=False) and computes again (the tiny models'
# 8 text tokens are a large share of their work).
TEXT_CARRIED_WHOLE = ("mochi",)


@pytest.mark.parametrize("schedule", ["two_pass", "lockstep"])
@pytest.mark.parametrize("family", [family for family in FAMILIES if family not in TEXT_CARRIED_WHOLE])
def test_chunked_blocks_do_the_matmul_work_of_the_unmodified_ones(family, schedule):
    """Per block, the same matmul FLOPs as unchunked: projections a pass does not use are skipped, and the key/value
    side of cross-attention (Wan, LTX) and the timestep modulation of adaptive norms are computed once per block,
    not once per chunk and pass. (Mochi carries its text whole in every chunk, so its text stream is recomputed:
    :data:`TEXT_CARRIED_WHOLE`.)"""
    _, model, inputs = build(family)
    _assert_block_matmul_work_unchanged(family, schedule, model, inputs)


@pytest.mark.parametrize("family", ["wan", "chronoedit", "flux", "sd3", "cogvideox", "auraflow", "pixart"])
def test_fused_projections_do_the_matmul_work_of_the_unmodified_ones(family):
    """After diffusers' ``fuse_qkv_projections()`` the processors call ``to_qkv`` / ``to_added_qkv`` (and ``to_kv`` /
    ``to_added_kv`` in cross-attention): a pass computes only the columns it reads, the column blocks being the widths
    of the projections fusing concatenated, and the cross-attention key/value side is computed once per block.
    (Before, every pass computed every column: tiny Flux 1.24x, Wan 1.29x the unmodified block's matmul FLOPs.)"""
    _, model, inputs = build(family)
    model.fuse_qkv_projections()
    assert any(hasattr(module, "to_qkv") for module in model.modules())
    _assert_block_matmul_work_unchanged(family, "two_pass", model, inputs)


def _assert_block_matmul_work_unchanged(family: str, schedule: str, model: torch.nn.Module, inputs: dict) -> None:
    """Chunked (4 chunks: the text stream is split too) and unmodified outputs agree, and so do the matmul FLOPs of
    every chunked block, up to the family's :data:`MATMUL_WORK_BOUND`."""
    # Frozen: FlopCounterMode's module tracker asserts on a module input that requires grad without a grad_fn, which
    # a view of a parameter taken under no_grad is (FIBO 2's Perceiver queries latent_queries[:n]).
    model.requires_grad_(False)

    def flops_per_module() -> tuple[torch.Tensor, dict[str, int]]:
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            out = prediction(model(**inputs))
        return out, {name: sum(counts.values()) for name, counts in counter.get_flop_counts().items()}

    expected, reference = flops_per_module()
    report = apply_sequence_chunking(model, 4, schedule=schedule)
    out, chunked = flops_per_module()
    remove_memory_optimizations(model)
    assert rel_err(out, expected) <= 1e-5
    # Blocks the call runs (FLUX.3 builds reference-image blocks that text-to-image never calls).
    blocks = [name for path in report.blocks if (name := f"{type(model).__name__}.{path}") in reference]
    assert blocks and all(reference[block] > 0 for block in blocks)
    bound = MATMUL_WORK_BOUND.get((family, schedule))
    if bound is None:
        assert {block: chunked[block] for block in blocks} == {block: reference[block] for block in blocks}
    else:
        assert all(reference[block] <= chunked[block] <= bound * reference[block] for block in blocks)


# LTX-2's two-pass schedule (and Kandinsky 6's, the same video + audio block layout) collects four attentions' K/V in
# two passes (JointAttention.collect_with_previous), the second rerunning the two self-attentions (measured 1.44x the
# unmodified block's matmul FLOPs, 1.88x with one pass per attention; lock-step: equal).
# Wan VACE's first VACE block projects the control tokens (proj_in) before its attention: one D x D matmul per
# token that runs in both passes.
# FLUX.3's per-token modulation tables are made per chunk: their rows are equal, so one matrix-vector product per
# table serves every chunk, counted in the first block that reads it (+0.7% to +2.9% of a tiny block; the whole model
# does 0.88x the unmodified matmul work, the full-length tables no longer being computed).
# Cosmos Predict2's per-frame timestep makes norm1's adaLN-LoRA input the chunk's own rows, so the collection pass
# reruns it (measured 1.043x).
# (Bria FIBO 2's blocks modulate with the noisy and with the clean timestep embedding, HunyuanVideo-I2V's token-replace
# norms with the timestep embedding and the clean image's: one modulation layer called on two shared inputs in every
# chunk, both kept by the reuse hook, so equal work. With one kept input they evicted each other: FIBO 2 1.14x.)
# Cosmos 3 Omni carries its text prefix whole in every chunk; its query, attention-output and MLP projections run in
# chunk 0's final pass only (BlockPlan.text_only), but every chunk and pass still computes the text's norms and keys
# and values (measured 1.12x two-pass, 1.05x lock-step at this size, 8 text and 54 video tokens in 4 chunks; 1.52x
# and 1.39x with the whole text pathway in every chunk).
# HunyuanDiT's second-half blocks project cat(hidden, skip) (skip_linear, 2D x D per token) before their attention: it
# runs in both passes (measured 1.12x in the tiny model's block with a skip).
MATMUL_WORK_BOUND = {("ltx2", "two_pass"): 1.5, ("kandinsky6", "two_pass"): 1.5, ("wan_vace", "two_pass"): 1.2,
                     ("flux3", "two_pass"): 1.05, ("flux3", "lockstep"): 1.05, ("cosmos", "two_pass"): 1.05,
                     ("hunyuandit", "two_pass"): 1.13, ("cosmos3_omni", "two_pass"): 1.13,
                     ("cosmos3_omni", "lockstep"): 1.06}


def test_a_block_given_an_int_its_plan_does_not_cut_runs_unchunked(caplog):
    """HunyuanVideo-I2V's token-replace blocks get the first frame's token count, which each chunk needs its own share
    of (the plan's TokenCount(leading=True)). A plan without it would hand every chunk the whole count (rel err 2.4e-2,
    no error): such a block runs unchunked instead, with a warning naming the argument."""
    _, model, inputs = build("hunyuanvideo_i2v")
    with torch.no_grad():
        reference = prediction(model(**inputs))
    plan = sequence_plan(model)
    without = dataclasses.replace(plan, blocks={pattern: dataclasses.replace(block, variants={})
                                                for pattern, block in plan.blocks.items()})
    apply_sequence_chunking(model, 4, plan=without)
    with caplog.at_level(logging.WARNING, logger="memopt.hooks.sequence"), torch.no_grad():
        unchunked = prediction(model(**inputs))
    assert torch.equal(unchunked, reference)
    assert "HunyuanVideoTokenReplaceTransformerBlock.forward gets the int num_tokens=35" in caplog.text
    remove_memory_optimizations(model)
    apply_sequence_chunking(model, 4)  # the family's plan cuts it
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="memopt.hooks.sequence"), torch.no_grad():
        assert rel_err(prediction(model(**inputs)), reference) <= 1e-5
    assert "gets the int" not in caplog.text


def test_an_output_head_given_an_int_its_plan_does_not_cut_runs_whole(caplog):
    """Helios passes its output norm the window's token count, which the head's chunks get their share of through
    the plan's tail_inputs. Without that entry the head runs on the whole sequence, with a warning naming it."""
    _, model, inputs = build("helios")
    with torch.no_grad():
        reference = prediction(model(**inputs))
    plan = sequence_plan(model)
    without = dataclasses.replace(plan, tail_inputs={name: spec for name, spec in plan.tail_inputs.items()
                                                     if name != "original_context_length"})
    apply_sequence_chunking(model, 4, plan=without, inplace=True)
    with caplog.at_level(logging.WARNING, logger="memopt.hooks.sequence"), torch.no_grad():
        assert rel_err(prediction(model(**inputs)), reference) <= 1e-5
    assert "norm_out: the output head gets the int original_context_length=" in caplog.text


def test_torch_compile_runs_the_chunked_forward_eagerly():
    """Traced by dynamo, the chunk loop's Python state (chunk layouts, cached rotary rows, reused outputs) became
    guards and constants of graphs replayed for other chunks: with inductor, Wan at 8 chunks of 2,304 tokens indexed its
    rotary table out of bounds, and dynamo alone hit its recompilation limit. memopt's sequence hooks are opaque to
    torch.compile now: no graph is traced through them, and the numbers are the eager ones."""
    from torch._dynamo.testing import CompileCounter

    _, model, inputs = build("wan")
    with torch.no_grad():
        reference = prediction(model(**inputs))
    apply_sequence_chunking(model, 4)
    counter = CompileCounter()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=counter)
    with torch.no_grad():
        assert rel_err(prediction(compiled(**inputs)), reference) <= 1e-5
        assert rel_err(prediction(compiled(**inputs)), reference) <= 1e-5
    assert counter.frame_count == 0  # the model-level hook wraps the whole forward: all of it ran eagerly
    torch._dynamo.reset()


def _attention_run(collecting: int | None) -> tuple[BlockRun, int]:
    owner = torch.nn.Module()  # stands for the attention module the skipped norm belongs to
    state = AttentionState(path="block.attn", spec=JointAttention(), stage=0, expected_calls=1)
    run = BlockRun(ChunkLayout.build(2, 4, None, True), {id(owner): state})
    run.collecting = collecting
    return run, id(owner)


def test_reused_outputs_are_recomputed_when_the_input_or_output_changed():
    linear = torch.nn.Linear(8, 8)
    register_memopt_hook(linear, SequenceReuseHook("block.attn2.to_k"), SEQUENCE_REUSE_HOOK)
    x = torch.randn(2, 3, 8)
    RUNNING.block_run, _ = _attention_run(None)
    try:
        with torch.no_grad():
            first = linear(x)
            assert linear(x) is first and linear(x[:, :]) is first  # the same numbers in the same storage
            first.mul_(2)  # a caller modified the output in place
            second = linear(x)
            assert second is not first
            assert torch.equal(second, torch.nn.functional.linear(x, linear.weight, linear.bias))
            x.add_(1)  # the input changed in place
            third = linear(x)
            assert third is not second and torch.equal(third, torch.nn.functional.linear(x, linear.weight, linear.bias))
            assert linear(x.clone()) is not third  # another tensor with the same numbers: computed anew
            # Two inputs alternating (two timestep embeddings through one modulation layer) are both served ...
            a, b = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
            out_a, out_b = linear(a), linear(b)
            assert linear(a) is out_a and linear(b) is out_b
            linear(torch.randn(2, 3, 8))  # ... and a third evicts the older of the two
            assert linear(b) is out_b and linear(a) is not out_a
            with torch.inference_mode():
                y = torch.randn(2, 3, 8)
                assert linear(y) is not linear(y)  # inference tensors have no version counter: never reused
    finally:
        RUNNING.block_run = None
    remove_memory_optimizations(linear)
    assert linear(x) is not linear(x)  # outside a chunked block run the module is untouched


def test_lockstep_refuses_a_reused_output_modified_in_place():
    """Suspended lock-step chunks hold the shared output: modifying it in place is an error, at the next use or when
    the block finishes, never a changed input under another chunk."""
    linear = torch.nn.Linear(8, 8)
    register_memopt_hook(linear, SequenceReuseHook("block.norm1.linear"), SEQUENCE_REUSE_HOOK)
    x = torch.randn(2, 8)
    run, _ = _attention_run(None)
    run.suspend = lambda barrier: None  # the lock-step schedule is running
    RUNNING.block_run = run
    try:
        with torch.no_grad():
            shared = linear(x)
            run.check_reused()
            shared.add_(1)
            with pytest.raises(RuntimeError, match=r"block\.norm1\.linear: .*modified in place.*two_pass"):
                run.check_reused()
            with pytest.raises(RuntimeError, match=r"block\.norm1\.linear: .*modified in place"):
                linear(x)
    finally:
        RUNNING.block_run = None
    remove_memory_optimizations(linear)


def test_a_skipped_norm_returns_its_input_in_the_norms_output_dtype():
    """diffusers' RMSNorm returns its weight's dtype for 16-bit weights, its input's otherwise: the stand-in follows."""
    from diffusers.models.normalization import RMSNorm

    norm = RMSNorm(8, eps=1e-6)
    run, owner = _attention_run(collecting=0)  # a collection pass: the queries are not used
    register_memopt_hook(norm, SequenceSkipHook("query", owner, "block.attn.norm_q", norm=True), SEQUENCE_SKIP_HOOK)
    zeros = torch.zeros(2, 3, 8)
    RUNNING.block_run = run
    try:
        with torch.no_grad():
            for weight_dtype in (torch.float32, torch.bfloat16, torch.float32):  # a cast after applying: relearned
                norm.to(weight_dtype)
                real = norm(zeros)  # the first call per (input, weight) dtypes runs the norm, to learn its dtype
                stand_in = norm(zeros)
                assert real.dtype == weight_dtype and stand_in.dtype == real.dtype, weight_dtype
                assert stand_in.shape == zeros.shape and not stand_in.any()
                assert (stand_in is zeros) == (weight_dtype == zeros.dtype)
            run.collecting = None  # the final pass uses the queries: the norm runs
            ones = torch.ones(2, 3, 8)
            assert torch.equal(norm(ones), ones * torch.rsqrt(torch.tensor(1 + 1e-6)) * norm.weight)
    finally:
        RUNNING.block_run = None
    remove_memory_optimizations(norm)


def test_a_plan_naming_a_shape_changing_module_as_a_norm_is_an_error():
    not_a_norm = torch.nn.Linear(8, 4)
    run, owner = _attention_run(collecting=0)
    register_memopt_hook(not_a_norm, SequenceSkipHook("query", owner, "block.attn.norm_q", norm=True),
                         SEQUENCE_SKIP_HOOK)
    RUNNING.block_run = run
    try:
        with torch.no_grad(), pytest.raises(ValueError, match=r"block\.attn\.norm_q.*shape-preserving"):
            not_a_norm(torch.zeros(2, 3, 8))
    finally:
        RUNNING.block_run = None
    remove_memory_optimizations(not_a_norm)


@pytest.mark.parametrize("family, token_dim", [("wan", 1), ("hunyuanvideo", 0), ("hunyuanimage", 0), ("flux", 0),
                                               ("ltx", 1), ("mochi", 0)])
def test_producer_rows_are_the_modules_own_rows(family, token_dim):
    """A chunk's rows of a deferred per-token table (rotary embeddings) equal those rows of the module's own output,
    for single and multi-piece token ranges, asked for repeatedly (Wan and HunyuanVideo keep each chunk's grid)."""
    import inspect

    _, model, inputs = build(family)
    plan = SEQUENCE_PLANS[type(model).__name__]
    # the rotary tables (Wan's and LTX-Video's conditioning embedders, producers of a tuple's entries, come after)
    path, producer = next(iter(plan.producers.items()))
    module = model.get_submodule(path)
    seen = {}

    def capture(module, args, kwargs, output):
        bound = inspect.signature(type(module).forward).bind(module, *args, **kwargs)
        bound.apply_defaults()
        seen["call"], seen["output"] = dict(list(bound.arguments.items())[1:]), output

    handle = module.register_forward_hook(capture, with_kwargs=True)
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    call, full = seen["call"], seen["output"]
    tokens = producer.tokens(module, call)
    rows_of = producer.rows(module, call, module.forward)
    for ranges in ([(0, tokens)], [(3, 11)], [(0, 2), (tokens - 5, tokens)], [(3, 11)]):
        expected = [torch.cat([t.narrow(token_dim, start, end - start) for start, end in ranges], token_dim)
                    for t in full]
        with torch.no_grad():
            got = rows_of(ranges)
        assert len(got) == len(expected)
        for mine, theirs in zip(got, expected):
            assert mine.shape == theirs.shape and mine.dtype == theirs.dtype, (family, ranges)
            assert torch.equal(mine, theirs), (family, ranges)  # bit-identical: per-token functions


def test_deferred_tables_defer_only_row_wise_operations():
    """A deferred per-token table goes through a model's row-wise operations on it (its own views, indexing, the
    head's modulation arithmetic) without being computed, gives the same rows as the operations on the whole
    table, is computed where a real operand runs over its tokens, and refuses what would mix tokens."""
    table = torch.randn(2, 10, 12)
    rows = lambda ranges: torch.cat([table[:, a:b] for a, b in ranges], 1)  # noqa: E731
    producer = TokenProducer(lambda module, call: 10, lambda module, call, forward: rows)
    deferred = DeferredTokens("table", producer, None, None, {})
    assert deferred.shape == (2, 10, 12) and deferred.ndim == 3 and deferred.size(-1) == 12

    bias = torch.randn(1, 1, 2, 3, 4)

    def head(values):  # what a model's output head does with a per-token table: view, index, add, chunk, squeeze
        shift, scale = (bias + values.unflatten(2, (3, 4))[:, :, None].float()).chunk(2, dim=2)
        return shift.squeeze(2), 1 + scale.squeeze(2) * 2

    deferred_shift, deferred_scale = head(deferred)
    assert isinstance(deferred_scale, DeferredTokens) and deferred_scale.shape == (2, 10, 3, 4)
    for ranges in ([(3, 7)], [(0, 2), (8, 10)]):
        shift, scale = head(rows(ranges))
        assert torch.equal(deferred_shift.rows(ranges), shift) and torch.equal(deferred_scale.rows(ranges), scale)
    linear = torch.nn.Linear(12, 5)
    projected = linear(torch.nn.functional.silu(deferred))
    assert torch.allclose(projected.rows([(2, 9)]), linear(torch.nn.functional.silu(table[:, 2:9])))
    # a real operand over all tokens: computed whole
    assert torch.equal(torch.ones(2, 10, 12) * deferred, table)

    # (B S, X) batch-major, viewed as (B, S, X) by the model
    flat = DeferredTokens("flat", TokenProducer(lambda m, c: 10, lambda m, c, f: lambda r: rows(r).flatten(0, 1)),
                          None, None, {})
    assert torch.equal(flat.view(2, -1, 12).rows([(4, 9)]), table[:, 4:9])
    with pytest.raises(TypeError, match="regroups the token dim"):
        flat.view(-1, 2, 12)  # token-major: would interleave the samples

    # the token dim merged with the dims after it: each token owns 12 consecutive entries
    merged = deferred.view(2, -1)
    assert isinstance(merged, DeferredGroups) and merged.shape == (2, 120)
    for ranges in ([(5, 30)], [(0, 1), (118, 120)]):
        assert torch.equal(merged.rows(ranges), torch.cat([table.view(2, -1)[:, a:b] for a, b in ranges], 1))

    # a range of the tokens (Helios' output norm keeps the window's rows when it runs whole), with other indexing
    for key in ((slice(None), slice(None, 5)), (slice(None), slice(-4, None), None), (0, slice(3, 8))):
        part = deferred[key]
        assert isinstance(part, DeferredTokens) and part.shape == table[key].shape, key
        assert torch.equal(part.rows([(1, 3)]), table[key][:, 1:3] if key[0] != 0 else table[key][1:3]), key
    with pytest.raises(TypeError, match="indexes the token dim"):
        deferred[:, ::2]
    with pytest.raises(TypeError, match="indexes the token dim"):
        deferred[:, torch.tensor([0, 2])]
    with pytest.raises(TypeError, match="regroups the token dim"):
        deferred.view(-1, 12)
    with pytest.raises(TypeError, match="splits the token dim"):
        deferred.chunk(2, dim=1)
    with pytest.raises(TypeError, match="row-wise operations, got softmax"):
        torch.softmax(deferred, 1)
    with pytest.raises(AttributeError):
        deferred.sum
    with pytest.raises(RuntimeError, match="meets a tensor with 7 entries at its token dim"):
        deferred * torch.ones(2, 7, 12)


def test_a_per_frame_table_expanded_to_every_token_stays_deferred():
    """SkyReels-V2's diffusion forcing: the model views its (B, F, 6 D) per-frame table with the frame count named,
    repeats it over each frame's H x W tokens, flattens to (B, F H W, 6, D) and transposes: deferred all the way, each
    range of tokens (inside a frame or across frames) gets exactly the rows of the expanded table."""
    frames, height, width = 4, 2, 3
    table = torch.randn(2, frames, 6 * 5)
    producer = TokenProducer(lambda m, c: frames, lambda m, c, f: lambda r: torch.cat([table[:, a:b] for a, b in r], 1))
    deferred = DeferredTokens("frames", producer, None, None, {})

    def expand(per_frame):  # SkyReelsV2Transformer3DModel.forward with enable_diffusion_forcing
        per_frame = per_frame.unflatten(-1, (6, -1)).view(2, frames, 1, 1, 6, -1)
        return per_frame.repeat(1, 1, height, width, 1, 1).flatten(1, 3).transpose(1, 2).contiguous()

    whole, expanded = expand(table), expand(deferred)
    assert isinstance(expanded, DeferredTokens) and expanded.tokens == frames * height * width
    assert expanded.shape == whole.shape == (2, 6, 24, 5)
    for ranges in ([(0, 24)], [(2, 5)], [(7, 19)], [(0, 1), (23, 24)]):
        assert torch.equal(expanded.rows(ranges), torch.cat([whole[:, :, a:b] for a, b in ranges], 2)), ranges
    cosmos = deferred.view(2, frames, 1, 1, -1).expand(-1, -1, height, width, -1).flatten(1, 3)  # Cosmos Predict2
    assert torch.equal(cosmos.rows([(5, 17)]), table[:, :, None, None].expand(-1, -1, 2, 3, -1).flatten(1, 3)[:, 5:17])

    with pytest.raises(TypeError, match="changes the entries per token"):
        deferred.repeat(1, 2, 1)  # the frames tiled: not one group per frame
    with pytest.raises(TypeError, match="regroups the token dim"):
        deferred.unflatten(-1, (6, -1)).flatten(0, 1)  # merges the batch into the tokens


def test_a_per_sample_table_expanded_and_materialised_by_the_model_stays_deferred():
    """Helios' forward expands its per-sample (B, 6 D) projection over the history tokens (from a zero timestep) and
    over the window's, concatenates the two (B, 6, S, D) and permutes them; ERNIE-Image chunks its (B, 6 D) table,
    expands each piece over the tokens, sequence-first, and makes it contiguous. From the BroadcastTable stand-in
    both stay deferred: any token range gets exactly the rows of the model's tables. Operations before the expansion
    run at once on the value; an expansion elsewhere or an operand the value meets gives a plain tensor."""
    batch, history, window = 2, 3, 5
    window_table, zero_table = torch.randn(batch, 6 * 4), torch.randn(1, 6 * 4)

    def helios(window_table, zero_table):  # HeliosTransformer3DModel.forward, zero_history_timestep
        zero = zero_table.unflatten(-1, (6, -1)).view(1, 6, 1, -1).expand(batch, -1, history, -1)
        rest = window_table.unflatten(-1, (6, -1)).view(batch, 6, 1, -1).expand(batch, 6, window, -1)
        return torch.cat([zero, rest], dim=2).permute(0, 2, 1, 3)

    whole = helios(window_table, zero_table)
    deferred = helios(DeferredSample("window", window_table, 2), DeferredSample("zero", zero_table, 2))
    assert isinstance(deferred, DeferredTokens) and deferred.tokens == history + window
    assert not deferred.uniform  # two tables: the history tokens' rows differ from the window's
    assert deferred.shape == whole.shape == (batch, history + window, 6, 4)
    for ranges in ([(0, 8)], [(1, 4)], [(5, 7)], [(0, 1), (6, 8)]):
        assert torch.equal(deferred.rows(ranges), torch.cat([whole[:, a:b] for a, b in ranges], 1)), ranges

    def ernie(table):  # ErnieImageTransformer2DModel.forward: six (S, B, D) tables
        return [t.unsqueeze(0).expand(7, -1, -1).contiguous() for t in table.chunk(6, dim=-1)]

    for mine, theirs in zip(ernie(DeferredSample("ernie", window_table, 0)), ernie(window_table)):
        assert isinstance(mine, DeferredTokens) and mine.shape == theirs.shape == (7, batch, 4) and mine.uniform
        assert torch.equal(mine.rows([(2, 6)]), theirs[2:6])

    sample = DeferredSample("sample", window_table, 1)
    assert isinstance(sample.view(batch, 1, -1), DeferredSample) and sample.shape == (batch, 24)
    target = torch.empty(batch, 5, 24)
    for expanded in (torch.broadcast_to(sample[:, None], target.shape), sample[:, None].expand_as(target)):
        assert isinstance(expanded, DeferredTokens) and expanded.tokens == expanded.shape[1]
        assert torch.equal(expanded.rows([(1, 3)]), window_table[:, None].expand(-1, 2, -1))
    expanded_elsewhere = sample.view(batch, 1, 1, -1).expand(-1, -1, 3, -1)  # not along token dim 1
    assert type(expanded_elsewhere) is torch.Tensor and expanded_elsewhere.shape == (batch, 1, 3, 24)
    shifted = sample + torch.ones(batch, 24)  # FLUX.3's flow-map embedding added: still one value per sample
    assert isinstance(shifted, DeferredSample) and torch.equal(shifted.value, window_table + 1)
    met = sample[:, None] + torch.ones(batch, 3, 24)  # grown over a real operand's tokens: computed, a plain tensor
    assert type(met) is torch.Tensor and torch.equal(met, window_table[:, None] + torch.ones(batch, 3, 24))
    assert not DeferredSample("zero", torch.zeros(1), 0)  # truth, as the value's (an object would always be true)
    args, kwargs = resolved((sample, [sample, 1]), {"temb": sample})  # what a block is handed: the values
    assert args[0] is args[1][0] is kwargs["temb"] is window_table and args[1][1] == 1


def test_a_plan_given_for_another_class_writes_nothing_in_place():
    """SD3's ControlNet runs SD3's blocks and returns every block's output as a residual: with SD3's plan given,
    writing a block's output over its input (the previous block's output) would change the returned residuals
    (measured: rel err 3.4e-2). A plan given for another class therefore writes out of place unless asked."""
    import diffusers

    torch.manual_seed(0)
    model = diffusers.SD3ControlNetModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=4,
        joint_attention_dim=24, caption_projection_dim=32, pooled_projection_dim=16, out_channels=4,
        pos_embed_max_size=16).eval()
    with torch.no_grad():
        for param in model.parameters():
            if not param.any():  # zero-initialised controlnet_blocks / pos_embed_input
                param.normal_(std=0.05)
    inputs = dict(hidden_states=torch.randn(2, 4, 10, 14), controlnet_cond=torch.randn(2, 4, 10, 14),
                  encoder_hidden_states=torch.randn(2, 9, 24), pooled_projections=torch.randn(2, 16),
                  timestep=torch.tensor([3.0, 500.0]), return_dict=False)

    def residuals() -> list[torch.Tensor]:
        with torch.no_grad():
            return list(model(**inputs)[0])

    reference = residuals()
    for inplace, exact in ((None, True), (True, False)):
        apply_sequence_chunking(model, 2, align=1, inplace=inplace, plan=SEQUENCE_PLANS["SD3Transformer2DModel"])
        errors = [rel_err(out, ref) for out, ref in zip(residuals(), reference)]
        remove_memory_optimizations(model)
        assert (max(errors) <= 1e-5) == exact, (inplace, errors)
