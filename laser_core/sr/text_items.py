"""Text items for the ID models (``sr.text_items``; issue 22, route b: LLM -> ID).

A frozen table of text vectors, one row per catalogue item (``[n_items, D]``, e.g. the frozen LLM's item table of
:func:`laser_core.frozen_table.frozen_item_table`), enters SASRec's or BERT4Rec's item embeddings, as LLM-ESR,
LLMInit and Harte et al. (2023) do:

- the table is centred and projected on its top ``hidden_size`` principal components; ``whitened`` (the
  default) also scales each component to unit variance (PCA whitening: the LLM's few dominant directions no
  longer swamp the rest), ``centered`` keeps their variances; the result is scaled so that its entries' root
  mean square is ``sr.text_scale`` (:func:`reduce_table`). The default, 1, keeps whitened components at unit
  variance: shrunk to the ID embeddings' init std (0.02), the text rows are washed out by Adam's first steps
  (on the learning task of tests/test_text_items.py, ``init`` at 0.02 barely beats IDs alone; at 0.3 or 1 it
  reaches the ceiling);
- ``init``: those rows are the initial value of the item embeddings (rows 1..n of ``item_emb``), trained as
  usual;
- ``join``: an item's embedding is its trainable ID embedding plus a trainable linear map (identity at first)
  of its fixed text row, a dual view in the spirit of LLM-ESR. The reduced rows are a buffer of the model
  (:class:`TextJoin`), saved with its weights, so a saved model reloads and scores identically.

Either way the model's interface does not change: ``full_sort_predict == user_vectors @ item_vectors().T``, and
``encode`` (what Laser's M-Former and its ONNX export read) takes the same embeddings.
"""

from __future__ import annotations

import torch
from torch import nn

from laser_core.configuration import SRConfig


def reduce_table(table: torch.Tensor, width: int, transform: str = "whitened", scale: float = 1.0) -> torch.Tensor:
    """``[n, width]`` float32: ``table`` ``[n, D]`` centred, projected on its top ``min(width, D)`` principal
    components (the rest of the columns zero), each component scaled to unit variance for ``whitened`` (not for
    ``centered``), then scaled so that the entries' root mean square is ``scale``. Deterministic."""
    if transform not in ("whitened", "centered"):
        raise ValueError(f"text transform must be 'whitened' or 'centered', got {transform!r}")
    x = table.detach().to("cpu", torch.float64)
    x = x - x.mean(0)
    s, u = torch.linalg.eigh(x.T @ x / max(x.shape[0], 1))  # ascending
    k = min(width, x.shape[1])
    s, u = s.flip(0)[:k].clamp(min=0), u.flip(1)[:, :k]
    z = x @ u
    if transform == "whitened":
        z = z / torch.sqrt(s + 1e-6 * float(s.max().clamp(min=1e-30)))
    rms = z.pow(2).mean().sqrt()
    z = z * (scale / rms) if rms > 0 else z
    out = torch.zeros(x.shape[0], width, dtype=torch.float64)
    out[:, :k] = z
    return out.float()


def text_rows(config: SRConfig, n_items: int, table: torch.Tensor | None) -> torch.Tensor | None:
    """The rows ``[n_items, hidden_size]`` a model of ``config`` takes from ``table`` (:func:`reduce_table`),
    None for ``text_items: none``; a clear error when the config asks for text items and the table is missing,
    has another number of rows, or has non-finite values."""
    mode = config.text_items
    if mode == "none":
        return None
    if table is None:
        raise ValueError(
            f"sr.text_items is {mode!r}: the ID model needs the item text table (text_table, one row per item, "
            f"{n_items} rows); set sr.text_items: none to train without it"
        )
    if table.ndim != 2 or table.shape[0] != n_items:
        raise ValueError(
            f"sr.text_items is {mode!r}: the item text table has shape {tuple(table.shape)}, expected "
            f"[{n_items}, D] (one row per catalogue item, in the catalogue's order)"
        )
    if not bool(torch.isfinite(table).all()):
        bad = torch.nonzero(~torch.isfinite(table).all(1))[:10, 0].tolist()
        raise ValueError(f"sr.text_items is {mode!r}: the item text table has non-finite values in rows {bad}")
    return reduce_table(table, config.hidden_size, config.text_transform, config.text_scale)


class TextJoin(nn.Module):
    """``join``'s fixed text view: ``rows`` ``[n_items, d]`` (a buffer, saved with the model) and a trainable
    linear map ``d -> d`` without bias (identity at first); :meth:`forward` gives the items' text part."""

    def __init__(self, n_items: int, width: int) -> None:
        super().__init__()
        self.register_buffer("rows", torch.zeros(n_items, width))
        self.proj = nn.Linear(width, width, bias=False)
        with torch.no_grad():
            self.proj.weight.copy_(torch.eye(width))

    def forward(self) -> torch.Tensor:
        return self.proj(self.rows)


__all__ = ["TextJoin", "reduce_table", "text_rows"]
