"""Tuning the ID model with Optuna (laser_core.sr.tune, `laser sr tune`): bounds, resume, pruning, the layer."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
from click.testing import CliRunner

from laser_core.config import load_config
from laser_core.configuration import SRConfig, TrainConfig, TuneConfig
from laser_core.data import leave_one_out, load_dataset
from laser_core.sr import tune as tune_module
from laser_core.sr.tune import study_name, trials_table, tune, write_layer

REPO = Path(__file__).resolve().parents[1]
BASE_SR = SRConfig(model="sasrec", hidden_size=8, n_heads=1, max_len=8)
BASE_TRAIN = TrainConfig(epochs=2, batch_size=64, progress=False)
SPACE = TuneConfig(
    hidden_size=[8, 16],
    n_layers={"low": 1, "high": 2},
    n_heads=[1, 2],
    dropout={"low": 0.0, "high": 0.3},
    max_len=[5, 10],
    lr={"low": 1e-3, "high": 3e-2},
    weight_decay={"low": 0.0, "high": 1e-4},
    patience={"low": 1, "high": 3},
    startup_trials=2,
)
FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


@pytest.fixture(scope="module")
def split():
    return leave_one_out(load_dataset({"synthetic": {"n_users": 120, "n_items": 40, "seed": 1}}))


def _recorded_valid(workdir: Path, trial: optuna.trial.FrozenTrial) -> dict:
    """The trial's best validation metrics as its trainer recorded them (state.json of its own workdir)."""
    state = json.loads((workdir / trial.user_attrs["workdir"] / "state.json").read_text())
    return state["best"]["1"]["valid"], state


def _finished(study):
    return [(t.number, t.params, t.value) for t in study.get_trials(states=FINISHED)]


def test_best_trial_is_in_bounds_and_its_value_is_the_recorded_ndcg(split, tmp_path):
    result = tune(BASE_SR, BASE_TRAIN, SPACE, split, tmp_path, n_trials=4)
    study = result.study
    complete = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert result.trials_run == 4 and len(complete) == 4  # no pruning in the first 5 trials (median pruner)
    best = study.best_trial
    p = best.params
    assert p["hidden_size"] in SPACE.hidden_size and p["n_heads"] in SPACE.n_heads and p["max_len"] in SPACE.max_len
    assert SPACE.n_layers.low <= p["n_layers"] <= SPACE.n_layers.high
    assert SPACE.dropout.low <= p["dropout"] <= SPACE.dropout.high
    assert SPACE.lr.low <= p["lr"] <= SPACE.lr.high
    assert SPACE.weight_decay.low <= p["weight_decay"] <= SPACE.weight_decay.high
    assert SPACE.patience.low <= p["patience"] <= SPACE.patience.high
    # the result is the best trial's settings, and its value is what its trainer recorded as the best epoch
    assert (result.sr.hidden_size, result.sr.n_layers, result.sr.n_heads) == (
        p["hidden_size"],
        p["n_layers"],
        p["n_heads"],
    )
    assert result.sr.dropout == result.sr.attn_dropout == p["dropout"] and result.sr.max_len == p["max_len"]
    assert (result.train.lr, result.train.weight_decay, result.train.patience) == (
        p["lr"],
        p["weight_decay"],
        p["patience"],
    )
    assert result.train.epochs == BASE_TRAIN.epochs and result.sr.model == "sasrec"
    # the loss is searched; the negatives only with the sampled softmax
    for t in complete:
        assert t.params["loss"] in SPACE.loss
        assert ("n_negatives" in t.params) == (t.params["loss"] == "sampled")
    assert result.sr.loss == p["loss"] and result.sr.n_negatives == p.get("n_negatives", BASE_SR.n_negatives)
    valid, _ = _recorded_valid(tmp_path, best)
    assert result.value == best.value == valid["ndcg@10"] > 0
    assert best.value >= max(t.value for t in complete) >= min(t.value for t in complete)
    # every trial reported its epochs to the pruner; TPE drew distinct settings
    for t in complete:
        assert sorted(t.intermediate_values) == list(range(t.user_attrs["epochs_run"]))
    assert len({tuple(sorted(t.params.items())) for t in complete}) == 4
    table = trials_table(study)
    assert len(table.splitlines()) == 5 and "COMPLETE" in table and "hidden_size=" in table


