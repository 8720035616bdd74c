"""Expert-choice MoE layers (Nucleus-Image): streamed experts (exactness, memory, training, plans, errors) and the
router scores exchanged between sequence chunks."""

from __future__ import annotations

import math

import pathlib
import sys

import diffusers
import pytest
import torch
from diffusers.hooks import HookRegistry
from diffusers.models.transformers.transformer_nucleusmoe_image import NucleusMoELayer

from memopt import apply_chunked_feedforward, apply_sequence_chunking, remove_memory_optimizations, trace_memory
from memopt.hooks._sequence_chunks import RUNNING
from memopt.hooks.feedforward import FEEDFORWARD_HOOK

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from _tiny_cases import OffloadLike  # noqa: E402


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def init_experts(model: torch.nn.Module) -> None:
    """The packed expert weights are ``torch.empty`` in the constructor."""
    with torch.no_grad():
        for module in model.modules():
            if type(module).__name__ == "SwiGLUExperts":
                module.gate_up_proj.normal_(std=module.hidden_size ** -0.5)
                module.down_proj.normal_(std=module.moe_intermediate_dim ** -0.5)


def layer(dim: int = 32, width: int = 16, experts: int = 8, capacity_factor: float = 4.0,
          use_sigmoid: bool = False) -> NucleusMoELayer:
    torch.manual_seed(0)
    moe = NucleusMoELayer(hidden_size=dim, moe_intermediate_dim=width, num_experts=experts,
                          capacity_factor=capacity_factor, use_sigmoid=use_sigmoid, route_scale=2.5)
    init_experts(moe)
    return moe


def layer_inputs(batch: int = 2, length: int = 37, dim: int = 32) -> tuple[tuple[torch.Tensor, ...], dict]:
    generator = torch.Generator().manual_seed(1)
    hidden, unmodulated = (torch.randn(batch, length, dim, generator=generator) for _ in range(2))
    return (hidden, unmodulated), {"timestep": torch.randn(batch, dim, generator=generator)}


def offload(model: torch.nn.Module, offload_type: str) -> None:
    """diffusers' group offloading on the CPU (``"block_level"``, ``"leaf_level"``), or ``"offload_like"``: the
    stand-in that leaves the packed expert weights NaN outside its ``pre_forward`` / ``post_forward`` on each experts
    module, so that a run bypassing those hooks shows."""
    if offload_type == "offload_like":
        for module in model.modules():
            if type(module).__name__ == "SwiGLUExperts":
                HookRegistry.check_if_exists_or_initialize(module).register_hook(OffloadLike(), "offload_like")
        return
    options = {"num_blocks_per_group": 1} if offload_type == "block_level" else {}
    cpu = torch.device("cpu")
    model.enable_group_offload(onload_device=cpu, offload_device=cpu, offload_type=offload_type, **options)


def nucleus(use_sigmoid: bool = False) -> tuple[torch.nn.Module, dict]:
    """One dense block, then MoE blocks of 6 experts with capacity factors 2 and 3.5 (capacities 12 and 21 of 35
    tokens); batch 2 with the second prompt padded after 5 of its 9 tokens."""
    torch.manual_seed(0)
    model = diffusers.NucleusMoEImageTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, num_key_value_heads=1, in_channels=16, out_channels=4,
        num_layers=3, joint_attention_dim=24, axes_dims_rope=(4, 6, 6), mlp_ratio=6.0,
        dense_moe_strategy="leave_first_block_dense", num_experts=6, moe_intermediate_dim=16,
        capacity_factors=[0.0, 2.0, 3.5], use_sigmoid=use_sigmoid).eval()
    init_experts(model)
    height, width = 5, 7
    mask = torch.ones(2, 9)
    mask[1, 5:] = 0
    return model, dict(hidden_states=torch.randn(2, height * width, 16), encoder_hidden_states=torch.randn(2, 9, 24),
                       encoder_hidden_states_mask=mask, timestep=torch.tensor([0.3, 0.8]),
                       img_shapes=[(1, height, width)] * 2)


