"""Ranking over a whole catalogue, in numpy (no torch): the one implementation of history exclusion, top-k and
popularity counts that evaluation (:mod:`laser_core.metrics`), the ID models' popularity baseline, the batch
recommendations and online serving (:mod:`laser_core.serving`) share.

- :func:`masked_scores`: a float64 copy of ``[B, n_items]`` scores with NaN and each row's excluded items
  (e.g. the user's history) set to -inf;
- :func:`top_k`: the ``k`` best items per row, best first; ties are broken deterministically by the lower item
  index (the order of a stable sort, and of ONNX ``TopK``, which the exported scorer runs); excluded items
  score -inf and so come last;
- :func:`popularity_counts`: interaction counts per item from item-index sequences.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def as_numpy(x: Any) -> np.ndarray:
    """``x`` as a numpy array (a torch tensor is detached and copied to the CPU, without importing torch)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":  # numpy has no bfloat16
            x = x.float()
        x = x.numpy()
    return np.asarray(x)


def masked_scores(scores: Any, exclude: Sequence[Sequence[int]] | None = None) -> np.ndarray:
    """A float64 copy of the ``[B, n_items]`` ``scores`` with NaN, and per row the item indices in ``exclude``
    (``None``: none), set to -inf."""
    s = as_numpy(scores).astype(np.float64, copy=True)
    if s.ndim != 2:
        raise ValueError(f"scores must be 2-D [batch, n_items], got shape {s.shape}")
    s[np.isnan(s)] = -np.inf
    if exclude is not None:
        if len(exclude) != s.shape[0]:
            raise ValueError(f"exclude has {len(exclude)} rows but there are {s.shape[0]} score rows")
        for row, items in enumerate(exclude):
            if len(items):
                s[row, np.asarray(items, dtype=np.int64)] = -np.inf
    return s


def top_k(scores: Any, k: int, exclude: Sequence[Sequence[int]] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best items per row of ``[B, n_items]`` ``scores``: ``(indices int64 [B, k], scores float64
    [B, k])``, best first, ties by the lower index. ``exclude`` as in :func:`masked_scores` (those items score
    -inf: they come last, after every other item)."""
    s = masked_scores(scores, exclude)
    n = s.shape[1]
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= n:
        raise ValueError(f"k must be an integer in 1..{n} (the number of items), got {k!r}")
    kth = np.partition(s, n - k, axis=1)[:, n - k]  # the k-th best score of each row
    indices = np.empty((s.shape[0], k), dtype=np.int64)
    for row in range(s.shape[0]):
        candidates = np.flatnonzero(s[row] >= kth[row])  # ascending: a stable sort keeps ties by index
        indices[row] = candidates[np.argsort(-s[row, candidates], kind="stable")[:k]]
    return indices, np.take_along_axis(s, indices, axis=1)


def popularity_counts(sequences: Any, n_items: int) -> np.ndarray:
    """Interaction counts per item index ``[n_items]`` (float64) from item-index sequences (e.g. the training
    part of a split: ``split.train``): the popularity baseline's scores and the bundle's popularity fallback."""
    counts = np.zeros(int(n_items), dtype=np.float64)
    for seq in sequences:
        seq = np.asarray(seq, dtype=np.int64)
        if len(seq) and (seq.min() < 0 or seq.max() >= n_items):
            raise ValueError(
                f"a sequence holds item index {int(seq.max() if seq.max() >= n_items else seq.min())}"
                f" outside 0..{n_items - 1}"
            )
        np.add.at(counts, seq, 1.0)
    return counts
