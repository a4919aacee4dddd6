"""Laser itself on tiny backbones and synthetic data: Bi-Tuning, M-Former, losses, two-stage training."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import PLAIN, SMALL_MF, tiny_spec

from laser_core.llm import BackboneConfig, quantized_linear_share
from laser_core.losses import iic_loss, load_balancing_loss
from laser_core.mformer import MFormer, MFormerConfig, Router
from laser_core.model import build_laser
from laser_core.evaluation import evaluate_split
from laser_core.sr import SRConfig, build_model
from laser_core.train import LaserTrainConfig, LaserTrainer, test_examples, test_laser

# one short run of both stages on a few users (the tests that check mechanics, not learning)
SHORT = dict(
    stage1_epochs=1,
    stage2_epochs=1,
    batch_size=8,
    lr=1e-3,
    users_per_epoch=16,
    valid_users=8,
    progress=False,
    item_batch_size=40,
)


# the data set and ID model of the `data` and `sr` fixtures (tests/conftest.py)
DATA = {"n_users": 400, "n_items": 80, "n_user_types": 4, "seed": 2}
SR = dict(model="bert4rec", hidden_size=16, dropout=0.1, attn_dropout=0.1)
SR_TRAIN = dict(epochs=20, batch_size=64, lr=3e-3)


def make(data, sr, **kw):
    ds, _ = data
    return build_laser(tiny_spec(**kw), ds.items, sr)


def llm_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.llm.state_dict().items()}


# --------------------------------------------------------------------------- backbone
@pytest.mark.parametrize("name", ["tiny-random-llama", "tiny-random-gpt2"])
def test_every_backbone_linear_is_4bit_with_nf4(data, sr, name):
    model = make(data, sr, name=name)
    quant, total = quantized_linear_share(model.llm)
    assert total > 0 and quant == total
    assert all(not p.requires_grad for p in model.llm.parameters())
    plain = make(data, sr, name=name, quant="none")
    assert quantized_linear_share(plain.llm)[0] == 0
    assert model.backbone.memory_bytes() < plain.backbone.memory_bytes()


def test_int8_switch_quantizes_and_passes_gradients(data, sr):
    model = make(data, sr, quant="int8")
    quant, total = quantized_linear_share(model.llm)
    assert quant == total > 0
    emb = model.embed([[1, 2]]).user_embedding
    emb.sum().backward()
    assert model.suffix.grad.abs().sum() > 0


# -------------------------------------------------------------------------- Bi-Tuning
def test_suffix_embedding_equals_hand_built_forward(data, sr):
    model = make(data, sr).eval()
    hist = [3, 7, 11]
    text = model.formatter.user_text(hist)
    ids = torch.tensor([model.tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        L = model.sr.config.max_len
        item_ids = torch.zeros(1, L, dtype=torch.long)
        mask = torch.zeros(1, L, dtype=torch.bool)
        item_ids[0, -3:] = torch.tensor(hist)
        mask[0, -3:] = True
        prefix, _ = model.mformer(model.sr.encode(item_ids, mask), mask)
        embeds = torch.cat([prefix, model.llm.get_input_embeddings()(ids), model.suffix[None, None]], dim=1)
        expected = model.llm.base_model(inputs_embeds=embeds).last_hidden_state[:, -1]
        got = model.embed([hist]).user_embedding
    assert torch.allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("pooling", ["suffix", "mean", "eos"])
def test_padding_does_not_change_a_rows_embedding(data, sr, pooling):
    model = make(data, sr, pooling=pooling).eval()
    with torch.no_grad():
        alone = model.embed([[5]]).user_embedding
        batched = model.embed([[5], [1, 2, 3, 4, 9, 10]]).user_embedding
        table = model.embed_items([0, 5, 9], batch_size=2)
    assert torch.allclose(alone[0], batched[0], atol=1e-5)
    assert torch.allclose(alone[0], table[1], atol=1e-5)


def test_only_trainable_parts_get_gradients_and_backbone_is_bit_identical(data, sr):
    _, split = data
    model = make(data, sr)
    llm_before, sr_before = llm_state(model), {k: v.clone() for k, v in model.sr.state_dict().items()}
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(n == "suffix" or n.startswith("mformer.") for n in names)
    cfg = LaserTrainConfig(**SHORT)
    trainer = LaserTrainer(model, split, cfg)
    table = trainer.item_table()
    out = model.embed([[1, 2], [3]])
    emb, route = out.user_embedding, out.router
    (iic_loss(emb, table, torch.tensor([4, 5])) + 0.01 * load_balancing_loss(route.probs, route.mask)).backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, n
    assert all(p.grad is None for p in model.llm.parameters()) and all(p.grad is None for p in model.sr.parameters())
    model.zero_grad()
    trainer.fit()
    for k, v in llm_state(model).items():
        assert torch.equal(v, llm_before[k]), k
    for k, v in model.sr.state_dict().items():
        assert torch.equal(v, sr_before[k]), k


def test_prefix_gradients_survive_an_item_table_refresh_nf4(data, sr):
    """bitsandbytes' NF4 CPU path zeroes input gradients after an eval-mode forward; ours must not."""
    _, split = data
    model = make(data, sr)
    trainer = LaserTrainer(model, split, LaserTrainConfig(progress=False))
    for _ in range(2):
        trainer.item_table()  # no-grad refresh of the whole table
        model.train()
        model.zero_grad()
        emb = model.embed([[1, 2, 3]]).user_embedding
        emb.sum().backward()
        assert model.mformer.experts.grad.abs().sum() > 0
        assert model.suffix.grad.abs().sum() > 0


