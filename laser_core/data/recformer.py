"""Loader for the RecFormer/Laser fine-tuning format.

Files: ``train.json``, ``val.json``, ``test.json`` (``{user: [item ids]}``), ``smap.json`` (``{ASIN: id}``),
optional ``umap.json``, and item text in ``meta.json`` (``{id: {"input": [{title, brand, category}]}}``)
or ``meta_data.json`` (``{ASIN: {title, brand, category}}``). A user's sequence is
``train + val + test``; the files carry the order only, no timestamps.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from laser_core.data.errors import DataFormatError
from laser_core.data.io import read_json
from laser_core.data.model import SeqDataset, build_items_frame

REQUIRED = ("train.json", "val.json", "test.json", "smap.json")


def looks_like(path: Path) -> bool:
    return all((path / f).is_file() for f in REQUIRED)


def _mapping(path: Path) -> dict:
    data = read_json(path)
    if not isinstance(data, dict):
        raise DataFormatError(path, f"expected a JSON object at top level, got {type(data).__name__}")
    return data


def _item_text(root: Path, smap: dict[str, int]) -> tuple[Path, dict[int, dict]]:
    """Item text by internal id, from meta.json (id-keyed) or else meta_data.json (ASIN-keyed)."""
    by_id: dict[int, dict] = {}
    meta_path = root / "meta.json"
    if meta_path.is_file():
        meta = _mapping(meta_path)
        for key, value in meta.items():
            try:
                idx = int(key)
            except ValueError:
                raise DataFormatError(meta_path, "key is not an integer item id", record=key) from None
            rec = value
            if isinstance(value, dict) and "input" in value:
                inputs = value["input"]
                if not isinstance(inputs, list) or not inputs or not isinstance(inputs[0], dict):
                    raise DataFormatError(
                        meta_path, "expected a non-empty list of attribute objects", record=key, field="input"
                    )
                rec = inputs[0]
            if not isinstance(rec, dict):
                raise DataFormatError(meta_path, "expected an object of item attributes", record=key)
            by_id[idx] = rec
        return meta_path, by_id
    meta_path = root / "meta_data.json"
    if not meta_path.is_file():
        raise DataFormatError(root, "neither meta.json nor meta_data.json found (item text is required)")
    meta = _mapping(meta_path)
    for asin, rec in meta.items():
        if asin in smap:
            if not isinstance(rec, dict):
                raise DataFormatError(meta_path, "expected an object of item attributes", record=asin)
            by_id[smap[asin]] = rec
    return meta_path, by_id


def load_recformer(path: str | Path, name: str | None = None) -> SeqDataset:
    root = Path(path)
    if not root.is_dir():
        raise DataFormatError(root, "not a directory")
    smap_path = root / "smap.json"
    smap = _mapping(smap_path)
    for asin, idx in smap.items():
        if not isinstance(idx, int) or isinstance(idx, bool):
            raise DataFormatError(smap_path, f"item id must be an integer, got {idx!r}", record=asin)
    n_items = len(smap)
    ids = sorted(smap.values())
    if ids != list(range(n_items)):
        raise DataFormatError(smap_path, f"item ids must be exactly 0..{n_items - 1} (dense, unique)")
    asin_of = {idx: asin for asin, idx in smap.items()}

    meta_path, text = _item_text(root, smap)
    missing = [i for i in range(n_items) if i not in text]
    if missing:
        raise DataFormatError(
            meta_path,
            f"{len(missing)} items of smap.json have no text, e.g. ids "
            f"{missing[:5]} (ASINs {[asin_of[i] for i in missing[:5]]})",
        )

    def field_of(i: int, fld: str) -> object:
        value = text[i].get(fld, "")
        if value is not None and not isinstance(value, (str, list)):
            raise DataFormatError(meta_path, f"expected a string, got {type(value).__name__}", record=str(i), field=fld)
        return value

    items = build_items_frame(
        [asin_of[i] for i in range(n_items)],
        [field_of(i, "title") for i in range(n_items)],
        [field_of(i, "brand") for i in range(n_items)],
        [field_of(i, "category") for i in range(n_items)],
    )

    parts = {}
    for fname in ("train.json", "val.json", "test.json"):
        fpath = root / fname
        data = _mapping(fpath)
        for user, seq in data.items():
            if not isinstance(seq, list):
                raise DataFormatError(fpath, f"expected a list of item ids, got {type(seq).__name__}", record=user)
            for pos, item in enumerate(seq):
                if not isinstance(item, int) or isinstance(item, bool) or not 0 <= item < n_items:
                    raise DataFormatError(
                        fpath, f"position {pos}: item id {item!r} is not in smap.json (0..{n_items - 1})", record=user
                    )
        parts[fname] = data
    train, val, test = parts["train.json"], parts["val.json"], parts["test.json"]
    for fname, data in (("val.json", val), ("test.json", test)):
        extra = [u for u in data if u not in train]
        if extra:
            raise DataFormatError(root / fname, f"{len(extra)} users have no training sequence, e.g. {extra[:3]}")
    users = list(train)

    def user_key(u: str) -> tuple[int, object]:
        return (0, int(u)) if u.lstrip("-").isdigit() else (1, u)

    users.sort(key=user_key)
    sequences = [np.asarray(train[u] + val.get(u, []) + test.get(u, []), dtype=np.int64) for u in users]
    keep = [k for k, s in enumerate(sequences) if len(s)]
    return SeqDataset(
        name=name or root.name,
        items=items,
        users=[users[k] for k in keep],
        sequences=[sequences[k] for k in keep],
        timestamps=None,
        source={"format": "recformer", "path": str(root.resolve()), "item_text": meta_path.name},
    )
