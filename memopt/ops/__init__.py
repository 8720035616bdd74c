"""Tensor-level operations (no modules, no hooks): exact chunked attention and its LSE merge."""

from memopt.ops.attention import attention_with_lse, chunked_attention, merge_attention_partials

__all__ = ["attention_with_lse", "chunked_attention", "merge_attention_partials"]
