"""The JSON half of the artifact types' folders (``save(dir)`` / ``load(dir)`` on :class:`~laser_core.model.LaserWeights`,
:class:`~laser_core.model.ItemTable`, :class:`~laser_core.data.split.Split`): written with a ``format_version``,
read back with a check that says whether a folder is of an older or a newer format. Tensors go to safetensors,
tables to Parquet, the rest to JSON: nothing is pickled. Torch-free.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class ArtifactFormatError(ValueError):
    """A saved artifact folder of another format than this laser reads (or not one at all)."""


def write_meta(path: str | Path, meta: dict[str, Any], version: int) -> Path:
    """``meta`` plus ``format_version`` as JSON at ``path`` (written to a temporary name, then renamed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({**meta, "format_version": version}, indent=2, sort_keys=True, default=str), "utf8")
    tmp.replace(path)
    return path


def read_meta(path: str | Path, version: int, what: str) -> dict[str, Any]:
    """The JSON that :func:`write_meta` wrote, checked to be ``what`` of format ``version`` (a file without
    ``format_version`` is of format 1, the first)."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactFormatError(f"{path} not found: the folder holds no saved {what}")
    meta = json.loads(path.read_text(encoding="utf8"))
    if not isinstance(meta, dict):
        raise ArtifactFormatError(f"{path}: expected a JSON object describing a {what}")
    found = meta.get("format_version", 1)
    if found != version:
        age = (
            "an older format: produce it again with this laser (rerun the step that made it)"
            if isinstance(found, int) and found < version
            else "a newer format: upgrade laser to read it"
        )
        raise ArtifactFormatError(
            f"{path}: a {what} of format_version {found!r}, and this laser reads {version}: {age}"
        )
    return meta
