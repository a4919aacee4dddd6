"""The official Laser training recipe in LaserTrainer: the learning-rate schedule, gradient accumulation, early
stopping, the resumed step counter, learning-curve entries, AdamW's weight decay (tiny backbone, synthetic data)."""

from __future__ import annotations

import json
import math

import numpy as np
import pydantic
import pytest
import torch
from conftest import PLAIN, tiny_spec

from laser_core.model import build_laser
from laser_core.train import LaserTrainConfig, LaserTrainer, build_optimizer, lr_at

# the data set and ID model of the `data` and `sr` fixtures (tests/conftest.py)
DATA = {"n_users": 120, "n_items": 40, "n_user_types": 4, "seed": 2}
SR = dict(model="bert4rec", hidden_size=16, dropout=0.1, attn_dropout=0.1)
SR_TRAIN = dict(epochs=2, batch_size=64, lr=3e-3)


def make(data, sr):
    return build_laser(tiny_spec(), data[0].items, sr)  # seeded: equal weights on every call


def cfg_(**kw) -> LaserTrainConfig:
    base = dict(progress=False, valid_users=8, item_batch_size=40, eval_batch_size=16)
    return LaserTrainConfig(**{**base, **kw})


def spy_lrs(trainer: LaserTrainer) -> list[float]:
    """The learning rate each optimizer step of ``trainer`` uses (as set on its param groups)."""
    seen: list[float] = []
    step = trainer.optimizer.step

    def recording(*args, **kwargs):
        lrs = {g["lr"] for g in trainer.optimizer.param_groups}
        assert len(lrs) == 1
        seen.append(lrs.pop())
        return step(*args, **kwargs)

    trainer.optimizer.step = recording
    return seen


# ------------------------------------------------------------------------------------------- config
def test_defaults_are_the_official_recipe_and_the_config_stays_strict(data, sr):
    cfg = LaserTrainConfig()
    assert (
        cfg.optimizer,
        cfg.weight_decay,
        cfg.schedule,
        cfg.warmup_steps,
        cfg.warmup_start_lr,
        cfg.min_lr,
        cfg.grad_accumulation,
        cfg.patience,
        cfg.curve_every_users,
    ) == ("adamw", 0.05, "cosine", 500, 1e-6, 1e-5, 8, 3, None)
    assert (cfg.lr, cfg.batch_size, cfg.batch_size * cfg.grad_accumulation) == (1e-4, 4, 32)
    for bad in (
        {"optimizer": "sgd"},
        {"schedule": "linear"},
        {"grad_accumulation": 0},
        {"patience": 0},
        {"warmup": 10},
        {"patience": "3"},
    ):
        with pytest.raises(pydantic.ValidationError):
            LaserTrainConfig(**bad)
    # every new knob is in the run key
    _, split = data
    base = cfg_(**PLAIN)
    key = LaserTrainer(make(data, sr), split, base).run_hash()
    for change in (
        {"optimizer": "adamw"},
        {"weight_decay": 0.1},
        {"schedule": "cosine"},
        {"warmup_steps": 7},
        {"warmup_start_lr": 1e-7},
        {"min_lr": 1e-6},
        {"grad_accumulation": 2},
        {"patience": 2},
        {"curve_every_users": 8},
    ):
        assert LaserTrainer(make(data, sr), split, base.model_copy(update=change)).run_hash() != key, change


