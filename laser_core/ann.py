"""An optional approximate-nearest-neighbour (ANN) index over a bundle's item table, for large catalogues.

The exact scorer (``scorer.onnx``) reads the whole table for every user: about 120 ms per user at 1M items x 576
on 2 cores (``bench/results/serving.json``). An HNSW graph (hnswlib; chosen by measurement against FAISS and
usearch, see ``bench/serving_ann.py`` and ``docs/serving_http.md``) visits a few thousand rows instead.

- :func:`build_index` builds it over the L2-normalized table (inner product = the scorer's cosine; row i of the
  table is label i, so the index returns catalogue rows like the scorer);
- :func:`calibrate_ef` picks the search breadth ``ef``: the smallest that reaches a target recall@k against the
  exact top-k on held-out queries drawn from the table (rows with noise);
- :func:`index_bundle` adds one to an existing bundle (``item_index.hnsw``, hnswlib's own binary format, listed
  with its sha256 in the manifest's ``files`` and described by its ``ann_index`` section, which ties it to the
  scorer's table by the sha256 of the file holding it, the row count and the width);
- :class:`AnnIndex` loads and searches it (thread-safe searches; ``laser_core.serving.Recommender`` uses it
  unless ``exact=True``).

hnswlib is an optional dependency (``pip install 'laser[ann]'``); bundles without an index need nothing new.
This module imports no torch.
"""

from __future__ import annotations

import math
import struct
from pathlib import Path
from typing import Any

import numpy as np

from laser_core.bundle import (
    AnnCalibration,
    AnnIndexSection,
    l2_normalize,
    load_manifest,
    read_scorer_table,
    scorer_table_file,
    sha256_file,
    verify_bundle,
    write_manifest,
)
from laser_core.ranking import top_k

INDEX_FILE = "item_index.hnsw"
LIBRARY = "hnswlib"
KIND = "hnsw"
METRIC = "ip"  # inner product over L2-normalized rows = cosine
DEFAULT_M = 16
MAX_M = 10000  # hnswlib caps M here silently (with a warning on stderr); larger values are refused
DEFAULT_EF_CONSTRUCTION = 100  # what bench/serving_ann.py measured
DEFAULT_TARGET_RECALL = 0.99
EF_GRID = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096)
# hnswlib's file header (hnswalg.h saveIndex), little-endian on the platforms it ships for
_HEADER = struct.Struct("<QQQQQQiIQQQdQ")


class AnnError(ValueError):
    """The index cannot be built, loaded or used (library missing, file unreadable or not matching its table)."""


def _hnswlib() -> Any:
    try:
        import hnswlib
    except ImportError as exc:
        raise AnnError(
            "the ANN index needs hnswlib, which is not installed: pip install 'laser[ann]' "
            "(or serve the bundle with the exact scorer: laser serve --exact)"
        ) from exc
    return hnswlib


def library_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("hnswlib")
    except PackageNotFoundError:
        return str(getattr(_hnswlib(), "__version__", "unknown"))


def _normalized(x: Any) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float32)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise ValueError(f"expected a [n, d] matrix, got shape {arr.shape}")
    return np.ascontiguousarray(l2_normalize(arr), dtype=np.float32)


def _header_fields(path: Path) -> tuple:
    try:
        with path.open("rb") as f:
            raw = f.read(_HEADER.size)
    except OSError as exc:
        raise AnnError(f"{path}: cannot read the ANN index ({exc})") from None
    if len(raw) != _HEADER.size:
        raise AnnError(f"{path}: not an hnswlib index (the file is {len(raw)} bytes, shorter than its header)")
    return _HEADER.unpack(raw)


