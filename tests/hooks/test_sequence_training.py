"""Training through sequence-chunked blocks (``apply_sequence_chunking(..., training=True)``): the gradients of the
input and of every parameter match the unmodified model's on every family, the chunked backward really runs, a
training step's memory, and what is refused."""

from __future__ import annotations

import logging

import pytest
import torch
from diffusers.models.embeddings import LabelEmbedding

from memopt import apply_chunked_feedforward, apply_sequence_chunking, remove_memory_optimizations
from memopt.hooks import sequence
from memopt.hooks._common import has_memopt_hooks
from memopt.hooks._sequence_backward import separate_shared_gradients
from memopt.models import get_family
from memopt.trace.growth import activation_growth

from _tiny_cases import FAMILIES, SIZES, chunked_completely, latent_key, prediction, rel_err  # noqa: E402

RECOMPUTED_NODE = "_RecomputedBlockBackward"


def build(family: str, batch_size: int = 2):
    spec = get_family(family)
    model = spec.build("tiny").train()
    inputs = make_inputs(family, model, batch_size)
    return model, inputs, latent_key(inputs)


def make_inputs(family: str, model: torch.nn.Module, batch_size: int) -> dict:
    size = SIZES[family]
    return get_family(family).make_inputs(model.config, batch_size=batch_size, height=size.height, width=size.width,
                                          num_frames=size.num_frames, masked=True)


def recorded_nodes(tensor: torch.Tensor) -> int:
    """How many chunked-block nodes the autograd graph of ``tensor`` holds."""
    seen, stack, count = set(), [tensor.grad_fn], 0
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        count += type(node).__name__ == RECOMPUTED_NODE
        stack.extend(next_node for next_node, _ in node.next_functions)
    return count


def step(model: torch.nn.Module, inputs: dict, key: str) -> dict:
    """One training step: the prediction, the input's and every parameter's gradient, and the chunked nodes."""
    model.zero_grad(set_to_none=True)
    latents = inputs[key]  # Z-Image lineage: a list with one latent per sample
    x = [t.detach().clone().requires_grad_() for t in latents] if isinstance(latents, list) else (
        latents.detach().clone().requires_grad_())
    out = prediction(model(**{**inputs, key: x}))
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(0))
    loss = (out * weights).sum()
    nodes = recorded_nodes(loss)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    grad_x = torch.stack([t.grad for t in x]) if isinstance(x, list) else x.grad
    return {"out": out.detach(), "x": grad_x, "params": grads, "nodes": nodes}


def assert_same_gradients(result: dict, reference: dict, where: str) -> None:
    assert rel_err(result["out"], reference["out"]) <= 1e-5, where
    assert rel_err(result["x"], reference["x"]) <= 1e-5, where
    # Same parameters reached (an unused output's gradient stays None: no zero gradients an optimizer would step on).
    assert result["params"].keys() == reference["params"].keys(), where
    flat = torch.cat([g.flatten() for g in reference["params"].values()])
    assert rel_err(torch.cat([result["params"][n].flatten() for n in reference["params"]]), flat) <= 1e-5, where
    # Per parameter, against its own gradient, or a hundredth of the largest one for gradients that are zero up to
    # rounding (a key bias: softmax ignores it). 2e-4 there: a parameter's gradient can sum terms that cancel, and
    # the CPU's vectorised kernels round a chunk's elements differently from the whole tensor's (their loop tails):
    # measured on an AVX2 machine, Kandinsky 5 at batch 2: 1.2e-5 on its text modulation, 7e-5 on a self-attention
    # query weight (the reference's flash-attention kernel), 1.1e-4 of the floor on the text self-attention's key
    # weight; 1e-6 and below for every parameter with ATEN_CPU_CAPABILITY=default (scalar kernels), on the same
    # chunked computation. Outputs, input gradients and all parameter gradients together stay at 1e-5 (above).
    floor = 1e-2 * max(g.norm().item() for g in reference["params"].values())
    for name, ref in reference["params"].items():
        error = (result["params"][name] - ref).norm().item()
        assert error <= 2e-4 * max(ref.norm().item(), floor), (where, name, error, ref.norm().item())


