"""FeedForward split plans: which linears memopt shards and how, as data in the shape of diffusers' ``_tp_plan``.

Two kinds of facts live here, both data rather than code paths:

* **Model plans** (the *what*). A flat ``{module pattern: style}`` mapping exactly like diffusers' ``_tp_plan``
  (``"blocks.*.ffn.net.0.proj": "colwise"``), with styles ``"colwise"`` / ``"rowwise"`` /
  :class:`PackedColwiseParallel` / :class:`PackedRowwiseParallel` (diffusers' own marker classes). For models whose
  class carries a ``_tp_plan`` (Flux, Flux2, QwenImage in diffusers 0.42) memopt reads that plan, so it shards
  exactly what the real multi-GPU engine shards; :data:`FEEDFORWARD_PLANS` holds plans of the same shape for the
  families without one. Only FeedForward entries matter to memopt; attention entries of a ``_tp_plan`` are ignored.
* **Unit layouts** (the *shape* of one FeedForward-like module): which linear is the colwise input projection (and,
  for gated activations, where its value and gate halves start), which activation runs between, which linear is the
  rowwise output projection and at which input column its FeedForward block starts. :func:`feedforward_layout` knows
  diffusers' ``FeedForward`` (every activation it builds), ``LuminaFeedForward``, ``Flux2FeedForward``, the
  parallel attention+MLP single-stream blocks of Flux, Chroma and HunyuanVideo (``proj_mlp -> act_mlp -> cat with
  the attention output -> proj_out``, where ``proj_out`` is ``PackedRowwiseParallel`` over ``[attention, mlp]``), and
  the model-specific MLP classes of other families (Z-Image, Kandinsky 5, QwenImage 2.1, AuraFlow, HiDream, OmniGen,
  FLUX.3, ...), each declared in one line as a gated MLP with separate or packed gate/value linears or as a plain
  ``up -> activation -> down`` MLP. Sana's GLU convolutions (``GLUMBConv``, ``GLUMBTempConv``) have a
  :class:`ConvFeedForwardLayout`: 1x1 convolutions around a depthwise one, split by channels the same way. Modules
  whose class name looks like a FeedForward but that have no layout are reported as skipped, with the reason.

A unit is chunked when every linear of its layout appears in the model plan with the style the layout implies
(:func:`unit_plan`), so a plan handed to memopt reads the same as one handed to ``parallelize_module`` on N GPUs.

Example::

    from memopt.models import get_family
    from memopt.plans import expand_plan, feedforward_plan

    model = get_family("flux").build("tiny")
    plan, source = feedforward_plan(model)           # FluxTransformer2DModel._tp_plan
    print(source, expand_plan(model, plan)["single_transformer_blocks.0.proj_mlp"])   # colwise
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from typing import Callable, Mapping, Union

import torch
from diffusers.hooks.tensor_parallel import PackedColwiseParallel, PackedRowwiseParallel
from diffusers.models.activations import GEGLU, GELU, ApproximateGELU, LinearActivation, SwiGLU
from diffusers.models.attention import FeedForward, LuminaFeedForward
from diffusers.models.transformers.transformer_bria import BriaSingleTransformerBlock
from diffusers.models.transformers.transformer_chroma import ChromaSingleTransformerBlock
from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock
from diffusers.models.transformers.transformer_flux2 import Flux2FeedForward
from diffusers.models.transformers.transformer_hunyuan_video import (
    HunyuanVideoSingleTransformerBlock,
    HunyuanVideoTokenReplaceSingleTransformerBlock,
)
from diffusers.models.transformers.transformer_longcat_image import LongCatImageSingleTransformerBlock

Style = Union[str, PackedColwiseParallel, PackedRowwiseParallel]
"""A split style: ``"colwise"``, ``"rowwise"`` or one of diffusers' packed markers."""

Plan = Mapping[str, Style]


def _ffn(prefix: str, gated: bool = False) -> dict[str, Style]:
    """The plan entries of a diffusers ``FeedForward`` at ``prefix`` (gated ones pack (value, gate) halves)."""
    return {f"{prefix}.net.0.proj": PackedColwiseParallel([1, 1]) if gated else "colwise", f"{prefix}.net.2": "rowwise"}


