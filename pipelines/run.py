"""Run a pipeline from a :class:`LaserConfig` (the CLI's ``laser run`` calls this)."""

from __future__ import annotations

from laser_core.config import LaserConfig, data_fingerprint


def run_training(config: LaserConfig, enable_cache: bool | None = None, run_name: str | None = None):
    """Run the training pipeline on the active ZenML stack and return the pipeline run response."""
    from pipelines.training import training_pipeline

    cache = config.pipeline.enable_cache if enable_cache is None else enable_cache
    options: dict = {"enable_cache": cache}
    if run_name:
        options["run_name"] = run_name
    pipe = training_pipeline.with_options(**options)
    return pipe(dataset=config.dataset.model_dump(), validation=config.validation.model_dump(),
                data_fingerprint=data_fingerprint(config.dataset), sr_model=config.sr.model_dump(),
                sr_train=config.sr_train.model_dump(), laser=config.laser_spec().model_dump(),
                laser_train=config.laser_train.model_dump(), stop_after=config.pipeline.stop_after)
