"""Configuration of the ID-based sequential recommenders (typed, validated, stored as JSON beside weights)."""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field

from laser_core.configbase import StrictConfig

ModelName = Literal["popularity", "gru4rec", "sasrec", "bert4rec"]


class SRConfig(StrictConfig):
    """Hyper-parameters of one model. Defaults are the paper's frozen encoder: 2 blocks, 2 heads, hidden 64."""

    model_config = ConfigDict(extra="forbid")

    model: ModelName = "bert4rec"
    hidden_size: int = Field(default=64, ge=1)
    n_layers: int = Field(default=2, ge=1)
    n_heads: int = Field(default=2, ge=1)
    inner_size: int | None = Field(default=None, ge=1, description="FFN width (default 4 x hidden)")
    dropout: float = Field(default=0.2, ge=0.0, lt=1.0)
    attn_dropout: float = Field(default=0.2, ge=0.0, lt=1.0)
    max_len: int = Field(default=50, ge=2)
    mask_prob: float = Field(default=0.2, gt=0.0, lt=1.0, description="BERT4Rec cloze mask ratio")
    mask_last_prob: float = Field(
        default=0.1, ge=0.0, le=1.0, description="BERT4Rec: share of sequences with only the last item masked"
    )

    @property
    def ffn_size(self) -> int:
        return self.inner_size or 4 * self.hidden_size


class TrainConfig(StrictConfig):
    """Trainer settings: Adam, validation by full ranking each epoch, early stopping on ``monitor``."""

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(default=200, ge=1)
    batch_size: int = Field(default=128, ge=1)
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    patience: int = Field(default=10, ge=1)
    monitor: str = "ndcg@10"
    eval_batch_size: int = Field(default=512, ge=1)
    seed: int = 0
    threads: int | None = Field(default=None, ge=1)
    progress: bool = True
