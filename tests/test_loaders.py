"""Every loader on a small fixture written here (plus the real shared data where present), and a malformed
input case for each that must name the file and the line/field."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import BEAUTY, SCIENTIFIC, shared, write_table
from laser_core.data import DataFormatError, DatasetConfig, detect_format, leave_one_out, load_dataset
from laser_core.data.model import SeqDataset, normalize_text


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj), encoding="utf8")


def write_jsonl_gz(path: Path, rows) -> None:
    with gzip.open(path, "wt", encoding="utf8") as fh:
        for r in rows:
            fh.write((r if isinstance(r, str) else json.dumps(r)) + "\n")


# ------------------------------------------------------------------ RecFormer
def recformer_fixture(root: Path, meta: str = "meta.json") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    smap = {"A0": 0, "A1": 1, "A2": 2, "A3": 3}
    write_json(root / "smap.json", smap)
    write_json(root / "train.json", {"0": [0, 1], "1": [2], "2": [3, 3, 0]})
    write_json(root / "val.json", {"0": [2], "2": [1]})
    write_json(root / "test.json", {"0": [3], "2": [2]})
    texts = [
        ("Glue &amp; Tape", "Gor", "Tools  Adhesives"),
        ("Saw", "", "Tools"),
        ("Drill", "DeW", ""),
        ("Ruler", "Acme", "Tools Measuring"),
    ]
    if meta == "meta.json":
        write_json(
            root / meta,
            {
                str(i): {"input": [{"title": t, "brand": b, "category": c}], "label": []}
                for i, (t, b, c) in enumerate(texts)
            },
        )
    else:
        write_json(root / meta, {f"A{i}": {"title": t, "brand": b, "category": c} for i, (t, b, c) in enumerate(texts)})
    return root


@pytest.mark.parametrize("meta", ["meta.json", "meta_data.json"])
def test_recformer_fixture(tmp_path, meta):
    ds = load_dataset({"path": str(recformer_fixture(tmp_path / "rf", meta))})
    assert detect_format(tmp_path / "rf") == "recformer"
    assert ds.users == ["0", "1", "2"]
    assert [s.tolist() for s in ds.sequences] == [[0, 1, 2, 3], [2], [3, 3, 0, 1, 2]]
    assert ds.timestamps is None
    assert ds.items.loc[0, "title"] == "Glue & Tape"  # HTML unescaped
    assert ds.items.loc[0, "category"] == "Tools Adhesives"  # whitespace normalised
    assert ds.items.loc[0, "item_id"] == "A0"
    split = leave_one_out(ds)
    assert split.train_only_users.tolist() == [1]
    assert split.train[2].tolist() == [3, 3, 0] and split.valid_target[2] == 1 and split.test_target[2] == 2


def test_recformer_malformed(tmp_path):
    root = recformer_fixture(tmp_path / "rf")
    write_json(root / "train.json", {"0": [0, 1], "1": [2, 99]})
    with pytest.raises(DataFormatError, match=r"train\.json.*record '1'.*position 1: item id 99"):
        load_dataset({"path": str(root)})
    (root / "train.json").write_text('{"0": [0, 1],\n "1": [2,', encoding="utf8")
    with pytest.raises(DataFormatError, match=r"train\.json, line 2: invalid JSON"):
        load_dataset({"path": str(root)})
    recformer_fixture(root)
    write_json(root / "meta.json", {"0": {"input": []}})
    with pytest.raises(DataFormatError, match=r"meta\.json, record '0', field 'input'"):
        load_dataset({"path": str(root)})


def test_recformer_scientific_matches_paper_and_files():
    root = shared(SCIENTIFIC)
    ds = load_dataset({"path": str(root)})
    st = ds.stats()
    assert (st["users"], st["items"], st["interactions"]) == (11041, 5327, 76896)
    assert round(st["avg_length"], 2) == 6.96
    split = leave_one_out(ds)
    train = json.loads((root / "train.json").read_text())
    val = json.loads((root / "val.json").read_text())
    test = json.loads((root / "test.json").read_text())
    assert len(split.eval_users) == len(val) == len(test) == 11039
    assert len(split.train_only_users) == 2
    for u, user in enumerate(split.users):
        assert split.train[u].tolist() == train[user]
        assert ([split.valid_target[u]] if split.valid_target[u] >= 0 else []) == val.get(user, [])
        assert ([split.test_target[u]] if split.test_target[u] >= 0 else []) == test.get(user, [])


# ---------------------------------------------------------------- SeqRecBench
def seqrecbench_fixture(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    write_jsonl_gz(
        root / "item2title.jsonl.gz",
        [
            {"ItemID": 100, "Title": "Lip  Balm"},
            {"ItemID": 101, "Title": "Shampoo &quot;Pro&quot;"},
            {"ItemID": 102, "Title": "Comb"},
        ],
    )
    write_jsonl_gz(
        root / "user2item.jsonl.gz",
        [
            {"UserID": 100, "ItemID": [100, 101, 102], "Timestamp": [1, 2, 2]},
            {"UserID": 101, "ItemID": [102, 100], "Timestamp": [5, 9]},
        ],
    )
    return root


def test_seqrecbench_fixture(tmp_path):
    ds = load_dataset({"path": str(seqrecbench_fixture(tmp_path / "srb"))})
    assert ds.users == ["100", "101"]
    assert [s.tolist() for s in ds.sequences] == [[0, 1, 2], [2, 0]]
    assert ds.timestamps[1].tolist() == [5, 9]
    assert ds.items["title"].tolist() == ["Lip Balm", 'Shampoo "Pro"', "Comb"]
    assert (ds.items["brand"] == "").all()


def test_seqrecbench_malformed(tmp_path):
    root = seqrecbench_fixture(tmp_path / "srb")
    write_jsonl_gz(
        root / "user2item.jsonl.gz",
        [
            {"UserID": 100, "ItemID": [100], "Timestamp": [1]},
            {"UserID": 101, "ItemID": [102, 100], "Timestamp": [5]},
        ],
    )
    with pytest.raises(DataFormatError, match=r"user2item\.jsonl\.gz, line 2, field 'Timestamp'"):
        load_dataset({"path": str(root)})
    write_jsonl_gz(root / "user2item.jsonl.gz", [{"UserID": 100, "ItemID": [555], "Timestamp": [1]}])
    with pytest.raises(DataFormatError, match=r"line 1, field 'ItemID': item 555 is not in"):
        load_dataset({"path": str(root)})
    write_jsonl_gz(root / "item2title.jsonl.gz", [{"ItemID": 100, "Title": "x"}, "{not json"])
    with pytest.raises(DataFormatError, match=r"item2title\.jsonl\.gz, line 2: invalid JSON"):
        load_dataset({"path": str(root)})


def test_seqrecbench_beauty_counts():
    ds = load_dataset({"path": str(shared(BEAUTY))})
    st = ds.stats()
    assert (st["users"], st["items"], st["interactions"]) == (22332, 12086, 198215)
    assert all((np.diff(t) >= 0).all() for t in ds.timestamps)


# --------------------------------------------------------- raw Amazon 2018
def amazon_fixture(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    write_jsonl_gz(
        root / "meta_Tools.json.gz",
        [
            {"asin": "B1", "title": "Hammer &amp; Nails", "brand": "Acme", "category": ["Tools", "Hand Tools"]},
            {"asin": "B2", "title": "", "brand": "NoTitle", "category": ["Tools"]},  # dropped: empty title
            {"asin": "B3", "title": "Level", "category": ["Tools", "Measuring"]},  # no brand
            {"asin": "B4", "title": "Tape", "brand": "Acme", "category": []},
        ],
    )
    write_jsonl_gz(
        root / "Tools_5.json.gz",
        [
            {"reviewerID": "U1", "asin": "B3", "unixReviewTime": 300, "overall": 5.0},
            {"reviewerID": "U1", "asin": "B1", "unixReviewTime": 100},
            {"reviewerID": "U1", "asin": "B2", "unixReviewTime": 150},  # item without title
            {"reviewerID": "U2", "asin": "B4", "unixReviewTime": 50},
            {"reviewerID": "U1", "asin": "B4", "unixReviewTime": 100},  # tie with B1: file order
            {"reviewerID": "U2", "asin": "B9", "unixReviewTime": 60},  # not in metadata
        ],
    )
    return root


def test_amazon2018_fixture(tmp_path):
    root = amazon_fixture(tmp_path / "amz")
    assert detect_format(root) == "amazon2018"
    ds = load_dataset({"path": str(root)})
    assert ds.name == "Tools"
    assert ds.users == ["U1", "U2"]
    ids = ds.items["item_id"].tolist()
    assert [[ids[i] for i in s] for s in ds.sequences] == [["B1", "B4", "B3"], ["B4"]]
    assert ds.timestamps[0].tolist() == [100, 100, 300]
    assert "B2" not in ids and "B9" not in ids
    row = ds.items.set_index("item_id").loc["B1"]
    assert (row["title"], row["brand"], row["category"]) == ("Hammer & Nails", "Acme", "Tools Hand Tools")
    assert ds.items.set_index("item_id").loc["B3", "brand"] == ""


def test_amazon2018_unescapes_once(tmp_path):
    """The loader normalises a title once (it used to unescape it twice: ``&amp;amp;`` became ``&``)."""
    root = amazon_fixture(tmp_path / "amz")
    write_jsonl_gz(
        root / "meta_Tools.json.gz",
        [
            {"asin": "B1", "title": "Salt &amp;amp; Pepper", "brand": "A &amp;amp; B", "category": ["X &amp;amp; Y"]},
            {"asin": "B3", "title": "Level", "category": ["Tools"]},
            {"asin": "B4", "title": "&amp;amp;", "category": []},  # not empty after one pass: kept
        ],
    )
    items = load_dataset({"path": str(root)}).items.set_index("item_id")
    assert tuple(items.loc["B1", ["title", "brand", "category"]]) == ("Salt &amp; Pepper", "A &amp; B", "X &amp; Y")
    assert items.loc["B4", "title"] == "&amp;"


def test_amazon2018_malformed(tmp_path):
    root = amazon_fixture(tmp_path / "amz")
    write_jsonl_gz(
        root / "Tools_5.json.gz",
        [
            {"reviewerID": "U1", "asin": "B1", "unixReviewTime": 100},
            {"reviewerID": "U1", "asin": "B3", "unixReviewTime": "yesterday"},
        ],
    )
    with pytest.raises(DataFormatError, match=r"Tools_5\.json\.gz, line 2, field 'unixReviewTime'"):
        load_dataset({"path": str(root)})
    write_jsonl_gz(root / "meta_Tools.json.gz", [{"title": "no asin"}])
    with pytest.raises(DataFormatError, match=r"meta_Tools\.json\.gz, line 1, field 'asin': missing field"):
        load_dataset({"path": str(root)})


# ------------------------------------------------------------- generic table
def table_fixture(root: Path, kind: str = "csv") -> Path:
    inter = pd.DataFrame(
        {
            "user_id": ["a", "a", "b", "a"],
            "item_id": ["x", "y", "x", "z"],
            "timestamp": ["30", "10", "5", "2024-01-01T00:00:00Z"],
        }
    )
    items = pd.DataFrame(
        {"item_id": ["x", "y", "z"], "title": ["X thing", "Y thing", "Z thing"], "brand": ["B", "", "B"]}
    )
    return write_table(root, inter, items, kind)


@pytest.mark.parametrize("kind", ["csv", "parquet"])
def test_table_fixture(tmp_path, kind):
    root = table_fixture(tmp_path / "tbl", kind)
    assert detect_format(root) == "table"
    ds = load_dataset({"path": str(root)})
    assert ds.users == ["a", "b"]
    ids = ds.items["item_id"].tolist()
    # ordered by time: y (10), x (30), z (2024-01-01 = 1704067200)
    assert [ids[i] for i in ds.sequences[0]] == ["y", "x", "z"]
    assert ds.timestamps[0].tolist() == [10, 30, 1704067200]
    assert ds.items["category"].tolist() == ["", "", ""]


def test_table_custom_columns_and_malformed(tmp_path):
    root = tmp_path / "tbl"
    root.mkdir()
    pd.DataFrame({"uid": ["a", "a", "b"], "iid": ["x", "q", "x"]}).to_csv(root / "events.csv", index=False)
    pd.DataFrame({"iid": ["x"], "name": ["X"]}).to_csv(root / "catalog.csv", index=False)
    cfg = {
        "format": "table",
        "path": str(root),
        "interactions_file": "events.csv",
        "items_file": "catalog.csv",
        "columns": {"user": "uid", "item": "iid", "title": "name", "timestamp": None},
    }
    with pytest.raises(DataFormatError, match=r"events\.csv, line 3, field 'iid': item not in the items table"):
        load_dataset(cfg)
    pd.DataFrame({"iid": ["x", "q"], "name": ["X", "Q"]}).to_csv(root / "catalog.csv", index=False)
    ds = load_dataset(cfg)
    assert [s.tolist() for s in ds.sequences] == [[0, 1], [0]] and ds.timestamps is None
    pd.DataFrame({"uid": ["a"], "iid": ["x"], "timestamp": ["not a time"]}).to_csv(root / "events.csv", index=False)
    cfg["columns"]["timestamp"] = "timestamp"
    with pytest.raises(DataFormatError, match=r"events\.csv, line 2, field 'timestamp'"):
        load_dataset(cfg)
    with pytest.raises(DataFormatError, match=r"missing required columns \['title'\]"):
        load_dataset({**cfg, "columns": {"user": "uid", "item": "iid"}})


# ------------------------------------------------------------------ synthetic
def test_synthetic_is_deterministic_and_sized():
    a = load_dataset({"synthetic": {"n_users": 300, "n_items": 120, "seed": 7}})
    b = load_dataset({"synthetic": {"n_users": 300, "n_items": 120, "seed": 7}})
    c = load_dataset({"synthetic": {"n_users": 300, "n_items": 120, "seed": 8}})
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()
    assert (a.n_users, a.n_items) == (300, 120)
    assert a.items["title"].str.len().min() > 5 and a.items["brand"].ne("").all()
    assert a.items["title"].is_unique
    assert all((np.diff(t) >= 0).all() for t in a.timestamps)
    with pytest.raises(ValueError, match="unknown settings"):
        load_dataset({"synthetic": {"n_user": 3}})


def test_synthetic_history_beats_popularity():
    """A model that uses the last item (first-order transition counts) clearly beats popularity."""
    from laser_core.metrics import compute_metrics

    ds = load_dataset({"synthetic": {"n_users": 2000, "n_items": 400, "seed": 0}})
    split = leave_one_out(ds)
    n = ds.n_items
    pop = np.zeros(n)
    trans = np.zeros((n, n))
    for seq in split.train:
        np.add.at(pop, seq, 1)
        np.add.at(trans, (seq[:-1], seq[1:]), 1)
    users, hist, targets = split.valid_examples()
    pop_scores = np.tile(pop, (len(users), 1))
    markov = np.stack([trans[h[-1]] + 1e-3 * pop for h in hist])
    m_pop = compute_metrics(pop_scores, targets)
    m_markov = compute_metrics(markov, targets)
    assert m_markov["ndcg@10"] > 1.5 * m_pop["ndcg@10"]


# ----------------------------------------------------------------- dispatch
def test_detect_format_errors(tmp_path):
    with pytest.raises(DataFormatError, match="cannot tell the data format"):
        detect_format(tmp_path)
    with pytest.raises(DataFormatError, match="not found"):
        load_dataset({"path": str(tmp_path / "nope")})
    with pytest.raises(ValueError):
        DatasetConfig.model_validate({"format": "csv"})


def test_normalize_text_and_frame_roundtrip():
    assert normalize_text("A &amp; B\n\t c ") == "A & B c"
    # one unescape pass: a double-escaped entity keeps the level the source wrote
    assert normalize_text("A &amp;amp; B") == "A &amp; B" and normalize_text("&amp;lt;b&amp;gt;") == "&lt;b&gt;"
    assert normalize_text(["Tools", " Hand  Tools"]) == "Tools Hand Tools"
    assert normalize_text(["R &amp;amp; D", "x"]) == "R &amp; D x"
    assert normalize_text(None) == "" and normalize_text(float("nan")) == ""
    ds = load_dataset({"synthetic": {"n_users": 40, "n_items": 30}})
    back = SeqDataset.from_frames(ds.name, ds.items, ds.interactions_frame(), ds.source)
    assert back.fingerprint() == ds.fingerprint()
