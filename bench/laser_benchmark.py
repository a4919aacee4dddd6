"""Laser on a real dataset beside SASRec and BERT4Rec, scored on the same test pairs by the same code path.

    python bench/laser_benchmark.py --data-dir ../shared/data/amazon2018-scientific-recformer --name scientific \\
        --config configs/scientific.yaml [--workdir runs/laser-scientific]

Reads the Laser settings (backbone, M-Former, text, training budget) from the YAML config, trains the frozen
encoder (``sr.model``) and the other ID baselines with ``bench/sr_baselines.py``'s settings, Bi-Tunes Laser
(resumable through ``--workdir``), and updates ``bench/results/laser_<name>.json``: ``results.<label>`` beside
``results.sasrec``, ``results.bert4rec`` and ``results.popularity`` (all on the same test pairs), and
``runs.<label>``: the command, every setting that bounds the run, its cost (time, throughput, memory), the wall
time, and its history (validation NDCG@10 per epoch and, with ``laser_train.curve_every_users``, every that many
training users). Several ``--label`` runs accumulate in one file.
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
from laser_core.evaluation import evaluate  # noqa: E402
from laser_core.sr import SRConfig, TrainConfig, build_model, fit  # noqa: E402
from laser_core.train import LaserTrainer, test_examples, test_laser  # noqa: E402

PAPER_LASER = {
    "scientific": {
        "recall@10": 0.1396,
        "ndcg@10": 0.0970,
        "mrr": 0.0893,
        "trainable": {"bi_tuning_token_values": 135_000, "total": 183_300_000},
    }
}
KEEP = ("recall@5", "ndcg@5", "recall@10", "ndcg@10", "mrr@10", "recall@20", "ndcg@20", "mrr")


def baseline_model(model: str, split, workdir: Path, epochs: int = 200):
    """An ID-based model with ``bench/sr_baselines.py``'s settings (at most ``epochs`` epochs, early stopping
    after 10 without a better validation NDCG@10), trained (or resumed) under ``workdir/sr-<model>``: the frozen
    encoder and the baselines of a benchmark run, what ``bench/laser_diagnose.py`` reloads from the same folder
    and what ``bench/gpu/pack.py`` packs."""
    spec = DEFAULTS[model]
    return fit(
        SRConfig(model=model, **spec["model"]),
        TrainConfig(epochs=epochs, patience=10, progress=False, **spec["train"]),
        split,
        workdir=Path(workdir) / f"sr-{model}",
    ).model


def add_common_args(ap: argparse.ArgumentParser) -> None:
    """The options the Laser benchmark and its diagnostics share."""
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--config", required=True)
    ap.add_argument("--name", default=None)
    ap.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="change a config setting for this run (repeatable; an ablation row: --set bitune.prefix_init=default)",
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))


def resumable_results(dest: Path, settings: dict, part: str, args: argparse.Namespace) -> tuple[dict, dict]:
    """A benchmark's results file kept across runs: its ``part`` (rows, variants) is reused only when the file was
    written with the same ``settings``, else started afresh. Returns (the whole file's dict, its ``part``)."""
    out: dict = json.loads(dest.read_text(encoding="utf8")) if dest.is_file() else {}
    if out.get("settings") != settings:
        if out.get(part):
            print(f"{dest}: other data or settings; its {part} are recomputed", flush=True)
        out = {}
    out.update(config=args.config, overrides=args.overrides, settings=settings)
    return out, out.setdefault(part, {})


def load_inputs(args: argparse.Namespace):
    """Torch threads, the run config, the dataset and its leave-one-out split, from :func:`add_common_args`."""
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, data_dir=args.data_dir, overrides=args.overrides)
    ds = load_dataset(cfg.dataset)
    return cfg, ds, leave_one_out(ds)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(ap)
    ap.add_argument("--workdir", default=str(ROOT / "runs" / "laser-bench"))
    ap.add_argument("--label", default="laser", help="this run's row in the results (one JSON holds every run)")
    ap.add_argument(
        "--leaderboard-row",
        default=None,
        help="with all test users, also this run's row for bench/leaderboard.py collect (e.g. laser_a)",
    )
    args = ap.parse_args(argv)
    cfg, ds, split = load_inputs(args)
    name = args.name or ds.name
    wd = Path(args.workdir)
    t_start = time.perf_counter()
    path = Path(args.out) / f"laser_{name}.json"
    out = json.loads(path.read_text(encoding="utf8")) if path.is_file() else {}
    if out and "runs" not in out:  # a file from before labelled runs: its one run becomes a labelled one
        old = {k: out.pop(k) for k in ("budget", "cost", "best", "history", "notes") if k in out}
        old["results"] = out.get("results", {}).pop("laser", None)
        out["runs"] = {"laser (2026-11, H=1, 30 layers, Adam 3e-5)": old}
    out.setdefault("runs", {})

    def train_sr(model: str):
        sr = baseline_model(model, split, wd)
        print(f"{model} ready", flush=True)
        return sr

    # The frozen encoder first; the other baselines after Laser's test, so a run cut short still has its figures.
    sr_models = {cfg.sr.model: train_sr(cfg.sr.model)}
    laser_cfg = cfg.laser_train
    hist, targets = test_examples(split, laser_cfg)
    results = out.setdefault("results", {})
    run: dict = {
        "config": str(Path(args.config).as_posix()),
        "overrides": args.overrides,
        "command": "python bench/laser_benchmark.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    out["runs"][args.label] = run

    scored: set[str] = set()  # baselines are scored once per process (on the same pairs as Laser)

    def write() -> Path:
        score_baselines(sr_models, split, hist, targets, results, scored)
        out.update(
            {
                "dataset": name,
                "protocol": protocol(laser_cfg, len(targets)),
                "paper": paper_figures(name),
                "machine": {"cpu_threads": args.threads, "platform": platform.platform(), "torch": torch.__version__},
            }
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=2) + "\n", encoding="utf8")
        print(f"wrote {path}", flush=True)
        return path

    model = build_laser(cfg.laser_spec(), ds.items, sr_models[cfg.sr.model])
    trainer = LaserTrainer(model, split, laser_cfg, workdir_root=wd, label=f"laser-{args.label}")
    run["budget"] = budget(cfg)

    def progress(stage: int, epoch: int, entry: dict) -> None:
        print(
            f"stage {stage} epoch {epoch} users {entry.get('users_seen')}: valid ndcg@10 "
            f"{entry['valid']['ndcg@10']:.4f}",
            flush=True,
        )
        run["history"] = trainer_history(trainer)
        run["wall_seconds_so_far"] = round(time.perf_counter() - t_start, 1)
        write()

    t0 = time.perf_counter()
    result = trainer.fit(callbacks=[progress])
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    laser = test_laser(result.model, result.item_table, split, laser_cfg)
    test_s = time.perf_counter() - t0
    run.update(fit_record(result, model, laser, fit_s, test_s, len(targets)))
    results[args.label] = run["results"]
    masked = test_laser(result.model, result.item_table, split, laser_cfg, mask_history=True)
    run["results"]["ndcg@10_masked"] = masked["ndcg@10"]
    if args.leaderboard_row and len(targets) != len(split.test_examples()[1]):
        print(f"--leaderboard-row {args.leaderboard_row}: not written (a sample of {len(targets)} test users)")
    elif args.leaderboard_row:
        row = {k: laser[k] for k in ("ndcg@10", "recall@10", "mrr")}
        row |= {"ndcg@10_masked": masked["ndcg@10"], "test_users": len(targets), "command": run["command"]}
        board = out.setdefault("leaderboard", {"dataset": name, "rows": {}})
        board["rows"][args.leaderboard_row] = row | {"label": args.label}
    run["wall_seconds"] = round(time.perf_counter() - t_start, 1)
    run.pop("wall_seconds_so_far", None)
    write()
    for m in ("bert4rec", "sasrec"):
        if m not in sr_models:
            sr_models[m] = train_sr(m)
    write()
    print(json.dumps({k: v["ndcg@10"] for k, v in results.items()}, indent=1))
    return 0


