"""Bi-Tuning as a multi-process job: ``accelerate launch`` over a job folder of Parquet, safetensors and JSON.

:func:`fit_launched` is what the pipeline's Bi-Tuning steps call when ``laser_train.accelerate`` is on. It writes
everything the training needs into a job folder, none of it pickled:

- ``items.parquet`` (the catalogue, for the item texts), ``split.parquet`` + ``split.json`` (:meth:`Split.save`);
- ``sr/model.safetensors`` + ``sr/config.json`` (the frozen ID-based encoder, ``save_model``);
- ``spec.json`` (:class:`~laser_core.model.LaserSpec`), ``job.json`` (training config, stages, checkpoint folder);
- for stage 2, ``init/`` (the stage-1 weights, :meth:`LaserWeights.save`) and ``table/`` (the frozen item table,
  :meth:`ItemTable.save`): the same folders the pipeline's materializers store;

then runs ``accelerate launch --num_processes N -m laser_core.launch <job>`` (``python -m laser_core.launch
<job>`` is the same job in one process, without the launcher). Every process rebuilds the model from the folder
and trains its equal shard of each epoch's users under DDP (:class:`~laser_core.train.LaserTrainer` with
``accelerate``; on ``laser_train.device``, where ``auto`` and ``cuda`` mean the process's own GPU); process 0
writes ``out/`` (the best weights, :meth:`LaserWeights.save`; the item table, :meth:`ItemTable.save`) and
``out/result.json`` (best epochs, history, cost), which :func:`fit_launched` reads back. A failed job raises :class:`LaunchError` with the command, its exit
status and the end of its log (``job/launch.log``); so does a job that outlives ``timeout`` seconds (the
launcher and its workers are stopped).

This replaces ZenML's ``run_with_accelerate``, which passes the step's parameters on a command line and reads
its outputs back with cloudpickle.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from laser_core.data.split import Split
from laser_core.model import ItemTable, LaserSpec, LaserWeights, build_laser
from laser_core.sr.base import SequentialRecommender
from laser_core.sr.checkpoint import load_model, save_model
from laser_core.trainer import atomic_write
from laser_core.train import LaserTrainConfig, LaserTrainer

JOB_FORMAT = 2  # 2: init/ and table/ are LaserWeights / ItemTable folders


class LaunchError(RuntimeError):
    """A launched Bi-Tuning job failed; the message has the command, exit status and the log's end."""


@dataclass
class LaunchedFit:
    """What a launched job returns: the best weights, the (frozen) item table, and the trainer's record."""

    state: dict[str, torch.Tensor]
    item_table: torch.Tensor
    best: dict = field(default_factory=dict)
    history: list = field(default_factory=list)
    cost: dict = field(default_factory=dict)
    processes: int = 1


def write_job(
    job: Path,
    items: pd.DataFrame,
    split: Split,
    sr_model: SequentialRecommender | None,
    spec: LaserSpec,
    config: LaserTrainConfig,
    stages: Sequence[int],
    weights: dict[str, torch.Tensor] | None = None,
    table: torch.Tensor | None = None,
    workdir_root: str | Path | None = None,
    label: str = "laser",
    resume: bool = True,
) -> Path:
    """The job folder :func:`run_job` reads (see the module docstring)."""
    job = Path(job)
    job.mkdir(parents=True, exist_ok=True)
    items.to_parquet(job / "items.parquet", index=False)
    split.save(job)
    if sr_model is not None:
        save_model(sr_model, job / "sr")
    atomic_write(job / "spec.json", spec.model_dump_json(indent=1))
    if weights is not None:
        LaserWeights(spec=spec, state=dict(weights)).save(job / "init")
    if table is not None:
        ItemTable(table=table).save(job / "table")
    atomic_write(
        job / "job.json",
        json.dumps(
            {
                "format_version": JOB_FORMAT,
                "train": config.model_dump(mode="json"),
                "stages": list(stages),
                "workdir_root": str(workdir_root) if workdir_root is not None else None,
                "label": label,
                "resume": bool(resume),
            },
            indent=1,
        ),
    )
    return job


def run_job(job: str | Path) -> dict:
    """Train as one process of the job (all processes run this); process 0 writes ``out/``."""
    job = Path(job)
    meta = json.loads((job / "job.json").read_text(encoding="utf8"))
    if meta.get("format_version") != JOB_FORMAT:
        raise LaunchError(f"{job / 'job.json'}: format_version {meta.get('format_version')!r}, expected {JOB_FORMAT}")
    config = LaserTrainConfig.model_validate(meta["train"]).model_copy(update={"accelerate": True})
    spec = LaserSpec.model_validate_json((job / "spec.json").read_text(encoding="utf8"))
    items = pd.read_parquet(job / "items.parquet")
    split = Split.load(job)
    sr_model = load_model(job / "sr") if (job / "sr").is_dir() else None
    init = LaserWeights.load(job / "init") if (job / "init").is_dir() else None
    model = build_laser(spec, items, sr_model, weights=init, device=config.device)
    table = ItemTable.load(job / "table").table if (job / "table").is_dir() else None
    trainer = LaserTrainer(
        model,
        split,
        config,
        workdir_root=meta.get("workdir_root"),
        label=meta["label"],
        resume=bool(meta.get("resume", True)),
    )
    result = trainer.fit(stages=tuple(meta["stages"]), table=table)
    out = {"best": result.best, "history": result.history, "cost": result.cost, "processes": trainer.world}
    if trainer.rank == 0:
        dest = job / "out"
        dest.mkdir(exist_ok=True)
        LaserWeights(spec=spec, state=dict(result.model.state_dict())).save(dest)
        ItemTable(table=result.item_table).save(dest)
        atomic_write(dest / "result.json", json.dumps(out, indent=1))
    if trainer.accelerator is not None:
        trainer.accelerator.wait_for_everyone()
    return out


