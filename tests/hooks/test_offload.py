"""Composition with diffusers' group offloading: grouping predicted from the module tree, hook order with memopt's
chunking (a block's weights onloaded once for all its chunks), clean removal, VAE flags and refusals. CPU only:
group offloading runs with ``onload_device="cpu"`` (the hooks and groups are the same, only nothing moves)."""

from __future__ import annotations

import collections

import pytest
import torch
from diffusers.hooks import apply_group_offloading
from diffusers.hooks import group_offloading as diffusers_group_offloading

from memopt.hooks._common import remove_memopt_hooks
from memopt.hooks.feedforward import apply_chunked_feedforward
from memopt.hooks.offload import (
    GROUP_OFFLOADING_HOOKS,
    OffloadConfig,
    apply_offloading,
    apply_vae_tiling,
    check_not_offloaded_or_parallel,
    module_bytes,
    offload_groups,
    place_on,
    placement,
    remove_offloading,
    remove_vae_tiling,
)
from memopt.hooks.sequence import apply_sequence_chunking
from memopt.models import get_family

FAMILIES = ["wan", "flux", "hunyuanvideo"]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _hooks(model: torch.nn.Module) -> dict[str, list[str]]:
    return {path: list(sub._diffusers_hook._hook_order) for path, sub in model.named_modules()
            if getattr(sub, "_diffusers_hook", None) is not None and sub._diffusers_hook._hook_order}


@pytest.fixture
def onload_counter(monkeypatch: pytest.MonkeyPatch) -> collections.Counter:
    """Counts ``ModuleGroup.onload_`` calls by the group's onload leader (class name)."""
    counts: collections.Counter = collections.Counter()
    original = diffusers_group_offloading.ModuleGroup.onload_

    def counting(group) -> None:
        counts[type(group.onload_leader).__name__] += 1
        return original(group)

    monkeypatch.setattr(diffusers_group_offloading.ModuleGroup, "onload_", counting)
    return counts


@pytest.mark.parametrize("family", FAMILIES)
def test_groups_match_what_diffusers_builds(family: str) -> None:
    model = get_family(family).build("tiny")
    predicted = offload_groups(model)
    apply_group_offloading(model, onload_device="cpu", offload_type="block_level", num_blocks_per_group=1)
    groups = {id(sub._diffusers_hook.get_hook("group_offloading").group): sub._diffusers_hook.get_hook(
        "group_offloading").group for sub in model.modules() if getattr(sub, "_diffusers_hook", None) is not None}
    sizes = []
    for group in groups.values():
        tensors = [t for m in group.modules for t in (*m.parameters(), *m.buffers())]
        tensors += [*group.parameters, *group.buffers]
        sizes.append(sum({id(t): t.numel() * t.element_size() for t in tensors}.values()))
    top = [size for group, size in zip(groups.values(), sizes) if group.onload_leader is model]
    assert top == [predicted.top_level_bytes]
    assert sorted(s for g, s in zip(groups.values(), sizes) if g.onload_leader is not model) == sorted(
        nbytes for _, nbytes in predicted.groups)
    assert predicted.total_bytes == module_bytes(model) == sum(sizes)
    assert predicted.resident_bytes(use_stream=True) == predicted.top_level_bytes + 2 * predicted.largest[1]


@pytest.mark.parametrize("family", FAMILIES)
def test_offloading_wraps_chunking_so_each_block_is_onloaded_once(family: str, onload_counter) -> None:
    spec = get_family(family)
    model = spec.build("tiny")
    inputs = spec.make_inputs(model.config, batch_size=2)
    with torch.no_grad():
        reference = model(**inputs)[0]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    num_blocks = sum(len(child) for child in model.children() if isinstance(child, torch.nn.ModuleList))

    apply_chunked_feedforward(model, num_chunks=2)
    # The output head stays whole under offloading: chunking it re-calls every block per chunk (see Chunking).
    apply_sequence_chunking(model, num_chunks=4, chunk_tail=False)
    apply_offloading(model, OffloadConfig("cpu"))
    for path, order in _hooks(model).items():  # group offloading outermost wherever both sit on a module
        if "group_offloading" in order and any(name.startswith("memopt.") for name in order):
            assert order[-1] == "group_offloading", (path, order)
    with torch.no_grad():
        output = model(**inputs)[0]
    assert _rel(output, reference) <= 1e-5
    assert sum(onload_counter.values()) == num_blocks + 1  # every block once, plus the top-level group
    assert onload_counter[type(model).__name__] == 1

    remove_memopt_hooks(model)
    assert remove_offloading(model) is not None
    assert _hooks(model) == {} and placement(model) is None
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(model(**inputs)[0], reference)


