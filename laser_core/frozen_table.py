"""The frozen LLM's item table: every catalogue item embedded by the config's backbone alone (issue 22, route b).

The backbone (cut to ``backbone.num_layers``) reads each item through Laser's own item path
(:meth:`laser_core.model.LaserModel.embed_items` with ``fuse=False``): the item template of the text settings,
no prefix, the pooling of ``bitune.pooling`` at its initial value (the suffix starts as the EOS embedding), no
embedding transform and no fusion. Nothing is trained: this is what the LLM knows about the items before
Bi-Tuning. The ID models take the table as their item embeddings' initial value or as a fixed second view
(``sr.text_items``, :mod:`laser_core.sr.text_items`).

Cached under ``LASER_CACHE_DIR/frozen_tables`` as safetensors, keyed on
:meth:`~laser_core.model.LaserModel.weights_fingerprint` of that frozen model: the backbone's content fingerprint
(its files' bytes and loading settings), the formatted item texts and the text settings, and the pooling. The
full key is stored in the file's metadata and checked on reading, so a cached table is returned only for that
exact key.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from laser_core.configuration import LaserSpec
from laser_core.paths import default_cache_dir
from laser_core.trainer import atomic_write

if TYPE_CHECKING:
    from laser_core.model import ItemTable

CACHE_FOLDER = "frozen_tables"


def frozen_spec(spec: LaserSpec) -> LaserSpec:
    """``spec`` as the frozen LLM alone: no prefix, no fusion, no embedding transform (backbone, its
    ``num_layers``, the text settings and the pooling as given)."""
    bitune = spec.bitune.model_copy(update={"prefix": "none", "fusion": "none", "embedding_transform": "none"})
    return spec.model_copy(update={"bitune": bitune})


def frozen_item_table(
    spec: LaserSpec,
    items: pd.DataFrame,
    cache_dir: str | Path | None = None,
    batch_size: int = 16,
    device: str | torch.device | None = "auto",
    progress=None,
) -> ItemTable:
    """The frozen LLM's (:func:`frozen_spec`) item table: ``table`` ``[n_items, H]`` float32 (CPU) rows for the
    catalogue ``items`` (rows follow it), ``weights_fingerprint`` the cache key; read from the cache
    (``cache_dir``, default ``LASER_CACHE_DIR``) when its key matches, else computed (``batch_size`` items per
    forward, on ``device``) and cached. ``progress(n)`` is called after each batch."""
    from laser_core.model import ItemTable, build_laser

    model = build_laser(frozen_spec(spec), items, None, device=device)
    key = model.weights_fingerprint()
    path = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = path / CACHE_FOLDER / f"{key[:32]}.safetensors"
    cached = _read(path, key)
    if cached is not None and cached.shape[0] == len(items):
        return ItemTable(cached, key)
    model.eval()
    with torch.no_grad():
        table = model.embed_items(range(len(items)), batch_size, progress=progress, fuse=False).float().cpu()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, save({"table": table.contiguous()}, metadata={"key": key}))
    return ItemTable(table, key)


def _read(path: Path, key: str) -> torch.Tensor | None:
    """The cached table at ``path`` if its stored key is ``key`` (None when absent, unreadable or another key)."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("key") != key:
                return None
            return f.get_tensor("table")
    except (OSError, SafetensorError):
        return None


__all__ = ["frozen_item_table", "frozen_spec"]
