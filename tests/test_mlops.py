"""The MLOps product on ZenML's embedded default (isolated store): the full pipeline through export and the
promotion gate, caching, the Model Control Plane CLI, lineage, batch recommendations and the schedule error.

One full run (the module fixture ``trained``, model ``laser-mlops``) is shared and never changed: tests that
change stages or add versions do it on a model of their own (``laser-mlops-seq``, ``-gate``, ``-cli``, ``-hp``),
whose runs are served from the fixture's cache except ``promote``, so any order and any subset pass.
(The gate itself, on hand-made metrics, is tested in test_promotion.py.)"""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from laser_core.config import LaserConfig

FULL_STEPS = (
    "load_dataset",
    "validate_dataset",
    "split_dataset",
    "pretrain_sr",
    "evaluate_sr",
    "bi_tune_stage1",
    "bi_tune_stage2",
    "evaluate_laser",
    "export_scorer",
    "promote",
)
LASER_AND_AFTER = ("bi_tune_stage1", "bi_tune_stage2", "evaluate_laser", "export_scorer", "promote")


# ---------------------------------------------------------------------------------------------- the pipeline
def _config(name: str, **updates) -> LaserConfig:
    raw = {
        "dataset": {"format": "synthetic", "synthetic": {"n_users": 160, "n_items": 64, "seed": 3}},
        "validation": {"min_sequence_length": 3, "max_sequence_length": 50},
        "sr": {"model": "sasrec", "hidden_size": 16},
        "sr_train": {"epochs": 2, "batch_size": 64, "progress": False},
        "text": {"history_len": 3},
        "backbone": {"name": "tiny-random-llama", "quantization": "nf4"},
        "bitune": {"mformer": {"n_experts": 2, "n_query": 4, "width": 32, "n_layers": 2, "n_heads": 2}},
        "laser_train": {
            "stage1_epochs": 1,
            "stage2_epochs": 1,
            "batch_size": 8,
            "users_per_epoch": 16,
            "valid_users": 16,
            "test_users": 24,
            "item_batch_size": 32,
            "progress": False,
            "optimizer": "adam",
            "weight_decay": 0.0,
            "schedule": "constant",
            "grad_accumulation": 1,
            "patience": None,
        },
        "model": {"name": name},
        "export": {"k": 5},
    }
    for key, value in updates.items():
        raw[key] = {**raw.get(key, {}), **value}
    return LaserConfig.model_validate(raw)


def _statuses(run) -> dict[str, str]:
    from zenml.client import Client

    return {n: s.status.value for n, s in Client().get_pipeline_run(run.id).steps.items()}


def _decision(run):
    from zenml.client import Client

    return Client().get_pipeline_run(run.id).steps["promote"].outputs["promotion_decision"][0].load()


def _stage(name: str, version: str) -> str | None:
    from zenml.client import Client

    stage = Client().get_model_version(name, version).stage
    return getattr(stage, "value", stage)


@pytest.fixture(scope="module")
def trained(zenml_store):
    """One full run of the tiny config (model ``laser-mlops``): v1, which goes to production."""
    from pipelines.run import run_training

    cfg = _config("laser-mlops")
    run = run_training(cfg)
    return cfg, run


