"""Inputs read right or refused by name (issue 21): datetimes as seconds, bad timestamps named by file, line and
column, two candidate files refused, runaway texts cut and counted, CLI numbers and names checked, bundle errors
exiting 4, --debug tracebacks for every error, and no empty model version left by a failed run."""

from __future__ import annotations

import pandas as pd
import pytest
from click.testing import CliRunner
from conftest import write_table

from laser_cli.main import cli
from laser_core.data import DataFormatError, load_dataset
from laser_core.data.loading import DEFAULT_MAX_TEXT_CHARS
from laser_core.errors import EXIT_CONFIG, EXIT_DATA, EXIT_MODEL

ITEMS = pd.DataFrame({"item_id": list("xyz"), "title": ["X one", "Y two", "Z three"]})
SECONDS = [1704067200, 1704067210, 1704153600]  # 2024-01-01T00:00:00Z, +10 s, 2024-01-02


def _table(root, timestamps, kind: str = "parquet", items: pd.DataFrame = ITEMS):
    inter = pd.DataFrame({"user_id": ["a"] * len(timestamps), "item_id": list("xyz")[: len(timestamps)]})
    inter["timestamp"] = timestamps
    return write_table(root, inter, items, kind)


# --------------------------------------------------------------------------------------- timestamps
@pytest.mark.parametrize("unit", ["s", "ms", "us", "ns"])
@pytest.mark.parametrize("tz", [None, "UTC", "Asia/Tokyo"])
def test_parquet_datetimes_are_read_as_seconds(tmp_path, unit, tz):
    """A Parquet timestamp column (any unit, naive = UTC or tz-aware) becomes seconds since the epoch; before, its
    raw integers (microseconds, nanoseconds) were taken as seconds and passed validation."""
    from laser_core.data.validation import validate

    stamps = pd.Series(pd.to_datetime(["2024-01-01T00:00:00", "2024-01-01T00:00:10", "2024-01-02T00:00:00"]))
    stamps = stamps.astype(f"datetime64[{unit}]")
    shift = 0
    if tz is not None:
        stamps = stamps.dt.tz_localize(tz)
        shift = -9 * 3600 if tz == "Asia/Tokyo" else 0
    ds = load_dataset({"path": str(_table(tmp_path / "t", stamps))})
    assert ds.timestamps[0].tolist() == [s + shift for s in SECONDS]
    assert validate(ds).success


def test_csv_iso_dates_and_numbers_are_seconds(tmp_path):
    """CSV: Unix seconds (a fraction floored) and ISO-8601 text (naive = UTC, offsets honoured) mix freely."""
    root = _table(tmp_path / "t", ["1704067200.9", "2024-01-01T09:00:10+09:00", "2024-01-02"], kind="csv")
    assert load_dataset({"path": str(root)}).timestamps[0].tolist() == SECONDS


@pytest.mark.parametrize(
    "value,message",
    [
        (1e30, "is out of range"),
        (1.7e12, "is out of range"),  # milliseconds
        (float("inf"), "is not a finite number"),
        (float("-inf"), "is not a finite number"),
        (float("nan"), "missing timestamp"),
    ],
)
def test_bad_parquet_timestamps_are_refused_by_row(tmp_path, value, message):
    root = _table(tmp_path / "t", [1.0, value, 3.0])
    with pytest.raises(DataFormatError) as err:
        load_dataset({"path": str(root)})
    text = str(err.value)
    assert text.startswith(f"{root / 'interactions.parquet'}, row 2, field 'timestamp': ") and message in text


