"""Sana's blocks in sequence chunks, streamed: blocks whose FeedForward convolves neighbouring tokens.

memopt's sequence chunking exchanges K/V between chunks and otherwise runs each chunk through a block on its own:
every step but attention is token-wise. Sana's blocks break that twice. Their self-attention is linear, so a chunk
needs the sums over every chunk's keys (:mod:`._linear_attention`), not their K/V. And their FeedForward convolves
each token with its neighbours: Sana's depthwise 3x3 over the image (``GLUMBConv``), Sana Video's 3-tap convolution
over frames after its per-frame ones (``GLUMBTempConv``). So a block runs in two sweeps over bands of whole rows
(whole frames for Sana Video): the first adds each band's key sums; the second runs each band through the block and
*streams* the convolution: a band's last row needs the next band's first, so it waits, with the two rows of
convolution input the next band's first output row needs, and the next band finishes it (the image's edges are the
convolution's zero padding, as unchunked). Nothing is recomputed; the block holds its input, one band and a few
carried rows, and writes its output over its input: only rows already read, never read again.

Training (``apply_sequence_chunking(training=True)``): a block recorded by autograd runs the same streamed forward
without autograd, out of place, saving only its inputs, and its backward recomputes it band by band: the key sums
again without autograd, made leaves; each band recorded up to the convolution, with the convolution input of the
units around it as values only (``_StreamedLayout.halo`` of them on either side), its output rows back-propagated into
the inputs, the parameters and the key sums' gradient together with the gradient that the two neighbour units'
outputs send into its convolution input (their own parameter gradients are their bands'); then each band's share of
the key sums, back-propagated with that gradient. The backward holds the block's input and output gradients, one
band's recorded activations, a few units of values and the key sums.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch
from diffusers.hooks import ModelHook
from torch.utils._pytree import tree_flatten, tree_unflatten
from diffusers.models.transformers.sana_transformer import SanaTransformerBlock
from diffusers.models.transformers.transformer_sana_video import SanaVideoTransformerBlock

from ._common import HOOK_PREFIX, call_inside, hooks_inside, refuse_under_step_caches
from ._linear_attention import LINEAR_ATTENTION, SanaKeySums, SanaVideoKeySums, token_rows
from ._sequence_backward import InputGradients, SavedOnHost, _autocast_state, _backward, _refuse_dropout, recomputing
from .feedforward import sharded_convolutions, split_sizes

logger = logging.getLogger(__name__)


@dataclass
class _Band:
    """What the block computed for a band's units (or the carried ones) before the convolution that mixes
    neighbours: ``residual`` (B, units, per_unit, D), the block's hidden states there, and ``mixed_input`` (units
    first), what that convolution reads."""

    residual: torch.Tensor
    mixed_input: torch.Tensor


@dataclass(frozen=True)
class _StreamedLayout:
    """How one block class streams: its unit (an image row, a frame) and its three stages.

    ``add(block, sums, x, rows, arguments)`` adds a band's key sums (the first sweep); ``before(block, x, rows,
    arguments, sums) -> _Band`` runs a band up to the neighbour-mixing convolution; ``mix(block, window, keep,
    arguments)`` runs that convolution for the units ``keep`` of a window of units (see :func:`_neighbourhood`);
    ``after(block, residual, mixed, rows, arguments)`` finishes the output rows of those units.
    """

    units: Callable[[dict[str, Any]], tuple[int, int]]  # arguments -> (number of units, tokens per unit)
    sums: type
    add: Callable[..., None]
    before: Callable[..., _Band]
    mix: Callable[..., torch.Tensor]
    after: Callable[..., torch.Tensor]
    halo: int  # units of convolution input beyond a band that its backward reads (see StreamedBlockHook.backward)


def _neighbourhood(window: torch.Tensor, keep: slice) -> tuple[torch.Tensor, slice]:
    """The units of ``window`` (units first) that a radius-1 convolution reads for the units ``keep``, and where
    ``keep`` lies in them. The window holds both neighbours of every kept unit except at the image's (video's)
    edges, where the convolution's own zero padding stands in for them, as in the unmodified forward."""
    low, high = max(keep.start - 1, 0), min(keep.stop + 1, len(window))
    return window[low:high], slice(keep.start - low, keep.stop - low)


