"""Batch inference: a stored model version's top-k for every (or selected) user of the current data."""

from __future__ import annotations

from typing import Annotated, Any

import numpy as np
import pandas as pd
from zenml import step
from zenml.logger import get_logger

from laser_core.data.model import SeqDataset
from laser_core.model import ItemTable, LaserWeights, build_laser
from laser_core.sr import SequentialRecommender
from laser_core.train import recommend
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
            raise ValueError(f"batch.users: {len(missing)} user id(s) not in the data, e.g. {missing[:5]}")
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


@step(output_materializers={"recommendations": DataFrameMaterializer})
def batch_recommend(
    dataset: SeqDataset,
    model_dataset: SeqDataset,
    sr_model: SequentialRecommender,
    laser_model: LaserWeights,
    item_table: ItemTable,
    batch_config: dict[str, Any],
    model_version: str = "",
) -> Annotated[pd.DataFrame, "recommendations"]:
    """Top-k per user (``user_id, rank, item_id, title, score, model_version``) from the stored model."""
    from laser_core.config import BatchConfig

    cfg = BatchConfig.model_validate(batch_config)
    model = build_laser(laser_model.spec, model_dataset.items, sr_model, weights=laser_model)
    users, histories, info = map_histories(dataset, model_dataset.items, cfg.users)
    if not users:
        raise ValueError("batch_recommend: no user has an item the model knows")
    top_i, top_s = recommend(model, item_table.table, histories, k=cfg.k, exclude_history=cfg.exclude_history)
    cat = model_dataset.items
    frame = pd.DataFrame(
        {
            "user_id": np.repeat(users, cfg.k),
            "rank": np.tile(np.arange(1, cfg.k + 1), len(users)),
            "item_id": cat["item_id"].to_numpy()[top_i.ravel()],
            "title": cat["title"].to_numpy()[top_i.ravel()],
            "score": top_s.ravel(),
            "model_version": model_version,
        }
    )
    logger.info("Recommendations for %d users (%s)", len(users), info)
    return frame
