"""Merge the results files of several GPU calls (each ``$OUT/laser_<dataset>_gpu.json`` of bench/gpu/run.py, e.g.
from calls on different machines, which cannot share a workdir) into one:

    python bench/gpu/merge.py CALL1.json CALL2.json ... --out bench/results/laser_scientific_gpu.json

Every file must be of the same dataset and test pairs. A run's entry (and its figures in ``results``) comes from
the last file that has the run; the baselines' figures from the last file; ``calls`` lists every call in order,
each with the file it came from.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

BASELINES = ("sasrec", "bert4rec", "popularity")


def merge(files: list[Path]) -> dict:
    docs = [json.loads(f.read_text(encoding="utf8")) for f in files]
    first = docs[0]
    for f, d in zip(files, docs):
        if (d["dataset"], d["protocol"]["test_pairs"]) != (first["dataset"], first["protocol"]["test_pairs"]):
            raise SystemExit(f"{f}: another dataset or other test pairs than {files[0]}")
    out = {k: docs[-1][k] for k in ("dataset", "paper", "machine", "pack", "protocol")}
    out["results"], out["runs"], out["calls"] = {}, {}, []
    for f, d in zip(files, docs):
        for call in d["calls"]:
            out["calls"].append({**call, "file": f.name})
        out["runs"].update(d["runs"])
        out["results"].update({k: v for k, v in d["results"].items() if k in d["runs"]})
        out["results"].update({k: d["results"][k] for k in BASELINES if k in d["results"]})
    out["runs"] = {k: v for k, v in out["runs"].items() if v.get("status") != "not started"} or out["runs"]
    states = [r.get("status") for r in out["runs"].values()]
    out["status"] = "complete" if all(s == "complete" for s in states) else "incomplete"
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    merged = merge(args.files)
    args.out.write_text(json.dumps(merged, indent=2) + "\n", encoding="utf8")
    print(json.dumps({k: round(v["ndcg@10"], 4) for k, v in merged["results"].items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
