"""The lexical hybrid's step: fit it after the ID model (validation only), score it on Laser's test pairs with the
one evaluation loop, export its bundle (``laser_core.lexical``, ``laser_core.export.export_lexical_bundle``)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated

from zenml import step
from zenml.logger import get_logger

from laser_core.bundle import ExportBundle
from laser_core.config import ExportConfig
from laser_core.configuration import LexicalConfig, TrainConfig
from laser_core.data.model import SeqDataset
from laser_core.data.split import Split
from laser_core.data.text import TextConfig
from laser_core.reporting import MetricsReport
from laser_core.sr import SequentialRecommender
from laser_core.train import LaserTrainConfig
from steps.export import bundle_metadata
from steps.materializers import ExportBundleMaterializer, MetricsReportMaterializer
from steps.mcp import log_model_metadata

logger = get_logger(__name__)


@step(output_materializers={"lexical_metrics": MetricsReportMaterializer, "lexical_bundle": ExportBundleMaterializer})
def fit_lexical(
    dataset: SeqDataset,
    split: Split,
    sr_model: SequentialRecommender,
    lexical: LexicalConfig,
    text: TextConfig,
    sr_train: TrainConfig,
    train_config: LaserTrainConfig,
    export_config: ExportConfig,
) -> tuple[Annotated[MetricsReport, "lexical_metrics"], Annotated[ExportBundle, "lexical_bundle"]]:
    """Fit the lexical hybrid on validation (``lexical``: TF-IDF settings, gammas, forms; ``text``: the item
    texts' settings; ``sr_train.mask_history``: ranked as the ID model was validated; validation scored
    ``sr_train.eval_batch_size`` users at a time), score it on the test
    pairs Laser is scored on (``laser_train.test_users``) beside popularity and the ID model, and export it."""
    from laser_core.export import export_lexical_bundle, popularity_from_sequences
    from laser_core.lexical import evaluate_lexical, fit_lexical_hybrid

    model = fit_lexical_hybrid(
        sr_model,
        split,
        dataset.items,
        lexical,
        text,
        mask_history=sr_train.mask_history,
        batch_size=sr_train.eval_batch_size,
    )
    report = evaluate_lexical(model, split, train_config)
    out = Path(tempfile.mkdtemp(prefix="laser-lexical-"))
    export_lexical_bundle(
        model,
        dataset.items,
        out,
        k=export_config.k,
        metadata=bundle_metadata(),
        popularity=popularity_from_sequences(split.train, split.n_items),
    )
    logger.info(
        "Lexical hybrid (%s, gamma %s): valid NDCG@10 %.4f, test %s",
        model.form,
        model.gamma,
        model.valid.get("ndcg@10", float("nan")),
        report.headline(),
    )
    log_model_metadata(
        {"lexical_test": {**report.headline(), "users": report.protocol["users"]}, "lexical_model": model.describe()}
    )
    return report, ExportBundle(out)
