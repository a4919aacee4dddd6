"""Route b (LLM -> ID): the frozen LLM's item table (laser_core.frozen_table) in the ID models' item embeddings
(sr.text_items: init | join; laser_core.sr.text_items)."""

from __future__ import annotations

import json
import sys

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, tiny_spec, tiny_weights
from pydantic import ValidationError
from safetensors.torch import load_file

from laser_core.bundle import COLD_ITEM
from laser_core.data.split import Split
from laser_core.export import export_user_tower, reference_model
from laser_core.frozen_table import frozen_item_table
from laser_core.sr import SRConfig, TrainConfig, build_model, fit, load_model, save_model
from laser_core.sr.text_items import reduce_table, text_rows
from laser_core.sr.trainer import config_hash

from test_controls_bench import tiny_folder  # noqa: F401  (a fixture: configs/tiny.yaml's data as a folder)

sys.path.insert(0, str(REPO / "bench"))
torch.set_num_threads(1)

DATA = {"n_users": 120, "n_items": 40, "n_user_types": 4, "seed": 3}  # the `data` fixture (tests/conftest.py)
QUICK = dict(epochs=2, batch_size=64, progress=False)


def sr_config(model: str, mode: str, **kw) -> SRConfig:
    return SRConfig(model=model, hidden_size=16, n_layers=1, n_heads=2, max_len=8, text_items=mode, **kw)


def random_table(n: int, d: int = 24, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) @ torch.randn(d, d, generator=g) + 3.0  # correlated, off-centre


def cosines(x: torch.Tensor) -> torch.Tensor:
    x = F.normalize(x.double(), dim=1)
    return x @ x.T


# ------------------------------------------------------------------------------------------ the reduction
def test_whitened_reduction_is_pca_whitening_with_the_rows_cosines_of_zca():
    table = random_table(60)
    full = reduce_table(table, 24, "whitened", scale=1.0)
    assert torch.allclose(full.pow(2).mean().sqrt(), torch.tensor(1.0), atol=1e-5)
    cov = full.double().T @ full.double() / len(full)
    # uncorrelated components of (near) unit variance (the smallest get a little less: the 1e-6 x largest
    # eigenvalue that keeps the whitening finite)
    assert torch.allclose(cov, torch.diag(cov.diagonal()), atol=1e-6)
    assert torch.allclose(cov.diagonal(), torch.ones(24, dtype=torch.float64), atol=2e-2)
    # ZCA whitening (an independent computation) is PCA whitening rotated: the same cosines between items
    x = table.double() - table.double().mean(0)
    s, u = torch.linalg.eigh(x.T @ x / len(x))
    zca = x @ u @ torch.diag((s + 1e-6 * s.max()).rsqrt()) @ u.T
    assert torch.allclose(cosines(full), cosines(zca), atol=1e-5)
    # reduced: the top components only; centred keeps their variances (decreasing); padding columns are zero
    small = reduce_table(table, 6, "centered", scale=0.5)
    var = small.double().pow(2).mean(0)
    assert torch.all(var[:-1] >= var[1:]) and var[0] > 2 * var[-1]
    assert torch.allclose(small.pow(2).mean().sqrt(), torch.tensor(0.5), atol=1e-5)
    wide = reduce_table(table, 30, "whitened")
    assert wide.shape == (60, 30) and torch.equal(wide[:, 24:], torch.zeros(60, 6))


@pytest.mark.parametrize("model", ["sasrec", "bert4rec"])
def test_init_copies_the_reduced_table_into_the_item_embeddings(model):
    table = random_table(40)
    cfg = sr_config(model, "init", text_transform="centered", text_scale=0.3)
    rows = text_rows(cfg, 40, table)
    torch.manual_seed(0)
    m = build_model(cfg, 40, rows)
    emb = m.item_emb.weight[1:41].detach()
    assert torch.equal(emb, rows)
    assert torch.allclose(cosines(emb), cosines(reduce_table(table, 16, "centered")), atol=1e-5)
    assert not torch.allclose(cosines(build_model(sr_config(model, "none"), 40).item_emb.weight[1:41]), cosines(emb))
    assert torch.equal(m.item_emb.weight[0], torch.zeros(16))  # padding untouched
    assert "text_join.rows" not in m.state_dict()  # init: the same weights as an ID model


