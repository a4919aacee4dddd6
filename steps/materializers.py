"""ZenML materializers for the project's types: Parquet for tables, JSON for configs and reports.

Nothing here uses pickle, so an artifact received from elsewhere can be loaded safely. Every file goes through
the active artifact store (``self.artifact_store.open``), so the same code works for local and remote stores.
The types with a folder format of their own (``save(dir)`` / ``load(dir)``: the Laser weights, the item table,
the split, the SR model, the export bundle) are written by that code into a temporary folder and copied file by
file (:class:`_FolderMaterializer`): the accelerate job folder (:mod:`laser_core.launch`) uses the same code.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

import pandas as pd
from zenml.enums import ArtifactType, VisualizationType
from zenml.materializers.base_materializer import BaseMaterializer

from laser_core.bundle import ExportBundle
from laser_core.data.model import SeqDataset
from laser_core.data.split import Split
from laser_core.data.validation import ValidationReport
from laser_core.model import ItemTable, LaserWeights
from laser_core.promotion import PromotionDecision
from laser_core.reporting import MetricsReport, markdown_table, svg_bar_chart, svg_line_chart
from laser_core.sr.base import SequentialRecommender
from laser_core.sr.checkpoint import load_model, save_model

T = TypeVar("T")


class _FilesMixin(BaseMaterializer):
    SKIP_REGISTRATION: ClassVar[bool] = True

    def _path(self, name: str) -> str:
        return os.path.join(self.uri, name)

    def _write_parquet(self, name: str, frame: pd.DataFrame) -> None:
        buf = io.BytesIO()
        frame.to_parquet(buf, index=False)
        with self.artifact_store.open(self._path(name), "wb") as fh:
            fh.write(buf.getvalue())

    def _read_parquet(self, name: str) -> pd.DataFrame:
        with self.artifact_store.open(self._path(name), "rb") as fh:
            return pd.read_parquet(io.BytesIO(fh.read()))

    def _write_text(self, name: str, text: str) -> str:
        path = self._path(name)
        with self.artifact_store.open(path, "w") as fh:
            fh.write(text)
        return path

    def _write_json(self, name: str, obj: Any) -> str:
        return self._write_text(name, json.dumps(obj, indent=2, sort_keys=True, default=str))

    def _read_json(self, name: str) -> Any:
        with self.artifact_store.open(self._path(name), "r") as fh:
            return json.load(fh)


class _FolderMaterializer(_FilesMixin):
    """A type that saves itself to a local folder and loads from one: that folder's files, copied to and from the
    artifact store (nested folders too). Loading copies every file of the artifact's folder (visualizations
    too, which the type's ``load`` ignores)."""

    SKIP_REGISTRATION: ClassVar[bool] = True

    def _save_folder(self, save: Callable[[Path], Any]) -> None:
        with tempfile.TemporaryDirectory(prefix="laser-artifact-") as tmp:
            root = Path(tmp)
            save(root)
            for path in sorted(p for p in root.rglob("*") if p.is_file()):
                dest = self._path(path.relative_to(root).as_posix())
                self.artifact_store.makedirs(os.path.dirname(dest))
                with open(path, "rb") as src, self.artifact_store.open(dest, "wb") as fh:
                    fh.write(src.read())

    def _download(self, uri: str, target: Path) -> None:
        target.mkdir(parents=True, exist_ok=True)
        for name in self.artifact_store.listdir(uri):
            name = str(name.decode() if isinstance(name, bytes) else name).rstrip("/").rsplit("/", 1)[-1]
            path = os.path.join(uri, name)
            if self.artifact_store.isdir(path):
                self._download(path, target / name)
            else:
                with self.artifact_store.open(path, "rb") as src:
                    (target / name).write_bytes(src.read())

    def _load_folder(self, load: Callable[[Path], T], keep: bool = False) -> T:
        """``load`` of a local copy of the artifact's folder; ``keep``: the copy outlives the call (the loaded
        object reads it later), else it is removed."""
        target = Path(tempfile.mkdtemp(prefix="laser-artifact-"))
        try:
            self._download(self.uri, target)
            loaded = load(target)
        except BaseException:
            shutil.rmtree(target, ignore_errors=True)
            raise
        if not keep:
            shutil.rmtree(target, ignore_errors=True)
        return loaded


