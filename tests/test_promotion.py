"""The promotion gate (laser_core.promotion.decide) on hand-made metric dicts: no ZenML, no training.

The case of the issue: `make demo` put a Laser with test NDCG@10 0.118 in production while popularity scored 0.145
and the frozen BERT4Rec 0.173 on the same 300 users. By default a version must now beat popularity to reach
production (the ID model optionally), and every decision says what it was compared with.
"""

from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from laser_core.promotion import PromotionConfig, PromotionDecision, decide

POP = {"ndcg@10": 0.145, "recall@10": 0.25}
BERT = {"ndcg@10": 0.173, "recall@10": 0.30}


def test_demo_case_stays_in_staging_with_what_it_was_compared_with():
    d = decide(
        PromotionConfig(), {"ndcg@10": 0.118}, popularity=POP, id_model=BERT, id_model_name="bert4rec", users=300
    )
    assert d.valid and d.stage == "staging" and d.beats_baselines is False
    assert "baseline gate" in d.reason and "does not beat popularity (0.1450)" in d.reason
    # what it was compared with: metric, users, each baseline, production
    for part in (
        "compared on ndcg@10 over the same 300 test users",
        "popularity 0.1450 (required)",
        "ID model bert4rec 0.1730",
        "production none",
        "0.1180",
    ):
        assert part in d.reason, d.reason
    assert (d.popularity_value, d.id_model_value, d.id_model, d.users) == (0.145, 0.173, "bert4rec", 300)
    assert d.details["required_baselines"] == ["popularity"]


def test_first_version_beating_popularity_goes_to_production():
    d = decide(PromotionConfig(), {"ndcg@10": 0.2}, popularity=POP, users=24)
    assert d.valid and d.beats_baselines and d.stage == "production"
    assert "no production version yet" in d.reason and "popularity 0.1450 (required)" in d.reason
    # equal to popularity is not better
    assert decide(PromotionConfig(), {"ndcg@10": 0.145}, popularity=POP).stage == "staging"


def test_id_model_is_an_option():
    new = {"ndcg@10": 0.16}  # beats popularity, below BERT4Rec
    assert decide(PromotionConfig(), new, popularity=POP, id_model=BERT).stage == "production"
    d = decide(
        PromotionConfig(require_beats_id_model=True),
        new,
        popularity=POP,
        id_model=BERT,
        id_model_name="bert4rec",
        users=300,
    )
    assert d.stage == "staging" and not d.beats_baselines
    assert "does not beat the ID model bert4rec (0.1730)" in d.reason and "popularity" not in d.reason.split("(")[0]
    assert d.details["required_baselines"] == ["popularity", "id_model"]
    both = decide(PromotionConfig(require_beats_id_model=True), {"ndcg@10": 0.1}, popularity=POP, id_model=BERT)
    assert "popularity (0.1450) nor the ID model (0.1730)" in both.reason
    # ID model only
    only = PromotionConfig(require_beats_popularity=False, require_beats_id_model=True)
    assert decide(only, {"ndcg@10": 0.18}, popularity=POP, id_model=BERT).stage == "production"


def test_required_baseline_not_scored_blocks_production():
    d = decide(PromotionConfig(), {"ndcg@10": 0.3})
    assert d.stage == "staging" and d.beats_baselines is False and "no score of popularity" in d.reason
    nan = decide(PromotionConfig(), {"ndcg@10": 0.3}, popularity={"ndcg@10": math.nan})
    assert nan.stage == "staging"
    idm = decide(PromotionConfig(require_beats_id_model=True), {"ndcg@10": 0.3}, popularity=POP)
    assert idm.stage == "staging" and "no score of the ID model" in idm.reason
    # switched off: the old behaviour (no baseline needed)
    off = decide(PromotionConfig(require_beats_popularity=False), {"ndcg@10": 0.3})
    assert off.stage == "production" and off.beats_baselines is None


