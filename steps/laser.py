"""Laser steps: Bi-Tune stage 1 (table refreshed every epoch) → stage 2 (table frozen) → evaluate on test users."""

from __future__ import annotations

from typing import Annotated, Any

from zenml import step
from zenml.logger import get_logger

from laser_core.data.model import SeqDataset
from laser_core.data.split import Split
from laser_core.model import ItemTable, LaserSpec, LaserWeights, build_laser
from laser_core.sr import SequentialRecommender
from laser_core.reporting import MetricsReport
from laser_core.sr import SRConfig, evaluate
from laser_core.sr.popularity import Popularity
from laser_core.launch import fit_launched
from laser_core.train import LaserTrainConfig, LaserTrainer, test_examples, test_laser
from steps.materializers import ItemTableMaterializer, LaserWeightsMaterializer, MetricsReportMaterializer
from steps.mcp import log_model_metadata
from steps.sr import checkpoint_root

logger = get_logger(__name__)


def _fit(dataset: SeqDataset, split: Split, sr_model: SequentialRecommender, spec: LaserSpec,
         cfg: LaserTrainConfig, stage: int, label: str, weights: LaserWeights | None = None, table=None):
    """Train ``stage`` in this process, or, with ``laser_train.accelerate`` on, as an ``accelerate launch`` job
    of ``laser_train.processes`` processes (laser_core.launch: inputs and outputs as Parquet, safetensors and
    JSON). Returns the model holding the best weights, and the fit result (best, history, cost, item table)."""
    if cfg.accelerate:
        fit = fit_launched(dataset.items, split, sr_model, spec, cfg, stages=(stage,),
                           weights=weights.state if weights is not None else None, table=table,
                           workdir_root=checkpoint_root("laser"), label=label)
        logger.info("Stage %d ran as an accelerate job of %d process(es)", stage, fit.processes)
        return build_laser(spec, dataset.items, sr_model, weights=LaserWeights(spec=spec, state=fit.state)), fit
    model = build_laser(spec, dataset.items, sr_model, weights=weights)
    trainer = LaserTrainer(model, split, cfg, workdir_root=checkpoint_root("laser"), label=label)
    return model, trainer.fit(stages=(stage,), table=table)


def _summary(result, stage: int, model) -> dict:
    best = result.best.get(str(stage), {})
    return {"stage": stage, "best_epoch": best.get("epoch"), "best_valid": best.get("valid", {}),
            "best_valid_ndcg@10": best.get("valid", {}).get("ndcg@10"), "history": result.history,
            "cost": result.cost, "trainable": model.n_trainable(),
            "backbone_memory_bytes": model.backbone.memory_bytes(),
            "processes": getattr(result, "processes", 1)}


@step(output_materializers={"laser_stage1": LaserWeightsMaterializer, "item_table": ItemTableMaterializer})
def bi_tune_stage1(dataset: SeqDataset, split: Split, sr_model: SequentialRecommender, spec: dict[str, Any],
                   train_config: dict[str, Any]
                   ) -> tuple[Annotated[LaserWeights, "laser_stage1"], Annotated[ItemTable, "item_table"]]:
    """Stage 1: recompute the item table every epoch; keep the best validation epoch's weights and table."""
    laser_spec, cfg = LaserSpec.model_validate(spec), LaserTrainConfig.model_validate(train_config)
    model, result = _fit(dataset, split, sr_model, laser_spec, cfg, 1, "stage1")
    summary = _summary(result, 1, model)
    logger.info("Stage 1: best epoch %s, valid NDCG@10 %s", summary["best_epoch"], summary["best_valid_ndcg@10"])
    return (LaserWeights(spec=laser_spec, state=dict(model.state_dict()), summary=summary),
            ItemTable(table=result.item_table, weights_fingerprint=model.weights_fingerprint()))


@step(output_materializers={"laser_model": LaserWeightsMaterializer})
def bi_tune_stage2(dataset: SeqDataset, split: Split, sr_model: SequentialRecommender, laser_stage1: LaserWeights,
                   item_table: ItemTable, train_config: dict[str, Any]) -> Annotated[LaserWeights, "laser_model"]:
    """Stage 2: the stage-1 table is frozen; keep training the weights; keep the best validation epoch."""
    cfg = LaserTrainConfig.model_validate(train_config)
    model, result = _fit(dataset, split, sr_model, laser_stage1.spec, cfg, 2, "stage2", weights=laser_stage1,
                         table=item_table.table)
    summary = _summary(result, 2, model)
    summary["stage1"] = {k: laser_stage1.summary.get(k) for k in ("best_epoch", "best_valid", "cost")}
    logger.info("Stage 2: best epoch %s, valid NDCG@10 %s", summary["best_epoch"], summary["best_valid_ndcg@10"])
    return LaserWeights(spec=laser_stage1.spec, state=dict(model.state_dict()), summary=summary)


@step(output_materializers={"laser_metrics": MetricsReportMaterializer})
def evaluate_laser(dataset: SeqDataset, split: Split, sr_model: SequentialRecommender, laser_model: LaserWeights,
                   item_table: ItemTable, train_config: dict[str, Any]) -> Annotated[MetricsReport, "laser_metrics"]:
    """Test with the stage-2 weights and the frozen stage-1 table (full ranking; no history masking). The
    popularity baseline is scored on the same test pairs (the promotion gate can require beating it)."""
    cfg = LaserTrainConfig.model_validate(train_config)
    model = build_laser(laser_model.spec, dataset.items, sr_model, weights=laser_model)
    stats: dict = {}
    metrics = test_laser(model, item_table.table, split, cfg, stats=stats)
    hist, targets = test_examples(split, cfg)
    popularity = evaluate(Popularity(SRConfig(model="popularity"), split.n_items).fit(split.train), hist, targets)
    report = MetricsReport(
        model="laser", split="test", metrics=metrics,
        protocol={"ranking": "full, over all items", "mask_history": False, "split": "leave-one-out",
                  "users": len(targets), "test_users": cfg.test_users or "all"},
        details={"trainable": model.n_trainable(), "backbone": laser_model.spec.backbone.model_dump(),
                 "expert_counts": stats.get("expert_counts"), "popularity": popularity})
    logger.info("Laser test: %s (popularity on the same pairs: %s)", report.headline(),
                {k: round(popularity[k], 4) for k in ("recall@10", "ndcg@10", "mrr")})
    log_model_metadata({"laser_test": {**report.headline(), "users": len(targets)},
                        "popularity_test": {k: popularity[k] for k in ("recall@10", "ndcg@10", "mrr")},
                        "trainable_parameters": model.n_trainable()["total"],
                        "backbone": laser_model.spec.backbone.name,
                        "quantization": laser_model.spec.backbone.quantization})
    return report
