"""RecTools 0.19's SASRec, with the eSASRec benchmark's settings, on our leave-one-out split, ranked by our metrics.

    bench/peers/.venv/bin/python bench/peers/rectools_sasrec.py \\
        --data-dir ../shared/data/amazon2014-beauty-seqrecbench [--threads 2]

A peer for our SASRec (issue 22): the implementation the eSASRec benchmark (RecSys 2025,
github.com/blondered/transformer_benchmark) trained, run in its own venv (``make peers-venv``; RecTools is never a
dependency of the package). This script imports ``laser_core`` from the repository root for the data, the split and
the metrics only, so the peer sees exactly the pairs our models are scored on:

- the dataset as ``laser_core.data.load_dataset`` reads it, split by ``leave_one_out`` (last item = test,
  second-to-last = validation; users with fewer than 3 items train only);
- RecTools trains on the training part only (every user's sequence without its last two items);
- after each epoch the validation pairs (history = training part) are scored over the whole catalogue through
  RecTools' own inference path and ranked by ``laser_core.metrics``; Lightning's ``EarlyStopping`` watches
  ``--monitor`` (default: recall@10 with the history masked, what the eSASRec benchmark watched) and the best
  epoch's weights are restored at the end;
- the test pairs are ``Split.test_examples()`` (history = training part + validation item, target = last item):
  RecTools' scores for every item it knows, mapped back to our item indices (items it never saw in training score
  -inf; a user none of whose history items it knows gets a tie over the whole catalogue, i.e. a random rank), and
  our ndcg@10, recall@10 and mrr without and with the history masked (``exclude=history``, as ``mask_history``).
  A sample of test users is also sent through RecTools' public ``recommend`` (``filter_viewed=False``) and its
  top 10 compared with ours: a check of the id mapping.

Settings (``PRESETS``): the eSASRec benchmark's SASRec with sampled softmax (``configs/paper/loo/s3_vanilla.yaml``
for the Amazon datasets, ``configs/paper/loo/ml_1m.yaml`` for MovieLens-1M; lr 1e-3, batch 128, RecTools'
defaults otherwise); each flag overrides its preset value. Writes ``bench/results/peer_rectools_<name>.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
import warnings
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from laser_core.data import leave_one_out, load_dataset  # noqa: E402
from laser_core.errors import UserError  # noqa: E402
from laser_core.metrics import RankingAccumulator  # noqa: E402
from laser_core.ranking import top_k  # noqa: E402

try:
    import pytorch_lightning as pl
    import torch
    from pytorch_lightning.callbacks import Callback, EarlyStopping
    from rectools import Columns
    from rectools.dataset import Dataset
    from rectools.models import SASRecModel
    from rectools.models.nn.transformers.similarity import DistanceSimilarityModule
except ImportError as exc:  # run with the main venv's python, or before `make peers-venv`
    sys.exit(f"{exc}: run this with the peer venv's python (bench/peers/.venv/bin/python), made by `make peers-venv`")

# RecTools' and Lightning's notices that say nothing about this run (no GPU here, no item features, deprecations)
logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
warnings.filterwarnings("ignore", category=FutureWarning, module="rectools")
warnings.filterwarnings("ignore", message=".*(CatFeaturesItemNet|serializer warnings|val_dataloader|LeafSpec).*")

ESASREC = "github.com/blondered/transformer_benchmark"
#: the eSASRec benchmark's SASRec + sampled softmax, per dataset (its configs/paper/loo/*.yaml and README table)
PRESETS: dict[str, dict] = {
    "amazon": {  # s3_vanilla.yaml (Beauty, Sports, Toys): get_trainer_200_epochs, patience 50
        "source": f"{ESASREC} configs/paper/loo/s3_vanilla.yaml",
        "n_factors": 256,
        "n_blocks": 1,
        "n_heads": 1,
        "dropout": 0.2,
        "max_len": 50,
        "n_negatives": 256,
        "max_epochs": 200,
        "patience": 50,
    },
    "ml-1m": {  # ml_1m.yaml: get_trainer (100 epochs), patience 50
        "source": f"{ESASREC} configs/paper/loo/ml_1m.yaml",
        "n_factors": 64,
        "n_blocks": 2,
        "n_heads": 1,
        "dropout": 0.1,
        "max_len": 200,
        "n_negatives": 256,
        "max_epochs": 100,
        "patience": 50,
    },
}
NAMES = {"beauty": "beauty", "movielens-1m": "ml-1m", "ml-1m": "ml-1m", "scientific": "scientific"}
MONITORS = ("recall@10_masked", "ndcg@10_masked", "recall@10", "ndcg@10")
KS = (10,)


def dataset_name(data_dir: str) -> str:
    """``beauty``, ``ml-1m`` or ``scientific`` from the folder's name; else the folder's name."""
    folder = Path(data_dir).name.lower()
    return next((name for key, name in NAMES.items() if key in folder), folder)


def rectools_dataset(histories: list[np.ndarray], users: np.ndarray) -> Dataset:
    """A RecTools dataset of the ``histories`` (user ids = ``users``, item ids = our item indices, the position
    in the sequence as the time, so RecTools keeps our order)."""
    lengths = np.array([len(h) for h in histories], dtype=np.int64)
    frame = pd.DataFrame(
        {
            Columns.User: np.repeat(np.asarray(users, dtype=np.int64), lengths),
            Columns.Item: np.concatenate(histories).astype(np.int64),
            Columns.Weight: 1.0,
            Columns.Datetime: pd.to_datetime(np.concatenate([np.arange(n) for n in lengths]), unit="s"),
        }
    )
    return Dataset.construct(frame)


def catalogue_scores(lightning_model, histories: list[np.ndarray], n_items: int, batch_size: int):
    """Yield ``(rows, scores)``: RecTools' scores ``[len(rows), n_items]`` over our whole catalogue for the
    ``histories`` (through its recommend path: ``transform_dataset_u2i``, its recommend dataloader and
    ``_get_user_item_embeddings``, whose dot product is what ``recommend`` ranks by), in chunks of
    ``batch_size`` rows. Items RecTools never saw in training score -inf; a history without any item it knows
    (RecTools drops such a user as cold) gives a row of -inf, a tie over the whole catalogue."""
    prep = lightning_model.data_preparator
    known_ours = prep.get_known_item_ids().astype(np.int64)  # our item index of each known item, by internal id
    known_internal = prep.get_known_items_sorted_internal_ids()
    for lo in range(0, len(histories), batch_size):
        chunk = histories[lo : lo + batch_size]
        rows = np.arange(lo, lo + len(chunk))
        scores = np.full((len(chunk), n_items), -np.inf, dtype=np.float32)
        with warnings.catch_warnings():  # "N target users were considered cold": counted by the caller
            warnings.simplefilter("ignore", UserWarning)
            data = prep.transform_dataset_u2i(rectools_dataset(chunk, rows), rows)
        if data.user_id_map.size:
            loader = prep.get_dataloader_recommend(data, batch_size)
            user_embs, item_embs = lightning_model._get_user_item_embeddings(loader, "cpu")
            logits = (user_embs @ item_embs.T)[:, known_internal].numpy()
            # the loader's rows are RecTools' internal user ids, in order; their external ids are our rows
            warm = data.user_id_map.get_external_sorted_by_internal().astype(np.int64) - lo
            scores[np.ix_(warm, known_ours)] = logits
        yield rows, scores


def rank(lightning_model, histories, targets, n_items: int, batch_size: int) -> dict:
    """Our metrics at K = 10 and MRR, without and with each history masked, and the number of cold rows."""
    plain, masked = RankingAccumulator(ks=KS), RankingAccumulator(ks=KS)
    cold = 0
    for rows, scores in catalogue_scores(lightning_model, histories, n_items, batch_size):
        hist = [histories[i] for i in rows]
        plain.add(scores, targets[rows])
        masked.add(scores, targets[rows], exclude=hist)
        cold += int(np.isneginf(scores).all(axis=1).sum())
    out = {k: v for k, v in plain.result().items() if k in ("ndcg@10", "recall@10", "mrr")}
    out.update({f"{k}_masked": v for k, v in masked.result().items() if k in ("ndcg@10", "recall@10", "mrr")})
    out["cold_users"] = cold
    return out


class PaddingFreeSimilarity(DistanceSimilarityModule):
    """RecTools' ``DistanceSimilarityModule`` with the same pos/neg logits computed on the CPU's budget.

    RecTools gathers ``[batch, max_len, 1 + n_negatives, n_factors]`` item embeddings for every position, padding
    included (1.7 GB a batch at the eSASRec settings: about 8 s a batch on one core, 25 minutes an epoch on
    Beauty). This computes the logits of the real positions only (those whose positive, ``candidate_item_ids[...,
    0]``, is not RecTools' padding id 0), as each session's scores over the catalogue gathered at the candidates;
    padding positions get 0. RecTools' sampled softmax ignores padding positions (``ignore_index=0``), so the loss
    and every gradient are the same: :class:`StockSimilarityCheck` compares both on a real batch at the start of
    each run, and ``--stock-similarity`` runs RecTools' own module."""

    def _get_pos_neg_logits(self, session_embs, item_embs, candidate_item_ids):
        real = candidate_item_ids[..., 0] != 0
        scores = torch.gather(session_embs[real] @ item_embs.T, 1, candidate_item_ids[real])
        return session_embs.new_zeros(candidate_item_ids.shape).index_put((real,), scores)


class StockSimilarityCheck(Callback):
    """At the start of training: the loss and the gradients of one training batch with RecTools' own
    ``DistanceSimilarityModule`` and with :class:`PaddingFreeSimilarity` (dropout off); the run stops if they
    differ by more than float32 rounding."""

    result: dict | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        batch = next(iter(trainer.train_dataloader))
        torch_model = pl_module.torch_model
        fast = torch_model.similarity_module
        params = [p for p in torch_model.parameters() if p.requires_grad]
        was_training = torch_model.training
        torch_model.eval()
        out = {}
        try:
            for name, module in (("padding_free", fast), ("stock", DistanceSimilarityModule(fast.distance))):
                torch_model.similarity_module = module
                loss = pl_module.loss_calculator(pl_module.get_batch_logits(batch), batch["y"], batch["yw"])
                out[name] = (loss.detach(), torch.autograd.grad(loss, params, allow_unused=True))
        finally:
            torch_model.similarity_module = fast
            torch_model.train(was_training)
        (loss_a, grads_a), (loss_b, grads_b) = out["padding_free"], out["stock"]
        grad_diff = max(
            float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))
            for a, b in zip(grads_a, grads_b)
            if a is not None and b is not None
        )
        self.result = {"loss_abs_diff": float((loss_a - loss_b).abs()), "max_rel_grad_diff": grad_diff}
        print(f"similarity check (padding-free vs RecTools' stock module): {self.result}", flush=True)
        if self.result["loss_abs_diff"] > 1e-4 or grad_diff > 1e-3:
            raise RuntimeError(f"PaddingFreeSimilarity differs from RecTools' DistanceSimilarityModule: {self.result}")