def without_label_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """DiT's blocks drop class labels at random in training mode (LabelEmbedding.dropout_prob, 0.1): a fresh draw in
    every call, so no two forwards agree; off for the comparison (test_label_dropout_is_refused covers it on)."""
    for module in model.modules():
        if isinstance(module, LabelEmbedding):
            module.dropout_prob = 0.0
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_match_unmodified_model(family, monkeypatch):
    model = without_label_dropout(get_family(family).build("tiny").train())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    # 4 chunks split the 8 text tokens of joint blocks, 16 carry them whole; at batch 1 no per-sample table is
    # reduced over the batch in the backward (the case of separate_shared_gradients). The first runs the skipped
    # projections' unread stand-ins (memopt.hooks._unread, their threshold lowered to these sizes).
    default = sequence.UNREAD_FROM
    for batch_size, num_chunks, unread_from in ((2, 4, 0), (2, 16, default), (1, 4, default)):
        monkeypatch.setattr(sequence, "UNREAD_FROM", unread_from)
        inputs = make_inputs(family, model, batch_size)
        key = latent_key(inputs)
        reference = step(model, inputs, key)
        assert reference["nodes"] == 0
        report = apply_sequence_chunking(model, num_chunks, training=True)
        assert chunked_completely(report, family), report
        result = step(model, inputs, key)
        assert remove_memory_optimizations(model) > 0
        assert result["nodes"] > 0, family  # one per block call (FLUX.3's image-condition block is not called)
        assert_same_gradients(result, reference, f"{family}, batch {batch_size}, {num_chunks} chunks")
    assert not has_memopt_hooks(model)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_head_groups_of_grouped_query_attention():
    """The recorded passes attend in groups of key/value heads (GatheredKeyValues.recorded), each group with the
    query heads that share its keys (enable_gqa) and its heads of the mask: the same output and key/value gradients
    as one call. 4 query heads over 2 key/value heads: two groups of two query heads."""
    from memopt.hooks._attention_dispatch import AttentionCall
    from memopt.hooks._sequence_exchange import GatheredKeyValues, _heads_of

    torch.manual_seed(0)
    query = torch.randn(2, 5, 4, 8)
    key, value = torch.randn(2, 7, 2, 8), torch.randn(2, 7, 2, 8)
    mask = torch.randn(2, 4, 5, 7)  # additive, per query head

    def attend(call: AttentionCall) -> torch.Tensor:
        q, k, v = (t.transpose(1, 2) for t in (call.query, call.key, call.value))
        output = torch.nn.functional.scaled_dot_product_attention(q, k, v, call.attn_mask, enable_gqa=True)
        return output.transpose(1, 2)

    gathered = GatheredKeyValues(key.clone(), value.clone(), None)
    leaves = gathered.recorded(8)
    assert [group.heads for group in gathered.head_groups] == [slice(0, 1), slice(1, 2)] and len(leaves) == 4
    call = AttentionCall(query, gathered.key, gathered.value, enable_gqa=True)
    grouped = torch.cat([attend(_heads_of(call, group, mask)) for group in gathered.head_groups], dim=2)
    reference_key, reference_value = key.clone().requires_grad_(), value.clone().requires_grad_()
    reference = attend(AttentionCall(query, reference_key, reference_value, mask, enable_gqa=True))
    assert rel_err(grouped, reference) <= 1e-6
    weights = torch.randn_like(reference)
    (grouped * weights).sum().backward()
    (reference * weights).sum().backward()
    assert rel_err(torch.cat([g.key.grad for g in gathered.head_groups], 2), reference_key.grad) <= 1e-6
    assert rel_err(torch.cat([g.value.grad for g in gathered.head_groups], 2), reference_value.grad) <= 1e-6


