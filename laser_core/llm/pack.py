"""A frozen backbone packed in a 4-bit block format that plain torch dequantizes (no bitsandbytes needed).

:func:`pack_backbone` turns a local Hugging Face causal-LM folder into a *packed folder*; :func:`load_backbone`
(:mod:`laser_core.llm.backbones`) loads such a folder like any other backbone (``backbone.name`` = its path,
``backbone.quantization: none``): :func:`load_packed` dequantizes every weight with torch into a model built
from the stored ``config.json`` (``AutoModelForCausalLM.from_config``), in the compute dtype, on the device.
This is how the GPU run gets SmolLM2 onto a machine whose image has no bitsandbytes (bench/gpu/).

The format (``laser_pack.json`` describes a folder; nothing is pickled):

- every weight matrix of the decoder (``ndim >= 2``, all but the token embeddings and the LM head) in **NF4**:
  the tensor flattened into blocks of 64 values (zero-padded at the end), each block scaled by its own scale
  ``s >= max |w|`` and each value stored as the index (4 bits, two per byte, high nibble first) of the nearest
  of the 16 NF4 levels (bitsandbytes' table, :data:`NF4_LEVELS`). The dequantized value is ``level x s``, so a
  value is off by at most half the widest gap between adjacent levels times ``s`` (:data:`NF4_HALF_MAX_GAP`
  = 0.152), bitsandbytes' NF4 error. The block scales are themselves stored in 8 bits (the "double
  quantization" of QLoRA, here in the log domain): per tensor ``lo`` and ``step`` (float32), per block a byte
  ``q`` with ``s = 2 ** (lo + q x step)``, rounded *up* from the block's absmax (so ``s`` is at most
  ``2 ** step`` ~ 1-2 % above it, and no value is clipped). 4.125 bits per weight: SmolLM2-135M's 30
  decoder layers (106 M weights) take 54.7 MB (bitsandbytes' NF4 with float32 absmax: 59.7 MB);
- the **token embeddings**: only the rows of the token ids given to :func:`pack_backbone` (the texts a run
  reads) in the same NF4 format, and the rows of the tokenizer's special tokens in float32 (the EOS row is
  where Laser's trainable suffix starts, and the suffix is the token read out: with a 4-bit EOS row the
  untrained suffix embeddings of SmolLM2 had a cosine of 0.72-0.83 with the float32 model's, with an exact one
  0.88-0.92, as with bitsandbytes' NF4 (0.89-0.93; 0.98-0.99 between the two)), each with its row ids.
  Loading fills the other rows with zeros (a full-size matrix, so the tokenizer's ids need no remapping); a
  text with a token outside the kept rows would read a zero vector, which is why the packer is given every
  text the run will tokenize. The mean row norm of the full original matrix is kept (``token_norm``;
  ``bitune.prefix_init: token_norm`` reads it, :meth:`laser_core.llm.backbones.Backbone.token_embedding_norm`);
- 1-D weights (norms, biases) in float32; the LM head is not stored (Laser reads hidden states, never logits;
  a tied head is the embeddings again, an untied one loads as zeros);
- all tensors in one safetensors file, xz-compressed (NF4 codes are not uniform: ~3 % smaller; SmolLM2 with
  the 6,562 token rows of the Scientific runs: 52.5 MiB), and every other file of the source folder (config,
  tokenizer) as it is, files over 64 KiB xz-compressed.
"""

from __future__ import annotations

import json
import lzma
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch
from torch.nn import functional as F

PACK_FORMAT = "laser-nf4-pack"
PACK_VERSION = 1
META = "laser_pack.json"
WEIGHTS = "weights.nf4.safetensors.xz"
BLOCK = 64
# bitsandbytes' NF4 code book (bitsandbytes.functional.get_4bit_type("nf4"))
NF4_LEVELS = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
NF4_HALF_MAX_GAP = max(b - a for a, b in zip(NF4_LEVELS, NF4_LEVELS[1:])) / 2
COMPRESS_OVER = 64 << 10
WEIGHT_FILES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt")
_XZ_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 6, "lc": 0, "lp": 0, "pb": 0}]  # order-0 literals: the codes