# --------------------------------------------------------------------------- M-Former
def test_router_hand_computed():
    router = Router(sr_dim=2, n_experts=3)
    with torch.no_grad():
        router.proj.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
    collab = torch.tensor([[[2.0, 0.0], [0.0, 0.0], [9.0, 9.0]]])  # last position is padding
    mask = torch.tensor([[True, True, False]])
    out = router(collab, mask)
    e2 = math.exp(2)
    p0 = torch.tensor([e2, 1, 1]) / (e2 + 2)
    p1 = torch.tensor([1.0, 1, 1]) / 3
    assert torch.allclose(out.probs[0, 0], p0) and torch.allclose(out.probs[0, 1], p1)
    assert torch.allclose(out.scores[0], (p0 + p1) / 2)  # mean over the two real positions only
    assert out.selected.tolist() == [0]


def test_mformer_shapes_cross_attention_every_other_block_and_top1():
    mf = MFormer(
        MFormerConfig(n_experts=3, n_query=5, width=16, n_layers=4, n_heads=2, dropout=0.0), sr_dim=8, llm_hidden=24
    ).eval()
    assert [b.cross for b in mf.blocks] == [True, False, True, False]
    collab = torch.randn(2, 6, 8)
    mask = torch.ones(2, 6, dtype=torch.bool)
    prefix, route = mf(collab, mask)
    assert prefix.shape == (2, 5, 24)
    # the prefix depends only on the selected expert's queries
    with torch.no_grad():
        others = [e for e in range(3) if e != route.selected[0]]
        mf.experts[others] += 1.0
    assert torch.allclose(mf(collab[:1], mask[:1])[0], prefix[:1], atol=1e-5)
    prefix.sum().backward()
    assert mf.router.proj.weight.grad.abs().sum() > 0  # straight-through gate reaches the router


# ----------------------------------------------------------------------------- losses
def test_iic_loss_hand_computed():
    users = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    items = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    tau = 0.5
    cos = torch.tensor([[1.0, 0.0, 1 / math.sqrt(2)], [0.0, 1.0, 1 / math.sqrt(2)]])
    expected = -(torch.log_softmax(cos / tau, dim=1)[[0, 1], [2, 1]]).mean()
    assert torch.allclose(iic_loss(users, items, torch.tensor([2, 1]), tau), expected)


def test_load_balancing_loss_hand_computed():
    probs = torch.tensor([[[0.7, 0.3], [0.4, 0.6], [0.5, 0.5]]])
    mask = torch.tensor([[True, True, False]])
    # f = (1/2, 1/2) (argmax 0 then 1); P = (0.55, 0.45); K = 2 -> 2 * (0.275 + 0.225) = 1.0
    assert torch.isclose(load_balancing_loss(probs, mask), torch.tensor(1.0))
    collapsed = torch.tensor([[[0.9, 0.1], [0.8, 0.2]]])
    # f = (1, 0), P = (0.85, 0.15) -> 2 * 0.85
    assert torch.isclose(load_balancing_loss(collapsed, torch.ones(1, 2, dtype=torch.bool)), torch.tensor(1.7))


