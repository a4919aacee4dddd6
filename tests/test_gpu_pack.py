"""The GPU pack (bench/gpu/pack.py, laser_core.llm.pack) and the GPU run (bench/gpu/run.py, run.sh), here on the
CPU with the tiny backbone and tiny data written in RecFormer's format: the NF4 round trip stays within NF4's
error, a model rebuilt from the pack computes exactly what the dequantized weights compute (and close to the
original), and the run script trains, tests, writes its results and resumes without training an epoch twice."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from laser_core.config import load_config, read_yaml
from laser_core.data import leave_one_out, load_dataset
from laser_core.data.text import TextFormatter
from laser_core.fingerprint import split_fingerprint
from laser_core.llm.backbones import resolve_backbone
from laser_core.llm.pack import NF4_HALF_MAX_GAP, block_scales, dequantize_nf4, quantize_nf4, read_meta, unpack_state
from laser_core.model import build_laser, tokenizer_texts
from laser_core.sr import load_model

ROOT = Path(__file__).resolve().parents[1]


def _module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


gpu_pack = _module("gpu_pack", ROOT / "bench" / "gpu" / "pack.py")
gpu_run = _module("gpu_run", ROOT / "bench" / "gpu" / "run.py")

TRAIN = """laser_train:
  stage1_epochs: 2
  stage2_epochs: 1
  batch_size: 8
  grad_accumulation: 1
  optimizer: adam
  weight_decay: 0
  schedule: constant
  patience: null
  users_per_epoch: 24
  valid_users: 16
  item_batch_size: 32
  eval_batch_size: 32
  device: cpu
  progress: false
  threads: 1
"""
COMMON = """dataset: {format: recformer, name: tinysci}
text: {history_len: 5, title_max_tokens: 8, category_max_tokens: 4}
backbone: {name: tiny-random-llama, quantization: none}
"""
FAITHFUL = (
    COMMON
    + """sr: {model: bert4rec, hidden_size: 64}
bitune:
  mformer: {n_experts: 2, n_query: 4, width: 32, n_layers: 2, n_heads: 2}
"""
    + TRAIN
)
FUSION = """base: laser.yaml
sr: {model: sasrec, dropout: 0.5, attn_dropout: 0.5}
bitune: {prefix: none, embedding_transform: whiten, fusion: concat}
laser_train: {fusion_weight_grid: [1.0, 5.0]}
"""  # a layer over FAITHFUL, as configs/scientific_gpu_fusion.yaml is


def write_recformer(root: Path, n_users: int = 90, n_items: int = 40, seed: int = 5) -> Path:
    """Synthetic interactions and item texts as a RecFormer folder (what the real Scientific data is)."""
    ds = load_dataset({"synthetic": {"n_users": n_users, "n_items": n_items, "seed": seed}})
    root.mkdir(parents=True)
    parts = {"train.json": {}, "val.json": {}, "test.json": {}}
    for u, seq in enumerate(ds.sequences):
        seq = [int(i) for i in seq]
        cut = len(seq) - 2 if len(seq) >= 3 else len(seq)
        parts["train.json"][str(u)] = seq[:cut]
        if cut < len(seq):
            parts["val.json"][str(u)] = [seq[cut]]
            parts["test.json"][str(u)] = [seq[cut + 1]]
    for name, data in parts.items():
        (root / name).write_text(json.dumps(data), encoding="utf8")
    (root / "smap.json").write_text(json.dumps({f"I{i}": i for i in range(ds.n_items)}), encoding="utf8")
    meta = {
        str(i): {"input": [{"title": r.title, "brand": r.brand, "category": r.category}]}
        for i, r in enumerate(ds.items.itertuples())
    }
    (root / "meta.json").write_text(json.dumps(meta), encoding="utf8")
    return root


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The data, two run configs (faithful, fused) and the pack built from them."""
    tmp = tmp_path_factory.mktemp("gpupack")
    data = write_recformer(tmp / "data")
    (tmp / "laser.yaml").write_text(FAITHFUL, encoding="utf8")
    (tmp / "fusion.yaml").write_text(FUSION, encoding="utf8")
    runs = {"laser": tmp / "laser.yaml", "laser-fusion": tmp / "fusion.yaml"}
    torch.set_num_threads(1)
    manifest = gpu_pack.build_pack(
        runs, tmp / "pack", tmp / "sr-work", data_dir=str(data), wheels="none", sr_epochs=3, log=lambda *a: None
    )
    return {"tmp": tmp, "data": data, "pack": tmp / "pack", "manifest": manifest, "runs": runs}


