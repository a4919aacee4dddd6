"""The bundle format (laser_core.bundle) and the artifact types' folders (save/load), without exporting a model.

A bundle here is written from the format alone (a scorer over a random table, a catalogue, a word-level
tokenizer, no user tower), so these tests need neither torch's exporter nor a backbone.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import click
import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from laser_core.artifact import ArtifactFormatError
from laser_core.bundle import (
    COLD_ITEM,
    COLD_ITEM_TREATMENT,
    COLD_ITEM_WEIGHTS,
    FORMAT_VERSION,
    MANIFEST,
    BundleError,
    BundleManifest,
    ExportBundle,
    export_scorer,
    load_manifest,
    files_sha256,
    upgrade_manifest,
    validate_manifest,
    write_manifest,
)
from laser_core.data.split import Split
from laser_core.data.text import TextConfig
from laser_core.model import ItemTable, LaserSpec, LaserWeights

N_ITEMS, DIM, K = 6, 4, 3


def write_format_bundle(out: Path) -> Path:
    """A bundle of the current format: scorer, catalogue, tokenizer file, manifest (no user tower)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    out.mkdir(parents=True)
    table = np.random.default_rng(0).standard_normal((N_ITEMS, DIM)).astype(np.float32)
    export_scorer(table, out / "scorer.onnx", k=K)
    items = pd.DataFrame(
        {
            "item_id": [f"i{i}" for i in range(N_ITEMS)],
            "title": [f"title {i}" for i in range(N_ITEMS)],
            "brand": "",
            "category": "",
        }
    )
    items.to_parquet(out / "items.parquet", index=False)
    tok = Tokenizer(WordLevel({"[UNK]": 0, "title": 1, **{str(i): 2 + i for i in range(N_ITEMS)}}, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    (out / "tokenizer").mkdir()
    tok.save(str(out / "tokenizer" / "tokenizer.json"))
    manifest = {
        "format": "laser-export",
        "format_version": FORMAT_VERSION,
        "created_by": "laser test",
        "k": K,
        "dim": DIM,
        "n_items": N_ITEMS,
        "n_trained_items": N_ITEMS,
        "text": TextConfig().model_dump(mode="json"),
        "sr": None,
        "bitune": {"prefix": "plain", "pooling": "suffix", "n_query": 4, "n_experts": 0, "fusion": "none"},
        "backbone": {
            "name": "tiny",
            "trained_quantization": "none",
            "exported_dtype": "float32",
            "exported_weights": "unquantized",
        },
        "tokenizer": {
            "dir": "tokenizer",
            "file": "tokenizer/tokenizer.json",
            "pad_token_id": 0,
            "eos_token_id": 0,
            "clean_up_tokenization_spaces": False,
        },
        "scorer": {
            "file": "scorer.onnx",
            "k": K,
            "input": "user_embedding",
            "outputs": ["scores", "indices"],
            "opset": 17,
        },
        "user_tower": None,
        "parity_max_abs_diff": None,
        "catalogue": {"file": "items.parquet", "columns": list(items.columns), "row_order": "row i = table row i"},
        "popularity": False,
        "cold_item": {
            "item_id": COLD_ITEM,
            "treatment": COLD_ITEM_TREATMENT,
            "item_weights": "shared",
            "item_weights_note": COLD_ITEM_WEIGHTS["shared"],
        },
        "added_items": [],
        "metadata": {"model_version": "t-1"},
        "ann_index": None,
    }
    write_manifest(out, validate_manifest({**manifest, "files": files_sha256(out)}))
    return out


@pytest.fixture
def bundle(tmp_path) -> Path:
    return write_format_bundle(tmp_path / "bundle")


def set_manifest(bundle: Path, **changes) -> None:
    """Edit the manifest in place (a key set to None is removed), the file hashes left as they were."""
    manifest = json.loads((bundle / MANIFEST).read_text())
    for key, value in changes.items():
        if value is None:
            manifest.pop(key, None)
        else:
            manifest[key] = value
    (bundle / MANIFEST).write_text(json.dumps(manifest))


# ------------------------------------------------------------------------------------------ import graph
IMPORT_CHECK = """
import json, sys
import {module}
print(json.dumps(sorted(m for m in sys.modules if m.startswith("laser_core") or m in ("torch", "transformers"))))
"""


def imported_by(module: str) -> set[str]:
    """Every laser_core module (and torch/transformers) that importing ``module`` loads, in a fresh process."""
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(IMPORT_CHECK.format(module=module))],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parents[1],
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    return set(json.loads(proc.stdout.strip().splitlines()[-1]))


def test_the_format_is_imported_by_writer_and_reader_which_do_not_import_each_other():
    fmt = imported_by("laser_core.bundle")
    assert not fmt & {"laser_core.export", "laser_core.serving", "torch", "transformers"}, fmt
    serving = imported_by("laser_core.serving")
    assert "laser_core.bundle" in serving
    assert not serving & {"laser_core.export", "torch", "transformers"}, serving
    export = imported_by("laser_core.export")
    assert "laser_core.bundle" in export and "laser_core.serving" not in export, export
    assert not Path(__file__).resolve().parents[1].joinpath("laser_core", "manifest.py").exists()


# ------------------------------------------------------------------------------------------ the manifest
def test_a_written_bundle_loads_as_a_typed_manifest(bundle):
    manifest = ExportBundle.load(bundle).manifest
    assert isinstance(manifest, BundleManifest)
    assert (manifest.n_items, manifest.dim, manifest.k) == (N_ITEMS, DIM, K)
    assert manifest.scorer.file == "scorer.onnx" and manifest.metadata == {"model_version": "t-1"}
    assert load_manifest(bundle) == manifest
    assert sorted(manifest.files) == ["items.parquet", "scorer.onnx", "tokenizer/tokenizer.json"]


@pytest.mark.parametrize(
    "version, says",
    [
        (0, "format_version 0 {reads} the bundle is of an older format; re-export the model with this laser"),
        (None, "format_version None {reads} the bundle is of an older format; re-export the model with this laser"),
        (3, "format_version 3 {reads} the bundle is of a newer format; upgrade laser to load it"),
        ("2", "format_version '2' {reads} the value is not an integer"),
    ],
)
def test_a_bundle_of_another_format_version_says_so_everywhere_it_is_read(
    bundle, version, says, tmp_path, materializer
):
    from laser_core import __version__
    from laser_core.serving import Recommender
    from steps.materializers import ExportBundleMaterializer

    says = says.format(reads=f"is not supported: laser {__version__} reads format_versions 1 to 2, and")
    set_manifest(bundle, format_version=version)
    source = f"{bundle / MANIFEST}: "
    for read in (load_manifest, ExportBundle.load, Recommender.load):
        with pytest.raises(BundleError) as err:
            read(bundle)
        assert str(err.value) == source + says, read
    # the pipeline artifact: loading it from the artifact store refuses it the same way
    mat = materializer(ExportBundleMaterializer, tmp_path / "artifact")
    shutil.copytree(bundle, tmp_path / "artifact", dirs_exist_ok=True)
    with pytest.raises(BundleError, match="is not supported"):
        mat.load(ExportBundle)
    # the serving CLI: one error line, not a traceback
    from laser_cli.serving_cmds import register

    @click.group()
    def cli() -> None:
        pass

    register(cli)
    res = CliRunner().invoke(cli, ["recommend", "--bundle", str(bundle), "--history", "i1"])
    assert res.exit_code == 1 and says in res.output and "Traceback" not in res.output, res.output


def v1_manifest(bundle: Path) -> dict:
    """The manifest of ``bundle`` as the format-1 exporter wrote it (an early format-1 bundle: no fusion, no
    cold-item weights, no ann_index, an added-items entry without weights)."""
    manifest = json.loads((bundle / MANIFEST).read_text())
    manifest["format_version"] = 1
    del manifest["bitune"]["fusion"], manifest["ann_index"]
    del manifest["cold_item"]["item_weights"], manifest["cold_item"]["item_weights_note"]
    manifest["n_trained_items"] = N_ITEMS - 2
    manifest["added_items"] = [{"n": 2, "first_row": N_ITEMS - 2, "source_manifest_sha256": "a" * 64}]
    return manifest


def test_format_1_bundles_load_through_the_one_upgrade(bundle, tmp_path):
    """Format 2 made the fields added during format 1 required; a format-1 manifest is upgraded (one function,
    ``upgrade_manifest``) by every reader, with the values format 1 meant by their absence."""
    from laser_core.serving import Recommender

    old = v1_manifest(bundle)
    as_written = json.dumps(old)
    (bundle / MANIFEST).write_text(as_written)
    for read in (load_manifest, lambda b: ExportBundle.load(b).manifest, lambda b: Recommender.load(b).manifest):
        manifest = read(bundle)
        assert manifest.format_version == FORMAT_VERSION == 2
        assert manifest.bitune.fusion == "none" and manifest.ann_index is None
        assert manifest.cold_item.item_weights == "user_side"  # no item side in the tower: the user side's weights
        assert manifest.cold_item.item_weights_note == COLD_ITEM_WEIGHTS["user_side"]
        assert manifest.added_items[0].item_weights == "user_side"
    assert json.loads((bundle / MANIFEST).read_text()) == old  # reading never rewrites the bundle
    up = upgrade_manifest(old)
    assert up["format_version"] == 2 and old["format_version"] == 1  # a copy
    # a format-1 manifest that already had the later fields keeps them
    old["bitune"]["fusion"], old["cold_item"]["item_weights"] = "none", "shared"
    old["cold_item"]["item_weights_note"] = COLD_ITEM_WEIGHTS["shared"]
    assert validate_manifest(old).cold_item.item_weights == "shared"
    # format 2 requires them: the same manifest without them, marked 2, is refused naming them
    (bundle / MANIFEST).write_text(json.dumps({**json.loads(as_written), "format_version": 2}))
    with pytest.raises(BundleError) as err:
        load_manifest(bundle)
    for field in ("bitune.fusion", "cold_item.item_weights", "added_items[0].item_weights", "ann_index"):
        assert f"field {field!r}: missing" in str(err.value), field


def test_the_manifest_is_edited_as_a_typed_model_and_revalidated_on_write(bundle):
    manifest = load_manifest(bundle)
    with pytest.raises(TypeError, match="takes a BundleManifest"):
        write_manifest(bundle, manifest.model_dump(mode="json"))
    bad = manifest.model_copy(update={"k": N_ITEMS + 1})  # model_copy does not validate; the writer does
    with pytest.raises(BundleError, match=r"field 'k': 7 exceeds n_items \(6\)"):
        write_manifest(bundle, bad)
    assert load_manifest(bundle) == manifest  # nothing written
    written = write_manifest(bundle, manifest.model_copy(update={"metadata": {"model_version": "t-2"}}))
    assert load_manifest(bundle) == written and written.metadata == {"model_version": "t-2"}


def test_missing_fields_hint_at_an_older_bundle(bundle):
    set_manifest(bundle, catalogue=None)
    with pytest.raises(BundleError) as err:
        load_manifest(bundle)
    assert "field 'catalogue': missing" in str(err.value)
    assert "may be of an older format than laser " in str(err.value) and "re-export the model" in str(err.value)
    with pytest.raises(BundleError, match="field 'format': missing") as err:
        validate_manifest({}, "x.json")  # not a Laser manifest at all: no talk of versions
    assert "format_version" not in str(err.value).split("missing", 1)[0]


def test_export_bundle_checks_the_file_list(bundle):
    (bundle / "notes.txt").write_text("not listed")
    with pytest.raises(BundleError, match="notes.txt: in the bundle folder but not listed"):
        ExportBundle.load(bundle)


# ------------------------------------------------------------------------------------ artifact folders
def test_export_bundle_artifact_round_trip_and_older_artifacts(bundle, tmp_path, materializer):
    from steps.materializers import ExportBundleMaterializer

    mat = materializer(ExportBundleMaterializer, tmp_path / "store" / "bundle")
    mat.save(ExportBundle(bundle))
    back = mat.load(ExportBundle)
    assert back.path != bundle and [p.as_posix() for p in back.files()] == [
        p.as_posix() for p in ExportBundle(bundle).files()
    ]
    for rel in back.files():
        assert (back.path / rel).read_bytes() == (bundle / rel).read_bytes()
    back.verify(hashes=True)
    meta = mat.extract_metadata(back)
    assert (meta["n_items"], meta["dim"], meta["k"], meta["format_version"]) == (N_ITEMS, DIM, K, FORMAT_VERSION)
    # an artifact stored by the materializer before the bundle format module (it wrote files.json beside it)
    (tmp_path / "store" / "bundle" / "files.json").write_text(json.dumps([p.as_posix() for p in back.files()]))
    older = mat.load(ExportBundle)
    assert not (older.path / "files.json").exists()
    older.verify(hashes=True)


def spec() -> LaserSpec:
    return LaserSpec.model_validate({"text": {"history_len": 3}, "seed": 5})


def tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(3, 4, generator=g), "b.bias": torch.randn(5, generator=g).half()}


