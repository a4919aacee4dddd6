"""The training loop shared by every model: the ID-based recommenders (:class:`laser_core.sr.trainer.SRTrainer`)
and Laser (:class:`laser_core.train.LaserTrainer`).

A model trained here has RecBole's ``calculate_loss(batch) -> scalar``; a subclass says which batches an epoch
has, how it validates and what its run's content key is. The base does the rest, one way for all:

- the step (:meth:`Trainer.training_step`): the model's loss, backward (through Accelerate when it is on), and
  every ``grad_accumulation`` mini-batches (and after an epoch's last) an optimizer step at the schedule's
  learning rate (:meth:`Trainer.current_lr`), skipped when a gradient is not finite
  (:meth:`Trainer.optimizer_step`);
- the epoch (:meth:`Trainer.run_epoch`): a progress bar with the running loss, the mean over finite mini-batch
  losses, the training seconds;
- the state file (``state.json`` in ``workdir``): the run's content key, the stage and epoch done, the history,
  the best validation epoch per stage, the step counter and the cost counters, written after every recorded
  epoch with ``last/`` (weights and optimizer, safetensors) and, when the epoch is a stage's best, ``best/``;
- content-keyed resume: a run started with the same key resumes after its last recorded epoch (a finished one
  is reloaded); another key, or ``resume=False``, trains from scratch and overwrites the folder;
- early stopping: :meth:`Trainer.patience_spent` after ``patience`` epochs without a better ``monitor`` than
  the stage's best; :meth:`Trainer.restore_best` loads the best epoch's weights;
- callbacks: every recorded epoch's entry goes to each callback, after its checkpoint is written (a callback
  that raises stops the run there, and a restart resumes after that epoch).

The checkpoint files are safetensors (tensors, the optimizer's state) and JSON, each written to a temporary name
and renamed (:func:`atomic_write`): nothing is pickled, and a kill never leaves a half-written file. A state
file of the older trainers (format 1, before this base) cannot be resumed: the run trains from scratch over it,
with a warning naming the file (checkpoints are a cache of the run: an upgrade costs the time, never the run).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save
from torch import nn
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)


STATE = "state.json"
STATE_FORMAT = 2  # 1: the two trainers' own state files before the shared trainer (no "format" field)
LEGACY_KEYS = ("config_hash", "run_hash")  # where format 1 kept the run's key (the SR trainer's, Laser's)


# ------------------------------------------------------------------ checkpoint files (nothing pickled)
def atomic_write(path: Path, data: bytes | str) -> None:
    """Write via a temporary file and rename, so a crash never leaves a half-written checkpoint."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data.encode("utf8") if isinstance(data, str) else data)
    tmp.replace(path)


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Tensors (moved to the CPU) as safetensors at ``path`` (:func:`atomic_write`)."""
    atomic_write(path, save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}))


def save_optimizer(optimizer: torch.optim.Optimizer, path: Path) -> None:
    """Adam-style state as tensors ``{param_index}.{key}`` in safetensors, hyper-parameters in JSON."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            t = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"{idx}.{key}"] = t.detach().cpu().contiguous()
    save_tensors(tensors, path)
    atomic_write(path.with_suffix(".json"), json.dumps(sd["param_groups"]))


def load_optimizer(optimizer: torch.optim.Optimizer, path: Path) -> None:
    """What :func:`save_optimizer` wrote, into ``optimizer``."""
    tensors = load_file(str(path))
    state: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    groups = json.loads(path.with_suffix(".json").read_text(encoding="utf8"))
    optimizer.load_state_dict({"state": state, "param_groups": groups})


