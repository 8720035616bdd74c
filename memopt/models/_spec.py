"""The family-spec vocabulary and the helpers the family modules share (sizes, configs, random inputs)."""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import diffusers
import torch

Inputs = dict[str, Any]


@dataclass(frozen=True)
class Size:
    """A generation size in pixels (``num_frames`` is 1 for image models)."""

    height: int
    width: int
    num_frames: int = 1


@dataclass(frozen=True)
class FamilySpec:
    """Everything memopt needs to know to build and feed one diffusers transformer family.

    Attributes:
        name: short family name used by the CLI and tests (``"wan"``).
        class_name: the diffusers class, e.g. ``"WanTransformer3DModel"``.
        configs: named configs; ``"full"`` is the released checkpoint's, ``"tiny"`` a small one for tests.
        sizes: named pixel sizes; ``"default"`` is the size the family is usually run at, ``"tiny"`` the tests' size.
        text_tokens: number of text-encoder tokens the pipeline passes by default.
        make_inputs_fn: ``(config, batch, size, text_tokens, dtype, device, generator, masked) -> forward kwargs``.
        num_tokens_fn: ``(config, size) -> number of image/video tokens`` (the sequence memopt chunks).
        video: whether ``num_frames`` matters.
        mask_key: the forward kwarg holding the text-token mask, for families that take one.
        extra_sizes: further named sizes (``"480p"``) offered by the CLI.
        width_keys: the config keys whose product is the token width D (``heads x head_dim`` for most classes; one
            key such as ``"dim"`` for classes that store the width itself).
        init_fn: run on every built model (under its own seed) for classes whose constructors zero-initialise layers
            that trained weights fill, or whose random-weight outputs barely depend on some of them: without it a
            random-weight model would compute a (nearly) trivial function (every Kandinsky 5 block the identity;
            AuraFlow's attention moving its output by 2e-4) and tests against it would test little.
    """

    name: str
    class_name: str
    configs: Mapping[str, Mapping[str, Any]]
    sizes: Mapping[str, Size]
    text_tokens: int
    make_inputs_fn: Callable[..., Inputs]
    num_tokens_fn: Callable[[Any, Size], int]
    video: bool = True
    mask_key: str | None = None
    extra_sizes: Mapping[str, Size] = field(default_factory=dict)
    width_keys: tuple[str, ...] = ("num_attention_heads", "attention_head_dim")
    init_fn: Callable[[torch.nn.Module], None] | None = None

    @property
    def model_class(self) -> type[torch.nn.Module]:
        return getattr(diffusers, self.class_name)

    def config(self, name: str = "tiny") -> dict[str, Any]:
        """The named config as a complete dict: the class's defaults overridden by the entry's values."""
        if name not in self.configs:
            raise ValueError(f"family {self.name!r} has no config {name!r}; choose from {sorted(self.configs)}")
        params = inspect.signature(self.model_class.__init__).parameters
        defaults = {k: p.default for k, p in params.items() if k != "self" and p.default is not inspect.Parameter.empty}
        return {**defaults, **self.configs[name]}

    def size(self, name: str = "default") -> Size:
        sizes = {**self.sizes, **self.extra_sizes}
        if name not in sizes:
            raise ValueError(f"family {self.name!r} has no size {name!r}; choose from {sorted(sizes)}")
        return sizes[name]

    def build(
        self,
        config: str | Mapping[str, Any] = "tiny",
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        seed: int = 0,
    ) -> torch.nn.Module:
        """Build the model with random weights (deterministic for ``seed``), in eval mode.

        For ``dtype`` other than fp32, modules in the class's ``_keep_in_fp32_modules`` stay fp32, exactly as
        ``from_pretrained(torch_dtype=dtype)`` leaves them.
        """
        cfg = self.config(config) if isinstance(config, str) else dict(config)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = self.model_class(**cfg)
            if self.init_fn is not None:
                with torch.no_grad():
                    self.init_fn(model)
        model.eval()
        if dtype != torch.float32:
            cast_floating_(model, dtype)
        if torch.device(device) != torch.device("cpu"):
            model.to(device)
        return model

    def hidden_size(self, config: Any) -> int:
        """Width of the token stream (``heads x head_dim`` for most classes), the D in LD."""
        return int(math.prod(_cfg(config, key) for key in self.width_keys))

    def num_tokens(self, config: Any, size: Size) -> int:
        return self.num_tokens_fn(config, size)

    def make_inputs(
        self,
        config: Any,
        batch_size: int = 1,
        height: int | None = None,
        width: int | None = None,
        num_frames: int | None = None,
        text_tokens: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        seed: int = 0,
        masked: bool = False,
    ) -> Inputs:
        """Random forward kwargs for a generation of ``height x width (x num_frames)`` pixels.

        Missing sizes default to the family's ``"tiny"`` size when ``config`` is small and to ``"default"``
        otherwise. ``masked=True`` pads the last quarter of the text tokens out with the encoder mask, for
        families whose forward takes one.
        """
        tiny = self.hidden_size(config) <= TINY_WIDTH
        base = self.size("tiny" if tiny else "default")
        size = Size(height or base.height, width or base.width, num_frames or base.num_frames if self.video else 1)
        generator = torch.Generator("cpu").manual_seed(seed)
        inputs = self.make_inputs_fn(
            config=config,
            batch=batch_size,
            size=size,
            text_tokens=text_tokens or (8 if tiny else self.text_tokens),
            dtype=dtype,
            device=torch.device(device),
            generator=generator,
            masked=masked,
        )
        inputs["return_dict"] = False
        return inputs



