"""Chunked FeedForward hooks: exactness against the unmodified diffusers models, memory, plans, LoRA, offloading."""

from __future__ import annotations

import importlib
import pathlib
import sys
import types

import pytest
import torch
from diffusers import Flux2Transformer2DModel
from diffusers.hooks import HookRegistry
from diffusers.models.attention import FeedForward, LuminaFeedForward
from diffusers.models.transformers.transformer_flux2 import Flux2FeedForward
from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoTokenReplaceSingleTransformerBlock

from memopt import apply_chunked_feedforward, remove_memory_optimizations, trace_memory
from memopt.hooks import feedforward as ff_hooks
from memopt.hooks.feedforward import FEEDFORWARD_HOOK, FeedForwardReport, split_sizes
from memopt.models import FAMILIES, Size, get_family
from memopt.plans import expand_plan, feedforward_plan

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from _tiny_cases import OffloadLike, latent_key, prediction  # noqa: E402

# Mochi's rope runs under a CPU fp32 autocast that torch disables with a warning; nothing memopt does.
pytestmark = pytest.mark.filterwarnings("ignore:In CPU autocast:UserWarning")

# Pixel sizes giving odd token counts at the tiny configs.
SIZES = {
    "wan": dict(height=48, width=80, num_frames=9),
    "wan_vace": dict(height=48, width=80, num_frames=9),
    "chronoedit": dict(height=48, width=80, num_frames=9),
    "skyreels_v2": dict(height=48, width=80, num_frames=9),
    "helios": dict(height=48, width=80, num_frames=9),
    "flux": dict(height=48, width=80),
    "flux2": dict(height=48, width=80),
    "chroma": dict(height=48, width=80),
    "hunyuanvideo": dict(height=48, width=80, num_frames=9),
    "hunyuanvideo_i2v": dict(height=48, width=80, num_frames=9),
    "hunyuanvideo15": dict(height=80, width=112, num_frames=9),
    "hunyuanimage": dict(height=160, width=224),
    "cogvideox": dict(height=48, width=80, num_frames=9),
    "cogview4": dict(height=48, width=80),
    "ltx": dict(height=96, width=160, num_frames=17),
    "ltx2": dict(height=96, width=160, num_frames=17),
    "qwenimage": dict(height=48, width=80),
    "sd3": dict(height=48, width=80),
    "mochi": dict(height=48, width=80, num_frames=13),
    "zimage": dict(height=80, width=112),
    "kandinsky5": dict(height=48, width=80, num_frames=9),
    "minimax_h3": dict(height=96, width=96, num_frames=22),
    "qwenimage21": dict(height=64, width=96),
    "flux3": dict(height=48, width=80),
    "auraflow": dict(height=80, width=112),
    "pixart": dict(height=48, width=80),
    "allegro": dict(height=80, width=112, num_frames=1),
    "easyanimate": dict(height=48, width=80, num_frames=9),
    "consisid": dict(height=48, width=80, num_frames=9),
    "cosmos": dict(height=48, width=80, num_frames=9),
    "motif_video": dict(height=48, width=80, num_frames=9),
    "krea2": dict(height=80, width=112),
    "ideogram4": dict(height=80, width=112),
    "cosmos3_omni": dict(height=80, width=80, num_frames=9),  # 27 video tokens
    "omnigen": dict(height=80, width=112),
    "hidream": dict(height=80, width=80),
    "ernie_image": dict(height=80, width=112),
    "lumina2": dict(height=48, width=80),
    "cogview3plus": dict(height=80, width=112),
    "latte": dict(height=80, width=112, num_frames=3),
    "longcat_image": dict(height=48, width=80),
    "ovis_image": dict(height=48, width=80),
    "bria": dict(height=48, width=80),
    "framepack": dict(height=48, width=80, num_frames=9),
    "wan_animate": dict(height=48, width=80, num_frames=5),
    "kandinsky6": dict(height=48, width=80, num_frames=9),
    "joyimage_edit": dict(height=80, width=112),
    "joyimage_edit_plus": dict(height=80, width=112),
    "bria_fibo": dict(height=80, width=112),
    "bria_fibo2": dict(height=80, width=112),
    "anyflow": dict(height=48, width=80, num_frames=9),
    "glm_image": dict(height=80, width=112),
    "prx": dict(height=80, width=112),
    "hunyuandit": dict(height=80, width=112),
    "dit": dict(height=112, width=112),
    "sana": dict(height=288, width=224),
    "sana_video": dict(height=48, width=80, num_frames=9),
}
# Families whose tiny model has FeedForwards that apply_chunked_feedforward must hook (and how many).
EXPECTED_APPLIED = {"wan": 2, "wan_vace": 3, "chronoedit": 2, "skyreels_v2": 2, "helios": 2, "flux": 4, "flux2": 2,
                    "chroma": 4, "hunyuanvideo": 4, "hunyuanvideo_i2v": 4, "hunyuanvideo15": 5, "hunyuanimage": 3,
                    "cogvideox": 2,
                    "cogview4": 2, "ltx": 2, "ltx2": 4, "qwenimage": 4, "sd3": 3, "mochi": 3, "zimage": 4,
                    "kandinsky5": 3, "minimax_h3": 3, "qwenimage21": 2,
                    "flux3": 5, "auraflow": 4, "pixart": 2, "bria": 4,
                    "framepack": 4, "wan_animate": 3, "allegro": 2,
                    "easyanimate": 3, "longcat_image": 4, "ovis_image": 2,
                    "consisid": 2, "cosmos": 2, "motif_video": 2, "krea2": 4,
                    "hidream": 16, "ernie_image": 2, "lumina2": 4, "cogview3plus": 2, "latte": 2,
                    "kandinsky6": 6, "joyimage_edit": 4, "joyimage_edit_plus": 4, "bria_fibo": 2, "bria_fibo2": 4,
                    "anyflow": 2, "glm_image": 4,  # GLM-Image: its glyph and prior projectors, one per block
                    "prx": 0,  # PRX: the MLP is inline in the block's forward
                    "ideogram4": 2, "cosmos3_omni": 4,  # Cosmos 3: each layer's text and generation MLPs
                    "omnigen": 2,
                    "hunyuandit": 4, "dit": 2, "sana": 2, "sana_video": 2}
