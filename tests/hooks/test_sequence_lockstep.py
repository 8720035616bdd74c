"""The lock-step schedule of sequence chunking (chunks suspended at their attention call until all K/V exist):
exactness, no recomputation, clean unwinding, refusals."""

from __future__ import annotations

import pytest
import torch
from diffusers.hooks import apply_group_offloading

from memopt import apply_sequence_chunking, remove_memory_optimizations, simulate, trace_memory
from memopt.hooks import _attention_dispatch
from memopt.hooks.sequence import SequenceChunkingConfig
from memopt.models import get_family

from _tiny_cases import FAMILIES, SIZES, chunked_completely, prediction, rel_err  # noqa: E402
from test_sequence import ManualAttention, build  # noqa: E402


def _interception_is_idle() -> bool:
    state = _attention_dispatch._STATE
    return not state.handlers and not state.busy and state.mode is None and torch._C._len_torch_function_stack() == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_matches_unmodified_model(family):
    _, model, inputs = build(family)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        reference = prediction(model(**inputs))
        for num_chunks in (4, 16):  # 4 chunks split the text stream of joint blocks, 16 carry it whole
            report = apply_sequence_chunking(model, num_chunks, schedule="lockstep")
            assert report.schedule == "lockstep" and "lockstep" in str(report)
            assert chunked_completely(report, family), report
            out = prediction(model(**inputs))
            remove_memory_optimizations(model)
            assert rel_err(out, reference) <= 1e-5, (family, num_chunks)
            assert _interception_is_idle()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("family", ["wan", "flux"])
def test_runs_the_block_once_per_chunk(family):
    """No more matmuls than the two-pass schedule (which skips the projections a pass does not use but reruns
    modulation linears), fewer ops in all (nothing before attention runs twice), and more memory (every chunk's
    pre-attention state is alive at once)."""
    _, model, inputs = build(family, batch_size=1)
    traces = {}
    with torch.no_grad():
        for schedule in ("two_pass", "lockstep"):
            apply_sequence_chunking(model, 5, schedule=schedule)
            traces[schedule] = trace_memory(model, **inputs)
            remove_memory_optimizations(model)

    def matmuls(trace):
        return sum(op in ("mm", "addmm", "bmm") for op in trace.ops)

    two_pass, lockstep = traces["two_pass"], traces["lockstep"]
    assert 0 < matmuls(lockstep) <= matmuls(two_pass)
    assert lockstep.num_ops < two_pass.num_ops
    assert lockstep.peak_bytes > two_pass.peak_bytes


def test_runs_under_fake_tensors():
    spec = get_family("wan")
    size = SIZES["wan"]

    def inputs(model):
        return spec.make_inputs(model.config, height=size.height, width=size.width, num_frames=size.num_frames,
                                dtype=torch.bfloat16)

    baseline = simulate(lambda: spec.build("tiny"), inputs, dtype=torch.bfloat16)
    chunked = simulate(lambda: spec.build("tiny"), inputs, dtype=torch.bfloat16,
                       prepare=lambda m: apply_sequence_chunking(m, 4, schedule="lockstep"))
    assert 0 < chunked.peak_bytes < baseline.peak_bytes
    assert _interception_is_idle()


def test_combines_with_block_level_group_offloading():
    _, model, inputs = build("wan")
    cpu = torch.device("cpu")
    with torch.no_grad():
        reference = prediction(model(**inputs))
        apply_sequence_chunking(model, 5, schedule="lockstep")
        apply_group_offloading(model, onload_device=cpu, offload_device=cpu, offload_type="block_level",
                               num_blocks_per_group=1)
        assert rel_err(prediction(model(**inputs)), reference) <= 1e-5


def test_leaf_level_offloading_inside_a_block_is_refused():
    """A chunk suspended inside a leaf-offloaded module would find its weights offloaded by the next chunk."""
    _, model, inputs = build("wan")
    cpu = torch.device("cpu")
    apply_sequence_chunking(model, 5, schedule="lockstep")
    apply_group_offloading(model, onload_device=cpu, offload_device=cpu, offload_type="leaf_level")
    with torch.no_grad(), pytest.raises(ValueError, match=r"blocks\.0\.\S+ carries hooks \['group_offloading'\]"):
        model(**inputs)
    assert _interception_is_idle()


