"""Laser steps: Bi-Tune stage 1 (table refreshed every epoch) → stage 2 (table frozen) → evaluate on test users."""

from __future__ import annotations

from typing import Annotated

from zenml import step
from zenml.logger import get_logger

from laser_core.data.model import SeqDataset
from laser_core.data.split import Split
from laser_core.model import ItemTable, LaserSpec, LaserWeights, build_laser, item_state_beside
from laser_core.sr import SequentialRecommender
from laser_core.reporting import MetricsReport, full_ranking_protocol
from laser_core.evaluation import evaluate
from laser_core.sr import SRConfig
from laser_core.sr.popularity import Popularity
from laser_core.launch import fit_launched
from laser_core.train import LaserTrainConfig, LaserTrainer, test_examples, test_laser
from steps.materializers import ItemTableMaterializer, LaserWeightsMaterializer, MetricsReportMaterializer
from steps.mcp import log_model_metadata
from steps.sr import checkpoint_root

logger = get_logger(__name__)


def _fit(
    dataset: SeqDataset,
    split: Split,
    sr_model: SequentialRecommender,
    spec: LaserSpec,
    cfg: LaserTrainConfig,
    stage: int,
    label: str,
    weights: LaserWeights | None = None,
    table=None,
    resume: bool = True,
):
    """Train ``stage`` in this process, or, with ``laser_train.accelerate`` on, as an ``accelerate launch`` job
    of ``laser_train.processes`` processes (laser_core.launch: inputs and outputs as Parquet, safetensors and
    JSON). Returns the model holding the best weights, and the fit result (best, history, cost, item table).
    Checkpoints under ``LASER_CACHE_DIR`` are content-keyed (LaserTrainer.run_hash); ``resume=False`` reuses
    none of them."""
    if cfg.accelerate:
        fit = fit_launched(
            dataset.items,
            split,
            sr_model,
            spec,
            cfg,
            stages=(stage,),
            weights=weights.state if weights is not None else None,
            table=table,
            workdir_root=checkpoint_root("laser"),
            label=label,
            resume=resume,
        )
        logger.info("Stage %d ran as an accelerate job of %d process(es)", stage, fit.processes)
        return build_laser(
            spec, dataset.items, sr_model, weights=LaserWeights(spec=spec, state=fit.state), device=cfg.device
        ), fit
    model = build_laser(spec, dataset.items, sr_model, weights=weights, device=cfg.device)
    trainer = LaserTrainer(model, split, cfg, workdir_root=checkpoint_root("laser"), label=label, resume=resume)
    return model, trainer.fit(stages=(stage,), table=table)


def _summary(result, stage: int, model) -> dict:
    best = result.best.get(str(stage), {})
    return {
        "stage": stage,
        "best_epoch": best.get("epoch"),
        "best_valid": best.get("valid", {}),
        "best_valid_ndcg@10": best.get("valid", {}).get("ndcg@10"),
        "history": result.history,
        "cost": result.cost,
        "trainable": model.n_trainable(),
        "backbone_memory_bytes": model.backbone.memory_bytes(),
        "processes": getattr(result, "processes", 1),
    }


@step(output_materializers={"laser_stage1": LaserWeightsMaterializer, "item_table": ItemTableMaterializer})
def bi_tune_stage1(
    dataset: SeqDataset,
    split: Split,
    sr_model: SequentialRecommender,
    spec: LaserSpec,
    train_config: LaserTrainConfig,
    resume: bool = True,
) -> tuple[Annotated[LaserWeights, "laser_stage1"], Annotated[ItemTable, "item_table"]]:
    """Stage 1: recompute the item table every epoch; keep the best validation epoch's weights and table.
    ``resume=False`` (``laser run --no-cache``): reuse no private checkpoint."""
    laser_spec, cfg = spec, train_config
    model, result = _fit(dataset, split, sr_model, laser_spec, cfg, 1, "stage1", resume=resume)
    summary = _summary(result, 1, model)
    logger.info("Stage 1: best epoch %s, valid NDCG@10 %s", summary["best_epoch"], summary["best_valid_ndcg@10"])
    return (
        LaserWeights(spec=laser_spec, state=dict(model.state_dict()), summary=summary),
        ItemTable(table=result.item_table, weights_fingerprint=model.weights_fingerprint()),
    )