FEEDFORWARD_PLANS: dict[str, dict[str, Style]] = {
    # Wan2.1 / 2.2: one gelu-tanh FeedForward per block.
    "WanTransformer3DModel": _ffn("blocks.*.ffn"),
    "ChronoEditTransformer3DModel": _ffn("blocks.*.ffn"),  # Wan2.1 I2V blocks
    "SkyReelsV2Transformer3DModel": _ffn("blocks.*.ffn"),  # Wan2.1 blocks
    "HeliosTransformer3DModel": _ffn("blocks.*.ffn"),  # Wan2.1 blocks
    "WanVACETransformer3DModel": {**_ffn("blocks.*.ffn"), **_ffn("vace_blocks.*.ffn")},
    # HunyuanVideo: MMDiT blocks with image and text FeedForwards, then parallel attention+MLP single blocks.
    # `proj_out` carries no `_tp_packed_row_blocks`; memopt then takes the blocks from the unit, i.e.
    # [hidden, mlp_dim] (the input of proj_out is cat([attn_output, mlp_hidden_states])).
    "HunyuanVideoTransformer3DModel": {
        **_ffn("transformer_blocks.*.ff"),
        **_ffn("transformer_blocks.*.ff_context"),
        "single_transformer_blocks.*.proj_mlp": "colwise",
        "single_transformer_blocks.*.proj_out": PackedRowwiseParallel(),
    },
    # FramePack: HunyuanVideo's block classes, called the same way (its image projection left out too).
    "HunyuanVideoFramepackTransformer3DModel": {
        **_ffn("transformer_blocks.*.ff"),
        **_ffn("transformer_blocks.*.ff_context"),
        "single_transformer_blocks.*.proj_mlp": "colwise",
        "single_transformer_blocks.*.proj_out": PackedRowwiseParallel(),
    },
    "CogVideoXTransformer3DModel": _ffn("transformer_blocks.*.ff"),
    # PixArt: the caption projection (PixArtAlphaTextProjection, 300 text tokens) and the timestep MLPs left out.
    "PixArtTransformer2DModel": _ffn("transformer_blocks.*.ff"),
    # Allegro: likewise (its caption projection sees 512 text tokens).
    "AllegroTransformer3DModel": _ffn("transformer_blocks.*.ff"),
    # Latte: one FeedForward per spatial and per temporal block; caption projection and timestep MLPs left out.
    "LatteTransformer3DModel": {**_ffn("transformer_blocks.*.ff"), **_ffn("temporal_transformer_blocks.*.ff")},
    "LTXVideoTransformer3DModel": _ffn("transformer_blocks.*.ff"),
    "SD3Transformer2DModel": {**_ffn("transformer_blocks.*.ff"), **_ffn("transformer_blocks.*.ff_context")},
    # Mochi: SwiGLU FeedForwards, (value, gate) packed in net.0.proj like diffusers' SwiGLU.
    "MochiTransformer3DModel": {
        **_ffn("transformer_blocks.*.ff", gated=True),
        **_ffn("transformer_blocks.*.ff_context", gated=True),
    },
}
"""Model class name -> FeedForward split plan, for classes without a diffusers ``_tp_plan``. Small FeedForwards
outside the transformer blocks (Wan's image embedder, HunyuanVideo's text token refiner) are left out on purpose:
they see a few hundred text/image-embedding tokens, so chunking them only costs time; pass a plan to include them."""


class UnsupportedFeedForward(Exception):
    """A FeedForward-like module memopt cannot split; the message is the reason shown in the report."""


