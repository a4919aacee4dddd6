"""The lexical hybrid as a model (laser_core.lexical): one dot product equal to the z-scored blend, fitted on
validation only, exported as a bundle, served (exact and ANN), items added, and compared by the promotion gate."""

from __future__ import annotations

import numpy as np
import pytest

from laser_core.configuration import LexicalConfig
from laser_core.hybrid import TfidfConfig, blend, history_similarity, item_texts, tfidf_vectors
from laser_core.lexical import LexicalError, LexicalHybrid, fit_lexical_hybrid

DATA = {"n_users": 160, "n_items": 60, "n_user_types": 4, "seed": 7}
SR = dict(model="sasrec", hidden_size=16, max_len=4)
SR_TRAIN = dict(epochs=1, batch_size=64)
TFIDF = TfidfConfig(dim=12)


def _state(ds):
    rows, state = tfidf_vectors(item_texts(ds.items), TFIDF)
    return rows, state


def _histories(rng, n_items, n=25):
    return [rng.integers(0, n_items, size=int(rng.integers(1, 9))) for _ in range(n)]


@pytest.mark.parametrize("form", ["last", "decay5"])
@pytest.mark.parametrize("model", ["sasrec", "bert4rec"])
def test_one_dot_product_equals_the_z_scored_blend(data, form, model):
    """user_vectors . item_vectors == zscore(id) + gamma * zscore(sim) on random text rows and random
    histories (longer than the ID model's max_len and shorter than the decay window), for both ID models."""
    from tests.conftest import fit_sr

    ds, split = data
    sr = fit_sr(split, SR_TRAIN, **{**SR, "model": model})
    rng = np.random.default_rng(0)
    text = rng.standard_normal((ds.n_items, 9)).astype(np.float32)
    text[3] = 0.0  # an item without words: a zero text row
    gamma = 0.7
    hyb = LexicalHybrid(sr, text, form, gamma, _state(ds)[1])
    hist = _histories(rng, ds.n_items)
    got = hyb.score(hist).double().numpy()
    unit = hyb.text_table.numpy()
    want = blend(sr.score(hist).numpy(), history_similarity(unit, hist, form), gamma)
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)
    # the text side is not ignored: gamma = 0 gives other scores (the ID model's z-scores)
    alone = LexicalHybrid(sr, text, form, 0.0, _state(ds)[1]).score(hist).double().numpy()
    np.testing.assert_allclose(alone, blend(sr.score(hist).numpy(), 0 * want, 0.0), atol=2e-4, rtol=1e-4)
    assert np.abs(alone - got).max() > 0.1


class _NoTest:
    """A split whose test side raises when read: fitting must use validation only."""

    def __init__(self, split):
        self._split = split

    def __getattr__(self, name):
        if name in ("test_examples", "test_target"):
            raise AssertionError(f"the fit read split.{name}")
        return getattr(self._split, name)


def test_fit_chooses_on_validation_only_and_the_text_helps(data, sr):
    """fit_lexical_hybrid never reads the test side; it keeps the validation choice (a grid over forms and
    gammas, two TF-IDF settings) and its validation metric is at least the ID model's alone (gamma = 0)."""
    ds, split = data
    cfg = LexicalConfig(tfidf=[TfidfConfig(), TfidfConfig(analyzer="char_wb", ngram_min=3, ngram_max=4)], dim=12)
    hyb = fit_lexical_hybrid(sr, _NoTest(split), ds.items, cfg)
    assert hyb.form in cfg.forms and hyb.gamma in cfg.gammas
    assert len(hyb.grid) == 2 * len(cfg.forms) * len(cfg.gammas)
    alone = max(r["ndcg@10"] for r in hyb.grid if r["gamma"] == 0.0)
    assert hyb.valid["ndcg@10"] >= alone
    assert hyb.valid["ndcg@10"] == max(r["ndcg@10"] for r in hyb.grid)


def test_bad_settings_are_clear_errors(data, sr):
    from pydantic import ValidationError

    from tests.conftest import fit_sr

    ds, split = data
    with pytest.raises(ValidationError, match="lexical.gammas"):
        LexicalConfig(gammas=[0.1, -1.0])
    with pytest.raises(ValidationError, match="empty list"):
        LexicalConfig(tfidf=[])
    with pytest.raises(LexicalError, match=r"lexical.tfidf setting 0: .*dim = 5000"):
        fit_lexical_hybrid(sr, split, ds.items, LexicalConfig(dim=5000))
    gru = fit_sr(split, SR_TRAIN, model="gru4rec", hidden_size=8)
    with pytest.raises(LexicalError, match="sr.model"):
        fit_lexical_hybrid(gru, split, ds.items, LexicalConfig(dim=12))
