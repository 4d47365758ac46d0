"""Causal self-attention over item sequences: the one block stack shared by the Two Tower's sequence query
encoder (`two_tower.TwoTower` with ``query_encoder="sequence"``) and the SASRec reference
(`evaluation.sasrec.SASRecNet`). Pure torch.

Inputs are left-padded, oldest first: the most recent item is always the last column, and positions are counted
from it (the last column gets position ``max_len - 1`` whatever the padding), so a position means "k items ago".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CausalSequenceEncoder(nn.Module):
    """Learned positions + `blocks` pre-LN causal self-attention blocks + a final LayerNorm.

    forward(x [B, L, hidden] item embeddings, is_pad bool [B, L]) -> hidden states [B, L, hidden]; the state at
    column t reads columns <= t only. Padding is invisible to real items.
    """

    def __init__(self, *, hidden: int, blocks: int, heads: int, max_len: int, dropout: float) -> None:
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden={hidden} must be divisible by heads={heads}")
        if blocks < 1 or max_len < 1 or not 0.0 <= dropout < 1.0:
            raise ValueError(f"blocks={blocks} and max_len={max_len} must be >= 1, dropout in [0, 1)")
        self.hidden = hidden
        self.heads = heads
        self.max_len = max_len
        self.position_embedding = nn.Embedding(max_len, hidden)
        self.embedding_dropout = dropout
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(
                hidden, heads, dim_feedforward=hidden, dropout=dropout, batch_first=True, norm_first=True
            )
            for _ in range(blocks)
        )
        self.final_norm = nn.LayerNorm(hidden)

    def forward(self, x: torch.Tensor, is_pad: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """States [B, L, hidden]; with `last_only`, [B, 1, hidden]: the state at the last column alone, the same
        numbers for a fraction of the cost (the last block attends from that column only)."""
        length = x.shape[1]
        if length > self.max_len:
            raise ValueError(f"sequence of {length} positions exceeds max_len={self.max_len}")
        positions = torch.arange(self.max_len - length, self.max_len, device=x.device)
        x = (x + self.position_embedding(positions)) * self._input_multiplier(x, is_pad)
        full = self.blocks[:-1] if last_only else self.blocks
        mask = attention_mask(is_pad, self.heads) if len(full) else None
        for block in full:
            x = block(x, src_mask=mask)
        if last_only:
            x = _last_column_block(self.blocks[-1], x, is_pad, self.heads)
        return self.final_norm(x)

    def _input_multiplier(self, x: torch.Tensor, is_pad: torch.Tensor) -> torch.Tensor:
        """The embedding dropout's inverted mask and the zeroed padding as one factor (no gradient), so the
        [batch, length, hidden] input is multiplied once each way. The mask is drawn with `torch.rand`: on CPU,
        `bernoulli_` (what nn.Dropout draws with) takes 2.6x as long."""
        real = (~is_pad).unsqueeze(-1).to(x.dtype)
        if not self.training or self.embedding_dropout == 0.0:
            return real
        with torch.no_grad():
            keep = torch.rand(x.shape, device=x.device) >= self.embedding_dropout
            return keep.to(x.dtype).mul_(real * (1.0 / (1.0 - self.embedding_dropout)))


def _last_column_block(block: nn.TransformerEncoderLayer, x: torch.Tensor, is_pad: torch.Tensor, heads: int):
    """`block(x)[:, -1:]` (a pre-LN layer) computed for the last column only: its query reads every real key
    (all are earlier or itself), so the other columns' outputs are never needed. The attention is the layer's
    own weights through scaled_dot_product_attention (the layer's module would copy its packed key/value
    projections for a separate query)."""
    attention = block.self_attn
    batch, length, hidden = x.shape
    h = block.norm1(x)
    w_q, w_kv = attention.in_proj_weight.split([hidden, 2 * hidden])
    b_q, b_kv = attention.in_proj_bias.split([hidden, 2 * hidden])
    query = F.linear(h[:, -1:], w_q, b_q).view(batch, 1, heads, -1).transpose(1, 2)
    key, value = F.linear(h, w_kv, b_kv).view(batch, length, 2, heads, -1).permute(2, 0, 3, 1, 4)
    visible = ~is_pad
    visible[:, -1] = True  # a row without history: its padded last column sees itself, as in the full mask
    dropout = attention.dropout if block.training else 0.0
    attended = F.scaled_dot_product_attention(query, key, value, attn_mask=visible[:, None, None, :], dropout_p=dropout)
    attended = attention.out_proj(attended.transpose(1, 2).reshape(batch, 1, hidden))
    y = x[:, -1:] + block.dropout1(attended)
    return y + block.dropout2(block.linear2(block.dropout(block.activation(block.linear1(block.norm2(y))))))


def attention_mask(is_pad: torch.Tensor, heads: int) -> torch.Tensor:
    """bool [B * heads, L, L]: True where query i may not see key j. Causal, and padding is invisible except to
    itself (a padded query left with no key at all would turn its softmax into NaN, which then spreads)."""
    length = is_pad.shape[1]
    steps = torch.arange(length, device=is_pad.device)
    future = steps[None, :] > steps[:, None]
    own = torch.eye(length, dtype=torch.bool, device=is_pad.device)
    blocked = future[None] | (is_pad[:, None, :] & ~own)
    return blocked.repeat_interleave(heads, dim=0)


def left_padded(values: torch.Tensor, lengths: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Jagged rows, most recent first (``values`` [sum(lengths), d], ``lengths`` [B]) -> ([B, width, d] oldest
    first, left-padded with zeros, the most recent in the last column; is_pad bool [B, width]). Rows longer than
    `width` keep their `width` most recent entries."""
    lengths = lengths.long()
    starts = torch.cumsum(lengths, 0) - lengths
    ago = torch.arange(width - 1, -1, -1, device=values.device)  # column c holds the item width - 1 - c steps ago
    real = ago[None, :] < lengths[:, None]
    # a lookup into the values behind one zero row (the padding): its backward is the embedding's sorted
    # accumulation, where a boolean-mask assignment paid a nonzero and a masked index_put each way
    index = torch.where(real, starts[:, None] + ago[None, :] + 1, 0)
    return F.embedding(index, F.pad(values, (0, 0, 1, 0))), ~real
