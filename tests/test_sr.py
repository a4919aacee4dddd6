"""ID-based recommenders: shapes and masking, learning, checkpoints, encode, resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from laser_core.data import leave_one_out, load_dataset
from laser_core.evaluation import evaluate_split
from laser_core.sr import SRConfig, TrainConfig, build_model, fit, load_model, save_model
from laser_core.sr.batching import pad_left, windows

N_ITEMS = 30
NEURAL = ["sasrec", "bert4rec", "gru4rec"]


def tiny(model: str, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(
        SRConfig(model=model, hidden_size=16, n_heads=2, max_len=8, dropout=0.0, attn_dropout=0.0, **kw), N_ITEMS
    ).eval()


@pytest.fixture(scope="module")
def synthetic_split():
    ds = load_dataset({"synthetic": {"n_users": 1500, "n_items": 200, "n_user_types": 4, "seed": 0}})
    return leave_one_out(ds)


def test_padding_and_windows():
    t = pad_left([[1, 2, 3], [4]], max_len=5)
    assert t.tolist() == [[2, 3, 4], [0, 0, 5]]  # width = longest history; item i -> token i+1
    assert pad_left([list(range(10))], max_len=4).tolist() == [[7, 8, 9, 10]]
    w = windows(np.arange(10), 4)
    assert [x.tolist() for x in w] == [[0, 1, 2, 3], [3, 4, 5, 6], [6, 7, 8, 9]]
    pairs = {(a, b) for x in w for a, b in zip(x[:-1], x[1:])}
    assert pairs == {(i, i + 1) for i in range(9)}  # every transition kept


@pytest.mark.parametrize("name", NEURAL)
def test_shapes_and_padding_never_attends(name):
    model = tiny(name)
    hist = [[1, 2, 3], [4, 5], [6]]
    scores = model.full_sort_predict(model.predict_batch(hist))
    assert scores.shape == (3, N_ITEMS)
    # the same history in a wider (more padded) batch gets the same scores
    wide = model.full_sort_predict(model.predict_batch([[6], [1, 2, 3, 4, 5, 7, 8]]))
    assert torch.allclose(scores[2], wide[0], atol=1e-5)
    ids = torch.tensor([[0, 0, 3, 4], [9, 9, 9, 2]])
    mask = torch.tensor([[False, False, True, True], [False, False, False, True]])
    enc = model.encode(ids, mask)
    assert enc.shape == (2, 4, 16)
    # what sits under the padding does not matter, and padded positions are zero
    ids2 = ids.clone()
    ids2[~mask] = 7
    assert torch.allclose(enc, model.encode(ids2, mask), atol=1e-6)
    assert enc[~mask].abs().max() == 0


def test_sasrec_is_causal_bert4rec_is_not():
    sas, bert = tiny("sasrec"), tiny("bert4rec")
    a = torch.tensor([[0, 2, 3, 4]])
    b = torch.tensor([[0, 2, 3, 9]])
    m = torch.ones_like(a, dtype=torch.bool)
    m[0, 0] = False
    ea, eb = sas.encode(a, m), sas.encode(b, m)
    assert torch.allclose(ea[:, :3], eb[:, :3]) and not torch.allclose(ea[:, 3], eb[:, 3])
    ba, bb = bert.encode(a, m), bert.encode(b, m)
    assert not torch.allclose(ba[:, 1], bb[:, 1])  # bidirectional: earlier positions see later items


def test_bert4rec_mask_token_and_cloze_batch():
    model = tiny("bert4rec", mask_prob=0.5, mask_last_prob=0.0)
    batch = model.predict_batch([[1, 2], [3]])
    assert (batch["input_ids"][:, -1] == N_ITEMS + 1).all()  # [MASK] appended for inference
    assert batch["input_ids"][0].tolist() == [2, 3, N_ITEMS + 1]
    seqs = [np.arange(8) % N_ITEMS for _ in range(200)]
    tb = model.make_batch(seqs, torch.Generator().manual_seed(0))
    masked = tb["input_ids"] == N_ITEMS + 1
    assert torch.equal(masked, tb["labels"] > 0)  # labels exactly at masked positions
    assert 0.4 < masked.float().mean() < 0.6  # ~ mask_prob
    assert torch.equal(tb["labels"][masked], pad_left(seqs, 8)[masked])


def test_gru4rec_ignores_padding_in_state():
    model = tiny("gru4rec")
    short = model.full_sort_predict({"input_ids": torch.tensor([[5, 6]])})
    padded = model.full_sort_predict({"input_ids": torch.tensor([[0, 0, 0, 5, 6]])})
    assert torch.allclose(short, padded, atol=1e-6)


@pytest.mark.parametrize("name", NEURAL)
def test_a_few_steps_lower_the_loss(name, synthetic_split):
    torch.manual_seed(0)
    model = build_model(SRConfig(model=name, hidden_size=32, dropout=0.0, attn_dropout=0.0), 200).train()
    from laser_core.sr.trainer import training_sequences

    seqs = training_sequences(model, synthetic_split)[:256]
    gen = torch.Generator().manual_seed(0)
    batch = model.make_batch(seqs, gen)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    with torch.no_grad():
        first = float(model.calculate_loss(batch))
    for _ in range(30):
        opt.zero_grad()
        model.calculate_loss(batch).backward()
        opt.step()
    with torch.no_grad():
        assert float(model.calculate_loss(batch)) < first - 0.5


def test_sampled_softmax_matches_a_hand_computed_loss():
    from laser_core.sr.base import next_item_loss

    hidden = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])  # [B=1, N=2, d=2]
    labels = torch.tensor([[2, 3]])  # tokens: items 1 and 2
    weight = torch.tensor([[1.0, 1.0], [2.0, 0.0], [0.0, 1.0], [-1.0, 0.5]])
    bias = torch.tensor([0.0, 0.5, -0.5, 1.0])
    torch.manual_seed(3)
    negatives = torch.randint(0, 4, (3,))
    torch.manual_seed(3)
    loss = next_item_loss(hidden, labels, weight, bias, n_negatives=3)
    expected = []
    for h, t in ((hidden[0, 0], 1), (hidden[0, 1], 2)):
        logits = [float(h @ weight[t] + bias[t])]
        logits += [float(h @ weight[j] + bias[j]) for j in negatives.tolist() if j != t]  # the target left out
        expected.append(-logits[0] + float(torch.logsumexp(torch.tensor(logits), 0)))
    assert float(loss) == pytest.approx(float(np.mean(expected)), rel=1e-6)
    # the full softmax is the default, and differs
    full = next_item_loss(hidden, labels, weight, bias)
    assert float(full) == pytest.approx(
        float(torch.nn.functional.cross_entropy(hidden[0] @ weight.T + bias, labels[0] - 1))
    )


@pytest.mark.parametrize("name", ["sasrec", "bert4rec"])
def test_sampled_softmax_config_reaches_the_loss(name, synthetic_split, monkeypatch):
    from laser_core.sr import base

    seen = []
    real = base.next_item_loss

    def spy(*args, **kw):
        seen.append(kw.get("n_negatives", args[4] if len(args) > 4 else None))
        return real(*args, **kw)

    monkeypatch.setattr(f"laser_core.sr.{name}.next_item_loss", spy)
    for loss, expected in (("ce", None), ("sampled", 17)):
        model = build_model(SRConfig(model=name, hidden_size=16, loss=loss, n_negatives=17), 200).train()
        seqs = [s for s in synthetic_split.train[:8]]
        model.calculate_loss(model.make_batch(seqs, torch.Generator().manual_seed(0)))
        assert seen[-1] == expected


def test_sasrec_learns_with_the_sampled_softmax(synthetic_split):
    train = TrainConfig(epochs=25, batch_size=64, lr=3e-3, patience=5, progress=False, seed=0)
    cfg = SRConfig(model="sasrec", hidden_size=64, dropout=0.1, attn_dropout=0.1, loss="sampled", n_negatives=32)
    pop = evaluate_split(fit(SRConfig(model="popularity"), train, synthetic_split).model, synthetic_split, "test")
    sampled = evaluate_split(fit(cfg, train, synthetic_split).model, synthetic_split, "test")
    assert sampled["ndcg@10"] > 1.5 * pop["ndcg@10"], (sampled, pop)


def test_validation_masks_the_history_when_asked(synthetic_split, monkeypatch):
    from laser_core.sr import trainer

    calls = []
    real = trainer.evaluate

    def spy(*args, **kw):
        calls.append(kw.get("mask_history"))
        return real(*args, **kw)

    monkeypatch.setattr(trainer, "evaluate", spy)
    cfg = SRConfig(model="sasrec", hidden_size=16, max_len=8)
    for mask in (False, True):
        fit(cfg, TrainConfig(epochs=1, batch_size=256, progress=False, mask_history=mask), synthetic_split)
        assert calls[-1] is mask


def test_sequential_models_beat_popularity_on_synthetic(synthetic_split):
    train = TrainConfig(epochs=25, batch_size=64, lr=3e-3, patience=5, progress=False, seed=0)
    results = {}
    for name in ("popularity", "sasrec", "bert4rec"):
        cfg = SRConfig(model=name, hidden_size=64, dropout=0.1, attn_dropout=0.1)
        results[name] = evaluate_split(fit(cfg, train, synthetic_split).model, synthetic_split, "test")
    pop = results["popularity"]["ndcg@10"]
    assert results["sasrec"]["ndcg@10"] > 1.5 * pop, results
    assert results["bert4rec"]["ndcg@10"] > 1.5 * pop, results


@pytest.mark.parametrize("name", ["sasrec", "bert4rec", "gru4rec", "popularity"])
def test_checkpoint_roundtrip_identical_scores(name, tmp_path, synthetic_split):
    model = tiny(name) if name != "popularity" else build_model(SRConfig(model=name), N_ITEMS)
    if name == "popularity":
        model.fit([np.array([1, 1, 2])])
    save_model(model, tmp_path / "ck")
    assert json.loads((tmp_path / "ck" / "config.json").read_text())["config"]["model"] == name
    loaded = load_model(tmp_path / "ck")
    hist = [[1, 2, 3], [4]]
    assert torch.equal(model.score(hist), loaded.score(hist))


def test_encode_unchanged_by_freezing_and_eval():
    model = tiny(
        "bert4rec",
    )
    model.train()
    ids = torch.tensor([[1, 2, 3]])
    mask = torch.ones_like(ids, dtype=torch.bool)
    model.eval()
    before = model.encode(ids, mask)
    for p in model.parameters():
        p.requires_grad_(False)
    after = model.encode(ids, mask)
    assert torch.equal(before, after) and not after.requires_grad
    assert torch.equal(after, model.encode(ids, mask))  # deterministic in eval mode


def test_resume_after_interruption_gives_same_result(tmp_path, synthetic_split):
    cfg = SRConfig(model="sasrec", hidden_size=32, dropout=0.2, attn_dropout=0.2)
    train = TrainConfig(epochs=4, batch_size=256, lr=2e-3, patience=10, progress=False, seed=3)
    straight = fit(cfg, train, synthetic_split, workdir=tmp_path / "a")

    class Crash(RuntimeError):
        pass

    def crash_after_epoch_1(epoch, record):
        if epoch == 1:
            raise Crash

    with pytest.raises(Crash):
        fit(cfg, train, synthetic_split, workdir=tmp_path / "b", callbacks=[crash_after_epoch_1])
    assert json.loads((tmp_path / "b" / "state.json").read_text())["epoch"] == 1
    resumed = fit(cfg, train, synthetic_split, workdir=tmp_path / "b")
    assert [h["epoch"] for h in resumed.history] == [0, 1, 2, 3]
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in straight.history]
    assert resumed.best_epoch == straight.best_epoch
    for (k, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), k
    # the best checkpoint on disk is the returned model
    assert torch.equal(load_model(tmp_path / "b" / "best").score([[1, 2]]), resumed.model.score([[1, 2]]))


# ------------------------------------------------------------------- checkpoint reuse is keyed on content
SMALL_SASREC = SRConfig(model="sasrec", hidden_size=16, n_heads=2, max_len=8, dropout=0.0, attn_dropout=0.0)
QUICK = TrainConfig(epochs=2, batch_size=64, lr=1e-3, patience=5, progress=False, seed=0)


@pytest.fixture(scope="module")
def small_split():
    return leave_one_out(load_dataset({"synthetic": {"n_users": 120, "n_items": 40, "n_user_types": 2, "seed": 1}}))


def _fit_counting(split, workdir, **kw):
    """``fit`` and the epochs it trained in this call (a reloaded finished run trains none)."""
    trained: list[int] = []
    result = fit(SMALL_SASREC, QUICK, split, workdir=workdir, callbacks=[lambda e, rec: trained.append(e)], **kw)
    return result, trained


def _same_sizes_other_data(split):
    """A copy of ``split`` with one user's first two training items swapped: every size is unchanged."""
    from dataclasses import replace

    u = next(i for i, t in enumerate(split.train) if len(t) >= 2 and t[0] != t[1])
    train = [t.copy() for t in split.train]
    train[u][[0, 1]] = train[u][[1, 0]]
    return replace(split, train=train)


