"""Serving a Laser export bundle with onnxruntime, in a process that never imports torch.

``Recommender.load(bundle_dir)`` reads the bundle written by :func:`laser_core.export.export_bundle` (layout in
``docs/serving.md``): the manifest, the catalogue, the tokenizer (``tokenizer.json`` through the ``tokenizers``
library), ``user_tower.onnx`` and ``scorer.onnx``. ``recommend(history)`` formats the user text with the
training template (:class:`laser_core.data.text.TextFormatter` and the saved :class:`TextConfig`), builds the
ID history for the M-Former exactly as :class:`laser_core.model.LaserModel` does (the most recent ``max_len``
items, left-padded), runs the tower, then the scorer.

Cold-start items: :func:`add_items` embeds new catalogue items from their text with the exported tower (a
one-item history, as in training, with the cold-item treatment for the ID side: see
``laser_core.bundle.COLD_ITEM_TREATMENT``), through the tower's item side (``item_side = 1``: the weights
that made the item table, see :attr:`Recommender.cold_item_weights`), and writes a new bundle whose scorer
includes them. A history holding such an item gives it the same treatment: its text from the catalogue, ID
position ``-1``.
"""

from __future__ import annotations

import json
import shutil
import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from laser_core.collate import LaserCollator
from laser_core.data.text import TextConfig, TextFormatter
from laser_core.bundle import (
    COLD_ITEM,
    COLD_ITEM_WEIGHTS,
    ITEM_COLUMNS,
    ITEM_SIDE,
    MANIFEST,
    SCORER,
    AddedItemsEntry,
    AnnIndexSection,
    BundleError,
    BundleManifest,
    ServingTokenizer,
    augment_rows,
    bound_item_texts,
    check_loaded,
    export_scorer,
    l2_normalize,
    load_manifest,
    load_tokenizer,
    read_lexical_item_side,
    read_scorer_table,
    read_tower_text_table,
    replace_tower_text_table,
    sha256_file,
    verify_bundle,
    write_manifest,
)
from laser_core.ranking import top_k


class EmptyHistoryError(ValueError):
    """No item of the history is in the catalogue (and no popularity fallback is configured)."""


# ---------------------------------------------------------------------------------------------- results
@dataclass(frozen=True)
class RecommendedItem:
    item_id: str
    title: str
    score: float
    rank: int
    row: int  # the item's row in the catalogue / scorer table


@dataclass(frozen=True)
class Recommendation:
    """``items`` ranked best first; ``dropped``: input ids not in the catalogue (in input order); ``used``: the
    known ids the model read (after cutting to the trained history length); ``fallback``: ``"popularity"``
    when no known item was left and the popularity fallback answered, else ``None``."""

    items: list[RecommendedItem]
    dropped: list[str]
    used: list[str]
    model_version: str
    fallback: str | None = None
    excluded: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------------------------------ recommender
