"""Sana's blocks in streamed sequence chunks: exact against the unmodified models, memory, refusals, composition."""

from __future__ import annotations

import logging

import pytest
import torch
from diffusers.hooks import HookRegistry, ModelHook

from memopt import (
    apply_chunked_attention,
    apply_chunked_feedforward,
    apply_sequence_chunking,
    remove_memory_optimizations,
    trace_memory,
)
from memopt.hooks._streamed_blocks import split_units

from _tiny_cases import OffloadLike, rel_err, sana  # noqa: E402

NAMES = ["sana", "sana_video"]


def forward(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs)[0]


def test_bands_are_whole_units_as_even_as_possible():
    assert split_units(9, 4) == [(0, 3), (3, 5), (5, 7), (7, 9)]
    assert split_units(3, 8) == [(0, 1), (1, 2), (2, 3)]  # never more bands than units


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("inplace", [None, False])
def test_streamed_blocks_match_the_unmodified_model(name, inplace):
    """Every band count from one band to one per unit (Sana: 9 image rows; Sana Video: 3 frames), batch 2, the
    convolution finished across band edges from the carried rows; the weights untouched."""
    model, inputs = sana(name)
    reference = forward(model, inputs)
    state = {key: value.clone() for key, value in model.state_dict().items()}
    for num_chunks in (1, 2, 3, 4, 9, 50):
        report = apply_sequence_chunking(model, num_chunks, inplace=inplace)
        assert report.blocks == ["transformer_blocks.0", "transformer_blocks.1"] and not report.skipped
        assert report.tail == "norm_out (token chunks)"
        assert rel_err(forward(model, inputs), reference) <= 1e-5, num_chunks
        assert remove_memory_optimizations(model) == 3  # the blocks and the output norm
    assert all(torch.equal(value, state[key]) for key, value in model.state_dict().items())
    assert torch.equal(forward(model, inputs), reference)


def test_per_token_timesteps_are_cut_with_the_bands():
    """Sana Video takes a timestep per token (its modulation table then has a row per token)."""
    model, inputs = sana("sana_video")
    inputs["timestep"] = torch.rand(2, 3 * 5 * 3, generator=torch.Generator().manual_seed(2)) * 1000
    reference = forward(model, inputs)
    apply_sequence_chunking(model, 2)
    assert rel_err(forward(model, inputs), reference) <= 1e-5


@pytest.mark.parametrize("name", NAMES)
def test_activation_growth_drops_to_a_few_ld(name):
    """Unmodified: the convolutional FeedForward's 2.5 D-wide intermediates, 14 LD per token and more. Streamed in
    8 bands, the output norm in 8 token chunks: the block's input and output, one band and the carried rows."""
    torch.manual_seed(0)
    model, _ = sana(name, batch_size=1)
    width = 32

    def growth() -> float:
        peaks, tokens = [], []
        for side in (16, 24):
            latents = torch.randn(1, 4, side, side + 1) if name == "sana" else torch.randn(1, 4, 9, side, side + 2)
            inputs = dict(hidden_states=latents, encoder_hidden_states=torch.randn(1, 7, 16),
                          timestep=torch.tensor([3]))
            with torch.no_grad():
                peaks.append(trace_memory(model, **inputs).peak_bytes)
            tokens.append(latents[0, 0].numel() // (1 if name == "sana" else 4))
        return (peaks[1] - peaks[0]) / ((tokens[1] - tokens[0]) * width * 4)

    unmodified = growth()
    apply_sequence_chunking(model, 8)
    streamed = growth()
    remove_memory_optimizations(model)
    assert unmodified >= 14.0 and streamed <= 4.5, (unmodified, streamed)


def test_autograd_without_training_runs_unchunked_with_a_warning(caplog):
    model, inputs = sana("sana")
    latents = inputs["hidden_states"].requires_grad_(True)
    reference = model(**inputs)[0]
    grad_ref = torch.autograd.grad(reference.square().sum(), latents)[0]
    apply_sequence_chunking(model, 4)
    with caplog.at_level(logging.WARNING, logger="memopt.hooks._streamed_blocks"):
        out = model(**inputs)[0]
    grad = torch.autograd.grad(out.square().sum(), latents)[0]
    assert "autograd is recording, running unchunked (apply_sequence_chunking(training=True)" in caplog.text
    assert rel_err(out, reference) <= 1e-5 and rel_err(grad, grad_ref) <= 1e-5
    remove_memory_optimizations(model)
    with pytest.raises(ValueError, match="SanaTransformer2DModel's blocks are streamed .* schedule='lockstep'"):
        apply_sequence_chunking(model, 4, schedule="lockstep")


def training_step(model: torch.nn.Module, inputs: dict) -> dict:
    """Output, latent gradient and every parameter gradient of ``(out * fixed random weights).sum()``."""
    model.zero_grad(set_to_none=True)
    latents = inputs["hidden_states"].detach().clone().requires_grad_(True)
    out = model(**{**inputs, "hidden_states": latents})[0]
    (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(1))).sum().backward()
    return dict(out=out.detach(), latents=latents.grad,
                params={name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None})