@dataclass(frozen=True)
class FeedForwardLayout:
    """The structure of one FeedForward-like module, in paths relative to it (no tensors: weights are read per call).

    Attributes:
        up: ``(linear path, first row)`` of each ``F``-wide input-projection block, in the order the activation
            takes them: one block, or ``(value, gate)`` for gated activations (halves of one packed linear, or two
            linears).
        activation: name of the activation between the projections (see ``memopt.hooks.feedforward``):
            ``gelu``, ``gelu_tanh``, ``gelu_sigmoid``, ``silu``, ``relu``, ``mish``, ``geglu``, ``swiglu``,
            ``swiglu_fp32``.
        down: path of the output projection, sharded by input columns (rowwise).
        down_offset: first input column of the FeedForward block in ``down`` (non-zero when ``down`` also consumes
            an attention output concatenated in front, as in Flux's single blocks).
        width: ``F``, the intermediate width after gating; this is what ``split="hidden"`` shards.
        dropout: path of the dropout between the projections, if any.
        final_dropout: path of the dropout after ``down``, if any.
        ff_modules: paths of every submodule on the FeedForward path (whose forwards a chunked run replaces).
    """

    up: tuple[tuple[str, int], ...]
    activation: str
    down: str
    down_offset: int
    width: int
    dropout: str | None = None
    final_dropout: str | None = None
    ff_modules: tuple[str, ...] = ()

    @property
    def gated(self) -> bool:
        return len(self.up) == 2


@dataclass(frozen=True)
class ConvFeedForwardLayout:
    """A GLU inverted-bottleneck convolution (Sana's ``GLUMBConv``, Sana-Video's ``GLUMBTempConv``), in paths
    relative to it: ``down(value * silu(gate))`` where ``(value, gate) = depthwise(silu(up(x)))``.

    ``up`` and ``down`` are 1x1 convolutions, i.e. linears over the channels; the depthwise convolution mixes
    neighbouring tokens but never channels, so intermediate channel ``j`` depends on ``up``'s rows ``j`` (value) and
    ``F + j`` (gate) alone: the intermediate splits by channels exactly as a linear FeedForward's does (colwise
    ``up`` and ``depthwise``, rowwise ``down``), while the tokens do not split. What the module does after ``down``
    (Sana-Video's temporal convolution, an RMSNorm, a residual) runs once on the summed output.

    Attributes:
        up: the 1x1 convolution to ``2F`` channels, value rows first, then gate rows (``torch.chunk`` order).
        depthwise: the depthwise convolution over the ``2F`` channels.
        down: the 1x1 convolution from ``F`` channels, sharded by input channels.
        width: ``F``.
        ff_modules: paths of the modules whose forwards the chunked run replaces.
    """

    up: str
    depthwise: str
    down: str
    width: int
    ff_modules: tuple[str, ...]


def _conv(module: torch.nn.Module, path: str) -> torch.nn.Conv2d:
    conv = module.get_submodule(path)
    if type(conv) is not torch.nn.Conv2d:
        kind = f"{type(conv).__module__}.{type(conv).__name__}"
        raise UnsupportedFeedForward(f"{type(module).__name__}.{path} is a {kind}, not an nn.Conv2d")
    if conv.padding_mode != "zeros":
        raise UnsupportedFeedForward(f"{type(module).__name__}.{path} pads with {conv.padding_mode!r}")
    return conv


def _pointwise(module: torch.nn.Module, path: str) -> torch.nn.Conv2d:
    conv = _conv(module, path)
    if (conv.kernel_size, conv.stride, conv.padding, conv.groups) != ((1, 1), (1, 1), (0, 0), 1):
        raise UnsupportedFeedForward(f"{type(module).__name__}.{path} is not a 1x1 convolution over all channels")
    return conv


def _glu_conv(module: torch.nn.Module) -> ConvFeedForwardLayout:
    """``GLUMBConv`` / ``GLUMBTempConv``: ``conv_point(h * silu(g))``, ``h, g = conv_depth(silu(conv_inverted(x)))``."""
    if type(module.nonlinearity) is not torch.nn.SiLU:
        raise UnsupportedFeedForward(f"{type(module).__name__}.nonlinearity is a {type(module.nonlinearity).__name__}")
    up, down = _pointwise(module, "conv_inverted"), _pointwise(module, "conv_point")
    depthwise = _conv(module, "conv_depth")
    width = down.in_channels
    if up.out_channels != 2 * width or depthwise.groups != 2 * width or depthwise.out_channels != 2 * width:
        raise UnsupportedFeedForward(f"{type(module).__name__}: conv_depth is not depthwise over conv_inverted's "
                                     f"2 x {width} channels")
    if depthwise.stride != (1, 1) or any(2 * pad != dilation * (kernel - 1) for pad, dilation, kernel in zip(
            depthwise.padding, depthwise.dilation, depthwise.kernel_size)):
        raise UnsupportedFeedForward(f"{type(module).__name__}.conv_depth changes the spatial size")
    return ConvFeedForwardLayout("conv_inverted", "conv_depth", "conv_point", width,
                                 ("conv_inverted", "nonlinearity", "conv_depth", "conv_point"))