class Recommender:
    """A loaded bundle. ``recommend`` is safe to call from several threads (onnxruntime sessions are)."""

    def __init__(
        self,
        bundle_dir: Path,
        manifest: BundleManifest,
        catalogue: pd.DataFrame,
        tokenizer: ServingTokenizer | None,
        scorer: Any,
        tower: Any | None,
        popularity_fallback: bool,
        ann: Any | None = None,
    ) -> None:
        self.bundle_dir = bundle_dir
        self.manifest = manifest
        self.catalogue = catalogue
        self.tokenizer = tokenizer
        self._scorer = scorer
        self._tower = tower
        self._ann = ann  # laser_core.ann.AnnIndex when the bundle has an ANN index and exact scoring is off
        self.popularity_fallback = popularity_fallback
        self.text_config: TextConfig = manifest.text
        self.lexical = manifest.lexical  # the lexical hybrid's settings (no LLM: no tokenizer, no text prompt)
        self.formatter = None if tokenizer is None else TextFormatter(catalogue, self.text_config, tokenizer=tokenizer)
        self._row = {item_id: row for row, item_id in enumerate(catalogue["item_id"])}
        self._ids = catalogue["item_id"].tolist()
        self._titles = catalogue["title"].tolist()
        self.k = manifest.scorer.k
        self.n_trained_items = manifest.n_trained_items
        self.sr_max_len = manifest.sr.max_len if manifest.sr else None
        self.pad_token_id = manifest.tokenizer.pad_token_id if manifest.tokenizer else 0
        self._tower_inputs = list(manifest.user_tower.inputs) if manifest.user_tower else []
        # the torch model's padding (LaserModel.collate): the same collator
        self.collator = LaserCollator(self.pad_token_id, self.sr_max_len if "item_ids" in self._tower_inputs else None)
        self._table: np.ndarray | None = None
        self._lock = threading.Lock()
        pop = catalogue["popularity"].to_numpy(dtype=np.float64) if "popularity" in catalogue.columns else None
        self._popularity = pop

    # ---------------------------------------------------------------- loading
    @classmethod
    def load(
        cls,
        bundle_dir: str | Path,
        popularity_fallback: bool = False,
        verify: bool = True,
        threads: int | None = None,
        exact: bool = False,
    ) -> "Recommender":
        """Load a bundle. ``popularity_fallback``: answer an empty (or all-unknown) history with the most
        popular training items instead of raising :class:`EmptyHistoryError` (the bundle must hold item
        popularity). ``verify``: check every file's sha256 against the manifest (the manifest itself is always
        validated, and every file of the bundle must be listed in it). ``threads``: onnxruntime intra-op
        threads (default: its own choice). ``exact``: rank with the exact scorer even when the bundle has an ANN
        index (``ann_index`` in the manifest; otherwise the index answers, see :attr:`scoring`)."""
        import onnxruntime as ort

        root = Path(bundle_dir)
        manifest = load_manifest(root)
        verify_bundle(root, manifest, hashes=verify)
        catalogue = _read_catalogue(root / manifest.catalogue.file, manifest)
        if popularity_fallback and "popularity" not in catalogue.columns:
            raise BundleError(
                f"{root}: the popularity fallback (--popularity-fallback; popularity_fallback=True in Python) needs "
                "item popularity, and this bundle has none (bundles `laser run` exports have it)"
            )
        tokenizer = None
        if manifest.tokenizer is not None:  # the lexical hybrid has none
            tok = manifest.tokenizer
            tokenizer = load_tokenizer(root / tok.file, tok.clean_up_tokenization_spaces)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = int(threads)
        providers = ["CPUExecutionProvider"]

        def session(name: str):
            path = root / name
            if not path.is_file():
                raise BundleError(f"{path} not found")
            try:
                return ort.InferenceSession(str(path), sess_options=options, providers=providers)
            except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
                raise BundleError(f"{path}: onnxruntime cannot load it ({exc})") from None

        scorer = session(manifest.scorer.file)
        tower = session(manifest.user_tower.file) if manifest.user_tower else None
        check_loaded(root, manifest, catalogue, scorer, tower)
        ann = _load_ann_index(root, manifest, load=not exact)
        return cls(root, manifest, catalogue, tokenizer, scorer, tower, popularity_fallback, ann=ann)

    # -------------------------------------------------------------- properties
    @property
    def model_version(self) -> str:
        """``metadata.model_version`` from the manifest, else ``sha256:<first 12 hex of the tower or scorer>``."""
        version = self.manifest.metadata.get("model_version")
        if version is not None:
            return str(version)
        files = self.manifest.files
        tower = self.manifest.user_tower
        digest = files.get(tower.file if tower else "", files.get(SCORER, ""))
        return f"sha256:{digest[:12]}"

    @property
    def scoring(self) -> str:
        """``"exact"`` (the scorer ranks the whole table) or ``"ann"`` (the bundle's ANN index answers)."""
        return "exact" if self._ann is None else "ann"

    @property
    def n_items(self) -> int:
        return len(self._ids)

    @property
    def item_ids(self) -> Sequence[str]:
        """The catalogue's item ids in table order (the HTTP service's warm-up query uses the first; not a copy:
        do not change it)."""
        return self._ids

    @property
    def metadata(self) -> dict:
        return dict(self.manifest.metadata)

    @property
    def cold_item_weights(self) -> str:
        """Which weights embed new items (:func:`add_items`, :meth:`item_embeddings`): ``"item_side"``, the
        tower's item side, the weights that made the item table; ``"shared"``, the tower's one set of weights,
        which also made the table; ``"user_side"``, the user side's weights, which may differ from the table's
        (a bundle that does not record it: exported before the item side was kept). See
        ``laser_core.bundle.COLD_ITEM_WEIGHTS``; ``"lexical"`` for the lexical hybrid (its TF-IDF state)."""
        if self.lexical is not None:
            return "lexical"
        if ITEM_SIDE in self._tower_inputs:
            return "item_side"
        return "shared" if self.manifest.cold_item.item_weights == "shared" else "user_side"

    # -------------------------------------------------------------- embedding
    def _require_tower(self) -> Any:
        if self._tower is None:
            raise BundleError(
                f"{self.bundle_dir}: the bundle has no user tower (exported with export.user_tower: false in the "
                "run config)"
            )
        return self._tower

    def _tower_feeds(
        self, histories: Sequence[Sequence[int]], token_ids: Sequence[Sequence[int]], item_side: bool = False
    ) -> dict:
        """The tower's inputs; ``item_side``: the rows are items (the item side's weights, where the tower has
        them), else users."""
        # catalogue rows past the trained items were added cold: no trained ID embedding
        cold = [np.where(np.asarray(h, dtype=np.int64) >= self.n_trained_items, COLD_ITEM, h) for h in histories]
        batch = self.collator(token_ids, cold, np.full(len(histories), int(item_side)))
        return batch.feeds(self._tower_inputs)

    def user_embeddings(self, histories: Sequence[Sequence[int]]) -> np.ndarray:
        """``[B, d]`` user embeddings for histories of catalogue rows (time-ascending, non-empty)."""
        tower = self._require_tower()
        if not histories or any(len(h) == 0 for h in histories):
            raise ValueError("every history needs at least one catalogue row")
        if self.lexical is not None:  # the item-id history alone; added rows are the tower's to treat
            item_ids, item_mask = self.collator.pad_items(histories)
            return tower.run(["user_embedding"], {"item_ids": item_ids, "item_mask": item_mask})[0]
        token_ids = [self.tokenizer.encode(self.formatter.user_text(h)) for h in histories]
        return tower.run(["user_embedding"], self._tower_feeds(histories, token_ids))[0]

    def item_embeddings(
        self,
        items: pd.DataFrame,
        item_ids: Sequence[int] | None = None,
        batch_size: int = 16,
        progress: Callable[[int], None] | None = None,
    ) -> np.ndarray:
        """Item-table rows ``[n, d]`` (not normalized) for ``items`` (title, brand, category), embedded as the
        table's rows are (``LaserModel.embed_item_rows``): each a one-item history of the item template, through
        the tower's item side (:attr:`cold_item_weights`), its ID position the cold item (``-1``) or, with
        ``item_ids``, the rows' catalogue rows (re-embedding a trained item reproduces its table row).
        ``progress(n)``: called after each batch with the number of rows it embedded."""
        if self.lexical is not None:
            raise BundleError(
                f"{self.bundle_dir}: a lexical hybrid's item rows come from its TF-IDF state, not from its tower "
                "(add items with add_items / laser items add)"
            )
        tower = self._require_tower()
        ids = [COLD_ITEM] * len(items) if item_ids is None else [int(i) for i in item_ids]
        if len(ids) != len(items):
            raise ValueError(f"{len(items)} items but {len(ids)} item ids")
        bad = [i for i in ids if i != COLD_ITEM and not 0 <= i < self.n_items]
        if bad:
            raise ValueError(
                f"item ids {bad[:10]} are neither catalogue rows (0..{self.n_items - 1}) nor the cold "
                f"item ({COLD_ITEM})"
            )
        fmt = TextFormatter(items.reset_index(drop=True), self.text_config, tokenizer=self.tokenizer)
        token_ids = [self.tokenizer.encode(fmt.item_text(i)) for i in range(len(items))]
        emb = np.empty((len(items), self.manifest.dim), dtype=np.float32)
        order = np.argsort([len(t) for t in token_ids], kind="stable")  # similar lengths together: less padding
        for lo in range(0, len(items), batch_size):
            idx = order[lo : lo + batch_size]
            feeds = self._tower_feeds([[ids[i]] for i in idx], [token_ids[i] for i in idx], item_side=True)
            emb[idx] = tower.run(["user_embedding"], feeds)[0]
            if progress is not None:
                progress(len(idx))
        return emb

    def table(self) -> np.ndarray:
        """The L2-normalized item table ``[n_items, d]`` (read once from the scorer's initializer)."""
        with self._lock:
            if self._table is None:
                self._table = read_scorer_table(self.bundle_dir / self.manifest.scorer.file)
            return self._table

    # -------------------------------------------------------------- recommend
    def _known(self, history: Sequence[str]) -> tuple[list[int], list[str]]:
        if isinstance(history, (str, bytes)):
            raise TypeError("history must be a list of item ids, not a single string")
        rows, dropped = [], []
        for item in history:
            row = self._row.get(str(item))
            if row is None:
                dropped.append(str(item))
            else:
                rows.append(row)
        return rows, dropped

    def _check_k(self, k: int | None) -> int:
        k = self.k if k is None else k
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= self.n_items:
            raise ValueError(f"k must be an integer in 1..{self.n_items} (the catalogue size), got {k!r}")
        return int(k)

    def recommend(self, history: Sequence[str], k: int | None = None, exclude_history: bool = False) -> Recommendation:
        """The top-``k`` items (default: the bundle's k) for a history of catalogue item ids (oldest first).

        Unknown ids are dropped and reported in ``dropped``. The text reads the most recent ``history_len``
        known items and the ID side the most recent SR ``max_len``, as in training. ``exclude_history`` leaves
        the history's items out of the results. An empty or all-unknown history raises
        :class:`EmptyHistoryError` unless the popularity fallback is on."""
        k = self._check_k(k)
        rows, dropped = self._known(history)
        if not rows:
            if not self.popularity_fallback:
                what = f"none of its {len(dropped)} item id(s) is in the catalogue" if dropped else "it is empty"
                raise EmptyHistoryError(
                    f"cannot recommend for this history: {what} (dropped: {dropped[:20]}); "
                    "start `laser serve` or `laser recommend` with --popularity-fallback (popularity_fallback=True "
                    "of Recommender.load in Python) to answer such requests with the most popular items"
                )
            return self._popular(k, dropped)
        H = 0 if self.lexical is not None else self.text_config.history_len  # the lexical tower reads item ids
        n_text = len(rows) if H is None else min(H, len(rows))  # the text's most recent H items
        n_ids = min(self.sr_max_len, len(rows)) if self.sr_max_len else 0  # the ID side's most recent max_len
        used = [self._ids[r] for r in rows[len(rows) - max(n_text, n_ids) :]]
        emb = self.user_embeddings([rows])
        exclude = set(rows) if exclude_history else set()
        need = k + len(exclude)
        approx = self._ann_top(emb, need)
        if approx is not None:  # the index's approximate top-need: filtered as the exact results below
            scores, indices = approx
        elif need <= self.k:
            scores, indices = self._scorer.run(["scores", "indices"], {"user_embedding": emb.astype(np.float32)})
            scores, indices = scores[0], indices[0]
        else:  # more than the scorer's top-k: exact full ranking over the same normalized table, same ties
            indices, scores = top_k((self.table() @ l2_normalize(emb[0]))[None], k, exclude=[sorted(exclude)])
            scores, indices = scores[0], indices[0]
        ranked = [(int(i), float(s)) for i, s in zip(indices, scores) if int(i) not in exclude][:k]
        items = [
            RecommendedItem(self._ids[i], self._titles[i], s, rank, i) for rank, (i, s) in enumerate(ranked, start=1)
        ]
        return Recommendation(
            items=items,
            dropped=dropped,
            used=used,
            model_version=self.model_version,
            excluded=sorted({self._ids[r] for r in exclude}),
        )

    def _ann_top(self, emb: np.ndarray, need: int) -> tuple[np.ndarray, np.ndarray] | None:
        """``(scores, rows)`` of the ANN index's top-``need`` for one user, or ``None`` (no index, or it could not
        return ``need`` rows: hnswlib raises when its graph search finds fewer; the exact path answers then)."""
        if self._ann is None or need > self.n_items:
            return None
        try:
            scores, indices = self._ann.search(emb, need)
        except RuntimeError:
            return None
        return scores[0], indices[0]

    def _popular(self, k: int, dropped: list[str]) -> Recommendation:
        pop = self._popularity
        total = float(pop.sum()) or 1.0
        order = top_k(pop[None], k)[0][0]  # ties: catalogue order
        items = [
            RecommendedItem(self._ids[i], self._titles[i], float(pop[i] / total), rank, int(i))
            for rank, i in enumerate(order, start=1)
        ]
        return Recommendation(
            items=items, dropped=dropped, used=[], model_version=self.model_version, fallback="popularity"
        )