# ------------------------------------------------------------------------------------- the model's interface
def check_interface(m, n_items: int) -> None:
    """``full_sort_predict == user_vectors @ item_vectors().T``; ``encode`` reads a cold item; the shapes of the
    unknown item's vector and the cold item's embedding."""
    m.eval()
    hists = [[1, 2, 3, 4, 5, 6, 7, 8, 9], [5], [0, 3]]
    L = m.config.max_len
    ids = torch.zeros(len(hists), L, dtype=torch.long)
    mask = torch.zeros(len(hists), L, dtype=torch.bool)
    for r, h in enumerate(hists):
        h = h[-L:]
        ids[r, L - len(h) :] = torch.tensor(h)
        mask[r, L - len(h) :] = True
    with torch.no_grad():
        scores = m.full_sort_predict(m.predict_inputs(hists))
        assert scores.shape == (len(hists), n_items)
        assert torch.allclose(m.user_vectors(ids, mask) @ m.item_vectors().T, scores, atol=1e-5)
        cold = torch.tensor([[0, 0, 0, 0, 0, 2, COLD_ITEM, 3]])
        enc = m.encode(cold, torch.tensor([[False] * 5 + [True] * 3]))
        assert enc.shape == (1, L, 16) and torch.isfinite(enc).all()
    assert m.unknown_item_vector().shape == m.item_vectors().shape[1:]
    assert m.cold_item_embedding().shape == (16,)


@pytest.mark.parametrize("model", ["sasrec", "bert4rec"])
@pytest.mark.parametrize("mode", ["init", "join"])
def test_scores_are_the_dot_product_of_user_and_item_vectors(data, model, mode):
    ds, split = data
    fitted = fit(sr_config(model, mode), TrainConfig(**QUICK), split, text_table=random_table(ds.n_items)).model
    check_interface(fitted, ds.n_items)


@pytest.mark.parametrize("model", ["sasrec", "bert4rec"])
def test_join_keeps_its_text_rows_in_the_saved_model_and_reloads_identically(data, model, tmp_path):
    ds, split = data
    table = random_table(ds.n_items)
    fitted = fit(sr_config(model, "join"), TrainConfig(**QUICK), split, text_table=table).model
    rows = text_rows(fitted.config, ds.n_items, table)
    assert torch.equal(fitted.text_join.rows, rows)  # the fixed view: not trained
    assert not torch.equal(fitted.text_join.proj.weight, torch.eye(16))  # the map is
    save_model(fitted, tmp_path / "m")
    assert torch.equal(load_file(str(tmp_path / "m" / "model.safetensors"))["text_join.rows"], rows)
    again = load_model(tmp_path / "m")
    assert again.config.text_items == "join"
    hists = [list(h) for h in split.valid_examples()[1][:20]]
    assert torch.equal(again.score(hists), fitted.score(hists))
    # the item vectors are the ID embedding plus the mapped text row
    ids_only = fitted.item_emb.weight[1 : ds.n_items + 1]
    assert torch.allclose(fitted.item_weight()[1 : ds.n_items + 1], ids_only + fitted.text_join.proj(rows))