def base_linear(module: torch.nn.Module) -> torch.nn.Linear:
    """The ``nn.Linear`` behind ``module`` (itself, or a peft LoRA layer's ``base_layer``)."""
    base = getattr(module, "base_layer", module)
    if not isinstance(base, torch.nn.Linear):
        raise UnsupportedFeedForward(f"{type(module).__name__} is not an nn.Linear (nor a LoRA layer around one)")
    return base


def _activation_module_name(act: torch.nn.Module) -> str:
    if type(act) is torch.nn.GELU:
        return "gelu_tanh" if act.approximate == "tanh" else "gelu"
    names = {torch.nn.SiLU: "silu", torch.nn.ReLU: "relu", torch.nn.Mish: "mish"}
    if type(act) not in names:
        raise UnsupportedFeedForward(f"activation {type(act).__name__} is not supported")
    return names[type(act)]


def _feedforward(ff: FeedForward) -> FeedForwardLayout:
    act = ff.net[0]
    out_features = base_linear(act.proj).out_features
    if type(act) is GELU:
        up, activation = (("net.0.proj", 0),), "gelu_tanh" if act.approximate == "tanh" else "gelu"
    elif type(act) is ApproximateGELU:
        up, activation = (("net.0.proj", 0),), "gelu_sigmoid"
    elif type(act) is LinearActivation:
        up, activation = (("net.0.proj", 0),), _activation_module_name(act.activation)
    elif type(act) in (GEGLU, SwiGLU):
        if type(act) is SwiGLU and type(act.activation) is not torch.nn.SiLU:
            raise UnsupportedFeedForward(f"SwiGLU with activation {type(act.activation).__name__}")
        # diffusers: `hidden_states, gate = proj(x).chunk(2, dim=-1)` -> value rows first, gate rows second.
        out_features //= 2
        up, activation = (("net.0.proj", 0), ("net.0.proj", out_features)), "geglu" if type(act) is GEGLU else "swiglu"
    else:
        raise UnsupportedFeedForward(f"FeedForward activation module {type(act).__name__} is not supported")
    dropouts = [ff.net[1], *ff.net[3:]]
    if len(ff.net) not in (3, 4) or any(type(m) is not torch.nn.Dropout for m in dropouts):
        raise UnsupportedFeedForward(f"unexpected FeedForward.net layout {[type(m).__name__ for m in ff.net]}")
    base_linear(ff.net[2])
    return FeedForwardLayout(
        up=up,
        activation=activation,
        down="net.2",
        down_offset=0,
        width=out_features,
        dropout="net.1",
        final_dropout="net.3" if len(ff.net) == 4 else None,
        ff_modules=("net",),
    )


def _lumina(ff: LuminaFeedForward) -> FeedForwardLayout:
    # forward: linear_2(FP32SiLU(linear_1(x)) * linear_3(x)) -> value = linear_3, gate = linear_1.
    width = base_linear(ff.linear_1).out_features
    return FeedForwardLayout(
        up=(("linear_3", 0), ("linear_1", 0)),
        activation="swiglu_fp32",
        down="linear_2",
        down_offset=0,
        width=width,
        ff_modules=("linear_1", "linear_2", "linear_3", "silu"),
    )


def _flux2(ff: Flux2FeedForward) -> FeedForwardLayout:
    # Flux2SwiGLU: silu(x[..., :half]) * x[..., half:] -> gate rows first, value rows second.
    if type(ff.act_fn.gate_fn) is not torch.nn.SiLU:
        raise UnsupportedFeedForward(f"Flux2SwiGLU with gate {type(ff.act_fn.gate_fn).__name__}")
    width = base_linear(ff.linear_in).out_features // 2
    return FeedForwardLayout(
        up=(("linear_in", width), ("linear_in", 0)),
        activation="swiglu",
        down="linear_out",
        down_offset=0,
        width=width,
        ff_modules=("linear_in", "act_fn", "linear_out"),
    )


