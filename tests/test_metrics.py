"""Metrics against hand-computed arrays, ties included."""

import math

import numpy as np
import pytest

from laser_core.metrics import RankingAccumulator, compute_metrics, rank_metrics, target_ranks


def test_distinct_scores_hand_computed():
    scores = np.array(
        [
            [0.9, 0.1, 0.5, 0.3],  # target 2 -> rank 2
            [0.2, 0.8, 0.1, 0.4],  # target 1 -> rank 1
            [0.1, 0.2, 0.3, 0.4],  # target 0 -> rank 4
        ]
    )
    targets = [2, 1, 0]
    m = compute_metrics(scores, targets, ks=(1, 2, 3))
    assert m["recall@1"] == pytest.approx(1 / 3)
    assert m["recall@2"] == pytest.approx(2 / 3)
    assert m["recall@3"] == pytest.approx(2 / 3)
    assert m["ndcg@2"] == pytest.approx((1 / math.log2(3) + 1.0) / 3)
    assert m["mrr"] == pytest.approx((1 / 2 + 1 + 1 / 4) / 3)
    assert m["mrr@3"] == pytest.approx((1 / 2 + 1) / 3)
    assert m["mrr@1"] == pytest.approx(1 / 3)


def test_ties_expected_pessimistic_optimistic():
    # target 0 ties with 2 other items, one item above: rank uniform on {2, 3, 4}
    scores = np.array([[0.5, 0.9, 0.5, 0.5, 0.1]])
    g, e = target_ranks(scores, [0])
    assert (g[0], e[0]) == (1, 2)
    exp = rank_metrics(g, e, ks=(2, 3), ties="expected")
    assert exp["recall@2"][0] == pytest.approx(1 / 3)
    assert exp["recall@3"][0] == pytest.approx(2 / 3)
    assert exp["ndcg@3"][0] == pytest.approx((1 / math.log2(3) + 1 / math.log2(4)) / 3)
    assert exp["mrr"][0] == pytest.approx((1 / 2 + 1 / 3 + 1 / 4) / 3)
    assert exp["mrr@3"][0] == pytest.approx((1 / 2 + 1 / 3) / 3)
    pes = rank_metrics(g, e, ks=(3,), ties="pessimistic")
    assert pes["recall@3"][0] == 0.0 and pes["mrr"][0] == pytest.approx(1 / 4)
    opt = rank_metrics(g, e, ks=(3,), ties="optimistic")
    assert opt["recall@3"][0] == 1.0 and opt["mrr"][0] == pytest.approx(1 / 2)


def test_constant_scorer_gets_chance_level_not_perfect():
    n = 100
    m = compute_metrics(np.zeros((3, n)), [0, 5, 99], ks=(10,))
    assert m["recall@10"] == pytest.approx(10 / n)
    assert m["mrr"] == pytest.approx(sum(1 / r for r in range(1, n + 1)) / n)


def test_history_masking_is_opt_in():
    scores = np.array([[0.9, 0.8, 0.7, 0.1]])
    assert compute_metrics(scores, [2], ks=(1,))["mrr"] == pytest.approx(1 / 3)
    masked = compute_metrics(scores, [2], ks=(1,), exclude=[[0, 1]])
    assert masked["recall@1"] == 1.0 and masked["mrr"] == 1.0
    # a target inside the masked history ranks last
    assert compute_metrics(scores, [0], ks=(1,), exclude=[[0]])["mrr"] == pytest.approx(1 / 4)


def test_accumulator_equals_one_shot_and_accepts_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(50, 30))
    targets = rng.integers(0, 30, size=50)
    acc = RankingAccumulator(ks=(5, 10))
    for lo in range(0, 50, 16):
        acc.add(torch.tensor(scores[lo : lo + 16]), torch.tensor(targets[lo : lo + 16]))
    one = compute_metrics(scores, targets, ks=(5, 10))
    assert acc.count == 50
    assert acc.result() == pytest.approx(one)


def test_nan_scores_rank_last_and_bad_input_errors():
    scores = np.array([[np.nan, 0.2, 0.1]])
    assert compute_metrics(scores, [1], ks=(1,))["recall@1"] == 1.0
    with pytest.raises(ValueError, match="targets must lie"):
        compute_metrics(scores, [3])
    with pytest.raises(ValueError, match="2-D"):
        compute_metrics(np.zeros(3), [0])
    with pytest.raises(ValueError, match="no rows"):
        RankingAccumulator().result()