def test_the_user_tower_exports_with_a_join_encoder(data, tmp_path):
    """Laser's ONNX user tower traces ``sr.encode``: with a join BERT4Rec (the text view and its map inside)
    it matches torch, a cold item included."""
    ds, split = data
    sr_m = fit(sr_config("bert4rec", "join"), TrainConfig(**QUICK), split, text_table=random_table(ds.n_items)).model
    weights = tiny_weights(tiny_spec(quant="none"), ds.items, sr_m, nudge=True)
    ref = reference_model(weights, sr_m, ds.items)
    export_user_tower(ref, tmp_path / "tower.onnx")
    hists = [[1, 2, 3, 4, 5, 6], [COLD_ITEM, 4]]
    batch = ref.collate(hists, ref.tokenize([[i for i in h if i >= 0] for h in hists]))
    with torch.no_grad():
        expected = ref(batch).user_embedding.numpy()
    sess = ort.InferenceSession(str(tmp_path / "tower.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(["user_embedding"], batch.feeds(["item_ids", "item_mask", "input_ids", "attention_mask"]))[0]
    np.testing.assert_allclose(got, expected, atol=1e-4)


# ------------------------------------------------------------------------------------------- config errors
def test_config_errors_are_clear(data):
    ds, split = data
    with pytest.raises(ValueError, match=r"sr.text_items is 'init'.*text_table.*40 rows"):
        fit(sr_config("sasrec", "init"), TrainConfig(**QUICK), split)
    with pytest.raises(ValueError, match=r"shape \(39, 24\), expected \[40, D\]"):
        fit(sr_config("sasrec", "join"), TrainConfig(**QUICK), split, text_table=random_table(39))
    bad = random_table(40)
    bad[7, 3] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite values in rows \[7\]"):
        fit(sr_config("sasrec", "join"), TrainConfig(**QUICK), split, text_table=bad)
    with pytest.raises(ValidationError, match="text_items: 'join' needs model sasrec or bert4rec"):
        SRConfig(model="gru4rec", text_items="join")
    with pytest.raises(ValidationError, match="text_scale"):
        SRConfig(model="sasrec", text_items="init", text_scale=0)


def test_the_checkpoint_key_includes_the_table_content(data):
    _, split = data
    train = TrainConfig(**QUICK)
    table = random_table(40)
    init = sr_config("sasrec", "init")
    other = table.clone()
    other[0, 0] += 1e-3
    assert config_hash(init, train, split, table) == config_hash(init, train, split, table.clone())
    assert config_hash(init, train, split, table) != config_hash(init, train, split, other)
    assert config_hash(init, train, split, table) != config_hash(sr_config("sasrec", "join"), train, split, table)
    none = sr_config("sasrec", "none")
    assert config_hash(none, train, split) == config_hash(none, train, split, table)  # no table in an ID model


# ---------------------------------------------------------------------------------------- the frozen table
def test_the_frozen_table_is_cached_under_its_content_key(data, tmp_path):
    ds, _ = data
    spec = tiny_spec(quant="none", prefix="mformer", fusion="concat")  # the frozen LLM alone: no prefix, no fusion
    frozen = frozen_item_table(spec, ds.items, cache_dir=tmp_path, device="cpu")
    first = frozen.table
    files = sorted((tmp_path / "frozen_tables").iterdir())
    assert first.shape == (ds.n_items, 64) and len(files) == 1
    again = frozen_item_table(spec, ds.items, cache_dir=tmp_path, device="cpu")
    assert torch.equal(again.table, first) and again.weights_fingerprint == frozen.weights_fingerprint
    assert len(list((tmp_path / "frozen_tables").iterdir())) == 1  # read back, not recomputed
    # another item text: another key (a new file), and that item's row changes
    items = ds.items.copy()
    items.loc[5, "title"] = "Completely Different Words Here"
    changed = frozen_item_table(spec, items, cache_dir=tmp_path, device="cpu").table
    assert len(list((tmp_path / "frozen_tables").iterdir())) == 2
    assert not torch.allclose(changed[5], first[5])
    # other text settings: another key
    other_text = tiny_spec(quant="none", text=spec.text.model_copy(update={"history_len": 3}))
    frozen_item_table(other_text, ds.items, cache_dir=tmp_path, device="cpu")
    assert len(list((tmp_path / "frozen_tables").iterdir())) == 3
    # a file whose stored key is not this key is never returned (recomputed and replaced)
    from safetensors.torch import save_file

    save_file({"table": torch.zeros_like(first)}, str(files[0]), metadata={"key": "another key"})
    assert torch.equal(frozen_item_table(spec, ds.items, cache_dir=tmp_path, device="cpu").table, first)


# ------------------------------------------------------------------------------------------------ learning
def interchangeable_task(seed: int = 0, groups: int = 16, per: int = 4, users: int = 600, eval_users: int = 160):
    """Items come in groups of ``per`` with near-identical text (one random direction per group + small noise);
    the next item is any of the next group's common items (a fixed random map of groups). The last item of each
    group is rare: it never appears in training, and every validation history is one rare item. An ID model
    has nothing to go on for those; the text says which group the rare item belongs to."""
    rng = np.random.default_rng(seed)
    n = groups * per
    group = np.arange(n) // per
    successor = rng.permutation(groups)
    common = [np.arange(g * per, g * per + per - 1) for g in range(groups)]
    table = torch.tensor(rng.normal(size=(groups, 24))[group] + 0.1 * rng.normal(size=(n, 24)), dtype=torch.float32)
    train, valid, test = [], [], []
    for _ in range(users):
        g = int(rng.integers(groups))
        seq = [int(rng.choice(common[g]))]
        for _ in range(int(rng.integers(2, 6))):
            g = int(successor[g])
            seq.append(int(rng.choice(common[g])))
        train.append(np.asarray(seq, dtype=np.int64))
        valid.append(-1)
        test.append(-1)
    for u in range(eval_users):
        rare = (u % groups) * per + per - 1
        g = int(successor[group[rare]])
        train.append(np.asarray([rare], dtype=np.int64))
        valid.append(int(rng.choice(common[g])))
        test.append(int(rng.choice(common[int(successor[g])])))
    split = Split([str(i) for i in range(len(train))], n, train, np.asarray(valid), np.asarray(test))
    return split, table


def test_text_items_carry_rare_items_that_ids_alone_cannot():
    split, table = interchangeable_task()
    train = TrainConfig(epochs=12, batch_size=64, lr=3e-3, patience=12, progress=False)
    cfg = dict(model="sasrec", hidden_size=16, n_layers=1, n_heads=1, max_len=8)
    ndcg = {}
    for mode in ("none", "init", "join"):
        ndcg[mode] = fit(SRConfig(text_items=mode, **cfg), train, split, text_table=table).best_valid["ndcg@10"]
    # a table that says nothing about the groups (rows shuffled) does not help
    shuffled = table[torch.randperm(len(table), generator=torch.Generator().manual_seed(1))]
    ndcg["init_shuffled"] = fit(SRConfig(text_items="init", **cfg), train, split, text_table=shuffled).best_valid[
        "ndcg@10"
    ]
    assert ndcg["init"] > ndcg["none"] + 0.3, ndcg
    assert ndcg["join"] > ndcg["none"] + 0.3, ndcg
    assert ndcg["init_shuffled"] < ndcg["none"] + 0.1, ndcg


# ------------------------------------------------------------------------------------------------ pipeline
def test_the_pipeline_computes_the_frozen_table_and_trains_the_id_model_on_it(zenml_store):
    """``sr.text_items: join``: a frozen_text_table step (our materializer) feeds pretrain_sr, whose model keeps
    that table's reduced rows; ``none`` has no such step."""
    from test_pipeline import _config, _statuses
    from zenml.client import Client

    from pipelines.run import run_training

    cfg = _config(stop_after="sr")
    cfg.sr = cfg.sr.model_copy(update={"text_items": "join"})
    run = Client().get_pipeline_run(run_training(cfg).id)
    assert set(_statuses(run)) == {
        "load_dataset",
        "validate_dataset",
        "split_dataset",
        "frozen_text_table",
        "pretrain_sr",
        "evaluate_sr",
    }
    art = run.steps["frozen_text_table"].outputs["text_table"][0]
    assert art.materializer.import_path.startswith("steps.materializers."), art.materializer.import_path
    table = art.load()
    assert table.table.shape == (80, 64) and table.weights_fingerprint
    model = run.steps["pretrain_sr"].outputs["sr_model"][0].load()
    assert torch.equal(model.text_join.rows, text_rows(model.config, 80, table.table))
    assert "frozen_text_table" not in _statuses(run_training(_config(stop_after="sr")))


# ------------------------------------------------------------------------------------------------- bench
def test_route_b_bench_smoke_and_resume(tmp_path, tiny_folder, monkeypatch, capsys):  # noqa: F811
    """bench/route_b.py on configs/tiny.yaml's data: every variant on the same test pairs, the chosen one the
    best on validation; a second run trains nothing; a bad --variants is a clear usage error."""
    import route_b

    argv = ["--data-dir", str(tiny_folder), "--config", str(REPO / "configs" / "tiny.yaml"), "--name", "tiny"]
    argv += ["--workdir", str(tmp_path / "wd"), "--out", str(tmp_path / "results"), "--threads", "1"]
    argv += ["--variants", "none,init,join@0.3"]
    assert route_b.main(argv) == 0
    out = json.loads((tmp_path / "results" / "route_b_tiny.json").read_text(encoding="utf8"))
    rows = out["variants"]
    assert list(rows) == ["none", "init", "join@0.3"]
    assert {r["test_users"] for r in rows.values()} == {160}
    assert rows["join@0.3"]["text_scale"] == 0.3 and rows["init"]["text_items"] == "init"
    assert rows["none"]["table_key"] is None and rows["init"]["table_key"] == rows["join@0.3"]["table_key"]
    for r in rows.values():
        assert all(0 <= r[k] <= 1 for k in ("ndcg@10", "recall@10", "mrr", "ndcg@10_masked"))
    best = max(r["valid"]["ndcg@10"] for r in rows.values())
    assert rows[out["chosen_on_validation"]]["valid"]["ndcg@10"] == best
    # the leaderboard row (all test users): the best text variant on validation, never "none"
    row = out["leaderboard"]["rows"]["laser_b"]
    text_best = max(("init", "join@0.3"), key=lambda v: rows[v]["valid"]["ndcg@10"])
    assert out["leaderboard"]["dataset"] == "tiny" and row["variant"] == text_best
    assert row["ndcg@10"] == rows[text_best]["ndcg@10"] and row["test_users"] == 160

    monkeypatch.setattr(route_b, "fit", lambda *a, **k: pytest.fail("a finished variant was trained again"))
    assert route_b.main(argv) == 0
    assert json.loads((tmp_path / "results" / "route_b_tiny.json").read_text(encoding="utf8"))["variants"] == rows
    # the controls: the same variant on a TF-IDF (SVD) table and on a random backbone's, in files of their own
    monkeypatch.undo()
    for table in ("tfidf", "random_llm"):
        ctl = [a for a in argv if a not in ("--variants", "none,init,join@0.3")] + ["--variants", "init"]
        assert route_b.main([*ctl, "--table", table, "--seed", "3"]) == 0
        got = json.loads((tmp_path / "results" / f"route_b_tiny_{table}.json").read_text(encoding="utf8"))
        assert got["variants"]["init"]["table"] == table and got["variants"]["init"]["table_key"] not in (
            rows["init"]["table_key"],
            None,
        )
        assert list(got["leaderboard"]["rows"]) == [f"{table}_init_control"]
        assert (tmp_path / "wd" / f"route-b-sasrec-init-{table}" / "state.json").is_file()  # not the route's folder
    with pytest.raises(SystemExit):
        route_b.main([*argv[:-1], "none,init@x"])
    assert "--variants: 'init@x': the scale after @ must be a number" in capsys.readouterr().err
