"""bench/text_sides.py: the causal LM's three poolings from one forward are Laser's own frozen item path (eos and
mean pooling), they give different tables, and the benchmark scores TF-IDF, a tiny Llama and a tiny sentence
encoder (built from configs, no download) by their similarity alone on validation users."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from conftest import REPO, tiny_spec
from test_controls_bench import tiny_folder  # noqa: F401  (the fixture: configs/tiny.yaml's data as a folder)

sys.path.insert(0, str(REPO / "bench"))

DATA = {"n_users": 40, "n_items": 24, "seed": 5}


def test_poolings_are_laser_frozen_item_path_and_differ(data):
    import text_sides

    from laser_core.frozen_table import frozen_spec
    from laser_core.model import build_laser

    ds, _ = data
    tables = {}
    for pooling in ("eos", "mean"):
        model = build_laser(frozen_spec(tiny_spec(quant="none", pooling=pooling)), ds.items, None, device="cpu")
        tables[pooling] = model.embed_items(range(ds.n_items), batch_size=5, fuse=False)
    texts = [model.formatter.item_text(i) for i in range(ds.n_items)]
    pooled = text_sides.causal_poolings(model.backbone, texts, batch_size=7)
    for pooling in ("eos", "mean"):
        torch.testing.assert_close(pooled[pooling], tables[pooling], atol=2e-4, rtol=1e-4)
    assert set(pooled) == set(text_sides.POOLINGS)
    for a, b in (("eos", "mean"), ("eos", "last"), ("mean", "last")):
        assert not torch.allclose(pooled[a], pooled[b], atol=1e-3), (a, b)


def _tiny_encoder(folder, texts):
    """A 2-layer BERT with a word-level vocabulary of ``texts`` and mean pooling, saved as a sentence-transformers
    folder."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    words = sorted({w for t in texts for w in t.lower().replace("(", " ").replace(")", " ").replace(",", " ").split()})
    folder.mkdir(parents=True)
    (folder / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    tok = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"))
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=len(tok), hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32
    )
    BertModel(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    return folder


def test_bench_scores_every_candidate_on_validation(tmp_path, monkeypatch, tiny_folder):  # noqa: F811
    import pandas as pd
    import text_sides

    items = pd.read_parquet(tiny_folder / "items.parquet")
    enc = _tiny_encoder(tmp_path / "enc", items["title"].astype(str).tolist())
    argv = [
        "--data-dir",
        str(tiny_folder),
        "--config",
        str(REPO / "configs" / "tiny.yaml"),
        "--name",
        "tiny",
        "--workdir",
        str(tmp_path / "wd"),
        "--out",
        str(tmp_path / "results"),
        "--threads",
        "1",
        "--valid-users",
        "50",
        "--prompts",
        "template,product",
        "--encoder",
        f"tinybert={enc}",
        "--combine",
    ]
    assert text_sides.main(argv) == 0
    out = json.loads((tmp_path / "results" / "text_sides_tiny.json").read_text(encoding="utf8"))
    rows = out["candidates"]
    llm = [f"tiny-random-llama-Lall/{p}/{q}" for p in ("template", "product") for q in text_sides.POOLINGS]
    models = {*llm, "tinybert/description", "tinybert/title"}
    combined = [c for c in rows if c.startswith("combined/")]
    assert set(rows) == {"tfidf/word", "tfidf/char", *models, *combined} and len(combined) == 1
    best = max(models, key=lambda c: rows[c]["ndcg@10"])
    assert rows[combined[0]]["parts"][1] == best and rows[combined[0]]["parts"][0].startswith("tfidf/")
    assert out["valid_users"] == 50 and out["tfidf_bar"] == max(
        rows["tfidf/word"]["ndcg@10"], rows["tfidf/char"]["ndcg@10"]
    )
    for name, row in rows.items():
        assert 0.0 <= row["ndcg@10"] <= 1.0, name
        assert row["form"] in ("last", "decay5") and row["items_per_s"] > 0, name
        if not name.startswith("tfidf/"):  # the per-user path agrees with choose_on_validation's means
            assert row["vs_tfidf"]["diff"] == pytest.approx(row["ndcg@10"] - out["tfidf_bar"], abs=1e-9), name
            assert row["vs_tfidf"]["se"] >= 0
        kinds = {g["transform"] for g in row["grid"]}
        assert kinds == ({"raw"} if name.startswith(("tfidf/", "combined/")) else {"raw", "centered", "whitened"}), name
    # pooling variants are different tables, hence (generally) different grids
    assert rows[llm[0]]["grid"] != rows[llm[1]]["grid"]

    # a second run reads every table from the cache (computing one would fail) and keeps the measured speeds
    def no_forward(*a, **k):
        raise AssertionError("a cached table was computed again")

    monkeypatch.setattr(text_sides, "causal_poolings", no_forward)
    monkeypatch.setattr(text_sides, "encode_texts", no_forward)
    assert text_sides.main(argv) == 0
    again = json.loads((tmp_path / "results" / "text_sides_tiny.json").read_text(encoding="utf8"))
    assert len(again["commands"]) == 2
    keep = ("ndcg@10", "transform", "form")
    assert {c: [r[k] for k in keep] for c, r in again["candidates"].items()} == {
        c: [r[k] for k in keep] for c, r in rows.items()
    }
    models = [c for c in rows if not c.startswith("tfidf/")]  # TF-IDF is refitted (milliseconds), not cached
    assert [again["candidates"][c]["items_per_s"] for c in models] == [rows[c]["items_per_s"] for c in models]
