"""Build the GPU pack: everything the GPU run (bench/gpu/run.sh) needs, in one folder of at most 60 MiB.

    python bench/gpu/pack.py [--out gpu-pack] [--workdir runs/laser-sci] \\
        [--run laser=configs/scientific_gpu.yaml --run laser-fusion=configs/scientific_gpu_fusion.yaml]

The GPU machine reaches no network and its image has torch, transformers, accelerate, safetensors, pandas,
pyarrow ... but neither bitsandbytes nor pydantic. The pack (``--out``, an ignored folder) holds:

- ``backbone/``: the runs' backbone packed by :func:`laser_core.llm.pack.pack_backbone` (every decoder weight
  matrix in NF4 with 8-bit block scales, 4.125 bits a weight; only the token-embedding rows that the runs'
  texts use; dequantized with plain torch at load, ``backbone.quantization: none``);
- ``data.tar.xz``: the dataset folder's files (xz), read by the same loader on the GPU machine;
- ``sr/sasrec``, ``sr/bert4rec``: the frozen ID models (``laser_core.sr`` checkpoints: safetensors + JSON) of
  ``bench/laser_benchmark.py``, taken from (or trained into) ``--workdir/sr-<model>``: the frozen encoder of
  each run and the baselines scored on the same test pairs;
- ``configs/<label>.yaml``: each run's config as given;
- ``site.tar.xz``: the wheels of the Python packages the GPU image lacks (pydantic and its dependencies, for
  CPython 3.12 manylinux x86-64, the versions installed here), unpacked as ``pip install --target`` lays them
  out; run.sh puts the folder on ``PYTHONPATH`` when ``import pydantic`` fails there;
- ``pack.json``: what is where, every file's size, and the total, checked against ``--max-mib``.

The backbone keeps the embedding rows of every token of: each item's text, each user's whole-history text (cut
to ``text.history_len`` items as the model cuts it), and the history markers ``>> n.`` for every position, under
each run's text settings. Training histories are prefixes of these sequences; the pre-tokenizer splits the
template at the spaces between items, so their texts use the same tokens. Nothing is pickled (safetensors,
JSON, YAML, tar).
"""

from __future__ import annotations

import argparse
import io
import json
import lzma
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

MANIFEST = "pack.json"
DATA = "data.tar.xz"
SITE = "site.tar.xz"
FORMAT = "laser-gpu-pack"
VERSION = 1
SR_MODELS = ("sasrec", "bert4rec")
DEFAULT_RUNS = ("laser=configs/scientific_gpu.yaml", "laser-fusion=configs/scientific_gpu_fusion.yaml")
# not on the GPU image (torch, transformers, accelerate, safetensors, pandas, pyarrow, pyyaml, tqdm, numpy are)
GPU_MISSING = ("pydantic", "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions")
GPU_PYTHON = "3.12"
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")