@pytest.mark.parametrize("family", ["wan", "flux", "ltx2", "hunyuanvideo15"])
def test_lockstep_forward_and_options(family):
    """The forward may run lock-step (the backward recomputes in passes either way); FeedForward shards inside the
    blocks, the output head left whole, a single chunk (the block recomputed whole) and diffusers' own gradient
    checkpointing around the blocks all compose."""
    model, inputs, key = build(family)
    reference = step(model, inputs, key)
    setups = {
        "lockstep": lambda: apply_sequence_chunking(model, 4, training=True, schedule="lockstep"),
        "feedforward shards": lambda: (apply_chunked_feedforward(model, 3),
                                       apply_sequence_chunking(model, 4, training=True)),
        "chunk_tail=False": lambda: apply_sequence_chunking(model, 4, training=True, chunk_tail=False),
        "one chunk": lambda: apply_sequence_chunking(model, 1, training=True),
        "gradient checkpointing": lambda: (model.enable_gradient_checkpointing(),
                                           apply_sequence_chunking(model, 4, training=True)),
    }
    for name, setup in setups.items():
        setup()
        result = step(model, inputs, key)
        remove_memory_optimizations(model)
        if model.is_gradient_checkpointing:
            model.disable_gradient_checkpointing()
        assert result["nodes"] > 0, name
        assert_same_gradients(result, reference, f"{family}, {name}")


@pytest.mark.parametrize("family, targets", [("wan", ["to_q", "to_k", "to_v", "to_out.0"]),
                                             ("flux2", ["to_qkv_mlp_proj", "to_q", "to_k"])])
def test_lora_training(family, targets):
    """LoRA fine-tuning, the base frozen: the adapters' gradients match (FLUX.2: also on its fused projection,
    whose column blocks a pass skips)."""
    from peft import LoraConfig

    model, inputs, key = build(family, batch_size=1)
    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=targets))
    reference = step(model, inputs, key)
    apply_sequence_chunking(model, 4, training=True)
    result = step(model, inputs, key)
    remove_memory_optimizations(model)
    assert reference["params"] and all("lora_" in name for name in reference["params"])
    assert_same_gradients(result, reference, f"{family} LoRA")


def test_frozen_model_gives_input_gradients():
    """Only the input requires grad (guidance through a frozen model): the blocks still run in chunks."""
    model, inputs, key = build("wan")
    model.requires_grad_(False)
    reference = step(model, inputs, key)
    apply_sequence_chunking(model, 4, training=True)
    result = step(model, inputs, key)
    remove_memory_optimizations(model)
    assert result["nodes"] == len(model.blocks) and not result["params"]
    assert rel_err(result["x"], reference["x"]) <= 1e-5


def test_saved_inputs_go_through_saved_tensor_hooks():
    """The block inputs are saved with save_for_backward, so torch.autograd.graph.save_on_cpu (or any saved-tensor
    hook) moves them like the rest of the saved activations."""
    model, inputs, key = build("wan")
    reference = step(model, inputs, key)
    apply_sequence_chunking(model, 4, training=True)
    packed = []

    def pack(tensor):
        packed.append(tensor.shape)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = step(model, inputs, key)
    remove_memory_optimizations(model)
    hidden = inputs[key].shape[0], model.config.num_attention_heads * model.config.attention_head_dim
    assert sum(shape[0] == hidden[0] and shape[-1] == hidden[1] for shape in packed) >= len(model.blocks)
    assert_same_gradients(result, reference, "wan under saved_tensors_hooks")


def test_shared_first_gradients_are_separated():
    """Two leaves given views of one gradient (no broadcast to reduce over, as LTX-Video's modulation table and
    timestep embedding at batch 1) may both keep it as their first ``.grad``; a second backward would accumulate into
    both in place. Separated after each backward, the sums are right."""
    table = torch.randn(6, 4, requires_grad=True)
    temb = torch.randn(1, 1, 24, requires_grad=True)
    weights = [torch.randn(1, 5, 6, 4, generator=torch.Generator().manual_seed(seed)) for seed in (0, 1)]
    for w in weights:
        ((table[None, None] + temb.reshape(1, 1, 6, 4)) * w).sum().backward()
        separate_shared_gradients([table, temb])
        assert table.grad.untyped_storage().data_ptr() != temb.grad.untyped_storage().data_ptr()
    expected = sum(w.sum((0, 1)) for w in weights)
    assert torch.allclose(table.grad, expected) and torch.allclose(temb.grad.view(6, 4), expected)


