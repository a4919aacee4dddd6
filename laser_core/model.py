"""Bi-Tuning (LASER_SPEC.md §2.2): a frozen causal LLM read through a trainable prefix and one suffix token.

Input to the LLM, per row: ``[p_1 .. p_L] + token_embeddings(text) + [s]`` as ``inputs_embeds``. The prefix comes
from the M-Former over the frozen ID-based recommender's per-position vectors (or a plain trainable prefix, or
nothing, for the ablations). The suffix's last-layer hidden state is the embedding: ``h_u`` for a user's
history text, ``h_i`` for an item (the same template with a one-item history). Scores are cosines.

The API, in the style of a Hugging Face modeling file: :meth:`LaserModel.collate` turns histories into a
:class:`~laser_core.collate.LaserBatch` (numpy; :class:`~laser_core.collate.LaserCollator`, the one
left-padding implementation, which serving uses too), and :meth:`LaserModel.forward` maps a batch to a
:class:`LaserOutput` (the embedding and the router's output). Training, evaluation, the item table, new items
and the exported ONNX user tower (whose inputs are the batch's fields) all run that one forward;
:meth:`LaserModel.embed` is ``forward(collate(histories))``.

Padding: texts are left-padded *between* the prefix and the text, with attention mask 0 there and position ids
counted over real positions only, so a row's embedding does not depend on how much padding its batch needs,
and the suffix is always the last position.

Pooling alternatives for the paper's ablation: ``mean`` (mean of the text tokens' last hidden states, no
suffix) and ``eos`` (a hard EOS token in place of the trainable suffix).

Beyond the paper (each a switch of :class:`BiTuneConfig`, off by default):

- ``embedding_transform: center | whiten``: the LLM's embeddings are anisotropic (suffix embeddings of
  SmolLM2 have a mean pairwise cosine of ~0.96), so a softmax over cosines is near uniform. The transform
  ``(h - mu) W`` (``W`` = identity for ``center``, the ZCA whitening matrix for ``whiten``) is fitted once on the
  initial item table (:meth:`LaserModel.fit_embedding_transform`), frozen, applied to users and items alike,
  and saved with the weights (so the exported towers carry it).
- ``prefix_init: token_norm``: the prefix's output layer is rescaled at initialisation so that prefix rows have
  the norm of the backbone's token embeddings (a random projection gives ~4x that, and the prefix then
  dominates the frozen LLM before any training).
- ``fusion: concat``: the user vector joins the frozen ID model's user vector and Laser's (normalised)
  embedding times a learned weight ``w``; an item row joins the ID model's item vector and Laser's normalised
  item embedding, plus one coordinate that gives every item row the same norm ``R``. The dot product is then
  ``s_ID(u, i) + w cos(h_u, h_i)`` and, because item norms are equal, the cosine ranks exactly as it does, so
  the item table, the exported scorer and the service stay cosine-based. The model starts at the ID model's
  ranking plus the frozen LLM's similarity, and training (softmax cross-entropy on that dot product) only
  has to add to it.
- ``fusion: zscore``: as ``concat``, but both score parts are z-scored per user over the catalogue inside the
  model, then weighted by a learned fusion weight ``w`` and a learned temperature ``a`` (both log-parameterised;
  ``fusion_init_weight``, ``fusion_init_temperature``)::

      score(u, i) = a (z_ID(u, i) + w z_T(u, i)),   z_X(u, i) = (s_X(u, i) - mean_j s_X(u, j)) / std_j s_X(u, j)

  (``s_ID = u_ID . v_ID(i)``, ``s_T = cos(h_u, h_i)``; with ``concat`` the ID logits' spread dwarfs
  ``w cos``, so the softmax barely sees the LLM side). For a dot-product part ``s(u, i) = u . v_i`` the z-score
  is exactly ``u . (v_i - vbar) / sqrt(u^T C u)`` (``vbar``, ``C``: the mean and covariance of the catalogue's
  rows, ``ddof`` 1 as :func:`laser_core.hybrid.zscore`), so the score stays ONE dot product: user rows
  ``[a c_ID u_ID / sd_ID(u), a w c_T n / sd_T(n), 0]``, item rows ``[(v_ID(i) - vbar_ID) / c_ID, (n_i - nbar) /
  c_T, r_i]`` (a cold item: the ID model's unknown-item vector, centred the same way). The constants ``c_X =
  sqrt(trace C_X)`` cancel in the product; they give each item part a root mean square norm of 1 and keep the
  user rows' norms moderate (an anisotropic LLM's ``sd_T`` is ~1e-3, and a user row of norm ~1e3 would leave
  the exported tower's float32 parity no room). ``r_i`` again gives every item row the same norm ``R`` (``R^2``:
  the largest scaled ID row's squared norm + ``((1 + |nbar|) / c_T)^2``, a bound for any unit ``n_i``, new
  items included), so the served cosine ranks exactly as the dot product. The ID statistics come from the frozen ID model once; the
  LLM side's (``nbar``, ``C_T``) from the catalogue's LLM rows, refitted with every item table
  (:meth:`LaserModel.catalogue_table`: the trainer's stage-1 refreshes; stage 2 keeps the frozen table's), and
  are buffers saved with the weights (so the exported tower carries them). ``a`` is the per-user std of the
  logits: for roughly Gaussian z the softmax of ``a z`` over N items has an effective support of ``~N
  exp(-a^2 / 2)`` items (a = 1: nearly flat; a = 4: a few dozen of 5,000-40,000 items; a >= sqrt(2 ln N) ~ 4-4.6:
  a handful, and fewer still for the right-skewed scores of a trained ID model), so 4 starts neither flat nor
  one-hot. With no prefix and a one-item user text the model starts exactly at the z-scored hybrid
  (:func:`laser_core.hybrid.blend` with ``gamma = w``) of the ID model and the frozen LLM.

Device: the model computes where its backbone is (:attr:`LaserModel.device`); ``model.to(device)`` (or
:meth:`LaserModel.to_device` with a device setting of :mod:`laser_core.device`) moves the trainable parts and
the frozen ones kept outside the module tree (the backbone, the SR encoder, the item side's weights) together,
and every tensor the model builds (token ids, masks, SR inputs, item-table rows) is made on that device.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file
from torch import nn
from torch.nn import functional as F

from laser_core.artifact import read_meta, write_meta
from laser_core.collate import LaserBatch, LaserCollator
from laser_core.data.text import TextFormatter
from laser_core.device import resolve_device
from laser_core.losses import iic_loss, load_balancing_loss
from laser_core.llm.backbones import TINY, Backbone, load_backbone
from laser_core.configuration import BiTuneConfig, LaserSpec
from laser_core.mformer import MFormer, PlainPrefix, RouterOutput
from laser_core.score_stats import SD_EPS, norm_column, per_user_sd, row_statistics
from laser_core.sr.base import SequentialRecommender
from laser_core.trainer import save_tensors


@dataclass
class LaserOutput:
    """What :meth:`LaserModel.forward` returns: ``user_embedding`` ``[B, embedding_size]`` float32 (a user's
    vector, or an item-table row for a row with ``item_side`` 1) and the M-Former router's output (None without
    the M-Former, or when user and item rows used different weights)."""

    user_embedding: torch.Tensor
    router: RouterOutput | None = None


@dataclass
class LaserTrainingBatch:
    """A training mini-batch for :meth:`LaserModel.calculate_loss`: the users' ``inputs``
    (:meth:`LaserModel.collate` of their histories), their ``targets`` (rows of ``item_table``, the table the
    epoch trains against) and the two objectives' settings (``LaserTrainConfig.tau`` and ``lb_weight``: the
    training's, not the model's)."""

    inputs: LaserBatch
    targets: torch.Tensor
    item_table: torch.Tensor
    tau: float
    lb_weight: float


class LaserModel(nn.Module):
    """Frozen backbone + frozen SR encoder; trainable: M-Former (or plain prefix) and the suffix vector."""

    def __init__(
        self,
        backbone: Backbone,
        sr_model: SequentialRecommender | None,
        formatter: TextFormatter,
        config: BiTuneConfig | None = None,
    ) -> None:
        super().__init__()
        self.config = cfg = config or BiTuneConfig()
        self.backbone = backbone
        self.formatter = formatter
        self.tokenizer = backbone.tokenizer
        hidden = backbone.hidden_size
        # frozen parts are kept out of the module tree: state_dict() holds only what is trained
        object.__setattr__(self, "llm", backbone.model)
        object.__setattr__(self, "sr", sr_model)
        if sr_model is None and cfg.reads_item_ids:
            raise ValueError(f"prefix {cfg.prefix!r} with fusion {cfg.fusion!r} needs the frozen ID-based recommender")
        if sr_model is not None:
            sr_model.eval()
            for p in sr_model.parameters():
                p.requires_grad_(False)
                p.grad = None
        self.mformer: MFormer | None = None
        self.plain: PlainPrefix | None = None
        if cfg.prefix == "mformer":
            self.mformer = MFormer(cfg.mformer, sr_model.config.hidden_size, hidden)
        elif cfg.prefix == "plain":
            self.plain = PlainPrefix(cfg.mformer.n_query, hidden)
        if cfg.prefix_init == "token_norm":
            self._scale_prefix_to_tokens()
        if cfg.embedding_transform != "none":  # fitted by fit_embedding_transform; identity until then
            self.register_buffer("emb_shift", torch.zeros(hidden))
            self.register_buffer("emb_map", torch.eye(hidden))
            self.register_buffer("emb_fitted", torch.zeros(()))
        self.fusion_log_weight: nn.Parameter | None = None
        self.fusion_log_temperature: nn.Parameter | None = None
        if cfg.fusion != "none":
            with torch.no_grad():
                known = sr_model.item_vectors().float()
                vectors = torch.cat([known, sr_model.unknown_item_vector().float()[None]])
                if cfg.fusion == "zscore":  # the ID side's statistics: from the frozen ID model, once
                    id_mean, id_cov = row_statistics(known)
                    id_scale = _rms_scale(id_cov)
                    self.register_buffer("fusion_id_mean", id_mean, persistent=False)
                    self.register_buffer("fusion_id_cov", id_cov, persistent=False)
                    self.register_buffer("fusion_id_scale", id_scale, persistent=False)
                    # the ID part's; fuse adds the LLM part's bound, which follows its (refitted) statistics
                    radius2 = (((vectors - id_mean) / id_scale) ** 2).sum(1).max()
                else:
                    radius2 = (vectors**2).sum(1).max() + 1.0
            self.register_buffer("fusion_radius2", radius2, persistent=False)
            self.fusion_log_weight = nn.Parameter(torch.tensor(math.log(cfg.fusion_init_weight)))
            if cfg.fusion == "zscore":
                self.fusion_log_temperature = nn.Parameter(torch.tensor(math.log(cfg.fusion_init_temperature)))
                # the LLM side's statistics (fit_fusion_statistics, with every item table), saved with the weights;
                # until fitted: mean 0, covariance I (z_T is the cosine itself)
                self.register_buffer("fusion_text_mean", torch.zeros(hidden))
                self.register_buffer("fusion_text_cov", torch.eye(hidden))
                self.register_buffer("fusion_text_fitted", torch.zeros(()))
        eos_id = self.tokenizer.eos_token_id
        if eos_id is None:
            raise ValueError("the backbone's tokenizer has no EOS token")
        self.eos_id = int(eos_id)
        pad_id = self.tokenizer.pad_token_id
        self.collator = LaserCollator(
            pad_token_id=int(pad_id) if pad_id is not None else self.eos_id,
            sr_max_len=int(sr_model.config.max_len) if self.reads_item_ids else None,
        )
        eos = self.embed_tokens(torch.tensor([self.eos_id], device=backbone.device))[0].detach().float().clone()
        # the suffix starts as the EOS embedding (the paper's "hard EOS" alternative) and is then trained
        self.suffix = nn.Parameter(eos.clone()) if cfg.pooling == "suffix" else None
        self.register_buffer("eos_embedding", eos, persistent=False)
        self._item_ids_cache: dict[int, list[int]] = {}
        # the item side's own weights (set_item_state); None: the item side uses this model's weights
        object.__setattr__(self, "item_weights", None)
        self.to(backbone.device)  # built on the CPU (the same initial weights everywhere), computes by its LLM

    # ------------------------------------------------------------------ device
    @property
    def device(self) -> torch.device:
        """Where the model computes: its backbone's device (the inputs it builds are made there)."""
        return self.backbone.device

    def to(self, *args, **kwargs) -> "LaserModel":
        """``nn.Module.to`` for the trainable parts; with a device, the frozen parts kept outside the module tree
        (the backbone, the SR encoder, the item side's weights) move there too, in place. Their dtypes stay (the
        backbone's compute dtype is a loading setting: ``backbone.compute_dtype``)."""
        device = torch._C._nn._parse_to(*args, **kwargs)[0]
        super().to(*args, **kwargs)
        if device is not None:
            if self.backbone.device != device:
                self.llm.to(device)
            for part in (self.sr, self.item_weights):
                if part is not None:
                    part.to(device)
        return self

    def to_device(self, device: str | torch.device | None = "auto") -> "LaserModel":
        """Move the whole model (see :meth:`to`) to a device setting (``auto``, ``cpu``, ``cuda``, ``cuda:N``;
        :func:`laser_core.device.resolve_device`)."""
        return self.to(resolve_device(device))

    # ------------------------------------------------------------------ pieces
    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.backbone.input_embeddings()(ids)

    @property
    def embedding_size(self) -> int:
        """Width of the user and item vectors: the LLM's hidden size, plus the ID model's vector and one norm
        coordinate with a fusion (``concat``, ``zscore``)."""
        if self.config.fusion == "none":
            return self.backbone.hidden_size
        return self.backbone.hidden_size + int(self.sr.item_vectors().shape[1]) + 1

    @property
    def reads_item_ids(self) -> bool:
        """Whether the embedding reads the item-id history (``BiTuneConfig.reads_item_ids``)."""
        return self.config.reads_item_ids

    @torch.no_grad()
    def _scale_prefix_to_tokens(self) -> None:
        """Rescale the prefix's output so a prefix row's expected norm is the mean token-embedding norm. The
        M-Former's projection reads a LayerNorm output (entries of unit variance), so ``E|Wx + b|^2 ~
        |W|_F^2 + |b|^2``; the plain prefix's rows are scaled directly."""
        target = self.backbone.token_embedding_norm()
        if self.mformer is not None:
            proj = self.mformer.proj
            now = math.sqrt(float(proj.weight.float().pow(2).sum() + proj.bias.float().pow(2).sum()))
            proj.weight.mul_(target / now)
            proj.bias.mul_(target / now)
        elif self.plain is not None:
            rows = self.plain.prefix
            rows.mul_(target / rows.norm(dim=1, keepdim=True).clamp(min=1e-12))

    # ------------------------------------------------------------------ the embedding transform
    def needs_transform_fit(self) -> bool:
        return self.config.embedding_transform != "none" and not bool(self.emb_fitted)

    @torch.no_grad()
    def fit_embedding_transform(self, llm_table: torch.Tensor, eps: float = 1e-6) -> None:
        """Fit the centering (and whitening) on LLM item embeddings ``[n, H]`` made before any transform (the
        initial table of :meth:`embed_items` with ``fuse=False``); frozen from then on."""
        x = llm_table.double()
        mu = x.mean(0)
        w = torch.eye(x.shape[1], dtype=torch.float64, device=x.device)
        if self.config.embedding_transform == "whiten":
            xc = x - mu
            s, u = torch.linalg.eigh(xc.T @ xc / xc.shape[0])
            w = (u * (1.0 / torch.sqrt(s.clamp(min=0) + eps * s.max()))) @ u.T
        self.emb_shift.copy_(mu.float())
        self.emb_map.copy_(w.float())
        self.emb_fitted.fill_(1.0)

    def transform_embeddings(self, h: torch.Tensor) -> torch.Tensor:
        """``(h - mu) W`` of the fitted transform (identity without one)."""
        if self.config.embedding_transform == "none":
            return h
        return (h - self.emb_shift) @ self.emb_map

    # ------------------------------------------------------------------ the fusion
    def fuse(
        self, h: torch.Tensor, item_ids: torch.Tensor, item_mask: torch.Tensor, item_side: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``fusion: concat``: user rows ``[u_ID, w n, 0]``, item rows (``item_side`` 1) ``[v_ID(i), n, r_i]``
        with ``n`` the normalised LLM embedding, ``i`` the row's item (the last visible id; a cold item gets
        the ID model's unknown-item vector) and ``r_i`` making every item row's norm ``R``. ``fusion: zscore``:
        user rows ``[a c_ID u_ID / sd_ID(u), a w c_T n / sd_T(n), 0]``, item rows ``[(v_ID(i) - vbar_ID) / c_ID,
        (n - nbar) / c_T, r_i]`` (``sd_X(x) = sqrt(x^T C_X x)``, ``c_X = sqrt(trace C_X)``; the module
        docstring)."""
        n = F.normalize(h, dim=-1)
        u_id = self.sr.user_vectors(item_ids, item_mask).float()
        zscore = self.config.fusion == "zscore"
        if zscore:
            a, c_id, c_text = self.fusion_log_temperature.exp(), self.fusion_id_scale, _rms_scale(self.fusion_text_cov)
            u_id = (a * c_id) * u_id / per_user_sd(u_id, self.fusion_id_cov)
            u_text = (a * self.fusion_log_weight.exp() * c_text) * n / per_user_sd(n, self.fusion_text_cov)
        else:
            u_text = self.fusion_log_weight.exp() * n
        users = torch.cat([u_id, u_text, torch.zeros_like(n[:, :1])], dim=1)
        if item_side is None:
            return users
        last = item_ids[:, -1]
        cold = (last < 0) | ~item_mask[:, -1].bool()
        vec = torch.where(
            cold[:, None],
            self.sr.unknown_item_vector()[None].float(),
            self.sr.item_vectors()[last.clamp(min=0)].float(),
        )
        if zscore:
            vec, n = (vec - self.fusion_id_mean) / c_id, (n - self.fusion_text_mean) / c_text
            radius2 = (
                self.fusion_radius2 + ((1.0 + self.fusion_text_mean.norm()) / c_text) ** 2
            )  # |n - nbar| <= 1 + |nbar|
            r = norm_column((vec**2).sum(1) + (n**2).sum(1), radius2)
        else:  # |n| = 1
            r = norm_column((vec**2).sum(1) + 1.0, self.fusion_radius2)
        items = torch.cat([vec, n, r[:, None]], dim=1)
        return torch.where(item_side.bool()[:, None], items, users)

    def needs_fusion_fit(self) -> bool:
        """Whether ``fusion: zscore``'s LLM-side statistics are still unfitted (no item table made yet)."""
        return self.config.fusion == "zscore" and not bool(self.fusion_text_fitted)

    @torch.no_grad()
    def fit_fusion_statistics(self, llm_rows: torch.Tensor) -> None:
        """``fusion: zscore``: fit the LLM side's statistics (the mean and covariance of the normalised rows) on
        the whole catalogue's (transformed) LLM item rows ``[n_items, H]`` (``embed_items(..., fuse=False)``).
        :meth:`catalogue_table` calls it with every item table it makes."""
        if self.config.fusion != "zscore":
            raise ValueError(f"fit_fusion_statistics is for fusion 'zscore', not {self.config.fusion!r}")
        mean, cov = row_statistics(F.normalize(llm_rows.float(), dim=-1))
        self.fusion_text_mean.copy_(mean)
        self.fusion_text_cov.copy_(cov)
        self.fusion_text_fitted.fill_(1.0)

    def fusion_statistics(self) -> dict[str, torch.Tensor]:
        """The buffers an item table refits (``fusion: zscore``'s LLM-side statistics; empty otherwise), as
        the table's cache keeps them beside it (:meth:`catalogue_table`, :meth:`weights_fingerprint`)."""
        if self.config.fusion != "zscore":
            return {}
        return {name: getattr(self, name).detach().cpu().clone() for name in FUSION_TABLE_STATISTICS}

    @torch.no_grad()
    def load_fusion_statistics(self, stats: dict[str, torch.Tensor]) -> None:
        """Set what :meth:`fusion_statistics` returned (a cached table's); no-op without ``fusion: zscore``."""
        for name in self.fusion_statistics():
            getattr(self, name).copy_(stats[name])

    @torch.no_grad()
    def catalogue_table(
        self, n_items: int, batch_size: int = 16, progress=None, llm_rows: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The whole catalogue's item table (items ``0 .. n_items - 1``; :meth:`embed_items`), from its
        (transformed) LLM rows ``llm_rows`` when given. With ``fusion: zscore`` the LLM side's statistics are
        refitted on the table's own LLM rows first (:meth:`fit_fusion_statistics`): the table and the user side
        then z-score against the same catalogue."""
        items = range(n_items)
        if self.config.fusion != "zscore":
            if llm_rows is None:
                return self.embed_items(items, batch_size, progress)
            return self.fuse_items(llm_rows, items)
        if llm_rows is None:
            llm_rows = self.embed_items(items, batch_size, progress, fuse=False)
        self.fit_fusion_statistics(llm_rows)
        return self.fuse_items(llm_rows, items)

    def fuse_items(self, llm_rows: torch.Tensor, items: Sequence[int]) -> torch.Tensor:
        """Item-table rows from (transformed) LLM item rows of catalogue ``items`` (fusion; else the rows)."""
        if self.config.fusion == "none":
            return llm_rows
        ids, mask = self.collator.pad_items([[int(i)] for i in items])
        b = LaserBatch(None, None, ids, mask, np.ones(len(ids), dtype=np.int64)).to_torch(self.device)
        with torch.no_grad():
            return self.fuse(llm_rows, b.item_ids, b.item_mask, b.item_side)

    def fusion_scalars(self) -> list[nn.Parameter]:
        """The fusion's learned scalars (log w, and log a with ``fusion: zscore``): the optimizer may step them
        at a larger rate (``laser_train.fusion_lr_scale``)."""
        return [p for p in (self.fusion_log_weight, self.fusion_log_temperature) if p is not None]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def n_trainable(self) -> dict[str, int]:
        """Trainable parameter counts. ``bi_tuning_token_values`` = (prefix length + suffix) x hidden, the
        quantity the paper reports as 0.135M "Bi-Tuning tokens" (33 x 4096 for ChatGLM2-6B)."""
        suffix = self.suffix.numel() if self.suffix is not None else 0
        plain = sum(p.numel() for p in self.plain.parameters()) if self.plain is not None else 0
        mformer = sum(p.numel() for p in self.mformer.parameters()) if self.mformer is not None else 0
        n_prefix = self.config.mformer.n_query if self.config.prefix != "none" else 0
        n_suffix = 1 if self.config.pooling == "suffix" else 0
        return {
            "suffix": suffix,
            "plain_prefix": plain,
            "mformer": mformer,
            "total": suffix + plain + mformer,
            "bi_tuning_token_values": (n_prefix + n_suffix) * self.backbone.hidden_size,
        }

    def weights_fingerprint(self, table_key: bool = False) -> str:
        """A content hash of everything this model's outputs depend on (the item table's cache key, and part of
        the training run's): the trainable weights, the frozen backbone (its files' bytes and loading settings),
        the frozen SR encoder's weights, the catalogue's formatted item texts, the Bi-Tuning settings, and the
        item side's own weights when it has them (:meth:`set_item_state`). ``table_key``: the key of the item
        table :meth:`catalogue_table` makes, without the statistics it refits from its own rows
        (:meth:`fusion_statistics`: they follow from the rest)."""
        from laser_core.fingerprint import catalogue_fingerprint, fingerprint, sr_fingerprint

        skip = set(FUSION_TABLE_STATISTICS) if table_key else set()
        state = {k: v for k, v in self.state_dict().items() if k not in skip}
        item_side = None
        if self.item_weights is not None:
            item_side = {k: v for k, v in self.item_weights.state_dict().items() if k not in skip}
        return fingerprint(
            "laser-model",
            {
                "trainable": state,
                "item_side": item_side,
                "bitune": self.config,
                "backbone": self.backbone.content_fingerprint(),
                "sr": sr_fingerprint(self.sr),
                "catalogue": catalogue_fingerprint(self.formatter),
            },
        )

    def tokenize(self, histories: Sequence[Sequence[int]]) -> list[list[int]]:
        out = []
        for hist in histories:
            if len(hist) == 1:  # item texts recur every table refresh: tokenize once
                key = int(hist[0])
                if key not in self._item_ids_cache:
                    self._item_ids_cache[key] = self._encode(self.formatter.user_text(hist))
                out.append(self._item_ids_cache[key])
            else:
                out.append(self._encode(self.formatter.user_text(hist)))
        return out

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    # ------------------------------------------------------------------ forward
    def collate(
        self,
        histories: Sequence[Sequence[int]],
        token_ids: Sequence[Sequence[int]] | None = None,
        item_side: Sequence[int] | np.ndarray | None = None,
    ) -> LaserBatch:
        """The (numpy) batch of histories of item indices (:attr:`collator`): their texts' token ids
        (:meth:`tokenize`, or ``token_ids``), their items (when the model reads item ids) and ``item_side``."""
        return self.collator(self.tokenize(histories) if token_ids is None else token_ids, histories, item_side)

    def forward(self, batch: LaserBatch, fuse: bool = True) -> LaserOutput:
        """The one embedding path (training, evaluation, the item table, new items, the ONNX user tower): the
        prefix (:meth:`prefix`), the LLM (:meth:`llm_embeddings`), the embedding transform and, with ``fuse``
        (and a ``fusion``), the fusion with the ID model's vectors (:meth:`fuse`). ``batch``: numpy
        (:meth:`collate`) or torch; it is moved to the model's device."""
        if not isinstance(batch, LaserBatch):
            raise TypeError(
                f"LaserModel.forward takes a LaserBatch (model.collate(histories)), not {type(batch).__name__}; "
                "model.embed(histories) does both"
            )
        batch = batch.to_torch(self.device)
        prefix, route = self.prefix(batch)
        h = self.transform_embeddings(self.llm_embeddings(batch, prefix))
        if fuse and self.config.fusion != "none":
            h = self.fuse(h, batch.item_ids, batch.item_mask, batch.item_side)
        return LaserOutput(user_embedding=h, router=route)

    def embed(self, histories: Sequence[Sequence[int]]) -> LaserOutput:
        """Embeddings for histories of item indices (users): ``self(self.collate(histories))``."""
        return self(self.collate(histories))

    def calculate_loss(self, batch: LaserTrainingBatch) -> torch.Tensor:
        """The training loss of a mini-batch (RecBole's interface, as the ID models'): the main objective, the
        IIC loss (softmax cross-entropy over the whole table of ``cos / tau``) or, for a fused model, softmax
        cross-entropy on the fused dot product (``concat``: the ID model's logits + w x cosine, the learned fusion
        weight playing the temperature's part; ``zscore``: a x (z_ID + w x z_T)), plus ``lb_weight`` x the M-Former router's load-balancing loss."""
        out = self(batch.inputs)
        emb, route = out.user_embedding, out.router
        if self.config.fusion != "none":
            loss = F.cross_entropy(emb @ batch.item_table.T, batch.targets)
        else:
            loss = iic_loss(emb, batch.item_table, batch.targets, batch.tau)
        if route is not None and batch.lb_weight > 0:
            loss = loss + batch.lb_weight * load_balancing_loss(route.probs, route.mask)
        return loss

    @torch.no_grad()
    def embed_items(self, items: Sequence[int], batch_size: int = 16, progress=None, fuse: bool = True) -> torch.Tensor:
        """The item-embedding table rows for catalogue ``items`` (one-item histories, their trained IDs):
        :meth:`embed_item_rows`, the path new items take too. ``fuse=False``: the LLM rows only."""
        items = [int(i) for i in items]
        return self.embed_item_rows(self.tokenize([[i] for i in items]), items, batch_size, progress, fuse=fuse)

    # ------------------------------------------------------------------ the item side's weights
    def set_item_state(self, state: dict[str, torch.Tensor] | None) -> None:
        """Give the item side (every item-table row: :meth:`embed_items`, :meth:`embed_cold_items`) its own
        weights: ``state`` has this model's ``state_dict`` keys and is the state that made the item table
        (Laser's stage-1 weights: stage 2 freezes the table and trains the weights on, so the final weights are
        the user side's only). Kept frozen and outside ``state_dict``. ``None``: the item side uses this
        model's own weights (the table is made with the current weights, as in stage 1)."""
        if state is None:
            object.__setattr__(self, "item_weights", None)
            return
        side = nn.Module()
        side.mformer = copy.deepcopy(self.mformer)
        side.plain = copy.deepcopy(self.plain)
        side.suffix = nn.Parameter(self.suffix.detach().clone()) if self.suffix is not None else None
        for name in ("fusion_log_weight", "fusion_log_temperature"):
            if getattr(self, name) is not None:
                setattr(side, name, nn.Parameter(getattr(self, name).detach().clone()))
        for name in ("emb_shift", "emb_map", "emb_fitted", *FUSION_TABLE_STATISTICS):
            if hasattr(self, name):
                side.register_buffer(name, getattr(self, name).clone())
        side.load_state_dict(state)  # strict: exactly this model's trainable keys
        side.requires_grad_(False)
        object.__setattr__(self, "item_weights", side.eval())

    # ------------------------------------------------------------------ forward's parts
    # A negative item id at a visible position (mask 1) is a *cold item*: an item with no trained ID embedding,
    # which the SR encoder reads as its cold-item embedding (``SequentialRecommender.cold_item_embedding``).
    COLD_ITEM_ID = -1

    def prefix(self, batch: LaserBatch) -> tuple[torch.Tensor | None, RouterOutput | None]:
        """The prefix ``[B, L, H]`` (or None) of a torch batch, and the router's output.

        The M-Former reads the frozen SR encoder's per-position vectors (``sr.encode``, cold items included).
        ``batch.item_side`` (nonzero: an item-table row) picks the item side's weights (:meth:`set_item_state`)
        for those rows; both prefixes are computed and selected per row (the router output is then None).
        Without item weights every row uses this model's weights."""
        item_side = batch.item_side
        sides = [self] if item_side is None or self.item_weights is None else [self, self.item_weights]
        if self.mformer is not None:
            if batch.item_ids is None or batch.item_mask is None:
                raise ValueError("prefix 'mformer' needs the item-id history (item_ids and item_mask)")
            mask = batch.item_mask.bool()
            collab = self.sr.encode(batch.item_ids, mask)
            outs = [side.mformer(collab, mask) for side in sides]
        elif self.plain is not None:
            outs = [(side.plain(batch.input_ids.shape[0]), None) for side in sides]  # a symbolic size in the export
        else:
            return None, None
        if len(outs) == 1:
            return outs[0]
        return torch.where(item_side.bool()[:, None, None], outs[1][0], outs[0][0]), None

    def llm_embeddings(self, batch: LaserBatch, prefix: torch.Tensor | None) -> torch.Tensor:
        """The LLM's embeddings ``[B, H]`` (before the transform) of a torch batch's left-padded texts and a
        prefix: prefix, padding, text, suffix; position ids over real positions; the pooling. Rows with
        ``batch.item_side`` set get the item side's suffix."""
        input_ids, item_side = batch.input_ids, batch.item_side
        tok = self.embed_tokens(input_ids)
        dtype = tok.dtype
        B, T = input_ids.shape
        text_mask = batch.attention_mask.long()
        parts, masks = [], []
        if prefix is not None:
            parts.append(prefix.to(dtype))
            masks.append(torch.ones_like(text_mask[:, :1]).expand(B, prefix.shape[1]))
        parts.append(tok)
        masks.append(text_mask)
        if self.config.pooling in ("suffix", "eos"):
            last = (self.suffix if self.config.pooling == "suffix" else self.eos_embedding)[None]  # [1, H]
            if self.config.pooling == "suffix" and item_side is not None and self.item_weights is not None:
                last = torch.where(item_side.bool()[:, None], self.item_weights.suffix[None], last)  # [B, H]
            parts.append(last.to(dtype)[:, None].expand(B, 1, -1))
            masks.append(torch.ones_like(text_mask[:, :1]))
        embeds = torch.cat(parts, dim=1)
        mask = torch.cat(masks, dim=1)
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        hidden = self.backbone.base(
            inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False
        ).last_hidden_state.float()
        if self.config.pooling == "mean":
            start = prefix.shape[1] if prefix is not None else 0
            m = text_mask.to(hidden.dtype)[..., None]
            return (hidden[:, start : start + T] * m).sum(1) / m.sum(1)
        return hidden[:, -1]

    @torch.no_grad()
    def embed_item_rows(
        self,
        token_ids: Sequence[Sequence[int]],
        item_ids: Sequence[int],
        batch_size: int = 16,
        progress=None,
        fuse: bool = True,
    ) -> torch.Tensor:
        """Item-table rows ``[n, embedding_size]`` (``fuse=False``: the LLM part ``[n, H]``), the one item-embedding path (the table and new items alike): each item a
        one-item history, its item-template ``token_ids`` and, on the ID side, its catalogue index in
        ``item_ids`` or :attr:`COLD_ITEM_ID` for an item without a trained ID embedding (see
        :meth:`prefix`), through the item side's weights (:meth:`set_item_state`). Batched by text
        length; rows follow the inputs. ``user_tower.onnx`` computes the same with ``item_side = 1``."""
        if len(token_ids) != len(item_ids):
            raise ValueError(f"{len(token_ids)} token sequences but {len(item_ids)} item ids")
        if fuse and self.needs_fusion_fit():
            raise ValueError(
                "fusion 'zscore': the LLM side's statistics are not fitted yet: make the whole catalogue's table "
                "first (LaserModel.catalogue_table), which fits them"
            )
        n_known = self.sr.n_items if self.sr is not None else None
        bad = [i for i in item_ids if i != self.COLD_ITEM_ID and not (n_known is None or 0 <= i < n_known)]
        if bad:
            raise ValueError(
                f"item ids {bad[:10]} are neither catalogue indices (0..{n_known - 1}) nor the cold "
                f"item ({self.COLD_ITEM_ID})"
            )
        order = np.argsort([len(t) for t in token_ids], kind="stable")
        out = torch.empty(
            len(token_ids), self.embedding_size if fuse else self.backbone.hidden_size, device=self.device
        )
        for lo in range(0, len(order), batch_size):
            idx = order[lo : lo + batch_size]
            batch = self.collator([token_ids[i] for i in idx], [[item_ids[i]] for i in idx], np.ones(len(idx)))
            rows = self(batch, fuse=fuse).user_embedding
            out[torch.from_numpy(idx).to(self.device)] = rows
            if progress is not None:
                progress(len(idx))
        return out

    @torch.no_grad()
    def embed_cold_items(
        self, items: pd.DataFrame, batch_size: int = 16, item_ids: Sequence[int] | None = None
    ) -> torch.Tensor:
        """Embeddings ``[n, H]`` of items given by their text (columns title, brand, category), each as a
        one-item history as in training (:meth:`embed_item_rows`): the item template for the text and, for
        the M-Former, one visible cold-item position (see :meth:`prefix`), since a new item has no
        trained ID embedding. ``item_ids``: the rows' catalogue indices instead, for items that have one
        (re-embedding a catalogue item so reproduces its table row). Rows follow ``items``."""
        if len(items) == 0:
            return torch.empty(0, self.embedding_size, device=self.device)
        formatter = TextFormatter(items.reset_index(drop=True), self.formatter.config, tokenizer=self.tokenizer)
        tokens = [self._encode(formatter.item_text(i)) for i in range(len(items))]
        ids = [self.COLD_ITEM_ID] * len(items) if item_ids is None else [int(i) for i in item_ids]
        return self.embed_item_rows(tokens, ids, batch_size)

    def train(self, mode: bool = True) -> "LaserModel":
        super().train(mode)
        if self.item_weights is not None:
            self.item_weights.eval()  # frozen
        if self.sr is not None:
            self.sr.eval()  # frozen: no dropout, ever
        self.llm.train()  # frozen, all dropout 0; see laser_core.llm.backbones for why not eval()
        return self


#: ``fusion: zscore``'s buffers that every item table refits from its own LLM rows (LaserModel.catalogue_table)
FUSION_TABLE_STATISTICS = ("fusion_text_mean", "fusion_text_cov", "fusion_text_fitted")
# the z-score statistics (row_statistics, per_user_sd, SD_EPS) and the norm column: laser_core.score_stats


def _rms_scale(cov: torch.Tensor) -> torch.Tensor:
    """``sqrt(trace C)``: the root mean square norm of the centred rows whose covariance is ``C``."""
    return torch.sqrt(torch.diagonal(cov).sum()).clamp_min(SD_EPS)


WEIGHTS_FORMAT = 1  # LaserWeights.save's folder (laser.json's format_version)
TABLE_FORMAT = 1  # ItemTable.save's folder (table.json's format_version; absent in the first artifacts)


@dataclass
class LaserWeights:
    """The trainable part of a Laser model (safetensors on disk) plus its spec and training summary (JSON).

    ``item_state``: the weights that made the item table when they differ from ``state`` (stage 2 trains the
    weights on against the frozen stage-1 table: ``state`` is then the user side's, ``item_state`` the stage-1
    weights every table row, and every new item, is embedded with; see :meth:`LaserModel.set_item_state`)."""

    spec: LaserSpec
    state: dict[str, torch.Tensor]
    summary: dict = field(default_factory=dict)
    item_state: dict[str, torch.Tensor] | None = None

    def cold_item_weights(self) -> Literal["item_side", "shared", "user_side"]:
        """Which weights embed items, as the export records it: ``item_side``: ``item_state``, kept beside the
        user side's ``state``; ``shared``: ``state`` made the table too (stage 1 alone, or a stage 2 that kept
        its starting weights); ``user_side``: unknown, stage-2 weights saved without the table-making ones (an
        artifact from before ``item_state``), so new items get the user side's weights."""
        if self.item_state is not None:
            return "item_side"
        trained_on = self.summary.get("stage") == 2 and self.summary.get("best_epoch") not in (None, -1)
        return "user_side" if trained_on else "shared"

    # ------------------------------------------------------------ storage (pipeline artifacts, accelerate jobs)
    def save(self, directory: str | Path) -> Path:
        """``weights.safetensors``, ``item_weights.safetensors`` (only with an item side) and ``laser.json`` (spec,
        summary, whether the item side has its own file) in ``directory``."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        save_tensors(self.state, d / "weights.safetensors")
        if self.item_state is not None:
            save_tensors(self.item_state, d / "item_weights.safetensors")
        meta = {
            "spec": self.spec.model_dump(mode="json"),
            "summary": self.summary,
            "item_state": self.item_state is not None,
        }
        write_meta(d / "laser.json", meta, WEIGHTS_FORMAT)
        return d

    @classmethod
    def load(cls, directory: str | Path) -> LaserWeights:
        """What :meth:`save` wrote (an :class:`~laser_core.artifact.ArtifactFormatError` for another format)."""
        d = Path(directory)
        meta = read_meta(d / "laser.json", WEIGHTS_FORMAT, "LaserWeights")
        return cls(
            spec=LaserSpec.model_validate(meta["spec"]),
            state=load_file(str(d / "weights.safetensors")),
            summary=meta["summary"],
            item_state=load_file(str(d / "item_weights.safetensors")) if meta.get("item_state") else None,
        )


def item_state_beside(
    table_state: dict[str, torch.Tensor], state: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor] | None:
    """``table_state`` (the weights that made the item table) as the :attr:`LaserWeights.item_state` of weights
    ``state``: a copy, or None when the two are equal (nothing extra to keep)."""
    same = table_state.keys() == state.keys() and all(
        torch.equal(table_state[k].detach().cpu(), state[k].detach().cpu()) for k in state
    )
    return None if same else {k: v.detach().cpu().clone().contiguous() for k, v in table_state.items()}


def tokenizer_texts(spec: LaserSpec, items: pd.DataFrame) -> list[str] | None:
    """The texts a tiny backbone's tokenizer is trained on (the catalogue's item texts without token limits;
    :func:`laser_core.llm.backbones.resolve_backbone`), None for any other backbone."""
    if spec.backbone.name not in TINY:
        return None
    plain_text = spec.text.model_copy(update={"title_max_tokens": None, "category_max_tokens": None})
    plain = TextFormatter(items, plain_text)  # one formatter for the whole catalogue (one per item was quadratic)
    return [plain.item_text(i) for i in range(len(items))]


def build_laser(
    spec: LaserSpec,
    items: pd.DataFrame,
    sr_model: SequentialRecommender | None,
    weights: LaserWeights | None = None,
    device: str | torch.device | None = "auto",
) -> LaserModel:
    """Load the backbone (tiny ones get a tokenizer trained on the item texts) onto ``device`` (a device
    setting, :mod:`laser_core.device`; the model and ``sr_model`` follow it there), build the formatter with the
    backbone's tokenizer (for token limits) and the model; load ``weights`` when given (and their item side's,
    :meth:`LaserModel.set_item_state`)."""
    backbone = load_backbone(spec.backbone, texts=tokenizer_texts(spec, items), device=device)
    formatter = TextFormatter(items, spec.text, tokenizer=backbone.tokenizer)
    torch.manual_seed(spec.seed)
    needs_sr = spec.bitune.reads_item_ids
    model = LaserModel(backbone, sr_model if needs_sr else None, formatter, spec.bitune)
    if weights is not None:
        model.load_state_dict(weights.state)
        model.set_item_state(weights.item_state)
    return model


@dataclass
class ItemTable:
    """The suffix-produced item-embedding table ``[n_items, H]`` (rows follow the catalogue's item order)."""

    table: torch.Tensor
    weights_fingerprint: str = ""

    def save(self, directory: str | Path) -> Path:
        """``table.safetensors`` and ``table.json`` (the fingerprint of the weights that made it, the shape)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        save_tensors({"table": self.table}, d / "table.safetensors")
        meta = {"weights_fingerprint": self.weights_fingerprint, "shape": list(self.table.shape)}
        write_meta(d / "table.json", meta, TABLE_FORMAT)
        return d

    @classmethod
    def load(cls, directory: str | Path) -> ItemTable:
        d = Path(directory)
        meta = read_meta(d / "table.json", TABLE_FORMAT, "ItemTable")
        return cls(
            table=load_file(str(d / "table.safetensors"))["table"], weights_fingerprint=meta["weights_fingerprint"]
        )
