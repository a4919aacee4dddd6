"""BERT4Rec (Sun et al. 2019): bidirectional self-attention trained with the cloze objective (random items
replaced by a [MASK] token, predicted by a softmax over all items). Inference appends [MASK] to the history and
reads the prediction at that position. A share of training sequences (``mask_last_prob``) masks only the last
item, which matches the inference task."""

from __future__ import annotations

import torch
from torch import nn

from laser_core.sr.base import SequentialRecommender, next_item_loss
from laser_core.sr.batching import pad_left, tokens_from_ids
from laser_core.configuration import SRConfig
from laser_core.sr.transformer import Encoder


class BERT4Rec(SequentialRecommender):
    bidirectional = True

    def __init__(self, config: SRConfig, n_items: int) -> None:
        super().__init__(config, n_items)
        c = config
        self.mask_token = n_items + 1
        self.item_emb = nn.Embedding(n_items + 2, c.hidden_size, padding_idx=0)
        self.encoder = Encoder(c.hidden_size, c.n_layers, c.n_heads, c.ffn_size, c.dropout, c.attn_dropout, c.max_len)
        self.out = nn.Sequential(nn.Linear(c.hidden_size, c.hidden_size), nn.GELU(), nn.LayerNorm(c.hidden_size))
        self.out_bias = nn.Parameter(torch.zeros(n_items))
        nn.init.normal_(self.item_emb.weight, std=0.02)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    @property
    def window(self) -> int:
        return self.config.max_len

    def min_train_length(self) -> int:
        return 1

    def make_batch(self, sequences, generator):
        tokens = pad_left(sequences, self.config.max_len)
        valid = tokens > 0
        probs = torch.rand(tokens.shape, generator=generator)
        masked = (probs < self.config.mask_prob) & valid
        last_only = torch.rand(len(sequences), generator=generator) < self.config.mask_last_prob
        masked[last_only] = False
        masked[:, -1] |= last_only
        none = ~masked.any(dim=1)
        masked[none, -1] = True  # at least one masked position per sequence (the last is always real)
        labels = torch.where(masked, tokens, torch.zeros_like(tokens))
        inputs = torch.where(masked, torch.full_like(tokens, self.mask_token), tokens)
        return {"input_ids": inputs, "labels": labels}

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.embed_tokens(tokens), tokens > 0, causal=False)

    def _logits_weight(self) -> torch.Tensor:
        return self.item_weight()[1:-1]

    def calculate_loss(self, batch):
        h = self.out(self.forward(batch["input_ids"]))
        return next_item_loss(h, batch["labels"], self._logits_weight(), self.out_bias, self.n_negatives)

    def predict_batch(self, histories):
        L = self.config.max_len
        tokens = pad_left(histories, L - 1)  # the last L-1 items, then [MASK] in the last position
        tokens = torch.cat([tokens, torch.full((len(histories), 1), self.mask_token)], dim=1)
        return {"input_ids": tokens}

    def full_sort_predict(self, batch):
        h = self.out(self.forward(batch["input_ids"])[:, -1])
        return h @ self._logits_weight().T + self.out_bias

    def encode(self, item_ids, mask):
        return self.encoder(self.input_embeddings(item_ids, mask), mask.bool(), causal=False)

    def user_vectors(self, item_ids, mask):
        """The output at an appended [MASK] after the last ``max_len - 1`` items, as :meth:`predict_batch`, with a
        1 appended for the item bias."""
        tokens = tokens_from_ids(item_ids, mask)[:, 1:]
        tokens = torch.cat([tokens, torch.full_like(tokens[:, :1], self.mask_token)], dim=1)
        h = self.out(self.forward(tokens)[:, -1])
        return torch.cat([h, torch.ones_like(h[:, :1])], dim=1)

    def item_vectors(self):
        return torch.cat([self._logits_weight(), self.out_bias[:, None]], dim=1)

    def unknown_item_vector(self):
        """The trained [MASK] embedding with a bias of 0."""
        return torch.cat([self.cold_item_embedding(), self.out_bias.new_zeros(1)])

    def cold_item_embedding(self):
        """The trained [MASK] token embedding (the cloze token for 'an item not shown here')."""
        return self.item_emb.weight[self.mask_token]
