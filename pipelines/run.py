"""Run the pipelines from a :class:`LaserConfig` (the CLI's ``laser run`` / ``laser batch`` call these)."""

from __future__ import annotations

import datetime as dt
import shlex
import shutil
import sys
from pathlib import Path

from laser_core.config import LaserConfig, data_fingerprint
from laser_core.errors import EXIT_MODEL, UserError


LOOKUP_AT_RUN = "lookup-at-run-time"  # scheduled runs: the promote step reads the registry when it runs


class ScheduleError(RuntimeError):
    """A schedule was asked for on a stack whose orchestrator cannot run one (raised before anything runs)."""


class ModelVersionError(UserError, RuntimeError):
    """The model version a batch run needs is missing or has no exported bundle (``laser`` exits 4)."""

    exit_code = EXIT_MODEL


def _model(config: LaserConfig, version=None):
    from zenml import Model

    return Model(
        name=config.model_name(), description=config.model.description, tags=config.model.tags or None, version=version
    )


def production_version_id(model_name: str) -> str | None:
    """The id of the model's current production version, or None."""
    from zenml.client import Client
    from zenml.enums import ModelStages

    try:
        return str(Client().get_model_version(model_name, ModelStages.PRODUCTION).id)
    except KeyError:
        return None


def cron_line(cron: str, config_path: str | Path | None, data_dir: str | None = None) -> str:
    """The crontab line that runs ``laser run`` with this config on the system's cron."""
    beside = Path(sys.executable).parent / "laser"  # the console script of this environment
    laser = str(beside) if beside.is_file() else shutil.which("laser") or f"{sys.executable} -m laser_cli.main"
    cmd = f"{laser} run --config {shlex.quote(str(Path(config_path).resolve()))}" if config_path else f"{laser} run"
    if data_dir:
        cmd += f" --data-dir {shlex.quote(str(Path(data_dir).resolve()))}"
    return f"{cron} cd {shlex.quote(str(Path.cwd()))} && {cmd} >> $HOME/laser-cron.log 2>&1"


def make_schedule(cron: str, config_path: str | Path | None = None, data_dir: str | None = None):
    """A ZenML ``Schedule`` for ``cron``, after checking that the active stack's orchestrator can run it."""
    from zenml.client import Client
    from zenml.config.schedule import Schedule

    fields = cron.split()
    if len(fields) != 5:
        raise ScheduleError(
            f"--schedule {cron!r}: expected a cron expression with 5 fields "
            '(minute hour day-of-month month day-of-week), e.g. "0 3 * * *"'
        )
    stack = Client().active_stack
    orchestrator = stack.orchestrator
    if not orchestrator.config.is_schedulable:
        raise ScheduleError(
            f"The active stack '{stack.name}' uses the '{orchestrator.flavor}' orchestrator, which cannot run "
            "schedules; nothing was run. Alternatives:\n"
            "  1. a schedulable stack from infra/ (Kubernetes or Kubeflow), e.g.\n"
            "       laser stack register kubernetes   # see infra/kubernetes/README.md\n"
            "       zenml stack set laser-k8s\n"
            "     then run the same command again;\n"
            "  2. your system's cron calling `laser run` (crontab -e), with this line:\n"
            f"       {cron_line(cron, config_path, data_dir)}"
        )
    return Schedule(cron_expression=cron)


def _infra_settings(config: LaserConfig, gpu_steps: list[str] | None = None) -> dict:
    """Stack settings (pipeline image, GPU steps) from the config's ``infra:`` section; see infra/README.md."""
    if not config.infra:
        return {}
    from pipelines.settings import settings_for_config

    return settings_for_config(config.infra, gpu_steps=gpu_steps)


def run_training(
    config: LaserConfig,
    enable_cache: bool | None = None,
    run_name: str | None = None,
    schedule=None,
    resume: bool = True,
):
    """Run the training pipeline on the active ZenML stack, bound to the config's ZenML Model (a new version per
    run), and return the pipeline run response. ``schedule`` (from :func:`make_schedule`) registers it instead.
    ``resume=False`` (with ``enable_cache=False``: ``laser run --no-cache``): the training steps also reuse no
    private checkpoint (finished or interrupted runs under ``LASER_CACHE_DIR``) and train from scratch. A run that
    fails leaves no model version: the one it was bound to is deleted (its artifacts and the run stay) and a note
    on the raised exception says so."""
    from pipelines.training import training_pipeline

    cache = config.pipeline.enable_cache if enable_cache is None else enable_cache
    options: dict = {"enable_cache": cache, "model": _model(config)}
    options.update(_infra_settings(config))
    if run_name:
        options["run_name"] = run_name
    if schedule is not None:
        options["schedule"] = schedule
    pipe = training_pipeline.with_options(**options)
    params = dict(
        dataset=config.dataset,
        validation=config.validation,
        data_fingerprint=data_fingerprint(config.dataset),
        sr_model=config.sr,
        sr_train=config.sr_train,
        laser=config.laser_spec(),
        laser_train=config.laser_train,
        export=config.export,
        promotion=config.promotion,
        production_version_id=(LOOKUP_AT_RUN if schedule is not None else production_version_id(config.model_name())),
        model_name=config.model_name(),
        stop_after=config.pipeline.stop_after,
        fresh_data=schedule is not None,
        resume=resume,
        models=list(config.pipeline.models),
        lexical=config.lexical,
        sr_tune=config.sr_tune if config.pipeline.tune_sr is not None else None,
        tune_sr_budget=config.pipeline.tune_sr,
    )
    since = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=1)
    try:
        return pipe(**params)
    except Exception as exc:  # a failed run leaves no model version (pipelines/orphans.py)
        if schedule is None:
            from pipelines.orphans import discard_failed_versions

            try:
                removed = discard_failed_versions(since)
            except Exception as cleanup:  # never hide the run's own error behind the clean-up's
                exc.add_note(f"(the failed run's model version could not be removed: {cleanup})")
            else:
                for name in removed:
                    exc.add_note(f"Model version {name} of the failed run was removed (its artifacts are kept).")
        raise


def run_batch(config: LaserConfig, run_name: str | None = None, schedule=None):
    """Recommendations from the config's model at ``batch.stage`` (production by default) for the data's users."""
    from zenml.client import Client
    from zenml.enums import ModelStages

    from pipelines.batch import batch_pipeline

    name, stage = config.model_name(), config.batch.stage
    version = ModelStages.LATEST if stage == "latest" else ModelStages(stage)
    try:
        mv = Client().get_model_version(name, version)
    except KeyError as exc:
        raise ModelVersionError(
            f"model {name!r} has no {stage} version yet: run `laser run --config ...` first "
            f"(or `laser model promote {name} <version> --stage {stage}`)"
        ) from exc
    if mv.get_artifact("scorer_bundle") is None:  # the recommendations come from the exported bundle
        raise ModelVersionError(
            f"model {name!r} version {mv.name} ({stage}) has no exported bundle (scorer_bundle): it was trained "
            f"with stop_after 'laser'; batch recommendations are served from the bundle, as online ones are"
        )
    options: dict = {"enable_cache": False, "model": _model(config, version=mv.number)}
    options.update(_infra_settings(config, gpu_steps=[]))  # the bundle's ONNX graphs run on the CPU
    if run_name:
        options["run_name"] = run_name
    if schedule is not None:
        options["schedule"] = schedule
        options["model"] = _model(config, version=version)  # resolved at each scheduled run
    return batch_pipeline.with_options(**options)(
        dataset=config.dataset,
        data_fingerprint=data_fingerprint(config.dataset),
        batch=config.batch,
        model_version=f"{name}:{mv.name}",
    )
