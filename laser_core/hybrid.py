"""The z-scored hybrid: an ID model's scores plus ``gamma`` x a text similarity, each z-scored per user.

    score(u, i) = z(id(u, .))_i + gamma * z(sim(u, .))_i

``sim(u, i)`` is the cosine of item ``i`` to the user's history in an item-text space: a frozen LLM's item table
(:mod:`laser_core.frozen_table`), a random backbone of the same shape, or TF-IDF over the item descriptions. The
history form is the last item (``"last"``) or a recency-weighted mean of the last five items' vectors
(``"decay5"``: weights 1, 1/2, 1/4, ...). Because both parts are z-scored, ``gamma`` is a unit-free weight;
``gamma = 0`` is the ID model alone and ``gamma = inf`` the text similarity alone. The table, its transform (raw,
mean-centred, ZCA-whitened as WhitenRec/DWSRec), the form and ``gamma`` are chosen on validation NDCG@10
(:func:`choose_on_validation`); ties go to the smallest ``gamma``.

TF-IDF (:func:`tfidf_vectors`, scikit-learn) reads the same unified item description the LLM reads
(:func:`item_texts`); optionally reduced by a seeded truncated SVD so the vectors are dense and small. Its fitted
state (:class:`TfidfState`) maps new texts into the same space and is saved as JSON + safetensors (no pickle).

numpy, scipy.sparse and scikit-learn only: no torch at import (tensors are accepted and converted).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
from pydantic import ConfigDict, Field, model_validator

from laser_core.configbase import StrictConfig
from laser_core.metrics import RankingAccumulator
from laser_core.ranking import as_numpy

FORMS = ("last", "decay5")
GAMMAS = (0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0)
TRANSFORMS = ("raw", "centered", "whitened")
#: the metrics a choice and its grid records keep
KEEP = ("ndcg@10", "recall@10", "mrr")
DECAY_ITEMS = 5  # "decay5": the last five items


# ------------------------------------------------------------------------------------------------ item tables
def _unit_rows(x: Any) -> Any:
    """``x`` with L2-normalised rows (a zero row stays zero); sparse stays sparse (CSR), dense is float32."""
    if sp.issparse(x):
        x = sp.csr_matrix(x, dtype=np.float32)
        norms = np.sqrt(np.asarray(x.multiply(x).sum(axis=1), dtype=np.float64).ravel())
        return sp.csr_matrix(sp.diags((1.0 / np.maximum(norms, 1e-12)).astype(np.float32)) @ x)
    x = np.asarray(x, dtype=np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32)


def whiten(table: Any, eps: float = 1e-6) -> np.ndarray:
    """ZCA whitening fitted on the rows of ``table`` (float64, not normalised): mean-centred, then rotated and
    scaled so that the covariance is the identity (eigenvalues regularised by ``eps`` x the largest)."""
    x = as_numpy(table).astype(np.float64)
    x = x - x.mean(axis=0)
    cov = x.T @ x / x.shape[0]
    s, u = np.linalg.eigh(cov)
    return x @ (u * (1.0 / np.sqrt(np.clip(s, 0, None) + eps * s.max()))) @ u.T


def transform_table(table: Any, kind: str, eps: float = 1e-6) -> Any:
    """L2-normalised rows of ``table`` ``[n_items, d]``: ``raw``, mean-``centered`` or ZCA-``whitened``
    (:func:`whiten`, fitted on these rows). A scipy.sparse table (TF-IDF) takes ``raw`` only (centring would
    densify it) and stays sparse; a dense one comes back as float32."""
    if kind not in TRANSFORMS:
        raise ValueError(f"transform must be one of {TRANSFORMS}, got {kind!r}")
    if sp.issparse(table):
        if kind != "raw":
            raise ValueError(f"a sparse table takes the 'raw' transform only (got {kind!r}); reduce it (dim) first")
        return _unit_rows(table)
    x = as_numpy(table).astype(np.float64)
    if x.ndim != 2:
        raise ValueError(f"an item table must be 2-D [n_items, d], got shape {x.shape}")
    if kind == "centered":
        x = x - x.mean(axis=0)
    elif kind == "whitened":
        x = whiten(x, eps)
    return _unit_rows(x)


# ------------------------------------------------------------------------------------------ user similarities
def history_weights(histories: Sequence[Sequence[int]], form: str, n_items: int) -> sp.csr_matrix:
    """``[B, n_items]`` sparse weights of each user's items in the history form: ``last`` puts 1 on the last
    item; ``decay5`` puts 1, 1/2, 1/4, ... on the last five items (latest first; a repeated item gets the sum),
    divided by the weights' sum."""
    if form not in FORMS:
        raise ValueError(f"history form must be one of {FORMS}, got {form!r}")
    rows, cols, vals = [], [], []
    for b, h in enumerate(histories):
        h = np.asarray(h, dtype=np.int64).reshape(-1)
        if not len(h):
            raise ValueError(f"history {b} is empty: the hybrid needs at least one item")
        if h.min() < 0 or h.max() >= n_items:
            raise ValueError(f"history {b} holds an item index outside 0..{n_items - 1}")
        recent = h[-1:] if form == "last" else h[-DECAY_ITEMS:][::-1]
        w = 0.5 ** np.arange(len(recent), dtype=np.float64)
        rows.append(np.full(len(recent), b))
        cols.append(recent)
        vals.append(w / w.sum())
    if not rows:
        return sp.csr_matrix((0, n_items), dtype=np.float32)
    return sp.csr_matrix(
        (np.concatenate(vals).astype(np.float32), (np.concatenate(rows), np.concatenate(cols))),
        shape=(len(rows), n_items),
    )  # duplicate (row, col) entries are summed


