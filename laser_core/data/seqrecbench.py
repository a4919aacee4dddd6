"""Loader for SeqRecBenchmark's JSON-lines export.

``user2item.jsonl.gz``: one line per user ``{"UserID", "ItemID": [...], "Timestamp": [...]}`` (time-ascending);
``item2title.jsonl.gz``: one line per item ``{"ItemID", "Title"}``. Titles only: brand and category are empty.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from laser_core.data.errors import DataFormatError
from laser_core.data.io import check_timestamp, iter_jsonl, require
from laser_core.data.model import SeqDataset, build_items_frame

USERS_FILE = "user2item.jsonl.gz"
ITEMS_FILE = "item2title.jsonl.gz"


def looks_like(path: Path) -> bool:
    return (path / USERS_FILE).is_file() and (path / ITEMS_FILE).is_file()


def load_seqrecbench(path: str | Path, name: str | None = None) -> SeqDataset:
    root = Path(path)
    if not root.is_dir():
        raise DataFormatError(root, "not a directory")
    items_path = root / ITEMS_FILE
    item_ids: list[int] = []
    titles: list[str] = []
    index: dict[int, int] = {}
    for lineno, rec in iter_jsonl(items_path):
        iid = require(rec, "ItemID", items_path, line=lineno, types=int)
        title = require(rec, "Title", items_path, line=lineno, types=(str, type(None)))
        if iid in index:
            raise DataFormatError(
                items_path, f"duplicate ItemID {iid} (first on an earlier line)", line=lineno, field="ItemID"
            )
        index[iid] = len(item_ids)
        item_ids.append(iid)
        titles.append(title)
    items = build_items_frame(item_ids, titles, [""] * len(item_ids), [""] * len(item_ids))

    users_path = root / USERS_FILE
    users: list[str] = []
    sequences: list[np.ndarray] = []
    timestamps: list[np.ndarray] = []
    seen: set[str] = set()
    for lineno, rec in iter_jsonl(users_path):
        uid = str(require(rec, "UserID", users_path, line=lineno, types=(int, str)))
        seq = require(rec, "ItemID", users_path, line=lineno, types=list)
        ts = require(rec, "Timestamp", users_path, line=lineno, types=list)
        if uid in seen:
            raise DataFormatError(users_path, f"duplicate UserID {uid}", line=lineno, field="UserID")
        seen.add(uid)
        if len(seq) != len(ts):
            raise DataFormatError(
                users_path, f"{len(seq)} items but {len(ts)} timestamps", line=lineno, field="Timestamp"
            )
        try:
            idx = [index[i] for i in seq]
        except (KeyError, TypeError):
            bad = next(i for i in seq if not isinstance(i, int) or i not in index)
            raise DataFormatError(
                users_path, f"item {bad!r} is not in {ITEMS_FILE}", line=lineno, field="ItemID"
            ) from None
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in ts):
            raise DataFormatError(
                users_path, "timestamps must be integers (Unix seconds)", line=lineno, field="Timestamp"
            )
        for t in ts:
            check_timestamp(t, users_path, line=lineno, field="Timestamp")
        if not seq:
            continue
        users.append(uid)
        sequences.append(np.asarray(idx, dtype=np.int64))
        timestamps.append(np.asarray(ts, dtype=np.int64))
    return SeqDataset(
        name=name or root.name,
        items=items,
        users=users,
        sequences=sequences,
        timestamps=timestamps,
        source={"format": "seqrecbench", "path": str(root.resolve())},
    )
