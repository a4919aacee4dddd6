"""M-Former: the MoE querying transformer that turns collaborative information into Laser's prefix
(LASER_SPEC.md §2.3; BLIP-2/LAVIS Q-Former style).

- Router ``W_r [K, d_i]``: per history position ``softmax(C_u W_r^T)`` over the K experts; an expert's score
  for the user is the mean of its probability over the real (non-padding) positions; the top-1 expert is
  selected. The selected queries are multiplied by ``g / g.detach()`` (``g`` = the winner's score): the value is
  unchanged, but the main loss's gradient reaches the router (a straight-through gate; with a hard argmax alone
  the router would learn only from the load-balancing loss).
- K query experts, each L trainable vectors of width d_m.
- Z blocks: self-attention over the L queries, cross-attention to ``C_u`` (keys/values projected from d_i) in
  every other block (blocks 0, 2, 4, ... as LAVIS' ``cross_attention_freq=2``), FFN; pre-LayerNorm.
- A linear projection d_m -> LLM hidden size gives the prefix ``P [B, L, H]``.

Ablation variants: ``K = 1`` (no MoE) and :class:`PlainPrefix` (trainable prefix without collaborative
information, "w/o M-Former").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from laser_core.configuration import MFormerConfig


@dataclass
class RouterOutput:
    probs: torch.Tensor  # [B, N, K] per-position softmax
    scores: torch.Tensor  # [B, K] mean over real positions
    selected: torch.Tensor  # [B] top-1 expert
    mask: torch.Tensor  # [B, N] real positions


class Router(nn.Module):
    def __init__(self, sr_dim: int, n_experts: int) -> None:
        super().__init__()
        self.proj = nn.Linear(sr_dim, n_experts, bias=False)  # W_r

    def forward(self, collab: torch.Tensor, mask: torch.Tensor) -> RouterOutput:
        probs = torch.softmax(self.proj(collab), dim=-1)
        m = mask.to(probs.dtype)[..., None]
        scores = (probs * m).sum(1) / m.sum(1).clamp(min=1.0)
        return RouterOutput(probs=probs, scores=scores, selected=scores.argmax(dim=-1), mask=mask.bool())


class QFormerBlock(nn.Module):
    def __init__(self, width: int, heads: int, sr_dim: int, cross: bool, ffn_mult: int, dropout: float) -> None:
        super().__init__()
        self.ln_self = nn.LayerNorm(width)
        self.self_attn = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        self.cross = cross
        if cross:
            self.ln_cross = nn.LayerNorm(width)
            self.cross_attn = nn.MultiheadAttention(
                width, heads, dropout=dropout, batch_first=True, kdim=sr_dim, vdim=sr_dim
            )
        self.ln_ffn = nn.LayerNorm(width)
        self.ffn = nn.Sequential(
            nn.Linear(width, ffn_mult * width), nn.GELU(), nn.Dropout(dropout), nn.Linear(ffn_mult * width, width)
        )
        self.drop = nn.Dropout(dropout)

    def forward(self, q: torch.Tensor, collab: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        h = self.ln_self(q)
        q = q + self.drop(self.self_attn(h, h, h, need_weights=False)[0])
        if self.cross:
            h = self.ln_cross(q)
            q = q + self.drop(self.cross_attn(h, collab, collab, key_padding_mask=pad, need_weights=False)[0])
        return q + self.drop(self.ffn(self.ln_ffn(q)))


class MFormer(nn.Module):
    def __init__(self, config: MFormerConfig, sr_dim: int, llm_hidden: int) -> None:
        super().__init__()
        c = config
        self.config = c
        self.router = Router(sr_dim, c.n_experts)
        self.experts = nn.Parameter(torch.randn(c.n_experts, c.n_query, c.width) * 0.02)
        self.blocks = nn.ModuleList(
            QFormerBlock(
                c.width,
                c.n_heads,
                sr_dim,
                cross=(i % c.cross_attention_every == 0),
                ffn_mult=c.ffn_mult,
                dropout=c.dropout,
            )
            for i in range(c.n_layers)
        )
        self.ln = nn.LayerNorm(c.width)
        self.proj = nn.Linear(c.width, llm_hidden)

    def forward(self, collab: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, RouterOutput]:
        """``collab [B, N, d_i]`` (frozen SR per-position vectors), ``mask [B, N]`` -> prefix ``[B, L, H]``."""
        route = self.router(collab, mask)
        gate = route.scores.gather(1, route.selected[:, None])  # [B, 1]
        queries = self.experts[route.selected] * (gate / gate.detach())[..., None]
        pad = ~route.mask
        for block in self.blocks:
            queries = block(queries, collab, pad)
        return self.proj(self.ln(queries)), route


class PlainPrefix(nn.Module):
    """ "w/o M-Former": L trainable prefix vectors shared by every user (no collaborative information)."""

    def __init__(self, n_query: int, llm_hidden: int) -> None:
        super().__init__()
        self.prefix = nn.Parameter(torch.randn(n_query, llm_hidden) * 0.02)

    def forward(self, batch_size: int) -> torch.Tensor:
        return self.prefix[None].expand(batch_size, -1, -1)
