"""The GPU path without a GPU: one device setting places the backbone, the frozen SR encoder, the M-Former, the
suffix and every batch (checked on the CPU and, for the placement logic, on PyTorch's shape-only ``meta``
device), and data-parallel shards of equal size, so an uneven user count neither hangs DDP nor changes the
arithmetic (two gloo processes against the one-process run it stands for)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import PLAIN, tiny_spec

from laser_core.device import resolve_device
from laser_core.model import build_laser
from laser_core.train import LaserTrainConfig, LaserTrainer, shard

# the data set and ID model of the `data` and `sr` fixtures (tests/conftest.py)
DATA = {"n_users": 200, "n_items": 50, "n_user_types": 4, "seed": 5}
SR = dict(model="bert4rec", hidden_size=16, dropout=0.1, attn_dropout=0.1)
SR_TRAIN = dict(epochs=5, batch_size=64, lr=3e-3)


def every_module(model):
    """The model's own modules and the frozen ones kept outside its module tree (backbone, SR encoder)."""
    return [*model.modules(), *model.llm.modules(), *model.sr.modules()]


def record_input_devices(model, seen: list, stop_at=None):
    """Forward pre-hooks on every module recording ``(module class, device)`` of each tensor input; the hook on
    ``stop_at`` raises :class:`Stop` after recording (to stop a forward the device can not finish)."""

    def hook(module, args, kwargs):
        for v in [*args, *kwargs.values()]:
            if torch.is_tensor(v):
                seen.append((type(module).__name__, v.device))
        if module is stop_at:
            raise Stop

    return [m.register_forward_pre_hook(hook, with_kwargs=True) for m in every_module(model)]


class Stop(Exception):
    pass


# ------------------------------------------------------------------------------------------- the setting
def test_device_settings_resolve_and_bad_ones_are_refused():
    assert resolve_device("cpu") == torch.device("cpu")
    auto = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    assert resolve_device("auto") == resolve_device(None) == auto
    with pytest.raises(ValueError, match="auto, cpu, cuda or cuda:N"):
        resolve_device("gpu")
    with pytest.raises(ValueError):
        LaserTrainConfig(device="gpu")
    assert LaserTrainConfig().device == "auto" and LaserTrainConfig(device="cuda:1").device == "cuda:1"
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")


# -------------------------------------------------------------------------------------------- placement
@pytest.mark.parametrize("fusion", ["none", "concat"])
def test_every_input_of_every_module_is_on_the_models_device(data, sr, fusion):
    """Forward pre-hooks on every module (M-Former, backbone layers, SR encoder) see only tensors on the
    configured device, through a training forward, the item table and a cold item."""
    ds, split = data
    model = build_laser(tiny_spec(fusion=fusion), ds.items, sr, device="cpu")
    assert model.device == torch.device("cpu") and model.backbone.device == torch.device("cpu")
    seen: list = []
    handles = record_input_devices(model, seen)
    try:
        emb = model.embed([split.train[0][:3], split.train[1][:1]]).user_embedding
        table = model.embed_items(range(split.n_items), batch_size=16)
        cold = model.embed_cold_items(ds.items.iloc[:2])
    finally:
        for h in handles:
            h.remove()
    kinds = {name for name, _ in seen}
    assert {"MFormer", "LlamaModel", "Encoder"} <= kinds, kinds  # Encoder: the SR model's
    assert {d for _, d in seen} == {torch.device("cpu")}
    assert {emb.device, table.device, cold.device} == {torch.device("cpu")}


def test_to_moves_the_frozen_parts_too_and_inputs_are_made_on_the_new_device(data, sr):
    """``model.to(device)`` moves the backbone and the SR encoder (outside the module tree) with the trainable
    parts; on PyTorch's shape-only ``meta`` device (the unquantized tiny backbone; a stand-in for a GPU) every
    tensor the model builds up to the LLM call (token ids, masks, position ids, SR inputs, the prefix, the
    suffix, item_side) is made there. The LLM itself can not run on ``meta``: the hook on it stops the forward."""
    ds, split = data
    model = build_laser(tiny_spec(quant="none", fusion="concat"), ds.items, copy.deepcopy(sr), device="cpu")
    model.set_item_state({k: v.clone() for k, v in model.state_dict().items()})
    meta = torch.device("meta")
    assert model.to(meta) is model and model.device == meta
    parts = {"laser": model, "backbone": model.llm, "sr": model.sr, "item side": model.item_weights}
    for name, part in parts.items():
        tensors = [*part.parameters(), *part.buffers()]
        assert tensors and {t.device for t in tensors} == {meta}, name
    batch = model.collate([[1, 2], [3]], item_side=[0, 1]).to_torch(model.device)
    assert {t.device for t in vars(batch).values()} == {meta}
    for run in (
        lambda: model.embed([split.train[0][:3], [4]]),
        lambda: model.embed_items([0, 1, 2]),
        lambda: model.fuse_items(torch.zeros(2, model.backbone.hidden_size, device=meta), [0, 1]),
    ):
        seen: list = []
        handles = record_input_devices(model, seen, stop_at=model.backbone.base)
        try:
            try:
                run()
            except Stop:
                pass
        finally:
            for h in handles:
                h.remove()
        assert seen and {d for _, d in seen} == {meta}, seen


