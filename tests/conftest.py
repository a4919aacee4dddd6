"""Test set-up: offline, no telemetry, and an isolated ZenML store for the whole session; the tiny Laser set-up
(configs, synthetic data, ID model, model weights, exported bundle) the test modules share."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from laser_core.configuration import BackboneConfig, BiTuneConfig, LaserSpec, MFormerConfig
from laser_core.data.text import TextConfig

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


# ------------------------------------------------------------------- the tiny Laser set-up of the model tests
SMALL_MF = MFormerConfig(n_experts=2, n_query=4, width=32, n_layers=2, n_heads=2, dropout=0.0)
# the plain loop (Adam at a constant lr, a step per mini-batch, no early stop) for the tests whose numbers were
# set with it; LaserTrainConfig's defaults are the official recipe (tests/test_laser_recipe.py)
PLAIN = dict(optimizer="adam", weight_decay=0.0, schedule="constant", grad_accumulation=1, patience=None)


def tiny_spec(
    text: TextConfig | None = None,
    quant: str = "nf4",
    name: str = "tiny-random-llama",
    mformer: MFormerConfig = SMALL_MF,
    **bitune,
) -> LaserSpec:
    """A Laser spec over a tiny random backbone (built from its config: no download): ``text`` (default: a
    history of 4 items), the backbone's ``quant``isation, the M-Former and the other bi-tuning switches."""
    return LaserSpec(
        bitune=BiTuneConfig(mformer=mformer, **bitune),
        text=TextConfig(history_len=4) if text is None else text,
        backbone=BackboneConfig(name=name, quantization=quant),
    )


def fit_sr(split, train: dict, **sr):
    """The ID model ``SRConfig(**sr)`` fitted on ``split`` with ``TrainConfig(**train)`` (no progress bars)."""
    from laser_core.sr import SRConfig, TrainConfig, fit

    return fit(SRConfig(**sr), TrainConfig(progress=False, **train), split).model


@pytest.fixture(scope="module")
def data(request):
    """``(dataset, leave-one-out split)`` of the synthetic data set the test module's ``DATA`` describes."""
    from laser_core.data import leave_one_out, load_dataset

    ds = load_dataset({"synthetic": dict(request.module.DATA)})
    return ds, leave_one_out(ds)


@pytest.fixture(scope="module")
def sr(request, data):
    """The ID model ``SRConfig(**SR)`` of the test module, fitted on ``data`` with ``TrainConfig(**SR_TRAIN)``."""
    return fit_sr(data[1], request.module.SR_TRAIN, **request.module.SR)


def tiny_weights(spec: LaserSpec, items, sr, nudge: bool = False):
    """Weights of an untrained Laser model of ``spec`` (seeded by it), as the training step hands them over;
    ``nudge`` moves the suffix off its EOS initialisation so that users differ."""
    import torch

    from laser_core.model import LaserWeights, build_laser

    model = build_laser(spec, items, sr)
    if nudge and model.suffix is not None:
        with torch.no_grad():
            model.suffix.add_(0.1 * torch.randn_like(model.suffix))
    return LaserWeights(spec=spec, state={k: v.detach().clone() for k, v in model.state_dict().items()})


def export_tiny_bundle(out: Path, spec: LaserSpec, ds, sr, table=None, nudge: bool = False, **export) -> dict:
    """An untrained Laser model of ``spec`` (:func:`tiny_weights`) over ``ds`` exported as a bundle at ``out``
    (``export``: export_bundle's options); its item table is its float32 reference model's unless ``table`` is
    given. Returns ``weights``, ``ref`` (None with a given table), ``table`` and ``bundle`` (the path)."""
    from laser_core.export import export_bundle, reference_model

    weights = tiny_weights(spec, ds.items, sr, nudge=nudge)
    ref = None
    if table is None:
        ref = reference_model(weights, sr, ds.items)
        table = ref.embed_items(range(ds.n_items))
    bundle = export_bundle(weights, sr, ds.items, table, out, **export)
    return {"weights": weights, "ref": ref, "table": table, "bundle": bundle}


def write_table(root: Path, interactions, items, kind: str = "parquet") -> Path:
    """A ``table``-format dataset folder: ``interactions`` and ``items`` (DataFrames) as CSV or Parquet files."""
    root.mkdir(parents=True, exist_ok=True)
    for name, frame in (("interactions", interactions), ("items", items)):
        if kind == "csv":
            frame.to_csv(root / f"{name}.csv", index=False)
        else:
            frame.to_parquet(root / f"{name}.parquet", index=False)
    return root