# Families whose FeedForwards are GLU convolutions: split="sequence" skips them (the convolution mixes neighbours).
CONVOLUTIONAL = {"sana", "sana_video"}


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def build(name: str, dtype: torch.dtype = torch.float32, batch_size: int = 2):
    spec = get_family(name)
    model = spec.build("tiny", dtype=dtype)
    inputs = spec.make_inputs(model.config, batch_size=batch_size, dtype=dtype, masked=spec.mask_key is not None,
                              **SIZES[name])
    return model, inputs


def forward(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return prediction(model(**inputs))


def forward_backward(model: torch.nn.Module, inputs: dict) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Output, latent-input grad (flattened) and parameter grads of ``(out * fixed random weights).sum()``."""
    model.zero_grad(set_to_none=True)
    key = latent_key(inputs)
    latents = inputs[key] if isinstance(inputs[key], list) else [inputs[key]]
    leaves = [t.detach().clone().requires_grad_(True) for t in latents]
    out = prediction(model(**{**inputs, key: leaves if isinstance(inputs[key], list) else leaves[0]}))
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    (out * weights).sum().backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    return out.detach(), torch.cat([t.grad.flatten() for t in leaves]), grads


def test_sizes_give_odd_token_counts():
    assert set(SIZES) == set(FAMILIES)
    for name, size in SIZES.items():
        spec = get_family(name)
        assert spec.num_tokens(spec.config("tiny"), Size(**size)) % 2 == 1, name


# ------------------------------------------------------------------------------------------------ exactness
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_forward_matches_unmodified_model(name):
    model, inputs = build(name)
    reference = forward(model, inputs)
    for split, num_chunks in [("hidden", 3), ("hidden", 8), ("sequence", 5)]:
        expected = 0 if split == "sequence" and name in CONVOLUTIONAL else EXPECTED_APPLIED[name]
        report = apply_chunked_feedforward(model, num_chunks=num_chunks, split=split)
        assert len(report.applied) == expected, str(report)
        chunked = forward(model, inputs)
        assert remove_memory_optimizations(model) == expected
        assert rel_err(chunked, reference) <= 1e-5, (split, num_chunks)
    assert torch.equal(forward(model, inputs), reference)  # removal restores the original forward bit for bit


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_gradients_match_unmodified_model(name):
    model, inputs = build(name)
    out_ref, x_grad_ref, grads_ref = forward_backward(model, inputs)
    for split, num_chunks, recompute in [("hidden", 3, False), ("hidden", 4, True), ("sequence", 6, True)]:
        apply_chunked_feedforward(model, num_chunks=num_chunks, split=split, recompute=recompute)
        out, x_grad, grads = forward_backward(model, inputs)
        remove_memory_optimizations(model)
        assert rel_err(out, out_ref) <= 1e-5
        assert rel_err(x_grad, x_grad_ref) <= 1e-5
        assert grads.keys() == grads_ref.keys()
        everything = torch.cat([g.flatten() for g in grads.values()])
        assert rel_err(everything, torch.cat([g.flatten() for g in grads_ref.values()])) <= 1e-5
        for param_name, grad in grads.items():  # the FeedForward weights themselves, one by one
            if any(key in param_name for key in (".ff.", ".ffn.", "_mlp.", "proj_mlp", "proj_out")):
                assert rel_err(grad, grads_ref[param_name]) <= 1e-5, (split, recompute, param_name)


@pytest.mark.parametrize("name", ["wan", "flux", "mochi"])
@pytest.mark.parametrize("accumulate_dtype", [None, torch.float32])
def test_bf16_matches_unmodified_model(name, accumulate_dtype):
    model, inputs = build(name, dtype=torch.bfloat16)
    reference = forward(model, inputs)
    for split in ("hidden", "sequence"):
        apply_chunked_feedforward(model, num_chunks=4, split=split, accumulate_dtype=accumulate_dtype)
        chunked = forward(model, inputs)
        remove_memory_optimizations(model)
        assert chunked.dtype == torch.bfloat16
        assert rel_err(chunked, reference) <= 1e-2


@pytest.mark.parametrize(
    "make",
    [
        lambda: FeedForward(24, inner_dim=40, activation_fn="gelu"),
        lambda: FeedForward(24, inner_dim=40, activation_fn="gelu-approximate", bias=False),
        lambda: FeedForward(24, inner_dim=40, activation_fn="geglu"),
        lambda: FeedForward(24, inner_dim=40, activation_fn="geglu-approximate"),
        lambda: FeedForward(24, dim_out=16, inner_dim=40, activation_fn="swiglu", final_dropout=True),
        lambda: FeedForward(24, mult=2, activation_fn="linear-silu"),
        lambda: LuminaFeedForward(24, inner_dim=40, multiple_of=8),
        lambda: Flux2FeedForward(24, inner_dim=40),
    ],
    ids=["gelu", "gelu-tanh-nobias", "geglu", "geglu-approximate", "swiglu-final-dropout", "linear-silu", "lumina",
         "flux2"],
)
@pytest.mark.parametrize("split", ["hidden", "sequence"])
def test_every_feedforward_kind(make, split):
    torch.manual_seed(0)
    ff = make().eval()
    x = torch.randn(2, 37, 24, requires_grad=True)
    out_ref = ff(x)
    grad_ref = torch.autograd.grad(out_ref.square().sum(), [x, *ff.parameters()])
    report = apply_chunked_feedforward(ff, num_chunks=3, split=split)
    assert report.applied == [type(ff).__name__] and report.plan_source.startswith("module types")
    out = ff(x)
    grad = torch.autograd.grad(out.square().sum(), [x, *ff.parameters()])
    assert rel_err(out, out_ref) <= 1e-5
    for g, g_ref in zip(grad, grad_ref):
        assert rel_err(g, g_ref) <= 1e-5


def test_hunyuan_token_replace_single_block():
    torch.manual_seed(0)
    block = HunyuanVideoTokenReplaceSingleTransformerBlock(num_attention_heads=2, attention_head_dim=16).eval()
    args = (torch.randn(2, 21, 32), torch.randn(2, 7, 32), torch.randn(2, 32))
    kwargs = dict(token_replace_emb=torch.randn(2, 32), num_tokens=5)
    with torch.no_grad():
        reference = block(*args, **kwargs)
        apply_chunked_feedforward(block, num_chunks=5, split="hidden")
        chunked = block(*args, **kwargs)
    for a, b in zip(chunked, reference):
        assert rel_err(a, b) <= 1e-5


# ------------------------------------------------------------------------------------------------ memory
L, D, F_WIDTH, FP32 = 8192, 1024, 4096, 4
INTERMEDIATE = L * F_WIDTH * FP32  # one (L, F) fp32 tensor: 128 MiB
OUTPUT = L * D * FP32  # 32 MiB


@pytest.fixture(scope="module")
def big_feedforward():
    torch.manual_seed(0)
    return FeedForward(D, inner_dim=F_WIDTH, activation_fn="gelu-approximate").eval(), torch.randn(1, L, D)


def test_memory_hidden_split_exact_bytes(big_feedforward):
    """Original: pre-activation and activation, both (L, F), live together at the GELU: 2 x intermediate.

    Chunked (hidden, n shards): the (L, D) output buffer (created by shard 0's addmm with the bias) plus one shard's
    (L, F/n) pre-activation, activated in place and summed into the buffer by ``addmm_``: output + intermediate / n.
    That is below the bound 2/n x intermediate + output + one output-sized partial.
    """
    ff, x = big_feedforward
    with torch.no_grad():
        original = trace_memory(ff, x)
        assert original.peak_bytes == 2 * INTERMEDIATE == 268_435_456
        for num_chunks in (4, 3):
            apply_chunked_feedforward(ff, num_chunks=num_chunks, split="hidden")
            chunked = trace_memory(ff, x)
            remove_memory_optimizations(ff)
            widest_shard = -(-F_WIDTH // num_chunks)
            expected = OUTPUT + L * widest_shard * FP32
            assert chunked.peak_bytes == expected, num_chunks
            assert chunked.peak_bytes <= 2 * INTERMEDIATE // num_chunks + 2 * OUTPUT
    assert (4, 67_108_864) == (4, OUTPUT + INTERMEDIATE // 4)


def test_memory_sequence_split_exact_bytes(big_feedforward):
    """Sequence split into 8: the output buffer plus one chunk's (L/8, F) intermediate, activated in place and
    written into the buffer's rows with ``addmm(out=)``: output + intermediate / 8 = 48 MiB."""
    ff, x = big_feedforward
    apply_chunked_feedforward(ff, num_chunks=8, split="sequence")
    with torch.no_grad():
        chunked = trace_memory(ff, x)
    remove_memory_optimizations(ff)
    assert chunked.peak_bytes == OUTPUT + INTERMEDIATE // 8 == 50_331_648


def test_memory_swiglu_hidden_split_exact_bytes():
    """SwiGLU (Mochi): the original holds the (L, 2F) projection, silu(gate) and the product: 4 x intermediate.
    Chunked: output + the shard's value and gate (each L x F/n), silu and the product done in place."""
    l, d, f = 2048, 256, 1024
    ff = FeedForward(d, inner_dim=f, activation_fn="swiglu", bias=False).eval()
    x = torch.randn(1, l, d)
    with torch.no_grad():
        assert trace_memory(ff, x).peak_bytes == 4 * l * f * FP32
        apply_chunked_feedforward(ff, num_chunks=4)
        assert trace_memory(ff, x).peak_bytes == l * d * FP32 + 2 * l * (f // 4) * FP32


def test_recompute_saves_only_inputs_for_backward():
    """With grad enabled, what a forward leaves alive (output + what autograd saved) drops from every shard's
    pre-activation and activation to the output alone when each shard is recomputed in backward."""
    l, d, f = 1024, 64, 256
    torch.manual_seed(0)
    ff = FeedForward(d, inner_dim=f, activation_fn="gelu-approximate").eval()
    x = torch.randn(1, l, d, requires_grad=True)

    def kept_after_forward() -> int:
        holder = []
        trace = trace_memory(lambda: holder.append(ff(x)))
        return trace.live_bytes[-1]

    output = l * d * FP32
    assert kept_after_forward() == output + 2 * l * f * FP32  # saved: pre-activation, activation
    apply_chunked_feedforward(ff, num_chunks=4, recompute=False)
    assert kept_after_forward() == output + 2 * l * f * FP32  # every shard's, together as much
    remove_memory_optimizations(ff)
    apply_chunked_feedforward(ff, num_chunks=4, recompute=True)
    assert kept_after_forward() == output


# ------------------------------------------------------------------------------------------------ errors, apply/remove
def test_bad_options_raise_clear_errors():
    model, inputs = build("wan")
    with pytest.raises(ValueError, match="blocks.0.ffn: num_chunks=81 is larger than the FeedForward's"):
        apply_chunked_feedforward(model, num_chunks=81)  # tiny Wan: F = 80
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="num_chunks must be a positive int"):
            apply_chunked_feedforward(model, num_chunks=bad)
    with pytest.raises(ValueError, match="split must be one of"):
        apply_chunked_feedforward(model, split="heads")
    with pytest.raises(ValueError, match="kernel must be one of"):
        apply_chunked_feedforward(model, kernel="cuda")
    assert not any(hasattr(m, "_diffusers_hook") and m._diffusers_hook.hooks for m in model.modules())
    apply_chunked_feedforward(model, num_chunks=91, split="sequence")  # 2 x 45 = 90 token rows
    with pytest.raises(ValueError, match=r"blocks.0.ffn: num_chunks=91 is larger than the 90 token rows"):
        forward(model, inputs)


def test_apply_twice_is_an_error_and_remove_restores_exactly(tmp_path):
    model, inputs = build("flux")
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    reference = forward(model, inputs)
    apply_chunked_feedforward(model, num_chunks=3)
    assert model.transformer_blocks[0].ff._diffusers_hook.get_hook(FEEDFORWARD_HOOK) is not None
    with pytest.raises(RuntimeError, match="already has memopt's chunked FeedForward hook"):
        apply_chunked_feedforward(model, num_chunks=2, split="sequence")
    state_applied = model.state_dict()
    assert state_applied.keys() == state_before.keys()
    assert all(torch.equal(state_applied[k], v) and state_applied[k].dtype == v.dtype for k, v in state_before.items())
    model.save_pretrained(tmp_path)  # works with hooks in place
    reloaded = type(model).from_pretrained(tmp_path)
    assert all(torch.equal(reloaded.state_dict()[k], v) for k, v in state_before.items())
    assert remove_memory_optimizations(model) == 4
    assert torch.equal(forward(model, inputs), reference)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state_before.items())
    apply_chunked_feedforward(model, num_chunks=2)  # applicable again after removal
    assert rel_err(forward(model, inputs), reference) <= 1e-5


def test_weights_are_views_not_copies():
    """No parameter is replaced or copied: same storages before and after apply, and the kernel-free path reads
    them at call time (mutating a weight after apply changes the chunked output exactly like the original)."""
    model, inputs = build("wan")
    pointers = {name: p.data_ptr() for name, p in model.named_parameters()}
    apply_chunked_feedforward(model, num_chunks=3)
    assert pointers == {name: p.data_ptr() for name, p in model.named_parameters()}
    with torch.no_grad():
        model.blocks[0].ffn.net[2].weight.mul_(2)
    chunked = forward(model, inputs)
    remove_memory_optimizations(model)
    assert rel_err(chunked, forward(model, inputs)) <= 1e-5


def test_report_is_readable():
    model, _ = build("hunyuanvideo")
    report = apply_chunked_feedforward(model, num_chunks=2)
    text = str(report)
    assert isinstance(report, FeedForwardReport)
    assert "split='hidden', num_chunks=2" in text and "single_transformer_blocks.*  x2" in text
    assert "context_embedder.token_refiner.refiner_blocks.*.ff  x1: not in the plan" in text
    assert report.skipped["context_embedder.token_refiner.refiner_blocks.0.ff"].startswith("not in the plan")


def test_split_sizes_uneven_last_smaller():
    assert split_sizes(10, 4) == [(0, 3), (3, 6), (6, 8), (8, 10)]
    assert split_sizes(5, 5) == [(i, i + 1) for i in range(5)]


# ------------------------------------------------------------------------------------------------ plans
def test_plans_come_from_diffusers_tp_plan_where_it_exists():
    flux, _ = build("flux")
    plan, source = feedforward_plan(flux)
    assert source == "FluxTransformer2DModel._tp_plan"
    expanded = expand_plan(flux, plan)
    assert expanded["single_transformer_blocks.1.proj_mlp"] == "colwise"
    assert type(expanded["single_transformer_blocks.1.proj_out"]).__name__ == "PackedRowwiseParallel"
    wan, _ = build("wan")
    assert feedforward_plan(wan)[1] == "memopt.plans.FEEDFORWARD_PLANS['WanTransformer3DModel']"


def test_custom_plan_selects_modules_and_wrong_styles_are_skipped():
    model, inputs = build("flux")
    only_ff = {"transformer_blocks.*.ff.net.0.proj": "colwise", "transformer_blocks.*.ff.net.2": "rowwise"}
    report = apply_chunked_feedforward(model, num_chunks=2, plan=only_ff)
    assert report.applied == ["transformer_blocks.0.ff"]
    assert set(report.skipped) == {"transformer_blocks.0.ff_context", "single_transformer_blocks.0",
                                   "single_transformer_blocks.1"}
    remove_memory_optimizations(model)
    mochi, _ = build("mochi")
    wrong = {"transformer_blocks.*.ff.net.0.proj": "colwise", "transformer_blocks.*.ff.net.2": "rowwise"}
    report = apply_chunked_feedforward(mochi, num_chunks=2, plan=wrong)  # SwiGLU needs the (value, gate) halves packed
    assert report.applied == []
    assert "but this module's layout needs ('colwise', (85, 85))" in report.skipped["transformer_blocks.0.ff"]


def test_flux2_tp_plan_packed_swiglu():
    """Flux2 (not in the zoo) shards its gate-first SwiGLU FeedForwards by its own `_tp_plan` (PackedColwise [1, 1])."""
    torch.manual_seed(0)
    model = Flux2Transformer2DModel(in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
                                    num_attention_heads=2, joint_attention_dim=24, timestep_guidance_channels=16,
                                    axes_dims_rope=(4, 4, 4, 4)).eval()
    batch, tokens, text = 2, 15, 8
    inputs = dict(hidden_states=torch.randn(batch, tokens, 16), encoder_hidden_states=torch.randn(batch, text, 24),
                  timestep=torch.full((batch,), 0.5), img_ids=torch.zeros(tokens, 4), txt_ids=torch.zeros(text, 4),
                  guidance=torch.full((batch,), 3.5), return_dict=False)
    reference = forward(model, inputs)
    report = apply_chunked_feedforward(model, num_chunks=5)
    assert report.plan_source == "Flux2Transformer2DModel._tp_plan"
    assert report.applied == ["transformer_blocks.0.ff", "transformer_blocks.0.ff_context"]
    assert rel_err(forward(model, inputs), reference) <= 1e-5


# ------------------------------------------------------------------------------------------------ LoRA
def test_lora_adapters_are_split_through():
    from peft import LoraConfig

    model, inputs = build("flux")
    model.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                 target_modules=["net.0.proj", "net.2", "proj_mlp", "proj_out"]))
    out_ref, x_grad_ref, grads_ref = forward_backward(model, inputs)
    for split, recompute in [("hidden", False), ("hidden", True), ("sequence", False)]:
        report = apply_chunked_feedforward(model, num_chunks=3, split=split, recompute=recompute)
        assert len(report.applied) == 4 and not report.skipped
        out, x_grad, grads = forward_backward(model, inputs)
        remove_memory_optimizations(model)
        assert rel_err(out, out_ref) <= 1e-5 and rel_err(x_grad, x_grad_ref) <= 1e-5
        for name in grads_ref:
            if "lora_" in name:
                assert rel_err(grads[name], grads_ref[name]) <= 1e-5, name


