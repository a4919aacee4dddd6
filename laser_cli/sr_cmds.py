"""``laser sr ...``: the ID-based model on its own (``laser sr tune``: Optuna over its settings)."""

from __future__ import annotations

from pathlib import Path

import click


@click.group()
def sr() -> None:
    """The ID-based recommender (SASRec, BERT4Rec) on its own."""


@sr.command(name="tune")
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False), help="YAML run config.")
@click.option(
    "--data-dir", type=click.Path(file_okay=False), default=None, help="Data directory (overrides dataset.path)."
)
@click.option(
    "--trials",
    type=click.IntRange(min=1),
    default=None,
    help="Budget: finished trials in the study (those of an earlier, interrupted tuning count).",
)
@click.option(
    "--minutes", type=click.FloatRange(min=0, min_open=True), default=None, help="Budget: minutes of this call."
)
@click.option(
    "--workdir",
    type=click.Path(file_okay=False),
    default=None,
    help="Where the study (study.db), the trials' checkpoints and tuned.yaml go; a tuning there resumes "
    "(default: laser-tune/<model name>).",
)
def tune_cmd(config_path: str, data_dir: str | None, trials: int | None, minutes: float | None, workdir: str | None):
    """Tune the config's ID model (sr.model: sasrec or bert4rec) with Optuna on the validation NDCG@10: the
    search space is the config's sr_tune section; the best settings are written as a config layer (tuned.yaml)."""
    from laser_cli.main import _config
    from laser_core.data import leave_one_out, load_dataset
    from laser_core.data.validation import validate
    from laser_core.sr.tune import TUNABLE, trials_table, tune, write_layer

    if trials is None and minutes is None:
        raise click.UsageError("give a budget: --trials N and/or --minutes M")
    cfg = _config(config_path, data_dir)
    if cfg.sr.model not in TUNABLE:
        raise click.UsageError(f"{config_path}: sr.model is {cfg.sr.model!r}; tuning needs {' or '.join(TUNABLE)}")
    folder = Path(workdir) if workdir else Path("laser-tune") / cfg.model_name()
    if folder.exists() and not folder.is_dir():  # the default folder (--workdir is checked by click.Path)
        raise click.UsageError(f"{folder}: not a directory (the default --workdir); give another with --workdir")
    dataset = load_dataset(cfg.dataset)
    validate(dataset, cfg.validation).raise_for_failures()
    split = leave_one_out(dataset)
    click.echo(f"tuning {cfg.sr.model} on {dataset.name}: {len(split.valid_examples()[0]):,} validation users")
    train = cfg.sr_train.model_copy(update={"progress": False})
    text_table = None
    if cfg.sr.text_items != "none":  # route b: every trial's model reads the frozen LLM item table
        from laser_core.frozen_table import frozen_item_table

        click.echo(f"sr.text_items {cfg.sr.text_items}: the frozen LLM item table ({len(dataset.items):,} items)")
        text_table = frozen_item_table(
            cfg.laser_spec(), dataset.items, batch_size=cfg.laser_train.item_batch_size, device=cfg.laser_train.device
        ).table
    result = tune(cfg.sr, train, cfg.sr_tune, split, folder, n_trials=trials, minutes=minutes, text_table=text_table)
    click.echo(trials_table(result.study))
    best = result.study.best_trial
    out = write_layer(
        folder / "tuned.yaml",
        result.sr,
        result.train.model_copy(update={"progress": cfg.sr_train.progress}),
        comment=f"laser sr tune --config {config_path}: trial {best.number} of study {result.study.study_name}, "
        f"validation {train.monitor} {result.value:.4f}\nuse as a layer: base: [<run config>, <this file>]",
    )
    click.echo(
        f"best: trial {best.number}, validation {train.monitor} {result.value:.4f} ({result.trials_run} run now)"
    )
    click.echo(f"settings: {out}")


def register(cli: click.Group) -> None:
    cli.add_command(sr)
