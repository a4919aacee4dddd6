"""Leave-one-out split (LASER_SPEC.md §3).

For a user with sequence ``i_1 .. i_N`` and ``N >= 3``: training = ``i_1 .. i_{N-2}``, validation target
``i_{N-1}`` (history = the training part), test target ``i_N`` (history = training + validation item).
Users with fewer than 3 items are kept for training only and counted in the report. This is exactly what
RecFormer's ``process.py`` wrote into ``train/val/test.json``, so the split of that format is reproduced.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from laser_core.artifact import read_meta, write_meta
from laser_core.data.model import SeqDataset

MIN_EVAL_LENGTH = 3
SPLIT_FORMAT = 1  # Split.save's folder (split.json's format_version)


@dataclass
class Split:
    """Per-user leave-one-out split. Indices refer to :attr:`SeqDataset.users` / items."""

    users: list[str]
    n_items: int
    train: list[np.ndarray]
    valid_target: np.ndarray  # int64, -1 where the user is train-only
    test_target: np.ndarray  # int64, -1 where the user is train-only

    @property
    def eval_users(self) -> np.ndarray:
        """Indices of users with a validation and a test target."""
        return np.flatnonzero(self.test_target >= 0)

    @property
    def train_only_users(self) -> np.ndarray:
        return np.flatnonzero(self.test_target < 0)

    def valid_examples(self) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
        """(user indices, histories, targets) for validation: history = training part."""
        users = self.eval_users
        return users, [self.train[u] for u in users], self.valid_target[users]

    def test_examples(self) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
        """(user indices, histories, targets) for test: history = training part + validation item."""
        users = self.eval_users
        hist = [np.append(self.train[u], self.valid_target[u]) for u in users]
        return users, hist, self.test_target[users]

    def report(self) -> dict:
        n_train_inter = int(sum(len(t) for t in self.train))
        return {
            "protocol": "leave-one-out (last = test, second-to-last = validation)",
            "users": len(self.users),
            "items": self.n_items,
            "eval_users": int(len(self.eval_users)),
            "train_only_users": int(len(self.train_only_users)),
            "min_length_for_eval": MIN_EVAL_LENGTH,
            "train_interactions": n_train_inter,
            "valid_interactions": int((self.valid_target >= 0).sum()),
            "test_interactions": int((self.test_target >= 0).sum()),
        }

    # ------------------------------------------------------------ storage
    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame(
            {
                "user_id": self.users,
                "train": [t.tolist() for t in self.train],
                "valid_target": self.valid_target,
                "test_target": self.test_target,
            }
        )

    @classmethod
    def from_frame(cls, frame: pd.DataFrame, n_items: int) -> "Split":
        return cls(
            users=[str(u) for u in frame["user_id"]],
            n_items=int(n_items),
            train=[np.asarray(t, dtype=np.int64) for t in frame["train"]],
            valid_target=frame["valid_target"].to_numpy(dtype=np.int64),
            test_target=frame["test_target"].to_numpy(dtype=np.int64),
        )

    def save(self, directory: str | Path) -> Path:
        """``split.parquet`` (:meth:`to_frame`) and ``split.json`` (``n_items``) in ``directory``."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        self.to_frame().to_parquet(d / "split.parquet", index=False)
        write_meta(d / "split.json", {"n_items": self.n_items}, SPLIT_FORMAT)
        return d

    @classmethod
    def load(cls, directory: str | Path) -> "Split":
        d = Path(directory)
        meta = read_meta(d / "split.json", SPLIT_FORMAT, "Split")
        return cls.from_frame(pd.read_parquet(d / "split.parquet"), n_items=meta["n_items"])


def leave_one_out(dataset: SeqDataset) -> Split:
    """Split every user's sequence; users with < 3 items stay in training only."""
    n = dataset.n_users
    valid = np.full(n, -1, dtype=np.int64)
    test = np.full(n, -1, dtype=np.int64)
    train: list[np.ndarray] = []
    for u, seq in enumerate(dataset.sequences):
        if len(seq) >= MIN_EVAL_LENGTH:
            train.append(seq[:-2].copy())
            valid[u] = seq[-2]
            test[u] = seq[-1]
        else:
            train.append(seq.copy())
    return Split(users=list(dataset.users), n_items=dataset.n_items, train=train, valid_target=valid, test_target=test)
