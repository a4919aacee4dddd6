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


def test_the_z_score_divides_by_the_sample_std(hybrid):
    """The z-score divides by the sample standard deviation (ddof 1, as laser_core.hybrid.zscore): each user's
    divisor is the ddof-1 std of their raw scores."""
    import torch

    from laser_core.score_stats import per_user_sd

    users = torch.randn(3, hybrid.id_dim)
    raw = (users @ hybrid.id_rows.T).double().numpy()
    np.testing.assert_allclose(per_user_sd(users, hybrid.id_cov)[:, 0].numpy(), raw.std(axis=1, ddof=1), rtol=1e-4)


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


def test_validation_is_scored_in_batches_of_the_given_size(data, sr, monkeypatch):
    """fit_lexical_hybrid scores the validation users batch_size at a time (a spy on the ID model's score records
    each call's users), never all at once, and fits exactly what one forward over all of them fits."""
    from laser_core.lexical import batched_scores

    ds, split = data
    cfg = LexicalConfig(dim=12, gammas=[0.0, 0.5, 1.0])
    whole = fit_lexical_hybrid(sr, split, ds.items, cfg, batch_size=10**6)
    n_users = len(split.valid_examples()[1])
    score, calls = type(sr).score, []

    def spy(self, histories):
        calls.append(len(histories))
        return score(self, histories)

    monkeypatch.setattr(type(sr), "score", spy)
    batched = fit_lexical_hybrid(sr, split, ds.items, cfg, batch_size=7)
    assert n_users > 7 and max(calls) == 7 and sum(calls) == n_users
    assert (batched.form, batched.gamma) == (whole.form, whole.gamma)  # metrics: up to summation order
    assert batched.valid == pytest.approx(whole.valid, rel=1e-12)
    numbers = lambda grid: [{k: v for k, v in r.items() if not isinstance(v, str)} for r in grid]  # noqa: E731
    assert [(r["table"], r["form"]) for r in batched.grid] == [(r["table"], r["form"]) for r in whole.grid]
    assert numbers(batched.grid) == [pytest.approx(r, rel=1e-12) for r in numbers(whole.grid)]
    hist = split.valid_examples()[1]
    np.testing.assert_allclose(batched_scores(sr, hist, 7), score(sr, hist).numpy(), rtol=1e-5, atol=1e-6)


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


def test_token_limits_of_the_dataset_configs_fit_export_and_add_items(data, sr, tmp_path):
    """configs/layers/cpu.yaml's text settings (title/category token limits, as every dataset config has): the
    hybrid, which has no tokenizer, reads the descriptions without the token limits (character limits kept),
    its manifest says so, and `items add` on its bundle describes new items the same way."""
    from pathlib import Path

    import pandas as pd
    import yaml

    from laser_core.bundle import load_manifest
    from laser_core.data.text import TextConfig
    from laser_core.export import export_lexical_bundle
    from laser_core.lexical import lexical_text
    from laser_core.serving import add_items

    ds, split = data
    layer = yaml.safe_load((Path(__file__).parents[1] / "configs/layers/cpu.yaml").read_text())
    text = TextConfig(**layer["text"], title_max_chars=30)
    assert text.title_max_tokens is not None and text.category_max_tokens is not None
    hyb = fit_lexical_hybrid(sr, split, ds.items, LexicalConfig(dim=12, gammas=[0.0, 1.0]), text)
    want = text.model_copy(update={"title_max_tokens": None, "category_max_tokens": None})
    assert hyb.text_config == lexical_text(text) == want and hyb.text_config.title_max_chars == 30
    out = export_lexical_bundle(hyb, ds.items, tmp_path / "b", k=K)
    assert load_manifest(out).text == want
    new = pd.DataFrame({"item_id": ["n1"], "title": ["Digital Caliper " * 5], "brand": ["B"], "category": ["C"]})
    added = add_items(out, new, tmp_path / "added")
    assert load_manifest(added).n_items == ds.n_items + 1


# ----------------------------------------------------------------------------------------- the bundle
K = 5


