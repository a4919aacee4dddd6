"""Controls beside every LLM figure: the ID model, TF-IDF and a random backbone, each through the same hybrid.

    python bench/controls.py --data-dir ../shared/data/amazon2018-scientific-recformer \\
        --config configs/scientific_cpu.yaml --workdir runs/laser-sci [--valid-users N] [--test-users N]

Every row is scored on the same validation and test pairs, with SASRec (``bench/sr_baselines.py`` settings,
trained or reloaded under ``--workdir/sr-sasrec``, as ``bench/frozen_llm.py``) as the ID side of the z-scored
hybrid of :mod:`laser_core.hybrid`, ``z(sasrec) + gamma * z(sim)``:

- ``sasrec``: the ID model alone;
- ``tfidf_hybrid``: TF-IDF over Laser's item descriptions (word 1-2-grams or char_wb 3-5-grams);
- ``random_llm_hybrid``: the config's backbone shape (cut to ``backbone.num_layers``), its tokenizer, random
  weights (seeded), the items through Laser's frozen item path (:mod:`laser_core.frozen_table`);
- ``llm_hybrid``: the config's frozen backbone through the same path;
- ``tfidf_alone`` and ``llm_alone``: the text similarity alone (``gamma = inf``).

Every choice (TF-IDF analyzer, LLM-table transform, history form, ``gamma``) is made on validation NDCG@10
(:func:`laser_core.hybrid.choose_on_validation`); the test figures use that one choice: NDCG@10, Recall@10, MRR
(full ranking, history not masked) and NDCG@10 with each user's history masked. ``llm_contribution`` is the
``llm_hybrid`` NDCG@10 minus that of the best control row (``sasrec``, ``tfidf_hybrid``, ``tfidf_alone``,
``random_llm_hybrid``). The LLM item tables are cached under ``--workdir/frozen_tables``, keyed on the frozen
model's content fingerprint.

Writes ``bench/results/controls_<name>.json`` after each row; rows already there for the same data and settings
are kept, not recomputed (``--rows`` picks rows).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from frozen_llm import sr_scores  # noqa: E402
from laser_benchmark import add_common_args, resumable_results, baseline_model, load_inputs  # noqa: E402

from laser_core import hybrid  # noqa: E402
from laser_core.config import data_fingerprint  # noqa: E402
from laser_core.fingerprint import folder_fingerprint  # noqa: E402
from laser_core.configuration import LaserSpec  # noqa: E402
from laser_core.frozen_table import frozen_item_table  # noqa: E402
from laser_core.metrics import compute_metrics  # noqa: E402
from laser_core.ranking import as_numpy  # noqa: E402
from laser_core.reporting import markdown_table  # noqa: E402
from laser_core.sr.checkpoint import load_model  # noqa: E402
from laser_core.train import _sample, test_examples  # noqa: E402

ROWS = ("sasrec", "tfidf_hybrid", "tfidf_alone", "random_llm_hybrid", "llm_hybrid", "llm_alone")
CONTROLS = ("sasrec", "tfidf_hybrid", "tfidf_alone", "random_llm_hybrid")
SIDE = {
    "tfidf_hybrid": "tfidf",
    "tfidf_alone": "tfidf",
    "random_llm_hybrid": "random_llm",
    "llm_hybrid": "llm",
    "llm_alone": "llm",
}
FIGURES = ("ndcg@10", "recall@10", "mrr", "ndcg@10_masked", "test_users")


def random_backbone_spec(spec: LaserSpec, items, workdir: Path, seed: int) -> LaserSpec:
    """``spec`` with its backbone replaced by one of the same shape (the config cut to ``num_layers``) and the
    same tokenizer, with random weights (``torch.manual_seed(seed)``, the model's own initialisation), saved
    once under ``workdir/random_backbone/<key>`` (the key: the model config, the vocabulary and the seed)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from laser_core.llm.backbones import resolve_backbone, truncated_config
    from laser_core.model import tokenizer_texts

    from laser_core.configuration import TINY

    bb = spec.backbone
    if bb.name in TINY and seed == bb.tiny.seed:
        raise SystemExit(
            f"--seed {seed} is backbone.tiny.seed: the random control would be {bb.name} itself; pick another seed"
        )
    path = resolve_backbone(bb, tokenizer_texts(spec, items))
    remote = bb.trust_remote_code
    if bb.num_layers is not None:
        hf = truncated_config(path, bb)
    else:
        hf = AutoConfig.from_pretrained(path, trust_remote_code=remote)
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=remote)
    shape = {k: v for k, v in hf.to_dict().items() if k != "_name_or_path"}
    key = json.dumps({"config": shape, "vocab": sorted(tok.get_vocab().items()), "seed": seed}, default=str)
    folder = workdir / "random_backbone" / hashlib.sha256(key.encode()).hexdigest()[:16]
    if not (folder / "config.json").is_file():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(hf, trust_remote_code=remote)
        tmp = folder.with_name(folder.name + ".partial")
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        tmp.rename(folder)
    return spec.model_copy(update={"backbone": bb.model_copy(update={"name": str(folder), "num_layers": None})})


