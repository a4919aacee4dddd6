"""Frozen LLM backbones: name resolution, offline SmolLM2 fetch, tiny test models, 4-bit loading."""

from laser_core.paths import default_cache_dir
from laser_core.llm.backbones import (
    SMOLLM2,
    TINY,
    Backbone,
    BackboneConfig,
    TinyConfig,
    build_tiny_backbone,
    load_backbone,
    quantized_linear_share,
    resolve_backbone,
)

__all__ = [
    "SMOLLM2",
    "TINY",
    "Backbone",
    "BackboneConfig",
    "TinyConfig",
    "build_tiny_backbone",
    "default_cache_dir",
    "load_backbone",
    "quantized_linear_share",
    "resolve_backbone",
]