def assert_same_tensors(a: dict | None, b: dict | None) -> None:
    assert (a is None) == (b is None)
    if a is not None:
        assert a.keys() == b.keys()
        for key in a:
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key])


@pytest.mark.parametrize("item_side", [False, True])
def test_laser_weights_round_trip_through_folder_and_materializer(tmp_path, item_side, materializer):
    from steps.materializers import LaserWeightsMaterializer

    weights = LaserWeights(
        spec=spec(),
        state=tensors(1),
        summary={"stage": 2, "best_epoch": 1, "history": [{"epoch": 0, "valid": {"ndcg@10": 0.25}}]},
        item_state=tensors(2) if item_side else None,
    )
    weights.save(tmp_path / "folder")
    assert (tmp_path / "folder" / "item_weights.safetensors").exists() == item_side
    mat = materializer(LaserWeightsMaterializer, tmp_path / "store")
    mat.save(weights)
    assert sorted(os.listdir(tmp_path / "store")) == sorted(os.listdir(tmp_path / "folder"))
    for back in (LaserWeights.load(tmp_path / "folder"), mat.load(LaserWeights)):
        assert back.spec == weights.spec and back.summary == weights.summary
        assert back.cold_item_weights() == weights.cold_item_weights()
        assert_same_tensors(back.state, weights.state)
        assert_same_tensors(back.item_state, weights.item_state)