def test_full_pipeline_exports_promotes_and_logs(trained):
    from zenml.client import Client

    cfg, run = trained
    assert _statuses(run) == {s: "completed" for s in FULL_STEPS}
    decision = _decision(run)
    assert decision.stage == "production" and decision.production_value is None
    mv = Client().get_model_version("laser-mlops", "production")
    assert mv.name == decision.details["new_version"]
    laser = Client().get_pipeline_run(run.id).steps["evaluate_laser"].outputs["laser_metrics"][0].load()
    assert mv.run_metadata["laser_test"]["ndcg@10"] == pytest.approx(laser.metrics["ndcg@10"])
    assert decision.new_value == laser.metrics["ndcg@10"]
    # the gate compared it with popularity (required by default) and the ID model, on the same 24 test users
    assert decision.beats_baselines is True and decision.users == 24 and decision.id_model == "sasrec"
    assert decision.popularity_value == laser.details["popularity"]["ndcg@10"] < decision.new_value
    assert decision.id_model_value == laser.details["id_model"]["ndcg@10"]
    assert "popularity" in decision.reason and "over the same 24 test users" in decision.reason
    assert mv.run_metadata["id_model_test"]["ndcg@10"] == pytest.approx(decision.id_model_value)
    # the ID model's score is the frozen SR encoder's on exactly Laser's (history, target) test pairs
    from laser_core.evaluation import evaluate
    from laser_core.train import test_examples

    steps_ = Client().get_pipeline_run(run.id).steps
    split = steps_["split_dataset"].outputs["split"][0].load()
    sr_model = steps_["pretrain_sr"].outputs["sr_model"][0].load()
    assert evaluate(sr_model, *test_examples(split, cfg.laser_train)) == pytest.approx(laser.details["id_model"])
    assert sum(laser.details["expert_counts"]) == 24  # every test user routed to one expert
    # every artifact of the run is linked to the model version and stored without pickle
    steps = Client().get_pipeline_run(run.id).steps
    for step_name, step_run in steps.items():
        for out_name, arts in step_run.outputs.items():
            for art in arts:
                assert art.materializer.import_path.startswith("steps.materializers."), (step_name, out_name)
                assert "pickle" not in art.materializer.import_path.lower()
    linked = set(mv.data_artifacts) | set(mv.model_artifacts)
    assert {"dataset", "split", "sr_model", "laser_model", "item_table", "scorer_bundle"} <= linked
    bundle = steps["export_scorer"].outputs["scorer_bundle"][0]
    manifest = bundle.load().manifest  # the typed manifest (laser_core.bundle.BundleManifest)
    assert manifest.n_items == 64 and manifest.k == 5 and manifest.format_version == 2
    assert manifest.metadata["model_version"] == f"laser-mlops:{mv.name}"
    assert bundle.run_metadata["n_items"] == 64 and bundle.run_metadata["format_version"] == 2
    assert bundle.run_metadata["files"] >= 3
    # visualizations: the validation curve and the expert-usage histogram
    laser_model = steps["bi_tune_stage2"].outputs["laser_model"][0]
    assert any("valid_ndcg.html" in v.uri for v in laser_model.visualizations)
    metrics_art = steps["evaluate_laser"].outputs["laser_metrics"][0]
    assert any("expert_usage.html" in v.uri for v in metrics_art.visualizations)


def test_caching_and_promotion_sequence(trained):
    """On its own model (``laser-mlops-seq``): the first run is served from the fixture's cache except promote
    and goes to production (none yet). Second run: everything cached except promote (production changed from none
    to v1), identical model → staging. Third identical run: fully cached. A gate margin nobody can beat keeps a
    version in staging; a negative margin lets the next one replace production. Production is re-scored on the
    same pairs each time."""
    from zenml.client import Client

    from pipelines.run import run_training

    name = "laser-mlops-seq"
    cfg = _config(name)
    first = run_training(cfg)
    assert _statuses(first) == {**{s: "cached" for s in FULL_STEPS}, "promote": "completed"}
    d1 = _decision(first)
    v1 = d1.details["new_version"]
    assert d1.stage == "production" and _stage(name, v1) == "production"
    second = run_training(cfg)
    assert _statuses(second) == {**{s: "cached" for s in FULL_STEPS}, "promote": "completed"}
    d2 = _decision(second)
    # production (v1) re-scored on the same pairs gives exactly its recorded test metric
    assert d2.production_version == v1 and d2.production_value == d2.new_value
    assert d2.stage == "staging" and _stage(name, d2.details["new_version"]) == "staging"
    assert f"production v{v1} " in d2.reason and "popularity" in d2.reason
    third = run_training(cfg)
    assert set(_statuses(third).values()) == {"cached"}

    worse = run_training(_config(name, promotion={"min_improvement": 0.5}))
    d3 = _decision(worse)
    assert d3.stage == "staging" and _stage(name, v1) == "production"
    better = run_training(_config(name, promotion={"min_improvement": -1.0}))
    d4 = _decision(better)
    assert d4.stage == "production"
    assert Client().get_model_version(name, "production").name == d4.details["new_version"]
    assert _stage(name, v1) == "archived"