class OurValidation(Callback):
    """After each training epoch: our metrics on our validation pairs, logged as ``val_<metric>`` for
    Lightning's ``EarlyStopping``; the best epoch's weights are kept (in memory) and restored when fitting ends."""

    def __init__(self, histories, targets, n_items: int, monitor: str, batch_size: int) -> None:
        self.histories, self.targets, self.n_items = histories, targets, n_items
        self.monitor, self.batch_size = monitor, batch_size
        self.history: list[dict] = []
        self.best: tuple[float, int, dict] | None = None

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.epoch_start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        t0 = time.perf_counter()
        train_seconds = t0 - self.epoch_start
        metrics = rank(pl_module, self.histories, self.targets, self.n_items, self.batch_size)
        pl_module.train()  # RecTools' inference path left it in eval mode
        epoch = trainer.current_epoch + 1
        loss = trainer.callback_metrics.get("train_loss")
        self.history.append(
            {"epoch": epoch, "train_loss": None if loss is None else float(loss), **metrics,
             "train_seconds": round(train_seconds, 1), "valid_seconds": round(time.perf_counter() - t0, 1)}
        )  # fmt: skip
        print(json.dumps(self.history[-1]), flush=True)
        value = metrics[self.monitor]
        pl_module.log(f"val_{self.monitor}", value)
        if self.best is None or value > self.best[0]:
            state = {k: v.detach().clone() for k, v in pl_module.torch_model.state_dict().items()}
            self.best = (value, epoch, state)

    def on_fit_end(self, trainer, pl_module) -> None:
        if self.best is not None:
            pl_module.torch_model.load_state_dict(self.best[2])