# ----------------------------------------------------------------------------------------------- helpers
def deterministic_tar_xz(files: dict[str, bytes]) -> bytes:
    """A tar.xz of ``{name: bytes}`` in name order, with zeroed times and owners (the same bytes every build)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name in sorted(files):
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(files[name]), 0, 0o644
            tar.addfile(info, io.BytesIO(files[name]))
    return lzma.compress(buf.getvalue(), preset=9)


def extract_tar_xz(archive: Path, dest: Path) -> Path:
    """Unpack ``archive`` into ``dest`` (regular files only, no path outside it)."""
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, mode="r:xz") as tar:
        for member in tar.getmembers():
            target = (dest / member.name).resolve()
            if not member.isfile() or dest.resolve() not in target.parents:
                raise ValueError(f"{archive}: refusing member {member.name!r}")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(tar.extractfile(member).read())
    return dest


def read_manifest(pack: str | Path) -> dict:
    manifest = json.loads((Path(pack) / MANIFEST).read_text(encoding="utf8"))
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ValueError(f"{pack}: not a {FORMAT} v{VERSION} folder")
    return manifest


def folder_bytes(root: Path) -> dict[str, int]:
    return {p.relative_to(root).as_posix(): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}


def texts_read(formatter, sequences) -> list[str]:
    """Every text whose tokens the runs read (see the module docstring)."""
    texts = [formatter.item_text(i) for i in range(len(formatter))]
    texts += [formatter.user_text(seq) for seq in sequences if len(seq)]
    longest = max((len(s) for s in sequences), default=1)
    positions = min(formatter.config.history_len or longest, longest)
    texts += [f" >> {n}." for n in range(1, positions + 1)]
    return texts


def token_ids(tokenizer, texts: list[str], batch: int = 2048) -> set[int]:
    used: set[int] = set()
    for lo in range(0, len(texts), batch):
        for ids in tokenizer(texts[lo : lo + batch], add_special_tokens=False)["input_ids"]:
            used.update(ids)
    return used


def site_archive(wheel_dir: Path) -> tuple[bytes, list[str]]:
    """The wheels in ``wheel_dir`` unpacked into one tree (as ``pip install --target`` does) as a tar.xz."""
    files: dict[str, bytes] = {}
    wheels = sorted(wheel_dir.glob("*.whl"))
    for whl in wheels:
        with zipfile.ZipFile(whl) as zf:
            for name in zf.namelist():
                if not name.endswith("/"):
                    files[name] = zf.read(name)
    return deterministic_tar_xz(files), [w.name for w in wheels]


def download_wheels(dest: Path) -> Path:
    """pip-download the GPU image's missing packages (this machine's versions) for CPython 3.12, x86-64."""
    dest.mkdir(parents=True, exist_ok=True)
    pins = [f"{name}=={metadata.version(name)}" for name in GPU_MISSING]
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--quiet",
        "--no-deps",
        "--only-binary=:all:",
        "--python-version",
        GPU_PYTHON,
        "--implementation",
        "cp",
        "-d",
        str(dest),
    ]
    for plat in PLATFORMS:
        cmd += ["--platform", plat]
    proc = subprocess.run(cmd + pins, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"pip download failed:\n{proc.stderr[-2000:]}")
    return dest


# ----------------------------------------------------------------------------------------------- the pack
def build_pack(
    runs: dict[str, Path],
    out: Path,
    workdir: Path,
    data_dir: str | None = None,
    wheels: str = "auto",
    max_mib: float = 60.0,
    sr_epochs: int = 200,
    log=print,
) -> dict:
    """Write the pack into ``out`` (replaced) and return its manifest. ``runs``: label -> config file."""
    from laser_benchmark import baseline_model
    from transformers import AutoTokenizer

    import yaml

    from laser_core.config import load_config, read_layered
    from laser_core.data import leave_one_out, load_dataset
    from laser_core.data.text import TextFormatter
    from laser_core.llm.backbones import resolve_backbone
    from laser_core.llm.pack import pack_backbone
    from laser_core.model import tokenizer_texts
    from laser_core.sr import save_model

    t0 = time.perf_counter()
    configs = {label: load_config(path, data_dir=data_dir) for label, path in runs.items()}
    first = next(iter(configs.values()))
    for label, cfg in configs.items():
        if cfg.dataset != first.dataset:
            raise ValueError(f"run {label!r} reads another dataset than the first run: one pack, one dataset")
        if (cfg.backbone.name, cfg.backbone.trust_remote_code) != (
            first.backbone.name,
            first.backbone.trust_remote_code,
        ):
            raise ValueError(f"run {label!r} has another backbone than the first run: one pack, one backbone")
        if cfg.sr.model not in SR_MODELS:
            raise ValueError(f"run {label!r}: the frozen encoder must be one of {SR_MODELS}, not {cfg.sr.model!r}")
    ds = load_dataset(first.dataset)
    split = leave_one_out(ds)
    log(f"data: {ds.name}, {ds.n_users} users, {ds.n_items} items ({time.perf_counter() - t0:.1f} s)")

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    manifest: dict = {"format": FORMAT, "version": VERSION, "runs": {}, "sr": {}}
    # the runs' configs, as given but flattened (their `base:` files merged in; the data path is the pack's data/)
    (tmp / "configs").mkdir()
    for label, path in runs.items():
        raw = read_layered(path)
        raw.get("dataset", {}).pop("path", None)
        (tmp / "configs" / f"{label}.yaml").write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf8")
        manifest["runs"][label] = {
            "config": f"configs/{label}.yaml",
            "source": Path(path).as_posix(),
            "frozen_encoder": configs[label].sr.model,
        }
    # the data
    if first.dataset.path is not None:
        root = Path(first.dataset.path)
        files = {
            p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
        }
        (tmp / DATA).write_bytes(deterministic_tar_xz(files))
        data = {"archive": DATA, "files": sorted(files)}
    else:
        data = {"archive": None}  # generated from the config (synthetic)
    manifest["dataset"] = {
        "name": ds.name,
        "format": first.dataset.format,
        "users": ds.n_users,
        "items": ds.n_items,
        **data,
    }
    # the frozen ID models
    for m in SR_MODELS:
        t1 = time.perf_counter()
        sr = baseline_model(m, split, workdir, epochs=sr_epochs)
        save_model(sr, tmp / "sr" / m)
        manifest["sr"][m] = {"path": f"sr/{m}", "from": (Path(workdir) / f"sr-{m}").as_posix()}
        log(f"{m}: ready ({time.perf_counter() - t1:.1f} s)")
    # the backbone, with the embedding rows of every text the runs read
    t1 = time.perf_counter()
    source = resolve_backbone(first.backbone, tokenizer_texts(first.laser_spec(), ds.items))
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=first.backbone.trust_remote_code)
    used: set[int] = set()
    for text_cfg in {cfg.text.model_dump_json(): cfg.text for cfg in configs.values()}.values():
        formatter = TextFormatter(ds.items, text_cfg, tokenizer=tokenizer)
        used |= token_ids(tokenizer, texts_read(formatter, ds.sequences))
    meta = pack_backbone(source, tmp / "backbone", used)
    manifest["backbone"] = {
        k: meta[k]
        for k in (
            "kept_token_rows",
            "vocab_size",
            "quantized_parameters",
            "block_size",
            "tie_word_embeddings",
            "not_stored",
            "source",
        )
    }
    log(
        f"backbone: {meta['quantized_parameters']:,} weights in NF4, {meta['kept_token_rows']:,} of "
        f"{meta['vocab_size']:,} token rows ({time.perf_counter() - t1:.1f} s)"
    )
    # the packages the GPU image lacks
    if wheels != "none":
        wheel_dir = Path(wheels) if wheels != "auto" else None
        with tempfile.TemporaryDirectory() as wtmp:
            if wheel_dir is None:
                from laser_core.paths import default_cache_dir

                wheel_dir = default_cache_dir() / "wheels" / f"cp{GPU_PYTHON.replace('.', '')}"
                if not all(
                    any(wheel_dir.glob(f"{n.replace('-', '_')}-{metadata.version(n)}-*.whl")) for n in GPU_MISSING
                ):
                    download_wheels(Path(wtmp))
                    wheel_dir.mkdir(parents=True, exist_ok=True)
                    for w in Path(wtmp).glob("*.whl"):
                        shutil.copyfile(w, wheel_dir / w.name)
            blob, names = site_archive(wheel_dir)
        (tmp / SITE).write_bytes(blob)
        manifest["site"] = {"archive": SITE, "python": GPU_PYTHON, "wheels": names}
    manifest.update(files=folder_bytes(tmp), limit_bytes=int(max_mib * 2**20))
    manifest["total_bytes"] = total = 0
    while total != sum(manifest["files"].values()) + len(json.dumps(manifest, indent=1)) + 1:  # with pack.json
        manifest["total_bytes"] = total = sum(manifest["files"].values()) + len(json.dumps(manifest, indent=1)) + 1
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf8")
    assert total == sum(folder_bytes(tmp).values()), "pack.json's total_bytes is the folder's size"
    if total > max_mib * 2**20:
        raise SystemExit(f"the pack is {total / 2**20:.2f} MiB, over the {max_mib} MiB limit ({tmp} kept)")
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)
    log(f"wrote {out}: {total / 2**20:.2f} MiB (limit {max_mib} MiB) in {time.perf_counter() - t0:.1f} s")
    return manifest


def parse_runs(values: list[str]) -> dict[str, Path]:
    runs: dict[str, Path] = {}
    for item in values:
        label, sep, path = item.partition("=")
        if not sep or not label or not path:
            raise SystemExit(f"--run {item!r}: expected LABEL=CONFIG.yaml")
        p = Path(path)
        runs[label] = p if p.is_absolute() or p.is_file() else ROOT / p
    return runs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "gpu-pack"), help="the pack folder (replaced)")
    ap.add_argument(
        "--run",
        dest="runs",
        action="append",
        default=None,
        metavar="LABEL=CONFIG",
        help=f"a run of the GPU script (repeatable; default: {' '.join(DEFAULT_RUNS)})",
    )
    ap.add_argument("--data-dir", default=None, help="the dataset folder (default: the configs' dataset.path)")
    ap.add_argument(
        "--workdir",
        default=str(ROOT / "runs" / "laser-sci"),
        help="where the SR checkpoints are (sr-sasrec, sr-bert4rec), trained there when missing",
    )
    ap.add_argument(
        "--wheels",
        default="auto",
        help="auto (pip-download the missing packages once, cached), none, or a folder of wheels",
    )
    ap.add_argument("--max-mib", type=float, default=60.0)
    ap.add_argument("--sr-epochs", type=int, default=200, help="the SR models' epoch cap (early stopping first)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    manifest = build_pack(
        parse_runs(args.runs or list(DEFAULT_RUNS)),
        Path(args.out),
        Path(args.workdir),
        data_dir=args.data_dir,
        wheels=args.wheels,
        max_mib=args.max_mib,
        sr_epochs=args.sr_epochs,
    )
    width = max(len(k) for k in manifest["files"])
    for name, size in manifest["files"].items():
        print(f"  {name:<{width}}  {size / 2**20:8.3f} MiB")
    print(f"  {'total':<{width}}  {manifest['total_bytes'] / 2**20:8.3f} MiB  (<= {args.max_mib} MiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