def test_item_table_and_split_round_trip(tmp_path, materializer):
    from steps.materializers import ItemTableMaterializer, SplitMaterializer

    table = ItemTable(table=torch.randn(7, 3), weights_fingerprint="abc123")
    split = Split(
        users=["u1", "u2", "u3"],
        n_items=9,
        train=[np.array([1, 2, 3]), np.array([4]), np.array([], dtype=np.int64)],
        valid_target=np.array([5, -1, 6]),
        test_target=np.array([7, -1, 8]),
    )
    for obj, cls, mat_cls in ((table, ItemTable, ItemTableMaterializer), (split, Split, SplitMaterializer)):
        obj.save(tmp_path / cls.__name__)
        mat = materializer(mat_cls, tmp_path / "store" / cls.__name__)
        mat.save(obj)
        for back in (cls.load(tmp_path / cls.__name__), mat.load(cls)):
            if cls is ItemTable:
                assert torch.equal(back.table, table.table) and back.weights_fingerprint == "abc123"
            else:
                assert back.users == split.users and back.n_items == 9
                assert all(np.array_equal(a, b) for a, b in zip(back.train, split.train))
                assert np.array_equal(back.valid_target, split.valid_target)
                assert np.array_equal(back.test_target, split.test_target)


def test_sr_model_artifact_round_trip(tmp_path, materializer):
    from laser_core.sr import SRConfig, build_model
    from steps.materializers import SRModelMaterializer

    model = build_model(SRConfig(model="sasrec", hidden_size=8, max_len=5), 12)
    mat = materializer(SRModelMaterializer, tmp_path / "store")
    mat.save(model)
    back = mat.load(type(model))
    assert type(back) is type(model) and back.n_items == 12 and back.config == model.config
    assert_same_tensors(back.state_dict(), {k: v.detach() for k, v in model.state_dict().items()})


