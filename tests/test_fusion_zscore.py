"""``bitune.fusion: zscore`` (issue 22, route a): both score parts z-scored per user over the catalogue inside the
model, a learned temperature and fusion weight, still one dot product (laser_core/model.py's docstring)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from conftest import tiny_spec

from laser_core.hybrid import zscore
from laser_core.losses import cosine_scores
from laser_core.model import (
    FUSION_TABLE_STATISTICS,
    LaserTrainingBatch,
    LaserWeights,
    build_laser,
    row_statistics,
)

# the data set of the `data` fixture and the ID model of the `sr` fixture (tests/conftest.py)
DATA = {"n_users": 300, "n_items": 60, "n_user_types": 4, "seed": 3}
SR = dict(model="sasrec", hidden_size=16, dropout=0.1, attn_dropout=0.1)
SR_TRAIN = dict(epochs=3, batch_size=64, lr=3e-3)


def spec(**bitune):
    return tiny_spec(quant="none", **{"fusion": "zscore", **bitune})


def make(data, sr, **bitune):
    return build_laser(spec(**bitune), data[0].items, sr)


def nudge(model, seed: int = 0) -> None:
    """Move the suffix off its EOS initialisation (users then differ, and so do item tables)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.suffix.add_(0.1 * torch.randn(model.suffix.shape, generator=g))


def id_scale(model) -> torch.Tensor:
    """``c_ID``: the root mean square norm of the centred ID rows (the item rows' ID part is scaled by 1 / it)."""
    return model.fusion_id_cov.diagonal().sum().sqrt()


def text_part(table: torch.Tensor, cov: torch.Tensor, d: int) -> torch.Tensor:
    """A table's centred LLM part ``n_i - nbar`` (the rows hold it over ``c_T = sqrt(trace C_T)``)."""
    return table[:, d:-1] * cov.diagonal().sum().sqrt()


def histories(split, n: int = 8) -> list:
    return [split.train[u][-4:] for u in range(n) if len(split.train[u])]


def test_zscore_fusion_is_a_times_zscored_id_plus_w_zscored_cosine_in_one_dot_product(data, sr):
    ds, split = data
    model = make(data, sr, fusion_init_weight=0.7, fusion_init_temperature=2.5, embedding_transform="center").eval()
    nudge(model)
    n = split.n_items
    model.fit_embedding_transform(model.embed_items(range(n), fuse=False))
    table = model.catalogue_table(n)
    # the LLM side alone: the same weights without the fusion
    plain = build_laser(spec(fusion="none", embedding_transform="center"), ds.items, sr).eval()
    plain.load_state_dict(
        {k: v for k, v in model.state_dict().items() if not k.startswith(("fusion_log", *FUSION_TABLE_STATISTICS))}
    )
    hists = histories(split)
    with torch.no_grad():
        users = model.embed(hists).user_embedding
        llm_table = plain.embed_items(range(n))
        llm_users = plain.embed(hists).user_embedding
    assert table.shape == (n, model.embedding_size) and users.shape[1] == model.embedding_size
    expected = 2.5 * (zscore(sr.score(hists)) + 0.7 * zscore(cosine_scores(llm_users, llm_table)))
    np.testing.assert_allclose((users @ table.T).numpy(), expected, atol=2e-4, rtol=1e-4)
    # every item row has the same norm, so the served cosine ranks exactly as the dot product
    norms = table.norm(dim=1)
    torch.testing.assert_close(norms, torch.full_like(norms, float(norms[0])), atol=1e-4, rtol=1e-5)
    dot_rank = (users @ table.T).argsort(dim=1, descending=True)
    assert torch.equal(cosine_scores(users, table).argsort(dim=1, descending=True)[:, :20], dot_rank[:, :20])
    # a catalogue item re-embedded from its text reproduces its row; a new item (the ID model's unknown-item
    # vector, centred as the catalogue's) has the same norm
    again = model.embed_cold_items(ds.items.iloc[[3, 7]], item_ids=[3, 7])
    torch.testing.assert_close(again, table[[3, 7]], atol=1e-4, rtol=1e-4)
    cold = model.embed_cold_items(ds.items.iloc[[5]])
    d = sr.item_vectors().shape[1]
    torch.testing.assert_close(cold[0, :d], (sr.unknown_item_vector().float() - model.fusion_id_mean) / id_scale(model))
    torch.testing.assert_close(cold.norm(dim=1), norms[:1], atol=1e-4, rtol=1e-5)


