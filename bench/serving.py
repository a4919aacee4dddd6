"""Scorer latency for serving: top-k cosine over an item table, onnxruntime vs torch vs numpy, in one run.

    python bench/serving.py                       # 5k, 100k and 1M items of width 576, batch 1 and 64, 2 threads
    python bench/serving.py --sizes 5000 --threads 1 --out /tmp/serving.json

For each catalogue size a seeded random float32 table is L2-normalized and

- onnxruntime runs the scorer ONNX written by ``laser_core.bundle.export_scorer(table, path, k)`` (table baked
  in; the graph normalizes the user vector, multiplies, and takes ``TopK``);
- torch runs ``F.normalize`` + matmul + ``torch.topk`` on the same table (shared memory, ``inference_mode``);
- numpy runs normalize + matmul (OpenBLAS) + ``argpartition`` + a sort of the k.

The three are interleaved rep by rep (rotating which goes first) after a warm-up, so background load hits
them alike; the ratios are ``latency / numpy latency`` from the same run (< 1 = faster than numpy). All three
return the same top-k (checked on every size and batch before timing; the check is written to the JSON).
Threads are pinned for all three (``--threads``, default 2: OpenBLAS via its environment variable before numpy
loads, ``torch.set_num_threads``, onnxruntime's intra-op pool).

User tower (``--no-user-tower`` skips it): a Laser model around SmolLM2-135M-Instruct (float32; the trainable
parts at their seeded initialisation and an untrained BERT4Rec: latency does not depend on the weight values)
is exported with ``laser_core.export.export_bundle`` over a 200-item synthetic catalogue, and one user with a
10-item history is embedded by ``user_tower.onnx`` under onnxruntime and by the same torch model in eager mode
(identical token ids and SR inputs; the embeddings' difference is recorded), plus the whole
``laser_core.serving.Recommender.recommend`` call (tokenize + tower + scorer). Needs the backbone in the cache:
``LASER_CACHE_DIR=/tmp/lasercache`` here (``laser models fetch smollm2-135m-instruct``).

Writes ``bench/results/serving.json`` and prints Markdown tables. ``python bench/serving.py --ann [options]`` runs
``bench/serving_ann.py`` instead: the optional ANN index against this exact scorer (recall@10, p50/p99 at batch
1), written to ``bench/results/serving_ann.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FRAMEWORKS = ("onnxruntime", "torch", "numpy")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[5_000, 100_000, 1_000_000], help="catalogue sizes")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64], help="users per call")
    p.add_argument("--dim", type=int, default=576, help="embedding width (SmolLM2-135M's hidden size)")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--threads", type=int, default=2, help="compute threads for every framework")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reps-scale", type=float, default=1.0, help="multiply the per-size repetition counts")
    p.add_argument("--no-user-tower", action="store_true", help="time the scorer only")
    p.add_argument("--tower-reps", type=int, default=20, help="timed calls per user-tower measurement")
    p.add_argument("--history", type=int, default=10, help="items in the user-tower history")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "serving.json")
    return p.parse_args(argv)


def reps_for(n_items: int, batch: int, scale: float) -> tuple[int, int]:
    """(warm-up calls, timed calls) per framework: about the same wall time per cell, fewer reps for 1M."""
    work = n_items * max(batch, 8)  # batch 1 is memory-bound (one pass over the table), like a small batch
    if work <= 5_000 * 64:
        reps, warm = 1000, 50
    elif work <= 100_000 * 8:
        reps, warm = 200, 10
    elif work <= 100_000 * 64:
        reps, warm = 60, 5
    elif work <= 1_000_000 * 8:
        reps, warm = 30, 3
    else:
        reps, warm = 12, 2
    return warm, max(3, round(reps * scale))


def machine_info(threads: int) -> dict:
    import numpy as np
    import onnx
    import onnxruntime as ort
    import torch

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem_kb = next(
            int(line.split()[1])
            for line in Path("/proc/meminfo").read_text().splitlines()
            if line.startswith("MemTotal")
        )
        mem_gib = round(mem_kb / 2**20, 1)
    except (OSError, StopIteration):
        mem_gib = None
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "ram_gib": mem_gib,
        "threads": threads,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numpy_blas": "OpenBLAS (OPENBLAS_NUM_THREADS pinned)",
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
        "onnx": onnx.__version__,
        "nice": os.nice(0),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }


def dir_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    threads = str(args.threads)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = threads  # read when the BLAS library loads, i.e. before numpy's first import
    if "numpy" in sys.modules:
        print(
            "warning: numpy was imported before the thread pin; OpenBLAS may use another thread count", file=sys.stderr
        )

    import numpy as np
    import onnxruntime as ort
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(ROOT))
    from laser_core.bundle import export_scorer
    from laser_core.reporting import markdown_table

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    k = args.k
    command = "python bench/serving.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    out: dict = {
        "scorer": {},
        "machine": machine_info(args.threads),
        "command": command.strip(),
        "settings": {
            "dim": args.dim,
            "k": k,
            "seed": args.seed,
            "batches": args.batches,
            "ratio_definition": "framework latency / numpy latency at the same percentile "
            "(< 1 means faster than numpy)",
            "timing": "time.perf_counter per call, numpy input in, numpy top-k out; "
            "frameworks interleaved rep by rep after a warm-up",
        },
    }

    for n_items in args.sizes:
        rng = np.random.default_rng(args.seed)
        table = rng.standard_normal((n_items, args.dim), dtype=np.float32)
        table /= np.linalg.norm(table, axis=1, keepdims=True)
        table_t = torch.from_numpy(table)  # shares memory with the numpy table
        entry: dict = {}
        with tempfile.TemporaryDirectory(prefix="laser-scorer-") as tmp:
            onnx_path = Path(tmp) / "scorer.onnx"
            t0 = time.perf_counter()
            session = None
            try:
                export_scorer(table, onnx_path, k)
                entry["onnx_export_s"] = round(time.perf_counter() - t0, 2)
                entry["onnx_bytes"] = dir_bytes(Path(tmp))  # the .onnx plus any external-data files
                so = ort.SessionOptions()
                so.intra_op_num_threads = args.threads
                so.inter_op_num_threads = 1
                so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
                so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
                t0 = time.perf_counter()
                session = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
                entry["onnx_session_load_s"] = round(time.perf_counter() - t0, 2)
            except Exception as exc:  # noqa: BLE001 - recorded; torch and numpy are still measured
                entry["onnxruntime_error"] = f"{type(exc).__name__}: {exc}"[:500]
                print(f"[{n_items}] onnxruntime unavailable: {entry['onnxruntime_error']}", file=sys.stderr)

            def run_ort(u: np.ndarray):
                scores, idx = session.run(None, {"user_embedding": u})
                return scores, idx

            def run_torch(u: np.ndarray):
                with torch.inference_mode():
                    x = F.normalize(torch.from_numpy(u), dim=1, eps=1e-12)
                    scores, idx = torch.topk(x @ table_t.T, k, dim=1, largest=True, sorted=True)
                    return scores.numpy(), idx.numpy()

            def run_numpy(u: np.ndarray):
                x = u / np.maximum(np.linalg.norm(u, axis=1, keepdims=True), np.float32(1e-12))
                scores = x @ table.T
                part = np.argpartition(scores, -k, axis=1)[:, -k:]
                part_scores = np.take_along_axis(scores, part, axis=1)
                order = np.argsort(-part_scores, axis=1, kind="stable")
                return np.take_along_axis(part_scores, order, axis=1), np.take_along_axis(part, order, axis=1)

            runners = {"onnxruntime": run_ort, "torch": run_torch, "numpy": run_numpy}
            active = [f for f in FRAMEWORKS if f != "onnxruntime" or session is not None]

            for batch in args.batches:
                warm, reps = reps_for(n_items, batch, args.reps_scale)
                queries = [rng.standard_normal((batch, args.dim), dtype=np.float32) for _ in range(8)]
                # the same top-k from every framework (index sets per row; scores to float32 rounding)
                ref_s, ref_i = run_numpy(queries[0])
                check = {"rows": batch}
                for fw in active:
                    s, i = runners[fw](queries[0])
                    same = [set(a.tolist()) == set(b.tolist()) for a, b in zip(i, ref_i)]
                    check[f"{fw}_same_topk_rows"] = int(sum(same))
                    check[f"{fw}_max_abs_score_diff"] = float(np.abs(s - ref_s).max())
                    if not all(same) or not np.allclose(s, ref_s, atol=1e-4):
                        raise SystemExit(f"{fw} disagrees with numpy at n={n_items} batch={batch}: {check}")
                times: dict[str, list[float]] = {fw: [] for fw in active}
                for r in range(warm + reps):
                    u = queries[r % len(queries)]
                    for j in range(len(active)):
                        fw = active[(r + j) % len(active)]
                        t0 = time.perf_counter()
                        runners[fw](u)
                        elapsed = (time.perf_counter() - t0) * 1e3
                        if r >= warm:
                            times[fw].append(elapsed)
                cell: dict = {"reps": reps, "warmup": warm}
                for fw in active:
                    cell[f"{fw}_ms_p50"] = round(float(np.percentile(times[fw], 50)), 4)
                    cell[f"{fw}_ms_p99"] = round(float(np.percentile(times[fw], 99)), 4)
                for fw in active:
                    if fw != "numpy":
                        for q in ("p50", "p99"):
                            cell[f"ratio_{fw}_vs_numpy_{q}"] = round(cell[f"{fw}_ms_{q}"] / cell[f"numpy_ms_{q}"], 3)
                cell["agreement"] = check
                entry[f"batch{batch}"] = cell
                print(
                    f"[{n_items} items, batch {batch}] "
                    + ", ".join(f"{fw} p50 {cell[f'{fw}_ms_p50']:.3f} ms" for fw in active),
                    flush=True,
                )
            session = None  # free it before the next size (a rebinding: the closures above read it)
        out["scorer"][str(n_items)] = entry
        table = table_t = None

    if not args.no_user_tower:
        out["user_tower"] = bench_user_tower(args)
    out["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nwrote {args.out}\n")
    print(markdown_table_for(out, markdown_table))
    if "user_tower" in out:
        print(user_tower_table(out["user_tower"], markdown_table))
    return out


def _percentiles(times: list[float]) -> tuple[float, float]:
    import numpy as np

    return round(float(np.percentile(times, 50)), 3), round(float(np.percentile(times, 99)), 3)


def bench_user_tower(args: argparse.Namespace) -> dict:
    """onnxruntime vs torch eager for the user tower of a SmolLM2-135M Laser model, one user."""
    import numpy as np
    import onnxruntime as ort
    import torch

    from laser_core.data import load_dataset
    from laser_core.data.text import TextConfig
    from laser_core.bundle import USER_TOWER
    from laser_core.export import export_bundle, reference_model
    from laser_core.llm import BackboneConfig
    from laser_core.model import LaserSpec, LaserWeights, build_laser
    from laser_core.serving import Recommender
    from laser_core.sr import SRConfig, build_model

    n_items, k = 200, args.k
    ds = load_dataset({"synthetic": {"n_users": 300, "n_items": n_items, "seed": args.seed}})
    torch.manual_seed(args.seed)
    sr = build_model(SRConfig(model="bert4rec"), ds.n_items).eval()
    spec = LaserSpec(
        text=TextConfig(history_len=args.history, title_max_chars=80),
        backbone=BackboneConfig(name="smollm2-135m-instruct", quantization="none"),
        seed=args.seed,
    )
    model = build_laser(spec, ds.items, sr)
    weights = LaserWeights(spec=spec, state={n: t.detach().clone() for n, t in model.state_dict().items()})
    del model
    ref = reference_model(weights, sr, ds.items)  # the float32 torch model the tower is traced from
    with torch.inference_mode():
        table = ref.embed_items(range(ds.n_items))
    rng = np.random.default_rng(args.seed)
    rows = rng.choice(ds.n_items, size=args.history, replace=False).tolist()
    history = [str(ds.items["item_id"].iloc[r]) for r in rows]

    out: dict = {
        "backbone": "smollm2-135m-instruct (float32)",
        "catalogue_items": n_items,
        "history_items": args.history,
        "spec": {
            "text": spec.text.model_dump(mode="json"),
            "bitune_prefix": spec.bitune.prefix,
            "pooling": spec.bitune.pooling,
            "sr": "bert4rec",
        },
    }
    with tempfile.TemporaryDirectory(prefix="laser-bundle-") as tmp:
        bundle = Path(tmp) / "bundle"
        t0 = time.perf_counter()
        export_bundle(weights, sr, ds.items, table, bundle, k=k, metadata={"model_version": "bench-untrained"})
        out["export_bundle_s"] = round(time.perf_counter() - t0, 1)
        out["user_tower_onnx_bytes"] = sum(
            p.stat().st_size for p in bundle.iterdir() if p.is_file() and p.name.startswith(USER_TOWER.split(".")[0])
        )
        out["bundle_bytes"] = dir_bytes(bundle)

        token_ids = [ref._encode(ref.formatter.user_text(rows))]
        out["text_tokens"] = len(token_ids[0])
        batch = ref.collate([rows], token_ids, item_side=[0])  # the tower's inputs, as serving pads them

        def run_torch() -> np.ndarray:
            with torch.inference_mode():
                return ref(batch).user_embedding.numpy()

        so = ort.SessionOptions()
        so.intra_op_num_threads = args.threads
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        t0 = time.perf_counter()
        tower = ort.InferenceSession(str(bundle / USER_TOWER), so, providers=["CPUExecutionProvider"])
        out["onnx_session_load_s"] = round(time.perf_counter() - t0, 2)
        feeds = batch.feeds([i.name for i in tower.get_inputs()])

        def run_ort() -> np.ndarray:
            return tower.run(["user_embedding"], feeds)[0]

        rec = Recommender.load(bundle, threads=args.threads)

        def run_recommend():
            return rec.recommend(history, k=k)

        out["max_abs_embedding_diff_ort_vs_torch"] = float(np.abs(run_ort() - run_torch()).max())
        got = [it.item_id for it in run_recommend().items]
        emb = run_torch()[0]
        normed = table.numpy() / np.linalg.norm(table.numpy(), axis=1, keepdims=True)
        want = [str(ds.items["item_id"].iloc[i]) for i in np.argsort(-(normed @ emb), kind="stable")[:k]]
        out["recommend_top10_overlap_with_torch"] = len(set(got) & set(want))

        runners = {"onnxruntime": run_ort, "torch": run_torch, "recommend_e2e": run_recommend}
        warm, reps = 3, max(3, args.tower_reps)
        times: dict[str, list[float]] = {name: [] for name in runners}
        names = list(runners)
        for r in range(warm + reps):
            for j in range(len(names)):
                name = names[(r + j) % len(names)]
                t0 = time.perf_counter()
                runners[name]()
                if r >= warm:
                    times[name].append((time.perf_counter() - t0) * 1e3)
        out["reps"], out["warmup"] = reps, warm
        out["onnxruntime_ms_p50"], out["onnxruntime_ms_p99"] = _percentiles(times["onnxruntime"])
        out["torch_ms_p50"], out["torch_ms_p99"] = _percentiles(times["torch"])
        out["recommend_e2e_ms_p50"], out["recommend_e2e_ms_p99"] = _percentiles(times["recommend_e2e"])
        out["ratio_onnxruntime_vs_torch_p50"] = round(out["onnxruntime_ms_p50"] / out["torch_ms_p50"], 3)
        out["recommend_e2e_note"] = (
            "Recommender.recommend: user text + tokenizers + user_tower.onnx + scorer.onnx "
            "+ result objects, onnxruntime intra-op threads = --threads"
        )
        rec = tower = None
    print(
        f"[user tower] onnxruntime p50 {out['onnxruntime_ms_p50']:.1f} ms, torch p50 {out['torch_ms_p50']:.1f} ms, "
        f"recommend() p50 {out['recommend_e2e_ms_p50']:.1f} ms",
        flush=True,
    )
    return out


def user_tower_table(tower: dict, markdown_table) -> str:
    head = ["user tower (SmolLM2-135M, 1 user)", "p50 ms", "p99 ms", "vs torch (p50)"]
    rows = [
        [
            "onnxruntime (user_tower.onnx)",
            f"{tower['onnxruntime_ms_p50']:.1f}",
            f"{tower['onnxruntime_ms_p99']:.1f}",
            f"{tower['ratio_onnxruntime_vs_torch_p50']:.2f}",
        ],
        ["torch eager (float32)", f"{tower['torch_ms_p50']:.1f}", f"{tower['torch_ms_p99']:.1f}", "1.00"],
        [
            "Recommender.recommend (tokenize + tower + scorer)",
            f"{tower['recommend_e2e_ms_p50']:.1f}",
            f"{tower['recommend_e2e_ms_p99']:.1f}",
            f"{tower['recommend_e2e_ms_p50'] / tower['torch_ms_p50']:.2f}",
        ],
    ]
    return markdown_table(head, rows)


def markdown_table_for(out: dict, markdown_table) -> str:
    head = [
        "items",
        "batch",
        "onnxruntime p50 / p99 ms",
        "torch p50 / p99 ms",
        "numpy p50 / p99 ms",
        "ort / numpy (p50)",
        "torch / numpy (p50)",
        "ONNX MB",
        "reps",
    ]
    rows = []
    for n_items, entry in out["scorer"].items():
        for key, cell in entry.items():
            if not key.startswith("batch"):
                continue

            def pair(fw: str) -> str:
                if f"{fw}_ms_p50" not in cell:
                    return "n/a"
                return f"{cell[f'{fw}_ms_p50']:.3f} / {cell[f'{fw}_ms_p99']:.3f}"

            ort_ratio = cell.get("ratio_onnxruntime_vs_numpy_p50")
            rows.append(
                [
                    f"{int(n_items):,}",
                    key[len("batch") :],
                    pair("onnxruntime"),
                    pair("torch"),
                    pair("numpy"),
                    "n/a" if ort_ratio is None else f"{ort_ratio:.2f}",
                    f"{cell['ratio_torch_vs_numpy_p50']:.2f}",
                    f"{entry['onnx_bytes'] / 1e6:.1f}" if "onnx_bytes" in entry else "n/a",
                    str(cell["reps"]),
                ]
            )
    return markdown_table(head, rows)


if __name__ == "__main__":
    if "--ann" in sys.argv[1:]:  # the ANN index vs the exact scorer: bench/serving_ann.py's options after --ann
        sys.path.insert(0, str(ROOT / "bench"))
        from serving_ann import main as ann_main

        ann_main([a for a in sys.argv[1:] if a != "--ann"])
    else:
        main()