@pytest.mark.parametrize("use_sigmoid", [False, True])
@pytest.mark.parametrize("num_chunks", [1, 4, 6])
def test_model_output_matches_the_unmodified_model(num_chunks, use_sigmoid):
    model, inputs = nucleus(use_sigmoid)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        reference = model(**inputs)[0]
        report = apply_chunked_feedforward(model, num_chunks=num_chunks)
        assert [path for path in report.applied if path.endswith("img_mlp")] == [
            "transformer_blocks.0.img_mlp", "transformer_blocks.1.img_mlp", "transformer_blocks.2.img_mlp"]
        assert rel_err(model(**inputs)[0], reference) <= 1e-5
        remove_memory_optimizations(model)
        assert torch.equal(model(**inputs)[0], reference)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_bf16_with_an_fp32_accumulator_is_bit_identical():
    """The layer's one ``scatter_add`` of every expert's rows rounds each token's sum to bf16 once; adding group by
    group into an fp32 accumulator and rounding at the end gives the same bits (without it: one rounding per group,
    about bf16's epsilon)."""
    model, inputs = nucleus()
    model.to(torch.bfloat16)
    inputs = {k: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v
              for k, v in inputs.items()}
    with torch.no_grad():
        reference = model(**inputs)[0]
        apply_chunked_feedforward(model, num_chunks=4, plan={"transformer_blocks.*.img_mlp": "experts"},
                                  accumulate_dtype=torch.float32)
        assert torch.equal(model(**inputs)[0], reference)


@pytest.mark.parametrize("num_chunks", [1, 2, 4, 8])
def test_layer_peak_is_the_output_the_routing_and_one_group(num_chunks):
    """Derived, not measured: the output rows ``B S x D``, the routing (``E x R`` int64 rows and fp32 weights) and one
    group of ``g = E / num_chunks`` experts at its first matmul (its gathered rows ``g R x D`` and their ``g R x 2F``
    projection); unmodified, the layer holds every expert's rows several times over."""
    batch, length, dim, width, experts, capacity_factor = 2, 37, 32, 16, 8, 4.0
    moe = layer(dim, width, experts, capacity_factor)
    args, kwargs = layer_inputs(batch, length, dim)
    rows = batch * math.ceil(capacity_factor * length / experts)  # R: each expert's rows over the batch
    group = experts // num_chunks
    with torch.no_grad():
        reference = moe(*args, **kwargs)
        unmodified = trace_memory(moe, *args, **kwargs).peak_bytes
        apply_chunked_feedforward(moe, num_chunks=num_chunks)
        trace = trace_memory(moe, *args, **kwargs)
    assert rel_err(trace.result, reference) <= 1e-5
    output, routing = 4 * batch * length * dim, experts * rows * (8 + 4)
    assert trace.peak_bytes == output + routing + 4 * group * rows * (dim + 2 * width)
    assert unmodified > 2 * trace.peak_bytes  # 193,080 B (20.4 LD) here; 22,848 B (2.4 LD) in 8 groups


@pytest.mark.parametrize("recompute", [False, True])
def test_gradients_match(recompute):
    moe = layer()
    args, kwargs = layer_inputs()
    args = tuple(a.requires_grad_() for a in args)

    def grads() -> list[torch.Tensor]:
        moe.zero_grad(set_to_none=True)
        for a in args:
            a.grad = None
        (moe(*args, **kwargs) ** 2).sum().backward()
        return [*(a.grad for a in args), *(p.grad for p in moe.parameters())]

    reference = grads()
    apply_chunked_feedforward(moe, num_chunks=3, recompute=recompute)
    for got, want in zip(grads(), reference, strict=True):
        assert rel_err(got, want) <= 1e-5


def test_more_chunks_than_experts_is_an_error_naming_the_layer():
    model, _ = nucleus()
    with pytest.raises(ValueError, match=r"transformer_blocks.1.img_mlp: num_chunks=7 is larger than the layer's 6 "
                                         r"experts"):
        apply_chunked_feedforward(model, num_chunks=7)
    assert not any(getattr(m, "_diffusers_hook", None) and m._diffusers_hook.get_hook(FEEDFORWARD_HOOK)
                   for m in model.modules())


