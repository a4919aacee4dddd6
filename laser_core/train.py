"""Laser's two-stage Bi-Tuning trainer (LASER_SPEC.md §2.5).

Stage 1: the whole item-embedding table is recomputed with the current weights before training starts and after
every epoch (no grad, batched by text length); each epoch trains the user side against the table of its start,
then validates by full ranking with the freshly recomputed table (which the next epoch then trains against).
The best validation epoch's weights and table are kept. Stage 2: that table is frozen; the weights keep
training against it, the best validation epoch is kept, and the test uses those weights and that table.

Optimization (LaserTrainConfig; the defaults are the official Laser recipe): AdamW with weight decay on the
>= 2-D weights only, gradient accumulation over ``grad_accumulation`` mini-batches (the epoch's last, partial
group steps too, its losses scaled by its own size), and a learning rate set before every optimizer step from a
global step counter (:func:`lr_at`: linear warm-up, then cosine decay to ``min_lr`` at the last planned step of
the run; the plan is both stages' epochs x the optimizer steps per epoch). Stage 2 starts at the step where the
planned stage 1 ends, so a run whose stages are two ``fit`` calls (the pipeline's steps) follows the same
schedule as one call. Early stopping: a stage ends after ``patience`` epochs without a better validation
NDCG@10. ``curve_every_users`` adds learning-curve validations inside the epochs (history entries with
``"curve": True``; they never pick the best epoch). The step counter, the users trained (``users_seen``) and
the history are in ``state.json``, so a resumed run continues the schedule and the patience count exactly.

Training examples: each epoch samples ``users_per_epoch`` training users (all when unset) and, for each, a
random cut of the user's training sequence: history = the items before the cut, target = the item at it (so
every transition of a user can be seen over epochs, as with RecFormer/Laser's all-prefix data).

The loop is the shared trainer's (:class:`laser_core.trainer.Trainer`): its step is
:meth:`LaserModel.calculate_loss` on a :class:`~laser_core.model.LaserTrainingBatch` (the users against the
epoch's table), backward, and the optimizer step at :func:`lr_at` with the non-finite-gradient guard.

Checkpoints (``workdir``, the shared trainer's): only trainable weights (safetensors) + optimizer state +
``state.json`` after every epoch, the best weights and table (``best/``). A restarted run with the same content key resumes where it stopped (a
finished one is reloaded): the key (:meth:`LaserTrainer.run_hash`, through :mod:`laser_core.fingerprint`) covers
every result-affecting training setting, the process count, the starting weights, the frozen backbone's files,
the frozen SR encoder's weights, the catalogue's item texts, the split's data, and, per ``fit`` call, the stages
and the given frozen table. ``resume=False`` reuses nothing (it trains from scratch and overwrites the folder).
Item tables are cached in ``workdir/tables`` by :meth:`LaserModel.weights_fingerprint` (trainable weights and
every frozen input of the item embeddings).

Device (``device``): the trainer moves the model (backbone, SR encoder, M-Former, suffix) there; batches, tables
and targets are used there, and the fit's item table comes back on the CPU. Data parallel (``accelerate`` with
several processes): every process gets ``ceil(n / processes)`` of the epoch's ``n`` users (:func:`shard`, padded
by wrapping around to the start as torch's ``DistributedSampler`` does), so every process runs the same number of
mini-batches and optimizer steps and DDP's gradient all-reduces pair up.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from laser_core.collate import LaserBatch
from laser_core.configuration import LaserTrainConfig
from laser_core.data.split import Split
from laser_core.device import resolve_device
from laser_core.evaluation import evaluate
from laser_core.losses import cosine_scores
from laser_core.metrics import compute_metrics
from laser_core.model import LaserModel, LaserTrainingBatch
from laser_core.trainer import Trainer, save_tensors


def lr_at(step: int, planned: int, cfg: LaserTrainConfig) -> float:
    """The learning rate of optimizer step ``step`` (0-based) of a run of ``planned`` optimizer steps.

    ``cosine``: linear from ``warmup_start_lr`` (step 0) to ``lr`` (step W), W = ``warmup_steps`` capped to the
    last planned step (so a short run still reaches ``lr``), then cosine from ``lr`` to ``min_lr`` at the last
    planned step (``planned - 1``; later steps stay at ``min_lr``). ``constant``: ``lr``."""
    if cfg.schedule == "constant":
        return cfg.lr
    last = max(planned - 1, 0)
    warm = min(cfg.warmup_steps, last)
    if step < warm:
        return cfg.warmup_start_lr + (cfg.lr - cfg.warmup_start_lr) * step / warm
    if last <= warm:
        return cfg.lr
    progress = min((step - warm) / (last - warm), 1.0)
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(
    params: Sequence[torch.nn.Parameter], cfg: LaserTrainConfig, scaled: Sequence[torch.nn.Parameter] = ()
) -> torch.optim.Optimizer:
    """AdamW (or Adam) over two groups: the >= 2-D weights with ``weight_decay``, the rest (biases, norms, the
    suffix vector, scalars) without. Adam's weight decay is its L2 term. ``scaled`` (the fusion's scalars), with
    ``cfg.fusion_lr_scale`` != 1: a third group whose ``lr_scale`` the trainer multiplies each step's rate by."""
    params = list(params)
    apart = {id(p) for p in scaled} if cfg.fusion_lr_scale != 1.0 else set()
    groups = [
        {"params": [p for p in params if p.ndim >= 2 and id(p) not in apart], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim < 2 and id(p) not in apart], "weight_decay": 0.0},
        {
            "params": [p for p in params if id(p) in apart],
            "weight_decay": 0.0,
            "lr": cfg.lr * cfg.fusion_lr_scale,
            "lr_scale": cfg.fusion_lr_scale,
        },
    ]
    groups = [g for g in groups if g["params"]]
    kind = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return kind(groups, lr=cfg.lr)  # the trainer sets each step's learning rate (lr_at)


