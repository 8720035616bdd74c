"""Per-token tables computed a chunk at a time: the stand-ins a chunked model forward hands around in their place.

A producer module's per-token output (rotary tables, per-token timestep embeddings: see
:class:`~memopt.plans.sequence.TokenProducer`) is replaced by a :class:`DeferredTokens` while a chunked forward runs;
the blocks' split asks it for each chunk's rows. Some models also transform such a table in their own forward before
the blocks or the output head read it: Wan2.2 TI2V unflattens its ``(B, S, 6 D)`` timestep projection and builds its
head's shift and scale from a ``(B, S, D)`` embedding; LTX-Video views its flattened ``(B S, 6 D)`` tables as
``(B, S, 6 D)`` and indexes them. Those operations act on each token's row alone, so they are deferred too
(:class:`DeferredOp`, computed on the rows asked for); one that meets a real tensor running over the tokens (the output
head's hidden states) computes the rows that tensor covers: all of them, or the running tail chunk's. Anything else
is refused with a :class:`TypeError` rather than computed on the wrong rows.

Per-sample tables that the model forward expands over the tokens and then materialises (Helios' ``torch.cat`` of its
history and window modulations, ERNIE-Image's ``contiguous``) start as a :class:`DeferredSample`: the value itself in
everything the model does with it, until its ``expand`` along the plan's token dim gives a :class:`DeferredBroadcast`,
whose rows are views of the expansion, and what follows is deferred as above.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import torch
from torch.utils._pytree import tree_flatten, tree_map_only, tree_unflatten

from ..plans.sequence._vocabulary import _take

if TYPE_CHECKING:
    from ..plans.sequence import TokenProducer

TokenRanges = list[tuple[int, int]]

ELEMENTWISE = frozenset({
    "add", "sub", "mul", "div", "true_divide", "rsub",
    "__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__truediv__", "__rtruediv__",
})
"""Broadcasting elementwise operations: a real operand whose dim at the tokens' place has more than one entry runs
over the tokens, and the deferred operands are computed for the rows it covers."""

RESHAPES = frozenset({"view", "reshape", "unflatten", "flatten"})
"""Operations that may regroup dims: the dims before the tokens must stay as they are (see :func:`_check`)."""

SIZED = frozenset({"view", "reshape", "expand"})
"""Operations given the output's sizes, where a model may name its token count (SkyReels-V2's ``view(B, F, 1, 1, -1)``
of a per-frame table): computed on some rows, that size becomes the rows' count (:func:`_sized`)."""

ROW_WISE = ELEMENTWISE | RESHAPES | SIZED | frozenset({
    "__neg__", "neg", "silu", "gelu", "sigmoid", "tanh", "linear",
    "float", "half", "bfloat16", "to", "type_as", "contiguous",
    "unsqueeze", "squeeze", "chunk", "split", "__getitem__", "repeat", "transpose", "permute",
})
"""Operations a deferred table may go through: each output row depends only on the same token's input row (and on
operands without a token dim). :func:`_apply` checks the rest: where the tokens end up, by computing
the operation on one token's rows and on two (a ``repeat`` along the token dim, say, changes the entries per token
and is refused)."""

EXPANSIONS = frozenset({"expand", "expand_as", "broadcast_to"})
"""How a model expands a per-sample value over the tokens (:class:`DeferredSample`)."""

METHODS = frozenset(name for name in ROW_WISE if not name.startswith("__") and hasattr(torch.Tensor, name))
"""The :data:`ROW_WISE` operations that models call as tensor methods."""


