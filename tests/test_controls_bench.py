"""bench/controls.py end to end on a tiny synthetic dataset and a tiny random Llama: every row written, every
choice made on validation pairs (never on test pairs), and a second run resumes without recomputing."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import REPO, write_table

sys.path.insert(0, str(REPO / "bench"))

SYNTHETIC = {"n_users": 160, "n_items": 64, "seed": 3}  # configs/tiny.yaml's


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    """configs/tiny.yaml's synthetic data written as a table-format folder (``--data-dir`` reads it)."""
    from laser_core.data import load_dataset

    ds = load_dataset({"synthetic": SYNTHETIC})
    users, items, stamps = [], [], []
    for u, seq in enumerate(ds.sequences):
        users += [ds.users[u]] * len(seq)
        items += [ds.items["item_id"].iloc[int(i)] for i in seq]
        stamps += list(range(1_700_000_000, 1_700_000_000 + len(seq)))
    inter = pd.DataFrame({"user_id": users, "item_id": items, "timestamp": stamps})
    return write_table(tmp_path_factory.mktemp("tiny-data"), inter, ds.items[["item_id", "title", "brand", "category"]])


def test_controls_rows_chosen_on_validation_and_resumed(tmp_path, monkeypatch, tiny_folder):
    import controls

    from laser_core import hybrid
    from laser_core.config import load_config
    from laser_core.data import leave_one_out, load_dataset

    real = hybrid.choose_on_validation
    calls = []

    def spy(id_scores, tables, histories, targets, **kw):
        calls.append(([tuple(int(x) for x in h) for h in histories], np.asarray(targets).tolist(), kw["gammas"]))
        return real(id_scores, tables, histories, targets, **kw)

    monkeypatch.setattr(hybrid, "choose_on_validation", spy)
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
        "60",
        "--test-users",
        "50",
        "--sr-epochs",
        "3",
    ]
    assert controls.main(argv) == 0
    out = json.loads((tmp_path / "results" / "controls_tiny.json").read_text(encoding="utf8"))
    rows = out["rows"]
    assert list(rows) == list(controls.ROWS)
    for name, row in rows.items():
        assert set(controls.FIGURES) <= set(row) and row["test_users"] == 50, name
        assert 0.0 <= row["ndcg@10"] <= 1.0 and row["command"].startswith("python bench/controls.py")
        if name != "sasrec":
            chosen = row["chosen_on_validation"]
            assert row["valid_users"] == 60 and len(row["grid"]) >= len(hybrid.FORMS)
            assert (chosen["gamma"] == "inf") == name.endswith("_alone")
    assert rows["tfidf_hybrid"]["chosen_on_validation"]["text"] in hybrid.TFIDF_PRESETS
    assert rows["random_llm_hybrid"]["chosen_on_validation"]["text"] == "random_llm"
    assert rows["llm_hybrid"]["chosen_on_validation"]["transform"] in hybrid.TRANSFORMS
    random_grid = [{k: v for k, v in r.items() if k != "table"} for r in rows["random_llm_hybrid"]["grid"]]
    llm_grid = [{k: v for k, v in r.items() if k != "table"} for r in rows["llm_hybrid"]["grid"]]
    assert random_grid != llm_grid  # another model than the (tiny, random) configured backbone
    best = max(controls.CONTROLS, key=lambda r: rows[r]["ndcg@10"])
    assert out["best_control"] == best
    assert out["llm_contribution"] == pytest.approx(rows["llm_hybrid"]["ndcg@10"] - rows[best]["ndcg@10"])

    # every choice saw validation pairs (history = training part) only, never a test pair
    cfg = load_config(REPO / "configs" / "tiny.yaml", data_dir=str(tiny_folder))
    split = leave_one_out(load_dataset(cfg.dataset))
    _, v_hist, v_targets = split.valid_examples()
    _, t_hist, t_targets = split.test_examples()
    valid_pairs = {(tuple(int(x) for x in h), int(t)) for h, t in zip(v_hist, v_targets)}
    test_pairs = {(tuple(int(x) for x in h), int(t)) for h, t in zip(t_hist, t_targets)}
    assert len(calls) == len(controls.ROWS) - 1
    for hist, targets, _ in calls:
        pairs = set(zip(hist, targets))
        assert len(hist) == 60 and pairs <= valid_pairs and not pairs & test_pairs

    # a second run with the same data and settings recomputes nothing (no ID model, no choice)
    monkeypatch.setattr(controls, "baseline_model", lambda *a, **k: pytest.fail("the ID model was reloaded"))
    assert controls.main(argv) == 0
    assert len(calls) == len(controls.ROWS) - 1
    again = json.loads((tmp_path / "results" / "controls_tiny.json").read_text(encoding="utf8"))
    assert again["rows"] == rows
    assert "leaderboard" not in again  # a sample of test users makes no leaderboard rows

    # a saved ID model (--sr-model), all test users: leaderboard rows for every row but the ID model's own
    saved = tmp_path / "wd" / "sr-sasrec" / "best"  # the first run's ID model, as saved by its trainer
    argv2 = [a for a in argv if a not in ("--test-users", "50")] + [
        "--sr-model",
        str(saved),
        "--rows",
        "sasrec,tfidf_hybrid",
    ]
    assert controls.main(argv2) == 0
    third = json.loads((tmp_path / "results" / "controls_tiny.json").read_text(encoding="utf8"))
    assert third["settings"]["id_model"]["saved"] == str(saved.resolve())
    board = third["leaderboard"]
    assert board["dataset"] == "tiny" and list(board["rows"]) == ["tfidf_hybrid"]
    assert board["rows"]["tfidf_hybrid"]["test_users"] == third["rows"]["sasrec"]["test_users"] > 50
