"""Content fingerprints: the one key function of every private cache.

Three caches reuse finished work outside ZenML's own cache: the ID-based recommender's checkpoints
(:func:`laser_core.sr.trainer.config_hash`), Laser's checkpoints (:meth:`laser_core.train.LaserTrainer.run_hash`)
and the item tables (:meth:`laser_core.model.LaserModel.weights_fingerprint`). A cache may only return what its
key fully determines, so every key is :func:`fingerprint` over the *content* a result depends on, never over
names, paths or sizes:

- :func:`split_fingerprint`: the split's data (user ids, every training sequence, the validation and test
  targets, the catalogue size);
- :func:`module_fingerprint`: a model's weights (its state dict: names, dtypes, shapes, bytes) and config;
- :func:`catalogue_fingerprint`: the formatted item texts (what the LLM reads for each item);
- :func:`backbone_fingerprint`: the frozen LLM: the bytes of every file of its local folder (weights,
  config, tokenizer), or, for a hub id, the loaded state dict and tokenizer; plus the loading settings.

:func:`fingerprint` hashes a typed, canonical encoding (sha256) of nested parts: None, bools, numbers, strings,
bytes, pydantic models, mappings (sorted keys), sequences, NumPy arrays and torch tensors (dtype, shape, raw
bytes), plus the library version (code changes invalidate the caches too). Anything else is a ``TypeError``,
so a key cannot silently fall back to ``str()`` of an object.

Cost: the split, the SR weights and the item texts hash in milliseconds at the sizes used here (a few MB). A
backbone's files are read once per loaded backbone (the result is kept on the :class:`Backbone`); files of
16 MiB or more also have their sha256 kept under ``LASER_CACHE_DIR/fingerprints`` keyed on their path, size,
modification time and inode, so a multi-GB model is read once, not once per process.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel

from laser_core.paths import default_cache_dir

FINGERPRINT_FORMAT = 1
LARGE_FILE = 16 << 20  # files this big get their sha256 memoized on disk (path, size, mtime, inode)


# ----------------------------------------------------------------------------------------- the key function
def fingerprint(kind: str, parts: Mapping[str, Any]) -> str:
    """The sha256 (hex) of ``kind``, the library version and a canonical encoding of ``parts``."""
    from laser_core import __version__

    h = hashlib.sha256()
    _feed(h, {"kind": kind, "format": FINGERPRINT_FORMAT, "laser": __version__, "parts": dict(parts)})
    return h.hexdigest()


def _tag(h, tag: bytes, payload: bytes = b"") -> None:
    h.update(tag)
    h.update(struct.pack("<Q", len(payload)))
    h.update(payload)


def _feed(h, value: Any) -> None:
    if value is None:
        _tag(h, b"N")
    elif isinstance(value, (bool, np.bool_)):
        _tag(h, b"B", b"1" if value else b"0")
    elif isinstance(value, (int, np.integer)):
        _tag(h, b"I", str(int(value)).encode())
    elif isinstance(value, (float, np.floating)):
        _tag(h, b"F", float(value).hex().encode())
    elif isinstance(value, str):
        _tag(h, b"S", value.encode("utf8"))
    elif isinstance(value, (bytes, bytearray, memoryview)):
        _tag(h, b"Y", bytes(value))
    elif isinstance(value, BaseModel):
        _tag(h, b"M", type(value).__name__.encode())
        _feed(h, value.model_dump(mode="json"))
    elif isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        _tag(h, b"T", f"{t.dtype}|{tuple(t.shape)}".encode())
        _tag(h, b"t", t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(value, np.ndarray):
        if value.dtype == object:
            raise TypeError("fingerprint: object arrays have no canonical bytes; pass a list of values")
        a = np.ascontiguousarray(value)
        _tag(h, b"A", f"{a.dtype.str}|{a.shape}".encode())
        _tag(h, b"a", a.tobytes())
    elif isinstance(value, Mapping):
        keys = list(value)
        if not all(isinstance(k, str) for k in keys):
            raise TypeError(f"fingerprint: mapping keys must be strings, got {[type(k) for k in keys]}")
        _tag(h, b"D", str(len(keys)).encode())
        for k in sorted(keys):
            _feed(h, k)
            _feed(h, value[k])
    elif isinstance(value, (list, tuple)):
        _tag(h, b"L", str(len(value)).encode())
        for v in value:
            _feed(h, v)
    else:
        raise TypeError(f"fingerprint: no canonical encoding for {type(value).__name__}")


# ------------------------------------------------------------------------------------------- content parts
def split_fingerprint(split) -> str:
    """The split's data: user ids, each user's training sequence, validation and test targets, n_items."""
    train = [np.asarray(t, dtype=np.int64) for t in split.train]
    lengths = np.asarray([len(t) for t in train], dtype=np.int64)
    flat = np.concatenate(train) if train else np.zeros(0, dtype=np.int64)
    return fingerprint(
        "split",
        {
            "users": [str(u) for u in split.users],
            "n_items": int(split.n_items),
            "lengths": lengths,
            "train": flat,
            "valid_target": np.asarray(split.valid_target, dtype=np.int64),
            "test_target": np.asarray(split.test_target, dtype=np.int64),
        },
    )


def module_fingerprint(module: torch.nn.Module | None, **extra: Any) -> str | None:
    """A model's weights (state dict) and class, plus ``extra`` (its config, sizes); None for no model."""
    if module is None:
        return None
    return fingerprint("module", {"class": type(module).__name__, "state": dict(module.state_dict()), **extra})