# ------------------------------------------------------------------------------------------------- NF4
def _levels(device=None) -> torch.Tensor:
    return torch.tensor(NF4_LEVELS, dtype=torch.float32, device=device)


def block_scales(scale_codes: torch.Tensor, scale_range: torch.Tensor) -> torch.Tensor:
    """The float32 block scales ``2 ** (lo + q x step)`` of the 8-bit scale codes ``q`` (``scale_range`` =
    ``[lo, step]``): the one formula the quantizer and the loader share."""
    lo, step = scale_range.float().to(scale_codes.device)
    return torch.exp2(lo + scale_codes.float() * step)


def quantize_nf4(weight: torch.Tensor, block: int = BLOCK) -> dict[str, torch.Tensor]:
    """``{"codes": uint8 [ceil(n / block) x block / 2], "scales": uint8 [blocks], "scale_range": float32 [2]}``
    of a tensor (flattened, zero-padded to whole blocks). See the module docstring for the format."""
    if block % 2:
        raise ValueError(f"the block size must be even (two codes a byte), got {block}")
    flat = weight.detach().float().reshape(-1)
    flat = F.pad(flat, (0, (-flat.numel()) % block))
    blocks = flat.view(-1, block)
    amax = blocks.abs().amax(dim=1)
    nonzero = amax > 0
    if bool(nonzero.any()):
        logs = torch.log2(amax[nonzero].double())
        lo, hi = float(logs.min()), float(logs.max())
    else:
        lo = hi = 0.0
    step = (hi - lo) / 255 if hi > lo else 0.0
    scale_range = torch.tensor([lo, step], dtype=torch.float32)
    lo32, step32 = (float(v) for v in scale_range)  # what the loader will compute with
    q = torch.zeros(len(amax), dtype=torch.int64)
    if step32 > 0:
        q[nonzero] = torch.ceil((torch.log2(amax[nonzero].double()) - lo32) / step32 - 1e-9).long()
    q = q.clamp(0, 255)
    scales = block_scales(q, scale_range)
    short = nonzero & (scales < amax) & (q < 255)  # float rounding of 2 ** (...) below the absmax: one step up
    q = torch.where(short, q + 1, q)
    scales = block_scales(q, scale_range)
    x = (blocks / scales[:, None]).clamp(-1.0, 1.0)
    levels = _levels()
    codes = torch.bucketize(x, (levels[1:] + levels[:-1]) / 2).to(torch.uint8)  # the nearest level's index
    packed = (codes[:, 0::2] << 4) | codes[:, 1::2]
    return {"codes": packed.reshape(-1).contiguous(), "scales": q.to(torch.uint8), "scale_range": scale_range}


def dequantize_nf4(
    codes: torch.Tensor,
    scales: torch.Tensor,
    scale_range: torch.Tensor,
    shape: Iterable[int],
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
    block: int = BLOCK,
) -> torch.Tensor:
    """The tensor of ``shape`` (``dtype``, on ``device``) that :func:`quantize_nf4`'s output stands for: each
    value ``NF4 level x its block's scale``, computed in float32 and then cast."""
    shape = tuple(int(s) for s in shape)
    n = 1
    for s in shape:
        n *= s
    codes = codes.to(device)
    idx = torch.stack([codes >> 4, codes & 15], dim=-1).reshape(-1, block).long()
    values = _levels(codes.device)[idx] * block_scales(scales.to(codes.device), scale_range)[:, None]
    return values.reshape(-1)[:n].reshape(shape).to(dtype)


# ------------------------------------------------------------------------------------------------- packing
def _embedding_name(names: Iterable[str]) -> str:
    candidates = [n for n in names if n.endswith("embed_tokens.weight") or n.endswith("wte.weight")]
    if len(candidates) != 1:
        raise ValueError(f"cannot tell the token-embedding weight among {sorted(names)[:8]}...: found {candidates}")
    return candidates[0]


def _special_ids(tokenizer) -> set[int]:
    ids = set(int(i) for i in getattr(tokenizer, "all_special_ids", []) or [])
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            ids.add(int(value))
    return ids