def test_a_context_entered_around_attention_is_refused_and_unwound():
    """Chunks share the thread's grad/autocast/mode state: a block that changes it around its attention call
    cannot be suspended there. The error names the block, and every suspended chunk is unwound."""
    _, model, inputs = build("wan")
    attention = model.blocks[1].attn1
    forward = attention.forward

    def forward_under_autocast(*args, **kwargs):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=True):
            return forward(*args, **kwargs)

    attention.forward = forward_under_autocast
    apply_sequence_chunking(model, 4, schedule="lockstep")
    with torch.no_grad(), pytest.raises(NotImplementedError, match="blocks.1: the block changes grad mode, autocast"):
        model(**inputs)
    assert _interception_is_idle() and not torch.is_autocast_enabled("cpu")


def test_a_processor_that_bypasses_the_dispatcher_is_an_error_not_a_wrong_result():
    _, model, inputs = build("wan")
    model.blocks[0].attn1.set_processor(ManualAttention())
    apply_sequence_chunking(model, 4, schedule="lockstep")
    with torch.no_grad(), pytest.raises(RuntimeError, match="made 0 whole-sequence attention calls"):
        model(**inputs)
    assert _interception_is_idle()


def test_unknown_schedule_is_refused():
    with pytest.raises(ValueError, match="schedule must be one of"):
        SequenceChunkingConfig(schedule="interleaved")


@pytest.mark.parametrize("family", ["flux", "cogvideox"])  # dispatch route / processor calling SDPA itself
def test_combines_with_chunked_feedforward_and_chunked_attention(family):
    """The attention handlers chain through a suspension: memopt's chunked attention (K/V chunks with a log-sum-exp
    merge, head chunks) runs on the full K/V once the chunk resumes."""
    from memopt import apply_chunked_attention, apply_chunked_feedforward

    _, model, inputs = build(family)
    with torch.no_grad():
        reference = prediction(model(**inputs))
        apply_chunked_feedforward(model, num_chunks=2, split="hidden")
        apply_chunked_attention(model, query_chunk=8, kv_chunk=16, head_chunks=2)
        report = apply_sequence_chunking(model, 5, schedule="lockstep")
        assert not report.skipped
        assert rel_err(prediction(model(**inputs)), reference) <= 1e-5
        assert _interception_is_idle()


def test_chunks_that_take_different_paths_are_an_error_not_a_wrong_result():
    """A processor (without ``_attention_backend``, so the SDPA mode is open while it goes through the dispatcher) that
    bypasses the dispatcher for one chunk: that chunk finishes while the others wait at the attention call. The run
    stops with an error naming the block, module and chunk, and the waiting chunks are unwound."""
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    class SometimesManual:
        def __init__(self):
            self.calls, self.dispatched, self.manual = 0, WanAttnProcessor(), ManualAttention()

        def __call__(self, attn, hidden_states, *args, **kwargs):
            self.calls += 1
            processor = self.manual if self.calls == 2 else self.dispatched
            return processor(attn, hidden_states, *args, **kwargs)

    _, model, inputs = build("wan")
    model.blocks[0].attn1.set_processor(SometimesManual())
    apply_sequence_chunking(model, 4, schedule="lockstep")
    with torch.no_grad(), pytest.raises(
        RuntimeError, match=r"blocks\.0\.attn1 made 0 whole-sequence attention calls .* in chunk 1"
    ):
        model(**inputs)
    assert _interception_is_idle()


def test_processor_without_backend_attribute_through_the_dispatcher():
    """A wrapping processor that does not declare ``_attention_backend`` gets the SDPA mode as well, yet its calls
    arrive through the dispatcher, with the mode on top of the stack: it is lifted while the chunk is suspended."""
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    class Wrapped:
        def __init__(self):
            self.inner = WanAttnProcessor()

        def __call__(self, attn, hidden_states, *args, **kwargs):
            return self.inner(attn, hidden_states, *args, **kwargs)

    _, model, inputs = build("wan")
    for block in model.blocks:
        block.attn1.set_processor(Wrapped())
    with torch.no_grad():
        reference = prediction(model(**inputs))
        apply_sequence_chunking(model, 4, schedule="lockstep")
        assert rel_err(prediction(model(**inputs)), reference) <= 1e-5
    assert _interception_is_idle()
