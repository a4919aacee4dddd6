"""Serving an export bundle (laser_core.serving): torch-free recommender, fallbacks, cold-start items, CLI."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
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
from conftest import export_tiny_bundle, tiny_spec

from laser_cli.serving_cmds import register
from laser_core.data.text import TextConfig
from laser_core.bundle import (
    MANIFEST,
    BundleError,
    BundleManifest,
    export_scorer,
    l2_normalize,
    load_manifest,
    verify_bundle,
    write_manifest,
)
from laser_core.export import popularity_from_sequences
from laser_core.serving import EmptyHistoryError, Recommender, add_items, read_items_file

H = 3  # history_len (text)
MAX_LEN = 6  # SR max_len (ids)
NEW_ITEMS = pd.DataFrame(
    {
        "item_id": ["new-1", "new-2", "new-3"],
        "title": [
            "Acme Turbo Trail Running Shoes, Red",
            "Nordic Cast Iron Dutch Oven, 5 qt",
            "Studio Wireless Headphones",
        ],
        "brand": ["Acme", "Nordic", ""],
        "category": ["Sports Shoes", "Kitchen Cookware", ""],
    }
)


# the data set and ID model of the `data` and `sr` fixtures (tests/conftest.py)
DATA = {"n_users": 120, "n_items": 40, "n_user_types": 4, "seed": 4}
SR = dict(model="bert4rec", hidden_size=16, max_len=MAX_LEN)
SR_TRAIN = dict(epochs=1)


@pytest.fixture(scope="module")
def setup(data, sr, tmp_path_factory):
    """One exported bundle (dynamo export runs once), the float32 reference model and the dataset."""
    ds, split = data
    root = tmp_path_factory.mktemp("serving")
    made = export_tiny_bundle(
        root / "bundle",
        tiny_spec(TextConfig(history_len=H, title_max_tokens=8), quant="none"),
        ds,
        sr,
        k=10,
        metadata={"model_version": "m-7"},
        popularity=popularity_from_sequences(split.train, ds.n_items),
    )
    return {
        "ds": ds,
        "split": split,
        "ref": made["ref"],
        "table": made["table"],
        "bundle": made["bundle"],
        "root": root,
    }


@pytest.fixture(scope="module")
def rec(setup):
    return Recommender.load(setup["bundle"])


@pytest.fixture(scope="module")
def extended(setup):
    """The bundle plus NEW_ITEMS (cold-start), written once."""
    return add_items(setup["bundle"], NEW_ITEMS, setup["root"] / "extended")


def ids(setup, rows):
    return [setup["ds"].items["item_id"][r] for r in rows]


# ------------------------------------------------------------------------------------- no torch at all
def test_recommender_runs_in_a_process_without_torch(setup, rec):
    history = ids(setup, [1, 4, 9])
    script = textwrap.dedent(f"""
        import json, sys
        from laser_core.serving import Recommender
        rec = Recommender.load({str(setup["bundle"])!r})
        res = rec.recommend({history!r} + ["unknown-id"], k=5)
        from fastapi.testclient import TestClient
        from laser_core.service import create_app
        with TestClient(create_app(rec)) as client:  # the HTTP service over it too
            assert client.post("/recommend", json={{"history": {history!r}}}).json()["items"][0]["item_id"] == \
                res.items[0].item_id
        mods = [m for m in ("torch", "transformers") if m in sys.modules]
        assert not mods, mods
        print(json.dumps({{"res": res.to_dict(), "version": rec.model_version, "n": rec.n_items}}))
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "ORT_DISABLE_TELEMETRY": "1"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["version"] == "m-7" and out["n"] == 40
    assert out["res"]["dropped"] == ["unknown-id"]
    here = rec.recommend(history, k=5)
    assert [i["item_id"] for i in out["res"]["items"]] == [i.item_id for i in here.items]
    np.testing.assert_allclose([i["score"] for i in out["res"]["items"]], [i.score for i in here.items], atol=1e-6)


