"""Split plans as data: which modules memopt shards and how, in the shape of diffusers' ``_tp_plan``."""

from .feedforward import (
    FEEDFORWARD_PLANS,
    FEEDFORWARD_UNITS,
    FeedForwardLayout,
    UnsupportedFeedForward,
    expand_plan,
    feedforward_layout,
    feedforward_plan,
    unit_plan,
)

__all__ = [
    "FEEDFORWARD_PLANS",
    "FEEDFORWARD_UNITS",
    "FeedForwardLayout",
    "UnsupportedFeedForward",
    "expand_plan",
    "feedforward_layout",
    "feedforward_plan",
    "unit_plan",
]
