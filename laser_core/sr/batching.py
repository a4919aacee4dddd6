"""Turning item-index histories into padded token tensors.

Token ids: ``0`` = padding, item index ``i`` -> token ``i + 1``, BERT4Rec's mask token = ``n_items + 1``.
Sequences are LEFT-padded to a fixed length, so the most recent item is always the last position.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from laser_core import collate

PAD = 0


def pad_left(histories: Sequence[Sequence[int]], max_len: int, offset: int = 1) -> torch.Tensor:
    """``[B, W]`` int64 tokens: the last ``max_len`` items of each history, shifted by ``offset``, left-padded
    with ``PAD`` to ``W = min(max_len, longest history)`` (positions count from the end, so the width does not
    matter to the models; short batches just cost less). The padding is :func:`laser_core.collate.pad_left`."""
    items, mask = collate.pad_left([np.asarray(h, dtype=np.int64)[max(0, len(h) - max_len) :] for h in histories])
    return torch.from_numpy(np.where(mask.astype(bool), items + offset, PAD))


def tokens_from_ids(item_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Item indices + validity mask -> tokens (``PAD`` where ``mask`` is False)."""
    return torch.where(mask.bool(), item_ids.long() + 1, torch.zeros_like(item_ids, dtype=torch.long))


def windows(seq: np.ndarray, length: int) -> list[np.ndarray]:
    """Cut a long sequence into consecutive windows of ``length`` from its end (the first may be shorter),
    so that every item of a long history contributes to training, not only the last ``length``."""
    if len(seq) <= length:
        return [seq]
    out = []
    end = len(seq)
    while end > 0:
        out.append(seq[max(0, end - length) : end])
        end -= length - 1 if length > 1 else 1  # overlap one item so every transition is kept
        if end <= 1:
            break
    return out[::-1]
