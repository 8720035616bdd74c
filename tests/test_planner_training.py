"""Planning a training step (``plan_denoiser(..., training=True)``, ``apply_memory_optimizations(..., training=True)``):
depth-reduced simulations extrapolated to the real depth, predictions equal to the tracer on real tensors, the choice
between the unmodified model, diffusers' gradient checkpointing and memopt's chunked recomputation by budget, exact
gradients, removal, and the checkpointing hook. CPU only."""

from __future__ import annotations

import pytest
import torch

import memopt
from memopt import trace_memory
from memopt.hooks.checkpointing import apply_gradient_checkpointing
from memopt.hooks.offload import OffloadConfig, module_bytes, offload_groups
from memopt.models import get_family
from memopt.planner import (
    BudgetError,
    Chunking,
    candidate_series,
    input_bytes,
    plan_denoiser,
    simulate_chunking,
    trainable_bytes,
)
from memopt.trace import simulate
from memopt.trace.simulate import allocate_gradients, training_step

TRAINING_CHUNKINGS = [Chunking(training=True), Chunking(training=True, checkpointing=True),
                      Chunking(sequence_chunks=4, training=True)]


@pytest.mark.parametrize("family, layers, chunkings", [
    ("wan", {"num_layers": 4}, TRAINING_CHUNKINGS),
    ("flux", {"num_layers": 3, "num_single_layers": 4}, TRAINING_CHUNKINGS[1:]),
], ids=["wan", "flux"])
def test_training_step_is_extrapolated_to_the_full_depth(family: str, layers: dict, chunkings: list) -> None:
    """Each block saves something for the backward, so a step's peak grows with the depth: two blocks per list and
    one more per list give it, FLOPs and ops exactly at any depth."""
    spec = get_family(family)
    config = {**spec.config("tiny"), **layers}
    model = spec.build(config)
    inputs = spec.make_inputs(model.config, batch_size=1)
    for chunking in chunkings:
        estimate = simulate_chunking(model, (), inputs, chunking)
        full = simulate(lambda: spec.build(config), lambda m: spec.make_inputs(m.config, batch_size=1),
                        dtype=torch.float32, prepare=chunking.apply, backward=True)
        assert estimate.error is None, estimate.error
        assert estimate.activation.bytes == full.peak_bytes, chunking.describe()
        assert estimate.num_ops == full.num_ops, chunking.describe()


def _wan(num_layers: int = 4) -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(0)
    spec = get_family("wan")
    model = spec.build({**spec.config("tiny"), "num_layers": num_layers})
    return model, spec.make_inputs(model.config, batch_size=2, height=96, width=160, num_frames=9)


def _gradients(model: torch.nn.Module, inputs: dict) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    training_step(model, inputs)
    return {name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None}


def _assert_same_gradients(got: dict, reference: dict) -> None:
    assert got.keys() == reference.keys() and reference
    for name, grad in reference.items():
        assert (got[name] - grad).norm() <= 1e-5 * grad.norm(), name


def _step_trace(model: torch.nn.Module, inputs: dict):
    allocate_gradients(model)  # as the planner's simulation: gradients exist before the step
    trace = trace_memory(training_step, model, inputs)
    model.zero_grad(set_to_none=True)
    return trace


@pytest.mark.parametrize("fraction, expected", [
    (1.01, Chunking(training=True)),
    (0.6, Chunking(training=True, checkpointing=True)),
    (0.2, Chunking(sequence_chunks=4, training=True)),
], ids=["unmodified", "checkpointing", "chunked"])
def test_the_fastest_fitting_training_plan_is_chosen(fraction: float, expected: Chunking) -> None:
    model, inputs = _wan()
    reference = _gradients(model, inputs)
    unmodified = _step_trace(model, inputs)
    fixed = module_bytes(model) + trainable_bytes(model)
    budget = fixed + unmodified.baseline_bytes + int(fraction * unmodified.peak_bytes)
    plan = plan_denoiser(model, (), inputs, budget=budget, device="cpu", training=True)
    assert plan.chunking == expected and plan.training
    assert plan.predicted_peak_bytes <= budget and plan.gradient_bytes == trainable_bytes(model)
    assert f"gradients {memopt.planner.format_bytes(plan.gradient_bytes)}" in str(plan)
    # Faster options were simulated and did not fit.
    assert all(option.peak_bytes > budget for option in plan.considered if option.time_s < plan.predicted_time_s)
    plan.apply(model)
    measured = _step_trace(model, inputs)
    assert plan.predicted_peak_bytes == fixed + measured.total_peak_bytes  # the tracer's exact count
    _assert_same_gradients(_gradients(model, inputs), reference)
    memopt.remove_memory_optimizations(model)
    assert not model.is_gradient_checkpointing


