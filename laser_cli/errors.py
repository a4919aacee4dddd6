"""How ``laser`` reports an error: one short message and an exit status; the traceback only under ``--debug``.

:func:`report` is called by the ``laser`` group (``laser_cli/main.py``) for any exception a command raises. It
writes the full traceback to a log file (:func:`log_dir`), then

* for a *known* error (a :class:`laser_core.errors.UserError` such as a bad config, a malformed data file or a
  failed validation; a bundle, export or schedule error; a config model's ``ValidationError``; a missing or
  unreadable file; a ``ValueError`` raised by this package's own code) prints ``Error: <message>`` and exits
  with the status of its kind (see :mod:`laser_core.errors`);
* for anything else (a bug) prints one line naming the exception and the log file, and exits with 70.

A ``click.ClickException`` (the command's own refusals, click's usage errors such as a bad option value) is
printed by click as ``Error: <message>``; :func:`click_error` gives it the exit status of the error it was raised
from (``raise click.ClickException(...) from exc``: a bundle error exits 4, a data error 3), and with ``--debug``
prints its traceback first, as for every other error.

A pipeline step that fails inside ``laser run`` / ``laser batch`` is reported by the error it raised (through
:func:`pipeline_failures`, which also keeps ZenML's own step tracebacks off the console unless ``--debug``),
plus the name of the failed run, whose saved artifacts stay in the store.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path

import click

from laser_core.errors import EXIT_CONFIG, EXIT_ERROR, EXIT_INTERNAL, EXIT_MODEL, UserError

#: packages whose ValueErrors (and errors named below) are messages for the user, not bugs
OWN_PACKAGES = ("laser_core", "laser_cli", "pipelines", "steps")
#: error classes of this package that do not derive from UserError, by class name
NAMED_ERRORS = {
    "BundleError": EXIT_MODEL,
    "AnnError": EXIT_MODEL,
    "ExportError": EXIT_MODEL,
    "ScheduleError": EXIT_CONFIG,
}
#: file-system errors: the message names the path
FILE_ERRORS = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)
PIPELINES = ("laser_training", "laser_batch_recommend")


class PipelineFailed(Exception):
    """A pipeline run failed: ``failures`` holds (step name, the exception it raised) as far as they are known."""

    def __init__(
        self, failures: list[tuple[str | None, BaseException]], run_name: str | None, error: BaseException
    ) -> None:
        self.failures = failures
        self.run_name = run_name
        self.error = error
        super().__init__(str(error))


def log_dir() -> Path:
    """``$LASER_LOG_DIR``, else ``logs/`` in the cache folder (``$LASER_CACHE_DIR`` or ``~/.cache/laser``)."""
    if os.environ.get("LASER_LOG_DIR"):
        return Path(os.environ["LASER_LOG_DIR"]).expanduser()
    from laser_core.paths import default_cache_dir

    return default_cache_dir().expanduser() / "logs"


def _own_frame(exc: BaseException) -> bool:
    """Whether the innermost frame of ``exc``'s traceback (where it was raised) is in this package's code."""
    tb = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    module = tb.tb_frame.f_globals.get("__name__", "")
    return module.split(".")[0] in OWN_PACKAGES


def classify(exc: BaseException) -> tuple[int, str] | None:
    """``(exit status, message)`` for a known error, ``None`` for an unexpected one."""
    from pydantic import ValidationError

    if isinstance(exc, UserError):
        return exc.exit_code, str(exc)
    for cls in type(exc).__mro__:
        if cls.__name__ in NAMED_ERRORS and cls.__module__.split(".")[0] in OWN_PACKAGES:
            return NAMED_ERRORS[cls.__name__], str(exc)
    if isinstance(exc, ValidationError):
        from laser_core.configbase import describe_validation_error

        return EXIT_CONFIG, f"invalid {exc.title}: {describe_validation_error(exc)}"
    if isinstance(exc, FILE_ERRORS):
        if exc.filename is not None:
            return EXIT_ERROR, f"{exc.filename}: {exc.strerror or exc}"
        return EXIT_ERROR, str(exc)
    if isinstance(exc, ValueError) and _own_frame(exc):
        return EXIT_ERROR, str(exc)
    return None


def _write_log(exc: BaseException, extra: list[tuple[str, BaseException]]) -> Path | None:
    """The command line and every traceback, appended to the command's log file in :func:`log_dir` (where the
    libraries' records went: ``laser_core/logs.py``), or a new one (the oldest beyond 50 removed)."""
    from laser_core.logs import current_log_file, new_log_path

    try:
        folder = log_dir()
        now = dt.datetime.now()
        path = current_log_file()
        if path is None or path.parent != folder:
            path = new_log_path(folder)
        parts = [
            f"laser {' '.join(sys.argv[1:])}",
            f"time: {now.isoformat(timespec='seconds')}",
            f"cwd: {os.getcwd()}",
            "",
        ]
        for title, err in extra:
            parts += [f"--- {title}", "".join(traceback.format_exception(err))]
        parts += ["--- the error the command ended with", "".join(traceback.format_exception(exc))]
        with path.open("a", encoding="utf8") as f:
            f.write("\n".join(parts))
        return path
    except OSError:
        return None


