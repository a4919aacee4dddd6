"""The configuration classes of the models (torch-free, as Hugging Face's ``configuration_*.py``).

A run config (``laser_core.config.LaserConfig``) is read and checked with these classes alone: reading a YAML file
imports neither torch nor transformers. The modules that build the models (:mod:`laser_core.llm.backbones`,
:mod:`laser_core.mformer`, :mod:`laser_core.model`) import them from here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import ConfigDict, Field, model_validator

from laser_core.configbase import StrictConfig
from laser_core.data.text import TextConfig
from laser_core.hybrid import FORMS, GAMMAS, TfidfConfig
from laser_core.paths import default_cache_dir

SMOLLM2 = "smollm2-135m-instruct"
TINY = ("tiny-random-llama", "tiny-random-gpt2")
DEVICE_PATTERN = r"^(auto|cpu|cuda(:\d+)?)$"  # a device setting (laser_core.device.resolve_device)


# ------------------------------------------------------------------------------- the ID-based models (SR)
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
    loss: Literal["ce", "sampled"] = Field(
        default="ce",
        description="ce: softmax cross-entropy over all items; sampled: over the target and n_negatives items drawn "
        "uniformly per batch (shared by its positions; a negative equal to the target is left out)",
    )
    n_negatives: int = Field(default=256, ge=1, description="negatives per batch of the sampled softmax")
    text_items: Literal["none", "init", "join"] = Field(
        default="none",
        description="the frozen LLM's item table in the item embeddings (SASRec, BERT4Rec; laser_core.sr.text_items): "
        "init: its rows (reduced to hidden_size) are the embeddings' initial value; join: embedding = ID embedding + "
        "a trained linear map of the fixed row; none: IDs only",
    )
    text_transform: Literal["whitened", "centered"] = Field(
        default="whitened",
        description="the table's reduction to hidden_size: top principal components, each scaled to unit variance "
        "(whitened) or not (centered)",
    )
    text_scale: float = Field(
        default=1.0,
        gt=0,
        description="root mean square of the reduced table's entries (1: whitened components at unit variance); "
        "the ID embeddings' init std (0.02) is washed out by Adam's first steps (docs/models.md)",
    )

    @model_validator(mode="after")
    def _text_items_need_item_embeddings(self) -> "SRConfig":
        if self.text_items != "none" and self.model not in ("sasrec", "bert4rec"):
            raise ValueError(f"text_items: {self.text_items!r} needs model sasrec or bert4rec, got {self.model!r}")
        return self

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
    mask_history: bool = Field(
        default=False,
        description="validation (and so early stopping and tuning) ranks with each user's history excluded",
    )
    eval_batch_size: int = Field(default=512, ge=1)
    seed: int = 0
    threads: int | None = Field(default=None, ge=1)
    progress: bool = True


class _Range(StrictConfig):
    """``low`` to ``high`` (both included); ``low == high`` fixes the value."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="after")
    def _ordered(self) -> "_Range":
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) must be <= high ({self.high})")
        return self


class IntRange(_Range):
    """Integers from ``low`` to ``high`` (both included); ``low == high`` fixes the value."""

    low: int = Field(ge=0)
    high: int = Field(ge=0)


class FloatRange(_Range):
    """Numbers from ``low`` to ``high``; ``low == high`` fixes the value."""

    low: float = Field(ge=0)
    high: float = Field(ge=0)