def test_dora_is_skipped_with_a_reason():
    from peft import LoraConfig

    model, inputs = build("flux")
    model.add_adapter(LoraConfig(r=4, target_modules=["net.0.proj", "net.2"], use_dora=True))
    reference = forward(model, inputs)
    report = apply_chunked_feedforward(model, num_chunks=3)
    assert report.applied == ["single_transformer_blocks.0", "single_transformer_blocks.1"]
    assert "DoraLinearVariant" in report.skipped["transformer_blocks.0.ff"]
    assert rel_err(forward(model, inputs), reference) <= 1e-5


# ------------------------------------------------------------------------------------------------ offloading
@pytest.mark.parametrize("order", ["offload_first", "memopt_first"])
def test_param_data_swapping_hooks_are_honoured(order):
    """Leaf hooks on the FeedForward linears (like leaf-level group offloading) and hooks on a Flux single block
    registered before memopt's (like block-level group offloading) run around the chunked computation."""
    model, inputs = build("flux")
    reference = forward(model, inputs)
    targets = [m for name, m in model.named_modules() if name.endswith(("ff.net.0.proj", "ff.net.2"))]
    targets += list(model.single_transformer_blocks)
    if order == "memopt_first":
        apply_chunked_feedforward(model, num_chunks=3)
    for module in targets:
        HookRegistry.check_if_exists_or_initialize(module).register_hook(OffloadLike(), "offload_like")
    if order == "offload_first":
        apply_chunked_feedforward(model, num_chunks=3)
    assert rel_err(forward(model, inputs), reference) <= 1e-5