def pack_backbone(source: str | Path, out_dir: str | Path, token_ids: Iterable[int], block: int = BLOCK) -> dict:
    """Pack the HF causal-LM folder ``source`` into ``out_dir`` (replaced): see the module docstring. Keeps the
    token-embedding rows of ``token_ids`` and of the tokenizer's special tokens. Returns the metadata written
    to ``laser_pack.json`` (with the size of every file)."""
    from safetensors import safe_open
    from safetensors.torch import save
    from transformers import AutoTokenizer

    from laser_core.fingerprint import file_sha256

    src, out = Path(source), Path(out_dir)
    config = json.loads((src / "config.json").read_text(encoding="utf8"))
    weight_files = sorted(src.glob("*.safetensors"))
    if not weight_files:
        raise FileNotFoundError(f"{src}: no *.safetensors weights to pack")
    tokenizer = AutoTokenizer.from_pretrained(src)
    handles = [safe_open(str(p), "pt") for p in weight_files]
    where = {name: h for h in handles for name in h.keys()}
    emb_name = _embedding_name(where)
    tied = bool(config.get("tie_word_embeddings", False))
    tensors: dict[str, torch.Tensor] = {}
    entries: dict[str, dict] = {}
    skipped: list[str] = []
    quantized_params = 0
    for name in sorted(where):
        w = where[name].get_tensor(name)
        if name.startswith("lm_head.") or name.endswith(".lm_head.weight"):
            skipped.append(name)
            continue
        if name == emb_name:
            vocab, hidden = w.shape
            special = sorted(_special_ids(tokenizer))
            keep = sorted({int(i) for i in token_ids} - set(special))
            bad = [i for i in keep + special if not 0 <= i < vocab]
            if bad:
                raise ValueError(f"token ids {bad[:5]} are outside the vocabulary (0..{vocab - 1})")
            rows = torch.tensor(keep, dtype=torch.int64)
            exact = torch.tensor(special, dtype=torch.int64)
            q = quantize_nf4(w[rows], block)
            tensors.update(
                {
                    f"{name}.rows": rows,
                    **{f"{name}.{k}": v for k, v in q.items()},
                    f"{name}.exact_rows": exact,
                    f"{name}.exact": w[exact].float().contiguous(),
                }
            )
            entries[name] = {
                "kind": "rows",
                "shape": [vocab, hidden],
                "kept_rows": len(keep) + len(special),
                "exact_rows": len(special),
            }
            token_norm = float(w.float().norm(dim=1).mean())
        elif w.ndim >= 2:
            q = quantize_nf4(w, block)
            tensors.update({f"{name}.{k}": v for k, v in q.items()})
            entries[name] = {"kind": "nf4", "shape": list(w.shape)}
            quantized_params += w.numel()
        else:
            tensors[name] = w.float().contiguous()
            entries[name] = {"kind": "dense", "shape": list(w.shape)}
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / WEIGHTS).write_bytes(lzma.compress(save(tensors), format=lzma.FORMAT_XZ, filters=_XZ_FILTERS))
    copied = []
    for p in sorted(src.iterdir()):
        if not p.is_file() or p.name.startswith(".") or p.suffix in WEIGHT_FILES or p.name.endswith(".index.json"):
            continue
        if p.stat().st_size > COMPRESS_OVER:
            (tmp / (p.name + ".xz")).write_bytes(lzma.compress(p.read_bytes(), preset=6))
        else:
            shutil.copyfile(p, tmp / p.name)
        copied.append(p.name)
    meta = {
        "format": PACK_FORMAT,
        "version": PACK_VERSION,
        "block_size": block,
        "levels": list(NF4_LEVELS),
        "scales": "uint8 q per block, scale = 2 ** (lo + q * step), lo/step float32 per tensor, rounded up",
        "weights": WEIGHTS,
        "embedding": emb_name,
        "token_norm": token_norm,
        "kept_token_rows": entries[emb_name]["kept_rows"],
        "vocab_size": entries[emb_name]["shape"][0],
        "quantized_parameters": quantized_params,
        "tie_word_embeddings": tied,
        "not_stored": skipped,
        "tensors": entries,
        "files": copied,
        "source": {"folder": src.name, "weights_sha256": {p.name: file_sha256(p) for p in weight_files}},
    }
    (tmp / META).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf8")
    meta["bytes"] = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)
    return meta


def is_packed(path: str | Path) -> bool:
    """Whether ``path`` is a packed backbone folder."""
    return (Path(path) / META).is_file()


