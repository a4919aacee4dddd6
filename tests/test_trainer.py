"""The one trainer base (laser_core.trainer.Trainer) under both of its trainers, an ID model (SASRec) and Laser, on
tiny models and synthetic data: resume after a kill, early stopping, the best checkpoint, callbacks, old state
files, the non-finite guard."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import tiny_spec
from safetensors.torch import load_file

from laser_core.configuration import MFormerConfig
from laser_core.data.text import TextConfig
from laser_core.model import build_laser
from laser_core.sr import SRConfig, TrainConfig, build_model
from laser_core.sr.trainer import SRTrainer
from laser_core.train import LaserTrainConfig, LaserTrainer


DATA = {"n_users": 120, "n_items": 40, "n_user_types": 4, "seed": 1}  # the `data` fixture's (tests/conftest.py)


class Killed(RuntimeError):
    """Stands for the process being killed in the middle of a mini-batch."""


class SRKind:
    """SASRec on SRTrainer: one stage (1), epochs from 0; callbacks get ``(epoch, entry)``."""

    name = "sr"
    first_epoch = 0

    def __init__(self, data) -> None:
        self.split = data[1]

    def trainer(self, workdir=None, resume: bool = True, **train) -> SRTrainer:
        torch.manual_seed(0)
        model = build_model(SRConfig(model="sasrec", hidden_size=16, max_len=8, dropout=0.1), self.split.n_items)
        cfg = TrainConfig(**{"epochs": 3, "batch_size": 128, "lr": 3e-3, "progress": False, "seed": 2, **train})
        return SRTrainer(model, cfg, self.split, workdir, resume)

    def fit(self, trainer: SRTrainer, callback=None):
        res = trainer.fit(callbacks=[lambda epoch, entry: callback(entry)] if callback else ())
        return res, res.model.state_dict(), None

    def batches_per_epoch(self, trainer: SRTrainer) -> int:
        return -(-len(trainer.sequences) // trainer.train_cfg.batch_size)

    def script_validation(self, trainer, monkeypatch, values: list[float], tables: list) -> None:
        monkeypatch.setattr("laser_core.sr.trainer.evaluate", lambda *a, **k: {"ndcg@10": values.pop(0)})

    def legacy_state(self, trainer: SRTrainer) -> dict:  # what the SR trainer of format 1 wrote
        return {"config_hash": trainer.key, "epoch": 0, "best_epoch": 0, "history": [], "finished": False}


class LaserKind:
    """Laser (tiny Llama, M-Former over an untrained BERT4Rec) on LaserTrainer: stage 1 only unless asked, an
    epoch -1 validation of the initial weights first; callbacks get ``(stage, epoch, entry)``."""

    name = "laser"
    first_epoch = -1

    def __init__(self, data) -> None:
        self.items, self.split = data[0].items, data[1]
        torch.manual_seed(0)
        self.sr = build_model(SRConfig(model="bert4rec", hidden_size=16, max_len=8), self.split.n_items).eval()
        self.spec = tiny_spec(
            TextConfig(history_len=3),
            quant="none",
            mformer=MFormerConfig(n_experts=2, n_query=2, width=16, n_layers=1, n_heads=2),
        )

    def trainer(self, workdir=None, resume: bool = True, **train) -> LaserTrainer:
        cfg = dict(stage1_epochs=2, stage2_epochs=0, batch_size=8, users_per_epoch=16, valid_users=8, lr=1e-3)
        cfg.update(optimizer="adam", schedule="constant", grad_accumulation=1, patience=None, progress=False, seed=2)
        model = build_laser(self.spec, self.items, self.sr)
        return LaserTrainer(model, self.split, LaserTrainConfig(**{**cfg, **train}), workdir=workdir, resume=resume)

    def fit(self, trainer: LaserTrainer, callback=None):
        res = trainer.fit(callbacks=[lambda stage, epoch, entry: callback(entry)] if callback else ())
        return res, res.model.state_dict(), res.item_table

    def batches_per_epoch(self, trainer: LaserTrainer) -> int:
        return -(-trainer.cfg.users_per_epoch // trainer.cfg.batch_size)

    def script_validation(self, trainer, monkeypatch, values: list[float], tables: list) -> None:
        def validate(table):
            tables.append(table.detach().cpu().clone())
            return {"ndcg@10": values.pop(0)}

        trainer.validate = validate

    def legacy_state(self, trainer: LaserTrainer) -> dict:  # what LaserTrainer of format 1 wrote
        key = trainer._fit_key((1, 2), None)
        return {"run_hash": key, "stage": 1, "epoch": 0, "history": [], "best": {}, "stage1_done": False}


@pytest.fixture(params=["sr", "laser"])
def kind(request, data):
    return SRKind(data) if request.param == "sr" else LaserKind(data)


def count_losses(trainer, kill_at: int | None = None) -> list:
    """Counts the trainer's mini-batch losses; with ``kill_at``, that (1-based) mini-batch raises Killed."""
    calls: list = []
    real = trainer.compute_loss

    def compute_loss(batch):
        calls.append(1)
        if len(calls) == kill_at:
            raise Killed
        return real(batch)

    trainer.compute_loss = compute_loss
    return calls


def assert_same(one: dict[str, torch.Tensor], two: dict[str, torch.Tensor]) -> None:
    assert one.keys() == two.keys()
    for k in one:
        assert torch.equal(one[k].cpu(), two[k].cpu()), k