def read_header(path: str | Path) -> dict:
    """``n_items`` (elements in the index), ``dim``, ``M`` and ``ef_construction`` from an hnswlib index file's
    header, without loading the graph; an :class:`AnnError` naming the file if it is not one."""
    path = Path(path)
    (_, max_elements, count, per_element, label_offset, data_offset, max_level, _, _, _, m, _, ef_c) = _header_fields(
        path
    )
    data_bytes = label_offset - data_offset
    if not (0 <= count <= max_elements and 0 < data_bytes < per_element and data_bytes % 4 == 0 and max_level >= 0):
        raise AnnError(f"{path}: not an hnswlib index (inconsistent header)")
    return {"n_items": int(count), "dim": data_bytes // 4, "M": int(m), "ef_construction": int(ef_c)}


def _upper_levels(sizes: np.ndarray, count: int, block_words: int, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Walk the per-element upper-level records (a uint32 byte size, then that many bytes of link lists) held in
    ``sizes`` (the file's tail as uint32 words): ``(levels [count], first word of each element's lists [count])``.
    The loop steps only over elements that have upper levels (about 1/M of them): the zero-size records between
    two of them are consecutive words, found with a search over the tail's non-zero words."""
    levels = np.zeros(count, dtype=np.int64)
    starts = np.zeros(count, dtype=np.int64)
    nonzero = np.flatnonzero(sizes)
    pos, element, n_words = 0, 0, len(sizes)
    while element < count:
        j = int(np.searchsorted(nonzero, pos))
        nxt = int(nonzero[j]) if j < len(nonzero) else n_words
        if nxt - pos >= count - element:  # every remaining element has level 0
            pos += count - element
            break
        element += nxt - pos
        if nxt >= n_words:  # the file ends before its last elements' records
            pos = n_words + count - element
            break
        size = int(sizes[nxt])
        if size % (block_words * 4):
            raise AnnError(
                f"{path}: not a valid hnswlib index: element {element}'s upper-level link lists are {size} bytes, not a multiple of "
                f"size_links_per_element ({block_words * 4})"
            )
        levels[element] = size // (block_words * 4)
        starts[element] = nxt + 1
        pos = nxt + 1 + size // 4
        element += 1
        if pos > n_words:
            break
    if pos != n_words:
        gap = (pos - n_words) * 4
        raise AnnError(
            f"{path}: not a valid hnswlib index: the file's length does not match its header and link lists "
            f"({abs(gap)} bytes {'short' if gap > 0 else 'too many'})"
        )
    return levels, starts


def validate_index_file(path: str | Path, dim: int | None = None) -> dict:
    """Check a whole hnswlib index file (hnswlib 0.8's ``saveIndex`` layout) before hnswlib reads it, so that a
    corrupted or crafted file is an :class:`AnnError` naming it and the first problem instead of a crash:
    the header's sizes (the level-0 record of ``4 + 4*maxM0`` link bytes, ``4*dim`` vector bytes and an 8-byte
    label; ``maxM = M``, ``maxM0 = 2M``, ``M <= 10000``), ``count <= max_elements <= 2 count``, the file length,
    every link count (``<= maxM0`` at level 0, ``<= maxM`` above) and link id (``< count``, pointing at an
    element that has that level), no deleted marks, the entry point (``< count``, on the top level) and the labels
    (a permutation of ``0..count-1``: label = catalogue row). Vectorised with numpy over a memory map (the upper
    levels are walked over the elements that have them). Returns :func:`read_header`'s dict."""
    path = Path(path)
    header = read_header(path)
    (off0, max_elements, count, per_el, label_off, data_off, max_level, entry, max_m, max_m0, m, mult, _) = (
        _header_fields(path)
    )
    bad = f"{path}: not a valid hnswlib index:"
    if dim is not None and header["dim"] != dim:
        raise AnnError(f"{path}: the ANN index holds vectors of width {header['dim']}, but the table's is {dim}")
    if not 2 <= m <= MAX_M or max_m != m or max_m0 != 2 * m:
        raise AnnError(f"{bad} M={m}, maxM={max_m}, maxM0={max_m0} (hnswlib writes 2 <= M <= {MAX_M}, maxM0 = 2M)")
    if not (off0 == 0 and data_off == 4 + 4 * max_m0 and per_el == label_off + 8):
        raise AnnError(f"{bad} its element layout (offsets {off0}, {data_off}, {label_off}, {per_el}) is not hnswlib's")
    if not math.isclose(mult, 1 / math.log(m), rel_tol=1e-9):
        raise AnnError(f"{bad} its level multiplier {mult} is not 1/ln(M)")
    if count < 1 or max_elements > 2 * count:
        raise AnnError(f"{bad} {count} elements with room for {max_elements} (must be 1 <= count <= room <= 2 count)")
    size = path.stat().st_size
    level0_words = count * per_el // 4
    if size < _HEADER.size + count * (per_el + 4) or (size - _HEADER.size) % 4:
        raise AnnError(f"{bad} the file ({size} bytes) is too short for its {count} elements")
    words = np.memmap(path, dtype="<u4", mode="r", offset=_HEADER.size)
    level0 = words[:level0_words].reshape(count, per_el // 4)
    head = np.asarray(level0[:, 0])
    n_links = head & 0xFFFF
    if (head >> 16).any():
        raise AnnError(f"{bad} element {int(np.flatnonzero(head >> 16)[0])} is marked deleted (or its header is bad)")
    _check_links(bad, n_links, np.asarray(level0[:, 1 : 1 + max_m0]), max_m0, count)
    lo, hi = np.asarray(level0[:, label_off // 4]), np.asarray(level0[:, label_off // 4 + 1])
    if hi.any() or not np.array_equal(np.sort(lo), np.arange(count, dtype=lo.dtype)):
        raise AnnError(f"{bad} its labels are not the rows 0..{count - 1}, each once")
    block = 1 + max_m  # words of one upper-level link list: the count, then maxM ids
    levels, starts = _upper_levels(np.asarray(words[level0_words:]), count, block, path)
    top = int(levels.max())
    if max_level != top or not 0 <= entry < count or levels[entry] != max_level:
        raise AnnError(
            f"{bad} entry point {entry} on level {max_level} (the elements' top level is {top}"
            f"{f', the entry point is on level {int(levels[entry])}' if 0 <= entry < count else ''}; must be < {count})"
        )
    if top:
        owners = np.repeat(np.arange(count), levels)
        within = np.arange(len(owners)) - np.repeat(np.cumsum(levels) - levels, levels)  # 0 = level 1
        rows = starts[owners] + within * block
        lists = np.asarray(words[level0_words:])[rows[:, None] + np.arange(block)]
        _check_links(bad, lists[:, 0] & 0xFFFF, lists[:, 1:], max_m, count, levels, within + 1)
    del words
    return header


def _check_links(bad: str, n_links, links, limit: int, count: int, levels=None, level=None) -> None:
    """Link counts ``<= limit``; the first ``n_links`` ids of each row ``< count``; with ``levels`` (every
    element's top level) and ``level`` (each row's level, above 0), each id pointing at an element that reaches
    the row's level (hnswlib reads that element's list at the same level next)."""
    over = np.flatnonzero(n_links > limit)
    if len(over):
        raise AnnError(f"{bad} a link list of {int(n_links[over[0]])} ids (more than {limit})")
    used = np.arange(links.shape[1]) < n_links[:, None]
    out = used & (links >= count)
    if out.any():
        raise AnnError(f"{bad} link id {int(links[out][0])} is out of range (the index holds {count} elements)")
    if levels is not None:
        low = used & (levels[np.minimum(links, count - 1)] < level[:, None])
        if low.any():
            row, col = (int(i[0]) for i in np.nonzero(low))
            raise AnnError(
                f"{bad} a level-{int(level[row])} link points at element {int(links[row, col])}, which has no "
                f"level {int(level[row])}"
            )


class AnnIndex:
    """An hnswlib HNSW index over L2-normalized item rows (label = catalogue row). ``search`` is thread-safe."""

    def __init__(self, index: Any, ef: int) -> None:
        self._index = index
        self.ef = ef

    @property
    def ef(self) -> int:
        return self._ef

    @ef.setter
    def ef(self, value: int) -> None:
        self._ef = int(value)
        self._index.set_ef(self._ef)  # hnswlib searches max(ef, k) candidates, so a larger k stays correct

    @property
    def n_items(self) -> int:
        return int(self._index.get_current_count())

    @property
    def dim(self) -> int:
        return int(self._index.dim)

    @classmethod
    def load(cls, path: str | Path, dim: int, ef: int = 64, n_items: int | None = None) -> "AnnIndex":
        """Load ``path``; with ``n_items``, its element count and width must be ``n_items`` and ``dim``. The whole
        file is checked first (:func:`validate_index_file`): hnswlib trusts it, and a crafted graph would crash
        the process."""
        hnswlib = _hnswlib()
        path = Path(path)
        header = read_header(path)
        if header["dim"] != dim:
            raise AnnError(f"{path}: the ANN index holds vectors of width {header['dim']}, but the table's is {dim}")
        if n_items is not None and header["n_items"] != n_items:
            raise AnnError(
                f"{path}: the ANN index holds {header['n_items']} items, but the scorer's table has {n_items} rows"
            )
        validate_index_file(path)
        index = hnswlib.Index(space=METRIC, dim=int(dim))
        try:
            index.load_index(str(path))
        except Exception as exc:  # noqa: BLE001 - hnswlib raises RuntimeError on a corrupted file
            raise AnnError(f"{path}: hnswlib cannot load it ({exc})") from None
        index.set_num_threads(1)
        return cls(index, ef)

    def save(self, path: str | Path) -> Path:
        self._index.save_index(str(path))
        return Path(path)

    def search(self, queries: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(scores [B, k], rows [B, k])`` best first: cosines (the queries are normalized here, as the exact
        scorer does) and catalogue rows of the approximate top-``k``."""
        q = _normalized(queries)
        if not 1 <= k <= self.n_items:
            raise ValueError(f"k must be in 1..{self.n_items} (the indexed items), got {k}")
        labels, dist = self._index.knn_query(q, k=int(k), num_threads=1)
        return (1.0 - dist).astype(np.float32), labels.astype(np.int64)

    def add(self, rows: Any, threads: int | None = None) -> None:
        """Append rows (labels continue from the current count), growing the index."""
        x = _normalized(rows)
        if x.shape[1] != self.dim:
            raise ValueError(f"rows have width {x.shape[1]}, the index {self.dim}")
        start = self.n_items
        self._index.resize_index(start + len(x))
        self._index.add_items(x, np.arange(start, start + len(x), dtype=np.int64), num_threads=threads or -1)
        self._index.set_num_threads(1)


def build_index(
    table: Any,
    M: int = DEFAULT_M,
    ef_construction: int = DEFAULT_EF_CONSTRUCTION,
    threads: int | None = None,
    seed: int = 0,
    ef: int = 64,
) -> AnnIndex:
    """An HNSW index over the L2-normalized rows of ``table`` ``[n, d]`` (row i = label i); ``M`` in
    ``2..MAX_M`` (hnswlib would silently cap a larger one)."""
    check_M(M)
    hnswlib = _hnswlib()
    x = _normalized(table)
    n, d = x.shape
    if n == 0:
        raise ValueError("the table is empty")
    index = hnswlib.Index(space=METRIC, dim=int(d))
    index.init_index(max_elements=n, ef_construction=int(ef_construction), M=int(M), random_seed=int(seed))
    index.add_items(x, np.arange(n, dtype=np.int64), num_threads=threads or -1)
    index.set_num_threads(1)
    return AnnIndex(index, ef)


def check_M(M: Any) -> int:
    """``M`` (the graph degree) as an int in ``2..MAX_M``, else a ``ValueError`` saying so."""
    if isinstance(M, bool) or not isinstance(M, (int, np.integer)) or not 2 <= M <= MAX_M:
        raise ValueError(f"M must be an integer in 2..{MAX_M} (hnswlib's range), got {M!r}")
    return int(M)


def exact_top_k(table: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Rows of the exact top-``k`` cosines (``table`` normalized), best first, ``[B, k]`` (ties as the scorer's)."""
    q = _normalized(queries)
    chunks = [top_k(q[lo : lo + 16] @ table.T, k)[0] for lo in range(0, len(q), 16)]
    return np.concatenate(chunks) if chunks else np.empty((0, k), dtype=np.int64)


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean over rows of ``|found ∩ truth| / k``."""
    return float(sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(found, truth)) / truth.size)


def calibration_queries(table: np.ndarray, n: int, seed: int = 0, noise: float = 0.5) -> np.ndarray:
    """Queries drawn like users, near items: ``n`` random table rows plus isotropic noise of norm ``noise``."""
    rng = np.random.default_rng(seed)
    rows = table[rng.choice(len(table), size=min(n, len(table)), replace=len(table) < n)]
    eps = rng.standard_normal(rows.shape, dtype=np.float32)
    eps *= noise / np.linalg.norm(eps, axis=1, keepdims=True)
    return _normalized(rows + eps)


def calibrate_ef(
    index: AnnIndex,
    table: np.ndarray,
    k: int,
    target: float = DEFAULT_TARGET_RECALL,
    n_queries: int = 200,
    seed: int = 0,
) -> dict:
    """Set ``index.ef`` to the smallest of :data:`EF_GRID` whose recall@``k`` against the exact top-``k`` of
    ``table`` (normalized) reaches ``target`` on :func:`calibration_queries`; returns the manifest's
    ``calibration`` entry (``ef_search`` = the largest tried when none reaches it: ``reached`` false)."""
    k = min(int(k), len(table))
    queries = calibration_queries(table, n_queries, seed)
    truth = exact_top_k(table, queries, k)
    best = None
    for ef in EF_GRID:
        if ef < k and ef != EF_GRID[-1]:
            continue
        index.ef = ef
        r = recall_at_k(index.search(queries, k)[1], truth)
        best = (ef, r)
        if r >= target:
            break
    index.ef = best[0]
    return {
        "queries": len(queries),
        "query_rule": "random table rows plus isotropic noise of norm 0.5, normalized",
        "k": k,
        "target_recall": float(target),
        "recall": round(best[1], 4),
        "reached": best[1] >= target,
    }


def table_sha256(bundle_dir: str | Path, scorer_file: str) -> str:
    """sha256 of the file holding the scorer's table: ``<scorer>.data`` when the table is ONNX external data
    (``laser_core.bundle.scorer_table_file``), else the scorer; the index's ``scorer_sha256``."""

    data = Path(bundle_dir) / (scorer_file + ".data")
    return sha256_file(data if data.is_file() else Path(bundle_dir) / scorer_file)


def index_entry(
    index: AnnIndex, scorer_sha256: str, calibration: dict | None, M: int, ef_construction: int
) -> AnnIndexSection:
    """The manifest's ``ann_index`` section for ``index`` saved as :data:`INDEX_FILE`."""
    return AnnIndexSection(
        file=INDEX_FILE,
        library=LIBRARY,
        library_version=library_version(),
        kind=KIND,
        metric=METRIC,
        n_items=index.n_items,
        dim=index.dim,
        M=int(M),
        ef_construction=int(ef_construction),
        ef_search=index.ef,
        scorer_sha256=scorer_sha256,
        calibration=None if calibration is None else AnnCalibration(**calibration),
    )


def index_bundle(
    bundle_dir: str | Path,
    M: int = DEFAULT_M,
    ef_construction: int = DEFAULT_EF_CONSTRUCTION,
    target_recall: float = DEFAULT_TARGET_RECALL,
    ef: int | None = None,
    threads: int | None = None,
    seed: int = 0,
) -> AnnIndexSection:
    """Build (or rebuild) the ANN index of the bundle in ``bundle_dir`` over its scorer's table, in place:
    writes :data:`INDEX_FILE` and the manifest's ``ann_index`` section (``files`` gets its sha256). ``ef``: the
    search breadth to record; default: :func:`calibrate_ef` at ``target_recall`` for the bundle's k. Returns the
    section."""

    check_M(M)
    root = Path(bundle_dir)
    manifest = load_manifest(root)
    verify_bundle(root, manifest)  # the table read below is the listed one, and no path leads outside
    scorer = root / manifest.scorer.file
    table = read_scorer_table(scorer)
    index = build_index(table, M=M, ef_construction=ef_construction, threads=threads, seed=seed)
    calibration = None
    if ef is None:
        calibration = calibrate_ef(index, table, manifest.k, target=target_recall, seed=seed)
    else:
        index.ef = ef
    tmp = root / (INDEX_FILE + ".tmp")
    index.save(tmp)
    tmp.replace(root / INDEX_FILE)
    table_digest = manifest.files[scorer_table_file(manifest.files, manifest.scorer.file)]  # verified above
    entry = index_entry(index, table_digest, calibration, M, ef_construction)
    write_manifest(root, manifest.model_copy(update={"ann_index": entry}))
    return entry