def test_a_finished_checkpoint_is_reloaded_only_for_the_same_data(small_split, tmp_path):
    from laser_core.sr.trainer import config_hash

    wd = tmp_path / "ck"
    first, trained = _fit_counting(small_split, wd)
    assert trained == [0, 1]
    again, trained = _fit_counting(small_split, wd)  # unchanged: reloaded, nothing trains
    assert trained == [] and again.history == first.history
    other = _same_sizes_other_data(small_split)
    assert config_hash(SMALL_SASREC, QUICK, other) != config_hash(SMALL_SASREC, QUICK, small_split)
    changed, trained = _fit_counting(other, wd)  # same sizes, other data: trains again
    assert trained == [0, 1]
    assert [h["loss"] for h in changed.history] != [h["loss"] for h in first.history]
    # every result-affecting setting is in the key, not only the sizes
    assert config_hash(SMALL_SASREC, QUICK.model_copy(update={"eval_batch_size": 7}), small_split) != config_hash(
        SMALL_SASREC, QUICK, small_split
    )
    assert config_hash(
        SMALL_SASREC, QUICK.model_copy(update={"progress": True, "threads": 1}), small_split
    ) == config_hash(SMALL_SASREC, QUICK, small_split)


def test_resume_false_trains_again_over_a_finished_checkpoint(small_split, tmp_path):
    wd = tmp_path / "ck"
    first, _ = _fit_counting(small_split, wd)
    fresh, trained = _fit_counting(small_split, wd, resume=False)
    assert trained == [0, 1]
    assert [h["loss"] for h in fresh.history] == [h["loss"] for h in first.history]  # seeded: same run again
    assert [h["train_seconds"] for h in fresh.history] != [h["train_seconds"] for h in first.history]