@pytest.fixture(scope="module")
def hybrid(data, sr):
    """A hybrid whose text side matters (gamma 1, decay form) over the module's data."""
    ds, _ = data
    rows, state = _state(ds)
    return LexicalHybrid(sr, rows, "decay5", 1.0, state, valid={"ndcg@10": 0.5})


@pytest.fixture(scope="module")
def bundle(hybrid, data, tmp_path_factory):
    from laser_core.export import export_lexical_bundle
    from laser_core.ranking import popularity_counts

    ds, split = data
    out = tmp_path_factory.mktemp("lexical") / "bundle"
    pop = popularity_counts(split.train, split.n_items)
    return export_lexical_bundle(hybrid, ds.items, out, k=K, metadata={"model_version": "lex:1"}, popularity=pop)


def _same_top(hybrid, hist, rows, k):
    """``rows`` are the torch hybrid's top-``k`` for ``hist``: the same rows, or (float noise between ONNX and
    torch) rows with the same scores where two items tie within 1e-5."""
    scores = hybrid.score([hist])[0].double().numpy()
    want = np.argsort(-scores, kind="stable")[:k]
    assert len(rows) == k
    if list(rows) != list(want):
        np.testing.assert_allclose(scores[rows], scores[want], atol=1e-5 * max(1.0, np.abs(scores).max()))
    return True


@pytest.mark.parametrize("ann", [False, True])
def test_bundle_round_trip_serves_the_hybrids_top_k(hybrid, bundle, data, ann, tmp_path):
    """export -> Recommender: the top-k (the scorer's k, and more through the full table) are the torch
    hybrid's, with the exact scorer and with the ANN index; the manifest says the model kind."""
    from laser_core.bundle import load_manifest
    from laser_core.serving import Recommender

    ds, split = data
    path = bundle
    if ann:
        pytest.importorskip("hnswlib")
        import shutil

        from laser_core.ann import index_bundle

        path = tmp_path / "ann"
        shutil.copytree(bundle, path)
        index_bundle(path, ef=ds.n_items)  # as broad as the catalogue: the approximate search finds every row
    manifest = load_manifest(path)
    assert manifest.model_kind == "lexical_hybrid" and manifest.lexical.form == "decay5"
    rec = Recommender.load(path)
    assert rec.scoring == ("ann" if ann else "exact") and rec.cold_item_weights == "lexical"
    ids = ds.items["item_id"].tolist()
    _, hists, _ = split.test_examples()
    for hist in hists[:12]:
        got = rec.recommend([ids[i] for i in hist])
        assert _same_top(hybrid, hist, [it.row for it in got.items], K)
        more = rec.recommend([ids[i] for i in hist], k=12)
        assert _same_top(hybrid, hist, [it.row for it in more.items], 12)


def test_laser_bundles_are_written_without_the_lexical_fields(bundle):
    """A Laser manifest has no model_kind/lexical keys (older format-2 readers read it); a lexical one has both."""
    import json

    from laser_core.bundle import MANIFEST, validate_manifest

    raw = json.loads((bundle / MANIFEST).read_text())
    assert raw["model_kind"] == "lexical_hybrid" and raw["lexical"]["gamma"] == 1.0
    assert raw["tokenizer"] is None and raw["backbone"] is None
    laserish = {**raw, "model_kind": "laser"}
    with pytest.raises(Exception, match="lexical"):
        validate_manifest(laserish)
    broken = {**raw, "user_tower": {**raw["user_tower"], "inputs": ["item_ids"]}}
    with pytest.raises(Exception, match="user_tower.inputs"):
        validate_manifest(broken)


