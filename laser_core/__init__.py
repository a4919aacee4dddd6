"""laser_core: the Laser library (data, models, training, metrics). No ZenML imports here."""

__version__ = "0.1.0"
