"""ID-based recommender steps: pretrain (BERT4Rec or SASRec, from the config) → evaluate on the test users."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Annotated

from zenml import step
from zenml.logger import get_logger

from laser_core.configuration import LaserSpec, LaserTrainConfig, TuneConfig
from laser_core.data.model import SeqDataset
from laser_core.data.split import Split
from laser_core.frozen_table import frozen_item_table
from laser_core.model import ItemTable
from laser_core.paths import default_cache_dir
from laser_core.evaluation import evaluate_split
from laser_core.sr import SequentialRecommender, SRConfig, TrainConfig, fit
from laser_core.sr.trainer import config_hash
from laser_core.reporting import MetricsReport, full_ranking_protocol
from steps.mcp import log_model_metadata
from steps.materializers import (
    ItemTableMaterializer,
    JSONDictMaterializer,
    MetricsReportMaterializer,
    SRModelMaterializer,
)

logger = get_logger(__name__)


def checkpoint_root(kind: str = "sr") -> Path:
    """Where interrupted trainings leave their checkpoints (``LASER_CACHE_DIR``, default ~/.cache/laser)."""
    return default_cache_dir() / "checkpoints" / kind


@step(output_materializers={"text_table": ItemTableMaterializer})
def frozen_text_table(
    dataset: SeqDataset, spec: LaserSpec, train_config: LaserTrainConfig
) -> Annotated[ItemTable, "text_table"]:
    """``sr.text_items``: the frozen LLM's item table (the config's backbone alone, Laser's item path, no prefix;
    :func:`laser_core.frozen_table.frozen_item_table`, also cached under ``LASER_CACHE_DIR`` by its content key),
    on ``laser_train.device`` in batches of ``laser_train.item_batch_size``."""
    table = frozen_item_table(spec, dataset.items, batch_size=train_config.item_batch_size, device=train_config.device)
    logger.info("frozen LLM item table: %s x %s", *table.table.shape)
    return table


@step
def tune_sr(
    split: Split,
    model_config: SRConfig,
    train_config: TrainConfig,
    space: TuneConfig,
    trials: int | None = None,
    minutes: float | None = None,
    text_table: ItemTable | None = None,
) -> tuple[Annotated[SRConfig, "tuned_sr_model"], Annotated[TrainConfig, "tuned_sr_train"]]:
    """``pipeline.tune_sr``: the ID model's settings tuned on validation (:func:`laser_core.sr.tune.tune`: TPE,
    median pruning, the search space ``sr_tune``) within the budget; the study and its trials live under
    ``LASER_CACHE_DIR`` (keyed by the study's content), so an interrupted or repeated run resumes it. The
    returned settings are what :func:`pretrain_sr` trains: it reloads the best trial's finished checkpoint, copied
    to its own checkpoint folder."""
    from laser_core.sr.tune import study_name, tune

    rows = text_table.table if text_table is not None else None
    base_train = train_config.model_copy(update={"progress": False})
    workdir = checkpoint_root("tune") / study_name(model_config, base_train, space, split, rows)
    result = tune(model_config, base_train, space, split, workdir, n_trials=trials, minutes=minutes, text_table=rows)
    # pretrain_sr reloads the best trial's finished checkpoint instead of training it again (same key: progress
    # and threads are not part of it)
    best = workdir / result.study.best_trial.user_attrs["workdir"]
    dest = checkpoint_root() / f"{result.sr.model}-{config_hash(result.sr, result.train, split, rows)}"
    if best.is_dir() and not dest.exists():
        shutil.copytree(best, dest)
    logger.info(
        "tuned %s: trial %d of %d, validation %s %.4f",
        model_config.model,
        result.study.best_trial.number,
        len(result.study.trials),
        train_config.monitor,
        result.value,
    )
    return result.sr, result.train.model_copy(update={"progress": train_config.progress})


@step(output_materializers={"sr_model": SRModelMaterializer, "sr_training": JSONDictMaterializer})
def pretrain_sr(
    split: Split,
    model_config: SRConfig,
    train_config: TrainConfig,
    resume: bool = True,
    text_table: ItemTable | None = None,
) -> tuple[Annotated[SequentialRecommender, "sr_model"], Annotated[dict, "sr_training"]]:
    """Train the ID-based recommender with early stopping on validation NDCG@10; return the best epoch's model.
    A crashed run resumes from its last epoch (checkpoints under ``LASER_CACHE_DIR``, keyed on the settings and
    the split's content); ``resume=False`` (``laser run --no-cache``) trains from scratch. ``text_table``: the
    frozen LLM item table (:func:`frozen_text_table`) that ``sr.text_items`` (init, join) needs."""
    cfg, tcfg = model_config, train_config
    rows = text_table.table if text_table is not None else None
    workdir = checkpoint_root() / f"{cfg.model}-{config_hash(cfg, tcfg, split, rows)}"
    result = fit(cfg, tcfg, split, workdir=workdir, resume=resume, text_table=rows)
    logger.info(
        "%s: best epoch %d of %d, valid %s",
        cfg.model,
        result.best_epoch,
        result.epochs_run,
        {k: round(v, 4) for k, v in result.best_valid.items() if k in ("recall@10", "ndcg@10", "mrr")},
    )
    summary = {
        "model": cfg.model,
        "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run,
        "stopped_early": result.stopped_early,
        "best_valid": result.best_valid,
        "mean_epoch_seconds": result.mean_epoch_seconds,
        "parameters": result.model.n_parameters(),
        "history": result.history,
    }
    return result.model, summary


@step(output_materializers={"sr_metrics": MetricsReportMaterializer})
def evaluate_sr(sr_model: SequentialRecommender, split: Split) -> Annotated[MetricsReport, "sr_metrics"]:
    """Full-ranking test metrics (history = training part + validation item; no history masking)."""
    metrics = evaluate_split(sr_model, split, "test")
    report = MetricsReport(
        model=sr_model.config.model,
        split="test",
        metrics=metrics,
        protocol=full_ranking_protocol(int(len(split.eval_users))),
        details={"parameters": sr_model.n_parameters()},
    )
    logger.info("%s test: %s", sr_model.config.model, report.headline())
    log_model_metadata({"sr_test": {"model": report.model, **report.headline()}})
    return report