class DeferredTokens:
    """Stand-in for a producer module's output during a chunked model forward: computes rows on demand.

    ``tokens``: how many tokens it covers. Its shape is known (from its rows for one token and for two) when its rows
    are one tensor; the tokens' dim may hold ``scale`` entries per token (a ``(B S, ...)`` table flattened
    batch-major, as ``timestep.flatten()`` of ``(B, S)`` timesteps gives).
    """

    uniform = False
    """Whether every token's rows are the same (a per-sample value expanded over the tokens, and row-wise operations
    of such): a consumer may then compute one token's and expand it."""

    _probed: tuple[torch.Tensor, int, int] | None = None
    """A stand-in of its rows for one token (:func:`_stand_in`), the tokens' dim and the entries per token there, once
    measured (:meth:`_probe`)."""

    def __init__(self, path: str, producer: TokenProducer, module: torch.nn.Module, forward: Callable, call: dict,
                 tokens: int | None = None):
        self.path, self.producer, self.module, self.forward, self.call = path, producer, module, forward, call
        self.tokens = producer.tokens(module, call) if tokens is None else tokens
        self._rows_of: Callable[[TokenRanges], Any] | None = None  # built at the first request

    def rows(self, ranges: TokenRanges) -> Any:
        if self._rows_of is None:
            self._rows_of = self.producer.rows(self.module, self.call, self.forward)
        return self._rows_of(ranges)

    def full(self) -> Any:
        return self.rows([(0, self.tokens)])

    # ---------------------------------------------------------------------------------- shape, from its rows
    def _probe(self) -> tuple[torch.Tensor, int, int]:
        """Its rows for one token, the tokens' dim and the entries per token there (measured once)."""
        probe = self._probed
        if probe is None:
            one, two = (self.rows([(0, n)]) for n in (1, 2)) if self.tokens >= 2 else (None, None)
            if not isinstance(one, torch.Tensor) or not isinstance(two, torch.Tensor):
                raise AttributeError(f"{self.path}: a deferred table of {self.tokens} token(s) whose rows are not one "
                                     "tensor has no shape")
            dim, scale = token_dim(one, two, self.path)
            probe = self._probed = (_stand_in(one), dim, scale)
        return probe

    @property
    def shape(self) -> torch.Size:
        one, dim, scale = self._probe()
        return torch.Size((*one.shape[:dim], self.tokens * scale, *one.shape[dim + 1:]))

    @property
    def ndim(self) -> int:
        return self._probe()[0].dim()

    @property
    def dtype(self) -> torch.dtype:
        return self._probe()[0].dtype

    @property
    def device(self) -> torch.device:
        return self._probe()[0].device

    def dim(self) -> int:
        return self.ndim

    def size(self, dim: int | None = None) -> Any:
        return self.shape if dim is None else self.shape[dim]

    # ---------------------------------------------------------------------------------- deferred operations
    @classmethod
    def __torch_function__(cls, func: Callable, types: tuple, args: tuple = (), kwargs: dict | None = None) -> Any:
        """``torch.cat`` of deferred tables (and tensors) along their token dim is deferred as well (a model
        concatenating its image and reference-image modulation tables before joint blocks); so are the row-wise
        operations of :data:`ROW_WISE`. Any other use is refused."""
        kwargs = kwargs or {}
        if func is torch.cat:
            pieces = args[0]
            dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
            return DeferredConcat(pieces, dim)
        return _apply(func, args, kwargs)

    def __getattr__(self, name: str) -> Any:
        if name in METHODS:
            # Only a table of one tensor has tensor methods (an AttributeError otherwise): callers that move whatever
            # has a ``to`` (diffusers' offloading hooks onloading block inputs) leave rotary pairs alone, as before.
            try:
                self._probe()
            except TypeError as error:
                raise AttributeError(str(error)) from error
            method = getattr(torch.Tensor, name)
            return lambda *args, **kwargs: _apply(method, (self, *args), kwargs)
        raise AttributeError(f"{type(self).__name__} ({self.__dict__.get('path', '?')}) has no attribute {name!r}")


class DeferredSample:
    """Stand-in for a producer's per-sample output that the model forward expands over the tokens
    (:class:`~memopt.plans.sequence.BroadcastTable`): every operation runs at once on the value (small, no token dim),
    and its result stays a stand-in as long as it is one (row-wise operations of stand-ins alone: ``view``,
    ``unflatten``, ``chunk``, ...); an expansion (:data:`EXPANSIONS`) along ``token_dim`` gives a
    :class:`DeferredBroadcast`. Anything else gives what the value gives: computed as the model computes it, only not
    deferred; a block given one unexpanded gets the value (:func:`memopt.hooks._held_blocks.resolved`)."""

    def __init__(self, path: str, value: torch.Tensor, token_dim: int) -> None:
        self.path, self.value, self.token_dim = path, value, token_dim

    @classmethod
    def __torch_function__(cls, func: Callable, types: tuple, args: tuple = (), kwargs: dict | None = None) -> Any:
        return _per_sample(func, args, kwargs or {})

    def __getattr__(self, name: str) -> Any:
        if name in ("path", "value", "token_dim"):  # not set yet (copy, pickle)
            raise AttributeError(name)
        attribute = getattr(self.value, name)
        if callable(attribute) and callable(getattr(torch.Tensor, name, None)):
            method = getattr(torch.Tensor, name)
            return lambda *args, **kwargs: _per_sample(method, (self, *args), kwargs)
        return attribute  # shape, ndim, dtype, device, ...

    def __bool__(self) -> bool:
        return bool(self.value)

    def __len__(self) -> int:
        return len(self.value)

    def __iter__(self) -> Any:
        return iter(self.value)