def check_recommend(model, histories, n_items: int, n_users: int, seed: int) -> dict:
    """RecTools' public ``recommend`` (top 10, ``filter_viewed=False``) against the top 10 of our score matrix
    for ``n_users`` seeded test users (the warm ones): the share whose lists agree (as sets: near-equal scores
    may swap places). Below 0.99 the id mapping is wrong, and the run stops."""
    rng = np.random.default_rng(seed + 1)
    rows = np.sort(rng.choice(len(histories), size=min(n_users, len(histories)), replace=False))
    hist = [histories[i] for i in rows]
    ours: dict[int, set] = {}
    for sub, scores in catalogue_scores(model.lightning_model, hist, n_items, len(hist)):
        warm = ~np.isneginf(scores).all(axis=1)
        items, _ = top_k(scores, 10)
        ours.update({int(rows[i]): set(items[i].tolist()) for i in np.flatnonzero(warm)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        reco = model.recommend(
            users=np.array(sorted(ours), dtype=np.int64),
            dataset=rectools_dataset(hist, rows),
            k=10,
            filter_viewed=False,
            on_unsupported_targets="ignore",
        )
    theirs = reco.groupby(Columns.User)[Columns.Item].agg(lambda s: {int(i) for i in s}).to_dict()
    agree = sum(ours[u] == theirs.get(u) for u in ours)
    result = {"users": len(ours), "top10_agree": agree}
    if ours and agree / len(ours) < 0.99:
        raise RuntimeError(f"RecTools' recommend and our score matrix disagree: {result}")
    return result


def parse_args(argv: list[str] | None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", required=True, help="a dataset folder laser_core reads (any supported format)")
    ap.add_argument("--name", default=None, help="the results' name (default: beauty / ml-1m / scientific / folder)")
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None, help="default: ml-1m for ml-1m, else amazon")
    for flag, kind in (
        ("--n-factors", int),
        ("--n-blocks", int),
        ("--n-heads", int),
        ("--dropout", float),
        ("--max-len", int),
        ("--n-negatives", int),
        ("--max-epochs", int),
        ("--patience", int),
    ):
        ap.add_argument(flag, type=kind, default=None, help="default: the preset's")
    ap.add_argument("--loss", default="sampled_softmax", choices=("sampled_softmax", "softmax", "BCE", "gBCE"))
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--monitor", choices=MONITORS, default="recall@10_masked", help="early stopping's metric")
    ap.add_argument(
        "--stock-similarity",
        action="store_true",
        help="RecTools' own DistanceSimilarityModule (the same loss, about 8x slower on a CPU: PaddingFreeSimilarity)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-batch-size", type=int, default=1024)
    ap.add_argument("--max-users", type=int, default=None, help="a seeded sample of users (smoke runs)")
    ap.add_argument(
        "--valid-users",
        type=int,
        default=None,
        help="early stopping on a seeded sample of this many validation users (default: all; each epoch's "
        "validation costs about as much as a third of its training on Beauty)",
    )
    ap.add_argument("--check-users", type=int, default=200, help="test users for the recommend check (0: none)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args(argv)
    args.name = args.name or dataset_name(args.data_dir)
    args.preset = args.preset or ("ml-1m" if args.name == "ml-1m" else "amazon")
    preset = PRESETS[args.preset]
    for key in ("n_factors", "n_blocks", "n_heads", "dropout", "max_len", "n_negatives", "max_epochs", "patience"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    positive = ("n_factors", "n_blocks", "n_heads", "max_len", "n_negatives", "max_epochs", "patience", "batch_size",
                "threads", "eval_batch_size")  # fmt: skip
    for key in positive:
        if getattr(args, key) < 1:
            ap.error(f"--{key.replace('_', '-')} must be at least 1, got {getattr(args, key)}")
    for key in ("max_users", "valid_users"):
        if getattr(args, key) is not None and getattr(args, key) < 1:
            ap.error(f"--{key.replace('_', '-')} must be at least 1, got {getattr(args, key)}")
    if not 0 <= args.dropout < 1:
        ap.error(f"--dropout must be in [0, 1), got {args.dropout}")
    if args.lr <= 0 or args.check_users < 0:
        ap.error("--lr must be positive and --check-users at least 0")
    if args.n_factors % args.n_heads:
        ap.error(f"--n-factors ({args.n_factors}) must be a multiple of --n-heads ({args.n_heads})")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    pl.seed_everything(args.seed, workers=True, verbose=False)
    try:
        ds = load_dataset({"path": args.data_dir})
    except (UserError, ValueError) as exc:
        print(f"error: --data-dir: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", 2)
    split = leave_one_out(ds)
    users = np.arange(len(split.users))
    if args.max_users is not None and args.max_users < len(users):
        users = np.sort(np.random.default_rng(args.seed).choice(len(users), size=args.max_users, replace=False))
    eval_users = np.intersect1d(users, split.eval_users)
    if not len(eval_users):
        print(f"error: --data-dir: no user of {args.data_dir} has the 3 items a test pair needs", file=sys.stderr)
        return 3
    valid_users = eval_users
    if args.valid_users is not None and args.valid_users < len(eval_users):
        valid_users = np.sort(np.random.default_rng(args.seed + 2).choice(eval_users, args.valid_users, replace=False))
    valid_hist = [split.train[u] for u in valid_users]
    valid_targets = split.valid_target[valid_users]
    test_hist = [np.append(split.train[u], split.valid_target[u]) for u in eval_users]  # = Split.test_examples
    test_targets = split.test_target[eval_users]
    print(
        f"{args.name}: {len(users)} users, {split.n_items} items, {len(eval_users)} test users, "
        f"{len(valid_users)} validation users",
        flush=True,
    )

    similarity_check = StockSimilarityCheck()
    validation = OurValidation(valid_hist, valid_targets, split.n_items, args.monitor, args.eval_batch_size)
    early = EarlyStopping(
        monitor=f"val_{args.monitor}", mode="max", patience=args.patience, check_on_train_epoch_end=True
    )
    trainer = pl.Trainer(
        max_epochs=args.max_epochs,
        deterministic=True,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[validation, early] + ([] if args.stock_similarity else [similarity_check]),
    )
    model = SASRecModel(
        n_blocks=args.n_blocks,
        n_heads=args.n_heads,
        n_factors=args.n_factors,
        dropout_rate=args.dropout,
        session_max_len=args.max_len,
        loss=args.loss,
        n_negatives=args.n_negatives,
        lr=args.lr,
        batch_size=args.batch_size,
        deterministic=True,
        recommend_torch_device="cpu",
        similarity_module_type=DistanceSimilarityModule if args.stock_similarity else PaddingFreeSimilarity,
    )
    model._trainer = trainer  # RecTools' documented way to use a custom trainer (it deep-copies it in fit)
    t0 = time.perf_counter()
    model.fit(rectools_dataset([split.train[u] for u in users], users))
    train_seconds = time.perf_counter() - t0
    fitted = next(cb for cb in model.fit_trainer.callbacks if isinstance(cb, OurValidation))
    checked = next((cb.result for cb in model.fit_trainer.callbacks if isinstance(cb, StockSimilarityCheck)), None)
    # the restored weights score the best epoch's validation figure again (dropout is off in both)
    valid_best = rank(model.lightning_model, valid_hist, valid_targets, split.n_items, args.eval_batch_size)
    if fitted.best and not np.isclose(valid_best[args.monitor], fitted.best[0], rtol=1e-4, atol=1e-6):
        raise RuntimeError(f"best epoch {fitted.best[1]} not restored: {valid_best[args.monitor]} != {fitted.best[0]}")

    t0 = time.perf_counter()
    results = rank(model.lightning_model, test_hist, test_targets, split.n_items, args.eval_batch_size)
    test_seconds = time.perf_counter() - t0
    check = check_recommend(model, test_hist, split.n_items, args.check_users, args.seed)

    settings = {
        k: getattr(args, k)
        for k in ("preset", "n_factors", "n_blocks", "n_heads", "dropout", "max_len", "loss", "n_negatives", "lr",
                  "batch_size", "max_epochs", "patience", "monitor", "seed", "threads", "max_users", "valid_users")
    }  # fmt: skip
    settings["preset_source"] = PRESETS[args.preset]["source"]
    settings["similarity_module"] = "rectools stock" if args.stock_similarity else "PaddingFreeSimilarity"

    epochs = len(fitted.history)
    out = {
        "dataset": args.name,
        "data_dir": str(Path(args.data_dir).resolve()),
        "model": "rectools_sasrec",
        "results": {k: v for k, v in results.items() if k != "cold_users"},
        "test_users": len(eval_users),
        "valid_users": len(valid_users),
        "cold_test_users": results["cold_users"],
        "protocol": {
            "split": "leave-one-out (last = test, second-to-last = validation), laser_core.data.leave_one_out",
            "train": "each user's training part only (RecTools: users with >= 2 items, the last max_len + 1)",
            "ranking": "full, over all items; items RecTools never saw in training score -inf",
            "test_history": "training part + validation item (Split.test_examples)",
            "metrics": "laser_core.metrics, ties = expected under random order; *_masked: history excluded",
            "early_stopping": f"validation {args.monitor} (our validation pairs), patience {args.patience}, "
            "best epoch restored",
        },
        "settings": settings,
        "epochs_run": epochs,
        "best_epoch": fitted.best[1] if fitted.best else None,
        "valid_at_best_epoch": {k: v for k, v in valid_best.items() if k != "cold_users"},
        "stopped_early": epochs < args.max_epochs,
        "train_seconds": round(train_seconds, 1),
        "seconds_per_epoch": {  # the training pass, and our validation after it
            "train": round(float(np.mean([h["train_seconds"] for h in fitted.history])), 1) if epochs else None,
            "valid": round(float(np.mean([h["valid_seconds"] for h in fitted.history])), 1) if epochs else None,
        },
        "test_seconds": round(test_seconds, 1),
        "recommend_check": check,
        "similarity_check": checked,
        "history": fitted.history,
        "versions": {p: version(p) for p in ("rectools", "torch", "pytorch-lightning", "numpy", "pandas")},
        "machine": {"cpu_threads": args.threads, "platform": platform.platform(), "python": platform.python_version()},
        "command": "bench/peers/.venv/bin/python bench/peers/rectools_sasrec.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
    }
    path = Path(args.out) / f"peer_rectools_{args.name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n", encoding="utf8")
    print(json.dumps(out["results"]), f"\nwrote {path}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
