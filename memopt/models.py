"""Model zoo: the diffusers transformer families memopt supports, as data.

For each family this registry knows the real diffusers class, its full-size config (the released checkpoint's
``config.json`` values), a tiny config for tests, and how to build the inputs the denoiser's ``forward`` takes at a
given pixel size. Nothing is downloaded: models are built from configs with random weights, and full-size ones are
meant to be built under ``FakeTensorMode`` (see :func:`memopt.simulate`).

Example::

    from memopt.models import get_family
    spec = get_family("wan")
    model = spec.build("tiny")
    inputs = spec.make_inputs(model.config, batch_size=2, height=48, width=80, num_frames=5)
    out = model(**inputs)[0]
"""

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


def _latent_frames(num_frames: int, temporal_ratio: int) -> int:
    return (num_frames - 1) // temporal_ratio + 1


def _check_divisible(family: str, size: Size, multiple: int) -> None:
    if size.height % multiple or size.width % multiple:
        raise ValueError(f"{family}: height and width must be multiples of {multiple}, got {size.height}x{size.width}")


# ----------------------------------------------------------------------------------------------- Wan
def _wan_tokens(config: Any, size: Size) -> int:
    pt, ph, pw = _cfg(config, "patch_size")
    return _latent_frames(size.num_frames, 4) // pt * (size.height // 8 // ph) * (size.width // 8 // pw)