def test_diffusers_group_offloading_leaf_level():
    model, inputs = build("hunyuanvideo")
    reference = forward(model, inputs)
    cpu = torch.device("cpu")
    model.enable_group_offload(onload_device=cpu, offload_device=cpu, offload_type="leaf_level")
    report = apply_chunked_feedforward(model, num_chunks=4)
    assert len(report.applied) == 4
    assert rel_err(forward(model, inputs), reference) <= 1e-5


def test_composes_with_sequence_chunking(caplog):
    """FeedForward hooks first, then memopt's sequence chunking (the planner's order): its skip hooks on the single
    blocks' proj_mlp only stand in for outputs a pass never reads, so the FeedForward still runs chunked."""
    from memopt.hooks.sequence import apply_sequence_chunking

    model, inputs = build("flux")
    reference = forward(model, inputs)
    apply_chunked_feedforward(model, num_chunks=3)
    apply_sequence_chunking(model, num_chunks=3)
    with caplog.at_level("WARNING", logger="memopt.hooks.feedforward"):
        assert rel_err(forward(model, inputs), reference) <= 1e-5
    assert "runs unchunked" not in caplog.text


def test_after_sequence_chunking_the_single_blocks_are_skipped_with_advice(caplog):
    """The other order: the sequence hook already replaces the Flux single blocks' forwards, which hold their
    FeedForward path inline, so those blocks are skipped at apply time with the reason (not a warning per call)."""
    from memopt.hooks.sequence import apply_sequence_chunking

    model, inputs = build("flux")
    reference = forward(model, inputs)
    apply_sequence_chunking(model, num_chunks=3)
    report = apply_chunked_feedforward(model, num_chunks=3)
    assert report.applied == ["transformer_blocks.0.ff", "transformer_blocks.0.ff_context"]
    assert report.skipped["single_transformer_blocks.1"] == (
        "the hook 'memopt.sequence', registered before, replaces its forward; apply the FeedForward hooks first to "
        "have both")
    with caplog.at_level("WARNING", logger="memopt.hooks.feedforward"):
        assert rel_err(forward(model, inputs), reference) <= 1e-5
    assert "runs unchunked" not in caplog.text


