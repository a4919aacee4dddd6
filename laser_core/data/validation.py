"""Data validation with Great Expectations 1.x, called directly (ZenML's GX integration needs GX < 1).

Three tables are checked: the interactions (one row per user-item event), the catalogue, and a per-user table
of sequence lengths. The suite: at least one interaction, item and user; required columns, non-null ids, every
interacted item in the catalogue, unique item ids, non-empty titles of at most ``max_text_chars`` characters
(the bound :func:`laser_core.data.load_dataset` cuts them to; the report's statistics count the texts it cut),
timestamps >= 0 and in time order within each
user (when timestamps exist: the time delta to the user's previous event is >= 0), no duplicate (user, item,
timestamp) rows (when timestamps exist), sequence-length bounds, and at least one sequence long enough for the
leave-one-out split (>= 3 items: a validation and a test target). :func:`validate` returns a
:class:`ValidationReport` (JSON- and Markdown-ready); :meth:`ValidationReport.raise_for_failures` raises
:class:`DataValidationError` listing each failure with counts and examples.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd
from pydantic import ConfigDict, Field

from laser_core.configbase import StrictConfig
from laser_core.data.model import SeqDataset
from laser_core.data.split import MIN_EVAL_LENGTH
from laser_core.data.text import DEFAULT_MAX_TEXT_CHARS
from laser_core.errors import EXIT_DATA, UserError
from laser_core.reporting import markdown_table

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

N_EXAMPLES = 5


class ValidationConfig(StrictConfig):
    model_config = ConfigDict(extra="forbid")

    min_sequence_length: int = Field(default=1, ge=0)
    max_sequence_length: int | None = Field(default=None, ge=1)
    check_time_order: bool = True
    check_duplicates: bool = True


@dataclass
class ExpectationOutcome:
    table: str
    expectation: str
    column: str | None
    success: bool
    element_count: int | None = None
    unexpected_count: int | None = None
    examples: list = field(default_factory=list)
    details: dict = field(default_factory=dict)

    def describe(self) -> str:
        target = f"{self.table}.{self.column}" if self.column else self.table
        text = f"{self.expectation} on {target}"
        if self.unexpected_count is not None:
            total = f" of {self.element_count}" if self.element_count is not None else ""
            text += f": {self.unexpected_count}{total} rows fail"
        if self.examples:
            text += f"; examples: {self.examples}"
        if self.details:
            text += f" ({', '.join(f'{k}={v}' for k, v in self.details.items())})"
        return text


@dataclass
class ValidationReport:
    dataset: str
    success: bool
    outcomes: list[ExpectationOutcome]
    skipped: list[str] = field(default_factory=list)
    statistics: dict = field(default_factory=dict)
    gx_version: str = ""

    @property
    def failures(self) -> list[ExpectationOutcome]:
        return [o for o in self.outcomes if not o.success]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["n_expectations"] = len(self.outcomes)
        d["n_failed"] = len(self.failures)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ValidationReport":
        return cls(
            dataset=d["dataset"],
            success=d["success"],
            outcomes=[ExpectationOutcome(**o) for o in d["outcomes"]],
            skipped=list(d.get("skipped", [])),
            statistics=dict(d.get("statistics", {})),
            gx_version=d.get("gx_version", ""),
        )

    def to_markdown(self) -> str:
        status = "PASSED" if self.success else f"FAILED ({len(self.failures)} of {len(self.outcomes)})"
        rows = [
            [
                "ok" if o.success else "**FAIL**",
                o.table,
                o.expectation,
                o.column or "",
                "" if o.unexpected_count is None else f"{o.unexpected_count} / {o.element_count}",
                ", ".join(repr(e) for e in o.examples) or _details_cell(o),
            ]
            for o in self.outcomes
        ]
        text = (
            f"# Data validation: {self.dataset}\n\n**{status}** (Great Expectations {self.gx_version})\n\n"
            + markdown_table(["", "table", "expectation", "column", "failing rows", "examples"], rows)
        )
        if self.skipped:
            text += "\nSkipped: " + "; ".join(self.skipped) + "\n"
        if self.statistics:
            text += "\n" + markdown_table(["statistic", "value"], self.statistics.items())
        return text

    def raise_for_failures(self) -> None:
        if not self.success:
            raise DataValidationError(self)


def _details_cell(o: ExpectationOutcome) -> str:
    """For a failed expectation without example rows (a table-level one): what was observed and expected."""
    if o.success or not o.details:
        return ""
    return ", ".join(f"{k}={v}" for k, v in o.details.items())


class DataValidationError(UserError, ValueError):
    exit_code = EXIT_DATA

    def __init__(self, report: ValidationReport) -> None:
        self.report = report
        lines = [
            f"data validation failed for {report.dataset!r}: {len(report.failures)} of "
            f"{len(report.outcomes)} expectations failed"
        ]
        lines += [f"  - {o.describe()}" for o in report.failures]
        super().__init__("\n".join(lines))


def frames_from_dataset(dataset: SeqDataset) -> tuple[pd.DataFrame, pd.DataFrame]:
    return dataset.interactions_frame(), dataset.items.copy()


def _users_table(inter: pd.DataFrame) -> pd.DataFrame:
    if "user_id" not in inter.columns:
        return pd.DataFrame({"user_id": [], "n_items": []})
    return inter.groupby("user_id", dropna=False, sort=False).size().rename("n_items").reset_index()


def _with_time_delta(inter: pd.DataFrame) -> pd.DataFrame:
    order = ["user_id", "position"] if "position" in inter.columns else ["user_id"]
    srt = inter.sort_values(order, kind="stable")
    delta = srt.groupby("user_id", sort=False)["timestamp"].diff()
    return srt.assign(time_delta=delta)


def validate(
    dataset: SeqDataset | None = None,
    config: ValidationConfig | dict | None = None,
    *,
    interactions: pd.DataFrame | None = None,
    items: pd.DataFrame | None = None,
    name: str | None = None,
) -> ValidationReport:
    """Run the suite over a dataset, or over raw ``interactions``/``items`` frames (as produced by
    :meth:`SeqDataset.interactions_frame` and :attr:`SeqDataset.items`)."""
    import great_expectations as gx
    import great_expectations.expectations as gxe

    cfg = config if isinstance(config, ValidationConfig) else ValidationConfig.model_validate(config or {})
    if dataset is not None:
        interactions, items = frames_from_dataset(dataset)
        name = name or dataset.name
    if interactions is None or items is None:
        raise ValueError("validate() needs a dataset or both interactions and items frames")
    name = name or "dataset"
    logging.getLogger("great_expectations").setLevel(logging.ERROR)

    has_ts = "timestamp" in interactions.columns and interactions["timestamp"].notna().any()
    skipped: list[str] = []
    suites: dict[str, tuple[pd.DataFrame, list]] = {}

    inter_exp = [gxe.ExpectTableRowCountToBeBetween(min_value=1)]
    inter_exp += [gxe.ExpectColumnToExist(column=c) for c in ("user_id", "item_id")]
    present = set(interactions.columns)
    inter_exp += [gxe.ExpectColumnValuesToNotBeNull(column=c) for c in ("user_id", "item_id") if c in present]
    catalogue_ids = items["item_id"].dropna().astype(str).unique().tolist() if "item_id" in items else []
    inter_frame = interactions
    if "item_id" in present:
        inter_frame = interactions.assign(item_id=interactions["item_id"].astype("string"))
        inter_exp.append(gxe.ExpectColumnValuesToBeInSet(column="item_id", value_set=catalogue_ids))
    if has_ts:
        inter_exp.append(gxe.ExpectColumnValuesToBeBetween(column="timestamp", min_value=0))
    if has_ts and {"user_id", "item_id"} <= present:
        if cfg.check_duplicates:
            inter_exp.append(gxe.ExpectCompoundColumnsToBeUnique(column_list=["user_id", "item_id", "timestamp"]))
        if cfg.check_time_order:
            inter_frame = _with_time_delta(inter_frame)
            inter_exp.append(gxe.ExpectColumnValuesToBeBetween(column="time_delta", min_value=0))
    else:
        skipped.append("time order and (user, item, timestamp) duplicates: the data has no timestamps")
    suites["interactions"] = (inter_frame, inter_exp)

    item_exp = [gxe.ExpectTableRowCountToBeBetween(min_value=1)]
    item_exp += [gxe.ExpectColumnToExist(column=c) for c in ("item_id", "title")]
    item_frame = items
    if "item_id" in items.columns:
        item_exp += [
            gxe.ExpectColumnValuesToNotBeNull(column="item_id"),
            gxe.ExpectColumnValuesToBeUnique(column="item_id"),
        ]
    provenance = dataset.source if dataset is not None else {}
    max_chars = int(provenance.get("max_text_chars", DEFAULT_MAX_TEXT_CHARS))
    if "title" in items.columns:
        item_frame = items.assign(title=items["title"].astype("string").str.strip())
        item_exp += [
            gxe.ExpectColumnValuesToNotBeNull(column="title"),
            gxe.ExpectColumnValueLengthsToBeBetween(column="title", min_value=1, max_value=max_chars),
        ]
    suites["items"] = (item_frame, item_exp)

    users = _users_table(interactions)
    suites["users"] = (
        users,
        [
            gxe.ExpectTableRowCountToBeBetween(min_value=1),
            gxe.ExpectColumnValuesToBeBetween(
                column="n_items", min_value=cfg.min_sequence_length, max_value=cfg.max_sequence_length
            ),
            # leave-one-out needs a validation and a test target: some user must have >= 3 items
            gxe.ExpectColumnMaxToBeBetween(column="n_items", min_value=MIN_EVAL_LENGTH),
        ],
    )

    context = gx.get_context(mode="ephemeral")
    try:
        from great_expectations.data_context.types.base import ProgressBarsConfig

        context.variables.progress_bars = ProgressBarsConfig(globally=False)
    except Exception:  # progress bars are cosmetic; older/newer layouts may differ
        pass
    source = context.data_sources.add_pandas("laser")
    outcomes: list[ExpectationOutcome] = []
    for table, (frame, expectations) in suites.items():
        asset = source.add_dataframe_asset(table)
        batch = asset.add_batch_definition_whole_dataframe("all").get_batch(
            batch_parameters={"dataframe": frame.reset_index(drop=True)}
        )
        suite = gx.ExpectationSuite(name=f"laser_{table}")
        for exp in expectations:
            suite.add_expectation(exp)
        result = batch.validate(
            suite, result_format={"result_format": "SUMMARY", "partial_unexpected_count": N_EXAMPLES}
        )
        for r in result.to_json_dict()["results"]:
            outcomes.append(_outcome(table, r, frame))

    lengths = users["n_items"].to_numpy() if len(users) else np.zeros(0)
    stats = {
        "interactions": int(len(interactions)),
        "items": int(len(items)),
        "users": int(len(users)),
        "avg_length": round(float(lengths.mean()), 4) if len(lengths) else 0.0,
        "has_timestamps": bool(has_ts),
    }
    for column, n in (provenance.get("texts_cut") or {}).items():
        stats[f"{column} values cut to {max_chars} chars"] = int(n)
    return ValidationReport(
        dataset=name,
        success=all(o.success for o in outcomes),
        outcomes=outcomes,
        skipped=skipped,
        statistics=stats,
        gx_version=gx.__version__,
    )


def _outcome(table: str, r: dict, frame: pd.DataFrame) -> ExpectationOutcome:
    cfg = r["expectation_config"]
    kwargs = {k: v for k, v in cfg["kwargs"].items() if k not in ("batch_id", "value_set")}
    column = kwargs.pop("column", None)
    if "column_list" in kwargs:
        column = ",".join(kwargs.pop("column_list"))
    res = r.get("result") or {}
    examples = [_plain(v) for v in (res.get("partial_unexpected_list") or [])][:N_EXAMPLES]
    if table == "interactions" and column == "time_delta" and not r["success"]:
        # show the users whose events go back in time, rather than bare negative deltas
        bad = frame.loc[frame["time_delta"] < 0, "user_id"].astype(str).unique()[:N_EXAMPLES]
        examples = [f"user {u}" for u in bad]
    exc = r.get("exception_info") or {}
    details = {k: v for k, v in kwargs.items() if v is not None and k not in ("mostly",)}
    if exc.get("raised_exception"):
        details["error"] = str(exc.get("exception_message"))[:200]
    if "observed_value" in res and not r["success"]:
        details["observed"] = _plain(res["observed_value"])
    return ExpectationOutcome(
        table=table,
        expectation=cfg["type"],
        column=column,
        success=bool(r["success"]),
        element_count=res.get("element_count"),
        unexpected_count=res.get("unexpected_count"),
        examples=examples,
        details=details,
    )


def _plain(v):
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return float(v)
    if v is None or isinstance(v, (str, int, float, bool)):
        return v
    return str(v)
