"""Training of the ID-based recommenders on the shared trainer (:class:`laser_core.trainer.Trainer`).

- seeded: epoch ``e`` re-seeds torch with ``seed`` and ``e``, so a resumed run replays exactly;
- Adam at a constant ``lr``, one step per mini-batch of ``model.calculate_loss``; validation by full ranking on
  the validation item after every epoch (:func:`laser_core.evaluation.evaluate`); early stopping on
  ``monitor`` after ``patience`` epochs without a better one;
- checkpoints (``workdir``): the shared trainer's ``state.json``, ``last/`` and ``best/`` (here a loadable
  model: weights + config.json, :func:`laser_core.sr.checkpoint.load_model`); a run restarted with the same
  :func:`config_hash` resumes;
- a progress bar with sequences/s.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from laser_core.data.split import Split
from laser_core.evaluation import evaluate, evaluate_split
from laser_core.sr.base import SequentialRecommender
from laser_core.sr.batching import windows
from laser_core.sr.checkpoint import build_model, save_model
from laser_core.configuration import SRConfig, TrainConfig
from laser_core.sr.popularity import Popularity
from laser_core.sr.text_items import text_rows
from laser_core.trainer import Trainer


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


def training_sequences(model: SequentialRecommender, split: Split) -> list[np.ndarray]:
    out: list[np.ndarray] = []
    for seq in split.train:
        if len(seq) >= model.min_train_length():
            out.extend(w for w in windows(seq, model.window) if len(w) >= model.min_train_length())
    return out


def config_hash(config: SRConfig, train: TrainConfig, split: Split, text_table: torch.Tensor | None = None) -> str:
    """The checkpoints' key: the model and training settings (all but the progress bar and the thread count)
    and the split's content (:func:`laser_core.fingerprint.split_fingerprint`), and, with ``sr.text_items``, the
    item text table's content, so a checkpoint is reused only for the same data and settings."""
    from laser_core.fingerprint import fingerprint, split_fingerprint

    parts = {
        "model": config,
        "train": train.model_dump(exclude={"progress", "threads"}),
        "data": split_fingerprint(split),
    }
    if config.text_items != "none":
        parts["text_table"] = text_table.float() if text_table is not None else None
    return fingerprint("sr-run", parts)[:16]


class SRTrainer(Trainer):
    """One ID-based recommender's training (one stage) on ``split``; :func:`fit` is the usual way in."""

    def __init__(
        self,
        model: SequentialRecommender,
        train: TrainConfig,
        split: Split,
        workdir: str | Path | None = None,
        resume: bool = True,
        text_table: torch.Tensor | None = None,
    ) -> None:
        optimizer = torch.optim.Adam(model.parameters(), lr=train.lr, weight_decay=train.weight_decay)
        super().__init__(
            model,
            optimizer,
            workdir=workdir,
            resume=resume,
            progress=train.progress,
            patience=train.patience,
            monitor=train.monitor,
        )
        self.train_cfg, self.split = train, split
        self.sequences = training_sequences(model, split)
        if not self.sequences:
            raise ValueError("no training sequence is long enough for this model")
        _, self.valid_histories, self.valid_targets = split.valid_examples()
        self.key = config_hash(model.config, train, split, text_table)

    def train_epoch(self, epoch: int) -> tuple[float, float]:
        """One epoch over the training windows in a seeded order: (mean loss, training seconds)."""
        seed = self.train_cfg.seed * 100_003 + epoch
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        n, bs = len(self.sequences), self.train_cfg.batch_size
        order = torch.randperm(n, generator=gen).tolist()
        batches = (
            (self.model.make_batch([self.sequences[i] for i in order[lo : lo + bs]], gen), min(bs, n - lo))
            for lo in range(0, n, bs)
        )
        return self.run_epoch(batches, -(-n // bs), n, f"{self.model.config.model} epoch {epoch}", "seq")

    def save_best(self, directory: Path) -> None:
        """``best/`` as a loadable model (:func:`~laser_core.sr.checkpoint.save_model`) with its epoch and
        validation metrics (called when the model holds the best weights)."""
        best = self.state["best"]["1"]
        save_model(self.model, directory, extra={"best_epoch": best["epoch"], "valid": best["valid"]})

    def fit(self, callbacks: Sequence[Callable[[int, dict], None]] = ()) -> FitResult:
        """Train (or resume) until ``epochs`` or early stopping; the model ends at the best validation epoch
        (eval mode). ``callbacks``: ``callback(epoch, record)`` after each epoch's checkpoint."""
        cfg = self.train_cfg
        self.callbacks = [lambda entry, cb=cb: cb(entry["epoch"], entry) for cb in callbacks]
        state = self.start(self.key)
        n = len(self.sequences)
        for epoch in range(state["epoch"] + 1, cfg.epochs):
            if self.patience_spent():
                break
            loss, train_seconds = self.train_epoch(epoch)
            t1 = time.perf_counter()
            valid = evaluate(
                self.model, self.valid_histories, self.valid_targets, cfg.eval_batch_size, mask_history=cfg.mask_history
            )
            self.record(
                {
                    "epoch": epoch,
                    "loss": loss,
                    "valid": valid,
                    "train_seconds": train_seconds,
                    "eval_seconds": time.perf_counter() - t1,
                    "sequences_per_second": n / train_seconds,
                }
            )
        self.restore_best()
        self.model.zero_grad(set_to_none=True)
        self.model.eval()
        best = state["best"].get("1", {})
        return FitResult(
            model=self.model,
            best_epoch=best.get("epoch", -1),
            best_valid=best.get("valid", {}),
            history=state["history"],
            stopped_early=self.patience_spent(),
        )


def fit(
    config: SRConfig,
    train: TrainConfig,
    split: Split,
    workdir: str | Path | None = None,
    callbacks: Sequence[Callable[[int, dict], None]] = (),
    resume: bool = True,
    text_table: torch.Tensor | None = None,
) -> FitResult:
    """Train ``config.model`` on ``split`` and return the best-validation-epoch model.

    With ``workdir``, a run whose checkpoints there have the same :func:`config_hash` resumes (or, finished,
    is reloaded); ``resume=False`` trains from scratch whatever is there (and overwrites it).

    ``text_table`` ``[n_items, D]``: the item text table that ``sr.text_items`` (init, join) needs (e.g.
    :func:`laser_core.frozen_table.frozen_item_table`; :mod:`laser_core.sr.text_items`); ignored with
    ``text_items: none``."""
    if train.threads:
        torch.set_num_threads(train.threads)
    rows = text_rows(config, split.n_items, text_table)  # a clear error first when the table is missing or wrong
    torch.manual_seed(train.seed)
    model = build_model(config, split.n_items, rows)
    if not model.trainable:
        assert isinstance(model, Popularity)
        model.fit(split.train)
        valid = evaluate_split(model, split, "valid", train.eval_batch_size, mask_history=train.mask_history)
        if workdir is not None:
            save_model(model, Path(workdir) / "best", extra={"best_epoch": 0, "valid": valid})
        return FitResult(model=model.eval(), best_epoch=0, best_valid=valid, history=[{"epoch": 0, "valid": valid}])
    return SRTrainer(model, train, split, workdir, resume, text_table if rows is not None else None).fit(callbacks)


__all__ = ["FitResult", "SRTrainer", "config_hash", "fit", "training_sequences"]
