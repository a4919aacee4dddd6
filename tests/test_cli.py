"""The ``laser`` command line: data stats/validate, run, and clear errors for bad configs."""

from __future__ import annotations

import json

from click.testing import CliRunner

from conftest import REPO, SCIENTIFIC, shared
from laser_cli.main import cli


def test_data_stats_scientific():
    root = shared(SCIENTIFIC)
    result = CliRunner().invoke(cli, ["data", "stats", str(root)])
    assert result.exit_code == 0, result.output
    out = result.output
    for expected in (
        "users         11,041",
        "items         5,327",
        "interactions  76,896",
        "avg length    6.96",
        "11,039 evaluation users",
        "2 train-only",
    ):
        assert expected in out, out
    js = json.loads(CliRunner().invoke(cli, ["data", "stats", str(root), "--json"]).output)
    assert js["split"]["test_interactions"] == 11039


def test_data_validate_and_bad_path(tmp_path):
    report = tmp_path / "report.md"
    result = CliRunner().invoke(cli, ["data", "validate", "--report", str(report)])
    assert result.exit_code == 0, result.output
    assert "PASSED" in report.read_text()
    result = CliRunner().invoke(cli, ["data", "stats", str(tmp_path)])
    assert result.exit_code != 0 and "cannot tell the data format" in result.output


def test_run_rejects_bad_config(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("dataset:\n  fromat: synthetic\n")
    result = CliRunner().invoke(cli, ["run", "--config", str(bad)])
    assert result.exit_code != 0 and "dataset.fromat" in result.output
    result = CliRunner().invoke(cli, ["run", "--config", str(tmp_path / "missing.yaml")])
    assert result.exit_code != 0 and "config file not found" in result.output


def test_config_overrides_change_settings_before_validation():
    import pytest

    from laser_core.config import ConfigError, load_config

    path = REPO / "configs" / "demo.yaml"
    base = load_config(path)
    cfg = load_config(
        path,
        overrides=[
            "bitune.prefix=none",
            "laser_train.lr=3e-4",
            "backbone.num_layers=2",
            "laser_train.fusion_weight_grid=[1, 2]",
        ],
    )
    assert (cfg.bitune.prefix, cfg.laser_train.lr, cfg.backbone.num_layers) == ("none", 3e-4, 2)
    assert cfg.laser_train.fusion_weight_grid == [1.0, 2.0]
    assert cfg.bitune.pooling == base.bitune.pooling and cfg.sr == base.sr  # nothing else changes
    with pytest.raises(ConfigError, match="not of the form"):
        load_config(path, overrides=["bitune.prefix"])
    with pytest.raises(ConfigError, match="bitune.prefx"):  # validated like the file: unknown keys named
        load_config(path, overrides=["bitune.prefx=none"])
    with pytest.raises(ConfigError, match="'prefix' is not a section"):
        load_config(path, overrides=["bitune.prefix.x=1"])


def test_shipped_configs_parse():
    from laser_core.config import load_config

    for path in sorted((REPO / "configs").glob("*.yaml")):
        cfg = load_config(path, data_dir=str(REPO) if "format: synthetic" not in path.read_text() else None)
        assert cfg.pipeline.enable_cache


def test_run_demo_style_config(tmp_path, zenml_store):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(
        "dataset:\n  synthetic: {n_users: 120, n_items: 50, seed: 4}\n"
        "sr: {model: sasrec, hidden_size: 16}\nsr_train: {epochs: 2, progress: false}\n"
    )
    result = CliRunner().invoke(cli, ["run", "--config", str(cfg), "--stop-after", "sr"])
    assert result.exit_code == 0, result.output
    assert "evaluate_sr" in result.output and "completed" in result.output
    assert "bi_tune_stage1" not in result.output