@pytest.mark.parametrize(
    "value,message",
    [
        ("1e30", "'1e30' is out of range"),
        ("-1e300", "is out of range"),
        ("99999999999999999999999", "is out of range"),
        ("inf", "'inf' is not a finite number"),
        ("nan", "'nan' is neither a number nor a date"),
        ("", "missing timestamp"),
        ("2024-13-01", "neither a number nor a date"),
    ],
)
def test_bad_csv_timestamps_are_refused_by_line(tmp_path, value, message):
    """The CSV line is the file's (the header is line 1); before, 1e30 became int64's minimum and inf an
    unexpected error (exit 70) naming no file."""
    root = _table(tmp_path / "t", ["1", value, "3"], kind="csv")
    with pytest.raises(DataFormatError) as err:
        load_dataset({"path": str(root)})
    text = str(err.value)
    assert text.startswith(f"{root / 'interactions.csv'}, line 3, field 'timestamp': ") and message in text
    result = CliRunner().invoke(cli, ["data", "validate", str(root)])
    assert result.exit_code == EXIT_DATA and "interactions.csv, line 3" in result.output, result.output


def test_boolean_and_duration_timestamps_are_refused(tmp_path):
    root = _table(tmp_path / "t", [True, False, True])
    with pytest.raises(DataFormatError, match=r"row 1, field 'timestamp': timestamp True is a boolean"):
        load_dataset({"path": str(root)})
    root = _table(tmp_path / "d", pd.to_timedelta([1, 2, 3], unit="s"))
    with pytest.raises(DataFormatError, match=r"row 1, field 'timestamp': timestamp .* is a duration, not a time"):
        load_dataset({"path": str(root)})


def test_json_formats_refuse_out_of_range_timestamps(tmp_path):
    """Amazon 2018 reviews and SeqRecBench sequences: a timestamp beyond int64 was an unexpected OverflowError
    (exit 70); now the file, line and field are named (exit 3)."""
    from test_loaders import amazon_fixture, seqrecbench_fixture, write_jsonl_gz

    amazon = amazon_fixture(tmp_path / "amazon")
    review = {"reviewerID": "U9", "asin": "B1", "unixReviewTime": 2**70}
    write_jsonl_gz(amazon / "Tools_5.json.gz", [review])
    result = CliRunner().invoke(cli, ["data", "stats", str(amazon)])
    assert result.exit_code == EXIT_DATA, result.output
    assert "Tools_5.json.gz, line 1, field 'unixReviewTime': timestamp 1180591620717411303424 is out of range" in (
        result.output
    )
    srb = seqrecbench_fixture(tmp_path / "srb")
    write_jsonl_gz(srb / "user2item.jsonl.gz", [{"UserID": 1, "ItemID": [100, 101], "Timestamp": [1, 10**13]}])
    with pytest.raises(DataFormatError, match=r"user2item\.jsonl\.gz, line 1, field 'Timestamp': .* out of range"):
        load_dataset({"path": str(srb)})


# ---------------------------------------------------------------------------------- ambiguous files
@pytest.mark.parametrize("kind", ["interactions", "items"])
def test_csv_and_parquet_side_by_side_are_ambiguous(tmp_path, kind):
    root = _table(tmp_path / "t", [1, 2, 3], kind="csv")
    pd.read_csv(root / f"{kind}.csv").to_parquet(root / f"{kind}.parquet", index=False)
    with pytest.raises(DataFormatError, match=rf"both {kind}\.csv and {kind}\.parquet are present") as err:
        load_dataset({"path": str(root)})
    assert f"dataset.{kind}_file" in str(err.value)
    result = CliRunner().invoke(cli, ["data", "stats", str(root)])
    assert result.exit_code == EXIT_DATA and "ambiguous" in result.output
    # naming the file settles it
    assert load_dataset({"path": str(root), f"{kind}_file": f"{kind}.parquet"}).n_users == 1