class DeferredBroadcast(DeferredTokens):
    """A per-sample value expanded over ``tokens`` tokens along ``dim`` (:class:`DeferredSample`): a chunk's rows are
    views of the zero-stride expansion, made real only by what the model does next, on the chunk's rows alone."""

    uniform = True

    def __init__(self, path: str, expanded: torch.Tensor, dim: int) -> None:
        self.path, self.expanded, self.dim_ = path, expanded, dim
        self.tokens = expanded.shape[dim]

    def rows(self, ranges: TokenRanges) -> Any:
        return _take(self.expanded, self.dim_, ranges)


def _per_sample(func: Callable, args: tuple, kwargs: dict) -> Any:
    """``func`` on the values of the :class:`DeferredSample` operands (see there for what it returns)."""
    flat, spec = tree_flatten((args, kwargs))
    source = next(value for value in flat if isinstance(value, DeferredSample))
    values, value_kwargs = tree_unflatten([v.value if isinstance(v, DeferredSample) else v for v in flat], spec)
    out = func(*values, **value_kwargs)
    name = getattr(func, "__name__", str(func))
    if name in EXPANSIONS and args and args[0] is source:
        return _expanded(source, out)
    # Still per sample: a row-wise result that meets no deferred table and is no larger than the largest stand-in
    # operand (FLUX.3 adds its flow-map target embedding to the timestep embedding); one met by the hidden states,
    # say, is the plain tensor the model would get.
    largest = max(value.value.numel() for value in flat if isinstance(value, DeferredSample))
    outputs = tree_flatten(out)[0]
    if name not in ROW_WISE or any(isinstance(value, DeferredTokens) for value in flat) or not all(
        isinstance(value, torch.Tensor) and value.numel() <= largest for value in outputs
    ):
        return out
    return tree_map_only(torch.Tensor, lambda t: DeferredSample(f"{source.path}.{name}", t, source.token_dim), out)


def _expanded(source: DeferredSample, out: torch.Tensor) -> Any:
    """``source.value.expand(...)``: a :class:`DeferredBroadcast` when it expands ``token_dim`` from 1 (or adds it)
    to two or more tokens; the expansion itself otherwise."""
    dim, added = source.token_dim, out.dim() - source.value.dim()
    before = 1 if dim < added else source.value.shape[dim - added]
    if out.dim() > dim and before == 1 and out.shape[dim] >= 2:
        return DeferredBroadcast(f"{source.path}.expand", out, dim)
    return out


def _operator(name: str, apply: Callable[[Callable, tuple, dict], Any]) -> Callable[..., Any]:
    """A Python operator of stand-ins, as the tensor's (``table + x``, ``1 + table``, ``table[:, :, None]``)."""
    method = getattr(torch.Tensor, name)

    def operator(self: Any, *other: Any) -> Any:
        return apply(method, (self, *other), {})

    operator.__name__ = name
    return operator


OPERATORS = ("__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__truediv__", "__rtruediv__",
             "__neg__", "__getitem__")