# ------------------------------------------------------------------------------------------ recommend
def test_recommend_matches_torch_and_reports_unknown_ids(setup, rec):
    rows = [2, 5, 11]
    res = rec.recommend(["x-1", *ids(setup, rows[:2]), "x-2", ids(setup, rows)[2]])
    assert res.dropped == ["x-1", "x-2"]
    assert res.used == ids(setup, rows) and res.fallback is None and res.model_version == "m-7"
    with torch.no_grad():
        user = setup["ref"].embed([rows]).user_embedding
    cos = torch.nn.functional.normalize(user, dim=-1) @ torch.nn.functional.normalize(setup["table"], dim=-1).T
    top = cos[0].topk(10)
    assert [i.row for i in res.items] == top.indices.tolist()
    assert [i.item_id for i in res.items] == ids(setup, top.indices.tolist())
    np.testing.assert_allclose([i.score for i in res.items], top.values.numpy(), atol=1e-4)
    assert [i.rank for i in res.items] == list(range(1, 11))
    assert res.items[0].title == setup["ds"].items["title"][res.items[0].row]
    assert rec.n_items == 40 and rec.model_version == "m-7"


def test_empty_and_all_unknown_histories(setup, rec):
    with pytest.raises(EmptyHistoryError, match="it is empty"):
        rec.recommend([])
    with pytest.raises(ValueError, match="none of its 2 item id"):
        rec.recommend(["nope", "nada"])
    fallback = Recommender.load(setup["bundle"], popularity_fallback=True)
    res = fallback.recommend(["nope"], k=5)
    assert res.fallback == "popularity" and res.dropped == ["nope"]
    counts = popularity_from_sequences(setup["split"].train, 40)
    expected = np.argsort(-counts, kind="stable")[:5]
    assert [i.row for i in res.items] == expected.tolist()
    np.testing.assert_allclose([i.score for i in res.items], counts[expected] / counts.sum())
    assert fallback.recommend(ids(setup, [3])).fallback is None  # known items: the model answers


def test_long_history_is_cut_to_the_trained_lengths(setup, rec):
    rows = list(range(12))
    res = rec.recommend(ids(setup, rows))
    assert res.used == ids(setup, rows[-MAX_LEN:])  # text reads the last H=3, the ID side the last 6
    recent = rec.recommend(ids(setup, rows[-MAX_LEN:]))
    assert [i.item_id for i in res.items] == [i.item_id for i in recent.items]
    np.testing.assert_allclose([i.score for i in res.items], [i.score for i in recent.items], atol=1e-6)
    with torch.no_grad():
        user = setup["ref"].embed([rows]).user_embedding  # the torch model cuts the same way
    np.testing.assert_allclose(rec.user_embeddings([rows])[0], user[0].numpy(), atol=1e-4)


def test_exclude_history_and_k_beyond_the_scorer(setup, rec):
    rows = list(range(20))
    full = l2_normalize(setup["table"].numpy()) @ l2_normalize(rec.user_embeddings([rows])[0])
    order = [int(i) for i in np.argsort(-full, kind="stable")]
    res = rec.recommend(ids(setup, rows), k=5, exclude_history=True)  # needs more than the scorer's top-10
    assert [i.row for i in res.items] == [i for i in order if i not in rows][:5]
    assert set(res.excluded) == set(ids(setup, rows))
    wide = rec.recommend(ids(setup, rows), k=25)
    assert [i.row for i in wide.items] == order[:25]
    assert [i.row for i in wide.items[:10]] == [i.row for i in rec.recommend(ids(setup, rows)).items]
    with pytest.raises(ValueError, match="k must be an integer in 1..40"):
        rec.recommend(ids(setup, rows), k=41)
    with pytest.raises(TypeError, match="list of item ids"):
        rec.recommend("i00001")


def test_batch_recommendations_are_the_online_answers(setup, rec):
    """The batch step's recommendations (steps/batch.py) and the online service (Recommender, and its HTTP
    app) give the same top-k, scores and ranks for the same history and bundle, with history exclusion on and
    off, and beyond the scorer's top-10."""
    from fastapi.testclient import TestClient

    from laser_core.service import create_app
    from steps.batch import map_histories, recommendations_frame

    ds = setup["ds"]
    users, histories, info = map_histories(ds, rec.catalogue, list(ds.users[:8]))
    assert users == list(ds.users[:8]) and info["unknown_items_dropped"] == 0
    with TestClient(create_app(rec)) as client:
        for k, exclude in ((5, True), (4, False), (12, False)):
            frame = recommendations_frame(rec, users, histories, k, exclude, "m-7")
            assert len(frame) == len(users) * k and set(frame["model_version"]) == {"m-7"}
            for user, hist in zip(users, histories):
                got = frame[frame["user_id"] == user]
                online = rec.recommend(ids(setup, hist), k=k, exclude_history=exclude)
                assert got["item_id"].tolist() == [i.item_id for i in online.items]
                assert got["rank"].tolist() == list(range(1, k + 1))
                assert got["score"].tolist() == [np.float32(i.score) for i in online.items]
                if exclude:
                    assert not set(got["item_id"]) & set(ids(setup, hist))
            body = {"history": ids(setup, histories[0]), "k": k, "exclude_history": exclude}
            http = client.post("/recommend", json=body).json()["items"]
            assert [i["item_id"] for i in http] == frame[frame["user_id"] == users[0]]["item_id"].tolist()


