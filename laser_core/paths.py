"""Where laser keeps what it can rebuild: model folders, checkpoints and fingerprint memos (no torch)."""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    """``LASER_CACHE_DIR`` or ``~/.cache/laser``."""
    return Path(os.environ.get("LASER_CACHE_DIR", Path.home() / ".cache" / "laser"))
