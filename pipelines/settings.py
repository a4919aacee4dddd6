"""ZenML run settings for the cluster stacks (infra/README.md): the Docker image, and GPUs for the Laser steps.

``settings_for_config(cfg)`` turns the ``infra:`` section of a run config into keyword arguments for
``training_pipeline.with_options(**kwargs)``::

    infra:
      parent_image: null            # null = ZenML's image for this Python/ZenML (zenmldocker/zenml:0.98.0-py3.11)
      requirements: null            # null = the stack's lock file (requirements_file() below)
      environment: {}               # extra environment variables in the image, e.g. {LASER_CACHE_DIR: /opt/laser}
      gpus: 1                       # GPUs per pod for each step in gpu_steps (0 = CPU only)
      gpu_steps: [bi_tune_stage1, bi_tune_stage2, evaluate_laser]
      node_selector: {nvidia.com/gpu.present: "true"}     # Kubernetes orchestrator only
      tolerations:                                          # Kubernetes orchestrator only
        - {key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}

What each orchestrator does with it (ZenML 0.98.0; checked by compiling the pipeline on each stack):

- ``local`` (the embedded default): nothing; the image and the pod settings are for containerised orchestrators,
  and the steps use whatever device this machine has. ``settings_for_config`` returns ``{}`` when ``gpus`` is 0,
  so the local run's configuration, and with it ZenML's cache, is unchanged.
- ``kubernetes``: every step pod runs the image of :func:`docker_settings`. GPU steps get
  ``ResourceSettings(gpu_count=gpus)`` and pod settings with ``resources`` requests/limits
  ``nvidia.com/gpu: gpus``, the node selector and the tolerations. The pod resources are set explicitly because
  the Kubernetes orchestrator turns ``ResourceSettings`` into pod resources only for resource-pool allocations.
- ``kubeflow``: the image as above, and ``ResourceSettings(gpu_count=gpus)`` on the GPU steps, but ZenML
  0.98.0's Kubeflow orchestrator gives a step a GPU only through the ``accelerator`` node selector of its pod
  settings, and its settings class drops pod settings when the run is compiled (its validator rebuilds
  ``pod_settings`` from a legacy ``node_selectors`` key, which the compiler strips as an unknown attribute).
  So on that stack the steps get no GPU from these settings, and ``settings_for_config`` warns when ``gpus`` > 0
  (infra/kubeflow/README.md has the details and the ways around it).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import ConfigDict, Field

from laser_core.configbase import StrictConfig

REPO = Path(__file__).resolve().parents[1]
REQUIREMENTS_LOCK = REPO / "requirements.lock"
KUBERNETES_LOCK = REPO / "infra" / "kubernetes" / "requirements-kubernetes.lock"
KUBEFLOW_LOCK = REPO / "infra" / "kubeflow" / "requirements-kubeflow.lock"
GPU_RESOURCE = "nvidia.com/gpu"
DEFAULT_GPU_STEPS = ("bi_tune_stage1", "bi_tune_stage2", "evaluate_laser")

# What the package needs in every container (laser_cli sets the same for the CLI; the Makefile for tests).
IMAGE_ENVIRONMENT = {
    "ZENML_ANALYTICS_OPT_IN": "false",
    "ZENML_LOGGING_VERBOSITY": "WARN",
    "GX_ANALYTICS_ENABLED": "false",
    "ORT_DISABLE_TELEMETRY": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
}

StackKind = str  # "local", "kubernetes", "kubeflow", or any other orchestrator flavor (treated as containerised)

KUBEFLOW_GPU_WARNING = (
    "infra.gpus > 0 on a Kubeflow stack: ZenML 0.98.0's Kubeflow orchestrator drops step pod settings when it "
    "compiles the run, so the GPU steps get no GPU from ZenML (only ResourceSettings is recorded); see "
    "infra/kubeflow/README.md, or use the Kubernetes stack for GPU Bi-Tuning"
)


class Toleration(StrictConfig):
    """A Kubernetes toleration (the fields of ``V1Toleration``)."""

    model_config = ConfigDict(extra="forbid")

    key: str | None = None
    operator: Literal["Exists", "Equal"] = "Exists"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = None

    def as_k8s(self) -> dict[str, Any]:
        d = {
            "key": self.key,
            "operator": self.operator,
            "value": self.value,
            "effect": self.effect,
            "toleration_seconds": self.toleration_seconds,
        }
        return {k: v for k, v in d.items() if v is not None}


class InfraConfig(StrictConfig):
    """The ``infra:`` section of a run config (see the module docstring and infra/README.md)."""

    model_config = ConfigDict(extra="forbid")

    parent_image: str | None = None
    requirements: str | None = None
    environment: dict[str, str] = Field(default_factory=dict)
    gpus: int = Field(default=0, ge=0)
    gpu_steps: list[str] = Field(default_factory=lambda: list(DEFAULT_GPU_STEPS))
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list)


def requirements_file(stack_kind: StackKind, override: str | None = None) -> Path:
    """The pinned requirements the image installs (``override``: a path, relative to the repository root).

    kubernetes: infra/kubernetes/requirements-kubernetes.lock (requirements.lock + the kubernetes client);
    kubeflow: infra/kubeflow/requirements-kubeflow.lock (the same + kfp, with protobuf 6 as kfp needs);
    any other orchestrator: requirements.lock.
    """
    if override:
        path = Path(override)
        return path if path.is_absolute() else REPO / path
    return {"kubernetes": KUBERNETES_LOCK, "kubeflow": KUBEFLOW_LOCK}.get(stack_kind, REQUIREMENTS_LOCK)


def docker_settings(cfg: InfraConfig | None = None, stack_kind: StackKind = "kubernetes"):
    """``DockerSettings`` for the step image: the pinned requirements + the package's environment variables.

    The image installs the stack's integration requirements (e.g. s3fs for an S3 artifact store), then the
    lock file of :func:`requirements_file`, whose pins win where both name a package. Laser's own code is not
    baked in: at each run ZenML archives the source tree (git-aware: .gitignored files such as runs/ and .venv/
    stay out) into the artifact store and the pods download it, so one image serves every code change until
    the lock file changes.
    """
    from zenml.config import DockerSettings

    cfg = cfg or InfraConfig()
    lock = requirements_file(stack_kind, cfg.requirements)
    if not lock.is_file():
        raise FileNotFoundError(f"requirements file {lock} does not exist")
    return DockerSettings(
        parent_image=cfg.parent_image,
        requirements=str(lock),
        environment={**IMAGE_ENVIRONMENT, **cfg.environment},
        disable_automatic_requirements_detection=True,
        install_stack_requirements=True,
    )


def bitune_step_settings(
    gpus: int,
    stack_kind: StackKind = "local",
    node_selector: dict[str, str] | None = None,
    tolerations: list[Toleration | dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The ``settings`` dict of one GPU step: ``resources``, + pod settings on Kubernetes ({} for 0 GPUs)."""
    from zenml.config import ResourceSettings

    if gpus <= 0:
        return {}
    settings: dict[str, Any] = {"resources": ResourceSettings(gpu_count=gpus)}
    if stack_kind == "kubernetes":
        from zenml.integrations.kubernetes.flavors import KubernetesOrchestratorSettings
        from zenml.integrations.kubernetes.pod_settings import KubernetesPodSettings

        tols = [t if isinstance(t, Toleration) else Toleration.model_validate(t) for t in tolerations or []]
        pod = KubernetesPodSettings(
            node_selectors=dict(node_selector or {}),
            tolerations=[t.as_k8s() for t in tols],
            resources={"requests": {GPU_RESOURCE: str(gpus)}, "limits": {GPU_RESOURCE: str(gpus)}},
        )
        settings["orchestrator.kubernetes"] = KubernetesOrchestratorSettings(pod_settings=pod)
    return settings