# ---------------------------------------------------------------------------- ablations
def test_ablation_switches_change_exactly_their_parts(data, sr):
    full = make(data, sr)
    no_moe = build_laser(
        tiny_spec(mformer=SMALL_MF.model_copy(update={"n_experts": 1})),
        data[0].items,
        sr,
    )
    plain = make(data, sr, prefix="plain")
    none = make(data, sr, prefix="none")
    mean = make(data, sr, pooling="mean")
    eos = make(data, sr, pooling="eos")
    assert full.mformer.experts.shape[0] == 2 and no_moe.mformer.experts.shape[0] == 1
    assert {n.split(".")[0] for n, _ in plain.named_parameters()} == {"plain", "suffix"} and plain.sr is None
    assert {n for n, _ in none.named_parameters()} == {"suffix"}
    assert mean.suffix is None and eos.suffix is None and "suffix" not in dict(eos.named_parameters())
    assert set(mean.state_dict()) == set(full.state_dict()) - {"suffix"}
    sasrec = build_model(SRConfig(model="sasrec", hidden_size=24), data[0].n_items)
    with_sasrec = make(data, sasrec)
    assert with_sasrec.mformer.router.proj.in_features == 24
    assert with_sasrec.mformer.blocks[0].cross_attn.kdim == 24
    with torch.no_grad():
        for m in (full, plain, none, mean, eos):
            m.eval()
            assert m.embed([[1, 2]]).user_embedding.shape == (1, 64)
        # eos pooling feeds the tokenizer's EOS embedding where the trainable suffix would be
        assert torch.equal(eos.eos_embedding, full.suffix.detach())


@pytest.mark.parametrize("switch", ["skip_stage1", "skip_stage2"])
def test_stage_switches(data, sr, switch):
    _, split = data
    cfg = LaserTrainConfig(
        stage1_epochs=1,
        stage2_epochs=1,
        batch_size=8,
        users_per_epoch=16,
        valid_users=16,
        progress=False,
        **{switch: True},
    )
    res = LaserTrainer(make(data, sr), split, cfg).fit()
    stages = {h["stage"] for h in res.history}
    assert stages == ({2} if switch == "skip_stage1" else {1})


# ----------------------------------------------------------------------- training
def test_resume_gives_the_same_result(data, sr, tmp_path):
    _, split = data
    cfg = LaserTrainConfig(
        stage1_epochs=2,
        stage2_epochs=2,
        batch_size=8,
        lr=1e-3,
        users_per_epoch=16,
        valid_users=8,
        progress=False,
        seed=5,
        item_batch_size=40,
    )
    straight = LaserTrainer(make(data, sr), split, cfg, workdir=tmp_path / "a").fit()

    class Crash(RuntimeError):
        pass

    def crash(stage, epoch, entry):
        if (stage, epoch) == (2, 0):
            raise Crash

    with pytest.raises(Crash):
        LaserTrainer(make(data, sr), split, cfg, workdir=tmp_path / "b").fit(callbacks=[crash])
    assert json.loads((tmp_path / "b" / "state.json").read_text())["stage"] == 2
    resumed = LaserTrainer(make(data, sr), split, cfg, workdir=tmp_path / "b").fit()
    key = [(h["stage"], h["epoch"], h["loss"]) for h in straight.history]
    assert [(h["stage"], h["epoch"], h["loss"]) for h in resumed.history] == key
    assert torch.equal(straight.item_table, resumed.item_table)
    for k, v in straight.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k


# ------------------------------------------------- private checkpoints are reused only for the same content
CACHE = dict(SHORT, seed=4)
TRAINED = [(1, -1), (1, 0), (2, -1), (2, 0)]  # the entries a full fit records (validations and epochs)


def _fit_counting(trainer):
    """``fit`` and the (stage, epoch) entries it recorded in this call (a reloaded finished run records none)."""
    recorded: list[tuple[int, int]] = []
    result = trainer.fit(callbacks=[lambda stage, epoch, entry: recorded.append((stage, epoch))])
    return result, recorded


