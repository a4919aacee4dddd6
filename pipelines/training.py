"""The training pipeline. For now: load_dataset → validate_dataset → split_dataset."""

from __future__ import annotations

from typing import Any

from zenml import pipeline

from steps.data import load_dataset, split_dataset, validate_dataset


@pipeline(name="laser_training")
def training_pipeline(dataset: dict[str, Any], validation: dict[str, Any], data_fingerprint: str) -> None:
    data = load_dataset(config=dataset, fingerprint=data_fingerprint)
    report = validate_dataset(data, config=validation)
    split_dataset(data, report)
