"""The training pipeline:
load → validate → split → pretrain the ID-based recommender → evaluate it → Bi-Tune stage 1 → stage 2 →
evaluate Laser → export the scorer → promote (the gate of the Model Control Plane).

``models`` (``pipeline.models``) names what is fitted after the ID model: ``laser`` (the Bi-Tune steps) and/or
``lexical_hybrid`` (``fit_lexical``: the ID model + TF-IDF, fitted on validation, scored on Laser's test pairs,
exported). With both, the version serves the better of the two (the export step exports it, the promote step's
decision says which won and by how much).

``tune_sr`` (``pipeline.tune_sr``, a budget): the ID model's settings are tuned first (search space ``sr_tune``)
and the pretrain step trains the best ones.

``stop_after`` ("split" | "sr" | "laser" | "promote") ends the pipeline early, e.g. to pretrain baselines only.
Run it through :func:`pipelines.run.run_training`, which binds it to the config's ZenML ``Model``.
"""

from __future__ import annotations

from zenml import pipeline

from laser_core.config import ExportConfig, TuneBudget
from laser_core.configuration import LaserSpec, LaserTrainConfig, LexicalConfig, SRConfig, TrainConfig, TuneConfig
from laser_core.data.loading import DatasetConfig
from laser_core.data.validation import ValidationConfig
from laser_core.promotion import PromotionConfig

from pipelines.orphans import record_process
from steps.data import load_dataset, split_dataset, validate_dataset
from steps.export import export_scorer
from steps.laser import bi_tune_stage1, bi_tune_stage2, evaluate_laser
from steps.lexical import fit_lexical
from steps.promote import promote
from steps.sr import evaluate_sr, frozen_text_table, pretrain_sr, tune_sr


@pipeline(name="laser_training", on_start=record_process)  # pid/host in the run: see pipelines/orphans.py
def training_pipeline(
    dataset: DatasetConfig,
    validation: ValidationConfig,
    data_fingerprint: str,
    sr_model: SRConfig,
    sr_train: TrainConfig,
    laser: LaserSpec,
    laser_train: LaserTrainConfig,
    export: ExportConfig | None = None,
    promotion: PromotionConfig | None = None,
    production_version_id: str | None = None,
    model_name: str = "",
    stop_after: str = "promote",
    fresh_data: bool = False,
    resume: bool = True,
    models: list[str] | None = None,
    lexical: LexicalConfig | None = None,
    sr_tune: TuneConfig | None = None,
    tune_sr_budget: TuneBudget | None = None,
) -> None:
    """The sections of the run config, typed (ZenML validates each parameter against its class once, when the run
    is compiled; the steps receive the objects). ``resume=False`` (``laser run --no-cache``): the training steps
    reuse no private checkpoint either."""
    # scheduled runs read the data again each time (the fingerprint was taken when the schedule was registered)
    loader = load_dataset.with_options(enable_cache=False) if fresh_data else load_dataset
    data = loader(config=dataset, fingerprint=data_fingerprint)
    report = validate_dataset(data, config=validation)
    split, _ = split_dataset(data, report)
    if stop_after == "split":
        return
    text_table = None  # sr.text_items (route b): the frozen LLM's item table enters the ID model
    if sr_model.text_items != "none":
        text_table = frozen_text_table(data, spec=laser, train_config=laser_train)
    if tune_sr_budget is not None:  # pipeline.tune_sr: the settings pretrain_sr trains are the tuned ones
        sr_model, sr_train = tune_sr(
            split,
            model_config=sr_model,
            train_config=sr_train,
            space=sr_tune or TuneConfig(),
            trials=tune_sr_budget.trials,
            minutes=tune_sr_budget.minutes,
            text_table=text_table,
        )
    model, _ = pretrain_sr(split, model_config=sr_model, train_config=sr_train, resume=resume, text_table=text_table)
    evaluate_sr(model, split)
    if stop_after == "sr":
        return
    models = models or ["laser"]
    export, promotion = export or ExportConfig(), promotion or PromotionConfig()
    laser_model = table = metrics = lexical_metrics = lexical_bundle = None
    if "laser" in models:
        stage1, table = bi_tune_stage1(data, split, model, spec=laser, train_config=laser_train, resume=resume)
        laser_model = bi_tune_stage2(data, split, model, stage1, table, train_config=laser_train, resume=resume)
        metrics = evaluate_laser(data, split, model, laser_model, table, train_config=laser_train)
    if "lexical_hybrid" in models:
        lexical_metrics, lexical_bundle = fit_lexical(
            data,
            split,
            model,
            lexical=lexical or LexicalConfig(),
            text=laser.text,
            sr_train=sr_train,
            train_config=laser_train,
            export_config=export,
        )
    if stop_after == "laser":
        return
    export_scorer(
        data,
        split,
        model,
        laser_model=laser_model,
        item_table=table,
        export_config=export,
        laser_metrics=metrics,
        lexical_metrics=lexical_metrics,
        lexical_bundle=lexical_bundle,
        metric=promotion.metric,
    )
    promote(
        data,
        split,
        laser_metrics=metrics,
        lexical_metrics=lexical_metrics,
        train_config=laser_train,
        promotion=promotion,
        production_version_id=production_version_id,
        model_name=model_name,
        after=["export_scorer"],
    )
