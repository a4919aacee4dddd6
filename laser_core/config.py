"""Typed run configuration, read from ``configs/*.yaml``.

One YAML file describes a run: where the data comes from, how it is validated, how texts are built, and the
pipeline's own settings. Unknown keys are errors (typos must not silently fall back to defaults).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import yaml
from pydantic import ConfigDict, Field, ValidationError, field_validator, model_validator

from laser_core import __version__
from laser_core.configbase import StrictConfig, describe_validation_error
from laser_core.errors import EXIT_CONFIG, UserError
from laser_core.data.loading import DatasetConfig, resolve_format
from laser_core.data.text import TextConfig
from laser_core.data.validation import ValidationConfig
from laser_core.configuration import BackboneConfig, BiTuneConfig, LaserSpec, LaserTrainConfig
from laser_core.promotion import PromotionConfig
from laser_core.configuration import LexicalConfig, SRConfig, TrainConfig, TuneConfig


class TuneBudget(StrictConfig):
    """``pipeline.tune_sr``: tune the ID model (``laser sr tune``'s tuner, search space ``sr_tune``) inside the run,
    before pretraining it with the best settings; a budget in finished trials, minutes, or both."""

    model_config = ConfigDict(extra="forbid")

    trials: int | None = Field(default=None, ge=1)
    minutes: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _some_budget(self) -> "TuneBudget":
        if self.trials is None and self.minutes is None:
            raise ValueError("give a budget: trials, minutes, or both")
        return self


class PipelineConfig(StrictConfig):
    model_config = ConfigDict(extra="forbid")

    enable_cache: bool = True
    # split | sr (ID-based model) | laser (Bi-Tuned and evaluated) | promote (exported and gated: the whole run)
    stop_after: Literal["split", "sr", "laser", "promote"] = "promote"
    models: list[Literal["laser", "lexical_hybrid"]] = Field(
        default_factory=lambda: ["laser"],
        min_length=1,
        description="the models the run fits after the ID model (laser; lexical_hybrid: the ID model + TF-IDF, "
        "section lexical); with both, the version serves the better on the promotion metric on validation (its "
        "test metrics then gated; laser_core.promotion.choose_model)",
    )

    tune_sr: TuneBudget | None = Field(
        default=None,
        description="tune the ID model in the run (search space: sr_tune) and pretrain it with the best settings",
    )

    @field_validator("models")
    @classmethod
    def _unique_models(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"pipeline.models names a model twice: {value}")
        return value


class ModelConfig(StrictConfig):
    """The ZenML Model (Model Control Plane) every training run creates a version of."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, description="default: laser-<dataset name>")
    description: str = "Laser: a frozen 4-bit LLM Bi-Tuned as a sequential recommender"
    tags: list[str] = Field(default_factory=list)


class ExportConfig(StrictConfig):
    model_config = ConfigDict(extra="forbid")

    k: int = Field(default=10, ge=1, description="top-k the scorer returns")
    user_tower: bool = Field(default=True, description="also export the user tower (LLM + M-Former) to ONNX")


class BatchConfig(StrictConfig):
    """The batch inference job: the production model's top-k for all (or selected) users."""

    model_config = ConfigDict(extra="forbid")

    k: int = Field(default=10, ge=1)
    users: list[str] | None = Field(default=None, description="user ids (None: every user in the data)")
    exclude_history: bool = True
    stage: Literal["production", "staging", "latest"] = "production"


class LaserConfig(StrictConfig):
    model_config = ConfigDict(extra="forbid")

    dataset: DatasetConfig = Field(default_factory=DatasetConfig)
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    text: TextConfig = Field(default_factory=TextConfig)
    sr: SRConfig = Field(default_factory=SRConfig)
    sr_train: TrainConfig = Field(default_factory=TrainConfig)
    sr_tune: TuneConfig = Field(
        default_factory=TuneConfig, description="the search space of `laser sr tune` (laser_core.sr.tune)"
    )
    backbone: BackboneConfig = Field(default_factory=BackboneConfig)
    bitune: BiTuneConfig = Field(default_factory=BiTuneConfig)
    laser_train: LaserTrainConfig = Field(default_factory=LaserTrainConfig)
    lexical: LexicalConfig = Field(
        default_factory=LexicalConfig, description="the lexical hybrid (pipeline.models: lexical_hybrid)"
    )
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    promotion: PromotionConfig = Field(default_factory=PromotionConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    batch: BatchConfig = Field(default_factory=BatchConfig)
    infra: dict = Field(default_factory=dict, description="stack settings, see infra/README.md")

    def model_name(self) -> str:
        """The ZenML model's name: ``model.name``, else ``laser-<dataset name | folder | format>``."""
        if self.model.name:
            return self.model.name
        ds = self.dataset
        base = ds.name or (Path(ds.path).name if ds.path else None) or ds.format
        return "laser-" + "".join(c if c.isalnum() or c in "-_." else "-" for c in base).strip("-").lower()

    def laser_spec(self) -> LaserSpec:
        return LaserSpec(bitune=self.bitune, text=self.text, backbone=self.backbone, seed=self.laser_train.seed)


class ConfigError(UserError, ValueError):
    """A bad run config: the message names the file and the field."""

    exit_code = EXIT_CONFIG


class _YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader with two fixes: ``1e-4`` is a float (YAML 1.2; PyYAML 1.1 reads it as a string,
    which strict config models refuse), and a key given twice in one mapping is an error instead of the last one
    silently winning."""

    def construct_mapping(self, node, deep=False):
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def read_yaml(path: Path) -> object:
    """Parse a YAML file with :class:`_YamlLoader` (``None`` for an empty file)."""
    return yaml.load(path.read_text(encoding="utf8"), Loader=_YamlLoader)  # noqa: S506 (a SafeLoader)


BASE_KEY = "base"


def merge_layers(base: dict, overlay: dict) -> dict:
    """``overlay`` on top of ``base``: mappings are merged key by key (recursively), anything else (a value, a
    list, ``null``) replaces what the base had."""
    out = dict(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_layers(out[key], value)
        else:
            out[key] = value
    return out


def _read_mapping(path: Path) -> dict:
    """One config file as a mapping (an empty file is ``{}``); a :class:`ConfigError` naming the file otherwise."""
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = read_yaml(path)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a UTF-8 text file ({exc.reason} at byte {exc.start})") from exc
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{path}: expected a mapping of sections (dataset:, sr:, ...) at top level, got {type(raw).__name__}"
        )
    return raw


def read_layered(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict:
    """The raw settings of a config file with its bases under it.

    A file may start with ``base: FILE`` or ``base: [FILE, ...]`` (paths relative to the file's folder): the
    bases are read first (each with its own bases), merged in order, then the file's own settings on top
    (:func:`merge_layers`). So a dataset's file holds what is true of the data, and a variant (``*_cpu``,
    ``*_fusion``) only what it changes. A relative ``dataset.path`` is resolved against the folder of the file
    that sets it. A base that (indirectly) names itself is an error."""
    path = Path(path)
    where = path.resolve()
    if where in _chain:
        cycle = " -> ".join(str(p) for p in (*_chain, where))
        raise ConfigError(f"{path}: `{BASE_KEY}:` chain names a file twice ({cycle})")
    raw = _read_mapping(path)
    dataset = raw.get("dataset")
    if isinstance(dataset, dict) and isinstance(dataset.get("path"), str):
        data_path = Path(dataset["path"]).expanduser()
        if not data_path.is_absolute():
            raw["dataset"] = {**dataset, "path": str((path.parent / data_path).resolve())}
    bases = raw.pop(BASE_KEY, [])
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) and b for b in bases):
        raise ConfigError(f"{path}: `{BASE_KEY}:` must be a file name or a list of file names, got {bases!r}")
    merged: dict = {}
    for base in bases:
        merged = merge_layers(merged, read_layered(path.parent / base, (*_chain, where)))
    return merge_layers(merged, raw)


def apply_overrides(raw: dict, overrides: Sequence[str], source: str) -> dict:
    """``KEY.PATH=VALUE`` settings on top of a raw config (the value read as YAML: ``bitune.prefix=none``,
    ``laser_train.lr=3e-4``, ``bitune.mformer.n_layers=2``); intermediate sections are created when missing."""
    for item in overrides:
        key, sep, value = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise ConfigError(f"{source}: override {item!r} is not of the form section.key=value")
        node = raw
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{source}: override {item!r}: {part!r} is not a section")
        try:
            node[parts[-1]] = yaml.load(value, Loader=_YamlLoader)  # noqa: S506 (a SafeLoader)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{source}: override {item!r}: the value is not valid YAML ({exc})") from exc
    return raw


def load_config(path: str | Path, data_dir: str | None = None, overrides: Sequence[str] = ()) -> LaserConfig:
    """Read a YAML config; ``data_dir`` (from the command line) overrides ``dataset.path``; ``overrides``
    (``section.key=value``, see :func:`apply_overrides`) change settings before validation.

    A relative ``dataset.path`` is resolved against the config file's folder. An empty file is an error (a run
    on nothing but defaults is never what was meant). ``data_dir`` with a config whose ``dataset.format`` is
    ``synthetic`` reads the files in ``data_dir``: the format becomes ``auto`` (detected from the folder), since
    generated data would ignore the folder the command line names. ``base:`` files are merged under the file's
    own settings first (:func:`read_layered`).
    """
    path = Path(path)
    raw = read_layered(path)
    if raw == {}:
        raise ConfigError(
            f"{path}: the config file is empty; a run needs at least a `dataset:` section "
            "(see configs/tiny.yaml for a complete example)"
        )
    raw = apply_overrides(raw, overrides, str(path))
    try:
        cfg = LaserConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{path}: {describe_validation_error(exc)}") from exc
    if data_dir is not None:
        folder = Path(data_dir).expanduser()
        if not folder.is_dir():
            raise ConfigError(f"--data-dir {data_dir}: not a directory")
        cfg.dataset.path = str(folder.resolve())
        if cfg.dataset.format == "synthetic":
            cfg.dataset.format = "auto"
    elif cfg.dataset.path is not None and not Path(cfg.dataset.path).expanduser().is_absolute():  # an override's
        cfg.dataset.path = str((path.parent / cfg.dataset.path).resolve())
    return cfg


def data_fingerprint(config: DatasetConfig) -> str:
    """A hash of everything the loaded data depends on: the files' bytes (for data on disk) or the generator
    settings (synthetic), plus the library version. Passed to the load step so that ZenML's cache is
    invalidated when the data changes, not only when the config does."""
    h = hashlib.sha256()
    h.update(__version__.encode())
    h.update(config.model_dump_json().encode())
    fmt = resolve_format(config)
    if fmt != "synthetic" and config.path is not None:
        root = Path(config.path).expanduser()
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        for p in files:
            h.update(str(p.relative_to(root) if root.is_dir() else p.name).encode())
            with open(p, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()
