"""bench/leaderboard.py: rows are checked, merged without losing others, and the README table is generated."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import leaderboard as lb  # noqa: E402


def row(ndcg: float, **kw) -> dict:
    return {"ndcg@10": ndcg, "recall@10": 2 * ndcg, "mrr": ndcg / 2, "ndcg@10_masked": ndcg + 0.01}.copy() | {
        "test_users": 100,
        "command": "x",
        **kw,
    }


def test_record_keeps_other_rows_and_refuses_bad_ones(tmp_path):
    path = tmp_path / "board.json"
    lb.record("beauty", "sasrec", row(0.05), path)
    lb.record("beauty", "tfidf_hybrid", row(0.055), path)
    lb.record("scientific", "sasrec", row(0.1), path)
    lb.record("beauty", "sasrec", row(0.052), path)  # replaced, not duplicated
    board = json.loads(path.read_text())
    assert set(board) == {"beauty", "scientific"} and set(board["beauty"]) == {"sasrec", "tfidf_hybrid"}
    assert board["beauty"]["sasrec"]["ndcg@10"] == 0.052
    with pytest.raises(ValueError, match="beauty/x: missing ndcg@10_masked"):
        lb.record("beauty", "x", {k: v for k, v in row(0.1).items() if k != "ndcg@10_masked"}, path)
    with pytest.raises(ValueError, match="ndcg@10 must be a number in"):
        lb.record("beauty", "x", row(1.5), path)
    with pytest.raises(ValueError, match="beauty/x: 50 test users, but the dataset's other rows have \\[100\\]"):
        lb.record("beauty", "x", row(0.1) | {"test_users": 50}, path)
    assert set(json.loads(path.read_text())["beauty"]) == {"sasrec", "tfidf_hybrid"}


def test_table_orders_rows_and_gives_the_ratio_to_sasrec():
    board = {
        "beauty": {"llm_hybrid": row(0.045), "sasrec": row(0.05), "popularity": row(0.005), "laser_b": row(0.06)},
        "scientific": {"sasrec": row(0.1)},
    }
    lines = lb.table(board).splitlines()
    models = [line.split("|")[2].strip() for line in lines[2:]]
    assert models == ["sasrec", "popularity", "sasrec", "llm_hybrid", "laser_b"]  # scientific first (DATASETS)
    assert [line.split("|")[1].strip() for line in lines[2:4]] == ["scientific", "beauty"]
    laser = next(line for line in lines if "laser_b" in line)
    assert "| 0.0600 | 1.200 | 0.1200 | 0.0300 | 0.0700 | 100 |" in laser


def test_readme_block_is_replaced_and_checked(tmp_path):
    text = f"intro\n{lb.START}\nold\n{lb.END}\noutro\n"
    board = {"beauty": {"sasrec": row(0.05)}}
    new = lb.render_readme(text, board)
    assert new.startswith("intro\n") and new.endswith("\noutro\n") and "old" not in new and "0.0500" in new
    assert lb.render_readme(new, board) == new
    with pytest.raises(ValueError, match="markers"):
        lb.render_readme("no markers", board)


def test_collect_reads_the_rows_other_benchmarks_wrote(tmp_path):
    (tmp_path / "controls_beauty.json").write_text(
        json.dumps({"leaderboard": {"dataset": "beauty", "rows": {"tfidf_hybrid": row(0.05)}}, "other": 1})
    )
    (tmp_path / "unrelated.json").write_text(json.dumps({"results": {}}))
    assert [(d, m) for d, m, _, _ in lb.collect_rows(tmp_path)] == [("beauty", "tfidf_hybrid")]


def test_the_readme_table_is_the_one_generated_from_the_leaderboard():
    """README.md's results table is bench/results/leaderboard.json's (regenerate: python bench/leaderboard.py readme)."""
    text = lb.README.read_text(encoding="utf8")
    board = lb.load()
    assert board, "bench/results/leaderboard.json is missing or empty"
    for dataset, rows in board.items():
        for model, r in rows.items():
            lb.check_row(dataset, model, r)
    assert lb.render_readme(text, board) == text, "run: python bench/leaderboard.py readme"