class _CalculateLoss(nn.Module):
    """``forward(batch) = model.calculate_loss(batch)``: what DDP wraps, so the gradient all-reduce hooks see
    the whole loss (DDP only hooks a module's ``forward``)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: Any) -> torch.Tensor:
        return self.model.calculate_loss(batch)


class Trainer:
    """The shared part of a trainer (see the module's docstring). ``patience=None``: no early stopping."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        workdir: str | Path | None = None,
        resume: bool = True,
        progress: bool = True,
        patience: int | None = None,
        monitor: str = "ndcg@10",
        grad_accumulation: int = 1,
    ) -> None:
        self.model, self.optimizer = model, optimizer
        self.wd = Path(workdir) if workdir is not None else None
        self.resume, self.progress = resume, progress
        self.patience, self.monitor = patience, monitor
        self.grad_accumulation = grad_accumulation
        self.accelerator = None
        self.rank, self.world = 0, 1
        self._calculate_loss: Callable[[Any], torch.Tensor] = model.calculate_loss
        self.global_step = 0  # optimizer steps taken in the run (in state.json)
        self.cost: dict = {"train_seconds": 0.0, "nonfinite_batches": 0, "skipped_steps": 0}
        self.callbacks: list[Callable[[dict], None]] = []
        self.state: dict = {}  # the current fit's state (what state.json holds)
        self._best_weights: dict[str, torch.Tensor] | None = None
        self.best_extra: dict[str, torch.Tensor] = {}  # tensors kept with the best epoch (Laser: its item table)

    def use_accelerator(self, cpu: bool) -> None:
        """Train through Hugging Face Accelerate: data-parallel over the processes of ``accelerate launch`` (in
        one process, the same computation as without it). Parameters a batch does not use (experts the router
        did not pick) get no gradient: DDP must allow unused parameters."""
        from accelerate import Accelerator, DistributedDataParallelKwargs

        self.accelerator = Accelerator(
            cpu=cpu, kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)]
        )
        self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
        self.optimizer = self.accelerator.prepare_optimizer(self.optimizer)
        if self.world > 1:  # DDP over the trainable modules, its forward being the loss
            self._calculate_loss = self.accelerator.prepare_model(_CalculateLoss(self.model))

    # ------------------------------------------------------------------ the step
    def current_lr(self) -> float | None:
        """The learning rate of the next optimizer step (None: the optimizer's own, unchanged)."""
        return None

    def compute_loss(self, batch: Any) -> torch.Tensor:
        """The model's ``calculate_loss(batch)`` (through DDP when data-parallel)."""
        return self._calculate_loss(batch)

    def optimizer_step(self) -> None:
        """One optimizer step at :meth:`current_lr`; skipped (as a loss scaler skips it) when a gradient is not
        finite, so one bad mini-batch cannot turn the weights into NaN. The step counter (and so the schedule)
        advances either way; ``cost["skipped_steps"]`` counts the skips."""
        lr = self.current_lr()
        if lr is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
        grads = [p.grad for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        if grads and not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()):
            self.cost["skipped_steps"] += 1
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1

    def training_step(self, batch: Any, group: int = 1, step: bool = True) -> float:
        """One mini-batch: the loss, backward of loss / ``group`` (the mini-batches of its optimizer step), and
        with ``step`` the optimizer step. Returns the (unscaled) loss."""
        loss = self.compute_loss(batch)
        scaled = loss / group
        if self.accelerator is not None:
            self.accelerator.backward(scaled)
        else:
            scaled.backward()
        if step:
            self.optimizer_step()
        return float(loss.detach())

    def run_epoch(
        self,
        batches: Iterable[tuple[Any, int]],
        n_batches: int,
        total: int,
        desc: str,
        unit: str,
        after_batch: Callable[[int], float] | None = None,
    ) -> tuple[float, float]:
        """Train on ``batches`` (``(batch, examples in it)``, ``n_batches`` of them, ``total`` examples): an
        optimizer step every ``grad_accumulation`` mini-batches and after the last one, each loss scaled by
        1 / its group's size. ``after_batch(index)`` runs after each mini-batch and returns the seconds it
        took (not counted as training). Returns the mean finite mini-batch loss (NaN: none) and the training
        seconds; non-finite losses are counted in ``cost["nonfinite_batches"]``."""
        acc = self.grad_accumulation
        self.model.train()
        t0 = time.perf_counter()
        paused = 0.0
        loss_sum, finite = 0.0, 0
        bar = tqdm(total=total, desc=desc, unit=unit, disable=not self.progress, leave=False)
        self.optimizer.zero_grad(set_to_none=True)
        for b, (batch, size) in enumerate(batches):
            group = min(acc, n_batches - (b // acc) * acc)  # mini-batches in this optimizer step
            value = self.training_step(batch, group, step=(b + 1) % acc == 0 or b + 1 == n_batches)
            if math.isfinite(value):
                loss_sum += value
                finite += 1
            else:
                self.cost["nonfinite_batches"] += 1
            bar.update(size)
            bar.set_postfix(loss=f"{loss_sum / max(finite, 1):.4f}")
            if after_batch is not None:
                paused += after_batch(b)
        bar.close()
        seconds = time.perf_counter() - t0 - paused
        self.cost["train_seconds"] += seconds
        return (loss_sum / finite if finite else float("nan")), seconds

    # ------------------------------------------------------------------ state, resume, best, patience
    def model_state(self) -> dict[str, torch.Tensor]:
        """A CPU copy of the model's ``state_dict`` (what the checkpoints hold)."""
        return {k: v.detach().cpu().clone().contiguous() for k, v in self.model.state_dict().items()}

    def start(self, key: str, **fresh: Any) -> dict:
        """The run's state for content key ``key``: the saved one (its last and best weights, optimizer state,
        step counter and costs loaded) when resuming a run with this key, else a new one with ``fresh``'s
        fields. A checkpoint of this run in the older format is trained over from scratch (a warning says so)."""
        state = {"format": STATE_FORMAT, "key": key, "stage": 1, "epoch": -1, "history": [], "best": {}, **fresh}
        saved = self._saved_state(key)
        if saved is not None:
            state = saved
            self.model.load_state_dict(load_file(str(self.wd / "last" / "model.safetensors")))
            load_optimizer(self.optimizer, self.wd / "last" / "optimizer.safetensors")
            best = self.wd / "best"
            if (best / "model.safetensors").is_file():
                self._best_weights = load_file(str(best / "model.safetensors"))
            if (best / "extra.safetensors").is_file():
                self.best_extra = load_file(str(best / "extra.safetensors"))
            self.cost.update(state.get("cost", {}))
            self.global_step = int(state.get("global_step", 0))
        self.state = state
        return state

    def _saved_state(self, key: str) -> dict | None:
        if not self.resume or self.wd is None or not (self.wd / STATE).is_file():
            return None
        path = self.wd / STATE
        saved = json.loads(path.read_text(encoding="utf8"))
        if saved.get("format") == STATE_FORMAT:
            return saved if saved.get("key") == key else None
        if key in (saved.get(k) for k in LEGACY_KEYS):
            logger.warning(
                "%s: this run's checkpoints were written by an older version of the trainer and cannot be resumed; "
                "training from scratch over them",
                path,
            )
        return None  # another run's checkpoints, or an older trainer's: trained over from scratch

    def record(self, entry: dict, stage: int = 1, best_extra: dict[str, torch.Tensor] | None = None) -> bool:
        """Record a validated epoch of ``stage`` (``entry`` has its ``epoch`` and ``valid`` metrics): into the
        history; as the stage's best (its weights and ``best_extra`` kept) when its ``monitor`` beats the
        stage's best so far; then the checkpoint (:meth:`save_checkpoint`) and the callbacks. Returns whether
        it is the new best."""
        state = self.state
        state["history"].append(entry)
        best = state["best"].get(str(stage))
        changed = best is None or entry["valid"][self.monitor] > best["valid"][self.monitor]
        if changed:
            state["best"][str(stage)] = {"epoch": entry["epoch"], "valid": entry["valid"]}
            self._best_weights = self.model_state()
            self.best_extra = dict(best_extra or {})
        state.update(stage=stage, epoch=entry["epoch"], cost=dict(self.cost), global_step=self.global_step)
        self.save_checkpoint(best_changed=changed)
        for cb in self.callbacks:
            cb(entry)
        return changed

    def save_checkpoint(self, best_changed: bool) -> None:
        """``last/`` (weights, optimizer), ``best/`` when it changed (:meth:`save_best`), then ``state.json``
        (written last and atomically: a run killed in between resumes from the previous epoch). Process 0 only."""
        if self.wd is None or self.rank != 0:
            return
        last = self.wd / "last"
        last.mkdir(parents=True, exist_ok=True)
        # a new best was just copied from the model (record): the same tensors, not a second copy
        save_tensors(self._best_weights if best_changed else self.model_state(), last / "model.safetensors")
        save_optimizer(self.optimizer, last / "optimizer.safetensors")
        if best_changed:
            best = self.wd / "best"
            best.mkdir(parents=True, exist_ok=True)
            self.save_best(best)
            if self.best_extra:
                save_tensors(self.best_extra, best / "extra.safetensors")
        atomic_write(self.wd / STATE, json.dumps(self.state, indent=1))

    def save_best(self, directory: Path) -> None:
        """The best weights as ``directory/model.safetensors`` (a subclass may write a loadable model there)."""
        save_tensors(self._best_weights, directory / "model.safetensors")

    def patience_spent(self, stage: int = 1) -> bool:
        """``patience`` epochs of ``stage`` recorded since its best (from the state: survives a resume)."""
        best = self.state["best"].get(str(stage))
        if self.patience is None or best is None or self.state["stage"] != stage:
            return False
        return self.state["epoch"] - best["epoch"] >= self.patience

    def restore_best(self) -> None:
        """Load the best recorded epoch's weights into the model (nothing recorded: unchanged)."""
        if self._best_weights is not None:
            self.model.load_state_dict(self._best_weights)


__all__ = [
    "STATE",
    "Trainer",
    "atomic_write",
    "load_optimizer",
    "save_optimizer",
    "save_tensors",
]
