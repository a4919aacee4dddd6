"""One entry point for every supported format: :func:`load_dataset` with a :class:`DatasetConfig`.

Whatever the format, the item texts (title, brand, category) are then cut to ``max_text_chars`` characters
(:data:`DEFAULT_MAX_TEXT_CHARS` unless configured; at a word boundary when possible), so a runaway field cannot
reach the tokenizer or the scorer whole. How many of each were cut is kept in ``SeqDataset.source["texts_cut"]``
and shown in the validation report. The text template's own budget (``text.title_max_chars`` /
``title_max_tokens``) still applies when the texts are formatted.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Literal

from pydantic import ConfigDict, Field, ValidationError, field_validator, model_validator

from laser_core.configbase import StrictConfig, describe_validation_error
from laser_core.data import amazon_raw, recformer, seqrecbench
from laser_core.data.errors import DataFormatError
from laser_core.data.model import SeqDataset
from laser_core.data.synthetic import SyntheticConfig, generate_synthetic
from laser_core.data.table import TableColumns, load_table
from laser_core.data.text import DEFAULT_MAX_TEXT_CHARS, cut_item_texts

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
    # every format: item titles, brands and categories longer than this are cut (and counted)
    max_text_chars: int = Field(default=DEFAULT_MAX_TEXT_CHARS, ge=1)

    @field_validator("synthetic")
    @classmethod
    def _synthetic_settings(cls, value: dict[str, float | int]) -> dict[str, float | int]:
        """The known settings checked as :class:`SyntheticConfig` checks them (unknown ones: :func:`load_dataset`)."""
        known = {f.name for f in fields(SyntheticConfig)}
        try:
            SyntheticConfig(**{k: v for k, v in value.items() if k in known})
        except ValidationError as exc:
            raise ValueError(describe_validation_error(exc)) from None
        return value

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
    if any((path / f).is_file() for f in TABLE_FILES["interactions"]):
        return "table"
    raise DataFormatError(
        path,
        "cannot tell the data format: expected RecFormer files (train/val/test/smap.json), "
        "SeqRecBench files (user2item.jsonl.gz, item2title.jsonl.gz), raw Amazon 2018 files "
        "(<Category>_5.json.gz, meta_<Category>.json.gz) or interactions.csv + items.csv",
    )


#: the default file names of the table format, CSV first; a folder holding both of a pair is ambiguous
TABLE_FILES = {"interactions": ("interactions.csv", "interactions.parquet"), "items": ("items.csv", "items.parquet")}


def _table_file(root: Path, configured: str, kind: str) -> Path:
    """The ``kind`` file of a table folder: the configured name, or, for the default name, whichever of the CSV
    and the Parquet file exists (both present is refused: which one was meant cannot be told)."""
    csv, parquet = TABLE_FILES[kind]
    if configured != csv:
        return root / configured
    present = [root / name for name in (csv, parquet) if (root / name).exists()]
    if len(present) == 2:
        raise DataFormatError(
            root,
            f"both {csv} and {parquet} are present, so which {kind} table to read is ambiguous: remove one, or "
            f"name it with dataset.{kind}_file",
        )
    return present[0] if present else root / csv


def resolve_format(config: DatasetConfig) -> str:
    if config.format != "auto":
        return config.format
    if config.path is None:
        return "synthetic"
    return detect_format(Path(config.path).expanduser())


def load_dataset(config: DatasetConfig | dict | None = None) -> SeqDataset:
    """Load the dataset ``config`` describes, its item texts cut to ``max_text_chars`` (see the module docstring)."""
    cfg = config if isinstance(config, DatasetConfig) else DatasetConfig.model_validate(config or {})
    dataset = _load(cfg)
    dataset.items, cut = cut_item_texts(dataset.items, cfg.max_text_chars)
    dataset.source["max_text_chars"] = cfg.max_text_chars
    dataset.source["texts_cut"] = cut
    return dataset


def _load(cfg: DatasetConfig) -> SeqDataset:
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
        inter = _table_file(root, cfg.interactions_file, "interactions")
        items = _table_file(root, cfg.items_file, "items")
        return load_table(inter, items, TableColumns(**cfg.columns), name=cfg.name)
    raise ValueError(f"unknown dataset format {fmt!r}")