def _single_block(block: torch.nn.Module) -> FeedForwardLayout:
    # proj_out(cat([attn_output, act_mlp(proj_mlp(norm_hidden_states))], dim=-1)): the MLP block of proj_out's input
    # columns starts after the attention output's width.
    width = base_linear(block.proj_mlp).out_features
    return FeedForwardLayout(
        up=(("proj_mlp", 0),),
        activation=_activation_module_name(block.act_mlp),
        down="proj_out",
        down_offset=base_linear(block.proj_out).in_features - width,
        width=width,
        ff_modules=("proj_mlp", "act_mlp", "proj_out"),
    )


LayoutFn = Callable[[torch.nn.Module], Union[FeedForwardLayout, ConvFeedForwardLayout]]


def _check_width(module: torch.nn.Module, paths: tuple[str, ...], width: int, down: str) -> None:
    """The projections of a gated MLP agree on ``F`` (a config that breaks this is not the layout memopt assumes)."""
    widths = {path: base_linear(module.get_submodule(path)).out_features for path in paths}
    widths[down] = base_linear(module.get_submodule(down)).in_features
    if set(widths.values()) != {width}:
        raise UnsupportedFeedForward(f"{type(module).__name__}: projection widths {widths} do not match")


def _gated_mlp(gate: str, value: str, down: str, activation: str = "swiglu", act: str | None = None) -> LayoutFn:
    """``down(act(gate(x)) * value(x))`` with separate gate and value linears (LLaMA-style SwiGLU MLPs).

    ``act`` names the activation module when the class holds one, checked to be the one ``activation`` computes
    (``silu`` for ``swiglu``, exact ``gelu`` for ``geglu``); classes calling ``F.silu`` directly have none."""
    expected = {"swiglu": "silu", "geglu": "gelu"}[activation]

    def layout(module: torch.nn.Module) -> FeedForwardLayout:
        if act is not None and _activation_module_name(module.get_submodule(act)) != expected:
            raise UnsupportedFeedForward(f"{type(module).__name__}.{act} is not the {expected} of {activation}")
        width = base_linear(module.get_submodule(gate)).out_features
        _check_width(module, (gate, value), width, down)
        return FeedForwardLayout(
            up=((value, 0), (gate, 0)),
            activation=activation,
            down=down,
            down_offset=0,
            width=width,
            ff_modules=tuple(path for path in (gate, value, act, down) if path is not None),
        )

    return layout


def _packed_swiglu(linear: str, down: str, gate_first: bool, act: str | None = None) -> LayoutFn:
    """``down(silu(gate) * value)`` where ``(gate, value)`` (or ``(value, gate)``) are the halves of one linear."""

    def layout(module: torch.nn.Module) -> FeedForwardLayout:
        if act is not None and _activation_module_name(module.get_submodule(act)) != "silu":
            raise UnsupportedFeedForward(f"{type(module).__name__}.{act} is not a SiLU")
        width = base_linear(module.get_submodule(linear)).out_features // 2
        if base_linear(module.get_submodule(down)).in_features != width:
            raise UnsupportedFeedForward(f"{type(module).__name__}: {down} does not take half of {linear}'s outputs")
        value, gate = (width, 0) if gate_first else (0, width)
        return FeedForwardLayout(
            up=((linear, value), (linear, gate)),
            activation="swiglu",
            down=down,
            down_offset=0,
            width=width,
            ff_modules=tuple(path for path in (linear, act, down) if path is not None),
        )

    return layout


