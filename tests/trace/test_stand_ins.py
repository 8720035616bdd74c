"""Worst-case stand-ins for values a simulated forward computes from its weights (HiDream's MoE routing)."""

from __future__ import annotations

import pytest
import torch

from memopt.models import get_family
from memopt.trace import simulate, trace_memory
from memopt.trace.stand_ins import STAND_INS, worst_case_values


@pytest.fixture(scope="module")
def hidream():
    torch.manual_seed(0)
    spec = get_family("hidream")
    model = spec.build("tiny")
    return spec, model, spec.make_inputs(model.config, batch_size=2, height=80, width=112)


def test_the_stand_in_is_the_largest_routing_and_the_simulation_predicts_it_to_the_byte(hidream) -> None:
    """The real routing of random weights spreads tokens over the experts; the stand-in sends every token to the
    same top-k. The simulation (fake weights, which give no routing at all) traces exactly the stand-in's peak, which
    is above the real routing's."""
    spec, model, inputs = hidream
    gates = [module for module in model.modules() if type(module).__name__ == "MoEGate"]
    with torch.no_grad():
        routed = trace_memory(model, **inputs)
        with worst_case_values(model) as assumptions:
            assert gates and all(gate._forward_hooks for gate in gates)
            worst = trace_memory(model, **inputs)
    assert assumptions == [STAND_INS[0].assumption]
    simulated = simulate(lambda: spec.build("tiny"),
                         lambda m: spec.make_inputs(m.config, batch_size=2, height=80, width=112,
                                                    dtype=torch.float32),
                         dtype=torch.float32)
    assert simulated.meta["assumptions"] == assumptions
    assert simulated.peak_bytes == worst.peak_bytes > routed.peak_bytes
    assert not any(gate._forward_hooks for gate in gates)
    with torch.no_grad():  # the hooks are gone: the model routes by its weights again
        assert torch.equal(model(**inputs)[0], routed.result[0])


def test_models_without_such_modules_assume_nothing() -> None:
    model = get_family("wan").build("tiny")
    with worst_case_values(model) as assumptions:
        assert assumptions == [] and not any(module._forward_hooks for module in model.modules())