def test_chunking_outside_offloading_would_onload_per_chunk(onload_counter) -> None:
    """The order memopt avoids: offloading registered first (innermost) is run once per chunk and per pass."""
    spec = get_family("wan")
    model = spec.build("tiny")
    inputs = spec.make_inputs(model.config, batch_size=1)
    apply_offloading(model, OffloadConfig("cpu"))
    apply_sequence_chunking(model, num_chunks=4, chunk_tail=False)
    with torch.no_grad():
        model(**inputs)
    assert onload_counter["WanTransformerBlock"] > len(model.blocks) * 4


def test_place_on_and_remove_restore_the_original_device(monkeypatch: pytest.MonkeyPatch) -> None:
    model = get_family("wan").build("tiny")
    moves: list[torch.device] = []
    monkeypatch.setattr(model, "to", lambda device: moves.append(torch.device(device)))  # no second device here
    place_on(model, "cuda:1")
    assert moves == [torch.device("cuda:1")]
    assert placement(model).original_device == torch.device("cpu") and placement(model).offload is None
    assert remove_offloading(model).original_device == torch.device("cpu")
    assert moves[-1] == torch.device("cpu") and placement(model) is None
    assert remove_offloading(model) is None


def test_reapplying_keeps_the_first_original_device() -> None:
    model = get_family("wan").build("tiny")
    apply_offloading(model, OffloadConfig("cpu"))
    with pytest.raises(ValueError, match="already offloaded by memopt"):
        apply_offloading(model, OffloadConfig("cpu"))
    remove_offloading(model, restore=False)
    assert not any(name in order for order in _hooks(model).values() for name in GROUP_OFFLOADING_HOOKS)
    apply_offloading(model, OffloadConfig("cpu"))
    assert placement(model).original_device == torch.device("cpu")
    remove_offloading(model)
    assert _hooks(model) == {}


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="offload_type"):
        OffloadConfig("cpu", offload_type="module_level")
    with pytest.raises(ValueError, match="CUDA"):
        OffloadConfig("cpu", use_stream=True)
    with pytest.raises(ValueError, match="record_stream"):
        OffloadConfig("cuda", record_stream=True)
    assert "prefetched" in OffloadConfig("cuda", use_stream=True).describe()


def test_vae_tiling_flags_are_restored() -> None:
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    assert (vae.use_tiling, vae.use_slicing) == (False, False)
    assert apply_vae_tiling(vae) == "tiling + slicing"
    assert (vae.use_tiling, vae.use_slicing) == (True, True)
    with pytest.raises(ValueError, match="already"):
        apply_vae_tiling(vae)
    assert remove_vae_tiling(vae)
    assert (vae.use_tiling, vae.use_slicing) == (False, False)
    assert not remove_vae_tiling(vae)
    assert apply_vae_tiling(torch.nn.Linear(2, 2)) is None


def test_refuses_accelerate_offloaded_models() -> None:
    from accelerate import cpu_offload_with_hook

    model = get_family("wan").build("tiny")
    cpu_offload_with_hook(model, execution_device="cpu")
    with pytest.raises(ValueError, match="accelerate hook .*remove_all_hooks"):
        check_not_offloaded_or_parallel(model, "transformer")


def test_refuses_foreign_group_offloading() -> None:
    model = get_family("wan").build("tiny")
    apply_group_offloading(model, onload_device="cpu", offload_type="block_level", num_blocks_per_group=1)
    with pytest.raises(ValueError, match="already has diffusers group offloading"):
        check_not_offloaded_or_parallel(model, "transformer")


def test_refuses_parallel_models() -> None:
    from diffusers.hooks import HookRegistry, ModelHook

    model = get_family("wan").build("tiny")
    model._parallel_config = object()
    with pytest.raises(ValueError, match="already parallel.*enable_parallelism"):
        check_not_offloaded_or_parallel(model, "transformer")
    model._parallel_config = None
    HookRegistry.check_if_exists_or_initialize(model.blocks[0]).register_hook(ModelHook(), "cp_input---blocks.0")
    with pytest.raises(ValueError, match="transformer.blocks.0 has diffusers context-parallel hooks"):
        check_not_offloaded_or_parallel(model, "transformer")
