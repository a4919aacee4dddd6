"""Batch inference, the natural scheduled job: a stored model version (production by default) → top-k for all or
selected users of the current data, from the version's exported bundle as the online service answers → a Parquet
``recommendations`` artifact linked to that model version."""

from __future__ import annotations

from zenml import get_pipeline_context, pipeline

from laser_core.config import BatchConfig
from laser_core.data.loading import DatasetConfig

from pipelines.orphans import record_process
from steps.batch import batch_recommend
from steps.data import load_dataset


@pipeline(name="laser_batch_recommend", on_start=record_process)  # pid/host in the run: see pipelines/orphans.py
def batch_pipeline(dataset: DatasetConfig, data_fingerprint: str, batch: BatchConfig, model_version: str = "") -> None:
    model = get_pipeline_context().model
    data = load_dataset(config=dataset, fingerprint=data_fingerprint)
    batch_recommend(
        data,
        model.get_artifact("scorer_bundle"),
        batch_config=batch,
        model_version=model_version,
    )