# ------------------------------------------------------------------------------------------ schedule
def test_lr_schedule_hand_computed():
    cfg = LaserTrainConfig(lr=1e-4, warmup_start_lr=1e-6, min_lr=1e-5, warmup_steps=4)
    planned = 10  # steps 0..9: warm-up 0..4, cosine 4..9 (5 intervals)
    expected = {
        0: 1e-6,  # warmup_start_lr
        1: 2.575e-5,  # 1e-6 + 99e-6 * 1/4
        2: 5.05e-5,  # 1e-6 + 99e-6 * 2/4
        3: 7.525e-5,
        4: 1e-4,  # lr at warmup_steps
        5: 9.140576474687264e-5,  # 1e-5 + 9e-5 * (1 + cos(pi/5)) / 2
        6: 6.890576474687264e-5,  # 1e-5 + 9e-5 * (1 + cos(2pi/5)) / 2
        7: 4.109423525312737e-5,
        8: 1.859423525312737e-5,
        9: 1e-5,  # min_lr at the last planned step
        12: 1e-5,  # past the plan: stays at min_lr
    }
    for step, lr in expected.items():
        assert lr_at(step, planned, cfg) == pytest.approx(lr, rel=1e-9, abs=0), step
    # warm-up capped to the plan: a 3-step run still reaches lr (at its last step)
    short = LaserTrainConfig(lr=1e-4, warmup_start_lr=1e-6, min_lr=1e-5)  # warmup_steps 500
    assert [lr_at(s, 3, short) for s in range(3)] == pytest.approx([1e-6, 5.05e-5, 1e-4], rel=1e-9)
    constant = cfg.model_copy(update={"schedule": "constant"})
    assert {lr_at(s, planned, constant) for s in range(12)} == {1e-4}


def test_planned_steps_cover_both_stages_of_the_run(data, sr):
    _, split = data
    model = make(data, sr)
    t = LaserTrainer(
        model, split, cfg_(stage1_epochs=2, stage2_epochs=3, batch_size=4, grad_accumulation=3, users_per_epoch=16)
    )
    assert t.steps_per_epoch() == 2  # 16 users / 4 = 4 mini-batches -> steps after 3 and 4
    assert (t.stage_steps(1), t.stage_steps(2), t.planned_steps) == (4, 6, 10)
    t = LaserTrainer(
        model,
        split,
        cfg_(stage1_epochs=2, stage2_epochs=3, batch_size=4, grad_accumulation=3, users_per_epoch=16, skip_stage1=True),
    )
    assert t.planned_steps == 6
    t = LaserTrainer(model, split, cfg_(stage1_epochs=1, stage2_epochs=1, batch_size=4, grad_accumulation=3))
    n = len(t.train_users)  # no users_per_epoch: every training user
    assert n > 16 and t.planned_steps == 2 * math.ceil(math.ceil(n / 4) / 3)


# ------------------------------------------------------------------------------------ accumulation
def _one_step_update(data, sr, table, batch_size: int, accumulation: int) -> dict[str, torch.Tensor]:
    """The weight change of one epoch of 4 users (one optimizer step), through SGD (update = -lr x gradient:
    the accumulated gradient itself, where Adam's first step would be about lr x its sign)."""
    _, split = data
    model = make(data, sr)
    cfg = cfg_(
        users_per_epoch=4, batch_size=batch_size, lb_weight=0.0, lr=1e-2, **{**PLAIN, "grad_accumulation": accumulation}
    )
    trainer = LaserTrainer(model, split, cfg)
    trainer.optimizer = torch.optim.SGD(model.trainable_parameters(), lr=cfg.lr)
    before = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
    trainer.train_epoch(table, 2, 0)
    assert trainer.global_step == 1
    return {k: v.detach() - before[k] for k, v in model.named_parameters() if v.requires_grad}


@pytest.mark.parametrize("batch_size,accumulation", [(2, 2), (2, 3), (1, 4)])
def test_accumulated_step_equals_one_big_batch(data, sr, batch_size, accumulation):
    """Batch 2 x accumulation 2 (and a partial group: 2 mini-batches of an accumulation of 3, scaled by 1/2; and
    4 mini-batches of 1) take the step of one mini-batch of the same 4 users."""
    _, split = data
    table = LaserTrainer(make(data, sr), split, cfg_()).item_table()
    ref = _one_step_update(data, sr, table, 4, 1)
    got = _one_step_update(data, sr, table, batch_size, accumulation)
    assert max(float(v.abs().max()) for v in ref.values()) > 1e-3  # a real update to compare
    for k, v in ref.items():
        assert torch.allclose(got[k], v, atol=1e-6, rtol=0), (k, float((got[k] - v).abs().max()))