def test_the_trainer_places_the_model_on_its_device(data, sr):
    ds, split = data
    model = build_laser(tiny_spec(), ds.items, sr, device="cpu")
    cfg = LaserTrainConfig(
        device="cpu",
        stage1_epochs=1,
        stage2_epochs=0,
        batch_size=8,
        users_per_epoch=8,
        valid_users=8,
        progress=False,
        item_batch_size=64,
        **PLAIN,
    )
    trainer = LaserTrainer(model, split, cfg)
    assert trainer.device == model.device == torch.device("cpu")
    result = trainer.fit(stages=(1,))
    assert result.item_table.device == torch.device("cpu")


# ------------------------------------------------------------------------------------- equal DDP shards
def test_shards_are_equal_and_wrap_around_like_distributed_sampler():
    assert [s.tolist() for s in (shard(7, 0, 2), shard(7, 1, 2))] == [[0, 2, 4, 6], [1, 3, 5, 0]]
    assert [s.tolist() for s in (shard(2, r, 3) for r in range(3))] == [[0], [1], [0]]
    for n in range(1, 12):
        for world in (1, 2, 3, 4):
            parts = [shard(n, r, world) for r in range(world)]
            assert {len(p) for p in parts} == {-(-n // world)}
            dealt = np.stack(parts, axis=1).ravel()  # dealt back in turn: the padded list
            assert dealt.tolist() == [i % n for i in range(len(dealt))]
            if n % world == 0:
                assert all((p == np.arange(n)[r::world]).all() for r, p in enumerate(parts))


def test_two_processes_with_an_odd_user_count_finish_and_train_as_one_process_on_the_padded_users(data, sr, tmp_path):
    """9 users per epoch on two gloo processes with batch 4. Dealt ``hist[rank::2]`` they were 5 and 4 users:
    two mini-batches on one process, one on the other, so the extra backward's all-reduce had no partner (a hang,
    or a pairing with another collective). Padded (:func:`shard`), each process gets 5 users (the first one
    twice over the two shards) and two mini-batches, and the job ends within the timeout. The two processes take
    the optimizer steps of one process trained with batch 8 on the padded list of 10 users (the epoch's 9 users,
    then the first again); ``users_seen`` counts the 9 users."""
    from laser_core.launch import fit_launched

    from test_laser import _last_weights, assert_same_trained_weights

    ds, split = data
    base = dict(
        stage1_epochs=1,
        stage2_epochs=0,
        lr=1e-3,
        users_per_epoch=9,
        valid_users=8,
        progress=False,
        seed=3,
        item_batch_size=64,
        threads=1,
        lb_weight=0.0,
        device="cpu",
        **PLAIN,
    )
    torch.set_num_threads(1)
    one = LaserTrainer(
        build_laser(tiny_spec(), ds.items, sr),
        split,
        LaserTrainConfig(**base, batch_size=8),
        workdir_root=tmp_path / "one",
    )
    sample = one.examples

    def padded(stage: int, epoch: int):  # torch's DistributedSampler padding: wrap around to the start
        hist, targets = sample(stage, epoch)
        order = np.resize(np.arange(len(hist)), len(hist) + len(hist) % 2)
        return [hist[i] for i in order], targets[order]

    one.examples = padded
    one.fit(stages=(1,))
    job = fit_launched(
        ds.items,
        split,
        sr,
        tiny_spec(),
        LaserTrainConfig(**base, batch_size=4, accelerate=True),
        stages=(1,),
        processes=2,
        workdir_root=tmp_path / "two",
        timeout=240,
    )
    assert job.processes == 2
    assert [h["users_seen"] for h in job.history] == [0, 9]
    assert_same_trained_weights(
        _last_weights(tmp_path / "one"),
        _last_weights(tmp_path / "two"),
        build_laser(tiny_spec(), ds.items, sr).state_dict(),
    )
