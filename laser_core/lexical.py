"""The lexical hybrid as a model: the trained ID model plus TF-IDF text similarity, fitted, scored, exported.

Per user ``u`` and item ``i`` (:func:`laser_core.hybrid.blend`)::

    score(u, i) = z(id(u, .))_i + gamma * z(sim(u, .))_i

``z``: the per-user z-score over the trained catalogue (sample standard deviation, ``ddof`` 1, as
:func:`laser_core.hybrid.zscore`); ``id``: the ID model's dot-product scores ``u_id . v_i`` (SASRec, BERT4Rec:
``user_vectors``/``item_vectors``); ``sim``: the cosine of item ``i``'s text row to the user's text vector
(``form``: the last item's row, or a decayed sum over the last items, :data:`laser_core.hybrid.FORMS`); text rows: TF-IDF over the item texts reduced by truncated SVD and
re-normalised (:func:`laser_core.hybrid.tfidf_vectors`). ``gamma``, the form and (with a list of settings) the
TF-IDF analyzer are chosen on validation only (:func:`laser_core.hybrid.choose_on_validation`).

For dot-product scores ``s_i = u . v_i`` the z-score is ``u . (v_i - mean) / sqrt(u^T C u)`` (``mean`` and ``C``
the items' mean and sample covariance, ``ddof`` 1: :func:`laser_core.score_stats.row_statistics`), so the whole
blend is ONE dot product::

    [u_id / sd_id(u), gamma * u_txt / sd_txt(u)] . [v_id_i - mean_id, t_i - mean_txt]

:class:`LexicalHybrid` computes the left side (:meth:`~LexicalHybrid.user_vectors`, what ``user_tower.onnx``
computes from the item-id history) and the right side (:meth:`~LexicalHybrid.item_vectors`, the bundle's table),
and :meth:`~LexicalHybrid.full_sort_predict` their product, which equals :func:`~laser_core.hybrid.blend` up to
float error; the one evaluation loop (:mod:`laser_core.evaluation`) scores it like any ID model. The export is
:func:`laser_core.export.export_lexical_bundle`.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from laser_core import collate
from laser_core.configuration import LexicalConfig
from laser_core.data.text import TextConfig
from laser_core.hybrid import (
    TfidfState,
    choose_on_validation,
    item_texts,
    tfidf_vectors,
    transform_table,
    user_text_vectors,
)
from laser_core.score_stats import per_user_sd, row_statistics

#: the longest text window the forms are probed for (:func:`form_weights`)
MAX_FORM_WINDOW = 64


class LexicalError(ValueError):
    """The lexical hybrid cannot be fitted as asked (an ID model without dot-product vectors, bad settings)."""


def form_weights(form: str) -> np.ndarray:
    """The weight of each of the last positions of a history in the user's text vector for ``form``, oldest
    first, most recent last (``last``: ``[1]``): read off :func:`laser_core.hybrid.user_text_vectors` itself (a
    history of one-hot text rows), so the tower weighs the rows exactly as the blend does (up to a positive
    factor per user, which neither the cosine nor the z-score sees)."""
    eye = np.eye(MAX_FORM_WINDOW, dtype=np.float64)
    w = np.asarray(user_text_vectors(eye, [np.arange(MAX_FORM_WINDOW)], form), dtype=np.float64)[0]
    nonzero = np.flatnonzero(np.abs(w) > 0)
    if not len(nonzero):
        raise LexicalError(f"form {form!r} gives a zero text vector")
    if nonzero[0] == 0:
        raise LexicalError(f"form {form!r} reads more than the last {MAX_FORM_WINDOW - 1} items")
    return w[nonzero[0] :].astype(np.float32)


def lexical_text(text: TextConfig | None = None) -> TextConfig:
    """The text settings the lexical hybrid reads item descriptions with: ``text`` without its token limits
    (``title_max_tokens``, ``category_max_tokens``: the hybrid has no tokenizer, neither has its bundle), its
    character limits and fields kept. The hybrid keeps them (:attr:`LexicalHybrid.text_config`) and its bundle's
    manifest holds them, so ``laser items add`` describes new items as the fit described the catalogue."""
    return (text or TextConfig()).model_copy(update={"title_max_tokens": None, "category_max_tokens": None})


def unit_rows(rows: Any) -> np.ndarray:
    """L2-normalised rows (a zero row stays zero; :func:`laser_core.hybrid.transform_table` ``raw``), float32."""
    return np.asarray(transform_table(np.asarray(rows, dtype=np.float32), "raw"), dtype=np.float32)


class LexicalHybrid(nn.Module):
    """The fitted lexical hybrid: the ID model (frozen, a copy), the items' unit text rows, the fitted TF-IDF
    state (for new items), the form, ``gamma`` and the z-score statistics over the trained catalogue. It has the
    ``full_sort_predict`` contract (:mod:`laser_core.evaluation`)."""

    sort_by_length = False

    def __init__(
        self,
        sr_model: nn.Module,
        text_rows: Any,
        form: str,
        gamma: float,
        tfidf_state: TfidfState,
        text_config: TextConfig | None = None,
        valid: dict[str, float] | None = None,
        grid: list[dict] | None = None,
    ) -> None:
        super().__init__()
        sr = copy.deepcopy(sr_model).float().cpu().eval()
        for p in sr.parameters():
            p.requires_grad_(False)
        self.sr = sr
        self.form = str(form)
        self.gamma = float(gamma)
        self.tfidf_state = tfidf_state
        self.text_config = lexical_text(text_config)  # how the item texts TF-IDF read were made (item_texts)
        self.valid = dict(valid or {})
        self.grid = list(grid or [])
        with torch.no_grad():
            id_rows = sr.item_vectors().detach().float().cpu().numpy()
            unknown = sr.unknown_item_vector().detach().float().cpu().numpy()
        text = unit_rows(text_rows)
        if text.shape[0] != id_rows.shape[0]:
            raise LexicalError(f"{text.shape[0]} text rows for the ID model's {id_rows.shape[0]} items")
        id_mean, id_cov = row_statistics(id_rows)
        text_mean, text_cov = row_statistics(text)
        weights = form_weights(self.form)
        self.n_items = int(id_rows.shape[0])
        self.max_len = int(sr.config.max_len)
        self.window = max(self.max_len, len(weights))  # the history the tower reads
        padded = np.zeros(self.window, dtype=np.float32)
        padded[self.window - len(weights) :] = weights
        f32 = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))  # noqa: E731
        self.register_buffer("id_rows", f32(id_rows))
        self.register_buffer("text_table", f32(text))
        self.register_buffer("id_mean", f32(id_mean))
        self.register_buffer("text_mean", f32(text_mean))
        self.register_buffer("id_cov", f32(id_cov))
        self.register_buffer("text_cov", f32(text_cov))
        self.register_buffer("unknown_id", f32(unknown))
        self.register_buffer("position_weights", f32(padded))

    # ------------------------------------------------------------------ the two sides
    @property
    def id_dim(self) -> int:
        return int(self.id_rows.shape[1])

    @property
    def text_dim(self) -> int:
        return int(self.text_table.shape[1])

    def user_vectors(self, item_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``[B, id_dim + text_dim]`` user rows from left-padded catalogue rows + mask (at most :attr:`window`
        wide; the most recent last). Rows at or past the ID model's items (added to a bundle) are cold items to
        the ID model; their text rows come from :attr:`text_table`. No data-dependent branch: the ONNX export
        traces it."""
        mask = mask.long()
        sr_ids = item_ids[:, -self.max_len :]
        sr_mask = mask[:, -self.max_len :]
        sr_ids = torch.where(sr_ids >= self.n_items, torch.full_like(sr_ids, -1), sr_ids)
        u_id = self.sr.user_vectors(sr_ids, sr_mask)
        width = item_ids.shape[1]
        w = self.position_weights[self.window - width :] * mask.to(self.position_weights.dtype)
        rows = self.text_table[item_ids.clamp(min=0) * mask]
        u_txt = (rows * w[..., None]).sum(dim=1)
        u_id, u_txt = u_id / per_user_sd(u_id, self.id_cov), u_txt / per_user_sd(u_txt, self.text_cov)
        return torch.cat([u_id, self.gamma * u_txt], dim=1)

    def item_vectors(self) -> torch.Tensor:
        """``[n_items, id_dim + text_dim]`` the centred item rows: ``[v_id - mean_id, t - mean_txt]``."""
        return torch.cat([self.id_rows - self.id_mean, self.text_table - self.text_mean], dim=1)

    def new_item_rows(self, text_rows: Any) -> np.ndarray:
        """Centred table rows for items the ID model has not seen, from their text rows (before
        :func:`unit_rows`): the ID side is the ID model's unknown-item vector."""
        text = unit_rows(text_rows) - self.text_mean.numpy()
        ids = np.broadcast_to(self.unknown_id.numpy() - self.id_mean.numpy(), (len(text), self.id_dim))
        return np.concatenate([ids, text], axis=1).astype(np.float32)

    def forward(self, item_ids: torch.Tensor, item_mask: torch.Tensor) -> torch.Tensor:
        """What ``user_tower.onnx`` computes: ``[B, id_dim + text_dim + 1]``, :meth:`user_vectors` and a 0 (the
        column that makes every table row's norm equal: ``laser_core.bundle.augment_rows``)."""
        users = self.user_vectors(item_ids, item_mask)
        return torch.cat([users, torch.zeros_like(users[:, :1])], dim=1)

    # ------------------------------------------------------------------ the full_sort_predict contract
    def predict_inputs(self, histories: Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
        """The batch for :meth:`full_sort_predict`: the last :attr:`window` items, left-padded."""
        ids, mask = collate.pad_left(histories, self.window)
        return {"item_ids": torch.from_numpy(ids), "item_mask": torch.from_numpy(mask)}

    @torch.no_grad()
    def full_sort_predict(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``[B, n_items]``: the blend of each user's z-scored ID and text scores (one dot product)."""
        return self.user_vectors(batch["item_ids"], batch["item_mask"]) @ self.item_vectors().T

    @torch.no_grad()
    def score(self, histories: Sequence[Sequence[int]]) -> torch.Tensor:
        return self.full_sort_predict(self.predict_inputs(histories))

    def describe(self) -> dict:
        """What was fitted, for reports and the manifest."""
        return {
            "id_model": self.sr.config.model,
            "form": self.form,
            "gamma": self.gamma,
            "tfidf": self.tfidf_state.config.model_dump(mode="json"),
            "id_dim": self.id_dim,
            "text_dim": self.text_dim,
            "valid": {k: float(v) for k, v in self.valid.items()},
        }


def check_id_model(sr_model: nn.Module) -> None:
    """The hybrid needs an ID model with dot-product user/item vectors (SASRec, BERT4Rec)."""
    try:
        sr_model.item_vectors()
    except NotImplementedError:
        raise LexicalError(
            f"the lexical hybrid needs an ID model with dot-product scores (sasrec, bert4rec), not "
            f"{sr_model.config.model!r} (setting sr.model)"
        ) from None


def batched_scores(model: nn.Module, histories: Sequence[Sequence[int]], batch_size: int = 512) -> np.ndarray:
    """``[len(histories), n_items]`` float32: ``model.score`` over ``batch_size`` users at a time, written into
    one array (one forward over every validation user, 22k on Beauty, holds all their activations at once)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    out = np.zeros((0, 0), dtype=np.float32)
    for lo in range(0, len(histories), batch_size):
        block = model.score(histories[lo : lo + batch_size]).float().cpu().numpy()
        if lo == 0:
            out = np.empty((len(histories), block.shape[1]), dtype=np.float32)
        out[lo : lo + len(block)] = block
    return out


def fit_lexical_hybrid(
    sr_model: nn.Module,
    split: Any,
    items: pd.DataFrame,
    cfg: LexicalConfig,
    text: TextConfig | None = None,
    mask_history: bool = False,
    batch_size: int = 512,
) -> LexicalHybrid:
    """Fit the lexical hybrid on ``split``'s VALIDATION pairs only (``split.valid_examples``; the test targets
    are never read): the TF-IDF rows of the item texts (:func:`laser_core.hybrid.item_texts` with the text
    settings ``text`` less their token limits, :func:`lexical_text`) for each of ``cfg``'s settings, then the
    setting, the form and ``gamma`` by :func:`~laser_core.hybrid.choose_on_validation` on the ID model's
    validation scores (``mask_history``: ranked with each user's history excluded, as the ID model was
    validated), both computed ``batch_size`` users at a time (:func:`batched_scores`)."""
    check_id_model(sr_model)
    if len(items) != split.n_items:
        raise LexicalError(f"{len(items)} items, but the split has {split.n_items}")
    text = lexical_text(text)
    texts = item_texts(items, text)
    tables, states = {}, {}
    for n, setting in enumerate(cfg.tfidf_settings()):
        name = f"{n}:{setting.analyzer}"
        try:
            tables[name], states[name] = tfidf_vectors(texts, setting, cfg.seed)
        except ValueError as exc:
            raise LexicalError(f"lexical.tfidf setting {n}: {exc}") from None
    _, histories, targets = split.valid_examples()
    id_scores = batched_scores(sr_model, histories, batch_size)
    choice = choose_on_validation(
        id_scores, tables, histories, targets, cfg.gammas, cfg.forms, mask_history=mask_history, batch_size=batch_size
    )
    return LexicalHybrid(
        sr_model,
        tables[choice.table],
        choice.form,
        choice.gamma,
        states[choice.table],
        text,
        valid=choice.valid,
        grid=choice.grid,
    )


def evaluate_lexical(model: LexicalHybrid, split: Any, train_config: Any) -> Any:
    """The hybrid's test metrics on the pairs Laser is scored on (:func:`laser_core.train.test_examples`: all
    test users, or ``laser_train.test_users`` of them), with the one evaluation loop, beside popularity's and the
    ID model's on the same pairs (the promotion gate's baselines), as a
    :class:`~laser_core.reporting.MetricsReport`."""
    from laser_core.configuration import SRConfig
    from laser_core.evaluation import evaluate
    from laser_core.reporting import MetricsReport, full_ranking_protocol
    from laser_core.sr.popularity import Popularity
    from laser_core.train import test_examples

    hist, targets = test_examples(split, train_config)
    metrics = evaluate(model, hist, targets)
    popularity = evaluate(Popularity(SRConfig(model="popularity"), split.n_items).fit(split.train), hist, targets)
    id_model = evaluate(model.sr, hist, targets)
    return MetricsReport(
        model="lexical_hybrid",
        split="test",
        metrics=metrics,
        protocol=full_ranking_protocol(len(targets), test_users=train_config.test_users or "all"),
        details={
            **model.describe(),
            "popularity": popularity,
            "id_model": id_model,
            "id_model_name": model.sr.config.model,
        },
    )
