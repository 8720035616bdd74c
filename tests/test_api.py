"""``apply_memory_optimizations`` on a whole pipeline: same latents with and without it, planning at the first call
or for a given size, clean removal, and clear errors that leave the pipeline untouched. CPU only: a tiny
``WanPipeline`` built from configs (tiny UMT5 encoder, tiny Wan VAE), prompt embeddings passed directly."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline
from transformers import UMT5Config, UMT5EncoderModel

import memopt
from memopt import trace_memory
from memopt.api import PLAN_HOOK, _components
from memopt.hooks.offload import module_bytes, placement
from memopt.models import get_family
from memopt.planner import BudgetError

HEIGHT, WIDTH, FRAMES = 48, 80, 5


def _pipeline(transformer: bool = True) -> WanPipeline:
    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           latents_mean=[0.0] * 4, latents_std=[1.0] * 4).eval()
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=64, d_model=24, d_kv=8, d_ff=32, num_layers=2,
                                               num_heads=3)).eval()
    return WanPipeline(tokenizer=None, text_encoder=text_encoder, vae=vae,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                       transformer=get_family("wan").build("tiny") if transformer else None)


def _generate(pipe: WanPipeline) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    prompt_embeds = torch.randn(2, 8, 24, generator=generator)
    negative_prompt_embeds = torch.randn(2, 8, 24, generator=generator)
    return pipe(prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds, height=HEIGHT, width=WIDTH,
                num_frames=FRAMES, num_inference_steps=2, output_type="latent",
                generator=torch.Generator().manual_seed(1), return_dict=False)[0]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _state(pipe) -> dict:
    """Everything apply may change: weights, hooks, placements, VAE flags."""
    components = _components(pipe)
    return {
        "weights": {name: {k: v.clone() for k, v in m.state_dict().items()} for name, m in components.items()},
        "hooks": {name: [(path, list(sub._diffusers_hook._hook_order)) for path, sub in m.named_modules()
                         if getattr(sub, "_diffusers_hook", None) is not None and sub._diffusers_hook._hook_order]
                  for name, m in components.items()},
        "placements": {name: placement(m) for name, m in components.items()},
        "vae": (pipe.vae.use_tiling, pipe.vae.use_slicing),
    }


def _assert_unchanged(pipe, before: dict) -> None:
    after = _state(pipe)
    assert after["hooks"] == before["hooks"] and after["placements"] == before["placements"]
    assert after["vae"] == before["vae"]
    for name, weights in before["weights"].items():
        assert all(torch.equal(v, weights[k]) for k, v in _components(pipe)[name].state_dict().items())


@pytest.fixture(scope="module")
def reference() -> torch.Tensor:
    return _generate(_pipeline())


def _budget_needing_chunking(pipe: WanPipeline) -> int:
    """All weights + the inputs + 85% of the unchunked activation peak of one denoiser call of the pipeline."""
    spec = get_family("wan")
    inputs = spec.make_inputs(pipe.transformer.config, batch_size=2, height=HEIGHT, width=WIDTH, num_frames=FRAMES,
                              text_tokens=8)
    with torch.no_grad():
        trace = trace_memory(pipe.transformer, **inputs)
    other = sum(module_bytes(m) for name, m in _components(pipe).items() if name != "transformer")
    return other + trace.baseline_bytes + int(0.85 * trace.peak_bytes)


def test_pipeline_default_budget_same_latents(reference: torch.Tensor) -> None:
    pipe = _pipeline()
    plan = memopt.apply_memory_optimizations(pipe)
    assert pipe.transformer._diffusers_hook.get_hook(PLAN_HOOK) is not None
    assert "planned at the first forward" in str(plan) and plan.predicted_peak_bytes is None
    latents = _generate(pipe)
    assert _rel(latents, reference) <= 1e-5
    assert pipe.transformer._diffusers_hook._hook_order[-1] == PLAN_HOOK  # kept outermost, for larger inputs
    text = str(plan)
    for component in ("vae", "text_encoder", "transformer"):
        assert f"- {component} [" in text
    assert "predicted peak" in text and "no CUDA device" in text
    assert "vae: tiled encoding and decoding change decoded pixels" in text and "vae_tiling=False" in text
    memopt.remove_memory_optimizations(pipe)
    assert torch.equal(_generate(pipe), reference)


def test_pipeline_tight_budget_chunks_and_matches(reference: torch.Tensor) -> None:
    pipe = _pipeline()
    before = _state(pipe)
    budget = _budget_needing_chunking(pipe)
    plan = memopt.apply_memory_optimizations(pipe, budget=budget)
    latents = _generate(pipe)
    denoiser = plan.components["transformer"].denoiser
    assert denoiser is not None and not denoiser.chunking.is_empty
    assert plan.predicted_peak_bytes <= budget
    assert denoiser.shapes["hidden_states"][0] == 2  # planned for what the pipeline passed (CFG batch)
    assert _rel(latents, reference) <= 1e-5
    assert memopt.remove_memory_optimizations(pipe) > 0
    _assert_unchanged(pipe, before)
    assert torch.equal(_generate(pipe), reference)


def test_plan_for_a_given_size_is_made_at_once(reference: torch.Tensor) -> None:
    pipe = _pipeline()
    budget = _budget_needing_chunking(pipe)
    plan = memopt.apply_memory_optimizations(pipe, budget=budget, height=HEIGHT, width=WIDTH, num_frames=FRAMES,
                                             batch_size=2)
    denoiser = plan.components["transformer"].denoiser
    assert denoiser is not None and not denoiser.chunking.is_empty
    assert _rel(_generate(pipe), reference) <= 1e-5
    assert plan.components["transformer"].denoiser is denoiser  # the pipeline's inputs are those planned for
    memopt.remove_memory_optimizations(pipe)


def test_plan_for_a_given_size_is_made_again_for_a_larger_batch(reference: torch.Tensor) -> None:
    """Planned for batch 1 while the pipeline batches its guidance (batch 2): planned again at the first call."""
    pipe = _pipeline()
    plan = memopt.apply_memory_optimizations(pipe, budget=_budget_needing_chunking(pipe), height=HEIGHT, width=WIDTH,
                                             num_frames=FRAMES)
    first = plan.components["transformer"].denoiser
    assert first.shapes["hidden_states"][0] == 1
    assert _rel(_generate(pipe), reference) <= 1e-5
    second = plan.components["transformer"].denoiser
    assert second is not first and second.shapes["hidden_states"][0] == 2
    memopt.remove_memory_optimizations(pipe)


@pytest.mark.parametrize("family", ["lumina2", "glm_image", "omnigen", "hunyuanimage", "hidream"])
def test_plan_for_a_given_size_simulates_forwards_that_read_values(family: str) -> None:
    """Planned for a size, the planner makes the inputs itself. They were all fake tensors, so forwards reading their
    inputs' values (Lumina 2's text lengths from its mask, GLM-Image's and HunyuanImage 2.1's boolean-mask indexing,
    OmniGen's ``max(position_ids)``) were refused; now the small ones are real (the mask, the timesteps: see
    ``memopt.trace.simulate.small_inputs_real``), and the plan made at once is the one the first call keeps, with its
    peak predicted to the byte (HiDream's: at its worst MoE routing, an upper bound)."""
    spec = get_family(family)
    torch.manual_seed(0)
    model = spec.build("tiny")
    size = spec.size("tiny")
    inputs = spec.make_inputs(model.config, batch_size=1, height=size.height, width=size.width,
                              num_frames=size.num_frames)
    with torch.no_grad():
        unmodified = trace_memory(model, **inputs)
    plan = memopt.apply_memory_optimizations(model, budget=unmodified.baseline_bytes + unmodified.peak_bytes * 17 // 20,
                                             device="cpu", height=size.height, width=size.width,
                                             num_frames=size.num_frames if spec.video else None)
    (component,) = plan.components.values()
    planned = component.denoiser
    assert planned is not None and not planned.chunking.is_empty
    with torch.no_grad():
        traced = trace_memory(model, **inputs)
    memopt.remove_memory_optimizations(model)
    assert component.denoiser is planned  # not planned again: the call's inputs are those planned for
    if family == "hidream":
        assert planned.predicted_peak_bytes >= traced.total_peak_bytes and planned.assumptions
    else:
        assert planned.predicted_peak_bytes == traced.total_peak_bytes and not planned.assumptions
    assert traced.total_peak_bytes < unmodified.total_peak_bytes
    assert _rel(traced.result[0], unmodified.result[0]) <= 1e-5


def test_bare_model_planned_inside_a_trace() -> None:
    """The first call can be traced: the planner's own simulation runs apart from the caller's tracer."""
    spec = get_family("flux")
    model = spec.build("tiny")
    inputs = spec.make_inputs(model.config, batch_size=2)
    with torch.no_grad():
        unmodified = trace_memory(model, **inputs)
    plan = memopt.apply_memory_optimizations(model, budget=unmodified.baseline_bytes + unmodified.peak_bytes * 3 // 4)
    with torch.no_grad():
        traced = trace_memory(model, **inputs)
    assert plan.predicted_peak_bytes == traced.total_peak_bytes < unmodified.total_peak_bytes
    assert _rel(traced.result[0], unmodified.result[0]) <= 1e-5
    memopt.remove_memory_optimizations(model)
    assert not hasattr(model, "_diffusers_hook") or not model._diffusers_hook._hook_order


def test_larger_inputs_are_planned_again() -> None:
    """A plan holds for the inputs it was made for: a call with 135 tokens after one with 30, which the first plan
    (no chunking) would run 14% over budget, is planned again before it runs; smaller inputs keep the plan."""
    spec = get_family("wan")
    model = spec.build("tiny")
    small = spec.make_inputs(model.config, batch_size=1, height=48, width=80, num_frames=5, seed=1)
    large = spec.make_inputs(model.config, batch_size=1, height=80, width=144, num_frames=9, seed=2)
    with torch.no_grad():
        unmodified_small, unmodified_large = trace_memory(model, **small), trace_memory(model, **large)
    budget = unmodified_large.baseline_bytes + unmodified_large.peak_bytes * 3 // 4
    assert unmodified_small.total_peak_bytes < budget < unmodified_large.total_peak_bytes
    plan = memopt.apply_memory_optimizations(model, budget=budget)
    with torch.no_grad():
        assert torch.equal(model(**small)[0], unmodified_small.result[0])
    first = plan.components[""].denoiser
    assert first.chunking.is_empty
    with torch.no_grad():
        traced = trace_memory(model, **large)
    second = plan.components[""].denoiser
    assert second is not first and second.chunking.sequence_chunks
    assert plan.predicted_peak_bytes == traced.total_peak_bytes <= budget
    assert _rel(traced.result[0], unmodified_large.result[0]) <= 1e-5
    with torch.no_grad():
        assert _rel(model(**small)[0], unmodified_small.result[0]) <= 1e-5
    assert plan.components[""].denoiser is second and model._diffusers_hook._hook_order[-1] == PLAN_HOOK
    memopt.remove_memory_optimizations(model)
    assert not model._diffusers_hook._hook_order
    with torch.no_grad():
        assert torch.equal(model(**large)[0], unmodified_large.result[0])


def test_larger_inputs_that_nothing_fits_restore_the_model() -> None:
    spec = get_family("wan")
    model = spec.build("tiny")
    small = spec.make_inputs(model.config, batch_size=1, height=48, width=80, num_frames=5)
    large = spec.make_inputs(model.config, batch_size=1, height=160, width=288, num_frames=17)
    with torch.no_grad():
        unmodified_small = trace_memory(model, **small)
        reference = model(**large)[0]
    memopt.apply_memory_optimizations(model, budget=unmodified_small.total_peak_bytes + 4096)
    with torch.no_grad():
        model(**small)
        with pytest.raises(BudgetError, match="is below the floor of .* the forward's inputs 57 KiB"):
            model(**large)
        assert not model._diffusers_hook._hook_order
        assert torch.equal(model(**large)[0], reference)


def test_nothing_fits_at_the_first_call_restores_the_pipeline() -> None:
    pipe = _pipeline()
    before = _state(pipe)
    total = sum(module_bytes(m) for m in _components(pipe).values())
    memopt.apply_memory_optimizations(pipe, budget=total + 16 * 1024)  # above weights and inputs, below any peak
    with pytest.raises(BudgetError, match="smallest peak memopt simulated .* dominated by"):
        _generate(pipe)
    _assert_unchanged(pipe, before)


@pytest.mark.parametrize("budget, match", [("8 gigs", "cannot read the budget"), ("-3GiB", "positive"),
                                           (1024, "below the floor")])
def test_bad_budgets_leave_the_pipeline_untouched(budget, match) -> None:
    pipe = _pipeline()
    before = _state(pipe)
    with pytest.raises(ValueError, match=match):
        memopt.apply_memory_optimizations(pipe, budget=budget)
    _assert_unchanged(pipe, before)


def test_pipeline_without_denoiser() -> None:
    pipe = _pipeline(transformer=False)
    before = _state(pipe)
    with pytest.raises(ValueError, match="has no denoiser"):
        memopt.apply_memory_optimizations(pipe)
    _assert_unchanged(pipe, before)


def test_accelerate_offloaded_pipeline_is_refused() -> None:
    from accelerate import cpu_offload_with_hook

    pipe = _pipeline()
    cpu_offload_with_hook(pipe.text_encoder, execution_device="cpu")
    before = _state(pipe)
    with pytest.raises(ValueError, match="text_encoder already has an accelerate hook"):
        memopt.apply_memory_optimizations(pipe)
    _assert_unchanged(pipe, before)


def test_parallel_model_and_double_apply_are_refused() -> None:
    pipe = _pipeline()
    pipe.transformer._parallel_config = object()
    with pytest.raises(ValueError, match="already parallel"):
        memopt.apply_memory_optimizations(pipe)
    pipe.transformer._parallel_config = None
    memopt.apply_memory_optimizations(pipe)
    with pytest.raises(ValueError, match="already has memopt applied"):
        memopt.apply_memory_optimizations(pipe)
    memopt.remove_memory_optimizations(pipe)


def test_other_inputs_are_refused() -> None:
    with pytest.raises(TypeError, match="DiffusionPipeline or a torch.nn.Module"):
        memopt.apply_memory_optimizations("pipe")
    with pytest.raises(TypeError, match="not a diffusers model"):
        memopt.apply_memory_optimizations(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="both height and width"):
        memopt.apply_memory_optimizations(get_family("wan").build("tiny"), height=480)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            memopt.apply_memory_optimizations(get_family("wan").build("tiny"), device="cuda")


def test_gpu_benchmark_script_dry_run(tmp_path) -> None:
    """benchmarks/gpu_pipeline.py end to end at tiny size on the CPU (its logic; the numbers need a GPU)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_pipeline.py"
    run = subprocess.run([sys.executable, str(script), "--dry-run", "--budgets", "4.5GiB,110KiB", "--out",
                          str(tmp_path)], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    results = {r["name"]: r for r in json.loads((tmp_path / "gpu_pipeline.json").read_text())["results"]}
    assert [r["status"] for r in results.values()] == ["ok"] * 4, results
    assert results["memopt, budget 110KiB"]["rel_error"] <= 1e-2  # bf16
    assert "sequence chunks" in results["memopt, budget 110KiB"]["note"]
    assert "| memopt, budget 4.5GiB | ok |" in (tmp_path / "gpu_pipeline.md").read_text()


def test_first_call_plan_goes_under_existing_offloading(monkeypatch: pytest.MonkeyPatch) -> None:
    """What happens on a GPU at the first forward, with CPU-to-CPU offloading standing in for CPU-to-CUDA: the
    denoiser is already offloaded, the planner chooses offloading + chunking, and the chunking hooks end up *inside*
    the re-applied offloading hooks (each block onloaded once per forward)."""
    import collections

    from diffusers.hooks import group_offloading

    from memopt.api import ComponentPlan, _apply_denoiser_plan
    from memopt.hooks.offload import OffloadConfig, apply_offloading, offload_groups
    from memopt.planner import Chunking, plan_denoiser

    spec = get_family("wan")
    model = spec.build({**spec.config("tiny"), "num_layers": 6})
    inputs = spec.make_inputs(model.config, batch_size=2, height=96, width=160, num_frames=5)
    with torch.no_grad():
        reference = trace_memory(model, **inputs)
    offload = OffloadConfig("cpu")
    apply_offloading(model, offload)
    groups = offload_groups(model)
    budget = groups.resident_bytes(False) + reference.peak_bytes * 3 // 4  # below the weights: must offload
    plan = plan_denoiser(model, (), inputs, budget=budget, device="cuda", offload=offload, runtime_overhead_bytes=0,
                         series=[[Chunking()], [Chunking(sequence_chunks=n) for n in (2, 4, 8)]])
    assert plan.offload == offload and plan.chunking.sequence_chunks
    _apply_denoiser_plan(model, ComponentPlan("transformer", "denoiser", groups.total_bytes), plan)
    for block in model.blocks:
        assert block._diffusers_hook._hook_order[-1] == "group_offloading"
    onloads: collections.Counter = collections.Counter()
    original = group_offloading.ModuleGroup.onload_
    monkeypatch.setattr(group_offloading.ModuleGroup, "onload_",
                        lambda group: (onloads.update([type(group.onload_leader).__name__]), original(group))[1])
    with torch.no_grad():
        output = model(**inputs)[0]
    assert onloads == {"WanTransformerBlock": len(model.blocks), "WanTransformer3DModel": 1}
    assert _rel(output, reference.result[0]) <= 1e-5
    memopt.remove_memory_optimizations(model)
    assert placement(model) is None and not model._diffusers_hook._hook_order


def _stable_diffusion_pipeline():
    """A tiny ``StableDiffusionPipeline`` from configs: a UNet (memopt has no sequence plan for UNets), a one-layer CLIP
    text encoder with a character-level tokenizer (no merges, no download), a 4-level VAE (72 x 56 px -> 9 x 7
    latents), DDIM."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    from test_other_families import _unet_2d_condition

    torch.manual_seed(0)
    unet, _ = _unet_2d_condition()
    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    tokenizer = CLIPTokenizer(vocab={token: i for i, token in enumerate(vocab)}, merges=[], model_max_length=32)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=12, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=32, bos_token_id=512, eos_token_id=513, pad_token_id=513))
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8),
                        layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=8, sample_size=128)
    pipe = StableDiffusionPipeline(vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer,
                                   unet=unet.eval(), scheduler=DDIMScheduler(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _controlnet_pipeline(nets: int = 1):
    """The tiny Stable Diffusion pipeline with a ControlNet (SD 1.5's layout shrunk; its conditioning embedding takes
    the 72 x 56 px control image down to the 9 x 7 latents), or a ``MultiControlNetModel`` of ``nets`` of them."""
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    base = _stable_diffusion_pipeline()
    torch.manual_seed(1)
    controlnets = [ControlNetModel(
        in_channels=4, conditioning_channels=3, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, cross_attention_dim=12,
        attention_head_dim=2, conditioning_embedding_out_channels=(8, 8, 8, 16)).eval() for _ in range(nets)]
    with torch.no_grad():  # zero-initialised residual convolutions: with them the ControlNet would change nothing
        for param in (p for net in controlnets for p in net.parameters()):
            if param.numel() > 1 and not param.any():
                param.normal_(std=0.05)
    pipe = StableDiffusionControlNetPipeline(
        vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=base.unet,
        controlnet=controlnets[0] if nets == 1 else controlnets, scheduler=base.scheduler, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _controlnet_latents(pipe) -> torch.Tensor:
    image = torch.rand(1, 3, 72, 56, generator=torch.Generator().manual_seed(2))
    images = [image, image.flip(2)] if "Multi" in type(pipe.controlnet).__name__ else image
    with torch.no_grad():
        return pipe(["a red cat", "a much longer prompt here"], image=images, negative_prompt=["", "blurry"],
                    height=72, width=56, num_inference_steps=2, guidance_scale=5.0, output_type="latent",
                    generator=torch.Generator().manual_seed(0)).images


def test_a_controlnet_is_planned_like_a_denoiser() -> None:
    """A pipeline's ControlNet runs every step: it is planned at its first forward like the denoiser, so its own
    activations (here its conditioning embedding at the control image's resolution, 1 MiB against the UNet's 0.4)
    are in the budget. Exact, removed bit for bit; a budget its activations do not fit in is refused, naming it; one
    that cannot be simulated runs unplanned. A MultiControlNetModel (built from its nets, no config to simulate)
    stands for its nets: each is planned."""
    pipe = _controlnet_pipeline()
    reference = _controlnet_latents(pipe)
    weights = sum(module_bytes(module) for module in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.controlnet))
    plan = memopt.apply_memory_optimizations(pipe, budget=weights + 2 * 1024**2)
    assert _rel(_controlnet_latents(pipe), reference) <= 1e-5
    assert plan.components["controlnet"].denoiser is not None and plan.components["unet"].denoiser is not None
    memopt.remove_memory_optimizations(pipe)
    assert torch.equal(_controlnet_latents(pipe), reference)

    memopt.apply_memory_optimizations(pipe, budget=weights + 600 * 1024)  # the UNet's 0.4 MiB fit, not the 1 MiB
    with pytest.raises(BudgetError, match="ControlNetModel: nothing fits .* controlnet_cond_embedding"):
        _controlnet_latents(pipe)
    assert torch.equal(_controlnet_latents(pipe), reference)  # memopt removed itself

    # A ControlNet that cannot be simulated (Z-Image's takes modules from its transformer after construction; here
    # one module attached likewise) runs as placed, with a warning: the pipeline goes on, the UNet planned.
    pipe.controlnet.attached = torch.nn.Identity()
    plan = memopt.apply_memory_optimizations(pipe, budget=weights + 2 * 1024**2)
    assert _rel(_controlnet_latents(pipe), reference) <= 1e-5
    assert plan.components["controlnet"].action.endswith("not planned: its forward cannot be simulated")
    assert plan.components["unet"].denoiser is not None
    memopt.remove_memory_optimizations(pipe)
    del pipe.controlnet.attached

    multi = _controlnet_pipeline(nets=2)
    reference = _controlnet_latents(multi)
    plan = memopt.apply_memory_optimizations(multi, budget=weights * 2 + 2 * 1024**2)
    assert _rel(_controlnet_latents(multi), reference) <= 1e-5
    assert "controlnet" not in plan.components
    assert all(plan.components[f"controlnet.nets.{index}"].denoiser is not None for index in range(2))
    memopt.remove_memory_optimizations(multi)
    assert torch.equal(_controlnet_latents(multi), reference)


def test_unet_pipeline_is_planned_with_what_applies_to_it() -> None:
    """A UNet denoiser (Stable Diffusion): at a budget that needs chunking the planner shards its FeedForwards (no
    sequence plan), the latents match the unmodified pipeline's, and removal restores them bit for bit."""
    pipe = _stable_diffusion_pipeline()

    def latents() -> torch.Tensor:
        with torch.no_grad():
            return pipe(["a red cat", "a much longer prompt here"], negative_prompt=["", "blurry"], height=72,
                        width=56, num_inference_steps=2, guidance_scale=5.0, output_type="latent",
                        generator=torch.Generator().manual_seed(0)).images

    reference = latents()
    weights = sum(module_bytes(module) for module in (pipe.unet, pipe.vae, pipe.text_encoder))
    unet_inputs = dict(sample=torch.randn(4, 4, 9, 7), timestep=torch.tensor(500),
                       encoder_hidden_states=torch.randn(4, 32, 12))
    with torch.no_grad():
        activations = trace_memory(pipe.unet, **unet_inputs).peak_bytes
    plan = memopt.apply_memory_optimizations(pipe, budget=weights + activations * 6 // 10)
    assert _rel(latents(), reference) <= 1e-5
    denoiser = plan.components["unet"].denoiser
    assert denoiser is not None and denoiser.chunking.feedforward_chunks and not denoiser.chunking.sequence_chunks
    assert memopt.remove_memory_optimizations(pipe) > 0
    assert torch.equal(latents(), reference)


def test_sana_pipeline_is_planned_with_streamed_blocks() -> None:
    """A tiny ``SanaPipeline`` from configs (a two-stage DC-AE, prompt embeddings passed directly): at half the
    transformer's unmodified activation peak the plan streams its blocks (Sana has no K/V plan), and the latents
    match the unmodified pipeline's."""
    from diffusers import AutoencoderDC, SanaPipeline

    torch.manual_seed(0)
    vae = AutoencoderDC(in_channels=3, latent_channels=4, attention_head_dim=2,
                        encoder_block_types=("ResBlock", "EfficientViTBlock"),
                        decoder_block_types=("ResBlock", "EfficientViTBlock"), encoder_block_out_channels=(8, 8),
                        decoder_block_out_channels=(8, 8), encoder_qkv_multiscales=((), (5,)),
                        decoder_qkv_multiscales=((), (5,)), encoder_layers_per_block=(1, 1),
                        decoder_layers_per_block=(1, 1), downsample_block_type="conv",
                        upsample_block_type="interpolate", decoder_norm_types="rms_norm", decoder_act_fns="silu",
                        scaling_factor=0.41407).eval()
    pipe = SanaPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=get_family("sana").build("tiny"),
                        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    generator = torch.Generator().manual_seed(0)
    embeds = {"prompt_embeds": torch.randn(1, 8, 24, generator=generator),
              "negative_prompt_embeds": torch.randn(1, 8, 24, generator=generator),
              "prompt_attention_mask": torch.ones(1, 8, dtype=torch.long),
              "negative_prompt_attention_mask": torch.ones(1, 8, dtype=torch.long)}

    def generate() -> torch.Tensor:
        return pipe(negative_prompt=None, **embeds, height=64, width=96, num_inference_steps=2, output_type="latent",
                    use_resolution_binning=False, generator=torch.Generator().manual_seed(1), return_dict=False)[0]

    reference = generate()
    inputs = get_family("sana").make_inputs(pipe.transformer.config, batch_size=2, height=64 * 16, width=96 * 16,
                                            text_tokens=8)  # the DC-AE here is 2x, the zoo's sizes assume 32x
    assert inputs["hidden_states"].shape[-2:] == reference.shape[-2:]
    with torch.no_grad():
        trace = trace_memory(pipe.transformer, **inputs)
    other = sum(module_bytes(m) for name, m in _components(pipe).items() if name != "transformer")
    budget = other + trace.baseline_bytes + trace.peak_bytes // 2
    plan = memopt.apply_memory_optimizations(pipe, budget=budget)
    latents = generate()
    chunking = plan.components["transformer"].denoiser.chunking
    assert chunking.sequence_chunks and plan.predicted_peak_bytes <= budget
    assert _rel(latents, reference) <= 1e-5
    memopt.remove_memory_optimizations(pipe)
    assert torch.equal(generate(), reference)


def test_a_transformer_under_another_component_name_is_planned_as_a_denoiser() -> None:
    """Ideogram 4's pipeline runs a second full-size transformer, ``unconditional_transformer``, at every step: a
    denoiser like ``transformer`` (it was "other", kept resident whole). Both are planned at their first call into a
    budget that needs chunking, exact, and removal restores them bit for bit."""
    from diffusers import Ideogram4Pipeline

    spec = get_family("ideogram4")
    pipe = Ideogram4Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None,
                             tokenizer=None, transformer=spec.build("tiny", seed=0),
                             unconditional_transformer=spec.build("tiny", seed=1))
    inputs = spec.make_inputs(pipe.transformer.config, batch_size=2, masked=True)

    def predictions() -> list[torch.Tensor]:
        with torch.no_grad():
            return [pipe.transformer(**inputs)[0], pipe.unconditional_transformer(**inputs)[0]]

    reference = predictions()
    with torch.no_grad():
        traced = trace_memory(pipe.transformer, **inputs)
    weights = module_bytes(pipe.transformer) + module_bytes(pipe.unconditional_transformer)
    inputs_bytes = traced.baseline_bytes - module_bytes(pipe.transformer)
    plan = memopt.apply_memory_optimizations(pipe, budget=weights + inputs_bytes + int(0.85 * traced.peak_bytes))
    assert all(_rel(out, ref) <= 1e-5 for out, ref in zip(predictions(), reference))
    for name in ("transformer", "unconditional_transformer"):
        component = plan.components[name]
        assert component.kind == "denoiser" and not component.denoiser.chunking.is_empty, (name, str(plan))
    assert memopt.remove_memory_optimizations(pipe) > 0
    assert all(torch.equal(out, ref) for out, ref in zip(predictions(), reference))
