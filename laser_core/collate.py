"""From histories to a batch of padded arrays: the one left-padding implementation (numpy, no torch).

A :class:`LaserBatch` holds what :meth:`laser_core.model.LaserModel.forward` reads, and what ``user_tower.onnx``
takes as inputs (same names): ``input_ids``/``attention_mask`` ``[B, T]`` (the texts' token ids, left-padded to
the batch's longest), ``item_ids``/``item_mask`` ``[B, L]`` (the most recent ``L`` = SR ``max_len`` item
indices, left-padded to ``L``; only for a model that reads the item-id history; a negative id at a visible
position is a cold item) and ``item_side`` ``[B]`` (1: embed the row as an item-table row). All int64.

:class:`LaserCollator` builds it from token ids and item histories; training, evaluation, the item table, the
export and serving (torch-free: this module imports torch only in :meth:`LaserBatch.to_torch`) all use it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np

#: the user tower's inputs, in graph order (those a tower lacks are left out; see laser_core.export)
TOWER_INPUTS = ("item_ids", "item_mask", "input_ids", "attention_mask", "item_side")


def pad_left(
    seqs: Iterable[Sequence[int]], length: int | None = None, pad_value: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """``(values, mask)`` ``[B, W]`` int64: each sequence's last ``W`` values at the right end of its row, the
    rest ``pad_value`` (mask 0). ``W`` is ``length``, or the longest sequence's length (at least 1)."""
    rows = [np.asarray(s, dtype=np.int64).reshape(-1) for s in seqs]
    width = length if length is not None else max(1, max((len(r) for r in rows), default=0))
    values = np.full((len(rows), width), pad_value, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, row in enumerate(rows):
        row = row[len(row) - width :] if len(row) > width else row
        if len(row):
            values[i, width - len(row) :] = row
            mask[i, width - len(row) :] = 1
    return values, mask


@dataclass
class LaserBatch:
    """One batch for :meth:`LaserModel.forward <laser_core.model.LaserModel.forward>`: numpy arrays from the
    collator, or torch tensors (:meth:`to_torch`, or the ONNX tower's traced inputs). ``item_ids``/``item_mask``
    are None for a model that does not read the item-id history; ``item_side`` None: every row is a user."""

    input_ids: Any
    attention_mask: Any
    item_ids: Any = None
    item_mask: Any = None
    item_side: Any = None

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def to_torch(self, device: Any = None) -> "LaserBatch":
        """The batch as int64 torch tensors on ``device`` (tensors already there are kept as they are)."""
        import torch

        def move(x: Any) -> Any:
            if x is None:
                return None
            t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x, dtype=np.int64))
            return t if device is None else t.to(device)

        return replace(self, **{f.name: move(getattr(self, f.name)) for f in fields(self)})

    def feeds(self, names: Sequence[str]) -> dict[str, np.ndarray]:
        """The ONNX user tower's inputs ``names`` (a subset of :data:`TOWER_INPUTS`) from a numpy batch."""
        missing = [n for n in names if getattr(self, n, None) is None]
        if missing:
            raise ValueError(f"the batch has no {missing} (the tower's inputs are {list(names)})")
        return {n: np.asarray(getattr(self, n), dtype=np.int64) for n in names}


@dataclass(frozen=True)
class LaserCollator:
    """Histories to a :class:`LaserBatch`. ``pad_token_id``: the text padding id (the tokenizer's pad token, or
    its EOS); ``sr_max_len``: the SR encoder's input length ``L``, None for a model that does not read item ids
    (then the batch has no ``item_ids``/``item_mask``)."""

    pad_token_id: int
    sr_max_len: int | None = None

    def pad_tokens(self, token_ids: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
        """``(input_ids, attention_mask)`` ``[B, T]``, left-padded to the longest text."""
        if not len(token_ids):
            raise ValueError("an empty batch")
        return pad_left(token_ids, None, self.pad_token_id)

    def pad_items(self, histories: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
        """``(item_ids, item_mask)`` ``[B, L]``: the most recent ``L`` items, left-padded with 0 (mask 0)."""
        if self.sr_max_len is None:
            raise ValueError("this collator has no SR input (sr_max_len is None)")
        return pad_left(histories, self.sr_max_len, 0)

    def __call__(
        self,
        token_ids: Sequence[Sequence[int]],
        histories: Sequence[Sequence[int]] | None = None,
        item_side: Sequence[int] | np.ndarray | None = None,
    ) -> LaserBatch:
        """The batch of rows ``token_ids`` (their texts' token ids) and ``histories`` (their item indices; read
        when the model reads item ids); ``item_side``: per row, 1 for an item-table row."""
        input_ids, attention_mask = self.pad_tokens(token_ids)
        item_ids = item_mask = None
        if self.sr_max_len is not None:
            if histories is None or len(histories) != len(token_ids):
                raise ValueError("a model that reads item ids needs one item history per row")
            item_ids, item_mask = self.pad_items(histories)
        side = None if item_side is None else np.asarray(item_side, dtype=np.int64).reshape(len(token_ids))
        return LaserBatch(input_ids, attention_mask, item_ids, item_mask, side)