def test_accumulation_steps_every_group_and_at_the_end_of_the_epoch(data, sr):
    _, split = data
    trainer = LaserTrainer(
        make(data, sr), split, cfg_(users_per_epoch=10, batch_size=2, **{**PLAIN, "grad_accumulation": 2})
    )
    steps = []
    real = trainer.optimizer_step
    trainer.optimizer_step = lambda: (
        steps.append(sum(p.grad is not None for p in trainer.model.trainable_parameters())),
        real(),
    )[1]
    trainer.train_epoch(trainer.item_table(), 2, 0)  # 5 mini-batches: steps after 2, 4 and 5
    assert len(steps) == 3 == trainer.global_step == trainer.steps_per_epoch()
    assert all(n > 0 for n in steps)


# ---------------------------------------------------------------------------------- early stopping
def _fake_training(trainer: LaserTrainer, values: list[float], calls: list) -> None:
    """validate returns ``values`` in order; train_epoch only records (stage, epoch); tables are zeros."""
    table = torch.zeros(trainer.split.n_items, 64)
    trainer.item_table = lambda: table
    trainer.validate = lambda table: {"ndcg@10": values.pop(0)}
    trainer.train_epoch = lambda table, stage, epoch, on_curve=None: calls.append((stage, epoch)) or 0.5


def test_early_stopping_ends_a_stage_after_patience_epochs_without_improvement(data, sr):
    _, split = data
    calls: list = []
    trainer = LaserTrainer(make(data, sr), split, cfg_(stage1_epochs=8, stage2_epochs=8, patience=2))
    # stage 1: -1: 0.5, 0: 0.4, 1: 0.6 (best), 2: 0.6 (equal: no improvement), 3: 0.1 -> stop
    # stage 2: -1: 0.3 (best), 0: 0.2, 1: 0.29 -> stop
    _fake_training(trainer, [0.5, 0.4, 0.6, 0.6, 0.1, 0.3, 0.2, 0.29], calls)
    res = trainer.fit()
    assert calls == [(1, 0), (1, 1), (1, 2), (1, 3), (2, 0), (2, 1)]
    assert res.best["1"]["epoch"] == 1 and res.best["2"]["epoch"] == -1
    # without patience every epoch trains
    calls = []
    trainer = LaserTrainer(make(data, sr), split, cfg_(stage1_epochs=4, stage2_epochs=3, patience=None))
    _fake_training(trainer, [1.0 - 0.01 * i for i in range(9)], calls)
    trainer.fit()
    assert calls == [(1, e) for e in range(4)] + [(2, e) for e in range(3)]


def test_early_stopping_count_survives_a_resume(data, sr, tmp_path):
    _, split = data
    cfg = cfg_(stage1_epochs=8, stage2_epochs=8, patience=3)

    class Crash(RuntimeError):
        pass

    def crash(stage, epoch, entry):
        if (stage, epoch) == (1, 1):
            raise Crash

    values = [1.0 - 0.01 * i for i in range(20)]  # never improves on epoch -1
    calls: list = []
    first = LaserTrainer(make(data, sr), split, cfg, workdir=tmp_path)
    _fake_training(first, values, calls)
    with pytest.raises(Crash):
        first.fit(callbacks=[crash])
    assert calls == [(1, 0), (1, 1)]
    calls.clear()
    again = LaserTrainer(make(data, sr), split, cfg, workdir=tmp_path)
    _fake_training(again, values, calls)
    again.fit()
    assert calls == [(1, 2), (2, 0), (2, 1), (2, 2)]  # one more stage-1 epoch, not three