# ------------------------------------------------------------------------------------------- texts
def test_runaway_titles_are_cut_and_counted(tmp_path):
    """A 1 MB title is cut to the default bound at loading, and the validation report counts it; validate() on
    frames that were not cut fails on the title length (before, both passed with the whole megabyte)."""
    from laser_core.data.validation import validate

    huge = "word " * 200_000
    items = ITEMS.assign(title=["X one", huge, "Z three"], category=["c", "c", "k" * 5000])
    ds = load_dataset({"path": str(_table(tmp_path / "t", [1, 2, 3], items=items))})
    assert ds.items["title"].str.len().max() <= DEFAULT_MAX_TEXT_CHARS
    assert ds.items["title"][1].startswith("word word") and ds.items["title"][0] == "X one"
    assert len(ds.items["category"][2]) == DEFAULT_MAX_TEXT_CHARS
    assert ds.source["texts_cut"] == {"title": 1, "brand": 0, "category": 1}
    report = validate(ds)
    assert report.success
    assert report.statistics[f"title values cut to {DEFAULT_MAX_TEXT_CHARS} chars"] == 1
    assert "title values cut" in report.to_markdown()
    raw = validate(interactions=ds.interactions_frame(), items=ds.items.assign(title=["a", huge, "b"]), name="raw")
    assert not raw.success
    assert [o.column for o in raw.failures] == ["title"]
    small = load_dataset({"path": str(tmp_path / "t"), "max_text_chars": 10})
    assert small.items["title"].tolist() == ["X one", "word word", "Z three"]


# ---------------------------------------------------------------------------------------- the CLI
TINY_SYNTHETIC = "dataset:\n  format: synthetic\n  synthetic: {n_users: 40, n_items: 30, seed: 2}\n"


def test_batch_k_must_be_positive(tmp_path, monkeypatch):
    """`laser batch -k 0` is refused naming -k (before, 0 silently meant the config's batch.k)."""
    import pipelines.run

    calls = []
    monkeypatch.setattr(pipelines.run, "run_batch", lambda cfg, **kw: calls.append(cfg.batch.k))
    config = tmp_path / "c.yaml"
    config.write_text(TINY_SYNTHETIC)
    for k in ("0", "-3"):
        result = CliRunner().invoke(cli, ["batch", "--config", str(config), "-k", k])
        assert result.exit_code == EXIT_CONFIG and "Invalid value for '-k'" in result.output, result.output
    assert calls == []


@pytest.fixture
def command():
    """``command(fn)``: ``fn`` as the ``laser boom-test`` command, for one test."""
    yield lambda fn: cli.command(name="boom-test")(fn)
    cli.commands.pop("boom-test", None)


def test_click_errors_from_bundle_errors_exit_4_and_debug_shows_tracebacks(tmp_path, command, monkeypatch):
    """A click error raised from a bundle or index error exits 4 (as the README says; before, 1), and --debug prints
    the traceback of click's errors too (usage errors included), not only of the others."""
    import click

    from laser_core.ann import AnnError
    from laser_core.bundle import BundleError

    monkeypatch.setenv("LASER_LOG_DIR", str(tmp_path / "logs"))

    def boom() -> None:
        try:
            raise AnnError("item_index.hnsw: link id 99 out of range")
        except AnnError as exc:
            raise click.ClickException(str(exc)) from exc

    command(boom)
    result = CliRunner().invoke(cli, ["boom-test"])
    assert result.exit_code == EXIT_MODEL and result.output == "Error: item_index.hnsw: link id 99 out of range\n"
    debug = CliRunner().invoke(cli, ["--debug", "boom-test"])
    assert debug.exit_code == EXIT_MODEL and "Traceback (most recent call last)" in debug.output
    assert "AnnError: item_index.hnsw" in debug.output
    usage = CliRunner().invoke(cli, ["--debug", "batch", "--config", "x.yaml", "-k", "0"])
    assert usage.exit_code == EXIT_CONFIG and "Traceback (most recent call last)" in usage.output
    # the real commands: a folder that is not a bundle
    for args in (["recommend", "--bundle", str(tmp_path)], ["index", "build", "--bundle", str(tmp_path)]):
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == EXIT_MODEL and "not a Laser export bundle" in result.output, result.output
        assert "Traceback" not in result.output
    from laser_cli.errors import classify

    assert classify(AnnError("bad index"))[0] == classify(BundleError("bad bundle"))[0] == EXIT_MODEL