class TuneConfig(StrictConfig):
    """The search space and the tuner of ``laser sr tune`` (:mod:`laser_core.sr.tune`): Optuna's TPE sampler,
    median pruning on the per-epoch validation ``sr_train.monitor``. Narrow a range (or fix a value with a
    one-element list, or ``low == high``) to search less. Every ``n_heads`` choice must divide every
    ``hidden_size`` choice. ``dropout`` sets both dropouts of the model; ``sr_train.epochs`` is each trial's
    maximum; ``lr`` is searched on a log scale."""

    model_config = ConfigDict(extra="forbid")

    hidden_size: list[int] = Field(default_factory=lambda: [32, 64, 128, 256], min_length=1)
    n_layers: IntRange = Field(default_factory=lambda: IntRange(low=1, high=3))
    n_heads: list[int] = Field(default_factory=lambda: [1, 2, 4], min_length=1)
    dropout: FloatRange = Field(default_factory=lambda: FloatRange(low=0.0, high=0.5))
    max_len: list[int] = Field(default_factory=lambda: [20, 50, 100, 200], min_length=1)
    lr: FloatRange = Field(default_factory=lambda: FloatRange(low=1e-4, high=1e-2))
    weight_decay: FloatRange = Field(default_factory=lambda: FloatRange(low=0.0, high=1e-4))
    patience: IntRange = Field(default_factory=lambda: IntRange(low=3, high=10))
    loss: list[Literal["ce", "sampled"]] = Field(default_factory=lambda: ["ce", "sampled"], min_length=1)
    n_negatives: list[int] = Field(
        default_factory=lambda: [64, 128, 256, 512], min_length=1, description="searched when the loss is sampled"
    )
    start_points: list[dict[str, Any]] = Field(
        default_factory=list,
        description="settings tried first, before the sampler's own (e.g. a published configuration): each a "
        "full point of the space (hidden_size, n_layers, n_heads, dropout, max_len, lr, weight_decay, patience, "
        "loss, and n_negatives with the sampled loss); enqueued once, when the study is new",
    )
    seed: int = Field(default=0, description="the TPE sampler's seed")
    startup_trials: int = Field(default=10, ge=0, description="TPE: random trials before the model-based ones")
    prune_startup_trials: int = Field(default=5, ge=0, description="median pruner: trials never pruned")
    prune_warmup_epochs: int = Field(default=1, ge=0, description="median pruner: epochs of a trial never pruned")

    @model_validator(mode="after")
    def _valid_space(self) -> "TuneConfig":
        for name in ("hidden_size", "n_heads"):
            if min(getattr(self, name)) < 1:
                raise ValueError(f"{name}: every choice must be >= 1, got {getattr(self, name)}")
        if min(self.n_negatives) < 1:
            raise ValueError(f"n_negatives: every choice must be >= 1, got {self.n_negatives}")
        if min(self.max_len) < 2:
            raise ValueError(f"max_len: every choice must be >= 2, got {self.max_len}")
        if self.n_layers.low < 1 or self.patience.low < 1:
            raise ValueError("n_layers and patience: low must be >= 1")
        if self.dropout.high >= 1:
            raise ValueError(f"dropout: high must be < 1, got {self.dropout.high}")
        if self.lr.low <= 0:
            raise ValueError(f"lr: low must be > 0 (searched on a log scale), got {self.lr.low}")
        for i, point in enumerate(self.start_points):
            problems = _start_point_problems(point, self)
            if problems:
                raise ValueError(f"start_points[{i}]: " + "; ".join(problems))
        bad = [(h, n) for h in self.hidden_size for n in self.n_heads if h % n]
        if bad:
            raise ValueError(
                "every n_heads choice must divide every hidden_size choice; "
                + ", ".join(f"{n} does not divide {h}" for h, n in bad)
            )
        return self


def _start_point_problems(point: dict[str, Any], space: TuneConfig) -> list[str]:
    """What makes ``point`` not a full point of ``space`` (a missing or unknown key, a value outside it)."""
    keys = ["hidden_size", "n_layers", "n_heads", "dropout", "max_len", "lr", "weight_decay", "patience", "loss"]
    if point.get("loss") == "sampled":
        keys.append("n_negatives")
    problems = [f"missing {k}" for k in keys if k not in point]
    problems += [f"unknown key {k}" for k in point if k not in keys]
    for k in keys:
        if k not in point:
            continue
        allowed = getattr(space, k)
        v = point[k]
        if isinstance(allowed, list):
            if v not in allowed:
                problems.append(f"{k}={v!r} is not one of {allowed}")
        elif isinstance(allowed, IntRange) and (not isinstance(v, int) or isinstance(v, bool)):
            problems.append(f"{k}={v!r} must be an integer")
        elif not (isinstance(v, (int, float)) and not isinstance(v, bool) and allowed.low <= v <= allowed.high):
            problems.append(f"{k}={v!r} is outside {allowed.low}..{allowed.high}")
    return problems


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
    fusion: Literal["none", "concat", "zscore"] = Field(
        default="none",
        description=(
            "concat: score = the frozen ID model's score + w x Laser's cosine (user and item vectors concatenated; "
            "needs an ID model with dot-product scores: SASRec or BERT4Rec); zscore: score = a x (z_ID + w x z_LLM), "
            "both parts z-scored per user over the catalogue inside the model (the LLM side's statistics refitted "
            "with every item table), the temperature a and the weight w learned"
        ),
    )
    fusion_init_weight: float = Field(
        default=10.0,
        gt=0,
        description="w at initialisation (concat: on the cosine; zscore: on the z-scored LLM part, as hybrid gamma)",
    )
    fusion_init_temperature: float = Field(
        default=4.0,
        gt=0,
        description=(
            "fusion: zscore: the temperature a at initialisation (the per-user std of the logits; 4 gives a "
            "softmax over a few dozen items of a 5k-40k catalogue, neither flat nor one-hot)"
        ),
    )

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


