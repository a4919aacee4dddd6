"""Errors meant for the person at the command line, and the exit status each kind gives.

An error class that derives from :class:`UserError` carries a message that is complete on its own (it names the
file, row or field at fault), so ``laser`` prints only that message; its ``exit_code`` says what kind of input
was bad. Errors of other types are mapped by the CLI (``laser_cli/errors.py``); anything unknown is a bug and
exits with :data:`EXIT_INTERNAL` after writing its traceback to a log file.
"""

from __future__ import annotations

EXIT_ERROR = 1  # a bad input with no more specific kind; also a failed check (``laser data validate``)
EXIT_CONFIG = 2  # the command line or the run config (click's own usage errors use 2 as well)
EXIT_DATA = 3  # the data: a malformed file, or a failed validation
EXIT_MODEL = 4  # a model, bundle or registry entry: missing, tampered with, or not exportable
EXIT_INTERNAL = 70  # anything else: a bug (EX_SOFTWARE of sysexits.h)


class UserError(Exception):
    """Base of the errors whose message is the whole story: no traceback is shown for them."""

    exit_code: int = EXIT_ERROR
