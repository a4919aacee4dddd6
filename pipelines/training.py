"""The training pipeline:
load → validate → split → pretrain the ID-based recommender → evaluate it → Bi-Tune stage 1 → stage 2 → evaluate.

``stop_after`` ("split" | "sr" | "laser") ends the pipeline early, e.g. to pretrain baselines only.
"""

from __future__ import annotations

from typing import Any

from zenml import pipeline

from steps.data import load_dataset, split_dataset, validate_dataset
from steps.laser import bi_tune_stage1, bi_tune_stage2, evaluate_laser
from steps.sr import evaluate_sr, pretrain_sr


@pipeline(name="laser_training")
def training_pipeline(dataset: dict[str, Any], validation: dict[str, Any], data_fingerprint: str,
                      sr_model: dict[str, Any], sr_train: dict[str, Any], laser: dict[str, Any],
                      laser_train: dict[str, Any], stop_after: str = "laser") -> None:
    data = load_dataset(config=dataset, fingerprint=data_fingerprint)
    report = validate_dataset(data, config=validation)
    split, _ = split_dataset(data, report)
    if stop_after == "split":
        return
    model, _ = pretrain_sr(split, model_config=sr_model, train_config=sr_train)
    evaluate_sr(model, split)
    if stop_after == "sr":
        return
    stage1, table = bi_tune_stage1(data, split, model, spec=laser, train_config=laser_train)
    laser_model = bi_tune_stage2(data, split, model, stage1, table, train_config=laser_train)
    evaluate_laser(data, split, model, laser_model, table, train_config=laser_train)