def bundle_metrics(
    rec: Recommender, histories: Sequence[Sequence[int]], targets: Any, batch_size: int = 256
) -> dict[str, float]:
    """Full-ranking metrics of a loaded bundle on (history, target) pairs of catalogue rows: every item scored by
    the exact cosine over the scorer's table (what ``recommend`` ranks by), accumulated as the evaluation loop
    does (:class:`laser_core.metrics.RankingAccumulator`; no history masking). Only the trained catalogue's rows
    (the first ``n_trained_items``) are ranked: items added after export (``laser items add``) are left out, so a
    stored version and a new candidate rank the same catalogue. The promotion gate re-scores a stored
    lexical-hybrid version with it."""
    from laser_core.metrics import RankingAccumulator

    acc = RankingAccumulator()
    targets = np.asarray(targets)
    table = rec.table()[: rec.n_trained_items]
    for lo in range(0, len(histories), batch_size):
        hist = [list(h) for h in histories[lo : lo + batch_size]]
        acc.add(l2_normalize(rec.user_embeddings(hist)) @ table.T, targets[lo : lo + batch_size])
    return acc.result()


# ----------------------------------------------------------------------------------------- catalogue
def _read_catalogue(path: Path, manifest: BundleManifest) -> pd.DataFrame:
    if not path.is_file():
        raise BundleError(f"{path} not found")
    cat = pd.read_parquet(path)
    missing = [c for c in ITEM_COLUMNS if c not in cat.columns]
    if missing:
        raise BundleError(f"{path}: missing column(s) {missing}")
    if len(cat) != manifest.n_items:
        raise BundleError(f"{path}: {len(cat)} rows, but the manifest says n_items={manifest.n_items}")
    for c in ITEM_COLUMNS:
        cat[c] = cat[c].fillna("").astype(str)
    cat = bound_item_texts(cat)  # a crafted catalogue's 1 MB title is cut as the exporter would have
    if cat["item_id"].duplicated().any():
        raise BundleError(
            f"{path}: duplicate item_id values {cat['item_id'][cat['item_id'].duplicated()].tolist()[:10]}"
        )
    return cat


