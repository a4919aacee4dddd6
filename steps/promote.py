"""The promotion gate: re-score the current production version on this run's test pairs and stage the new one."""

from __future__ import annotations

from typing import Annotated

from zenml import step
from zenml.client import Client
from zenml.enums import ModelStages
from zenml.logger import get_logger

from laser_core.data.model import SeqDataset
from laser_core.data.split import Split
from laser_core.model import build_laser
from laser_core.promotion import PromotionConfig, PromotionDecision, decide
from laser_core.reporting import MetricsReport
from laser_core.train import LaserTrainConfig, test_examples, test_laser
from steps.export import candidates, validation
from steps.materializers import PromotionDecisionMaterializer
from steps.mcp import current_model, log_model_metadata

logger = get_logger(__name__)


def rescore_version(
    version, dataset: SeqDataset, split: Split, train_config: LaserTrainConfig
) -> tuple[dict[str, float] | None, str]:
    """Test metrics of a stored model version on *these* test pairs, or (None, why) when it cannot be scored
    here (another catalogue, or artifacts missing). A version that serves the lexical hybrid is scored through
    its bundle (``laser_core.serving.bundle_metrics``), a Laser version through its weights and table."""
    bundle = version.get_artifact("scorer_bundle")
    if bundle is not None and bundle.load().manifest.model_kind == "lexical_hybrid":
        return _rescore_bundle(version, bundle.load(), dataset, split, train_config)
    arts = {}
    for name in ("dataset", "sr_model", "laser_model", "item_table"):
        art = version.get_artifact(name)
        if art is None:
            return None, f"version {version.name} has no {name!r} artifact"
        arts[name] = art
    old_items = arts["dataset"].load().items["item_id"].astype(str).tolist()
    if old_items != dataset.items["item_id"].astype(str).tolist():
        return None, f"version {version.name} was trained on a different catalogue"
    weights = arts["laser_model"].load()
    model = build_laser(weights.spec, dataset.items, arts["sr_model"].load(), weights=weights)
    return test_laser(model, arts["item_table"].load().table, split, train_config), ""


def _rescore_bundle(
    version, bundle, dataset: SeqDataset, split: Split, train_config: LaserTrainConfig
) -> tuple[dict[str, float] | None, str]:
    from laser_core.serving import Recommender, bundle_metrics

    rec = Recommender.load(bundle.path)
    trained = rec.item_ids[: rec.n_trained_items]
    if list(trained) != dataset.items["item_id"].astype(str).tolist():
        return None, f"version {version.name} was trained on a different catalogue"
    hist, targets = test_examples(split, train_config)
    return bundle_metrics(rec, hist, targets), ""


@step(output_materializers={"promotion_decision": PromotionDecisionMaterializer})
def promote(
    dataset: SeqDataset,
    split: Split,
    laser_metrics: MetricsReport | None = None,
    train_config: LaserTrainConfig | None = None,
    promotion: PromotionConfig | None = None,
    production_version_id: str | None = None,
    model_name: str = "",
    lexical_metrics: MetricsReport | None = None,
) -> Annotated[PromotionDecision, "promotion_decision"]:
    """Stage the new model version: ``staging`` when valid, ``production`` when it beats the required baselines
    (popularity by default; the ID model optionally) and the current production version (re-scored here), all on
    the same test pairs, by the configured margins (laser_core.promotion). When the run fitted Laser and the
    lexical hybrid, the version serves the better of the two on validation (``choose_model``; the export step
    exported that one) and the decision says which won and by how much; its test metrics go through the gate. ``production_version_id`` (the production version
    when the run started) and ``model_name`` are parameters so that the step's cache follows the registry: a
    cached decision is reused only for the same model and the same production version."""
    cfg, tcfg = promotion or PromotionConfig(), train_config or LaserTrainConfig()
    model = current_model()
    fitted = candidates(laser_metrics, lexical_metrics)
    if not fitted:
        raise ValueError("promote: no model's metrics (neither laser_metrics nor lexical_metrics)")
    first = laser_metrics or lexical_metrics
    # the baselines, scored by evaluate_laser (or fit_lexical) on exactly the test pairs the models were scored on
    baselines = {
        "popularity": first.details.get("popularity"),
        "id_model": first.details.get("id_model"),
        "id_model_name": first.details.get("id_model_name"),
        "users": first.protocol.get("users"),
        "candidates": fitted,
        "validation": validation(laser_metrics, lexical_metrics),
    }
    if model is None:
        decision = decide(cfg, first.metrics, **baselines)
        decision.stage, decision.reason = None, "pipeline not bound to a ZenML Model: nothing to promote"
        return decision
    client = Client()
    current = client.get_model_version(model.name, model.version)
    production = None
    if production_version_id == "lookup-at-run-time":  # a scheduled run: read the registry now
        try:
            production = client.get_model_version(model.name, ModelStages.PRODUCTION)
        except KeyError:
            production = None
    elif production_version_id is not None:
        production = client.get_model_version(model.name, production_version_id)
    if production is not None and production.id == current.id:
        production = None
    prod_metrics, why = (None, "")
    if production is not None:
        prod_metrics, why = rescore_version(production, dataset, split, tcfg)
    decision = decide(
        cfg,
        first.metrics,
        production=prod_metrics,
        production_version=None if production is None else production.name,
        comparable=production is None or prod_metrics is not None,
        **baselines,
    )
    if why:
        decision.details["not_comparable"] = why
    decision.details.update(new_version=current.name, model=model.name)
    if decision.stage is not None:
        current.set_stage(decision.stage, force=True)
    logger.info("Promotion of %s v%s: %s", model.name, current.name, decision.reason)
    log_model_metadata({"promotion": {k: v for k, v in decision.to_dict().items() if v is not None}})
    return decision
