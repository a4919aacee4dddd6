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
from laser_core.sr import SequentialRecommender
from steps.materializers import ExportBundleMaterializer
from steps.mcp import current_model, log_model_metadata

logger = get_logger(__name__)


@step(output_materializers={"scorer_bundle": ExportBundleMaterializer})
def export_scorer(
    dataset: SeqDataset,
    split: Split,
    sr_model: SequentialRecommender,
    laser_model: LaserWeights,
    item_table: ItemTable,
    export_config: ExportConfig,
) -> Annotated[ExportBundle, "scorer_bundle"]:
    """The suffix-projected scorer and (optionally) the user tower as ONNX, with tokenizer, catalogue and a
    manifest naming the model version they came from."""
    from laser_core.export import export_bundle, popularity_from_sequences

    cfg = export_config
    model = current_model()
    metadata = (
        {
            "model_name": model.name,
            "model_version": f"{model.name}:{model.version}",
            "model_version_number": str(model.version),
        }
        if model is not None
        else {}
    )
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
                "files": [f.as_posix() for f in bundle.files()],
                "bytes": bundle.size_bytes(),
                "k": cfg.k,
                "user_tower": cfg.user_tower,
            }
        }
    )
    return bundle
