"""The training pipeline: load → validate → split → pretrain the ID-based recommender → evaluate it."""

from __future__ import annotations

from typing import Any

from zenml import pipeline

from steps.data import load_dataset, split_dataset, validate_dataset
from steps.sr import evaluate_sr, pretrain_sr


@pipeline(name="laser_training")
def training_pipeline(dataset: dict[str, Any], validation: dict[str, Any], data_fingerprint: str,
                      sr_model: dict[str, Any], sr_train: dict[str, Any]) -> None:
    data = load_dataset(config=dataset, fingerprint=data_fingerprint)
    report = validate_dataset(data, config=validation)
    split, _ = split_dataset(data, report)
    model, _ = pretrain_sr(split, model_config=sr_model, train_config=sr_train)
    evaluate_sr(model, split)
