"""Test set-up: offline, no telemetry, and an isolated ZenML store for the whole session."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

_ZEN_DIR = tempfile.mkdtemp(prefix="laser-zenml-")
for _var, _value in {
    "ZENML_CONFIG_PATH": _ZEN_DIR,  # isolated store: never the user's ~/.config/zenml
    "LASER_CACHE_DIR": os.path.join(_ZEN_DIR, "laser-cache"),
    "ZENML_ANALYTICS_OPT_IN": "false",
    "ZENML_LOGGING_VERBOSITY": "WARN",
    "GX_ANALYTICS_ENABLED": "false",
    "ORT_DISABLE_TELEMETRY": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
}.items():
    os.environ[_var] = _value

REPO = Path(__file__).resolve().parents[1]
# ../shared/data beside the checkout (as in CI), or LASER_SHARED_DATA when it lives elsewhere
SHARED_DATA = Path(os.environ.get("LASER_SHARED_DATA", REPO.parent / "shared" / "data"))
SCIENTIFIC = SHARED_DATA / "amazon2018-scientific-recformer"
BEAUTY = SHARED_DATA / "amazon2014-beauty-seqrecbench"


def shared(path: Path) -> Path:
    """A dataset from ../shared/data, or skip with the reason when this checkout has none beside it."""
    if not path.is_dir():
        pytest.skip(f"shared dataset not found at {path}")
    return path


@pytest.fixture(scope="session")
def zenml_store() -> str:
    """The isolated ZenML config/store directory (set before zenml is first imported)."""
    return _ZEN_DIR


class LocalArtifactStore:
    """The artifact-store calls the project's materializers make (``open``, ``makedirs``, ``listdir``,
    ``isdir``), on the local file system: materializers run on a folder without a ZenML stack."""

    open = staticmethod(open)
    listdir = staticmethod(os.listdir)
    isdir = staticmethod(os.path.isdir)

    @staticmethod
    def makedirs(path: str) -> None:
        os.makedirs(path, exist_ok=True)


@pytest.fixture
def materializer():
    """``materializer(cls, uri)``: a materializer of ``cls`` over the folder ``uri`` (created)."""

    def make(cls, uri: Path):
        Path(uri).mkdir(parents=True, exist_ok=True)
        return cls(str(uri), artifact_store=LocalArtifactStore())

    return make