def report(exc: BaseException, debug: bool = False) -> int:
    """Print ``exc`` for the user (the traceback too when ``debug``) and return the exit status."""
    failures = exc.failures if isinstance(exc, PipelineFailed) else []
    cause = next((e for _, e in failures if e is not None), None)
    extra = [(f"step {step or '?'} failed with", e) for step, e in failures]
    log = _write_log(exc, extra)
    if debug:
        for title, err in extra:
            click.echo(f"--- {title}:", err=True)
            click.echo("".join(traceback.format_exception(err)), err=True, nl=False)
        click.echo("".join(traceback.format_exception(exc)), err=True, nl=False)
    known = classify(cause if cause is not None else exc)
    if isinstance(exc, PipelineFailed) and cause is None:
        known = None
    where = f"full traceback in {log}" if log else "no log file could be written"
    if known is not None:
        code, message = known
        click.echo(f"Error: {message}", err=True)
    else:
        code = EXIT_INTERNAL
        shown = cause if cause is not None else (exc.error if isinstance(exc, PipelineFailed) else exc)
        first = (str(shown).strip().splitlines() or [""])[0]
        first = first if len(first) <= 300 else first[:297] + "..."
        click.echo(
            f"Error: unexpected {type(shown).__name__}: {first}"
            if first
            else f"Error: unexpected {type(shown).__name__}",
            err=True,
        )
    if isinstance(exc, PipelineFailed):
        steps = ", ".join(sorted({s for s, _ in failures if s})) or "?"
        run = exc.run_name
        kept = f" Its saved artifacts are kept: laser lineage {run}" if run else ""
        click.echo(f"Pipeline run {run or '(unknown)'} failed at step {steps}.{kept}", err=True)
        for note in getattr(exc.error, "__notes__", ()):  # e.g. the failed run's model version was removed
            click.echo(note, err=True)
    if known is None or isinstance(exc, PipelineFailed):
        click.echo(f"({where}; `laser --debug ...` prints it)", err=True)
    return code


def click_error(exc: click.ClickException, debug: bool = False) -> None:
    """Before click prints ``exc``: its traceback under ``debug`` (with the error it was raised from), and the
    exit status of that error when :func:`classify` knows it (a usage error keeps click's 2)."""
    if debug:
        click.echo("".join(traceback.format_exception(exc)), err=True, nl=False)
    cause = exc.__cause__
    if cause is not None and not isinstance(exc, click.UsageError):
        known = classify(cause)
        if known is not None:
            exc.exit_code = known[0]


# --------------------------------------------------------------------------------------- pipeline runs
class _StepFailures(logging.Filter):
    """On ZenML's console handler: keeps the exceptions of failed steps and, unless ``debug``, keeps ZenML's
    error records (a step's message and traceback, which :func:`report` prints once, short) off the console.
    The records still reach ZenML's own log store."""

    LOGGERS = ("zenml.orchestrators", "zenml.execution")

    def __init__(self, debug: bool) -> None:
        super().__init__()
        self.debug = debug
        self.failures: list[tuple[str | None, BaseException]] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR or not record.name.startswith(self.LOGGERS):
            return True
        if record.exc_info and record.exc_info[1] is not None:
            args = record.args if isinstance(record.args, tuple) else ()
            step = str(args[0]) if args else None
            if all(e is not record.exc_info[1] for _, e in self.failures):
                self.failures.append((step, record.exc_info[1]))
        return self.debug


def _failed_run(since: dt.datetime) -> str | None:
    """The name of the newest failed run of this package's pipelines created after ``since``."""
    try:
        from zenml.client import Client

        for run in Client().list_pipeline_runs(sort_by="desc:created", size=10).items:
            created = run.created if run.created.tzinfo else run.created.replace(tzinfo=dt.timezone.utc)
            if created < since:
                break
            if run.status.value == "failed" and (run.pipeline is None or run.pipeline.name in PIPELINES):
                return run.name
    except Exception:  # the store is only asked for a name to print: never hide the real error behind this
        return None
    return None


@contextlib.contextmanager
def pipeline_failures(debug: bool = False) -> Iterator[None]:
    """Around a pipeline run: a failed step becomes :class:`PipelineFailed` carrying the step's own exception
    (ZenML raises a bare ``RuntimeError`` for it, or the step's exception in fail-fast mode)."""
    import zenml.logger as zlog

    since = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=1)
    capture = _StepFailures(debug)
    handlers = [h for h in logging.getLogger().handlers if isinstance(h, zlog.ZenMLConsoleHandler)]
    for handler in handlers:
        handler.addFilter(capture)
    try:
        yield
    except Exception as exc:
        zenml_failure = isinstance(exc, RuntimeError) and "Pipeline run has failed" in str(exc)
        if capture.failures or zenml_failure:
            raise PipelineFailed(capture.failures, _failed_run(since), exc) from exc
        raise
    finally:
        for handler in handlers:
            handler.removeFilter(capture)
