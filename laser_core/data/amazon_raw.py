"""Loader for raw Amazon Review Data (2018) files as users download them.

``<Category>_5.json.gz`` (5-core reviews: ``reviewerID``, ``asin``, ``unixReviewTime``, ...) and
``meta_<Category>.json.gz`` (``asin``, ``title``, ``brand``, ``category`` as a list). Preprocessing follows
RecFormer's ``finetune_data/process.py`` (the data Laser used), with two deliberate differences:
items without a (non-empty) title are dropped, as the paper states, and the unseeded random user sub-sampling
line of that script is not reproduced (the published data kept every user). Reviews of items without usable
metadata are dropped; each user's items are sorted by time with a stable sort (ties keep file order);
the category path is joined with spaces. Users are numbered in order of first appearance, items likewise.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from laser_core.data.errors import DataFormatError
from laser_core.data.io import check_timestamp, iter_jsonl, require
from laser_core.data.model import SeqDataset, build_items_frame, normalize_text


def find_files(root: Path, category: str | None = None) -> tuple[Path, Path]:
    if category:
        reviews, meta = root / f"{category}_5.json.gz", root / f"meta_{category}.json.gz"
        for p in (reviews, meta):
            if not p.is_file():
                raise DataFormatError(p, "file not found")
        return reviews, meta
    metas = sorted(root.glob("meta_*.json.gz"))
    if len(metas) != 1:
        raise DataFormatError(
            root, f"expected exactly one meta_<Category>.json.gz, found {len(metas)}; set the category explicitly"
        )
    category = metas[0].name[len("meta_") : -len(".json.gz")]
    reviews = root / f"{category}_5.json.gz"
    if not reviews.is_file():
        raise DataFormatError(reviews, f"file not found (reviews for the category of {metas[0].name})")
    return reviews, metas[0]


def looks_like(path: Path) -> bool:
    return any(path.glob("meta_*.json.gz")) and any(path.glob("*_5.json.gz"))


def load_amazon2018(path: str | Path, category: str | None = None, name: str | None = None) -> SeqDataset:
    root = Path(path)
    if not root.is_dir():
        raise DataFormatError(root, "not a directory")
    reviews_path, meta_path = find_files(root, category)

    meta: dict[str, tuple[str, str, str]] = {}
    for lineno, rec in iter_jsonl(meta_path):
        asin = require(rec, "asin", meta_path, line=lineno, types=str)
        title = rec.get("title")
        if not normalize_text(title):
            continue  # the paper drops items without a title (kept raw: build_items_frame normalizes once)
        category_path = rec.get("category", [])
        if not isinstance(category_path, (list, str, type(None))):
            raise DataFormatError(
                meta_path, f"expected a list, got {type(category_path).__name__}", line=lineno, field="category"
            )
        brand = rec.get("brand", "")
        if not isinstance(brand, (str, type(None))):
            raise DataFormatError(
                meta_path, f"expected a string, got {type(brand).__name__}", line=lineno, field="brand"
            )
        meta[asin] = (title, brand or "", category_path or [])

    raw: dict[str, list[tuple[int, str]]] = {}
    for lineno, rec in iter_jsonl(reviews_path):
        user = require(rec, "reviewerID", reviews_path, line=lineno, types=str)
        asin = require(rec, "asin", reviews_path, line=lineno, types=str)
        t = require(rec, "unixReviewTime", reviews_path, line=lineno, types=int)
        check_timestamp(t, reviews_path, line=lineno, field="unixReviewTime")
        if asin in meta:
            raw.setdefault(user, []).append((t, asin))

    item_index: dict[str, int] = {}
    users, sequences, timestamps = [], [], []
    for user, events in raw.items():
        events.sort(key=lambda e: e[0])  # stable: equal times keep file order
        seq = []
        for _, asin in events:
            if asin not in item_index:
                item_index[asin] = len(item_index)
            seq.append(item_index[asin])
        users.append(user)
        sequences.append(np.asarray(seq, dtype=np.int64))
        timestamps.append(np.asarray([e[0] for e in events], dtype=np.int64))
    asins = list(item_index)
    items = build_items_frame(
        asins, [meta[a][0] for a in asins], [meta[a][1] for a in asins], [meta[a][2] for a in asins]
    )
    return SeqDataset(
        name=name or reviews_path.name.removesuffix("_5.json.gz"),
        items=items,
        users=users,
        sequences=sequences,
        timestamps=timestamps,
        source={
            "format": "amazon2018",
            "path": str(root.resolve()),
            "reviews": reviews_path.name,
            "meta": meta_path.name,
        },
    )
