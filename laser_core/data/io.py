"""Small readers that turn parse failures into :class:`DataFormatError` naming the file and line."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path

from laser_core.data.errors import DataFormatError


def _open_text(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf8")
    return open(path, encoding="utf8")


def read_json(path: str | Path) -> object:
    """Read a whole JSON document; a syntax error names the file, line and column."""
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(path, "file not found")
    try:
        with _open_text(path) as fh:
            return json.load(fh)
    except json.JSONDecodeError as exc:
        raise DataFormatError(path, f"invalid JSON ({exc.msg}, column {exc.colno})", line=exc.lineno) from exc
    except (UnicodeDecodeError, OSError, EOFError) as exc:
        raise DataFormatError(path, f"cannot read: {exc}") from exc


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, object)`` for each non-blank line of a (gzipped) JSON-lines file."""
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(path, "file not found")
    try:
        with _open_text(path) as fh:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataFormatError(path, f"invalid JSON ({exc.msg}, column {exc.colno})", line=lineno) from exc
                if not isinstance(obj, dict):
                    raise DataFormatError(path, f"expected a JSON object, got {type(obj).__name__}", line=lineno)
                yield lineno, obj
    except (UnicodeDecodeError, OSError, EOFError) as exc:
        raise DataFormatError(path, f"cannot read: {exc}") from exc


def require(
    obj: dict,
    key: str,
    path: Path,
    *,
    line: int | None = None,
    record: str | None = None,
    types: type | tuple[type, ...] | None = None,
) -> object:
    """Fetch ``obj[key]`` or raise a DataFormatError naming the field; optionally check its type."""
    if key not in obj:
        raise DataFormatError(path, "missing field", line=line, record=record, field=key)
    value = obj[key]
    wrong_type = types is not None and not isinstance(value, types)
    bool_as_int = isinstance(value, bool) and types is int  # JSON true/false are not ids or times
    if wrong_type or bool_as_int:
        tname = types.__name__ if isinstance(types, type) else "/".join(t.__name__ for t in types)
        raise DataFormatError(
            path, f"expected {tname}, got {type(value).__name__} {value!r:.60}", line=line, record=record, field=key
        )
    return value


#: the largest timestamp read, in seconds: 9999-12-31T23:59:59Z (milliseconds or nanoseconds are far above it)
MAX_TIMESTAMP = 253_402_300_799
TIMESTAMP_RANGE = (
    f"expected seconds since 1970-01-01 within +-{MAX_TIMESTAMP} (up to year 9999; milliseconds or nanoseconds "
    "must be divided down to seconds)"
)


def check_timestamp(value: int, path: Path, *, line: int | None = None, field: str | None = None) -> int:
    """``value`` (an int of a JSON file) if it is a timestamp in range, else a DataFormatError naming it."""
    if abs(value) > MAX_TIMESTAMP:
        raise DataFormatError(path, f"timestamp {value} is out of range: {TIMESTAMP_RANGE}", line=line, field=field)
    return value
