"""What the frozen LLM gives before any Bi-Tuning: a per-layer curve and the zero-training hybrid with SASRec.

    python bench/frozen_llm.py --data-dir ../shared/data/amazon2018-scientific-recformer \\
        --config configs/scientific_cpu.yaml --workdir runs/laser-sci --layers 6,10,15,20,30 --hybrid

1. **Per-layer curve** (``--layers``): for each N, the backbone cut to its first N decoder layers (+ the final
   norm; ``backbone.num_layers``) embeds every item through Laser's own item path (the unified item text, the
   suffix token at its initial value, the EOS embedding; no prefix: this is the frozen LLM alone). Each item
   table is then scored on **all validation users** by the cosine of every item to the user's last training
   item, raw, mean-centred and ZCA-whitened (the whitening fitted on the item table once, as WhitenRec/DWSRec).
   All N come from one pass of the full model (a hook on layer N reads what the cut model computes; checked on
   64 items against the cut model, whose items/s is the cost side of the curve). Tables are cached under
   ``--workdir/frozen_llm`` keyed on the model's content fingerprint.
2. **Zero-training hybrid** (``--hybrid``): SASRec's scores (``bench/sr_baselines.py`` settings, trained or
   reloaded under ``--workdir/sr-sasrec``) plus ``gamma`` x the frozen-LLM similarity of every item to the
   user's history, each z-scored per user, so ``gamma`` is a unit-free weight:

       score(u, i) = z(sasrec(u, .))_i + gamma * z(sim(u, .))_i

   ``sim`` is the cosine to the last item, or a recency-weighted mean of the cosines to the last five items
   (weights 1, 1/2, 1/4, ...). The layer, the transform (raw / centred / whitened), the history form and
   ``gamma`` are chosen on validation NDCG@10 (all validation users; :func:`laser_core.hybrid.choose_on_validation`,
   the one implementation of this hybrid); the test figures use that one choice,
   beside SASRec and BERT4Rec alone, on the same test pairs (all test users). Any trained Laser has to beat this
   reference: it uses the frozen LLM and the ID model and trains nothing.

Writes ``bench/results/frozen_llm_<name>.json`` (each piece saved as it is measured).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from laser_benchmark import add_common_args, baseline_model, load_inputs  # noqa: E402

from laser_core.hybrid import (  # noqa: E402
    FORMS,
    GAMMAS,
    KEEP,
    TRANSFORMS,
    choose_on_validation,
    history_similarity,
    hybrid_metrics,
    transform_table,
)
from laser_core.metrics import compute_metrics  # noqa: E402
from laser_core.ranking import as_numpy  # noqa: E402
from laser_core.model import build_laser  # noqa: E402
from laser_core.train import test_examples  # noqa: E402
from laser_core.sr.checkpoint import save_tensors  # noqa: E402


def frozen_spec(cfg, n_layers: int | None = None):
    """The config's Laser spec as the frozen LLM alone: no prefix, suffix pooling, the first ``n_layers``."""
    spec = cfg.laser_spec()
    return spec.model_copy(
        update={
            "bitune": spec.bitune.model_copy(update={"prefix": "none"}),
            "backbone": spec.backbone.model_copy(update={"num_layers": n_layers}),
        }
    )


def _decoder(base) -> tuple[list, object]:
    """The decoder layers and the final norm of a Llama-family (``layers``, ``norm``) or GPT-2 (``h``, ``ln_f``)
    base model."""
    layers = getattr(base, "layers", None) or getattr(base, "h")
    norm = getattr(base, "norm", None) or getattr(base, "ln_f")
    return list(layers), norm


