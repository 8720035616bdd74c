"""Training through diffusers' group offloading (``apply_sequence_chunking(..., training=True)`` under
``apply_group_offloading``): each recorded block onloads its weights again for its backward, the top-level group is
onloaded when the backward reaches the model's output, gradients match the unmodified model, and what cannot be
trained that way is refused by name.

CPU only, so offloading moves nothing; the ``poisoned`` fixture makes it observable instead: while a group is
offloaded its tensors hold NaN (the real values are put back when diffusers onloads it), so any weight read while
offloaded turns the gradients into NaN. ``test_a_missing_onload_is_caught`` shows the fixture fails a run without
memopt's backward onloads.
"""

from __future__ import annotations

import collections
import contextlib

import pytest
import torch
from diffusers.hooks import apply_group_offloading
from diffusers.hooks import group_offloading as diffusers_group_offloading

import memopt.hooks._sequence_backward as sequence_backward
from memopt import apply_sequence_chunking, remove_memory_optimizations
from memopt.hooks.offload import OffloadConfig, apply_offloading, remove_offloading
from memopt.models import get_family
from memopt.trace.simulate import training_step

from _tiny_cases import SIZES  # noqa: E402

# CogVideoX's top-level group holds a LayerNorm with weights (norm_final) whose backward reads them; Sana's blocks
# stream (memopt.hooks._streamed_blocks), with their own banded backward.
FAMILIES = ["wan", "flux", "hunyuanvideo", "cogvideox", "sana", "sana_video"]


def _tensors(group) -> list[torch.Tensor]:
    tensors = {id(t): t for m in group.modules for t in (*m.parameters(), *m.buffers())}
    tensors.update({id(t): t for t in (*group.parameters, *group.buffers)})
    return list(tensors.values())


class Poison:
    """Counts onloads by the group's onload leader (class name); :meth:`restore` puts every real value back."""

    def __init__(self) -> None:
        self.onloads: collections.Counter = collections.Counter()
        self.real: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def restore(self) -> None:
        for tensor, data in self.real.values():
            tensor.data = data
        self.real.clear()


@pytest.fixture
def poisoned(monkeypatch: pytest.MonkeyPatch) -> Poison:
    """Offloaded groups hold NaN until diffusers onloads them again."""
    poison = Poison()
    offload, onload = diffusers_group_offloading.ModuleGroup.offload_, diffusers_group_offloading.ModuleGroup.onload_

    def poisoning_offload(group) -> None:
        offload(group)
        for tensor in _tensors(group):
            if tensor.is_floating_point() and id(tensor) not in poison.real:
                poison.real[id(tensor)] = (tensor, tensor.data)
                tensor.data = torch.full_like(tensor.data, float("nan"))

    def restoring_onload(group) -> None:
        poison.onloads[type(group.onload_leader).__name__] += 1
        for tensor in _tensors(group):
            if id(tensor) in poison.real:
                tensor.data = poison.real.pop(id(tensor))[1]
        onload(group)

    monkeypatch.setattr(diffusers_group_offloading.ModuleGroup, "offload_", poisoning_offload)
    monkeypatch.setattr(diffusers_group_offloading.ModuleGroup, "onload_", restoring_onload)
    yield poison
    poison.restore()


def _build(family: str, batch_size: int = 2) -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(0)
    spec = get_family(family)
    model = spec.build("tiny").train()
    size = SIZES.get(family) or spec.size("tiny")
    inputs = spec.make_inputs(model.config, batch_size=batch_size, height=size.height, width=size.width,
                              num_frames=size.num_frames, masked=True)
    return model, inputs


def _gradients(model: torch.nn.Module, inputs: dict) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    training_step(model, inputs)
    return {name: param.grad.clone() for name, param in model.named_parameters() if param.grad is not None}


