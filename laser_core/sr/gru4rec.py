"""GRU4Rec (Hidasi et al. 2016) with full softmax cross-entropy at every position: a cheap reference point.
Sequences are packed, so left padding never enters the recurrent state."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from laser_core.sr.base import SequentialRecommender, next_item_loss
from laser_core.sr.batching import tokens_from_ids
from laser_core.configuration import SRConfig


class GRU4Rec(SequentialRecommender):
    def __init__(self, config: SRConfig, n_items: int) -> None:
        super().__init__(config, n_items)
        c = config
        self.item_emb = nn.Embedding(n_items + 1, c.hidden_size, padding_idx=0)
        self.drop = nn.Dropout(c.dropout)
        self.gru = nn.GRU(c.hidden_size, c.hidden_size, num_layers=1, batch_first=True)
        self.proj = nn.Linear(c.hidden_size, c.hidden_size)
        nn.init.normal_(self.item_emb.weight, std=0.02)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Per-position states, left-aligned back to the input layout ``[B, N, d]`` (zeros at padding)."""
        B, N = tokens.shape
        valid = tokens > 0
        lengths = valid.sum(1)
        # left-padded -> right-padded (a row's real items first), run packed, then shift back
        order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)
        right = torch.gather(tokens, 1, order)
        packed = pack_padded_sequence(
            self.drop(self.item_emb(right)), lengths.clamp(min=1).cpu(), batch_first=True, enforce_sorted=False
        )
        out, _ = self.gru(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=N)
        out = self.proj(out)
        back = torch.zeros_like(out)
        back.scatter_(1, order[..., None].expand(-1, -1, out.shape[-1]), out)
        return back * valid[..., None]

    def calculate_loss(self, batch):
        return next_item_loss(
            self.forward(batch["input_ids"]), batch["labels"], self.item_emb.weight[1:], n_negatives=self.n_negatives
        )

    def full_sort_predict(self, batch):
        return self.forward(batch["input_ids"])[:, -1] @ self.item_emb.weight[1:].T

    def encode(self, item_ids, mask):
        if bool((mask.bool() & (item_ids < 0)).any()):
            raise NotImplementedError("GRU4Rec has no cold-item embedding: every visible item id must be >= 0")
        return self.forward(tokens_from_ids(item_ids, mask))
