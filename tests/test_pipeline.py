"""The data pipeline on ZenML's embedded default (isolated store): end-to-end, cached re-run, failed validation."""

from __future__ import annotations

import pandas as pd
import pytest

from laser_core.config import LaserConfig, data_fingerprint


def _config(stop_after: str = "laser", **dataset) -> LaserConfig:
    """The tiny config; stops after evaluate_laser (tests/test_mlops.py runs the export and promotion too)."""
    return LaserConfig.model_validate(
        {
            "dataset": dataset or {"format": "synthetic", "synthetic": {"n_users": 200, "n_items": 80, "seed": 1}},
            "validation": {"min_sequence_length": 3, "max_sequence_length": 50},
            "sr": {"model": "sasrec", "hidden_size": 16},
            "sr_train": {"epochs": 2, "batch_size": 64, "progress": False},
            **TINY_LASER,
            "pipeline": {"stop_after": stop_after},
        }
    )


TINY_LASER = {
    "text": {"history_len": 3},
    "backbone": {"name": "tiny-random-llama", "quantization": "nf4"},
    "bitune": {"mformer": {"n_experts": 2, "n_query": 4, "width": 32, "n_layers": 2, "n_heads": 2}},
    "laser_train": {
        "stage1_epochs": 1,
        "stage2_epochs": 1,
        "batch_size": 8,
        "users_per_epoch": 16,
        "valid_users": 16,
        "test_users": 32,
        "item_batch_size": 40,
        "progress": False,
        "optimizer": "adam",
        "weight_decay": 0.0,
        "schedule": "constant",
        "grad_accumulation": 1,
        "patience": None,
    },
}
LASER_STEPS = ("bi_tune_stage1", "bi_tune_stage2", "evaluate_laser")


def _statuses(run) -> dict[str, str]:
    from zenml.client import Client

    run = Client().get_pipeline_run(run.id)
    return {name: s.status.value for name, s in run.steps.items()}


def test_pipeline_end_to_end_then_cached(zenml_store):
    from zenml.client import Client

    from pipelines.run import run_training

    cfg = _config()
    first = run_training(cfg)
    assert _statuses(first) == {
        "load_dataset": "completed",
        "validate_dataset": "completed",
        "split_dataset": "completed",
        "pretrain_sr": "completed",
        "evaluate_sr": "completed",
        **{s: "completed" for s in LASER_STEPS},
    }
    run = Client().get_pipeline_run(first.id)
    dataset = run.steps["load_dataset"].outputs["dataset"][0]
    report = run.steps["validate_dataset"].outputs["validation_report"][0]
    split = run.steps["split_dataset"].outputs["split"][0]
    assert dataset.run_metadata["users"] == 200 and dataset.run_metadata["items"] == 80
    assert report.load().success and report.run_metadata["n_failed"] == 0
    loaded = split.load()
    assert len(loaded.eval_users) == 200 and loaded.n_items == 80
    assert run.steps["split_dataset"].outputs["split_report"][0].load()["eval_users"] == 200
    # materializers are ours (Parquet/JSON), never ZenML's pickle-based fallback
    sr_model = run.steps["pretrain_sr"].outputs["sr_model"][0]
    for art in (dataset, report, split, sr_model):
        assert art.materializer.import_path.startswith("steps.materializers."), art.materializer.import_path
    assert sr_model.run_metadata["model"] == "sasrec" and sr_model.run_metadata["parameters"] > 0
    metrics = run.steps["evaluate_sr"].outputs["sr_metrics"][0].load()
    assert metrics.protocol["mask_history"] is False and 0 < metrics.metrics["ndcg@10"] <= 1
    # the stored model reproduces the test metrics it was evaluated with
    from laser_core.evaluation import evaluate_split

    assert evaluate_split(sr_model.load(), loaded, "test") == metrics.metrics

    second = run_training(cfg)
    assert set(_statuses(second).values()) == {"cached"}
    # a changed Laser hyper-parameter re-runs only the Laser steps
    cfg.laser_train.lr = 5e-4
    third = _statuses(run_training(cfg))
    assert third == {
        "load_dataset": "cached",
        "validate_dataset": "cached",
        "split_dataset": "cached",
        "pretrain_sr": "cached",
        "evaluate_sr": "cached",
        **{s: "completed" for s in LASER_STEPS},
    }
    laser_metrics = Client().get_pipeline_run(second.id).steps["evaluate_laser"].outputs["laser_metrics"][0].load()
    assert laser_metrics.protocol["users"] == 32 and 0 <= laser_metrics.metrics["ndcg@10"] <= 1
    stage1 = run.steps["bi_tune_stage1"].outputs["laser_stage1"][0]
    table = run.steps["bi_tune_stage1"].outputs["item_table"][0]
    assert table.load().table.shape == (80, 64)
    for art in (stage1, table, run.steps["bi_tune_stage2"].outputs["laser_model"][0]):
        assert art.materializer.import_path.startswith("steps.materializers."), art.materializer.import_path