class SeqDatasetMaterializer(_FilesMixin):
    """``items.parquet`` + ``interactions.parquet`` + ``dataset.json`` (name, source)."""

    ASSOCIATED_TYPES: ClassVar[tuple[type[Any], ...]] = (SeqDataset,)
    ASSOCIATED_ARTIFACT_TYPE: ClassVar[ArtifactType] = ArtifactType.DATA

    def save(self, data: SeqDataset) -> None:
        self._write_parquet("items.parquet", data.items)
        self._write_parquet("interactions.parquet", data.interactions_frame())
        self._write_json("dataset.json", {"name": data.name, "source": data.source, "format_version": 1})

    def load(self, data_type: type[Any]) -> SeqDataset:
        meta = self._read_json("dataset.json")
        return SeqDataset.from_frames(
            meta["name"],
            self._read_parquet("items.parquet"),
            self._read_parquet("interactions.parquet"),
            source=meta["source"],
        )

    def extract_metadata(self, data: SeqDataset) -> dict[str, Any]:
        stats = data.stats()
        return {
            "users": stats["users"],
            "items": stats["items"],
            "interactions": stats["interactions"],
            "avg_length": round(stats["avg_length"], 4),
            "has_timestamps": stats["has_timestamps"],
            "format": str(data.source.get("format", "")),
            "fingerprint": data.fingerprint(),
        }

    def save_visualizations(self, data: SeqDataset) -> dict[str, VisualizationType]:
        text = (
            f"# Dataset {data.name}\n\n"
            + markdown_table(["statistic", "value"], data.stats().items())
            + "\nFirst items:\n\n"
            + markdown_table(list(data.items.columns), data.items.head(10).itertuples(index=False))
        )
        return {self._write_text("summary.md", text): VisualizationType.MARKDOWN}


class SplitMaterializer(_FolderMaterializer):
    """``split.parquet`` (user, training sequence, validation and test targets) + ``split.json``
    (:meth:`Split.save`)."""

    ASSOCIATED_TYPES: ClassVar[tuple[type[Any], ...]] = (Split,)
    ASSOCIATED_ARTIFACT_TYPE: ClassVar[ArtifactType] = ArtifactType.DATA

    def save(self, data: Split) -> None:
        self._save_folder(data.save)

    def load(self, data_type: type[Any]) -> Split:
        return self._load_folder(Split.load)

    def extract_metadata(self, data: Split) -> dict[str, Any]:
        return {k: v for k, v in data.report().items() if isinstance(v, (int, float, str))}


class ValidationReportMaterializer(_FilesMixin):
    """``report.json`` plus a Markdown report as the visualization."""

    ASSOCIATED_TYPES: ClassVar[tuple[type[Any], ...]] = (ValidationReport,)
    ASSOCIATED_ARTIFACT_TYPE: ClassVar[ArtifactType] = ArtifactType.DATA_ANALYSIS

    def save(self, data: ValidationReport) -> None:
        self._write_json("report.json", data.to_dict())

    def load(self, data_type: type[Any]) -> ValidationReport:
        return ValidationReport.from_dict(self._read_json("report.json"))

    def extract_metadata(self, data: ValidationReport) -> dict[str, Any]:
        return {
            "success": data.success,
            "n_expectations": len(data.outcomes),
            "n_failed": len(data.failures),
            "gx_version": data.gx_version,
        }

    def save_visualizations(self, data: ValidationReport) -> dict[str, VisualizationType]:
        return {self._write_text("report.md", data.to_markdown()): VisualizationType.MARKDOWN}


class SRModelMaterializer(_FolderMaterializer):
    """An ID-based recommender: ``model.safetensors`` + ``config.json`` (the model's config and n_items;
    :func:`laser_core.sr.checkpoint.save_model`)."""

    ASSOCIATED_TYPES: ClassVar[tuple[type[Any], ...]] = (SequentialRecommender,)
    ASSOCIATED_ARTIFACT_TYPE: ClassVar[ArtifactType] = ArtifactType.MODEL

    def save(self, data: SequentialRecommender) -> None:
        self._save_folder(lambda folder: save_model(data, folder))

    def load(self, data_type: type[Any]) -> SequentialRecommender:
        return self._load_folder(load_model)

    def extract_metadata(self, data: SequentialRecommender) -> dict[str, Any]:
        return {
            "model": data.config.model,
            "n_items": data.n_items,
            "parameters": data.n_parameters(),
            "hidden_size": data.config.hidden_size,
            "n_layers": data.config.n_layers,
            "max_len": data.config.max_len,
        }


