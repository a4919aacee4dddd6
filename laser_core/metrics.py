"""Full-ranking metrics: Recall@K, NDCG@K, MRR (whole ranking) and MRR@K. One path for every model.

Each row of ``scores`` ranks the whole catalogue for one user; ``targets`` holds the single held-out item.
With one relevant item, Recall@K = HR@K = [rank <= K], NDCG@K = [rank <= K] / log2(rank + 1), MRR = 1/rank and
MRR@K = [rank <= K] / rank.

**Ties.** A model must not gain from ties (a constant scorer would otherwise rank every target first).
``ties="expected"`` (default) reports the exact expectation under a uniformly random order among tied items:
with ``g`` items scoring strictly higher and ``e`` other items scoring equal, the rank is uniform on
``g+1 .. g+e+1``. ``"pessimistic"`` uses rank ``g+e+1``; ``"optimistic"`` uses ``g+1``.

**History masking.** ``exclude`` (default ``None``, as in the paper's protocol) gives per row the item indices
to drop from the ranking (set to -inf) before ranking, e.g. the user's history. A target that is itself
excluded scores -inf and so ranks last; reports say whether masking was on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from laser_core.ranking import as_numpy, masked_scores

Ties = Literal["expected", "pessimistic", "optimistic"]
DEFAULT_KS = (5, 10, 20)


def target_ranks(scores, targets, exclude: Sequence[Sequence[int]] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(greater, equal)``: per row, how many items score strictly above the target, and how many
    *other* items tie with it. NaN scores are treated as -inf; ``exclude`` is masked by
    :func:`laser_core.ranking.masked_scores`, as the recommendations' history exclusion is."""
    t = as_numpy(targets).astype(np.int64).reshape(-1)
    if exclude is not None and len(exclude) != len(t):
        raise ValueError(f"exclude has {len(exclude)} rows but there are {len(t)} targets")
    s = masked_scores(scores, exclude)  # (rows that disagree with the targets' are reported below)
    if len(t) != s.shape[0]:
        raise ValueError(f"{s.shape[0]} score rows but {len(t)} targets")
    if len(t) and (t.min() < 0 or t.max() >= s.shape[1]):
        raise ValueError(f"targets must lie in 0..{s.shape[1] - 1}")
    rows = np.arange(len(t))
    target_scores = s[rows, t][:, None]
    greater = (s > target_scores).sum(axis=1)
    equal = (s == target_scores).sum(axis=1) - 1
    return greater.astype(np.int64), equal.astype(np.int64)


def _harmonic(n: np.ndarray) -> np.ndarray:
    """H(n) = sum_{r=1..n} 1/r for integer arrays (exact below 10^6, asymptotic beyond)."""
    n = np.asarray(n, dtype=np.float64)
    out = np.empty_like(n)
    small = n < 1_000_000
    if small.any():
        table = np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, int(n[small].max()) + 1))])
        out[small] = table[n[small].astype(np.int64)]
    big = ~small
    if big.any():
        m = n[big]
        out[big] = np.log(m) + 0.5772156649015329 + 1 / (2 * m) - 1 / (12 * m**2)
    return out


def rank_metrics(
    greater: np.ndarray, equal: np.ndarray, ks: Sequence[int] = DEFAULT_KS, ties: Ties = "expected"
) -> dict[str, np.ndarray]:
    """Per-row metrics from ``target_ranks``' counts."""
    g = np.asarray(greater, dtype=np.int64)
    e = np.asarray(equal, dtype=np.int64)
    if ties == "pessimistic":
        g, e = g + e, np.zeros_like(e)
    elif ties == "optimistic":
        e = np.zeros_like(e)
    elif ties != "expected":
        raise ValueError(f"ties must be expected|pessimistic|optimistic, got {ties!r}")
    lo, hi = g + 1, g + e + 1  # rank is uniform on lo..hi
    count = (e + 1).astype(np.float64)
    out: dict[str, np.ndarray] = {"mrr": (_harmonic(hi) - _harmonic(lo - 1)) / count}
    for k in ks:
        top = np.minimum(hi, k)
        n_in = np.clip(top - lo + 1, 0, None)
        out[f"recall@{k}"] = n_in / count
        # sum of 1/log2(r+1) over r in lo..min(hi,k): at most k terms
        r = np.arange(1, k + 1)[None, :]
        inside = (r >= lo[:, None]) & (r <= top[:, None])
        out[f"ndcg@{k}"] = (inside / np.log2(r + 1)).sum(axis=1) / count
        out[f"mrr@{k}"] = (_harmonic(top) - _harmonic(np.minimum(lo - 1, top))) / count * (n_in > 0)
    return out


def compute_metrics(
    scores, targets, ks: Sequence[int] = DEFAULT_KS, exclude=None, ties: Ties = "expected"
) -> dict[str, float]:
    """Mean metrics over the rows of one score matrix."""
    acc = RankingAccumulator(ks=tuple(ks), ties=ties)
    acc.add(scores, targets, exclude=exclude)
    return acc.result()


@dataclass
class RankingAccumulator:
    """Accumulates per-row metrics over batches; ``result()`` gives means over all rows seen."""

    ks: tuple[int, ...] = DEFAULT_KS
    ties: Ties = "expected"
    _sums: dict[str, float] = field(default_factory=dict)
    _n: int = 0

    def add(self, scores, targets, exclude=None) -> None:
        greater, equal = target_ranks(scores, targets, exclude)
        for name, values in rank_metrics(greater, equal, self.ks, self.ties).items():
            self._sums[name] = self._sums.get(name, 0.0) + float(values.sum())
        self._n += len(greater)

    @property
    def count(self) -> int:
        return self._n

    def result(self) -> dict[str, float]:
        if self._n == 0:
            raise ValueError("no rows were evaluated")
        return {name: total / self._n for name, total in sorted(self._sums.items())}
