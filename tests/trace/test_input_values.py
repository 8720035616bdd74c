"""InputValues: inside a fake mode, the values of real inputs carried through what is computed from them alone."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensor, FakeTensorMode

from memopt.trace.simulate import InputValues


@pytest.fixture
def modes():
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    return fake_mode, InputValues(fake_mode)


def test_reads_of_carried_values_get_the_real_answers(modes) -> None:
    fake_mode, values = modes
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    with fake_mode:
        carried = values.carry(mask)
    weights = fake_mode.from_tensor(torch.randn(2, 4, 8))  # no values, as the model's own tensors
    assert isinstance(carried, FakeTensor)
    with fake_mode, values:
        assert carried.sum(1).tolist() == [2, 3]  # a mask's token counts
        assert torch.nonzero(carried[1]).shape == (3, 1)
        assert bool(torch.all(carried[:, 0])) and not bool(torch.all(carried[:, 3]))
        assert torch.repeat_interleave(carried[0].long(), carried[1].long()).shape == (3,)
        kept = weights[carried]  # boolean-mask indexing of a tensor without values: by the mask's positions
        assert isinstance(kept, FakeTensor) and kept.shape == (5, 8)
        weights[carried] *= 0.0  # and its in-place form
        positions = torch.arange(6)  # factories' small outputs keep their values too
        assert int(positions.max()) == 5


def test_values_overwritten_from_a_tensor_without_values_are_dropped(modes) -> None:
    """A write of value-less data into a tensor with values (or into a view of it) leaves no stale values behind: a
    later read is the fake mode's data-dependent error, never an answer from the old values."""
    fake_mode, values = modes
    weights = fake_mode.from_tensor(torch.randn(3))
    with fake_mode, values:
        flags = torch.zeros(2, 3, dtype=torch.bool)
        flags[0, :2] = True
        assert flags.sum().item() == 2
        flags[1] = weights > 0
        with pytest.raises(DataDependentOutputException):
            flags.sum().item()


def test_a_read_of_values_computed_from_the_weights_still_raises(modes) -> None:
    fake_mode, values = modes
    weights = fake_mode.from_tensor(torch.randn(4))
    with fake_mode, values, pytest.raises(DataDependentOutputException):
        (weights > 0).sum().item()
    with fake_mode, values, pytest.raises(DataDependentOutputException):
        (weights > 0).long().cpu().numpy()


def test_numpy_of_carried_values_is_a_copy_of_them(modes) -> None:
    """``numpy()`` reads data without dispatching an operation (HiDream's ``bincount(...).cpu().numpy()``): a fake
    tensor with values answers with a copy, and a write into that copy reaches neither the values nor the input."""
    fake_mode, values = modes
    choices = torch.tensor([0, 2, 2, 1, 2])
    with fake_mode:
        carried = values.carry(choices)
    with fake_mode, values:
        counts = carried.bincount().cpu().numpy()
        assert counts.tolist() == [1, 1, 3]
        counts[0] = 7
        assert carried.bincount().tolist() == [1, 1, 3]
    assert choices.tolist() == [0, 2, 2, 1, 2]


@pytest.mark.parametrize("make", [lambda: torch.empty(2, 3), lambda: torch.empty_strided((2, 3), (3, 1)),
                                  lambda: torch.ones(2, 3).new_empty((2, 3))])
def test_uninitialised_memory_has_no_values(modes, make) -> None:
    """A fake input made with ``empty_strided`` (the planner's for value-less inputs) or a buffer made with ``empty``
    has no values: a read raises, never an answer from garbage (Lumina 2's caption lengths overflowed an int)."""
    fake_mode, values = modes
    with fake_mode, values, pytest.raises(DataDependentOutputException):
        make().sum().item()


def test_a_carried_input_is_not_modified(modes) -> None:
    """The planner carries host copies; carrying never writes into the tensor it was given."""
    fake_mode, values = modes
    mask = torch.ones(2, 3, dtype=torch.bool)
    with fake_mode:
        carried = values.carry(mask)
    with fake_mode, values:
        carried[0, 0] = False
        assert carried.sum().item() == 5
    assert mask.all()
