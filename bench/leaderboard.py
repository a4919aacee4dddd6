"""One leaderboard for every model on every dataset: ``bench/results/leaderboard.json`` and the README's table.

    # the ID models: tuned SASRec (a run config + the tuner's layer), BERT4Rec and popularity, on all test users
    python bench/leaderboard.py sr --config configs/tune/beauty_sasrec.yaml --tuned runs/tune-beauty/tuned.yaml \\
        --workdir runs/tune-beauty [--models popularity,sasrec,bert4rec]
    # rows other benchmarks wrote into their own results (a top-level "leaderboard" key; see ``collect_rows``)
    python bench/leaderboard.py collect
    # the README's results table, generated from leaderboard.json (``--check``: fail if the README differs)
    python bench/leaderboard.py readme [--check]

``leaderboard.json``: ``{dataset: {model: {"ndcg@10", "recall@10", "mrr", "ndcg@10_masked", "test_users",
"command", ...}}}``: full ranking over all items, leave-one-out (last item = test, the one before = validation),
every choice made on validation; ``ndcg@10_masked`` ranks with the user's history excluded (the protocol of the
public tables such as eSASRec's). Rows of one dataset are on the same test pairs (all test users).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "bench" / "results"
LEADERBOARD = RESULTS / "leaderboard.json"
README = ROOT / "README.md"
START, END = "<!-- leaderboard:start -->", "<!-- leaderboard:end -->"
DATASETS = ("scientific", "beauty", "ml-1m")
#: the README's row order (rows not listed come after, alphabetically)
ORDER = (
    "popularity",
    "bert4rec",
    "sasrec",
    "rectools_sasrec",
    "tfidf_hybrid",
    "random_llm_hybrid",
    "llm_hybrid",
    "laser_a",
    "laser_b",
    "laser_c",
    "laser_d",
    "tfidf_alone",
    "llm_alone",
    "random_llm_init_control",
    "tfidf_init_control",
)
REQUIRED = ("ndcg@10", "recall@10", "mrr", "ndcg@10_masked", "test_users", "command")
BASELINE = "sasrec"


# ------------------------------------------------------------------------------------------------ the file
def load(path: Path = LEADERBOARD) -> dict:
    return json.loads(path.read_text(encoding="utf8")) if path.is_file() else {}


def check_row(dataset: str, model: str, row: dict) -> None:
    missing = [k for k in REQUIRED if k not in row]
    if missing:
        raise ValueError(f"leaderboard row {dataset}/{model}: missing {', '.join(missing)}")
    for k in REQUIRED[:4]:
        if not isinstance(row[k], (int, float)) or not 0.0 <= row[k] <= 1.0:
            raise ValueError(f"leaderboard row {dataset}/{model}: {k} must be a number in [0, 1], got {row[k]!r}")
    if not isinstance(row["test_users"], int) or row["test_users"] < 1:
        raise ValueError(f"leaderboard row {dataset}/{model}: test_users must be a positive integer")


def record(dataset: str, model: str, row: dict, path: Path = LEADERBOARD) -> None:
    """Set one row (checked) and write the file atomically (the other rows are kept)."""
    check_row(dataset, model, row)
    board = load(path)
    others = {m: r["test_users"] for m, r in board.get(dataset, {}).items() if m != model}
    if any(n != row["test_users"] for n in others.values()):
        raise ValueError(
            f"leaderboard row {dataset}/{model}: {row['test_users']} test users, but the dataset's other rows have "
            f"{sorted(set(others.values()))}: every row of a dataset must be on the same (all) test pairs"
        )
    board.setdefault(dataset, {})[model] = row
    board = {d: dict(sorted(board[d].items())) for d in sorted(board)}
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp", encoding="utf8") as f:
        json.dump(board, f, indent=1)
        f.write("\n")
    Path(f.name).replace(path)


def command_line(argv: list[str]) -> str:
    return "python bench/leaderboard.py " + " ".join(shlex.quote(a) for a in argv)


# ------------------------------------------------------------------------------------------- the ID models
def sr_rows(argv: list[str]) -> None:
    import torch

    from laser_core.config import load_config
    from laser_core.data import leave_one_out, load_dataset
    from laser_core.evaluation import evaluate_split
    from laser_core.sr import fit

    ap = argparse.ArgumentParser(prog="leaderboard.py sr")
    ap.add_argument("--config", required=True, help="the run config the tuning used (its sr: and sr_train:)")
    ap.add_argument("--tuned", default=None, help="the tuner's layer (tuned.yaml) put over --config: the sasrec row")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--workdir", required=True, help="checkpoints: <workdir>/leaderboard/<model> (a run resumes)")
    ap.add_argument("--models", default="popularity,sasrec,bert4rec")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = load_config(_layered(args.config, args.tuned), data_dir=args.data_dir)
    split = leave_one_out(load_dataset(cfg.dataset))
    dataset = cfg.dataset.name
    for model in args.models.split(","):
        sr = cfg.sr if model == cfg.sr.model else _baseline_sr(model)
        train = cfg.sr_train.model_copy(update={"progress": False, "threads": args.threads})
        if model != cfg.sr.model:
            train = _baseline_train(model, train)
        t0 = time.perf_counter()
        result = fit(sr, train, split, workdir=Path(args.workdir) / "leaderboard" / model)
        test = evaluate_split(result.model, split, "test", train.eval_batch_size)
        masked = evaluate_split(result.model, split, "test", train.eval_batch_size, mask_history=True)
        row = {
            "ndcg@10": test["ndcg@10"],
            "recall@10": test["recall@10"],
            "mrr": test["mrr"],
            "ndcg@10_masked": masked["ndcg@10"],
            "recall@10_masked": masked["recall@10"],
            "test_users": len(split.test_examples()[0]),
            "command": command_line(["sr", *argv]),
            "valid_ndcg@10": result.best_valid.get("ndcg@10"),
            "best_epoch": result.best_epoch,
            "epochs_run": result.epochs_run,
            "seconds": round(time.perf_counter() - t0, 1),
            "settings": {"sr": sr.model_dump(mode="json"), "sr_train": train.model_dump(mode="json")},
        }
        record(dataset, model, row)
        print(f"{dataset} {model}: ndcg@10 {row['ndcg@10']:.4f} (masked {row['ndcg@10_masked']:.4f})")


def _layered(config: str, tuned: str | None) -> str:
    """A run config with the tuner's layer over it (a small file beside nothing: ``base:`` takes absolute paths)."""
    if tuned is None:
        return config
    layered = Path(tempfile.mkdtemp()) / "layered.yaml"
    layered.write_text(f"base: [{json.dumps(str(Path(config).resolve()))}, {json.dumps(str(Path(tuned).resolve()))}]\n")
    return str(layered)


