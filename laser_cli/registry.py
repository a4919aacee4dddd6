"""What ``laser model ...`` and ``laser lineage`` print: thin functions over ZenML's client, returning plain data.

Kept apart from the click commands so tests can call them and compare with the printed output.
"""

from __future__ import annotations

from typing import Any

import click

STEP_ORDER = (
    "load_dataset",
    "validate_dataset",
    "split_dataset",
    "pretrain_sr",
    "evaluate_sr",
    "bi_tune_stage1",
    "bi_tune_stage2",
    "evaluate_laser",
    "export_scorer",
    "promote",
    "batch_recommend",
)
STAGES = ("staging", "production", "archived")


def _scalar_metadata(meta: dict, limit: int = 12) -> dict[str, Any]:
    out = {}
    for k, v in meta.items():
        if isinstance(v, (str, int, float, bool)) and not (isinstance(v, str) and len(v) > 120):
            out[k] = v
        if len(out) >= limit:
            break
    return out


def _client():
    from zenml.client import Client

    return Client()


def resolve_version(model: str, version: str | None):
    """A model version by number, name, stage (production/staging/latest) or id; KeyError with the reason."""
    from zenml.enums import ModelStages

    client = _client()
    key: Any = version or ModelStages.LATEST
    if isinstance(key, str) and key in {s.value for s in ModelStages}:
        key = ModelStages(key)
    try:
        return client.get_model_version(model, key)
    except KeyError as exc:
        raise KeyError(f"model {model!r} has no version {version or 'latest'!r}") from exc


HEADLINE = ("recall@10", "ndcg@10", "mrr")


def _metrics(mv) -> dict[str, Any]:
    """Test metrics of a version: logged on the version by the evaluate steps, or (when those steps were
    cached in this version's run, so nothing was logged) read from its linked metrics artifacts."""
    meta = mv.run_metadata
    out = {}
    for key, artifact in (
        ("laser_test", "laser_metrics"),
        ("lexical_test", "lexical_metrics"),
        ("sr_test", "sr_metrics"),
        ("popularity_test", None),
        ("id_model_test", None),
    ):
        if isinstance(meta.get(key), dict):
            out[key] = {k: v for k, v in meta[key].items()}
        elif artifact is not None and (art := mv.get_artifact(artifact)) is not None:
            am = art.run_metadata
            if any(k in am for k in HEADLINE):
                out[key] = {k: am[k] for k in HEADLINE if k in am}
    if isinstance(meta.get("promotion"), dict):
        out["promotion"] = {k: meta["promotion"].get(k) for k in ("stage", "reason")}
    return out


def version_summary(mv) -> dict[str, Any]:
    return {
        "model": mv.model.name,
        "version": mv.name,
        "number": mv.number,
        "stage": getattr(mv.stage, "value", mv.stage),
        "created": str(mv.created)[:19],
        **_metrics(mv),
    }


def list_models(name: str | None = None) -> list[dict[str, Any]]:
    """Every Laser model (or one) with its versions, newest first."""
    client = _client()
    models = [client.get_model(name)] if name else client.list_models(size=1000).items
    out = []
    for m in models:
        versions = client.list_model_versions(model=m.id, sort_by="desc:number", size=1000).items
        out.append({"model": m.name, "versions": [version_summary(v) for v in versions]})
    return out


def show_version(model: str, version: str | None) -> dict[str, Any]:
    mv = resolve_version(model, version)
    info = version_summary(mv)
    arts = _client().list_artifact_versions(model_version_id=mv.id, size=1000).items
    info["artifacts"] = {}
    for a in sorted(arts, key=lambda a: (a.name, str(a.version))):
        info["artifacts"].setdefault(a.name, {})[str(a.version)] = str(a.id)
    info["runs"] = {r.name: str(r.id) for r in _runs(mv)}
    info["metadata"] = {k: v for k, v in mv.run_metadata.items()}
    return info