# ------------------------------------------------------------------------------- step counter/resume
RESUME = dict(
    stage1_epochs=2,
    stage2_epochs=2,
    batch_size=4,
    grad_accumulation=2,
    users_per_epoch=16,
    warmup_steps=3,
    lr=1e-3,
    min_lr=1e-4,
    patience=None,
    seed=5,
)


def test_resume_continues_the_schedule_from_the_saved_step(data, sr, tmp_path):
    _, split = data
    cfg = cfg_(**RESUME)
    straight = LaserTrainer(make(data, sr), split, cfg, workdir=tmp_path / "a")
    lrs = spy_lrs(straight)
    result = straight.fit()
    assert straight.planned_steps == 8 and straight.global_step == 8
    expected = [lr_at(s, 8, cfg) for s in range(8)]
    assert lrs == pytest.approx(expected, rel=1e-12)
    assert len(set(lrs)) == 8 and lrs[3] == pytest.approx(1e-3) and lrs[7] == pytest.approx(1e-4)

    class Crash(RuntimeError):
        pass

    def crash(stage, epoch, entry):
        if (stage, epoch) == (2, 0):
            raise Crash

    with pytest.raises(Crash):
        LaserTrainer(make(data, sr), split, cfg, workdir=tmp_path / "b").fit(callbacks=[crash])
    assert json.loads((tmp_path / "b" / "state.json").read_text())["global_step"] == 6
    resumed = LaserTrainer(make(data, sr), split, cfg, workdir=tmp_path / "b")
    after = spy_lrs(resumed)
    out = resumed.fit()
    assert after == pytest.approx(lrs[6:], rel=1e-12) and resumed.global_step == 8
    assert [(h["stage"], h["epoch"], h["loss"]) for h in out.history] == [
        (h["stage"], h["epoch"], h["loss"]) for h in result.history
    ]
    for k, v in result.model.state_dict().items():
        assert torch.equal(v, out.model.state_dict()[k]), k


def test_stage2_as_its_own_fit_continues_where_the_planned_stage1_ends(data, sr):
    """The pipeline runs the stages as two fits: stage 2's steps use the schedule's stage-2 part."""
    _, split = data
    cfg = cfg_(**RESUME)
    one = LaserTrainer(make(data, sr), split, cfg)
    table = one.fit(stages=(1,)).item_table
    two = LaserTrainer(make(data, sr), split, cfg)
    two.model.load_state_dict(one.model.state_dict())
    lrs = spy_lrs(two)
    two.fit(stages=(2,), table=table)
    assert lrs == pytest.approx([lr_at(s, 8, cfg) for s in range(4, 8)], rel=1e-12)


# ---------------------------------------------------------------------------------- learning curves
def test_curve_entries_every_n_users_leave_training_and_best_unchanged(data, sr):
    _, split = data
    base = dict(
        stage1_epochs=1, stage2_epochs=1, batch_size=4, grad_accumulation=2, users_per_epoch=16, patience=None, seed=2
    )
    plain = LaserTrainer(make(data, sr), split, cfg_(**base)).fit()
    curved = LaserTrainer(make(data, sr), split, cfg_(**base, curve_every_users=8)).fit()
    curve = [h for h in curved.history if h.get("curve")]
    epochs = [h for h in curved.history if not h.get("curve")]
    assert [(h["stage"], h["epoch"], h["users_seen"]) for h in curve] == [(1, 0, 8), (1, 0, 16), (2, 0, 24), (2, 0, 32)]
    assert [(h["stage"], h["epoch"], h["users_seen"]) for h in epochs] == [
        (1, -1, 0),
        (1, 0, 16),
        (2, -1, 16),
        (2, 0, 32),
    ]
    assert epochs == plain.history and curved.best == plain.best
    # the last stage-2 curve point: the same weights and frozen table as the epoch's validation
    assert curve[-1]["valid"] == epochs[-1]["valid"]
    for k, v in plain.model.state_dict().items():
        assert torch.equal(v, curved.model.state_dict()[k]), k


