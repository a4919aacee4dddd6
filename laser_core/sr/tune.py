"""Tuning an ID model (SASRec, BERT4Rec) with Optuna: ``laser sr tune``.

- the search space: :class:`laser_core.configuration.TuneConfig` (hidden size, blocks, heads, dropout, max
  length, lr, weight decay, patience, the loss: full softmax or sampled softmax with N negatives); everything else comes from the run config's ``sr`` and ``sr_train``;
- start points (``sr_tune.start_points``, e.g. a published configuration) are the new study's first trials;
- the sampler: TPE, seeded (with the seed plus the trials already in the study, so a resumed study does not
  replay the first trials' random draws);
- pruning: Optuna's median pruner on the validation ``sr_train.monitor`` (NDCG@10), reported after every epoch
  through the trainer's callback (:func:`laser_core.sr.trainer.fit`); a pruned trial keeps its best epoch's
  checkpoint and is recorded as PRUNED;
- the study: SQLite in the workdir (``study.db``), named by the content of the run (the model, the fixed
  training settings, the search space and the split), so a killed tuning resumes with its finished trials kept
  (they count toward the budget), and another config or data set tuned in the same folder is a study of its own.
  A trial the kill left RUNNING is marked FAIL and its settings are tried again first;
- each trial trains with :func:`~laser_core.sr.trainer.fit` in ``trials/<key of its settings>/`` under the
  workdir, so a re-run trial resumes from its checkpoint;
- the result: the best trial's :class:`SRConfig` and :class:`TrainConfig`, and :func:`write_layer` writes them
  as a config layer (``sr:`` and ``sr_train:``) to put under a run config with ``base:``.

One tuning runs in a workdir at a time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import optuna
import yaml

from laser_core.configuration import SRConfig, TrainConfig, TuneConfig
from laser_core.data.split import Split
from laser_core.fingerprint import fingerprint, split_fingerprint
from laser_core.sr.trainer import fit
from laser_core.trainer import atomic_write

STUDY_DB = "study.db"
TUNABLE = ("sasrec", "bert4rec")
#: what a trial sets in sr (inner_size: none, the FFN is 4 x the hidden size)
TUNED_SR = (
    "hidden_size",
    "n_layers",
    "n_heads",
    "dropout",
    "attn_dropout",
    "max_len",
    "inner_size",
    "loss",
    "n_negatives",
)
#: what a trial sets in sr_train (the rest of sr_train is the run config's)
TUNED_TRAIN = ("lr", "weight_decay", "patience")
#: what the written layer keeps of sr_train (not the machine's settings: threads, progress, eval batch size)
LAYER_TRAIN = ("epochs", "batch_size", "lr", "weight_decay", "patience", "monitor", "mask_history", "seed")


@dataclass
class TuneResult:
    study: optuna.Study
    sr: SRConfig
    train: TrainConfig
    value: float
    trials_run: int  # trials this call ran (the rest of the study was there already)


def trial_settings(params: dict, base_sr: SRConfig, base_train: TrainConfig) -> tuple[SRConfig, TrainConfig]:
    """The run settings of a trial's ``params`` (what :func:`suggest` drew) on top of the base settings."""
    sr = {
        **base_sr.model_dump(),
        "hidden_size": params["hidden_size"],
        "n_layers": params["n_layers"],
        "n_heads": params["n_heads"],
        "dropout": params["dropout"],
        "attn_dropout": params["dropout"],
        "max_len": params["max_len"],
        "inner_size": None,
        "loss": params.get("loss", base_sr.loss),
        "n_negatives": params.get("n_negatives", base_sr.n_negatives),
    }
    train = {**base_train.model_dump(), **{k: params[k] for k in TUNED_TRAIN}}
    return SRConfig.model_validate(sr), TrainConfig.model_validate(train)


def suggest(trial: optuna.Trial, space: TuneConfig) -> dict:
    """Draw one point of ``space`` (heads divide the hidden size by :class:`TuneConfig`'s check); the number of
    negatives only when the drawn loss is the sampled softmax."""
    loss = trial.suggest_categorical("loss", space.loss)
    negatives = (
        {"n_negatives": trial.suggest_categorical("n_negatives", space.n_negatives)} if loss == "sampled" else {}
    )
    return {
        "loss": loss,
        **negatives,
        "hidden_size": trial.suggest_categorical("hidden_size", space.hidden_size),
        "n_layers": trial.suggest_int("n_layers", space.n_layers.low, space.n_layers.high),
        "n_heads": trial.suggest_categorical("n_heads", space.n_heads),
        "dropout": trial.suggest_float("dropout", space.dropout.low, space.dropout.high),
        "max_len": trial.suggest_categorical("max_len", space.max_len),
        "lr": trial.suggest_float("lr", space.lr.low, space.lr.high, log=True),
        "weight_decay": trial.suggest_float("weight_decay", space.weight_decay.low, space.weight_decay.high),
        "patience": trial.suggest_int("patience", space.patience.low, space.patience.high),
    }


def study_name(base_sr: SRConfig, base_train: TrainConfig, space: TuneConfig, split: Split, text_table=None) -> str:
    """The study's name: the model and a key of everything the trials' values depend on but the drawn params."""
    parts = {
        "model": base_sr.model_dump(exclude=set(TUNED_SR)),
        "train": base_train.model_dump(exclude={"progress", "threads", *TUNED_TRAIN}),
        "space": space,
        "data": split_fingerprint(split),
    }
    if text_table is not None and base_sr.text_items != "none":
        parts["text_table"] = text_table.float()
    key = fingerprint("sr-tune", parts)
    return f"{base_sr.model}-{key[:12]}"


