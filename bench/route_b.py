"""Route b (LLM -> ID): the ID model with the frozen LLM's item table in its item embeddings, beside IDs alone.

    python bench/route_b.py --data-dir ../shared/data/amazon2018-scientific-recformer --name scientific \\
        --config configs/scientific_cpu.yaml --workdir runs/route-b-sci [--variants none,init,join,init@0.3]

Trains the config's ID model (``sr`` and ``sr_train`` of the config; ``--model`` sasrec by default) once per
variant of ``sr.text_items`` (:mod:`laser_core.sr.text_items`): ``none`` (IDs alone), ``init`` (the table,
PCA-whitened and reduced to ``sr.hidden_size``, is the item embeddings' initial value) and ``join`` (item
embedding = ID embedding + a trained linear map of the fixed reduced row); ``init@S`` / ``join@S`` set
``sr.text_scale`` to ``S`` for that variant. The table is the config's frozen backbone alone through Laser's item
path (:func:`laser_core.frozen_table.frozen_item_table`), cached under ``--workdir/frozen_tables`` by its content
key. Each variant trains (or resumes, or reloads when finished) under ``--workdir/route-b-<model>-<variant>``,
early-stopped on validation NDCG@10 (all validation users, ``sr_train.mask_history`` as configured).

The variant with the best validation NDCG@10 is the chosen one; every variant's test figures (``ndcg@10``,
``recall@10``, ``mrr`` without history masking, ``ndcg@10_masked`` with it) are on the same test pairs (all test
users, or ``--test-users``' seeded sample, as ``bench/controls.py``). Writes ``bench/results/route_b_<name>.json``
after each variant.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from laser_benchmark import add_common_args, resumable_results, load_inputs  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from laser_core import hybrid  # noqa: E402
from laser_core.config import data_fingerprint  # noqa: E402
from laser_core.fingerprint import fingerprint  # noqa: E402
from laser_core.evaluation import evaluate  # noqa: E402
from laser_core.frozen_table import frozen_item_table  # noqa: E402
from laser_core.reporting import markdown_table  # noqa: E402
from laser_core.sr import fit  # noqa: E402
from laser_core.train import test_examples  # noqa: E402

MODES = ("none", "init", "join")
FIGURES = ("ndcg@10", "recall@10", "mrr", "ndcg@10_masked")


def parse_variant(text: str) -> dict:
    """``none``, ``init``, ``join``, or ``init@S`` / ``join@S`` (``sr.text_scale`` S > 0) as SRConfig updates."""
    mode, _, scale = text.partition("@")
    if mode not in MODES or (scale and mode == "none"):
        raise ValueError(f"{text!r}: a variant is none, init, join, init@SCALE or join@SCALE")
    update: dict = {"text_items": mode}
    if scale:
        try:
            update["text_scale"] = float(scale)
        except ValueError:
            raise ValueError(f"{text!r}: the scale after @ must be a number") from None
        if not update["text_scale"] > 0:
            raise ValueError(f"{text!r}: the scale after @ must be > 0")
    return update


TABLES = ("llm", "random_llm", "tfidf")
TFIDF_SVD_DIM = 576  # the width of SmolLM2's rows, so both tables enter the same PCA reduction


def item_table(kind: str, cfg, ds, wd: Path, args) -> tuple[torch.Tensor, str]:
    """The ``[n_items, D]`` table the text variants read and its content key: the config's frozen LLM
    (:func:`laser_core.frozen_table.frozen_item_table`, the route), or a control: the same item path through a
    random backbone of the same shape (``bench/controls.py``), or TF-IDF over the same item texts reduced by a
    seeded truncated SVD (``laser_core.hybrid``)."""
    from controls import _needs_tokenizer, _tokenizer, random_backbone_spec

    batch = args.item_batch_size or cfg.laser_train.item_batch_size
    if kind == "tfidf":
        texts = hybrid.item_texts(ds.items, cfg.text, _tokenizer(cfg, ds) if _needs_tokenizer(cfg) else None)
        tfidf = hybrid.TFIDF_PRESETS["char"].model_copy(update={"dim": TFIDF_SVD_DIM})
        rows = torch.from_numpy(np.asarray(hybrid.tfidf_vectors(texts, tfidf, args.seed)[0], dtype=np.float32))
        return rows, fingerprint("route-b-tfidf", {"rows": rows})
    spec = cfg.laser_spec()
    if kind == "random_llm":
        spec = random_backbone_spec(spec, ds.items, wd, args.seed)
    frozen = frozen_item_table(spec, ds.items, cache_dir=wd, batch_size=batch, device=cfg.laser_train.device)
    return frozen.table, frozen.weights_fingerprint


def figures_on_test(model, hist, targets, batch_size: int) -> dict:
    plain = evaluate(model, hist, targets, batch_size)
    masked = evaluate(model, hist, targets, batch_size, mask_history=True)
    return {**{k: plain[k] for k in FIGURES[:3]}, "ndcg@10_masked": masked["ndcg@10"], "test_users": len(targets)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(ap)
    ap.add_argument("--workdir", required=True, help="the variants' checkpoints and the cached frozen LLM table")
    ap.add_argument("--model", choices=("sasrec", "bert4rec"), default="sasrec", help="the ID model (sr.model)")
    ap.add_argument("--variants", default=",".join(MODES), help="comma-separated: none, init, join, init@S, join@S")
    ap.add_argument("--test-users", type=int, default=None, help="a seeded sample of test users (all)")
    ap.add_argument("--item-batch-size", type=int, default=None, help="items per LLM forward (laser_train's)")
    ap.add_argument(
        "--table",
        choices=TABLES,
        default="llm",
        help="whose item table the text variants read: the frozen LLM (the route); its controls: a random "
        "backbone of the same shape (bench/controls.py's), or TF-IDF (char 3-5-grams) reduced by truncated SVD",
    )
    ap.add_argument("--seed", type=int, default=1, help="the random backbone's / the SVD's seed")
    args = ap.parse_args(argv)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    try:
        variants = {v: parse_variant(v) for v in names}
    except ValueError as exc:
        ap.error(f"--variants: {exc}")
    if not variants:
        ap.error("--variants: none given")
    if args.test_users is not None and args.test_users < 1:
        ap.error("--test-users must be at least 1")
    cfg, ds, split = load_inputs(args)
    wd = Path(args.workdir)
    name = args.name or ds.name
    dest = Path(args.out) / (f"route_b_{name}.json" if args.table == "llm" else f"route_b_{name}_{args.table}.json")
    command = "python bench/route_b.py " + " ".join(sys.argv[1:] if argv is None else argv)
    base = cfg.sr.model_copy(update={"model": args.model})
    t_hist, t_targets = test_examples(split, cfg.laser_train.model_copy(update={"test_users": args.test_users}))

    table = table_key = None
    if any(v["text_items"] != "none" for v in variants.values()):
        t0 = time.perf_counter()
        table, table_key = item_table(args.table, cfg, ds, wd, args)
        print(f"{args.table} item table {tuple(table.shape)} in {time.perf_counter() - t0:.0f} s", flush=True)
    settings = {
        "data": data_fingerprint(cfg.dataset),
        "sr": base.model_dump(mode="json", exclude={"text_items", "text_scale"}),
        "sr_train": cfg.sr_train.model_dump(mode="json", exclude={"progress", "threads"}),
        "backbone": cfg.backbone.model_dump(mode="json", exclude={"cache_dir"}),
        "text": cfg.text.model_dump(mode="json"),
        "pooling": cfg.bitune.pooling,
        "test_users": len(t_targets),
        "sample_seed": cfg.laser_train.seed,
    }
    out, results = resumable_results(dest, settings, "variants", args)
    out["dataset"] = name

    def save() -> None:
        valid = {v: r["valid"]["ndcg@10"] for v, r in results.items()}
        out["chosen_on_validation"] = max(valid, key=lambda v: (valid[v], v == "none")) if valid else None
        text = {v: n for v, n in valid.items() if results[v]["text_items"] != "none"}
        if text and len(t_targets) == len(split.test_examples()[1]):  # all test users: bench/leaderboard.py's row
            best = max(text, key=text.get)  # the route's own figure: its best text variant on validation
            keep = ("ndcg@10", "recall@10", "mrr", "ndcg@10_masked", "test_users", "command")
            row = {k: results[best][k] for k in keep} | {"variant": best}
            label = "laser_b" if args.table == "llm" else f"{args.table}_init_control"
            out["leaderboard"] = {"dataset": name, "rows": {label: row}}
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(json.dumps(out, indent=2) + "\n", encoding="utf8")
        print(f"wrote {dest}", flush=True)

    for variant, update in variants.items():
        sr_cfg = base.model_copy(update=update)
        key = table_key if sr_cfg.text_items != "none" else None
        if variant in results and results[variant].get("table_key") == key:
            continue  # measured with this table (another frozen table: measured again)
        t0 = time.perf_counter()
        result = fit(
            sr_cfg,
            cfg.sr_train,
            split,
            workdir=wd / (f"route-b-{args.model}-{variant}" + ("" if args.table == "llm" else f"-{args.table}")),
            text_table=table if sr_cfg.text_items != "none" else None,
        )
        results[variant] = {
            **figures_on_test(result.model, t_hist, t_targets, cfg.sr_train.eval_batch_size),
            "valid": {k: result.best_valid[k] for k in ("ndcg@10", "recall@10", "mrr") if k in result.best_valid},
            "best_epoch": result.best_epoch,
            "epochs_run": result.epochs_run,
            "text_items": sr_cfg.text_items,
            "text_transform": sr_cfg.text_transform,
            "text_scale": sr_cfg.text_scale,
            "table_key": key,
            "table": args.table if sr_cfg.text_items != "none" else None,
            "seconds": round(time.perf_counter() - t0, 1),
            "command": command,
        }
        print(
            f"{variant}: valid ndcg@10 {results[variant]['valid']['ndcg@10']:.4f}, "
            f"test ndcg@10 {results[variant]['ndcg@10']:.4f}",
            flush=True,
        )
        save()
    save()
    print(
        markdown_table(
            ["variant", "valid ndcg@10", *FIGURES],
            [[v, r["valid"]["ndcg@10"], *(r[k] for k in FIGURES)] for v, r in results.items()],
        )
    )
    print(f"chosen on validation: {out['chosen_on_validation']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
