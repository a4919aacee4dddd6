"""Data layer: the canonical data model, loaders for every supported format, the split, text and validation."""

from laser_core.data.errors import DataFormatError
from laser_core.data.loading import DatasetConfig, detect_format, load_dataset
from laser_core.data.model import SeqDataset, normalize_text
from laser_core.data.split import Split, leave_one_out

__all__ = [
    "DataFormatError",
    "DatasetConfig",
    "SeqDataset",
    "Split",
    "detect_format",
    "leave_one_out",
    "load_dataset",
    "normalize_text",
]
