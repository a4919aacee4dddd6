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

Writes ``bench/results/laser_diagnose_<name>.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from laser_benchmark import baseline_model  # noqa: E402

import laser_core.losses as losses  # noqa: E402
import laser_core.train as train_mod  # noqa: E402
from laser_core.config import load_config  # noqa: E402
from laser_core.data import leave_one_out, load_dataset  # noqa: E402
from laser_core.model import build_laser  # noqa: E402
from laser_core.train import LaserTrainer  # noqa: E402


def anisotropy(table: torch.Tensor, n: int = 1000, seed: int = 0) -> dict[str, float]:
    idx = torch.randperm(table.shape[0], generator=torch.Generator().manual_seed(seed))[:n]
    off = ~torch.eye(len(idx), dtype=torch.bool)
    raw = F.normalize(table[idx], dim=1)
    cen = F.normalize(table[idx] - table.mean(0), dim=1)
    rc, cc = (raw @ raw.T)[off], (cen @ cen.T)[off]
    return {"pairwise_cos_mean": float(rc.mean()), "pairwise_cos_std": float(rc.std()),
            "centered_pairwise_cos_mean": float(cc.mean()), "centered_pairwise_cos_std": float(cc.std()),
            "sample": len(idx)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--config", required=True)
    ap.add_argument("--workdir", required=True, help="the benchmark's --workdir (frozen SR model, cached table)")
    ap.add_argument("--name", default=None)
    ap.add_argument("--variants", default="lr3e-3,centered",
                    help="base (the config's lr; the benchmark's stage-2 epoch 0 is the same run), lr3e-3, tau0.01, "
                         "centered")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, data_dir=args.data_dir)
    ds = load_dataset(cfg.dataset)
    split = leave_one_out(ds)
    wd = Path(args.workdir)
    sr = baseline_model(cfg.sr.model, split, wd)  # the benchmark's frozen encoder, from its checkpoint
    out: dict = {"dataset": args.name or ds.name, "config": args.config, "variants": {}}
    plain_scores = losses.cosine_scores
    table = None
    for variant in args.variants.split(","):
        model = build_laser(cfg.laser_spec(), ds.items, sr)  # same seed: the benchmark's initial weights
        lr = 3e-3 if variant == "lr3e-3" else cfg.laser_train.lr
        tau = 0.01 if variant == "tau0.01" else cfg.laser_train.tau
        tcfg = cfg.laser_train.model_copy(update={"lr": lr, "tau": tau})
        # the benchmark's run folder holds the cached table of these initial weights; nothing is written there
        runs = sorted(p for p in wd.glob("laser-*") if (p / "tables").is_dir())
        if not runs:
            raise SystemExit(f"{wd}: no laser-*/tables from a benchmark run")
        trainer = LaserTrainer(model, split, tcfg, workdir=runs[0])
        if table is None:
            table = trainer.item_table()  # cached by the benchmark run (same initial weights)
            out["anisotropy"] = anisotropy(table)
            print("anisotropy", out["anisotropy"], flush=True)
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
        res = {"lr": lr, "tau": tau, "train_users": int(tcfg.users_per_epoch or 0), "epoch_mean_loss": loss,
               "valid_ndcg@10": after["ndcg@10"], "valid_recall@10": after["recall@10"],
               "seconds": round(time.perf_counter() - t0, 1)}
        if before is not None:
            res["valid_ndcg@10_before_training"] = before["ndcg@10"]
        out["variants"][variant] = res
        print(variant, res, flush=True)
        dest = Path(args.out) / f"laser_diagnose_{out['dataset']}.json"
        dest.write_text(json.dumps(out, indent=2) + "\n", encoding="utf8")  # after each variant: resumable
        print(f"wrote {dest}", flush=True)
    losses.cosine_scores = train_mod.cosine_scores = plain_scores
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