def test_resume_after_a_kill_mid_epoch_continues_from_the_saved_epoch(kind, tmp_path):
    """Killed in the middle of the second epoch: state.json says the first epoch is done; a restarted trainer
    trains only the epochs after it (not the first again) and ends with the uninterrupted run's weights, history
    and (Laser) item table."""
    straight = kind.trainer(tmp_path / "a")
    per_epoch = kind.batches_per_epoch(straight)
    all_calls = count_losses(straight)
    res_a, weights_a, table_a = kind.fit(straight)
    assert len(all_calls) == 3 * per_epoch if kind.name == "sr" else 2 * per_epoch

    killed = kind.trainer(tmp_path / "b")
    count_losses(killed, kill_at=per_epoch + 2)  # the second mini-batch of the second epoch
    with pytest.raises(Killed):
        kind.fit(killed)
    state = json.loads((tmp_path / "b" / "state.json").read_text(encoding="utf8"))
    assert (state["stage"], state["epoch"]) == (1, 0)

    resumed = kind.trainer(tmp_path / "b")
    calls = count_losses(resumed)
    res_b, weights_b, table_b = kind.fit(resumed)
    assert len(calls) == len(all_calls) - per_epoch  # the first epoch was not trained again
    assert [(h["epoch"], h["loss"]) for h in res_b.history] == [(h["epoch"], h["loss"]) for h in res_a.history]
    assert_same(weights_a, weights_b)
    if table_a is not None:
        assert torch.equal(table_a, table_b)


def test_patience_stops_the_best_epoch_is_kept_and_every_epoch_is_called_back(kind, tmp_path, monkeypatch):
    """Validation NDCG@10 0.2, 0.5, 0.4, 0.5 (equal: not better), ...: with patience 2 the run stops after the
    fourth validation; every validated epoch reached the callback after its checkpoint; the model (and the
    checkpoint's best/) ends with the weights of the best validation epoch, Laser with that epoch's table."""
    trainer = kind.trainer(tmp_path, patience=2, **({"epochs": 8} if kind.name == "sr" else {"stage1_epochs": 8}))
    tables: list = []
    kind.script_validation(trainer, monkeypatch, [0.2, 0.5, 0.4, 0.5, 0.9, 0.9, 0.9, 0.9, 0.9], tables)
    seen, snapshots = [], {}

    def callback(entry):
        state = json.loads((tmp_path / "state.json").read_text(encoding="utf8"))
        assert state["epoch"] == entry["epoch"]  # called back after the epoch's checkpoint
        seen.append(entry["epoch"])
        snapshots[entry["epoch"]] = trainer.model_state()

    res, weights, table = kind.fit(trainer, callback)
    first = kind.first_epoch
    assert seen == [first, first + 1, first + 2, first + 3]  # stopped: two epochs without a better one
    best = first + 1
    assert trainer.state["best"]["1"]["epoch"] == best
    assert_same(weights, snapshots[best])
    assert_same(load_file(str(tmp_path / "best" / "model.safetensors")), snapshots[best])
    if kind.name == "sr":
        assert res.best_epoch == best and res.stopped_early and res.best_valid == {"ndcg@10": 0.5}
    else:
        best_table = tables[best - first]
        assert torch.equal(table, best_table)
        assert torch.equal(load_file(str(tmp_path / "best" / "extra.safetensors"))["table"], best_table)
        assert res.best["1"]["epoch"] == best


def test_state_of_the_older_trainer_is_retrained_with_a_warning_naming_it(kind, tmp_path, caplog):
    """A state.json of this very run written before the shared trainer (no format field, the key under its old
    name) cannot be resumed: the run trains from scratch over it (an upgrade must not stop a cached pipeline),
    with a warning naming the file. An old state of another run is simply trained over."""
    trainer = kind.trainer(tmp_path, **({"epochs": 1} if kind.name == "sr" else {"stage1_epochs": 1}))
    (tmp_path / "state.json").write_text(json.dumps(kind.legacy_state(trainer)), encoding="utf8")
    with caplog.at_level("WARNING", logger="laser_core.trainer"):
        res, _, _ = kind.fit(trainer)
    assert [h["epoch"] for h in res.history] == list(range(kind.first_epoch, 1))
    assert json.loads((tmp_path / "state.json").read_text(encoding="utf8"))["format"] == 2
    assert any(
        str(tmp_path / "state.json") in r.getMessage() and "older version" in r.getMessage() for r in caplog.records
    )

    other = kind.legacy_state(trainer)
    other["config_hash" if kind.name == "sr" else "run_hash"] = "another run"
    (tmp_path / "state.json").write_text(json.dumps(other), encoding="utf8")
    res, _, _ = kind.fit(kind.trainer(tmp_path, **({"epochs": 1} if kind.name == "sr" else {"stage1_epochs": 1})))
    assert [h["epoch"] for h in res.history] == list(range(kind.first_epoch, 1))


def test_a_nonfinite_loss_skips_its_step_for_the_id_models_too(data):
    """The shared step's guard: a mini-batch whose loss is NaN is not stepped; the weights stay finite."""
    kind = SRKind(data)
    trainer = kind.trainer(epochs=1, batch_size=32)
    real, calls = trainer.compute_loss, []

    def poisoned(batch):
        calls.append(1)
        loss = real(batch)
        return loss * float("nan") if len(calls) == 2 else loss

    trainer.compute_loss = poisoned
    res = trainer.fit()
    assert len(calls) == kind.batches_per_epoch(trainer) > 2
    assert (trainer.cost["nonfinite_batches"], trainer.cost["skipped_steps"]) == (1, 1)
    assert trainer.global_step == len(calls) and math.isfinite(res.history[0]["loss"])
    assert all(torch.isfinite(v).all() for v in res.model.state_dict().values() if v.is_floating_point())