def launch_command(job: Path, processes: int, extra_args: Sequence[str] = (), threads: int | None = None) -> list[str]:
    """``accelerate launch`` of ``processes`` processes on this machine. One process runs in place (``--cpu``
    without CUDA); more run under torchrun (``--multi_gpu``: NCCL across GPUs, or gloo across CPU processes
    when there is no CUDA, since the trainer's Accelerator is then CPU-only)."""
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        str(processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
    ]
    if processes > 1:
        cmd.append("--multi_gpu")
    elif not torch.cuda.is_available():
        cmd.append("--cpu")
    if threads:
        cmd += ["--num_cpu_threads_per_process", str(threads)]
    return [*cmd, *extra_args, "-m", "laser_core.launch", str(job)]


def read_result(job: Path) -> LaunchedFit:
    out = Path(job) / "out"
    result = json.loads((out / "result.json").read_text(encoding="utf8"))
    return LaunchedFit(
        state=LaserWeights.load(out).state,
        item_table=ItemTable.load(out).table,
        best=result["best"],
        history=result["history"],
        cost=result["cost"],
        processes=int(result["processes"]),
    )


def _stop(proc: subprocess.Popen, grace: float = 30.0) -> int:
    """Stop a launched job: SIGTERM to the launcher's process group (torchrun then stops its workers, which run in
    sessions of their own), SIGKILL to the group after ``grace`` seconds. Returns the exit status."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, None)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            return proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
    return proc.wait()


def fit_launched(
    items: pd.DataFrame,
    split: Split,
    sr_model: SequentialRecommender | None,
    spec: LaserSpec,
    config: LaserTrainConfig,
    stages: Sequence[int],
    weights: dict[str, torch.Tensor] | None = None,
    table: torch.Tensor | None = None,
    workdir_root: str | Path | None = None,
    label: str = "laser",
    processes: int | None = None,
    job_dir: str | Path | None = None,
    extra_args: Sequence[str] = (),
    resume: bool = True,
    timeout: float | None = None,
) -> LaunchedFit:
    """Write the job, run it under ``accelerate launch`` with ``processes`` (default ``config.processes``)
    processes, and read back process 0's output. The job folder is temporary unless ``job_dir`` is given.
    ``resume=False``: the trainer reuses no checkpoint under ``workdir_root`` (see :class:`LaserTrainer`).
    ``timeout``: seconds after which the job (the launcher and every worker) is killed and LaunchError raised."""
    processes = processes or config.processes
    tmp = None
    if job_dir is None:
        tmp = tempfile.mkdtemp(prefix="laser-launch-")
        job_dir = tmp
    job = Path(job_dir)
    try:
        write_job(
            job,
            items,
            split,
            sr_model,
            spec,
            config.model_copy(update={"accelerate": True}),
            stages,
            weights=weights,
            table=table,
            workdir_root=workdir_root,
            label=label,
            resume=resume,
        )
        cmd = launch_command(job, processes, extra_args, threads=config.threads)
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(
                [str(Path(__file__).resolve().parents[1]), *filter(None, [os.environ.get("PYTHONPATH")])]
            ),
        }
        if config.threads:
            env["OMP_NUM_THREADS"] = str(config.threads)
        log_path = job / "launch.log"
        with open(log_path, "wb") as log:
            # its own process group, stopped on a timeout or an interrupt (_stop)
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
            timed_out = False
            try:
                rc = proc.wait(timeout=timeout)
            except BaseException as exc:
                rc = _stop(proc)
                if not isinstance(exc, subprocess.TimeoutExpired):
                    raise
                timed_out = True
        if timed_out or rc != 0 or not (job / "out" / "result.json").is_file():
            tail = log_path.read_text(encoding="utf8", errors="replace")[-4000:]
            what = f"timed out after {timeout:g} s (killed)" if timed_out else f"failed (exit status {rc})"
            raise LaunchError(f"Bi-Tuning job {what}: {' '.join(cmd)}\n--- end of {log_path} ---\n{tail}")
        return read_result(job)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m laser_core.launch JOB_DIR   (normally run by accelerate launch)", file=sys.stderr)
        return 2
    run_job(args[0])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
