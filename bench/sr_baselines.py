"""Train and test popularity, GRU4Rec, SASRec and BERT4Rec on one dataset; write JSON + Markdown results.

    python bench/sr_baselines.py --data-dir ../shared/data/amazon2018-scientific-recformer --name scientific

Protocol: leave-one-out, full ranking over all items, test users, no history masking, ties = expectation
under a random order (laser_core.metrics). Each model trains with Adam and early stopping on validation
NDCG@10; the test figures are those of the best validation epoch. Hyper-parameters: ``DEFAULTS`` below,
overridable per model with ``--set model.key=value``. Writes ``bench/results/sr_<name>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from laser_core.data import leave_one_out, load_dataset  # noqa: E402
from laser_core.reporting import markdown_table  # noqa: E402
from laser_core.evaluation import evaluate_split  # noqa: E402
from laser_core.sr import SRConfig, TrainConfig, fit  # noqa: E402

# Chosen on the validation split of Scientific (see docs/sr_baselines.md for what was tried).
DEFAULTS: dict[str, dict] = {
    "popularity": {"model": {}, "train": {}},
    "gru4rec": {"model": {"hidden_size": 64, "dropout": 0.3}, "train": {"lr": 1e-3, "batch_size": 128}},
    "sasrec": {
        "model": {"hidden_size": 64, "n_layers": 2, "n_heads": 2, "dropout": 0.5, "attn_dropout": 0.5},
        "train": {"lr": 1e-3, "batch_size": 128},
    },
    "bert4rec": {
        "model": {
            "hidden_size": 64,
            "n_layers": 2,
            "n_heads": 2,
            "dropout": 0.2,
            "attn_dropout": 0.2,
            "mask_prob": 0.2,
        },
        "train": {"lr": 1e-3, "batch_size": 128},
    },
}

PAPER = {  # LASER_SPEC.md §4, Scientific
    "scientific": {
        "sasrec": {"recall@10": 0.1305, "ndcg@10": 0.0797, "mrr": 0.0696},
        "bert4rec": {"recall@10": 0.1061, "ndcg@10": 0.0790, "mrr": 0.0759},
    },
}


def parse_sets(values: list[str]) -> dict[str, dict[str, dict]]:
    out: dict[str, dict[str, dict]] = {}
    for item in values:
        key, _, raw = item.partition("=")
        model, _, name = key.partition(".")
        section = "train" if name in TrainConfig.model_fields else "model"
        out.setdefault(model, {"model": {}, "train": {}})[section][name] = json.loads(raw)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--name", default=None, help="dataset name in the output file (default: folder name)")
    ap.add_argument("--models", default="popularity,gru4rec,sasrec,bert4rec")
    ap.add_argument("--epochs", type=int, default=200)
    ap.add_argument("--patience", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", action="append", default=[], help="override: sasrec.hidden_size=128")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--workdir", default=None, help="checkpoints (resume after a crash)")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    ds = load_dataset({"path": args.data_dir})
    name = args.name or ds.name
    split = leave_one_out(ds)
    overrides = parse_sets(args.set)
    results: dict[str, dict] = {}
    for model in args.models.split(","):
        spec = {s: {**DEFAULTS[model][s], **overrides.get(model, {}).get(s, {})} for s in ("model", "train")}
        cfg = SRConfig(model=model, **spec["model"])
        tcfg = TrainConfig(epochs=args.epochs, patience=args.patience, seed=args.seed, progress=False, **spec["train"])
        t0 = time.perf_counter()
        workdir = Path(args.workdir) / f"{name}-{model}" if args.workdir else None
        res = fit(cfg, tcfg, split, workdir=workdir)
        total = time.perf_counter() - t0
        test = evaluate_split(res.model, split, "test")
        results[model] = {
            **test,
            "valid_ndcg@10": res.best_valid.get("ndcg@10"),
            "best_epoch": res.best_epoch,
            "epochs_run": res.epochs_run,
            "seconds_per_epoch": round(res.mean_epoch_seconds, 2),
            "train_seconds_total": round(total, 1),
            "parameters": res.model.n_parameters(),
            "config": cfg.model_dump(),
            "train": tcfg.model_dump(exclude={"progress"}),
        }
        print(
            f"{model:<10} R@10 {test['recall@10']:.4f} N@10 {test['ndcg@10']:.4f} MRR {test['mrr']:.4f} "
            f"best epoch {res.best_epoch}/{res.epochs_run} {res.mean_epoch_seconds:.1f}s/epoch",
            flush=True,
        )

    out = {
        "dataset": name,
        "data_dir": os.path.abspath(args.data_dir),
        "stats": ds.stats(),
        "protocol": {
            "split": "leave-one-out (last = test, second-to-last = validation)",
            "ranking": "full, over all items",
            "users": "test users",
            "mask_history": False,
            "ties": "expected under random order",
            "early_stopping": f"validation ndcg@10, patience {args.patience}, at most {args.epochs} epochs",
            "seed": args.seed,
        },
        "machine": {"cpu_threads": args.threads, "platform": platform.platform(), "torch": torch.__version__},
        "results": results,
        "paper": PAPER.get(name, {}),
    }
    dest = Path(args.out)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / f"sr_{name}.json").write_text(json.dumps(out, indent=2) + "\n", encoding="utf8")
    (dest / f"sr_{name}.md").write_text(render_markdown(out), encoding="utf8")
    print(f"wrote {dest / f'sr_{name}.json'}")
    return 0


def render_markdown(out: dict) -> str:
    rows = []
    for model, r in out["results"].items():
        rows.append(
            [
                model,
                r["recall@10"],
                r["ndcg@10"],
                r["mrr"],
                r["recall@20"],
                r["ndcg@20"],
                f"{r['best_epoch']}/{r['epochs_run']}",
                f"{r['seconds_per_epoch']:.1f}",
                f"{r['train_seconds_total']:.0f}",
            ]
        )
    for model, p in out.get("paper", {}).items():
        rows.append([f"{model} (paper)", p["recall@10"], p["ndcg@10"], p["mrr"], "", "", "", "", ""])
    head = ["model", "Recall@10", "NDCG@10", "MRR", "Recall@20", "NDCG@20", "best/run epochs", "s/epoch", "train s"]
    st = out["stats"]
    return (
        f"# ID-based baselines on {out['dataset']}\n\n{st['users']:,} users, {st['items']:,} items, "
        f"{st['interactions']:,} interactions. Protocol: {out['protocol']['split']}; "
        f"{out['protocol']['ranking']}; no history masking; {out['protocol']['early_stopping']}; "
        f"{out['machine']['cpu_threads']} CPU threads.\n\n" + markdown_table(head, rows)
    )


if __name__ == "__main__":
    raise SystemExit(main())