def test_an_unfitted_zscore_model_makes_no_item_table(data, sr):
    model = make(data, sr).eval()
    assert model.needs_fusion_fit()
    with pytest.raises(ValueError, match="not fitted yet.*catalogue_table"):
        model.embed_items(range(4))
    model.catalogue_table(data[1].n_items)
    assert not model.needs_fusion_fit()


def test_statistics_refit_with_every_table_and_travel_with_the_weights(data, sr, tmp_path):
    ds, split = data
    n = split.n_items
    model = make(data, sr).eval()
    model.catalogue_table(n)
    first = model.fusion_statistics()
    table_key = model.weights_fingerprint(table_key=True)
    nudge(model, seed=1)  # new weights: a new table refits the statistics on its own LLM rows
    table = model.catalogue_table(n)
    mean, cov = row_statistics(torch.nn.functional.normalize(model.embed_items(range(n), fuse=False), dim=-1))
    torch.testing.assert_close(model.fusion_text_mean, mean)
    torch.testing.assert_close(model.fusion_text_cov, cov)
    assert not torch.allclose(model.fusion_text_mean, first["fusion_text_mean"])
    d = sr.item_vectors().shape[1]
    torch.testing.assert_close(table[:, d:-1].mean(0), torch.zeros(table.shape[1] - d - 1), atol=1e-5, rtol=0)
    # the table's cache key leaves out what the table refits from its own rows; the weights' key does not
    state = {k: v.clone() for k, v in model.state_dict().items()}
    key_now, table_key_now = model.weights_fingerprint(), model.weights_fingerprint(table_key=True)
    assert table_key_now != table_key  # the suffix moved
    model.load_fusion_statistics(first)  # the same weights with the older table's statistics
    assert model.weights_fingerprint(table_key=True) == table_key_now and model.weights_fingerprint() != key_now
    model.load_state_dict(state)
    # saved with the weights and loaded back: the rebuilt model embeds users and items as this one
    assert set(FUSION_TABLE_STATISTICS) <= set(state)
    LaserWeights(spec=spec(), state=state).save(tmp_path / "w")
    loaded = LaserWeights.load(tmp_path / "w")
    rebuilt = build_laser(loaded.spec, ds.items, sr, weights=loaded).eval()
    assert not rebuilt.needs_fusion_fit()
    hists = histories(split)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.embed(hists).user_embedding, model.embed(hists).user_embedding)
    torch.testing.assert_close(rebuilt.embed_items(range(8)), table[:8], atol=1e-5, rtol=1e-5)
    # an item side of its own (stage 2) carries them too: strict load of every key
    rebuilt.set_item_state(
        {k: v.clone() for k, v in first.items()} | {k: v for k, v in state.items() if k not in first}
    )
    torch.testing.assert_close(rebuilt.item_weights.fusion_text_mean, first["fusion_text_mean"])


def test_the_trainer_refits_the_statistics_with_every_stage1_table_and_keeps_them_with_the_table(data, sr, tmp_path):
    from safetensors.torch import load_file

    from laser_core.train import LaserTrainConfig, LaserTrainer

    _, split = data
    cfg = LaserTrainConfig(
        stage1_epochs=2,
        stage2_epochs=1,
        batch_size=8,
        lr=3e-3,
        users_per_epoch=16,
        valid_users=40,
        optimizer="adam",
        schedule="constant",
        grad_accumulation=1,
        weight_decay=0,
        patience=None,
        progress=False,
    )
    model = make(data, sr, embedding_transform="center")
    result = LaserTrainer(model, split, cfg, workdir=tmp_path / "run").fit()
    d = sr.item_vectors().shape[1]
    tables = sorted((tmp_path / "run" / "tables").glob("*.safetensors"))
    assert len(tables) == 3  # the initial table and one refresh per stage-1 epoch (stage 2 freezes the table)
    for path in tables:  # each refreshed table is centred by the statistics refitted on its own rows
        saved = load_file(str(path))
        text = text_part(saved["table"], saved["fusion_text_cov"], d)
        torch.testing.assert_close(text.mean(0), torch.zeros(text.shape[1]), atol=1e-5, rtol=0)
        torch.testing.assert_close(text.T.double().cov().float(), saved["fusion_text_cov"], atol=1e-5, rtol=1e-4)
    # the final model's statistics are those of the frozen table it is tested against: its LLM part is the
    # unit rows minus the model's mean, with the model's covariance
    text = text_part(result.item_table, model.fusion_text_cov, d)
    torch.testing.assert_close((text + model.fusion_text_mean).norm(dim=1), torch.ones(len(text)), atol=1e-5, rtol=0)
    torch.testing.assert_close(text.T.double().cov().float(), model.fusion_text_cov, atol=1e-5, rtol=1e-4)
    # a resumed (finished) run reloads the statistics with the weights
    again = make(data, sr, embedding_transform="center")
    LaserTrainer(again, split, cfg, workdir=tmp_path / "run").fit()
    for name in FUSION_TABLE_STATISTICS:
        torch.testing.assert_close(getattr(again, name), getattr(model, name))