def user_text_vectors(unit: Any, histories: Sequence[Sequence[int]], form: str) -> Any:
    """``[B, d]``: each user's text vector, the :func:`history_weights` mean of its history's rows of ``unit``
    (``[n_items, d]``, dense or scipy.sparse; the result is of the same kind)."""
    if not sp.issparse(unit):
        unit = np.asarray(as_numpy(unit), dtype=np.float32)
    out = history_weights(histories, form, unit.shape[0]) @ unit
    return sp.csr_matrix(out) if sp.issparse(unit) else np.asarray(out, dtype=np.float32)


def history_similarity(unit: Any, histories: Sequence[Sequence[int]], form: str) -> np.ndarray:
    """``[B, n_items]`` (float32): the similarity of every item to each user's history,
    ``user_text_vectors(unit, histories, form) @ unit.T`` (with unit rows: the cosine to the last item, or the
    decayed mean of the cosines to the last five). A sparse ``unit`` is never densified."""
    users = user_text_vectors(unit, histories, form)
    if sp.issparse(unit):
        return np.asarray((users @ sp.csr_matrix(unit).T).toarray(), dtype=np.float32)
    return users @ np.asarray(as_numpy(unit), dtype=np.float32).T


def zscore(scores: Any) -> np.ndarray:
    """Each row z-scored: minus its mean, over its standard deviation (ddof 1; a constant row becomes 0)."""
    x = as_numpy(scores).astype(np.float64)
    if x.ndim != 2:
        raise ValueError(f"scores must be 2-D [batch, n_items], got shape {x.shape}")
    std = x.std(axis=1, ddof=1, keepdims=True) if x.shape[1] > 1 else np.zeros((x.shape[0], 1))
    return (x - x.mean(axis=1, keepdims=True)) / np.maximum(std, 1e-8)


def blend(id_scores: Any, sim: Any, gamma: float) -> np.ndarray:
    """``zscore(id_scores) + gamma * zscore(sim)``; ``gamma = inf`` gives the text similarity alone
    (``zscore(sim)``), ``gamma = 0`` the ID model alone."""
    if math.isnan(gamma) or gamma < 0:
        raise ValueError(f"gamma must be >= 0 (inf: the text alone), got {gamma!r}")
    if math.isinf(gamma):
        return zscore(sim)
    z = zscore(id_scores)
    return z if gamma == 0 else z + gamma * zscore(sim)