def test_tampered_bundle_is_refused(setup, tmp_path):
    copy = shutil.copytree(setup["bundle"], tmp_path / "copy")
    with open(copy / "items.parquet", "ab") as fh:
        fh.write(b"x")
    with pytest.raises(BundleError, match="items.parquet: sha256 differs"):
        Recommender.load(copy)
    (copy / MANIFEST).write_text("{")
    with pytest.raises(BundleError, match="malformed JSON"):
        Recommender.load(copy)
    with pytest.raises(BundleError, match="not a Laser export bundle"):
        Recommender.load(tmp_path)


# ------------------------------------------------------------------------------------------ the manifest
def _copy(setup, tmp_path, edit=None) -> Path:
    """A copy of the bundle, its manifest changed by ``edit`` (the file hashes left as they were)."""
    copy = shutil.copytree(setup["bundle"], tmp_path / "copy")
    if edit is not None:
        manifest = json.loads((copy / MANIFEST).read_text())
        edit(manifest)
        (copy / MANIFEST).write_text(json.dumps(manifest))
    return copy


SHA0 = "0" * 64
MANIFEST_CASES = {
    "k > n_items": (lambda m: m.update(k=41), "field 'k': 41 exceeds n_items (40)"),
    "k a string": (lambda m: m.update(k="10"), "field 'k': Input should be a valid integer (got \"10\")"),
    "k a float": (lambda m: m.update(k=10.0), "field 'k': Input should be a valid integer (got 10.0)"),
    "scorer k": (lambda m: m["scorer"].update(k=5), "field 'scorer.k': 5 differs from k (10)"),
    "trained > n_items": (lambda m: m.update(n_trained_items=41), "field 'n_trained_items': 41 exceeds n_items"),
    "bool as int": (lambda m: m.update(popularity=1), "field 'popularity': Input should be a valid boolean"),
    "missing": (lambda m: m.pop("tokenizer"), "field 'tokenizer': missing"),
    "unknown": (lambda m: m.update(signature="x"), "field 'signature': unknown field"),
    "unknown nested": (lambda m: m["scorer"].update(cache=True), "field 'scorer.cache': unknown field"),
    "model_version": (
        lambda m: m["metadata"].update(model_version=7),
        "field 'metadata.model_version': must be a non-empty string, got 7",
    ),
    "unlisted scorer": (
        lambda m: m["files"].pop("scorer.onnx"),
        "field 'scorer.file': 'scorer.onnx' is not listed (with its sha256) in 'files'",
    ),
    "path outside": (
        lambda m: m["files"].update({"../outside.bin": SHA0}),
        "'../outside.bin' is not a relative path inside the bundle",
    ),
    "bad digest": (
        lambda m: m["files"].update({"items.parquet": "abc"}),
        "field \"files['items.parquet']\": must be a sha256 digest",
    ),
    "columns": (lambda m: m["catalogue"].update(columns=["item_id", "title"]), "field 'catalogue.columns': must be"),
    "text": (lambda m: m["text"].update(history_len="3"), "field 'text.history_len': Input should be a valid integer"),
    "sr": (
        lambda m: m.update(sr=None),
        "field 'sr': the M-Former prefix and the fusion need the SR encoder's settings",
    ),
    "added rows": (
        lambda m: m.update(
            added_items=[{"n": 2, "first_row": 40, "source_manifest_sha256": SHA0, "item_weights": "shared"}]
        ),
        "field 'added_items': n_trained_items (40) plus the added items (2) is 42, not n_items (40)",
    ),
    "tower inputs": (
        lambda m: m["user_tower"].update(inputs=["input_ids", "attention_mask"]),
        "field 'user_tower.inputs': must be ['item_ids', 'item_mask', 'input_ids', 'attention_mask']",
    ),
    "format_version": (lambda m: m.update(format_version=3), "format_version 3 is not supported: laser "),
    "not an object": (lambda m: m.clear(), "field 'format': missing"),
}