@dataclass
class LaserFitResult:
    model: LaserModel
    item_table: torch.Tensor  # on the CPU
    best: dict[str, dict] = field(default_factory=dict)  # per stage: {"epoch", "valid"}
    history: list[dict] = field(default_factory=list)
    cost: dict = field(default_factory=dict)
    fusion_weight: dict | None = None  # fusion_weight_grid: {"grid": {w: valid ndcg@10}, "chosen": w}


def shard(n: int, rank: int, world: int) -> np.ndarray:
    """Process ``rank``'s share (indices) of ``n`` examples among ``world`` processes, as torch's
    ``DistributedSampler`` (``drop_last=False``, no shuffling) deals them: the list is padded to a multiple of
    ``world`` by wrapping around to its start, then dealt out in turn (``rank``, ``rank + world``, ...). Every
    process gets ``ceil(n / world)`` examples; nothing repeats when ``world`` divides ``n``. So ``world``
    processes with batch ``b`` take the optimizer steps of one process with batch ``world x b`` over the padded
    list ``[0 .. n-1, 0, 1, ...]`` (DDP averages equal-sized shards' mean gradients)."""
    return np.resize(np.arange(n), -(-n // world) * world)[rank::world]


def _sample(n: int, k: int | None, seed: int) -> np.ndarray:
    if k is None or k >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=k, replace=False))


