"""The switches beyond the paper (issue "Laser that earns its LLM"): the ID models' dot-product sides, the prefix
scale at initialisation, the centering/whitening of embeddings, and the fusion with the ID model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import fit_sr, tiny_spec

from laser_core.losses import cosine_scores
from laser_core.model import LaserSpec, build_laser

# the data set of the `data` fixture (tests/conftest.py); the ID model: each of SASRec and BERT4Rec
DATA = {"n_users": 300, "n_items": 60, "n_user_types": 4, "seed": 3}
SR = dict(hidden_size=16, dropout=0.1, attn_dropout=0.1)
SR_TRAIN = dict(epochs=3, batch_size=64, lr=3e-3)


@pytest.fixture(scope="module", params=["sasrec", "bert4rec"])
def sr(request, data):
    return fit_sr(data[1], SR_TRAIN, model=request.param, **SR).eval()


def make(data, sr, **bitune):
    return build_laser(tiny_spec(quant="none", **bitune), data[0].items, sr)


def test_sr_user_and_item_vectors_reproduce_full_sort_predict(data, sr):
    _, split = data
    hists = [split.train[u][:k] for u, k in [(0, 1), (1, 3), (2, 40), (5, 7)] if len(split.train[u]) >= 1]
    model = make(data, sr, fusion="concat")
    batch = model.collate(hists).to_torch()
    with torch.no_grad():
        dot = sr.user_vectors(batch.item_ids, batch.item_mask) @ sr.item_vectors().T
    torch.testing.assert_close(dot, sr.score(hists), atol=1e-4, rtol=1e-4)
    assert sr.unknown_item_vector().shape == (sr.item_vectors().shape[1],)


def test_fusion_scores_are_id_score_plus_weighted_llm_cosine_and_cosine_ranks_the_same(data, sr):
    _, split = data
    fused = make(data, sr, fusion="concat", fusion_init_weight=3.0).eval()
    plain = make(data, sr).eval()  # same seed: the same LLM side (no fusion weight in its state)
    plain.load_state_dict({k: v for k, v in fused.state_dict().items() if k != "fusion_log_weight"})
    hists = [split.train[u][:4] for u in range(6)]
    items = list(range(split.n_items))
    with torch.no_grad():
        table = fused.embed_items(items, batch_size=16)
        users = fused.embed(hists).user_embedding
        llm_table = plain.embed_items(items, batch_size=16)
        llm_users = plain.embed(hists).user_embedding
    assert table.shape[1] == users.shape[1] == fused.embedding_size
    norms = table.norm(dim=1)
    torch.testing.assert_close(norms, torch.full_like(norms, float(norms[0])), atol=1e-4, rtol=1e-5)
    expected = sr.score(hists) + 3.0 * cosine_scores(llm_users, llm_table)
    torch.testing.assert_close(users @ table.T, expected, atol=1e-4, rtol=1e-4)
    # cosine ranks as the dot product (every item row has the same norm)
    cos = cosine_scores(users, table)
    assert torch.equal(cos.argsort(dim=1, descending=True)[:, :10], expected.argsort(dim=1, descending=True)[:, :10])
    # a catalogue item re-embedded from its text reproduces its fused table row
    ds, _ = data
    again = fused.embed_cold_items(ds.items.iloc[[3, 7]], item_ids=[3, 7])
    torch.testing.assert_close(again, table[[3, 7]], atol=1e-4, rtol=1e-4)


def test_fusion_needs_an_id_model_with_dot_product_vectors(data):
    with pytest.raises(ValueError, match="needs the frozen ID-based recommender"):
        make(data, None, prefix="none", fusion="concat")


def test_token_norm_prefix_init_matches_the_token_embedding_norm(data, sr):
    _, split = data
    hists = [split.train[u][:4] for u in range(16)]
    for prefix in ("mformer", "plain"):
        model = make(data, sr, prefix=prefix, prefix_init="token_norm")
        target = float(model.backbone.input_embeddings().weight.norm(dim=1).mean())
        batch = model.collate(hists).to_torch()
        with torch.no_grad():
            p, _ = model.prefix(batch)
        mean = float(p.detach().norm(dim=-1).mean())
        assert abs(mean - target) / target < 0.25, (prefix, mean, target)
        if prefix == "plain":
            continue  # the tiny backbone's default plain prefix happens to have about that norm already
        default = make(data, sr, prefix=prefix)
        with torch.no_grad():
            q, _ = default.prefix(batch)
        assert abs(float(q.detach().norm(dim=-1).mean()) - target) / target > 0.25  # the switch changes something


@pytest.mark.parametrize("kind", ["center", "whiten"])
def test_embedding_transform_is_fitted_once_applied_to_both_sides_and_saved(data, sr, kind):
    ds, split = data
    model = make(data, sr, embedding_transform=kind).eval()
    items = list(range(split.n_items))
    assert model.needs_transform_fit()
    raw = model.embed_items(items, fuse=False)
    model.fit_embedding_transform(raw)
    assert not model.needs_transform_fit()
    table = model.embed_items(items)
    torch.testing.assert_close(table.mean(0), torch.zeros(table.shape[1]), atol=1e-4, rtol=0)
    if kind == "whiten":
        cov = table.T.double() @ table.double() / len(items)
        top = torch.linalg.eigvalsh(cov)[-10:]  # unit variance in the directions the data spans
        torch.testing.assert_close(top, torch.ones_like(top), atol=0.05, rtol=0)
    mean_cos = (cosine_scores(raw, raw).sum() - len(items)) / (len(items) * (len(items) - 1))
    new_cos = (cosine_scores(table, table).sum() - len(items)) / (len(items) * (len(items) - 1))
    assert float(new_cos) < float(mean_cos) and abs(float(new_cos)) < 0.1
    # users go through the same transform: the user embedding of a one-item history equals the item's row
    # up to the item side (no item weights here, so equal)
    users = model.embed([[5], [9]]).user_embedding
    torch.testing.assert_close(users, table[[5, 9]], atol=1e-3, rtol=1e-3)  # whitening scales up padding noise
    # saved with the weights: a rebuilt model with the state reproduces the table
    again = build_laser(model_spec(model), ds.items, sr)
    again.load_state_dict(model.state_dict())
    torch.testing.assert_close(
        again.eval().embed_items(items[:8]), table[:8], atol=1e-3, rtol=1e-3
    )  # whitening scales up batch-padding noise


def model_spec(model) -> LaserSpec:
    return tiny_spec(quant="none").model_copy(update={"bitune": model.config})


def test_item_side_weights_carry_the_new_state_keys(data, sr):
    model = make(data, sr, embedding_transform="center", fusion="concat").eval()
    model.fit_embedding_transform(model.embed_items(range(10), fuse=False))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.set_item_state(state)  # strict load: every key, the transform's and the fusion weight's included
    rows = model.embed_items(range(10))
    assert rows.shape[1] == model.embedding_size
    assert np.isfinite(rows.numpy()).all()


def test_a_fused_model_exports_and_serves_the_torch_ranking(data, sr, tmp_path):
    """The fusion runs through the same export (scorer + user tower with the ID vectors) and serving as plain
    Laser: the bundle's top-k for a history equals the torch model's, and a new item is embedded as a row."""
    from laser_core.export import export_bundle
    from laser_core.model import LaserWeights
    from laser_core.serving import Recommender

    ds, split = data
    model = make(data, sr, fusion="concat", embedding_transform="center").eval()
    model.fit_embedding_transform(model.embed_items(range(split.n_items), fuse=False))
    weights = LaserWeights(spec=model_spec(model), state={k: v.clone() for k, v in model.state_dict().items()})
    table = model.embed_items(range(split.n_items))
    bundle = export_bundle(weights, sr, ds.items, table, tmp_path / "bundle", k=5)
    rec = Recommender.load(bundle)
    hists = [split.train[u][-4:] for u in range(5)]
    with torch.no_grad():
        users = model.embed(hists).user_embedding
    want = cosine_scores(users, table).topk(5, dim=1).indices.numpy()
    for h, row in zip(hists, want):
        got = rec.recommend([str(ds.items.item_id.iloc[i]) for i in h], k=5)
        got_rows = [int(np.flatnonzero(ds.items.item_id.astype(str).to_numpy() == r.item_id)[0]) for r in got.items]
        assert got_rows == row.tolist()
    again = rec.item_embeddings(ds.items.iloc[[2, 4]], item_ids=[2, 4])
    np.testing.assert_allclose(again, table[[2, 4]].numpy(), atol=1e-3)


def test_trainer_fits_the_transform_once_and_a_fused_model_trains_on_the_fused_dot_product(data, sr, tmp_path):
    from laser_core.train import LaserTrainConfig, LaserTrainer

    _, split = data
    cfg = LaserTrainConfig(
        stage1_epochs=1,
        stage2_epochs=1,
        batch_size=8,
        lr=3e-3,
        users_per_epoch=48,
        valid_users=60,
        optimizer="adam",
        schedule="constant",
        grad_accumulation=1,
        weight_decay=0,
        patience=None,
        progress=False,
        curve_every_users=24,
    )
    model = make(data, sr, fusion="concat", embedding_transform="center")
    w0 = float(model.fusion_log_weight.detach())
    trainer = LaserTrainer(model, split, cfg, workdir=tmp_path / "run")
    result = trainer.fit()
    assert not model.needs_transform_fit()
    assert float(model.emb_shift.abs().sum()) > 0
    assert result.item_table.shape == (split.n_items, model.embedding_size)
    assert float(model.fusion_log_weight.detach()) != w0  # the fusion weight is trained
    curve = [h for h in result.history if h.get("curve")]
    assert [h["users_seen"] for h in curve] == [24, 48, 72, 96]
    # the fused loss (LaserModel.calculate_loss) is the softmax cross-entropy of the fused dot product (plus the
    # router's load balancing, as for every model with the M-Former)
    from laser_core.losses import load_balancing_loss

    out = model.embed([[1, 2], [3]])
    t = torch.tensor([4, 5])
    expected = torch.nn.functional.cross_entropy(out.user_embedding @ result.item_table.T, t)
    expected = expected + cfg.lb_weight * load_balancing_loss(out.router.probs, out.router.mask)
    torch.testing.assert_close(
        model.calculate_loss(trainer.training_batch([[1, 2], [3]], t, result.item_table)), expected
    )
    # a resumed (finished) run reloads the fitted transform with the weights, and does not refit
    again = make(data, sr, fusion="concat", embedding_transform="center")
    calls = []
    trainer2 = LaserTrainer(again, split, cfg, workdir=tmp_path / "run")
    orig = trainer2.fit_embedding_transform
    trainer2.fit_embedding_transform = lambda: (calls.append(1), orig())[1]
    trainer2.fit()
    assert calls == []
    torch.testing.assert_close(again.emb_shift, model.emb_shift)


def test_fusion_weight_grid_picks_the_best_validation_weight_before_training(data, sr, tmp_path):
    from laser_core.train import LaserTrainConfig, LaserTrainer

    _, split = data
    grid = [0.01, 1.0, 30.0, 1000.0]
    cfg = LaserTrainConfig(
        stage1_epochs=1,
        stage2_epochs=0,
        batch_size=8,
        users_per_epoch=8,
        valid_users=80,
        fusion_weight_grid=grid,
        progress=False,
    )
    model = make(data, sr, fusion="concat", embedding_transform="center")
    trainer = LaserTrainer(model, split, cfg, workdir=tmp_path / "run")
    model.fit_embedding_transform(model.embed_items(range(split.n_items), fuse=False))
    table = model.embed_items(range(split.n_items))
    record = trainer.choose_fusion_weight(table)
    assert float(model.fusion_log_weight.detach().exp()) == pytest.approx(record["chosen"])
    # each grid figure is what validation gives with that weight (the full path: forward, cosine to the table)
    for w in grid:
        model.fusion_log_weight.data.fill_(float(np.log(w)))
        assert trainer.validate(table)["ndcg@10"] == pytest.approx(record["grid"][str(w)], abs=1e-6)
    assert record["grid"][str(record["chosen"])] == max(record["grid"].values())
    assert len(set(record["grid"].values())) > 1  # the weight matters: the ID and LLM sides rank differently
    # in a fit, the weight is chosen once before training and epoch -1 is validated with it
    fresh = make(data, sr, fusion="concat", embedding_transform="center")
    result = LaserTrainer(fresh, split, cfg, workdir=tmp_path / "fit").fit()
    assert result.fusion_weight == record
    assert result.history[0]["epoch"] == -1
    assert result.history[0]["valid"]["ndcg@10"] == pytest.approx(max(record["grid"].values()), abs=1e-6)
    with pytest.raises(ValueError, match="fusion_weight_grid"):
        LaserTrainConfig(fusion_weight_grid=[0.0, 1.0])