def loss_of(model, data, table, hists, targets):
    batch = LaserTrainingBatch(model.collate(hists), targets, table, tau=0.05, lb_weight=0.0)
    return model.calculate_loss(batch)


def test_gradients_reach_the_temperature_the_weight_and_the_prefix_and_suffix(data, sr):
    _, split = data
    model = make(data, sr)
    model.eval()
    table = model.catalogue_table(split.n_items)
    model.train()  # the backbone stays in train() with dropout 0 (LaserModel.train)
    hists = histories(split)
    targets = torch.tensor([int(split.train[u][-1]) for u in range(len(hists))])
    loss_of(model, data, table, hists, targets).backward()
    for name in ("fusion_log_temperature", "fusion_log_weight", "suffix"):
        grad = getattr(model, name).grad
        assert grad is not None and float(grad.abs().sum()) > 0, name
    mformer = [p.grad for p in model.mformer.parameters() if p.grad is not None]
    assert mformer and sum(float(g.abs().sum()) for g in mformer) > 0


def test_a_few_steps_lower_the_loss_through_the_llm_side_and_move_the_weight(data, sr):
    """Training everything beats training a and w alone (the LLM side learns through the z-scored text part),
    and w moves: this fails when w or the text part is cut from the graph."""
    _, split = data
    base = make(data, sr, prefix="none", fusion_init_weight=1.0).eval()
    table = base.catalogue_table(split.n_items)
    rng = np.random.default_rng(0)
    users = rng.choice(len(split.train), size=24, replace=False)
    hists = [split.train[u][-3:-1] if len(split.train[u]) > 2 else split.train[u][:1] for u in users]
    targets = torch.from_numpy(rng.integers(0, split.n_items, size=len(hists)))  # not the ID model's: text must

    def train(model, params, steps: int = 25) -> tuple[float, float]:
        model.train()
        opt = torch.optim.Adam(params, lr=3e-2)
        first = None
        for _ in range(steps):
            opt.zero_grad()
            loss = loss_of(model, data, table, hists, targets)
            loss.backward()
            opt.step()
            first = float(loss) if first is None else first
        with torch.no_grad():
            return first, float(loss_of(model, data, table, hists, targets))

    full = copy.deepcopy(base)
    w0 = float(full.fusion_log_weight.detach())
    start, end = train(full, full.trainable_parameters())
    scalars = copy.deepcopy(base)
    _, end_scalars = train(scalars, [scalars.fusion_log_weight, scalars.fusion_log_temperature])
    assert end < start
    assert float(full.fusion_log_weight.detach()) != pytest.approx(w0, abs=1e-3)
    assert end < end_scalars - 0.5, (start, end, end_scalars)


def test_a_zscore_model_exports_and_the_bundle_serves_the_torch_ranking(data, sr, tmp_path):
    from laser_core.bundle import MANIFEST
    from laser_core.export import export_bundle
    from laser_core.serving import Recommender

    ds, split = data
    model = make(data, sr, fusion_init_weight=0.5).eval()
    nudge(model)
    table = model.catalogue_table(split.n_items)
    weights = LaserWeights(
        spec=spec(fusion_init_weight=0.5), state={k: v.clone() for k, v in model.state_dict().items()}
    )
    bundle = export_bundle(weights, sr, ds.items, table, tmp_path / "bundle", k=5)  # checks tower parity itself
    manifest = json.loads((bundle / MANIFEST).read_text())
    assert manifest["bitune"]["fusion"] == "zscore"
    assert manifest["parity_max_abs_diff"] < 1e-3
    rec = Recommender.load(bundle)
    hists = histories(split, 5)
    with torch.no_grad():
        users = model.embed(hists).user_embedding
    want = cosine_scores(users, table).topk(5, dim=1).indices.numpy()
    ids = ds.items.item_id.astype(str).to_numpy()
    for h, row in zip(hists, want):
        got = rec.recommend([str(ids[i]) for i in h], k=5)
        assert [int(np.flatnonzero(ids == r.item_id)[0]) for r in got.items] == row.tolist()
    # new items go through the tower's item side with the saved statistics: a catalogue item's row comes back
    np.testing.assert_allclose(rec.item_embeddings(ds.items.iloc[[2, 4]], item_ids=[2, 4]), table[[2, 4]], atol=1e-3)