def test_apply_memory_optimizations_for_training() -> None:
    """The one line: planned at the first step, gradients exact, everything undone by the removal."""
    model, inputs = _wan()
    reference = _gradients(model, inputs)
    state = {key: value.clone() for key, value in model.state_dict().items()}
    unmodified = _step_trace(model, inputs)
    budget = module_bytes(model) + trainable_bytes(model) + unmodified.baseline_bytes + unmodified.peak_bytes // 5
    plan = memopt.apply_memory_optimizations(model, budget=budget, training=True)
    assert plan.training and plan.components[""].denoiser is None  # planned at the first forward
    _assert_same_gradients(_gradients(model, inputs), reference)
    denoiser = plan.components[""].denoiser
    assert denoiser.training and denoiser.chunking.sequence_chunks and denoiser.chunking.training
    assert "recomputed in chunks in the backward" in str(plan) and "training step" in str(plan)
    assert memopt.remove_memory_optimizations(model) > 0
    assert all(torch.equal(state[key], value) for key, value in model.state_dict().items())
    _assert_same_gradients(_gradients(model, inputs), reference)


def test_default_training_budget_leaves_room_for_adam() -> None:
    model, _ = _wan(num_layers=1)
    model.requires_grad_(False).proj_out.requires_grad_(True)
    plan = memopt.apply_memory_optimizations(model, training=True)
    memopt.remove_memory_optimizations(model)
    state = 8 * sum(param.numel() for param in model.proj_out.parameters())
    assert f"Adam's state of the trainable parameters {memopt.planner.format_bytes(state)}" in plan.budget_source


def test_lora_training_is_planned_through_every_block() -> None:
    """Adapters only: the simulated copy has none, so it back-propagates to the latents instead, through every block
    as the adapters' gradients need; the plan's gradients are the adapters'."""
    from peft import LoraConfig

    model, inputs = _wan()
    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=["to_q", "to_v"]))
    reference = _gradients(model, inputs)
    unmodified = _step_trace(model, inputs)
    budget = module_bytes(model) + unmodified.baseline_bytes + unmodified.peak_bytes // 4
    plan = plan_denoiser(model, (), inputs, budget=budget, device="cpu", training=True)
    assert plan.chunking.sequence_chunks and plan.gradient_bytes == trainable_bytes(model) > 0
    plan.apply(model)
    measured = _step_trace(model, inputs)
    # The adapters' own activations (rank 4) are not simulated.
    assert abs(plan.activation.bytes - measured.peak_bytes) <= 0.1 * measured.peak_bytes
    _assert_same_gradients(_gradients(model, inputs), reference)
    memopt.remove_memory_optimizations(model)


def test_training_below_the_weights_and_gradients_is_refused_clearly() -> None:
    model, inputs = _wan()
    with pytest.raises(BudgetError, match="WanTransformer3DModel.*gradients"):
        plan_denoiser(model, (), inputs, budget=module_bytes(model), device="cpu", training=True)


def test_training_is_offloaded_where_the_weights_do_not_fit() -> None:
    """Simulated for CUDA: below weights + gradients the blocks are group-offloaded, with memopt's chunks only (they
    onload their blocks again for the backward), and the device holds the top level's and one group's gradients."""
    model, _ = _wan()
    inputs = get_family("wan").make_inputs(model.config, batch_size=1, height=48, width=80, num_frames=5)
    offload = OffloadConfig("cuda", use_stream=True)
    groups = offload_groups(model)
    budget = module_bytes(model) + trainable_bytes(model) - 1
    series = [[Chunking(training=True)], [Chunking(training=True, checkpointing=True)],
              [Chunking(sequence_chunks=n, training=True) for n in (2, 4)]]
    plan = plan_denoiser(model, (), inputs, budget=budget, device="cuda", offload=offload, training=True,
                         series=series, runtime_overhead_bytes=0)
    assert plan.offload == offload and plan.chunking.training and plan.chunking.sequence_chunks
    assert not plan.chunking.chunk_tail and plan.predicted_peak_bytes <= budget
    assert plan.gradient_bytes == groups.device_gradient_bytes() < trainable_bytes(model)
    assert plan.gradient_bytes == groups.top_level_gradient_bytes + max(groups.group_gradient_bytes) > 0
    assert plan.considered and all(option.offload == offload and option.chunking.sequence_chunks
                                   for option in plan.considered)
    assert plan.predicted_peak_bytes == (input_bytes((), inputs) + plan.gradient_bytes + plan.option.weight_bytes
                                         + plan.option.activation_bytes)
    # The backward onloads every block again: slower than the same chunks resident.
    resident = plan_denoiser(model, (), inputs, budget="1GiB", device="cuda", training=True,
                             series=[[plan.chunking]], runtime_overhead_bytes=0)
    assert plan.predicted_time_s > resident.predicted_time_s
    # Where the resident model fits, a training step is not offloaded.
    roomy = plan_denoiser(model, (), inputs, budget="1GiB", device="cuda", offload=offload, training=True,
                          series=series, runtime_overhead_bytes=0)
    assert roomy.offload is None and all(option.offload is None for option in roomy.considered)