def _sr_copy(sr, nudge: float = 0.0):
    """A copy of the frozen SR encoder, with one item's ID embedding moved by ``nudge``."""
    copy = build_model(sr.config, sr.n_items)
    copy.load_state_dict(sr.state_dict())
    with torch.no_grad():
        copy.item_emb.weight[5] += nudge
    return copy.eval()


def test_an_unchanged_rerun_reloads_the_finished_run(data, sr, tmp_path):
    _, split = data
    cfg = LaserTrainConfig(**CACHE)
    first, recorded = _fit_counting(LaserTrainer(make(data, sr), split, cfg, workdir_root=tmp_path))
    assert recorded == TRAINED
    trainer = LaserTrainer(make(data, _sr_copy(sr)), split, cfg, workdir_root=tmp_path)  # equal content
    again, recorded = _fit_counting(trainer)
    assert recorded == [] and again.history == first.history and again.cost == first.cost
    assert torch.equal(again.item_table, first.item_table)
    for k, v in first.model.state_dict().items():
        assert torch.equal(v, again.model.state_dict()[k]), k


def test_new_sr_weights_make_the_next_run_train_again(data, sr, tmp_path):
    """Retraining the frozen encoder must not return a Laser trained against the old one, even in the same
    checkpoint folder: the key inside it (state.json) covers the SR weights."""
    _, split = data
    cfg = LaserTrainConfig(**CACHE)
    old = LaserTrainer(make(data, sr), split, cfg, workdir=tmp_path / "run")
    _fit_counting(old)
    new = LaserTrainer(make(data, _sr_copy(sr, nudge=0.5)), split, cfg, workdir=tmp_path / "run")
    assert new.run_hash() != old.run_hash()
    result, recorded = _fit_counting(new)
    assert recorded == TRAINED and result.cost["users_trained"] == 2 * 16
    again, recorded = _fit_counting(
        LaserTrainer(make(data, _sr_copy(sr, nudge=0.5)), split, cfg, workdir=tmp_path / "run")
    )
    assert recorded == [] and again.history == result.history  # and that run is reused as such


def test_an_edited_item_title_makes_the_next_run_train_again(data, sr, tmp_path):
    from laser_core.data.text import TextFormatter
    from laser_core.model import LaserModel

    ds, split = data
    cfg = LaserTrainConfig(**CACHE)
    items = ds.items.copy()
    items.loc[7, "title"] = items.loc[7, "title"] + " (2nd edition)"
    # the item texts alone are in the key: the same backbone object, only the catalogue differs
    model = make(data, sr)
    torch.manual_seed(tiny_spec().seed)
    same_backbone = LaserModel(
        model.backbone, sr, TextFormatter(items, model.formatter.config, tokenizer=model.tokenizer), model.config
    )
    assert same_backbone.backbone.content_fingerprint() == model.backbone.content_fingerprint()
    assert same_backbone.weights_fingerprint() != model.weights_fingerprint()
    # and a run on the edited catalogue trains again in the folder of the old one
    _fit_counting(LaserTrainer(model, split, cfg, workdir=tmp_path / "run"))
    edited = LaserTrainer(build_laser(tiny_spec(), items, sr), split, cfg, workdir=tmp_path / "run")
    result, recorded = _fit_counting(edited)
    assert recorded == TRAINED and result.cost["items_encoded"] > 0


def test_the_run_key_covers_the_data_and_every_setting_not_only_sizes(data, sr):
    from dataclasses import replace

    _, split = data
    cfg = LaserTrainConfig(**CACHE)
    key = LaserTrainer(make(data, sr), split, cfg).run_hash()
    u = next(i for i, t in enumerate(split.train) if len(t) >= 2 and t[0] != t[1])
    train = [t.copy() for t in split.train]
    train[u][[0, 1]] = train[u][[1, 0]]  # same sizes, other data
    assert LaserTrainer(make(data, sr), replace(split, train=train), cfg).run_hash() != key
    for change in ({"tau": 0.07}, {"lb_weight": 0.0}, {"eval_batch_size": 3}, {"item_batch_size": 3}):
        assert LaserTrainer(make(data, sr), split, cfg.model_copy(update=change)).run_hash() != key, change
    quiet = cfg.model_copy(update={"progress": True, "threads": 1, "device": "cpu"})  # where, not what: same key
    assert LaserTrainer(make(data, sr), split, quiet).run_hash() == key


