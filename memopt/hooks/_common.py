"""Shared plumbing for memopt's hooks: names, registration and removal.

Every memopt hook is a diffusers ``ModelHook`` registered through ``HookRegistry`` under a name that starts
with :data:`HOOK_PREFIX`, so :func:`remove_memory_optimizations` can undo exactly memopt's hooks and leave any
other hook (group offloading, caches, LoRA hotswap ...) in place.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
from diffusers.hooks import HookRegistry, ModelHook

HOOK_PREFIX = "memopt."

EAGER_HOOKS = ("memopt.sequence",)
"""Names (and their sub-names) of hooks that ``torch.compile`` runs eagerly instead of tracing: sequence chunking, whose
chunk loop keeps Python state per call (the running chunk's layout, collected K/V, caches of rotary rows and reused
outputs) that a traced graph would bake in and replay for other chunks (inductor indexed Wan's rotary table out of
bounds at 8 chunks of 2,304 tokens; dynamo alone hit its recompilation limit). Dynamo breaks the graph at them; the
rest of the model is compiled as usual. (The planner's hook disables compilation only where it plans.)"""


def register_memopt_hook(module: torch.nn.Module, hook: ModelHook, name: str) -> None:
    """Register ``hook`` on ``module`` under ``name`` (which must start with :data:`HOOK_PREFIX`)."""
    if not name.startswith(HOOK_PREFIX):
        raise ValueError(f"memopt hook names must start with {HOOK_PREFIX!r}, got {name!r}")
    registry = HookRegistry.check_if_exists_or_initialize(module)
    if registry.get_hook(name) is not None:
        raise RuntimeError(
            f"{type(module).__name__} already has the hook {name!r}; call memopt.remove_memory_optimizations() "
            "before applying it again"
        )
    if any(name == prefix or name.startswith(prefix + ".") for prefix in EAGER_HOOKS) and hasattr(hook, "new_forward"):
        hook.new_forward = torch.compiler.disable(hook.new_forward)  # read by the registry as it registers the hook
    registry.register_hook(hook, name)


def remove_hook(module: torch.nn.Module, name: str) -> None:
    """Remove the hook ``name`` from ``module``, keeping the hooks around it running.

    ``HookRegistry.remove_hook`` splices a hook out by pointing the next outer hook's ``fn_ref.forward`` at what the
    removed one called. For an outer hook with a ``new_forward`` of its own (diffusers' step caches: First Block
    Cache, FasterCache, Pyramid Attention Broadcast ...) that field holds the ``new_forward``, and the chain below is
    its ``original_forward``: the outer hook silently stopped running (FasterCache enabled after
    ``apply_memory_optimizations`` became a no-op when the plan hook removed itself at the first forward). The same
    removal under a memopt hook (``disable_cache()`` after memopt) leaves that hook's ``original_forward`` on the
    removed wrapper, which removing the memopt hook then reinstated: the cache ran on, with no hook registered.
    """
    registry = module._diffusers_hook
    index = registry._hook_order.index(name)
    hook, fn_ref = registry.hooks[name], registry._fn_refs[index]
    if fn_ref.original_forward is not None and getattr(fn_ref.forward, "func", None) != hook.new_forward:
        fn_ref.original_forward = fn_ref.forward  # overwritten by a removal below it: the chain below is there now
    outer = registry._fn_refs[index + 1] if index + 1 < len(registry._fn_refs) else None
    outer_forward = outer.forward if outer is not None and outer.original_forward is not None else None
    registry.remove_hook(name, recurse=False)
    if outer_forward is not None:
        outer.original_forward, outer.forward = outer.forward, outer_forward


def step_cache_hooks(module: torch.nn.Module, prefix: str = "") -> list[str]:
    """Hooks under ``module`` that are not memopt's and keep state from one call to the next, as ``"path: name"``
    (``prefix``: the module's own path in its model): diffusers' step caches (First Block Cache, MagCache, SeaCache,
    Pyramid Attention Broadcast, FasterCache, TaylorSeer, the text K/V cache; ``ModelHook._is_stateful``). They
    compare, keep or replay whole-sequence outputs of blocks and attention modules across steps, which under sequence
    chunking would see one chunk per call.
    """
    found = []
    for path, submodule in module.named_modules():
        registry = getattr(submodule, "_diffusers_hook", None)
        if registry is not None:
            where = ".".join(part for part in (prefix, path) if part) or "<model>"
            found += [f"{where}: {name}" for name in registry._hook_order
                      if not name.startswith(HOOK_PREFIX) and registry.hooks[name]._is_stateful]
    return found


def refuse_under_step_caches(module: torch.nn.Module, technique: str, path: str | None = None) -> None:
    """Raise where :func:`step_cache_hooks` finds any under ``module`` (at ``path`` in its model): ``technique``
    cannot run under them."""
    caches = step_cache_hooks(module, path or "")
    if caches:
        shown = ", ".join(caches[:3]) + (f" and {len(caches) - 3} more" if len(caches) > 3 else "")
        raise ValueError(
            f"{path or type(module).__name__} carries diffusers' step-cache hooks ({shown}): they keep whole-sequence "
            f"outputs of blocks and attention modules from one step to the next, which under {technique} would each "
            "see one chunk of the sequence. memopt's FeedForward and attention chunking run under them exactly "
            "(memopt.apply_chunked_feedforward, memopt.apply_chunked_attention; memopt.apply_memory_optimizations "
            "plans without sequence chunks), or disable the cache (model.disable_cache())"
        )


def refuse_if_hooked(modules: list[tuple[str, torch.nn.Module]], name: str, technique: str) -> None:
    """Raise before any module is hooked when one of ``modules`` (``(path, module)`` pairs) already has the hook
    ``name``: applying a technique twice is refused as a whole, never left half-applied."""
    for path, module in modules:
        registry = getattr(module, "_diffusers_hook", None)
        if registry is not None and registry.get_hook(name) is not None:
            raise RuntimeError(
                f"{path or type(module).__name__} already has memopt's {technique} hook; call "
                "memopt.remove_memory_optimizations(model) before applying it again"
            )


def iter_memopt_hooks(module: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Module, str]]:
    """Yield ``(module_path, submodule, hook_name)`` for every memopt hook under ``module``.

    Per module, hooks come outermost first (the reverse of registration), the order in which they can be removed:
    ``HookRegistry.remove_hook`` splices a hook out by re-pointing the hook registered after it, so removing an inner
    hook first would leave the outer one calling into the removed one.
    """
    for path, submodule in module.named_modules():
        registry = getattr(submodule, "_diffusers_hook", None)
        if registry is None:
            continue
        for hook_name in reversed(list(registry._hook_order)):
            if hook_name.startswith(HOOK_PREFIX):
                yield path, submodule, hook_name