def _error(got: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    """Relative error of all gradients together (a key bias's true gradient is zero: per tensor it is all noise)."""
    assert got.keys() == reference.keys() and reference
    difference = torch.cat([(got[name] - grad).flatten() for name, grad in reference.items()])
    return float(difference.norm() / torch.cat([grad.flatten() for grad in reference.values()]).norm())


def _num_blocks(model: torch.nn.Module) -> int:
    return sum(len(child) for child in model.children() if isinstance(child, torch.nn.ModuleList))


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_through_group_offloading(family: str, poisoned: Poison) -> None:
    model, inputs = _build(family)
    reference = _gradients(model, inputs)
    state = {name: value.clone() for name, value in model.state_dict().items()}

    apply_sequence_chunking(model, num_chunks=3, training=True, chunk_tail=False)
    apply_offloading(model, OffloadConfig("cpu"))
    gradients = _gradients(model, inputs)
    assert all(grad.isfinite().all() for grad in gradients.values())
    assert _error(gradients, reference) <= 1e-5
    # The forward onloads every block and the top level once; the backward all of them once more.
    assert poisoned.onloads[type(model).__name__] == 2
    assert sum(poisoned.onloads.values()) == 2 * (_num_blocks(model) + 1)

    remove_memory_optimizations(model)
    remove_offloading(model)
    poisoned.restore()
    assert all(torch.equal(value, state[name]) for name, value in model.state_dict().items())


@pytest.mark.parametrize("saved_inputs", ["device", "host"])
def test_lora_training_steps_through_group_offloading(saved_inputs: str) -> None:
    """Two optimizer steps on LoRA adapters, offloaded (the adapters move with their blocks) and resident, agree."""
    pytest.importorskip("peft")
    from peft import LoraConfig

    results = []
    for offloaded in (False, True):
        model, inputs = _build("wan")
        model.requires_grad_(False)
        torch.manual_seed(1)
        model.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_out"]))
        if offloaded:
            apply_sequence_chunking(model, num_chunks=3, training=True, chunk_tail=False, saved_inputs=saved_inputs)
            apply_offloading(model, OffloadConfig("cpu"))
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        for _ in range(2):
            optimizer.zero_grad(set_to_none=True)
            training_step(model, inputs)
            assert all(p.grad.device == p.device for p in model.parameters() if p.grad is not None)
            optimizer.step()
        with torch.no_grad():
            results.append(model(**{**inputs, "return_dict": False})[0])
    assert float((results[1] - results[0]).norm() / results[0].norm()) <= 1e-5


def test_a_missing_onload_is_caught(poisoned: Poison, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without memopt's onloads the fixture's NaN reach the gradients: the tests above can fail."""
    for family, patch in (("wan", ("onloaded", lambda module: contextlib.nullcontext())),
                          ("cogvideox", ("onloaded_for_backward", lambda module, output: output))):
        model, inputs = _build(family, batch_size=1)
        with monkeypatch.context() as context:
            context.setattr(sequence_backward, *patch)
            apply_sequence_chunking(model, num_chunks=3, training=True, chunk_tail=False)
            apply_offloading(model, OffloadConfig("cpu"))
            gradients = _gradients(model, inputs)
        assert not all(grad.isfinite().all() for grad in gradients.values()), family


def test_the_output_may_be_modified_in_place(poisoned: Poison) -> None:
    """The top-level group is onloaded by a node whose outputs are copies, not views: in-place ops stay allowed."""
    model, inputs = _build("cogvideox", batch_size=1)
    reference = _gradients(model, inputs)
    apply_sequence_chunking(model, num_chunks=3, training=True, chunk_tail=False)
    apply_offloading(model, OffloadConfig("cpu"))
    model.zero_grad(set_to_none=True)
    output = model(**{**inputs, "return_dict": False})[0]
    output.mul_(1.0)
    output.float().square().mean().backward()
    gradients = {name: param.grad for name, param in model.named_parameters() if param.grad is not None}
    assert all(grad.isfinite().all() for grad in gradients.values())
    assert _error(gradients, reference) <= 1e-5


def test_offloaded_modules_that_are_not_chunked_are_refused() -> None:
    model, inputs = _build("wan", batch_size=1)
    apply_sequence_chunking(model, num_chunks=3, training=True, chunk_tail=False)
    apply_group_offloading(model, onload_device=torch.device("cpu"), offload_type="leaf_level")
    with pytest.raises(NotImplementedError, match=r"WanTransformer3DModel: training through group offloading .* "
                                                  r"\['rope', 'patch_embedding', "):
        training_step(model, inputs)
    with torch.no_grad():  # a forward without autograd is not concerned
        model(**inputs)