@pytest.mark.parametrize("ann", [False, True])
def test_items_add_embeds_new_items_from_their_words(bundle, data, ann, tmp_path):
    """A new item that repeats the words of a user's last item ranks above one with words no item has; both
    are served from the new bundle (its tower reads the new rows' text too), whose checks pass (hashes, the
    text table's shape); with an ANN index it is extended or rebuilt."""
    import pandas as pd

    from laser_core.bundle import load_manifest
    from laser_core.serving import Recommender, add_items

    ds, split = data
    src = bundle
    if ann:
        pytest.importorskip("hnswlib")
        import shutil

        from laser_core.ann import index_bundle

        src = tmp_path / "ann"
        shutil.copytree(bundle, src)
        index_bundle(src, ef=ds.n_items)
    _, hists, _ = split.test_examples()
    hist = list(hists[0])
    last = ds.items.iloc[hist[-1]]
    new = pd.DataFrame(
        {
            "item_id": ["new-match", "new-other"],
            "title": [last["title"], "Zzyzx Quux Frobnicator"],
            "brand": [last["brand"], "Blorp"],
            "category": [last["category"], "Nowhere"],
        }
    )
    out = add_items(src, new, tmp_path / "added")
    manifest = load_manifest(out)
    assert manifest.n_items == ds.n_items + 2 and manifest.added_items[0].item_weights == "lexical"
    rec = Recommender.load(out)  # every hash and the tower's text table checked
    ids = ds.items["item_id"].tolist()
    ranked = [it.item_id for it in rec.recommend([ids[i] for i in hist], k=rec.n_items).items]
    assert ranked.index("new-match") < ranked.index("new-other")
    # a history holding a new item reads its words (the tower's text table has its row): the text side differs
    users = rec.user_embeddings([[ds.n_items], [ds.n_items + 1]])
    lex = manifest.lexical
    text = slice(lex.id_dim, lex.id_dim + lex.text_dim)
    assert np.abs(users[0, text] - users[1, text]).max() > 0.1
    assert rec.recommend(["new-match"]).used == ["new-match"]
    assert (rec.scoring == "ann") == ann


def test_rescoring_a_bundle_ranks_only_its_trained_catalogue(bundle, data, tmp_path):
    """bundle_metrics (the gate's re-score of a lexical production version) ranks the trained catalogue only:
    after `items add` of look-alikes of every item (which outrank many targets when ranked), the version scores
    what it scored at export, as a candidate over the same catalogue would."""

    from laser_core.serving import Recommender, add_items, bundle_metrics

    ds, split = data
    _, hist, targets = split.test_examples()
    before = bundle_metrics(Recommender.load(bundle), hist, targets)
    twins = ds.items.assign(item_id=[f"twin-{i}" for i in ds.items["item_id"]])
    added = Recommender.load(add_items(bundle, twins, tmp_path / "added"))
    assert added.n_items == 2 * ds.n_items and added.n_trained_items == ds.n_items
    assert bundle_metrics(added, hist, targets) == pytest.approx(before, abs=1e-9)
    # what ranking the added rows too would give: other figures
    ranked = added.user_embeddings([list(h) for h in hist]) @ added.table().T
    assert (ranked[:, ds.n_items :].max(1) > ranked[np.arange(len(targets)), targets]).any()


def test_a_lexical_bundle_missing_its_tfidf_state_is_refused(bundle, tmp_path):
    import shutil

    from laser_core.bundle import BundleError
    from laser_core.serving import Recommender

    broken = tmp_path / "b"
    shutil.copytree(bundle, broken)
    for f in (broken / "lexical" / "tfidf").iterdir():
        f.unlink()
    with pytest.raises(BundleError, match="lexical/tfidf"):
        Recommender.load(broken)


