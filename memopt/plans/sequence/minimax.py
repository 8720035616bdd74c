"""MiniMax-H3."""

from __future__ import annotations

from typing import Any, Callable

from diffusers.hooks._helpers import TransformerBlockMetadata
from diffusers.models._modeling_parallel import ContextParallelOutput

from ._vocabulary import (
    _IMAGE_TOKENS,
    BlockPlan,
    JointAttention,
    ProducerCall,
    SequencePlan,
    SequenceSplit,
    TokenProducer,
    TokenRanges,
    _pair,
    _take,
)


# MiniMax-H3 runs one stack of blocks over one packed sequence [text | audio | video] (the model scatters the three
# projected modalities into it with index_copy before the first block): to the blocks it is a single token stream,
# the "image" stream here, split like any other, and one self-attention over all of it (no cross-attention). The
# modality only shows in a per-row index (adaln_indices = timestep_indices x 3 + token_tags) into a per-block table of
# (timestep, modality) modulation rows, split with the rows as _cp_plan["transformer_blocks.*"] does.
def _minimax_h3_rope_tokens(rope: Any, call: ProducerCall) -> int:
    return call["position_ids"].shape[0]


def _minimax_h3_rope_rows(rope: Any, call: ProducerCall, forward: Callable) -> Callable[[TokenRanges], Any]:
    """MiniMax-H3 tables for some rows: the module on those rows' ``(t, h, w)`` coordinates, which it maps to ``(cos,
    sin)`` one row at a time (elementwise), so the same numbers."""
    return lambda ranges: forward(_take(call["position_ids"], 0, ranges))


_MINIMAX_ROWS = SequenceSplit(0, 1)  # (S,) per-row index tensors, as _cp_plan's adaln_indices / timestep_indices


PLANS: dict[str, SequencePlan] = {
    "MiniMaxH3Transformer3DModel": SequencePlan(
        {
            "transformer_blocks.*": BlockPlan(
                inputs={
                    "hidden_states": _IMAGE_TOKENS,
                    "adaln_indices": _MINIMAX_ROWS,  # row -> (timestep, modality) modulation row
                    "rotary_emb": _pair(SequenceSplit(0, 2)),  # (S, 6 rope_freq_dim) cos / sin, as _cp_plan["rope"]
                },
                attention={"attn": JointAttention()},
                # adaln_proj: SiLU + one Linear of the shared temb into all six (timestep, modality) tables
                # (time_embed_dim x 18 hidden_size: 260 M weights a block at the release), the same for every chunk.
                conditioning=("adaln_proj",),
                metadata=TransformerBlockMetadata(return_hidden_states_index=0),
            )
        },
        # norm_out(hidden_states, temb, timestep_indices) modulates per row; then both heads (proj_out to 96 video
        # channels, audio_proj_out to 32 audio channels) run over every row and the model picks each modality's rows
        # with sequence-wide indices. memopt's tail gathers at one module, and _cp_plan gathers at two (proj_out and
        # audio_proj_out): the chunks are gathered at norm_out's output instead, so the norm and its modulation
        # temporaries run per chunk and the two narrow heads (0.02 D wide together) run whole.
        gather={"norm_out": ContextParallelOutput(gather_dim=1, expected_dims=3)},
        embed=("proj_in", "audio_proj_in"),
        producers={"rope": TokenProducer(_minimax_h3_rope_tokens, _minimax_h3_rope_rows)},
        tail_inputs={"timestep_indices": _MINIMAX_ROWS},
        source="memopt + MiniMaxH3Transformer3DModel._cp_plan",
    ),
}
