"""The GPU run: Laser Bi-Tuned at the paper's settings from a pack (bench/gpu/pack.py), results into ``--out``.

    bench/gpu/run.sh gpu-pack [--runs laser,laser-fusion] [--time-limit 480] [--set section.key=value ...]
    python bench/gpu/run.py --pack gpu-pack --out "$OUT" [--workdir runs/gpu-work]

For each run of the pack (``--runs``; the paper-faithful ``laser`` and the fused ``laser-fusion`` by default),
in order: build the model from the pack (its NF4 backbone dequantized with torch onto the device, the frozen ID
model from its checkpoint), Bi-Tune it with :class:`laser_core.train.LaserTrainer` (device ``auto``: the GPU;
validation after every epoch), test it on the test pairs with :func:`laser_core.train.test_laser`, and score
SASRec, BERT4Rec and popularity on the same pairs (``bench/laser_benchmark.py``'s helpers, the same code path
as the CPU benchmark). The same script runs on the CPU (tests/test_gpu_pack.py, tiny backbone).

Time budget (``--time-limit`` seconds from the start of the call, default 480, well inside a 9-minute call):
after every epoch's checkpoint, the run stops when the time left would not hold another epoch (the longest so
far) plus the test; it then tests its best validation epoch so far (``results`` with ``partial``: the epochs it
was trained for), writes what it has (``status: incomplete``) and exits 0. ``--shares 3,2`` splits the time
between the runs (each run's share of the time left when it starts, the shares of the runs after it counted):
a run that reaches the end of its share is stopped and tested the same way and the next run starts, so one call
gives every run a figure. A run that fails is recorded with its traceback and the next run starts. Calling
again resumes:
the trainer's checkpoints (``--workdir``, per run ``<label>-<run hash>``: the trainable weights, optimizer,
step counter, history, best epoch and table after every epoch) continue the run where it stopped, finished
epochs are never trained again, and a finished run only reloads its best weights and is tested again. A call
cut from outside (killed) resumes the same way from its last finished epoch. ``--out`` (``$OUT`` on the GPU
machine) is emptied before every call there, so the checkpoints live in ``--workdir`` (kept while the machine
is held) and ``--out`` gets the results: ``laser_<dataset>_gpu.json`` (the figures of every model on the same
test pairs, and per run its settings, status, history, best epochs, cost and calls), rewritten after every
epoch; a copy is kept in ``--workdir`` so a later call adds to it.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "bench" / "gpu"))

import torch  # noqa: E402
from laser_benchmark import budget, fit_record, paper_figures, protocol, score_baselines, trainer_history  # noqa: E402
from pack import DATA, extract_tar_xz, read_manifest  # noqa: E402

from laser_core.config import load_config  # noqa: E402
from laser_core.data import leave_one_out, load_dataset  # noqa: E402
from laser_core.model import build_laser  # noqa: E402
from laser_core.sr import load_model  # noqa: E402
from laser_core.train import LaserTrainer, test_examples, test_laser  # noqa: E402


class TimeUp(Exception):
    """Raised after an epoch's checkpoint when the time left would not hold another epoch and the test.
    ``whole_call``: the call's time (or epoch count) is spent, so later runs do not start; else only this run's
    share of it is (``--shares``)."""

    def __init__(self, why: str, whole_call: bool = True) -> None:
        super().__init__(why)
        self.whole_call = whole_call


class Budget:
    """The call's time limit: after each epoch (the trainer's callback, called once the epoch's checkpoint is
    written) decide whether another epoch and the test still fit."""

    def __init__(self, start: float, limit: float | None, margin: float = 10.0) -> None:
        self.start, self.limit, self.margin = start, limit, margin
        self.epoch_seconds = 0.0  # the longest epoch of this call (training + table + validation)
        self.eval_seconds_per_user = 0.0
        self.epochs = 0  # epochs trained in this call (all runs)
        self.run_deadline: float | None = None  # perf_counter() time at which the current run's share ends

    def left(self) -> float:
        return float("inf") if self.limit is None else self.limit - (time.perf_counter() - self.start)

    def run_left(self) -> float:
        return float("inf") if self.run_deadline is None else self.run_deadline - time.perf_counter()

    def test_seconds(self, n_pairs: int) -> float:
        return self.eval_seconds_per_user * n_pairs * 1.2

    def enough_for(self, seconds: float) -> bool:
        return self.left() >= seconds + self.margin


def load_pack_inputs(pack: Path, workdir: Path):
    """The pack's manifest, the dataset folder (unpacked into ``workdir`` once) and the frozen ID models."""
    manifest = read_manifest(pack)
    data = manifest["dataset"]
    data_dir = None
    if data.get("archive"):
        key = (pack / DATA).stat().st_size
        data_dir = workdir / f"data-{data['name']}-{key}"
        if not (data_dir / ".complete").is_file():
            extract_tar_xz(pack / DATA, data_dir)
            (data_dir / ".complete").write_text("ok\n", encoding="utf8")
    sr_models = {m: load_model(pack / entry["path"]) for m, entry in manifest["sr"].items()}
    return manifest, data_dir, sr_models


