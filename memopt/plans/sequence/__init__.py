"""Sequence plans: where each family's transformer blocks cut their inputs into chunks, and which attention calls
need every chunk's keys and values.

This is memopt's counterpart of diffusers' ``_cp_plan`` (``models/_modeling_parallel.py``), one level down. A
``_cp_plan`` splits the *model's* inputs once and lets ring/Ulysses attention exchange K/V between GPUs inside every
block. Sequential context parallelism runs the N "ranks" one after another on one device, so the exchange has to
happen block by block: each block is split on entry and gathered on exit, and the plan therefore names *block*
inputs. The entries keep the ``_cp_plan`` shape (argument name -> split dim + expected number of dims, a tuple of
them for tuple arguments such as ``(cos, sin)`` rotary embeddings), and where a model has a ``_cp_plan`` the split
dims are the ones it declares (Wan ``rope`` dim 1 of 4, LTX ``rope`` dim 1 of 3, QwenImage ``pos_embed`` dim 0 of 2,
Flux ``img_ids``/``txt_ids`` dim 0, QwenImage ``modulate_index`` / ``encoder_hidden_states_mask`` dim 1 of 2, Wan
per-token ``timestep`` dim 1); ``tests/hooks/test_sequence.py`` checks that they agree. HunyuanVideo (1.0, 1.5),
HunyuanImage 2.1, CogVideoX, CogView4, SD3, Mochi, Chroma, SkyReels-V2 and Wan VACE have no ``_cp_plan`` in diffusers
0.42; their plans here are memopt's. Block classes missing from diffusers' ``TransformerBlockRegistry`` (ChronoEdit's
copy of ``WanTransformerBlock``, and others) get their layout from ``BlockPlan.metadata``.

The plans are data, one module per family lineage (as :mod:`memopt.models`): ``wan``, ``flux``, ``hunyuan``,
``cogview``, ``ltx``, ``qwenimage``, ``sd3``, ``mochi``, ``zimage``, ``kandinsky``, ``minimax``, ``auraflow``,
``pixart``, ``easyanimate``, ``cosmos``, ``motif``, ``krea``, ``hidream``, ``ernie``, ``joyimage``, ``prx``,
``ideogram``, ``omnigen``, ``nucleus``, each a ``PLANS`` dict; ``_vocabulary`` holds the dataclasses they are made
of (below) and the pieces several lineages share.

Vocabulary:

* **streams**: the token sequences a block carries. ``"image"`` (the latent tokens, always split) and, in joint
  (MMDiT) blocks, ``"text"`` (the encoder tokens that share the attention). A block's stream lengths are read from
  its ``hidden_states`` / ``encoder_hidden_states`` arguments (names from diffusers' ``TransformerBlockRegistry``).
  The text stream is split like the image stream when every chunk gets at least one text token and the plan allows
  it; otherwise every chunk carries the whole text (computed redundantly, taken once).
* **segments**: what one dim of a block input is made of, in order. Flux's rotary table covers
  ``("text", "image")``; HunyuanVideo's attention mask covers ``("image", "text")``; a chunk gets its piece of each
  segment, concatenated.
* **joint attention**: an attention module whose kernel call attends over the whole sequence (self-attention, or
  MMDiT joint attention); ``order`` is how the streams sit in its key sequence. Every other attention call in the
  block (cross-attention to text or image-prompt tokens) stays chunk-local.
* **routing**: an expert-choice MoE layer (Nucleus-Image's) chooses its tokens among the whole sequence, so its
  router scores are exchanged too, in a pass after the K/V's (``BlockPlan.routed``).
* **tail / gather / embed / producers**: the model-level parts (:class:`SequencePlan`): where the output head starts,
  where its chunks are gathered (the ``ContextParallelOutput`` entries of the model's ``_cp_plan`` when it has one),
  which module embeds the image tokens, and which per-token tables (or per-sample tables the model expands over
  the tokens) are computed per chunk.
"""

from __future__ import annotations

import torch

from . import (
    auraflow,
    cogview,
    cosmos,
    easyanimate,
    ernie,
    flux,
    hidream,
    hunyuan,
    ideogram,
    joyimage,
    kandinsky,
    krea,
    ltx,
    minimax,
    mochi,
    motif,
    nucleus,
    omnigen,
    pixart,
    prx,
    qwenimage,
    sd3,
    wan,
    zimage,
)
from ._vocabulary import (
    FUSED_ROLES,
    STREAMS,
    BlockPlan,
    BroadcastTable,
    ChunkValue,
    JointAttention,
    ProducerCall,
    SequencePlan,
    SequenceSplit,
    SplitSpec,
    TokenCount,
    TokenProducer,
    TokenRanges,
)

__all__ = ["FUSED_ROLES", "SEQUENCE_PLANS", "STREAMS", "BlockPlan", "BroadcastTable", "ChunkValue", "JointAttention",
           "ProducerCall", "SequencePlan", "SequenceSplit", "SplitSpec", "TokenCount", "TokenProducer", "TokenRanges",
           "sequence_plan"]

_FAMILY_PLANS = [module.PLANS for module in (wan, flux, hunyuan, cogview, ltx, qwenimage, sd3, mochi, zimage, kandinsky,
                                               minimax, auraflow, pixart, easyanimate, cosmos, motif, krea,
                                               hidream, ernie, joyimage, prx, ideogram, omnigen, nucleus)]
SEQUENCE_PLANS: dict[str, SequencePlan] = {name: plan for plans in _FAMILY_PLANS for name, plan in plans.items()}
"""Model class name -> :class:`SequencePlan` for the families memopt supports."""
assert len(SEQUENCE_PLANS) == sum(map(len, _FAMILY_PLANS)), "two family modules define a plan for the same class"


def sequence_plan(model: torch.nn.Module) -> SequencePlan:
    """The :class:`SequencePlan` for ``model``'s class, or a ``ValueError`` naming the supported classes."""
    name = type(model).__name__
    if name not in SEQUENCE_PLANS:
        raise ValueError(
            f"memopt has no sequence plan for {name}; supported: {sorted(SEQUENCE_PLANS)}, and Sana's "
            "SanaTransformer2DModel, SanaVideoTransformer3DModel and SanaControlNetModel, whose blocks stream. Pass "
            "plan=SequencePlan(...) to apply_sequence_chunking for other models."
        )
    return SEQUENCE_PLANS[name]
