"""Loader for a generic interactions table plus an items table (CSV or Parquet).

Interactions need a user column, an item column and (optionally) a timestamp column; items need an item
column and a title, with brand and category optional. Column names are configurable. Rows are ordered per
user by timestamp (stable, so equal times keep file order), or by file order when there is no timestamp.

Timestamps become integer seconds since the Unix epoch (UTC), whatever form they come in:

* numbers (int or float columns, numeric CSV text) are taken as seconds; a fraction is floored;
* datetimes (a Parquet ``timestamp`` column of any unit, time-zone aware or naive = UTC) are converted;
* ISO-8601 text (``2024-01-01``, ``2024-01-01T12:00:00+02:00``; naive = UTC) is parsed and converted.

A missing, non-finite (``inf``, ``nan``) or out-of-range value (beyond year 9999 in seconds, e.g. milliseconds
or ``1e30``) is refused with a :class:`DataFormatError` naming the file, the CSV line (the header is line 1) or
the Parquet row (1-based), and the column.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from laser_core.data.errors import DataFormatError
from laser_core.data.io import MAX_TIMESTAMP, TIMESTAMP_RANGE
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
    """Raise for the first row where ``mask`` is true: its CSV line (header = line 1) or Parquet row (1-based).
    ``message`` may hold ``{value}``, filled with that row's value of ``column``."""
    if mask.any():
        first = int(np.flatnonzero(mask.to_numpy())[0])
        # CSV: header is line 1, so data row k (0-based) is on line k + 2
        where = {"line": first + 2} if path.suffix != ".parquet" else {"row": first + 1}
        value = frame[column].iloc[first]
        message = message.format(value=(repr(value) if isinstance(value, str) else str(value))[:60])
        raise DataFormatError(path, f"{message} ({int(mask.sum())} rows)", field=column, **where)


_EPOCH = pd.Timestamp(0, tz="UTC")


def _datetime_seconds(values: pd.Series) -> pd.Series:
    """Seconds since the epoch of a datetime64 series of any unit, naive (read as UTC) or tz-aware; NaT gives NaN."""
    utc = values.dt.tz_convert("UTC") if values.dt.tz is not None else values.dt.tz_localize("UTC")
    return (utc - _EPOCH) // pd.Timedelta(seconds=1)


def timestamp_seconds(path: Path, frame: pd.DataFrame, column: str) -> pd.Series:
    """The ``column`` of ``frame`` as int64 seconds since the epoch (see the module docstring), or a
    :class:`DataFormatError` naming the first bad row."""
    raw = frame[column]
    if pd.api.types.is_timedelta64_dtype(raw):
        _row_error(path, frame, pd.Series(True, index=raw.index), column, "timestamp {value} is a duration, not a time")
    if pd.api.types.is_datetime64_any_dtype(raw):
        ts = _datetime_seconds(raw)
    else:
        if pd.api.types.is_bool_dtype(raw):
            _row_error(path, frame, raw.notna(), column, "timestamp {value} is a boolean, not a number or a date")
        ts = pd.to_numeric(raw, errors="coerce")
        text = ts.isna() & raw.notna()
        if text.any():  # ISO-8601 dates as well as Unix seconds
            parsed = pd.to_datetime(raw.where(text), errors="coerce", utc=True, format="ISO8601")
            ts = ts.astype("float64").fillna(_datetime_seconds(parsed))
    _row_error(path, frame, raw.isna(), column, "missing timestamp")
    _row_error(path, frame, ts.isna(), column, "timestamp {value} is neither a number nor a date")
    values = ts.to_numpy(dtype="float64")
    _row_error(path, frame, pd.Series(~np.isfinite(values)), column, "timestamp {value} is not a finite number")
    _row_error(
        path,
        frame,
        pd.Series(np.abs(values) > MAX_TIMESTAMP),
        column,
        f"timestamp {{value}} is out of range: {TIMESTAMP_RANGE}",
    )
    if ts.dtype.kind in "iu":
        return ts.astype("int64")
    return pd.Series(np.floor(values).astype("int64"), index=ts.index)


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
        inter = inter.assign(_ts=timestamp_seconds(ipath, inter, cols.timestamp))

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