def machine() -> dict:
    info = {"platform": platform.platform(), "torch": torch.__version__, "cpu_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info.update(
            gpu=torch.cuda.get_device_name(),
            cuda=torch.version.cuda,
            gpu_memory_gb=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1),
        )
    return info


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    t_start = time.perf_counter()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pack", required=True, help="the pack folder of bench/gpu/pack.py")
    ap.add_argument(
        "--out",
        default=os.environ.get("OUT") or str(ROOT / "runs" / "gpu-out"),
        help="where the results go (default: $OUT, else runs/gpu-out)",
    )
    ap.add_argument(
        "--workdir", default=str(ROOT / "runs" / "gpu-work"), help="checkpoints (resume) and the unpacked data"
    )
    ap.add_argument("--runs", default=None, help="comma-separated run labels of the pack (default: all, in order)")
    ap.add_argument("--time-limit", type=float, default=480.0, help="seconds from the start of this call; 0: no limit")
    ap.add_argument(
        "--epochs-per-call",
        type=int,
        default=None,
        help="stop (resumably, as at the time limit) after this many epochs trained in this call",
    )
    ap.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="change a setting of every run (repeatable)",
    )
    ap.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    ap.add_argument(
        "--shares",
        default=None,
        metavar="W1,W2,...",
        help="split the time limit between the runs in these proportions (one weight per run)",
    )
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = Budget(t_start, args.time_limit or None)
    pack, out_dir, wd = Path(args.pack), Path(args.out), Path(args.workdir)
    out_dir.mkdir(parents=True, exist_ok=True)
    wd.mkdir(parents=True, exist_ok=True)
    manifest, data_dir, sr_models = load_pack_inputs(pack, wd)
    name = manifest["dataset"]["name"]
    labels = args.runs.split(",") if args.runs else list(manifest["runs"])
    unknown = [label for label in labels if label not in manifest["runs"]]
    if unknown:
        raise SystemExit(f"runs {unknown} are not in the pack (it has {list(manifest['runs'])})")
    shares = [float(w) for w in args.shares.split(",")] if args.shares else None
    if shares is not None and (len(shares) != len(labels) or min(shares) <= 0):
        raise SystemExit(f"--shares needs one positive weight per run ({len(labels)}: {labels})")
    filename = f"laser_{name}_gpu.json"
    kept = wd / filename
    out = json.loads(kept.read_text(encoding="utf8")) if kept.is_file() else {}
    results = out.setdefault("results", {})
    runs = out.setdefault("runs", {})
    out.update(
        dataset=name,
        paper=paper_figures(name),
        machine=machine(),
        pack={k: manifest.get(k) for k in ("total_bytes", "backbone", "sr", "runs")},
    )
    call = {
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "time_limit": args.time_limit,
        "runs": {},
    }
    out.setdefault("calls", []).append(call)
    backbone_dir = (pack / "backbone").as_posix()

    def write() -> None:
        call["wall_seconds"] = round(time.perf_counter() - t_start, 1)
        if torch.cuda.is_available():
            call["cuda_max_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        states = [runs.get(label, {}).get("status") for label in labels]
        out["status"] = (
            "complete"
            if all(s == "complete" for s in states)
            else "incomplete: call again to resume (checkpoints in the workdir)"
        )
        text = json.dumps(out, indent=2) + "\n"
        for path in (kept, out_dir / filename):
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(text, encoding="utf8")
            tmp.replace(path)

    data_cache: dict = {}
    scored: set[str] = set()
    pairs_key = None
    for label in labels:
        run = runs.setdefault(label, {})
        overrides = [f"backbone.name={backbone_dir}", "backbone.quantization=none", *args.overrides]
        cfg = load_config(
            pack / manifest["runs"][label]["config"], data_dir=str(data_dir) if data_dir else None, overrides=overrides
        )
        laser_cfg = cfg.laser_train
        key = cfg.dataset.model_dump_json()
        if key not in data_cache:
            ds = load_dataset(cfg.dataset)
            data_cache[key] = (ds, leave_one_out(ds))
        ds, split = data_cache[key]
        hist, targets = test_examples(split, laser_cfg)
        if pairs_key not in (None, (laser_cfg.test_users, laser_cfg.seed)):
            raise SystemExit(
                f"run {label!r} is tested on other pairs than the runs before it: one results file "
                "needs the same test pairs (laser_train.test_users and seed)"
            )
        pairs_key = (laser_cfg.test_users, laser_cfg.seed)
        run.update(config=manifest["runs"][label]["source"], overrides=args.overrides, budget=budget(cfg))
        out["protocol"] = protocol(laser_cfg, len(targets))
        if not clock.enough_for(clock.epoch_seconds + clock.test_seconds(len(targets))):
            run.setdefault("status", "not started")
            call["runs"][label] = "not started: time limit"
            continue
        t_run = time.perf_counter()
        i = labels.index(label)
        if shares is not None and clock.limit is not None:  # this run's share of the time left
            clock.run_deadline = t_run + clock.left() * shares[i] / sum(shares[i:])

        def train_and_test(cfg=cfg, label=label, run=run, ds=ds, split=split, targets=targets, laser_cfg=laser_cfg):
            """Build, Bi-Tune (stopped by the clock or not) and test one run: (stop, result, model, trainer,
            test figures, fit seconds, test seconds)."""
            model = build_laser(cfg.laser_spec(), ds.items, sr_models[cfg.sr.model], device=laser_cfg.device)
            trainer = LaserTrainer(model, split, laser_cfg, workdir_root=wd, label=label)
            last = [time.perf_counter()]

            def progress(stage: int, epoch: int, entry: dict, label=label, run=run, trainer=trainer) -> None:
                now = time.perf_counter()
                if epoch >= 0:
                    clock.epoch_seconds = max(clock.epoch_seconds, now - last[0])
                    clock.epochs += 1
                    trained[0] += 1
                last[0] = now
                cost = trainer.cost
                if cost["users_evaluated"]:
                    clock.eval_seconds_per_user = cost["eval_seconds"] / cost["users_evaluated"]
                print(
                    f"{label}: stage {stage} epoch {epoch} loss {entry.get('loss')} valid ndcg@10 "
                    f"{entry['valid']['ndcg@10']:.4f} ({now - t_start:.0f} s; non-finite batches "
                    f"{cost['nonfinite_batches']}, skipped steps {cost['skipped_steps']})",
                    flush=True,
                )
                run.update(status="incomplete", history=trainer_history(trainer), device=str(trainer.device))
                write()
                need = clock.epoch_seconds + clock.test_seconds(len(targets))
                if not clock.enough_for(need):
                    raise TimeUp("time limit")
                if clock.run_left() < need + clock.margin:
                    raise TimeUp("the run's share of the time limit", whole_call=False)
                if args.epochs_per_call is not None and clock.epochs >= args.epochs_per_call:
                    raise TimeUp("epochs per call")

            stop: TimeUp | None = None
            t0 = time.perf_counter()
            try:
                result = trainer.fit(callbacks=[progress])
            except TimeUp as why:
                stop, result = why, trainer.best_so_far()
            fit_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            laser = test_laser(result.model, result.item_table, split, laser_cfg)
            return stop, result, model, trainer, laser, fit_s, time.perf_counter() - t0

        trained = [0]
        try:
            stop, result, model, trainer, laser, fit_s, test_s = train_and_test()
        except Exception as err:  # noqa: BLE001 - one run's failure must not cost the others their figures
            run.update(status="failed", error=traceback.format_exc()[-4000:])
            call["runs"][label] = {
                "stopped": f"failed: {type(err).__name__}: {err}"[:500],
                "epochs_trained": trained[0],
                "seconds": round(time.perf_counter() - t_run, 1),
            }
            write()
            print(f"{label}: FAILED\n{run['error']}", flush=True)
            _free()
            continue
        run.update(
            fit_record(result, model, laser, fit_s, test_s, len(targets)),
            device=str(trainer.device),
            status="complete" if stop is None else "incomplete",
        )
        run.pop("error", None)
        if stop is None:
            run.pop("partial", None)
        else:  # the best validation epoch so far, tested: a figure at the budget this call had
            run["partial"] = {
                "stopped": str(stop),
                "users_trained": result.cost["users_trained"],
                "epochs_done": [(e["stage"], e["epoch"]) for e in result.history if not e.get("curve")][-1],
            }
        results[label] = run["results"]
        call["runs"][label] = {
            "stopped": "finished" if stop is None else str(stop),
            "epochs_trained": trained[0],
            "seconds": round(time.perf_counter() - t_run, 1),
        }
        score_baselines(sr_models, split, hist, targets, results, scored)
        write()
        print(
            f"{label}: test ndcg@10 {laser['ndcg@10']:.4f} recall@10 {laser['recall@10']:.4f} "
            f"mrr {laser['mrr']:.4f}" + ("" if stop is None else f" (stopped: {stop}; best epoch so far)"),
            flush=True,
        )
        if stop is not None and stop.whole_call:
            print(f"{label}: stopped ({stop}) after {trained[0]} epochs this call; call again to resume", flush=True)
            for rest in labels[i + 1 :]:
                runs.setdefault(rest, {}).setdefault("status", "not started")
                call["runs"][rest] = f"not started: {stop}"
            break
        del model, trainer, result
        _free()
    if not scored and data_cache:  # nothing trained this call: the baselines still get their figures
        ds, split = next(iter(data_cache.values()))
        score_baselines(sr_models, split, hist, targets, results, scored)
    write()
    print(json.dumps({k: round(v["ndcg@10"], 4) for k, v in results.items()}), flush=True)
    print(f"STATUS {out['status']}; wrote {out_dir / filename}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
