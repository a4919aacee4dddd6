"""laser_core.hybrid: the z-scored hybrid of an ID model and a text similarity, and its TF-IDF text side."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from pydantic import ValidationError

from laser_core.hybrid import (
    FORMS,
    GAMMAS,
    TFIDF_PRESETS,
    TfidfConfig,
    TfidfState,
    blend,
    choose_on_validation,
    history_similarity,
    hybrid_metrics,
    item_texts,
    tfidf_vectors,
    transform_table,
    user_text_vectors,
    whiten,
    zscore,
)

TEXTS = [
    "red apple pie (brand: Acme, category: Food)",
    "green apple juice (brand: Acme, category: Drinks)",
    "blue sky poster (brand: Artco, category: Decor)",
    "pie chart notebook (brand: Paper Co, category: Office)",
    "apple pie recipe book (brand: Paper Co, category: Books)",
    "sky blue paint (brand: Artco, category: Decor)",
]


def test_zscore_and_blend_by_hand():
    np.testing.assert_allclose(zscore([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0]]), [[-1, 0, 1], [0, 0, 0]])  # ddof 1
    ids, sim = [[1.0, 2.0, 3.0]], [[3.0, 2.0, 1.0]]
    np.testing.assert_allclose(blend(ids, sim, 0.5), [[-0.5, 0.0, 0.5]])
    np.testing.assert_allclose(blend(ids, sim, 0.0), [[-1.0, 0.0, 1.0]])
    np.testing.assert_allclose(blend(ids, sim, math.inf), [[1.0, 0.0, -1.0]])  # the text alone
    with pytest.raises(ValueError, match="gamma"):
        blend(ids, sim, -1.0)


def test_history_forms_weights_by_hand():
    unit = np.eye(6, dtype=np.float32)  # an item's vector is its one-hot: the user vector shows the weights
    hist = [[0, 1, 2, 3, 4, 5], [2, 2], [3]]
    last = user_text_vectors(unit, hist, "last")
    np.testing.assert_allclose(last, np.eye(6)[[5, 2, 3]])
    decay = user_text_vectors(unit, hist, "decay5")
    w = np.array([0, 1 / 16, 1 / 8, 1 / 4, 1 / 2, 1]) / (1 + 1 / 2 + 1 / 4 + 1 / 8 + 1 / 16)  # item 0 is 6th
    np.testing.assert_allclose(decay[0], w, rtol=1e-6)
    np.testing.assert_allclose(decay[1], np.eye(6)[2])  # a repeated item: (1 + 1/2) / (1 + 1/2)
    np.testing.assert_allclose(decay[2], np.eye(6)[3])
    np.testing.assert_allclose(history_similarity(unit, hist, "decay5"), decay)  # @ identity.T
    assert FORMS == ("last", "decay5") and GAMMAS[0] == 0.0
    with pytest.raises(ValueError, match="history form"):
        user_text_vectors(unit, hist, "mean")
    with pytest.raises(ValueError, match="history 0 is empty"):
        user_text_vectors(unit, [[]], "last")


def test_sparse_table_gives_the_dense_results():
    rows, _ = tfidf_vectors(TEXTS, TFIDF_PRESETS["word"])
    assert sp.issparse(rows)
    dense = rows.toarray()
    np.testing.assert_allclose(np.linalg.norm(dense, axis=1), 1.0, rtol=1e-6)
    hist = [[0, 4], [2], [1, 3, 5, 0, 2, 4]]
    for form in FORMS:
        users = user_text_vectors(rows, hist, form)
        assert sp.issparse(users)
        np.testing.assert_allclose(users.toarray(), user_text_vectors(dense, hist, form), atol=1e-6)
        np.testing.assert_allclose(
            history_similarity(rows, hist, form), history_similarity(dense, hist, form), atol=1e-6
        )
    np.testing.assert_allclose(transform_table(rows, "raw").toarray(), dense, atol=1e-6)
    with pytest.raises(ValueError, match="sparse table takes the 'raw' transform only"):
        transform_table(rows, "whitened")


def test_whitening_gives_identity_covariance_and_unit_rows():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 5)) @ rng.normal(size=(5, 5)) + 3.0  # correlated, off-centre
    w = whiten(x, eps=1e-12)
    np.testing.assert_allclose(w.mean(0), 0.0, atol=1e-9)
    np.testing.assert_allclose(w.T @ w / len(w), np.eye(5), atol=1e-6)
    for kind in ("raw", "centered", "whitened"):
        unit = transform_table(x, kind)
        assert unit.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(
        transform_table(x, "whitened", eps=1e-12), w / np.linalg.norm(w, axis=1, keepdims=True), atol=1e-4
    )
    with pytest.raises(ValueError, match="transform must be one of"):
        transform_table(x, "pca")


def _pairs_case(text_carries_target: bool, n_users: int = 300, n_items: int = 60):
    """Items in pairs (2k, 2k+1); a user's target is the partner of its last item. With
    ``text_carries_target`` the text table puts partners close together and the ID model is noise; else the
    text table is noise and the ID model ranks the target first."""
    rng = np.random.default_rng(1)
    last = rng.integers(0, n_items, size=n_users)
    targets = last ^ 1
    hist = [[int(x) for x in rng.integers(0, n_items, size=3)] + [int(v)] for v in last]
    ids = rng.normal(size=(n_users, n_items))
    if text_carries_target:
        base = rng.normal(size=(n_items // 2, 16))
        table = np.repeat(base, 2, axis=0) + 0.05 * rng.normal(size=(n_items, 16))
    else:
        ids[np.arange(n_users), targets] += 10.0
        table = rng.normal(size=(n_items, 16))
    return ids, {"t": transform_table(table, "raw")}, hist, targets


def test_choose_on_validation_keeps_the_id_model_when_the_text_is_noise():
    ids, tables, hist, targets = _pairs_case(text_carries_target=False)
    choice = choose_on_validation(ids, tables, hist, targets, batch_size=64)
    assert choice.gamma == 0.0  # ties (the ID model ranks every target first) go to the smallest gamma
    assert choice.valid["ndcg@10"] == pytest.approx(1.0)
    assert len(choice.grid) == len(GAMMAS) * len(FORMS) and choice.valid_users == len(targets)
    assert {"table", "form", "gamma", "ndcg@10", "recall@10", "mrr"} <= set(choice.grid[0])


def test_choose_on_validation_takes_the_text_when_it_carries_the_target():
    ids, tables, hist, targets = _pairs_case(text_carries_target=True)
    tables["noise"] = transform_table(np.random.default_rng(5).normal(size=(60, 16)), "raw")
    choice = choose_on_validation(ids, tables, hist, targets, gammas=(0.0, 0.5, 2.0, math.inf), batch_size=64)
    assert choice.table == "t" and choice.form == "last" and choice.gamma > 0
    id_alone = next(r for r in choice.grid if r["gamma"] == 0.0)
    assert choice.valid["ndcg@10"] > id_alone["ndcg@10"] + 0.2
    again = hybrid_metrics(ids, tables["t"], hist, targets, choice.form, choice.gamma, batch_size=7)
    assert again == pytest.approx(choice.valid)  # batching does not change the figures
    masked = hybrid_metrics(ids, tables["t"], hist, targets, "last", math.inf, mask_history=True)
    assert masked["ndcg@10"] > choice.valid["ndcg@10"]  # the last item itself (cosine 1) masked away


def test_tfidf_state_round_trip_reproduces_vectors_for_new_texts(tmp_path):
    new = ["apple sky notebook", "zebra", "red paint recipe (brand: Artco)"]
    for cfg in (TFIDF_PRESETS["word"], TfidfConfig(analyzer="char_wb", ngram_min=3, ngram_max=4, dim=3)):
        rows, state = tfidf_vectors(TEXTS, cfg, seed=3)
        if cfg.dim is None:
            np.testing.assert_allclose(state.transform(TEXTS).toarray(), rows.toarray(), atol=1e-6)
        else:
            assert isinstance(rows, np.ndarray) and rows.shape == (len(TEXTS), 3) and rows.dtype == np.float32
            np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 1.0, rtol=1e-5)
            np.testing.assert_allclose(state.transform(TEXTS), rows, atol=1e-5)
        d = state.save(tmp_path / cfg.analyzer)
        assert sorted(p.name for p in d.iterdir()) == ["tfidf.json", "tfidf.safetensors"]  # no pickle
        back = TfidfState.load(d)
        assert back.config == cfg and back.terms == state.terms and back.dim == state.dim
        a, b = state.transform(new), back.transform(new)
        a, b = (a.toarray(), b.toarray()) if sp.issparse(a) else (a, b)
        np.testing.assert_array_equal(a, b)
    _, again = tfidf_vectors(TEXTS, TfidfConfig(analyzer="char_wb", ngram_min=3, ngram_max=4, dim=3), seed=3)
    np.testing.assert_array_equal(again.components, state.components)  # seeded
    (tmp_path / "broken").mkdir()
    with pytest.raises(ValueError, match="not a readable TF-IDF state"):
        TfidfState.load(tmp_path / "broken")


def test_bad_tfidf_config_is_a_clear_error():
    with pytest.raises(ValidationError, match=r"ngram_min \(3\) must not exceed ngram_max \(2\)"):
        TfidfConfig(ngram_min=3, ngram_max=2)
    with pytest.raises(ValidationError, match="dim"):
        TfidfConfig(dim=0)
    with pytest.raises(ValidationError, match="analyzer"):
        TfidfConfig(analyzer="char")
    with pytest.raises(ValueError, match=r"dim = 500 must be below the vocabulary size"):
        tfidf_vectors(TEXTS, TfidfConfig(dim=500))


def test_item_texts_are_laser_item_descriptions():
    items = pd.DataFrame(
        {"title": ["Red pie", "Blue sky"], "brand": ["Acme", ""], "category": ["Food", ""]},
    )
    assert item_texts(items) == ["Red pie (brand: Acme, category: Food)", "Blue sky"]


def test_hybrid_imports_no_torch():
    import subprocess
    import sys

    code = "import sys, laser_core.hybrid; print('torch' in sys.modules)"
    assert (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
        == "False"
    )