def test_baseline_margin():
    assert decide(PromotionConfig(baseline_margin=0.01), {"ndcg@10": 0.15}, popularity=POP).stage == "staging"
    assert decide(PromotionConfig(baseline_margin=0.001), {"ndcg@10": 0.15}, popularity=POP).stage == "production"


def test_baselines_are_checked_against_production_too():
    """Better than a (weak) production version but not than popularity: stays in staging."""
    d = decide(PromotionConfig(), {"ndcg@10": 0.14}, {"ndcg@10": 0.12}, "4", popularity=POP, users=300)
    assert d.stage == "staging" and "production v4 0.1200" in d.reason and "popularity 0.1450" in d.reason


def test_gate_compares_with_production_by_margin():
    cfg = PromotionConfig(metric="ndcg@10", min_improvement=0.01)
    assert decide(cfg, {"ndcg@10": 0.215}, {"ndcg@10": 0.2}, "3", popularity=POP).stage == "production"  # +0.015
    staged = decide(cfg, {"ndcg@10": 0.205}, {"ndcg@10": 0.2}, "3", popularity=POP, users=24)  # +0.005
    assert staged.stage == "staging" and "v3" in staged.reason
    assert "ndcg@10 over the same 24 test users" in staged.reason
    # equal is not better: a retrained identical model stays in staging at the default margin 0
    assert decide(PromotionConfig(), {"ndcg@10": 0.2}, {"ndcg@10": 0.2}, "1", popularity=POP).stage == "staging"
    assert (
        decide(PromotionConfig(min_improvement=-0.1), {"ndcg@10": 0.15}, {"ndcg@10": 0.2}, "1", popularity=POP).stage
        == "production"
    )
    promoted = decide(
        PromotionConfig(),
        {"ndcg@10": 0.25},
        {"ndcg@10": 0.2},
        "7",
        popularity=POP,
        id_model=BERT,
        id_model_name="sasrec",
        users=50,
    )
    assert promoted.stage == "production" and "gain +0.0500" in promoted.reason
    assert "popularity 0.1450 (required), ID model sasrec 0.1730, production v7 0.2000" in promoted.reason


def test_gate_invalid_not_comparable_disabled():
    assert decide(PromotionConfig(), {"ndcg@10": math.nan}, popularity=POP).stage is None
    assert decide(PromotionConfig(), {"ndcg@10": 1.5}, popularity=POP).stage is None
    other = decide(PromotionConfig(), {"ndcg@10": 0.3}, None, "2", comparable=False, popularity=POP)
    assert other.stage == "staging" and "different catalogue" in other.reason and "not re-scorable" in other.reason
    off = decide(PromotionConfig(enabled=False), {"ndcg@10": 0.3}, popularity=POP)
    assert off.stage == "staging" and "disabled" in off.reason
    with pytest.raises(KeyError, match="recall@99"):
        decide(PromotionConfig(metric="recall@99"), {"ndcg@10": 0.1})
    with pytest.raises(ValidationError):
        PromotionConfig(require_beats_baseline=True)


def test_decision_round_trip_and_markdown():
    d = decide(
        PromotionConfig(), {"ndcg@10": 0.118}, popularity=POP, id_model=BERT, id_model_name="bert4rec", users=300
    )
    assert PromotionDecision.from_dict(d.to_dict()) == d
    # a decision stored before the baseline fields existed still loads
    old = {
        "metric": "ndcg@10",
        "new_value": 0.3,
        "production_value": None,
        "production_version": None,
        "popularity_value": 0.1,
        "valid": True,
        "comparable": True,
        "stage": "production",
        "reason": "r",
        "details": {},
    }
    assert PromotionDecision.from_dict(old).users is None
    md = d.to_markdown()
    for row in (
        "| test users | 300 |",
        "| popularity | 0.1450 |",
        "| ID model (bert4rec) | 0.1730 |",
        "| beats required baselines | False |",
        "| stage | staging |",
    ):
        assert row in md, md