def test_curve_entries_never_become_best_nor_reset_patience(data, sr):
    _, split = data
    trainer = LaserTrainer(
        make(data, sr),
        split,
        cfg_(
            stage1_epochs=5,
            skip_stage2=True,
            batch_size=4,
            grad_accumulation=1,
            users_per_epoch=8,
            patience=1,
            curve_every_users=4,
        ),
    )
    inside = {"epoch": False}
    epoch_values = [0.5, 0.4, 0.3, 0.2]
    trainer.validate = lambda table: {"ndcg@10": 0.9 if inside["epoch"] else epoch_values.pop(0)}
    real = trainer.train_epoch

    def train_epoch(*args, **kwargs):
        inside["epoch"] = True
        try:
            return real(*args, **kwargs)
        finally:
            inside["epoch"] = False

    trainer.train_epoch = train_epoch
    res = trainer.fit()
    curve = [h for h in res.history if h.get("curve")]
    assert [h["users_seen"] for h in curve] == [4, 8] and all(h["valid"]["ndcg@10"] == 0.9 for h in curve)
    assert res.best["1"] == {"epoch": -1, "valid": {"ndcg@10": 0.5}}
    assert [h["epoch"] for h in res.history if not h.get("curve")] == [-1, 0]  # patience 1: one epoch


# ------------------------------------------------------------------------------------- weight decay
def test_adamw_decays_only_weights_of_two_or_more_dims(data, sr):
    _, split = data
    model = make(data, sr)
    trainer = LaserTrainer(model, split, cfg_(optimizer="adamw", weight_decay=0.5, schedule="constant", lr=0.1))
    assert isinstance(trainer.optimizer, torch.optim.AdamW)
    named = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    groups = {g["weight_decay"]: {named[id(p)] for p in g["params"]} for g in trainer.optimizer.param_groups}
    shapes = {n: p.ndim for n, p in model.named_parameters() if p.requires_grad}
    assert groups[0.5] == {n for n, d in shapes.items() if d >= 2}
    assert groups[0.0] == {n for n, d in shapes.items() if d < 2}
    assert "suffix" in groups[0.0] and any(n.endswith("bias") for n in groups[0.0])
    assert any(".ln" in n for n in groups[0.0]) and "mformer.experts" in groups[0.5]
    # one step on zero gradients: Adam's part is 0, so >= 2-D weights shrink by (1 - lr * wd) and the rest stay
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for p in model.trainable_parameters():
        p.grad = torch.zeros_like(p)
    trainer.optimizer_step()
    for n, p in model.named_parameters():
        if p.requires_grad:
            want = before[n] * (1 - 0.1 * 0.5) if shapes[n] >= 2 else before[n]
            assert torch.allclose(p.detach(), want, rtol=1e-6, atol=0), n
            assert shapes[n] < 2 or not torch.equal(p.detach(), before[n]), n


def test_adam_option_and_a_model_without_two_dim_weights():
    suffix_only = [torch.nn.Parameter(torch.ones(4))]
    opt = build_optimizer(suffix_only, LaserTrainConfig(optimizer="adam"))
    assert type(opt) is torch.optim.Adam and [g["weight_decay"] for g in opt.param_groups] == [0.0]
    both = [torch.nn.Parameter(torch.ones(3, 2)), torch.nn.Parameter(torch.ones(2))]
    opt = build_optimizer(both, LaserTrainConfig(optimizer="adam", weight_decay=0.1))
    assert [(g["weight_decay"], [tuple(p.shape) for p in g["params"]]) for g in opt.param_groups] == [
        (0.1, [(3, 2)]),
        (0.0, [(2,)]),
    ]
    assert np.isclose(opt.param_groups[0]["lr"], 1e-4)


