"""Most-popular baseline: every user gets the items ranked by their training-interaction count."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from laser_core.ranking import popularity_counts
from laser_core.sr.base import SequentialRecommender
from laser_core.configuration import SRConfig


class Popularity(SequentialRecommender):
    trainable = False

    def __init__(self, config: SRConfig, n_items: int) -> None:
        super().__init__(config, n_items)
        self.register_buffer("counts", torch.zeros(n_items))

    def fit(self, sequences: Sequence[np.ndarray]) -> "Popularity":
        self.counts.copy_(torch.from_numpy(popularity_counts(sequences, self.n_items)))
        return self

    def full_sort_predict(self, batch):
        return self.counts[None].expand(batch["input_ids"].shape[0], -1).clone()

    def encode(self, item_ids, mask):
        raise TypeError("the popularity baseline has no per-position representation")