class DeferredConcat(DeferredTokens):
    """``torch.cat(pieces, dim)`` of deferred tables and tensors, ``dim`` their token dim: a chunk's rows are each
    piece's rows in its ranges, concatenated (the pieces' tables must be single tensors). A ``dim`` that is not the
    token dim gives a token count the blocks' split refuses."""

    def __init__(self, pieces: Any, dim: int) -> None:
        self.pieces, self.dim_ = list(pieces), dim
        self.sizes = [p.tokens if isinstance(p, DeferredTokens) else p.shape[dim] for p in self.pieces]
        self.tokens = sum(self.sizes)
        self.path = " + ".join(p.path if isinstance(p, DeferredTokens) else "tensor" for p in self.pieces)

    def rows(self, ranges: TokenRanges) -> Any:
        out, offset = [], 0
        for piece, size in zip(self.pieces, self.sizes):
            local = [(max(start, offset) - offset, min(end, offset + size) - offset) for start, end in ranges
                     if min(end, offset + size) > max(start, offset)]
            if local:
                out.append(piece.rows(local) if isinstance(piece, DeferredTokens) else _take(piece, self.dim_, local))
            offset += size
        return out[0] if len(out) == 1 else torch.cat(out, self.dim_)


class DeferredGroups(DeferredTokens):
    """A deferred table whose token dim the model merged with the dims after it: a per-frame table repeated over each
    frame's ``H x W`` positions and flattened, ``(B, F, H, W, C) -> (B, F H W, C)`` (SkyReels-V2's diffusion forcing,
    Cosmos Predict2). Each source token owns ``group`` consecutive entries there, so it covers ``tokens x group``
    tokens; a range's rows are those of the source tokens it touches, cut to the range."""

    def __init__(self, source: DeferredTokens, group: int, dim: int) -> None:
        self.source, self.group, self.dim_ = source, group, dim
        self.tokens = source.tokens * group
        self.uniform = source.uniform
        self.path = f"{source.path}[{group} per row]"

    def rows(self, ranges: TokenRanges) -> Any:
        pieces = []
        for start, end in ranges:
            first, last = start // self.group, -(-end // self.group)
            rows = self.source.rows([(first, last)])
            pieces.append(rows.narrow(self.dim_, start - first * self.group, end - start))
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, self.dim_)


class DeferredRange(DeferredTokens):
    """Tokens ``start:stop`` of a deferred table (a slice along its token dim)."""

    def __init__(self, source: DeferredTokens, start: int, stop: int) -> None:
        self.source, self.start = source, start
        self.tokens = stop - start
        self.path = f"{source.path}[{start}:{stop}]"
        self.uniform = source.uniform

    def rows(self, ranges: TokenRanges) -> Any:
        return self.source.rows([(begin + self.start, end + self.start) for begin, end in ranges])


class DeferredOp(DeferredTokens):
    """A row-wise operation on deferred tables (:data:`ROW_WISE`), computed on the rows asked for; ``item``: the
    output's entry, for an operation returning several tensors (``chunk``, ``split``)."""

    def __init__(self, func: Callable, flat: list[Any], spec: Any, tokens: int, path: str, item: int | None = None):
        self.func, self.flat, self.spec, self.item = func, flat, spec, item
        self.tokens = tokens
        self.path = path
        self.uniform = all(value.uniform for value in flat if isinstance(value, DeferredTokens))

    def rows(self, ranges: TokenRanges) -> Any:
        out = _computed(self.func, self.flat, self.spec, ranges)
        return out if self.item is None else out[self.item]


def _stand_in(rows: torch.Tensor) -> torch.Tensor:
    """What a probe keeps of one token's rows: their shape, dtype and device, in one element. One token's rows can be
    large: before a model flattens a per-frame table over each frame's tokens, a "token" is a whole frame."""
    return rows.new_empty(()).expand(rows.shape)


def token_dim(one: torch.Tensor, two: torch.Tensor, path: str) -> tuple[int, int]:
    """The dim where rows for two tokens differ from rows for one (twice as many entries), and the entries per token
    there; refused unless exactly that dim differs."""
    differ = [d for d in range(one.dim()) if one.shape[d] != two.shape[d]]
    if one.dim() != two.dim() or len(differ) != 1 or two.shape[differ[0]] != 2 * one.shape[differ[0]]:
        raise TypeError(f"{path}: rows for one token {tuple(one.shape)} and for two {tuple(two.shape)} do not differ "
                        "in one token dim; memopt cannot defer this per-token table")
    return differ[0], one.shape[differ[0]]


