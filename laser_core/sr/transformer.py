"""A pre-LayerNorm transformer encoder whose attention masks padding (and, for SASRec, the future).

Padding never attends and is never attended to: a query at a padded position attends only to itself,
which keeps every softmax well-defined without leaking padding into real positions.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class SelfAttention(nn.Module):
    def __init__(self, hidden: int, heads: int, dropout: float) -> None:
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden size {hidden} is not divisible by {heads} heads")
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.out = nn.Linear(hidden, hidden)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=allowed[:, None], dropout_p=self.dropout if self.training else 0.0
        )
        return self.out(y.transpose(1, 2).reshape(B, N, D))


class Block(nn.Module):
    def __init__(self, hidden: int, heads: int, ffn: int, dropout: float, attn_dropout: float) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(hidden)
        self.attn = SelfAttention(hidden, heads, attn_dropout)
        self.ln2 = nn.LayerNorm(hidden)
        self.ffn = nn.Sequential(nn.Linear(hidden, ffn), nn.GELU(), nn.Dropout(dropout), nn.Linear(ffn, hidden))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x), allowed))
        return x + self.drop(self.ffn(self.ln2(x)))


def attention_mask(valid: torch.Tensor, causal: bool) -> torch.Tensor:
    """``[B, N, N]`` bool, True where query i may attend key j."""
    N = valid.shape[1]
    allowed = valid[:, None, :].expand(-1, N, -1)
    if causal:
        allowed = allowed & torch.ones(N, N, dtype=torch.bool, device=valid.device).tril()
    eye = torch.eye(N, dtype=torch.bool, device=valid.device)
    return allowed | eye  # every query sees at least itself


class Encoder(nn.Module):
    def __init__(
        self, hidden: int, layers: int, heads: int, ffn: int, dropout: float, attn_dropout: float, max_len: int
    ) -> None:
        super().__init__()
        self.pos = nn.Embedding(max_len, hidden)
        nn.init.normal_(self.pos.weight, std=0.02)  # same scale as the item embeddings (N(0,1) drowns them)
        self.ln_in = nn.LayerNorm(hidden)  # BERT-style embedding LayerNorm: small item embeddings count fully
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(hidden, heads, ffn, dropout, attn_dropout) for _ in range(layers))
        self.ln = nn.LayerNorm(hidden)

    def forward(self, emb: torch.Tensor, valid: torch.Tensor, causal: bool) -> torch.Tensor:
        N = emb.shape[1]
        x = self.drop(self.ln_in(emb + self.pos.weight[-N:][None])) * valid[..., None]
        allowed = attention_mask(valid, causal)
        for block in self.blocks:
            x = block(x, allowed)
        return self.ln(x) * valid[..., None]