@pytest.mark.parametrize("case", list(MANIFEST_CASES))
def test_manifest_fields_are_validated(setup, tmp_path, case):
    edit, message = MANIFEST_CASES[case]
    copy = _copy(setup, tmp_path, edit)
    for verify in (True, False):  # the manifest is validated either way; verify only adds the sha256 checks
        with pytest.raises(BundleError) as err:
            Recommender.load(copy, verify=verify)
        assert str(err.value).startswith(f"{copy / MANIFEST}: ") and message in str(err.value), str(err.value)
    with pytest.raises(BundleError, match=re.escape(message)):
        load_manifest(copy)


def test_every_bundle_file_is_listed_and_present(setup, tmp_path):
    copy = _copy(setup, tmp_path)
    (copy / "tokenizer" / "notes.txt").write_text("not in the manifest")
    for verify in (True, False):
        with pytest.raises(
            BundleError,
            match=re.escape(
                f"{copy / 'tokenizer/notes.txt'}: in the bundle folder but not listed in {MANIFEST} 'files'"
            ),
        ):
            Recommender.load(copy, verify=verify)
    (copy / "tokenizer" / "notes.txt").unlink()
    manifest = load_manifest(copy)
    extra = next(n for n in manifest.files if n.startswith("tokenizer/") and n != manifest.tokenizer.file)
    (copy / extra).unlink()  # a listed file serving does not read is still required
    for verify in (True, False):
        with pytest.raises(BundleError, match=re.escape(f"{copy / extra}: listed in {MANIFEST} 'files' but missing")):
            Recommender.load(copy, verify=verify)


def _rewrite(copy: Path, **files) -> None:
    """Replace bundle files (name -> writer(path)) and re-hash them into a valid manifest."""
    for name, write in files.items():
        write(copy / name.replace("__", "."))
    write_manifest(copy, load_manifest(copy))  # files refilled


def test_loaded_files_must_agree_with_the_manifest(setup, tmp_path):
    """Hashes that match do not make a consistent bundle: the scorer's rows, k and width and the catalogue's
    columns are checked against the manifest."""
    table = setup["table"]
    copy = _copy(setup, tmp_path)
    _rewrite(copy, scorer__onnx=lambda p: export_scorer(table[:39], p, k=10))
    with pytest.raises(
        BundleError,
        match=re.escape(
            f"{copy / 'scorer.onnx'}: item table is [39, {table.shape[1]}], "
            f"but the manifest says [n_items, dim] = [40, {table.shape[1]}]"
        ),
    ):
        Recommender.load(copy)
    _rewrite(copy, scorer__onnx=lambda p: export_scorer(table, p, k=5))
    with pytest.raises(BundleError, match="scorer.onnx: returns top-5, but the manifest says k=10"):
        Recommender.load(copy)
    _rewrite(
        copy,
        scorer__onnx=lambda p: export_scorer(table, p, k=10),
        items__parquet=lambda p: pd.read_parquet(p).drop(columns="popularity").to_parquet(p, index=False),
    )
    with pytest.raises(
        BundleError,
        match=r"items.parquet: columns \['item_id', 'title', 'brand', 'category'\] "
        r"differ from the manifest's catalogue.columns",
    ):
        Recommender.load(copy)


def test_written_bundles_validate_and_invalid_manifests_are_never_written(setup, extended, tmp_path):
    for bundle in (setup["bundle"], extended):  # export_bundle's and add_items' bundles
        BundleManifest.model_validate(json.loads((bundle / MANIFEST).read_text()), strict=True)
        verify_bundle(bundle)
    copy = _copy(setup, tmp_path)
    before = (copy / MANIFEST).read_bytes()
    manifest = load_manifest(copy).model_copy(update={"k": 0})  # model_copy does not validate; write_manifest does
    with pytest.raises(BundleError, match="field 'k': Input should be greater than or equal to 1"):
        write_manifest(copy, manifest)
    assert (copy / MANIFEST).read_bytes() == before


