"""ONNX export (laser_core.export): scorer and user-tower parity with torch on tiny backbones."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pandas as pd
import pytest
import torch
from conftest import tiny_spec, tiny_weights

from laser_core.data.text import TextConfig
from laser_core.bundle import COLD_ITEM, MANIFEST, export_scorer, l2_normalize, sha256_file
from laser_core.export import export_bundle, export_user_tower, popularity_from_sequences, reference_model
from laser_core.model import LaserWeights, build_laser, item_state_beside
from laser_core.sr import SRConfig, TrainConfig, build_model, fit

TEXT = TextConfig(history_len=4, title_max_tokens=6)  # token limits: the tokenizer's decode is part of parity


def session(path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def torch_topk(table: torch.Tensor, users: torch.Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    cos = torch.nn.functional.normalize(users, dim=-1) @ torch.nn.functional.normalize(table, dim=-1).T
    scores, idx = cos.topk(k, dim=-1)
    return scores.numpy(), idx.numpy()


# the data set and ID model of the `data` and `sr` fixtures (tests/conftest.py)
DATA = {"n_users": 120, "n_items": 40, "n_user_types": 4, "seed": 3}
SR = dict(model="bert4rec", hidden_size=16, max_len=8)
SR_TRAIN = dict(epochs=1, batch_size=64)


def weights_for(data, sr, quant="nf4", **bitune) -> LaserWeights:
    """Weights of a (untrained, randomly initialised) Laser model, as the training step hands them over."""
    return tiny_weights(tiny_spec(TEXT, quant=quant, **bitune), data[0].items, sr, nudge=True)


@pytest.fixture(scope="module")
def trained(data, sr):
    """(weights, reference torch model on the dequantized float32 backbone, its item table)."""
    ds, _ = data
    weights = weights_for(data, sr)
    ref = reference_model(weights, sr, ds.items)
    return weights, ref, ref.embed_items(range(ds.n_items))


@pytest.fixture(scope="module")
def bundle(data, sr, trained, tmp_path_factory):
    ds, split = data
    weights, _, table = trained
    out = tmp_path_factory.mktemp("export") / "bundle"
    return export_bundle(
        weights,
        sr,
        ds.items,
        table,
        out,
        k=10,
        metadata={"model_version": "test-1"},
        popularity=popularity_from_sequences(split.train, ds.n_items),
    )


# ----------------------------------------------------------------------------------------------- scorer
def test_scorer_matches_torch_topk(tmp_path):
    g = torch.Generator().manual_seed(0)
    table = torch.randn(200, 24, generator=g) * 3
    path = export_scorer(table, tmp_path / "scorer.onnx", k=10)
    sess = session(path)
    assert [i.name for i in sess.get_inputs()] == ["user_embedding"]
    assert [o.name for o in sess.get_outputs()] == ["scores", "indices"]
    for batch in (1, 7):  # dynamic batch
        users = torch.randn(batch, 24, generator=g)
        scores, idx = sess.run(None, {"user_embedding": users.numpy()})
        ref_scores, ref_idx = torch_topk(table, users, 10)
        assert scores.dtype == np.float32 and idx.dtype == np.int64 and scores.shape == (batch, 10)
        np.testing.assert_array_equal(idx, ref_idx)
        np.testing.assert_allclose(scores, ref_scores, atol=1e-5)
        assert (np.diff(scores, axis=1) <= 0).all()


def test_large_scorer_tables_go_to_external_data(tmp_path, monkeypatch):
    """Tables past protobuf's 2 GiB limit are written as ONNX external data; shrink the threshold to test it."""
    import laser_core.bundle as bundle
    from laser_core.bundle import read_scorer_table

    monkeypatch.setattr(bundle, "EXTERNAL_DATA_BYTES", 1024)
    table = np.random.default_rng(4).standard_normal((300, 24)).astype(np.float32)
    path = export_scorer(table, tmp_path / "scorer.onnx", k=7)
    assert (tmp_path / "scorer.onnx.data").stat().st_size >= table.nbytes
    assert path.stat().st_size < 4096
    users = np.random.default_rng(5).standard_normal((3, 24)).astype(np.float32)
    scores, idx = ort.InferenceSession(str(path)).run(["scores", "indices"], {"user_embedding": users})
    normed = table / np.linalg.norm(table, axis=1, keepdims=True)
    ref = (users / np.linalg.norm(users, axis=1, keepdims=True)) @ normed.T
    assert (idx == np.argsort(-ref, axis=1)[:, :7]).all()
    np.testing.assert_allclose(scores, np.take_along_axis(ref, idx, 1), atol=1e-5)
    np.testing.assert_allclose(read_scorer_table(path), normed, atol=1e-6)