def hybrid_metrics(
    id_scores: Any,
    unit: Any,
    histories: Sequence[Sequence[int]],
    targets: Any,
    form: str,
    gamma: float,
    mask_history: bool = False,
    batch_size: int = 512,
) -> dict[str, float]:
    """Full-ranking metrics (:data:`KEEP`) of the hybrid of one choice over ``[B, n]`` ``id_scores`` (an
    array, or anything sliced by rows, e.g. a memmap), scored in batches of users; ``mask_history`` excludes
    each user's history from its ranking."""
    return _grid(id_scores, {"_": unit}, histories, targets, (gamma,), (form,), mask_history, batch_size)[0]["metrics"]


# ----------------------------------------------------------------------------------- choosing on validation
@dataclass
class HybridChoice:
    """What :func:`choose_on_validation` chose: the table (its name in ``tables``), the history form and
    ``gamma``, their validation metrics, and every grid point's record."""

    table: str
    form: str
    gamma: float
    valid: dict[str, float]
    valid_users: int
    grid: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def _grid(
    id_scores: Any,
    tables: Mapping[str, Any],
    histories: Sequence[Sequence[int]],
    targets: Any,
    gammas: Sequence[float],
    forms: Sequence[str],
    mask_history: bool,
    batch_size: int,
) -> list[dict]:
    """Metrics of every (table, form, gamma), each similarity computed once per batch of users."""
    targets = np.asarray(as_numpy(targets), dtype=np.int64).reshape(-1)
    n_users = len(targets)
    if len(histories) != n_users or id_scores.shape[0] != n_users:
        raise ValueError(
            f"{len(histories)} histories, {id_scores.shape[0]} score rows and {n_users} targets: one each per user"
        )
    if n_users == 0:
        raise ValueError("no users to choose on")
    for name, unit in tables.items():
        if unit.shape[0] != id_scores.shape[1]:
            raise ValueError(f"table {name!r} has {unit.shape[0]} rows but the ID model scores {id_scores.shape[1]}")
    records = []
    for name, unit in tables.items():
        for form in forms:
            accs = {g: RankingAccumulator() for g in gammas}
            for lo in range(0, n_users, batch_size):
                hi = min(lo + batch_size, n_users)
                hist = histories[lo:hi]
                z_id = zscore(as_numpy(id_scores[lo:hi]))
                z_sim = zscore(history_similarity(unit, hist, form))
                exclude = hist if mask_history else None
                for g in gammas:
                    score = z_sim if math.isinf(g) else (z_id if g == 0 else z_id + g * z_sim)
                    accs[g].add(score, targets[lo:hi], exclude=exclude)
            for g in gammas:
                r = accs[g].result()
                records.append({"table": name, "form": form, "gamma": float(g), "metrics": {k: r[k] for k in KEEP}})
    return records


def choose_on_validation(
    id_scores: Any,
    tables: Mapping[str, Any],
    histories: Sequence[Sequence[int]],
    targets: Any,
    gammas: Sequence[float] = GAMMAS,
    forms: Sequence[str] = FORMS,
    mask_history: bool = False,
    batch_size: int = 512,
    metric: str = "ndcg@10",
) -> HybridChoice:
    """The table, history form and ``gamma`` with the best validation ``metric`` over the grid, for the
    validation users' ``[B, n]`` ``id_scores`` (an array or a row-sliceable memmap), their ``histories``
    (time-ascending item indices) and ``targets``. ``tables`` maps a name to unit item rows
    (:func:`transform_table`). Ties go to the smallest ``gamma`` (then the first table and form given), so
    ``gamma = 0``, the ID model alone, wins unless the text adds something."""
    if not tables:
        raise ValueError("no text tables to choose from")
    if metric not in KEEP:
        raise ValueError(f"metric must be one of {KEEP}, got {metric!r}")
    bad = [f for f in forms if f not in FORMS]
    if bad or not forms:
        raise ValueError(f"history forms must be among {FORMS}, got {list(forms)}")
    gammas = sorted(float(g) for g in gammas)
    if not gammas or gammas[0] < 0:
        raise ValueError(f"gammas must be >= 0 and not empty, got {gammas}")
    grid = _grid(id_scores, tables, histories, targets, gammas, forms, mask_history, batch_size)
    best = None
    for g in gammas:  # ascending: a later (larger) gamma wins only when strictly better
        for rec in grid:
            if rec["gamma"] == g and (best is None or rec["metrics"][metric] > best["metrics"][metric]):
                best = rec
    return HybridChoice(
        table=best["table"],
        form=best["form"],
        gamma=best["gamma"],
        valid=dict(best["metrics"]),
        valid_users=len(histories),
        grid=[{k: v for k, v in r.items() if k != "metrics"} | r["metrics"] for r in grid],
    )