class PromotionError(click.ClickException, ValueError):
    """A stage change refused, with a one-line reason (a ``click.ClickException``: the CLI prints
    ``Error: <reason>`` and exits 1; a ``ValueError`` for callers that catch those)."""


# what a version needs before it can serve: the artifacts the promote step re-scores and `laser batch` loads
SERVING_ARTIFACTS = ("dataset", "sr_model", "laser_model", "item_table")


# the same for a version that serves only the lexical hybrid (pipeline.models: [lexical_hybrid]): its bundle
LEXICAL_SERVING_ARTIFACTS = ("dataset", "sr_model", "scorer_bundle")


def _servable(mv) -> list[str]:
    """What the version lacks to be staged or put in production: artifacts, and test metrics (Laser's, or the
    lexical hybrid's for a version that trained no Laser)."""
    metrics = _metrics(mv)
    lexical = mv.get_artifact("laser_model") is None and bool(metrics.get("lexical_test"))
    needed = LEXICAL_SERVING_ARTIFACTS if lexical else SERVING_ARTIFACTS
    missing = [name for name in needed if mv.get_artifact(name) is None]
    test = metrics.get("lexical_test" if lexical else "laser_test") or {}
    if not any(isinstance(test.get(k), (int, float)) for k in HEADLINE):
        missing.append("lexical hybrid test metrics" if lexical else "Laser test metrics")
    return missing


def promote_version(model: str, version: str, stage: str, force: bool = False) -> dict[str, Any]:
    """Set a version's stage by hand (``force`` archives the version currently in that stage). Refused, with a
    :class:`PromotionError`, when the stage is taken by another version and ``force`` is off, or when the version
    has no trained model or no test metrics (for staging and production; archiving is always allowed)."""
    from zenml.enums import ModelStages

    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, not {stage!r}")
    mv = resolve_version(model, version)
    current = getattr(mv.stage, "value", mv.stage)
    if current == stage:
        return version_summary(mv)
    if stage != "archived":
        missing = _servable(mv)
        if missing:
            raise PromotionError(
                f"{model} v{mv.name} cannot go to {stage}: it has no {', no '.join(missing)} "
                "(its training run did not finish, or stopped before Laser was evaluated)"
            )
        try:
            holder = _client().get_model_version(model, ModelStages(stage))
        except KeyError:
            holder = None
        if holder is not None and holder.id != mv.id and not force:
            raise PromotionError(
                f"{model} v{holder.name} is already in {stage}; use --force to move it to "
                f"archived and put v{mv.name} in {stage}"
            )
    try:
        # several versions may be archived at once: force only matters for staging and production
        mv.set_stage(stage, force=force or stage == "archived")
    except RuntimeError as exc:  # the stage was taken between our check and the update
        raise PromotionError(f"{model} v{mv.name} not moved to {stage}: {exc} (use --force)") from exc
    return version_summary(resolve_version(model, mv.name))


def diff_versions(model: str, a: str, b: str) -> dict[str, Any]:
    """Metrics and configuration that differ between two versions."""
    va, vb = resolve_version(model, a), resolve_version(model, b)
    ma, mb = _metrics(va), _metrics(vb)
    rows = []
    for group in ("laser_test", "sr_test", "popularity_test", "id_model_test"):
        ga, gb = ma.get(group) or {}, mb.get(group) or {}
        for k in sorted(set(ga) | set(gb)):
            x, y = ga.get(k), gb.get(k)
            if x == y and not isinstance(x, (int, float)):
                continue
            delta = (y - x) if isinstance(x, (int, float)) and isinstance(y, (int, float)) else None
            rows.append({"key": f"{group}.{k}", "a": x, "b": y, "delta": delta})
    config = []
    ra, rb = _training_run(va), _training_run(vb)
    if ra is not None and rb is not None:
        pa, pb = _flatten(_parameters(ra)), _flatten(_parameters(rb))
        for k in sorted(set(pa) | set(pb)):
            if pa.get(k) != pb.get(k):
                config.append({"key": k, "a": pa.get(k), "b": pb.get(k)})
    return {"model": model, "a": version_summary(va), "b": version_summary(vb), "metrics": rows, "config": config}