def test_artifact_folders_from_before_format_versions_load_and_other_versions_are_refused(tmp_path):
    # table.json as the first ItemTable materializer wrote it: no format_version
    old = tmp_path / "old_table"
    ItemTable(table=torch.ones(2, 2), weights_fingerprint="f").save(old)
    (old / "table.json").write_text(json.dumps({"weights_fingerprint": "f", "shape": [2, 2]}))
    assert ItemTable.load(old).weights_fingerprint == "f"
    folder = LaserWeights(spec=spec(), state=tensors(1)).save(tmp_path / "w")
    meta = json.loads((folder / "laser.json").read_text())
    for version, says in ((0, "an older format: produce it again with this laser"), (2, "a newer format: upgrade")):
        (folder / "laser.json").write_text(json.dumps({**meta, "format_version": version}))
        with pytest.raises(
            ArtifactFormatError, match=f"LaserWeights of format_version {version}, and this laser reads 1: {says}"
        ):
            LaserWeights.load(folder)
    with pytest.raises(ArtifactFormatError, match="holds no saved Split"):
        Split.load(tmp_path / "nothing")


def test_launch_job_folder_uses_the_artifact_folders(tmp_path):
    """The accelerate job folder holds the same folders the materializers store: written by write_job, read
    back by the artifact types (run_job's reads) and by read_result."""
    from laser_core.launch import JOB_FORMAT, read_result, write_job
    from laser_core.train import LaserTrainConfig

    split = Split(
        users=["u"], n_items=4, train=[np.array([0, 1])], valid_target=np.array([2]), test_target=np.array([3])
    )
    items = pd.DataFrame({"item_id": list("abcd"), "title": list("abcd"), "brand": "", "category": ""})
    init, table = tensors(3), torch.randn(4, 2)
    job = write_job(
        tmp_path / "job", items, split, None, spec(), LaserTrainConfig(), stages=(2,), weights=init, table=table
    )
    assert json.loads((job / "job.json").read_text())["format_version"] == JOB_FORMAT == 2
    assert_same_tensors(LaserWeights.load(job / "init").state, init)
    assert LaserWeights.load(job / "init").spec == spec()
    assert torch.equal(ItemTable.load(job / "table").table, table)
    assert Split.load(job).users == ["u"]
    # process 0's output, as run_job writes it
    (job / "out").mkdir()
    LaserWeights(spec=spec(), state=tensors(4)).save(job / "out")
    ItemTable(table=table * 2).save(job / "out")
    (job / "out" / "result.json").write_text(json.dumps({"best": {}, "history": [], "cost": {}, "processes": 1}))
    fit = read_result(job)
    assert_same_tensors(fit.state, tensors(4))
    assert torch.equal(fit.item_table, table * 2) and fit.processes == 1