def assert_same_step(result: dict, reference: dict) -> None:
    assert rel_err(result["out"], reference["out"]) <= 1e-5
    assert rel_err(result["latents"], reference["latents"]) <= 1e-5
    assert result["params"].keys() == reference["params"].keys()
    names = list(reference["params"])
    assert rel_err(torch.cat([result["params"][n].flatten() for n in names]),
                   torch.cat([reference["params"][n].flatten() for n in names])) <= 1e-5


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("num_chunks, saved_inputs", [(2, "device"), (3, "host"), (9, "device")])
def test_training_gradients_match_the_unmodified_model(name, num_chunks, saved_inputs):
    """training=True: the blocks stream without autograd and recompute in bands in the backward (one unit of either
    neighbour per band for the convolution; the key sums made leaves); output, latent gradient and every parameter
    gradient as unmodified, at band counts up to one per unit (Sana 9 rows, Sana Video 3 frames), batch 2."""
    model, inputs = sana(name)
    model.train()
    reference = training_step(model, inputs)
    report = apply_sequence_chunking(model, num_chunks, training=True, saved_inputs=saved_inputs)
    assert report.blocks == ["transformer_blocks.0", "transformer_blocks.1"]
    assert_same_step(training_step(model, inputs), reference)
    remove_memory_optimizations(model)
    assert_same_step(training_step(model, inputs), reference)


def test_training_lora_adapters_and_refusals():
    from peft import LoraConfig

    model, inputs = sana("sana")
    model.add_adapter(LoraConfig(r=4, init_lora_weights=False, target_modules=["to_q", "to_k", "to_v", "conv_point"]))
    model.train()
    reference = training_step(model, inputs)
    assert reference["params"] and all("lora_" in name for name in reference["params"])
    apply_sequence_chunking(model, 3, training=True)
    assert_same_step(training_step(model, inputs), reference)
    latents = inputs["hidden_states"].clone().requires_grad_(True)
    out = model(**{**inputs, "hidden_states": latents})[0]
    with pytest.raises(RuntimeError, match="transformer_blocks.1: sequence chunking with training=True .* not "
                                           "torch.autograd.grad"):
        torch.autograd.grad(out.sum(), latents)
    model.transformer_blocks[0].attn1.to_out[1].p = 0.1
    with pytest.raises(NotImplementedError, match=r"transformer_blocks.0.attn1.to_out.1: dropout p=0.1"):
        model(**inputs)


# Activation growth of a training step (memopt.trace.activation_growth(..., backward=True)), LD per token:
# unmodified, diffusers' gradient checkpointing (2 blocks: no lower), and memopt's bands at 16 chunks. Sana Video's
# bands are whole frames (its temporal convolution mixes them), 9 latent frames here, so a band is a ninth of the
# video. (Recomputing a neighbour unit on either side with the band, recorded, instead of the convolution input
# around it as values: Sana 6.98, Sana Video 19.95, where a band and its neighbours are a third of the video.)
STREAMED_TRAINING_GROWTH = {"sana": (47.60, 47.59, 8.98), "sana_video": (50.70, 49.68, 14.23)}


@pytest.mark.parametrize("name", NAMES)
def test_training_step_memory(name):
    from memopt.trace.growth import activation_growth

    unmodified, checkpointing, streamed = STREAMED_TRAINING_GROWTH[name]
    assert activation_growth(name, backward=True) == pytest.approx(unmodified, abs=0.01)
    assert activation_growth(name, lambda m: m.enable_gradient_checkpointing(), backward=True) == pytest.approx(
        checkpointing, abs=0.01)
    assert activation_growth(name, lambda m: apply_sequence_chunking(m, 16, training=True), backward=True
                             ) == pytest.approx(streamed, abs=0.01)


