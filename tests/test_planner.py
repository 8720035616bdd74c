"""The planner: budgets in any unit, predictions that match the tracer on real tensors, depth-reduced simulations that
match full-depth ones, the offloading memory model, and errors that say what dominates. CPU only."""

from __future__ import annotations

import pathlib
import sys
from typing import Any

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from memopt import trace_memory
from memopt.hooks._common import remove_memopt_hooks
from memopt.hooks.offload import OffloadConfig, offload_groups
from memopt.models import FAMILIES, Size, cast_floating_, get_family
from memopt.planner import (
    REPEATED_LAYERS,
    SIMULATED_BLOCKS,
    BudgetError,
    Chunking,
    UnplannableError,
    candidate_series,
    format_bytes,
    parse_budget,
    phase_weights,
    plan_denoiser,
    repeated_lists,
    simulate_chunking,
)
from memopt.trace.stand_ins import worst_case_values

sys.path.insert(0, str(pathlib.Path(__file__).parent / "hooks"))
from _tiny_cases import SIZES as TINY_SIZES, rel_err, sana  # noqa: E402

GIB = 1024**3


@pytest.mark.parametrize("text, expected", [
    (8 * GIB, 8 * GIB), ("8GiB", 8 * GIB), ("8 GiB", 8 * GIB), ("8gib", 8 * GIB), ("8G", 8 * GIB),
    ("8GB", 8 * 10**9), ("1.5 MiB", 1572864), ("512MB", 512 * 10**6), ("4096", 4096), (1e9, 10**9),
])
def test_parse_budget(text, expected) -> None:
    assert parse_budget(text) == expected


@pytest.mark.parametrize("bad", ["8 gigs", "GiB", "-1GiB", "0", "", "8 GiB 2", float("nan")])
def test_parse_budget_rejects(bad) -> None:
    with pytest.raises(ValueError, match="budget"):
        parse_budget(bad)


def test_parse_budget_type() -> None:
    with pytest.raises(TypeError):
        parse_budget([8])  # type: ignore[arg-type]


def test_format_bytes() -> None:
    assert format_bytes(512) == "512 B"
    assert format_bytes(1536) == "1.5 KiB"
    assert format_bytes(4.5 * GIB) == "4.5 GiB"
    assert format_bytes(300 * GIB) == "300 GiB"


# Two sizes per family (the tiny configs' token counts), planned to a budget that needs chunking.
SIZES = {
    "wan": [Size(48, 80, 5), Size(96, 160, 9)],
    "flux": [Size(96, 80), Size(160, 128)],
    "hunyuanvideo": [Size(48, 80, 5), Size(80, 96, 9)],
}


@pytest.mark.parametrize("family, size", [(f, s) for f, sizes in SIZES.items() for s in sizes],
                         ids=lambda v: v if isinstance(v, str) else f"{v.height}x{v.width}x{v.num_frames}")
def test_predicted_peak_matches_the_tracer_on_real_tensors(family: str, size: Size) -> None:
    spec = get_family(family)
    model = spec.build("tiny")
    inputs = spec.make_inputs(model.config, batch_size=2, height=size.height, width=size.width,
                              num_frames=size.num_frames)
    with torch.no_grad():
        unmodified = trace_memory(model, **inputs)
    budget = unmodified.baseline_bytes + int(0.85 * unmodified.peak_bytes)
    plan = plan_denoiser(model, (), inputs, budget=budget, device="cpu")
    assert not plan.chunking.is_empty and plan.predicted_peak_bytes <= budget
    plan.apply(model)
    with torch.no_grad():
        measured = trace_memory(model, **inputs)
    assert abs(plan.predicted_peak_bytes - measured.total_peak_bytes) <= 0.05 * measured.total_peak_bytes
    assert abs(plan.activation.bytes - measured.peak_bytes) <= 0.05 * measured.peak_bytes
    assert torch.allclose(measured.result[0], unmodified.result[0], rtol=0, atol=1e-4)
    remove_memopt_hooks(model)


def _deepened(class_name: str, depth: int) -> tuple[Any, dict[str, Any]]:
    """The first zoo family of ``class_name`` and its tiny config with ``depth`` blocks in every repeated list."""
    family = next(spec for spec in FAMILIES.values() if spec.class_name == class_name)
    return family, {**family.config("tiny"), **{key: depth for key in REPEATED_LAYERS[class_name]}}