def test_resume_false_trains_again_over_a_finished_run(data, sr, tmp_path):
    """`laser run --no-cache` reaches the trainer as resume=False: no reloaded run, no cached item table."""
    _, split = data
    cfg = LaserTrainConfig(**CACHE)
    first, _ = _fit_counting(LaserTrainer(make(data, sr), split, cfg, workdir_root=tmp_path))
    fresh, recorded = _fit_counting(LaserTrainer(make(data, sr), split, cfg, workdir_root=tmp_path, resume=False))
    assert recorded == TRAINED
    assert fresh.cost["items_encoded"] == first.cost["items_encoded"] > 0  # tables computed, not read
    assert [h["loss"] for h in fresh.history] == [h["loss"] for h in first.history]  # seeded: the same run


def test_no_cache_reaches_the_bi_tuning_trainers(data, sr, monkeypatch):
    """The CLI's --no-cache becomes run_training(resume=False), and the Bi-Tuning steps hand it to the
    trainer (the pipeline passes the same flag to both steps and to the ID model's step)."""
    from click.testing import CliRunner

    import pipelines.run
    import steps.laser as laser_steps
    from laser_cli.main import cli

    seen: dict = {}

    class Stop(Exception):
        pass

    def fake_run_training(config, **kwargs):
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(pipelines.run, "run_training", fake_run_training)
    config = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")
    CliRunner().invoke(cli, ["run", "--config", config, "--no-cache"])
    assert seen["resume"] is False and seen["enable_cache"] is False
    seen.clear()
    CliRunner().invoke(cli, ["run", "--config", config])
    assert seen["resume"] is True and seen["enable_cache"] is None

    resumes = []

    class SpyTrainer(LaserTrainer):
        def __init__(self, *args, resume: bool = True, **kwargs):
            resumes.append(resume)
            super().__init__(*args, resume=resume, **kwargs)

    monkeypatch.setattr(laser_steps, "LaserTrainer", SpyTrainer)
    ds, split = data
    laser_steps.bi_tune_stage1.entrypoint(ds, split, sr, tiny_spec(), LaserTrainConfig(**CACHE), resume=False)
    assert resumes == [False]


# Learning: the trainer keeps the untrained weights (epoch -1) as a best candidate, and the untrained model
# already beats popularity here, so "beats popularity" alone passes when training does nothing. On this data
# two stage-2 epochs over all training users (batch 8, lr 1e-3; all 400 validation users) raise validation
# NDCG@10 from 0.307 (epoch -1) by 0.035 to 0.045 for each of the seeds 0-5 tried; a trainer that does not
# step the weights records exactly the epoch -1 value at every epoch (gain 0).
LEARN = LaserTrainConfig(
    skip_stage1=True,
    stage2_epochs=2,
    batch_size=8,
    lr=1e-3,
    seed=0,
    progress=False,
    item_batch_size=40,
    eval_batch_size=32,
    **PLAIN,
)
LEARN_MARGIN = 0.02  # NDCG@10 over epoch -1 (0.307): about half the smallest gain seen, 5 users moved to rank 1


def learning_problems(result, stage: int, margin: float = LEARN_MARGIN) -> list[str]:
    """Why ``result`` shows no learning in ``stage`` (empty when it does): its best validation epoch must be a
    trained one (>= 0) and beat the untrained weights' entry (epoch -1) by ``margin`` NDCG@10."""
    entries = [h for h in result.history if h["stage"] == stage]
    untrained = next(h["valid"]["ndcg@10"] for h in entries if h["epoch"] == -1)
    best = result.best[str(stage)]
    curve = [(h["epoch"], round(h["valid"]["ndcg@10"], 4)) for h in entries]
    problems = []
    if best["epoch"] < 0:
        problems.append(f"stage {stage}: the best epoch is the untrained weights (epoch -1); curve {curve}")
    gain = best["valid"]["ndcg@10"] - untrained
    if not gain > margin:
        problems.append(
            f"stage {stage}: validation NDCG@10 gain over epoch -1 is {gain:.4f}, not above {margin}; curve {curve}"
        )
    return problems


