"""The one evaluation loop: full-ranking metrics for the ID models and Laser alike (validation and test).

Anything with RecBole's ``full_sort_predict`` contract is scored: an ID model
(:class:`laser_core.sr.base.SequentialRecommender`) or Laser over its item table
(:class:`laser_core.train.LaserScorer`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm.auto import tqdm

from laser_core.metrics import DEFAULT_KS, RankingAccumulator

if TYPE_CHECKING:
    from laser_core.data.split import Split
    from laser_core.sr.base import SequentialRecommender


@torch.no_grad()
def evaluate(
    model,
    histories: Sequence[np.ndarray],
    targets: np.ndarray,
    batch_size: int = 512,
    ks: Sequence[int] = DEFAULT_KS,
    mask_history: bool = False,
    progress: bool = False,
    desc: str = "evaluate",
) -> dict[str, float]:
    """Full-ranking metrics over all items for each (history, target) pair.

    ``model`` has the ``full_sort_predict`` contract: ``predict_inputs(histories)`` makes the batch,
    ``full_sort_predict(batch)`` scores it ``[B, n_items]``; ``training``/``eval()``/``train(mode)`` as a
    module's. A model with ``sort_by_length = True`` is fed length-sorted batches (less padding). With
    ``mask_history`` each user's history is excluded from the ranking (:func:`laser_core.ranking.masked_scores`,
    as the recommendations' ``exclude_history``)."""
    acc = RankingAccumulator(ks=tuple(ks))
    targets = np.asarray(targets)
    order = np.arange(len(histories))
    if getattr(model, "sort_by_length", False):
        order = np.argsort([len(h) for h in histories], kind="stable")
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(order), desc=desc, unit="user", disable=not progress, leave=False)
    try:
        for lo in range(0, len(order), batch_size):
            idx = order[lo : lo + batch_size]
            hist = [histories[i] for i in idx]
            scores = model.full_sort_predict(model.predict_inputs(hist))
            acc.add(scores, targets[idx], exclude=hist if mask_history else None)
            bar.update(len(idx))
    finally:
        bar.close()
        model.train(was_training)
    return acc.result()


def evaluate_split(
    model: SequentialRecommender,
    split: Split,
    which: str = "test",
    batch_size: int = 512,
    ks: Sequence[int] = DEFAULT_KS,
    mask_history: bool = False,
) -> dict[str, float]:
    """``which="valid"``: history = training part; ``"test"``: training part + validation item."""
    if which not in ("valid", "test"):
        raise ValueError("which must be 'valid' or 'test'")
    _, hist, targets = split.valid_examples() if which == "valid" else split.test_examples()
    return evaluate(model, hist, targets, batch_size, ks, mask_history)


__all__ = ["evaluate", "evaluate_split"]