@step(output_materializers={"laser_model": LaserWeightsMaterializer})
def bi_tune_stage2(
    dataset: SeqDataset,
    split: Split,
    sr_model: SequentialRecommender,
    laser_stage1: LaserWeights,
    item_table: ItemTable,
    train_config: LaserTrainConfig,
    resume: bool = True,
) -> Annotated[LaserWeights, "laser_model"]:
    """Stage 2: the stage-1 table is frozen; keep training the weights; keep the best validation epoch.
    ``resume=False`` (``laser run --no-cache``): reuse no private checkpoint."""
    cfg = train_config
    model, result = _fit(
        dataset,
        split,
        sr_model,
        laser_stage1.spec,
        cfg,
        2,
        "stage2",
        weights=laser_stage1,
        table=item_table.table,
        resume=resume,
    )
    summary = _summary(result, 2, model)
    summary["stage1"] = {k: laser_stage1.summary.get(k) for k in ("best_epoch", "best_valid", "cost")}
    logger.info("Stage 2: best epoch %s, valid NDCG@10 %s", summary["best_epoch"], summary["best_valid_ndcg@10"])
    state = dict(model.state_dict())
    # the stage-1 weights made the frozen table: kept as the item side (table rows and new items alike)
    return LaserWeights(
        spec=laser_stage1.spec, state=state, summary=summary, item_state=item_state_beside(laser_stage1.state, state)
    )


@step(output_materializers={"laser_metrics": MetricsReportMaterializer})
def evaluate_laser(
    dataset: SeqDataset,
    split: Split,
    sr_model: SequentialRecommender,
    laser_model: LaserWeights,
    item_table: ItemTable,
    train_config: LaserTrainConfig,
) -> Annotated[MetricsReport, "laser_metrics"]:
    """Test with the stage-2 weights and the frozen stage-1 table (full ranking; no history masking). The
    baselines the promotion gate compares with are scored on exactly the same test (history, target) pairs:
    popularity, and the ID model (the frozen SR encoder Laser reads, ranking on its own)."""
    cfg = train_config
    model = build_laser(laser_model.spec, dataset.items, sr_model, weights=laser_model, device=cfg.device)
    stats: dict = {}
    metrics = test_laser(model, item_table.table, split, cfg, stats=stats)
    hist, targets = test_examples(split, cfg)
    popularity = evaluate(Popularity(SRConfig(model="popularity"), split.n_items).fit(split.train), hist, targets)
    id_model = evaluate(sr_model, hist, targets)
    report = MetricsReport(
        model="laser",
        split="test",
        metrics=metrics,
        protocol=full_ranking_protocol(len(targets), test_users=cfg.test_users or "all"),
        details={
            "trainable": model.n_trainable(),
            "backbone": laser_model.spec.backbone.model_dump(),
            "expert_counts": stats.get("expert_counts"),
            "popularity": popularity,
            "id_model": id_model,
            "id_model_name": sr_model.config.model,
            "valid": laser_model.summary.get("best_valid") or {},  # stage 2's best epoch: what models are chosen on
        },
    )
    logger.info(
        "Laser test: %s (on the same pairs: popularity %s, %s %s)",
        report.headline(),
        {k: round(popularity[k], 4) for k in ("recall@10", "ndcg@10", "mrr")},
        sr_model.config.model,
        {k: round(id_model[k], 4) for k in ("recall@10", "ndcg@10", "mrr")},
    )
    log_model_metadata(
        {
            "laser_test": {**report.headline(), "users": len(targets)},
            "popularity_test": {k: popularity[k] for k in ("recall@10", "ndcg@10", "mrr")},
            "id_model_test": {
                "model": sr_model.config.model,
                **{k: id_model[k] for k in ("recall@10", "ndcg@10", "mrr")},
                "users": len(targets),
            },
            "trainable_parameters": model.n_trainable()["total"],
            "backbone": laser_model.spec.backbone.name,
            "quantization": laser_model.spec.backbone.quantization,
        }
    )
    return report