def _plain_mlp(up: str, act: str, down: str, dropout: str | None = None, final_dropout: str | None = None,
               container: str | None = None) -> LayoutFn:
    """``down(act(up(x)))`` with the activation as a module (``fc1 -> GELU -> fc2``), optional dropouts between and
    after; ``container`` is the ``nn.Sequential`` holding them, when there is one."""

    def layout(module: torch.nn.Module) -> FeedForwardLayout:
        width = base_linear(module.get_submodule(up)).out_features
        if base_linear(module.get_submodule(down)).in_features != width:
            raise UnsupportedFeedForward(f"{type(module).__name__}: {down} does not take {up}'s outputs")
        for path in (dropout, final_dropout):
            if path is not None and type(module.get_submodule(path)) is not torch.nn.Dropout:
                raise UnsupportedFeedForward(f"{type(module).__name__}.{path} is not an nn.Dropout")
        if container is not None and len(module.get_submodule(container)) != 3 + (dropout is not None) + (
            final_dropout is not None
        ):
            raise UnsupportedFeedForward(f"unexpected {type(module).__name__}.{container} layout")
        return FeedForwardLayout(
            up=((up, 0),),
            activation=_activation_module_name(module.get_submodule(act)),
            down=down,
            down_offset=0,
            width=width,
            dropout=dropout,
            final_dropout=final_dropout,
            ff_modules=(container,) if container else tuple(p for p in (up, act, dropout, down, final_dropout) if p),
        )

    return layout


def _cosmos3_text_mlp(module: torch.nn.Module) -> FeedForwardLayout:
    if module.hidden_act != "silu":
        raise UnsupportedFeedForward(f"Cosmos3VLTextMLP with hidden_act={module.hidden_act!r} (relu squared)")
    return _gated_mlp("gate_proj", "up_proj", "down_proj", act="act_fn")(module)


_MODELS = "diffusers.models"
_MORE_UNITS: dict[str, LayoutFn] = {
    # Each entry's forward, as written in diffusers 0.42 (the layouts say which linear is gate and which is value).
    f"{_MODELS}.transformers.auraflow_transformer_2d.AuraFlowFeedForward":  # silu(linear_1) * linear_2
        _gated_mlp("linear_1", "linear_2", "out_projection"),
    f"{_MODELS}.transformers.transformer_z_image.FeedForward": _gated_mlp("w1", "w3", "w2"),  # silu(w1) * w3
    f"{_MODELS}.controlnets.controlnet_z_image.FeedForward": _gated_mlp("w1", "w3", "w2"),
    f"{_MODELS}.transformers.transformer_bria_fibo2.FeedForward": _gated_mlp("w1", "w3", "w2"),
    f"{_MODELS}.transformers.transformer_hidream_image.HiDreamImageFeedForwardSwiGLU": _gated_mlp("w1", "w3", "w2"),
    f"{_MODELS}.transformers.transformer_ideogram4.Ideogram4MLP": _gated_mlp("w1", "w3", "w2"),
    f"{_MODELS}.transformers.transformer_krea2.Krea2SwiGLU": _gated_mlp("gate", "up", "down"),
    f"{_MODELS}.transformers.ace_step_transformer.AceStepMLP": _gated_mlp("gate_proj", "up_proj", "down_proj"),
    f"{_MODELS}.transformers.transformer_qwenimage21.QwenImage21SwiGLUFeedForward":  # act(gate_layer) * proj
        _gated_mlp("gate_layer", "proj", "out", act="activation_fn"),
    f"{_MODELS}.transformers.transformer_ernie_image.ErnieImageFeedForward":  # up_proj * gelu(gate_proj)
        _gated_mlp("gate_proj", "up_proj", "linear_fc2", activation="geglu"),
    f"{_MODELS}.transformers.transformer_cosmos3.Cosmos3VLTextMLP": _cosmos3_text_mlp,
    f"{_MODELS}.transformers.transformer_omnigen.OmniGenFeedForward":  # gate, up = gate_up_proj(x).chunk(2)
        _packed_swiglu("gate_up_proj", "down_proj", gate_first=True, act="activation_fn"),
    f"{_MODELS}.transformers.transformer_stable_audio3.StableAudio3FeedForward":  # value, gate = proj_in(x).chunk(2)
        _packed_swiglu("proj_in", "proj_out", gate_first=False),
    f"{_MODELS}.transformers.transformer_flux3.Flux3FeedForward": _flux2,  # copied from Flux2FeedForward
    f"{_MODELS}.transformers.transformer_kandinsky.Kandinsky5FeedForward": _plain_mlp("in_layer", "activation",
                                                                                     "out_layer"),
    f"{_MODELS}.transformers.transformer_sana_wm.SanaWMMlp": _plain_mlp("fc1", "act", "fc2", "drop1", "drop2"),
    f"{_MODELS}.transformers.transformer_longcat_audio_dit.AudioDiTFeedForward":
        _plain_mlp("ff.0", "ff.1", "ff.3", dropout="ff.2", container="ff"),
    # the LTX-2 diffusion decoder's blocks: w_down(silu(w_gate) * w_up), channels-last 5-D inputs
    f"{_MODELS}.autoencoders.ltx2_diffusion_decoder.LTX2VideoVaeSwiGLU": _gated_mlp("w_gate", "w_up", "w_down"),
}
"""More FeedForward-like classes, by import path: resolved when the installed diffusers has them (newer and older
releases add and drop model files), so memopt imports with any diffusers it supports."""