def test_scorer_accepts_numpy_and_rejects_bad_k(tmp_path):
    table = np.random.default_rng(0).normal(size=(5, 4)).astype(np.float32)
    scores, idx = session(export_scorer(table, tmp_path / "s.onnx", k=5)).run(None, {"user_embedding": table})
    np.testing.assert_array_equal(idx[:, 0], np.arange(5))  # each row is its own nearest item
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-6)
    with pytest.raises(ValueError, match="k=6 exceeds the number of items in the table \\(5\\)"):
        export_scorer(table, tmp_path / "t.onnx", k=6)
    with pytest.raises(ValueError, match="positive integer"):
        export_scorer(table, tmp_path / "t.onnx", k=0)
    with pytest.raises(ValueError, match="non-finite"):
        export_scorer(np.full((3, 2), np.nan), tmp_path / "t.onnx", k=1)


# ----------------------------------------------------------------------------- torch-side tensor path
def test_forward_takes_numpy_or_torch_batches_and_reads_sr_encode(data, sr, trained):
    _, ref, _ = trained
    hists = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [5], [3, 7]]
    batch = ref.collate(hists)
    with torch.no_grad():
        expected = ref.embed(hists).user_embedding
        t = batch.to_torch()
        got = ref(t).user_embedding
        prefix, _ = ref.prefix(t)
        by_hand, _ = ref.mformer(sr.encode(t.item_ids, t.item_mask), t.item_mask.bool())
    assert torch.equal(got, expected) and torch.equal(prefix, by_hand)
    with pytest.raises(TypeError, match="model.embed\\(histories\\)"):
        ref(hists)


def test_cold_item_treatment_uses_the_mask_token(trained, sr):
    ids = torch.tensor([[0, COLD_ITEM]])
    mask = torch.tensor([[False, True]])
    with torch.no_grad():
        cold = sr.encode(ids, mask)
        masked = sr.forward(torch.tensor([[0, sr.mask_token]]))  # BERT4Rec's [MASK] at a visible position
    assert torch.allclose(cold, masked, atol=1e-6)


def test_dequantized_export_model_reproduces_the_4bit_model(data, sr, trained):
    """The exported weights are the NF4 model's, dequantized: embeddings agree with the trained 4-bit model."""
    ds, _ = data
    weights, ref, _ = trained
    nf4 = build_laser(weights.spec, ds.items, sr, weights)
    nf4.train()
    with torch.no_grad():
        a = nf4.embed([[1, 2, 3], [7]]).user_embedding
        b = ref.embed([[1, 2, 3], [7]]).user_embedding
    assert torch.allclose(a, b, atol=1e-3)


# --------------------------------------------------------------------------------------------- bundle
def test_user_tower_matches_torch_on_variable_length_histories(data, trained, bundle):
    ds, _ = data
    _, ref, table = trained
    manifest = json.loads((bundle / MANIFEST).read_text())
    hists = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], [5], [3, 7], [20, 21, 22, 23, 24]]
    batch = ref.collate(hists)
    with torch.no_grad():
        expected = ref(batch).user_embedding
    tower = session(bundle / "user_tower.onnx")
    feeds = batch.feeds(["item_ids", "item_mask", "input_ids", "attention_mask"])
    ids = feeds["input_ids"]
    assert [i.name for i in tower.get_inputs()] == manifest["user_tower"]["inputs"] == list(feeds)
    got = tower.run(["user_embedding"], feeds)[0]
    assert got.shape == (4, ref.backbone.hidden_size)
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-4)
    # a shorter SR window (dynamic L_sr) gives the same embedding: padding is masked
    short = {
        **feeds,
        "item_ids": feeds["item_ids"][1:2, -1:],
        "item_mask": feeds["item_mask"][1:2, -1:],
        "input_ids": ids[1:2, -len(ref.tokenize([[5]])[0]) :],
        "attention_mask": np.ones((1, len(ref.tokenize([[5]])[0])), dtype=np.int64),
    }
    np.testing.assert_allclose(tower.run(["user_embedding"], short)[0][0], expected[1].numpy(), atol=1e-4)
    # then through the scorer: the same top-10 as torch
    scores, idx = session(bundle / "scorer.onnx").run(None, {"user_embedding": got})
    ref_scores, ref_idx = torch_topk(table, expected, 10)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-4)