@contextlib.contextmanager
def removed_on_error(module: torch.nn.Module) -> Iterator[None]:
    """An ``apply_*`` that raises part-way (a plan the model does not fit, found at its n-th block) takes back the
    memopt hooks it registered under ``module``, so a model is never left half-optimised; hooks that were there
    before (other techniques) stay."""
    before = {(id(submodule), name) for _, submodule, name in iter_memopt_hooks(module)}
    try:
        yield
    except BaseException:
        for _, submodule, name in list(iter_memopt_hooks(module)):
            if (id(submodule), name) not in before:
                remove_hook(submodule, name)
        raise


def has_memopt_hooks(module: torch.nn.Module) -> bool:
    return next(iter_memopt_hooks(module), None) is not None


def remove_memopt_hooks(module: torch.nn.Module) -> int:
    """Remove every memopt hook under ``module``; return how many were removed."""
    removed = 0
    for _, submodule, hook_name in list(iter_memopt_hooks(module)):
        remove_hook(submodule, hook_name)
        removed += 1
    return removed


def hooks_inside(module: torch.nn.Module, name: str) -> dict[str, ModelHook]:
    """The hooks registered on ``module`` before the one called ``name``, by name: diffusers runs them inside it,
    from its ``original_forward``. A hook that computes the module's forward itself, from its submodules, runs their
    ``pre_forward`` / ``post_forward`` with :func:`call_inside` (block-level group offloading applied first)."""
    registry = module._diffusers_hook
    order = registry._hook_order
    return {hook_name: registry.hooks[hook_name] for hook_name in order[: order.index(name)]}


def call_inside(hooks: list[ModelHook], module: torch.nn.Module, fn: Callable[..., Any], *args: Any,
                **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` in place of ``module``'s forward under ``hooks`` (:func:`hooks_inside`): their
    ``pre_forward`` outermost first, which may replace the arguments, then ``post_forward`` innermost first."""
    for hook in reversed(hooks):
        args, kwargs = hook.pre_forward(module, *args, **kwargs)
    output = fn(*args, **kwargs)
    for hook in hooks:
        output = hook.post_forward(module, output)
    return output