def test_a_plan_given_streams_the_layers_it_lists_as_experts():
    model, inputs = nucleus()
    with torch.no_grad():
        reference = model(**inputs)[0]
    report = apply_chunked_feedforward(model, num_chunks=2, plan={"transformer_blocks.2.img_mlp": "experts"})
    assert report.applied == ["transformer_blocks.2.img_mlp"]
    assert report.skipped["transformer_blocks.1.img_mlp"] == (
        "not in the plan (the plan passed has no 'transformer_blocks.1.img_mlp': 'experts' entry)")
    with torch.no_grad():
        assert rel_err(model(**inputs)[0], reference) <= 1e-5


def test_inside_sequence_chunks_is_refused():
    """Each chunk would route among its own tokens: a different function, so an error, never a result."""
    moe = layer()
    args, kwargs = layer_inputs()
    apply_chunked_feedforward(moe, num_chunks=2)
    RUNNING.block_run = object()
    try:
        with pytest.raises(ValueError, match="choose their tokens over the whole sequence"):
            moe(*args, **kwargs)
    finally:
        RUNNING.block_run = None


@pytest.mark.parametrize("offload_type", ["leaf_level", "offload_like"])
def test_hooks_on_the_experts_are_honoured(offload_type):
    """Leaf-level group offloading puts the packed expert weights (not in a Linear) in a group of their own, onloaded
    by a hook on the experts module, whose forward the streamed run bypasses; on the CPU the stand-in, which leaves
    them NaN outside its pre_forward / post_forward, is what shows that the hooks run."""
    model, inputs = nucleus()
    with torch.no_grad():
        reference = model(**inputs)[0]
    offload(model, offload_type)
    report = apply_chunked_feedforward(model, num_chunks=3)
    assert "transformer_blocks.1.img_mlp" in report.applied
    with torch.no_grad():
        assert rel_err(model(**inputs)[0], reference) <= 1e-5


# ------------------------------------------------------------------------------------------ in sequence chunks
def wider_nucleus() -> torch.nn.Module:
    """Width 128 (8 heads x 16, 2 K/V heads), a dense block and MoE blocks of 16 experts with capacity factors 4
    and 2."""
    torch.manual_seed(0)
    model = diffusers.NucleusMoEImageTransformer2DModel(
        num_attention_heads=8, attention_head_dim=16, num_key_value_heads=2, in_channels=16, out_channels=4,
        num_layers=3, joint_attention_dim=24, axes_dims_rope=(4, 6, 6), dense_moe_strategy="leave_first_block_dense",
        num_experts=16, moe_intermediate_dim=96, capacity_factors=[0.0, 4.0, 2.0]).eval()
    init_experts(model)
    return model


def grid_inputs(height: int, width: int, batch: int = 1) -> dict:
    generator = torch.Generator().manual_seed(0)
    return dict(hidden_states=torch.randn(batch, height * width, 16, generator=generator),
                encoder_hidden_states=torch.randn(batch, 16, 24, generator=generator),
                timestep=torch.full((batch,), 0.5), img_shapes=[(1, height, width)] * batch)


