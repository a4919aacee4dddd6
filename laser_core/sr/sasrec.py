"""SASRec (Kang & McAuley 2018): causal self-attention, trained with full softmax cross-entropy over all items
at every position (the variant that public re-implementations show to be much stronger than the original
negative-sampling BCE)."""

from __future__ import annotations

import torch
from torch import nn

from laser_core.sr.base import SequentialRecommender, next_item_loss
from laser_core.configuration import SRConfig
from laser_core.sr.transformer import Encoder


class SASRec(SequentialRecommender):
    def __init__(self, config: SRConfig, n_items: int) -> None:
        super().__init__(config, n_items)
        c = config
        self.item_emb = nn.Embedding(n_items + 1, c.hidden_size, padding_idx=0)
        self.encoder = Encoder(c.hidden_size, c.n_layers, c.n_heads, c.ffn_size, c.dropout, c.attn_dropout, c.max_len)
        nn.init.normal_(self.item_emb.weight, std=0.02)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        valid = tokens > 0
        return self.encoder(self.embed_tokens(tokens), valid, causal=True)

    def calculate_loss(self, batch):
        return next_item_loss(
            self.forward(batch["input_ids"]), batch["labels"], self.item_weight()[1:], n_negatives=self.n_negatives
        )

    def full_sort_predict(self, batch):
        h = self.forward(batch["input_ids"])[:, -1]
        return h @ self.item_weight()[1:].T

    def encode(self, item_ids, mask):
        return self.encoder(self.input_embeddings(item_ids, mask), mask.bool(), causal=True)

    def user_vectors(self, item_ids, mask):
        return self.encode(item_ids, mask)[:, -1]

    def item_vectors(self):
        return self.item_weight()[1:]

    def unknown_item_vector(self):
        return self.cold_item_embedding()  # the padding embedding: no ID information

    def cold_item_embedding(self):
        """SASRec has no token for an unseen item: the padding embedding (zero), so a cold position carries only
        its position embedding."""
        return torch.zeros_like(self.item_emb.weight[0])
