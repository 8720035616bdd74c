"""The tracer's numbers are exact: analytic peaks on an MLP, identical on real and fake tensors, clean on errors."""

from __future__ import annotations

import json

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import _get_current_dispatch_mode

from memopt import MemoryTrace, MemoryTracer, trace_memory

L, D, F = 2048, 1024, 4096
FP32 = 4


def _mlp() -> torch.nn.Sequential:
    return torch.nn.Sequential(torch.nn.Linear(D, F), torch.nn.GELU(), torch.nn.Linear(F, D))


def _trace_mlp(fake: bool, grad: bool = False) -> MemoryTrace:
    mode = FakeTensorMode() if fake else None
    if mode is not None:
        with mode:
            mlp, x = _mlp(), torch.randn(L, D)
    else:
        mlp, x = _mlp(), torch.randn(L, D)
    with torch.set_grad_enabled(grad), (mode if mode is not None else torch.no_grad() if not grad else _null()):
        return trace_memory(mlp, x)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("fake", [False, True], ids=["cpu", "fake"])
def test_mlp_peak_is_analytic(fake: bool) -> None:
    trace = _trace_mlp(fake)
    # The first linear's output (L x F) is still referenced while GELU writes its own L x F output.
    assert trace.peak_bytes == 2 * L * F * FP32 == 67_108_864
    assert trace.peak_op == "gelu"
    assert trace.peak_module == "1"
    weights = (D * F + F + F * D + D) * FP32
    assert trace.baseline_bytes == weights + L * D * FP32
    # After the second linear only its output (L x D) and, until the op ends, its input (L x F) are live.
    assert trace.live_bytes[-1] == L * F * FP32 + L * D * FP32
    assert trace.by_module()["1"].peak_above_entry_bytes == L * F * FP32


def test_cpu_and_fake_timelines_are_identical() -> None:
    assert _trace_mlp(False).timeline == _trace_mlp(True).timeline


def test_training_step_counts_saved_activations() -> None:
    mlp, x = _mlp(), torch.randn(L, D, requires_grad=True)
    trace = trace_memory(lambda: mlp(x).sum().backward())
    # Autograd keeps the first linear's output (GELU's input) and GELU's output for backward; gradients of the
    # weights and of x are allocated during the call and stay alive on the tensors afterwards; at the last op the
    # scalar loss and its seed gradient (4 B each) are still referenced by the running frame.
    grads = (D * F + F + F * D + D + L * D) * FP32
    assert trace.live_bytes[-1] == grads + 2 * FP32
    assert trace.peak_bytes > 2 * L * F * FP32


def test_parameter_views_are_not_new_memory() -> None:
    """``weight.t()`` inside F.linear aliases the parameter: it must not count even when the root is unknown."""
    linear, x = torch.nn.Linear(D, F), torch.randn(L, D)
    with torch.no_grad():
        trace = trace_memory(lambda inp: torch.nn.functional.linear(inp, linear.weight, linear.bias), x)
    assert trace.peak_bytes == L * F * FP32
    assert trace.ops == ["t", "addmm"]


def test_round_to_mimics_the_cuda_allocator() -> None:
    with torch.no_grad():
        trace = MemoryTracer(round_to=512).run(torch.nn.functional.gelu, torch.randn(3, 5))
    assert trace.peak_bytes == 512  # 60 bytes rounded up
    with pytest.raises(ValueError, match="round_to"):
        MemoryTracer(round_to=0)


def test_error_leaves_nothing_installed_and_reraises() -> None:
    pre_hooks = len(torch.nn.modules.module._global_forward_pre_hooks)
    post_hooks = len(torch.nn.modules.module._global_forward_hooks)

    class Boom(torch.nn.Module):
        def forward(self, x):
            x.mul(2)  # allocate something before failing
            raise KeyError("boom inside the module")

    with pytest.raises(KeyError, match="boom inside the module"):
        trace_memory(Boom(), torch.randn(4))
    assert _get_current_dispatch_mode() is None
    assert len(torch.nn.modules.module._global_forward_pre_hooks) == pre_hooks
    assert len(torch.nn.modules.module._global_forward_hooks) == post_hooks
    # and the next trace works normally
    with torch.no_grad():
        assert _trace_mlp(False).peak_bytes == 2 * L * F * FP32


def test_nested_trace_is_a_clear_error() -> None:
    def outer():
        return trace_memory(torch.nn.functional.relu, torch.randn(4))

    with pytest.raises(RuntimeError, match="nested"):
        trace_memory(outer)
    assert _get_current_dispatch_mode() is None


def test_module_attribution_survives_exceptions_inside_modules() -> None:
    class Fragile(torch.nn.Module):
        def forward(self, x):
            raise ValueError("fragile")

    class Outer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fragile, self.after = Fragile(), torch.nn.Linear(4, 4)

        def forward(self, x):
            try:
                self.fragile(x)
            except ValueError:
                pass
            return self.after(x)

    with torch.no_grad():
        trace = trace_memory(Outer(), torch.randn(2, 4))
    assert trace.modules[-1] == "after"


def test_save_and_load_round_trip(tmp_path) -> None:
    trace = _trace_mlp(True)
    trace.name = "mlp"
    paths = trace.save(tmp_path / "mlp")
    assert [p.suffix for p in paths] == [".json", ".png"]
    assert paths[1].stat().st_size > 10_000
    data = json.loads(paths[0].read_text())
    assert data["version"] == 1 and data["peak_bytes"] == 2 * L * F * FP32
    assert set(data["timeline"]) == {"op", "module", "live_bytes"}
    loaded = MemoryTrace.load(paths[0])
    assert loaded.timeline == trace.timeline and loaded.by_module() == trace.by_module()


@pytest.mark.parametrize("fake", [False, True], ids=["cpu", "fake"])
def test_host_memory_is_not_counted_and_its_copies_back_are(fake: bool) -> None:
    """Storages made under host_memory() stand for host memory beside the device (how a CUDA run with activations
    moved off the GPU is simulated): reported as host bytes, not in the peak; a copy made from them is counted."""
    from memopt.trace.tracer import host_memory

    def step(x: torch.Tensor) -> torch.Tensor:
        with host_memory():
            saved = torch.empty(L, D)
            saved.copy_(x)
        back = saved.to(x.device, copy=True)
        return back + 1

    mode = FakeTensorMode() if fake else _null()
    with mode:
        x = torch.randn(L, D)
        trace = trace_memory(step, x)
    assert trace.meta["host_bytes"] == L * D * FP32
    assert trace.peak_bytes == 2 * L * D * FP32  # the copy back and the sum
