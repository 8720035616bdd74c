"""Model-level per-token module chains run a token chunk at a time (``SequencePlan.token_chains``).

Some models condition on text features far wider than their token stream and narrow them before the blocks with a
norm and a projection: Ideogram 4 RMS-norms its ``(B, S, 53248)`` text features (in fp32: two 23 LD temporaries at its
width of 4608) and projects them to ``(B, S, 4608)``. That prologue, not the blocks, is then the forward's peak. The
chain's modules act on each token alone, so running the whole chain on one token chunk after another and writing into
one ``(B, S, out)`` output computes the same values while holding only a chunk of the wide intermediates. A chain of
one module is a per-token module run in chunks: Cosmos 3 Omni's fp32 RMSNorm of its ``(S, D)`` generation tokens (a
batchless model: tokens along dim 0 of a 2-D input, else dim 1).

:class:`TokenChainHook` sits on the chain's first module: called on a tensor, it runs every module of the chain per
chunk and returns the chain's output. :class:`TokenChainPassHook` sits on the later modules: the model forward then
calls them on that output, which they pass on unchanged. The plan promises that the first module's output feeds only
the next module, and so on; a later module called on anything else while a chain output is pending is an error, never
a second application. Under autograd (training) the chain runs as the model wrote it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers.hooks import ModelHook

from ._streamed_blocks import split_units


@dataclass
class TokenChain:
    """One chain's shared state: the modules' paths, the chunk count, and the output the later modules pass on."""

    paths: tuple[str, ...]
    num_chunks: int
    computing: bool = False
    pending: torch.Tensor | None = None
    passed: int = 0  # how many later modules the pending output has gone through

    @property
    def name(self) -> str:
        return " -> ".join(self.paths)


class TokenChainHook(ModelHook):
    """On the first module of a token chain: computes the whole chain a token chunk at a time (see the module doc)."""

    _is_stateful = False

    def __init__(self, chain: TokenChain, modules: list[torch.nn.Module]) -> None:
        super().__init__()
        self.chain = chain
        self.later = modules  # the chain's later modules, called through their own hooks

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        chain = self.chain
        x = args[0] if len(args) == 1 and not kwargs else None
        if chain.computing or torch.is_grad_enabled() or not isinstance(x, torch.Tensor) or x.dim() < 2:
            return self.fn_ref.original_forward(*args, **kwargs)
        # A pending output left by a forward that raised before its later modules ran is dropped here.
        chain.pending, chain.passed = None, 0
        dim = 0 if x.dim() == 2 else 1  # (S, D) for batchless models, else (B, S, ...)
        tokens = x.shape[dim]
        out = None
        chain.computing = True
        try:
            for start, stop in split_units(tokens, chain.num_chunks):
                piece = self.fn_ref.original_forward(x.narrow(dim, start, stop - start))
                for later in self.later:
                    piece = later(piece)
                if out is None:
                    shape = list(piece.shape)
                    shape[dim] = tokens
                    out = piece.new_empty(shape)
                out.narrow(dim, start, stop - start).copy_(piece)
                del piece
        finally:
            chain.computing = False
        chain.pending = out if self.later else None
        return out


class TokenChainPassHook(ModelHook):
    """On a later module of a token chain: passes the chain's output on (see the module doc)."""

    _is_stateful = False

    def __init__(self, chain: TokenChain, path: str, position: int) -> None:
        super().__init__()
        self.chain = chain
        self.path = path
        self.position = position  # 1 for the module after the first, ...

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        chain = self.chain
        if chain.computing or chain.pending is None:
            return self.fn_ref.original_forward(*args, **kwargs)
        if len(args) != 1 or kwargs or args[0] is not chain.pending or chain.passed != self.position - 1:
            raise RuntimeError(
                f"{self.path}: the sequence plan's token chain {chain.name} computed this module's output already, "
                "but the model called it on something other than that output; the chain's modules must feed each "
                "other directly (fix the plan's token_chains)")
        output = chain.pending
        chain.passed = self.position
        if self.position == len(chain.paths) - 1:
            chain.pending, chain.passed = None, 0
        return output