def _resolve(qualified: str) -> type | None:
    module_name, _, class_name = qualified.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), class_name, None)
    except ImportError:
        return None


CONV_FEEDFORWARD_UNITS: dict[type, Callable[[torch.nn.Module], ConvFeedForwardLayout]] = {
    cls: _glu_conv for name in (f"{_MODELS}.transformers.sana_transformer.GLUMBConv",
                                f"{_MODELS}.transformers.transformer_sana_video.GLUMBTempConv")
    if (cls := _resolve(name)) is not None
}
"""Convolutional FeedForward classes (their forwards, written around the chunked convolutions, are in
``memopt.hooks.feedforward.CONV_UNIT_FORWARDS``)."""

FEEDFORWARD_UNITS: dict[type, LayoutFn] = {
    FeedForward: _feedforward,
    LuminaFeedForward: _lumina,
    Flux2FeedForward: _flux2,
    FluxSingleTransformerBlock: _single_block,
    BriaSingleTransformerBlock: _single_block,
    LongCatImageSingleTransformerBlock: _single_block,
    ChromaSingleTransformerBlock: _single_block,
    HunyuanVideoSingleTransformerBlock: _single_block,
    HunyuanVideoTokenReplaceSingleTransformerBlock: _single_block,
    **{cls: fn for name, fn in _MORE_UNITS.items() if (cls := _resolve(name)) is not None},
    **CONV_FEEDFORWARD_UNITS,
}
"""Module class (matched exactly: a subclass may change ``forward``) -> its :class:`FeedForwardLayout`."""

UNKNOWN_FEEDFORWARD = re.compile(r"(FeedForward|FFN|MLP|Mlp|SwiGLU)$|GLUMB")
"""Class names that look like a FeedForward: such modules without a layout are reported as skipped (instead of
passing unnoticed), unless they sit inside a known unit or contain one (a mixture of experts of known MLPs)."""


def _sequential_paths(module: torch.nn.Module) -> tuple[str, str, str, str | None, str | None] | None:
    """``(up, act, down, dropout, final_dropout)`` child names of an ``nn.Sequential`` FeedForward: ``Linear(D, F)``,
    an activation module, an optional ``nn.Dropout``, ``Linear(F, D)``, an optional ``nn.Dropout``, with F > D (the
    wide intermediate a FeedForward is about; ``Linear(256, D), SiLU, Linear(D, D)`` timestep embedders are not one).
    None for any other ``nn.Sequential``."""
    if type(module) is not torch.nn.Sequential or len(module) not in (3, 4, 5):
        return None
    kinds = ["linear" if isinstance(getattr(child, "base_layer", child), torch.nn.Linear)
             else "dropout" if type(child) is torch.nn.Dropout else "other" for child in module]
    names = list(module._modules)
    if kinds[0] != "linear" or kinds[1] != "other" or "linear" not in kinds[2:4]:
        return None
    down = 2 if kinds[2] == "linear" else 3
    rest = kinds[down + 1:]
    if (down == 3 and kinds[2] != "dropout") or rest not in ([], ["dropout"]):
        return None
    up_linear, down_linear = base_linear(module[0]), base_linear(module[down])
    if not (up_linear.in_features == down_linear.out_features < up_linear.out_features == down_linear.in_features):
        return None
    return (names[0], names[1], names[down], names[2] if down == 3 else None, names[down + 1] if rest else None)


def is_feedforward_unit(module: torch.nn.Module) -> bool:
    return type(module) in FEEDFORWARD_UNITS or _sequential_paths(module) is not None