# ------------------------------------------------------------------------------------ cold-start items
def test_added_items_match_the_torch_cold_item_embedding(setup, extended):
    before = {p.name: p.read_bytes() for p in setup["bundle"].iterdir() if p.is_file()}
    rec2 = Recommender.load(extended)
    assert rec2.n_items == 43 and rec2.model_version == "m-7"
    assert rec2.catalogue["item_id"].tolist()[-3:] == NEW_ITEMS["item_id"].tolist()
    with torch.no_grad():
        cold = setup["ref"].embed_cold_items(NEW_ITEMS)
    np.testing.assert_allclose(rec2.table()[-3:], l2_normalize(cold.numpy()), atol=1e-4)
    np.testing.assert_allclose(rec2.table()[:40], l2_normalize(setup["table"].numpy()), atol=1e-6)
    # the source bundle is untouched
    assert Recommender.load(setup["bundle"]).n_items == 40
    assert {p.name: p.read_bytes() for p in setup["bundle"].iterdir() if p.is_file()} == before
    manifest = load_manifest(extended)
    assert manifest.n_items == 43 and manifest.n_trained_items == 40
    assert manifest.added_items[0].n == 3 and manifest.added_items[0].first_row == 40


def test_added_items_appear_in_recommendations(setup, extended):
    rec2 = Recommender.load(extended, popularity_fallback=True)
    res = rec2.recommend(["new-2"])
    assert res.items[0].item_id == "new-2" and res.items[0].score == pytest.approx(1.0, abs=1e-5)
    mixed = rec2.recommend([*ids(setup, [1, 2]), "new-1"], k=43)
    assert {"new-1", "new-2", "new-3"} <= {i.item_id for i in mixed.items}
    assert rec2.catalogue.set_index("item_id").loc["new-1", "popularity"] == 0.0
    # a history of a cold item alone embeds exactly as the item did (the cold-item treatment on both sides; the
    # untrained weights here are the table's too: "shared")
    np.testing.assert_allclose(l2_normalize(rec2.user_embeddings([[41]])[0]), rec2.table()[41], atol=1e-5)


def test_a_bundle_without_the_item_side_record_warns_and_keeps_the_user_side(setup, extended, tmp_path):
    """A (format-1) bundle from before the item side was kept does not say which weights made its table: it is
    upgraded to "user_side", and add_items warns that new items get the user side's weights and records it."""
    assert Recommender.load(setup["bundle"]).cold_item_weights == "shared"
    assert load_manifest(extended).added_items[0].item_weights == "shared"
    old = shutil.copytree(setup["bundle"], tmp_path / "old")
    manifest = json.loads((old / MANIFEST).read_text())
    manifest["format_version"] = 1
    for key in ("item_weights", "item_weights_note"):
        del manifest["cold_item"][key]
    del manifest["bitune"]["fusion"], manifest["ann_index"]
    (old / MANIFEST).write_text(json.dumps(manifest))
    assert Recommender.load(old).cold_item_weights == "user_side"
    with pytest.warns(UserWarning, match="new items come from other weights than the table's rows"):
        out = add_items(old, NEW_ITEMS, tmp_path / "out")
    written = load_manifest(out)  # written as format 2
    assert written.added_items[0].item_weights == "user_side" and written.format_version == 2
    np.testing.assert_allclose(Recommender.load(out).table(), Recommender.load(extended).table(), atol=1e-6)


def test_add_items_errors(setup, extended, tmp_path):
    dup = pd.concat([NEW_ITEMS, NEW_ITEMS.iloc[:1]], ignore_index=True)
    with pytest.raises(ValueError, match="duplicate item_id value\\(s\\) \\['new-1'\\]"):
        add_items(setup["bundle"], dup, tmp_path / "a")
    clash = pd.DataFrame({"item_id": [setup["ds"].items["item_id"][0]], "title": ["x"]})
    with pytest.raises(ValueError, match="already in the bundle's catalogue"):
        add_items(setup["bundle"], clash, tmp_path / "b")
    with pytest.raises(ValueError, match="lacks column\\(s\\) \\['title'\\]"):
        add_items(setup["bundle"], pd.DataFrame({"item_id": ["z"]}), tmp_path / "c")
    with pytest.raises(ValueError, match="empty title in row\\(s\\) \\[0\\]"):
        add_items(setup["bundle"], pd.DataFrame({"item_id": ["z"], "title": [" "]}), tmp_path / "d")
    with pytest.raises(ValueError, match="is the source bundle"):
        add_items(setup["bundle"], NEW_ITEMS, setup["bundle"])
    with pytest.raises(FileExistsError):
        add_items(setup["bundle"], NEW_ITEMS, extended)
    with pytest.raises(ValueError, match="already in the bundle's catalogue: \\['new-1'"):
        add_items(extended, NEW_ITEMS, tmp_path / "e")  # added items are part of the catalogue now
    assert not any((tmp_path / n).exists() for n in "abcde")