def cast_floating_(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast floating parameters/buffers to ``dtype`` in place, keeping ``_keep_in_fp32_modules`` in fp32.

    Parameters are *replaced* (``p.data = ...``-free) so this also works on FakeTensor models, where
    ``module.to(dtype)`` fails with ``Couldn't swap ... weakref`` (see research/profiler_anchors.md).
    """
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or [])

    def target_for(path: str) -> torch.dtype:
        # Matched on every component of the tensor's path, like transformers' `_keep_in_fp32_modules` (this catches
        # parameters named in the list, e.g. Wan's `blocks.0.scale_shift_table`, as well as modules).
        return torch.float32 if keep.intersection(path.split(".")) else dtype

    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        for name, param in list(module._parameters.items()):
            target = target_for(prefix + name)
            if param is not None and param.is_floating_point() and param.dtype != target:
                module._parameters[name] = torch.nn.Parameter(param.detach().to(target), param.requires_grad)
        for name, buf in list(module._buffers.items()):
            target = target_for(prefix + name)
            if buf is not None and buf.is_floating_point() and buf.dtype != target:
                module._buffers[name] = buf.to(target)
    return model


def _cfg(config: Any, key: str) -> Any:
    return config[key] if isinstance(config, Mapping) else getattr(config, key)


def _cfg_or(config: Any, key: str, default: Any) -> Any:
    """A config value that only some classes of a family have (Wan-derived models add keys)."""
    return config.get(key, default) if isinstance(config, Mapping) else getattr(config, key, default)


TINY_WIDTH = 256
"""Configs with a token width up to this are test-sized: their inputs get few text/image-encoder tokens and the
family's tiny size."""


_TINY_HEADS = {"num_attention_heads": 2, "attention_head_dim": 16}
"""Width 32 (2 heads of 16): the tiny configs' token width."""


def _is_tiny(config: Any) -> bool:
    """A test-sized config of a family whose width is ``heads x head_dim`` (see :data:`TINY_WIDTH`)."""
    return _cfg(config, "num_attention_heads") * _cfg(config, "attention_head_dim") <= TINY_WIDTH


def _randn(generator: torch.Generator, *shape: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.randn(*shape, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)


def _text_mask(batch: int, tokens: int, masked: bool, device: torch.device) -> torch.Tensor:
    mask = torch.ones(batch, tokens, dtype=torch.long, device=device)
    if masked:
        mask[:, tokens - max(1, tokens // 4) :] = 0
    return mask


def _caption_inputs(config: Any, batch: int, text_tokens: int, dtype: torch.dtype, device: torch.device,
                    generator: torch.Generator, masked: bool) -> Inputs:
    """The PixArt lineage's (PixArt, Allegro, Sana) caption states ``caption_channels`` wide with their 0/1 mask, and
    the integer timestep 999 per sample."""
    return {
        "encoder_hidden_states": _randn(generator, batch, text_tokens, _cfg(config, "caption_channels"), dtype=dtype,
                                        device=device),
        "encoder_attention_mask": _text_mask(batch, text_tokens, masked, device),
        "timestep": torch.full((batch,), 999, dtype=torch.long, device=device),
    }


def _glyph_mask(batch: int, tokens: int, masked: bool, device: torch.device) -> torch.Tensor:
    """The byT5 glyph-token mask (HunyuanVideo 1.5, HunyuanImage 2.1): ``masked`` pads the last half out (prompts
    rarely quote much text)."""
    mask = _text_mask(batch, tokens, False, device)
    if masked:
        mask[:, max(1, tokens // 2) :] = 0
    return mask


def _grid_ids(height: int, width: int, axes: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(height x width, axes)`` position ids of a packed-latent image (Flux, FLUX.2, Chroma): axis 1 the row,
    axis 2 the column, the others 0."""
    ids = torch.zeros(height, width, axes, dtype=dtype)
    ids[..., 1] = torch.arange(height)[:, None]
    ids[..., 2] = torch.arange(width)[None, :]
    return ids.reshape(height * width, axes)


def _image_tokens(config: Any, size: Size) -> int:
    """Tokens of one latent frame: the ``patch_size`` x ``patch_size`` patches of the 8x-downsampled latents (the
    blocks may carry more, text or register tokens, in front or behind)."""
    p = _cfg(config, "patch_size")
    return (size.height // 8 // p) * (size.width // 8 // p)


def _latent_frames(num_frames: int, temporal_ratio: int) -> int:
    return (num_frames - 1) // temporal_ratio + 1


def _check_divisible(family: str, size: Size, multiple: int) -> None:
    if size.height % multiple or size.width % multiple:
        raise ValueError(f"{family}: height and width must be multiples of {multiple}, got {size.height}x{size.width}")