def _config(built, label: str, **over):
    overrides = [f"{k}={v}" for k, v in over.items()]
    return load_config(built["runs"][label], data_dir=str(built["data"]), overrides=overrides)


def _source_backbone(built) -> Path:
    cfg = _config(built, "laser")
    ds = load_dataset(cfg.dataset)
    return Path(resolve_backbone(cfg.backbone, tokenizer_texts(cfg.laser_spec(), ds.items)))


def _check_nf4(w: torch.Tensor, q: dict, back: torch.Tensor) -> None:
    """Every value within half the widest NF4 gap of its block's scale, which is the block's absmax rounded up
    by at most one 8-bit log step."""
    pad = (-w.numel()) % 64
    blocks = torch.nn.functional.pad(w.float().reshape(-1), (0, pad)).view(-1, 64)
    err = torch.nn.functional.pad((w.float() - back.float()).reshape(-1), (0, pad)).view(-1, 64).abs().amax(1)
    scales = block_scales(q["scales"], q["scale_range"])
    amax = blocks.abs().amax(1)
    assert bool((err <= NF4_HALF_MAX_GAP * scales * (1 + 1e-5) + 1e-12).all())
    live = amax > 0
    assert bool((scales[live] >= amax[live] * (1 - 1e-6)).all())
    step = float(q["scale_range"][1])
    assert bool((scales[live] <= amax[live] * 2**step * (1 + 1e-5)).all())
    assert bool((back.reshape(-1)[: w.numel()][w.reshape(-1) == 0] == 0).all())  # zeros stay exact