def _attention_input(block: torch.nn.Module, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor
                     ) -> torch.Tensor:
    """Both blocks' modulated ``norm1`` before the self-attention."""
    return (block.norm1(x) * (1 + scale) + shift).to(x.dtype)


# ------------------------------------------------------------------------------------------------ Sana (image)
def _sana_units(arguments: dict[str, Any]) -> tuple[int, int]:
    return arguments["height"], arguments["width"]


def _sana_modulation(block: SanaTransformerBlock, arguments: dict[str, Any]) -> tuple[torch.Tensor, ...]:
    timestep, batch = arguments["timestep"], arguments["hidden_states"].shape[0]
    return (block.scale_shift_table[None] + timestep.reshape(batch, 6, -1)).chunk(6, dim=1)


def _sana_add(block: SanaTransformerBlock, sums: SanaKeySums, x: torch.Tensor, rows: slice,
              arguments: dict[str, Any]) -> None:
    shift, scale = _sana_modulation(block, arguments)[:2]
    sums.add(_attention_input(block, x, shift, scale))


def _sana_before(block: SanaTransformerBlock, x: torch.Tensor, rows: slice, arguments: dict[str, Any],
                 sums: SanaKeySums) -> _Band:
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, _ = _sana_modulation(block, arguments)
    hidden = x + gate_msa * sums.attend(_attention_input(block, x, shift_msa, scale_msa))
    if block.attn2 is not None:
        hidden = block.attn2(hidden, encoder_hidden_states=arguments["encoder_hidden_states"],
                             attention_mask=arguments["encoder_attention_mask"]) + hidden
    norm = block.norm2(hidden) * (1 + scale_mlp) + shift_mlp
    ff, width = block.ff, arguments["width"]
    up = ff.nonlinearity(ff.conv_inverted(norm.unflatten(1, (-1, width)).permute(0, 3, 1, 2)))
    return _Band(hidden.unflatten(1, (-1, width)), up.transpose(0, 2))  # rows first: (rows, C, B, W)


def _sana_mix(block: SanaTransformerBlock, window: torch.Tensor, keep: slice,
              arguments: dict[str, Any]) -> torch.Tensor:
    ff = block.ff
    part, kept = _neighbourhood(window, keep)
    hidden, gate = torch.chunk(ff.conv_depth(part.transpose(0, 2))[:, :, kept], 2, dim=1)
    return ff.conv_point(hidden * ff.nonlinearity(gate)).transpose(0, 2)  # rows first


def _sana_after(block: SanaTransformerBlock, residual: torch.Tensor, mixed: torch.Tensor, rows: slice,
                arguments: dict[str, Any]) -> torch.Tensor:
    gate_mlp = _sana_modulation(block, arguments)[5]
    ff_output = mixed.transpose(0, 2).flatten(2, 3).permute(0, 2, 1)  # (B, rows x W, D)
    return residual.flatten(1, 2) + gate_mlp * ff_output


# ------------------------------------------------------------------------------------------------ Sana Video
def _video_units(arguments: dict[str, Any]) -> tuple[int, int]:
    return arguments["frames"], arguments["height"] * arguments["width"]


def _video_modulation(block: SanaVideoTransformerBlock, arguments: dict[str, Any], rows: slice
                      ) -> tuple[torch.Tensor, ...]:
    """The block's six modulation tables for ``rows``: a per-token timestep (B, N, 6 D) is cut before the table is
    built (whole, it would be 6 LD)."""
    hidden = arguments["hidden_states"]
    timestep = token_rows(arguments["timestep"], rows, hidden.shape[1])
    return (block.scale_shift_table[None, None] + timestep.reshape(hidden.shape[0], timestep.shape[1], 6, -1)
            ).unbind(dim=2)