def _baseline_sr(model: str):
    """The other ID models: ``bench/sr_baselines.py``'s settings (popularity needs none)."""
    from sr_baselines import DEFAULTS

    from laser_core.configuration import SRConfig

    return SRConfig(model=model, **DEFAULTS.get(model, {"model": {}})["model"])


def _baseline_train(model: str, train):
    """``bench/sr_baselines.py``'s training settings (full softmax, patience 10, at most 200 epochs)."""
    from sr_baselines import DEFAULTS

    fixed = {"epochs": 200, "patience": 10, "weight_decay": 0.0}
    return train.model_copy(update={**fixed, **DEFAULTS.get(model, {"train": {}})["train"]})


# ------------------------------------------------------------------------------------ rows from other benchmarks
def collect_rows(results: Path = RESULTS) -> list[tuple[str, str, dict, str]]:
    """Rows other benchmarks wrote: a results JSON with a top-level ``"leaderboard": {"dataset": name, "rows":
    {model: row}}``. Returns (dataset, model, row, file name)."""
    out = []
    for path in sorted(results.glob("*.json")):
        if path == LEADERBOARD:
            continue
        try:
            data = json.loads(path.read_text(encoding="utf8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not JSON ({exc})") from exc
        board = data.get("leaderboard") if isinstance(data, dict) else None
        if board is None:
            continue
        for model, row in board["rows"].items():
            out.append((board["dataset"], model, row, path.name))
    return out


def collect(argv: list[str]) -> None:
    argparse.ArgumentParser(prog="leaderboard.py collect").parse_args(argv)
    for dataset, model, row, source in collect_rows():
        record(dataset, model, row)
        print(f"{dataset} {model}: ndcg@10 {row['ndcg@10']:.4f} (from {source})")


# ---------------------------------------------------------------------------------------------- the README
def _order(model: str) -> tuple[int, str]:
    return (ORDER.index(model) if model in ORDER else len(ORDER), model)


def table(board: dict) -> str:
    """The README's results table: one block per dataset, the ratio to the tuned SASRec row beside each."""
    lines = [
        "| data | model | NDCG@10 | vs SASRec | Recall@10 | MRR | NDCG@10, history masked | test users |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for dataset in [d for d in DATASETS if d in board] + sorted(set(board) - set(DATASETS)):
        rows = board[dataset]
        base = rows.get(BASELINE, {}).get("ndcg@10")
        for model in sorted(rows, key=_order):
            r = rows[model]
            ratio = f"{r['ndcg@10'] / base:.3f}" if base else ""
            lines.append(
                f"| {dataset} | {model} | {r['ndcg@10']:.4f} | {ratio} | {r['recall@10']:.4f} | {r['mrr']:.4f} | "
                f"{r['ndcg@10_masked']:.4f} | {r['test_users']:,} |"
            )
    return "\n".join(lines)


def render_readme(text: str, board: dict) -> str:
    if START not in text or END not in text:
        raise ValueError(f"{README}: the markers {START} and {END} are missing")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{table(board)}\n{END}{tail}"


def readme(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="leaderboard.py readme")
    ap.add_argument("--check", action="store_true", help="exit 1 if the README's table is not the generated one")
    args = ap.parse_args(argv)
    text = README.read_text(encoding="utf8")
    new = render_readme(text, load())
    if args.check:
        if new != text:
            print(
                f"{README}: the results table differs from bench/results/leaderboard.json; run {command_line(['readme'])}"
            )
            return 1
        return 0
    README.write_text(new, encoding="utf8")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"sr": sr_rows, "collect": collect, "readme": readme}
    if not argv or argv[0] not in commands:
        print(f"usage: leaderboard.py {{{','.join(commands)}}} ...", file=sys.stderr)
        return 2
    sys.path.insert(0, str(ROOT / "bench"))
    return commands[argv[0]](argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
