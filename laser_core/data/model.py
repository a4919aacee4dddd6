"""The canonical data model: an item catalogue and per-user, time-ordered item sequences.

Every loader produces a :class:`SeqDataset`. Items are addressed internally by a dense index
``0 .. n_items-1`` (the row of :attr:`SeqDataset.items`); the original id is kept as ``item_id``.
Users keep their original id (a string) and their position in :attr:`SeqDataset.users`.
"""

from __future__ import annotations

import hashlib
import html
import re
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

ITEM_COLUMNS = ("item_id", "title", "brand", "category")
INTERACTION_COLUMNS = ("user_id", "item_id", "item_idx", "position", "timestamp")

_WS = re.compile(r"\s+")


def normalize_text(value: object) -> str:
    """Unescape HTML entities (one pass: ``&amp;amp;`` becomes ``&amp;``, as the source wrote it) and collapse
    whitespace. Apply it once per raw value: it is not idempotent on text that still holds an entity.

    ``None`` and NaN become the empty string; lists (e.g. Amazon category paths) are joined with spaces.
    """
    if value is None:
        return ""
    if isinstance(value, float) and np.isnan(value):
        return ""
    if isinstance(value, (list, tuple)):
        return _WS.sub(" ", " ".join(normalize_text(v) for v in value)).strip()
    return _WS.sub(" ", html.unescape(str(value))).strip()