@pytest.mark.parametrize("name", NAMES)
def test_stacks_with_feedforward_and_attention_chunking_and_lora(name):
    """The streamed blocks call the blocks' own modules per band: a LoRA adapter on the projections and memopt's
    other hooks stay in effect (the chunked attention's cross-attention calls, the FeedForward's own hook is simply
    not called: the band computes its convolutions)."""
    from peft import LoraConfig

    model, inputs = sana(name)
    model.add_adapter(LoraConfig(r=4, init_lora_weights=False, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    reference = forward(model, inputs)
    apply_chunked_feedforward(model, num_chunks=3)
    apply_chunked_attention(model, query_chunk=7)
    apply_sequence_chunking(model, 3)
    assert rel_err(forward(model, inputs), reference) <= 1e-5
    assert remove_memory_optimizations(model) == 2 + 4 + 3  # FeedForwards, attention modules, blocks + norm


def test_a_block_without_linear_attention_is_skipped_with_the_reason():
    from diffusers.models.attention_processor import PAGIdentitySanaLinearAttnProcessor2_0

    model, inputs = sana("sana")
    model.transformer_blocks[1].attn1.set_processor(PAGIdentitySanaLinearAttnProcessor2_0())
    reference = forward(model, inputs)
    report = apply_sequence_chunking(model, 3)
    assert report.blocks == ["transformer_blocks.0"]
    assert report.skipped == [("transformer_blocks.1", "attn1 runs PAGIdentitySanaLinearAttnProcessor2_0, not Sana's "
                                                       "linear attention")]
    assert rel_err(forward(model, inputs), reference) <= 1e-5


@pytest.mark.parametrize("name", NAMES)
def test_hooks_registered_on_the_blocks_first_run_around_the_bands(name):
    """Block-level offloading applied before memopt sits inside its hook: the bands call the block's modules, not
    its forward, so the inner hook's pre_forward / post_forward run around the streamed run (else: NaN weights)."""
    model, inputs = sana(name)
    reference = forward(model, inputs)
    for block in model.transformer_blocks:
        HookRegistry.check_if_exists_or_initialize(block).register_hook(OffloadLike(), "offload_like")
    apply_sequence_chunking(model, 3)
    assert rel_err(forward(model, inputs), reference) <= 1e-5


def test_a_foreign_hook_on_the_linear_attention_keeps_the_block_whole(caplog):
    """A hook memopt does not know on attn1 (a diffusers cache, say) would be bypassed by the bands, which compute
    the linear attention from its projections: the block runs unchunked, with a warning naming it."""
    model, inputs = sana("sana")
    reference = forward(model, inputs)
    HookRegistry.check_if_exists_or_initialize(model.transformer_blocks[0].attn1).register_hook(ModelHook(), "cache")
    apply_sequence_chunking(model, 3)
    with caplog.at_level(logging.WARNING, logger="memopt.hooks._streamed_blocks"):
        assert rel_err(forward(model, inputs), reference) <= 1e-5
    assert "transformer_blocks.0: attn1 carries the hooks ['cache']" in caplog.text
    assert "transformer_blocks.1" not in caplog.text


def test_the_sana_controlnet_streams_out_of_place():
    """The ControlNet returns every block's output: its blocks stream out of place, and inplace=True is refused."""
    from test_other_families import build
    from test_other_families import forward as every_output

    model, inputs = build("SanaControlNetModel")  # zero-initialised output layers re-randomised
    reference = every_output(model, inputs)
    with pytest.raises(ValueError, match="SanaControlNetModel keeps its blocks' outputs"):
        apply_sequence_chunking(model, 3, inplace=True)
    report = apply_sequence_chunking(model, 3)
    assert len(report.blocks) == 2 and report.tail is None
    assert rel_err(every_output(model, inputs), reference) <= 1e-5


def test_sana_video_bands_run_their_convolutions_in_the_feedforward_hooks_shards():
    """With memopt's FeedForward hook on the blocks' GLUMBTempConv, a band's per-frame convolutions run in its channel
    shards (the temporal one still across bands): exact, and the band's 2.5 D-wide intermediates shrink."""
    model, inputs = sana("sana_video", batch_size=1)
    inputs["hidden_states"] = torch.randn(1, 4, 9, 32, 34, generator=torch.Generator().manual_seed(3))
    reference = forward(model, inputs)
    apply_sequence_chunking(model, 2)
    with torch.no_grad():
        streamed = trace_memory(model, **inputs)
    apply_chunked_feedforward(model, num_chunks=4)  # under the block hooks: the bands call it through its hook
    with torch.no_grad():
        sharded = trace_memory(model, **inputs)
    assert rel_err(streamed.result[0], reference) <= 1e-5 and rel_err(sharded.result[0], reference) <= 1e-5
    assert sharded.peak_bytes < 0.8 * streamed.peak_bytes, (sharded.peak_bytes, streamed.peak_bytes)


def test_the_training_planner_streams_sana():
    """3/4 of the unmodified step's activations: the planner's simulated training steps find the bands."""
    import memopt
    from memopt.trace.simulate import training_step as step_only

    model, inputs = sana("sana")
    model.train()
    reference = training_step(model, inputs)
    unmodified = trace_memory(step_only, model, inputs)
    plan = memopt.apply_memory_optimizations(model, budget=unmodified.baseline_bytes + unmodified.peak_bytes * 3 // 4,
                                             training=True)
    assert_same_step(training_step(model, inputs), reference)  # planned at this first call
    chunking = plan.components[""].denoiser.chunking
    assert chunking.sequence_chunks and chunking.training and not chunking.checkpointing