def test_read_items_file_formats(tmp_path):
    NEW_ITEMS.to_csv(tmp_path / "a.csv", index=False)
    NEW_ITEMS.to_parquet(tmp_path / "a.parquet", index=False)
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in NEW_ITEMS.to_dict("records")) + "\n")
    for name in ("a.csv", "a.parquet", "a.jsonl"):
        got = read_items_file(tmp_path / name).fillna("")
        assert got[list(NEW_ITEMS.columns)].to_dict("records") == NEW_ITEMS.to_dict("records"), name
    (tmp_path / "bad.jsonl").write_text('{"item_id": "a"}\n[1]\n')
    with pytest.raises(ValueError, match="bad.jsonl, line 2: expected a JSON object"):
        read_items_file(tmp_path / "bad.jsonl")
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(ValueError, match="unsupported items file type '.txt'"):
        read_items_file(tmp_path / "a.txt")


# ------------------------------------------------------------------------------------------------- CLI
@pytest.fixture(scope="module")
def cli():
    @click.group()
    def group() -> None:
        pass

    register(group)
    return group


def test_cli_recommend(setup, rec, cli):
    runner = CliRunner()
    history = ids(setup, [3, 8])
    args = ["recommend", "--bundle", str(setup["bundle"]), "-k", "4", "--json"]
    for h in [*history, "ghost"]:
        args += ["--history", h]
    res = runner.invoke(cli, args)
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert [i["item_id"] for i in out["items"]] == [i.item_id for i in rec.recommend(history, k=4).items]
    assert out["dropped"] == ["ghost"] and out["model_version"] == "m-7"
    text = runner.invoke(cli, ["recommend", "--bundle", str(setup["bundle"]), "--history", history[0]])
    assert text.exit_code == 0 and "model m-7" in text.output and len(text.output.strip().splitlines()) == 11
    empty = runner.invoke(cli, ["recommend", "--bundle", str(setup["bundle"])])
    assert empty.exit_code == 1 and "it is empty" in empty.output
    popular = runner.invoke(cli, ["recommend", "--bundle", str(setup["bundle"]), "--popularity-fallback", "--json"])
    assert popular.exit_code == 0 and json.loads(popular.output)["fallback"] == "popularity"


def test_cli_items_add(setup, cli, tmp_path):
    runner = CliRunner()
    items = tmp_path / "new.jsonl"
    items.write_text(
        json.dumps({"item_id": "cli-1", "title": "Garden Hose Reel", "brand": "Verdo", "category": "Garden"}) + "\n"
    )
    out = tmp_path / "bundle2"
    res = runner.invoke(
        cli, ["items", "add", "--bundle", str(setup["bundle"]), "--items", str(items), "--out", str(out)]
    )
    assert res.exit_code == 0, res.output
    assert "added 1 item(s)" in res.output and "41 items" in res.output
    rec = runner.invoke(cli, ["recommend", "--bundle", str(out), "--history", "cli-1", "-k", "1", "--json"])
    assert json.loads(rec.output)["items"][0]["item_id"] == "cli-1"
    again = runner.invoke(
        cli, ["items", "add", "--bundle", str(out), "--items", str(items), "--out", str(tmp_path / "bundle3")]
    )
    assert again.exit_code == 1 and "already in the bundle's catalogue" in again.output


def test_cli_serve_on_a_busy_port_is_one_clear_line(setup, cli):
    """Bind first, then serve: a busy port is one error line and exit status 1, with nothing served."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        res = CliRunner().invoke(cli, ["serve", "--bundle", str(setup["bundle"]), "--port", str(port)])
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit)
    assert res.output.strip().splitlines() == [
        f"Error: cannot listen on 127.0.0.1:{port}: Address already in use "
        f"(another process is listening there: stop it or choose another "
        f"port)"
    ]
    bad = CliRunner().invoke(cli, ["serve", "--bundle", str(setup["root"]), "--max-body-bytes", "0"])
    assert bad.exit_code == 2 and "--max-body-bytes" in bad.output