class LaserWeightsMaterializer(_FolderMaterializer):
    """Laser's trainable weights (``weights.safetensors``), the item side's when they differ
    (``item_weights.safetensors``: the weights that made the item table) + spec and training summary
    (``laser.json``; ``item_state`` says whether the item side has its own file): :meth:`LaserWeights.save`."""

    ASSOCIATED_TYPES: ClassVar[tuple[type[Any], ...]] = (LaserWeights,)
    ASSOCIATED_ARTIFACT_TYPE: ClassVar[ArtifactType] = ArtifactType.MODEL

    def save(self, data: LaserWeights) -> None:
        self._save_folder(data.save)

    def load(self, data_type: type[Any]) -> LaserWeights:
        return self._load_folder(LaserWeights.load)

    def extract_metadata(self, data: LaserWeights) -> dict[str, Any]:
        meta: dict[str, Any] = {
            "parameters": int(sum(v.numel() for v in data.state.values())),
            "backbone": data.spec.backbone.name,
            "quantization": data.spec.backbone.quantization,
            "prefix": data.spec.bitune.prefix,
            "pooling": data.spec.bitune.pooling,
            "cold_item_weights": data.cold_item_weights(),
        }
        for key in ("best_valid_ndcg@10", "stage", "best_epoch"):
            if data.summary.get(key) is not None:
                meta[key] = data.summary[key]
        trainable = data.summary.get("trainable") or {}
        for key in ("mformer", "total", "bi_tuning_token_values"):
            if key in trainable:
                meta[f"trainable_{key}"] = int(trainable[key])
        return meta

    def save_visualizations(self, data: LaserWeights) -> dict[str, VisualizationType]:
        """Validation NDCG@10 per epoch (epoch -1 = before training), one line per stage."""
        history = list(data.summary.get("history") or [])
        series: dict[str, list[tuple[float, float]]] = {}
        for entry in history:
            valid = entry.get("valid") or {}
            if "ndcg@10" in valid and not entry.get("curve"):  # per epoch (learning-curve points left out)
                series.setdefault(f"stage {entry['stage']}", []).append(
                    (float(entry["epoch"]), float(valid["ndcg@10"]))
                )
        html = svg_line_chart(series, "Validation NDCG@10 per epoch", "epoch (-1: before training)", "NDCG@10")
        return {self._write_text("valid_ndcg.html", html): VisualizationType.HTML}


class ItemTableMaterializer(_FolderMaterializer):
    """The item-embedding table as ``table.safetensors`` (+ ``table.json``): :meth:`ItemTable.save`."""

    ASSOCIATED_TYPES: ClassVar[tuple[type[Any], ...]] = (ItemTable,)
    ASSOCIATED_ARTIFACT_TYPE: ClassVar[ArtifactType] = ArtifactType.DATA

    def save(self, data: ItemTable) -> None:
        self._save_folder(data.save)

    def load(self, data_type: type[Any]) -> ItemTable:
        return self._load_folder(ItemTable.load)

    def extract_metadata(self, data: ItemTable) -> dict[str, Any]:
        return {"n_items": int(data.table.shape[0]), "dim": int(data.table.shape[1])}


class MetricsReportMaterializer(_FilesMixin):
    """Metrics as ``metrics.json``; a Markdown table and, for Laser, the router's expert-usage histogram."""

    ASSOCIATED_TYPES: ClassVar[tuple[type[Any], ...]] = (MetricsReport,)
    ASSOCIATED_ARTIFACT_TYPE: ClassVar[ArtifactType] = ArtifactType.DATA_ANALYSIS

    def save(self, data: MetricsReport) -> None:
        self._write_json("metrics.json", data.to_dict())

    def load(self, data_type: type[Any]) -> MetricsReport:
        return MetricsReport.from_dict(self._read_json("metrics.json"))

    def extract_metadata(self, data: MetricsReport) -> dict[str, Any]:
        meta: dict[str, Any] = {"model": data.model, "split": data.split}
        meta.update(
            {k: float(v) for k, v in data.headline(("recall@10", "ndcg@10", "mrr", "recall@20", "ndcg@20")).items()}
        )
        return meta

    def save_visualizations(self, data: MetricsReport) -> dict[str, VisualizationType]:
        out = {self._write_text("metrics.md", data.to_markdown()): VisualizationType.MARKDOWN}
        counts = data.details.get("expert_counts")
        if counts:
            html = svg_bar_chart(
                counts,
                [f"E{i}" for i in range(len(counts))],
                f"Router: expert selected per user ({data.split}, {sum(counts)} users)",
                "users",
            )
            out[self._write_text("expert_usage.html", html)] = VisualizationType.HTML
        return out