class LaserScorer:
    """Laser with the ID models' ``full_sort_predict`` contract (:mod:`laser_core.sr.base`) over an item table,
    so :func:`laser_core.evaluation.evaluate` is its evaluation loop too (validation and test).

    ``predict_inputs(histories)`` is the batch (:meth:`LaserModel.collate`: the padded token ids and item ids);
    ``full_sort_predict(batch)`` is ``[B, n_items]`` cosines of the users' embeddings to the table's rows (on
    the model's device). ``expert_counts``: how often the router picked each expert over the scored users."""

    sort_by_length = True  # length-sorted batches: less padding

    def __init__(self, model: LaserModel, item_table: torch.Tensor) -> None:
        self.model = model
        self.item_table = item_table.to(model.device)
        self.expert_counts: list[int] | None = None

    @property
    def n_items(self) -> int:
        return int(self.item_table.shape[0])

    @property
    def training(self) -> bool:
        return self.model.training

    def eval(self) -> "LaserScorer":
        return self.train(False)

    def train(self, mode: bool = True) -> "LaserScorer":
        self.model.train(mode)
        return self

    def predict_inputs(self, histories: Sequence[Sequence[int]]) -> LaserBatch:
        return self.model.collate(histories)

    @torch.no_grad()
    def full_sort_predict(self, batch: LaserBatch) -> torch.Tensor:
        out = self.model(batch)
        emb, route = out.user_embedding, out.router
        if route is not None:
            counts = torch.bincount(route.selected, minlength=route.scores.shape[1]).tolist()
            self.expert_counts = [a + b for a, b in zip(self.expert_counts or [0] * len(counts), counts)]
        return cosine_scores(emb, self.item_table)


