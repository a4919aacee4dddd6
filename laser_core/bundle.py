"""An exported model as a folder of files (ONNX graphs, tokenizer, catalogue, JSON manifest)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

MANIFEST = "laser_export.json"


@dataclass
class ExportBundle:
    """A local folder produced by :func:`laser_core.export.export_bundle`; ``laser_export.json`` describes it."""

    path: Path

    def __post_init__(self) -> None:
        self.path = Path(self.path)

    @property
    def manifest(self) -> dict:
        file = self.path / MANIFEST
        if not file.is_file():
            raise FileNotFoundError(f"{file}: not an exported Laser bundle (no {MANIFEST})")
        return json.loads(file.read_text(encoding="utf8"))

    def files(self) -> list[Path]:
        """Every file in the bundle, relative to its folder, sorted."""
        return sorted(p.relative_to(self.path) for p in self.path.rglob("*") if p.is_file())

    def size_bytes(self) -> int:
        return sum((self.path / f).stat().st_size for f in self.files())