# ------------------------------------------------------------------------------ the gate and the pipeline
def test_the_gate_promotes_the_better_of_laser_and_the_hybrid_and_says_by_how_much():
    from laser_core.promotion import PromotionConfig, choose_model, decide

    base = dict(popularity={"ndcg@10": 0.02}, id_model={"ndcg@10": 0.09}, id_model_name="sasrec", users=100)
    both = {"laser": {"ndcg@10": 0.1014}, "lexical_hybrid": {"ndcg@10": 0.1054}}
    valid = {"laser": {"ndcg@10": 0.1100}, "lexical_hybrid": {"ndcg@10": 0.1200}}
    d = decide(PromotionConfig(), {"ndcg@10": 0.0}, candidates=both, validation=valid, **base)
    assert d.model == "lexical_hybrid" and d.new_value == 0.1054 and d.stage == "production"
    assert d.candidates == {"laser": 0.1014, "lexical_hybrid": 0.1054}
    assert d.validation == {"laser": 0.11, "lexical_hybrid": 0.12}
    assert d.reason.startswith("lexical_hybrid beats laser on validation ndcg@10: 0.1200 vs 0.1100 (+0.0100, +9.1 %)")
    assert "chosen on validation; on the same test pairs laser 0.1014, lexical_hybrid 0.1054" in d.reason
    assert "model served | lexical_hybrid" in d.to_markdown()
    assert "candidate laser (validation, chosen on) | 0.1100" in d.to_markdown()
    # Laser wins when it is better on validation; a tie goes to Laser
    d = decide(PromotionConfig(), {}, candidates=both, validation={**valid, "laser": {"ndcg@10": 0.2}}, **base)
    assert d.model == "laser" and d.new_value == 0.1014 and "laser beats lexical_hybrid" in d.reason
    tie = {"laser": {"ndcg@10": 0.1}, "lexical_hybrid": {"ndcg@10": 0.1}}
    assert choose_model("ndcg@10", both, tie).model == "laser"
    # the winner still goes through the gate on its TEST figure: below the ID model it stays in staging
    gate = PromotionConfig(require_beats_id_model=True)
    d = decide(
        gate, {}, candidates={"laser": {"ndcg@10": 0.05}, "lexical_hybrid": {"ndcg@10": 0.08}}, validation=valid, **base
    )
    assert d.model == "lexical_hybrid" and d.stage == "staging" and "does not beat" in d.reason
    # two models and no validation figures: refused, not chosen on the test pairs
    with pytest.raises(ValueError, match="validation"):
        choose_model("ndcg@10", both)


def test_the_choice_between_models_is_made_on_validation_not_on_test():
    """Validation and test disagree: Laser is better on validation, the hybrid on test. The version serves Laser
    and the gate judges Laser's test figure (choosing on test would pick the maximum of two noisy test figures);
    a model without a validation figure loses to one with it."""
    from laser_core.promotion import PromotionConfig, choose_model, decide

    test = {"laser": {"ndcg@10": 0.10}, "lexical_hybrid": {"ndcg@10": 0.13}}
    valid = {"laser": {"ndcg@10": 0.12}, "lexical_hybrid": {"ndcg@10": 0.11}}
    choice = choose_model("ndcg@10", test, valid)
    assert choice.model == "laser" and choice.values == {"laser": 0.10, "lexical_hybrid": 0.13}
    assert choice.valid == {"laser": 0.12, "lexical_hybrid": 0.11}
    d = decide(PromotionConfig(), {}, candidates=test, validation=valid, popularity={"ndcg@10": 0.01}, users=10)
    assert d.model == "laser" and d.new_value == 0.10 and d.stage == "production"
    assert d.reason.startswith("laser beats lexical_hybrid on validation ndcg@10: 0.1200 vs 0.1100")
    assert choose_model("ndcg@10", test, {"laser": {}, "lexical_hybrid": {"ndcg@10": 0.01}}).model == "lexical_hybrid"