def test_bundle_layout_and_manifest(data, sr, bundle):
    ds, split = data
    manifest = json.loads((bundle / MANIFEST).read_text())
    assert manifest["format_version"] == 2 and manifest["k"] == 10
    assert manifest["ann_index"] is None and manifest["bitune"]["fusion"] == "none"  # format 2: always written
    assert manifest["n_items"] == manifest["n_trained_items"] == ds.n_items
    assert manifest["dim"] == 64 and manifest["sr"] == {"model": "bert4rec", "max_len": sr.config.max_len}
    assert TextConfig.model_validate(manifest["text"]) == TEXT
    assert manifest["bitune"]["prefix"] == "mformer" and manifest["bitune"]["pooling"] == "suffix"
    assert manifest["backbone"]["exported_weights"] == "dequantized from nf4"
    assert manifest["metadata"] == {"model_version": "test-1"}
    assert manifest["cold_item"]["item_id"] == COLD_ITEM and "[MASK]" in manifest["cold_item"]["treatment"]
    assert manifest["parity_max_abs_diff"] < 1e-4
    assert {"scorer.onnx", "user_tower.onnx", "items.parquet", "tokenizer/tokenizer.json"} <= set(manifest["files"])
    for name, digest in manifest["files"].items():
        assert sha256_file(bundle / name) == digest, name
    cat = pd.read_parquet(bundle / "items.parquet")
    assert list(cat.columns) == ["item_id", "title", "brand", "category", "popularity"]
    assert cat["item_id"].tolist() == ds.items["item_id"].tolist()  # table row order
    assert cat["popularity"].to_numpy().tolist() == popularity_from_sequences(split.train, ds.n_items).tolist()
    assert cat["popularity"].sum() == sum(len(s) for s in split.train)


def test_export_bundle_rejects_bad_input_before_the_slow_part(data, sr, trained, tmp_path):
    ds, _ = data
    weights, _, table = trained
    with pytest.raises(ValueError, match="items has 39 rows but the table has 40"):
        export_bundle(weights, sr, ds.items.iloc[:-1], table, tmp_path / "a")
    with pytest.raises(ValueError, match="k must be an integer in 1..40"):
        export_bundle(weights, sr, ds.items, table, tmp_path / "b", k=41)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(FileExistsError, match="not an empty directory"):
        export_bundle(weights, sr, ds.items, table, tmp_path / "full")
    with pytest.raises(ValueError, match="needs the frozen ID-based recommender"):
        export_bundle(weights, None, ds.items, table, tmp_path / "c")
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


def test_gru4rec_encoder_is_a_clear_not_implemented(data, tmp_path):
    ds, split = data
    gru = fit(SRConfig(model="gru4rec", hidden_size=16, max_len=8), TrainConfig(epochs=1, progress=False), split).model
    weights = weights_for(data, gru, quant="none")
    with pytest.raises(NotImplementedError, match="not GRU4Rec \\(setting sr.model\\)"):
        export_bundle(weights, gru, ds.items, np.ones((ds.n_items, 64)), tmp_path / "b")
    assert not (tmp_path / "b").exists()
    ref = reference_model(weights, gru, ds.items)
    with pytest.raises(NotImplementedError, match="GRU4Rec"):
        export_user_tower(ref, tmp_path / "t.onnx")