# ------------------------------------------------------------------------------------------ Laser training
class LaserTrainConfig(StrictConfig):
    """Paper: batch 4, lr 1e-4, 15 + 5 epochs, tau 0.05, lambda 0.01. The defaults are the official Laser
    recipe: AdamW (weight decay 0.05 on >= 2-D weights only), linear warm-up over 500 optimizer steps from
    1e-6 to ``lr``, then cosine decay to 1e-5 at the run's last planned optimizer step, gradient accumulation
    8 (effective batch 32), early stopping after 3 epochs without a better validation NDCG@10. ``optimizer:
    adam, schedule: constant, grad_accumulation: 1, weight_decay: 0, patience: null`` is the plain loop (Adam at
    a constant ``lr``, one step per mini-batch, every epoch trained). CPU budgets shrink the epochs and sample
    users per epoch; evaluation can be limited to a seeded sample of users."""

    model_config = ConfigDict(extra="forbid")

    stage1_epochs: int = Field(default=15, ge=0)
    stage2_epochs: int = Field(default=5, ge=0)
    skip_stage1: bool = False
    skip_stage2: bool = False
    batch_size: int = Field(default=4, ge=1)
    lr: float = Field(default=1e-4, gt=0)
    tau: float = Field(default=0.05, gt=0)
    lb_weight: float = Field(default=0.01, ge=0)
    optimizer: Literal["adamw", "adam"] = Field(
        default="adamw",
        description=("adamw: decoupled weight decay; adam: weight_decay as an L2 term (on the same >= 2-D weights)"),
    )
    weight_decay: float = Field(
        default=0.05,
        ge=0,
        description=("on >= 2-D weights only (no decay on biases, norms, the suffix vector, scalars)"),
    )
    schedule: Literal["cosine", "constant"] = Field(
        default="cosine",
        description=(
            "cosine: linear warm-up from warmup_start_lr to lr over warmup_steps optimizer steps, then cosine decay "
            "to min_lr at the run's last planned optimizer step; constant: lr throughout"
        ),
    )
    warmup_steps: int = Field(default=500, ge=0, description="optimizer steps (capped to the planned steps)")
    warmup_start_lr: float = Field(default=1e-6, ge=0)
    min_lr: float = Field(default=1e-5, ge=0)
    grad_accumulation: int = Field(
        default=8,
        ge=1,
        description=(
            "mini-batches per optimizer step (effective batch = batch_size x grad_accumulation); the epoch's last, "
            "partial group steps too"
        ),
    )
    patience: int | None = Field(
        default=3,
        ge=1,
        description=(
            "stop a stage after this many consecutive epochs without a better validation ndcg@10 than the stage's "
            "best (None: train every epoch)"
        ),
    )
    fusion_weight_grid: list[float] | None = Field(
        default=None,
        description=(
            "fusion: concat: before any training, set the fusion weight w to the value of this grid with the best "
            "validation NDCG@10 (one pass over the validation users; every value's figure is kept in the fit's "
            "fusion_weight record). None: w starts at bitune.fusion_init_weight"
        ),
    )
    fusion_lr_scale: float = Field(
        default=1.0,
        gt=0,
        description=(
            "the fusion's learned scalars (the weight w and, with fusion: zscore, the temperature a; both "
            "log-parameterised) step at this multiple of the learning rate: at lr 1e-4 over a few hundred steps "
            "Adam moves a log-scalar by ~0.02 in all, so they barely train at 1"
        ),
    )
    curve_every_users: int | None = Field(
        default=None,
        ge=1,
        description=(
            "learning curve: validate every this many training users inside the epochs (history entries with "
            "curve: true; they never pick the best epoch nor count for early stopping)"
        ),
    )
    users_per_epoch: int | None = Field(default=None, ge=1)
    group_by_length: int | None = Field(
        default=None,
        ge=1,
        description=(
            "length-grouped batches (as transformers' group_by_length): the epoch's shuffled users are cut into "
            "groups of this many, each group is sorted by history length and dealt into optimizer steps (batch_size "
            "x grad_accumulation x processes users), and the steps are shuffled. The same examples, far less "
            "padding (on Scientific at H = 50, groups of 512: 2.6x fewer padded tokens). None: random batches"
        ),
    )
    valid_users: int | None = Field(default=None, ge=1, description="seeded sample for validation (None: all)")
    test_users: int | None = Field(default=None, ge=1, description="seeded sample for the test (None: all)")
    item_batch_size: int = Field(default=16, ge=1)
    eval_batch_size: int = Field(default=16, ge=1)
    seed: int = 0
    threads: int | None = Field(default=None, ge=1)
    progress: bool = True
    device: str = Field(
        default="auto",
        pattern=DEVICE_PATTERN,
        description=(
            "where the backbone, the frozen SR encoder, the M-Former, the suffix and every batch live: auto (CUDA "
            "when available, else the CPU), cpu, cuda or cuda:N. Under `accelerate launch`, auto and cuda give each "
            "process its own GPU (LOCAL_RANK). The backbone's compute_dtype auto is bfloat16 on CUDA"
        ),
    )
    accelerate: bool = Field(
        default=False,
        description=(
            "train through Hugging Face Accelerate: data-parallel over the processes of `accelerate launch` "
            "(multi-GPU); in one process it is the same computation as without it. The pipeline's Bi-Tuning "
            "steps then run as `accelerate launch` jobs (laser_core.launch)"
        ),
    )
    processes: int = Field(
        default=1,
        ge=1,
        description=(
            "processes for `accelerate launch` when `accelerate` is on (one per GPU; on a CPU-only machine, gloo "
            "processes sharing the cores)"
        ),
    )

    @model_validator(mode="after")
    def _grid_is_positive(self) -> "LaserTrainConfig":
        if self.fusion_weight_grid is not None and (not self.fusion_weight_grid or min(self.fusion_weight_grid) <= 0):
            raise ValueError(
                f"laser_train.fusion_weight_grid must be a non-empty list of weights > 0, got {self.fusion_weight_grid}"
            )
        return self

    @model_validator(mode="after")
    def _processes_need_accelerate(self) -> "LaserTrainConfig":
        if self.processes > 1 and not self.accelerate:
            raise ValueError(
                f"laser_train.processes = {self.processes} needs laser_train.accelerate: true "
                "(the processes are launched through Hugging Face Accelerate)"
            )
        return self


