"""bench/laser_cost.py in small: named backbone variants side by side on a tiny random Llama and synthetic data."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "--config",
    str(ROOT / "configs" / "tiny.yaml"),
    "--backbone",
    "tiny-random-llama",
    "--items",
    "16",
    "--users",
    "16",
    "--threads",
    "1",
]


@pytest.fixture(scope="module")
def cost():
    """bench/laser_cost.py as a module (bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location("laser_bench_cost", ROOT / "bench" / "laser_cost.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def run(cost, tmp_path: Path, *extra: str) -> dict:
    assert cost.main([*TINY, "--out", str(tmp_path), "--name", "t", *extra]) == 0
    assert (tmp_path / "laser_cost_t.md").is_file()
    return json.loads((tmp_path / "laser_cost_t.json").read_text(encoding="utf8"))


def test_two_variants_side_by_side(cost, tmp_path, monkeypatch):
    from laser_core.model import LaserModel, LaserTrainingBatch

    losses = []
    real = LaserModel.calculate_loss

    def spy(self, batch):  # the timed step is the trainer's: the model's own loss on the trainer's batches
        assert isinstance(batch, LaserTrainingBatch) and batch.tau == 0.05 and batch.lb_weight == 0.01
        losses.append(len(batch.targets))
        return real(self, batch)

    monkeypatch.setattr(LaserModel, "calculate_loss", spy)
    out = run(cost, tmp_path, "--variants", "baseline,none-fp32")
    assert losses == [8, 8, 8] * 2  # per variant: the warm-up, then the 16 users in mini-batches of 8
    rows = out["results"]
    assert set(rows) == {"baseline", "none-fp32"}
    for r in rows.values():
        assert "error" not in r
        assert r["items_per_second"] > 0 and r["train_users_per_second"] > 0 and r["backbone_memory_mb"] > 0
        assert r["items_timed"] == 16 and r["users_timed"] == 16 and r["mean_item_tokens"] > 0
        assert r["num_layers"] == 2 and r["fidelity"]["reference"] == "none-fp32"
        assert r["optimizer_steps"] == 2  # configs/tiny.yaml: Adam, a step per mini-batch
    assert rows["baseline"]["quantization"] == "nf4" and rows["none-fp32"]["quantization"] == "none"
    assert rows["none-fp32"]["trainable_weights"].startswith("equal to baseline")  # the seeded build
    fid = rows["none-fp32"]["fidelity"]
    assert fid["item_cosine_mean"] == pytest.approx(1.0, abs=1e-9) and fid["items_compared"] == 16
    assert fid["user_cosine_min"] == pytest.approx(1.0, abs=1e-9)
    assert 0.5 < rows["baseline"]["fidelity"]["item_cosine_mean"] < 1.0  # NF4 is close, not equal
    assert out["fidelity_references"]["2"]["measured"] is True
    assert out["baseline_variant"] == "baseline"
    ratios = out["ratios_vs_baseline"]
    assert set(ratios) == {"baseline", "none-fp32"}
    assert ratios["baseline"] == {"train_users_per_second": 1.0, "items_per_second": 1.0, "memory": 1.0}
    assert ratios["none-fp32"]["memory"] > 1 and ratios["none-fp32"]["train_users_per_second"] > 0
    assert out["best"]["variant"] in rows and out["best"]["item_cosine_mean"] >= 0.99
    assert out["budget"]["history_len"] == 3 and out["budget"]["mformer"]["n_experts"] == 2  # configs/tiny.yaml
    assert (out["budget"]["optimizer"], out["budget"]["grad_accumulation"]) == ("adam", 1)
    assert out["machine"]["cpu_threads"] == 1 and out["machine"]["torch"] == torch.__version__
    md = (tmp_path / "laser_cost_t.md").read_text(encoding="utf8")
    assert "| baseline | nf4 | float32 | 2 |" in md and "| none-fp32 |" in md and "Best" in md


def test_failed_variant_truncated_reference_and_cap(cost, tmp_path, monkeypatch):
    """A variant that cannot run records its error; a depth without a float32 variant gets a reference built; a
    tiny time cap times whole batches only."""
    monkeypatch.setitem(
        cost.VARIANTS, "nf4-1layer", {"quantization": "nf4", "compute_dtype": "float32", "num_layers": 1}
    )
    out = run(
        cost,
        tmp_path,
        "--variants",
        "baseline,nf4-1layer,nf4-6layers",
        "--history",
        "2",
        "--item-batch",
        "8",
        "--time-cap",
        "1e-6",
    )
    rows = out["results"]
    assert "has only 2 decoder layers" in rows["nf4-6layers"]["error"]  # the tiny Llama has 2
    assert "nf4-6layers" not in out["ratios_vs_baseline"]
    one = rows["nf4-1layer"]
    assert one["num_layers"] == 1 and one["fidelity"]["reference"] == "none-fp32-1layers-reference"
    assert 0.5 < one["fidelity"]["item_cosine_mean"] <= 1.0 and one["fidelity"]["items_compared"] == 8
    refs = out["fidelity_references"]
    assert refs["1"]["measured"] is False and refs["2"]["variant"] == "none-fp32-2layers-reference"
    assert one["items_timed"] == 8 and one["users_timed"] == 8  # one batch each, then the cap
    assert out["budget"]["history_len"] == 2 and out["budget"]["time_cap_seconds"] == 1e-6
    assert out["ratios_vs_baseline"]["nf4-1layer"]["memory"] < 1


def test_unknown_variant(cost, tmp_path):
    with pytest.raises(SystemExit):
        cost.main([*TINY, "--variants", "baseline,fp8", "--out", str(tmp_path)])
