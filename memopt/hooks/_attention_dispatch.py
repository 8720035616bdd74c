"""Intercepting the attention kernel call inside one attention module, shared by memopt's attention techniques.

Why here and not in the processors: diffusers routes the attention math of most processors through
``attention_dispatch.dispatch_attention_fn``, which looks up the active backend function in
``_AttentionBackendRegistry._backends`` on every call. Wrapping those registry entries (installed while a memopt
attention hook exists, restored when the last one is removed) lets memopt see, and replace, the one call that needs
the whole sequence without copying or patching any processor. A few older processors (CogVideoX, SD3's
``JointAttnProcessor2_0``, Mochi) call ``F.scaled_dot_product_attention`` directly; for those a
``TorchFunctionMode`` catches that one function, active only while a hooked attention module runs.

Both routes hand the handlers an :class:`AttentionCall` in the dispatch layout ``(batch, seq, heads, head_dim)``
with the mask normalised to a 4-D view broadcastable to ``(batch, heads, seq_q, seq_kv)``. Handlers run as a chain
ordered by priority; each either answers the call or passes a (possibly modified) call on with ``proceed``; the end
of the chain is the original backend (or SDPA). While the chain runs, interception is off, so the handlers' own
attention calls go straight to the kernels.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from diffusers.models.attention_dispatch import _AttentionBackendRegistry
from torch.overrides import TorchFunctionMode

# Order of handlers in the chain: lower runs first. Sequence chunking must see the call before the attention math is
# chunked, because it swaps in the full-length K/V that the chunked math then works on.
SEQUENCE_PRIORITY = 0
CHUNKED_ATTENTION_PRIORITY = 10

_CORE_FIELDS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


@dataclasses.dataclass(frozen=True)
class AttentionCall:
    """One attention kernel call, in diffusers' dispatch layout.

    Attributes:
        query: ``(B, S_q, H, D)``.
        key: ``(B, S_kv, H_kv, D)``.
        value: ``(B, S_kv, H_kv, D_v)``.
        attn_mask: ``None`` or a bool/additive mask viewed as 4-D, broadcastable to ``(B, H, S_q, S_kv)`` (a
            ``(B, S_kv)`` key-padding mask given to the dispatcher becomes ``(B, 1, 1, S_kv)``, as the native backend
            reads it), or a non-tensor mask object of the backend (flex attention's ``BlockMask``), untouched.
        dropout_p, is_causal, scale, enable_gqa: as in ``F.scaled_dot_product_attention``.
        route: ``"dispatch:<backend name>"`` or ``"sdpa"`` (a processor calling SDPA itself).
        extras: further backend keyword arguments passed through untouched (``return_lse``, ``_parallel_config``).
    """

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    attn_mask: torch.Tensor | None = None
    dropout_p: float = 0.0
    is_causal: bool = False
    scale: float | None = None
    enable_gqa: bool = False
    route: str = "sdpa"
    extras: dict[str, Any] = dataclasses.field(default_factory=dict)

    def replace(self, **changes: Any) -> "AttentionCall":
        return dataclasses.replace(self, **changes)

    def output_like(self) -> torch.Tensor:
        """An uninitialised tensor of this call's output shape (for calls whose result is never read). Its batch is
        the keys' where the query is an empty stand-in (``JointAttention.empty_stand_ins``), so that the code after
        the call can still add it to the block's hidden states."""
        batch = self.query.shape[0] or self.key.shape[0]
        return self.query.new_empty(batch, *self.query.shape[1:-1], self.value.shape[-1])


Proceed = Callable[[AttentionCall], torch.Tensor]
Handler = Callable[[AttentionCall, Proceed], torch.Tensor]


class _State(threading.local):
    def __init__(self) -> None:
        self.handlers: list[tuple[int, int, Handler]] = []  # (priority, push order, handler)
        self.pushes = 0
        self.busy = False
        self.mode: _SDPAMode | None = None


_STATE = _State()
_INSTALL_LOCK = threading.Lock()
_installed_users = 0
_original_backends: dict[Any, Callable[..., Any]] = {}


def _as_4d_mask(mask: Any, query: torch.Tensor, key: torch.Tensor, dispatch: bool) -> Any:
    if not isinstance(mask, torch.Tensor):
        # None, or a mask object only its backend reads (flex attention's BlockMask: Kandinsky 6 SR's NABLA
        # sparse attention), passed on untouched; the handlers leave such calls alone.
        return mask
    if dispatch and mask.ndim == 2 and mask.shape[0] == query.shape[0] and mask.shape[1] == key.shape[1]:
        return mask[:, None, None, :]
    if mask.ndim > 4:
        raise ValueError(f"memopt: attention mask with {mask.ndim} dims (shape {tuple(mask.shape)}) is not supported")
    return mask.reshape((1,) * (4 - mask.ndim) + tuple(mask.shape))


def _call_handler(handler: Handler, proceed: Proceed, call: AttentionCall) -> torch.Tensor:
    return handler(call, proceed)


def _run_chain(call: AttentionCall, final: Proceed) -> torch.Tensor:
    # Built back to front from partials: a self-referencing closure would form a reference cycle that keeps the
    # handlers (and the K/V buffers they reach) alive until the garbage collector runs.
    proceed = final
    for _, _, handler in sorted(_STATE.handlers, key=lambda item: item[:2], reverse=True):
        proceed = functools.partial(_call_handler, handler, proceed)
    _STATE.busy = True
    try:
        return proceed(call)
    finally:
        _STATE.busy = False


def _intercepting() -> bool:
    return bool(_STATE.handlers) and not _STATE.busy


# ------------------------------------------------------------------------------------------- dispatch route
def _wrap_backend(name: Any, backend_fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(backend_fn)
    def memopt_intercepted_backend(**kwargs: Any) -> Any:
        if not _intercepting():
            return backend_fn(**kwargs)
        query, key = kwargs["query"], kwargs["key"]
        call = AttentionCall(
            query=query,
            key=key,
            value=kwargs["value"],
            attn_mask=_as_4d_mask(kwargs.get("attn_mask"), query, key, dispatch=True),
            dropout_p=kwargs.get("dropout_p", 0.0),
            is_causal=kwargs.get("is_causal", False),
            scale=kwargs.get("scale"),
            enable_gqa=kwargs.get("enable_gqa", False),
            route=f"dispatch:{getattr(name, 'value', name)}",
            extras={k: v for k, v in kwargs.items() if k not in _CORE_FIELDS},
        )

        def final(current: AttentionCall) -> Any:
            # Pass back exactly the argument names the dispatcher gave this backend (it filters by signature).
            return backend_fn(**{k: getattr(current, k) if k in _CORE_FIELDS else current.extras[k] for k in kwargs})

        return _run_chain(call, final)

    memopt_intercepted_backend.memopt_original = backend_fn
    return memopt_intercepted_backend


def _wrap_new_backends() -> None:
    """Wrap every registered backend not wrapped yet (backends can be registered after memopt was applied)."""
    backends = _AttentionBackendRegistry._backends
    for name, fn in list(backends.items()):
        if getattr(fn, "memopt_original", None) is None:
            _original_backends[name] = fn
            backends[name] = _wrap_backend(name, fn)


def acquire_interception() -> None:
    """Install the backend wrappers (reference counted: one acquire per attention hook)."""
    global _installed_users
    with _INSTALL_LOCK:
        _installed_users += 1
        _wrap_new_backends()


def release_interception() -> None:
    """Undo one :func:`acquire_interception`; the last release restores diffusers' registry."""
    global _installed_users
    with _INSTALL_LOCK:
        _installed_users = max(0, _installed_users - 1)
        if _installed_users:
            return
        backends = _AttentionBackendRegistry._backends
        for name, original in _original_backends.items():
            if getattr(backends.get(name), "memopt_original", None) is original:
                backends[name] = original
        _original_backends.clear()


# ------------------------------------------------------------------------------------------- SDPA route
_SDPA_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None, "enable_gqa": False}


class _SDPAMode(TorchFunctionMode):
    """Catches ``F.scaled_dot_product_attention`` (layout ``(B, H, S, D)``) while a hooked attention module runs."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention or not _intercepting():
            return func(*args, **kwargs)
        values = {**_SDPA_DEFAULTS, **dict(zip(_SDPA_PARAMS, args)), **kwargs}
        query, key, value = values["query"], values["key"], values["value"]
        if query.ndim != 4:
            raise NotImplementedError(
                f"memopt: intercepted scaled_dot_product_attention with a {query.ndim}-D query "
                f"{tuple(query.shape)}; only (batch, heads, seq, head_dim) calls are supported"
            )
        call = AttentionCall(
            query=query.transpose(1, 2),
            key=key.transpose(1, 2),
            value=value.transpose(1, 2),
            attn_mask=_as_4d_mask(values["attn_mask"], query, key, dispatch=False),
            dropout_p=values["dropout_p"],
            is_causal=values["is_causal"],
            scale=values["scale"],
            enable_gqa=values["enable_gqa"],
            route="sdpa",
        )

        def final(current: AttentionCall) -> torch.Tensor:
            return F.scaled_dot_product_attention(
                current.query.transpose(1, 2),
                current.key.transpose(1, 2),
                current.value.transpose(1, 2),
                attn_mask=current.attn_mask,
                dropout_p=current.dropout_p,
                is_causal=current.is_causal,
                scale=current.scale,
                enable_gqa=current.enable_gqa,
            ).transpose(1, 2)

        return _run_chain(call, final).transpose(1, 2)


# ------------------------------------------------------------------------------------------- entry point
def calls_sdpa_directly(attention_module: torch.nn.Module) -> bool:
    """Whether the module's processor calls ``F.scaled_dot_product_attention`` itself instead of the dispatcher.

    diffusers' dispatch-based processors declare ``_attention_backend`` (they pass it to ``dispatch_attention_fn``);
    the older ones (``AttnProcessor2_0``, ``JointAttnProcessor2_0``, CogVideoX's, Mochi's) do not. Only the latter
    need the ``TorchFunctionMode``, which costs a Python call per torch function while the module runs.
    """
    return not hasattr(getattr(attention_module, "processor", None), "_attention_backend")


@contextlib.contextmanager
def intercept_attention(handler: Handler, priority: int, sdpa: bool = True) -> Iterator[None]:
    """Route every attention kernel call made inside this context through ``handler``.

    Used by memopt's attention-module hooks around the module's original forward, so only that module's calls are
    seen. Nested uses (two techniques on one module) chain their handlers by ``priority``. ``sdpa=False`` skips
    catching direct ``F.scaled_dot_product_attention`` calls (see :func:`calls_sdpa_directly`).
    """
    if not _installed_users:
        raise RuntimeError("memopt: attention interception used without acquire_interception() (no hook installed)")
    _wrap_new_backends()
    _STATE.pushes += 1
    entry = (priority, _STATE.pushes, handler)
    _STATE.handlers.append(entry)
    opened_mode = sdpa and _STATE.mode is None
    if opened_mode:
        _STATE.mode = _SDPAMode()
        _STATE.mode.__enter__()
    try:
        yield
    finally:
        if opened_mode:
            mode, _STATE.mode = _STATE.mode, None
            mode.__exit__(None, None, None)
        _STATE.handlers.remove(entry)


@contextlib.contextmanager
def parked_interception() -> Iterator[None]:
    """Set this thread's interception state aside while a handler suspends its caller, and bring it back after.

    Sequence chunking's lock-step schedule suspends a chunk inside its attention call (a greenlet switch on the same
    thread) and runs the other chunks, whose attention modules enter their own interception; they must start from
    a clean state (no handlers, no SDPA mode on the torch function stack), and the suspended chunk must find its own
    when it resumes.
    """
    saved = (_STATE.handlers, _STATE.busy, _STATE.mode)
    # The SDPA mode is off the stack while its own __torch_function__ runs (PyTorch stashes it); on the dispatch
    # route it is still on top, and the other chunks must not run under it.
    mode = _STATE.mode
    depth = torch._C._len_torch_function_stack()
    lift = mode is not None and depth > 0 and torch._C._get_function_stack_at(depth - 1) is mode
    if lift:
        torch._C._pop_torch_function_stack()
    _STATE.handlers, _STATE.busy, _STATE.mode = [], False, None
    try:
        yield
    finally:
        _STATE.handlers, _STATE.busy, _STATE.mode = saved
        if lift:
            torch._C._push_on_torch_function_stack(mode)