def test_the_fusion_weight_grid_scores_the_zscore_fusion_as_validation_does(data, sr, tmp_path):
    """``laser_train.fusion_weight_grid`` (configs/layers/fusion_zscore.yaml sets one): the trainer's split of
    the user rows into the ID part and w x the LLM part holds for the z-scored rows too."""
    from laser_core.train import LaserTrainConfig, LaserTrainer

    _, split = data
    grid = [0.1, 1.0, 10.0]
    cfg = LaserTrainConfig(
        stage1_epochs=1, stage2_epochs=0, batch_size=8, users_per_epoch=8, valid_users=80, fusion_weight_grid=grid
    )
    model = make(data, sr, prefix="none")
    nudge(model)
    trainer = LaserTrainer(model, split, cfg.model_copy(update={"progress": False}), workdir=tmp_path / "run")
    table = model.catalogue_table(split.n_items)
    record = trainer.choose_fusion_weight(table)
    assert float(model.fusion_log_weight.detach().exp()) == pytest.approx(record["chosen"])
    for w in grid:
        model.fusion_log_weight.data.fill_(float(np.log(w)))
        assert trainer.validate(table)["ndcg@10"] == pytest.approx(record["grid"][str(w)], abs=1e-6)
    assert len(set(record["grid"].values())) > 1


def test_one_implementation_of_the_z_score_statistics_and_the_norm_column():
    """laser_core.score_stats holds the z-score statistics (mean and ddof-1 covariance, the per-user standard
    deviation, one epsilon) and the norm-equalising column; the fused Laser, the lexical hybrid and the bundle use
    it (no copies left), and it gives the same on numpy arrays and torch tensors."""
    import laser_core.bundle
    import laser_core.lexical
    import laser_core.model
    from laser_core import score_stats

    assert laser_core.model.row_statistics is laser_core.lexical.row_statistics is score_stats.row_statistics
    assert laser_core.model.per_user_sd is laser_core.lexical.per_user_sd is score_stats.per_user_sd
    assert laser_core.model.norm_column is laser_core.bundle.norm_column is score_stats.norm_column
    for module, copies in (
        (laser_core.model, ("FUSION_SD_EPS", "_per_user_sd")),
        (laser_core.lexical, ("SD_EPS", "_stats")),
    ):
        assert not [name for name in copies if hasattr(module, name)], module.__name__
    rng = np.random.default_rng(0)
    rows, users = rng.standard_normal((30, 5)), rng.standard_normal((4, 5))
    mean, cov = score_stats.row_statistics(rows)
    t_mean, t_cov = score_stats.row_statistics(torch.from_numpy(rows))
    assert mean.dtype == np.float32 and t_cov.dtype == torch.float32
    np.testing.assert_allclose(t_mean.numpy(), mean)
    np.testing.assert_allclose(t_cov.numpy(), cov)
    # the per-user sd is the standard deviation (ddof 1) of the user's scores; a zero user gets SD_EPS
    sd = score_stats.per_user_sd(users, cov.astype(np.float64))
    np.testing.assert_allclose(sd[:, 0], (users @ rows.T).std(axis=1, ddof=1), rtol=1e-6)
    t_sd = score_stats.per_user_sd(torch.from_numpy(np.vstack([users, 0 * users[:1]])), torch.from_numpy(cov).double())
    np.testing.assert_allclose(t_sd[:4].numpy(), sd, rtol=1e-6)
    assert float(t_sd[4, 0]) == pytest.approx(score_stats.SD_EPS)
    # the norm column makes every row as long as the bound (numpy and torch alike)
    sq = (rows**2).sum(1)
    col = score_stats.norm_column(sq, float(sq.max()))
    np.testing.assert_allclose(sq + col**2, sq.max())
    np.testing.assert_allclose(score_stats.norm_column(torch.from_numpy(sq), torch.tensor(sq.max())).numpy(), col)