@pytest.mark.parametrize(
    "flag,value",
    [
        ("--stack-name", "../../evil name;rm -rf"),
        ("--stack-name", "-leading-dash"),
        ("--namespace", "BAD_NS!!"),
        ("--namespace", "a" * 64),
        ("--kaniko-namespace", "Upper"),
        ("--service-account", "sa;rm"),
    ],
)
def test_stack_names_are_kubernetes_names(flag, value, zenml_store):
    env = {
        "LASER_KUBE_CONTEXT": "test-cluster",
        "LASER_ARTIFACT_STORE_PATH": "s3://laser-test-bucket/zenml",
        "LASER_CONTAINER_REGISTRY_URI": "registry.example.com/laser",
    }
    args = ["stack", "register", "kubernetes", "--no-requirements-check", flag, value]
    result = CliRunner().invoke(cli, args, env=env)
    assert result.exit_code == 2 and f"Invalid value for '{flag}'" in result.output, result.output
    assert "is not a valid name" in result.output and "Traceback" not in result.output


def test_kubeflow_namespaces_are_checked(zenml_store):
    env = {"LASER_KUBEFLOW_HOST": "https://kfp.example.com", "LASER_KUBE_CONTEXT": "c"}
    for flag in ("--kubeflow-namespace", "--user-namespace"):
        args = ["stack", "register", "kubeflow", "--no-requirements-check", flag, "BAD_NS!!"]
        result = CliRunner().invoke(cli, args, env=env)
        assert result.exit_code == 2 and f"Invalid value for '{flag}'" in result.output, result.output


# ------------------------------------------------------------------- failed runs leave no version
def _versions(model: str) -> list[str]:
    from zenml.client import Client

    try:
        return [v.name for v in Client().list_model_versions(model=model, size=100).items]
    except KeyError:
        return []


def test_failed_or_killed_training_runs_leave_no_model_version(tmp_path, zenml_store, monkeypatch):
    """A run whose validation fails, and a run killed mid-way (`laser runs clean`), leave no model version
    (before, each left an empty one that `laser model list` showed); a finished run keeps its version."""
    import socket
    import subprocess
    import sys
    import uuid

    from zenml import log_metadata
    from zenml.client import Client
    from zenml.enums import ExecutionStatus
    from zenml.models import PipelineRunRequest

    monkeypatch.setenv("LASER_LOG_DIR", str(tmp_path / "logs"))
    model = "laser-inputs-failed"
    bad = tmp_path / "bad"
    bad.mkdir()
    pd.DataFrame({"user_id": list("aaab"), "item_id": list("xyxz")}).to_csv(bad / "interactions.csv", index=False)
    ITEMS.assign(title=["X one", "", "Z three"]).to_csv(bad / "items.csv", index=False)
    config = tmp_path / "c.yaml"
    config.write_text(TINY_SYNTHETIC + f"model: {{name: {model}}}\npipeline: {{stop_after: split}}\n")
    result = CliRunner().invoke(cli, ["run", "--config", str(config), "--data-dir", str(bad)])
    assert result.exit_code == EXIT_DATA, result.output
    assert f"Model version {model} v1 of the failed run was removed" in result.output
    assert _versions(model) == []
    run = Client().get_pipeline_run(result.output.split("laser lineage ")[1].split()[0])
    assert run.status.value == "failed" and "dataset" in run.steps["load_dataset"].outputs  # artifacts kept

    # a finished run keeps its version; a run of it left "running" by a killed process loses its own
    from laser_core.config import load_config
    from pipelines.run import run_training

    finished = run_training(load_config(config))
    [kept] = _versions(model)
    client = Client()
    killed = client.zen_store.get_or_create_run(
        PipelineRunRequest(
            name=f"killed-{uuid.uuid4().hex[:8]}",
            snapshot=client.get_pipeline_run(finished.id).snapshot.id,
            project=client.active_project.id,
            status=ExecutionStatus.RUNNING,
            orchestrator_run_id=uuid.uuid4().hex,
        )
    )
    killed = killed[0] if isinstance(killed, tuple) else killed
    empty = client.get_pipeline_run(killed.id).model_version.name
    assert sorted(_versions(model)) == sorted([kept, empty])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    record = {"laser_pid": dead.pid, "laser_host": socket.gethostname(), "laser_process_started": 1.0}
    log_metadata(metadata=record, run_id_name_or_prefix=killed.id)
    cleaned = CliRunner().invoke(cli, ["runs", "clean"])
    assert cleaned.exit_code == 0 and f"removed its model version {model} v{empty}" in cleaned.output, cleaned.output
    assert _versions(model) == [kept] and client.get_pipeline_run(killed.id).status.value == "failed"