def pipeline_settings(stack_kind: StackKind, cfg: InfraConfig | None = None) -> dict[str, Any]:
    """The pipeline-level ``settings`` dict: the Docker image for containerised orchestrators, {} for local."""
    if stack_kind == "local":
        return {}
    return {"docker": docker_settings(cfg, stack_kind)}


def detect_stack_kind() -> StackKind:
    """The active stack's orchestrator flavor: "local", "kubernetes", "kubeflow", ..."""
    from zenml.client import Client
    from zenml.enums import StackComponentType

    orchestrators = Client().active_stack_model.components.get(StackComponentType.ORCHESTRATOR) or []
    return orchestrators[0].flavor_name if orchestrators else "local"


def settings_for_config(
    infra_cfg: dict[str, Any] | InfraConfig | None,
    stack_kind: StackKind | None = None,
    gpu_steps: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Keyword arguments for ``<pipeline>.with_options(**kwargs)``: ``settings`` and ``steps``.

    ``stack_kind`` defaults to the active stack's orchestrator flavor. ``gpu_steps`` overrides ``infra.gpu_steps``
    (the training pipeline's Laser steps), e.g. for another pipeline; ZenML only warns about a configured step
    a pipeline does not have. Returns ``{}`` on the local orchestrator without GPUs, so nothing changes for the
    embedded default.
    """
    cfg = infra_cfg if isinstance(infra_cfg, InfraConfig) else InfraConfig.model_validate(infra_cfg or {})
    kind = stack_kind or detect_stack_kind()
    options: dict[str, Any] = {}
    if settings := pipeline_settings(kind, cfg):
        options["settings"] = settings
    if cfg.gpus and kind == "kubeflow":
        warnings.warn(KUBEFLOW_GPU_WARNING, stacklevel=2)
    if step_settings := bitune_step_settings(cfg.gpus, kind, cfg.node_selector, cfg.tolerations):
        steps = cfg.gpu_steps if gpu_steps is None else gpu_steps
        options["steps"] = {step: {"settings": step_settings} for step in steps}
    return options
