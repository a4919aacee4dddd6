"""Bad inputs get a short clear error and lose nothing: strict configs, data the config did not mean, the CLI's one
error handler (message + exit status; traceback only with --debug, always in a log file), and runs whose process
was killed."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid

import pandas as pd
import pytest
from click.testing import CliRunner
from pydantic import BaseModel

from laser_cli.main import cli
from laser_core.config import ConfigError, LaserConfig, load_config
from laser_core.errors import EXIT_CONFIG, EXIT_DATA, EXIT_ERROR, EXIT_INTERNAL, EXIT_MODEL

TINY_SYNTHETIC = "dataset:\n  format: synthetic\n  synthetic: {n_users: 40, n_items: 30, seed: 2}\n"


def _write(path, text: str):
    path.write_text(text, encoding="utf8")
    return path


# ------------------------------------------------------------------------------------------ configs
def _config_models(model: type[BaseModel], seen: set) -> set:
    seen.add(model)
    for field in model.model_fields.values():
        for arg in (field.annotation, *getattr(field.annotation, "__args__", ())):
            if isinstance(arg, type) and issubclass(arg, BaseModel) and arg not in seen:
                _config_models(arg, seen)
    return seen


def test_every_config_model_is_strict():
    from laser_core.model import LaserSpec
    from pipelines.settings import InfraConfig

    models = _config_models(LaserConfig, set()) | _config_models(LaserSpec, set()) | _config_models(InfraConfig, set())
    assert len(models) >= 17
    loose = sorted(
        m.__name__ for m in models if not (m.model_config.get("strict") and m.model_config.get("extra") == "forbid")
    )
    assert loose == []


@pytest.mark.parametrize(
    "section,text,field",
    [
        ("laser_train", "lr: true", "laser_train.lr"),
        ("sr_train", "epochs: 2.5", "sr_train.epochs"),
        ("sr_train", "epochs: 2.0", "sr_train.epochs"),
        ("sr", "dropout: yes", "sr.dropout"),
        ("pipeline", "enable_cache: 1", "pipeline.enable_cache"),
        ("export", "k: '5'", "export.k"),
        ("dataset", "synthetic: {n_users: true}", "dataset.synthetic.n_users"),
    ],
)
def test_config_refuses_coercions(tmp_path, section, text, field):
    path = _write(tmp_path / "bad.yaml", f"{section}:\n  {text}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert message.startswith(f"{path}: ") and field in message, message


def test_config_numbers_that_stay_valid(tmp_path):
    path = _write(
        tmp_path / "ok.yaml",
        TINY_SYNTHETIC + "laser_train:\n  lr: 1\n  tau: 1e-2\nsr_train:\n  lr: 3E-4\n  weight_decay: 0\n",
    )
    cfg = load_config(path)
    assert cfg.laser_train.lr == 1.0 and isinstance(cfg.laser_train.lr, float)
    assert cfg.laser_train.tau == 0.01 and cfg.sr_train.lr == 3e-4 and cfg.sr_train.weight_decay == 0.0


@pytest.mark.parametrize("text", ["", "# only a comment\n\n", "{}\n"])
def test_empty_config_is_refused(tmp_path, text):
    path = _write(tmp_path / "empty.yaml", text)
    with pytest.raises(ConfigError, match=r"empty\.yaml: the config file is empty"):
        load_config(path)


def test_config_duplicate_key_and_top_level(tmp_path):
    with pytest.raises(ConfigError, match="duplicate key 'lr'"):
        load_config(_write(tmp_path / "dup.yaml", "laser_train:\n  lr: 0.1\n  lr: 0.2\n"))
    with pytest.raises(ConfigError, match="expected a mapping of sections"):
        load_config(_write(tmp_path / "list.yaml", "- dataset\n"))


def test_synthetic_with_a_path_is_refused(tmp_path):
    path = _write(tmp_path / "c.yaml", "dataset:\n  format: synthetic\n  path: data\n")
    with pytest.raises(ConfigError, match="format 'synthetic' generates its data and reads no files"):
        load_config(path)


def test_data_dir_overrides_a_synthetic_config(tmp_path):
    """--data-dir with `format: synthetic` reads the folder (format detected), never the generated data."""
    data = tmp_path / "data"
    data.mkdir()
    cfg_path = _write(tmp_path / "c.yaml", TINY_SYNTHETIC)
    cfg = load_config(cfg_path, data_dir=str(data))
    assert cfg.dataset.format == "auto" and cfg.dataset.path == str(data.resolve())
    with pytest.raises(ConfigError, match="--data-dir .*nope: not a directory"):
        load_config(cfg_path, data_dir=str(tmp_path / "nope"))
    # an undetectable folder is refused before anything runs, with the loader's message
    result = CliRunner().invoke(cli, ["run", "--config", str(cfg_path), "--data-dir", str(data)])
    assert result.exit_code == EXIT_DATA and "cannot tell the data format" in result.output
    assert "Traceback" not in result.output


# ------------------------------------------------------------------------------------ CLI errors
def test_cli_config_errors_are_one_message(tmp_path):
    empty = _write(tmp_path / "empty.yaml", "")
    result = CliRunner().invoke(cli, ["run", "--config", str(empty)])
    assert result.exit_code == EXIT_CONFIG
    assert result.output.strip().splitlines() == [
        f"Error: {empty}: the config file is empty; a run needs at "
        "least a `dataset:` section (see configs/tiny.yaml for a "
        "complete example)"
    ]
    bad = _write(tmp_path / "bad.yaml", "laser_train:\n  lr: true\n")
    result = CliRunner().invoke(cli, ["run", "--config", str(bad)])
    assert (
        result.exit_code == EXIT_CONFIG
        and "laser_train.lr: Input should be a valid number (got True)" in result.output
        and "Traceback" not in result.output
    )


def test_cli_data_errors(tmp_path):
    root = tmp_path / "t"
    root.mkdir()
    _write(root / "interactions.csv", "user_id,item_id,timestamp\n")
    _write(root / "items.csv", "item_id,title\nx,X\n")
    result = CliRunner().invoke(cli, ["data", "validate", str(root)])
    assert result.exit_code == 1 and "FAILED" in result.output and "PASSED" not in result.output
    assert "expect_table_row_count_to_be_between" in result.output
    _write(root / "interactions.csv", "user_id,timestamp\na,1\n")
    result = CliRunner().invoke(cli, ["data", "stats", str(root)])
    assert result.exit_code == EXIT_DATA and "interactions.csv" in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


def _failing_command(exc: BaseException):
    """A command of the laser group that raises ``exc`` (registered for one test, then removed)."""

    @cli.command(name="boom-test")
    def boom() -> None:
        raise exc

    return boom


@pytest.fixture
def failing():
    def make(exc):
        return _failing_command(exc)

    yield make
    cli.commands.pop("boom-test", None)


@pytest.mark.parametrize(
    "exc,code,text",
    [
        (
            FileNotFoundError(2, "No such file or directory", "/no/such/file"),
            EXIT_ERROR,
            "Error: /no/such/file: No such file or directory",
        ),
        (ZeroDivisionError("division by zero"), EXIT_INTERNAL, "Error: unexpected ZeroDivisionError: division by zero"),
    ],
)
def test_cli_error_handler(tmp_path, monkeypatch, failing, exc, code, text):
    monkeypatch.setenv("LASER_LOG_DIR", str(tmp_path / "logs"))
    failing(exc)
    result = CliRunner().invoke(cli, ["boom-test"])
    assert result.exit_code == code and result.output.splitlines()[0] == text, result.output
    assert "Traceback" not in result.output
    logs = list((tmp_path / "logs").glob("laser-*.log"))
    assert len(logs) == 1 and type(exc).__name__ in logs[0].read_text()
    assert (str(logs[0]) in result.output) == (code == EXIT_INTERNAL)  # unknown errors say where the log is
    debug = CliRunner().invoke(cli, ["--debug", "boom-test"])
    assert debug.exit_code == code and "Traceback (most recent call last)" in debug.output


def test_classify_own_and_foreign_errors():
    from laser_cli.errors import classify
    from laser_core.export import ExportError
    from laser_core.serving import BundleError

    assert classify(BundleError("bundle x: scorer.onnx hash mismatch")) == (
        EXIT_MODEL,
        "bundle x: scorer.onnx hash mismatch",
    )
    assert classify(ExportError("no table"))[0] == EXIT_MODEL
    try:
        LaserConfig.model_validate({"sr": {"hidden_size": True}})
    except ValueError as exc:
        assert classify(exc) == (
            EXIT_CONFIG,
            "invalid LaserConfig: sr.hidden_size: Input should be a valid integer (got True)",
        )
    try:
        load_dataset_value_error()
    except ValueError as exc:
        code, message = classify(exc)
        assert code == EXIT_ERROR and message.startswith("dataset.synthetic: unknown settings ['n_user']")
    try:
        int("x")  # a ValueError from outside this package is a bug, not a message for the user
    except ValueError as exc:
        assert classify(exc) is None


def load_dataset_value_error():
    from laser_core.data import load_dataset

    load_dataset({"synthetic": {"n_user": 3}})


# ------------------------------------------------------------------------ a failed pipeline run
BAD_TABLE = {"user_id": list("aaab"), "item_id": list("xyxz"), "timestamp": [1, 2, 1, 3]}


def test_failed_run_prints_the_message_not_a_traceback(tmp_path, zenml_store, capfd, monkeypatch):
    """`laser run --config <synthetic config> --data-dir BAD`: the folder is read (not the synthetic data), its
    validation fails, and the user sees the failed expectations, the run's name and exit status 3; ZenML's step
    traceback stays off the console (it is in the log file), and the saved validation report is kept."""
    from zenml.client import Client

    root = tmp_path / "bad"
    root.mkdir()
    pd.DataFrame(BAD_TABLE).to_csv(root / "interactions.csv", index=False)
    pd.DataFrame({"item_id": list("xyz"), "title": ["X one", "", "Z three"]}).to_csv(root / "items.csv", index=False)
    cfg = _write(tmp_path / "tiny.yaml", TINY_SYNTHETIC + "pipeline: {stop_after: split}\n")
    before = {v.id for v in Client().list_artifact_versions(name="validation_report", size=1000).items}
    monkeypatch.setenv("LASER_LOG_DIR", str(tmp_path / "logs"))
    result = CliRunner().invoke(cli, ["run", "--config", str(cfg), "--data-dir", str(root)])
    console = capfd.readouterr()
    assert result.exit_code == EXIT_DATA, result.output
    out = result.output
    assert f"data: table files in {root.resolve()}" in out
    assert "data validation failed for 'interactions'" in out and "items.title: 1 of 3 rows fail" in out
    assert "failed at step validate_dataset" in out and "laser lineage laser_training-" in out
    assert "Traceback" not in out + console.out + console.err
    assert len(out.strip().splitlines()) <= 8, out
    log = next((tmp_path / "logs").glob("laser-*.log")).read_text()
    assert "Traceback" in log and "DataValidationError" in log
    new = [v for v in Client().list_artifact_versions(name="validation_report", size=1000).items if v.id not in before]
    assert len(new) == 1 and not new[0].load().success
    run = Client().get_pipeline_run(out.split("laser lineage ")[1].split()[0])
    assert run.status.value == "failed"
    loaded = run.steps["load_dataset"].outputs["dataset"][0].load()
    assert (loaded.n_users, loaded.n_items) == (2, 3)  # the folder's data, not 40 synthetic users
    meta = Client().get_pipeline_run(run.id, hydrate=True).run_metadata
    assert meta["laser_pid"] == os.getpid() and meta["laser_host"] == socket.gethostname()


# -------------------------------------------------------------------------------- killed runs
def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture(scope="module")
def snapshot_id(zenml_store):
    """The snapshot of a real laser_training run (one of this session's, or a short one run here)."""
    from zenml.client import Client

    runs = Client().list_pipeline_runs(sort_by="desc:created", size=50).items
    for run in runs:
        if run.pipeline is not None and run.pipeline.name == "laser_training" and run.snapshot is not None:
            return run.snapshot.id
    from pipelines.run import run_training

    cfg = LaserConfig.model_validate(
        {"dataset": {"synthetic": {"n_users": 40, "n_items": 30, "seed": 2}}, "pipeline": {"stop_after": "split"}}
    )
    return Client().get_pipeline_run(run_training(cfg).id).snapshot.id


def _running_run(snapshot_id, metadata: dict | None):
    """A run left in the "running" state, as a SIGKILLed `laser run` leaves it, with the given process record."""
    from zenml import log_metadata
    from zenml.client import Client
    from zenml.enums import ExecutionStatus
    from zenml.models import PipelineRunRequest

    client = Client()
    run = client.zen_store.get_or_create_run(
        PipelineRunRequest(
            name=f"killed-{uuid.uuid4().hex[:8]}",
            snapshot=snapshot_id,
            project=client.active_project.id,
            status=ExecutionStatus.RUNNING,
            orchestrator_run_id=uuid.uuid4().hex,
        )
    )
    if isinstance(run, tuple):
        run = run[0]
    if metadata:
        log_metadata(metadata=metadata, run_id_name_or_prefix=run.id)
    return run


def test_runs_of_dead_processes_are_marked_failed(snapshot_id):
    from zenml.client import Client

    from pipelines.orphans import mark_failed, mark_orphaned_runs, process_record

    host = socket.gethostname()
    dead = _running_run(snapshot_id, {"laser_pid": _dead_pid(), "laser_host": host, "laser_process_started": 1.0})
    alive = _running_run(snapshot_id, process_record())  # this process: still running
    elsewhere = _running_run(
        snapshot_id, {"laser_pid": _dead_pid(), "laser_host": host + "-other", "laser_process_started": 1.0}
    )
    unknown = _running_run(snapshot_id, None)
    reused = _running_run(snapshot_id, {**process_record(), "laser_process_started": 12.0})  # pid reused since

    def status(run):
        return Client().get_pipeline_run(run.id).status.value

    dry = CliRunner().invoke(cli, ["runs", "clean", "--dry-run"])
    assert dry.exit_code == 0 and f"would mark {dead.name} (running) failed" in dry.output
    assert status(dead) == "running"
    marked = {o.run: o.reason for o in mark_orphaned_runs()}
    assert set(marked) == {dead.name, reused.name}, marked
    assert "has exited" in marked[dead.name] and "belongs to another process" in marked[reused.name]
    assert (status(dead), status(reused)) == ("failed", "failed")
    assert (status(alive), status(elsewhere), status(unknown)) == ("running", "running", "running")
    assert "marked failed by laser: its process" in (
        Client().get_pipeline_run(dead.id).get_body().status_reason
        or Client().get_pipeline_run(dead.id).status_reason
        or ""
    )
    # `laser runs clean --older-than 0`: also the runs that cannot be checked from here; never a live one
    result = CliRunner().invoke(cli, ["runs", "clean", "--older-than", "0"])
    assert result.exit_code == 0, result.output
    assert (status(elsewhere), status(unknown), status(alive)) == ("failed", "failed", "running")
    mark_failed(alive, "test cleanup")  # leave nothing running in the shared test store