def test_gate_keeps_a_version_below_the_baselines_in_staging(trained, capsys):
    """On its own model (``laser-mlops-gate``, no production version yet): a version that does not beat the
    baselines by the configured margin (here 1.0, which nothing reaches) stays in staging with the reason, and
    nothing goes to production. With ``require_beats_id_model`` the reason names both baselines."""
    from zenml.client import Client

    from laser_cli.main import _print_promotion, _print_results
    from pipelines.run import run_training

    name = "laser-mlops-gate"
    run = run_training(_config(name, promotion={"baseline_margin": 1.0, "require_beats_id_model": True}))
    assert _statuses(run) == {**{s: "cached" for s in FULL_STEPS}, "promote": "completed"}
    d = _decision(run)
    laser = Client().get_pipeline_run(run.id).steps["evaluate_laser"].outputs["laser_metrics"][0].load()
    assert d.valid and d.stage == "staging" and d.beats_baselines is False
    assert d.popularity_value == laser.details["popularity"]["ndcg@10"]
    assert d.id_model_value == laser.details["id_model"]["ndcg@10"] and d.id_model == "sasrec" and d.users == 24
    assert d.details["required_baselines"] == ["popularity", "id_model"]
    for part in (
        "baseline gate",
        f"popularity ({d.popularity_value:.4f})",
        f"the ID model sasrec ({d.id_model_value:.4f})",
        "by more than +1.0000",
        "compared on ndcg@10 over the same 24 test users",
        "production none",
    ):
        assert part in d.reason, d.reason
    version = d.details["new_version"]
    assert _stage(name, version) == "staging"
    with pytest.raises(KeyError):
        Client().get_model_version(name, "production")
    assert Client().get_model_version(name, version).run_metadata["promotion"]["reason"] == d.reason
    # what `laser run` prints: the three models on the same test pairs, then the promotion
    capsys.readouterr()
    _print_results(run)
    table = capsys.readouterr().out.splitlines()
    assert table[0] == "Test (24 users, full ranking, the same pairs for every model):"
    assert table[1].split() == ["model", "ndcg@10", "recall@10", "mrr"]
    for line, metrics in zip(table[2:], (laser.metrics, laser.details["id_model"], laser.details["popularity"])):
        assert [float(x) for x in line.split()[1:]] == pytest.approx(
            [metrics[k] for k in ("ndcg@10", "recall@10", "mrr")], abs=5e-5
        )
    assert [line.split()[0] for line in table[2:]] == ["laser", "sasrec", "popularity"]
    _print_promotion(run)
    assert (
        f"Model {name} version {version}: staging — staged, not production (baseline gate)" in capsys.readouterr().out
    )


def test_laser_hyperparameter_reruns_only_laser_steps(trained):
    from pipelines.run import run_training

    cfg = _config("laser-mlops-hp", laser_train={"lr": 3e-4})
    base = run_training(_config("laser-mlops-hp"))
    assert set(_statuses(base).values()) <= {"cached", "completed"}
    statuses = _statuses(run_training(cfg))
    assert statuses == {**{s: "cached" for s in FULL_STEPS}, **{s: "completed" for s in LASER_AND_AFTER}}


