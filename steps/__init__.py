"""ZenML steps: thin wrappers that parse config, call laser_core and return named, typed artifacts."""

from steps.data import load_dataset, split_dataset, validate_dataset

__all__ = ["load_dataset", "split_dataset", "validate_dataset"]