def test_autocast_is_restored_for_the_recomputation(monkeypatch):
    """A forward under autocast is recomputed under the same autocast in the backward (which autograd runs outside
    it): the gradients then agree with the unmodified model's to bf16 rounding."""
    import memopt.hooks.sequence as sequence

    model, inputs, _ = build("wan")
    in_backward = []

    def backward_passes(*args, **kwargs):
        in_backward.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return original(*args, **kwargs)

    def step():
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = prediction(model(**inputs))
        out.float().square().mean().backward()
        return torch.cat([p.grad.flatten().float() for p in model.parameters() if p.grad is not None])

    original = sequence.backward_passes
    monkeypatch.setattr(sequence, "backward_passes", backward_passes)
    reference = step()
    apply_sequence_chunking(model, 4, training=True)
    result = step()
    remove_memory_optimizations(model)
    assert in_backward == [(True, torch.bfloat16)] * len(model.blocks)
    assert rel_err(result, reference) <= 1e-2


def test_without_training_a_recorded_block_runs_unchunked(caplog):
    model, inputs, key = build("wan")
    reference = step(model, inputs, key)
    apply_sequence_chunking(model, 4)
    with caplog.at_level(logging.WARNING, logger="memopt.hooks.sequence"):
        result = step(model, inputs, key)
    remove_memory_optimizations(model)
    assert result["nodes"] == 0 and "training=True" in caplog.text
    assert_same_gradients(result, reference, "wan, training=False")


def test_refusals():
    model, inputs, key = build("wan")
    apply_sequence_chunking(model, 4, training=True)
    x = inputs[key].clone().requires_grad_()
    out = prediction(model(**{**inputs, key: x}))
    with pytest.raises(RuntimeError, match=r"blocks\.1: .*loss\.backward\(\).*torch\.autograd\.grad"):
        torch.autograd.grad(out.square().mean(), [x])
    model.blocks[0].ffn.net[1].p = 0.1  # the FeedForward's dropout, in training mode
    with pytest.raises(NotImplementedError, match=r"blocks\.0\.ffn\.net\.1: dropout p=0\.1 in training mode"):
        model(**inputs)
    model.eval()  # an inactive dropout is fine
    assert recorded_nodes(prediction(model(**inputs))) == len(model.blocks)
    remove_memory_optimizations(model)
    with pytest.raises(ValueError, match="training must be a bool"):
        apply_sequence_chunking(model, 4, training="yes")
    with pytest.raises(ValueError, match="saved_inputs='host' .* needs training=True"):
        apply_sequence_chunking(model, 4, saved_inputs="host")
    with pytest.raises(ValueError, match=r"saved_inputs must be one of \('device', 'host'\), got 'disk'"):
        apply_sequence_chunking(model, 4, training=True, saved_inputs="disk")


def test_label_dropout_is_refused():
    """A label dropout in training mode draws again in every call: the chunked forward and its recomputing backward
    would drop other labels than one unchunked forward. Refused, naming the module, as an active dropout is."""
    spec = get_family("dit")
    model = spec.build("tiny").train()
    inputs = spec.make_inputs(model.config, batch_size=2, height=112, width=112)
    apply_sequence_chunking(model, 4, training=True)
    with pytest.raises(NotImplementedError, match=r"transformer_blocks\.0\.norm1\.emb\.class_embedder: label dropout"):
        model(**inputs)
    remove_memory_optimizations(model)


# Activation growth of a training step (memopt.trace.activation_growth(..., backward=True)), LD per token: unmodified
# and with diffusers' gradient checkpointing, then the bound memopt keeps (measured: Wan 8.16, Flux 8.78 at the
# plan's 32 / 48 chunks, 9.96 and 10.63 before the recorded attention ran in groups of heads and the input gradient
# buffers stopped taking materialized zeros; benchmarks/results/sequence_training_cpu.md).
TRAINING_GROWTH = {"wan": (28.84, 26.82, 8.2), "flux": (52.42, 29.64, 8.8)}