@pytest.mark.parametrize(
    ("sr_model", "prefix", "pooling"), [("sasrec", "mformer", "suffix"), (None, "plain", "mean"), (None, "none", "eos")]
)
def test_other_encoders_prefixes_and_poolings_export_with_parity(data, sr_model, prefix, pooling, tmp_path):
    ds, _ = data
    sr_m = build_model(SRConfig(model=sr_model, hidden_size=16, max_len=8), ds.n_items).eval() if sr_model else None
    weights = weights_for(data, sr_m, quant="none", prefix=prefix, pooling=pooling)
    ref = reference_model(weights, sr_m, ds.items)
    entry = export_user_tower(ref, tmp_path / "tower.onnx")
    hists = [[1, 2, 3, 4, 5, 6], [9]] + ([[COLD_ITEM, 4]] if prefix == "mformer" else [])
    batch = ref.collate(hists, ref.tokenize([[i for i in h if i >= 0] for h in hists]))
    with torch.no_grad():
        expected = ref(batch).user_embedding
        plain = ref.embed(hists[:2]).user_embedding
    assert torch.allclose(expected[:2], plain, atol=1e-6)
    feeds = batch.feeds(["item_ids", "item_mask"] * (sr_m is not None) + ["input_ids", "attention_mask"])
    sess = session(tmp_path / "tower.onnx")
    assert {i.name for i in sess.get_inputs()} == set(entry["inputs"]) == set(feeds)
    got = sess.run(["user_embedding"], feeds)[0]
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-4)
    assert not np.allclose(l2_normalize(got[0]), l2_normalize(got[1]), atol=1e-3)  # rows differ


# ------------------------------------------------------------- the item side: the weights that made the table
NEW_ITEMS = pd.DataFrame(
    {
        "item_id": ["new-1", "new-2"],
        "title": ["Acme Trail Running Shoes", "Cast Iron Pan"],
        "brand": ["Acme", ""],
        "category": ["Shoes", "Kitchen"],
    }
)


def initializer_bytes(path) -> int:
    import onnx

    return sum(
        int(np.prod(t.dims)) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
        for t in onnx.load(str(path)).graph.initializer
    )


@pytest.fixture(scope="module")
def two_sided(data, sr):
    """Stage-2-like weights whose item side (the stage-1 weights that made the table) differs from the user side,
    the torch models of each weight set alone, and the table the item side makes."""
    ds, _ = data
    stage1 = weights_for(data, sr, quant="none")
    g = torch.Generator().manual_seed(7)
    stage2 = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in stage1.state.items()}
    weights = LaserWeights(
        spec=stage1.spec,
        state=stage2,
        summary={"stage": 2, "best_epoch": 0},
        item_state=item_state_beside(stage1.state, stage2),
    )
    items_only = reference_model(stage1, sr, ds.items)
    users_only = reference_model(LaserWeights(spec=stage1.spec, state=stage2), sr, ds.items)
    return {
        "weights": weights,
        "both": reference_model(weights, sr, ds.items),
        "items_only": items_only,
        "users_only": users_only,
        "table": items_only.embed_items(range(ds.n_items)),
    }


def test_item_rows_are_made_by_the_table_making_weights_in_torch(data, two_sided):
    ds, _ = data
    both, table = two_sided["both"], two_sided["table"]
    assert two_sided["weights"].cold_item_weights() == "item_side"
    assert item_state_beside(two_sided["weights"].state, two_sided["weights"].state) is None  # equal: nothing kept
    rows = [0, 7, 23]
    # (a) catalogue items re-embedded through the cold-item path, with their trained ids, reproduce the table
    torch.testing.assert_close(
        both.embed_cold_items(ds.items.iloc[rows], item_ids=rows), table[rows], atol=1e-5, rtol=0
    )
    torch.testing.assert_close(both.embed_items(range(ds.n_items)), table, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"item ids \[40\] are neither catalogue indices \(0..39\)"):
        both.embed_cold_items(ds.items.iloc[:1], item_ids=[ds.n_items])
    # (b) a new item gets the item side's weights, not the user side's
    cold = both.embed_cold_items(NEW_ITEMS)
    torch.testing.assert_close(cold, two_sided["items_only"].embed_cold_items(NEW_ITEMS), atol=1e-5, rtol=0)
    assert (cold - two_sided["users_only"].embed_cold_items(NEW_ITEMS)).abs().max() > 1e-2
    with torch.no_grad():  # users get the user side
        torch.testing.assert_close(
            both.embed([[1, 2, 3], [5]]).user_embedding,
            two_sided["users_only"].embed([[1, 2, 3], [5]]).user_embedding,
            atol=1e-5,
            rtol=0,
        )