def test_changed_data_invalidates_cache(tmp_path, zenml_store):
    from pipelines.run import run_training

    root = tmp_path / "tbl"
    root.mkdir()
    inter = pd.DataFrame({"user_id": list("aaaaabbbbb"), "item_id": list("xyzvwyzxwv"), "timestamp": range(10)})
    items = pd.DataFrame({"item_id": list("xyzvw"), "title": ["X one", "Y two", "Z three", "V four", "W five"]})
    inter.to_csv(root / "interactions.csv", index=False)
    items.to_csv(root / "items.csv", index=False)
    cfg = _config(stop_after="split", format="table", path=str(root))
    fp = data_fingerprint(cfg.dataset)
    assert _statuses(run_training(cfg))["load_dataset"] == "completed"
    assert _statuses(run_training(cfg))["load_dataset"] == "cached"
    items.loc[0, "title"] = "X one, renamed"
    items.to_csv(root / "items.csv", index=False)
    assert data_fingerprint(cfg.dataset) != fp
    assert _statuses(run_training(cfg))["load_dataset"] == "completed"


def test_failed_validation_stops_pipeline_and_saves_report(tmp_path, zenml_store):
    from zenml.client import Client

    from pipelines.run import run_training

    root = tmp_path / "bad"
    root.mkdir()
    inter = pd.DataFrame({"user_id": list("aaab"), "item_id": list("xyxz"), "timestamp": [1, 2, 1, 3]})
    items = pd.DataFrame({"item_id": list("xyz"), "title": ["X one", "", "Z three"]})
    inter.to_csv(root / "interactions.csv", index=False)
    items.to_csv(root / "items.csv", index=False)
    before = {v.id for v in Client().list_artifact_versions(name="validation_report", size=1000).items}
    with pytest.raises(Exception) as err:
        run_training(_config(stop_after="split", format="table", path=str(root)), enable_cache=False)
    assert "validation" in str(err.value).lower() or "failed" in str(err.value).lower()
    runs = Client().list_pipeline_runs(sort_by="desc:created", size=1).items
    statuses = {name: s.status.value for name, s in runs[0].steps.items()}
    assert statuses["validate_dataset"] == "failed" and "split_dataset" not in statuses
    new = [v for v in Client().list_artifact_versions(name="validation_report", size=1000).items if v.id not in before]
    assert len(new) == 1
    saved = new[0].load()
    assert not saved.success
    failed = {(o.table, o.expectation, o.column) for o in saved.failures}
    assert ("items", "expect_column_value_lengths_to_be_between", "title") in failed
    assert ("interactions", "expect_compound_columns_to_be_unique", "user_id,item_id,timestamp") in failed


def test_pipeline_tunes_the_id_model_then_pretrains_the_best_settings(zenml_store, tmp_path, monkeypatch):
    from zenml.client import Client

    import optuna

    from pipelines.run import run_training

    from laser_core.sr.trainer import SRTrainer

    monkeypatch.setenv("LASER_CACHE_DIR", str(tmp_path / "cache"))
    epochs: list[int] = []
    real_epoch = SRTrainer.train_epoch
    monkeypatch.setattr(SRTrainer, "train_epoch", lambda self, e: epochs.append(e) or real_epoch(self, e))
    cfg = _config(stop_after="sr")
    raw = cfg.model_dump()
    raw["pipeline"]["tune_sr"] = {"trials": 2}
    raw["sr_tune"] |= {"hidden_size": [8, 16], "n_layers": {"low": 1, "high": 1}, "n_heads": [1], "max_len": [10]}
    cfg = type(cfg).model_validate(raw)
    run = Client().get_pipeline_run(run_training(cfg).id)
    assert run.steps["tune_sr"].status.value == "completed"
    tuned = run.steps["tune_sr"].outputs["tuned_sr_model"][0]
    assert "pickle" not in tuned.materializer.import_path.lower()
    tuned_sr = tuned.load()
    trained = run.steps["pretrain_sr"].outputs["sr_model"][0].load()
    assert trained.config == tuned_sr and tuned_sr.hidden_size in (8, 16) and tuned_sr.max_len == 10
    # pretrain_sr reloaded the best trial's finished checkpoint: every epoch trained was a trial's
    db = next((tmp_path / "cache").rglob("study.db"))
    (summary,) = optuna.get_all_study_summaries(f"sqlite:///{db}")
    trials = optuna.load_study(study_name=summary.study_name, storage=f"sqlite:///{db}").trials
    assert len(epochs) == sum(t.user_attrs["epochs_run"] for t in trials)
    training = run.steps["pretrain_sr"].outputs["sr_training"][0].load()
    assert training["best_valid"]["ndcg@10"] == max(t.value for t in trials)
    # the study lives under LASER_CACHE_DIR: its two finished trials

    (db,) = (tmp_path / "cache" / "checkpoints" / "tune").glob("*/study.db")
    (summary,) = optuna.get_all_study_summaries(f"sqlite:///{db}")
    assert summary.n_trials == 2