def score_baselines(sr_models: dict, split, hist, targets, results: dict, scored: set[str]) -> None:
    """``results[m]``: each ID model of ``sr_models`` and the popularity baseline (fitted on ``split``'s training
    sequences) scored on the test pairs ``(hist, targets)`` that Laser is scored on; those in ``scored`` are
    skipped (and the newly scored added)."""
    for m, sr in sr_models.items():
        if m not in scored:
            r = evaluate(sr, hist, targets)
            results[m], _ = {k: r[k] for k in KEEP}, scored.add(m)
    if "popularity" not in scored:
        pop = evaluate(build_model(SRConfig(model="popularity"), split.n_items).fit(split.train), hist, targets)
        results["popularity"], _ = {k: pop[k] for k in KEEP}, scored.add("popularity")


def protocol(laser_cfg, n_pairs: int) -> dict:
    """The evaluation protocol of a results file (every model on the same ``n_pairs`` test pairs)."""
    return {
        "split": "leave-one-out (last = test, second-to-last = validation)",
        "ranking": "full, over all items",
        "mask_history": False,
        "test_pairs": n_pairs,
        "test_users": laser_cfg.test_users or "all",
        "same_pairs_for_all_models": True,
    }


def paper_figures(name: str) -> dict:
    """The published figures for dataset ``name`` (LASER_SPEC.md §4), Laser's and the baselines'."""
    return {"laser": PAPER_LASER.get(name), **PAPER.get(name, {})}


def budget(cfg) -> dict:
    """Every setting that bounds a Laser run: backbone, Bi-Tuning, text, training, the frozen encoder."""
    return {
        "backbone": cfg.backbone.model_dump(),
        "bitune": cfg.bitune.model_dump(),
        "text": cfg.text.model_dump(),
        "train": cfg.laser_train.model_dump(exclude={"progress"}),
        "frozen_encoder": cfg.sr.model,
    }


def fit_record(result, model, laser: dict, fit_s: float, test_s: float, n_pairs: int) -> dict:
    """A finished Laser run's entry: its test figures, best epochs, history, fusion weight and cost."""
    return {
        "results": {k: laser[k] for k in KEEP},
        "best": result.best,
        "history": result.history,
        "fusion_weight": result.fusion_weight,
        "cost": {
            **result.cost,
            "fit_seconds": round(fit_s, 1),
            "test_seconds": round(test_s, 1),
            "test_users_per_second": n_pairs / test_s,
            "backbone_memory_mb": model.backbone.memory_bytes() / 2**20,
            "trainable": model.n_trainable(),
        },
    }


def trainer_history(trainer) -> list[dict]:
    """The history the trainer has saved so far (its ``state.json``), for figures written while it runs."""
    state = trainer.wd / "state.json" if trainer.wd is not None else None
    if state is None or not state.is_file():
        return []
    return json.loads(state.read_text(encoding="utf8")).get("history", [])


if __name__ == "__main__":
    raise SystemExit(main())
