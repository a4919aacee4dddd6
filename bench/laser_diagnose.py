"""Why does Laser learn so little at a small CPU budget? Diagnostics on the stage-2 setting of a benchmark run.

    python bench/laser_diagnose.py --data-dir ../shared/data/amazon2018-scientific-recformer \\
        --config configs/scientific_cpu.yaml --workdir runs/laser-sci [--variants base,lr3e-3,centered]

Reuses the benchmark's frozen BERT4Rec and its cached initial item table (``--workdir``), then:

1. **Anisotropy** of the item table: mean / std of pairwise cosines (sample of 1,000 items), raw and after
   removing the mean item embedding. With cosines packed near 1, ``cos / tau`` barely separates items, the IIC
   softmax is nearly uniform (loss ~ ln n_items) and its gradient is small.
2. **Variants** of one stage-2 epoch against that frozen table (same seeded users, same validation users):
   ``base`` (the config's lr), ``lr3e-3`` (10x the learning rate), ``tau0.01`` (IIC temperature 0.01 instead of
   0.05), ``centered`` (scores are cosines after subtracting the mean item embedding from users and items; not
   part of the paper's method). Each reports
   the epoch's mean loss and validation NDCG@10 / Recall@10.

3. **Item-item similarity** of that table (``--similarity``; no LLM forward): rank every item by the cosine of
   its row to the row of the user's last training item (and to the mean of the last 10), on all validation
   users. This is what a user tower would score if it reproduced the last item's embedding.
4. **Learning curves** (``--curves``): from the initial weights, train on ``chunks`` x ``users`` sampled users
   against the frozen table and validate after each chunk. A curve is named
   ``h<H>_lr<lr>_tau<tau>_<chunks>x<users>``, e.g. ``h1_lr3e-05_tau0.05_3x400`` (H = items in the user text).

5. **The untrained model on the test set** (``--test-initial``): the initial weights and the initial table
   scored on the config's test users by ``test_laser``, the benchmark's own test path, so the benchmark's trained
   figure can be read against what the frozen LLM gives before any Bi-Tuning.

Writes ``bench/results/laser_diagnose_<name>.json`` (merged into what is there: each run adds its entries).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from laser_benchmark import add_common_args, baseline_model, load_inputs  # noqa: E402

import laser_core.losses as losses  # noqa: E402
import laser_core.train as train_mod  # noqa: E402
from laser_core.metrics import compute_metrics  # noqa: E402
from laser_core.model import build_laser  # noqa: E402
from laser_core.train import LaserTrainer, test_laser  # noqa: E402


def anisotropy(table: torch.Tensor, n: int = 1000, seed: int = 0) -> dict[str, float]:
    idx = torch.randperm(table.shape[0], generator=torch.Generator().manual_seed(seed))[:n]
    off = ~torch.eye(len(idx), dtype=torch.bool)
    raw = F.normalize(table[idx], dim=1)
    cen = F.normalize(table[idx] - table.mean(0), dim=1)
    rc, cc = (raw @ raw.T)[off], (cen @ cen.T)[off]
    return {
        "pairwise_cos_mean": float(rc.mean()),
        "pairwise_cos_std": float(rc.std()),
        "centered_pairwise_cos_mean": float(cc.mean()),
        "centered_pairwise_cos_std": float(cc.std()),
        "sample": len(idx),
    }


KEEP = ("ndcg@10", "recall@10", "mrr")


def initial_table(cfg, ds, split, sr, wd: Path) -> torch.Tensor:
    """The item table of the initial weights: the benchmark run's cached copy when there is one. Item texts are
    one-item histories, so the number of items in the user text (H) does not change the table."""
    model = build_laser(cfg.laser_spec(), ds.items, sr)  # same seed: the benchmark's initial weights
    key = model.weights_fingerprint()[:24]
    for path in sorted(wd.glob(f"laser-*/tables/{key}.safetensors")):
        return load_file(str(path))["table"]
    return LaserTrainer(model, split, cfg.laser_train, workdir=wd / "diagnose").item_table()


def similarity(table: torch.Tensor, split) -> dict:
    """Next-item ranking by the frozen table alone: cosine to the last training item's row, and to the mean of the
    last 10 rows; raw and mean-centered; all validation users."""
    _, hist, targets = split.valid_examples()
    last = torch.tensor([int(h[-1]) for h in hist])
    out = {"users": len(targets)}
    for name, t in (("raw", table), ("centered", table - table.mean(0))):
        tn = F.normalize(t, dim=1)
        scores = tn[last] @ tn.T
        out[f"{name}_last_item"] = {k: compute_metrics(scores, targets)[k] for k in KEEP}
        scores[torch.arange(len(last)), last] = -2.0
        out[f"{name}_last_item_excluded"] = {k: compute_metrics(scores, targets)[k] for k in KEEP}
        mean = torch.stack([tn[torch.as_tensor(np.asarray(h[-10:], dtype=np.int64))].mean(0) for h in hist])
        out[f"{name}_mean_last10"] = {k: compute_metrics(F.normalize(mean, dim=1) @ tn.T, targets)[k] for k in KEEP}
    return out


def parse_curve(name: str) -> dict:
    m = re.fullmatch(r"h(\d+)_lr([0-9.e-]+)_tau([0-9.e-]+)_(\d+)x(\d+)", name)
    if not m:
        raise SystemExit(f"--curves: {name!r} is not h<H>_lr<lr>_tau<tau>_<chunks>x<users>")
    return {"history_len": int(m[1]), "lr": float(m[2]), "tau": float(m[3]), "chunks": int(m[4]), "users": int(m[5])}


def curve(name: str, cfg, ds, split, sr, table: torch.Tensor) -> dict:
    c = parse_curve(name)
    spec = cfg.laser_spec()
    spec = spec.model_copy(update={"text": spec.text.model_copy(update={"history_len": c["history_len"]})})
    trainer = LaserTrainer(
        build_laser(spec, ds.items, sr),
        split,
        cfg.laser_train.model_copy(
            update={"lr": c["lr"], "tau": c["tau"], "users_per_epoch": c["users"], "progress": False}
        ),
    )
    t0 = time.perf_counter()
    valid = trainer.validate(table)
    points = [
        {
            "users_trained": 0,
            "loss": None,
            **{k: valid[k] for k in KEEP},
            "validate_seconds": round(time.perf_counter() - t0, 1),
        }
    ]
    print(name, points[-1], flush=True)
    for chunk in range(c["chunks"]):
        t0 = time.perf_counter()
        loss = trainer.train_epoch(table, 2, chunk)
        train_s = time.perf_counter() - t0
        valid = trainer.validate(table)
        points.append(
            {
                "users_trained": (chunk + 1) * c["users"],
                "loss": loss,
                **{k: valid[k] for k in KEEP},
                "train_seconds": round(train_s, 1),
            }
        )
        print(name, points[-1], flush=True)
    return {**c, "valid_users": cfg.laser_train.valid_users, "batch_size": cfg.laser_train.batch_size, "points": points}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(ap)
    ap.add_argument("--workdir", required=True, help="the benchmark's --workdir (frozen SR model, cached table)")
    ap.add_argument(
        "--variants", default="", help="one stage-2 epoch each: base (the config's lr), lr3e-3, tau0.01, centered"
    )
    ap.add_argument("--similarity", action="store_true", help="item-item similarity of the initial table")
    ap.add_argument("--curves", default="", help="comma-separated h<H>_lr<lr>_tau<tau>_<chunks>x<users>")
    ap.add_argument(
        "--test-initial", action="store_true", help="score the initial weights and table on the config's test users"
    )
    args = ap.parse_args(argv)
    cfg, ds, split = load_inputs(args)
    wd = Path(args.workdir)
    sr = baseline_model(cfg.sr.model, split, wd)  # the benchmark's frozen encoder, from its checkpoint
    name = args.name or ds.name
    dest = Path(args.out) / f"laser_diagnose_{name}.json"
    out: dict = json.loads(dest.read_text(encoding="utf8")) if dest.is_file() else {}
    out.update(dataset=name, config=args.config)
    out.setdefault("commands", [])
    out["commands"].append("python bench/laser_diagnose.py " + " ".join(sys.argv[1:] if argv is None else argv))

    def save() -> None:  # after each piece: a run cut short keeps what it measured
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(json.dumps(out, indent=2) + "\n", encoding="utf8")
        print(f"wrote {dest}", flush=True)

    table = initial_table(cfg, ds, split, sr, wd)
    out["anisotropy"] = anisotropy(table)
    print("anisotropy", out["anisotropy"], flush=True)
    if args.similarity:
        out["similarity"] = similarity(table, split)
        print("similarity", out["similarity"], flush=True)
        save()
    if args.test_initial:
        t0 = time.perf_counter()
        model = build_laser(cfg.laser_spec(), ds.items, sr)
        metrics = test_laser(model, table, split, cfg.laser_train.model_copy(update={"progress": False}))
        out["test_initial"] = {
            **{k: metrics[k] for k in KEEP},
            "test_users": cfg.laser_train.test_users or "all",
            "history_len": cfg.text.history_len,
            "seconds": round(time.perf_counter() - t0, 1),
        }
        print("test_initial", out["test_initial"], flush=True)
        save()
    for name_c in filter(None, args.curves.split(",")):
        out.setdefault("curves", {})[name_c] = curve(name_c, cfg, ds, split, sr, table)
        save()
    plain_scores = losses.cosine_scores
    for variant in filter(None, args.variants.split(",")):
        model = build_laser(cfg.laser_spec(), ds.items, sr)
        lr = 3e-3 if variant == "lr3e-3" else cfg.laser_train.lr
        tau = 0.01 if variant == "tau0.01" else cfg.laser_train.tau
        tcfg = cfg.laser_train.model_copy(update={"lr": lr, "tau": tau})
        trainer = LaserTrainer(model, split, tcfg)
        if variant == "centered":
            mu = table.mean(0)

            def centered(users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
                return F.normalize(users - mu, dim=-1) @ F.normalize(items - mu, dim=-1).T

            losses.cosine_scores = train_mod.cosine_scores = centered
        else:
            losses.cosine_scores = train_mod.cosine_scores = plain_scores
        t0 = time.perf_counter()
        before = trainer.validate(table) if variant == "centered" else None
        loss = trainer.train_epoch(table, 2, 0)
        after = trainer.validate(table)
        res = {
            "lr": lr,
            "tau": tau,
            "train_users": int(tcfg.users_per_epoch or 0),
            "epoch_mean_loss": loss,
            "valid_ndcg@10": after["ndcg@10"],
            "valid_recall@10": after["recall@10"],
            "seconds": round(time.perf_counter() - t0, 1),
        }
        if before is not None:
            res["valid_ndcg@10_before_training"] = before["ndcg@10"]
        out.setdefault("variants", {})[variant] = res
        print(variant, res, flush=True)
        save()
    losses.cosine_scores = train_mod.cosine_scores = plain_scores
    save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
