"""Approximate nearest-neighbour (ANN) index vs the exact ONNX scorer: recall@k and batch-1 latency, in one run.

    python bench/serving_ann.py --sizes 100000 --libraries hnswlib faiss usearch   # pick the library
    python bench/serving_ann.py --sizes 100000 1000000 --libraries hnswlib         # the serving figures

Called by ``python bench/serving.py --ann`` too (the same options after ``--ann``). For each catalogue size and
table kind a seeded float32 table ``[n, dim]`` is L2-normalized:

- ``random``: i.i.d. Gaussian rows: no structure at all, the worst case for an ANN index (every item is about
  equally far from every query);
- ``clustered``: a Gaussian mixture in a low-dimensional latent space (``--latent`` dims, ``n / 500`` clusters,
  within-cluster spread 0.35 of the between-cluster one) mapped to ``dim`` by a fixed random matrix, plus a small
  isotropic noise (0.1 per coordinate): an item table with the structure of a trained one (clustered, low
  intrinsic dimension). It is synthetic: no real item embeddings were used.

Users are drawn like items (a fresh draw from the same distribution: for ``clustered`` a random cluster, its
latent spread and the same noise), not uniformly. Two query sets: ``--calib-queries`` (held out, pick the
search breadth ``ef``: the smallest of ``--efs`` whose recall@k against the exact top-k is >= ``--target-recall``)
and ``--timed-queries`` (recall and latency reported at that ``ef``). Ground truth: numpy's exact top-k over the
same table (the exact ONNX scorer is checked to agree with it).

Latency: batch 1, the exact scorer (``laser_core.export.export_scorer``'s ONNX under onnxruntime, ``--threads``
intra-op threads) and each index (``laser_core.ann`` for the library serving uses, else the library's own call;
one search thread) interleaved query by query (rotating which goes first) after a warm-up.

Writes ``bench/results/serving_ann.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIBRARIES = ("hnswlib", "faiss", "usearch")
TABLES = ("clustered", "random", "scientific")
# the trained Laser item table of the Scientific run (SmolLM2-135M, 5,327 items x 576; not in the repository): the
# trainer's best/extra.safetensors ('table'; runs before the shared trainer wrote it as best_table.safetensors)
REAL_TABLE = ROOT / "runs" / "laser-sci" / "laser-laser-0bd0b0da22b7d0dc" / "best" / "extra.safetensors"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--tables", nargs="+", default=["clustered", "random"], choices=list(TABLES))
    p.add_argument(
        "--real-table",
        type=Path,
        default=REAL_TABLE,
        help="safetensors file with a trained item table ('table' [n, dim]) for --tables scientific",
    )
    p.add_argument("--real-noise", type=float, default=0.5, help="noise norm added to real rows (scientific)")
    p.add_argument("--libraries", nargs="+", default=["hnswlib"], choices=LIBRARIES)
    p.add_argument("--dim", type=int, default=576)
    p.add_argument("--latent", type=int, default=32, help="intrinsic dimension of the clustered table")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--M", type=int, default=16, help="graph degree (hnswlib/faiss M, usearch connectivity)")
    p.add_argument("--ef-construction", type=int, default=100)
    p.add_argument(
        "--efs", type=int, nargs="+", default=[10, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024]
    )
    p.add_argument("--target-recall", type=float, default=0.99)
    p.add_argument("--calib-queries", type=int, default=300)
    p.add_argument("--timed-queries", type=int, default=300)
    p.add_argument("--threads", type=int, default=2, help="exact scorer's intra-op threads and index build threads")
    p.add_argument("--no-exact", action="store_true", help="skip the exact ONNX scorer's timing")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "serving_ann.json")
    p.add_argument("--merge", action="store_true", help="keep the other cells already in --out")
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------ tables
def make_table(kind: str, n: int, dim: int, latent: int, seed: int, real: Path | None = None, noise: float = 0.5):
    """(table [n, dim] L2-normalized float32, draw(m, rng) -> m user vectors drawn like the items)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    if kind == "scientific":  # the real rows first, then real rows (cycled, shuffled) plus noise of norm `noise`
        from safetensors.numpy import load_file

        base = load_file(str(real))["table"].astype(np.float32)
        base /= np.linalg.norm(base, axis=1, keepdims=True)
        if base.shape[1] != dim:
            raise SystemExit(f"{real}: width {base.shape[1]}, not --dim {dim}")

        def draw(m: int, r) -> np.ndarray:
            eps = r.standard_normal((m, dim), dtype=np.float32)
            eps *= noise / np.linalg.norm(eps, axis=1, keepdims=True)
            return base[r.integers(len(base), size=m)] + eps

        table = np.empty((n, dim), dtype=np.float32)
        table[: min(n, len(base))] = base[: min(n, len(base))]
        for lo in range(len(base), n, 100_000):
            hi = min(n, lo + 100_000)
            table[lo:hi] = draw(hi - lo, rng)
        table /= np.linalg.norm(table, axis=1, keepdims=True)
        return table, draw
    if kind == "random":

        def draw(m: int, r) -> np.ndarray:
            return r.standard_normal((m, dim), dtype=np.float32)

    else:
        n_clusters = max(8, n // 500)
        W = (rng.standard_normal((latent, dim), dtype=np.float32) / math.sqrt(latent)).astype(np.float32)
        centers = rng.standard_normal((n_clusters, latent), dtype=np.float32)

        def draw(m: int, r) -> np.ndarray:
            z = centers[r.integers(n_clusters, size=m)] + 0.35 * r.standard_normal((m, latent), dtype=np.float32)
            return z @ W + 0.1 * r.standard_normal((m, dim), dtype=np.float32)

    table = np.empty((n, dim), dtype=np.float32)
    for lo in range(0, n, 100_000):
        hi = min(n, lo + 100_000)
        table[lo:hi] = draw(hi - lo, rng)
    table /= np.linalg.norm(table, axis=1, keepdims=True)
    return table, draw


# ------------------------------------------------------------------------------------------------ indexes
class _Lib:
    """build(table) / save(path) / load(path) / set_ef(ef) / search(q [1, d]) -> ids [k]."""

    name = ""


class HnswlibLib(_Lib):
    name = "hnswlib"

    def __init__(self, args):
        self.args = args

    def build(self, table):
        from laser_core.ann import build_index

        self.index = build_index(
            table, M=self.args.M, ef_construction=self.args.ef_construction, threads=self.args.threads
        )

    def save(self, path):
        self.index.save(path)

    def load(self, path, n, dim):
        from laser_core.ann import AnnIndex

        self.index = AnnIndex.load(path, dim=dim)

    def set_ef(self, ef):
        self.index.ef = ef

    def search(self, q, k):
        return self.index.search(q, k)[1][0]

    def version(self):
        import hnswlib

        return getattr(hnswlib, "__version__", "0.8.0")


class FaissLib(_Lib):
    name = "faiss"

    def __init__(self, args):
        self.args = args

    def build(self, table):
        import faiss

        faiss.omp_set_num_threads(self.args.threads)
        self.index = faiss.IndexHNSWFlat(table.shape[1], self.args.M, faiss.METRIC_INNER_PRODUCT)
        self.index.hnsw.efConstruction = self.args.ef_construction
        self.index.add(table)
        faiss.omp_set_num_threads(1)

    def save(self, path):
        import faiss

        faiss.write_index(self.index, str(path))

    def load(self, path, n, dim):
        import faiss

        self.index = faiss.read_index(str(path))
        faiss.omp_set_num_threads(1)

    def set_ef(self, ef):
        self.index.hnsw.efSearch = ef

    def search(self, q, k):
        q = q / (float((q * q).sum()) ** 0.5)
        return self.index.search(q, k)[1][0]

    def version(self):
        import faiss

        return faiss.__version__


class UsearchLib(_Lib):
    name = "usearch"

    def __init__(self, args):
        self.args = args

    def build(self, table):
        import numpy as np
        from usearch.index import Index

        self.index = Index(
            ndim=table.shape[1],
            metric="ip",
            dtype="f32",
            connectivity=self.args.M,
            expansion_add=self.args.ef_construction,
        )
        self.index.add(np.arange(len(table), dtype=np.uint64), table, threads=self.args.threads)

    def save(self, path):
        self.index.save(str(path))

    def load(self, path, n, dim):
        from usearch.index import Index

        self.index = Index.restore(str(path))

    def set_ef(self, ef):
        self.index.expansion_search = ef

    def search(self, q, k):
        q = q[0] / (float((q * q).sum()) ** 0.5)
        return self.index.search(q, k, threads=1).keys

    def version(self):
        import usearch

        return usearch.__version__


LIBS = {"hnswlib": HnswlibLib, "faiss": FaissLib, "usearch": UsearchLib}


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
    return float("nan")


# ------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, str(args.threads))
    sys.path.insert(0, str(ROOT))
    import gc

    import numpy as np
    import onnxruntime as ort

    from laser_core.ann import exact_top_k, recall_at_k
    from laser_core.bundle import export_scorer
    from laser_core.reporting import markdown_table

    k = args.k
    command = "python bench/serving_ann.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    out: dict = {"cells": {}}
    if args.merge and args.out.is_file():
        out = json.loads(args.out.read_text())
    out["command_last"] = command.strip()
    out.setdefault("commands", []).append(command.strip())
    out["settings"] = {
        "dim": args.dim,
        "k": k,
        "M": args.M,
        "ef_construction": args.ef_construction,
        "target_recall": args.target_recall,
        "calib_queries": args.calib_queries,
        "timed_queries": args.timed_queries,
        "threads": args.threads,
        "latent": args.latent,
        "real_table": f"{args.real_table} (rows: the trained Scientific item table)",
        "real_noise": args.real_noise,
        "seed": args.seed,
        "recall_definition": "|ANN top-k ∩ exact top-k| / k, averaged over the queries",
        "ef_rule": "smallest ef of --efs with recall >= target on the held-out calibration queries",
        "timing": "batch 1, time.perf_counter per call, exact ONNX scorer and index interleaved query by query",
    }
    machine = {
        "command": command.strip(),
        "cpu_count": os.cpu_count(),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
        "onnxruntime": ort.__version__,
        "numpy": np.__version__,
    }
    out.pop("machine", None)
    out.setdefault("machine_runs", []).append(machine)  # one entry per run (--merge keeps the earlier ones)
    for n in args.sizes:
        for kind in args.tables:
            key = f"{kind}/{n}"
            t0 = time.perf_counter()
            table, draw = make_table(kind, n, args.dim, args.latent, args.seed, args.real_table, args.real_noise)
            qrng = np.random.default_rng(args.seed + 1)
            calib = draw(args.calib_queries, qrng)
            timed = draw(args.timed_queries, qrng)
            truth_calib = exact_top_k(table, calib, k)
            truth_timed = exact_top_k(table, timed, k)
            cell: dict = {"table": kind, "n_items": n, "table_s": round(time.perf_counter() - t0, 1)}
            print(f"[{key}] table + ground truth in {cell['table_s']} s", flush=True)
            with tempfile.TemporaryDirectory(prefix="laser-ann-") as tmp:
                session = None
                if not args.no_exact:
                    onnx_path = Path(tmp) / "scorer.onnx"
                    export_scorer(table, onnx_path, k)
                    so = ort.SessionOptions()
                    so.intra_op_num_threads = args.threads
                    so.inter_op_num_threads = 1
                    session = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
                    got = np.concatenate(
                        [session.run(None, {"user_embedding": timed[i : i + 1]})[1] for i in range(20)]
                    )
                    cell["exact_onnx_recall_vs_numpy"] = recall_at_k(got, truth_timed[:20])
                for lib_name in args.libraries:
                    lib = LIBS[lib_name](args)
                    rec: dict = {"version": lib.version()}
                    rss0 = rss_mib()
                    t0 = time.perf_counter()
                    lib.build(table)
                    rec["build_s"] = round(time.perf_counter() - t0, 1)
                    rec["build_rss_growth_mib"] = round(rss_mib() - rss0)
                    path = Path(tmp) / f"index.{lib_name}"
                    lib.save(path)
                    rec["file_bytes"] = path.stat().st_size
                    lib.index = None
                    gc.collect()
                    t0 = time.perf_counter()
                    lib.load(path, n, args.dim)
                    rec["load_s"] = round(time.perf_counter() - t0, 2)
                    print(
                        f"[{key}] {lib_name}: built in {rec['build_s']} s, {rec['file_bytes'] / 1e6:.0f} MB", flush=True
                    )
                    curve = {}
                    chosen = None
                    for ef in sorted(args.efs):
                        if ef < k:
                            continue
                        lib.set_ef(ef)
                        t0 = time.perf_counter()
                        found = np.stack([lib.search(calib[i : i + 1], k) for i in range(len(calib))])
                        ms = (time.perf_counter() - t0) * 1e3 / len(calib)
                        r = recall_at_k(found, truth_calib)
                        curve[str(ef)] = {"recall": round(r, 4), "mean_ms": round(ms, 3)}
                        if r >= args.target_recall:
                            chosen = ef
                            break
                    rec["calibration"] = curve
                    rec["ef"] = chosen
                    if chosen is None:
                        rec["note"] = f"no ef of {sorted(args.efs)} reached recall {args.target_recall}"
                        chosen = max(args.efs)
                    lib.set_ef(chosen)
                    found = np.stack([lib.search(timed[i : i + 1], k) for i in range(len(timed))])
                    rec["recall_timed"] = round(recall_at_k(found, truth_timed), 4)
                    runners = {"ann": lambda u: lib.search(u, k)}
                    if session is not None:
                        runners["exact_onnx"] = lambda u: session.run(None, {"user_embedding": u})
                    names = list(runners)
                    times: dict[str, list[float]] = {m: [] for m in names}
                    warm = 5
                    reps = len(timed) if n <= 200_000 else min(len(timed), 100)
                    for r in range(warm + reps):
                        u = timed[r % len(timed)][None, :]
                        for j in range(len(names)):
                            m = names[(r + j) % len(names)]
                            t0 = time.perf_counter()
                            runners[m](u)
                            if r >= warm:
                                times[m].append((time.perf_counter() - t0) * 1e3)
                    for m in names:
                        rec[f"{m}_ms_p50"] = round(float(np.percentile(times[m], 50)), 3)
                        rec[f"{m}_ms_p99"] = round(float(np.percentile(times[m], 99)), 3)
                    rec["reps"] = reps
                    if session is not None:
                        rec["speedup_p50"] = round(rec["exact_onnx_ms_p50"] / rec["ann_ms_p50"], 1)
                    cell[lib_name] = rec
                    print(
                        f"[{key}] {lib_name}: ef {rec['ef']} recall {rec['recall_timed']} "
                        f"p50 {rec['ann_ms_p50']} ms"
                        + (f" vs exact {rec['exact_onnx_ms_p50']} ms ({rec['speedup_p50']}x)" if session else ""),
                        flush=True,
                    )
                    lib = None
                    gc.collect()
                session = None
            out["cells"][key] = cell
            table = None
            gc.collect()
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(out, indent=2) + "\n")  # after every cell: a long run keeps its figures
    machine["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nwrote {args.out}\n")
    print(markdown_table_for(out, markdown_table))
    return out


def markdown_table_for(out: dict, markdown_table) -> str:
    head = ["table", "items", "index", "ef", "recall@10", "index p50 / p99 ms", "exact ONNX p50 / p99 ms", "speed-up"]
    head += ["build s", "file MB"]
    rows = []
    for cell in out["cells"].values():
        for lib in LIBRARIES:
            if lib not in cell:
                continue
            r = cell[lib]
            exact = (
                f"{r['exact_onnx_ms_p50']:.2f} / {r['exact_onnx_ms_p99']:.2f}" if "exact_onnx_ms_p50" in r else "n/a"
            )
            rows.append(
                [
                    cell["table"],
                    f"{cell['n_items']:,}",
                    f"{lib} {r['version']}",
                    str(r["ef"]),
                    f"{r['recall_timed']:.4f}",
                    f"{r['ann_ms_p50']:.3f} / {r['ann_ms_p99']:.3f}",
                    exact,
                    f"{r['speedup_p50']:.0f}x" if "speedup_p50" in r else "n/a",
                    f"{r['build_s']:.0f}",
                    f"{r['file_bytes'] / 1e6:.0f}",
                ]
            )
    return markdown_table(head, rows)


if __name__ == "__main__":
    main()
