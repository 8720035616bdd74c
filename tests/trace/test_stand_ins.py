"""Worst-case stand-ins for values a simulated forward computes from its weights (HiDream's MoE routing)."""

from __future__ import annotations

import pytest
import torch

from memopt.models import get_family
from memopt.trace import simulate, trace_memory
from memopt.trace.stand_ins import STAND_INS, install_stand_ins


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
    with torch.no_grad():
        routed = trace_memory(model, **inputs)
        handles, assumptions = install_stand_ins(model)
        try:
            worst = trace_memory(model, **inputs)
        finally:
            for handle in handles:
                handle.remove()
    assert len(handles) == sum(type(m).__name__ == "MoEGate" for m in model.modules()) > 0
    assert assumptions == [STAND_INS[0].assumption]
    simulated = simulate(lambda: spec.build("tiny"),
                         lambda m: spec.make_inputs(m.config, batch_size=2, height=80, width=112,
                                                    dtype=torch.float32),
                         dtype=torch.float32)
    assert simulated.meta["assumptions"] == assumptions
    assert simulated.peak_bytes == worst.peak_bytes > routed.peak_bytes
    with torch.no_grad():  # the hooks are gone: the model routes by its weights again
        assert torch.equal(model(**inputs)[0], routed.result[0])


def test_models_without_such_modules_assume_nothing() -> None:
    spec = get_family("wan")
    handles, assumptions = install_stand_ins(spec.build("tiny"))
    assert handles == [] and assumptions == []
