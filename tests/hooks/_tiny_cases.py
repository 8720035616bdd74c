"""Tiny sizes shared by the hook tests: token counts (70 / 35 / 45) not divisible by the chunk counts they use."""

import dataclasses
from typing import Any

import torch
from diffusers.hooks import ModelHook

from memopt.models import Size

FAMILIES = ["wan", "wan_vace", "chronoedit", "skyreels_v2", "helios", "flux", "flux2", "chroma", "hunyuanvideo",
            "hunyuanvideo_i2v", "hunyuanvideo15", "hunyuanimage", "cogvideox", "cogview4", "ltx", "ltx2", "qwenimage",
            "sd3", "mochi", "zimage", "kandinsky5", "minimax_h3", "qwenimage21", "flux3",
            "auraflow", "pixart", "bria", "framepack", "wan_animate",
            "allegro", "easyanimate", "longcat_image", "ovis_image", "consisid", "cosmos", "motif_video", "krea2",
            "hidream", "ernie_image", "lumina2", "cogview3plus", "latte", "kandinsky6", "joyimage_edit",
            "joyimage_edit_plus", "bria_fibo", "bria_fibo2", "anyflow", "glm_image", "prx", "hunyuandit", "dit",
            "ideogram4", "cosmos3_omni", "omnigen"]
SIZES = {
    "wan": Size(80, 112, 5),
    "wan_vace": Size(80, 112, 9),
    "chronoedit": Size(80, 112, 5),
    "skyreels_v2": Size(80, 112, 9),
    "helios": Size(48, 80, 9),
    "flux": Size(80, 112),
    "flux2": Size(80, 112),
    "chroma": Size(80, 112),
    "hunyuanvideo": Size(80, 112, 5),
    "hunyuanvideo_i2v": Size(80, 112, 5),  # 35 of the 70 tokens are the first frame's
    "hunyuanvideo15": Size(80, 112, 9),
    "hunyuanimage": Size(160, 224),
    "cogvideox": Size(80, 112, 5),
    "cogview4": Size(80, 112),
    "glm_image": Size(80, 112),  # 35 image + 8 glyph tokens
    "prx": Size(80, 112),  # 35 image tokens; 8 text tokens as keys only
    "hunyuandit": Size(80, 112),  # 35 image tokens; 4 blocks, block 3 takes block 0's output
    "dit": Size(112, 112),  # 7 x 7 = 49 image tokens (DiT generates square images)
    "ltx": Size(160, 224, 9),
    "ltx2": Size(96, 160, 17),
    "qwenimage": Size(80, 112),
    "sd3": Size(80, 112),
    "mochi": Size(48, 80, 13),
    "kandinsky5": Size(48, 80, 9),  # 3 latent frames x 3 x 5 = 45 tokens
    "minimax_h3": Size(96, 96, 22),  # 8 text + 74 audio + 63 video = 145 packed rows
    "qwenimage21": Size(64, 96),  # 8 text + 2 x 4 condition-image + 1 marker + 24 target = 41 joint tokens
    "flux3": Size(80, 112),
    "pixart": Size(80, 112),
    "allegro": Size(48, 80, 9),  # 3 latent frames x 3 x 5 = 45 tokens
    "longcat_image": Size(80, 112),  # 35 image tokens (+ 8 text in the single-stream blocks)
    "ovis_image": Size(80, 112),
    "consisid": Size(48, 80, 9),  # 45 video tokens (+ 8 text), 3 face tokens
    "easyanimate": Size(48, 80, 9),  # 45 video tokens (+ 8 text in the joint attention)
    "cosmos": Size(48, 80, 9),  # 3 latent frames x 3 x 5 = 45 tokens
    "motif_video": Size(48, 80, 9),  # 45 video + 8 text tokens
    "ernie_image": Size(80, 112),  # 35 image + 8 text tokens, sequence-first
    "lumina2": Size(80, 112),  # 35 image tokens; the joint blocks add each sample's valid caption tokens
    "cogview3plus": Size(80, 112),  # 35 image + 8 text tokens
    "latte": Size(80, 112, 3),  # 3 frames x 35 positions = 105 tokens (one latent frame per frame)
    "hidream": Size(80, 112),  # 35 image tokens padded by the model to 63 (a key mask), + 3 x 8 text tokens
    "krea2": Size(80, 112),  # 35 image + 8 text tokens in the blocks; 8 text tokens x 3 tapped layers in the fusion
    "wan_animate": Size(48, 80, 5),  # 3 latent frames (2 + the reference) x 3 x 5 = 45 tokens
    "framepack": Size(48, 80, 9),  # 45 window + 30 clean + 6 (2x) + 8 (4x) history tokens = 89
    "bria": Size(80, 112),  # 35 image tokens (+ 8 text in the single-stream blocks)
    "auraflow": Size(80, 112),  # 35 image tokens; the single blocks carry 8 register + 8 text + 35 = 51
    "zimage": Size(80, 112),  # 35 image tokens, padded to 64 by the model itself (every sequence to a multiple of 32)
    "kandinsky6": Size(48, 80, 9),  # 3 latent frames x 3 x 5 = 45 video tokens + 17 audio tokens
    "joyimage_edit": Size(80, 112),  # 35 image + 8 text tokens
    "joyimage_edit_plus": Size(80, 112),  # target 5 x 7 + reference 5 x 6 = 65 image tokens + 8 text
    "bria_fibo": Size(80, 112),  # 35 image + 8 text tokens
    "bria_fibo2": Size(80, 112),  # 35 image tokens + 4 gist tokens (8 text tokens) in the main layers
    "anyflow": Size(48, 80, 9),  # 3 latent frames x 3 x 5 = 45 tokens
    "ideogram4": Size(80, 112),  # 8 text slots + 35 image tokens in one packed sequence
    "omnigen": Size(80, 112),  # 8 text tokens + the time token + 35 image tokens
    "cosmos3_omni": Size(80, 80, 21),  # 8 text tokens + 6 latent frames of 3 x 3 patches (odd latents padded): 54
}


