#!/usr/bin/env python
"""Register the ``laser-kubeflow`` ZenML stack (Kubeflow Pipelines orchestrator) in the ACTIVE ZenML store.

Four components plus the stack that combines them:

    <stack>-orchestrator    kubeflow             KFP API host (multi-tenant / hosted) or kube context
    <stack>-artifact-store  s3 | gcp | azure     from the path's scheme (s3://, gs://, az:// or abfs://)
    <stack>-registry        default              any registry URI (docker login on this machine)
    <stack>-image-builder   local | kaniko       local = Docker on this machine; kaniko = builds in the cluster

Every cluster-specific value comes from a flag or an environment variable (``--help`` lists them with
their defaults); a missing one stops the script with a message naming the variable. The orchestrator needs
LASER_KUBEFLOW_HOST (the Kubeflow Pipelines API, e.g. https://kubeflow.example.com/pipeline) or
LASER_KUBE_CONTEXT (ZenML reaches KFP through the Kubernetes API proxy of that context), or both.
Re-running is idempotent. The stack is not activated unless ``--activate`` is given.

The shared helpers live in ``infra/kubernetes/register_stack.py``.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def _load_common():
    name = "laser_infra_kubernetes_register_stack"
    if name in sys.modules:
        return sys.modules[name]
    path = Path(__file__).resolve().parents[1] / "kubernetes" / "register_stack.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


common = _load_common()
Option = common.Option
RegistrationError = common.RegistrationError
MissingSettingError = common.MissingSettingError
MissingExtraError = common.MissingExtraError
Result = common.Result

KUBEFLOW_OPTIONS = (
    Option("stack_name", "--stack-name", "LASER_STACK_NAME", "name of the stack (components get it as prefix)",
           default="laser-kubeflow"),
    Option("kubeflow_host", "--kubeflow-host", "LASER_KUBEFLOW_HOST",
           "Kubeflow Pipelines API URL, e.g. https://kubeflow.example.com/pipeline (required for multi-tenant "
           "Kubeflow; unset = reach KFP through the kube context)"),
    Option("kube_context", "--kube-context", "LASER_KUBE_CONTEXT",
           "kubeconfig context of the cluster (needed when LASER_KUBEFLOW_HOST is unset, and for kaniko)"),
    Option("kubeflow_namespace", "--kubeflow-namespace", "LASER_KUBEFLOW_NAMESPACE",
           "namespace Kubeflow Pipelines is deployed in", default="kubeflow"),
    Option("user_namespace", "--user-namespace", "LASER_KUBEFLOW_USER_NAMESPACE",
           "Kubeflow profile namespace runs are created in (multi-tenant Kubeflow); unset = KFP's default"),
    common.ARTIFACT_STORE, common.S3_ENDPOINT, common.REGISTRY, common.IMAGE_BUILDER, common.KANIKO_NAMESPACE,
)


def kubeflow_orchestrator_config(values: Mapping[str, Any]) -> dict[str, Any]:
    if not values.get("kubeflow_host") and not values.get("kube_context"):
        raise MissingSettingError(
            "missing required setting LASER_KUBEFLOW_HOST or LASER_KUBE_CONTEXT:\n"
            "  LASER_KUBEFLOW_HOST (or --kubeflow-host): the Kubeflow Pipelines API URL, or\n"
            "  LASER_KUBE_CONTEXT (or --kube-context): the kube context whose API proxy reaches KFP")
    config: dict[str, Any] = {"kubeflow_namespace": values["kubeflow_namespace"]}
    if values.get("kubeflow_host"):
        config["kubeflow_hostname"] = values["kubeflow_host"]
    if values.get("kube_context"):
        config["kubernetes_context"] = values["kube_context"]
    if values.get("user_namespace"):
        config["user_namespace"] = values["user_namespace"]
    return config


def register(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None, client: Any = None) -> Result:
    """Parse ``argv`` (flags) and ``env`` (default: ``os.environ``), then register; raises on any problem."""
    args = common.build_parser(KUBEFLOW_OPTIONS, __doc__ or "").parse_args(list(argv or []))
    values = common.resolve(KUBEFLOW_OPTIONS, args, os.environ if env is None else env)
    orchestrator_config = kubeflow_orchestrator_config(values)
    return common.register_components(values, "kubeflow", orchestrator_config, client)


def main(argv: Sequence[str] | None = None) -> int:
    return common.run_main(register, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
