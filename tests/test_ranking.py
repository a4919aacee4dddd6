"""laser_core.ranking: the one top-k / history exclusion / popularity implementation (no torch)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from laser_core.metrics import target_ranks
from laser_core.ranking import masked_scores, popularity_counts, top_k


def test_top_k_orders_by_score_and_breaks_ties_by_index():
    scores = np.array([[0.1, 0.5, 0.5, 0.9, 0.5], [1.0, 1.0, 1.0, 1.0, 1.0]])
    idx, vals = top_k(scores, 3)
    assert idx.tolist() == [[3, 1, 2], [0, 1, 2]]
    assert vals.tolist() == [[0.9, 0.5, 0.5], [1.0, 1.0, 1.0]]
    # the same order as a stable full sort, for random ties
    rng = np.random.default_rng(0)
    many = rng.integers(0, 4, size=(20, 50)).astype(np.float32)
    for k in (1, 7, 50):
        assert (top_k(many, k)[0] == np.argsort(-many, axis=1, kind="stable")[:, :k]).all()


def test_top_k_excludes_history_and_nan_last():
    scores = np.array([[0.9, 0.8, np.nan, 0.7, 0.1]])
    idx, vals = top_k(scores, 3, exclude=[[0, 3]])
    assert idx.tolist() == [[1, 4, 0]] and vals[0, 2] == -np.inf  # excluded items score -inf: after the rest
    assert top_k(scores, 5, exclude=[[]])[0].tolist() == [[0, 1, 3, 4, 2]]
    with pytest.raises(ValueError, match="k must be"):
        top_k(scores, 6)
    with pytest.raises(ValueError, match="k must be"):
        top_k(scores, 0)
    with pytest.raises(ValueError, match="exclude has 2 rows"):
        top_k(scores, 1, exclude=[[0], [1]])


def test_masked_scores_is_what_the_metrics_rank():
    torch = pytest.importorskip("torch")
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.1]], dtype=torch.float64)
    s = masked_scores(scores, [[0, 1]])
    assert s.dtype == np.float64 and s.tolist() == [[-np.inf, -np.inf, 0.7, 0.1]] and scores[0, 0] == 0.9
    assert [a.tolist() for a in target_ranks(scores, [2], exclude=[[0, 1]])] == [[0], [0]]
    # top_k's first item is the target exactly when the metrics rank the target first, without ties
    assert top_k(scores, 1, exclude=[[0, 1]])[0].tolist() == [[2]]
    assert masked_scores(scores.to(torch.bfloat16)).dtype == np.float64


def test_popularity_counts():
    counts = popularity_counts([np.array([0, 2, 2]), [3], []], 5)
    assert counts.dtype == np.float64 and counts.tolist() == [1, 0, 2, 1, 0]
    with pytest.raises(ValueError, match="outside 0..4"):
        popularity_counts([[5]], 5)
    with pytest.raises(ValueError, match="outside 0..4"):
        popularity_counts([[-1]], 5)


def test_popularity_baseline_and_bundle_counts_are_one_implementation():
    torch = pytest.importorskip("torch")
    from laser_core.export import popularity_from_sequences
    from laser_core.sr import SRConfig
    from laser_core.sr.popularity import Popularity

    seqs = [np.array([1, 2, 2]), np.array([4, 2])]
    model = Popularity(SRConfig(model="popularity"), 6).fit(seqs)
    assert popularity_from_sequences is popularity_counts
    assert model.counts.tolist() == popularity_counts(seqs, 6).tolist()
    assert model.score([[1]]).shape == torch.Size([1, 6])


def test_ranking_does_not_import_torch():
    code = "import sys, laser_core.ranking, laser_core.metrics; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