# Families whose plan runs the output head whole (reported as skipped): Latte's last block is a temporal one, whose
# output the model reshapes back to frames and modulates with a table made from the whole frame count. Ideogram 4's
# head chunked would keep its text-feature norm's wide output for the replayed model passes. Cosmos 3 Omni's forward
# concatenates both pathways' outputs and reads the predicted tokens by index before its heads. OmniGen normalizes
# every token before keeping the image ones (not planned as a tail yet).
HEAD_RUNS_WHOLE = {"latte", "ideogram4", "cosmos3_omni", "omnigen"}


def chunked_completely(report: Any, family: str) -> bool:
    """The report lists blocks and exchanged attentions and the output head in chunks, nothing skipped; or, for
    :data:`HEAD_RUNS_WHOLE`, exactly the head reported as running whole."""
    if family in HEAD_RUNS_WHOLE:
        head = report.tail is None and [reason for _, reason in report.skipped] == [
            "output head runs whole (tail None, gather [])"]
        return bool(report.blocks and report.attention and head)
    return bool(report.blocks and report.attention and report.tail and not report.skipped)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out - ref).norm() / ref.norm()).item()


LATENT_KEYS = ("hidden_states", "x", "vision_tokens")
"""Where the families' forwards take their latents: most as ``hidden_states``, the Z-Image lineage as ``x`` and Cosmos 3
Omni as ``vision_tokens`` (both lists of per-sample tensors)."""


def latent_key(inputs: dict) -> str:
    return next(key for key in LATENT_KEYS if key in inputs)


def prediction(result: Any) -> torch.Tensor:
    """The prediction of a ``return_dict=False`` call as one tensor: the first element of the returned tuple, where
    Z-Image puts a list with one tensor per sample, or the tensor itself (Kandinsky 5 returns it bare)."""
    if isinstance(result, torch.Tensor):
        return result
    out = result[0]
    return torch.stack(out) if isinstance(out, list) else out


def with_attention_spec(plan: Any, pattern: str, name: str, **changes: Any) -> Any:
    """``plan`` (a ``SequencePlan``) with the ``JointAttention`` ``name`` of its block pattern ``pattern`` changed."""
    block = plan.blocks[pattern]
    attention = {**block.attention, name: dataclasses.replace(block.attention[name], **changes)}
    return dataclasses.replace(plan, blocks={**plan.blocks, pattern: dataclasses.replace(block, attention=attention)})


def sana(name: str, batch_size: int = 2) -> tuple[torch.nn.Module, dict]:
    """Sana (RMS-normed queries and keys, as Sana 1.5) or Sana Video at odd token counts, every weight random."""
    from diffusers import SanaTransformer2DModel, SanaVideoTransformer3DModel

    torch.manual_seed(0)
    common = dict(in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=4,
                  num_cross_attention_heads=4, cross_attention_head_dim=8, cross_attention_dim=32,
                  caption_channels=16, sample_size=16, qk_norm="rms_norm_across_heads")
    if name == "sana":
        model, latents = SanaTransformer2DModel(patch_size=1, **common), torch.randn(batch_size, 4, 9, 7)
    else:
        model = SanaVideoTransformer3DModel(patch_size=(1, 2, 2), rope_max_seq_len=32, **common)
        latents = torch.randn(batch_size, 4, 3, 10, 6)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.1)
    return model.eval(), dict(hidden_states=latents, encoder_hidden_states=torch.randn(batch_size, 7, 16),
                              timestep=torch.tensor([3, 500][:batch_size]), return_dict=False)


class OffloadLike(ModelHook):
    """Mimics diffusers group offloading on CPU: parameters hold NaNs except between pre_forward and post_forward,
    where ``param.data`` is swapped to the real values."""

    def __init__(self):
        super().__init__()
        self.stored: dict[torch.nn.Parameter, torch.Tensor] = {}

    def initialize_hook(self, module):
        for param in module.parameters():
            self.stored[param] = param.data
            param.data = torch.full_like(param.data, float("nan"))
        return module

    def pre_forward(self, module, *args, **kwargs):
        for param, data in self.stored.items():
            param.data = data
        return args, kwargs

    def post_forward(self, module, output):
        for param, data in self.stored.items():
            param.data = torch.full_like(data, float("nan"))
        return output