def _retry_interrupted(study: optuna.Study) -> None:
    """Trials an interrupted tuning left unfinished (RUNNING after a kill, FAIL after Ctrl-C or an error) and
    not tried again yet: a RUNNING one is marked FAIL, and each one's settings are enqueued to run first (the
    same settings: the retry resumes from the trial's checkpoint). The retry's ``retry_of`` names the trial."""
    retried = {t.user_attrs.get("retry_of") for t in study.get_trials(deepcopy=False)}
    unfinished = (optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.FAIL)
    for t in study.get_trials(deepcopy=False, states=unfinished):
        if t.state == optuna.trial.TrialState.RUNNING:
            study.tell(t.number, state=optuna.trial.TrialState.FAIL)
        if t.number not in retried and t.params:
            study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})


def tune(
    base_sr: SRConfig,
    base_train: TrainConfig,
    space: TuneConfig,
    split: Split,
    workdir: str | Path,
    n_trials: int | None = None,
    minutes: float | None = None,
    pruner: optuna.pruners.BasePruner | None = None,
    text_table=None,
) -> TuneResult:
    """Tune ``base_sr.model`` on ``split`` (see the module's docstring) until the study holds ``n_trials``
    finished (complete or pruned) trials or ``minutes`` have passed, whichever comes first; at least one of the
    two must be given. ``pruner``: instead of the median pruner (tests). ``text_table``: the frozen LLM item
    table every trial's model reads when ``base_sr.text_items`` is set (route b; part of the study's key)."""
    if base_sr.model not in TUNABLE:
        raise ValueError(f"sr.model: tuning needs one of {', '.join(TUNABLE)}, got {base_sr.model!r}")
    if n_trials is None and minutes is None:
        raise ValueError("give a budget: a number of trials, minutes, or both")
    if n_trials is not None and n_trials < 1:
        raise ValueError(f"the number of trials must be >= 1, got {n_trials}")
    if minutes is not None and not minutes > 0:
        raise ValueError(f"minutes must be > 0, got {minutes}")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    storage = f"sqlite:///{(workdir / STUDY_DB).resolve()}"
    name = study_name(base_sr, base_train, space, split, text_table)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name=name,
        storage=storage,
        load_if_exists=True,
        direction="maximize",
        pruner=pruner
        or optuna.pruners.MedianPruner(
            n_startup_trials=space.prune_startup_trials, n_warmup_steps=space.prune_warmup_epochs
        ),
    )
    study.sampler = optuna.samplers.TPESampler(
        seed=space.seed + len(study.trials), n_startup_trials=space.startup_trials
    )
    before = len(study.trials)
    if not before:
        for point in space.start_points:
            study.enqueue_trial(point, user_attrs={"start_point": True})
    _retry_interrupted(study)
    monitor = base_train.monitor

    def objective(trial: optuna.Trial) -> float:
        sr, train = trial_settings(suggest(trial, space), base_sr, base_train)
        folder = workdir / "trials" / fingerprint("sr-trial", {"sr": sr, "train": train})[:12]
        trial.set_user_attr("workdir", str(folder.relative_to(workdir)))

        def report(epoch: int, entry: dict) -> None:
            trial.report(entry["valid"][monitor], epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"epoch {epoch}: {monitor} {entry['valid'][monitor]:.4f}")

        result = fit(sr, train, split, workdir=folder, callbacks=[report], text_table=text_table)
        trial.set_user_attr("best_epoch", result.best_epoch)
        trial.set_user_attr("epochs_run", result.epochs_run)
        return float(result.best_valid[monitor])

    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    done = len(study.get_trials(deepcopy=False, states=finished))
    remaining = None if n_trials is None else max(0, n_trials - done)
    if remaining != 0:
        study.optimize(
            objective,
            n_trials=remaining,
            timeout=None if minutes is None else minutes * 60,
            catch=(),
            gc_after_trial=True,
        )
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not complete:
        raise ValueError(f"{workdir / STUDY_DB}: no trial of study {name} completed (all pruned or failed)")
    best = study.best_trial
    sr, train = trial_settings(best.params, base_sr, base_train)
    return TuneResult(study=study, sr=sr, train=train, value=float(best.value), trials_run=len(study.trials) - before)


def trials_table(study: optuna.Study) -> str:
    """A short text table of the study's trials: number, state, value, params."""
    rows = [("trial", "state", "value", "params")]
    for t in study.trials:
        value = "" if t.value is None or not math.isfinite(t.value) else f"{t.value:.4f}"
        if t.value is None and t.intermediate_values:  # pruned: its last reported value
            value = f"({t.intermediate_values[max(t.intermediate_values)]:.4f})"
        params = " ".join(f"{k}={_short(v)}" for k, v in t.params.items())
        rows.append((str(t.number), t.state.name, value, params))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r[:3], widths)) + "  " + r[3] for r in rows)


def _short(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def write_layer(path: str | Path, sr: SRConfig, train: TrainConfig, comment: str = "") -> Path:
    """The tuned settings as a config layer: only ``sr:`` and ``sr_train:`` (the latter without the machine's
    settings), for ``base: [run.yaml, tuned.yaml]`` or to copy into a config."""
    path = Path(path)
    body = {"sr": sr.model_dump(mode="json"), "sr_train": train.model_dump(mode="json", include=set(LAYER_TRAIN))}
    head = "".join(f"# {line}\n" for line in comment.splitlines())
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, head + yaml.safe_dump(body, sort_keys=False))
    return path


__all__ = ["TuneResult", "study_name", "suggest", "trial_settings", "trials_table", "tune", "write_layer"]