def test_the_fusion_scalars_step_at_their_scaled_rate():
    from laser_core.trainer import Trainer

    matrix, bias, log_w = (
        torch.nn.Parameter(torch.ones(3, 2)),
        torch.nn.Parameter(torch.ones(2)),
        torch.nn.Parameter(torch.zeros(())),
    )
    # scale 1 (the default): the two groups as before, the scalar among the 1-D weights
    assert len(build_optimizer([matrix, bias, log_w], LaserTrainConfig(), scaled=[log_w]).param_groups) == 2
    opt = build_optimizer([matrix, bias, log_w], LaserTrainConfig(optimizer="adam", fusion_lr_scale=50.0), [log_w])
    assert [len(g["params"]) for g in opt.param_groups] == [1, 1, 1] and opt.param_groups[2]["params"][0] is log_w
    assert np.isclose(opt.param_groups[2]["lr"], 5e-3)

    class Constant(Trainer):
        def current_lr(self):
            return 1e-3

    class Model(torch.nn.Module):
        def calculate_loss(self, batch):
            raise AssertionError("not called")

    trainer = Constant(Model(), opt, progress=False)
    for p in (matrix, bias, log_w):
        p.grad = torch.ones_like(p)
    trainer.optimizer_step()
    assert np.allclose([g["lr"] for g in opt.param_groups], [1e-3, 1e-3, 5e-2])
    # Adam's first step moves each weight by its group's rate
    assert np.isclose(float(log_w), -5e-2, rtol=1e-3) and np.allclose(bias.detach().numpy(), 1 - 1e-3, rtol=1e-3)


# ---------------------------------------------------------------------------------- length grouping
def test_group_by_length_deals_the_same_examples_into_steps_of_similar_length(data, sr):
    base = cfg_(batch_size=4, grad_accumulation=2)
    grouped = cfg_(batch_size=4, grad_accumulation=2, group_by_length=24)
    plain = LaserTrainer(make(data, sr), data[1], base)
    sorted_ = LaserTrainer(make(data, sr), data[1], grouped)
    assert plain.run_hash() != sorted_.run_hash()  # a different run, and its own checkpoints
    h0, t0 = plain.examples(1, 3)
    h1, t1 = sorted_.examples(1, 3)
    pairs = lambda h, t: sorted((tuple(x.tolist()), int(y)) for x, y in zip(h, t))  # noqa: E731
    assert pairs(h0, t0) == pairs(h1, t1)  # the same cuts and targets, another order
    step = 8
    full = len(h1) // step * step

    def padded(h):  # the items a padded batch of 4 holds, summed over the epoch
        return sum(max(len(x) for x in h[lo : lo + 4]) * len(h[lo : lo + 4]) for lo in range(0, len(h), 4))

    assert padded(h1) < padded(h0)
    for lo in range(0, full, step):  # each whole step comes from one length-sorted group
        lens = [len(x) for x in h1[lo : lo + step]]
        assert lens == sorted(lens, reverse=True)
    assert sorted_.examples(1, 3)[1].tolist() == t1.tolist()  # seeded
    assert sorted_.examples(1, 4)[1].tolist() != t1.tolist()


# ------------------------------------------------------------------------------- non-finite guard
def test_a_nonfinite_loss_skips_its_step_and_leaves_the_weights_finite(data, sr):
    trainer = LaserTrainer(make(data, sr), data[1], cfg_(**{**PLAIN, "batch_size": 8, "users_per_epoch": 32}))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    real, calls = trainer.compute_loss, []

    def poisoned(batch):  # the second mini-batch's loss is NaN (as a bad bf16 batch would be)
        calls.append(1)
        loss = real(batch)
        return loss * float("nan") if len(calls) == 2 else loss

    trainer.compute_loss = poisoned
    table = trainer.item_table()
    loss = trainer.train_epoch(table, 1, 0)
    assert len(calls) == 4 and math.isfinite(loss)
    assert (trainer.cost["nonfinite_batches"], trainer.cost["skipped_steps"], trainer.global_step) == (1, 1, 4)
    after = trainer.model.state_dict()
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())
    assert any(not torch.equal(before[k], after[k]) for k in after)  # the three good steps did train
