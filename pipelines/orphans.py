"""Runs whose process died (SIGKILL, a crash, a closed laptop) are marked failed instead of "running" forever.

Every step of this package's pipelines starts with :func:`record_process` (a ZenML ``on_start`` hook): it writes
the pid, host and process start time of the process running the step into the run's metadata. With the local
orchestrator that is the ``laser run`` process itself. :func:`mark_orphaned_runs` (called when ``laser run``
starts, and by ``laser runs clean``) then finds the unfinished runs of these pipelines whose recorded process
is gone on this host (no such pid, or the pid now belongs to a process started later) and marks them, and their
unfinished steps, failed. The artifacts their finished steps saved stay in the store.

A killed or failed training run leaves no model version behind: :func:`discard_model_version` deletes the version
such a run was bound to (when no stage was given to it and no other run uses it), so ``laser model list`` and
``laser model promote`` never see a version without a finished run. The run and its artifacts stay
(``laser lineage RUN``). :func:`mark_failed` does it for killed runs, ``pipelines.run.run_training`` for runs that
fail in the process that started them.

A run recorded on another host (a Kubernetes pod, another machine) cannot be checked from here and is left
alone, as is a run with no record (its process died before its first step started); ``laser runs clean
--older-than HOURS`` marks those too when they have not been updated for that long.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
from dataclasses import dataclass

PIPELINES = ("laser_training", "laser_batch_recommend")
PID, HOST, STARTED = "laser_pid", "laser_host", "laser_process_started"


def _process_started(pid: int) -> float | None:
    """The start time (epoch seconds) of process ``pid``, or None when there is no such process."""
    import psutil

    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:  # exited, not yet reaped by its parent
            return None
        return proc.create_time()
    except psutil.NoSuchProcess:  # ZombieProcess included
        return None
    except psutil.AccessDenied:  # someone else's process: it exists, its start time is unknown
        return float("nan")


def process_record() -> dict:
    """The metadata :func:`record_process` writes: this process's pid, host and start time."""
    return {PID: os.getpid(), HOST: socket.gethostname(), STARTED: _process_started(os.getpid())}


def record_process() -> None:
    """ZenML ``on_start`` hook of every step: record the process running the run in the run's metadata."""
    from zenml import get_step_context, log_metadata
    from zenml.logger import get_logger

    try:
        run = get_step_context().pipeline_run
        log_metadata(metadata=process_record(), run_id_name_or_prefix=run.id)
    except Exception as exc:  # bookkeeping only: never fail a step for it
        get_logger(__name__).warning("could not record the run's process: %s", exc)


@dataclass
class Orphan:
    run: str
    status: str
    reason: str
    marked: bool = False
    removed_version: str | None = None  # "<model> v<version>" deleted with it (see discard_model_version)


def discard_model_version(run) -> str | None:
    """Delete the model version the failed (or killed) training ``run`` was bound to, unless it has a stage or
    another run is bound to it too; ``"<model> v<version>"`` when one was deleted. Batch runs, which use an
    existing version, are left alone."""
    from zenml.client import Client

    client = Client()
    run = client.get_pipeline_run(run.id)
    mv = run.model_version
    if mv is None or run.pipeline is None or run.pipeline.name != "laser_training" or mv.stage is not None:
        return None
    if any(r.id != run.id for r in client.list_pipeline_runs(model_version_id=mv.id, size=10).items):
        return None
    client.delete_model_version(mv.id)
    return f"{mv.model.name} v{mv.name}"


def discard_failed_versions(since: dt.datetime) -> list[str]:
    """:func:`discard_model_version` for each failed training run created since ``since`` by this process (or with
    no process record: it failed before its first step); the versions deleted."""
    from zenml.client import Client

    removed = []
    for run in Client().list_pipeline_runs(sort_by="desc:created", size=20, hydrate=True).items:
        created = run.created if run.created.tzinfo else run.created.replace(tzinfo=dt.timezone.utc)
        if created < since:
            break
        pid = (run.run_metadata or {}).get(PID)
        if run.status.value == "failed" and pid in (None, os.getpid()):
            name = discard_model_version(run)
            if name is not None:
                removed.append(name)
    return removed


def _process_gone(meta: dict) -> str | None:
    """Why the recorded process is gone ("pid 123 on host h has exited"), or None when it runs or cannot be
    checked from here (no record, another host)."""
    pid, host, started = meta.get(PID), meta.get(HOST), meta.get(STARTED)
    if not isinstance(pid, int) or host != socket.gethostname():
        return None
    now_started = _process_started(pid)
    if now_started is None:
        return f"its process (pid {pid} on {host}) has exited"
    if isinstance(started, (int, float)) and now_started == now_started and abs(now_started - started) > 1.0:
        return f"its process (pid {pid} on {host}) has exited (the pid now belongs to another process)"
    return None


def find_orphaned_runs(older_than_hours: float | None = None) -> list[tuple[object, str]]:
    """(run, reason) for each unfinished run of this package's pipelines whose process is gone; with
    ``older_than_hours``, also those with no checkable record that were not updated for that long."""
    from zenml.client import Client

    now = dt.datetime.now(dt.timezone.utc)
    found = []
    page = 1
    while True:
        runs = Client().list_pipeline_runs(in_progress=True, sort_by="asc:created", page=page, size=100, hydrate=True)
        for run in runs.items:
            if run.pipeline is None or run.pipeline.name not in PIPELINES or run.status.is_finished:
                continue
            meta = dict(run.run_metadata or {})
            reason = _process_gone(meta)
            if reason is None and older_than_hours is not None:
                updated = run.updated if run.updated.tzinfo else run.updated.replace(tzinfo=dt.timezone.utc)
                idle = (now - updated).total_seconds() / 3600
                if idle >= older_than_hours and _process_gone_or_unknown(meta):
                    reason = f"no update for {idle:.1f} h and its process cannot be checked from this host"
            if reason is not None:
                found.append((run, reason))
        if page >= runs.total_pages:
            return found
        page += 1


def _process_gone_or_unknown(meta: dict) -> bool:
    """False only when the recorded process is on this host and still running."""
    pid, host = meta.get(PID), meta.get(HOST)
    if not isinstance(pid, int) or host != socket.gethostname():
        return True
    return _process_gone(meta) is not None


def mark_failed(run, reason: str) -> None:
    """Mark ``run``'s unfinished steps and then the run itself failed, saying why."""
    from zenml.client import Client
    from zenml.enums import ExecutionStatus
    from zenml.models import PipelineRunUpdate, StepRunUpdate

    store = Client().zen_store
    now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    for step in Client().get_pipeline_run(run.id).steps.values():
        if not step.status.is_finished:
            store.update_run_step(step.id, StepRunUpdate(status=ExecutionStatus.FAILED, end_time=now))
    current = Client().get_pipeline_run(run.id)  # a failed step may already have failed the run: add the reason
    if not current.status.is_finished or current.status == ExecutionStatus.FAILED:
        store.update_run(
            run.id, PipelineRunUpdate(status=ExecutionStatus.FAILED, status_reason=f"marked failed by laser: {reason}")
        )


def mark_orphaned_runs(older_than_hours: float | None = None, dry_run: bool = False) -> list[Orphan]:
    """Find (:func:`find_orphaned_runs`) and, unless ``dry_run``, mark failed the runs whose process is gone."""
    out = []
    for run, reason in find_orphaned_runs(older_than_hours):
        removed = None
        if not dry_run:
            mark_failed(run, reason)
            removed = discard_model_version(run)
        out.append(
            Orphan(run=run.name, status=run.status.value, reason=reason, marked=not dry_run, removed_version=removed)
        )
    return out