def test_training_improves_validation_and_beats_popularity_on_synthetic(data, sr):
    ds, split = data
    res = LaserTrainer(make(data, sr), split, LEARN).fit()
    assert learning_problems(res, 2) == []
    assert [h["epoch"] for h in res.history] == [-1, 0, 1]
    pop = build_model(SRConfig(model="popularity"), ds.n_items).fit(split.train)
    pop_ndcg = evaluate_split(pop, split, "test")["ndcg@10"]
    laser = test_laser(res.model, res.item_table, split, LEARN)
    assert laser["ndcg@10"] > 1.3 * pop_ndcg, (laser, pop_ndcg)
    assert np.isfinite(list(laser.values())).all()


def test_laser_scorer_has_the_id_models_contract_and_their_evaluation_loop(data, sr):
    """LaserScorer: full_sort_predict over the item table, so laser_core.evaluation.evaluate (the ID models'
    loop) scores Laser: the metrics of the cosines to the table, history masking as for the ID models, the mode
    restored, every user routed once."""
    from laser_core.losses import cosine_scores
    from laser_core.metrics import compute_metrics
    from laser_core.evaluation import evaluate
    from laser_core.train import LaserScorer

    ds, split = data
    model = make(data, sr, quant="none")
    table = model.embed_items(range(ds.n_items))
    _, hist, targets = split.test_examples()
    hist, targets = hist[:24], targets[:24]
    scorer = LaserScorer(model, table)
    assert scorer.n_items == ds.n_items and scorer.sort_by_length
    model.eval()
    with torch.no_grad():
        direct = cosine_scores(model.embed(hist).user_embedding, table)
    assert torch.allclose(scorer.full_sort_predict(scorer.predict_inputs(hist)), direct, atol=1e-6)
    scorer.expert_counts = None
    model.train()
    for mask in (False, True):
        got = evaluate(scorer, hist, targets, batch_size=5, mask_history=mask)
        assert got == pytest.approx(compute_metrics(direct, targets, exclude=hist if mask else None), abs=1e-6)
        assert model.training
    assert sum(scorer.expert_counts) == 2 * len(hist)
    stats: dict = {}
    cfg = LaserTrainConfig(eval_batch_size=7, test_users=24, progress=False)
    plain = test_laser(model, table, split, cfg, stats=stats)
    assert sum(stats["expert_counts"]) == 24
    # mask_history: the same pairs ranked with each user's history excluded
    t_hist, t_targets = test_examples(split, cfg)
    with torch.no_grad():
        t_direct = cosine_scores(model.embed(t_hist).user_embedding, table)
    masked = test_laser(model, table, split, cfg, mask_history=True)
    assert masked == pytest.approx(compute_metrics(t_direct, t_targets, exclude=t_hist), abs=1e-6)
    assert plain == pytest.approx(compute_metrics(t_direct, t_targets), abs=1e-6)


def test_a_trainer_that_does_not_step_fails_the_learning_check(data, sr, monkeypatch):
    """The check above is not vacuous: the same run with the optimizer step disabled (losses and gradients still
    computed) keeps the untrained weights, and the check reports it."""
    _, split = data
    monkeypatch.setattr(torch.optim.Adam, "step", lambda self, closure=None: None)
    model = make(data, sr)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    res = LaserTrainer(model, split, LEARN).fit()
    assert all(h["loss"] is not None for h in res.history if h["epoch"] >= 0)
    for k, v in res.model.state_dict().items():
        assert torch.equal(v, start[k]), k
    problems = learning_problems(res, 2)
    assert len(problems) == 2, problems
    assert "best epoch is the untrained weights" in problems[0] and "gain over epoch -1 is 0.0000" in problems[1]


def test_accelerate_switch_runs_the_same_computation_in_one_process(data, sr):
    """`laser_train.accelerate: true` trains through Hugging Face Accelerate (data-parallel under
    `accelerate launch`); in one CPU process it must give bit-identical weights and history."""
    _, split = data
    base = dict(SHORT, seed=3)
    plain = LaserTrainer(make(data, sr), split, LaserTrainConfig(**base)).fit()
    trainer = LaserTrainer(make(data, sr), split, LaserTrainConfig(**base, accelerate=True))
    assert trainer.accelerator is not None and trainer.world == 1
    accel = trainer.fit()
    assert [h["loss"] for h in accel.history] == [h["loss"] for h in plain.history]
    assert any(h["loss"] is not None for h in accel.history)
    for k, v in plain.model.state_dict().items():
        assert torch.equal(v, accel.model.state_dict()[k]), k


