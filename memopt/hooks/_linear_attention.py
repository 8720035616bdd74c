"""Sana's ReLU linear attention computed a chunk of tokens at a time, exact up to summation order.

Softmax attention needs every key for each query, which is why memopt exchanges keys and values. Linear attention
needs only sums over the keys: per head, ``V^T relu(K)`` (a ``C x C`` matrix) and the normaliser ``sum relu(K)``, the
two things a context-parallel implementation all-reduces. So a call runs in two sweeps over token chunks: the first
projects each chunk's keys and values and adds its share of the sums (in fp32); the second projects each chunk's
queries, applies the sums and the output projection, and writes the chunk's rows of the output. The projections are
the module's own (called per chunk, so LoRA layers and offloading hooks on them run as usual); neither the queries,
keys and values nor the fp32 copies the processors make ever exist for the whole sequence: the call holds its input,
its output and one chunk. Each ``*KeySums`` class mirrors one diffusers processor line by line (diffusers 0.42), split
at its key sums, so the chunked call here and Sana's streamed blocks (:mod:`._streamed_blocks`) share it.
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


class SanaKeySums:
    """``SanaLinearAttnProcessor2_0`` (Sana, Sana Sprint) split at its key sums: :meth:`add` takes a chunk of the
    key/value source, :meth:`attend` a chunk of queries once every chunk was added. Its ones row padded under the
    values makes the last row of ``V_pad relu(K)`` the normaliser; the attention mask is unused there too."""

    def __init__(self, attn: Attention) -> None:
        self.attn = attn
        self.scores: torch.Tensor | None = None  # (B, H, C + 1, C), fp32

    def add(self, source: torch.Tensor) -> None:
        attn, heads = self.attn, self.attn.heads
        key, value = attn.to_k(source), attn.to_v(source)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        key = F.relu(key.transpose(1, 2).unflatten(1, (heads, -1)).transpose(2, 3)).float()
        value = F.pad(value.transpose(1, 2).unflatten(1, (heads, -1)).float(), (0, 0, 0, 1), mode="constant",
                      value=1.0)
        part = torch.matmul(value, key)
        self.scores = part if self.scores is None else self.scores.add_(part)

    def attend(self, hidden_states: torch.Tensor) -> torch.Tensor:
        attn, dtype = self.attn, hidden_states.dtype
        query = attn.to_q(hidden_states)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        query = F.relu(query.transpose(1, 2).unflatten(1, (attn.heads, -1))).float()
        mixed = torch.matmul(self.scores, query)
        del query
        mixed = mixed[:, :, :-1] / (mixed[:, :, -1:] + 1e-15)
        return _output(attn, mixed.flatten(1, 2).transpose(1, 2).to(dtype), dtype == torch.float16)


def _rotate(hidden_states: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """``SanaLinearAttnProcessor3_0``'s rotary embedding (interleaved pairs)."""
    x1, x2 = hidden_states.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = freqs_cos[..., 0::2], freqs_sin[..., 1::2]
    out = torch.empty_like(hidden_states)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(hidden_states)