def test_interrupted_study_resumes_with_its_finished_trials(split, tmp_path, monkeypatch):
    real_fit = tune_module.fit
    calls = []

    def killed_at_third_trial(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(tune_module, "fit", killed_at_third_trial)
    with pytest.raises(KeyboardInterrupt):
        tune(BASE_SR, BASE_TRAIN, SPACE, split, tmp_path, n_trials=5)
    monkeypatch.setattr(tune_module, "fit", real_fit)
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    (name,) = optuna.get_all_study_names(storage)
    before = _finished(optuna.load_study(study_name=name, storage=storage))
    assert len(before) == 2
    # a trial a kill left RUNNING (drawn, not finished): failed on resume, and its settings are tried again first
    hanging = optuna.load_study(study_name=name, storage=storage).ask()
    hanging_params = tune_module.suggest(hanging, SPACE)

    result = tune(BASE_SR, BASE_TRAIN, SPACE, split, tmp_path, n_trials=5)
    study = result.study
    assert _finished(study)[:2] == before  # the k finished trials are kept, unchanged
    assert len(study.get_trials(states=FINISHED)) == 5 and result.trials_run == 3  # only the rest ran
    states = {t.number: t.state for t in study.trials}
    assert states[2] == states[hanging.number] == optuna.trial.TrialState.FAIL
    # the two unfinished trials (failed by the interrupt, left RUNNING) were tried again first, same settings
    retries = {t.user_attrs["retry_of"]: t for t in study.trials if "retry_of" in t.user_attrs}
    assert sorted(retries) == [2, hanging.number] and retries[hanging.number].params == hanging_params
    assert retries[2].params == study.trials[2].params
    assert all(r.state == optuna.trial.TrialState.COMPLETE for r in retries.values())
    # a budget already spent runs nothing; the base's values of tuned settings do not make another study
    searched = BASE_SR.model_copy(update={"max_len": 30, "inner_size": 64, "hidden_size": 32, "dropout": 0.5})
    again = tune(searched, BASE_TRAIN.model_copy(update={"lr": 0.5}), SPACE, split, tmp_path, n_trials=4)
    assert again.trials_run == 0 and again.value == result.value and again.study.study_name == name
    # a fixed setting, the space or the data do
    assert study_name(BASE_SR, BASE_TRAIN.model_copy(update={"batch_size": 32}), SPACE, split) != name
    assert study_name(BASE_SR, BASE_TRAIN, SPACE.model_copy(update={"max_len": [5]}), split) != name


class PruneOddTrials(optuna.pruners.BasePruner):
    def prune(self, study, trial) -> bool:
        return trial.number % 2 == 1


def test_a_pruned_trial_is_recorded_as_pruned(split, tmp_path):
    result = tune(BASE_SR, BASE_TRAIN, SPACE, split, tmp_path, n_trials=3, pruner=PruneOddTrials())
    states = [t.state for t in result.study.trials]
    P, C = optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.COMPLETE
    assert states == [C, P, C]
    pruned = result.study.trials[1]
    _, state = _recorded_valid(tmp_path, pruned)
    assert list(pruned.intermediate_values) == [0] and len(state["history"]) == 1  # stopped after its first epoch
    assert result.study.best_trial.number in (0, 2)
    with pytest.raises(ValueError, match="no trial .* completed"):
        tune(
            BASE_SR, BASE_TRAIN, SPACE, split, tmp_path / "all", n_trials=1, pruner=optuna.pruners.ThresholdPruner(1.0)
        )


def test_written_layer_loads_under_a_run_config(tmp_path):
    sr = BASE_SR.model_copy(update={"hidden_size": 32, "n_heads": 4, "n_layers": 1, "dropout": 0.25, "max_len": 20})
    train = BASE_TRAIN.model_copy(update={"lr": 0.00123, "weight_decay": 1e-5, "patience": 7})
    write_layer(tmp_path / "tuned.yaml", sr, train, comment="tuned\nhere")
    run = tmp_path / "run.yaml"
    run.write_text(f"base: [{REPO / 'configs' / 'tiny.yaml'}, tuned.yaml]\n")
    cfg = load_config(run)
    assert cfg.sr == sr and cfg.dataset.name == "tiny"  # the tuned model over the run config's
    assert (cfg.sr_train.lr, cfg.sr_train.weight_decay, cfg.sr_train.patience) == (0.00123, 1e-5, 7)
    assert cfg.sr_train.progress is True  # machine settings are not in the layer


def test_a_start_point_is_the_first_trial_and_a_bad_one_is_refused(split, tmp_path):
    point = {"hidden_size": 16, "n_layers": 1, "n_heads": 1, "dropout": 0.2, "max_len": 10, "lr": 1e-2}
    point |= {"weight_decay": 0.0, "patience": 2, "loss": "sampled", "n_negatives": 64}
    space = SPACE.model_copy(update={"start_points": [point]})
    result = tune(BASE_SR, BASE_TRAIN, space, split, tmp_path, n_trials=1)
    first = result.study.trials[0]
    assert first.params == point and first.user_attrs["start_point"]
    assert (result.sr.loss, result.sr.n_negatives, result.sr.hidden_size) == ("sampled", 64, 16)
    with pytest.raises(ValueError, match=r"start_points\[0\]: missing n_negatives"):
        TuneConfig(start_points=[{k: v for k, v in point.items() if k != "n_negatives"}])
    with pytest.raises(ValueError, match="hidden_size=48 is not one of"):
        TuneConfig(start_points=[point | {"hidden_size": 48}])
    with pytest.raises(ValueError, match="n_layers=1.5 must be an integer"):
        TuneConfig(start_points=[point | {"hidden_size": 64, "n_layers": 1.5}])
    with pytest.raises(ValueError, match="unknown key epochs"):
        TuneConfig(start_points=[point | {"hidden_size": 64, "epochs": 3}])


def test_text_items_trials_read_the_table_and_it_keys_the_study(split, tmp_path):
    import torch

    base = BASE_SR.model_copy(update={"text_items": "init"})
    with pytest.raises(ValueError, match="text"):  # the table is required, as by fit
        tune(base, BASE_TRAIN, SPACE, split, tmp_path / "none", n_trials=1)
    table = torch.randn(split.n_items, 12, generator=torch.Generator().manual_seed(0))
    result = tune(base, BASE_TRAIN, SPACE, split, tmp_path / "a", n_trials=1, text_table=table)
    assert result.sr.text_items == "init" and result.value > 0
    names = {study_name(base, BASE_TRAIN, SPACE, split, t) for t in (table, table + 1)}
    assert result.study.study_name in names and len(names) == 2


def test_tune_config_refuses_heads_that_do_not_divide():
    with pytest.raises(ValueError, match="3 does not divide 64"):
        TuneConfig(hidden_size=[64], n_heads=[2, 3])
    with pytest.raises(ValueError, match="low .* must be <= high"):
        TuneConfig(lr={"low": 1e-2, "high": 1e-3})


def test_cli_tunes_end_to_end_and_refuses_zero_trials(tmp_path):
    from laser_cli.main import cli

    config = tmp_path / "tune.yaml"
    config.write_text(
        f"base: {REPO / 'configs' / 'tiny.yaml'}\n"
        "sr_tune: {hidden_size: [8, 16], n_layers: {low: 1, high: 1}, n_heads: [1, 2], max_len: [5, 10]}\n"
    )
    runner = CliRunner()
    bad = runner.invoke(cli, ["sr", "tune", "--config", str(config), "--trials", "0"])
    assert bad.exit_code == 2 and "--trials" in bad.output
    none = runner.invoke(cli, ["sr", "tune", "--config", str(config)])
    assert none.exit_code == 2 and "--trials" in none.output
    out = tmp_path / "work"
    res = runner.invoke(cli, ["sr", "tune", "--config", str(config), "--trials", "2", "--workdir", str(out)])
    assert res.exit_code == 0, res.output
    assert "COMPLETE" in res.output and "best: trial" in res.output
    tuned = load_config(out / "tuned.yaml", overrides=["dataset.format=synthetic"])
    assert tuned.sr.hidden_size in (8, 16) and tuned.sr.n_layers == 1 and tuned.sr.max_len in (5, 10)
    study = optuna.load_study(
        study_name=optuna.get_all_study_names(f"sqlite:///{out / 'study.db'}")[0],
        storage=f"sqlite:///{out / 'study.db'}",
    )
    assert study.best_trial.params["hidden_size"] == tuned.sr.hidden_size
    assert tuned.sr_train.lr == study.best_trial.params["lr"]