def test_lineage_lists_every_artifact(trained):
    from zenml.client import Client

    from laser_cli.main import cli
    from laser_cli.registry import lineage

    _, run = trained
    info = lineage(str(run.id))
    listed = {o["id"] for node in info["chain"] for o in node["outputs"]}
    expected = {
        str(a.id) for s in Client().get_pipeline_run(run.id).steps.values() for arts in s.outputs.values() for a in arts
    }
    assert listed == expected and len(expected) >= 12
    assert [n["step"] for n in info["chain"]] == list(FULL_STEPS)
    assert info["raw_data"]["fingerprint"] and info["raw_data"]["format"] == "synthetic"
    by_name = {o["name"]: o for node in info["chain"] for o in node["outputs"]}
    assert by_name["sr_model"]["metadata"]["model"] == "sasrec" and by_name["scorer_bundle"]["uri"]
    # by model name and stage, as text and JSON
    result = CliRunner().invoke(cli, ["lineage", "laser-mlops:production"])
    assert result.exit_code == 0, result.output
    for art in ("dataset", "validation_report", "split", "sr_model", "laser_model", "item_table", "scorer_bundle"):
        assert f"{art} v" in result.output
    as_json = json.loads(CliRunner().invoke(cli, ["lineage", str(run.id), "--json"]).output)
    assert as_json["run"]["id"] == str(run.id)
    bad = CliRunner().invoke(cli, ["lineage", "no-such-model:7"])
    assert bad.exit_code != 0 and "no-such-model" in bad.output


def test_model_cli_list_show_diff(trained):
    from laser_cli.main import cli

    runner = CliRunner()
    out = runner.invoke(cli, ["model", "list", "laser-mlops", "--json"])
    assert out.exit_code == 0, out.output
    versions = json.loads(out.output)[0]["versions"]
    assert versions and all("laser_test" in v for v in versions)
    text = runner.invoke(cli, ["model", "list", "laser-mlops"]).output
    assert "production" in text and "ndcg@10=" in text
    shown = json.loads(runner.invoke(cli, ["model", "show", "laser-mlops", "production"]).output)
    assert shown["stage"] == "production" and "laser_model" in shown["artifacts"]
    a, b = versions[-1]["version"], versions[0]["version"]
    diff = json.loads(runner.invoke(cli, ["model", "diff", "laser-mlops", a, b, "--json"]).output)
    assert any(r["key"] == "laser_test.ndcg@10" for r in diff["metrics"])
    missing = runner.invoke(cli, ["model", "show", "laser-mlops", "999"])
    assert missing.exit_code != 0 and "999" in missing.output


def _one_line_error(result, *parts: str) -> None:
    """A refused command: non-zero exit, no traceback, and one output line holding every part."""
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output and not isinstance(result.exception, RuntimeError), result.output
    assert any(all(p in line for p in parts) for line in result.output.splitlines()), result.output


def test_model_cli_promote_refusals_and_force(trained):
    """On its own model (``laser-mlops-cli``; two runs served from the fixture's cache except promote: v1 in
    production, v2 in staging). Production taken → a one-line error that says to use --force; a version with no
    model and no metrics is refused even with --force; --force on a complete version archives the old one."""
    from zenml.client import Client

    from laser_cli.main import cli
    from laser_cli.registry import PromotionError, promote_version
    from pipelines.run import run_training

    name = "laser-mlops-cli"
    v1 = _decision(run_training(_config(name))).details["new_version"]
    v2 = _decision(run_training(_config(name))).details["new_version"]
    assert (_stage(name, v1), _stage(name, v2)) == ("production", "staging")
    runner = CliRunner()

    taken = runner.invoke(cli, ["model", "promote", name, v2, "--stage", "production"])
    _one_line_error(taken, f"v{v1} is already in production", "--force")
    with pytest.raises(PromotionError, match="--force"):
        promote_version(name, v2, "production")
    assert (_stage(name, v1), _stage(name, v2)) == ("production", "staging")

    # a version with no model and no metrics (a run that died before training): refused, even with --force
    empty = Client().create_model_version(name, name="empty").name
    for stage in ("production", "staging"):
        refused = runner.invoke(cli, ["model", "promote", name, empty, "--stage", stage, "--force"])
        _one_line_error(refused, f"v{empty} cannot go to {stage}", "no laser_model", "no Laser test metrics")
    assert (_stage(name, empty), _stage(name, v1), _stage(name, v2)) == (None, "production", "staging")

    # --force with a complete version: it goes to production, the old production version is archived
    forced = runner.invoke(cli, ["model", "promote", name, v2, "--stage", "production", "--force"])
    assert forced.exit_code == 0 and f"v{v2}: production" in forced.output, forced.output
    assert (_stage(name, v1), _stage(name, v2)) == ("archived", "production")
    # archiving is always allowed, also beside another archived version and without --force
    archived = runner.invoke(cli, ["model", "promote", name, empty, "--stage", "archived"])
    assert archived.exit_code == 0 and f"v{empty}: archived" in archived.output, archived.output
    assert (_stage(name, empty), _stage(name, v1)) == ("archived", "archived")
    # the same stage again is a no-op
    same = runner.invoke(cli, ["model", "promote", name, v2, "--stage", "production"])
    assert same.exit_code == 0 and _stage(name, v2) == "production"