def _apply(func: Callable, args: tuple, kwargs: dict) -> Any:
    """``func`` on deferred tables: deferred (:class:`DeferredOp`) when it is row-wise and no operand runs over the
    tokens; computed on the rows such an operand covers otherwise."""
    name = getattr(func, "__name__", str(func))
    flat, spec = tree_flatten((args, kwargs))
    deferred = [value for value in flat if isinstance(value, DeferredTokens)]
    path = deferred[0].path
    if name not in ROW_WISE:
        raise TypeError(f"a deferred per-token table ({path}, memopt sequence producer) supports torch.cat along its "
                        f"token dim and row-wise operations, got {name}")
    if len({d.tokens for d in deferred}) != 1:
        raise TypeError(f"{name} of deferred per-token tables covering {[d.tokens for d in deferred]} tokens")
    if deferred[0].tokens < 2:  # nothing to defer: computed now
        return _computed(func, flat, spec, [(0, deferred[0].tokens)])
    ranges = _rows_covered(name, flat, deferred)
    if ranges is not None:
        return _computed(func, flat, spec, ranges)
    if name == "__getitem__":
        cut = _check_index(args[1], deferred[0], path)
        if cut is not None:  # a range of the tokens: the rest of the key deferred as usual, then the range
            rest, start, stop = cut
            return DeferredRange(args[0] if rest is None else _apply(func, (args[0], rest), kwargs), start, stop)
    if name in SIZED and args and args[0] is deferred[0]:
        func = _sized(func, args, deferred[0])
    tokens = deferred[0].tokens
    op = DeferredOp(func, flat, spec, tokens, f"{path}.{name}")
    one, two = op.rows([(0, 1)]), op.rows([(0, 2)])
    if isinstance(one, (tuple, list)):
        if len(two) != len(one):
            raise TypeError(f"{path}.{name}: splits the token dim; memopt cannot defer it")
        items = [DeferredOp(func, flat, spec, tokens, f"{path}.{name}[{i}]", item=i) for i in range(len(one))]
        for item, a, b in zip(items, one, two):
            _check(item, a, b, deferred[0], name)
        return type(one)(items) if isinstance(one, tuple) else items
    group = _check(op, one, two, deferred[0], name)
    return op if group is None else DeferredGroups(op, group, op._probed[1])


def _computed(func: Callable, flat: list[Any], spec: Any, ranges: TokenRanges) -> Any:
    """``func`` on its flattened arguments with every deferred table replaced by its rows in ``ranges``."""
    args, kwargs = tree_unflatten([v.rows(ranges) if isinstance(v, DeferredTokens) else v for v in flat], spec)
    return func(*args, **kwargs)


def _rows_covered(name: str, flat: list[Any], deferred: list[DeferredTokens]) -> TokenRanges | None:
    """For an elementwise operation with a real operand running over the tokens (broadcast against the deferred
    ones): the token ranges it covers, all of them or the running tail chunk's; ``None`` when no operand does."""
    if name not in ELEMENTWISE:
        return None
    table = deferred[0]
    _, dim, scale = table._probe()
    from_end = table.ndim - dim  # the tokens' place, counted from the last dim (broadcasting aligns from there)
    if any(d.ndim - d._probe()[1] != from_end for d in deferred):
        raise TypeError(f"{name} of deferred per-token tables ({table.path}) with their tokens at different dims")
    covered = None
    for value in flat:
        if isinstance(value, torch.Tensor) and value.dim() >= from_end and value.shape[-from_end] != 1:
            covered = value.shape[-from_end]
    if covered is None:
        return None
    if covered == table.tokens * scale:
        return [(0, table.tokens)]
    from ._sequence_chunks import running

    run = running("model_run")
    if run is not None and run.tail and run.layout is not None and run.layout.lengths.get("image") == table.tokens:
        start, end = run.ranges[run.chunk]
        if covered == (end - start) * scale:
            return [(start, end)]
    raise RuntimeError(f"{table.path}: a deferred per-token table of {table.tokens} tokens meets a tensor with "
                       f"{covered} entries at its token dim in {name}")