def read_meta(path: str | Path) -> dict:
    meta = json.loads((Path(path) / META).read_text(encoding="utf8"))
    if meta.get("format") != PACK_FORMAT or meta.get("version") != PACK_VERSION:
        raise ValueError(
            f"{path}: not a {PACK_FORMAT} v{PACK_VERSION} folder (format {meta.get('format')!r}, "
            f"version {meta.get('version')!r})"
        )
    return meta


def unpack_state(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
    keep: Iterable[str] | None = None,
) -> dict[str, torch.Tensor]:
    """The packed folder's weights as a state dict (dequantized, ``dtype``, on ``device``; the token embeddings
    full-size with zeros outside the kept rows). ``keep``: only these names."""
    from safetensors.torch import load

    root = Path(path)
    meta = read_meta(root)
    raw = load(lzma.decompress((root / meta["weights"]).read_bytes()))
    block = int(meta["block_size"])
    wanted = set(keep) if keep is not None else None
    state: dict[str, torch.Tensor] = {}
    for name, entry in meta["tensors"].items():
        if wanted is not None and name not in wanted:
            continue
        kind, shape = entry["kind"], entry["shape"]
        if kind == "dense":
            state[name] = raw[name].to(device=device, dtype=dtype)
            continue
        parts = [raw[f"{name}.{k}"] for k in ("codes", "scales", "scale_range")]
        if kind == "nf4":
            state[name] = dequantize_nf4(*parts, shape, dtype=dtype, device=device, block=block)
        elif kind == "rows":
            rows = raw[f"{name}.rows"]
            full = torch.zeros(shape, dtype=dtype, device=device)
            full[rows.to(full.device)] = dequantize_nf4(
                *parts, (len(rows), shape[1]), dtype=dtype, device=device, block=block
            )
            full[raw[f"{name}.exact_rows"].to(full.device)] = raw[f"{name}.exact"].to(device=full.device, dtype=dtype)
            state[name] = full
        else:
            raise ValueError(f"{root}: unknown tensor kind {kind!r} for {name}")
    return state


def load_packed_tokenizer(path: str | Path, trust_remote_code: bool = False):
    """The tokenizer of a packed folder (its compressed files unpacked into a temporary folder)."""
    from transformers import AutoTokenizer

    root = Path(path)
    meta = read_meta(root)
    with tempfile.TemporaryDirectory(prefix="laser-pack-tok-") as tmp:
        for name in meta["files"]:
            packed = root / (name + ".xz")
            if packed.is_file():
                (Path(tmp) / name).write_bytes(lzma.decompress(packed.read_bytes()))
            else:
                shutil.copyfile(root / name, Path(tmp) / name)
        return AutoTokenizer.from_pretrained(tmp, trust_remote_code=trust_remote_code)


def load_packed(
    path: str | Path, dtype: torch.dtype, device: str | torch.device, config=None, trust_remote_code: bool = False
):
    """``(model, tokenizer, meta)`` of a packed folder: the causal LM built from its ``config.json`` (or the
    given HF ``config``, e.g. one cut to fewer layers) on ``device`` in ``dtype``, with the dequantized weights.
    Every stored weight the model has is loaded; the LM head is the tied embeddings or zeros."""
    from transformers import AutoConfig, AutoModelForCausalLM

    root = Path(path)
    meta = read_meta(root)
    hf = config if config is not None else AutoConfig.from_pretrained(root, trust_remote_code=trust_remote_code)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(hf, dtype=dtype, trust_remote_code=trust_remote_code)
    names = set(model.state_dict())
    state = unpack_state(root, dtype=dtype, device=device, keep=names)
    missing, unexpected = model.load_state_dict(state, strict=False)
    heads = [m for m in missing if "lm_head" in m]
    if unexpected or len(heads) != len(missing):
        raise RuntimeError(
            f"{root}: the packed weights do not fit the model: missing "
            f"{[m for m in missing if m not in heads]}, unexpected {unexpected}"
        )
    if meta["tie_word_embeddings"] and getattr(hf, "tie_word_embeddings", False):
        model.tie_weights()
    else:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in heads:
                    p.zero_()
    return model, load_packed_tokenizer(root, trust_remote_code), meta
