"""One entry point for every supported format: :func:`load_dataset` with a :class:`DatasetConfig`."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Literal

from pydantic import ConfigDict, Field, model_validator

from laser_core.configbase import StrictConfig
from laser_core.data import amazon_raw, recformer, seqrecbench
from laser_core.data.errors import DataFormatError
from laser_core.data.model import SeqDataset
from laser_core.data.synthetic import SyntheticConfig, generate_synthetic
from laser_core.data.table import TableColumns, load_table

Format = Literal["auto", "synthetic", "recformer", "seqrecbench", "amazon2018", "table"]


class DatasetConfig(StrictConfig):
    """Where the data comes from. ``path`` is a directory (or, for ``table``, see the two file fields)."""

    model_config = ConfigDict(extra="forbid")

    format: Format = "auto"
    path: str | None = None
    name: str | None = None
    # amazon2018: the <Category> of <Category>_5.json.gz (found automatically when the folder has one)
    category: str | None = None
    # table: file names (relative to path, or absolute) and column names
    interactions_file: str = "interactions.csv"
    items_file: str = "items.csv"
    columns: dict[str, str | None] = Field(default_factory=dict)
    # synthetic: the generator's settings (see SyntheticConfig)
    synthetic: dict[str, float | int] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _synthetic_reads_no_path(self) -> "DatasetConfig":
        if self.format == "synthetic" and self.path is not None:
            raise ValueError(
                f"format 'synthetic' generates its data and reads no files, but path is set "
                f"({self.path!r}): remove path, or set format to 'auto' (detected from the folder) "
                "or to the folder's format"
            )
        return self


def detect_format(path: Path) -> str:
    if not path.is_dir():
        raise DataFormatError(path, "data directory not found")
    if recformer.looks_like(path):
        return "recformer"
    if seqrecbench.looks_like(path):
        return "seqrecbench"
    if amazon_raw.looks_like(path):
        return "amazon2018"
    if any((path / f).is_file() for f in ("interactions.csv", "interactions.parquet")):
        return "table"
    raise DataFormatError(
        path,
        "cannot tell the data format: expected RecFormer files (train/val/test/smap.json), "
        "SeqRecBench files (user2item.jsonl.gz, item2title.jsonl.gz), raw Amazon 2018 files "
        "(<Category>_5.json.gz, meta_<Category>.json.gz) or interactions.csv + items.csv",
    )


def resolve_format(config: DatasetConfig) -> str:
    if config.format != "auto":
        return config.format
    if config.path is None:
        return "synthetic"
    return detect_format(Path(config.path).expanduser())


def load_dataset(config: DatasetConfig | dict | None = None) -> SeqDataset:
    cfg = config if isinstance(config, DatasetConfig) else DatasetConfig.model_validate(config or {})
    fmt = resolve_format(cfg)
    if fmt == "synthetic":
        known = {f.name for f in fields(SyntheticConfig)}
        unknown = set(cfg.synthetic) - known
        if unknown:
            raise ValueError(f"dataset.synthetic: unknown settings {sorted(unknown)}; known: {sorted(known)}")
        ds = generate_synthetic(SyntheticConfig(**cfg.synthetic))
        if cfg.name:
            ds.name = cfg.name
        return ds
    if cfg.path is None:
        raise ValueError(f"dataset.path is required for format {fmt!r}")
    root = Path(cfg.path).expanduser()
    if fmt == "recformer":
        return recformer.load_recformer(root, name=cfg.name)
    if fmt == "seqrecbench":
        return seqrecbench.load_seqrecbench(root, name=cfg.name)
    if fmt == "amazon2018":
        return amazon_raw.load_amazon2018(root, category=cfg.category, name=cfg.name)
    if fmt == "table":
        known = {f.name for f in fields(TableColumns)}
        unknown = set(cfg.columns) - known
        if unknown:
            raise ValueError(f"dataset.columns: unknown keys {sorted(unknown)}; known: {sorted(known)}")
        inter = root / cfg.interactions_file
        if not inter.exists() and cfg.interactions_file == "interactions.csv":
            inter = root / "interactions.parquet"
        items = root / cfg.items_file
        if not items.exists() and cfg.items_file == "items.csv":
            items = root / "items.parquet"
        return load_table(inter, items, TableColumns(**cfg.columns), name=cfg.name)
    raise ValueError(f"unknown dataset format {fmt!r}")
