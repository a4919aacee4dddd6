"""The configuration classes of the models (torch-free, as Hugging Face's ``configuration_*.py``).

A run config (``laser_core.config.LaserConfig``) is read and checked with these classes alone: reading a YAML file
imports neither torch nor transformers. The modules that build the models (:mod:`laser_core.llm.backbones`,
:mod:`laser_core.mformer`, :mod:`laser_core.model`) import them from here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import ConfigDict, Field

from laser_core.configbase import StrictConfig
from laser_core.data.text import TextConfig
from laser_core.paths import default_cache_dir

SMOLLM2 = "smollm2-135m-instruct"
TINY = ("tiny-random-llama", "tiny-random-gpt2")


# ------------------------------------------------------------------------------------------- the frozen LLM
class TinyConfig(StrictConfig):
    model_config = ConfigDict(extra="forbid")

    hidden_size: int = Field(default=64, ge=8)  # keep multiples of 64 for 4-bit on CPU
    n_layers: int = Field(default=2, ge=1)
    n_heads: int = Field(default=4, ge=1)
    vocab_size: int = Field(default=512, ge=300)
    seed: int = 0


class BackboneConfig(StrictConfig):
    model_config = ConfigDict(extra="forbid")

    name: str = SMOLLM2
    quantization: Literal["nf4", "int8", "none"] = "nf4"
    compute_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        default="auto",
        description=("auto: bfloat16 on a CUDA device, float32 on the CPU (the device the backbone is loaded on)"),
    )
    cache_dir: str | None = None
    trust_remote_code: bool = False
    gradient_checkpointing: bool = False
    num_layers: int | None = Field(
        default=None,
        ge=1,
        description=(
            "keep only the first N decoder layers (+ the final norm) of the causal LM; None: all of them. Fewer "
            "layers cost proportionally fewer FLOPs (bench/frozen_llm.py measures quality per N)"
        ),
    )
    tiny: TinyConfig = Field(default_factory=TinyConfig)

    def cache_path(self) -> Path:
        return Path(self.cache_dir).expanduser() if self.cache_dir else default_cache_dir()


# --------------------------------------------------------------------------------------------- the M-Former
class MFormerConfig(StrictConfig):
    model_config = ConfigDict(extra="forbid")

    n_experts: int = Field(default=8, ge=1)  # K
    n_query: int = Field(default=32, ge=1)  # L
    width: int = Field(default=768, ge=8)  # d_m
    n_layers: int = Field(default=12, ge=1)  # Z
    n_heads: int = Field(default=12, ge=1)
    cross_attention_every: int = Field(default=2, ge=1)
    ffn_mult: int = Field(default=4, ge=1)
    dropout: float = Field(default=0.1, ge=0.0, lt=1.0)


# -------------------------------------------------------------------------------------------------- Laser
class BiTuneConfig(StrictConfig):
    """The model side of Laser. Paper: M-Former K=8, L=32, width 768, 12 blocks, 12 heads; suffix pooling."""

    model_config = ConfigDict(extra="forbid")

    prefix: Literal["mformer", "plain", "none"] = "mformer"
    pooling: Literal["suffix", "mean", "eos"] = "suffix"
    mformer: MFormerConfig = Field(default_factory=MFormerConfig)
    prefix_init: Literal["default", "token_norm"] = Field(
        default="default",
        description=(
            "token_norm: scale the prefix at initialisation to the mean norm of the backbone's token embeddings"
        ),
    )
    embedding_transform: Literal["none", "center", "whiten"] = Field(
        default="none",
        description=(
            "centre (or ZCA-whiten) the LLM embeddings of users and items, fitted once on the initial item table"
        ),
    )
    fusion: Literal["none", "concat"] = Field(
        default="none",
        description=(
            "concat: score = the frozen ID model's score + w x Laser's cosine (user and item vectors concatenated; "
            "needs an ID model with dot-product scores: SASRec or BERT4Rec)"
        ),
    )
    fusion_init_weight: float = Field(default=10.0, gt=0, description="w at initialisation (fusion: concat)")

    @property
    def reads_item_ids(self) -> bool:
        """:func:`reads_item_ids` of these settings."""
        return reads_item_ids(self.prefix, self.fusion)


def reads_item_ids(prefix: str, fusion: str) -> bool:
    """Whether a Laser model's user side reads the item-ID history through the frozen ID model: the M-Former prefix
    does, and so does the fusion (its user vector joins the ID model's). Such a model needs the ID model, and its
    user tower takes ``item_ids``/``item_mask`` (the bundle manifest's rule too)."""
    return prefix == "mformer" or fusion != "none"


class LaserSpec(StrictConfig):
    """Everything needed to rebuild a Laser model around its trained weights."""

    model_config = ConfigDict(extra="forbid")

    bitune: BiTuneConfig = Field(default_factory=BiTuneConfig)
    text: TextConfig = Field(default_factory=TextConfig)
    backbone: BackboneConfig = Field(default_factory=BackboneConfig)
    seed: int = 0