def layer_tables(cfg, ds, layers: list[int], wd: Path, batch_size: int) -> dict[int, torch.Tensor]:
    """The item table after each of ``layers`` decoder layers (+ the final norm), all from ONE pass of the full
    model: a hook on layer N keeps the suffix position's hidden state, which is exactly what the model cut to N
    layers (``backbone.num_layers: N``) returns (checked by :func:`check_cut`; unit-tested in test_laser.py).
    Cached by the model's content fingerprint."""
    model = build_laser(frozen_spec(cfg), ds.items, None)
    path = wd / "frozen_llm" / f"tables-{model.weights_fingerprint()[:24]}.safetensors"
    cached = load_file(str(path)) if path.is_file() else {}
    if all(f"layers{n}" in cached for n in layers):
        return {n: cached[f"layers{n}"] for n in layers}
    model.eval()
    blocks, norm = _decoder(model.backbone.base)
    captured: dict[int, torch.Tensor] = {}

    def keep(n: int):
        def hook(_module, _inputs, output):
            captured[n] = (output[0] if isinstance(output, tuple) else output)[:, -1].detach()

        return hook

    handles = [blocks[n - 1].register_forward_hook(keep(n)) for n in layers if n < len(blocks)]
    n_items = len(ds.items)
    tables = {n: torch.empty(n_items, model.backbone.hidden_size) for n in layers}
    order = np.argsort([len(t) for t in model.tokenize([[i] for i in range(n_items)])], kind="stable")
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            for lo in range(0, n_items, batch_size):
                idx = order[lo : lo + batch_size]  # sorted by length: embed_items keeps this order inside the batch
                final = model.embed_items(idx.tolist(), batch_size)
                rows = torch.from_numpy(idx)
                for n in layers:
                    tables[n][rows] = final if n == len(blocks) else norm(captured[n]).float()
    finally:
        for h in handles:
            h.remove()
    print(f"one pass over {n_items} items: {time.perf_counter() - t0:.0f} s", flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_tensors({f"layers{n}": t.contiguous() for n, t in tables.items()}, path)
    return tables


def cut_cost(cfg, ds, n_layers: int, table: torch.Tensor, batch_size: int, n: int = 64) -> dict:
    """Items/s of the model cut to ``n_layers`` (``backbone.num_layers``) on ``n`` items, and the largest
    difference of its rows from the one-pass table (the hook reads what the cut model computes)."""
    model = build_laser(frozen_spec(cfg, n_layers), ds.items, None)
    model.eval()
    items = list(range(n))
    model.embed_items(items[:batch_size], batch_size)  # warm-up
    t0 = time.perf_counter()
    rows = model.embed_items(items, batch_size)
    seconds = time.perf_counter() - t0
    return {
        "items_per_second": n / seconds,
        "items_timed": n,
        "backbone_memory_mb": round(model.backbone.memory_bytes() / 2**20, 1),
        "max_abs_diff_to_one_pass_table": float((rows - table[:n]).abs().max()),
    }


def metrics(scores, targets: np.ndarray) -> dict[str, float]:
    r = compute_metrics(scores, targets)
    return {k: r[k] for k in KEEP}


def sr_scores(model, histories, batch_size: int = 512) -> torch.Tensor:
    return torch.cat([model.score(histories[lo : lo + batch_size]) for lo in range(0, len(histories), batch_size)])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(ap)
    ap.add_argument("--workdir", required=True, help="checkpoints of the SR models and the cached item tables")
    ap.add_argument("--layers", default="6,10,15,20,30", help="comma-separated decoder-layer counts")
    ap.add_argument("--item-batch-size", type=int, default=32)
    ap.add_argument("--hybrid", action="store_true", help="the zero-training SASRec + frozen-LLM hybrid")
    ap.add_argument("--with-bert4rec", action="store_true", help="also train/reload BERT4Rec for its test row")
    args = ap.parse_args(argv)
    cfg, ds, split = load_inputs(args)
    wd = Path(args.workdir)
    name = args.name or ds.name
    dest = Path(args.out) / f"frozen_llm_{name}.json"
    out: dict = json.loads(dest.read_text(encoding="utf8")) if dest.is_file() else {}
    out.update(
        dataset=name,
        config=args.config,
        backbone=cfg.backbone.name,
        quantization=cfg.backbone.quantization,
        threads=args.threads,
    )
    out.setdefault("commands", []).append(
        "python bench/frozen_llm.py " + " ".join(sys.argv[1:] if argv is None else argv)
    )

    def save() -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(json.dumps(out, indent=2) + "\n", encoding="utf8")
        print(f"wrote {dest}", flush=True)

    _, v_hist, v_targets = split.valid_examples()
    t_hist, t_targets = test_examples(split, cfg.laser_train)  # Laser's test pairs (all, or its sample)
    layers = sorted({int(x) for x in args.layers.split(",") if x})
    tables = layer_tables(cfg, ds, layers, wd, args.item_batch_size)
    curve = out.setdefault("layer_curve", {})
    for n in layers:
        row = {"valid_users": len(v_targets)}
        for kind in TRANSFORMS:
            row[f"{kind}_last_item"] = metrics(
                history_similarity(transform_table(tables[n], kind), v_hist, "last"), v_targets
            )
        row["cost"] = cut_cost(cfg, ds, n, tables[n], args.item_batch_size)
        curve[str(n)] = row
        print(
            f"layers {n}: "
            + ", ".join(f"{k} {row[f'{k}_last_item']['ndcg@10']:.4f}" for k in TRANSFORMS)
            + f" ({row['cost']['items_per_second']:.1f} items/s)",
            flush=True,
        )
        save()

    if args.hybrid:
        t0 = time.perf_counter()
        sasrec = baseline_model("sasrec", split, wd)
        bert4rec = baseline_model("bert4rec", split, wd) if args.with_bert4rec else None
        sr_seconds = time.perf_counter() - t0
        sr_valid = as_numpy(sr_scores(sasrec, v_hist))
        units = {(n, kind): transform_table(table, kind) for n, table in tables.items() for kind in TRANSFORMS}
        choice = choose_on_validation(
            sr_valid, {f"{n}/{kind}": u for (n, kind), u in units.items()}, v_hist, v_targets, GAMMAS, FORMS
        )
        grid = [
            {
                "layers": int(r["table"].split("/")[0]),
                "transform": r["table"].split("/")[1],
                "history": r["form"],
                "gamma": r["gamma"],
                **{k: r[k] for k in KEEP},
            }
            for r in choice.grid
        ]
        n_best, kind_best = choice.table.split("/")
        best = {"layers": int(n_best), "transform": kind_best, "history": choice.form, "gamma": choice.gamma}
        best.update(choice.valid)
        print(f"hybrid grid: best {best}", flush=True)
        unit = units[(int(n_best), kind_best)]
        sr_test = as_numpy(sr_scores(sasrec, t_hist))
        test = {
            "hybrid": hybrid_metrics(sr_test, unit, t_hist, t_targets, best["history"], best["gamma"]),
            "sasrec": metrics(sr_test, t_targets),
            **({"bert4rec": metrics(sr_scores(bert4rec, t_hist), t_targets)} if bert4rec is not None else {}),
            "frozen_llm_alone": hybrid_metrics(sr_test, unit, t_hist, t_targets, best["history"], float("inf")),
        }
        out["hybrid"] = {
            "chosen_on_validation": best,
            "valid_users": len(v_targets),
            "test_users": len(t_targets),
            "test": test,
            "sr_train_or_load_seconds": round(sr_seconds, 1),
            "valid_sasrec_alone": next(r for r in grid if r["gamma"] == 0.0),
            "grid": grid,
        }
        print(json.dumps(test, indent=1), flush=True)
        save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