class LaserTrainer(Trainer):
    def __init__(
        self,
        model: LaserModel,
        split: Split,
        config: LaserTrainConfig,
        workdir: str | Path | None = None,
        workdir_root: str | Path | None = None,
        label: str = "laser",
        resume: bool = True,
    ) -> None:
        """Checkpoints go to ``workdir``, or to ``workdir_root/<label>-<run hash>`` (one folder per distinct
        run, so a restarted pipeline step finds its own checkpoints). ``resume=False``: read nothing from there
        (no resumed or reloaded run, no cached item table), train from scratch."""
        self.split, self.cfg = split, config
        self.device = resolve_device(config.device)
        if model.device != self.device:  # before the optimizer: it holds the parameters it steps
            model.to(self.device)
        super().__init__(
            model,
            build_optimizer(model.trainable_parameters(), config, scaled=model.fusion_scalars()),
            workdir=workdir,
            resume=resume,
            progress=config.progress,
            patience=config.patience,
            grad_accumulation=config.grad_accumulation,
        )
        if config.accelerate:
            self.use_accelerator(cpu=self.device.type == "cpu")
        users, hist, targets = split.valid_examples()
        keep = _sample(len(users), config.valid_users, config.seed + 1)
        self.valid = ([hist[i] for i in keep], targets[keep])
        self.train_users = np.array([u for u, t in enumerate(split.train) if len(t) >= 2], dtype=np.int64)
        if not len(self.train_users):
            raise ValueError("no user has 2 or more training items")
        self.planned_steps = self.stage_steps(1) + self.stage_steps(2)
        self.users_seen = 0  # training users of the run so far, all processes together (in state.json)
        self.cost.update(item_seconds=0.0, items_encoded=0, users_trained=0, eval_seconds=0.0, users_evaluated=0)
        self._fitted_table: torch.Tensor | None = None
        if self.wd is None and workdir_root is not None:
            self.wd = Path(workdir_root) / f"{label}-{self.run_hash()}"

    # ---------------------------------------------------------------- pieces
    def run_hash(self) -> str:
        """The run's content key (and checkpoint folder name): the training settings (all but the progress bar
        and thread count; the process count as run), the starting model (:meth:`LaserModel.weights_fingerprint`:
        weights, backbone files, SR encoder weights, item texts, settings) and the split's data."""
        from laser_core.fingerprint import fingerprint, split_fingerprint

        return fingerprint(
            "laser-run",
            {  # the device, like the thread count, is where, not what (the compute
                # dtype it implies is in the backbone's fingerprint)
                "train": self.cfg.model_dump(exclude={"progress", "threads", "processes", "device"}),
                "processes": self.world,
                "start": self.model.weights_fingerprint(),
                "data": split_fingerprint(self.split),
            },
        )[:16]

    def _fit_key(self, stages: Sequence[int], table: torch.Tensor | None) -> str:
        """``state.json``'s key for one ``fit`` call: the run plus the stages asked for and the given table."""
        from laser_core.fingerprint import fingerprint

        return fingerprint(
            "laser-fit", {"run": self.run_hash(), "stages": sorted(int(s) for s in stages), "table": table}
        )[:16]

    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch (on each process: its shard of the epoch's users, :func:`shard`)."""
        n = len(self.train_users)
        if self.cfg.users_per_epoch is not None:
            n = min(n, self.cfg.users_per_epoch)
        per_process = -(-n // self.world)  # ceil: every process's shard
        batches = -(-per_process // self.cfg.batch_size)
        return -(-batches // self.cfg.grad_accumulation)

    def stage_steps(self, stage: int) -> int:
        """The optimizer steps the run plans for ``stage`` (0 for a skipped stage)."""
        cfg = self.cfg
        epochs = (
            (0 if cfg.skip_stage1 else cfg.stage1_epochs)
            if stage == 1
            else (0 if cfg.skip_stage2 else cfg.stage2_epochs)
        )
        return epochs * self.steps_per_epoch()

    def current_lr(self) -> float:
        """The learning rate of the next optimizer step (:func:`lr_at`)."""
        return lr_at(self.global_step, self.planned_steps, self.cfg)

    def training_batch(
        self, histories: Sequence[np.ndarray], targets: torch.Tensor, table: torch.Tensor
    ) -> LaserTrainingBatch:
        """The mini-batch :meth:`LaserModel.calculate_loss` takes: the users' histories against ``table`` (rows
        ``targets``), on the trainer's device, with the configured ``tau`` and ``lb_weight``."""
        return LaserTrainingBatch(
            inputs=self.model.collate(histories),
            targets=targets.to(self.device),
            item_table=table.to(self.device),
            tau=self.cfg.tau,
            lb_weight=self.cfg.lb_weight,
        )

    def fit_embedding_transform(self) -> None:
        """Fit the model's embedding transform (``bitune.embedding_transform``) once, on the LLM rows of the
        initial item table, and cache the item table of the fitted model (derived from those rows, no second
        pass). No-op when there is none or it is fitted already (a resumed run, stage-1 weights)."""
        model = self.model
        if not model.needs_transform_fit():
            return
        was = model.training
        model.eval()
        t0 = time.perf_counter()
        items = range(self.split.n_items)
        bar = tqdm(
            total=self.split.n_items,
            desc="item table (fit the transform)",
            unit="item",
            disable=not self.cfg.progress,
            leave=False,
        )
        raw = model.embed_items(items, self.cfg.item_batch_size, progress=bar.update, fuse=False)
        bar.close()
        model.fit_embedding_transform(raw)
        table = model.catalogue_table(self.split.n_items, llm_rows=model.transform_embeddings(raw))
        self.cost["item_seconds"] += time.perf_counter() - t0
        self.cost["items_encoded"] += self.split.n_items
        model.train(was)
        path = self._table_path()
        if path is not None and self.rank == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_tensors({"table": table.contiguous(), **model.fusion_statistics()}, path)
        self._fitted_table = table

    def _table_path(self) -> Path | None:
        key = self.model.weights_fingerprint(table_key=True)[:24]
        return self.wd / "tables" / f"{key}.safetensors" if self.wd is not None else None

    def item_table(self) -> torch.Tensor:
        """The whole catalogue's item table with the current weights (:meth:`LaserModel.catalogue_table`; with
        ``fusion: zscore`` it refits the model's LLM-side statistics, which the cached file keeps beside the
        table and a cache hit sets again)."""
        path = self._table_path()
        fitted, self._fitted_table = self._fitted_table, None
        if fitted is not None:  # just made by fit_embedding_transform, for these weights
            return fitted
        if path is not None and self.resume and path.is_file():
            saved = load_file(str(path))
            self.model.load_fusion_statistics(saved)
            return saved["table"]
        was = self.model.training
        self.model.eval()
        t0 = time.perf_counter()
        bar = tqdm(total=self.split.n_items, desc="item table", unit="item", disable=not self.cfg.progress, leave=False)
        table = self.model.catalogue_table(self.split.n_items, self.cfg.item_batch_size, progress=bar.update)
        bar.close()
        self.cost["item_seconds"] += time.perf_counter() - t0
        self.cost["items_encoded"] += self.split.n_items
        self.model.train(was)
        if path is not None and self.rank == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_tensors({"table": table, **self.model.fusion_statistics()}, path)
        return table

    def examples(self, stage: int, epoch: int) -> tuple[list[np.ndarray], np.ndarray]:
        seed = self.cfg.seed * 100_003 + stage * 1_000 + epoch
        rng = np.random.default_rng(seed)
        users = self.train_users[_sample(len(self.train_users), self.cfg.users_per_epoch, seed)]
        rng.shuffle(users)
        hist, targets = [], []
        for u in users:
            seq = self.split.train[u]
            cut = int(rng.integers(1, len(seq)))  # history seq[:cut] (>= 1 item), target seq[cut]
            hist.append(seq[:cut])
            targets.append(seq[cut])
        targets = np.asarray(targets, dtype=np.int64)
        group = self.cfg.group_by_length
        if group is None:
            return hist, targets
        n = len(hist)
        lengths = np.array([len(h) for h in hist])
        order = np.concatenate([lo + np.argsort(-lengths[lo : lo + group], kind="stable") for lo in range(0, n, group)])
        step = self.cfg.batch_size * self.cfg.grad_accumulation * self.world
        full = n // step * step  # whole optimizer steps are shuffled; a last partial one stays last
        steps = [order[lo : lo + step] for lo in range(0, full, step)]
        order = np.concatenate([*(steps[i] for i in rng.permutation(len(steps))), order[full:]])
        return [hist[i] for i in order], targets[order]

    def train_epoch(
        self, table: torch.Tensor, stage: int, epoch: int, on_curve: Callable[[dict], None] | None = None
    ) -> float:
        """One epoch against ``table``; returns the mean mini-batch loss. The optimizer steps every
        ``grad_accumulation`` mini-batches and after the last one; each loss is scaled by 1 / its group's size.
        With ``curve_every_users`` and ``on_curve``, every time the run's users trained cross a multiple of it,
        validates with ``table`` and passes ``on_curve`` a learning-curve entry."""
        cfg = self.cfg
        torch.manual_seed(cfg.seed * 100_003 + stage * 1_000 + epoch)
        hist, targets = self.examples(stage, epoch)
        n_epoch = len(hist)  # the epoch's users over all processes
        if self.world > 1:  # each process trains on its equal shard of the epoch's users (same seed everywhere)
            keep = shard(n_epoch, self.rank, self.world)
            hist, targets = [hist[i] for i in keep], targets[keep]
        target_t = torch.from_numpy(targets).to(self.device)
        table = table.to(self.device)
        bs = cfg.batch_size
        starts = range(0, len(hist), bs)
        batches = (
            (self.training_batch(hist[lo : lo + bs], target_t[lo : lo + bs], table), len(hist[lo : lo + bs]))
            for lo in starts
        )
        every = cfg.curve_every_users if on_curve is not None else None
        seen0 = self.users_seen

        def curve(b: int) -> float:
            """After mini-batch ``b``: a learning-curve validation when the users trained cross a multiple of
            ``every`` (the same decision on every process, from the batch index alone; the users trained count
            the epoch's users once: a shard's wrapped-around repeats are not new). Returns its seconds."""
            lo = starts[b]
            before = seen0 + min(n_epoch, lo * self.world)
            now = seen0 + min(n_epoch, (lo + bs) * self.world)
            if now // every <= before // every:
                return 0.0
            t1 = time.perf_counter()
            on_curve({"stage": stage, "epoch": epoch, "users_seen": now, "valid": self.validate(table), "curve": True})
            self.model.train()
            return time.perf_counter() - t1

        desc = f"stage {stage} epoch {epoch}"
        loss, _ = self.run_epoch(batches, len(starts), len(hist), desc, "user", curve if every is not None else None)
        self.users_seen = seen0 + n_epoch
        self.cost["users_trained"] += len(hist)
        return loss

    def validate(self, table: torch.Tensor) -> dict[str, float]:
        t0 = time.perf_counter()
        hist, targets = self.valid
        cfg = self.cfg
        scorer = LaserScorer(self.model, table)
        out = evaluate(scorer, hist, targets, cfg.eval_batch_size, progress=cfg.progress, desc="validate")
        self.cost["eval_seconds"] += time.perf_counter() - t0
        self.cost["users_evaluated"] += len(self.valid[0])
        return out

    @torch.no_grad()
    def choose_fusion_weight(self, table: torch.Tensor) -> dict:
        """``fusion_weight_grid``: the fused score is the ID model's score plus ``w`` x the LLM cosine
        (:meth:`LaserModel.fuse`), so one pass over the validation users gives both parts and every ``w`` of the
        grid is scored from them; sets the model's ``w`` to the best (the first on a tie)."""
        model, grid = self.model, list(self.cfg.fusion_weight_grid or [])
        t0 = time.perf_counter()
        was = model.training
        model.eval()
        hist, targets = self.valid
        d = model.sr.item_vectors().shape[1]
        w0 = float(model.fusion_log_weight.exp())
        users = torch.cat(
            [
                model.embed(list(hist[lo : lo + self.cfg.eval_batch_size])).user_embedding
                for lo in range(0, len(hist), self.cfg.eval_batch_size)
            ]
        )
        model.train(was)
        table = table.to(users.device)
        id_scores = users[:, :d] @ table[:, :d].T  # user rows [u_ID, w n, 0], item rows [v_ID, n, r]
        cosines = (users[:, d:-1] / w0) @ table[:, d:-1].T
        scores = {}
        for w in grid:
            scores[w] = compute_metrics(id_scores + w * cosines, targets)["ndcg@10"]
        chosen = max(grid, key=lambda w: scores[w])
        model.fusion_log_weight.data.fill_(math.log(chosen))
        self.cost["eval_seconds"] += time.perf_counter() - t0
        self.cost["users_evaluated"] += len(hist)
        return {"grid": {str(w): v for w, v in scores.items()}, "chosen": chosen}

    # ------------------------------------------------------------------ fit
    @property
    def _best_table(self) -> torch.Tensor | None:
        """The best validation epoch's item table (the shared trainer keeps it with the best weights)."""
        return self.best_extra.get("table")

    def fit(
        self,
        callbacks: Sequence[Callable[[int, int, dict], None]] = (),
        stages: Sequence[int] = (1, 2),
        table: torch.Tensor | None = None,
    ) -> LaserFitResult:
        """Run the stages in ``stages`` (the pipeline runs them as two steps). Without stage 1 the frozen table
        is ``table`` when given (the stage-1 step's output), else the table of the current weights.
        ``callbacks``: ``callback(stage, epoch, entry)`` after each validated epoch's checkpoint."""
        cfg = self.cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.callbacks = [lambda entry, cb=cb: cb(entry["stage"], entry["epoch"], entry) for cb in callbacks]
        self._best_weights = self.model_state()
        self.best_extra = {}
        state = self.start(self._fit_key(stages, table), stage1_done=False)
        self.users_seen = int(state.get("users_seen", 0))
        best_table = self._best_table
        if self.model.needs_transform_fit():  # once, before any training (a resumed run has it in its weights)
            self.fit_embedding_transform()
            if not state["best"]:
                self._best_weights = self.model_state()

        def record(stage: int, epoch: int, loss: float | None, valid: dict, table: torch.Tensor) -> None:
            nonlocal best_table
            state["users_seen"] = self.users_seen
            entry = {"stage": stage, "epoch": epoch, "loss": loss, "valid": valid, "users_seen": self.users_seen}
            if self.record(entry, stage, best_extra={"table": table}):
                best_table = table

        curve = state["history"].append if cfg.curve_every_users else None

        def tune_fusion(table: torch.Tensor) -> None:
            """Once, before any training: the validation-tuned fusion weight (``fusion_weight_grid``)."""
            if cfg.fusion_weight_grid and self.model.config.fusion != "none" and "fusion_weight" not in state:
                state["fusion_weight"] = self.choose_fusion_weight(table)
                self._best_weights = self.model_state()

        # ---- stage 1: refresh the table every epoch
        if not state["stage1_done"]:
            if 1 in stages and not cfg.skip_stage1 and cfg.stage1_epochs > 0:
                table = self.item_table()
                if state["epoch"] < 0:  # epoch -1: the initial weights, so "best" is never worse than init
                    tune_fusion(table)
                    record(1, -1, None, self.validate(table), table)
                for epoch in range(state["epoch"] + 1, cfg.stage1_epochs):
                    if self.patience_spent(1):
                        break
                    loss = self.train_epoch(table, 1, epoch, on_curve=curve)
                    table = self.item_table()
                    record(1, epoch, loss, self.validate(table), table)
                self.restore_best()
            else:
                best_table = table if table is not None else self.item_table()
            state.update(stage1_done=True, stage=2, epoch=-1)
            if best_table is None:
                best_table = self.item_table()
        frozen = best_table
        # ---- stage 2: the table is frozen
        if 2 in stages and not cfg.skip_stage2 and cfg.stage2_epochs > 0:
            if "2" not in state["best"]:
                self.global_step = self.stage_steps(1)  # the schedule's stage-2 part, as in a separate fit
                tune_fusion(frozen)
                record(2, -1, None, self.validate(frozen), frozen)
            start = state["epoch"] + 1 if state["stage"] == 2 else 0
            for epoch in range(start, cfg.stage2_epochs):
                if self.patience_spent(2):
                    break
                loss = self.train_epoch(frozen, 2, epoch, on_curve=curve)
                record(2, epoch, loss, self.validate(frozen), frozen)
            self.restore_best()
        self.model.eval()
        return self._result(frozen)

    def _result(self, table: torch.Tensor) -> LaserFitResult:
        cost = dict(self.cost)
        cost["items_per_second"] = cost["items_encoded"] / cost["item_seconds"] if cost["item_seconds"] else None
        cost["train_users_per_second"] = (
            cost["users_trained"] / cost["train_seconds"] if cost["train_seconds"] else None
        )
        return LaserFitResult(
            model=self.model,
            item_table=table.cpu(),
            best=self.state["best"],
            history=self.state["history"],
            fusion_weight=self.state.get("fusion_weight"),
            cost=cost,
        )

    def best_so_far(self) -> LaserFitResult:
        """A fit stopped between epochs (an exception from a callback, e.g. a time limit): the best validation
        epoch so far, as :meth:`fit` would return it had the run ended there: its weights loaded into the model
        (eval mode) and its item table (in stage 2: the frozen table)."""
        if self._best_table is None or not self.state.get("best"):
            raise RuntimeError("no validated epoch yet: fit() stopped before its first validation")
        self.restore_best()
        self.model.eval()
        return self._result(self._best_table)


def test_laser(
    model: LaserModel,
    item_table: torch.Tensor,
    split: Split,
    config: LaserTrainConfig,
    stats: dict | None = None,
    mask_history: bool = False,
) -> dict[str, float]:
    """Test metrics with the final weights and the frozen table (optionally on a seeded user sample): the
    evaluation loop of the ID models (:func:`laser_core.evaluation.evaluate`) over :class:`LaserScorer`.
    ``stats``, when given, receives ``expert_counts`` (how often the router picked each expert; None without a
    router). ``mask_history``: each user's history excluded from the ranking."""
    hist, targets = test_examples(split, config)
    scorer = LaserScorer(model, item_table)
    metrics = evaluate(
        scorer, hist, targets, config.eval_batch_size, mask_history=mask_history, progress=config.progress, desc="test"
    )
    if stats is not None:
        stats["expert_counts"] = scorer.expert_counts
    return metrics


def test_examples(split: Split, config: LaserTrainConfig) -> tuple[list[np.ndarray], np.ndarray]:
    """The test (history, target) pairs Laser is scored on: all test users, or the seeded ``test_users``
    sample. Baselines compared with Laser are scored on exactly these pairs."""
    users, hist, targets = split.test_examples()
    keep = _sample(len(users), config.test_users, config.seed + 2)
    return [hist[i] for i in keep], targets[keep]


test_examples.__test__ = False


test_laser.__test__ = False  # not a pytest test