@pytest.mark.parametrize("class_name", sorted(REPEATED_LAYERS))
def test_reduced_copies_simulate_the_full_depth(class_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every class the planner simulates with SIMULATED_BLOCKS blocks per list, at two blocks more per list, against
    the planner's own simulation of the whole depth (the class taken out of REPEATED_LAYERS): the same activation peak
    to the byte, unchunked and chunked, and for a training step (extrapolated from the reduced copy and one a block
    deeper) within 0.02% (Mochi: 128 bytes); FLOPs and op counts, scaled from the middle block, within 1%."""
    spec, config = _deepened(class_name, SIMULATED_BLOCKS + 2)
    model = spec.build(config)
    assert all(len(model.get_submodule(path)) == SIMULATED_BLOCKS + 2 for _, path in repeated_lists(class_name))
    size = spec.size("tiny")
    inputs = spec.make_inputs(model.config, batch_size=1, height=size.height, width=size.width,
                              num_frames=size.num_frames)
    chunkings = (Chunking(), Chunking(sequence_chunks=4, feedforward_chunks=2), Chunking(training=True))
    reduced = [simulate_chunking(model, (), inputs, chunking) for chunking in chunkings]
    monkeypatch.delitem(REPEATED_LAYERS, class_name)
    for chunking, estimate in zip(chunkings, reduced):
        full = simulate_chunking(model, (), inputs, chunking)
        assert estimate.error is None and full.error is None, estimate.error or full.error
        tolerance = 2e-4 * full.activation.bytes if chunking.training else 0
        assert abs(estimate.activation.bytes - full.activation.bytes) <= tolerance, chunking.describe()
        assert abs(estimate.flops - full.flops) <= 0.01 * full.flops, chunking.describe()
        assert abs(estimate.num_ops - full.num_ops) <= 0.01 * full.num_ops, chunking.describe()


@pytest.mark.parametrize("family, reference", [("wan", 8_609_224_000), ("flux", 486_067_204)])
def test_full_size_reduced_simulation_matches_the_full_depth_reference(family: str, reference: int) -> None:
    """The references are full-depth traces (tests/trace/test_simulate.py); the planner simulates one block per list."""
    spec = get_family(family)
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = cast_floating_(spec.build("full"), torch.bfloat16)
        inputs = spec.make_inputs(model.config, dtype=torch.bfloat16)
    assert simulate_chunking(model, (), inputs, Chunking()).activation.bytes == reference


def test_phase_weights_follow_block_level_offloading() -> None:
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = cast_floating_(get_family("flux").build("full"), torch.bfloat16)
    groups = offload_groups(model)
    phases = ["before", "transformer_blocks", "single_transformer_blocks", "after"]
    dual, single, top = groups.groups[0][1], groups.groups[-1][1], groups.top_level_bytes
    streamed = phase_weights(groups, OffloadConfig("cuda", use_stream=True), phases)
    assert streamed == {"before": top + dual, "transformer_blocks": top + 2 * dual,
                        "single_transformer_blocks": top + 2 * single, "after": top}
    assert phase_weights(groups, OffloadConfig("cuda"), phases)["transformer_blocks"] == top + dual
    assert set(phase_weights(groups, None, phases).values()) == {groups.total_bytes}
    assert max(streamed.values()) <= groups.resident_bytes(use_stream=True)  # the phase-blind bound


def test_offloaded_plans_keep_the_output_head_whole() -> None:
    spec = get_family("wan")
    model = spec.build({**spec.config("tiny"), "num_layers": 8})  # deep enough that offloading saves weights
    inputs = spec.make_inputs(model.config, batch_size=1, height=96, width=160, num_frames=9)
    groups = offload_groups(model)
    with torch.no_grad():
        unmodified = trace_memory(model, **inputs)
    # Less than the weights; 60% of the unmodified activations leaves 8 chunks room for their per-chunk state (a
    # few 512-byte allocator blocks each, large next to this tiny model's activations).
    budget = groups.resident_bytes(True) + unmodified.peak_bytes * 6 // 10
    assert budget < groups.total_bytes
    series = [[Chunking(sequence_chunks=n) for n in (2, 4, 8, 16)]]
    plan = plan_denoiser(model, (), inputs, budget=budget, device="cuda", series=series,
                         offload=OffloadConfig("cuda", use_stream=True), runtime_overhead_bytes=0)
    assert plan.offload is not None and not plan.move_to_device
    assert plan.chunking.sequence_chunks and not plan.chunking.chunk_tail
    assert plan.predicted_peak_bytes <= budget
    assert all(not option.chunking.chunk_tail for option in plan.considered)
    assert "prefetched on a CUDA stream" in str(plan)


def test_resident_when_it_fits() -> None:
    spec = get_family("wan")
    model = spec.build("tiny")
    inputs = spec.make_inputs(model.config, batch_size=1)
    series = [[Chunking()], [Chunking(sequence_chunks=2)]]
    plan = plan_denoiser(model, (), inputs, budget="1GiB", device="cuda", series=series,
                         offload=OffloadConfig("cuda", use_stream=True))
    assert plan.offload is None and plan.move_to_device and plan.chunking.is_empty
    assert plan.predicted_slowdown == pytest.approx(1.0)
    # ... unless another component's forward needs the room meanwhile.
    plan = plan_denoiser(model, (), inputs, budget="1GiB", device="cuda", idle_reserve_bytes=GIB, series=series,
                         offload=OffloadConfig("cuda", use_stream=True))
    assert plan.offload is not None


def test_nothing_fits_says_the_smallest_peak_and_what_dominates(monkeypatch) -> None:
    """A series whose savings (halving per doubling) cannot reach the budget stops early and says where it levels."""
    from memopt import planner

    simulated = []
    simulate = planner.simulate_chunking
    monkeypatch.setattr(planner, "simulate_chunking",
                        lambda model, args, kwargs, chunking, **kw: simulated.append(chunking.sequence_chunks)
                        or simulate(model, args, kwargs, chunking, **kw))
    spec = get_family("wan")
    model = spec.build("tiny")
    inputs = spec.make_inputs(model.config, batch_size=1)
    with torch.no_grad():
        unmodified = trace_memory(model, **inputs)
    with pytest.raises(BudgetError) as error:
        plan_denoiser(model, (), inputs, budget=unmodified.baseline_bytes + 64, device="cpu",
                      series=[[Chunking()], [Chunking(sequence_chunks=n) for n in (2, 4, 8, 16)]])
    message = str(error.value)
    assert "nothing fits the budget" in message and "smallest peak memopt simulated" in message
    assert "dominated by weights on the device (the whole model)" in message
    assert simulated == [0, 2, 4]
    assert "More chunks would lower it to about " in message


@pytest.mark.parametrize("family", ["sd3", "flux", "cogvideox"])
def test_fused_projections_are_simulated_fused(family: str) -> None:
    """``fuse_qkv_projections()`` builds ``to_qkv`` (and ``to_added_qkv``) after construction and switches to fused
    processors; the planner's copy, built from the config, is fused too (before, those processors found no ``to_qkv``
    on it: an AttributeError at the first forward). The plan fits the traced peak and is exact."""
    spec = get_family(family)
    model = spec.build("tiny")
    inputs = spec.make_inputs(model.config, batch_size=2)
    model.fuse_qkv_projections()
    with torch.no_grad():
        reference = model(**inputs)[0]
        unmodified = trace_memory(model, **inputs)
    budget = unmodified.baseline_bytes + int(0.85 * unmodified.peak_bytes)
    plan = plan_denoiser(model, (), inputs, budget=budget, device="cpu")
    assert not plan.chunking.is_empty
    plan.apply(model)
    with torch.no_grad():
        out = model(**inputs)[0]
        traced = trace_memory(model, **inputs)
    remove_memopt_hooks(model)
    assert traced.baseline_bytes + traced.peak_bytes <= budget
    assert ((out - reference).norm() / reference.norm()).item() <= 1e-5


def test_a_flex_attention_backend_is_refused_by_name(monkeypatch) -> None:
    """``set_attention_backend("flex")`` runs a higher-order operator the tracer cannot simulate; under sequence chunks
    its failure came back wrapped in the chunked block's RuntimeError, which the planner raised as a fault. Now the
    planner refuses the model, naming the operator."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    # set_attention_backend also sets diffusers' process-wide active backend: restored after the test
    monkeypatch.setattr(_AttentionBackendRegistry, "_active_backend", _AttentionBackendRegistry._active_backend)
    spec = get_family("wan")
    model = spec.build("tiny")
    inputs = spec.make_inputs(model.config, batch_size=1)
    model.set_attention_backend("flex")
    with pytest.raises(UnplannableError, match="calls the higher-order operator flex_attention .*attention backend"):
        plan_denoiser(model, (), inputs, budget="1GiB", device="cpu")
    assert "flex_attention" in simulate_chunking(model, (), inputs, Chunking(sequence_chunks=2)).error