# ------------------------------------------------------------------------------------------------ kernel option
def test_kernel_triton_without_gpu_is_a_clear_error():
    model, inputs = build("wan")
    apply_chunked_feedforward(model, num_chunks=2, kernel="triton")
    with pytest.raises(RuntimeError, match="blocks.0.ffn: kernel='triton' cannot run here: .*CUDA"):
        forward(model, inputs)
    remove_memory_optimizations(model)
    with pytest.raises(ValueError, match="kernel='triton' cannot compute this module: activation 'swiglu_fp32'"):
        apply_chunked_feedforward(LuminaFeedForward(16, inner_dim=32, multiple_of=8), kernel="triton")


def test_kernel_receives_the_parameters_themselves(monkeypatch):
    """With a stand-in kernel that is 'available', kernel='triton' passes the model's own weights (views, not
    copies) and the kernel's chunk size; the result is used as the FeedForward's output."""
    from memopt import kernels as real

    calls = []

    def fused_chunked_ffn(x, w1, b1, w2, b2, activation="gelu_tanh", chunk_size=None):
        calls.append((w1, w2, b2, activation, chunk_size))
        return torch.nn.functional.linear(torch.nn.functional.gelu(x @ w1.T + b1, approximate="tanh"), w2, b2)

    stub = types.SimpleNamespace(ACTIVATIONS=real.ACTIVATIONS, fused_chunked_ffn=fused_chunked_ffn,
                                 aligned_chunk_size=real.aligned_chunk_size,
                                 fused_ffn_available=lambda device, dtype=None: real.KernelAvailability(True, "stub"))
    monkeypatch.setattr(ff_hooks, "_kernels", lambda: stub)
    model, inputs = build("wan")
    reference = forward(model, inputs)
    apply_chunked_feedforward(model, num_chunks=3, kernel="triton")
    assert rel_err(forward(model, inputs), reference) <= 1e-5
    w1, w2, b2, activation, chunk_size = calls[0]
    assert w1 is model.blocks[0].ffn.net[0].proj.weight
    assert w2.data_ptr() == model.blocks[0].ffn.net[2].weight.data_ptr()
    assert (activation, chunk_size) == ("gelu_tanh", 32)  # ceil(80 / 3) = 27, rounded up to the kernel's 16