@pytest.mark.parametrize("family", sorted(TRAINING_GROWTH))
def test_training_step_memory(family):
    unmodified, checkpointing, bound = TRAINING_GROWTH[family]
    assert activation_growth(family, backward=True) == pytest.approx(unmodified, abs=0.01)
    assert activation_growth(family, lambda m: m.enable_gradient_checkpointing(), backward=True) == pytest.approx(
        checkpointing, abs=0.01)
    assert activation_growth(family, lambda m: apply_sequence_chunking(m, training=True), backward=True) <= bound


def test_the_gpu_benchmark_runs_on_the_cpu():
    """benchmarks/sequence_training.py's real-size steps at a tiny config on the CPU (its logic; peaks need a GPU)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "sequence_training.py"
    spec = importlib.util.spec_from_file_location("sequence_training_benchmark", path)
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    row = benchmark.bench_device("wan", "cpu", "tiny", "tiny", repeats=1, chunk_counts=[4])
    assert list(row["variants"]) == ["checkpointing", "memopt 4", "memopt 4, saved inputs on the host",
                                     "memopt 4, saved inputs on the host, blocks group-offloaded", "unmodified"]
    assert all(result["error"] <= 2e-2 for result in row["variants"].values()), row  # bf16
    assert "| memopt 4 | n/a | n/a |" in benchmark.markdown_cuda([row])


@pytest.mark.parametrize("family", ["wan", "flux", "hunyuanvideo"])
def test_saved_inputs_on_the_host(family):
    """saved_inputs="host": the same gradients, and a step's device peak no longer grows with the depth; what grows
    is host memory, one block's saved inputs per block (the tensors every block is given are copied once)."""
    from memopt.planner import REPEATED_LAYERS
    from memopt.trace import trace_memory
    from memopt.trace.simulate import allocate_gradients, training_step

    spec = get_family(family)
    peaks, host = {}, {}
    for extra in (0, 2):
        torch.manual_seed(0)
        config = {**spec.config("tiny"), **{key: 2 + extra for key in REPEATED_LAYERS[spec.class_name]}}
        model = spec.build(config).train()
        inputs = make_inputs(family, model, 2)
        reference = step(model, inputs, "hidden_states")
        for saved_inputs in ("device", "host"):
            apply_sequence_chunking(model, 4, training=True, saved_inputs=saved_inputs)
            assert_same_gradients(step(model, inputs, "hidden_states"), reference, f"{family}, {saved_inputs}")
            allocate_gradients(model)
            trace = trace_memory(training_step, model, inputs)
            remove_memory_optimizations(model)
            peaks[extra, saved_inputs], host[extra, saved_inputs] = trace.peak_bytes, trace.meta.get("host_bytes", 0)
    assert peaks[2, "host"] == peaks[0, "host"] < peaks[0, "device"] < peaks[2, "device"], peaks
    # Each extra block saves its inputs on the host instead: what the device side grew by.
    assert host[2, "host"] - host[0, "host"] == peaks[2, "device"] - peaks[0, "device"], (host, peaks)
    assert host[0, "device"] == host[2, "device"] == 0


def test_full_size_training_step_simulated():
    """Wan2.1-14B at 720p/81f (two blocks, bf16, FakeTensorMode): a training step's activation peak above weights,
    their gradients and the inputs, with diffusers' checkpointing and with memopt (measured: 48.6 and 12.1 LD;
    benchmarks/results/sequence_training_cpu.md)."""
    from memopt import simulate_family

    config = {**get_family("wan").config("full"), "num_layers": 2}
    checkpointing = simulate_family("wan", config, backward=True, prepare=lambda m: m.enable_gradient_checkpointing())
    chunked = simulate_family("wan", config, backward=True, prepare=lambda m: apply_sequence_chunking(m, training=True))
    ld = chunked.meta["ld_bytes"]
    assert checkpointing.peak_bytes / ld > 45 and chunked.peak_bytes / ld < 12.5, (checkpointing.peak_bytes,
                                                                                   chunked.peak_bytes)
