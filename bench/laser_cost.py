"""Laser's CPU costs, measured side by side in one run: backbone memory, items encoded/s and training users/s
for each quantization (fp32 = ``none`` vs ``nf4``), on one dataset's real texts.

    python bench/laser_cost.py --data-dir ../shared/data/amazon2018-scientific-recformer --name scientific

Writes ``bench/results/laser_cost_<name>.json``. Settings (history length, title/category cuts, M-Former size,
batch sizes) are printed into the file beside every figure. Needs the SmolLM2 backbone (``laser models fetch``)
unless ``--backbone`` names another.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from laser_core.data import leave_one_out, load_dataset  # noqa: E402
from laser_core.data.text import TextConfig  # noqa: E402
from laser_core.llm import BackboneConfig  # noqa: E402
from laser_core.losses import iic_loss  # noqa: E402
from laser_core.mformer import MFormerConfig  # noqa: E402
from laser_core.model import BiTuneConfig, LaserSpec, build_laser  # noqa: E402
from laser_core.sr import SRConfig, build_model  # noqa: E402


def measure(spec: LaserSpec, ds, split, n_items: int, n_users: int, batch: int, seed: int = 0) -> dict:
    sr = build_model(SRConfig(model="bert4rec"), ds.n_items).eval()  # costs do not depend on SR weights
    t0 = time.perf_counter()
    model = build_laser(spec, ds.items, sr)
    load_s = time.perf_counter() - t0
    rng = np.random.default_rng(seed)
    items = rng.choice(ds.n_items, size=n_items, replace=False)
    model.eval()
    model.embed_items(items[:batch], batch_size=batch)  # warm-up
    t0 = time.perf_counter()
    table = model.embed_items(items, batch_size=batch)
    item_s = time.perf_counter() - t0
    users = [u for u in range(len(split.users)) if len(split.train[u]) >= 2]
    pick = rng.choice(len(users), size=n_users, replace=False)
    hist = [split.train[users[i]][:-1] for i in pick]
    targets = torch.from_numpy(rng.integers(0, n_items, size=n_users))
    opt = torch.optim.Adam(model.trainable_parameters(), lr=1e-4)
    model.train()
    tokens = [len(t) for t in model.tokenize(hist)]
    t0 = time.perf_counter()
    for lo in range(0, n_users, batch):
        emb, _ = model(hist[lo:lo + batch])
        loss = iic_loss(emb, table, targets[lo:lo + batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
    train_s = time.perf_counter() - t0
    return {"quantization": spec.backbone.quantization, "backbone_memory_mb": model.backbone.memory_bytes() / 2**20,
            "load_seconds": round(load_s, 1), "items_per_second": n_items / item_s,
            "train_users_per_second": n_users / train_s, "mean_user_tokens": float(np.mean(tokens)),
            "mean_item_tokens": float(np.mean([len(t) for t in model.tokenize([[int(i)] for i in items])])),
            "trainable": model.n_trainable()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--name", default=None)
    ap.add_argument("--backbone", default="smollm2-135m-instruct")
    ap.add_argument("--quantizations", default="none,nf4")
    ap.add_argument("--items", type=int, default=64)
    ap.add_argument("--users", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--history", type=int, default=10)
    ap.add_argument("--title-tokens", type=int, default=24)
    ap.add_argument("--category-tokens", type=int, default=12)
    ap.add_argument("--mformer", default="8,32,768,12,12", help="K,L,width,layers,heads")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    ds = load_dataset({"path": args.data_dir})
    split = leave_one_out(ds)
    K, L, W, Z, H = (int(x) for x in args.mformer.split(","))
    text = TextConfig(history_len=args.history, title_max_tokens=args.title_tokens,
                      category_max_tokens=args.category_tokens)
    bitune = BiTuneConfig(mformer=MFormerConfig(n_experts=K, n_query=L, width=W, n_layers=Z, n_heads=H))
    rows = []
    for q in args.quantizations.split(","):
        spec = LaserSpec(bitune=bitune, text=text, backbone=BackboneConfig(name=args.backbone, quantization=q))
        row = measure(spec, ds, split, args.items, args.users, args.batch)
        print(json.dumps(row), flush=True)
        rows.append(row)
    name = args.name or ds.name
    out = {"dataset": name, "backbone": args.backbone,
           "budget": {"history_len": args.history, "title_max_tokens": args.title_tokens,
                      "category_max_tokens": args.category_tokens, "mformer": {"K": K, "L": L, "width": W,
                                                                                "layers": Z, "heads": H},
                      "batch_size": args.batch, "items_timed": args.items, "users_timed": args.users},
           "machine": {"cpu_threads": args.threads, "platform": platform.platform(), "torch": torch.__version__},
           "results": {r["quantization"]: r for r in rows}}
    if len(rows) == 2:
        a, b = rows
        out["ratios"] = {f"{b['quantization']}_over_{a['quantization']}": {
            "memory": b["backbone_memory_mb"] / a["backbone_memory_mb"],
            "items_per_second": b["items_per_second"] / a["items_per_second"],
            "train_users_per_second": b["train_users_per_second"] / a["train_users_per_second"]}}
    dest = Path(args.out)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / f"laser_cost_{name}.json").write_text(json.dumps(out, indent=2) + "\n", encoding="utf8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
