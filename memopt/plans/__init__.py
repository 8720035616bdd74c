"""Split plans as data: which modules memopt shards and how, in the shape of diffusers' ``_tp_plan``."""

from .experts import EXPERT_CHOICE_LAYERS, ExpertChoiceLayout, Routing
from .feedforward import (
    CONV_FEEDFORWARD_UNITS,
    FEEDFORWARD_PLANS,
    FEEDFORWARD_UNITS,
    ConvFeedForwardLayout,
    FeedForwardLayout,
    UnsupportedFeedForward,
    expand_plan,
    feedforward_layout,
    feedforward_plan,
    unit_plan,
)

__all__ = [
    "CONV_FEEDFORWARD_UNITS",
    "EXPERT_CHOICE_LAYERS",
    "FEEDFORWARD_PLANS",
    "FEEDFORWARD_UNITS",
    "ConvFeedForwardLayout",
    "ExpertChoiceLayout",
    "FeedForwardLayout",
    "Routing",
    "UnsupportedFeedForward",
    "expand_plan",
    "feedforward_layout",
    "feedforward_plan",
    "unit_plan",
]