def test_laser_export_copies_a_stored_bundle_and_names_an_older_one(bundle, tmp_path, materializer, monkeypatch):
    """``laser export NAME:VERSION``: the registry's bundle artifact, loaded by its materializer, is copied out;
    one of an older format is one error line naming the model version and the format."""
    from types import SimpleNamespace

    import laser_cli.registry
    from laser_cli.main import cli
    from steps.materializers import ExportBundleMaterializer

    mat = materializer(ExportBundleMaterializer, tmp_path / "store")
    mat.save(ExportBundle(bundle))
    artifact = SimpleNamespace(load=lambda: mat.load(ExportBundle))
    version = SimpleNamespace(name="3", get_artifact=lambda name: artifact if name == "scorer_bundle" else None)
    monkeypatch.setattr(laser_cli.registry, "resolve_version", lambda name, wanted=None: version)
    res = CliRunner().invoke(cli, ["export", "laser:3", "--out", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    assert "laser v3: 4 files" in res.output
    assert ExportBundle.load(tmp_path / "out").verify(hashes=True).n_items == N_ITEMS
    set_manifest(tmp_path / "store", format_version=0)
    res = CliRunner().invoke(cli, ["export", "laser:3", "--out", str(tmp_path / "out2")])
    assert res.exit_code == 4 and "Traceback" not in res.output, res.output  # a bundle error (#21)
    assert "Error: laser v3: the stored scorer_bundle cannot be used: " in res.output
    assert "the bundle is of an older format; re-export the model with this laser" in res.output
