"""Training and evaluation of the ID-based recommenders: one evaluation path for every model.

- seeded: epoch ``e`` re-seeds torch with ``seed`` and ``e``, so a resumed run replays exactly;
- Adam; validation by full ranking on the validation item after every epoch; early stopping on ``monitor``;
- checkpoints (``workdir``): ``last/`` (weights + optimizer, safetensors) and ``state.json`` after each epoch,
  ``best/`` (weights + config.json) for the best epoch; a run restarted with the same config resumes;
- a progress bar with sequences/s.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from laser_core.data.split import Split
from laser_core.metrics import DEFAULT_KS, RankingAccumulator
from laser_core.sr.base import SequentialRecommender
from laser_core.sr.batching import windows
from laser_core.sr.checkpoint import atomic_write, build_model, load_model, load_optimizer, save_model, save_optimizer
from laser_core.sr.config import SRConfig, TrainConfig
from laser_core.sr.popularity import Popularity

STATE = "state.json"


@dataclass
class FitResult:
    model: SequentialRecommender
    best_epoch: int
    best_valid: dict[str, float]
    history: list[dict] = field(default_factory=list)
    stopped_early: bool = False

    @property
    def epochs_run(self) -> int:
        return len(self.history)

    @property
    def mean_epoch_seconds(self) -> float:
        times = [h["train_seconds"] for h in self.history if "train_seconds" in h]
        return float(np.mean(times)) if times else 0.0


@torch.no_grad()
def evaluate(
    model: SequentialRecommender,
    histories: Sequence[np.ndarray],
    targets: np.ndarray,
    batch_size: int = 512,
    ks: Sequence[int] = DEFAULT_KS,
    mask_history: bool = False,
    progress: bool = False,
    desc: str = "evaluate",
) -> dict[str, float]:
    """Full-ranking metrics over all items for each (history, target) pair: the one evaluation loop, for the ID
    models and Laser (:class:`laser_core.train.LaserScorer`) alike.

    Anything with the ``full_sort_predict`` contract works: ``predict_inputs(histories)`` makes the batch,
    ``full_sort_predict(batch)`` scores it ``[B, n_items]``; ``training``/``eval()``/``train(mode)`` as a
    module's. A model with ``sort_by_length = True`` is fed length-sorted batches (less padding). With
    ``mask_history`` each user's history is excluded from the ranking (:func:`laser_core.ranking.masked_scores`,
    as the recommendations' ``exclude_history``)."""
    acc = RankingAccumulator(ks=tuple(ks))
    targets = np.asarray(targets)
    order = np.arange(len(histories))
    if getattr(model, "sort_by_length", False):
        order = np.argsort([len(h) for h in histories], kind="stable")
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(order), desc=desc, unit="user", disable=not progress, leave=False)
    try:
        for lo in range(0, len(order), batch_size):
            idx = order[lo : lo + batch_size]
            hist = [histories[i] for i in idx]
            scores = model.full_sort_predict(model.predict_inputs(hist))
            acc.add(scores, targets[idx], exclude=hist if mask_history else None)
            bar.update(len(idx))
    finally:
        bar.close()
        model.train(was_training)
    return acc.result()


def evaluate_split(
    model: SequentialRecommender,
    split: Split,
    which: str = "test",
    batch_size: int = 512,
    ks: Sequence[int] = DEFAULT_KS,
    mask_history: bool = False,
) -> dict[str, float]:
    """``which="valid"``: history = training part; ``"test"``: training part + validation item."""
    if which not in ("valid", "test"):
        raise ValueError("which must be 'valid' or 'test'")
    _, hist, targets = split.valid_examples() if which == "valid" else split.test_examples()
    return evaluate(model, hist, targets, batch_size, ks, mask_history)


def training_sequences(model: SequentialRecommender, split: Split) -> list[np.ndarray]:
    out: list[np.ndarray] = []
    for seq in split.train:
        if len(seq) >= model.min_train_length():
            out.extend(w for w in windows(seq, model.window) if len(w) >= model.min_train_length())
    return out


def config_hash(config: SRConfig, train: TrainConfig, split: Split) -> str:
    """The checkpoints' key: the model and training settings (all but the progress bar and the thread count)
    and the split's content (:func:`laser_core.fingerprint.split_fingerprint`), so a checkpoint is reused only
    for the same data and settings."""
    from laser_core.fingerprint import fingerprint, split_fingerprint

    return fingerprint(
        "sr-run",
        {"model": config, "train": train.model_dump(exclude={"progress", "threads"}), "data": split_fingerprint(split)},
    )[:16]