def _load_ann_index(root: Path, manifest: BundleManifest, load: bool = True) -> Any | None:
    """The bundle's ANN index (:class:`laser_core.ann.AnnIndex`) or ``None`` (none in the bundle, or not
    ``load``). Its header must agree with the manifest (rows, width) even when it is not loaded."""
    from laser_core.ann import AnnError, AnnIndex, read_header

    entry = manifest.ann_index
    if entry is None:
        return None
    path = root / entry.file
    try:
        header = read_header(path)
        if (header["n_items"], header["dim"]) != (manifest.n_items, manifest.dim):
            raise AnnError(
                f"{path}: the ANN index holds {header['n_items']} items of width {header['dim']}, but the scorer's "
                f"table is [n_items, dim] = [{manifest.n_items}, {manifest.dim}]; rebuild it (laser index build)"
            )
        if not load:
            return None
        return AnnIndex.load(path, dim=manifest.dim, ef=entry.ef_search, n_items=manifest.n_items)
    except AnnError as exc:
        raise BundleError(str(exc)) from None


def _extend_ann_index(
    rec: Recommender, entry: AnnIndexSection, new_rows: np.ndarray, table: np.ndarray, out: Path
) -> AnnIndexSection:
    """``rec``'s ANN index plus ``new_rows`` (their labels continue the rows), its ef recalibrated over the new
    ``table`` when it was calibrated, saved to ``out``; returns the new manifest section."""
    from laser_core.ann import AnnIndex, calibrate_ef, index_entry, table_sha256

    index = rec._ann
    if index is None:  # loaded with exact=True: read it here
        index = AnnIndex.load(rec.bundle_dir / entry.file, dim=rec.manifest.dim, n_items=rec.n_items)
    index.add(new_rows)
    calibration = None
    if entry.calibration is not None:
        calibration = calibrate_ef(index, table, rec.manifest.k, target=entry.calibration.target_recall)
    else:
        index.ef = entry.ef_search
    index.save(out / entry.file)
    scorer_sha = table_sha256(out, rec.manifest.scorer.file)
    return index_entry(index, scorer_sha, calibration, entry.M, entry.ef_construction)