@pytest.fixture
def interpreted_kernels(monkeypatch):
    """memopt's real Triton kernels, under Triton's CPU interpreter when there is no GPU (as tests/kernels does);
    the previous kernel module and environment are restored afterwards."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        yield
        return
    saved = sys.modules.pop("memopt.kernels.fused_ffn", None)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    importlib.import_module("memopt.kernels.fused_ffn")
    try:
        yield
    finally:
        sys.modules.pop("memopt.kernels.fused_ffn", None)
        if saved is not None:
            sys.modules["memopt.kernels.fused_ffn"] = saved


def test_real_kernel_through_the_hook(interpreted_kernels):
    """kernel='triton' runs memopt's fused kernel: Flux has FeedForwards and single blocks (where w2 is a column
    slice of proj_out and the attention columns are added apart), forward and backward, both splits."""
    model, inputs = build("flux")
    out_ref, x_grad_ref, grads_ref = forward_backward(model, inputs)
    for split in ("hidden", "sequence"):
        apply_chunked_feedforward(model, num_chunks=3, split=split, kernel="triton")
        out, x_grad, grads = forward_backward(model, inputs)
        remove_memory_optimizations(model)
        assert rel_err(out, out_ref) <= 1e-5 and rel_err(x_grad, x_grad_ref) <= 1e-5
        assert rel_err(torch.cat([g.flatten() for g in grads.values()]),
                       torch.cat([g.flatten() for g in grads_ref.values()])) <= 1e-5


def test_real_kernel_through_the_hook_with_a_separate_gate_linear(interpreted_kernels):
    """A LLaMA-style MLP (Z-Image: silu(w1) * w3 -> w2) runs on the kernel with w3 as value and w1 as gate."""
    torch.manual_seed(0)
    ff = _diffusers_class("transformers.transformer_z_image.FeedForward")(dim=24, hidden_dim=37).eval()
    x = torch.randn(2, 37, 24, requires_grad=True)
    out_ref = ff(x)
    grad_ref = torch.autograd.grad(out_ref.square().sum(), [x, *ff.parameters()])
    for split in ("hidden", "sequence"):
        apply_chunked_feedforward(ff, num_chunks=3, split=split, kernel="triton")
        out = ff(x)
        grad = torch.autograd.grad(out.square().sum(), [x, *ff.parameters()])
        remove_memory_optimizations(ff)
        assert rel_err(out, out_ref) <= 1e-5
        assert all(rel_err(g, g_ref) <= 1e-5 for g, g_ref in zip(grad, grad_ref))


def test_a_block_registered_as_a_unit_without_its_forward_is_skipped(monkeypatch):
    """A block with attention and norms around its MLP (Chroma's single-stream block) registered as a unit without
    the forward that keeps them: the FeedForward-only forward would compute something else (rel err 1.18 measured),
    so it is skipped and reported."""
    from diffusers.models.transformers.transformer_chroma import ChromaSingleTransformerBlock

    from memopt.hooks import feedforward as hooks

    monkeypatch.delitem(hooks.UNIT_FORWARDS, ChromaSingleTransformerBlock)
    model, inputs = build("chroma")
    reference = forward(model, inputs)
    report = apply_chunked_feedforward(model, num_chunks=2)
    assert len(report.applied) == 2  # the dual-stream block's ff and ff_context
    assert all("UNIT_FORWARDS has no forward" in report.skipped[f"single_transformer_blocks.{i}"] for i in (0, 1))
    assert rel_err(forward(model, inputs), reference) <= 1e-5


# Every FeedForward class memopt knows beyond diffusers' own `FeedForward` family, built small with odd widths.
MORE_UNITS = {
    "transformers.auraflow_transformer_2d.AuraFlowFeedForward": {"dim": 24, "hidden_dim": 40},
    "transformers.transformer_z_image.FeedForward": {"dim": 24, "hidden_dim": 37},
    "controlnets.controlnet_z_image.FeedForward": {"dim": 24, "hidden_dim": 37},
    "transformers.transformer_bria_fibo2.FeedForward": {"dim": 24, "hidden_dim": 37},
    "transformers.transformer_hidream_image.HiDreamImageFeedForwardSwiGLU": {"dim": 24, "hidden_dim": 60,
                                                                            "multiple_of": 7},
    "transformers.transformer_ideogram4.Ideogram4MLP": {"dim": 24, "hidden_dim": 37},
    "transformers.transformer_krea2.Krea2SwiGLU": {"dim": 24, "hidden_dim": 37},
    "transformers.ace_step_transformer.AceStepMLP": {"hidden_size": 24, "intermediate_size": 37},
    "transformers.transformer_qwenimage21.QwenImage21SwiGLUFeedForward": {"hidden_size": 24, "mlp_hidden_size": 37},
    "transformers.transformer_ernie_image.ErnieImageFeedForward": {"hidden_size": 24, "ffn_hidden_size": 37},
    "transformers.transformer_cosmos3.Cosmos3VLTextMLP": {"hidden_size": 24, "intermediate_size": 37},
    "transformers.transformer_omnigen.OmniGenFeedForward": {"hidden_size": 24, "intermediate_size": 37},
    "transformers.transformer_stable_audio3.StableAudio3FeedForward": {"dim": 24, "mult": 1.5},
    "transformers.transformer_flux3.Flux3FeedForward": {"dim": 24, "inner_dim": 37},
    "transformers.transformer_kandinsky.Kandinsky5FeedForward": {"dim": 24, "ff_dim": 37},
    "transformers.transformer_sana_wm.SanaWMMlp": {"in_features": 24, "hidden_features": 37},
    "transformers.transformer_longcat_audio_dit.AudioDiTFeedForward": {"dim": 24, "mult": 1.5},
    "autoencoders.ltx2_diffusion_decoder.LTX2VideoVaeSwiGLU": {"dim": 24, "hidden_dim": 37},
}


def _diffusers_class(name: str) -> type:
    module, _, cls = f"diffusers.models.{name}".rpartition(".")
    return getattr(importlib.import_module(module), cls)


def test_every_registered_feedforward_class_is_tested():
    from memopt.plans.feedforward import _MORE_UNITS

    assert {f"diffusers.models.{name}" for name in MORE_UNITS} == set(_MORE_UNITS)


@pytest.mark.parametrize("name", sorted(MORE_UNITS), ids=lambda name: name.rpartition(".")[2])
@pytest.mark.parametrize("split", ["hidden", "sequence"])
def test_more_diffusers_feedforward_classes(name, split):
    torch.manual_seed(0)
    ff = _diffusers_class(name)(**MORE_UNITS[name]).eval()
    with torch.no_grad():  # SanaWM's and LongCat's default inits are zeros in places; make every weight count
        for param in ff.parameters():
            param.normal_(0, 0.2)
    x = torch.randn(2, 37, 24, requires_grad=True)
    out_ref = ff(x)
    grad_ref = torch.autograd.grad(out_ref.square().sum(), [x, *ff.parameters()])
    state = {k: v.clone() for k, v in ff.state_dict().items()}
    report = apply_chunked_feedforward(ff, num_chunks=3, split=split)
    assert report.applied == [type(ff).__name__] and not report.skipped
    out = ff(x)
    grad = torch.autograd.grad(out.square().sum(), [x, *ff.parameters()])
    assert rel_err(out, out_ref) <= 1e-5
    for g, g_ref in zip(grad, grad_ref):
        assert rel_err(g, g_ref) <= 1e-5
    remove_memory_optimizations(ff)
    assert all(torch.equal(v, state[k]) for k, v in ff.state_dict().items())
    assert torch.equal(ff(x), out_ref)


def test_lora_on_a_gated_mlp_with_separate_linears():
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    ff = _diffusers_class("transformers.transformer_z_image.FeedForward")(dim=24, hidden_dim=37).eval()
    ff = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                            target_modules=["w1", "w2", "w3"]), ff)
    x = torch.randn(2, 37, 24)
    with torch.no_grad():
        reference = ff(x)
        report = apply_chunked_feedforward(ff, num_chunks=3)
        chunked = ff(x)
    assert report.applied and rel_err(chunked, reference) <= 1e-5


@pytest.mark.parametrize("split", ["hidden", "sequence"])
def test_sequential_feedforwards_are_found_by_their_structure(split):
    """``nn.Sequential(Linear(D, F), act, [Dropout,] Linear(F, D)[, Dropout])`` with F > D is a FeedForward (Wan
    Animate 2's blocks hold theirs so); other sequentials (a timestep embedder, a projection) are not, and one inside
    a known unit is computed by that unit."""
    from diffusers.models.transformers.transformer_longcat_audio_dit import AudioDiTFeedForward
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    nn = torch.nn
    model = nn.ModuleDict({
        "mlp": nn.Sequential(nn.Linear(24, 61), nn.GELU(approximate="tanh"), nn.Linear(61, 24)),
        "dropped": nn.Sequential(nn.Linear(24, 50), nn.SiLU(), nn.Dropout(0.0), nn.Linear(50, 24), nn.Dropout(0.0)),
        "embedder": nn.Sequential(nn.Linear(16, 24), nn.SiLU(), nn.Linear(24, 24)),
        "narrow": nn.Sequential(nn.Linear(24, 12), nn.SiLU(), nn.Linear(12, 24)),
        "no_activation": nn.Sequential(nn.Linear(24, 61), nn.Linear(61, 24)),
        "unit": AudioDiTFeedForward(24, mult=2.0),
    }).eval()
    model = inject_adapter_in_model(LoraConfig(r=4, init_lora_weights=False, target_modules=["mlp.0", "mlp.2"]), model)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.2)
    x = torch.randn(2, 37, 24)
    names = ["mlp", "dropped", "narrow", "no_activation", "unit"]
    with torch.no_grad():
        reference = {name: model[name](x) for name in names}
        report = apply_chunked_feedforward(model, num_chunks=3, split=split)
        outputs = {name: model[name](x) for name in names}
    assert sorted(report.applied) == ["dropped", "mlp", "unit"] and not report.skipped
    for name in names:
        assert rel_err(outputs[name], reference[name]) <= 1e-5, name


def test_feedforward_lookalikes_without_a_layout_are_reported():
    from diffusers.models.transformers.transformer_cosmos3 import Cosmos3VLTextMLP
    from diffusers.models.transformers.transformer_hidream_image import MOEFeedForwardSwiGLU
    from diffusers.models.transformers.transformer_sana_wm import GLUMBConvTemp

    torch.manual_seed(0)
    model = torch.nn.ModuleDict({
        "conv_ff": GLUMBConvTemp(24, 37),  # SANA-WM's: convolution wrappers with their own norms and activations
        "relu2": Cosmos3VLTextMLP(24, 37, hidden_act="relu2"),
        "moe": MOEFeedForwardSwiGLU(24, 60, num_routed_experts=2, num_activated_experts=1),
    })
    report = apply_chunked_feedforward(model, num_chunks=3)
    # The mixture is not a FeedForward memopt splits, but its experts and shared expert are.
    assert sorted(report.applied) == ["moe.experts.0", "moe.experts.1", "moe.shared_experts"]
    assert "GLUMBConvTemp" in report.skipped["conv_ff"] and "no FeedForward layout" in report.skipped["conv_ff"]
    assert "relu squared" in report.skipped["relu2"]
    assert "moe" not in report.skipped
    assert "conv_ff" in str(report)


# ------------------------------------------------------------------------------------------------ GLU convolutions
def _glu_convolutions() -> dict[str, tuple[torch.nn.Module, torch.Tensor]]:
    """Sana's GLUMBConv as its blocks build it and as the DC-AE builds it (RMSNorm and residual after the sum), and
    Sana-Video's GLUMBTempConv, at odd sizes with every weight random, on channels-last inputs as the blocks pass."""
    from diffusers.models.transformers.sana_transformer import GLUMBConv
    from diffusers.models.transformers.transformer_sana_video import GLUMBTempConv

    torch.manual_seed(0)
    units = {
        "GLUMBConv": (GLUMBConv(24, 24, 2.5, residual_connection=False), torch.randn(2, 5, 7, 24).permute(0, 3, 1, 2)),
        "GLUMBConv-norm-residual": (GLUMBConv(24, 24, 1.5, norm_type="rms_norm", residual_connection=True),
                                    torch.randn(2, 24, 5, 7)),
        "GLUMBTempConv": (GLUMBTempConv(24, 24, 2.5, residual_connection=False), torch.randn(2, 3, 5, 7, 24)),
    }
    with torch.no_grad():
        for unit, _ in units.values():
            for param in unit.parameters():
                param.normal_(0, 0.2)
    return units


@pytest.mark.parametrize("name", sorted(_glu_convolutions()))
@pytest.mark.parametrize("recompute", [False, True])
def test_glu_convolution_feedforwards_split_their_channels(name, recompute):
    """The depthwise convolution never mixes channels, so the intermediate splits by channels like a linear
    FeedForward's: outputs and every gradient match, and the weights are untouched."""
    ff, x = _glu_convolutions()[name]
    x.requires_grad_(True)
    out_ref = ff(x)
    grad_ref = torch.autograd.grad(out_ref.square().sum(), [x, *ff.parameters()])
    state = {k: v.clone() for k, v in ff.state_dict().items()}
    report = apply_chunked_feedforward(ff, num_chunks=4, recompute=recompute)
    assert report.applied == [type(ff).__name__] and not report.skipped
    with torch.no_grad():
        assert rel_err(ff(x), out_ref) <= 1e-5
    out = ff(x)
    grad = torch.autograd.grad(out.square().sum(), [x, *ff.parameters()])
    assert out.shape == out_ref.shape and rel_err(out, out_ref) <= 1e-5
    for g, g_ref in zip(grad, grad_ref):
        assert rel_err(g, g_ref) <= 1e-5
    remove_memory_optimizations(ff)
    assert all(torch.equal(v, state[k]) for k, v in ff.state_dict().items())


def test_glu_convolution_refuses_what_would_change_it():
    """A sequence split would cut the depthwise convolution's neighbourhoods: skipped with the reason. A LoRA layer
    on one of its convolutions does not split here: skipped at apply, and run unchunked (exact) when added later."""
    from peft import LoraConfig, inject_adapter_in_model

    ff, x = _glu_convolutions()["GLUMBConv"]
    report = apply_chunked_feedforward(ff, num_chunks=4, split="sequence")
    assert not report.applied and "depthwise convolution mixes neighbouring tokens" in report.skipped["GLUMBConv"]
    remove_memory_optimizations(ff)
    with pytest.raises(ValueError, match="GLUMBConv: kernel='triton' cannot compute this module: it is a conv"):
        apply_chunked_feedforward(ff, num_chunks=4, kernel="triton")
    with pytest.raises(ValueError, match="num_chunks=61 is larger than the FeedForward's intermediate width F=60"):
        apply_chunked_feedforward(ff, num_chunks=61)

    apply_chunked_feedforward(ff, num_chunks=4)
    ff = inject_adapter_in_model(LoraConfig(r=4, init_lora_weights=False, target_modules=["conv_inverted"]), ff)
    with torch.no_grad():
        chunked = ff(x)
        remove_memory_optimizations(ff)
        reference = ff(x)
        report = apply_chunked_feedforward(ff, num_chunks=4)
    assert torch.equal(chunked, reference)
    assert "conv_inverted is a peft.tuners.lora.layer.Conv2d, not an nn.Conv2d" in report.skipped["GLUMBConv"]


def test_glu_convolution_memory_exact_bytes():
    """GLUMBConv holds four F-wide maps at once (the SiLU of the 2F-wide up-projection, then the depthwise output
    with silu(gate) and the product): 4 x intermediate. Chunked: the (L, D) output buffer plus one shard's value
    and gate depthwise outputs and its gate projection (3 x F/n), the SiLUs and the product in place; the first
    shard runs before the buffer exists."""
    from diffusers.models.transformers.sana_transformer import GLUMBConv

    d, f, h, w = 64, 160, 64, 64
    ff = GLUMBConv(d, d, 2.5, residual_connection=False).eval()
    x = torch.randn(1, h, w, d).permute(0, 3, 1, 2)
    with torch.no_grad():
        assert trace_memory(ff, x).peak_bytes == 4 * h * w * f * FP32
        for num_chunks in (4, 3):
            widths = [stop - start for start, stop in split_sizes(f, num_chunks)]
            apply_chunked_feedforward(ff, num_chunks=num_chunks)
            assert trace_memory(ff, x).peak_bytes == h * w * FP32 * max(3 * widths[0], d + 3 * max(widths[1:]))
            remove_memory_optimizations(ff)


def test_param_data_swapping_hooks_on_glu_convolutions_are_honoured():
    """Leaf hooks on the convolutions (as leaf-level group offloading puts there) run around the chunked run."""
    ff, x = _glu_convolutions()["GLUMBTempConv"]
    with torch.no_grad():
        reference = ff(x)
        apply_chunked_feedforward(ff, num_chunks=4)
        for conv in (ff.conv_inverted, ff.conv_depth, ff.conv_point, ff.conv_temp):
            HookRegistry.check_if_exists_or_initialize(conv).register_hook(OffloadLike(), "offload_like")
        assert rel_err(ff(x), reference) <= 1e-5