def feedforward_layout(module: torch.nn.Module) -> FeedForwardLayout | ConvFeedForwardLayout:
    """The layout of a known FeedForward-like module; :class:`UnsupportedFeedForward` if none."""
    if (paths := _sequential_paths(module)) is not None:
        return _plain_mlp(*paths)(module)
    resolver = FEEDFORWARD_UNITS.get(type(module))
    if resolver is None:
        raise UnsupportedFeedForward(f"{type(module).__name__} is not a FeedForward memopt knows")
    return resolver(module)


def unit_plan(layout: FeedForwardLayout) -> dict[str, Style]:
    """The plan entries (relative to the unit) that shard ``layout``'s intermediate, in ``_tp_plan`` styles."""
    plan: dict[str, Style] = {}
    for path in dict.fromkeys(path for path, _ in layout.up):
        halves = sum(1 for p, _ in layout.up if p == path)
        plan[path] = "colwise" if halves == 1 else PackedColwiseParallel([1] * halves)
    plan[layout.down] = "rowwise" if layout.down_offset == 0 else PackedRowwiseParallel(
        [layout.down_offset, layout.width]
    )
    return plan


def canonical_style(style: Style, linear: torch.nn.Module, default_blocks: list[int] | None = None) -> tuple:
    """``(kind, block sizes)`` of ``style`` applied to ``linear``, so plans written differently compare equal.

    Follows diffusers' rules: packed blocks are proportions of the sharded dimension, taken from the marker or, when
    it has none, from the Linear's ``_tp_packed_col_blocks`` / ``_tp_packed_row_blocks`` attribute. memopt adds one
    fallback, ``default_blocks`` (the unit's own blocks), for packed markers on Linears without that attribute.
    """
    base = base_linear(linear)
    if style == "colwise":
        return "colwise", (base.out_features,)
    if style == "rowwise":
        return "rowwise", (base.in_features,)
    if isinstance(style, PackedColwiseParallel):
        kind, total, attr = "colwise", base.out_features, "_tp_packed_col_blocks"
    elif isinstance(style, PackedRowwiseParallel):
        kind, total, attr = "rowwise", base.in_features, "_tp_packed_row_blocks"
    else:
        raise ValueError(f"unsupported split style {style!r}; expected 'colwise', 'rowwise' or a packed marker")
    blocks = style.blocks or getattr(base, attr, None) or getattr(linear, attr, None) or default_blocks
    if not blocks or total % sum(blocks):
        return kind, ("unresolvable", tuple(blocks or ()))
    unit = total // sum(blocks)
    return kind, tuple(block * unit for block in blocks)


def feedforward_plan(model: torch.nn.Module) -> tuple[dict[str, Style] | None, str]:
    """The FeedForward plan for ``model`` and where it came from.

    Returns the class's diffusers ``_tp_plan`` when it has one, else :data:`FEEDFORWARD_PLANS`' entry for the class,
    else ``(None, ...)``, meaning every FeedForward-like module found by type is chunked.
    """
    cls = type(model)
    tp_plan = getattr(cls, "_tp_plan", None)
    if tp_plan:
        return dict(tp_plan), f"{cls.__name__}._tp_plan"
    if cls.__name__ in FEEDFORWARD_PLANS:
        return dict(FEEDFORWARD_PLANS[cls.__name__]), f"memopt.plans.FEEDFORWARD_PLANS[{cls.__name__!r}]"
    return None, "module types (no plan for this class)"


def expand_plan(model: torch.nn.Module, plan: Plan) -> dict[str, Style]:
    """Expand a plan's patterns to concrete module paths of ``model`` (``*`` matches one path component).

    Patterns that match nothing (a module the config does not build, e.g. the last SD3 block's ``ff_context``) are
    dropped, as they would be for a plan applied to that config on N GPUs.
    """
    compiled = [(re.compile(re.escape(pattern).replace(r"\*", r"[^.]+")), style) for pattern, style in plan.items()]
    expanded: dict[str, Style] = {}
    for path, _ in model.named_modules():
        for regex, style in compiled:
            if regex.fullmatch(path):
                expanded[path] = style
    return expanded
