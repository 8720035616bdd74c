"""Stand-ins of skipped projections (memopt.hooks._unread): what runs on meta only, and what runs as usual."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.embeddings import apply_rotary_emb

from memopt.hooks._unread import is_unread, unread, unread_values
from memopt.trace.work import WorkCounter


def test_the_rotary_embedding_of_a_stand_in_runs_no_kernel():
    """diffusers' shared rotary embedding (reshape with -1, unbind, stack, fp32 products) on a (B, H, S, D) stand-in:
    a stand-in of the same shape and dtype, and nothing moved but one 0-dim zero made per dtype (bf16 and the fp32 of
    the products), which the stand-ins expand."""
    freqs = (torch.randn(70, 16), torch.randn(70, 16))
    with unread_values(), torch.no_grad(), WorkCounter() as counter:
        query = unread((2, 3, 70, 16), torch.bfloat16, torch.device("cpu"))
        out = apply_rotary_emb(query, freqs, sequence_dim=2)
    assert is_unread(out) and out.shape == (2, 3, 70, 16) and out.dtype == torch.bfloat16
    assert out.stride() == (0, 0, 0, 0)
    assert counter.work.memory_bytes == 2 + 4 and counter.work.kernels == 2


def test_arithmetic_views_and_in_place_updates_of_a_stand_in_stay_stand_ins():
    real = torch.randn(2, 5, 8)
    with unread_values():
        x = unread((2, 5, 8), torch.float32, torch.device("cpu"))
        for result in (x * real + 1, x @ real.transpose(1, 2), x.view(2, 5, 2, 4).transpose(1, 2), x.float().mean(-1),
                       torch.stack([x, -x], dim=-1), x.to(torch.float16), torch.empty_like(x)):
            assert is_unread(result)
        assert x.addcmul_(real, x) is x  # in-place arithmetic on a stand-in: skipped
        x[..., :2] = x[..., 2:4] * real[..., :2]  # values of stand-ins written into one: skipped
        assert is_unread(x)


def test_whatever_might_be_read_runs_as_usual_on_zeros():
    real = torch.randn(2, 5, 8)
    with unread_values():
        x = unread((2, 5, 8), torch.float32, torch.device("cpu"))
        joined = torch.cat([x, real], dim=1)  # routes the real tensor's values: computed
        assert not is_unread(joined) and torch.equal(joined, torch.cat([torch.zeros(2, 5, 8), real], dim=1))
        assert torch.equal(torch.where(real > 0, x, real), torch.where(real > 0, 0.0, real))
        kept = real.clone()
        assert kept.add_(x) is kept and torch.equal(kept, real)  # written into a real tensor: as with zeros
        ones = x.new_ones(3)  # new values from metadata alone
        assert not is_unread(ones) and torch.equal(ones, torch.ones(3))
        assert x.sum().item() == 0.0 and not bool(x.any())  # values read to Python
        masked = x[real > 0]  # data-dependent shape: meta cannot say, computed
        assert not is_unread(masked) and masked.shape == ((real > 0).sum(),)
    assert torch.equal(x, torch.zeros(2, 5, 8))  # outside the context: zeros


def test_values_the_pass_uses_written_into_a_stand_in_are_an_error():
    with unread_values(), pytest.raises(RuntimeError, match="__setitem__ writes values the pass uses into a stand-in"):
        x = unread((2, 5, 8), torch.float32, torch.device("cpu"))
        x[..., :2] = torch.randn(2, 5, 2)
    with unread_values(), pytest.raises(RuntimeError, match="copy_ writes values"):
        torch.empty_like(unread((4,), torch.float32, torch.device("cpu"))).copy_(torch.randn(4))