def text_tables(side: str, cfg, ds, wd: Path, args) -> dict:
    """The candidate unit item tables of one text side, by name ``<text>/<transform>``."""
    if side == "tfidf":
        texts = hybrid.item_texts(ds.items, cfg.text, _tokenizer(cfg, ds) if _needs_tokenizer(cfg) else None)
        return {f"{name}/raw": hybrid.tfidf_vectors(texts, c, args.seed)[0] for name, c in hybrid.TFIDF_PRESETS.items()}
    spec = cfg.laser_spec()
    if side == "random_llm":
        spec = random_backbone_spec(spec, ds.items, wd, args.seed)
    t0 = time.perf_counter()
    table = frozen_item_table(spec, ds.items, cache_dir=wd, batch_size=args.item_batch_size).table
    print(f"{side} item table [{table.shape[0]}, {table.shape[1]}] in {time.perf_counter() - t0:.0f} s", flush=True)
    return {f"{side}/{kind}": hybrid.transform_table(table, kind) for kind in hybrid.TRANSFORMS}


def _needs_tokenizer(cfg) -> bool:
    return cfg.text.title_max_tokens is not None or cfg.text.category_max_tokens is not None


def _tokenizer(cfg, ds):
    """The backbone's tokenizer (for the text settings' token limits)."""
    from transformers import AutoTokenizer

    from laser_core.llm.backbones import resolve_backbone
    from laser_core.model import tokenizer_texts

    spec = cfg.laser_spec()
    path = resolve_backbone(spec.backbone, tokenizer_texts(spec, ds.items))
    return AutoTokenizer.from_pretrained(path, trust_remote_code=spec.backbone.trust_remote_code)


def id_figures(scores: np.ndarray, hist, targets) -> dict:
    r = compute_metrics(scores, targets)
    masked = compute_metrics(scores, targets, exclude=hist)
    return {**{k: r[k] for k in hybrid.KEEP}, "ndcg@10_masked": masked["ndcg@10"], "test_users": len(targets)}


def hybrid_figures(scores, unit, hist, targets, form: str, gamma: float, batch_size: int) -> dict:
    r = hybrid.hybrid_metrics(scores, unit, hist, targets, form, gamma, batch_size=batch_size)
    masked = hybrid.hybrid_metrics(scores, unit, hist, targets, form, gamma, mask_history=True, batch_size=batch_size)
    return {**r, "ndcg@10_masked": masked["ndcg@10"], "test_users": len(targets)}