def sr_fingerprint(sr_model) -> str | None:
    """The frozen ID-based recommender: weights, config and catalogue size (None when there is none)."""
    if sr_model is None:
        return None
    return module_fingerprint(sr_model, config=sr_model.config, n_items=int(sr_model.n_items))


def catalogue_fingerprint(formatter) -> str:
    """The formatted text of every catalogue item (titles, brands, categories as the template renders them,
    after truncation) and the text settings (history length, ...), which also shape the user texts."""
    return fingerprint(
        "catalogue", {"texts": [formatter.item_text(i) for i in range(len(formatter))], "text": formatter.config}
    )


def backbone_fingerprint(
    path: str, settings: Mapping[str, Any], model: torch.nn.Module | None = None, tokenizer=None
) -> str:
    """The frozen LLM: every file of its local folder (weights, config, tokenizer; hidden entries skipped),
    or, when ``path`` is not a folder (a hub id), the loaded ``model``'s state dict and the ``tokenizer``;
    plus the loading ``settings`` (quantization, compute dtype, ...)."""
    root = Path(path)
    if root.is_dir():
        content: dict[str, Any] = {"files": directory_files(root)}
    else:
        if model is None or tokenizer is None:
            raise ValueError(
                f"backbone {path!r} is not a local folder: its fingerprint needs the loaded model and tokenizer"
            )
        content = {"state": dict(model.state_dict()), "tokenizer": _tokenizer_text(tokenizer)}
    return fingerprint("backbone", {**content, "settings": dict(settings)})


def _tokenizer_text(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return backend.to_str()
    return json.dumps(tokenizer.get_vocab(), sort_keys=True)


def directory_files(root: Path) -> list[list[str]]:
    """``[relative path, sha256]`` of every regular file under ``root`` (sorted; hidden entries skipped)."""
    root = Path(root)
    out = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or not p.is_file():
            continue
        out.append([rel.as_posix(), file_sha256(p)])
    if not out:
        raise FileNotFoundError(f"{root}: no files to fingerprint")
    return out


def folder_fingerprint(root: str | Path) -> str:
    """One key of a folder's files (:func:`directory_files`: names and contents, hidden entries skipped), e.g. a
    saved model folder a benchmark reads."""
    return fingerprint("folder", {"files": directory_files(Path(root))})


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes; for large files memoized on disk by (resolved path, size, mtime, inode)."""
    path = Path(path)
    st = path.stat()
    if st.st_size < LARGE_FILE:
        return _read_sha256(path)
    real = str(path.resolve())
    stamp = {"path": real, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}
    memo = (
        default_cache_dir()
        / "fingerprints"
        / (hashlib.sha256(json.dumps(stamp, sort_keys=True).encode()).hexdigest()[:32] + ".json")
    )
    try:
        saved = json.loads(memo.read_text(encoding="utf8"))
        if {k: saved.get(k) for k in stamp} == stamp and isinstance(saved.get("sha256"), str):
            return saved["sha256"]
    except (OSError, ValueError):
        pass
    digest = _read_sha256(path)
    tmp = None
    try:  # best effort (a read-only cache only costs the re-read); a unique temporary name per writer
        memo.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=memo.parent, prefix=memo.name, suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf8") as fh:
            json.dump({**stamp, "sha256": digest}, fh)
        os.replace(tmp, memo)
    except OSError:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
    return digest


def _read_sha256(path: Path) -> str:
    from laser_core.bundle import sha256_file  # the one file-hash implementation (torch-free module)

    return sha256_file(path)


__all__ = [
    "backbone_fingerprint",
    "catalogue_fingerprint",
    "directory_files",
    "file_sha256",
    "fingerprint",
    "module_fingerprint",
    "split_fingerprint",
    "sr_fingerprint",
]
