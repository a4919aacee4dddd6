"""Layered run configs: ``base:`` files merged under a file's own settings (laser_core.config.read_layered)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from laser_core.config import BASE_KEY, ConfigError, load_config, merge_layers, read_layered, read_yaml

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf8")
    return path


def test_merge_layers_merges_mappings_and_replaces_the_rest():
    base = {"a": {"x": 1, "y": {"p": 1, "q": 2}}, "b": [1, 2], "c": 3}
    top = {"a": {"y": {"q": 9}, "z": 4}, "b": [5], "c": None}
    assert merge_layers(base, top) == {"a": {"x": 1, "y": {"p": 1, "q": 9}, "z": 4}, "b": [5], "c": None}
    assert base == {"a": {"x": 1, "y": {"p": 1, "q": 2}}, "b": [1, 2], "c": 3}  # inputs untouched


def test_a_variant_changes_only_what_it_names(tmp_path):
    _write(
        tmp_path / "layers" / "model.yaml",
        "sr: {model: sasrec, hidden_size: 16, dropout: 0.3}\nsr_train: {epochs: 2, progress: false}\n",
    )
    _write(tmp_path / "data.yaml", "base: layers/model.yaml\ndataset:\n  synthetic: {n_users: 120, n_items: 50}\n")
    variant = _write(tmp_path / "variant.yaml", "base: [data.yaml]\nsr: {dropout: 0.5}\ntext: {history_len: null}\n")
    cfg = load_config(variant)
    assert (cfg.sr.model, cfg.sr.hidden_size, cfg.sr.dropout) == ("sasrec", 16, 0.5)
    assert cfg.sr_train.epochs == 2 and cfg.dataset.synthetic["n_users"] == 120
    assert BASE_KEY not in read_layered(variant)
    # overrides from the command line still go on top of every layer
    assert load_config(variant, overrides=["sr.dropout=0.1"]).sr.dropout == 0.1


def test_a_relative_data_path_belongs_to_the_file_that_sets_it(tmp_path):
    data = tmp_path / "data" / "sci"
    data.mkdir(parents=True)
    _write(tmp_path / "configs" / "sci.yaml", "dataset: {format: recformer, path: ../data/sci}\n")
    elsewhere = _write(tmp_path / "mine" / "deeper" / "run.yaml", "base: ../../configs/sci.yaml\nsr: {model: sasrec}\n")
    assert Path(load_config(elsewhere).dataset.path) == data.resolve()


def test_bad_bases_are_errors_naming_the_file(tmp_path):
    missing = _write(tmp_path / "a.yaml", "base: nope.yaml\nsr: {model: sasrec}\n")
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        load_config(missing)
    _write(tmp_path / "b.yaml", "base: c.yaml\n")
    cyclic = _write(tmp_path / "c.yaml", "base: b.yaml\nsr: {model: sasrec}\n")
    with pytest.raises(ConfigError, match=r"c.yaml: `base:` chain names a file twice"):
        load_config(cyclic)
    wrong = _write(tmp_path / "d.yaml", "base: {file: x.yaml}\n")
    with pytest.raises(ConfigError, match=r"d.yaml: `base:` must be a file name or a list"):
        load_config(wrong)
    not_a_mapping = _write(tmp_path / "e.yaml", "- sr\n")
    with pytest.raises(ConfigError, match="e.yaml: expected a mapping"):
        load_config(_write(tmp_path / "f.yaml", "base: e.yaml\nsr: {model: sasrec}\n"))
    assert not_a_mapping.is_file()
    _write(tmp_path / "h.yaml", "sr: {modle: x}\n")
    with pytest.raises(ConfigError, match=r"g.yaml: sr.modle"):  # a typo in a base is still named, by its field
        load_config(_write(tmp_path / "g.yaml", "base: h.yaml\n"))


def _leaves(raw: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in raw.items():
        if isinstance(value, dict):
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


@pytest.mark.parametrize("path", sorted(CONFIGS.rglob("*.yaml")), ids=lambda p: p.relative_to(CONFIGS).as_posix())
def test_no_shipped_config_repeats_what_its_bases_say(path):
    """A layer holds only what it changes: no setting equal to the one its bases already give."""
    raw = read_yaml(path) or {}
    bases = raw.pop(BASE_KEY, [])
    bases = [bases] if isinstance(bases, str) else bases
    inherited: dict = {}
    for base in bases:
        inherited = merge_layers(inherited, read_layered(path.parent / base))
    raw.get("dataset", {}).pop("path", None)  # stored resolved by read_layered
    inherited_leaves = _leaves(inherited)
    repeated = {k: v for k, v in _leaves(raw).items() if k in inherited_leaves and inherited_leaves[k] == v}
    assert not repeated, f"{path.name} repeats its bases: {repeated}"


def test_shipped_variants_are_layers_of_their_dataset():
    for name in ("scientific_cpu", "scientific_cpu_fusion", "scientific_gpu", "scientific_gpu_fusion"):
        assert "scientific.yaml" in str(read_yaml_base(CONFIGS / f"{name}.yaml")), name
    cpu, fusion = load_config(CONFIGS / "scientific_cpu.yaml"), load_config(CONFIGS / "scientific_cpu_fusion.yaml")
    assert cpu.dataset == fusion.dataset and cpu.laser_train == fusion.laser_train and cpu.text == fusion.text
    assert (cpu.bitune.prefix, fusion.bitune.prefix, fusion.bitune.fusion) == ("mformer", "none", "concat")
    assert (cpu.sr.model, fusion.sr.model) == ("bert4rec", "sasrec")


def read_yaml_base(path: Path) -> object:
    return (read_yaml(path) or {}).get(BASE_KEY)


def test_reading_a_config_imports_no_torch():
    """Config classes live in torch-free modules (laser_core.configuration): a YAML is read and checked without
    torch or transformers (a subprocess, so no other test's imports count)."""
    code = (
        "import sys; from laser_core.config import load_config; "
        "[load_config(p) for p in ('configs/demo.yaml', 'configs/scientific_cpu_fusion.yaml')]; "
        "print(sorted(m for m in ('torch', 'transformers', 'bitsandbytes') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
