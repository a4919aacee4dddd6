"""Export the trained Laser for serving: ``scorer.onnx`` (item table baked in) + ``user_tower.onnx``."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated

from zenml import step
from zenml.logger import get_logger

from laser_core.bundle import ExportBundle
from laser_core.config import ExportConfig
from laser_core.data.model import SeqDataset
from laser_core.data.split import Split
from laser_core.model import ItemTable, LaserWeights
from laser_core.promotion import PromotionConfig, choose_model
from laser_core.reporting import MetricsReport
from laser_core.sr import SequentialRecommender
from steps.materializers import ExportBundleMaterializer
from steps.mcp import current_model, log_model_metadata

logger = get_logger(__name__)


def bundle_metadata() -> dict:
    """The bundle manifest's ``metadata``: the ZenML model version the running pipeline is bound to (if any)."""
    model = current_model()
    if model is None:
        return {}
    return {
        "model_name": model.name,
        "model_version": f"{model.name}:{model.version}",
        "model_version_number": str(model.version),
    }


def candidates(laser_metrics: MetricsReport | None, lexical_metrics: MetricsReport | None) -> dict[str, dict]:
    """The models the run fitted and scored on the same test pairs: name -> test metrics (reported and gated by
    ``laser_core.promotion.choose_model``/``decide``, never chosen on)."""
    out = {}
    if laser_metrics is not None:
        out["laser"] = laser_metrics.metrics
    if lexical_metrics is not None:
        out["lexical_hybrid"] = lexical_metrics.metrics
    return out


def validation(laser_metrics: MetricsReport | None, lexical_metrics: MetricsReport | None) -> dict[str, dict]:
    """The same models' VALIDATION metrics, what the choice between them is made on: each report's
    ``details["valid"]`` (Laser's best stage-2 epoch's, ``LaserWeights.summary["best_valid"]``, as
    ``evaluate_laser`` carries it; the lexical fit's chosen setting's, ``LexicalHybrid.valid``)."""
    reports = {"laser": laser_metrics, "lexical_hybrid": lexical_metrics}
    return {name: dict(r.details.get("valid") or {}) for name, r in reports.items() if r is not None}


@step(output_materializers={"scorer_bundle": ExportBundleMaterializer})
def export_scorer(
    dataset: SeqDataset,
    split: Split,
    sr_model: SequentialRecommender,
    laser_model: LaserWeights | None = None,
    item_table: ItemTable | None = None,
    export_config: ExportConfig | None = None,
    laser_metrics: MetricsReport | None = None,
    lexical_metrics: MetricsReport | None = None,
    lexical_bundle: ExportBundle | None = None,
    metric: str = PromotionConfig().metric,
) -> Annotated[ExportBundle, "scorer_bundle"]:
    """The version's bundle. With one model (Laser: the suffix-projected scorer and, optionally, the user tower
    as ONNX, with tokenizer, catalogue and a manifest naming the model version), that model's; with Laser and the
    lexical hybrid (``pipeline.models``), the better of the two on ``metric`` (the promotion metric: only it, so
    that a change of the gate's margins does not export again) on VALIDATION, never on the test pairs the gate
    judges (``laser_core.promotion.choose_model``, as the promote step's decision says): the lexical bundle the
    ``fit_lexical`` step wrote, or Laser's, exported here."""
    from laser_core.export import export_bundle, popularity_from_sequences

    cfg = export_config or ExportConfig()
    fitted = candidates(laser_metrics if laser_model is not None else None, lexical_metrics)
    if laser_model is not None and "laser" not in fitted:
        fitted = {"laser": {}}  # Laser alone, its metrics not passed: nothing to choose
    if not fitted:
        raise ValueError("export_scorer: no model to export (neither Laser's weights nor a lexical bundle)")
    chosen = choose_model(metric, fitted, validation(laser_metrics, lexical_metrics)) if len(fitted) > 1 else None
    model = next(iter(fitted)) if chosen is None else chosen.model
    if chosen is not None:
        logger.info("Exporting %s: %s", model, chosen.why)
    if model == "lexical_hybrid":
        if lexical_bundle is None:
            raise ValueError("export_scorer: the lexical hybrid was chosen but its bundle was not passed")
        bundle = ExportBundle(lexical_bundle.save(Path(tempfile.mkdtemp(prefix="laser-export-"))))
    else:
        metadata = bundle_metadata()
        out = Path(tempfile.mkdtemp(prefix="laser-export-"))
        export_bundle(
            laser_model,
            sr_model,
            dataset.items,
            item_table.table,
            out,
            k=cfg.k,
            metadata=metadata,
            user_tower=cfg.user_tower,
            popularity=popularity_from_sequences(split.train, split.n_items),
        )
        bundle = ExportBundle(out)
    logger.info("Exported %d files (%.1f MB) to the artifact store", len(bundle.files()), bundle.size_bytes() / 2**20)
    log_model_metadata(
        {
            "export": {
                "model": model,
                "files": [f.as_posix() for f in bundle.files()],
                "bytes": bundle.size_bytes(),
                "k": cfg.k,
                "user_tower": cfg.user_tower,
            }
        }
    )
    return bundle