@dataclass
class SeqDataset:
    """A catalogue plus one chronologically ordered item sequence per user.

    Attributes:
        name: a short name for reports ("scientific", "synthetic", ...).
        items: DataFrame with columns ``item_id, title, brand, category`` (strings, normalised);
            row ``i`` describes internal item index ``i``.
        users: original user ids, one per sequence.
        sequences: ``sequences[u]`` is an int64 array of item indices in time order.
        timestamps: ``timestamps[u]`` (int64 Unix seconds, same length) or ``None`` when the source has
            only the order (e.g. the RecFormer format).
        source: free-form provenance (format, path, options) kept in reports and artifact metadata.
    """

    name: str
    items: pd.DataFrame
    users: list[str]
    sequences: list[np.ndarray]
    timestamps: list[np.ndarray] | None = None
    source: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        missing = [c for c in ITEM_COLUMNS if c not in self.items.columns]
        if missing:
            raise ValueError(f"items table lacks columns {missing}")
        self.items = self.items.loc[:, list(ITEM_COLUMNS)].reset_index(drop=True)
        if len(self.users) != len(self.sequences):
            raise ValueError(f"{len(self.users)} users but {len(self.sequences)} sequences")
        self.sequences = [np.asarray(s, dtype=np.int64) for s in self.sequences]
        if self.timestamps is not None:
            if len(self.timestamps) != len(self.sequences):
                raise ValueError("timestamps and sequences differ in number of users")
            self.timestamps = [np.asarray(t, dtype=np.int64) for t in self.timestamps]
            for u, (s, t) in enumerate(zip(self.sequences, self.timestamps)):
                if len(s) != len(t):
                    raise ValueError(f"user {self.users[u]!r}: {len(s)} items but {len(t)} timestamps")

    # ----------------------------------------------------------------- sizes
    @property
    def n_users(self) -> int:
        return len(self.users)

    @property
    def n_items(self) -> int:
        return len(self.items)

    @property
    def n_interactions(self) -> int:
        return int(sum(len(s) for s in self.sequences))

    @property
    def has_timestamps(self) -> bool:
        return self.timestamps is not None

    # ------------------------------------------------------------ long form
    def interactions_frame(self) -> pd.DataFrame:
        """One row per interaction: user_id, item_id, item_idx, position (0-based), timestamp (nullable)."""
        lengths = np.fromiter((len(s) for s in self.sequences), dtype=np.int64, count=len(self.sequences))
        user_rows = np.repeat(np.arange(len(self.users)), lengths)
        item_idx = np.concatenate(self.sequences) if self.sequences else np.zeros(0, dtype=np.int64)
        position = np.concatenate([np.arange(n) for n in lengths]) if len(lengths) else np.zeros(0, np.int64)
        users = np.asarray(self.users, dtype=object)
        item_ids = self.items["item_id"].to_numpy(dtype=object)
        frame = pd.DataFrame(
            {
                "user_id": users[user_rows] if len(users) else np.zeros(0, dtype=object),
                # an index outside the catalogue gives a null item_id, which validation reports
                "item_id": _lookup(item_ids, item_idx),
                "item_idx": item_idx,
                "position": position,
            }
        )
        if self.timestamps is not None:
            ts = np.concatenate(self.timestamps) if self.timestamps else np.zeros(0, dtype=np.int64)
            frame["timestamp"] = pd.array(ts, dtype="Int64")
        else:
            frame["timestamp"] = pd.array([pd.NA] * len(frame), dtype="Int64")
        return frame

    @classmethod
    def from_frames(
        cls, name: str, items: pd.DataFrame, interactions: pd.DataFrame, source: dict | None = None
    ) -> "SeqDataset":
        """Inverse of :meth:`interactions_frame` (used by the artifact materializer)."""
        inter = interactions.sort_values(["user_id", "position"], kind="stable")
        users, sequences, timestamps = [], [], []
        has_ts = inter["timestamp"].notna().any() if len(inter) else False
        # keep the user order of first appearance in the stored frame
        order = pd.unique(interactions["user_id"])
        grouped = {k: g for k, g in inter.groupby("user_id", sort=False)}
        for user in order:
            g = grouped[user]
            users.append(str(user))
            sequences.append(g["item_idx"].to_numpy(dtype=np.int64))
            if has_ts:
                timestamps.append(g["timestamp"].to_numpy(dtype=np.int64))
        return cls(
            name=name,
            items=items,
            users=users,
            sequences=sequences,
            timestamps=timestamps if has_ts else None,
            source=source or {},
        )

    # ---------------------------------------------------------- fingerprint
    def fingerprint(self) -> str:
        """A content hash of the catalogue and the sequences (stable across runs and machines)."""
        h = hashlib.sha256()
        for col in ITEM_COLUMNS:
            h.update("\x1f".join(self.items[col].astype(str)).encode("utf8"))
            h.update(b"\x1e")
        for user, seq in zip(self.users, self.sequences):
            h.update(user.encode("utf8"))
            h.update(seq.tobytes())
        if self.timestamps is not None:
            for ts in self.timestamps:
                h.update(ts.tobytes())
        return h.hexdigest()

    def stats(self) -> dict:
        """Users / items / interactions / average length, plus length extremes."""
        lengths = np.fromiter((len(s) for s in self.sequences), dtype=np.int64, count=len(self.sequences))
        return {
            "name": self.name,
            "users": self.n_users,
            "items": self.n_items,
            "interactions": self.n_interactions,
            "avg_length": float(lengths.mean()) if len(lengths) else 0.0,
            "min_length": int(lengths.min()) if len(lengths) else 0,
            "max_length": int(lengths.max()) if len(lengths) else 0,
            "has_timestamps": self.has_timestamps,
        }


def _lookup(values: np.ndarray, idx: np.ndarray) -> np.ndarray:
    out = np.full(len(idx), None, dtype=object)
    ok = (idx >= 0) & (idx < len(values))
    out[ok] = values[idx[ok]]
    return out


def build_items_frame(item_ids: list[str], titles: list, brands: list, categories: list) -> pd.DataFrame:
    """Items table with normalised text fields (HTML unescaped, whitespace collapsed)."""
    return pd.DataFrame(
        {
            "item_id": [str(i) for i in item_ids],
            "title": [normalize_text(t) for t in titles],
            "brand": [normalize_text(b) for b in brands],
            "category": [normalize_text(c) for c in categories],
        }
    )