def test_a_budget_below_the_offloaded_weights_is_refused_without_simulating(monkeypatch) -> None:
    """Wan2.1-14B offloaded by blocks still needs two blocks and the top level on the device (1.79 GiB): a 1 GiB
    budget is refused by that floor, not by a "smallest reachable peak" of the one option simulated."""
    from memopt import planner

    monkeypatch.setattr(planner, "simulate_chunking", lambda *args, **kwargs: pytest.fail("simulated"))
    spec = get_family("wan")
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = cast_floating_(spec.build("full"), torch.bfloat16)
        inputs = spec.make_inputs(model.config, dtype=torch.bfloat16)
    with pytest.raises(BudgetError) as error:
        plan_denoiser(model, (), inputs, budget="1GiB", device="cuda", offload=OffloadConfig("cuda", use_stream=True))
    message = str(error.value)
    assert message.startswith("WanTransformer3DModel: the budget 1 GiB is below the floor of 1.87 GiB: ")
    assert "2 x blocks.0 (670 MiB) + top level (497 MiB)" in message
    assert "the CUDA runtime's workspaces 64 MiB" in message


def test_a_family_without_a_sequence_plan_is_planned_with_what_applies() -> None:
    """No sequence plan (Lumina-Next, as the other-families sweep builds it): the planner chunks the FeedForwards
    (exactly), and when even that does not fit, the error says sequence chunking is unavailable for the model and
    why."""
    from test_other_families import _lumina_next

    torch.manual_seed(0)
    model, inputs = _lumina_next()
    model.eval()
    with torch.no_grad():
        reference = model(**inputs)[0]
        unmodified = trace_memory(model, **inputs)
    budget = unmodified.baseline_bytes + unmodified.peak_bytes - 1
    plan = plan_denoiser(model, (), inputs, budget=budget, device="cpu")
    assert plan.chunking.feedforward_chunks and not plan.chunking.sequence_chunks
    plan.apply(model)
    with torch.no_grad():
        out = model(**inputs)[0]
    remove_memopt_hooks(model)
    assert ((out - reference).norm() / reference.norm()).item() <= 1e-5
    with pytest.raises(BudgetError, match="Not available for this model: .*no sequence plan for "
                                         "LuminaNextDiT2DModel"):
        plan_denoiser(model, (), inputs, budget=unmodified.baseline_bytes + 64, device="cpu")


