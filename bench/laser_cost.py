"""Laser's CPU costs per backbone precision and depth, side by side in one run: items encoded/s, training users/s,
backbone memory and fidelity (cosine to the float32 model of the same depth) for named Bi-Tuning variants.

    HF_HUB_OFFLINE=1 python bench/laser_cost.py --config configs/scientific_cpu.yaml --name scientific

Every variant is a set of overrides of the config's ``backbone`` (quantization, compute dtype, decoder layers
kept; see ``VARIANTS``); ``--variants a,b`` picks some. The text and M-Former budget is the config's (the same user
and item texts as training: history length, title/category token cuts, M-Former size, SR encoder, batch sizes,
lr, tau), ``--history`` overrides the history length. All variants run in one process, one after the other, on the
same seeded items and users, with the same trainable weights (the seeded build gives every variant the same
M-Former; the first variant's trainable state is then loaded into every other, so that a bfloat16 backbone's
EOS-initialised suffix does not differ either), each after a warm-up:

- items/s: ``embed_items`` over the sampled items, in length-sorted batches of ``item_batch_size`` (as the
  training's table refresh) taken in a seeded random order;
- training users/s: the trainer's own epoch loop (:meth:`laser_core.trainer.Trainer.run_epoch` of a
  :class:`~laser_core.train.LaserTrainer` with the config's ``laser_train``): ``LaserModel.calculate_loss``
  (the IIC loss, or the fused cross-entropy, + load balancing), backward, and the configured optimizer (AdamW or
  Adam, gradient accumulation, the learning-rate schedule, the non-finite-gradient guard) on ``batch_size``
  users a mini-batch, each a random history cut as in training;
- fidelity: the mean and min cosine of the variant's item rows (and of one batch of user rows) to those of the
  unquantized float32 model with the same number of decoder layers (a variant of the run, else built for it).

``--time-cap`` bounds each timed phase of a variant (a slow variant, e.g. bfloat16 matmuls on a CPU without
AVX512-BF16, is timed on the whole batches done by then; the row says how many). A variant that fails (a dtype the
backend cannot do on this machine, ...) records its error in its row; the others go on.

Run time on 2 cores (AVX2, no AVX512-BF16) with the defaults (7 variants, 192 items, 96 users, 30 s cap): about
7-8 minutes, mostly the two full-depth bfloat16 variants (about 10x slower than float32 there, so each is timed on
about 2 batches per phase).

Writes ``bench/results/laser_cost_<name>.json`` (every figure, the settings, the machine, ``ratios_vs_baseline``
and the ``best`` variant: the fastest to train with mean item cosine >= ``--fidelity``) and the same as a markdown
table in ``laser_cost_<name>.md``. Needs the SmolLM2 backbone (``laser models fetch``) unless the config or
``--backbone`` names another (``tiny-random-llama`` for a smoke test).
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from laser_core.config import load_config  # noqa: E402
from laser_core.data import leave_one_out, load_dataset  # noqa: E402
from laser_core.llm import BackboneConfig  # noqa: E402
from laser_core.llm.backbones import _compute_dtype  # noqa: E402
from laser_core.model import LaserModel, LaserSpec, build_laser  # noqa: E402
from laser_core.sr import build_model  # noqa: E402
from laser_core.train import LaserTrainer  # noqa: E402

# name -> overrides of the config's backbone section. "baseline" is the configured CPU budget (NF4 weights,
# float32 compute, all 30 layers of SmolLM2-135M).
VARIANTS: dict[str, dict] = {
    "baseline": {"quantization": "nf4", "compute_dtype": "float32", "num_layers": None},
    "nf4-bf16": {"quantization": "nf4", "compute_dtype": "bfloat16", "num_layers": None},
    "none-fp32": {"quantization": "none", "compute_dtype": "float32", "num_layers": None},
    "none-bf16": {"quantization": "none", "compute_dtype": "bfloat16", "num_layers": None},
    "nf4-6layers": {"quantization": "nf4", "compute_dtype": "float32", "num_layers": 6},
    "none-bf16-6layers": {"quantization": "none", "compute_dtype": "bfloat16", "num_layers": 6},
    "nf4-bf16-6layers": {"quantization": "nf4", "compute_dtype": "bfloat16", "num_layers": 6},
    # the 6-layer fidelity reference (built on demand when a 6-layer variant runs without it)
    "none-fp32-6layers": {"quantization": "none", "compute_dtype": "float32", "num_layers": 6},
    "int8": {"quantization": "int8", "compute_dtype": "float32", "num_layers": None},
}
DEFAULT_VARIANTS = [
    "baseline",
    "nf4-bf16",
    "none-fp32",
    "none-bf16",
    "nf4-6layers",
    "none-bf16-6layers",
    "nf4-bf16-6layers",
]
BASELINE = "baseline"


def backbone_for(base: BackboneConfig, overrides: dict) -> BackboneConfig:
    return BackboneConfig.model_validate({**base.model_dump(), **overrides})


def error_text(exc: BaseException) -> str:
    last = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    where = f" (at {Path(last.filename).name}:{last.lineno} in {last.name})" if last else ""
    return f"{type(exc).__name__}: {exc}"[:600] + where


def _timed(batches, step, cap: float) -> tuple[int, float]:
    """Run ``step`` on the batches in order until they are done or ``cap`` seconds (0: no cap) have passed;
    (rows done, seconds)."""
    done, t0 = 0, time.perf_counter()
    for b in batches:
        step(b)
        done += len(b)
        if cap and time.perf_counter() - t0 >= cap:
            break
    return done, time.perf_counter() - t0


class Sample:
    """The seeded items and users every variant is measured on."""

    def __init__(self, ds, split, n_items: int, n_users: int, user_batch: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.items = np.sort(rng.choice(ds.n_items, size=min(n_items, ds.n_items), replace=False))
        users = [u for u in range(len(split.users)) if len(split.train[u]) >= 2]
        pick = rng.choice(len(users), size=min(n_users, len(users)), replace=False)
        self.histories = []
        for i in pick:  # a random cut per user, as the training's examples
            seq = split.train[users[i]]
            self.histories.append(seq[: int(rng.integers(1, len(seq)))])
        self.targets = rng.integers(0, len(self.items), size=len(self.histories))
        self.batch_seed = seed
        self.user_batch = user_batch  # the users whose rows are compared for fidelity: the first batch


def item_batches(model: LaserModel, sample: Sample, batch: int) -> list[np.ndarray]:
    """Positions into ``sample.items``: length-sorted batches (as ``embed_items`` batches a whole catalogue), in a
    seeded random order (a time-capped variant is timed on an unbiased share of them)."""
    lengths = [len(t) for t in model.tokenize([[int(i)] for i in sample.items])]
    order = np.argsort(lengths, kind="stable")
    batches = [order[lo : lo + batch] for lo in range(0, len(order), batch)]
    perm = np.random.default_rng(sample.batch_seed).permutation(len(batches))
    return [batches[i] for i in perm]


def embed(
    model: LaserModel, sample: Sample, batches: list[np.ndarray], cap: float, row: dict
) -> tuple[torch.Tensor, torch.Tensor]:
    """Item rows (NaN where a capped variant did not get to) and the first user batch's rows, at the initial
    weights; fills the items/s figures of ``row``."""
    model.eval()
    table = torch.full((len(sample.items), model.backbone.hidden_size), float("nan"))
    warm = batches[0][:8]
    model.embed_items(sample.items[warm], batch_size=len(warm))  # warm-up

    def step(pos):
        table[torch.from_numpy(pos)] = model.embed_items(sample.items[pos], batch_size=len(pos))

    done, seconds = _timed(batches, step, cap)
    row.update(items_per_second=done / seconds, items_timed=done, item_seconds=round(seconds, 2))
    return table, user_rows(model, sample)


@torch.no_grad()
def user_rows(model: LaserModel, sample: Sample) -> torch.Tensor:
    model.eval()
    return model.embed(sample.histories[: sample.user_batch]).user_embedding.float()


def train(model: LaserModel, sample: Sample, table: torch.Tensor, split, lt, cap: float, row: dict) -> None:
    """Training users/s: the trainer's epoch loop (:meth:`LaserTrainer.run_epoch`: the model's
    ``calculate_loss``, backward, the configured optimizer with its accumulation and schedule) over the sample's
    users against the embedded item rows, after a warm-up step; capped, it stops after the mini-batch that
    crosses ``cap`` seconds."""
    known = torch.nonzero(~table[:, 0].isnan()).flatten()
    rows = table[known]
    targets = torch.from_numpy(sample.targets) % len(known)
    trainer = LaserTrainer(model, split, lt.model_copy(update={"progress": False}))
    n, B = len(sample.histories), lt.batch_size
    spans = [range(lo, min(lo + B, n)) for lo in range(0, n, B)]
    done = 0

    def batch(span: range):
        return trainer.training_batch(sample.histories[span.start : span.stop], targets[span.start : span.stop], rows)

    def batches():
        nonlocal done
        t0 = time.perf_counter()
        for span in spans:
            yield batch(span), len(span)
            done += len(span)
            if cap and time.perf_counter() - t0 >= cap:
                return

    torch.manual_seed(0)
    model.train()
    trainer.training_step(batch(spans[0]))  # warm-up
    steps0 = trainer.global_step
    _, seconds = trainer.run_epoch(batches(), len(spans), n, "train", "user")
    row.update(
        train_users_per_second=done / seconds,
        users_timed=done,
        train_seconds=round(seconds, 2),
        optimizer_steps=trainer.global_step - steps0,
    )


def cosines(a: torch.Tensor, b: torch.Tensor) -> dict:
    ok = ~(a.isnan().any(1) | b.isnan().any(1))
    if not bool(ok.any()):
        return {"mean": None, "min": None, "n": 0}
    c = torch.nn.functional.cosine_similarity(a[ok].double(), b[ok].double(), dim=1)
    return {"mean": float(c.mean()), "min": float(c.min()), "n": int(ok.sum())}


class Runner:
    def __init__(self, cfg, ds, split, sample: Sample, args) -> None:
        self.cfg, self.ds, self.split, self.sample, self.args = cfg, ds, split, sample, args
        torch.manual_seed(cfg.laser_train.seed)
        self.sr = build_model(cfg.sr, ds.n_items).eval()  # costs and fidelity do not need trained SR weights
        self.state: dict[str, torch.Tensor] | None = None  # the first variant's trainable weights
        self.first: str | None = None
        self.tables: dict[str, tuple[int, torch.Tensor, torch.Tensor]] = {}  # name -> (layers, items, users)

    def build(self, name: str, backbone: BackboneConfig, row: dict) -> LaserModel:
        spec = LaserSpec(bitune=self.cfg.bitune, text=self.cfg.text, backbone=backbone, seed=self.cfg.laser_train.seed)
        t0 = time.perf_counter()
        model = build_laser(spec, self.ds.items, self.sr)
        row["load_seconds"] = round(time.perf_counter() - t0, 1)
        state = model.state_dict()
        if self.state is None:
            self.state = {k: v.detach().clone() for k, v in state.items()}
            self.first = name
            row["trainable_weights"] = "seeded build (the reference for the other variants)"
        else:
            same_mf = all(torch.equal(state[k], self.state[k]) for k in state if k.startswith("mformer."))
            same = same_mf and all(torch.equal(state[k], self.state[k]) for k in state)
            model.load_state_dict(self.state)
            row["trainable_weights"] = (
                ("equal to " if same else "copied from ")
                + self.first
                + ("" if same else f" (at build: M-Former {'equal' if same_mf else 'DIFFERENT'}, suffix differs)")
            )
        return model

    def measure(self, name: str, overrides: dict, timed: bool = True) -> dict:
        backbone = backbone_for(self.cfg.backbone, overrides)
        row: dict = {
            "variant": name,
            "overrides": overrides,
            "quantization": backbone.quantization,
            "compute_dtype": str(_compute_dtype(backbone)).replace("torch.", ""),
            "num_layers": backbone.num_layers,
        }
        cap = self.args.time_cap if timed else 0.0
        model = None
        try:
            model = self.build(name, backbone, row)
            layers = int(model.llm.config.num_hidden_layers)
            row.update(
                num_layers=layers,
                backbone_memory_mb=model.backbone.memory_bytes() / 2**20,
                trainable_total=model.n_trainable()["total"],
            )
            batches = item_batches(model, self.sample, self.args.item_batch)
            row["mean_item_tokens"] = float(
                np.mean([len(t) for t in model.tokenize([[int(i)] for i in self.sample.items])])
            )
            row["mean_user_tokens"] = float(np.mean([len(t) for t in model.tokenize(self.sample.histories)]))
            table, users = embed(model, self.sample, batches, cap, row)
            self.tables[name] = (layers, table, users)
            if timed:
                train(model, self.sample, table, self.split, self.cfg.laser_train, cap, row)
        except Exception as exc:  # noqa: BLE001 (a variant this machine cannot run is a result, not a crash)
            row["error"] = error_text(exc)
        finally:
            del model
            gc.collect()
        print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
        return row

    def fidelity(self, rows: list[dict]) -> dict[int, dict]:
        """Cosine of each variant's rows to the float32 unquantized model's with the same layer count."""
        refs: dict[int, dict] = {}
        for layers in sorted({self.tables[r["variant"]][0] for r in rows if r["variant"] in self.tables}):
            ref = next(
                (
                    r["variant"]
                    for r in rows
                    if r["variant"] in self.tables
                    and self.tables[r["variant"]][0] == layers
                    and r["quantization"] == "none"
                    and r["compute_dtype"] == "float32"
                ),
                None,
            )
            info: dict = {"layers": layers, "variant": ref, "measured": ref is not None}
            if ref is None:
                ref = f"none-fp32-{layers}layers-reference"
                ref_row = self.measure(
                    ref, {"quantization": "none", "compute_dtype": "float32", "num_layers": layers}, timed=False
                )
                info.update(
                    variant=ref,
                    load_seconds=ref_row.get("load_seconds"),
                    trainable_weights=ref_row.get("trainable_weights"),
                )
                if "error" in ref_row:
                    info["error"] = ref_row["error"]
            refs[layers] = info
            if ref not in self.tables:
                continue
            _, ref_items, ref_users = self.tables[ref]
            for r in rows:
                if r["variant"] in self.tables and self.tables[r["variant"]][0] == layers:
                    _, items, users = self.tables[r["variant"]]
                    it, us = cosines(items, ref_items), cosines(users, ref_users)
                    r["fidelity"] = {
                        "reference": ref,
                        "item_cosine_mean": it["mean"],
                        "item_cosine_min": it["min"],
                        "items_compared": it["n"],
                        "user_cosine_mean": us["mean"],
                        "user_cosine_min": us["min"],
                        "users_compared": us["n"],
                    }
        return refs


def summarize(rows: list[dict], threshold: float) -> tuple[str | None, dict, dict]:
    ok = [r for r in rows if "error" not in r and "train_users_per_second" in r]
    base = next((r for r in ok if r["variant"] == BASELINE), ok[0] if ok else None)
    ratios = {}
    if base is not None:
        for r in ok:
            ratios[r["variant"]] = {
                "train_users_per_second": r["train_users_per_second"] / base["train_users_per_second"],
                "items_per_second": r["items_per_second"] / base["items_per_second"],
                "memory": r["backbone_memory_mb"] / base["backbone_memory_mb"],
            }

    def fid(r):
        return (r.get("fidelity") or {}).get("item_cosine_mean")

    def pick(cands, rule):
        cands = [r for r in cands if fid(r) is not None and fid(r) >= threshold]
        if not cands:
            return {"variant": None, "rule": rule}
        b = max(cands, key=lambda r: r["train_users_per_second"])
        return {
            "variant": b["variant"],
            "rule": rule,
            "train_users_per_second": b["train_users_per_second"],
            "train_speedup_vs_baseline": ratios[b["variant"]]["train_users_per_second"],
            "items_speedup_vs_baseline": ratios[b["variant"]]["items_per_second"],
            "item_cosine_mean": fid(b),
            "item_cosine_min": b["fidelity"]["item_cosine_min"],
            "num_layers": b["num_layers"],
        }

    full = max((r["num_layers"] for r in ok), default=None)
    best = pick(
        ok,
        f"the fastest training variant whose mean item cosine to the float32 model of the same layer "
        f"count is >= {threshold}",
    )
    best["full_depth"] = pick(
        [r for r in ok if r["num_layers"] == full],
        f"the same among the variants with all {full} layers (a variant with fewer layers is "
        f"a different model: its cosine is to the float32 model of its own depth)",
    )
    return (base["variant"] if base else None), ratios, best


def markdown(out: dict) -> str:
    b = out["budget"]
    m = out["machine"]
    lines = [
        f"# Laser CPU cost per backbone variant: {out['dataset']} ({out['backbone']})",
        "",
        f"{m['cpu_threads']} threads, {m['platform']}, torch {m['torch']}; history_len {b['history_len']}, "
        f"title {b['title_max_tokens']} / category {b['category_max_tokens']} tokens, M-Former "
        f"K={b['mformer']['n_experts']} L={b['mformer']['n_query']} width {b['mformer']['width']} "
        f"{b['mformer']['n_layers']} layers {b['mformer']['n_heads']} heads; train batch {b['batch_size']}, "
        f"item batch {b['item_batch_size']}; {b['items']} items, {b['users']} users, time cap "
        f"{b['time_cap_seconds']} s per phase. Ratios are to `{out['baseline_variant']}`; fidelity is the "
        f"cosine of item rows to the float32 unquantized model with the same layer count.",
        "",
        "| variant | quant | compute | layers | memory MB | items/s | train users/s | x items/s | x train | "
        "x memory | item cos mean | item cos min | user cos mean | note |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]

    def f(x, p=2):
        return "" if x is None else f"{x:.{p}f}"

    for name, r in out["results"].items():
        ra = out["ratios_vs_baseline"].get(name, {})
        fd = r.get("fidelity") or {}
        note = r.get("error", "")
        if not note and (r.get("items_timed", 0) < b["items"] or r.get("users_timed", 0) < b["users"]):
            note = f"capped: {r.get('items_timed')} items, {r.get('users_timed')} users timed"
        note = note.replace("|", "/").replace("\n", " ")
        lines.append(
            f"| {name} | {r['quantization']} | {r['compute_dtype']} | {r.get('num_layers') or ''} | "
            f"{f(r.get('backbone_memory_mb'), 1)} | {f(r.get('items_per_second'))} | "
            f"{f(r.get('train_users_per_second'))} | {f(ra.get('items_per_second'))} | "
            f"{f(ra.get('train_users_per_second'))} | {f(ra.get('memory'))} | "
            f"{f(fd.get('item_cosine_mean'), 4)} | {f(fd.get('item_cosine_min'), 4)} | "
            f"{f(fd.get('user_cosine_mean'), 4)} | {note} |"
        )
    best = out["best"]
    lines += [
        "",
        f"Best ({best['rule']}): **{best['variant']}**"
        + (
            f", {best['train_speedup_vs_baseline']:.2f}x the baseline's training users/s, mean item cosine "
            f"{best['item_cosine_mean']:.4f}"
            if best["variant"]
            else ""
        )
        + ".",
        f"Best at full depth: **{best['full_depth']['variant']}**"
        + (
            f", {best['full_depth']['train_speedup_vs_baseline']:.2f}x, mean item cosine "
            f"{best['full_depth']['item_cosine_mean']:.4f}"
            if best["full_depth"]["variant"]
            else ""
        )
        + ".",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--config",
        default=str(ROOT / "configs" / "scientific_cpu.yaml"),
        help="the run config whose data, texts, M-Former, SR encoder and batch sizes are measured",
    )
    ap.add_argument("--data-dir", default=None, help="overrides the config's dataset.path")
    ap.add_argument("--name", default=None, help="results name (default: the dataset's)")
    ap.add_argument("--backbone", default=None, help="overrides backbone.name (e.g. tiny-random-llama)")
    ap.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"some of {', '.join(VARIANTS)}")
    ap.add_argument("--items", type=int, default=192, help="sampled items to embed per variant")
    ap.add_argument("--users", type=int, default=96, help="sampled users to train on per variant")
    ap.add_argument("--history", type=int, default=None, help="overrides text.history_len")
    ap.add_argument("--batch", type=int, default=None, help="training batch (default: laser_train.batch_size)")
    ap.add_argument("--item-batch", type=int, default=None, help="default: laser_train.item_batch_size")
    ap.add_argument(
        "--time-cap", type=float, default=30.0, help="seconds per timed phase (items, training) of a variant, 0: none"
    )
    ap.add_argument("--fidelity", type=float, default=0.99, help="mean item cosine a 'best' variant needs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args(argv)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown or not names:
        ap.error(f"--variants: unknown {unknown}; known: {', '.join(VARIANTS)}")
    torch.set_num_threads(args.threads)

    cfg = load_config(args.config, data_dir=args.data_dir)
    if args.backbone:
        cfg.backbone = cfg.backbone.model_copy(update={"name": args.backbone})
    if args.history is not None:
        cfg.text = cfg.text.model_copy(update={"history_len": args.history})
    lt = cfg.laser_train
    if args.batch is not None:
        cfg.laser_train = lt = lt.model_copy(update={"batch_size": args.batch})
    args.item_batch = args.item_batch or lt.item_batch_size
    ds = load_dataset(cfg.dataset)
    split = leave_one_out(ds)
    sample = Sample(ds, split, args.items, args.users, lt.batch_size, args.seed)

    t_start = time.perf_counter()
    runner = Runner(cfg, ds, split, sample, args)
    rows = [runner.measure(n, VARIANTS[n]) for n in names]
    refs = runner.fidelity(rows)
    baseline, ratios, best = summarize(rows, args.fidelity)
    name = args.name or ds.name
    mf = cfg.bitune.mformer
    out = {
        "dataset": name,
        "backbone": cfg.backbone.name,
        "config": str(args.config),
        "budget": {
            "history_len": cfg.text.history_len,
            "title_max_tokens": cfg.text.title_max_tokens,
            "category_max_tokens": cfg.text.category_max_tokens,
            "mformer": mf.model_dump(mode="json"),
            "prefix": cfg.bitune.prefix,
            "pooling": cfg.bitune.pooling,
            "sr": {"model": cfg.sr.model, "hidden_size": cfg.sr.hidden_size, "max_len": cfg.sr.max_len},
            "batch_size": lt.batch_size,
            "item_batch_size": args.item_batch,
            "lr": lt.lr,
            "optimizer": lt.optimizer,
            "schedule": lt.schedule,
            "grad_accumulation": lt.grad_accumulation,
            "tau": lt.tau,
            "lb_weight": lt.lb_weight,
            "items": len(sample.items),
            "users": len(sample.histories),
            "time_cap_seconds": args.time_cap,
            "seed": args.seed,
            "fidelity_threshold": args.fidelity,
        },
        "machine": {
            "cpu_threads": args.threads,
            "platform": platform.platform(),
            "processor": platform.processor(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        },
        "variants": {n: VARIANTS[n] for n in names},
        "fidelity_references": {str(k): v for k, v in refs.items()},
        "results": {r["variant"]: r for r in rows},
        "baseline_variant": baseline,
        "ratios_vs_baseline": ratios,
        "best": best,
        "total_seconds": round(time.perf_counter() - t_start, 1),
    }
    dest = Path(args.out)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / f"laser_cost_{name}.json").write_text(json.dumps(out, indent=2) + "\n", encoding="utf8")
    md = markdown(out)
    (dest / f"laser_cost_{name}.md").write_text(md, encoding="utf8")
    print(md, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