def test_pipeline_fits_exports_and_gates_the_lexical_hybrid(zenml_store, data):
    """pipeline.models [lexical_hybrid]: no Laser step runs; fit_lexical scores the hybrid on the same test pairs
    (all test users here) with the one loop, the version's bundle is the hybrid's, the gate decides on it."""
    from zenml.client import Client

    from laser_core.config import LaserConfig
    from laser_core.serving import Recommender
    from pipelines.run import run_training

    cfg = LaserConfig.model_validate(
        {
            "dataset": {"format": "synthetic", "synthetic": DATA},
            "validation": {"min_sequence_length": 3, "max_sequence_length": 50},
            "sr": SR,
            "sr_train": {**SR_TRAIN, "progress": False},
            "lexical": {"dim": 12, "gammas": [0.0, 0.5, 1.0]},
            "model": {"name": "laser-lexical"},
            "export": {"k": K},
            "pipeline": {"models": ["lexical_hybrid"]},
        }
    )
    run = Client().get_pipeline_run(run_training(cfg).id)
    assert {n: s.status.value for n, s in run.steps.items()} == {
        **{s: "completed" for s in ("load_dataset", "validate_dataset", "split_dataset", "pretrain_sr")},
        **{s: "completed" for s in ("evaluate_sr", "fit_lexical", "export_scorer", "promote")},
    }
    report = run.steps["fit_lexical"].outputs["lexical_metrics"][0].load()
    ds, split = data
    assert report.protocol["users"] == len(split.eval_users) and 0 < report.metrics["ndcg@10"] <= 1
    bundle = run.steps["export_scorer"].outputs["scorer_bundle"][0].load()
    assert bundle.manifest.model_kind == "lexical_hybrid"
    assert bundle.manifest.metadata["model_version"].startswith("laser-lexical:")
    decision = run.steps["promote"].outputs["promotion_decision"][0].load()
    assert decision.model == "lexical_hybrid" and decision.new_value == report.metrics["ndcg@10"]
    # the stored bundle scores what the torch hybrid scored on the same pairs
    from laser_core.serving import bundle_metrics
    from laser_core.train import LaserTrainConfig, test_examples

    hist, targets = test_examples(split, LaserTrainConfig())
    got = bundle_metrics(Recommender.load(bundle.path), hist, targets)
    assert abs(got["ndcg@10"] - report.metrics["ndcg@10"]) < 1e-3
    # a version without Laser can be staged by hand, and batch recommendations come from its bundle
    from laser_cli.registry import _servable
    from pipelines.run import run_batch

    version = Client().get_model_version("laser-lexical", decision.details["new_version"])
    assert decision.stage == "production" and _servable(version) == []
    cfg.batch.k = 3
    batch = Client().get_pipeline_run(run_batch(cfg).id).steps["batch_recommend"].outputs["recommendations"][0]
    frame = batch.load()
    assert frame["user_id"].nunique() == ds.n_users and len(frame) == 3 * ds.n_users
    # the next run re-scores the production version (a lexical one) through its bundle on the same pairs
    again = Client().get_pipeline_run(run_training(cfg).id)
    d2 = again.steps["promote"].outputs["promotion_decision"][0].load()
    assert d2.comparable and d2.production_version == version.name
    assert d2.production_value == pytest.approx(report.metrics["ndcg@10"], abs=1e-3) and d2.stage == "staging"


def test_cli_and_http_service_serve_a_lexical_bundle(bundle, data, tmp_path):
    """`laser recommend`, `laser items add` and the HTTP service work on a lexical bundle as on Laser's."""
    import json
    import time

    import pandas as pd
    from click.testing import CliRunner
    from fastapi.testclient import TestClient

    from laser_cli.main import cli
    from laser_core.service import create_app
    from laser_core.serving import Recommender

    ds, split = data
    ids = ds.items["item_id"].tolist()
    hist = [ids[i] for i in split.test_examples()[1][0]]
    runner = CliRunner()
    res = runner.invoke(
        cli, ["recommend", "--bundle", str(bundle), "--json", *sum((["--history", h] for h in hist), [])]
    )
    assert res.exit_code == 0, res.output
    served = json.loads(res.output)
    assert served["model_version"] == "lex:1" and len(served["items"]) == K
    new = tmp_path / "new.csv"
    pd.DataFrame({"item_id": ["n1"], "title": ["Digital Caliper"]}).to_csv(new, index=False)
    res = runner.invoke(
        cli, ["items", "add", "--bundle", str(bundle), "--items", str(new), "--out", str(tmp_path / "o")]
    )
    assert res.exit_code == 0 and f"now holds {ds.n_items + 1} items" in res.output, res.output
    with TestClient(create_app(Recommender.load(bundle)), raise_server_exceptions=False) as client:
        for _ in range(200):
            if client.get("/ready").status_code == 200:
                break
            time.sleep(0.05)
        resp = client.post("/recommend", json={"history": hist, "k": K})
        assert resp.status_code == 200, resp.text
        assert [it["item_id"] for it in resp.json()["items"]] == [it["item_id"] for it in served["items"]]