def fit(
    config: SRConfig,
    train: TrainConfig,
    split: Split,
    workdir: str | Path | None = None,
    callbacks: Sequence[Callable[[int, dict], None]] = (),
    resume: bool = True,
) -> FitResult:
    """Train ``config.model`` on ``split`` and return the best-validation-epoch model.

    With ``workdir``, a run whose checkpoints there have the same :func:`config_hash` resumes (or, finished,
    is reloaded); ``resume=False`` trains from scratch whatever is there (and overwrites it)."""
    if train.threads:
        torch.set_num_threads(train.threads)
    torch.manual_seed(train.seed)
    model = build_model(config, split.n_items)
    if not model.trainable:
        assert isinstance(model, Popularity)
        model.fit(split.train)
        valid = evaluate_split(model, split, "valid", train.eval_batch_size)
        if workdir is not None:
            save_model(model, Path(workdir) / "best", extra={"best_epoch": 0, "valid": valid})
        return FitResult(model=model.eval(), best_epoch=0, best_valid=valid, history=[{"epoch": 0, "valid": valid}])

    sequences = training_sequences(model, split)
    if not sequences:
        raise ValueError("no training sequence is long enough for this model")
    optimizer = torch.optim.Adam(model.parameters(), lr=train.lr, weight_decay=train.weight_decay)
    _, val_hist, val_targets = split.valid_examples()

    wd = Path(workdir) if workdir is not None else None
    run_hash = config_hash(config, train, split)
    state = {
        "config_hash": run_hash,
        "epoch": -1,
        "best_epoch": -1,
        "best_metric": -np.inf,
        "bad_epochs": 0,
        "history": [],
        "finished": False,
    }
    best_state: dict[str, torch.Tensor] | None = None
    if resume and wd is not None and (wd / STATE).is_file():
        saved = json.loads((wd / STATE).read_text(encoding="utf8"))
        if saved.get("config_hash") == run_hash:
            state = saved
            from safetensors.torch import load_file

            model.load_state_dict(load_file(str(wd / "last" / "model.safetensors")))
            load_optimizer(optimizer, wd / "last" / "optimizer.safetensors")
            if (wd / "best" / "model.safetensors").is_file():
                best_state = load_file(str(wd / "best" / "model.safetensors"))
    n = len(sequences)
    epoch = state["epoch"] + 1
    while not state["finished"] and epoch < train.epochs:
        torch.manual_seed(train.seed * 100_003 + epoch)
        gen = torch.Generator().manual_seed(train.seed * 100_003 + epoch)
        order = torch.randperm(n, generator=gen).tolist()
        model.train()
        t0 = time.perf_counter()
        total, batches = 0.0, 0
        bar = tqdm(total=n, desc=f"{config.model} epoch {epoch}", unit="seq", disable=not train.progress, leave=False)
        for lo in range(0, n, train.batch_size):
            batch = model.make_batch([sequences[i] for i in order[lo : lo + train.batch_size]], gen)
            loss = model.calculate_loss(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach())
            batches += 1
            bar.update(min(train.batch_size, n - lo))
            bar.set_postfix(loss=f"{total / batches:.4f}")
        bar.close()
        train_seconds = time.perf_counter() - t0
        t1 = time.perf_counter()
        valid = evaluate(model, val_hist, val_targets, train.eval_batch_size)
        record = {
            "epoch": epoch,
            "loss": total / batches,
            "valid": valid,
            "train_seconds": train_seconds,
            "eval_seconds": time.perf_counter() - t1,
            "sequences_per_second": n / train_seconds,
        }
        state["history"].append(record)
        metric = valid[train.monitor]
        if metric > state["best_metric"]:
            state.update(best_metric=metric, best_epoch=epoch, bad_epochs=0)
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            if wd is not None:
                save_model(model, wd / "best", extra={"best_epoch": epoch, "valid": valid})
        else:
            state["bad_epochs"] += 1
        if state["bad_epochs"] >= train.patience or epoch + 1 >= train.epochs:
            state["finished"] = True
            state["stopped_early"] = state["bad_epochs"] >= train.patience
        state["epoch"] = epoch
        if wd is not None:
            save_model(model, wd / "last")
            save_optimizer(optimizer, wd / "last" / "optimizer.safetensors")
            atomic_write(wd / STATE, json.dumps(state, indent=1))
        for cb in callbacks:
            cb(epoch, record)
        epoch += 1

    if best_state is not None:
        model.load_state_dict(best_state)
    model.zero_grad(set_to_none=True)
    model.eval()
    best = next((h["valid"] for h in state["history"] if h["epoch"] == state["best_epoch"]), {})
    return FitResult(
        model=model,
        best_epoch=state["best_epoch"],
        best_valid=best,
        history=state["history"],
        stopped_early=bool(state.get("stopped_early", False)),
    )


__all__ = ["FitResult", "evaluate", "evaluate_split", "fit", "load_model", "save_model", "training_sequences"]
