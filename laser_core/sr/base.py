"""The interface every ID-based recommender follows (in the spirit of RecBole).

- ``calculate_loss(batch) -> scalar``: training loss for a batch of :meth:`SequentialRecommender.make_batch`, what
  the shared trainer (:class:`laser_core.trainer.Trainer`) steps on, as it does on Laser's
  (:meth:`laser_core.model.LaserModel.calculate_loss`);
- ``full_sort_predict(batch) -> [B, n_items]``: scores over the whole catalogue for ``batch["input_ids"]``
  (left-padded history tokens, see :mod:`laser_core.sr.batching`);
- ``encode(item_ids, mask) -> [B, N, d]``: one vector per history position (what Laser's M-Former reads); a
  negative id at a visible position (mask 1) is a *cold item*, an item without a trained ID embedding, which
  the models with a ``cold_item_embedding()`` (SASRec, BERT4Rec) encode with that vector and the others refuse;
- ``training_examples(sequences, rng)``: per-epoch training batches' raw material.

Models whose scores are a dot product (SASRec, BERT4Rec) also expose the two sides of it, which is what Laser's
fusion variant joins to its own vectors: ``user_vectors(item_ids, mask) -> [B, d']`` and ``item_vectors() ->
[n_items, d']`` with ``full_sort_predict == user_vectors @ item_vectors().T``, and ``unknown_item_vector() ->
[d']``, the item side of an item without a trained ID embedding (a cold item).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from laser_core.sr.batching import pad_left, tokens_from_ids
from laser_core.configuration import SRConfig
from laser_core.sr.text_items import TextJoin


class SequentialRecommender(nn.Module):
    trainable: bool = True
    bidirectional: bool = False

    def __init__(self, config: SRConfig, n_items: int) -> None:
        super().__init__()
        self.config = config
        self.n_items = int(n_items)
        self.text_join: TextJoin | None = None  # sr.text_items: join (use_text_items)

    # -- training data -------------------------------------------------------------------------------
    def make_batch(self, sequences: Sequence[np.ndarray], generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Training batch from raw training sequences (windows of at most ``max_len + 1`` items):
        next-item prediction at every position (SASRec, GRU4Rec)."""
        L = self.config.max_len
        inputs = pad_left([s[:-1] for s in sequences], L)
        labels = pad_left([s[1:] for s in sequences], L)
        return {"input_ids": inputs, "labels": labels}

    @property
    def window(self) -> int:
        """Training window length in items."""
        return self.config.max_len + 1

    def min_train_length(self) -> int:
        return 2

    @property
    def n_negatives(self) -> int | None:
        """The sampled softmax's negatives per batch (``sr.loss: sampled``); None: the full softmax."""
        return self.config.n_negatives if self.config.loss == "sampled" else None

    # -- the item embeddings (sr.text_items, laser_core.sr.text_items) ------------------------------------
    def use_text_items(self, rows: torch.Tensor | None) -> None:
        """Take the reduced item text rows ``[n_items, hidden_size]`` (:func:`~laser_core.sr.text_items.text_rows`)
        as ``sr.text_items`` says: ``init`` copies them into ``item_emb`` rows 1..n, ``join`` keeps them as the
        fixed text view (:class:`~laser_core.sr.text_items.TextJoin`; with ``rows`` None, zeros of that shape for
        a saved model's weights to fill). Called once, after the model is built."""
        mode, width = self.config.text_items, self.config.hidden_size
        if rows is not None and tuple(rows.shape) != (self.n_items, width):
            raise ValueError(f"item text rows of shape {tuple(rows.shape)}, expected ({self.n_items}, {width})")
        if mode == "init" and rows is not None:
            with torch.no_grad():
                self.item_emb.weight[1 : self.n_items + 1].copy_(rows)
        elif mode == "join":
            self.text_join = TextJoin(self.n_items, width).to(self.item_emb.weight.device)
            if rows is not None:
                self.text_join.rows.copy_(rows)

    def item_weight(self) -> torch.Tensor:
        """``[n_tokens, d]`` the item embedding rows (the encoder's input and the output weights): ``item_emb``'s,
        plus, with ``text_items: join``, the text part of rows 1..n_items."""
        w = self.item_emb.weight
        if self.text_join is None:
            return w
        n = self.n_items
        return torch.cat([w[:1], w[1 : n + 1] + self.text_join().to(w.dtype), w[n + 1 :]])

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """``[..., d]`` the item embeddings of tokens (0: padding, ``i + 1``: item ``i``) (:meth:`item_weight`)."""
        if self.text_join is None:
            return self.item_emb(tokens)
        return nn.functional.embedding(tokens, self.item_weight(), padding_idx=0)

    # -- the interface ------------------------------------------------------------------------------
    def calculate_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def full_sort_predict(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def encode(self, item_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def user_vectors(self, item_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``[B, d']`` user vectors from left-padded item indices + mask (the most recent items last)."""
        raise NotImplementedError(f"{type(self).__name__} does not expose dot-product user/item vectors")

    def item_vectors(self) -> torch.Tensor:
        """``[n_items, d']`` item vectors: ``full_sort_predict == user_vectors @ item_vectors().T``."""
        raise NotImplementedError(f"{type(self).__name__} does not expose dot-product user/item vectors")

    def unknown_item_vector(self) -> torch.Tensor:
        """``[d']`` the item vector of an item without a trained ID embedding."""
        raise NotImplementedError(f"{type(self).__name__} does not expose dot-product user/item vectors")

    def cold_item_embedding(self) -> torch.Tensor | None:
        """``[d]`` the encoder-input embedding of a cold item (a visible position whose id is negative: an
        item without a trained ID embedding); None: the model has no cold-item treatment (its :meth:`encode`
        refuses cold items, and Laser's M-Former export does not support it)."""
        return None

    def input_embeddings(self, item_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``[B, N, d]`` the encoder's input embeddings of left-padded item indices + mask (:meth:`embed_tokens` of
        the tokens), the cold items' (``mask`` set, id negative) being :meth:`cold_item_embedding`. No
        data-dependent branch: the ONNX export traces it."""
        mask = mask.bool()
        cold = mask & (item_ids < 0)
        emb = self.embed_tokens(tokens_from_ids(item_ids, mask & ~cold))
        unknown = self.cold_item_embedding()
        if unknown is None:
            raise NotImplementedError(f"{type(self).__name__} has no cold-item embedding")
        return torch.where(cold[..., None], unknown.to(emb.dtype), emb)

    # -- helpers -------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        """Where the model's weights are (the CPU for a model without any)."""
        for t in (*self.parameters(), *self.buffers()):
            return t.device
        return torch.device("cpu")

    def predict_batch(self, histories: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
        """Inference batch for histories of item indices (time-ascending)."""
        return {"input_ids": pad_left(histories, self.config.max_len)}

    def predict_inputs(self, histories: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
        """:meth:`predict_batch` on the model's device (a frozen encoder moved to a GPU with Laser is scored
        there)."""
        return {k: v.to(self.device) for k, v in self.predict_batch(histories).items()}

    @torch.no_grad()
    def score(self, histories: Sequence[Sequence[int]]) -> torch.Tensor:
        """``[B, n_items]`` scores for histories of item indices (eval mode, no grad)."""
        was_training = self.training
        self.eval()
        try:
            return self.full_sort_predict(self.predict_inputs(histories))
        finally:
            self.train(was_training)

    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


def next_item_loss(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    item_weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    n_negatives: int | None = None,
) -> torch.Tensor:
    """Softmax cross-entropy for the next item at every labelled position.

    ``hidden [B, N, d]``, ``labels [B, N]`` tokens (0 = no label), ``item_weight [n_items, d]``, ``bias
    [n_items]`` (optional, added to the logits). Logits are computed only at labelled positions.

    ``n_negatives=None``: the full softmax over all items. Otherwise the sampled softmax (as in eSASRec): the
    target against ``n_negatives`` items drawn uniformly (torch's global generator, which the trainer seeds per
    epoch) and shared by every position of the batch; a drawn item equal to a position's target is masked out of
    that position's softmax."""
    sel = labels > 0
    h, target = hidden[sel], labels[sel] - 1
    if n_negatives is None:
        logits = h @ item_weight.T
        if bias is not None:
            logits = logits + bias
        return nn.functional.cross_entropy(logits, target)
    negatives = torch.randint(0, item_weight.shape[0], (n_negatives,), device=h.device)
    pos = (h * item_weight[target]).sum(-1, keepdim=True)
    neg = h @ item_weight[negatives].T
    if bias is not None:
        pos = pos + bias[target][:, None]
        neg = neg + bias[negatives]
    neg = neg.masked_fill(negatives[None, :] == target[:, None], float("-inf"))
    logits = torch.cat([pos, neg], dim=1)
    return nn.functional.cross_entropy(logits, torch.zeros_like(target))
