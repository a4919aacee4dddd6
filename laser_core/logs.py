"""Where the libraries' messages go: the command's log file, and the terminal only when asked (``laser --verbose``).

A run's terminal shows the project's own lines (progress bars, the pipeline's step lines, the results table,
its errors and warnings). The warnings and log records of the libraries under it (transformers' loading report,
bitsandbytes' missing CPU kernel, torch.onnx's skipped torchvision ops, onnxscript's constant folding,
great_expectations' and ZenML's set-up notes, and Python warnings raised in library code) are written to one log
file per command instead, the file the error handler also writes its tracebacks to (``laser_cli/errors.py``).

Only settings of :mod:`logging` and of the libraries are used: each library's logger (:data:`LIBRARY_LOGGERS`,
transformers' library root logger, ``py.warnings``) stops propagating to the root logger (ZenML's console
handler) and gets two handlers: the file, and a console handler on stderr that passes the library's errors (a
library's *error* is never hidden) or, with ``verbose``, everything. transformers' own console handler is
replaced by that one and its progress bars are off unless ``verbose`` (``transformers.utils.logging``). Python
warnings go through ``logging.captureWarnings``; those raised in this project's code stay on the console.
Levels are left as the libraries set them, so the file gets what the terminal used to show.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import sys
import tempfile
from pathlib import Path

#: loggers of the libraries whose records go to the log file. ``torch.onnx._internal`` (the exporter) and not
#: ``torch.onnx``: torch's own logging set-up owns the handlers of its registered loggers and resets them.
LIBRARY_LOGGERS = (
    "bitsandbytes",
    "torch.onnx._internal",
    "onnxscript",
    "onnx_ir",
    "great_expectations",
    "zenml.zen_stores.base_zen_store",  # "Setting the global active stack to default." on a new store
)
#: transformers has its own console handler on its library root logger; set through ``transformers.utils.logging``
TRANSFORMERS = "transformers"
WARNINGS = "py.warnings"
#: folders of this project's code: a Python warning raised there stays on the console
OWN_CODE = tuple(
    str(Path(__file__).resolve().parents[1] / name) + os.sep
    for name in ("laser_core", "laser_cli", "pipelines", "steps", "bench")
)
FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
KEEP_LOGS = 50


class _State:
    file_handler: logging.Handler | None = None
    console_handler: logging.Handler | None = None
    verbose = False
    path: Path | None = None
    transformers_done = False
    added: list[tuple[logging.Logger, logging.Handler]] = []  # what configure() added, undone by a new call
    quieted: list[tuple[logging.Logger, bool]] = []  # (logger, its propagate before)


_state = _State()


def new_log_path(folder: Path, keep: int = KEEP_LOGS) -> Path:
    """A new ``laser-<time>-<pid>.log`` path in ``folder`` (created); all but the newest ``keep - 1`` older
    files removed, so that at most ``keep`` remain once this one is written."""
    folder.mkdir(parents=True, exist_ok=True)
    for old in sorted(folder.glob("laser-*.log"), key=lambda p: p.stat().st_mtime)[: -(keep - 1) or None]:
        old.unlink(missing_ok=True)
    return folder / f"laser-{dt.datetime.now():%Y%m%d-%H%M%S}-{os.getpid()}.log"


def current_log_file() -> Path | None:
    """The log file :func:`configure` set up in this process (it exists once something was written to it)."""
    return _state.path


class _OwnWarnings(logging.Filter):
    """Passes the Python warnings raised in this project's code (``logging.captureWarnings`` records start with
    the file name)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage().startswith(OWN_CODE)


def _add(logger: logging.Logger, handler: logging.Handler) -> None:
    logger.addHandler(handler)
    _state.added.append((logger, handler))


def _route(logger: logging.Logger) -> None:
    """The logger's records to the file, and to the console handler (its errors only, unless verbose)."""
    _add(logger, _state.file_handler)
    _add(logger, _state.console_handler)
    _state.quieted.append((logger, logger.propagate))
    logger.propagate = False


def _undo() -> None:
    """Remove what an earlier :func:`configure` added (handlers, propagation switched off)."""
    for logger, handler in _state.added:
        logger.removeHandler(handler)
    for logger, propagate in _state.quieted:
        logger.propagate = propagate
    if _state.file_handler is not None:
        _state.file_handler.close()
    if _state.transformers_done:
        from transformers.utils import logging as hf_logging

        hf_logging.enable_default_handler()
        hf_logging.enable_progress_bar()
    _state.added, _state.quieted = [], []


def configure(folder: Path, verbose: bool = False, libraries: bool = False) -> Path:
    """Send the libraries' records to a new log file in ``folder`` (opened at its first record) and, unless
    ``verbose``, keep them off the console. ``libraries``: also set up transformers now (imports it; for the
    commands that load a model). Returns the log file's path. Calling it again replaces the earlier set-up."""
    _undo()
    try:
        _state.path = new_log_path(Path(folder))
    except OSError:  # an unwritable log folder must not stop the command: the temporary folder instead
        _state.path = new_log_path(Path(tempfile.gettempdir()) / "laser-logs")
    _state.verbose = verbose
    _state.transformers_done = False
    _state.file_handler = logging.FileHandler(_state.path, encoding="utf8", delay=True)
    _state.file_handler.setFormatter(logging.Formatter(FILE_FORMAT))
    _state.console_handler = logging.StreamHandler(sys.stderr)
    _state.console_handler.setLevel(logging.NOTSET if verbose else logging.ERROR)
    _state.console_handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    for name in LIBRARY_LOGGERS:
        _route(logging.getLogger(name))
    logging.captureWarnings(True)  # as ZenML does when it is imported: warnings become `py.warnings` records
    warnings_logger = logging.getLogger(WARNINGS)
    _route(warnings_logger)
    if not verbose:
        own = logging.StreamHandler(sys.stderr)
        own.addFilter(_OwnWarnings())
        _add(warnings_logger, own)
    if libraries or TRANSFORMERS in sys.modules:
        configure_transformers()
    return _state.path


def configure_transformers() -> None:
    """transformers' part of :func:`configure` (it imports transformers): its records routed as the others', its
    progress bars off unless verbose. Does nothing before :func:`configure` or once done."""
    if _state.file_handler is None or _state.transformers_done:
        return
    from transformers.utils import logging as hf_logging

    hf_logging.disable_default_handler()  # the console handler of configure() takes its place
    if not _state.verbose:
        hf_logging.disable_progress_bar()
    _route(hf_logging.get_logger())
    _state.transformers_done = True
