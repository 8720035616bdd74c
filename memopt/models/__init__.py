"""Model zoo: the diffusers transformer families memopt supports, as data (one module per family lineage).

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
    omnigen,
    pixart,
    prx,
    qwenimage,
    sana,
    sd3,
    wan,
    zimage,
)
from ._spec import TINY_WIDTH, FamilySpec, Inputs, Size, cast_floating_
from .flux import flux3_reference_inputs

__all__ = ["FAMILIES", "TINY_WIDTH", "FamilySpec", "Inputs", "Size", "cast_floating_", "flux3_reference_inputs",
           "get_family"]

FAMILIES: dict[str, FamilySpec] = {
    spec.name: spec
    for module in (wan, flux, hunyuan, cogview, ltx, qwenimage, sd3, mochi, zimage, kandinsky, minimax, auraflow,
                   pixart, easyanimate, cosmos, motif, krea, hidream, ernie, joyimage, prx, sana, ideogram,
                   omnigen)
    for spec in module.SPECS
}
"""Family name -> :class:`FamilySpec`, for every family memopt chunks whole blocks of: a plan in
:mod:`memopt.plans`, or (Sana, Sana Video) streamed blocks."""


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