def test_nf4_round_trip_is_within_nf4_error():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(97, 130, generator=g) * 0.03
    w[3] = 0.0  # a zero block
    w[5, 7] = 2.5  # an outlier: its block's scale is large, the others' unaffected
    q = quantize_nf4(w)
    assert q["codes"].dtype == torch.uint8 and q["codes"].numel() == -(-w.numel() // 64) * 32
    assert q["scales"].dtype == torch.uint8 and q["scales"].numel() == -(-w.numel() // 64)
    back = dequantize_nf4(q["codes"], q["scales"], q["scale_range"], w.shape)
    _check_nf4(w, q, back)
    assert float((w - back).norm() / w.norm()) < 0.12
    # NF4's own levels come back exactly
    levels = torch.tensor([-1.0, 0.0, 1.0, 0.5626170039176941] * 16)
    q = quantize_nf4(levels)
    assert torch.equal(dequantize_nf4(q["codes"], q["scales"], q["scale_range"], levels.shape), levels)


def test_packed_weights_are_the_originals_within_nf4_error(built):
    from transformers import AutoTokenizer

    src = _source_backbone(built)
    tok = AutoTokenizer.from_pretrained(src)
    original = load_file(str(src / "model.safetensors"))
    meta = read_meta(built["pack"] / "backbone")
    state = unpack_state(built["pack"] / "backbone")
    emb = meta["embedding"]
    kept = set()
    for name, w in original.items():
        if meta["tensors"].get(name, {}).get("kind") == "nf4":
            _check_nf4(w, quantize_nf4(w), state[name])
            assert float((w - state[name]).norm() / w.norm()) < 0.12
        elif name == emb:
            rows = (state[name] != 0).any(dim=1)
            kept = set(torch.nonzero(rows).flatten().tolist())
            special = torch.tensor(sorted(tok.all_special_ids))  # exact: the suffix starts at the EOS row
            assert torch.equal(state[name][special], w[special])
            rows[special] = False
            sub = w[rows]
            _check_nf4(sub, quantize_nf4(sub), state[name][rows])
        elif name in state:
            assert torch.equal(state[name], w.float())
    assert meta["kept_token_rows"] >= len(kept) > 0
    assert meta["token_norm"] == pytest.approx(float(original[emb].norm(dim=1).mean()), rel=1e-6)
    # every token of every text the runs read has its row
    cfg = _config(built, "laser")
    ds = load_dataset(cfg.dataset)
    fmt = TextFormatter(ds.items, cfg.text, tokenizer=tok)
    used = gpu_pack.token_ids(tok, gpu_pack.texts_read(fmt, ds.sequences))
    assert used <= kept | {tok.pad_token_id, tok.eos_token_id}


def test_model_from_the_pack_equals_the_dequantized_model_and_is_close_to_the_original(built):
    from laser_core.sr import load_model as load_sr

    cfg = _config(built, "laser")
    ds = load_dataset(cfg.dataset)
    split = leave_one_out(ds)
    sr = load_sr(built["pack"] / "sr" / "bert4rec")
    packed_spec = _config(built, "laser", **{"backbone.name": built["pack"] / "backbone"}).laser_spec()
    packed = build_laser(packed_spec, ds.items, sr, device="cpu").eval()
    assert packed.backbone.token_norm == read_meta(built["pack"] / "backbone")["token_norm"]
    original = build_laser(cfg.laser_spec(), ds.items, sr, device="cpu").eval()
    reference = build_laser(cfg.laser_spec(), ds.items, sr, device="cpu").eval()
    missing, unexpected = reference.llm.load_state_dict(unpack_state(built["pack"] / "backbone"), strict=False)
    assert not unexpected and all("lm_head" in m for m in missing)
    for model in (original, reference):
        model.load_state_dict(packed.state_dict())  # the same trainable weights everywhere
    hists = [split.train[u][-k:] for u, k in [(0, 1), (1, 3), (2, 5), (7, 2), (9, 4)]]
    with torch.no_grad():
        got = packed.embed(hists).user_embedding
        ref = reference.embed(hists).user_embedding
        orig = original.embed(hists).user_embedding
        items = packed.embed_items(range(10), batch_size=4)
        ref_items = reference.embed_items(range(10), batch_size=4)
    assert torch.equal(got, ref) and torch.equal(items, ref_items)
    cos = torch.nn.functional.cosine_similarity(got, orig, dim=1)
    assert float(cos.min()) > 0.95, cos
    with pytest.raises(ValueError, match="quantization: none"):
        bad = packed_spec.model_copy(deep=True)
        bad.backbone.quantization = "nf4"
        build_laser(bad, ds.items, sr, device="cpu")


def test_pack_holds_the_data_the_sr_checkpoints_and_the_configs(built, tmp_path):
    pack, manifest = built["pack"], built["manifest"]
    on_disk = {p.relative_to(pack).as_posix(): p.stat().st_size for p in pack.rglob("*") if p.is_file()}
    assert manifest["total_bytes"] == sum(on_disk.values())
    assert set(manifest["files"]) | {"pack.json"} == set(on_disk)
    assert set(manifest["runs"]) == {"laser", "laser-fusion"}
    assert manifest["runs"]["laser-fusion"]["frozen_encoder"] == "sasrec"
    # each run's config as given, flattened (its `base:` files merged in), without the local data path
    assert read_yaml(pack / "configs" / "laser.yaml") == read_yaml_text(FAITHFUL)
    fused = read_yaml(pack / "configs" / "laser-fusion.yaml")
    assert "base" not in fused and fused["dataset"] == {"format": "recformer", "name": "tinysci"}
    assert fused["bitune"]["fusion"] == "concat" and fused["laser_train"]["fusion_weight_grid"] == [1.0, 5.0]
    # the data: unpacked, the same split as the source folder's
    data = gpu_pack.extract_tar_xz(pack / gpu_pack.DATA, tmp_path / "data")
    split = leave_one_out(load_dataset({"format": "recformer", "path": str(data)}))
    source = leave_one_out(load_dataset({"format": "recformer", "path": str(built["data"])}))
    assert split_fingerprint(split) == split_fingerprint(source)
    # the SR checkpoints: the workdir's trained models
    for m in ("sasrec", "bert4rec"):
        packed = load_model(pack / "sr" / m)
        trained = load_file(str(built["tmp"] / "sr-work" / f"sr-{m}" / "best" / "model.safetensors"))
        assert all(torch.equal(v, trained[k]) for k, v in packed.state_dict().items())
    # nothing pickled
    assert not [p for p in pack.rglob("*") if p.suffix in (".pt", ".pkl", ".pickle", ".bin", ".ckpt")]
    assert gpu_pack.deterministic_tar_xz({"a": b"1", "b": b"2"}) == gpu_pack.deterministic_tar_xz(
        {"b": b"2", "a": b"1"}
    )


def _entries(run: dict) -> list[tuple[int, int]]:
    return [(e["stage"], e["epoch"]) for e in run["history"] if not e.get("curve")]


def test_run_trains_tests_writes_and_resumes(built, tmp_path):
    pack, wd = built["pack"], tmp_path / "work"
    common = ["--pack", str(pack), "--workdir", str(wd), "--threads", "1"]
    out1 = tmp_path / "out1"
    assert gpu_run.main(common + ["--out", str(out1), "--epochs-per-call", "1"]) == 0
    first = json.loads((out1 / "laser_tinysci_gpu.json").read_text())
    assert first["status"].startswith("incomplete")
    assert first["runs"]["laser"]["status"] == "incomplete"
    assert first["runs"]["laser-fusion"]["status"] == "not started"
    assert _entries(first["runs"]["laser"]) == [(1, -1), (1, 0)]
    assert {"sasrec", "bert4rec", "popularity"} <= set(first["results"])
    assert first["calls"][-1]["runs"]["laser"]["epochs_trained"] == 1
    # stopped runs are tested at their best validation epoch so far, and say so
    assert first["runs"]["laser"]["partial"]["epochs_done"] == [1, 0]
    assert first["results"]["laser"] == first["runs"]["laser"]["results"]
    assert np.isfinite(first["results"]["laser"]["ndcg@10"])

    out2 = tmp_path / "out2"
    assert gpu_run.main(common + ["--out", str(out2)]) == 0
    second = json.loads((out2 / "laser_tinysci_gpu.json").read_text())
    assert second["status"] == "complete"
    expected = [(1, -1), (1, 0), (1, 1), (2, -1), (2, 0)]
    for label in ("laser", "laser-fusion"):
        run = second["runs"][label]
        assert run["status"] == "complete" and _entries(run) == expected  # no epoch trained twice
        assert "partial" not in run
        assert set(run["results"]) >= {"recall@10", "ndcg@10", "mrr"}
        assert second["results"][label] == run["results"]
    assert second["runs"]["laser-fusion"]["fusion_weight"]["chosen"] in (1.0, 5.0)
    assert [c["runs"]["laser"]["epochs_trained"] for c in second["calls"]] == [1, 2]
    assert second["calls"][-1]["runs"]["laser-fusion"]["epochs_trained"] == 3
    assert second["protocol"]["test_pairs"] == len(
        leave_one_out(load_dataset({"format": "recformer", "path": str(built["data"])})).eval_users
    )

    out3 = tmp_path / "out3"  # a finished run: reloaded and tested again, nothing trained
    assert gpu_run.main(common + ["--out", str(out3)]) == 0
    third = json.loads((out3 / "laser_tinysci_gpu.json").read_text())
    assert [r["epochs_trained"] for r in third["calls"][-1]["runs"].values()] == [0, 0]
    for label in ("laser", "laser-fusion", "sasrec", "bert4rec", "popularity"):
        assert third["results"][label] == pytest.approx(second["results"][label])

    out4 = tmp_path / "out4"  # no time left: nothing starts, the baselines still get their figures
    assert gpu_run.main(common + ["--out", str(out4), "--time-limit", "1", "--runs", "laser"]) == 0
    fourth = json.loads((out4 / "laser_tinysci_gpu.json").read_text())
    assert fourth["calls"][-1]["runs"]["laser"] == "not started: time limit"
    assert "sasrec" in fourth["results"]


def test_run_sh_runs_the_same_entry_point(built, tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            "bash",
            str(ROOT / "bench" / "gpu" / "run.sh"),
            str(built["pack"]),
            "--workdir",
            str(tmp_path / "work"),
            "--threads",
            "1",
            "--runs",
            "laser-fusion",
            "--set",
            "laser_train.stage1_epochs=1",
            "--set",
            "laser_train.stage2_epochs=0",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "STATUS complete" in proc.stdout
    result = json.loads((tmp_path / "out" / "laser_tinysci_gpu.json").read_text())
    assert result["runs"]["laser-fusion"]["device"] == "cpu"
    assert np.isfinite(result["results"]["laser-fusion"]["ndcg@10"])


def test_shares_give_every_run_a_figure_and_a_failed_run_does_not_stop_the_next(built, tmp_path, monkeypatch):
    """--shares: a run at the end of its share is tested at its best epoch so far and the next run starts (here
    laser's share is ~0 s: it stops after its epoch -1 validation); a run that raises is recorded, not fatal."""
    pack, wd = built["pack"], tmp_path / "work"
    common = ["--pack", str(pack), "--workdir", str(wd), "--threads", "1", "--time-limit", "100000"]
    assert gpu_run.main(common + ["--out", str(tmp_path / "o1"), "--shares", "1e-9,1"]) == 0
    got = json.loads((tmp_path / "o1" / "laser_tinysci_gpu.json").read_text())
    laser, fused = got["runs"]["laser"], got["runs"]["laser-fusion"]
    assert laser["status"] == "incomplete" and _entries(laser) == [(1, -1)]
    assert laser["partial"]["stopped"] == "the run's share of the time limit"
    assert got["calls"][-1]["runs"]["laser"]["epochs_trained"] == 0
    assert fused["status"] == "complete" and "partial" not in fused
    assert {"laser", "laser-fusion", "sasrec"} <= set(got["results"])
    with pytest.raises(SystemExit, match="one positive weight per run"):
        gpu_run.main(common + ["--out", str(tmp_path / "o0"), "--shares", "1"])

    real = gpu_run.build_laser
    calls = []

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("CUDA error: a planted failure")
        return real(*a, **k)

    monkeypatch.setattr(gpu_run, "build_laser", flaky)
    assert gpu_run.main(common + ["--out", str(tmp_path / "o2"), "--workdir", str(tmp_path / "work2")]) == 0
    got = json.loads((tmp_path / "o2" / "laser_tinysci_gpu.json").read_text())
    assert got["runs"]["laser"]["status"] == "failed" and "a planted failure" in got["runs"]["laser"]["error"]
    assert got["calls"][-1]["runs"]["laser"]["stopped"].startswith("failed: RuntimeError")
    assert got["runs"]["laser-fusion"]["status"] == "complete" and "laser-fusion" in got["results"]
    assert got["status"].startswith("incomplete")


def test_merge_takes_each_run_from_its_last_call_and_refuses_other_pairs(tmp_path):
    merge = _module("gpu_merge", ROOT / "bench" / "gpu" / "merge.py")

    def doc(runs: dict, ndcg: float, pairs: int = 5) -> dict:
        results = {k: {"ndcg@10": v} for k, v in runs.items()} | {"sasrec": {"ndcg@10": ndcg}}
        return {
            "dataset": "d",
            "paper": {},
            "machine": {},
            "pack": {},
            "protocol": {"test_pairs": pairs},
            "results": results,
            "calls": [{"runs": list(runs)}],
            "runs": {k: {"status": "incomplete"} for k in runs},
        }

    files = []
    for i, d in enumerate([doc({"a": 0.1, "b": 0.2}, 0.3), doc({"b": 0.25}, 0.31)]):
        files.append(tmp_path / f"c{i}.json")
        files[-1].write_text(json.dumps(d))
    got = merge.merge(files)
    assert {k: v["ndcg@10"] for k, v in got["results"].items()} == {"a": 0.1, "b": 0.25, "sasrec": 0.31}
    assert [c["file"] for c in got["calls"]] == ["c0.json", "c1.json"] and got["status"] == "incomplete"
    files[1].write_text(json.dumps(doc({"b": 0.25}, 0.31, pairs=6)))
    with pytest.raises(SystemExit, match="other test pairs"):
        merge.merge(files)


def read_yaml_text(text: str) -> object:
    import yaml

    return yaml.safe_load(text)