# --------------------------------------------------------------- accelerate launch jobs (laser_core.launch)
LAUNCH = dict(
    stage1_epochs=1,
    stage2_epochs=1,
    lr=1e-3,
    users_per_epoch=32,
    valid_users=8,
    progress=False,
    seed=3,
    item_batch_size=40,
    threads=1,
    **PLAIN,
)


def _last_weights(root) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    (path,) = list(root.glob("*/last/model.safetensors"))
    return load_file(str(path))


def assert_same_trained_weights(
    one: dict[str, torch.Tensor], two: dict[str, torch.Tensor], init: dict[str, torch.Tensor]
) -> None:
    """``one`` and ``two`` agree within 1e-5 and moved away from ``init``. The attention key biases are left out:
    their true gradient is 0 (softmax ignores a constant added to every key score), so Adam turns float noise
    into full-size steps."""
    moved = 0.0
    for k, v in one.items():
        a, b, v0 = v.clone(), two[k].clone(), init[k].clone()
        if k.endswith("in_proj_bias"):  # [q | k | v]: drop the key part
            w = a.shape[0] // 3
            keep = torch.cat([torch.arange(w), torch.arange(2 * w, 3 * w)])
            a, b, v0 = a[keep], b[keep], v0[keep]
        assert torch.allclose(a, b, atol=1e-5), (k, float((a - b).abs().max()))
        moved = max(moved, float((a - v0).abs().max()))
    assert moved > 1e-4  # the comparison is about trained weights, not the initial ones


def test_launched_job_in_one_process_equals_training_in_place(data, sr, tmp_path):
    """`accelerate launch --num_processes 1` over a job folder (Parquet/safetensors/JSON, no pickle) gives
    bit-identical weights, table and history to the trainer in this process; stage 2 takes its inputs back."""
    from laser_core.launch import fit_launched

    ds, split = data
    cfg = LaserTrainConfig(**LAUNCH, batch_size=8, accelerate=True)
    torch.set_num_threads(1)
    here = LaserTrainer(make(data, sr), split, cfg).fit(stages=(1,))
    job = fit_launched(ds.items, split, sr, tiny_spec(), cfg, stages=(1,), job_dir=tmp_path / "job1")
    assert job.processes == 1
    assert [h["loss"] for h in job.history] == [h["loss"] for h in here.history]
    assert torch.equal(job.item_table, here.item_table)
    for k, v in here.model.state_dict().items():
        assert torch.equal(v, job.state[k]), k
    # the job folder holds no pickle: only Parquet, safetensors, JSON and the launcher's log
    suffixes = {p.suffix for p in (tmp_path / "job1").rglob("*") if p.is_file()}
    assert suffixes <= {".parquet", ".safetensors", ".json", ".log"}, suffixes
    # stage 2 from the stage-1 weights and table, launched vs in place
    here2 = LaserTrainer(make(data, sr), split, cfg)
    here2.model.load_state_dict(job.state)
    here2 = here2.fit(stages=(2,), table=job.item_table)
    job2 = fit_launched(ds.items, split, sr, tiny_spec(), cfg, stages=(2,), weights=job.state, table=job.item_table)
    assert torch.equal(job2.item_table, job.item_table)
    assert [h["loss"] for h in job2.history] == [h["loss"] for h in here2.history]
    for k, v in here2.model.state_dict().items():
        assert torch.equal(v, job2.state[k]), k


def test_two_launched_processes_train_as_one_process_with_the_combined_batch(data, sr, tmp_path):
    """Two gloo processes (torchrun via `accelerate launch`) with batch 8 each take the same optimizer steps as
    one process with batch 16: DDP averages the shards' gradients (load balancing off: it is not a per-row
    mean). Compared on the last epoch's weights (:func:`assert_same_trained_weights`)."""
    from laser_core.launch import fit_launched

    ds, split = data
    base = {**LAUNCH, "lb_weight": 0.0}
    torch.set_num_threads(1)
    LaserTrainer(make(data, sr), split, LaserTrainConfig(**base, batch_size=16), workdir_root=tmp_path / "one").fit(
        stages=(1,)
    )
    job = fit_launched(
        ds.items,
        split,
        sr,
        tiny_spec(),
        LaserTrainConfig(**base, batch_size=8, accelerate=True),
        stages=(1,),
        processes=2,
        workdir_root=tmp_path / "two",
    )
    assert job.processes == 2
    assert_same_trained_weights(
        _last_weights(tmp_path / "one"), _last_weights(tmp_path / "two"), make(data, sr).state_dict()
    )