@pytest.mark.parametrize("use_sigmoid, grouped_mm", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("num_chunks", [2, 7, 16])
def test_sequence_chunks_exchange_the_router_scores(num_chunks, use_sigmoid, grouped_mm):
    """99 image tokens, batch 2, a padded prompt: each chunk's tokens go through the experts that chose them among
    all tokens; alone, with the experts also streamed (FeedForward hooks first, the planner's order). With
    ``use_grouped_mm`` the model and each chunk's uneven rows per expert run ``F.grouped_mm``."""
    model, inputs = nucleus(use_sigmoid)
    for module in model.modules():
        if type(module).__name__ == "SwiGLUExperts":
            module.use_grouped_mm = grouped_mm
    inputs.update(hidden_states=torch.randn(2, 9 * 11, 16), img_shapes=[(1, 9, 11)] * 2)
    with torch.no_grad():
        reference = model(**inputs)[0]
        report = apply_sequence_chunking(model, num_chunks)
        assert report.routed == ["transformer_blocks.1.img_mlp", "transformer_blocks.2.img_mlp"]
        assert rel_err(model(**inputs)[0], reference) <= 1e-5
        remove_memory_optimizations(model)
        apply_chunked_feedforward(model, num_chunks=3)
        apply_sequence_chunking(model, num_chunks)
        assert rel_err(model(**inputs)[0], reference) <= 1e-5


def test_sequence_chunked_growth_per_token_nears_the_floor():
    """Activation growth between 288 and 576 image tokens (fp32, LD = tokens x 128 x 4 B): the unmodified model's
    MoE layers hold about 26 LD per token, streamed experts 10, sequence chunks 3.6 (floor: 3)."""
    model = wider_nucleus()
    sizes = [(16, 18), (24, 24)]

    def growth(prepare) -> float:
        peaks = []
        for height, width in sizes:
            with torch.no_grad():
                if prepare is not None:
                    prepare(model)
                peaks.append(trace_memory(model, **grid_inputs(height, width)).peak_bytes)
                remove_memory_optimizations(model)
        return (peaks[1] - peaks[0]) / ((24 * 24 - 16 * 18) * 128 * 4)

    unmodified = growth(None)
    streamed = growth(lambda m: apply_chunked_feedforward(m, num_chunks=16))
    chunked = growth(lambda m: apply_sequence_chunking(m, 32))
    assert unmodified > 20 and 8 < streamed < 12 and chunked < 3.8, (unmodified, streamed, chunked)


def test_a_plan_that_does_not_name_the_moe_layers_is_refused():
    """Without the routing exchange each chunk would route among its own tokens: a wrong result, so an error."""
    import dataclasses

    from memopt.plans.sequence import SEQUENCE_PLANS

    model, _ = nucleus()
    plan = SEQUENCE_PLANS["NucleusMoEImageTransformer2DModel"]
    blocks = {pattern: dataclasses.replace(block, routed=()) for pattern, block in plan.blocks.items()}
    with pytest.raises(ValueError, match=r"transformer_blocks.1: its expert-choice MoE layers \['img_mlp'\] choose "
                                         "their tokens among the whole sequence"):
        apply_sequence_chunking(model, 4, plan=dataclasses.replace(plan, blocks=blocks))


def test_routing_exchange_refuses_lockstep_and_training():
    model, _ = nucleus()
    for options in ({"schedule": "lockstep"}, {"training": True}):
        with pytest.raises(ValueError, match=r"transformer_blocks.1: its expert-choice MoE layers \['img_mlp'\] route "
                                             "over the whole sequence"):
            apply_sequence_chunking(model, 4, **options)
        assert not any(getattr(m, "_diffusers_hook", None) is not None and m._diffusers_hook._hook_order
                       for m in model.modules())


def test_planner_simulation_bounds_the_chunked_peak():
    """The simulation cannot know the routing (fake weights): its first expert takes the most rows any routing gives
    it in the first chunk, so the predicted peak bounds the real one, closely."""
    from memopt.planner import Chunking, simulate_chunking

    model, inputs = nucleus()
    inputs.update(hidden_states=torch.randn(2, 24 * 24, 16), img_shapes=[(1, 24, 24)] * 2)
    estimate = simulate_chunking(model, (), inputs, Chunking(sequence_chunks=4, feedforward_chunks=4))
    apply_chunked_feedforward(model, num_chunks=4)
    apply_sequence_chunking(model, 4)
    with torch.no_grad():
        real = trace_memory(model, **inputs).peak_bytes
    assert real <= estimate.activation.bytes <= 1.05 * real


@pytest.mark.parametrize("offload_type", ["block_level", "leaf_level", "offload_like"])
def test_sequence_chunks_under_group_offloading(offload_type):
    """diffusers' group offloading applied first (the planner's order), and a stand-in that leaves the packed expert
    weights NaN outside its pre_forward / post_forward: the routing hook runs the hooks of the experts module, whose
    forward it bypasses, around each chunk's experts."""
    model, inputs = nucleus()
    with torch.no_grad():
        reference = model(**inputs)[0]
    offload(model, offload_type)
    apply_chunked_feedforward(model, num_chunks=3)
    assert len(apply_sequence_chunking(model, 4).routed) == 2
    with torch.no_grad():
        assert rel_err(model(**inputs)[0], reference) <= 1e-5