def test_batch_recommendations_from_production(trained):
    import numpy as np

    from pipelines.run import run_batch

    cfg, _ = trained
    cfg = cfg.model_copy(deep=True)
    cfg.batch.k = 4
    run = run_batch(cfg)
    from zenml.client import Client

    step = Client().get_pipeline_run(run.id).steps["batch_recommend"]
    art = step.outputs["recommendations"][0]
    assert art.materializer.import_path == "steps.materializers.DataFrameMaterializer"
    frame = art.load()
    assert frame["user_id"].nunique() == 160 and len(frame) == 160 * 4
    assert (frame.groupby("user_id")["rank"].apply(list) == [[1, 2, 3, 4]] * 160).all()
    assert frame.groupby("user_id")["score"].apply(lambda s: bool(np.all(np.diff(s.to_numpy()) <= 1e-6))).all()
    production = Client().get_model_version("laser-mlops", "production")
    assert set(frame["model_version"]) == {f"laser-mlops:{production.name}"}
    # history items are excluded (batch.exclude_history)
    ds = production.get_artifact("dataset").load()
    ids = ds.items["item_id"].astype(str).to_numpy()
    seen = {u: set(ids[s]) for u, s in zip(ds.users, ds.sequences)}
    assert not any(row.item_id in seen[row.user_id] for row in frame.itertuples())
    # selected users
    cfg.batch.users = [ds.users[0], ds.users[5]]
    some = Client().get_pipeline_run(run_batch(cfg).id).steps["batch_recommend"].outputs["recommendations"][0]
    assert set(some.load()["user_id"]) == {ds.users[0], ds.users[5]}
    # the recommendations come from the exported bundle: a version without one is a clear error before any run
    Client().create_model("laser-no-bundle")
    bare = Client().create_model_version("laser-no-bundle", name="bare")
    bare.set_stage("production")
    cfg.model.name = "laser-no-bundle"
    with pytest.raises(RuntimeError, match="no exported bundle"):
        run_batch(cfg)


def test_schedule_fails_on_local_stack_before_running(trained, tmp_path):
    from zenml.client import Client

    from laser_cli.main import cli
    from pipelines.run import ScheduleError, make_schedule

    with pytest.raises(ScheduleError) as err:
        make_schedule("0 3 * * *", "configs/demo.yaml")
    msg = str(err.value)
    assert "'local' orchestrator" in msg and "infra/" in msg and "0 3 * * * cd " in msg and "run --config" in msg
    with pytest.raises(ScheduleError, match="5 fields"):
        make_schedule("every day")
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(json.dumps(_config("laser-sched").model_dump(mode="json")))
    before = Client().list_pipeline_runs(size=1).total
    result = CliRunner().invoke(cli, ["run", "--config", str(cfg_file), "--schedule", "0 3 * * *"])
    assert result.exit_code != 0 and "cannot run schedules" in result.output
    assert Client().list_pipeline_runs(size=1).total == before  # nothing ran