# ------------------------------------------------------------------------------------------------- TF-IDF
def item_texts(items: pd.DataFrame, text: Any = None, tokenizer: Any = None) -> list[str]:
    """Each catalogue item's unified description (title, brand, category) as Laser's item text holds it
    (:meth:`laser_core.data.text.TextFormatter.item_description`, with the text settings ``text``; a tokenizer
    only for token limits): what TF-IDF reads, the same words the LLM reads."""
    from laser_core.data.text import TextFormatter

    fmt = TextFormatter(items, text, tokenizer)
    return [fmt.item_description(i) for i in range(len(fmt))]


class TfidfConfig(StrictConfig):
    """TF-IDF over the item texts (scikit-learn's ``TfidfVectorizer``), optionally reduced by truncated SVD."""

    model_config = ConfigDict(extra="forbid")

    analyzer: Literal["word", "char_wb"] = "word"
    ngram_min: int = Field(default=1, ge=1)
    ngram_max: int = Field(default=2, ge=1)
    min_df: int = Field(default=1, ge=1, description="keep terms in at least this many items")
    sublinear_tf: bool = True
    max_features: int | None = Field(default=None, ge=1, description="keep the most frequent terms (None: all)")
    dim: int | None = Field(
        default=None, ge=1, description="truncated-SVD components (seeded); None: the sparse TF-IDF rows"
    )

    @model_validator(mode="after")
    def _ngrams(self) -> TfidfConfig:
        if self.ngram_min > self.ngram_max:
            raise ValueError(f"ngram_min ({self.ngram_min}) must not exceed ngram_max ({self.ngram_max})")
        return self

    def vectorizer(self, vocabulary: Mapping[str, int] | None = None):
        from sklearn.feature_extraction.text import TfidfVectorizer

        return TfidfVectorizer(
            analyzer=self.analyzer,
            ngram_range=(self.ngram_min, self.ngram_max),
            min_df=1 if vocabulary is not None else self.min_df,
            max_features=None if vocabulary is not None else self.max_features,
            sublinear_tf=self.sublinear_tf,
            vocabulary=vocabulary,
            dtype=np.float32,
        )


#: the two TF-IDF controls: word 1-2-grams and character 3-5-grams (within word boundaries)
TFIDF_PRESETS: dict[str, TfidfConfig] = {
    "word": TfidfConfig(analyzer="word", ngram_min=1, ngram_max=2),
    "char": TfidfConfig(analyzer="char_wb", ngram_min=3, ngram_max=5),
}

STATE_JSON = "tfidf.json"
STATE_ARRAYS = "tfidf.safetensors"