def test_checkpointing_already_on_is_simulated_and_kept() -> None:
    model, inputs = _wan()
    model.enable_gradient_checkpointing()
    plan = plan_denoiser(model, (), inputs, budget="1GiB", device="cpu", training=True)
    assert plan.chunking == Chunking(training=True)  # the unmodified candidate is the checkpointed model
    assert not any(option.chunking.checkpointing for option in plan.considered)
    checkpointed = _step_trace(model, inputs)
    model.disable_gradient_checkpointing()
    assert plan.activation.bytes == checkpointed.peak_bytes < _step_trace(model, inputs).peak_bytes


def test_gradient_checkpointing_hook_restores_the_switch() -> None:
    model, _ = _wan(num_layers=1)
    assert "gradient checkpointing" in apply_gradient_checkpointing(model)
    assert model.is_gradient_checkpointing
    memopt.remove_memory_optimizations(model)
    assert not model.is_gradient_checkpointing
    model.enable_gradient_checkpointing()  # on before: stays on
    apply_gradient_checkpointing(model)
    memopt.remove_memory_optimizations(model)
    assert model.is_gradient_checkpointing
    with pytest.raises(ValueError, match="Linear does not support diffusers' gradient checkpointing"):
        apply_gradient_checkpointing(torch.nn.Linear(2, 2))


def test_saved_inputs_go_to_the_host_where_nothing_else_fits_on_cuda() -> None:
    """Planned for a CUDA device (simulated here): below every option that keeps the saved block inputs on the
    device, they go to the host; applied on the CPU, the step's device-side peak is the prediction. On the CPU,
    where the host is the device, this option is not offered."""
    model, inputs = _wan(num_layers=8)
    reference = _gradients(model, inputs)
    budget = module_bytes(model) + trainable_bytes(model) + input_bytes((), inputs) + 850_000
    # The default series with up to 8 chunks (as for 8 tokens per sample), to keep the test short.
    with pytest.raises(BudgetError) as refused:
        plan_denoiser(model, (), inputs, budget=budget, device="cpu", training=True,
                      series=candidate_series(8, training=True, host=False))
    assert "host" not in str(refused.value) and "8 sequence chunks" in str(refused.value)
    plan = plan_denoiser(model, (), inputs, budget=budget, device="cuda", training=True, runtime_overhead_bytes=0,
                         series=candidate_series(8, training=True, host=True))
    assert plan.chunking == Chunking(sequence_chunks=4, training=True, saved_inputs="host"), plan.chunking
    assert "saved inputs on the host" in str(plan)
    device_saved = [option for option in plan.considered if option.chunking.saved_inputs == "device"]
    assert device_saved and all(option.peak_bytes > plan.budget_bytes for option in device_saved)
    estimate = simulate_chunking(model, (), inputs, plan.chunking)  # as the CPU allocates (the plan rounds as CUDA)
    plan.chunking.apply(model)  # not plan.apply: that would move the model to CUDA
    measured = _step_trace(model, inputs)
    assert measured.peak_bytes == estimate.activation.bytes
    assert measured.meta["host_bytes"] == estimate.host_bytes > 0
    _assert_same_gradients(_gradients(model, inputs), reference)
    memopt.remove_memory_optimizations(model)


def test_a_frozen_model_is_simulated_through_its_latents() -> None:
    """No trainable parameter in the copy (adapters only): the simulated step back-propagates to the forward's first
    argument, whatever its name and structure (Z-Image's latents are the list ``x``), as a real step to the adapters
    would; its peak is the tracer's on real tensors."""
    spec = get_family("zimage")
    model = spec.build("tiny").requires_grad_(False)
    inputs = spec.make_inputs(model.config, batch_size=1)
    estimate = simulate_chunking(model, (), inputs, Chunking(training=True))
    assert estimate.error is None, estimate.error
    latents = [tensor.detach().clone().requires_grad_() for tensor in inputs["x"]]
    measured = trace_memory(training_step, model, {**inputs, "x": latents})
    assert estimate.activation.bytes == measured.peak_bytes
