"""Data steps: load → validate (Great Expectations 1.x) → leave-one-out split."""

from __future__ import annotations

from typing import Annotated

from zenml import save_artifact, step
from zenml.logger import get_logger

from laser_core.data import loading
from laser_core.data.model import SeqDataset
from laser_core.data.split import Split, leave_one_out
from laser_core.data.loading import DatasetConfig
from laser_core.data.validation import ValidationConfig, ValidationReport, validate
from steps.materializers import (
    JSONDictMaterializer,
    SeqDatasetMaterializer,
    SplitMaterializer,
    ValidationReportMaterializer,
)

logger = get_logger(__name__)


@step(output_materializers=SeqDatasetMaterializer)
def load_dataset(config: DatasetConfig, fingerprint: str) -> Annotated[SeqDataset, "dataset"]:
    """Load a dataset in any supported format. ``fingerprint`` (a hash of the source files) only serves the
    cache: a changed file gives a new fingerprint and so a fresh load."""
    dataset = loading.load_dataset(config)
    stats = dataset.stats()
    logger.info(
        "Loaded %s: %d users, %d items, %d interactions (avg length %.2f)",
        dataset.name,
        stats["users"],
        stats["items"],
        stats["interactions"],
        stats["avg_length"],
    )
    cut = {field: n for field, n in dataset.source.get("texts_cut", {}).items() if n}
    if cut:  # counted in the validation report too
        logger.warning(
            "Item texts longer than %d characters were cut (dataset.max_text_chars): %s",
            dataset.source["max_text_chars"],
            ", ".join(f"{n} {field}(s)" for field, n in cut.items()),
        )
    return dataset


@step(output_materializers=ValidationReportMaterializer)
def validate_dataset(dataset: SeqDataset, config: ValidationConfig) -> Annotated[ValidationReport, "validation_report"]:
    """Run the Great Expectations suite. A failed validation saves the report as the ``validation_report``
    artifact and then stops the pipeline with an error that lists each failed expectation."""
    report = validate(dataset, config)
    if not report.success:
        save_artifact(
            report, name="validation_report", materializer=ValidationReportMaterializer, tags=["failed-validation"]
        )
        report.raise_for_failures()
    logger.info(
        "Validation passed: %d expectations (%s)", len(report.outcomes), "; ".join(report.skipped) or "none skipped"
    )
    return report


@step(output_materializers={"split": SplitMaterializer, "split_report": JSONDictMaterializer})
def split_dataset(
    dataset: SeqDataset, validation_report: ValidationReport
) -> tuple[Annotated[Split, "split"], Annotated[dict, "split_report"]]:
    """Leave-one-out split (last = test, second-to-last = validation; users with < 3 items train only)."""
    if not validation_report.success:  # defensive: the validation step already stops failed runs
        raise ValueError(f"refusing to split {dataset.name!r}: its validation failed")
    split = leave_one_out(dataset)
    report = split.report()
    logger.info(
        "Split: %d evaluation users, %d train-only users (< 3 items)", report["eval_users"], report["train_only_users"]
    )
    return split, report
