"""ID-based sequential recommenders: BERT4Rec and SASRec (Laser's frozen encoders), GRU4Rec and popularity."""

from laser_core.sr.base import SequentialRecommender
from laser_core.sr.checkpoint import build_model, load_model, save_model
from laser_core.configuration import SRConfig, TrainConfig
from laser_core.sr.trainer import FitResult, fit

__all__ = [
    "FitResult",
    "SRConfig",
    "SequentialRecommender",
    "TrainConfig",
    "build_model",
    "fit",
    "load_model",
    "save_model",
]