class SanaVideoKeySums:
    """``SanaLinearAttnProcessor3_0`` (Sana Video) split at its key sums, as :class:`SanaKeySums`; each chunk comes
    with its rows of the rotary tables. Rotated keys and queries make the scores, unrotated ones the normaliser
    ``1 / (sum_k relu(k) . relu(q))``, which the processor computes in the model's dtype: the key sum is kept in fp32
    here and rounded once (:meth:`attend` does it at its first call), as a whole-sequence sum rounds."""

    def __init__(self, attn: Attention) -> None:
        self.attn = attn
        self.scores: torch.Tensor | None = None  # (B, H, C, C), fp32
        self.key_sum: torch.Tensor | None = None  # (B, H, C), fp32 until the first query chunk

    def add(self, source: torch.Tensor, rotary_emb: tuple[torch.Tensor, torch.Tensor]) -> None:
        attn = self.attn
        key, value = attn.to_k(source), attn.to_v(source)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        key = F.relu(key.unflatten(2, (attn.heads, -1)))  # B, n, H, C
        key_rotate = _rotate(key, *rotary_emb).permute(0, 2, 3, 1).float()
        value = value.unflatten(2, (attn.heads, -1)).permute(0, 2, 3, 1).float()
        part, part_sum = torch.matmul(value, key_rotate.transpose(-1, -2)), key.sum(dim=1, dtype=torch.float32)
        self.scores = part if self.scores is None else self.scores.add_(part)
        self.key_sum = part_sum if self.key_sum is None else self.key_sum.add_(part_sum)

    def attend(self, hidden_states: torch.Tensor, rotary_emb: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        attn, dtype = self.attn, hidden_states.dtype
        if self.key_sum.dim() == 3:  # (B, H, 1, C), as key.sum(dim=-1, keepdim=True).transpose(-2, -1)
            self.key_sum = self.key_sum.to(dtype).unsqueeze(-2)
        query = attn.to_q(hidden_states)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        query = F.relu(query.unflatten(2, (attn.heads, -1)))
        query_rotate = _rotate(query, *rotary_emb)
        z = 1 / (self.key_sum @ query.permute(0, 2, 3, 1) + 1e-15)
        mixed = torch.matmul(self.scores, query_rotate.permute(0, 2, 3, 1).float()) * z
        del query, query_rotate, z
        return _output(attn, mixed.flatten(1, 2).transpose(1, 2).to(dtype))


def token_rows(table: torch.Tensor, rows: slice, tokens: int) -> torch.Tensor:
    """A per-token table's rows for a chunk (dim 1 is the tokens; a table broadcast over them is taken whole)."""
    return table[:, rows] if table.shape[1] == tokens else table


def sana_linear_attention(attn: Attention, chunk: int, hidden_states: torch.Tensor,
                          encoder_hidden_states: torch.Tensor | None = None,
                          attention_mask: torch.Tensor | None = None, **ignored: Any) -> torch.Tensor:
    """``SanaLinearAttnProcessor2_0``'s call, ``chunk`` tokens at a time (:class:`SanaKeySums`)."""
    source = hidden_states if encoder_hidden_states is None else encoder_hidden_states
    sums = SanaKeySums(attn)
    for rows in _chunks(source.shape[1], chunk):
        sums.add(source[:, rows])
    out = None
    for rows in _chunks(hidden_states.shape[1], chunk):
        out = _write(out, sums.attend(hidden_states[:, rows]), rows, hidden_states.shape[1])
    return out


def sana_video_linear_attention(attn: Attention, chunk: int, hidden_states: torch.Tensor,
                                encoder_hidden_states: torch.Tensor | None = None,
                                attention_mask: torch.Tensor | None = None,
                                rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
                                **ignored: Any) -> torch.Tensor:
    """``SanaLinearAttnProcessor3_0``'s call, ``chunk`` tokens at a time (:class:`SanaVideoKeySums`)."""
    if rotary_emb is None:  # the processor itself fails then (its rotated tensors are never defined)
        raise ValueError("SanaLinearAttnProcessor3_0 needs rotary_emb")
    source = hidden_states if encoder_hidden_states is None else encoder_hidden_states
    sums = SanaVideoKeySums(attn)
    for rows in _chunks(source.shape[1], chunk):
        sums.add(source[:, rows], tuple(token_rows(table, rows, source.shape[1]) for table in rotary_emb))
    out = None
    for rows in _chunks(hidden_states.shape[1], chunk):
        tables = tuple(token_rows(table, rows, hidden_states.shape[1]) for table in rotary_emb)
        out = _write(out, sums.attend(hidden_states[:, rows], tables), rows, hidden_states.shape[1])
    return out


LINEAR_ATTENTION: dict[type, Callable[..., torch.Tensor]] = {
    SanaLinearAttnProcessor2_0: sana_linear_attention,
    SanaLinearAttnProcessor3_0: sana_video_linear_attention,
}
"""Linear-attention processor class -> its chunked computation ``fn(attn, chunk, *args, **kwargs)``, called with the
attention module's forward arguments."""


def has_linear_attention(model: torch.nn.Module) -> bool:
    """Whether any attention module of ``model`` runs a linear-attention processor memopt chunks."""
    return any(type(getattr(module, "processor", None)) in LINEAR_ATTENTION for module in model.modules())