class PromotionDecisionMaterializer(_FilesMixin):
    """The promotion gate's decision as ``decision.json`` (+ Markdown)."""

    ASSOCIATED_TYPES: ClassVar[tuple[type[Any], ...]] = (PromotionDecision,)
    ASSOCIATED_ARTIFACT_TYPE: ClassVar[ArtifactType] = ArtifactType.DATA_ANALYSIS

    def save(self, data: PromotionDecision) -> None:
        self._write_json("decision.json", data.to_dict())

    def load(self, data_type: type[Any]) -> PromotionDecision:
        return PromotionDecision.from_dict(self._read_json("decision.json"))

    def extract_metadata(self, data: PromotionDecision) -> dict[str, Any]:
        return {
            k: v
            for k, v in data.to_dict().items()
            if k != "details" and v is not None and isinstance(v, (str, int, float, bool))
        }

    def save_visualizations(self, data: PromotionDecision) -> dict[str, VisualizationType]:
        return {self._write_text("decision.md", data.to_markdown()): VisualizationType.MARKDOWN}


class ExportBundleMaterializer(_FolderMaterializer):
    """An exported folder (ONNX graphs, tokenizer, catalogue, manifest), copied file by file. Loading checks its
    manifest (:meth:`ExportBundle.load`): a bundle of an older format is an error saying so."""

    ASSOCIATED_TYPES: ClassVar[tuple[type[Any], ...]] = (ExportBundle,)
    ASSOCIATED_ARTIFACT_TYPE: ClassVar[ArtifactType] = ArtifactType.MODEL

    def save(self, data: ExportBundle) -> None:
        self._save_folder(data.save)

    def load(self, data_type: type[Any]) -> ExportBundle:
        return self._load_folder(_load_bundle, keep=True)  # the bundle is read from its folder later

    def extract_metadata(self, data: ExportBundle) -> dict[str, Any]:
        manifest = data.manifest
        meta: dict[str, Any] = {"files": len(data.files()), "bytes": data.size_bytes()}
        meta.update({"n_items": manifest.n_items, "dim": manifest.dim, "k": manifest.k})
        meta["format_version"] = manifest.format_version
        for rel in data.files():
            if rel.suffix == ".onnx":
                meta[f"{rel.stem}_bytes"] = (data.path / rel).stat().st_size
        return meta


def _load_bundle(folder: Path) -> ExportBundle:
    """The bundle in an artifact's folder, less ``files.json`` (the file list that materializers before
    ``_FolderMaterializer`` wrote beside the bundle's files; not a bundle file)."""
    (folder / "files.json").unlink(missing_ok=True)
    return ExportBundle.load(folder)


class DataFrameMaterializer(_FilesMixin):
    """A table (e.g. recommendations) as ``table.parquet``."""

    ASSOCIATED_TYPES: ClassVar[tuple[type[Any], ...]] = (pd.DataFrame,)
    ASSOCIATED_ARTIFACT_TYPE: ClassVar[ArtifactType] = ArtifactType.DATA

    def save(self, data: pd.DataFrame) -> None:
        self._write_parquet("table.parquet", data)

    def load(self, data_type: type[Any]) -> pd.DataFrame:
        return self._read_parquet("table.parquet")

    def extract_metadata(self, data: pd.DataFrame) -> dict[str, Any]:
        return {"rows": int(len(data)), "columns": ", ".join(map(str, data.columns))}

    def save_visualizations(self, data: pd.DataFrame) -> dict[str, VisualizationType]:
        head = data.head(20)
        return {
            self._write_text(
                "head.md",
                f"{len(data)} rows; first {len(head)}:\n\n"
                + markdown_table(list(map(str, head.columns)), head.itertuples(index=False)),
            ): VisualizationType.MARKDOWN
        }


class JSONDictMaterializer(_FilesMixin):
    """A plain dict of JSON values (training summaries, split reports) as ``data.json``."""

    ASSOCIATED_TYPES: ClassVar[tuple[type[Any], ...]] = (dict,)
    ASSOCIATED_ARTIFACT_TYPE: ClassVar[ArtifactType] = ArtifactType.DATA_ANALYSIS

    def save(self, data: dict) -> None:
        self._write_json("data.json", data)

    def load(self, data_type: type[Any]) -> dict:
        return self._read_json("data.json")

    def extract_metadata(self, data: dict) -> dict[str, Any]:
        return {k: v for k, v in data.items() if isinstance(v, (str, int, float, bool))}