def test_bundle_tower_carries_the_item_side_used_by_add_items(data, sr, two_sided, bundle, tmp_path):
    from laser_core.serving import Recommender, add_items

    ds, _ = data
    weights, table = two_sided["weights"], two_sided["table"]
    out = export_bundle(weights, sr, ds.items, table, tmp_path / "bundle", k=5)
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["user_tower"]["inputs"][-1] == "item_side" and manifest["parity_max_abs_diff"] < 1e-4
    assert manifest["cold_item"]["item_weights"] == "item_side"
    # one backbone in the graph: its weights grow by the item side's (M-Former + suffix) only
    item_bytes = 4 * sum(v.numel() for v in weights.item_state.values())
    grown = initializer_bytes(out / "user_tower.onnx") - initializer_bytes(bundle / "user_tower.onnx")
    assert 0.95 * item_bytes <= grown <= 1.05 * item_bytes
    rec = Recommender.load(out)
    assert rec.cold_item_weights == "item_side"
    rows = [0, 7, 23]
    np.testing.assert_allclose(
        rec.item_embeddings(rec.catalogue.iloc[rows], item_ids=rows), table[rows].numpy(), atol=1e-4
    )
    with pytest.raises(ValueError, match=r"item ids \[-2\] are neither catalogue rows"):
        rec.item_embeddings(rec.catalogue.iloc[:1], item_ids=[-2])
    extended = Recommender.load(add_items(out, NEW_ITEMS, tmp_path / "extended"))
    np.testing.assert_allclose(
        extended.table()[-2:], l2_normalize(two_sided["items_only"].embed_cold_items(NEW_ITEMS).numpy()), atol=1e-4
    )
    with torch.no_grad():
        users = two_sided["users_only"].embed([[1, 2, 3], [5]]).user_embedding
    np.testing.assert_allclose(rec.user_embeddings([[1, 2, 3], [5]]), users.numpy(), atol=1e-4)


def test_laser_weights_materializer_keeps_the_item_side(two_sided, tmp_path, materializer):
    from steps.materializers import LaserWeightsMaterializer

    weights = two_sided["weights"]
    for name, w in (("two", weights), ("one", LaserWeights(spec=weights.spec, state=weights.state))):
        mat = materializer(LaserWeightsMaterializer, tmp_path / name)
        mat.save(w)
        back = mat.load(LaserWeights)
        assert back.spec == w.spec and back.state.keys() == w.state.keys()
        assert (back.item_state is None) == (w.item_state is None)
        for k in w.state:
            assert torch.equal(back.state[k], w.state[k])
            assert w.item_state is None or torch.equal(back.item_state[k], w.item_state[k])
    assert (tmp_path / "two" / "item_weights.safetensors").is_file()
    assert not (tmp_path / "one" / "item_weights.safetensors").exists()


def test_text_only_tower_with_an_item_side_selects_it_per_row(data, tmp_path):
    """The plain-prefix tower (no item ids) with its own item side: item_side picks the weights row by row."""
    ds, _ = data
    stage1 = weights_for(data, None, quant="none", prefix="plain")
    g = torch.Generator().manual_seed(8)
    stage2 = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in stage1.state.items()}
    ref = reference_model(
        LaserWeights(spec=stage1.spec, state=stage2, item_state=item_state_beside(stage1.state, stage2)), None, ds.items
    )
    entry = export_user_tower(ref, tmp_path / "tower.onnx")
    assert entry["inputs"] == ["input_ids", "attention_mask", "item_side"]
    batch = ref.collate([[4], [4], [1, 2, 3]], item_side=[1, 0, 0])
    with torch.no_grad():
        expected = ref(batch).user_embedding
        item = reference_model(stage1, None, ds.items).embed_items([4])
    got = session(tmp_path / "tower.onnx").run(["user_embedding"], batch.feeds(entry["inputs"]))[0]
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-4)
    np.testing.assert_allclose(got[0], item[0].numpy(), atol=1e-4)  # the item row: the table-making weights
    assert np.abs(got[0] - got[1]).max() > 1e-2  # the same text as a user: the other side
