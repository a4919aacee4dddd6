"""Batch inference: a stored model version's top-k for every (or selected) user of the current data.

The recommendations come from the version's exported bundle (``scorer_bundle``), through the online service's
:class:`laser_core.serving.Recommender`: the same ONNX user tower, scorer, history exclusion and ties, so a
user's batch top-k is what the service answers for the same history (tests/test_serving_core.py)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any

import numpy as np
import pandas as pd
from zenml import step
from zenml.logger import get_logger

from laser_core.bundle import ExportBundle
from laser_core.config import BatchConfig
from laser_core.data.model import SeqDataset
from laser_core.serving import Recommender
from steps.materializers import DataFrameMaterializer

logger = get_logger(__name__)


def map_histories(
    dataset: SeqDataset, catalogue: pd.DataFrame, users: list[str] | None
) -> tuple[list[str], list[np.ndarray], dict[str, Any]]:
    """Each selected user's whole sequence in ``dataset``, as row indices of the model's ``catalogue``.
    Items the model has never seen are dropped (counted); users left with no known item are skipped."""
    row = {item: i for i, item in enumerate(catalogue["item_id"].astype(str))}
    ids = dataset.items["item_id"].astype(str).tolist()
    index = {u: n for n, u in enumerate(dataset.users)}
    if users is not None:
        missing = [u for u in users if u not in index]
        if missing:
            raise ValueError(f"batch.users (--user): {len(missing)} user id(s) not in the data, e.g. {missing[:5]}")
    chosen = users if users is not None else list(dataset.users)
    out_users, out_hist, dropped, skipped = [], [], 0, []
    for u in chosen:
        seq = [row.get(ids[i]) for i in dataset.sequences[index[u]]]
        known = [r for r in seq if r is not None]
        dropped += len(seq) - len(known)
        if not known:
            skipped.append(u)
            continue
        out_users.append(u)
        out_hist.append(np.asarray(known, dtype=np.int64))
    return (
        out_users,
        out_hist,
        {
            "users": len(out_users),
            "unknown_items_dropped": dropped,
            "users_skipped": len(skipped),
            "skipped_examples": skipped[:10],
        },
    )


def recommendations_frame(
    rec: Recommender,
    users: Sequence[str],
    histories: Sequence[np.ndarray],
    k: int,
    exclude_history: bool,
    model_version: str = "",
) -> pd.DataFrame:
    """``user_id, rank, item_id, title, score, model_version``: :meth:`Recommender.recommend` for each user's
    history of catalogue rows (the online service's answer for that history, item for item)."""
    ids = rec.catalogue["item_id"].to_numpy()
    rows = []
    for user, hist in zip(users, histories):
        answer = rec.recommend([str(i) for i in ids[np.asarray(hist, dtype=np.int64)]], k, exclude_history)
        rows.extend((user, it.rank, it.item_id, it.title, it.score, model_version) for it in answer.items)
    columns = ["user_id", "rank", "item_id", "title", "score", "model_version"]
    return pd.DataFrame(rows, columns=columns).astype({"rank": np.int64, "score": np.float32})


@step(output_materializers={"recommendations": DataFrameMaterializer})
def batch_recommend(
    dataset: SeqDataset,
    scorer_bundle: ExportBundle,
    batch_config: BatchConfig,
    model_version: str = "",
) -> Annotated[pd.DataFrame, "recommendations"]:
    """Top-k per user (``user_id, rank, item_id, title, score, model_version``) from the stored model's bundle,
    as the online service answers (:func:`recommendations_frame`)."""
    cfg = batch_config
    rec = Recommender.load(scorer_bundle.path)
    users, histories, info = map_histories(dataset, rec.catalogue, cfg.users)
    if not users:
        raise ValueError("batch_recommend: no user has an item the model knows")
    frame = recommendations_frame(rec, users, histories, cfg.k, cfg.exclude_history, model_version)
    logger.info("Recommendations for %d users (%s)", len(users), info)
    return frame
