"""Laser on a real dataset beside SASRec and BERT4Rec, scored on the same test pairs by the same code path.

    python bench/laser_benchmark.py --data-dir ../shared/data/amazon2018-scientific-recformer --name scientific \\
        --config configs/scientific.yaml [--workdir runs/laser-scientific]

Reads the Laser settings (backbone, M-Former, text, training budget) from the YAML config, trains BERT4Rec (the
frozen encoder) and SASRec with ``bench/sr_baselines.py``'s settings, Bi-Tunes Laser (resumable through
``--workdir``), and writes ``bench/results/laser_<name>.json``: ``results.laser`` beside ``results.sasrec`` and
``results.bert4rec``, plus ``budget`` (every setting that bounds the run) and ``cost`` (time, throughput,
memory, trainable parameters).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from sr_baselines import DEFAULTS, PAPER  # noqa: E402

from laser_core.config import load_config  # noqa: E402
from laser_core.data import leave_one_out, load_dataset  # noqa: E402
from laser_core.model import build_laser  # noqa: E402
from laser_core.sr import SRConfig, TrainConfig, build_model, evaluate, fit  # noqa: E402
from laser_core.train import LaserTrainer, test_examples, test_laser  # noqa: E402

PAPER_LASER = {"scientific": {"recall@10": 0.1396, "ndcg@10": 0.0970, "mrr": 0.0893,
                              "trainable": {"bi_tuning_token_values": 135_000, "total": 183_300_000}}}
KEEP = ("recall@5", "ndcg@5", "recall@10", "ndcg@10", "mrr@10", "recall@20", "ndcg@20", "mrr")


def baseline_model(model: str, split, workdir: Path):
    """An ID-based model with ``bench/sr_baselines.py``'s settings, trained (or resumed) under
    ``workdir/sr-<model>``: the frozen encoder and the baselines of a benchmark run, and what
    ``bench/laser_diagnose.py`` reloads from the same folder."""
    spec = DEFAULTS[model]
    return fit(SRConfig(model=model, **spec["model"]),
               TrainConfig(epochs=200, patience=10, progress=False, **spec["train"]), split,
               workdir=Path(workdir) / f"sr-{model}").model


def add_common_args(ap: argparse.ArgumentParser) -> None:
    """The options the Laser benchmark and its diagnostics share."""
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--config", required=True)
    ap.add_argument("--name", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))


def load_inputs(args: argparse.Namespace):
    """Torch threads, the run config, the dataset and its leave-one-out split, from :func:`add_common_args`."""
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, data_dir=args.data_dir)
    ds = load_dataset(cfg.dataset)
    return cfg, ds, leave_one_out(ds)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(ap)
    ap.add_argument("--workdir", default=str(ROOT / "runs" / "laser-bench"))
    args = ap.parse_args(argv)
    cfg, ds, split = load_inputs(args)
    name = args.name or ds.name
    wd = Path(args.workdir)
    t_start = time.perf_counter()

    def train_sr(model: str):
        sr = baseline_model(model, split, wd)
        print(f"{model} ready", flush=True)
        return sr

    # The frozen encoder first; the other baseline after Laser's test, so a run cut short still has Laser's figures.
    sr_models = {cfg.sr.model: train_sr(cfg.sr.model)}
    laser_cfg = cfg.laser_train
    model = build_laser(cfg.laser_spec(), ds.items, sr_models[cfg.sr.model])
    trainer = LaserTrainer(model, split, laser_cfg, workdir_root=wd, label="laser")
    t0 = time.perf_counter()
    result = trainer.fit(callbacks=[lambda s, e, entry: print(f"stage {s} epoch {e}: valid ndcg@10 "
                                                               f"{entry['valid']['ndcg@10']:.4f}", flush=True)])
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    laser = test_laser(result.model, result.item_table, split, laser_cfg)
    test_s = time.perf_counter() - t0
    hist, targets = test_examples(split, laser_cfg)
    results = {"laser": {k: laser[k] for k in KEEP}}
    n_test = len(targets)

    def write() -> Path:
        for m, sr in sr_models.items():
            if m not in results:
                r = evaluate(sr, hist, targets)
                results[m] = {k: r[k] for k in KEEP}
        if "popularity" not in results:
            pop = evaluate(build_model(SRConfig(model="popularity"), split.n_items).fit(split.train), hist, targets)
            results["popularity"] = {k: pop[k] for k in KEEP}
        fp32_vs_nf4 = Path(args.out) / f"laser_cost_{name}.json"
        out = {
            "dataset": name,
            "protocol": {"split": "leave-one-out (last = test, second-to-last = validation)",
                         "ranking": "full, over all items", "mask_history": False,
                         "test_pairs": n_test, "test_users": laser_cfg.test_users or "all",
                         "same_pairs_for_all_models": True},
            "results": results,
            "budget": {"backbone": cfg.backbone.model_dump(), "mformer": cfg.bitune.mformer.model_dump(),
                       "prefix": cfg.bitune.prefix, "pooling": cfg.bitune.pooling, "text": cfg.text.model_dump(),
                       "train": laser_cfg.model_dump(exclude={"progress"}), "frozen_encoder": cfg.sr.model,
                       "config": str(Path(args.config).as_posix())},
            "cost": {**result.cost, "fit_seconds": round(fit_s, 1), "test_seconds": round(test_s, 1),
                     "test_users_per_second": n_test / test_s,
                     "total_seconds": round(time.perf_counter() - t_start, 1),
                     "backbone_memory_mb": model.backbone.memory_bytes() / 2**20, "trainable": model.n_trainable(),
                     "fp32_vs_nf4": ({"source": fp32_vs_nf4.name,
                                      **json.loads(fp32_vs_nf4.read_text(encoding="utf8"))}
                                     if fp32_vs_nf4.is_file() else None)},
            "best": result.best,
            "history": result.history,
            "paper": {"laser": PAPER_LASER.get(name), **PAPER.get(name, {})},
            "machine": {"cpu_threads": args.threads, "platform": platform.platform(), "torch": torch.__version__},
        }
        dest = Path(args.out)
        dest.mkdir(parents=True, exist_ok=True)
        path = dest / f"laser_{name}.json"
        path.write_text(json.dumps(out, indent=2) + "\n", encoding="utf8")
        print(f"wrote {path}", flush=True)
        return path

    write()
    for m in ("bert4rec", "sasrec"):
        if m not in sr_models:
            sr_models[m] = train_sr(m)
    write()
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