# ---------------------------------------------------------------------------- messages name flags
def test_recommend_messages_name_the_cli_flags(tmp_path):
    """The serving errors a CLI user meets name `--popularity-fallback` and the run config's key, not only the
    Python argument (before: `popularity_fallback=True`, `user_tower=False`, `popularity=...`)."""
    from test_bundle_format import write_format_bundle

    bundle = str(write_format_bundle(tmp_path / "bundle"))
    empty = CliRunner().invoke(cli, ["recommend", "--bundle", bundle])
    assert empty.exit_code == 1 and "it is empty" in empty.output
    assert "with --popularity-fallback" in empty.output, empty.output
    no_pop = CliRunner().invoke(cli, ["recommend", "--bundle", bundle, "--popularity-fallback", "--history", "i1"])
    assert no_pop.exit_code == EXIT_MODEL and "(--popularity-fallback;" in no_pop.output, no_pop.output
    assert "popularity=..." not in no_pop.output
    no_tower = CliRunner().invoke(cli, ["recommend", "--bundle", bundle, "--history", "i1"])
    assert no_tower.exit_code == EXIT_MODEL and "export.user_tower: false" in no_tower.output, no_tower.output


@pytest.mark.parametrize(
    "settings,says",
    [
        ("seed: -1", "seed: Input should be greater than or equal to 0 (got -1)"),
        ("seed: 1.5", "seed: Input should be a valid integer (got 1.5)"),
        ("n_users: 1e30", "n_users: Input should be a valid integer (got 1e+30)"),
        ("n_items: 12", "n_items: Input should be greater than or equal to 19 (got 12)"),  # was a crash
        ("min_length: 9, max_length: 4", "max_length: Value error, must be >= min_length (9) (got 4)"),
        ("n_brands: 100000", "n_brands: Input should be less than or equal to"),
    ],
)
def test_synthetic_settings_are_checked_with_the_config(tmp_path, settings, says):
    """Impossible generator settings are a config error (exit 2) before anything runs; before, a negative or
    fractional seed or a float count was an unexpected error (exit 70) inside the pipeline's load step."""
    config = tmp_path / "c.yaml"
    config.write_text(f"dataset:\n  format: synthetic\n  synthetic: {{{settings}}}\n")
    result = CliRunner().invoke(cli, ["run", "--config", str(config)])
    assert result.exit_code == EXIT_CONFIG and "dataset.synthetic: Value error, " in result.output, result.output
    assert says in result.output and "Pipeline run" not in result.output


def test_batch_users_and_runs_clean_hours_name_their_flags():
    from steps.batch import map_histories

    ds = load_dataset({"synthetic": {"n_users": 20, "n_items": 30, "seed": 1}})
    catalogue = ds.items[["item_id"]]
    with pytest.raises(ValueError, match=r"batch\.users \(--user\): 1 user id\(s\) not in the data"):
        map_histories(ds, catalogue, [ds.users[0], "ghost"])
    result = CliRunner().invoke(cli, ["runs", "clean", "--older-than", "nan", "--dry-run"])
    assert result.exit_code == EXIT_CONFIG and "Invalid value for '--older-than'" in result.output, result.output