def read_items_file(path: str | Path) -> pd.DataFrame:
    """New items from ``.csv``, ``.parquet`` or ``.jsonl`` (one JSON object per line)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    if suffix == ".parquet":
        return pd.read_parquet(path)
    if suffix in (".jsonl", ".ndjson"):
        rows = []
        for n, line in enumerate(path.read_text(encoding="utf8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}, line {n}: malformed JSON ({exc.msg})") from exc
            if not isinstance(row, dict):
                raise ValueError(f"{path}, line {n}: expected a JSON object")
            rows.append(row)
        return pd.DataFrame(rows)
    raise ValueError(f"{path}: unsupported items file type {suffix!r} (use .csv, .parquet or .jsonl)")


def _clean_new_items(new_items: pd.DataFrame, catalogue: pd.DataFrame, source: str = "new_items") -> pd.DataFrame:
    from laser_core.data.model import normalize_text

    if not isinstance(new_items, pd.DataFrame):
        raise TypeError(f"{source} must be a pandas DataFrame")
    if len(new_items) == 0:
        raise ValueError(f"{source} is empty")
    missing = [c for c in ("item_id", "title") if c not in new_items.columns]
    if missing:
        raise ValueError(
            f"{source} lacks column(s) {missing} (needs item_id and title; brand and category are optional)"
        )
    out = pd.DataFrame({"item_id": [normalize_text(v) for v in new_items["item_id"]]})
    for c in ("title", "brand", "category"):
        out[c] = [normalize_text(v) for v in new_items[c]] if c in new_items.columns else ""
    out = bound_item_texts(out)  # before anything is tokenized: a 1 MB title is cut to the bound
    for c in ("item_id", "title"):
        empty = [int(i) for i in np.flatnonzero(out[c].to_numpy() == "")]
        if empty:
            raise ValueError(f"{source}: empty {c} in row(s) {empty[:10]}")
    dup = out["item_id"][out["item_id"].duplicated()].unique().tolist()
    if dup:
        raise ValueError(f"{source}: duplicate item_id value(s) {dup[:10]}")
    clash = sorted(set(out["item_id"]) & set(catalogue["item_id"]))
    if clash:
        raise ValueError(f"{source}: item_id value(s) already in the bundle's catalogue: {clash[:10]}")
    return out


def _lexical_new_rows(rec: Recommender, new: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """A lexical-hybrid bundle's rows for ``new`` items: ``(new scorer rows, the whole scorer table, the tower's
    whole text table, the norm bound)``. The text rows come from the item texts through the bundle's TF-IDF
    state, the ID side is the ID model's unknown-item vector, both centred as the trained rows were; when a new
    row is longer than the bound, the bound grows and every row is made again (exact: the raw rows are the
    table's times the old bound)."""
    from laser_core.hybrid import TfidfState, item_texts

    lex, root = rec.lexical, rec.bundle_dir
    try:
        state = TfidfState.load(root / lex.tfidf_dir)
    except ValueError as exc:
        raise BundleError(str(exc)) from None
    stats = read_lexical_item_side(root / lex.item_side)
    text = np.asarray(state.transform(item_texts(new, rec.text_config)), dtype=np.float32)
    if text.shape[1] != lex.text_dim:
        raise BundleError(
            f"{root / lex.tfidf_dir}: the TF-IDF state gives rows of width {text.shape[1]}, not {lex.text_dim}"
        )
    ids = np.broadcast_to(stats["unknown_id"] - stats["id_mean"], (len(new), lex.id_dim))
    raw_new = np.concatenate([ids, text - stats["text_mean"]], axis=1).astype(np.float64)
    old = rec.table()
    bound = lex.norm_bound
    longest = float(np.sqrt((raw_new**2).sum(axis=1)).max())
    if longest > bound:
        raw_old = old[:, :-1].astype(np.float64) * bound
        bound = longest
        table = augment_rows(np.concatenate([raw_old, raw_new]), bound)
        new_rows = table[len(old) :]
    else:
        new_rows = augment_rows(raw_new, bound)
        table = np.concatenate([old, new_rows], axis=0)
    text_table = np.concatenate([read_tower_text_table(root / rec.manifest.user_tower.file), text], axis=0)
    return new_rows, table, text_table, bound


def add_items(
    bundle_dir: str | Path,
    new_items: pd.DataFrame,
    out_dir: str | Path,
    batch_size: int = 16,
    progress: Callable[[int], None] | None = None,
) -> Path:
    """A new bundle in ``out_dir`` whose catalogue and scorer also hold ``new_items`` (item_id, title, brand,
    category), without retraining; ``bundle_dir`` is left untouched.

    Each new item is embedded by the exported user tower as a one-item history, as items are in training
    (:meth:`Recommender.item_embeddings`): the item template for the text, the item side's weights (those that
    made the table; a bundle without them warns, see :attr:`Recommender.cold_item_weights`) and, on the ID
    side, one visible cold-item position (``item_ids = -1``: the SR model's unknown-item vector, since a new
    item has no trained ID embedding; see ``laser_core.bundle.COLD_ITEM_TREATMENT``). New rows are appended
    after the existing ones. Duplicate ids (within ``new_items`` or against the catalogue) are a
    ``ValueError``. A bundle with an ANN index (``ann_index``) gets it extended by the new rows and its search
    breadth recalibrated (``laser_core.ann``). Item texts are cut to ``laser_core.bundle.bound_item_texts``'s
    bound before they are tokenized. ``progress(n)``: called after each embedded batch with its number of items
    (the CLI draws a progress bar with it; the library prints nothing)."""
    src = Path(bundle_dir)
    out = Path(out_dir)
    if out.resolve() == src.resolve():
        raise ValueError(f"out_dir {out} is the source bundle; add_items writes a new bundle")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty directory")
    rec = Recommender.load(src)
    rec._require_tower()
    new = _clean_new_items(new_items, rec.catalogue)
    weights = rec.cold_item_weights
    if weights == "user_side":
        warnings.warn(
            f"{src}: {COLD_ITEM_WEIGHTS[weights]}; re-export the model to add items as the table's rows were made",
            UserWarning,
            stacklevel=2,
        )
    manifest = rec.manifest
    update: dict[str, Any] = {}
    rebuild_index = False
    if rec.lexical is None:
        new_rows_table = l2_normalize(rec.item_embeddings(new, batch_size=batch_size, progress=progress))
        table = np.concatenate([rec.table(), new_rows_table], axis=0)
    else:
        new_rows_table, table, text_table, bound = _lexical_new_rows(rec, new)
        if progress is not None:
            progress(len(new))
        rebuild_index = bound != rec.lexical.norm_bound  # every row changed: the index is built again
        update["lexical"] = rec.lexical.model_copy(update={"norm_bound": bound})
    ann_entry = manifest.ann_index
    skip = {manifest.scorer.file, manifest.catalogue.file, *([ann_entry.file] if ann_entry else [])}
    if rec.lexical is not None:
        skip.add(manifest.user_tower.file)  # rewritten with the new items' text rows
    out.mkdir(parents=True, exist_ok=True)
    try:
        for name in manifest.files:
            if name in skip:
                continue
            (out / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / name, out / name)
        export_scorer(table, out / manifest.scorer.file, k=rec.k)
        if rec.lexical is not None:
            replace_tower_text_table(src / manifest.user_tower.file, out / manifest.user_tower.file, text_table)
        cat = rec.catalogue.copy()
        new_rows = new.copy()
        if "popularity" in cat.columns:
            new_rows["popularity"] = 0.0  # never seen in training
        cat = pd.concat([cat, new_rows[list(cat.columns)]], ignore_index=True)
        cat.to_parquet(out / manifest.catalogue.file, index=False)
        added = AddedItemsEntry(
            n=len(new), first_row=rec.n_items, item_weights=weights, source_manifest_sha256=sha256_file(src / MANIFEST)
        )
        update.update(n_items=len(cat), added_items=[*manifest.added_items, added])
        if ann_entry and not rebuild_index:
            update["ann_index"] = _extend_ann_index(rec, ann_entry, new_rows_table, table, out)
        elif ann_entry:
            update["ann_index"] = None
        write_manifest(out, manifest.model_copy(update=update))  # validated again there, files refilled
        if ann_entry and rebuild_index:
            from laser_core.ann import index_bundle

            cal = ann_entry.calibration
            index_bundle(
                out,
                M=ann_entry.M,
                ef_construction=ann_entry.ef_construction,
                target_recall=cal.target_recall if cal else 0.99,
                ef=None if cal else ann_entry.ef_search,
            )
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    return out
