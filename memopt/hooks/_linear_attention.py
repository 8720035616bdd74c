"""Sana's ReLU linear attention computed a chunk of tokens at a time, exact up to summation order.

Softmax attention needs every key for each query, which is why memopt exchanges keys and values. Linear attention
needs only sums over the keys: per head, ``V^T relu(K)`` (a ``C x C`` matrix) and the normaliser ``sum relu(K)``, the
two things a context-parallel implementation all-reduces. So a call runs in two sweeps over token chunks: the first
projects each chunk's keys and values and adds its share of the sums (in fp32); the second projects each chunk's
queries, applies the sums and the output projection, and writes the chunk's rows of the output. The projections are
the module's own (called per chunk, so LoRA layers and offloading hooks on them run as usual); neither the queries,
keys and values nor the fp32 copies the processors make ever exist for the whole sequence: the call holds its input,
its output and one chunk. Each function below mirrors one diffusers processor line by line (diffusers 0.42).
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, SanaLinearAttnProcessor2_0
from diffusers.models.transformers.transformer_sana_video import SanaLinearAttnProcessor3_0


def _chunks(tokens: int, chunk: int) -> Iterator[slice]:
    for start in range(0, tokens, chunk):
        yield slice(start, min(start + chunk, tokens))


def _output(attn: Attention, hidden_states: torch.Tensor, clip: bool = False) -> torch.Tensor:
    hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
    return hidden_states.clip(-65504, 65504) if clip else hidden_states


def _write(out: torch.Tensor | None, rows: torch.Tensor, chunk: slice, tokens: int) -> torch.Tensor:
    """Write ``rows`` (one chunk of the output) into ``out``, created at the first chunk."""
    if out is None:
        out = rows.new_empty(rows.shape[0], tokens, *rows.shape[2:])
    out[:, chunk] = rows
    return out


def sana_linear_attention(attn: Attention, chunk: int, hidden_states: torch.Tensor,
                          encoder_hidden_states: torch.Tensor | None = None,
                          attention_mask: torch.Tensor | None = None, **ignored: Any) -> torch.Tensor:
    """``SanaLinearAttnProcessor2_0`` (Sana, Sana Sprint), ``chunk`` tokens at a time. Its ones row padded under the
    values makes the last row of ``V_pad relu(K)`` the normaliser; the mask is unused there too."""
    dtype, heads = hidden_states.dtype, attn.heads
    source = hidden_states if encoder_hidden_states is None else encoder_hidden_states
    scores = None  # (B, H, C + 1, C), fp32
    for rows in _chunks(source.shape[1], chunk):
        key, value = attn.to_k(source[:, rows]), attn.to_v(source[:, rows])
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        key = F.relu(key.transpose(1, 2).unflatten(1, (heads, -1)).transpose(2, 3)).float()
        value = F.pad(value.transpose(1, 2).unflatten(1, (heads, -1)).float(), (0, 0, 0, 1), mode="constant",
                      value=1.0)
        part = torch.matmul(value, key)
        scores = part if scores is None else scores.add_(part)
        del key, value, part
    out = None
    for rows in _chunks(hidden_states.shape[1], chunk):
        query = attn.to_q(hidden_states[:, rows])
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        query = F.relu(query.transpose(1, 2).unflatten(1, (heads, -1))).float()
        mixed = torch.matmul(scores, query)
        del query
        mixed = mixed[:, :, :-1] / (mixed[:, :, -1:] + 1e-15)
        out = _write(out, _output(attn, mixed.flatten(1, 2).transpose(1, 2).to(dtype), dtype == torch.float16),
                     rows, hidden_states.shape[1])
        del mixed  # before the next chunk's
    return out


def _rotate(hidden_states: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """``SanaLinearAttnProcessor3_0``'s rotary embedding (interleaved pairs)."""
    x1, x2 = hidden_states.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = freqs_cos[..., 0::2], freqs_sin[..., 1::2]
    out = torch.empty_like(hidden_states)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(hidden_states)


def _token_rows(table: torch.Tensor, rows: slice, tokens: int) -> torch.Tensor:
    """A rotary table's rows for a chunk (dim 1 is the tokens; a table broadcast over them is taken whole)."""
    return table[:, rows] if table.shape[1] == tokens else table


def sana_video_linear_attention(attn: Attention, chunk: int, hidden_states: torch.Tensor,
                                encoder_hidden_states: torch.Tensor | None = None,
                                attention_mask: torch.Tensor | None = None,
                                rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
                                **ignored: Any) -> torch.Tensor:
    """``SanaLinearAttnProcessor3_0`` (Sana Video), ``chunk`` tokens at a time: rotated keys and queries make the
    scores, unrotated ones the normaliser ``1 / (sum_k relu(k) . relu(q))``, which the processor computes in the
    model's dtype (the key sum is kept in fp32 here and rounded once, as a whole-sequence sum rounds)."""
    if rotary_emb is None:  # the processor itself fails then (its rotated tensors are never defined)
        raise ValueError("SanaLinearAttnProcessor3_0 needs rotary_emb")
    dtype, heads = hidden_states.dtype, attn.heads
    source = hidden_states if encoder_hidden_states is None else encoder_hidden_states
    tokens = source.shape[1]
    scores, key_sum = None, None  # (B, H, C, C) fp32; (B, H, C) fp32
    for rows in _chunks(tokens, chunk):
        key, value = attn.to_k(source[:, rows]), attn.to_v(source[:, rows])
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        key = F.relu(key.unflatten(2, (heads, -1)))  # B, n, H, C
        key_rotate = _rotate(key, *(_token_rows(table, rows, tokens) for table in rotary_emb))
        key_rotate = key_rotate.permute(0, 2, 3, 1).float()
        value = value.unflatten(2, (heads, -1)).permute(0, 2, 3, 1).float()
        part, part_sum = torch.matmul(value, key_rotate.transpose(-1, -2)), key.sum(dim=1, dtype=torch.float32)
        scores = part if scores is None else scores.add_(part)
        key_sum = part_sum if key_sum is None else key_sum.add_(part_sum)
        del key, key_rotate, value, part
    key_sum = key_sum.to(dtype).unsqueeze(-2)  # (B, H, 1, C), as key.sum(dim=-1, keepdim=True).transpose(-2, -1)
    out = None
    for rows in _chunks(hidden_states.shape[1], chunk):
        query = attn.to_q(hidden_states[:, rows])
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        query = F.relu(query.unflatten(2, (heads, -1)))
        query_rotate = _rotate(query, *(_token_rows(table, rows, hidden_states.shape[1]) for table in rotary_emb))
        z = 1 / (key_sum @ query.permute(0, 2, 3, 1) + 1e-15)
        mixed = torch.matmul(scores, query_rotate.permute(0, 2, 3, 1).float()) * z
        del query, query_rotate, z
        out = _write(out, _output(attn, mixed.flatten(1, 2).transpose(1, 2).to(dtype)), rows,
                     hidden_states.shape[1])
        del mixed  # before the next chunk's
    return out


LINEAR_ATTENTION: dict[type, Callable[..., torch.Tensor]] = {
    SanaLinearAttnProcessor2_0: sana_linear_attention,
    SanaLinearAttnProcessor3_0: sana_video_linear_attention,
}
"""Linear-attention processor class -> its chunked computation ``fn(attn, chunk, *args, **kwargs)``, called with the
attention module's forward arguments."""