def _video_rotary(arguments: dict[str, Any], rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = arguments["hidden_states"].shape[1]
    return tuple(token_rows(table, rows, tokens) for table in arguments["rotary_emb"])


def _video_add(block: SanaVideoTransformerBlock, sums: SanaVideoKeySums, x: torch.Tensor, rows: slice,
               arguments: dict[str, Any]) -> None:
    shift, scale = _video_modulation(block, arguments, rows)[:2]
    sums.add(_attention_input(block, x, shift, scale), _video_rotary(arguments, rows))


def _video_before(block: SanaVideoTransformerBlock, x: torch.Tensor, rows: slice, arguments: dict[str, Any],
                  sums: SanaVideoKeySums) -> _Band:
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, _ = _video_modulation(block, arguments, rows)
    attention = sums.attend(_attention_input(block, x, shift_msa, scale_msa), _video_rotary(arguments, rows))
    hidden = x + gate_msa * attention
    del attention
    if block.attn2 is not None:
        hidden = block.attn2(hidden, encoder_hidden_states=arguments["encoder_hidden_states"],
                             attention_mask=arguments["encoder_attention_mask"]) + hidden
    norm = block.norm2(hidden) * (1 + scale_mlp) + shift_mlp
    ff, height, width = block.ff, arguments["height"], arguments["width"]
    batch, channels = norm.shape[0], norm.shape[-1]
    # GLUMBTempConv.forward up to its temporal convolution, on this band's frames: in channel shards where memopt's
    # FeedForward hook is on it, else as the module writes it
    sharded = sharded_convolutions(ff, norm.reshape(-1, height, width, channels))
    if sharded is not None:
        point = sharded.view(batch, -1, height * width, channels).permute(1, 0, 3, 2)  # frames first: (F, B, D, HW)
        return _Band(hidden.unflatten(1, (-1, height * width)), point)
    frames = norm.reshape(-1, height, width, channels).permute(0, 3, 1, 2)
    frames = ff.nonlinearity(ff.conv_inverted(frames))
    frames, gate = torch.chunk(ff.conv_depth(frames), 2, dim=1)
    frames = ff.conv_point(frames * ff.nonlinearity(gate))
    point = frames.view(batch, -1, channels, height * width).transpose(0, 1)  # frames first: (F, B, D, HW)
    return _Band(hidden.unflatten(1, (-1, height * width)), point)


def _video_mix(block: SanaVideoTransformerBlock, window: torch.Tensor, keep: slice,
               arguments: dict[str, Any]) -> torch.Tensor:
    part, kept = _neighbourhood(window, keep)
    temporal = part.permute(1, 2, 0, 3)  # (B, D, F, HW), as GLUMBTempConv's hidden_states_temporal
    mixed = temporal[:, :, kept] + block.ff.conv_temp(temporal)[:, :, kept]
    return mixed.permute(2, 0, 3, 1)  # frames first: (F, B, HW, D)


def _video_after(block: SanaVideoTransformerBlock, residual: torch.Tensor, mixed: torch.Tensor, rows: slice,
                 arguments: dict[str, Any]) -> torch.Tensor:
    gate_mlp = _video_modulation(block, arguments, rows)[5]
    return residual.flatten(1, 2) + gate_mlp * mixed.transpose(0, 1).flatten(1, 2)


STREAMED_LAYOUTS: dict[type, _StreamedLayout] = {
    SanaTransformerBlock: _StreamedLayout(_sana_units, SanaKeySums, _sana_add, _sana_before, _sana_mix, _sana_after,
                                          halo=2),
    SanaVideoTransformerBlock: _StreamedLayout(_video_units, SanaVideoKeySums, _video_add, _video_before, _video_mix,
                                               _video_after, halo=1),
}
"""Block class -> how it streams. Each stage mirrors the block's forward in diffusers 0.42 line by line. ``halo``:
Sana's gate follows its depthwise convolution, so the gradient a neighbour row's output sends into a band's convolution
input depends on the row beyond it too (2); Sana Video's temporal mix and everything after it are linear in the
convolution input, so that gradient does not depend on any value (1: the next frame's values, for the convolution
weights' gradient)."""

@dataclass(frozen=True)
class StreamedModel:
    """Where a model's streamed blocks are, its output norm run in token chunks (:class:`ChunkedNormHook`; None:
    none), and whether it keeps its blocks' outputs (a ControlNet returns them all), so they write out of place."""

    blocks: str
    norm: str | None
    keeps_block_outputs: bool = False


STREAMED_MODELS = {
    "SanaTransformer2DModel": StreamedModel("transformer_blocks", "norm_out"),
    "SanaVideoTransformer3DModel": StreamedModel("transformer_blocks", "norm_out"),
    "SanaControlNetModel": StreamedModel("transformer_blocks", None, keeps_block_outputs=True),
}
"""Model classes whose blocks stream (their blocks are in :data:`STREAMED_LAYOUTS`)."""


def streaming_refusal(block: torch.nn.Module) -> str | None:
    """Why ``block`` cannot stream (a configuration the layouts do not mirror), or None."""
    if type(block) not in STREAMED_LAYOUTS:
        return f"{type(block).__name__} has no streamed layout"
    if type(block.attn1.processor) not in LINEAR_ATTENTION:
        return f"attn1 runs {type(block.attn1.processor).__name__}, not Sana's linear attention"
    ff = block.ff
    if ff.residual_connection or ff.norm_type is not None:
        return "its FeedForward has a residual or a norm, which the streamed layout does not mirror"
    if ff.conv_depth.kernel_size[0] != 3 or ff.conv_depth.padding[0] != 1 or ff.conv_depth.stride[0] != 1:
        return "its FeedForward's depthwise convolution is not 3 rows with padding 1"
    if isinstance(block, SanaVideoTransformerBlock) and (ff.conv_temp.kernel_size[0] != 3
                                                         or ff.conv_temp.padding[0] != 1):
        return "its temporal convolution is not 3 frames with padding 1"
    return None


def split_units(units: int, num_chunks: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of at most ``num_chunks`` bands of whole units, sizes differing by at most one."""
    return split_sizes(units, min(num_chunks, units))


def _foreign_hooks(module: torch.nn.Module) -> list[str]:
    """Names of the hooks other than memopt's on ``module`` (a diffusers cache hook on an attention module)."""
    registry = getattr(module, "_diffusers_hook", None)
    return [] if registry is None else [name for name in registry._hook_order if not name.startswith(HOOK_PREFIX)]


class StreamedBlockHook(ModelHook):
    """Runs a Sana block in ``num_chunks`` bands of whole rows (frames), streamed (see the module docstring); with
    ``training``, also while autograd records, with a banded backward (``saved_inputs``: ``"device"`` or
    ``"host"``, where the saved inputs wait, as :class:`~memopt.hooks._sequence_backward.SavedOnHost`)."""

    _is_stateful = False

    def __init__(self, path: str, num_chunks: int, inplace: bool, name: str, training: bool = False,
                 saved_inputs: str = "device") -> None:
        super().__init__()
        self.path = path
        self.num_chunks = num_chunks
        self.inplace = inplace
        self.name = name  # the name it is registered under (the hooks before it are the block's inner ones)
        self.training = training
        self.saved_inputs = saved_inputs
        self._warned: set[str] = set()

    def new_forward(self, block: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        refuse_under_step_caches(block, "streamed blocks", self.path)  # a cache enabled after memopt
        hidden = self._arguments(block, args, kwargs)["hidden_states"]
        recording = torch.is_grad_enabled() and (
            hidden.requires_grad or any(p.requires_grad for p in block.parameters()))
        if recording and not self.training:
            return self._unchunked("autograd is recording, running unchunked (apply_sequence_chunking(training=True) "
                                   "chunks it; or wrap the call in torch.no_grad())", args, kwargs)
        inner = list(hooks_inside(block, self.name).values())
        if any(hasattr(hook, "new_forward") for hook in inner):
            return self._unchunked("a hook registered before memopt's replaces the block's forward: running "
                                   "unchunked", args, kwargs)
        bypassed = _foreign_hooks(block.attn1)
        if bypassed:
            return self._unchunked(f"attn1 carries the hooks {bypassed}, which the bands (computing the linear "
                                   "attention from its projections) would bypass: running unchunked", args, kwargs)
        # The bands call the block's modules, not its forward: hooks registered on the block before this one (block-
        # level group offloading applied first) get their pre_forward / post_forward around the whole streamed run.
        run = self._recorded if recording else self._streamed
        return call_inside(inner, block, lambda *a, **k: run(block, self._arguments(block, a, k)), *args, **kwargs)

    @staticmethod
    def _arguments(block: torch.nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
        """The block's forward arguments by name, defaults filled in."""
        bound = inspect.signature(type(block).forward).bind(block, *args, **kwargs)
        bound.apply_defaults()
        return {name: value for name, value in bound.arguments.items() if name != "self"}

    def _unchunked(self, message: str, args: tuple, kwargs: dict) -> Any:
        if message not in self._warned:
            self._warned.add(message)
            logger.warning("%s: %s", self.path, message)
        return self.fn_ref.original_forward(*args, **kwargs)

    def _bands(self, layout: _StreamedLayout, arguments: dict[str, Any]) -> tuple[int, int, list[tuple[int, int]]]:
        hidden = arguments["hidden_states"]
        units, per_unit = layout.units(arguments)
        if units * per_unit != hidden.shape[1]:
            raise ValueError(f"{self.path}: {hidden.shape[1]} tokens are not {units} x {per_unit}")
        return units, per_unit, split_units(units, self.num_chunks)

    def _key_sums(self, layout: _StreamedLayout, block: torch.nn.Module, arguments: dict[str, Any]) -> Any:
        """The first sweep: every band's share of the linear attention's key sums, added up."""
        _, per_unit, bands = self._bands(layout, arguments)
        sums = layout.sums(block.attn1)
        for start, stop in bands:
            rows = slice(start * per_unit, stop * per_unit)
            layout.add(block, sums, arguments["hidden_states"][:, rows], rows, arguments)
        return sums

    def _streamed(self, block: torch.nn.Module, arguments: dict[str, Any], in_place: bool | None = None
                  ) -> torch.Tensor:
        layout = STREAMED_LAYOUTS[type(block)]
        hidden = arguments["hidden_states"]
        units, per_unit, bands = self._bands(layout, arguments)
        sums = self._key_sums(layout, block, arguments)
        out = hidden if (self.inplace if in_place is None else in_place) else torch.empty_like(hidden)
        carried: _Band | None = None  # the last unit's residual and the last two units' convolution input
        for start, stop in bands:
            rows = slice(start * per_unit, stop * per_unit)
            band = layout.before(block, hidden[:, rows], rows, arguments, sums)
            if carried is not None:
                band = _Band(torch.cat([carried.residual, band.residual], dim=1),
                             torch.cat([carried.mixed_input, band.mixed_input], dim=0))
            first = start - (0 if carried is None else 1)  # the unit band.residual starts at
            window = start - (0 if carried is None else len(carried.mixed_input))  # the unit mixed_input starts at
            last = stop == units
            done = stop if last else stop - 1  # units [first, done) can be finished now
            if done > first:  # a one-unit first band finishes nothing yet
                mixed = layout.mix(block, band.mixed_input, slice(first - window, done - window), arguments)
                finished = slice(first * per_unit, done * per_unit)
                out[:, finished] = layout.after(block, band.residual[:, : done - first], mixed, finished, arguments)
                del mixed
            carried = None if last else _Band(band.residual[:, done - first:].clone(),
                                              band.mixed_input[-2:].clone())
            del band
        return out

    def _recorded(self, block: torch.nn.Module, arguments: dict[str, Any]) -> torch.Tensor:
        """The streamed forward without autograd, recorded as one node whose backward recomputes it in bands."""
        _refuse_dropout(self.path, block)
        flat, spec = tree_flatten(arguments)
        positions = [i for i, value in enumerate(flat) if isinstance(value, torch.Tensor)]
        call = _StreamedCall(self, block, [None if i in positions else v for i, v in enumerate(flat)], spec, positions)
        anchor = torch.empty(0, requires_grad=True)  # recorded even where only the parameters require grad
        with SavedOnHost() if self.saved_inputs == "host" else contextlib.nullcontext():
            return _RecomputedBands.apply(call, anchor, *(flat[i] for i in positions))

    def backward(self, block: torch.nn.Module, arguments: dict[str, Any], grad_output: torch.Tensor,
                 gradients: InputGradients) -> None:
        """The banded backward (module docstring); parameter gradients go to ``.grad``, input gradients into
        ``gradients``."""
        layout = STREAMED_LAYOUTS[type(block)]
        hidden = arguments["hidden_states"]
        units, per_unit, bands = self._bands(layout, arguments)
        with torch.no_grad():
            sums = self._key_sums(layout, block, arguments)
        state = {name: value.detach().requires_grad_() for name, value in vars(sums).items()
                 if isinstance(value, torch.Tensor)}
        leaves = [param for param in block.parameters() if param.requires_grad]

        def banded(start: int, stop: int) -> tuple[torch.Tensor, slice]:
            rows = slice(start * per_unit, stop * per_unit)
            return gradients.narrow(hidden, 1, rows.start, rows.stop - rows.start), rows

        def values(start: int, stop: int) -> _Band | None:
            """Units ``[start, stop)`` (clipped to the image) up to the convolution, values only."""
            start, stop = max(start, 0), min(stop, units)
            if start >= stop:
                return None
            rows = slice(start * per_unit, stop * per_unit)
            with torch.no_grad():
                return layout.before(block, hidden[:, rows], rows, arguments,
                                     _with_state(layout.sums(block.attn1), state))

        for start, stop in bands:  # the outputs
            x, rows = banded(start, stop)
            band = layout.before(block, x, rows, arguments, _with_state(layout.sums(block.attn1), state))
            # Convolution input on either side, values only: the band's outputs read one unit beyond it, and the
            # neighbour units' outputs, which read this band's convolution input, one more (layout.halo).
            low, high = values(start - layout.halo, start), values(stop, stop + layout.halo)
            first = max(start - layout.halo, 0)  # the unit the window starts at
            window = torch.cat([*([low.mixed_input] if low else []), band.mixed_input,
                                *([high.mixed_input] if high else [])])
            mixed = layout.mix(block, window, slice(start - first, stop - first), arguments)
            tensors = [layout.after(block, band.residual, mixed, rows, arguments)]
            grads = [grad_output[:, rows]]
            del mixed
            # The gradient the neighbour units' outputs send into this band's convolution input; their parameter
            # gradients are their own bands'.
            neighbours = []
            for unit, source, offset in ((start - 1, low, first), (stop, high, stop)):
                if 0 <= unit < units:
                    unit_rows = slice(unit * per_unit, (unit + 1) * per_unit)
                    unit_mixed = layout.mix(block, window, slice(unit - first, unit + 1 - first), arguments)
                    residual = source.residual[:, unit - offset: unit + 1 - offset]
                    neighbours.append((layout.after(block, residual, unit_mixed, unit_rows, arguments),
                                       grad_output[:, unit_rows]))
            if neighbours:
                (extra,) = torch.autograd.grad([y for y, _ in neighbours], [band.mixed_input],
                                               [g for _, g in neighbours], retain_graph=True)
                tensors.append(band.mixed_input)
                grads.append(extra)
            del band, low, high, window, neighbours, x
            _backward(tensors, grads, [*leaves, *state.values()])
            del tensors, grads
        names = [name for name, leaf in state.items() if leaf.grad is not None]
        for start, stop in bands if names else []:  # the key sums, each band's share with their gradient
            x, rows = banded(start, stop)
            part = layout.sums(block.attn1)
            layout.add(block, part, x, rows, arguments)
            _backward([getattr(part, name) for name in names], [state[name].grad for name in names], leaves)
            del part, x


def _with_state(sums: Any, state: dict[str, torch.Tensor]) -> Any:
    """``sums`` (a fresh ``*KeySums``) holding ``state``, the key sums as leaves: each band's attention reads them
    through its own object (Sana Video's rounds its key sum at the first query chunk, in the object)."""
    for name, value in state.items():
        setattr(sums, name, value)
    return sums


class _StreamedCall:
    """One recorded block call: what its backward needs to rebuild the arguments and rerun the block."""

    def __init__(self, hook: StreamedBlockHook, block: torch.nn.Module, flat: list[Any], spec: Any,
                 positions: list[int]) -> None:
        self.hook, self.block, self.flat, self.spec, self.positions = hook, block, flat, spec, positions

    def arguments(self, tensors: tuple[torch.Tensor, ...] | list[torch.Tensor]) -> dict[str, Any]:
        flat = list(self.flat)
        for position, tensor in zip(self.positions, tensors):
            flat[position] = tensor
        return tree_unflatten(flat, self.spec)


class _RecomputedBands(torch.autograd.Function):
    """Forward: the streamed block without autograd, out of place (its input is saved); backward:
    :meth:`StreamedBlockHook.backward`."""

    @staticmethod
    def forward(ctx: Any, call: _StreamedCall, anchor: torch.Tensor, *tensors: torch.Tensor) -> torch.Tensor:
        ctx.call, ctx.autocast = call, _autocast_state()
        ctx.save_for_backward(*tensors)
        return call.hook._streamed(call.block, call.arguments(tensors), in_place=False)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        call: _StreamedCall = ctx.call
        with recomputing(call.hook.path, call.block, ctx) as gradients:
            call.hook.backward(call.block, call.arguments(gradients.inputs), grad_output, gradients)
        return (None, None, *gradients.gradients())


class ChunkedNormHook(ModelHook):
    """Runs a token-wise output norm (Sana's ``SanaModulatedNorm``: LayerNorm, then the timestep's shift and scale)
    in token chunks written into one output: with streamed blocks the whole-sequence norm, its modulation temporaries
    beside its input and output, is the forward's peak (4 LD); chunked, it holds the input, the output and a chunk.
    A per-token timestep table (Sana Video's) is cut with the chunks."""

    _is_stateful = False

    def __init__(self, num_chunks: int) -> None:
        super().__init__()
        self.num_chunks = num_chunks

    def new_forward(self, module: torch.nn.Module, hidden_states: torch.Tensor, temb: torch.Tensor,
                    scale_shift_table: torch.Tensor) -> torch.Tensor:
        tokens = hidden_states.shape[1]
        if torch.is_grad_enabled() or self.num_chunks == 1:
            return self.fn_ref.original_forward(hidden_states, temb, scale_shift_table)
        out = None
        for start, stop in split_units(tokens, self.num_chunks):
            rows = slice(start, stop)
            temb_rows = token_rows(temb, rows, tokens) if temb.dim() == 3 else temb
            chunk = self.fn_ref.original_forward(hidden_states[:, rows], temb_rows, scale_shift_table)
            if out is None:
                out = chunk.new_empty(chunk.shape[0], tokens, *chunk.shape[2:])
            out[:, rows] = chunk
            del chunk
        return out