def test_linear_attention_chunks_are_candidates_only_where_there_is_linear_attention() -> None:
    with_linear = candidate_series(100, linear_attention=True)
    assert with_linear[:-1] == candidate_series(100)
    assert with_linear[-1] == [Chunking(feedforward_chunks=4, attention_chunk=chunk) for chunk in (25, 13, 7)]


@pytest.mark.parametrize("name", ["sana", "sana_video"])
def test_sana_is_planned_with_what_reaches_the_budget(name: str) -> None:
    """Sana's blocks stream (sequence chunks), and its linear attention runs in token chunks: below what the
    FeedForward shards alone reach the plan takes one of them (tokens counted from the latent shape and the patch
    size, the width from the config), and below what the attention chunks reach, the streamed blocks; exact."""
    model, inputs = sana(name)
    with torch.no_grad():
        reference = model(**inputs)[0]
    kwargs = {key: value for key, value in inputs.items() if key != "return_dict"}
    fixed = sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
        v.numel() * v.element_size() for v in kwargs.values() if isinstance(v, torch.Tensor))
    tokens = inputs["hidden_states"][0, 0].numel() // (1 if name == "sana" else 4)

    def peak(chunking: Chunking) -> int:
        return simulate_chunking(model, (), kwargs, chunking).activation.bytes

    attention = min(peak(Chunking(feedforward_chunks=4, attention_chunk=-(-tokens // n))) for n in (4, 8, 16))
    for budget in (fixed + peak(Chunking(feedforward_chunks=4)) - 1, fixed + attention - 1):
        plan = plan_denoiser(model, (), kwargs, budget=budget, device="cpu")
        assert plan.predicted_peak_bytes <= budget and plan.tokens == 2 * tokens and plan.hidden_size == 32
        assert plan.chunking.sequence_chunks or plan.chunking.attention_chunk
        plan.apply(model)
        with torch.no_grad():
            out = model(**inputs)[0]
        remove_memopt_hooks(model)
        assert ((out - reference).norm() / reference.norm()).item() <= 1e-5
    assert plan.chunking.sequence_chunks  # below the attention chunks' peak: the streamed blocks


@pytest.mark.parametrize("family", ["wan", "hunyuanvideo", "flux"])
def test_full_size_fits_4_5_gib_with_offloading_and_chunking(family: str) -> None:
    """Wan2.1-14B 720p/81f, HunyuanVideo 720p/129f, Flux.1-dev 1024x1024: one forward within 4.5 GiB of device memory
    (weights on the device per phase of block-level offloading with stream prefetch + inputs + activations).
    ``benchmarks/pipeline.py`` runs the planner's full search; this walks the sequence series from 16 chunks."""
    spec = get_family(family)
    with FakeTensorMode(allow_non_fake_inputs=True):
        model = cast_floating_(spec.build("full"), torch.bfloat16)
        inputs = spec.make_inputs(model.config, dtype=torch.bfloat16)
    series = [[Chunking()], [Chunking(sequence_chunks=n) for n in (16, 32, 64)]]
    plan = plan_denoiser(model, (), inputs, budget="4.5GiB", device="cuda", series=series,
                         offload=OffloadConfig("cuda", use_stream=True))
    assert plan.offload is not None and plan.offload.use_stream and plan.offload.offload_type == "block_level"
    assert plan.predicted_peak_bytes <= 4.5 * GIB
    assert plan.option.weight_bytes <= plan.groups.resident_bytes(use_stream=True)
    assert plan.groups.total_bytes > 20 * GIB  # the full-size model, of which only a few blocks are on the device


def test_a_forward_that_depends_on_computed_values_is_refused_clearly() -> None:
    """A forward whose shapes follow values computed from its weights, with no known worst case, cannot be simulated
    (fake weights have no values): planning fails with an error that says so, never a guess."""
    from diffusers import ConfigMixin, ModelMixin
    from diffusers.configuration_utils import register_to_config

    class KeepsPositiveRows(ModelMixin, ConfigMixin):
        @register_to_config
        def __init__(self, dim: int = 8) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(dim, dim)

        def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
            projected = self.proj(hidden_states)
            return projected[projected[:, 0] > 0]

    with pytest.raises(UnplannableError, match="tensor values the simulation does not have .* cannot be simulated"):
        plan_denoiser(KeepsPositiveRows(), (torch.randn(5, 8),), {}, budget="1GiB", device="cpu")


@pytest.mark.parametrize("batch_size", [1, 2])
def test_moe_routing_by_the_weights_is_planned_for_its_worst_case(batch_size: int) -> None:
    """HiDream's MoE gathers each expert's tokens by ``bincount`` of its router's choices, values computed from the
    weights. The simulation routes every token to the same top-k experts (memopt.trace.stand_ins), the most any
    routing gives one expert: the predicted peak is the tracer's for that routing to the byte and above the real
    routing's, the plan says it assumed it, and the output is exact."""
    spec = get_family("hidream")
    torch.manual_seed(0)
    model = spec.build("tiny")
    size = TINY_SIZES["hidream"]
    inputs = spec.make_inputs(model.config, batch_size=batch_size, height=size.height, width=size.width, masked=True)
    with torch.no_grad():
        unmodified = trace_memory(model, **inputs)
    budget = unmodified.baseline_bytes + int(0.85 * unmodified.peak_bytes)
    plan = plan_denoiser(model, (), inputs, budget=budget, device="cpu")
    assert not plan.chunking.is_empty and plan.predicted_peak_bytes <= budget
    assert "assumes MoE routing at its worst case" in str(plan)
    plan.apply(model)
    try:
        with torch.no_grad():
            routed = trace_memory(model, **inputs)
            with worst_case_values(model):
                worst = trace_memory(model, **inputs)
    finally:
        remove_memopt_hooks(model)
    assert plan.activation.bytes == worst.peak_bytes > routed.peak_bytes
    assert rel_err(routed.result[0], unmodified.result[0]) <= 1e-5


@pytest.mark.parametrize("family", ["hunyuanvideo15", "hunyuanimage", "qwenimage21", "framepack", "lumina2",
                                    "glm_image", "omnigen", "mochi"])
def test_a_forward_that_reads_its_inputs_values_is_planned_exactly(family: str) -> None:
    """These forwards read values of their inputs: HunyuanVideo 1.5 branches on ``torch.all(image_embeds == 0)``,
    HunyuanImage 2.1 and GLM-Image index with boolean masks, Qwen-Image 2.1 repeats a mask by segment lengths,
    FramePack and Lumina 2 count each sample's text tokens from its mask, OmniGen compares ``max(position_ids)``,
    Mochi keeps each sample's valid text tokens (``nonzero``). Fake tensors alone cannot trace them (the one-liner
    refused the first seven; Mochi was planned as if every text token were valid). The simulation carries the real
    inputs' values (:class:`memopt.trace.simulate.InputValues`): with padded text, the predicted peak is the tracer's
    on real tensors to the byte, and the plan is exact."""
    spec = get_family(family)
    model = spec.build("tiny")
    size = TINY_SIZES[family]
    inputs = spec.make_inputs(model.config, batch_size=2, height=size.height, width=size.width,
                              num_frames=size.num_frames, masked=True)
    with torch.no_grad():
        unmodified = trace_memory(model, **inputs)
    budget = unmodified.baseline_bytes + int(0.85 * unmodified.peak_bytes)
    plan = plan_denoiser(model, (), inputs, budget=budget, device="cpu")
    assert not plan.chunking.is_empty and plan.predicted_peak_bytes <= budget
    plan.apply(model)
    with torch.no_grad():
        traced = trace_memory(model, **inputs)
    assert traced.total_peak_bytes == plan.predicted_peak_bytes
    assert rel_err(traced.result[0], unmodified.result[0]) <= 1e-5
    remove_memopt_hooks(model)


def test_lockstep_is_chosen_where_its_peak_fits() -> None:
    """Lock-step reruns nothing, so where its (larger) peak fits the budget the planner takes it over two-pass at the
    same chunk count; where only two-pass fits, two-pass. Either plan is exact."""
    spec = get_family("wan")
    model = spec.build("tiny")
    inputs = spec.make_inputs(model.config, batch_size=1, height=96, width=160, num_frames=9)
    with torch.no_grad():
        reference = model(**inputs)[0]
    series = [[Chunking()], [Chunking(sequence_chunks=4)], [Chunking(sequence_chunks=4, schedule="lockstep")]]
    roomy = plan_denoiser(model, (), inputs, budget=10 * GIB, device="cpu", series=series[1:])
    peaks = {option.chunking.schedule: option.peak_bytes for option in roomy.considered}
    times = {option.chunking.schedule: option.time_s for option in roomy.considered}
    assert peaks["two_pass"] < peaks["lockstep"] and times["lockstep"] < times["two_pass"]
    for budget, schedule in ((peaks["lockstep"], "lockstep"), (peaks["lockstep"] - 1, "two_pass")):
        plan = plan_denoiser(model, (), inputs, budget=budget, device="cpu", series=series)
        assert plan.chunking == Chunking(sequence_chunks=4, schedule=schedule)
        assert ("lock-step" in str(plan)) == (schedule == "lockstep")
        plan.apply(model)
        with torch.no_grad():
            out = model(**inputs)[0]
        remove_memopt_hooks(model)
        assert ((out - reference).norm() / reference.norm()).item() <= 1e-5
