"""A hostile or corrupted bundle fails cleanly: a BundleError naming the file, never a crash, never a read outside.

The manifest's sha256s are integrity, not trust (anyone who can edit the bundle can rewrite them): every crafted
bundle here has its ``files`` hashes rewritten to match, so only the loader's own checks stand between it and
hnswlib / onnxruntime / the file system (``docs/serving.md``, "Trust model"). Loads that could crash run in a
subprocess, so that a regression is a failing test instead of a dead pytest.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("hnswlib")

from conftest import SMALL_MF, export_tiny_bundle, tiny_spec  # noqa: E402
from laser_core import ann  # noqa: E402
from laser_core.bundle import MANIFEST, BundleError, sha256_file  # noqa: E402

N_ITEMS = 40


# the data set and ID model of the `data` and `sr` fixtures (tests/conftest.py)
DATA = {"n_users": 80, "n_items": N_ITEMS, "n_user_types": 4, "seed": 7}
SR = dict(model="bert4rec", hidden_size=16, max_len=6)
SR_TRAIN = dict(epochs=1)


@pytest.fixture(scope="module")
def setup(data, sr, tmp_path_factory):
    """One small exported bundle (text budget: history 3, titles 8 tokens) and a copy with an ANN index."""
    from laser_core.data.text import TextConfig

    ds, _ = data
    mformer = SMALL_MF.model_copy(update={"dropout": 0.1})  # MFormerConfig's default, as these bundles were made
    spec = tiny_spec(TextConfig(history_len=3, title_max_tokens=8), quant="none", mformer=mformer)
    width = spec.backbone.tiny.hidden_size  # the embedding width (no fusion)
    table = np.random.default_rng(1).standard_normal((N_ITEMS, width)).astype(np.float32)
    root = tmp_path_factory.mktemp("untrusted")
    plain = export_tiny_bundle(root / "plain", spec, ds, sr, table, k=5, metadata={"model_version": "u-1"})["bundle"]
    indexed = shutil.copytree(plain, root / "indexed")
    ann.index_bundle(indexed, M=4, ef_construction=32, ef=N_ITEMS, threads=1)
    return {"ds": ds, "plain": plain, "indexed": indexed, "root": root}


def relist(bundle: Path, *names: str) -> None:
    """Rewrite the manifest's sha256 of ``names`` to match the (tampered) files: what anyone who can edit the
    bundle can do."""
    path = bundle / MANIFEST
    manifest = json.loads(path.read_text())
    for name in names:
        manifest["files"][name] = sha256_file(bundle / name)
    path.write_text(json.dumps(manifest, indent=2))


def load_in_subprocess(bundles: list[Path], history: list[str]) -> list[dict]:
    """Load each bundle and recommend once, each in its own process; returns per bundle ``rc`` (-11: a crash)
    and ``out`` (the BundleError, or "ok" and the items)."""
    script = textwrap.dedent("""
        import json, sys
        from laser_core.serving import BundleError, Recommender
        try:
            rec = Recommender.load(sys.argv[1])
            print(json.dumps(["ok", [i.item_id for i in rec.recommend(json.loads(sys.argv[2]), k=5).items]]))
        except BundleError as exc:
            print(json.dumps(["BundleError", str(exc)]))
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    results = []
    for bundle in bundles:
        proc = subprocess.run(
            [sys.executable, "-c", script, str(bundle), json.dumps(history)],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        out = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 and proc.stdout else None
        results.append({"rc": proc.returncode, "out": out, "stderr": proc.stderr[-2000:]})
    return results


# ------------------------------------------------------------------------------------------ the ANN index
_H = ann._HEADER
_ENTRY = 6 * 8 + 4  # byte offset of enterpoint_node_ in the header (after six size_t and maxlevel_)


def _layout(raw: bytes) -> dict:
    off0, max_el, count, per_el, label_off, data_off, max_level, entry, max_m, max_m0, m, mult, efc = _H.unpack(
        raw[: _H.size]
    )
    upper = _H.size + count * per_el  # the per-element upper-level records start here
    return {"count": count, "per_el": per_el, "label_off": label_off, "max_m0": max_m0, "max_m": max_m, "upper": upper}


def _upper_sizes(raw: bytes, lay: dict) -> tuple[int, list[int]]:
    """Byte offset of the first upper-level link list (an element's level-1 list: count word, then ids), and the
    elements that have no upper level."""
    pos, first, flat = lay["upper"], None, []
    for element in range(lay["count"]):
        (size,) = struct.unpack_from("<I", raw, pos)
        if size and first is None:
            first = pos + 4
        if not size:
            flat.append(element)
        pos += 4 + size
    assert first is not None, "no element above level 0"
    return first, flat


def _first_upper_list(raw: bytes, lay: dict) -> int:
    return _upper_sizes(raw, lay)[0]


def _corrupt(raw: bytearray, case: str) -> None:
    lay = _layout(raw)
    el = lambda i: _H.size + i * lay["per_el"]  # noqa: E731 - element i's level-0 record
    if case == "link id out of range":
        for i in range(lay["count"]):
            struct.pack_into("<I", raw, el(i) + 4, 10**9)
    elif case == "entry point out of range":
        struct.pack_into("<I", raw, _ENTRY, 10**9)
    elif case == "link count above maxM0":
        struct.pack_into("<H", raw, el(3), lay["max_m0"] + 40)
    elif case == "upper-level link id out of range":
        pos = _first_upper_list(raw, lay)
        struct.pack_into("<H", raw, pos, 1)
        struct.pack_into("<I", raw, pos + 4, lay["count"] + 5)
    elif case == "upper-level link to an element without that level":
        pos, flat = _upper_sizes(raw, lay)
        struct.pack_into("<H", raw, pos, 1)
        struct.pack_into("<I", raw, pos + 4, flat[0])
    elif case == "upper-level link count above maxM":
        struct.pack_into("<H", raw, _first_upper_list(raw, lay), lay["max_m"] + 1)
    elif case == "duplicate label":
        struct.pack_into("<Q", raw, el(1) + lay["label_off"], 0)
        struct.pack_into("<Q", raw, el(0) + lay["label_off"], 0)
    elif case == "room for 2**40 elements":
        struct.pack_into("<Q", raw, 8, 1 << 40)
    elif case == "truncated":
        del raw[-4:]
    elif case == "upper-level size not a whole list":
        struct.pack_into("<I", raw, _first_upper_list(raw, lay) - 4, 6)
    else:
        raise AssertionError(case)


CORRUPTIONS = [
    ("link id out of range", r"link id 1000000000 is out of range"),
    ("entry point out of range", r"entry point 1000000000"),
    ("link count above maxM0", r"a link list of \d+ ids \(more than 8\)"),
    ("upper-level link id out of range", r"link id 45 is out of range"),
    ("upper-level link count above maxM", r"a link list of 5 ids \(more than 4\)"),
    (
        "upper-level link to an element without that level",
        r"a level-1 link points at element \d+, which has no level 1",
    ),
    ("duplicate label", r"labels are not the rows 0\.\.39, each once"),
    ("room for 2**40 elements", r"40 elements with room for 1099511627776"),
    ("truncated", r"length does not match"),
    ("upper-level size not a whole list", r"not a multiple of size_links_per_element"),
]


def test_a_crafted_ann_index_is_refused_naming_the_file_not_a_crash(setup, tmp_path):
    """Before this check, hnswlib trusted the file: link ids or the entry point out of range segfaulted the
    process (``laser recommend`` exit 139) even with the manifest's sha256 rewritten to match."""
    bundles = []
    for case, _ in CORRUPTIONS:
        copy = shutil.copytree(setup["indexed"], tmp_path / case.replace(" ", "-"))
        raw = bytearray((copy / ann.INDEX_FILE).read_bytes())
        _corrupt(raw, case)
        (copy / ann.INDEX_FILE).write_bytes(bytes(raw))
        relist(copy, ann.INDEX_FILE)
        bundles.append(copy)
        with pytest.raises(ann.AnnError, match=r"item_index\.hnsw: "):  # numpy only: safe in this process
            ann.validate_index_file(copy / ann.INDEX_FILE)
    history = [setup["ds"].items["item_id"][r] for r in (1, 2)]
    for (case, message), result in zip(CORRUPTIONS, load_in_subprocess(bundles, history)):
        assert result["rc"] == 0, f"{case}: the process died (exit {result['rc']}): {result['stderr']}"
        kind, text = result["out"]
        assert kind == "BundleError", f"{case}: loaded and served {text}"
        assert f"{ann.INDEX_FILE}: not a valid hnswlib index" in text, (case, text)
        assert re.search(message, text), (case, text)


def test_valid_indexes_pass_the_check(setup, tmp_path):
    """Indexes hnswlib writes (several M, one element, grown by add) pass; the check is the loader's."""
    rng = np.random.default_rng(0)
    for n, m in [(1, 2), (2, 2), (500, 4), (3000, 16)]:
        index = ann.build_index(rng.standard_normal((n, 8)), M=m, ef_construction=32, threads=1)
        index.add(rng.standard_normal((7, 8)))
        path = index.save(tmp_path / f"{n}-{m}.hnsw")
        assert ann.validate_index_file(path)["n_items"] == n + 7
        assert ann.AnnIndex.load(path, dim=8, ef=32, n_items=n + 7).search(rng.standard_normal((2, 8)), 3)[1].shape == (
            2,
            3,
        )
    assert ann.validate_index_file(setup["indexed"] / ann.INDEX_FILE)["n_items"] == N_ITEMS


def test_out_of_range_M_is_refused_by_the_cli_and_the_library(setup, tmp_path):
    """hnswlib caps M at 10000 silently: ``--M 100000`` used to be recorded as 100000 in the manifest."""
    import click
    from click.testing import CliRunner

    from laser_cli.serving_cmds import register

    @click.group()
    def cli() -> None:
        pass

    register(cli)
    copy = shutil.copytree(setup["plain"], tmp_path / "m")
    res = CliRunner().invoke(cli, ["index", "build", "--bundle", str(copy), "--M", "100000"])
    assert res.exit_code == 2 and "--M" in res.output and "100000" in res.output, res.output
    assert not (copy / ann.INDEX_FILE).exists()
    for bad in (1, 10001, 100000):
        with pytest.raises(ValueError, match=rf"M must be an integer in 2\.\.10000 \(hnswlib.s range\), got {bad}"):
            ann.build_index(np.ones((3, 4)), M=bad)
        with pytest.raises(ValueError, match=r"M must be an integer in 2\.\.10000"):
            ann.index_bundle(copy, M=bad)
    assert not (copy / ann.INDEX_FILE).exists()


# -------------------------------------------------------------------------------------------- symlinks
def _link(bundle: Path, name: str, target: Path) -> None:
    path = bundle / name
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink()
    path.symlink_to(target, target_is_directory=target.is_dir())


def test_symbolic_links_are_refused_by_every_loader(setup, tmp_path):
    """``items.parquet -> /etc/passwd`` was read, ``scorer.onnx`` and ``tokenizer/`` pointing outside were loaded
    and served (their sha256 rewritten to match). Any link is refused, out of the bundle or not."""
    from laser_core.bundle import ExportBundle
    from laser_core.serving import Recommender, add_items

    plain = setup["plain"]
    outside = shutil.copytree(plain, tmp_path / "outside")  # the same bytes: the hashes match through the links
    cases = [
        ("items.parquet", Path("/etc/passwd")),
        ("scorer.onnx", outside / "scorer.onnx"),
        ("user_tower.onnx", outside / "user_tower.onnx"),
        ("tokenizer", outside / "tokenizer"),
        ("tokenizer/tokenizer.json", outside / "tokenizer" / "tokenizer.json"),
        ("scorer.onnx", Path("user_tower.onnx")),  # a link inside the bundle (to another of its files)
    ]
    new = pd.DataFrame({"item_id": ["n1"], "title": ["A new item"]})
    for i, (name, target) in enumerate(cases):
        copy = shutil.copytree(plain, tmp_path / f"c{i}")
        _link(copy, name, target)
        if name == "items.parquet":
            relist(copy, name)
        link = re.escape(str(copy / name)) + r": a symbolic link \(to "
        for load in (
            lambda: Recommender.load(copy),
            lambda: Recommender.load(copy, verify=False),
            lambda: ExportBundle.load(copy),
            lambda: ann.index_bundle(copy, M=4, ef=8, threads=1),
            lambda: add_items(copy, new, tmp_path / f"out{i}"),
        ):
            with pytest.raises(BundleError, match=link):
                load()
        assert not (tmp_path / f"out{i}").exists() and not (copy / ann.INDEX_FILE).exists()
    # the manifest itself
    copy = shutil.copytree(plain, tmp_path / "manifest")
    _link(copy, MANIFEST, outside / MANIFEST)
    with pytest.raises(BundleError, match=re.escape(str(copy / MANIFEST)) + r": a symbolic link"):
        Recommender.load(copy)
    # a FIFO would block the hash check forever
    copy = shutil.copytree(plain, tmp_path / "fifo")
    os.mkfifo(copy / "extra")
    with pytest.raises(BundleError, match=r"extra: not a regular file or folder"):
        Recommender.load(copy)
    # the bundle folder itself may be reached through a link
    via = tmp_path / "via"
    via.symlink_to(plain, target_is_directory=True)
    assert Recommender.load(via).n_items == N_ITEMS


def test_onnx_external_data_outside_the_bundle_is_refused(setup, tmp_path):
    """A scorer whose table is ONNX external data at ``../outside.data`` (hashes rewritten): onnxruntime and
    onnx (the pinned versions) refuse external data outside the model's folder; the loader reports it as a
    BundleError naming the file."""
    import onnx

    from laser_core.bundle import SCORER_TABLE
    from laser_core.serving import Recommender

    copy = shutil.copytree(setup["plain"], tmp_path / "b")
    model = onnx.load(str(copy / "scorer.onnx"))
    (init,) = [t for t in model.graph.initializer if t.name == SCORER_TABLE]
    (tmp_path / "outside.data").write_bytes(init.raw_data)
    length = len(init.raw_data)
    init.ClearField("raw_data")
    init.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", "../outside.data"), ("offset", "0"), ("length", str(length))):
        entry = init.external_data.add()
        entry.key, entry.value = key, value
    onnx.save_model(model, str(copy / "scorer.onnx"))
    relist(copy, "scorer.onnx")
    with pytest.raises(BundleError, match=r"scorer\.onnx: .*(outside|escapes)"):
        Recommender.load(copy)
    with pytest.raises(BundleError, match=r"scorer\.onnx: "):
        ann.index_bundle(copy, M=4, ef=8, threads=1)


# ------------------------------------------------------------------------------------------- text bound
def test_a_1mb_title_is_cut_before_it_is_tokenized(setup, tmp_path, monkeypatch):
    """With no token budget in the bundle's text config, a 1 MB title made ``items add`` ask onnxruntime for
    17.6 TB (the whole title in one sequence). Every field is cut to ``DEFAULT_MAX_TEXT_CHARS`` first."""
    from laser_core.bundle import bound_item_texts
    from laser_core.data.loading import DEFAULT_MAX_TEXT_CHARS
    from laser_core.serving import Recommender, add_items

    copy = shutil.copytree(setup["plain"], tmp_path / "nolimit")
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["text"].update(title_max_tokens=None, title_max_chars=None, category_max_tokens=None)
    (copy / MANIFEST).write_text(json.dumps(manifest))  # the manifest is not in its own 'files'
    lengths = []
    feeds = Recommender._tower_feeds

    def recording(self, histories, token_ids, item_side=False):
        lengths.append(max(len(t) for t in token_ids))
        assert lengths[-1] <= 4 * DEFAULT_MAX_TEXT_CHARS, "an unbounded text reached the tower"
        return feeds(self, histories, token_ids, item_side)

    monkeypatch.setattr(Recommender, "_tower_feeds", recording)
    huge = "word " * 200_000  # 1 MB
    new = pd.DataFrame({"item_id": ["big", "small"], "title": [huge, "A small item"], "brand": [huge, "B"]})
    out = add_items(copy, new, tmp_path / "out")
    assert max(lengths) <= 4 * DEFAULT_MAX_TEXT_CHARS
    rec = Recommender.load(out)
    assert len(rec.catalogue["title"].iloc[-2]) <= DEFAULT_MAX_TEXT_CHARS
    assert rec.catalogue["title"].iloc[-1] == "A small item"
    # the exported / loaded side of the same bound
    cut = bound_item_texts(pd.DataFrame({"title": [huge, "x"], "brand": ["b", huge], "category": ["c", "d"]}))
    assert cut["title"].str.len().max() <= DEFAULT_MAX_TEXT_CHARS and cut["title"][1] == "x"
    assert cut["brand"].str.len().max() <= DEFAULT_MAX_TEXT_CHARS


def test_items_add_reports_progress_on_stderr(setup, tmp_path):
    import click
    from click.testing import CliRunner

    from laser_cli.serving_cmds import register
    from laser_core.serving import add_items

    seen = []
    new = pd.DataFrame({"item_id": [f"p{i}" for i in range(10)], "title": [f"Item number {i}" for i in range(10)]})
    add_items(setup["plain"], new, tmp_path / "lib", batch_size=4, progress=seen.append)
    assert seen == [4, 4, 2]

    @click.group()
    def cli() -> None:
        pass

    register(cli)
    new.to_csv(tmp_path / "new.csv", index=False)
    args = ["items", "add", "--bundle", str(setup["plain"]), "--items", str(tmp_path / "new.csv")]
    res = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "cli"), "--batch-size", "4"])
    assert res.exit_code == 0, res.output
    assert "embedding new items" in res.stderr and "embedding" not in res.stdout
    assert "added 10 item(s)" in res.stdout