def contribution(rows: dict) -> dict:
    """``llm_contribution``: the ``llm_hybrid`` test NDCG@10 minus the best control row's (None until both)."""
    controls = {r: rows[r]["ndcg@10"] for r in CONTROLS if r in rows}
    if "llm_hybrid" not in rows or not controls:
        return {"llm_contribution": None, "best_control": None}
    best = max(controls, key=controls.get)
    return {"llm_contribution": rows["llm_hybrid"]["ndcg@10"] - controls[best], "best_control": best}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(ap)
    ap.add_argument("--workdir", required=True, help="the SASRec checkpoint, the LLM item tables, the random backbone")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated rows among {', '.join(ROWS)}")
    ap.add_argument("--valid-users", type=int, default=None, help="a seeded sample of validation users (all)")
    ap.add_argument("--test-users", type=int, default=None, help="a seeded sample of test users (all)")
    ap.add_argument("--seed", type=int, default=1, help="the random backbone's seed (tiny backbones are built with 0)")
    ap.add_argument("--item-batch-size", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=512, help="users per scoring batch")
    ap.add_argument("--sr-epochs", type=int, default=200, help="SASRec's epoch budget (early stopping: 10)")
    ap.add_argument(
        "--sr-model",
        default=None,
        help="a saved ID model (a best/ folder: the tuned SASRec of bench/leaderboard.py sr) instead of the "
        "bench/sr_baselines.py SASRec trained under --workdir",
    )
    args = ap.parse_args(argv)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    if unknown or not rows:
        ap.error(f"--rows: unknown {', '.join(unknown) or '(none given)'}; choose among {', '.join(ROWS)}")
    for flag in ("valid_users", "test_users"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            ap.error(f"--{flag.replace('_', '-')} must be at least 1")
    cfg, ds, split = load_inputs(args)
    wd = Path(args.workdir)
    name = args.name or ds.name
    dest = Path(args.out) / f"controls_{name}.json"
    command = "python bench/controls.py " + " ".join(sys.argv[1:] if argv is None else argv)

    v_users, v_hist, v_targets = split.valid_examples()
    keep = _sample(len(v_users), args.valid_users, cfg.laser_train.seed + 1)  # Laser's validation sample
    v_hist, v_targets = [v_hist[i] for i in keep], v_targets[keep]
    t_hist, t_targets = test_examples(split, cfg.laser_train.model_copy(update={"test_users": args.test_users}))
    settings = {
        "data": data_fingerprint(cfg.dataset),
        "backbone": cfg.backbone.model_dump(mode="json"),
        "text": cfg.text.model_dump(mode="json"),
        "pooling": cfg.bitune.pooling,
        "id_model": {"model": "sasrec", "settings": "bench/sr_baselines.py", "epochs": args.sr_epochs}
        if args.sr_model is None
        else {"saved": str(Path(args.sr_model).resolve()), "fingerprint": folder_fingerprint(args.sr_model)},
        "workdir": str(wd.resolve()),
        "valid_users": len(v_targets),
        "test_users": len(t_targets),
        "sample_seed": cfg.laser_train.seed,
        "seed": args.seed,
        "gammas": list(hybrid.GAMMAS),
        "forms": list(hybrid.FORMS),
    }
    out, results = resumable_results(dest, settings, "rows", args)
    out["dataset"] = name

    def save() -> None:
        out.update(contribution(results))
        if len(t_targets) == len(split.test_examples()[1]):  # all test users: rows for bench/leaderboard.py
            keep = ("ndcg@10", "recall@10", "mrr", "ndcg@10_masked", "command")
            board = {r: {k: results[r][k] for k in keep} | {"test_users": len(t_targets)} for r in results}
            board.pop("sasrec", None)  # the ID model's own row is bench/leaderboard.py sr's
            out["leaderboard"] = {"dataset": name, "rows": board}
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(json.dumps(out, indent=2) + "\n", encoding="utf8")
        print(f"wrote {dest}", flush=True)

    todo = [r for r in rows if r not in results]
    if todo:
        if args.sr_model is None:
            sasrec = baseline_model("sasrec", split, wd, epochs=args.sr_epochs)
        else:
            sasrec = load_model(args.sr_model).eval()
            if sasrec.n_items != split.n_items:
                ap.error(f"--sr-model {args.sr_model}: {sasrec.n_items} items, the data has {split.n_items}")
        v_scores = as_numpy(sr_scores(sasrec, v_hist, args.batch_size))
        t_scores = as_numpy(sr_scores(sasrec, t_hist, args.batch_size))
    tables: dict[str, dict] = {}
    for row in todo:
        t0 = time.perf_counter()
        if row == "sasrec":
            results[row] = {**id_figures(t_scores, t_hist, t_targets), "command": command}
        else:
            side = SIDE[row]
            if side not in tables:
                tables[side] = text_tables(side, cfg, ds, wd, args)
            gammas = (math.inf,) if row.endswith("_alone") else hybrid.GAMMAS
            choice = hybrid.choose_on_validation(
                v_scores, tables[side], v_hist, v_targets, gammas=gammas, batch_size=args.batch_size
            )
            text, transform = choice.table.split("/")
            unit = tables[side][choice.table]
            results[row] = {
                **hybrid_figures(t_scores, unit, t_hist, t_targets, choice.form, choice.gamma, args.batch_size),
                "command": command,
                "chosen_on_validation": {
                    "text": text,
                    "transform": transform,
                    "form": choice.form,
                    "gamma": "inf" if math.isinf(choice.gamma) else choice.gamma,
                    **choice.valid,
                },
                "valid_users": choice.valid_users,
                "grid": [{**r, "gamma": "inf" if math.isinf(r["gamma"]) else r["gamma"]} for r in choice.grid],
            }
        results[row]["seconds"] = round(time.perf_counter() - t0, 1)
        print(f"{row}: test ndcg@10 {results[row]['ndcg@10']:.4f}", flush=True)
        save()
    if not todo:
        save()
    print(
        markdown_table(
            ["row", *FIGURES, "chosen on validation"],
            [
                [r, *(results[r][k] for k in FIGURES), _describe(results[r].get("chosen_on_validation"))]
                for r in ROWS
                if r in results
            ],
        )
    )
    if out.get("llm_contribution") is not None:
        print(f"llm_contribution: {out['llm_contribution']:+.4f} NDCG@10 over {out['best_control']}")
    return 0


def _describe(chosen: dict | None) -> str:
    if chosen is None:
        return ""
    return f"{chosen['text']}, {chosen['transform']}, {chosen['form']}, gamma {chosen['gamma']}"


if __name__ == "__main__":
    raise SystemExit(main())
