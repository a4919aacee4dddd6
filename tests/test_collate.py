"""The model API's torch-free half: the collator (the one left-padding implementation) and its batch; and that
"which SR model is this" is a method of the SR models, not a class-name switch in the model or the export."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from laser_core.collate import TOWER_INPUTS, LaserBatch, LaserCollator, pad_left

ROOT = Path(__file__).resolve().parents[1]


def test_pad_left_by_hand():
    values, mask = pad_left([[1, 2, 3], [4], []], pad_value=9)
    np.testing.assert_array_equal(values, [[1, 2, 3], [9, 9, 4], [9, 9, 9]])
    np.testing.assert_array_equal(mask, [[1, 1, 1], [0, 0, 1], [0, 0, 0]])
    assert values.dtype == mask.dtype == np.int64
    values, mask = pad_left([[1, 2, 3, 4, 5], [6, 7]], length=3)  # a fixed width keeps the most recent values
    np.testing.assert_array_equal(values, [[3, 4, 5], [0, 6, 7]])
    np.testing.assert_array_equal(mask, [[1, 1, 1], [0, 1, 1]])
    values, mask = pad_left([[-1, 4]], length=4)  # negative ids (cold items) stay, visible
    np.testing.assert_array_equal(values, [[0, 0, -1, 4]])
    np.testing.assert_array_equal(mask, [[0, 0, 1, 1]])
    assert pad_left([])[0].shape == (0, 1) and pad_left([[]])[0].shape == (1, 1)


def test_collator_builds_the_towers_inputs_by_hand():
    collate = LaserCollator(pad_token_id=7, sr_max_len=3)
    batch = collate([[11, 12], [13, 14, 15, 16]], [[0, 1, 2, 3], [-1]], item_side=[1, 0])
    np.testing.assert_array_equal(batch.input_ids, [[7, 7, 11, 12], [13, 14, 15, 16]])
    np.testing.assert_array_equal(batch.attention_mask, [[0, 0, 1, 1], [1, 1, 1, 1]])
    np.testing.assert_array_equal(batch.item_ids, [[1, 2, 3], [0, 0, -1]])
    np.testing.assert_array_equal(batch.item_mask, [[1, 1, 1], [0, 0, 1]])
    np.testing.assert_array_equal(batch.item_side, [1, 0])
    assert len(batch) == 2
    feeds = batch.feeds(list(TOWER_INPUTS))
    assert list(feeds) == ["item_ids", "item_mask", "input_ids", "attention_mask", "item_side"]
    assert all(v.dtype == np.int64 for v in feeds.values())
    text_only = LaserCollator(pad_token_id=0)([[5], [6, 7]], [[1], [2]])
    assert text_only.item_ids is None and text_only.item_mask is None and text_only.item_side is None
    with pytest.raises(ValueError, match="no \\['item_ids'\\]"):
        text_only.feeds(["item_ids", "input_ids"])
    with pytest.raises(ValueError, match="one item history per row"):
        collate([[1]], None)


def test_tower_input_names_are_the_ones_exported_bundles_have():
    """Bundles exported before keep serving: the user tower's inputs (and their order) never change."""
    assert TOWER_INPUTS == ("item_ids", "item_mask", "input_ids", "attention_mask", "item_side")
    assert [f for f in LaserBatch.__dataclass_fields__] == [
        "input_ids",
        "attention_mask",
        *TOWER_INPUTS[:2],
        "item_side",
    ]


def test_batch_to_torch_keeps_values_and_moves_tensors():
    torch = pytest.importorskip("torch")
    batch = LaserCollator(pad_token_id=0, sr_max_len=2)([[3], [4, 5]], [[1], [2, 3]])
    t = batch.to_torch()
    assert isinstance(t, LaserBatch) and t.item_side is None
    for name in ("input_ids", "attention_mask", "item_ids", "item_mask"):
        got = getattr(t, name)
        assert got.dtype == torch.int64 and np.array_equal(got.numpy(), getattr(batch, name))
    assert t.to_torch().input_ids is t.input_ids  # tensors stay as they are


def test_sr_pad_left_is_the_collators_padding_shifted():
    torch = pytest.importorskip("torch")
    from laser_core.sr.batching import pad_left as sr_pad_left

    got = sr_pad_left([[1, 2, 3], [4], []], max_len=2)
    assert got.dtype == torch.int64
    assert got.tolist() == [[3, 4], [0, 5], [0, 0]]  # the last 2 items, +1 (token ids), 0 = padding
    assert sr_pad_left([[0]], max_len=5, offset=0).tolist() == [[0]]


def test_serving_and_the_collator_import_no_torch():
    code = "import sys, laser_core.collate, laser_core.serving; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


SR_CLASS_NAMES = {"BERT4Rec", "SASRec", "GRU4Rec", "Popularity"}


@pytest.mark.parametrize("path", ["laser_core/model.py", "laser_core/export.py", "laser_core/serving.py"])
def test_no_sr_class_name_switch(path):
    """The cold-item treatment is ``SequentialRecommender.cold_item_embedding``: the model, the export and
    serving never compare an SR model's class name (no string literal naming an SR class, no ``__name__``
    compared with anything, bar the tokenizer check's ``BPE``)."""
    tree = ast.parse((ROOT / path).read_text())
    names = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and n.value in SR_CLASS_NAMES]
    assert not names, names
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            parts = [node.left, *node.comparators]
            if any(isinstance(p, ast.Attribute) and p.attr == "__name__" for p in parts):
                assert any(isinstance(p, ast.Constant) and p.value == "BPE" for p in parts), ast.unparse(node)


def test_cold_item_embedding_is_a_method_of_the_sr_models():
    torch = pytest.importorskip("torch")
    from laser_core.sr import SRConfig, build_model

    models = {m: build_model(SRConfig(model=m, hidden_size=8, max_len=4), 5) for m in ("bert4rec", "sasrec")}
    assert torch.equal(models["bert4rec"].cold_item_embedding(), models["bert4rec"].item_emb.weight[6])  # [MASK]
    assert torch.equal(models["sasrec"].cold_item_embedding(), torch.zeros(8))
    ids, mask = torch.tensor([[0, 2, -1]]), torch.tensor([[0, 1, 1]])
    for m in ("gru4rec", "popularity"):
        other = build_model(SRConfig(model=m, hidden_size=8, max_len=4), 5)
        assert other.cold_item_embedding() is None
        with pytest.raises((NotImplementedError, TypeError)):
            other.encode(ids, mask)
    gru = build_model(SRConfig(model="gru4rec", hidden_size=8, max_len=4), 5).eval()
    known = torch.tensor([[0, 1, 1]])
    assert torch.equal(gru.encode(torch.tensor([[0, 2, 3]]), known), gru(torch.tensor([[0, 3, 4]])))