@dataclass(eq=False)
class TfidfState:
    """A fitted TF-IDF space: the settings, the vocabulary (terms in column order), the idf weights and, when
    reduced, the SVD components ``[dim, vocab]``. :meth:`transform` maps new texts into it."""

    config: TfidfConfig
    terms: list[str]
    idf: np.ndarray
    components: np.ndarray | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        self._vec = self.config.vectorizer({t: i for i, t in enumerate(self.terms)})
        self._vec.idf_ = np.asarray(self.idf, dtype=np.float32)

    @property
    def dim(self) -> int:
        """The width of the vectors: the components when reduced, else the vocabulary size."""
        return len(self.terms) if self.components is None else int(self.components.shape[0])

    def transform(self, texts: Sequence[str]) -> Any:
        """L2-normalised rows of ``texts`` in this space (sparse CSR; dense float32 when reduced)."""
        x = self._vec.transform(list(texts))
        if self.components is None:
            return _unit_rows(x)
        return _unit_rows(np.asarray(x @ self.components.T, dtype=np.float64))

    def save(self, directory: str | Path) -> Path:
        """Write ``tfidf.json`` (settings, vocabulary, seed) and ``tfidf.safetensors`` (idf, components)."""
        from safetensors.numpy import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        meta = {"config": self.config.model_dump(mode="json"), "terms": self.terms, "seed": self.seed}
        (d / STATE_JSON).write_text(json.dumps(meta, ensure_ascii=False), encoding="utf8")
        arrays = {"idf": np.ascontiguousarray(self.idf, dtype=np.float32)}
        if self.components is not None:
            arrays["components"] = np.ascontiguousarray(self.components, dtype=np.float32)
        save_file(arrays, str(d / STATE_ARRAYS))
        return d

    @classmethod
    def load(cls, directory: str | Path) -> TfidfState:
        """The state :meth:`save` wrote in ``directory``; a missing or inconsistent file is a clear error."""
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        d = Path(directory)
        try:
            meta = json.loads((d / STATE_JSON).read_text(encoding="utf8"))
            arrays = load_file(str(d / STATE_ARRAYS))
            config = TfidfConfig.model_validate(meta["config"])
            terms, seed = list(meta["terms"]), int(meta["seed"])
        except (OSError, ValueError, KeyError, TypeError, SafetensorError) as exc:
            raise ValueError(f"{d}: not a readable TF-IDF state ({type(exc).__name__}: {exc})") from exc
        idf, components = arrays.get("idf"), arrays.get("components")
        if idf is None or idf.shape != (len(terms),):
            raise ValueError(f"{d / STATE_ARRAYS}: idf must have one weight per term ({len(terms)})")
        if (components is None) != (config.dim is None) or (
            components is not None and components.shape != (config.dim, len(terms))
        ):
            raise ValueError(f"{d / STATE_ARRAYS}: components must be [dim, {len(terms)}] exactly when dim is set")
        return cls(config=config, terms=terms, idf=idf, components=components, seed=seed)


def tfidf_vectors(texts: Sequence[str], cfg: TfidfConfig | None = None, seed: int = 0) -> tuple[Any, TfidfState]:
    """TF-IDF of ``texts`` (one per item) with ``cfg`` (default: word 1-2-grams): ``(rows, state)``, the rows
    L2-normalised, scipy.sparse CSR when ``cfg.dim`` is None, else dense float32 ``[n, dim]`` (truncated SVD
    seeded by ``seed``, rows re-normalised); ``state`` maps new texts into the same space."""
    from sklearn.decomposition import TruncatedSVD

    cfg = cfg or TfidfConfig()
    texts = [str(t) for t in texts]
    vec = cfg.vectorizer()
    try:
        x = vec.fit_transform(texts)
    except ValueError as exc:  # e.g. every text empty, or min_df above the number of items
        raise ValueError(f"TF-IDF over {len(texts)} item texts: {exc}") from exc
    terms = vec.get_feature_names_out().tolist()
    components = None
    if cfg.dim is not None:
        if cfg.dim >= len(terms):
            raise ValueError(f"tfidf dim = {cfg.dim} must be below the vocabulary size ({len(terms)} terms)")
        svd = TruncatedSVD(n_components=cfg.dim, random_state=seed)
        svd.fit(x)
        components = svd.components_.astype(np.float32)
    state = TfidfState(config=cfg, terms=terms, idf=vec.idf_.astype(np.float32), components=components, seed=seed)
    rows = _unit_rows(x) if components is None else _unit_rows(np.asarray(x @ components.T, dtype=np.float64))
    return rows, state


__all__ = [
    "FORMS",
    "GAMMAS",
    "KEEP",
    "TFIDF_PRESETS",
    "TRANSFORMS",
    "HybridChoice",
    "TfidfConfig",
    "TfidfState",
    "blend",
    "choose_on_validation",
    "history_similarity",
    "history_weights",
    "hybrid_metrics",
    "item_texts",
    "tfidf_vectors",
    "transform_table",
    "user_text_vectors",
    "whiten",
    "zscore",
]