def _parameters(run) -> dict[str, Any]:
    """A pipeline run's parameters as plain JSON values (the config sections are pydantic models when the run
    was compiled in this process, mappings when read back from the store)."""
    return {
        k: v.model_dump(mode="json") if hasattr(v, "model_dump") else v
        for k, v in (run.config.parameters or {}).items()
    }


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _runs(mv) -> list:
    """The pipeline runs bound to this model version (its training run, batch runs that used it)."""
    return list(_client().list_pipeline_runs(model_version_id=mv.id, size=1000).items)


def _training_run(mv):
    runs = [r for r in _runs(mv) if r.pipeline is not None and r.pipeline.name == "laser_training"]
    return max(runs, key=lambda r: r.created) if runs else None


def lineage(target: str) -> dict[str, Any]:
    """The chain of a training run (by run id/name) or of a model version (``name[:version|stage]``): the raw data
    version, then every step's output artifacts with version, URI, producing step and key metadata."""
    client = _client()
    run, mv = None, None
    try:
        run = client.get_pipeline_run(target)
    except (KeyError, ValueError):
        name, _, version = target.partition(":")
        try:
            mv = resolve_version(name, version or None)
        except KeyError as exc:
            raise KeyError(f"{target!r} is neither a pipeline run nor a model version: {exc}") from exc
        run = _training_run(mv)
        if run is None:
            raise KeyError(f"model version {name}:{mv.name} has no training run")
    run = client.get_pipeline_run(run.id)
    params = _parameters(run)
    steps = sorted(
        run.steps.items(), key=lambda kv: (STEP_ORDER.index(kv[0]) if kv[0] in STEP_ORDER else len(STEP_ORDER), kv[0])
    )
    chain = []
    for name, step_run in steps:
        outputs = []
        for out_name, arts in sorted(step_run.outputs.items()):
            for art in arts:
                producer = art.producer_step_run_id
                produced_by = name if producer in (None, step_run.id) else f"{name} (cached; from step run {producer})"
                outputs.append(
                    {
                        "name": out_name,
                        "artifact": art.name,
                        "version": str(art.version),
                        "id": str(art.id),
                        "uri": art.uri,
                        "type": str(art.type.value),
                        "materializer": art.materializer.import_path if art.materializer else None,
                        "produced_by": produced_by,
                        "metadata": _scalar_metadata(art.run_metadata),
                    }
                )
        chain.append({"step": name, "status": step_run.status.value, "outputs": outputs})
    dataset_cfg = params.get("dataset") or {}
    return {
        "run": {
            "id": str(run.id),
            "name": run.name,
            "pipeline": run.pipeline.name if run.pipeline else None,
            "status": run.status.value,
            "created": str(run.created)[:19],
        },
        "model_version": None if mv is None else version_summary(mv),
        "raw_data": {
            "format": dataset_cfg.get("format"),
            "path": dataset_cfg.get("path"),
            "fingerprint": params.get("data_fingerprint"),
        },
        "chain": chain,
    }


def lineage_text(info: dict[str, Any]) -> str:
    r = info["run"]
    lines = [f"run {r['name']} ({r['id']}) pipeline={r['pipeline']} status={r['status']} created={r['created']}"]
    if info["model_version"]:
        mv = info["model_version"]
        lines.append(f"model {mv['model']} version {mv['version']} stage={mv['stage']}")
    raw = info["raw_data"]
    lines.append(f"raw data: format={raw['format']} path={raw['path']} fingerprint={str(raw['fingerprint'])[:16]}")
    for node in info["chain"]:
        lines.append(f"└─ {node['step']} [{node['status']}]")
        for o in node["outputs"]:
            meta = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in o["metadata"].items())
            lines.append(f"     {o['name']} v{o['version']} ({o['type']}) by {o['produced_by']}")
            lines.append(f"       uri: {o['uri']}")
            if meta:
                lines.append(f"       {meta}")
    return "\n".join(lines)