def _sized(func: Callable, args: tuple, table: DeferredTokens) -> Callable:
    """``func`` (``view``, ``reshape``, ``expand`` of ``table``) with the table's full token count among its sizes
    replaced by the count of the rows it is computed on: at the token dim, or after the batch for a batch-major
    ``(B S)`` table viewed as ``(B, S, ...)``. ``func`` itself when the sizes do not name the token count (``-1``)."""
    sizes = args[1:]
    packed = len(sizes) == 1 and isinstance(sizes[0], (tuple, list))
    sizes = list(sizes[0] if packed else sizes)
    _, dim, scale = table._probe()
    if len(sizes) > dim and sizes[dim] == table.tokens * scale:
        position, per_row = dim, 1
    elif sizes[dim:dim + 2] == [scale, table.tokens]:
        position, per_row = dim + 1, scale
    else:
        return func

    def sized(rows: torch.Tensor, *_: Any) -> torch.Tensor:
        new = [*sizes[:position], rows.shape[dim] // per_row, *sizes[position + 1:]]
        return func(rows, new) if packed else func(rows, *new)

    sized.__name__ = getattr(func, "__name__", "sized")
    return sized


def _check_index(key: Any, table: DeferredTokens, path: str) -> tuple[Any, int, int] | None:
    """Indexing may add dims (``None``), pick entries of other dims and take a range of the tokens (a slice of step
    1: Helios' output norm keeps the window's rows, ``temb[:, -window:]``), never reorder or skip tokens. For a range:
    the key with the whole token dim instead (``None`` if it then selects everything) and the range."""
    _, dim, scale = table._probe()
    entries = key if isinstance(key, tuple) else (key,)
    position = 0
    for index, entry in enumerate(entries):
        if entry is None:
            continue
        if position == dim and isinstance(entry, slice) and entry != slice(None) and entry.step in (None, 1) and (
            scale == 1 and all(isinstance(e, (int, slice)) or e is None for e in entries)
        ):
            start, stop, _ = entry.indices(table.tokens)
            rest = (*entries[:index], slice(None), *entries[index + 1:])
            return (None if all(e == slice(None) for e in rest) else rest), start, max(start, stop)
        if entry is Ellipsis or isinstance(entry, torch.Tensor) or (
            position == dim and entry != slice(None)
        ):
            raise TypeError(f"{path}[{key!r}]: indexes the token dim {dim}; memopt cannot defer it")
        position += 1
    return None


def _check(op: DeferredOp, one: Any, two: Any, source: DeferredTokens, name: str) -> int | None:
    """The operation's rows for one token and for two must differ in one dim (where its tokens are now); a
    regrouping (:data:`RESHAPES`) must leave the dims before the tokens as they were, or unflatten a batch-major
    ``(B S)`` dim into ``(B, S)``, or merge the token dim with the dims right after it: then each token owns a group of
    consecutive entries, whose size is returned (for :class:`DeferredGroups`); ``None`` otherwise."""
    if not isinstance(one, torch.Tensor) or not isinstance(two, torch.Tensor):
        raise TypeError(f"{op.path}: not a tensor ({type(one).__name__}); memopt cannot defer it")
    dim, scale = token_dim(one, two, op.path)
    op._probed = (_stand_in(one), dim, scale)
    source_one, source_dim, source_scale = source._probe()
    if name in RESHAPES:
        prefix = tuple(source_one.shape[:source_dim])
        kept = dim == source_dim and tuple(one.shape[:dim]) == prefix
        if kept and scale == source_scale:
            return None
        unflattened = (scale == 1 and dim == source_dim + 1 and tuple(one.shape[:dim]) == (*prefix, source_scale))
        if unflattened:
            return None
        if kept and source_scale == 1 and _merges_following_dims(source_one.shape[source_dim:], one.shape[dim:]):
            return scale
        raise TypeError(f"{op.path}: regroups the token dim ({tuple(source_one.shape)} -> {tuple(one.shape)} per "
                        "token); memopt cannot defer it")
    if scale != source_scale:
        raise TypeError(f"{op.path}: changes the entries per token ({source_scale} -> {scale}); memopt cannot defer it")
    return None


def _merges_following_dims(before: torch.Size, after: torch.Size) -> bool:
    """Whether ``after`` (one token's shape from its token dim on) is ``before`` with its first dims merged into one:
    row-major, so each token's entries stay consecutive."""
    size = 1
    for merged in range(len(before)):
        size *= before[merged]
        if size == after[0] and tuple(before[merged + 1:]) == tuple(after[1:]):
            return merged > 0
    return False


for _name in OPERATORS:
    setattr(DeferredTokens, _name, _operator(_name, _apply))
    setattr(DeferredSample, _name, _operator(_name, _per_sample))
