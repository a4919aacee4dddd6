"""Errors raised for malformed input: they always name the file and, where known, the line/record and field."""

from __future__ import annotations

from pathlib import Path

from laser_core.errors import EXIT_DATA, UserError


class DataFormatError(UserError, ValueError):
    """Malformed input data. The message names the file, the line (of a text file, 1-based, a CSV's header
    being line 1), row (of a Parquet table, 1-based) or record, and the field."""

    exit_code = EXIT_DATA

    def __init__(
        self,
        path: str | Path,
        message: str,
        *,
        line: int | None = None,
        row: int | None = None,
        record: str | None = None,
        field: str | None = None,
    ) -> None:
        self.path = str(path)
        self.line = line
        self.row = row
        self.record = record
        self.field = field
        where = [self.path]
        if line is not None:
            where.append(f"line {line}")
        if row is not None:
            where.append(f"row {row}")
        if record is not None:
            where.append(f"record {record!r}")
        if field is not None:
            where.append(f"field {field!r}")
        super().__init__(f"{', '.join(where)}: {message}")