# ------------------------------------------------------------------------------------- the lexical hybrid
class LexicalConfig(StrictConfig):
    """The lexical hybrid (``laser_core.lexical``): the ID model's scores plus ``gamma`` x the TF-IDF similarity of
    each item to the user's history, both z-scored per user; ``gamma``, the form and (given a list) the TF-IDF
    setting are chosen on validation. Fitted and exported when ``pipeline.models`` names ``lexical_hybrid``."""

    model_config = ConfigDict(extra="forbid")

    tfidf: TfidfConfig | list[TfidfConfig] = Field(
        default_factory=TfidfConfig,
        description="TF-IDF over the item texts (word 1-2-grams by default); a list: chosen on validation",
    )
    dim: int = Field(default=256, ge=1, description="truncated-SVD width of the text rows (a setting's own dim wins)")
    gammas: list[float] = Field(default_factory=lambda: list(GAMMAS), min_length=1)
    forms: list[Literal["last", "decay5"]] = Field(default_factory=lambda: list(FORMS), min_length=1)
    seed: int = Field(default=0, description="the truncated SVD's seed")

    @model_validator(mode="after")
    def _valid_grid(self) -> "LexicalConfig":
        if min(self.gammas) < 0 or any(g != g or g == float("inf") for g in self.gammas):
            raise ValueError(f"lexical.gammas: every gamma must be a finite number >= 0, got {self.gammas}")
        if isinstance(self.tfidf, list) and not self.tfidf:
            raise ValueError("lexical.tfidf: an empty list (give one setting, or several to choose from)")
        return self

    def tfidf_settings(self) -> list[TfidfConfig]:
        """Each TF-IDF setting to fit, with ``dim`` where it sets none (the bundle's text rows are dense)."""
        settings = self.tfidf if isinstance(self.tfidf, list) else [self.tfidf]
        return [s if s.dim is not None else s.model_copy(update={"dim": self.dim}) for s in settings]