def _wan_inputs(config, batch, size, text_tokens, dtype, device, generator, masked) -> Inputs:
    """Wan and its derivatives (ChronoEdit, SkyReels-V2's plain call): latents (B, C, F', H/8, W/8) (image-conditioned
    models concatenate the condition latents on C), umT5 text states, one integer timestep per sample, and for models
    with an image encoder (``image_dim``: Wan I2V, ChronoEdit) its CLIP states: 257 tokens at full size, 5 at tiny
    configs."""
    _check_divisible("wan", size, 16)
    latents = _randn(generator, batch, _cfg(config, "in_channels"), _latent_frames(size.num_frames, 4),
                     size.height // 8, size.width // 8, dtype=dtype, device=device)
    inputs = {
        "hidden_states": latents,
        "timestep": torch.full((batch,), 999, dtype=torch.long, device=device),
        "encoder_hidden_states": _randn(generator, batch, text_tokens, _cfg(config, "text_dim"), dtype=dtype,
                                        device=device),
    }
    image_dim = _cfg_or(config, "image_dim", None)
    if image_dim:
        image_tokens = 5 if _is_tiny(config) else 257
        inputs["encoder_hidden_states_image"] = _randn(generator, batch, image_tokens, image_dim, dtype=dtype,
                                                       device=device)
    if _cfg_or(config, "inject_sample_info", False):  # SkyReels-V2 DF-1.3B: fps 1 stands for 24 fps, as its pipelines
        inputs["fps"] = [1] * batch
    return inputs


# ----------------------------------------------------------------------------------------------- Wan VACE
def _wan_vace_inputs(config, batch, size, text_tokens, dtype, device, generator, masked) -> Inputs:
    """Wan VACE: Wan's latents (B, C, F', H/8, W/8), umT5 states and integer timestep, plus the VACE context latents
    ``control_hidden_states`` at the same latent size (as ``WanVACEPipeline`` without reference images) and
    ``control_hidden_states_scale``, one per VACE layer (not all 1 here, so that a scale applied to the wrong hint
    shows)."""
    inputs = _wan_inputs(config, batch, size, text_tokens, dtype, device, generator, masked)
    num_vace = len(_cfg(config, "vace_layers"))
    return {
        **inputs,
        "control_hidden_states": _randn(generator, batch, _cfg(config, "vace_in_channels"),
                                        *inputs["hidden_states"].shape[2:], dtype=dtype, device=device),
        "control_hidden_states_scale": torch.linspace(1.0, 0.5, num_vace, dtype=torch.float32).to(device, dtype),
    }


# ----------------------------------------------------------------------------------------------- Wan Animate
# WanAnimatePipeline calls the denoiser per segment (segment_frame_length=77 frames, 20 latent frames) with: the noisy
# latents concatenated with the reference/condition latents on C (2 x 16 + 4 = 36 channels) and the reference image's
# latent frame in front (T + 1 frames); the pose video latents (16 channels, T frames, added to the patch embedding of
# frames 1..T); the face video in pixels (B, 3, 77, 512, 512), which the motion and face encoders turn into T + 1
# frames of face tokens (the first zero: the reference frame's); umT5 states and the CLIP states of the reference image.
def _wan_animate_tokens(config: Any, size: Size) -> int:
    pt, ph, pw = _cfg(config, "patch_size")
    frames = _latent_frames(size.num_frames, 4) + 1  # the reference image's latent frame in front
    return frames // pt * (size.height // 8 // ph) * (size.width // 8 // pw)


def _wan_animate_inputs(config, batch, size, text_tokens, dtype, device, generator, masked) -> Inputs:
    """Wan Animate's segment call: latents (B, 2C + 4, T + 1, H/8, W/8), pose latents (B, C, T, H/8, W/8), the face
    video (B, 3, num_frames, S, S) in [-1, 1] at the motion encoder's size S (num_frames = 4T - 3 pixel frames: the
    face encoder's two stride-2 convolutions give T frames, plus the zero one in front), umT5 states, integer timestep
    and the CLIP states of the reference image (257 tokens, 5 at tiny configs)."""
    _check_divisible("wan_animate", size, 16)
    if (size.num_frames - 1) % 4:
        raise ValueError(f"wan_animate: num_frames must be 4k + 1, got {size.num_frames}")
    frames = _latent_frames(size.num_frames, 4)
    latent_channels = _cfg(config, "latent_channels") or (_cfg(config, "in_channels") - 4) // 2
    in_channels = _cfg(config, "in_channels") or 2 * latent_channels + 4
    grid = (size.height // 8, size.width // 8)
    face = _cfg(config, "motion_encoder_size")
    inputs = {
        "hidden_states": _randn(generator, batch, in_channels, frames + 1, *grid, dtype=dtype, device=device),
        "timestep": torch.full((batch,), 999, dtype=torch.long, device=device),
        "encoder_hidden_states": _randn(generator, batch, text_tokens, _cfg(config, "text_dim"), dtype=dtype,
                                        device=device),
        "pose_hidden_states": _randn(generator, batch, latent_channels, frames, *grid, dtype=dtype, device=device),
        "face_pixel_values": _randn(generator, batch, 3, size.num_frames, face, face, dtype=dtype,
                                    device=device).clamp_(-1, 1),
    }
    image_dim = _cfg(config, "image_dim")
    if image_dim:
        inputs["encoder_hidden_states_image"] = _randn(generator, batch, 5 if _is_tiny(config) else 257, image_dim,
                                                       dtype=dtype, device=device)
    return inputs


def _wan_animate_init(model: torch.nn.Module) -> None:
    """The face encoder's padding token (the last face token of every frame) starts at zero; trained it is not."""
    torch.nn.init.normal_(model.face_encoder.padding_tokens)


# One face adapter, after block 0 (inject_face_latents_blocks 2): the last block is a Wan block, as
# in the release (40 blocks, adapters after 0, 5, ..., 35). No added K/V projections at the tiny size: the attention
# processor hardcodes 512 text tokens to find the image tokens, so the tiny 8-token prompt concatenates the image
# tokens with the text instead (the call of the released config, added_kv_proj_dim 5120, is simulated at full size).
_TINY_WAN_ANIMATE = {
    **_TINY_HEADS, "in_channels": 12, "latent_channels": 4, "out_channels": 4, "text_dim": 24, "freq_dim": 16,
    "ffn_dim": 80, "num_layers": 2, "rope_max_seq_len": 64, "image_dim": 20, "added_kv_proj_dim": None,
    "motion_encoder_channel_sizes": {"8": 8, "4": 8}, "motion_encoder_size": 8, "motion_style_dim": 16,
    "motion_dim": 4, "motion_encoder_dim": 16, "face_encoder_hidden_dim": 16, "face_encoder_num_heads": 2,
    "inject_face_latents_blocks": 2, "motion_encoder_batch_size": 4,
}


# ----------------------------------------------------------------------------------------------- Helios
# Helios generates a long video window by window (33 frames = 9 latent frames per call) and conditions each window on
# compressed history latents: short (the first frame + the last generated one, patchified like the window), mid (2
# frames, 2x coarser patches) and long (16 frames, 4x coarser), as HeliosPipeline passes them. The model
# concatenates [long, mid, short, window] tokens, so the sequence memopt chunks is all of them.
# HeliosPipeline defaults: history_sizes=[16, 2, 1] (long, mid, 1x), keep_first_frame=True (the 1x history gets the
# first frame in front: 2 short frames).
_HISTORY_FRAMES = {"long": 16, "mid": 2, "short": 2}


def _helios_history_tokens(config: Any, size: Size) -> dict[str, int]:
    """Tokens per history term: short like the window, mid and long through 2x / 4x coarser patches (padded up)."""
    pt, ph, pw = _cfg(config, "patch_size")
    h, w = size.height // 8, size.width // 8
    tokens = {"short": _HISTORY_FRAMES["short"] // pt * (h // ph) * (w // pw)}
    for name, factor in (("mid", 2), ("long", 4)):
        frames = math.ceil(_HISTORY_FRAMES[name] / (factor * pt))
        tokens[name] = frames * math.ceil(h / (factor * ph)) * math.ceil(w / (factor * pw))
    return tokens


def _helios_tokens(config: Any, size: Size) -> int:
    pt, ph, pw = _cfg(config, "patch_size")
    window = _latent_frames(size.num_frames, 4) // pt * (size.height // 8 // ph) * (size.width // 8 // pw)
    return window + sum(_helios_history_tokens(config, size).values())


def _helios_inputs(config, batch, size, text_tokens, dtype, device, generator, masked) -> Inputs:
    """Helios: window latents (B, C, F', H/8, W/8), umT5 text states, the flow-matching timestep (float, as the
    pipeline passes it), the three history latents and their frame indices, laid out as ``HeliosPipeline`` does:
    ``[prefix | long | mid | 1x | window]`` with the short history = prefix + 1x (indices carry a batch dim of 1)."""
    _check_divisible("helios", size, 16)
    channels, h, w = _cfg(config, "in_channels"), size.height // 8, size.width // 8
    frames = _latent_frames(size.num_frames, 4)
    indices = torch.arange(1 + _HISTORY_FRAMES["long"] + _HISTORY_FRAMES["mid"] + 1 + frames, device=device)
    prefix, long, mid, one_x, window = indices.split(
        [1, _HISTORY_FRAMES["long"], _HISTORY_FRAMES["mid"], 1, frames]
    )

    def latents(num_frames: int) -> torch.Tensor:
        return _randn(generator, batch, channels, num_frames, h, w, dtype=dtype, device=device)

    return {
        "hidden_states": latents(frames),
        "timestep": torch.full((batch,), 999.0, dtype=torch.float32, device=device),
        "encoder_hidden_states": _randn(generator, batch, text_tokens, _cfg(config, "text_dim"), dtype=dtype,
                                        device=device),
        "indices_hidden_states": window[None],
        "indices_latents_history_short": torch.cat([prefix, one_x])[None],
        "indices_latents_history_mid": mid[None],
        "indices_latents_history_long": long[None],
        "latents_history_short": latents(_HISTORY_FRAMES["short"]),
        "latents_history_mid": latents(_HISTORY_FRAMES["mid"]),
        "latents_history_long": latents(_HISTORY_FRAMES["long"]),
    }


# ----------------------------------------------------------------------------------------------- Flux
def _flux_tokens(config: Any, size: Size) -> int:
    return (size.height // 16) * (size.width // 16)


def _flux_inputs(config, batch, size, text_tokens, dtype, device, generator, masked) -> Inputs:
    """Flux: 2x2-packed latents (B, N, 64), T5 states, pooled CLIP, position ids, guidance for dev."""
    _check_divisible("flux", size, 16)
    h, w = size.height // 16, size.width // 16
    inputs = {
        "hidden_states": _randn(generator, batch, h * w, _cfg(config, "in_channels"), dtype=dtype, device=device),
        "encoder_hidden_states": _randn(generator, batch, text_tokens, _cfg(config, "joint_attention_dim"),
                                        dtype=dtype, device=device),
        "pooled_projections": _randn(generator, batch, _cfg(config, "pooled_projection_dim"), dtype=dtype,
                                     device=device),
        "timestep": torch.full((batch,), 0.9, dtype=dtype, device=device),
        "img_ids": _grid_ids(h, w, 3).to(device=device, dtype=dtype),
        "txt_ids": torch.zeros(text_tokens, 3, device=device, dtype=dtype),
    }
    if _cfg(config, "guidance_embeds"):
        inputs["guidance"] = torch.full((batch,), 3.5, dtype=torch.float32, device=device)
    return inputs


# ----------------------------------------------------------------------------------------------- FLUX.2
def _flux2_tokens(config: Any, size: Size) -> int:
    return (size.height // 16) * (size.width // 16)


def _flux2_inputs(config, batch, size, text_tokens, dtype, device, generator, masked) -> Inputs:
    """FLUX.2: 2x2-patchified latents (B, N, 128) (32 VAE channels x 4), Mistral-Small-3.1 states (3 layers
    stacked: 15360), timestep in [0, 1] (the model scales it by 1000), guidance for dev, and 4-axis (t, h, w, l)
    position ids as the pipeline builds them: (B, N, 4) for the image, (B, T, 4) with l = token index for the text.
    No text mask: the forward takes none."""
    _check_divisible("flux2", size, 16)
    h, w = size.height // 16, size.width // 16
    txt_ids = torch.zeros(text_tokens, 4, dtype=torch.long)
    txt_ids[:, 3] = torch.arange(text_tokens)
    inputs = {
        "hidden_states": _randn(generator, batch, h * w, _cfg(config, "in_channels"), dtype=dtype, device=device),
        "encoder_hidden_states": _randn(generator, batch, text_tokens, _cfg(config, "joint_attention_dim"),
                                        dtype=dtype, device=device),
        "timestep": torch.full((batch,), 0.9, dtype=dtype, device=device),
        "img_ids": _grid_ids(h, w, 4, torch.long)[None].expand(batch, -1, -1).to(device),
        "txt_ids": txt_ids.reshape(1, text_tokens, 4).expand(batch, -1, -1).to(device),
    }
    if _cfg(config, "guidance_embeds"):
        inputs["guidance"] = torch.full((batch,), 4.0, dtype=torch.float32, device=device)
    return inputs


# ----------------------------------------------------------------------------------------------- FLUX.3
def _flux3_grid_ids(height: int, width: int, image_rope_scale: float = 0.5, l_coord: int = 0) -> torch.Tensor:
    """``(height x width, 4)`` fp32 (t, h, w, l) ids as the modular pipeline's ``_prepare_image_ids`` builds them:
    t = 0, rows and columns scaled by the image RoPE scale (0.5), l = 0 for the generated image, -1 - i for the i-th
    reference image."""
    ids = torch.cartesian_prod(torch.arange(1), torch.arange(height), torch.arange(width),
                               torch.tensor([l_coord])).to(torch.float32)
    ids[:, 1:3] = ids[:, 1:3] * image_rope_scale
    return ids


def _flux3_tokens(config: Any, size: Size) -> int:
    return (size.height // 16) * (size.width // 16)


def _flux3_inputs(config, batch, size, text_tokens, dtype, device, generator, masked) -> Inputs:
    """FLUX.3 text-to-image: 2x2-patchified latents (B, N, 128), stacked Qwen3-VL states (8 layers: 20480), timestep
    in [0, 1] (the model scales it by 1000), and 4-axis (t, h, w, l) fp32 ids shared by the batch: (N, 4) for the
    image, (T, 4) with l = token index for the text. No text mask: the forward takes none (the pipeline pads the
    prompt window to a multiple of 80 tokens and lets the transformer attend to the padding). ``target_timestep``
    for flow-map (step-distilled) configs. See :func:`flux3_reference_inputs` for image-to-image."""
    _check_divisible("flux3", size, 16)
    h, w = size.height // 16, size.width // 16
    txt_ids = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1),
                                   torch.arange(text_tokens)).to(torch.float32)
    inputs = {
        "hidden_states": _randn(generator, batch, h * w, _cfg(config, "in_channels"), dtype=dtype, device=device),
        "encoder_hidden_states": _randn(generator, batch, text_tokens, _cfg(config, "joint_attention_dim"),
                                        dtype=dtype, device=device),
        "timestep": torch.full((batch,), 0.9, dtype=dtype, device=device),
        "img_ids": _flux3_grid_ids(h, w).to(device=device, dtype=dtype),
        "txt_ids": txt_ids.to(device=device, dtype=dtype),
    }
    if _cfg(config, "flow_map"):
        inputs["target_timestep"] = torch.full((batch,), 0.8, dtype=dtype, device=device)
    return inputs


def flux3_reference_inputs(config: Any, inputs: Inputs, size: Size, num_images: int = 1, seed: int = 1) -> Inputs:
    """``inputs`` plus ``num_images`` VAE-encoded reference images of ``size`` (image-to-image), as the pipeline's
    ``Flux3PrepareImageLatentsStep`` passes them: tokens concatenated, ids with l = -1 - index."""
    _check_divisible("flux3", size, 16)
    h, w = size.height // 16, size.width // 16
    hidden = inputs["hidden_states"]
    generator = torch.Generator("cpu").manual_seed(seed)
    cond = _randn(generator, hidden.shape[0], num_images * h * w, _cfg(config, "cond_in_channels"),
                  dtype=hidden.dtype, device=hidden.device)
    ids = torch.cat([_flux3_grid_ids(h, w, l_coord=-(1 + index)) for index in range(num_images)])
    return {**inputs, "image_cond_hidden_states": cond,
            "image_cond_ids": ids.to(device=hidden.device, dtype=inputs["img_ids"].dtype)}


# ----------------------------------------------------------------------------------------------- Bria
def _bria_tokens(config: Any, size: Size) -> int:
    return (size.height // 16) * (size.width // 16)


def _bria_inputs(config, batch, size, text_tokens, dtype, device, generator, masked) -> Inputs:
    """Bria 3.x: 2x2-packed latents (B, N, 4 x 4) of its 4-channel VAE (8x), T5 states, position ids.

    No pooled projection, no guidance embedding and no text mask: ``BriaPipeline`` zero-pads the T5 states of a short
    prompt to ``max_sequence_length`` (128) instead, which ``masked`` reproduces on the last quarter of the text. The
    timestep is the scheduler's, in [0, 1000] (not divided by 1000 as Flux's pipeline does).
    """
    _check_divisible("bria", size, 16)
    h, w = size.height // 16, size.width // 16
    text = _randn(generator, batch, text_tokens, _cfg(config, "joint_attention_dim"), dtype=dtype, device=device)
    if masked:
        text[:, text_tokens - max(1, text_tokens // 4) :] = 0
    return {
        "hidden_states": _randn(generator, batch, h * w, _cfg(config, "in_channels"), dtype=dtype, device=device),
        "encoder_hidden_states": text,
        "timestep": torch.full((batch,), 900.0, dtype=dtype, device=device),
        "img_ids": _grid_ids(h, w, 3).to(device=device, dtype=dtype),
        "txt_ids": torch.zeros(text_tokens, 3, device=device, dtype=dtype),
    }


# ----------------------------------------------------------------------------------------------- Chroma
def _chroma_tokens(config: Any, size: Size) -> int:
    return (size.height // 16) * (size.width // 16)


def _chroma_inputs(config, batch, size, text_tokens, dtype, device, generator, masked) -> Inputs:
    """Chroma: 2x2-packed latents (B, N, 64), T5 states, position ids, and the pipeline's attention mask.

    ``ChromaPipeline`` passes a ``(B, text + image)`` mask in the latents' dtype: ones for the prompt's tokens and the
    first padding token, zeros for the other padding, ones for every image token (``_prepare_attention_mask``). The
    blocks turn it into the query-dependent ``m[q] * m[k]``. ``masked`` pads the last quarter of the text out.
    """
    _check_divisible("chroma", size, 16)
    h, w = size.height // 16, size.width // 16
    prompt_tokens = text_tokens - max(1, text_tokens // 4) if masked else text_tokens
    text_mask = (torch.arange(text_tokens) <= prompt_tokens).to(dtype)  # the pipeline keeps one padding token
    mask = torch.cat([text_mask, torch.ones(h * w, dtype=dtype)]).expand(batch, -1).contiguous()
    return {
        "hidden_states": _randn(generator, batch, h * w, _cfg(config, "in_channels"), dtype=dtype, device=device),
        "encoder_hidden_states": _randn(generator, batch, text_tokens, _cfg(config, "joint_attention_dim"),
                                        dtype=dtype, device=device),
        "timestep": torch.full((batch,), 0.9, dtype=dtype, device=device),  # the pipeline passes t / 1000
        "img_ids": _grid_ids(h, w, 3).to(device=device, dtype=dtype),
        "txt_ids": torch.zeros(text_tokens, 3, device=device, dtype=dtype),
        "attention_mask": mask.to(device),
    }


# ----------------------------------------------------------------------------------------------- HunyuanVideo
def _hunyuan_tokens(config: Any, size: Size) -> int:
    p, pt = _cfg(config, "patch_size"), _cfg(config, "patch_size_t")
    return _latent_frames(size.num_frames, 4) // pt * (size.height // 8 // p) * (size.width // 8 // p)


def _hunyuan_inputs(config, batch, size, text_tokens, dtype, device, generator, masked) -> Inputs:
    """HunyuanVideo: latents (B, C, F', H/8, W/8), Llama states + encoder mask, pooled CLIP, guidance."""
    _check_divisible("hunyuanvideo", size, 16)
    latents = _randn(generator, batch, _cfg(config, "in_channels"), _latent_frames(size.num_frames, 4),
                     size.height // 8, size.width // 8, dtype=dtype, device=device)
    inputs = {
        "hidden_states": latents,
        "timestep": torch.full((batch,), 999, dtype=torch.long, device=device),
        "encoder_hidden_states": _randn(generator, batch, text_tokens, _cfg(config, "text_embed_dim"), dtype=dtype,
                                        device=device),
        "encoder_attention_mask": _text_mask(batch, text_tokens, masked, device),
        "pooled_projections": _randn(generator, batch, _cfg(config, "pooled_projection_dim"), dtype=dtype,
                                     device=device),
    }
    if _cfg(config, "guidance_embeds"):
        inputs["guidance"] = torch.full((batch,), 6000.0, dtype=dtype, device=device)
    return inputs


# ----------------------------------------------------------------------------------------------- FramePack
# HunyuanVideoFramepackPipeline for the released checkpoints (lllyasviel/FramePackI2V_HY, FramePack_F1_I2V_HY): one
# denoiser call generates a window of latent_window_size = 9 latent frames (33 pixel frames) conditioned on history
# latents at three compressions: 1 + 1 clean frames (the start image and the nearest history frame, 1x), 2 frames at
# 2x and 16 frames at 4x (history_sizes [1, 2, 16]). HunyuanVideoHistoryPatchEmbed projects them with (1, 2, 2),
# (2, 4, 4) and (4, 8, 8) convolutions (2x / 4x padded to whole kernels by replication) and the model puts them in
# front of the window's tokens: [4x | 2x | clean | window]. The SigLIP image embedding (729 tokens of 1152) goes in
# front of the text tokens.
_FRAMEPACK_CLEAN_FRAMES = 2
_FRAMEPACK_HISTORY_2X = 2
_FRAMEPACK_HISTORY_4X = 16
_FRAMEPACK_IMAGE_TOKENS = 729  # SigLIP so400m-patch14-384 last_hidden_state (27 x 27 patches)


def _framepack_token_counts(config: Any, size: Size) -> tuple[int, int, int, int]:
    """(4x history, 2x history, clean, window) tokens, in the order the model concatenates them."""
    p, pt = _cfg(config, "patch_size"), _cfg(config, "patch_size_t")
    h, w = size.height // 8, size.width // 8
    window = _latent_frames(size.num_frames, 4) // pt * (h // p) * (w // p)
    clean = _FRAMEPACK_CLEAN_FRAMES * (h // 2) * (w // 2)
    history_2x = math.ceil(_FRAMEPACK_HISTORY_2X / 2) * math.ceil(h / 4) * math.ceil(w / 4)
    history_4x = math.ceil(_FRAMEPACK_HISTORY_4X / 4) * math.ceil(h / 8) * math.ceil(w / 8)
    return history_4x, history_2x, clean, window


def _framepack_tokens(config: Any, size: Size) -> int:
    """All the tokens the blocks carry: the history tokens and the window's (the output head keeps the window's)."""
    return sum(_framepack_token_counts(config, size))


def _framepack_inputs(config, batch, size, text_tokens, dtype, device, generator, masked) -> Inputs:
    """FramePack (one window of the inverted anti-drifting sampler, the pipeline's default, at its last section:
    no padding frames): window latents (B, 16, F', H/8, W/8), clean / 2x / 4x history latents, their frame indices
    (1-D, as the pipeline passes them), Llama states + mask, pooled CLIP, SigLIP image states (729 tokens at full
    size, 3 at tiny configs), guidance (scale 6 x 1000)."""
    _check_divisible("framepack", size, 16)
    channels, frames = _cfg(config, "in_channels"), _latent_frames(size.num_frames, 4)
    h, w = size.height // 8, size.width // 8

    def latents(num_frames: int) -> torch.Tensor:
        return _randn(generator, batch, channels, num_frames, h, w, dtype=dtype, device=device)

    # indices.split([1, latent_padding_size = 0, latent_window_size, *history_sizes]) of the pipeline
    sizes = [1, frames, 1, _FRAMEPACK_HISTORY_2X, _FRAMEPACK_HISTORY_4X]
    prefix, window, history_1x, history_2x, history_4x = torch.arange(sum(sizes), device=device).split(sizes)
    image_tokens = 3 if _is_tiny(config) else _FRAMEPACK_IMAGE_TOKENS
    inputs = {
        "hidden_states": latents(frames),
        "timestep": torch.full((batch,), 999.0, dtype=torch.float32, device=device),
        "encoder_hidden_states": _randn(generator, batch, text_tokens, _cfg(config, "text_embed_dim"), dtype=dtype,
                                        device=device),
        "encoder_attention_mask": _text_mask(batch, text_tokens, masked, device),
        "pooled_projections": _randn(generator, batch, _cfg(config, "pooled_projection_dim"), dtype=dtype,
                                     device=device),
        "image_embeds": _randn(generator, batch, image_tokens, _cfg(config, "image_proj_dim"), dtype=dtype,
                               device=device),
        "indices_latents": window,
        "latents_clean": latents(_FRAMEPACK_CLEAN_FRAMES),
        "indices_latents_clean": torch.cat([prefix, history_1x]),
        "latents_history_2x": latents(_FRAMEPACK_HISTORY_2X),
        "indices_latents_history_2x": history_2x,
        "latents_history_4x": latents(_FRAMEPACK_HISTORY_4X),
        "indices_latents_history_4x": history_4x,
    }
    if _cfg(config, "guidance_embeds"):
        inputs["guidance"] = torch.full((batch,), 6000.0, dtype=dtype, device=device)
    return inputs


# ----------------------------------------------------------------------------------------------- HunyuanVideo 1.5
_HUNYUAN15_GLYPH_TOKENS = 256  # HunyuanVideo15Pipeline.tokenizer_2_max_length (byT5 glyph tokens)
_HUNYUAN15_VISION_TOKENS = 729  # HunyuanVideo15Pipeline.vision_num_semantic_tokens (SigLIP image tokens)


def _hunyuan15_tokens(config: Any, size: Size) -> int:
    p, pt = _cfg(config, "patch_size"), _cfg(config, "patch_size_t")
    return _latent_frames(size.num_frames, 4) // pt * (size.height // 16 // p) * (size.width // 16 // p)


def _hunyuan15_inputs(config, batch, size, text_tokens, dtype, device, generator, masked) -> Inputs:
    """HunyuanVideo 1.5 (text-to-video pipeline): latents + condition latents + mask (B, 65, F', H/16, W/16) from its
    16x VAE, Qwen2.5-VL states + mask, byT5 glyph states + mask, and the SigLIP image embeds the T2V pipeline passes
    as zeros (which the model turns into masked-out image tokens). The block text stream is all three: 1000 + 256 +
    729 tokens at the released size. ``masked`` pads the last quarter of the Qwen tokens and the last half of the
    glyph tokens (prompts rarely quote much text)."""
    _check_divisible("hunyuanvideo15", size, 16)
    tiny = _is_tiny(config)
    glyph_tokens = max(1, text_tokens // 2) if tiny else _HUNYUAN15_GLYPH_TOKENS
    vision_tokens = 3 if tiny else _HUNYUAN15_VISION_TOKENS
    latents = _randn(generator, batch, _cfg(config, "in_channels"), _latent_frames(size.num_frames, 4),
                     size.height // 16, size.width // 16, dtype=dtype, device=device)
    glyph_mask = _glyph_mask(batch, glyph_tokens, masked, device)
    return {
        "hidden_states": latents,
        "timestep": torch.full((batch,), 999.0, dtype=dtype, device=device),
        "encoder_hidden_states": _randn(generator, batch, text_tokens, _cfg(config, "text_embed_dim"), dtype=dtype,
                                        device=device),
        "encoder_attention_mask": _text_mask(batch, text_tokens, masked, device),
        "encoder_hidden_states_2": _randn(generator, batch, glyph_tokens, _cfg(config, "text_embed_2_dim"),
                                          dtype=dtype, device=device),
        "encoder_attention_mask_2": glyph_mask,
        "image_embeds": torch.zeros(batch, vision_tokens, _cfg(config, "image_embed_dim"), dtype=dtype, device=device),
    }


# ----------------------------------------------------------------------------------------------- HunyuanImage 2.1
_HUNYUANIMAGE_GLYPH_TOKENS = 128  # HunyuanImagePipeline.tokenizer_2_max_length (byT5 glyph tokens)


def _hunyuanimage_vae_ratio(config: Any) -> int:
    """The base model's 32x VAE (latents (B, 64, H/32, W/32)) or the refiner's 16x video VAE (latents (B, 2 x 64, 1,
    H/16, W/16): noisy + condition latents); a 3-D patch size marks the refiner."""
    return 16 if len(_cfg(config, "patch_size")) == 3 else 32


def _hunyuanimage_tokens(config: Any, size: Size) -> int:
    ratio, patch = _hunyuanimage_vae_ratio(config), _cfg(config, "patch_size")
    return (size.height // ratio // patch[-2]) * (size.width // ratio // patch[-1])


def _hunyuanimage_inputs(config, batch, size, text_tokens, dtype, device, generator, masked) -> Inputs:
    """HunyuanImage-2.1: latents (B, 64, H/32, W/32), Qwen2.5-VL states + mask, byT5 glyph states + mask (the pipeline
    always passes them, zeros with an all-zero mask when the prompt quotes no text), and for the distilled / refiner
    checkpoints the guidance scale and the MeanFlow ``timestep_r``. The refiner (3-D patch size) takes
    (B, 128, 1, H/16, W/16) (noisy and condition latents concatenated) and no glyph states. The model reorders the
    text stream per sample as [valid glyph, valid Qwen, padding glyph, padding Qwen]: 1000 + 128 tokens at the
    released size. ``masked`` pads the last quarter of the Qwen tokens and the last half of the glyph tokens."""
    refiner = _hunyuanimage_vae_ratio(config) == 16
    ratio = _hunyuanimage_vae_ratio(config)
    _check_divisible("hunyuanimage", size, ratio)
    shape = (1, size.height // ratio, size.width // ratio) if refiner else (size.height // ratio, size.width // ratio)
    inputs = {
        "hidden_states": _randn(generator, batch, _cfg(config, "in_channels"), *shape, dtype=dtype, device=device),
        "timestep": torch.full((batch,), 999.0, dtype=dtype, device=device),
        "encoder_hidden_states": _randn(generator, batch, text_tokens, _cfg(config, "text_embed_dim"), dtype=dtype,
                                        device=device),
        "encoder_attention_mask": _text_mask(batch, text_tokens, masked, device),
    }
    if _cfg(config, "text_embed_2_dim") is not None:
        glyph_tokens = max(1, text_tokens // 2) if _is_tiny(config) else _HUNYUANIMAGE_GLYPH_TOKENS
        glyph_mask = _glyph_mask(batch, glyph_tokens, masked, device)
        inputs["encoder_hidden_states_2"] = _randn(generator, batch, glyph_tokens, _cfg(config, "text_embed_2_dim"),
                                                   dtype=dtype, device=device)
        inputs["encoder_attention_mask_2"] = glyph_mask
    if _cfg(config, "guidance_embeds"):
        inputs["guidance"] = torch.full((batch,), 3250.0, dtype=dtype, device=device)  # 1000 x distilled scale 3.25
    if _cfg(config, "use_meanflow"):
        inputs["timestep_r"] = torch.full((batch,), 500.0, dtype=dtype, device=device)  # the next step's timestep
    return inputs


# HunyuanImage-2.1 refiner (HYImageDiffusionTransformer hunyuanimage_refiner_cfg): 26 x 128 heads, 3-D patches,
# guidance-distilled with MeanFlow, no glyph states.


# ----------------------------------------------------------------------------------------------- CogVideoX
def _cogvideox_tokens(config: Any, size: Size) -> int:
    p, pt = _cfg(config, "patch_size"), _cfg(config, "patch_size_t") or 1
    frames = _latent_frames(size.num_frames, 4)
    return math.ceil(frames / pt) * (size.height // 8 // p) * (size.width // 8 // p)


def _cogvideox_inputs(config, batch, size, text_tokens, dtype, device, generator, masked) -> Inputs:
    """CogVideoX: latents (B, F', C, H/8, W/8) (frames before channels), T5 states, timestep."""
    _check_divisible("cogvideox", size, 16)
    latents = _randn(generator, batch, _latent_frames(size.num_frames, 4), _cfg(config, "in_channels"),
                     size.height // 8, size.width // 8, dtype=dtype, device=device)
    return {
        "hidden_states": latents,
        "encoder_hidden_states": _randn(generator, batch, text_tokens, _cfg(config, "text_embed_dim"), dtype=dtype,
                                        device=device),
        "timestep": torch.full((batch,), 999, dtype=torch.long, device=device),
    }


# ----------------------------------------------------------------------------------------------- CogView4
def _cogview4_tokens(config: Any, size: Size) -> int:
    patch = _cfg(config, "patch_size")
    return (size.height // 8 // patch) * (size.width // 8 // patch)


def _cogview4_inputs(config, batch, size, text_tokens, dtype, device, generator, masked) -> Inputs:
    """CogView4: latents (B, C, H/8, W/8), GLM-4 states, timestep and the SDXL-style size conditions.

    ``CogView4Pipeline`` passes ``original_size`` / ``target_size`` ``(B, 2)`` = ``(height, width)`` and
    ``crop_coords`` ``(B, 2)`` = ``(0, 0)`` in the prompt's dtype, a float timestep in ``[1, 1000]``, and **no**
    ``attention_mask``: it left-pads the prompt with pad tokens to a multiple of 16 and lets them attend. The forward
    also takes an optional ``(B, S_text)`` text mask (1 = token, 0 = padding), which its processor turns into the
    additive 0/1 mask ``m[q] * m[k] > 0`` (image tokens count as 1). As no pipeline passes it, ``masked`` is ignored
    here (``mask_key`` is ``None``); sequence chunking refuses that mask (it depends on the query position).
    """
    _check_divisible("cogview4", size, 8 * _cfg(config, "patch_size"))
    sizes = torch.tensor([[size.height, size.width]], dtype=dtype, device=device).repeat(batch, 1)
    return {
        "hidden_states": _randn(generator, batch, _cfg(config, "in_channels"), size.height // 8, size.width // 8,
                                dtype=dtype, device=device),
        "encoder_hidden_states": _randn(generator, batch, text_tokens, _cfg(config, "text_embed_dim"), dtype=dtype,
                                        device=device),
        "timestep": torch.full((batch,), 999.0, dtype=torch.float32, device=device),
        "original_size": sizes,
        "target_size": sizes.clone(),
        "crop_coords": torch.zeros(batch, 2, dtype=dtype, device=device),
    }


# ----------------------------------------------------------------------------------------------- LTX-Video
def _ltx_tokens(config: Any, size: Size) -> int:
    return _latent_frames(size.num_frames, 8) * (size.height // 32) * (size.width // 32)


def _ltx_inputs(config, batch, size, text_tokens, dtype, device, generator, masked) -> Inputs:
    """LTX-Video: packed latents (B, N, 128), T5 states + encoder mask, latent frames/height/width."""
    _check_divisible("ltx", size, 32)
    frames, h, w = _latent_frames(size.num_frames, 8), size.height // 32, size.width // 32
    return {
        "hidden_states": _randn(generator, batch, frames * h * w, _cfg(config, "in_channels"), dtype=dtype,
                                device=device),
        "encoder_hidden_states": _randn(generator, batch, text_tokens, _cfg(config, "caption_channels"),
                                        dtype=dtype, device=device),
        "timestep": torch.full((batch,), 999, dtype=torch.long, device=device),
        "encoder_attention_mask": _text_mask(batch, text_tokens, masked, device),
        "num_frames": frames,
        "height": h,
        "width": w,
    }


# ----------------------------------------------------------------------------------------------- LTX-2
def _ltx2_tokens(config: Any, size: Size) -> int:
    temporal, spatial, _ = _cfg(config, "vae_scale_factors")
    p, pt = _cfg(config, "patch_size"), _cfg(config, "patch_size_t")
    frames = _latent_frames(size.num_frames, temporal) // pt
    return frames * (size.height // spatial // p) * (size.width // spatial // p)


def _ltx2_audio_frames(config: Any, size: Size, frame_rate: float) -> int:
    """Audio latents the pipeline makes for the clip: ``round(seconds x sampling_rate / hop / audio_scale_factor)``
    (25 a second at the released config: 126 for 121 frames at 24 fps)."""
    per_second = _cfg(config, "audio_sampling_rate") / _cfg(config, "audio_hop_length") / _cfg(config,
                                                                                               "audio_scale_factor")
    return round(size.num_frames / frame_rate * per_second)


def _ltx2_inputs(config, batch, size, text_tokens, dtype, device, generator, masked) -> Inputs:
    """LTX-2: packed video latents (B, N, 128) and audio latents (B, L, 128) (8 channels x 16 mel bins) as
    ``pipeline_ltx2`` builds them at 24 fps, the connectors' text states for video and audio (caption-channel wide
    for LTX-2.0, already at the stream widths when ``use_prompt_embeddings=False``, LTX-2.3) with their shared mask,
    timestep (also passed as ``sigma``, as the pipelines do) and the latent sizes the rotary embeddings are made
    from."""
    temporal, spatial, _ = _cfg(config, "vae_scale_factors")
    _check_divisible("ltx2", size, spatial)
    frame_rate = 24.0
    frames, h, w = _latent_frames(size.num_frames, temporal), size.height // spatial, size.width // spatial
    tokens = _ltx2_tokens(config, size)
    audio_frames = _ltx2_audio_frames(config, size, frame_rate)
    if _cfg(config, "use_prompt_embeddings"):
        text_dim = audio_text_dim = _cfg(config, "caption_channels")
    else:
        text_dim = _cfg(config, "num_attention_heads") * _cfg(config, "attention_head_dim")
        audio_text_dim = _cfg(config, "audio_num_attention_heads") * _cfg(config, "audio_attention_head_dim")
    timestep = torch.full((batch,), 999.0, dtype=torch.float32, device=device)
    mask = _text_mask(batch, text_tokens, masked, device)
    return {
        "hidden_states": _randn(generator, batch, tokens, _cfg(config, "in_channels"), dtype=dtype, device=device),
        "audio_hidden_states": _randn(generator, batch, audio_frames, _cfg(config, "audio_in_channels"), dtype=dtype,
                                      device=device),
        "encoder_hidden_states": _randn(generator, batch, text_tokens, text_dim, dtype=dtype, device=device),
        "audio_encoder_hidden_states": _randn(generator, batch, text_tokens, audio_text_dim, dtype=dtype,
                                              device=device),
        "timestep": timestep,
        "sigma": timestep,
        "encoder_attention_mask": mask,
        "audio_encoder_attention_mask": mask,
        "num_frames": frames,
        "height": h,
        "width": w,
        "fps": frame_rate,
        "audio_num_frames": audio_frames,
    }


_TINY_LTX2 = {
    "num_attention_heads": 2, "attention_head_dim": 16, "in_channels": 8, "out_channels": 8,
    "cross_attention_dim": 32, "caption_channels": 24, "num_layers": 2,
    # Audio at half the video width, as released (2048 vs 4096); the a2v / v2a rotary tables are
    # audio_cross_attention_dim wide and split over the video heads, so it equals the audio width.
    "audio_num_attention_heads": 2, "audio_attention_head_dim": 8, "audio_in_channels": 8, "audio_out_channels": 8,
    "audio_cross_attention_dim": 16, "rope_type": "split",
}
# LTX-2.3: gated attention, prompt (cross-attention) AdaLN, per-modality connectors (text states at the stream
# widths), the perturbed (STG) attention processor.
_LTX23 = {"gated_attn": True, "cross_attn_mod": True, "audio_gated_attn": True, "audio_cross_attn_mod": True,
          "use_prompt_embeddings": False, "perturbed_attn": True, "rope_type": "split"}


# ----------------------------------------------------------------------------------------------- QwenImage
def _qwenimage_tokens(config: Any, size: Size) -> int:
    return (size.height // 16) * (size.width // 16)


def _qwenimage_inputs(config, batch, size, text_tokens, dtype, device, generator, masked) -> Inputs:
    """QwenImage: 2x2-packed latents (B, N, 64), Qwen2.5-VL states + encoder_hidden_states_mask, img_shapes."""
    _check_divisible("qwenimage", size, 16)
    h, w = size.height // 16, size.width // 16
    return {
        "hidden_states": _randn(generator, batch, h * w, _cfg(config, "in_channels"), dtype=dtype, device=device),
        "encoder_hidden_states": _randn(generator, batch, text_tokens, _cfg(config, "joint_attention_dim"),
                                        dtype=dtype, device=device),
        "encoder_hidden_states_mask": _text_mask(batch, text_tokens, masked, device),
        "timestep": torch.full((batch,), 0.9, dtype=dtype, device=device),
        "img_shapes": [[(1, h, w)]] * batch,
    }


# ----------------------------------------------------------------------------------------------- Qwen-Image 2.1
def _qwenimage21_tokens(config: Any, size: Size) -> int:
    """The joint sequence the blocks carry (and memopt chunks): the default prompt (8 tokens for test-sized configs,
    which also get a 2-slot condition image and a vision-end token: see ``_qwenimage21_inputs``) and the target's
    ``H / 16 x W / 16`` latent tokens."""
    text = 8 + 1 + 8 if _is_tiny(config) else 256
    return text + (size.height // 16) * (size.width // 16)


def _qwenimage21_inputs(config, batch, size, text_tokens, dtype, device, generator, masked) -> Inputs:
    """Qwen-Image 2.1: unpatched latents (B, N, 64), Qwen-VL states over the vision-language sequence, img_mask.

    As the pipeline builds them: ``img_mask`` marks the vision-language sequence's image slots (one per 2x2 latent
    tokens) and ends with ``N / 4`` slots for the target image; ``encoder_hidden_states`` (and its mask) cover the
    vision-language sequence without the target slots. Test-sized configs get the editing layout, a condition image
    inside the prompt (``text_tokens / 2`` prompt tokens, 2 image slots = a (1, 2, 4) latent grid, a vision-end token,
    the other prompt tokens), so the block-causal prefix has text / image / text segments and the joint sequence
    ``text_tokens + 1 + 8 + N`` is odd; full-size ones the text-to-image layout (prompt, then the target).
    ``masked`` pads the last quarter of the prompt tokens out, as the pipeline right-pads a batch's shorter prompts.
    """
    _check_divisible("qwenimage21", size, 32)  # the pipeline's multiple: the latent grid has even sides
    h, w = size.height // 16, size.width // 16
    condition = [(1, 2, 4)] if _is_tiny(config) else []
    head = text_tokens // 2
    slots = [False] * text_tokens
    if condition:
        slots = [False] * head + [True] * (8 // 4) + [False] * (1 + text_tokens - head)
    vlm_tokens = len(slots)
    img_mask = torch.tensor(slots + [True] * (h * w // 4), device=device).expand(batch, -1)
    text_mask = torch.ones(batch, vlm_tokens, dtype=torch.long, device=device)
    if masked:
        text_mask[:, vlm_tokens - max(1, text_tokens // 4):] = 0
    image_tokens = sum(c * a * b for c, a, b in condition) + h * w
    return {
        "hidden_states": _randn(generator, batch, image_tokens, _cfg(config, "in_channels"), dtype=dtype,
                                device=device),  # condition latents first, the target's last
        "encoder_hidden_states": _randn(generator, batch, vlm_tokens, _cfg(config, "context_in_dim"), dtype=dtype,
                                        device=device),
        "encoder_hidden_states_mask": text_mask if masked else _text_mask(batch, vlm_tokens, False, device),
        "timestep": torch.full((batch,), 0.9, dtype=dtype, device=device),  # the pipeline's t / 1000
        "img_shapes": [[*condition, (1, h, w)]] * batch,
        "img_mask": img_mask,
    }


# ----------------------------------------------------------------------------------------------- AuraFlow
def _auraflow_tokens(config: Any, size: Size) -> int:
    """Image tokens (the 2x2 patches of the 8x-downsampled SDXL-VAE latents). The single DiT blocks carry the 8
    register tokens and the text tokens in front of them."""
    p = _cfg(config, "patch_size")
    return (size.height // 8 // p) * (size.width // 8 // p)


def _auraflow_inputs(config, batch, size, text_tokens, dtype, device, generator, masked) -> Inputs:
    """AuraFlow: latents (B, 4, H/8, W/8), Pile-T5 (UMT5) states (B, T, 2048), timestep ``t / 1000`` in [0, 1], as
    ``AuraFlowPipeline`` calls the transformer. No mask argument: the pipeline multiplies the prompt states by the
    tokenizer mask instead (padded tokens are zero vectors that are still attended to)."""
    p = _cfg(config, "patch_size")
    _check_divisible("auraflow", size, 8 * p)
    latent_grid = int(_cfg(config, "pos_embed_max_size") ** 0.5)
    if max(size.height, size.width) // 8 // p > latent_grid:
        raise ValueError(f"auraflow: {size.height}x{size.width} needs more than the {latent_grid}x{latent_grid} "
                         "learned positions (pos_embed_max_size)")
    return {
        "hidden_states": _randn(generator, batch, _cfg(config, "in_channels"), size.height // 8, size.width // 8,
                                dtype=dtype, device=device),
        "encoder_hidden_states": _randn(generator, batch, text_tokens, _cfg(config, "joint_attention_dim"),
                                        dtype=dtype, device=device),
        "timestep": torch.full((batch,), 0.9, dtype=dtype, device=device),
    }


def _auraflow_init(model: torch.nn.Module) -> None:
    """Make the random-weight blocks matter. AuraFlow zero-initialises nothing, but its attention reaches the residual
    stream only through the MLP input (``norm2(residual + gate * attn)`` feeds ``ff``; the block adds only
    ``gate * ff``), and bias-free SwiGLU MLPs at PyTorch's default init output little: at the tiny config, switching
    every attention off changes the output by 2.4e-4 relative, too close to the tests' 1e-5 tolerance. Scaling the
    MLP output projections by 8 and the attention output projections by 4 makes that 8e-3 (the prompt: 2.8e-3)."""
    for name, param in model.named_parameters():
        if name.endswith("out_projection.weight"):
            param.mul_(8.0)
        elif name.endswith(("to_out.0.weight", "to_add_out.weight")):
            param.mul_(4.0)


# ----------------------------------------------------------------------------------------------- PixArt
def _pixart_tokens(config: Any, size: Size) -> int:
    p = _cfg(config, "patch_size")
    return (size.height // 8 // p) * (size.width // 8 // p)


def _pixart_micro_conditions(config: Any) -> bool:
    """Whether the model embeds resolution and aspect ratio into its timestep embedding (PixArt-Alpha 1024-MS): the
    class resolves ``use_additional_conditions=None`` to ``sample_size == 128``."""
    use = _cfg_or(config, "use_additional_conditions", None)
    return _cfg(config, "sample_size") == 128 if use is None else bool(use)


def _pixart_inputs(config, batch, size, text_tokens, dtype, device, generator, masked) -> Inputs:
    """PixArt: latents (B, 4, H/8, W/8), T5 states (4096 wide at the release) + their 0/1 mask, the integer timestep
    per sample, and ``added_cond_kwargs`` as the pipelines pass it: ``{"resolution": None, "aspect_ratio": None}``
    (PixArt-Sigma), the (B, 2) pixel size and (B, 1) aspect ratio for PixArt-Alpha's micro-conditions."""
    _check_divisible("pixart", size, 8 * _cfg(config, "patch_size"))
    added: dict[str, torch.Tensor | None] = {"resolution": None, "aspect_ratio": None}
    if _pixart_micro_conditions(config):
        added = {
            "resolution": torch.tensor([[size.height, size.width]], dtype=dtype, device=device).repeat(batch, 1),
            "aspect_ratio": torch.tensor([[size.height / size.width]], dtype=dtype, device=device).repeat(batch, 1),
        }
    return {
        "hidden_states": _randn(generator, batch, _cfg(config, "in_channels"), size.height // 8, size.width // 8,
                                dtype=dtype, device=device),
        "encoder_hidden_states": _randn(generator, batch, text_tokens, _cfg(config, "caption_channels"), dtype=dtype,
                                        device=device),
        "encoder_attention_mask": _text_mask(batch, text_tokens, masked, device),
        "timestep": torch.full((batch,), 999, dtype=torch.long, device=device),
        "added_cond_kwargs": added,
    }


# ----------------------------------------------------------------------------------------------- SD3
def _sd3_tokens(config: Any, size: Size) -> int:
    p = _cfg(config, "patch_size")
    return (size.height // 8 // p) * (size.width // 8 // p)


def _sd3_inputs(config, batch, size, text_tokens, dtype, device, generator, masked) -> Inputs:
    """SD3: latents (B, C, H/8, W/8), CLIP+T5 joint states, pooled projections, timestep."""
    _check_divisible("sd3", size, 16)
    return {
        "hidden_states": _randn(generator, batch, _cfg(config, "in_channels"), size.height // 8, size.width // 8,
                                dtype=dtype, device=device),
        "encoder_hidden_states": _randn(generator, batch, text_tokens, _cfg(config, "joint_attention_dim"),
                                        dtype=dtype, device=device),
        "pooled_projections": _randn(generator, batch, _cfg(config, "pooled_projection_dim"), dtype=dtype,
                                     device=device),
        "timestep": torch.full((batch,), 999, dtype=torch.long, device=device),
    }


# ----------------------------------------------------------------------------------------------- Mochi
def _mochi_tokens(config: Any, size: Size) -> int:
    p = _cfg(config, "patch_size")
    return _latent_frames(size.num_frames, 6) * (size.height // 8 // p) * (size.width // 8 // p)


def _mochi_inputs(config, batch, size, text_tokens, dtype, device, generator, masked) -> Inputs:
    """Mochi: latents (B, C, F', H/8, W/8), T5 states + encoder mask, timestep."""
    _check_divisible("mochi", size, 16)
    latents = _randn(generator, batch, _cfg(config, "in_channels"), _latent_frames(size.num_frames, 6),
                     size.height // 8, size.width // 8, dtype=dtype, device=device)
    return {
        "hidden_states": latents,
        "encoder_hidden_states": _randn(generator, batch, text_tokens, _cfg(config, "text_embed_dim"), dtype=dtype,
                                        device=device),
        "timestep": torch.full((batch,), 999, dtype=torch.long, device=device),
        "encoder_attention_mask": _text_mask(batch, text_tokens, masked, device),
    }


# ----------------------------------------------------------------------------------------------- Z-Image
_ZIMAGE_SEQ_MULTI_OF = 32  # transformer_z_image.SEQ_MULTI_OF: the model pads every sequence to a multiple of it


def _zimage_tokens(config: Any, size: Size) -> int:
    """Image tokens (the 2x2 patches of the 8x-downsampled latents). The blocks carry more: the model pads the image
    tokens to a multiple of 32 with a learned pad token, and its main layers run on ``[image | caption]`` (the caption
    padded to a multiple of 32 too), padded to the longest sample."""
    patch = _cfg(config, "all_patch_size")[0]
    return (size.height // 8 // patch) * (size.width // 8 // patch)


def _zimage_inputs(config, batch, size, text_tokens, dtype, device, generator, masked) -> Inputs:
    """Z-Image: per-sample lists, as ``ZImagePipeline`` calls the transformer.

    ``x`` is a list of ``(C, 1, H/8, W/8)`` latents (the pipeline's ``latents.unsqueeze(2).unbind(0)``), ``cap_feats``
    a list of ``(L_i, cap_feat_dim)`` Qwen3 hidden states holding only each prompt's valid tokens (the pipeline drops
    the padding with the tokenizer mask, so there is no mask argument), ``t`` the ``(B,)`` flow time
    ``(1000 - timestep) / 1000`` in ``[0, 1]``. The model pads each caption to a multiple of 32 and builds ``(B, S)``
    boolean key masks itself when the padded lengths differ (CFG batches prompts with negative prompts).
    ``masked=True`` gives the odd samples ``text_tokens + 32`` caption tokens, so the padded lengths differ and the
    caption refiner and main layers run with those masks.
    """
    patch = _cfg(config, "all_patch_size")[0]
    _check_divisible("zimage", size, 8 * patch)
    lengths = [text_tokens + (_ZIMAGE_SEQ_MULTI_OF if masked and i % 2 else 0) for i in range(batch)]
    latents = [_randn(generator, _cfg(config, "in_channels"), 1, size.height // 8, size.width // 8, dtype=dtype,
                      device=device) for _ in range(batch)]
    captions = [_randn(generator, length, _cfg(config, "cap_feat_dim"), dtype=dtype, device=device)
                for length in lengths]
    return {
        "x": latents,
        "t": torch.full((batch,), 0.5, dtype=dtype, device=device),
        "cap_feats": captions,
    }


# ----------------------------------------------------------------------------------------------- Kandinsky 5
def _kandinsky5_tokens(config: Any, size: Size) -> int:
    pt, ph, pw = _cfg(config, "patch_size")
    return _latent_frames(size.num_frames, 4) // pt * (size.height // 8 // ph) * (size.width // 8 // pw)


def _kandinsky5_scale_factor(size: Size) -> tuple[float, float, float]:
    """The rotary position scale ``Kandinsky5T2VPipeline._get_scale_factor`` picks (the T2I pipeline passes 1s)."""
    if size.num_frames == 1:
        return (1.0, 1.0, 1.0)
    return (1, 2, 2) if 480 <= size.height <= 854 and 480 <= size.width <= 854 else (1, 3.16, 3.16)


def _kandinsky5_inputs(config, batch, size, text_tokens, dtype, device, generator, masked) -> Inputs:
    """Kandinsky 5: channels-last latents (B, F', H/8, W/8, C) (``visual_cond`` models concatenate the condition latents
    and a 1-channel mask: 2C + 1), Qwen2.5-VL text states padded to the longest prompt (no mask: the pipelines pass
    none), CLIP pooled states, one float timestep per sample, the rotary positions of the latent grid and text tokens
    and the pipeline's rotary scale. ``sparse_params`` stays ``None`` (the dense ``attention_type="regular"`` path)."""
    _check_divisible("kandinsky5", size, 16)
    pt, ph, pw = _cfg(config, "patch_size")
    frames, height, width = _latent_frames(size.num_frames, 4), size.height // 8, size.width // 8
    channels = _cfg(config, "in_visual_dim")
    if _cfg(config, "visual_cond"):
        channels = 2 * channels + 1
    return {
        "hidden_states": _randn(generator, batch, frames, height, width, channels, dtype=dtype, device=device),
        "encoder_hidden_states": _randn(generator, batch, text_tokens, _cfg(config, "in_text_dim"), dtype=dtype,
                                        device=device),
        "timestep": torch.full((batch,), 999.0, dtype=dtype, device=device),
        "pooled_projections": _randn(generator, batch, _cfg(config, "in_text_dim2"), dtype=dtype, device=device),
        "visual_rope_pos": [torch.arange(n, device=device) for n in (frames // pt, height // ph, width // pw)],
        "text_rope_pos": torch.arange(text_tokens, device=device),
        "scale_factor": _kandinsky5_scale_factor(size),
        "sparse_params": None,
    }


def _reset_zero_init(model: torch.nn.Module) -> None:
    """Kandinsky5Modulation zero-initialises its linear (shift = scale = gate = 0: every block is the identity until
    trained weights load), so random-weight models would test nothing: give it the default nn.Linear init."""
    for module in model.modules():
        if type(module).__name__ == "Kandinsky5Modulation":
            module.out_layer.reset_parameters()


# ----------------------------------------------------------------------------------------------- MiniMax-H3
# The modular pipeline's constants (diffusers/modular_pipelines/minimax_h3/modular_pipeline.py): the video VAE
# compresses 16x spatially and encodes 17 n + 5 frames to 5 n + 2 latent frames; the audio VAE makes 40 latents a
# second of a 24 fps clip, stereo, packed channel-major (one row per channel and latent); modality tags.
_MINIMAX_SPATIAL = 16
_MINIMAX_FPS = 24
_MINIMAX_AUDIO_LATENTS_PER_SECOND = 40
_MINIMAX_AUDIO_CHANNELS = 2
_MINIMAX_VIDEO_TAG, _MINIMAX_TEXT_TAG, _MINIMAX_AUDIO_TAG = 0, 1, 2


def _minimax_latent_frames(num_frames: int) -> int:
    """``video_latent_num_frames``: 5 n + 2 latent frames for 17 n + 5 frames (the pipeline rounds up to that form)."""
    return (num_frames - 5) // 17 * 5 + 2


def _minimax_streams(config: Any, size: Size, text_tokens: int) -> tuple[int, int, int]:
    """``(text rows, audio rows, video rows)`` of the packed sequence."""
    _, ph, pw = _cfg(config, "patch_size")
    video = _minimax_latent_frames(size.num_frames) * (size.height // _MINIMAX_SPATIAL // ph) * (
        size.width // _MINIMAX_SPATIAL // pw)
    audio = round(size.num_frames / _MINIMAX_FPS * _MINIMAX_AUDIO_LATENTS_PER_SECOND) * _MINIMAX_AUDIO_CHANNELS
    return text_tokens, audio, video


def _minimax_h3_tokens(config: Any, size: Size) -> int:
    """The audio + video rows of the packed sequence the blocks run over (the prompt's rows come on top, as text
    tokens do for the joint-attention families)."""
    return sum(_minimax_streams(config, size, 0))


def _minimax_h3_inputs(config, batch, size, text_tokens, dtype, device, generator, masked) -> Inputs:
    """MiniMax-H3 text-to-video+audio (``t2va``), as the modular pipeline's ``MiniMaxH3PrepareLayoutStep`` packs it:
    one sequence ``[text | audio | video]``; patchified video latents (B, N_video, 24 x 1 x 2 x 2), stereo audio
    latents packed channel-major (B, 2 x L_audio, 32), Qwen3-VL hidden states (B, S_text, 5120) (no padding, so no
    mask), and the layout's structural tensors: per-row modality tags, ``(t, h, w)`` rotary coordinates (fp64, as the
    pipeline builds them), row indices of each modality, and ``MiniMaxH3SetTimestepsStep``'s distinct timesteps
    (sorted: audio 0.8, video 0.9; the text rows take the video's) with each row's index into them. Built from
    ``arange`` / ``full`` only (no ``torch.unique``), so it also runs under ``FakeTensorMode``."""
    _check_divisible("minimax_h3", size, _MINIMAX_SPATIAL * _cfg(config, "patch_size")[2])
    text, audio, video = _minimax_streams(config, size, text_tokens)
    _, ph, pw = _cfg(config, "patch_size")
    frames, rows, columns = (_minimax_latent_frames(size.num_frames), size.height // _MINIMAX_SPATIAL // ph,
                             size.width // _MINIMAX_SPATIAL // pw)
    latents = audio // _MINIMAX_AUDIO_CHANNELS
    length = text + audio + video
    f64 = dict(dtype=torch.float64, device=device)
    # Text rows on the time axis at their index; audio and video rows continue the time axis from there. Audio rows
    # have no height and sit at the two extremes of the width grid, one per channel.
    position_ids = torch.cat([
        torch.stack([torch.arange(text, **f64), torch.zeros(text, **f64), torch.zeros(text, **f64)], dim=-1),
        torch.stack([(text + torch.arange(latents, **f64)).repeat(_MINIMAX_AUDIO_CHANNELS), torch.zeros(audio, **f64),
                     torch.cat([torch.zeros(latents, **f64), torch.full((audio - latents,), columns - 1.0, **f64)])],
                    dim=-1),
        torch.stack(torch.meshgrid(text + torch.arange(frames, **f64), torch.arange(rows, **f64),
                                   torch.arange(columns, **f64), indexing="ij"), dim=-1).reshape(video, 3),
    ])
    long = dict(dtype=torch.long, device=device)
    token_tags = torch.cat([torch.full((text,), _MINIMAX_TEXT_TAG, **long), torch.full((audio,), _MINIMAX_AUDIO_TAG,
                            **long), torch.full((video,), _MINIMAX_VIDEO_TAG, **long)])
    timestep_indices = torch.cat([torch.ones(text, **long), torch.zeros(audio, **long), torch.ones(video, **long)])
    return {
        "hidden_states": _randn(generator, batch, video, _cfg(config, "in_channels") * ph * pw, dtype=dtype,
                                device=device),
        "audio_hidden_states": _randn(generator, batch, audio, _cfg(config, "audio_in_channels"), dtype=dtype,
                                      device=device),
        "encoder_hidden_states": _randn(generator, batch, text, _cfg(config, "text_dim"), dtype=dtype, device=device),
        "timestep": torch.tensor([0.8, 0.9], dtype=torch.float32, device=device),
        "timestep_indices": timestep_indices,
        "token_tags": token_tags,
        "position_ids": position_ids,
        "video_indices": torch.arange(text + audio, length, **long),
        "audio_indices": torch.arange(text, text + audio, **long),
        "text_indices": torch.arange(text, **long),
    }


_MINIMAX_TEXT_TOKENS = 256  # a prompt in the Qwen3-VL chat template (the pipeline does not pad it)

_TINY_MINIMAX_H3 = {
    "num_attention_heads": 2, "attention_head_dim": 16, "hidden_size": 32, "num_layers": 2, "num_refiner_layers": 1,
    "ffn_dim": 80, "in_channels": 4, "audio_in_channels": 8, "text_dim": 24, "freq_dim": 16,
    "time_embed_hidden_dim": 32, "time_embed_dim": 16, "rope_freq_dim": 2,  # 2 x 3 x 2 = 12 rotated of 16 channels
}



_HUNYUANIMAGE_REFINER = {"in_channels": 128, "num_attention_heads": 26, "patch_size": (1, 1, 1),
                         "rope_axes_dim": (16, 56, 56), "guidance_embeds": True, "use_meanflow": True}
_TINY_HUNYUANIMAGE = {**_TINY_HEADS, "in_channels": 4, "out_channels": 4, "num_layers": 1, "num_single_layers": 2,
                      "num_refiner_layers": 1, "text_embed_dim": 24, "text_embed_2_dim": 20, "rope_axes_dim": (8, 8)}

FAMILIES: dict[str, FamilySpec] = {
    spec.name: spec
    for spec in [
        FamilySpec(
            name="wan",
            class_name="WanTransformer3DModel",
            configs={
                "full": {},  # class defaults are Wan2.1-T2V-14B
                "1.3b": {"num_attention_heads": 12, "ffn_dim": 8960, "num_layers": 30},
                "tiny": {**_TINY_HEADS, "in_channels": 4, "out_channels": 4, "text_dim": 24, "freq_dim": 16,
                         "ffn_dim": 80, "num_layers": 2, "rope_max_seq_len": 64},
            },
            sizes={"default": Size(720, 1280, 81), "tiny": Size(48, 80, 5)},
            extra_sizes={"480p": Size(480, 832, 81)},
            text_tokens=512,
            make_inputs_fn=_wan_inputs,
            num_tokens_fn=_wan_tokens,
        ),
        FamilySpec(
            name="wan_vace",
            class_name="WanVACETransformer3DModel",
            configs={
                # class defaults are Wan2.1-VACE-14B (40 blocks, VACE layers 0, 5, ..., 35, 96 context channels)
                "full": {},
                "1.3b": {"num_attention_heads": 12, "ffn_dim": 8960, "num_layers": 30,
                         "vace_layers": [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28]},  # Wan2.1-VACE-1.3B
                # Two Wan blocks and one VACE block (layer 0: it has the input projection); the last Wan block is not a
                # VACE layer, as in the releases (a hint added after the last block keeps the output head whole).
                "tiny": {**_TINY_HEADS, "in_channels": 4, "out_channels": 4, "text_dim": 24, "freq_dim": 16,
                         "ffn_dim": 80, "num_layers": 2, "rope_max_seq_len": 64, "vace_layers": [0],
                         "vace_in_channels": 8},
            },
            sizes={"default": Size(720, 1280, 81), "tiny": Size(48, 80, 5)},
            extra_sizes={"480p": Size(480, 832, 81)},  # WanVACEPipeline's default size (and the 1.3B model's)
            text_tokens=512,
            make_inputs_fn=_wan_vace_inputs,
            num_tokens_fn=_wan_tokens,
        ),
        FamilySpec(
            name="chronoedit",
            class_name="ChronoEditTransformer3DModel",
            configs={
                "full": {"in_channels": 36, "image_dim": 1280, "added_kv_proj_dim": 5120},  # ChronoEdit-14B (Wan I2V)
                "tiny": {**_TINY_HEADS, "in_channels": 8, "out_channels": 4, "text_dim": 24, "freq_dim": 16,
                         "ffn_dim": 80, "num_layers": 2, "rope_max_seq_len": 64, "image_dim": 20,
                         "added_kv_proj_dim": 32},
            },
            # An edit is 5 frames (2 latent frames: the input image and the edited one) unless temporal reasoning
            # is on, which generates a short video between them.
            sizes={"default": Size(720, 1280, 5), "tiny": Size(96, 160, 5)},
            extra_sizes={"reasoning": Size(720, 1280, 29)},
            text_tokens=512,
            make_inputs_fn=_wan_inputs,
            num_tokens_fn=_wan_tokens,
        ),
        FamilySpec(
            name="skyreels_v2",
            class_name="SkyReelsV2Transformer3DModel",
            configs={
                # SkyReels-V2-{T2V,DF}-14B-{540P,720P} (Wan2.1-14B sizes; the class defaults are not a release).
                "full": {"num_attention_heads": 40, "ffn_dim": 13824, "num_layers": 40},
                "1.3b": {"num_attention_heads": 12, "ffn_dim": 8960, "num_layers": 30, "inject_sample_info": True},
                "tiny": {**_TINY_HEADS, "in_channels": 4, "out_channels": 4, "text_dim": 24, "freq_dim": 16,
                         "ffn_dim": 80, "num_layers": 2, "rope_max_seq_len": 64},
            },
            sizes={"default": Size(544, 960, 97), "tiny": Size(48, 80, 5)},  # 540P at the DF base_num_frames
            extra_sizes={"720p": Size(720, 1280, 121)},
            text_tokens=512,
            make_inputs_fn=_wan_inputs,  # the T2V / I2V call; diffusion forcing adds per-frame timesteps
            num_tokens_fn=_wan_tokens,
        ),
        FamilySpec(
            name="helios",
            class_name="HeliosTransformer3DModel",
            configs={
                "full": {},  # class defaults are Helios-Base / -Mid / -Distilled (14B, Wan2.1-14B widths)
                "tiny": {**_TINY_HEADS, "in_channels": 4, "out_channels": 4, "text_dim": 24, "freq_dim": 16,
                         "ffn_dim": 80, "num_layers": 2, "rope_dim": (4, 6, 6)},
            },
            # One denoiser call generates a 33-frame window (9 latent frames) at the pipeline's 384x640.
            sizes={"default": Size(384, 640, 33), "tiny": Size(48, 80, 5)},
            text_tokens=512,
            make_inputs_fn=_helios_inputs,
            num_tokens_fn=_helios_tokens,
        ),
        FamilySpec(
            name="flux",
            class_name="FluxTransformer2DModel",
            configs={
                "full": {"guidance_embeds": True},  # FLUX.1-dev
                "tiny": {**_TINY_HEADS, "in_channels": 16, "num_layers": 1, "num_single_layers": 2,
                         "joint_attention_dim": 24, "pooled_projection_dim": 12, "guidance_embeds": True,
                         "axes_dims_rope": (4, 6, 6)},
            },
            sizes={"default": Size(1024, 1024), "tiny": Size(96, 80)},
            text_tokens=512,
            make_inputs_fn=_flux_inputs,
            num_tokens_fn=_flux_tokens,
            video=False,
        ),
        FamilySpec(
            name="flux2",
            class_name="Flux2Transformer2DModel",
            configs={
                "full": {},  # class defaults are FLUX.2-dev (32B: 8 double-stream + 48 single-stream blocks, 48 x 128)
                "tiny": {**_TINY_HEADS, "in_channels": 16, "num_layers": 1, "num_single_layers": 2,
                         "joint_attention_dim": 24, "timestep_guidance_channels": 16, "axes_dims_rope": (4, 4, 4, 4)},
            },
            sizes={"default": Size(1024, 1024), "tiny": Size(96, 80)},
            text_tokens=512,
            make_inputs_fn=_flux2_inputs,
            num_tokens_fn=_flux2_tokens,
            video=False,
        ),
        FamilySpec(
            name="chroma",
            class_name="ChromaTransformer2DModel",
            configs={
                "full": {},  # class defaults are Chroma1-HD (8.9B)
                "tiny": {**_TINY_HEADS, "in_channels": 16, "num_layers": 1, "num_single_layers": 2,
                         "joint_attention_dim": 24, "axes_dims_rope": (4, 6, 6), "approximator_num_channels": 16,
                         "approximator_hidden_dim": 32, "approximator_layers": 2},
            },
            sizes={"default": Size(1024, 1024), "tiny": Size(96, 80)},
            text_tokens=512,
            make_inputs_fn=_chroma_inputs,
            num_tokens_fn=_chroma_tokens,
            video=False,
            mask_key="attention_mask",
        ),
        FamilySpec(
            name="hunyuanvideo",
            class_name="HunyuanVideoTransformer3DModel",
            configs={
                "full": {},  # class defaults are HunyuanVideo (13B)
                "tiny": {**_TINY_HEADS, "in_channels": 4, "out_channels": 4, "num_layers": 1, "num_single_layers": 2,
                         "num_refiner_layers": 1, "text_embed_dim": 24, "pooled_projection_dim": 12,
                         "rope_axes_dim": (4, 6, 6)},
            },
            sizes={"default": Size(720, 1280, 129), "tiny": Size(48, 80, 5)},
            extra_sizes={"544p": Size(544, 960, 129)},
            text_tokens=256,
            make_inputs_fn=_hunyuan_inputs,
            num_tokens_fn=_hunyuan_tokens,
            mask_key="encoder_attention_mask",
        ),
        FamilySpec(
            name="hunyuanvideo15",
            class_name="HunyuanVideo15Transformer3DModel",
            configs={
                "full": {},  # class defaults are HunyuanVideo-1.5 (8.3B, 480p; 720p differs only in target_size)
                "tiny": {**_TINY_HEADS, "in_channels": 4, "out_channels": 4, "num_layers": 2, "num_refiner_layers": 1,
                         "text_embed_dim": 24, "text_embed_2_dim": 20, "image_embed_dim": 12,
                         "rope_axes_dim": (4, 6, 6)},
            },
            sizes={"default": Size(480, 848, 121), "tiny": Size(48, 80, 5)},
            extra_sizes={"720p": Size(720, 1280, 121)},
            text_tokens=1000,
            make_inputs_fn=_hunyuan15_inputs,
            num_tokens_fn=_hunyuan15_tokens,
            mask_key="encoder_attention_mask",
        ),
        FamilySpec(
            name="hunyuanimage",
            class_name="HunyuanImageTransformer2DModel",
            configs={
                # HunyuanImage-2.1 (17B): the class defaults plus the byT5-small glyph encoder's width (d_model 1472)
                "full": {"text_embed_2_dim": 1472},
                "distilled": {"text_embed_2_dim": 1472, "guidance_embeds": True, "use_meanflow": True},
                "refiner": _HUNYUANIMAGE_REFINER,
                "tiny": _TINY_HUNYUANIMAGE,
                "tiny-refiner": {**_TINY_HUNYUANIMAGE, "in_channels": 8, "patch_size": (1, 1, 1),
                                 "rope_axes_dim": (4, 6, 6), "text_embed_2_dim": None, "guidance_embeds": True,
                                 "use_meanflow": True},
            },
            sizes={"default": Size(2048, 2048), "tiny": Size(160, 224)},
            text_tokens=1000,
            make_inputs_fn=_hunyuanimage_inputs,
            num_tokens_fn=_hunyuanimage_tokens,
            video=False,
            mask_key="encoder_attention_mask",
        ),
        FamilySpec(
            name="cogvideox",
            class_name="CogVideoXTransformer3DModel",
            configs={
                "full": {},  # class defaults are CogVideoX-2B
                "5b": {"num_attention_heads": 48, "num_layers": 42, "use_rotary_positional_embeddings": False},
                "tiny": {**_TINY_HEADS, "in_channels": 4, "out_channels": 4, "time_embed_dim": 16, "text_embed_dim": 24,
                         "num_layers": 2, "sample_width": 10, "sample_height": 6, "sample_frames": 5,
                         "max_text_seq_length": 8},
            },
            sizes={"default": Size(480, 720, 49), "tiny": Size(48, 80, 5)},
            text_tokens=226,
            make_inputs_fn=_cogvideox_inputs,
            num_tokens_fn=_cogvideox_tokens,
        ),
        FamilySpec(
            name="cogview4",
            class_name="CogView4Transformer2DModel",
            configs={
                # THUDM/CogView4-6B transformer/config.json (the class defaults are a 64 x 40, 30-layer variant).
                "full": {"num_attention_heads": 32, "attention_head_dim": 128, "num_layers": 28},
                "tiny": {**_TINY_HEADS, "in_channels": 4, "out_channels": 4, "num_layers": 2, "text_embed_dim": 24,
                         "time_embed_dim": 16, "condition_dim": 8},
            },
            sizes={"default": Size(1024, 1024), "tiny": Size(96, 80)},
            text_tokens=224,  # the pipeline pads the prompt to a multiple of 16; 224 is its documented default
            make_inputs_fn=_cogview4_inputs,
            num_tokens_fn=_cogview4_tokens,
            video=False,
        ),
        FamilySpec(
            name="ltx",
            class_name="LTXVideoTransformer3DModel",
            configs={
                "full": {},  # class defaults are LTX-Video 0.9 (2B)
                "tiny": {**_TINY_HEADS, "in_channels": 8, "out_channels": 8, "cross_attention_dim": 32,
                         "num_layers": 2, "caption_channels": 24},
            },
            sizes={"default": Size(512, 704, 161), "tiny": Size(96, 160, 9)},
            text_tokens=128,
            make_inputs_fn=_ltx_inputs,
            num_tokens_fn=_ltx_tokens,
            mask_key="encoder_attention_mask",
        ),
        FamilySpec(
            name="ltx2",
            class_name="LTX2VideoTransformer3DModel",
            configs={
                "full": {"rope_type": "split"},  # LTX-2 (19B): the class defaults but for the split rotary layout
                "2.3": _LTX23,  # LTX-2.3 (22B)
                "tiny": _TINY_LTX2,
                "tiny-2.3": {**_TINY_LTX2, **_LTX23},
            },
            # pipeline_ltx2 defaults: 512 x 768, 121 frames at 24 fps (6144 video tokens, 126 audio tokens)
            sizes={"default": Size(512, 768, 121), "tiny": Size(96, 160, 17)},
            text_tokens=1024,  # the connectors' output length (max_sequence_length)
            make_inputs_fn=_ltx2_inputs,
            num_tokens_fn=_ltx2_tokens,
            mask_key="encoder_attention_mask",
        ),
        FamilySpec(
            name="qwenimage",
            class_name="QwenImageTransformer2DModel",
            configs={
                "full": {},  # class defaults are Qwen-Image (20B)
                "tiny": {**_TINY_HEADS, "in_channels": 16, "out_channels": 4, "num_layers": 2,
                         "joint_attention_dim": 24, "axes_dims_rope": (4, 6, 6)},
            },
            sizes={"default": Size(1328, 1328), "tiny": Size(96, 80)},
            text_tokens=256,
            make_inputs_fn=_qwenimage_inputs,
            num_tokens_fn=_qwenimage_tokens,
            mask_key="encoder_hidden_states_mask",
            video=False,
        ),
        FamilySpec(
            name="sd3",
            class_name="SD3Transformer2DModel",
            configs={
                "full": {"num_layers": 24, "num_attention_heads": 24, "caption_projection_dim": 1536,
                         "pos_embed_max_size": 192},  # SD3-medium
                "tiny": {**_TINY_HEADS, "sample_size": 16, "in_channels": 4, "out_channels": 4, "num_layers": 2,
                         "joint_attention_dim": 24, "caption_projection_dim": 32, "pooled_projection_dim": 12,
                         "pos_embed_max_size": 16},
            },
            sizes={"default": Size(1024, 1024), "tiny": Size(96, 80)},
            text_tokens=333,
            make_inputs_fn=_sd3_inputs,
            num_tokens_fn=_sd3_tokens,
            video=False,
        ),
        FamilySpec(
            name="mochi",
            class_name="MochiTransformer3DModel",
            configs={
                "full": {},  # class defaults are Mochi-1 (10B)
                "tiny": {**_TINY_HEADS, "in_channels": 4, "num_layers": 2, "pooled_projection_dim": 16,
                         "text_embed_dim": 24, "time_embed_dim": 16, "max_sequence_length": 8},
            },
            sizes={"default": Size(480, 848, 163), "tiny": Size(48, 80, 13)},
            text_tokens=256,
            make_inputs_fn=_mochi_inputs,
            num_tokens_fn=_mochi_tokens,
            mask_key="encoder_attention_mask",
        ),
        FamilySpec(
            name="zimage",
            class_name="ZImageTransformer2DModel",
            configs={
                # Tongyi-MAI/Z-Image-Turbo (and Z-Image) transformer/config.json: the class defaults (dim 3840, 30
                # layers, 2 noise- and 2 context-refiner layers, 30 heads, Qwen3-4B captions of width 2560).
                "full": {},
                "tiny": {"dim": 32, "n_heads": 2, "n_kv_heads": 2, "n_layers": 2, "n_refiner_layers": 1,
                         "in_channels": 4, "cap_feat_dim": 24, "axes_dims": [4, 6, 6], "axes_lens": [256, 64, 64]},
            },
            sizes={"default": Size(1024, 1024), "tiny": Size(48, 80)},
            text_tokens=512,  # the pipeline's max_sequence_length, an upper bound: only valid tokens are passed
            make_inputs_fn=_zimage_inputs,
            num_tokens_fn=_zimage_tokens,
            video=False,
            width_keys=("dim",),
        ),
        FamilySpec(
            name="kandinsky5",
            class_name="Kandinsky5Transformer3DModel",
            configs={
                # Kandinsky-5.0-T2V-Lite-sft-5s-Diffusers (2B): 32 visual blocks of width 1792 (28 heads x 64), 2
                # text blocks, HunyuanVideo VAE latents (16 channels) with the visual-conditioning channels.
                "full": {"in_visual_dim": 16, "out_visual_dim": 16, "model_dim": 1792, "ff_dim": 7168,
                         "visual_cond": True},
                "tiny": {"in_visual_dim": 4, "out_visual_dim": 4, "in_text_dim": 24, "in_text_dim2": 20,
                         "time_dim": 16, "model_dim": 32, "ff_dim": 80, "num_text_blocks": 1, "num_visual_blocks": 2,
                         "axes_dims": (4, 4, 8), "visual_cond": True},  # 2 heads x 16
            },
            # Kandinsky5T2VPipeline's default: 512 x 768, 121 frames (5 s at 24 fps).
            sizes={"default": Size(512, 768, 121), "tiny": Size(48, 80, 5)},
            extra_sizes={"10s": Size(512, 768, 241)},
            text_tokens=256,
            make_inputs_fn=_kandinsky5_inputs,
            num_tokens_fn=_kandinsky5_tokens,
            width_keys=("model_dim",),
            init_fn=_reset_zero_init,
        ),
        FamilySpec(
            name="minimax_h3",
            class_name="MiniMaxH3Transformer3DModel",
            configs={
                "full": {},  # class defaults: the released MiniMax-H3 (50 blocks, hidden 5376, 56 x 128 heads)
                "tiny": _TINY_MINIMAX_H3,
            },
            # The pipeline's defaults: 124 frames (5.2 s at 24 fps) on its 16:9 canvas, 768 x 1344 (37 296 video rows,
            # 414 audio rows, plus the prompt's).
            sizes={"default": Size(768, 1344, 124), "tiny": Size(96, 96, 22)},
            text_tokens=_MINIMAX_TEXT_TOKENS,
            make_inputs_fn=_minimax_h3_inputs,
            num_tokens_fn=_minimax_h3_tokens,
            width_keys=("hidden_size",),  # the residual stream; heads x head_dim (7168) is wider
        ),
        FamilySpec(
            name="qwenimage21",
            class_name="QwenImage21Transformer2DModel",
            configs={
                "full": {},  # class defaults are Qwen-Image 2.1 (32 single-stream layers, 32 x 128, SwiGLU 3x)
                "tiny": {"num_attention_heads": 2, "attention_head_dim": 16, "in_channels": 16, "out_channels": 16,
                         "num_layers": 2, "context_in_dim": 24, "axes_dims_rope": (4, 6, 6)},
            },
            sizes={"default": Size(1024, 1024), "tiny": Size(64, 96)},  # pipeline's output_resolution=1024
            text_tokens=256,
            make_inputs_fn=_qwenimage21_inputs,
            num_tokens_fn=_qwenimage21_tokens,
            mask_key="encoder_hidden_states_mask",
            video=False,
        ),
        FamilySpec(
            name="flux3",
            class_name="Flux3Transformer2DModel",
            configs={
                # class defaults are FLUX.3 (5 per-mode + 28 joint single blocks, 24 x 128; the distilled
                # checkpoints add flow_map=True)
                "full": {},
                "tiny": {**_TINY_HEADS, "in_channels": 16, "cond_in_channels": 16, "num_layers": 1,
                         "num_single_layers": 2, "joint_attention_dim": 24, "timestep_channels": 16,
                         "axes_dims_rope": (4, 4, 4, 4)},
            },
            sizes={"default": Size(1024, 1024), "tiny": Size(96, 80)},
            text_tokens=480,  # the prompt window is padded to a multiple of 80 tokens (Flux3TextEncoderStep)
            make_inputs_fn=_flux3_inputs,
            num_tokens_fn=_flux3_tokens,
            video=False,
        ),
        FamilySpec(
            name="auraflow",
            class_name="AuraFlowTransformer2DModel",
            configs={
                # fal/AuraFlow-v0.3 transformer/config.json: the class defaults (4 MMDiT + 32 single DiT blocks, 12 x
                # 256 = 3072, Pile-T5 width 2048) except pos_embed_max_size 9216 (a 96 x 96 learned-position grid; v0.3
                # centres the latent's patch grid in it for any aspect ratio up to 1536 px a side).
                "full": {"pos_embed_max_size": 9216},
                # caption_projection_dim must equal the width (the text stream enters the blocks at it).
                "tiny": {**_TINY_HEADS, "num_mmdit_layers": 1, "num_single_dit_layers": 2, "joint_attention_dim": 24,
                         "caption_projection_dim": 32, "sample_size": 16, "pos_embed_max_size": 64},
            },
            sizes={"default": Size(1024, 1024), "tiny": Size(80, 112)},
            text_tokens=256,  # the pipeline's max_sequence_length; the model prepends 8 register tokens
            make_inputs_fn=_auraflow_inputs,
            num_tokens_fn=_auraflow_tokens,
            video=False,
            init_fn=_auraflow_init,
        ),
        FamilySpec(
            name="pixart",
            class_name="PixArtTransformer2DModel",
            configs={
                # PixArt-alpha/PixArt-Sigma-XL-2-1024-MS transformer/config.json (0.6B: 28 blocks, 16 x 72, T5-XXL
                # captions; scripts/convert_pixart_sigma_to_diffusers.py: interpolation_scale 2 at 1024 px, no
                # micro-conditions). The other values are the class defaults.
                "full": {"caption_channels": 4096, "interpolation_scale": 2, "use_additional_conditions": False},
                # PixArt-alpha/PixArt-XL-2-1024-MS: the same blocks; sample_size 128 turns the micro-conditions on.
                "alpha": {"caption_channels": 4096},
                # cross_attention_dim must be the width (the caption projection maps the text to it); micro-conditions
                # need a width divisible by 3, so the tiny config runs PixArt-Sigma's path.
                "tiny": {**_TINY_HEADS, "in_channels": 4, "out_channels": 8, "num_layers": 2, "cross_attention_dim": 32,
                         "caption_channels": 24, "sample_size": 16},
            },
            sizes={"default": Size(1024, 1024), "tiny": Size(96, 80)},
            text_tokens=300,  # PixArtSigmaPipeline's max_sequence_length (PixArt-Alpha: 120)
            make_inputs_fn=_pixart_inputs,
            num_tokens_fn=_pixart_tokens,
            video=False,
            mask_key="encoder_attention_mask",
        ),
        FamilySpec(
            name="bria",
            class_name="BriaTransformer2DModel",
            configs={
                # BRIA-3.2 transformer/config.json (4B: 8 double-stream + 28 single-stream blocks, 24 x 96)
                "full": {"in_channels": 16, "num_layers": 8, "num_single_layers": 28, "attention_head_dim": 96,
                         "num_attention_heads": 24, "joint_attention_dim": 4096, "axes_dims_rope": (0, 48, 48)},
                "tiny": {**_TINY_HEADS, "in_channels": 16, "num_layers": 1, "num_single_layers": 2,
                         "joint_attention_dim": 24, "axes_dims_rope": (4, 6, 6)},
            },
            sizes={"default": Size(1024, 1024), "tiny": Size(96, 80)},
            text_tokens=128,  # BriaPipeline's max_sequence_length
            make_inputs_fn=_bria_inputs,
            num_tokens_fn=_bria_tokens,
            video=False,
        ),
        FamilySpec(
            name="framepack",
            class_name="HunyuanVideoFramepackTransformer3DModel",
            configs={
                # lllyasviel/FramePackI2V_HY (and FramePack_F1_I2V_HY) transformer config: HunyuanVideo's 13B widths (20
                # dual-stream + 40 single-stream blocks, 24 x 128) with the SigLIP image projection and the history
                # embedder; the class defaults but for those two switches.
                "full": {"has_image_proj": True, "image_proj_dim": 1152, "has_clean_x_embedder": True},
                "tiny": {**_TINY_HEADS, "in_channels": 4, "out_channels": 4, "num_layers": 1, "num_single_layers": 2,
                         "num_refiner_layers": 1, "text_embed_dim": 24, "pooled_projection_dim": 12,
                         "rope_axes_dim": (4, 6, 6), "has_image_proj": True, "image_proj_dim": 20,
                         "has_clean_x_embedder": True},
            },
            # The pipeline's default size (720 x 1280) for one window of latent_window_size 9 (33 frames): 32 400 window
            # tokens + 9 080 history tokens. "480p" is the pipeline docs' example (832 x 480, FramePack's 640 bucket).
            sizes={"default": Size(720, 1280, 33), "tiny": Size(48, 80, 9)},
            extra_sizes={"480p": Size(832, 480, 33)},
            text_tokens=256,  # max_sequence_length (+ the 729 SigLIP tokens the model puts in front of them)
            make_inputs_fn=_framepack_inputs,
            num_tokens_fn=_framepack_tokens,
            mask_key="encoder_attention_mask",
        ),
        FamilySpec(
            name="wan_animate",
            class_name="WanAnimateTransformer3DModel",
            configs={
                # Wan2.2-Animate-14B: the class defaults (Wan2.1-14B widths, 40 blocks, face adapter every 5th block,
                # 512 px motion encoder) with the I2V image-token K/V projections.
                "full": {"added_kv_proj_dim": 5120},
                "tiny": _TINY_WAN_ANIMATE,
            },
            # WanAnimatePipeline's defaults: 720 x 1280, segments of 77 frames (20 latent frames + the reference frame).
            sizes={"default": Size(720, 1280, 77), "tiny": Size(48, 80, 5)},
            text_tokens=512,
            make_inputs_fn=_wan_animate_inputs,
            num_tokens_fn=_wan_animate_tokens,
            init_fn=_wan_animate_init,
        ),
    ]
}


def get_family(name_or_model: str | torch.nn.Module) -> FamilySpec:
    """The :class:`FamilySpec` for a family name or a model instance (matched by its class name)."""
    if isinstance(name_or_model, torch.nn.Module):
        cls_name = type(name_or_model).__name__
        for spec in FAMILIES.values():
            if spec.class_name == cls_name:
                return spec
        raise ValueError(f"{cls_name} is not a family memopt knows; known classes: "
                         f"{sorted(s.class_name for s in FAMILIES.values())}")
    key = name_or_model.lower()
    if key not in FAMILIES:
        raise ValueError(f"unknown model family {name_or_model!r}; choose from {sorted(FAMILIES)}")
    return FAMILIES[key]