def test_a_failing_launched_job_names_the_command_and_the_error(data, sr):
    from laser_core.launch import LaunchError, fit_launched

    ds, split = data
    broken = ds.items.drop(columns=["title"])
    with pytest.raises(LaunchError) as err:
        fit_launched(
            broken, split, sr, tiny_spec(), LaserTrainConfig(**LAUNCH, batch_size=8, accelerate=True), stages=(1,)
        )
    msg = str(err.value)
    assert "exit status" in msg and "accelerate.commands.launch" in msg and "title" in msg


def test_bi_tune_steps_run_as_launched_jobs_with_the_accelerate_switch(data, sr):
    """The pipeline's `bi_tune_stage1` / `bi_tune_stage2` with `laser_train.accelerate: true` launch their
    training (one process here) and return what the in-place steps return."""
    from steps.laser import bi_tune_stage1, bi_tune_stage2

    ds, split = data
    sp = tiny_spec()
    outs = {}
    for accelerate in (False, True):
        cfg = LaserTrainConfig(**LAUNCH, batch_size=8, accelerate=accelerate, processes=1)
        w1, table = bi_tune_stage1.entrypoint(ds, split, sr, sp, cfg)
        w2 = bi_tune_stage2.entrypoint(ds, split, sr, w1, table, cfg)
        outs[accelerate] = (w1, table, w2)
    (a1, at, a2), (b1, bt, b2) = outs[False], outs[True]
    assert torch.equal(at.table, bt.table) and at.weights_fingerprint == bt.weights_fingerprint
    for k in a2.state:
        assert torch.equal(a1.state[k], b1.state[k]) and torch.equal(a2.state[k], b2.state[k]), k
    assert b2.summary["history"] == a2.summary["history"]
    assert b1.summary["processes"] == 1
    # the stage-1 weights made the frozen table: stage 2 keeps them as its item side when it moved the weights
    moved = a2.summary["best_epoch"] not in (None, -1)
    for w1, w2 in ((a1, a2), (b1, b2)):
        assert (w2.item_state is not None) == moved
        assert not moved or all(torch.equal(w2.item_state[k], w1.state[k]) for k in w1.state)


def test_more_than_one_process_needs_the_accelerate_switch():
    with pytest.raises(ValueError, match="processes = 2 needs laser_train.accelerate"):
        LaserTrainConfig(processes=2)
    assert LaserTrainConfig(processes=2, accelerate=True).processes == 2


@pytest.mark.parametrize("name", ["tiny-random-llama", "tiny-random-gpt2"])
def test_num_layers_keeps_the_first_layers_and_the_final_norm(data, name):
    """``backbone.num_layers: N`` = the full model's hidden state after layer N, through its own final norm."""
    from laser_core.llm.backbones import TinyConfig, load_backbone

    ds, _ = data
    texts = list(ds.items["title"])
    tiny = TinyConfig(n_layers=3)
    full = load_backbone(BackboneConfig(name=name, quantization="none", tiny=tiny), texts=texts)
    cut = load_backbone(BackboneConfig(name=name, quantization="none", tiny=tiny, num_layers=2), texts=texts)
    ids = torch.tensor([[5, 9, 17, 3, 40]])
    with torch.no_grad():
        hidden = full.base(input_ids=ids, output_hidden_states=True).hidden_states
        final_norm = getattr(full.base, "norm", None) or full.base.ln_f
        expected = final_norm(hidden[2])
        got = cut.base(input_ids=ids).last_hidden_state
        assert torch.allclose(got, expected, atol=1e-5)
        assert not torch.allclose(full.base(input_ids=ids).last_hidden_state, got, atol=1e-3)
    assert sum(p.numel() for p in cut.model.parameters()) < sum(p.numel() for p in full.model.parameters())
    with pytest.raises(ValueError, match="num_layers = 4, but .* has only 3 decoder layers"):
        load_backbone(BackboneConfig(name=name, quantization="none", tiny=tiny, num_layers=4), texts=texts)
