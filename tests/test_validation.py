"""The Great Expectations suite: a clean dataset passes; planted defects are each reported with counts."""

import pandas as pd
import pytest

from laser_core.data import load_dataset
from laser_core.data.validation import DataValidationError, ValidationReport, validate


@pytest.fixture(scope="module")
def small():
    return load_dataset({"synthetic": {"n_users": 60, "n_items": 40, "seed": 3}})


def test_clean_dataset_passes(small):
    report = validate(small, {"min_sequence_length": 3, "max_sequence_length": 50})
    assert report.success, report.to_markdown()
    assert len(report.outcomes) == 19 and not report.skipped
    report.raise_for_failures()  # no error
    assert ValidationReport.from_dict(report.to_dict()).to_dict() == report.to_dict()


def test_planted_defects_are_each_reported(small):
    inter, items = small.interactions_frame(), small.items.copy()
    inter.loc[0, "user_id"] = None  # null user id
    inter.loc[1, "item_id"] = "not-in-catalogue"  # unknown item
    u = inter.loc[20, "user_id"]
    first = inter.index[inter["user_id"] == u][0]
    inter.loc[first + 1, "timestamp"] = 0  # goes back in time
    inter = pd.concat([inter, inter.iloc[[30]]], ignore_index=True)  # duplicate (user, item, timestamp)
    items.loc[3, "title"] = "   "  # empty title
    items.loc[4, "item_id"] = items.loc[5, "item_id"]  # duplicate item id
    report = validate(interactions=inter, items=items, config={"max_sequence_length": 4}, name="planted")
    assert not report.success
    failed = {(o.table, o.expectation, o.column): o for o in report.failures}
    assert failed[("interactions", "expect_column_values_to_not_be_null", "user_id")].unexpected_count == 1
    assert "not-in-catalogue" in failed[("interactions", "expect_column_values_to_be_in_set", "item_id")].examples
    assert failed[("interactions", "expect_column_values_to_be_between", "time_delta")].examples == [f"user {u}"]
    assert (
        failed[("interactions", "expect_compound_columns_to_be_unique", "user_id,item_id,timestamp")].unexpected_count
        == 2
    )
    assert failed[("items", "expect_column_value_lengths_to_be_between", "title")].unexpected_count == 1
    assert failed[("items", "expect_column_values_to_be_unique", "item_id")].unexpected_count == 2
    assert failed[("users", "expect_column_values_to_be_between", "n_items")].unexpected_count > 0
    with pytest.raises(DataValidationError) as err:
        report.raise_for_failures()
    message = str(err.value)
    assert "7 of 19 expectations failed" in message
    assert "interactions.user_id: 1 of" in message and "items.title: 1 of" in message
    assert "**FAIL**" in report.to_markdown()


def test_missing_columns_and_no_timestamps(small):
    inter = small.interactions_frame().drop(columns=["item_id"])
    report = validate(interactions=inter, items=small.items, name="nocol")
    assert [o.column for o in report.failures] == ["item_id"]
    no_ts = small.interactions_frame().assign(timestamp=pd.array([pd.NA] * len(inter), dtype="Int64"))
    report = validate(interactions=no_ts, items=small.items)
    assert report.success and "no timestamps" in report.skipped[0]


def test_empty_data_fails(small):
    """An empty interactions file used to pass ("PASSED", 0 users)."""
    inter = small.interactions_frame().iloc[:0]
    report = validate(interactions=inter, items=small.items.iloc[:0], name="empty")
    assert not report.success
    failed = {(o.table, o.expectation, o.column) for o in report.failures}
    assert failed == {
        ("interactions", "expect_table_row_count_to_be_between", None),
        ("items", "expect_table_row_count_to_be_between", None),
        ("users", "expect_table_row_count_to_be_between", None),
        ("users", "expect_column_max_to_be_between", "n_items"),
    }
    assert "FAILED" in report.to_markdown() and "observed=0" in report.to_markdown()


def test_sequences_too_short_for_the_split(small):
    """Every user has fewer than 3 items: no validation and test target for anyone."""
    inter = small.interactions_frame()
    inter = inter[inter["position"] < 2]
    report = validate(interactions=inter, items=small.items, name="short")
    assert [(o.table, o.expectation) for o in report.failures] == [("users", "expect_column_max_to_be_between")]
    assert report.failures[0].details["observed"] == 2


def test_negative_timestamps_fail(small):
    inter = small.interactions_frame()
    inter["timestamp"] = inter["timestamp"] - int(inter["timestamp"].max()) - 10  # all < 0, order kept
    report = validate(interactions=inter, items=small.items, name="negative")
    assert [(o.table, o.column) for o in report.failures] == [("interactions", "timestamp")]
    assert report.failures[0].unexpected_count == len(inter)
