"""Loader for a generic interactions table plus an items table (CSV or Parquet).

Interactions need a user column, an item column and (optionally) a timestamp column; items need an item
column and a title, with brand and category optional. Column names are configurable. Rows are ordered per
user by timestamp (stable, so equal times keep file order), or by file order when there is no timestamp.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from laser_core.data.errors import DataFormatError
from laser_core.data.model import SeqDataset, build_items_frame


@dataclass
class TableColumns:
    user: str = "user_id"
    item: str = "item_id"
    timestamp: str | None = "timestamp"
    title: str = "title"
    brand: str = "brand"
    category: str = "category"


def _read(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise DataFormatError(path, "file not found")
    try:
        if path.suffix == ".parquet":
            return pd.read_parquet(path)
        return pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""])
    except (pd.errors.ParserError, ValueError, OSError) as exc:
        raise DataFormatError(path, f"cannot parse table: {exc}") from exc


def _row_error(path: Path, frame: pd.DataFrame, mask: pd.Series, column: str, message: str) -> None:
    if mask.any():
        first = int(np.flatnonzero(mask.to_numpy())[0])
        # CSV: header is line 1, so data row k (0-based) is on line k + 2
        where = {"line": first + 2} if path.suffix != ".parquet" else {"record": f"row {first}"}
        raise DataFormatError(path, f"{message} ({int(mask.sum())} rows)", field=column, **where)


def load_table(
    interactions: str | Path, items: str | Path, columns: TableColumns | None = None, name: str | None = None
) -> SeqDataset:
    cols = columns or TableColumns()
    ipath, mpath = Path(interactions), Path(items)
    inter = _read(ipath)
    meta = _read(mpath)
    for path, frame, need in ((ipath, inter, [cols.user, cols.item]), (mpath, meta, [cols.item, cols.title])):
        missing = [c for c in need if c not in frame.columns]
        if missing:
            raise DataFormatError(path, f"missing required columns {missing}; has {list(frame.columns)}")
    for c in (cols.user, cols.item):
        _row_error(ipath, inter, inter[c].isna(), c, "empty value")
    _row_error(mpath, meta, meta[cols.item].isna(), cols.item, "empty item id")
    meta_ids = meta[cols.item].astype(str)
    _row_error(mpath, meta, meta_ids.duplicated(), cols.item, "duplicate item id")

    has_ts = cols.timestamp is not None and cols.timestamp in inter.columns
    if has_ts:
        raw_ts = inter[cols.timestamp]
        ts = pd.to_numeric(raw_ts, errors="coerce")
        if ts.isna().any():  # allow ISO-8601 dates as well as Unix seconds
            parsed = pd.to_datetime(raw_ts.where(ts.isna()), errors="coerce", utc=True, format="ISO8601")
            ts = ts.fillna((parsed - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1))
        _row_error(ipath, inter, ts.isna(), cols.timestamp, "timestamp is neither a number nor a date")
        inter = inter.assign(_ts=ts.astype("int64"))

    item_idx = pd.Series(np.arange(len(meta)), index=meta_ids.to_numpy())
    inter_items = inter[cols.item].astype(str)
    _row_error(ipath, inter, ~inter_items.isin(item_idx.index), cols.item, "item not in the items table")
    inter = inter.assign(
        _idx=item_idx.loc[inter_items.to_numpy()].to_numpy(),
        _user=inter[cols.user].astype(str),
        _row=np.arange(len(inter)),
    )
    order = ["_user", "_ts", "_row"] if has_ts else ["_user", "_row"]
    users_in_order = pd.unique(inter["_user"])
    inter = inter.sort_values(order, kind="stable")
    groups = dict(tuple(inter.groupby("_user", sort=False)))
    users, sequences, timestamps = [], [], []
    for u in users_in_order:
        g = groups[u]
        users.append(u)
        sequences.append(g["_idx"].to_numpy(dtype=np.int64))
        if has_ts:
            timestamps.append(g["_ts"].to_numpy(dtype=np.int64))

    def opt(c: str) -> list:
        return meta[c].tolist() if c in meta.columns else [""] * len(meta)

    items_frame = build_items_frame(meta_ids.tolist(), meta[cols.title].tolist(), opt(cols.brand), opt(cols.category))
    return SeqDataset(
        name=name or ipath.stem,
        items=items_frame,
        users=users,
        sequences=sequences,
        timestamps=timestamps if has_ts else None,
        source={"format": "table", "interactions": str(ipath.resolve()), "items": str(mpath.resolve())},
    )