def test_the_pretrain_step_passes_resume_to_the_trainer(small_split, monkeypatch):
    """`laser run --no-cache` reaches the ID model's trainer as resume=False (checkpoints under
    LASER_CACHE_DIR); a normal run resumes."""
    import steps.sr as sr_steps

    seen = []
    real_fit = sr_steps.fit

    def spy(*args, **kwargs):
        seen.append(kwargs.get("resume"))
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(sr_steps, "fit", spy)
    cfg, train = SMALL_SASREC, QUICK
    first, _ = sr_steps.pretrain_sr.entrypoint(small_split, cfg, train)
    reloaded, _ = sr_steps.pretrain_sr.entrypoint(small_split, cfg, train)
    fresh, summary = sr_steps.pretrain_sr.entrypoint(small_split, cfg, train, resume=False)
    assert seen == [True, True, False]
    assert summary["epochs_run"] == 2
    for k, v in first.state_dict().items():
        assert torch.equal(v, reloaded.state_dict()[k]) and torch.equal(v, fresh.state_dict()[k]), k


@pytest.mark.parametrize("model", NEURAL + ["popularity"])
def test_inference_inputs_are_made_on_the_models_device(model):
    """A frozen encoder moved to a GPU with Laser is scored there (the baselines of the GPU run): the inputs of
    ``score`` and ``evaluate`` follow the model's weights (the meta device stands in for a GPU here)."""
    m = tiny(model) if model != "popularity" else build_model(SRConfig(model="popularity"), N_ITEMS)
    assert m.device == torch.device("cpu")
    m.to("meta")
    assert m.device.type == "meta"
    assert {v.device.type for v in m.predict_inputs([[1, 2], [3]]).values()} == {"meta"}