def test_pipeline_with_laser_and_the_hybrid_serves_the_better_one(zenml_store, capsys):
    """pipeline.models [laser, lexical_hybrid]: both are scored on the same test pairs; the version's bundle is
    the better one's, and the decision names the winner, both values and the difference."""
    from zenml.client import Client

    from laser_cli.main import _print_results
    from laser_core.config import LaserConfig
    from pipelines.run import run_training
    from tests.test_pipeline import TINY_LASER

    cfg = LaserConfig.model_validate(
        {
            "dataset": {"format": "synthetic", "synthetic": DATA},
            "validation": {"min_sequence_length": 3, "max_sequence_length": 50},
            "sr": SR,
            "sr_train": {**SR_TRAIN, "progress": False},
            **TINY_LASER,
            "lexical": {"dim": 12, "gammas": [0.0, 0.5, 1.0]},
            "model": {"name": "laser-both"},
            "export": {"k": K},
            "pipeline": {"models": ["laser", "lexical_hybrid"]},
        }
    )
    run = Client().get_pipeline_run(run_training(cfg).id)
    steps = run.steps
    assert {n: s.status.value for n, s in steps.items()}["fit_lexical"] == "completed"
    laser = steps["evaluate_laser"].outputs["laser_metrics"][0].load()
    lexical = steps["fit_lexical"].outputs["lexical_metrics"][0].load()
    assert laser.protocol["users"] == lexical.protocol["users"] == 32  # the same test pairs
    decision = steps["promote"].outputs["promotion_decision"][0].load()
    # chosen on validation: Laser's best stage-2 epoch's, the hybrid's fit's (test figures reported only)
    laser_valid = steps["bi_tune_stage2"].outputs["laser_model"][0].load().summary["best_valid"]["ndcg@10"]
    valid = {"laser": laser_valid, "lexical_hybrid": lexical.details["valid"]["ndcg@10"]}
    assert laser.details["valid"]["ndcg@10"] == laser_valid and decision.validation == valid
    winner = "lexical_hybrid" if valid["lexical_hybrid"] > valid["laser"] else "laser"
    assert decision.model == winner
    assert decision.candidates == {"laser": laser.metrics["ndcg@10"], "lexical_hybrid": lexical.metrics["ndcg@10"]}
    loser = "laser" if winner == "lexical_hybrid" else "lexical_hybrid"
    assert decision.reason.startswith(f"{winner} ") and f" {loser} on validation ndcg@10: " in decision.reason
    bundle = steps["export_scorer"].outputs["scorer_bundle"][0].load()
    assert bundle.manifest.model_kind == winner
    capsys.readouterr()
    _print_results(run)
    rows = [line.split()[0] for line in capsys.readouterr().out.splitlines()[2:]]
    assert rows == ["laser", "lexical", "sasrec", "popularity"]


def test_loading_checks_the_lexical_files_against_the_manifest(bundle, tmp_path):
    """check_loaded: item-side statistics of another width are refused, even with matching hashes."""
    import shutil

    from safetensors.numpy import load_file, save_file

    from laser_core.bundle import BundleError, load_manifest, write_manifest
    from laser_core.serving import Recommender

    broken = tmp_path / "b"
    shutil.copytree(bundle, broken)
    manifest = load_manifest(broken)
    stats = load_file(str(broken / manifest.lexical.item_side))
    stats["text_mean"] = stats["text_mean"][:-1].copy()
    save_file(stats, str(broken / manifest.lexical.item_side))
    write_manifest(broken, manifest)  # the hashes agree: only the loaded contents can tell
    with pytest.raises(BundleError, match="'text_mean' has shape"):
        Recommender.load(broken)
