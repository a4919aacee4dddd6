"""Saving and loading models and optimizer state without pickle: safetensors for tensors, JSON for the rest."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from laser_core.artifact import read_meta
from laser_core.sr.base import SequentialRecommender
from laser_core.configuration import SRConfig
from laser_core.trainer import atomic_write, save_tensors

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
FORMAT_VERSION = 1


def build_model(config: SRConfig, n_items: int, text_rows: torch.Tensor | None = None) -> SequentialRecommender:
    """A fresh model of ``config``; with ``sr.text_items``, the reduced item text rows ``text_rows``
    (:func:`laser_core.sr.text_items.text_rows`) go in (``init``: the initial embeddings; ``join``: the fixed
    view; None: zeros of its shape, as :func:`load_model` builds before loading the weights)."""
    from laser_core.sr.bert4rec import BERT4Rec
    from laser_core.sr.gru4rec import GRU4Rec
    from laser_core.sr.popularity import Popularity
    from laser_core.sr.sasrec import SASRec

    classes = {"sasrec": SASRec, "bert4rec": BERT4Rec, "gru4rec": GRU4Rec, "popularity": Popularity}
    model = classes[config.model](config, n_items)
    if config.text_items != "none":
        model.use_text_items(text_rows)
    return model


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def save_model(model: SequentialRecommender, directory: str | Path, extra: dict | None = None) -> Path:
    """``model.safetensors`` + ``config.json`` (model config, n_items, any ``extra`` metadata)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    meta = {"format_version": FORMAT_VERSION, "config": model.config.model_dump(), "n_items": model.n_items}
    save_tensors(_state(model), d / WEIGHTS)
    atomic_write(d / CONFIG, json.dumps({**meta, **(extra or {})}, indent=2, sort_keys=True))
    return d


def load_model(directory: str | Path) -> SequentialRecommender:
    d = Path(directory)
    if not (d / CONFIG).is_file() or not (d / WEIGHTS).is_file():
        raise FileNotFoundError(f"{d}: expected {CONFIG} and {WEIGHTS}")
    meta = read_meta(d / CONFIG, FORMAT_VERSION, "SR model")
    model = build_model(SRConfig.model_validate(meta["config"]), int(meta["n_items"]))
    model.load_state_dict(load_file(str(d / WEIGHTS)))
    model.eval()
    return model
