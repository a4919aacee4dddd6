#!/usr/bin/env python
"""Register the ``laser-k8s`` ZenML stack (Kubernetes orchestrator) in the ACTIVE ZenML store.

Four components plus the stack that combines them:

    <stack>-orchestrator    kubernetes           kube context + namespace
    <stack>-artifact-store  s3 | gcp | azure     from the path's scheme (s3://, gs://, az:// or abfs://)
    <stack>-registry        default              any registry URI (docker login on this machine)
    <stack>-image-builder   local | kaniko       local = Docker on this machine; kaniko = builds in the cluster

Every cluster-specific value comes from a flag or an environment variable (``--help`` lists them with
their defaults); a missing one stops the script with a message naming the variable. Re-running is
idempotent: an existing component of the same flavor is updated (or left alone when nothing changed),
the stack is re-pointed at the components. The stack is not activated unless ``--activate`` is given.

This file also holds the helpers that ``infra/kubeflow/register_stack.py`` reuses.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

class RegistrationError(RuntimeError):
    """Anything that stops a registration, with a message meant for the user."""


class MissingSettingError(RegistrationError):
    """A required value is neither a flag nor an environment variable."""


class MissingExtraError(RegistrationError):
    """The orchestrator's Python requirements (the package extra) are not installed here."""


@dataclass(frozen=True)
class Option:
    """One value: flag, environment variable, default (``None`` + ``required``: must be given)."""

    dest: str
    flag: str
    env: str
    help: str
    default: str | None = None
    required: bool = False
    choices: tuple[str, ...] | None = None


# Options shared by the Kubernetes and the Kubeflow stacks.
ARTIFACT_STORE = Option("artifact_store_path", "--artifact-store-path", "LASER_ARTIFACT_STORE_PATH",
                        "artifact store root: s3://bucket/prefix, gs://bucket/prefix, az://container/prefix "
                        "or abfs://...", required=True)
S3_ENDPOINT = Option("s3_endpoint_url", "--s3-endpoint-url", "LASER_S3_ENDPOINT_URL",
                     "S3-compatible endpoint (MinIO, Ceph...); unset = AWS S3")
REGISTRY = Option("registry_uri", "--registry-uri", "LASER_CONTAINER_REGISTRY_URI",
                  "container registry the images are pushed to and the cluster pulls from, "
                  "e.g. 123456789.dkr.ecr.eu-west-1.amazonaws.com, europe-docker.pkg.dev/proj/repo, "
                  "docker.io/myuser", required=True)
IMAGE_BUILDER = Option("image_builder", "--image-builder", "LASER_IMAGE_BUILDER",
                       "local (Docker on this machine) or kaniko (a pod in the cluster; needs kubectl and a "
                       "kube context)", default="local", choices=("local", "kaniko"))
KANIKO_NAMESPACE = Option("kaniko_namespace", "--kaniko-namespace", "LASER_KANIKO_NAMESPACE",
                          "existing namespace for the Kaniko build pods", default="zenml-kaniko")

K8S_OPTIONS = (
    Option("stack_name", "--stack-name", "LASER_STACK_NAME", "name of the stack (components get it as prefix)",
           default="laser-k8s"),
    Option("kube_context", "--kube-context", "LASER_KUBE_CONTEXT",
           "kubeconfig context of the cluster (`kubectl config get-contexts`)", required=True),
    Option("namespace", "--namespace", "LASER_K8S_NAMESPACE", "namespace the pipeline pods run in",
           default="zenml"),
    Option("service_account", "--service-account", "LASER_K8S_SERVICE_ACCOUNT",
           "service account of the orchestrator pod; unset = ZenML creates one with 'edit' rights"),
    ARTIFACT_STORE, S3_ENDPOINT, REGISTRY, IMAGE_BUILDER, KANIKO_NAMESPACE,
)

# Python modules each orchestrator flavor needs on the machine that runs `laser run`, and the extra that
# installs them.
EXTRAS: dict[str, tuple[tuple[str, ...], str]] = {
    "kubernetes": (("kubernetes",), "pip install -c infra/kubernetes/requirements-kubernetes.lock -e '.[kubernetes]'"),
    "kubeflow": (("kfp", "kfp.kubernetes", "kubernetes"),
                 "pip install -c infra/kubeflow/requirements-kubeflow.lock -e '.[kubeflow]'"),
}

# Artifact store flavor by path scheme, and the ZenML integration that implements it.
ARTIFACT_STORE_FLAVORS = {"s3://": "s3", "gs://": "gcp", "az://": "azure", "abfs://": "azure"}
ARTIFACT_STORE_INTEGRATIONS = {"s3": "s3", "gcp": "gcp", "azure": "azure"}


def build_parser(options: Sequence[Option], description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for opt in options:
        if opt.required:
            default = "required"
        elif opt.default is None:
            default = "unset"
        else:
            default = f"default {opt.default}"
        parser.add_argument(opt.flag, dest=opt.dest, default=None, choices=opt.choices,
                            help=f"{opt.help} [env {opt.env}; {default}]")
    parser.add_argument("--activate", action="store_true",
                        help="make the stack the active one afterwards (= `zenml stack set <name>`)")
    parser.add_argument("--no-requirements-check", dest="check_requirements", action="store_false",
                        help="register even if the orchestrator's Python requirements are not installed here")
    return parser


def resolve(options: Sequence[Option], args: argparse.Namespace | None, env: Mapping[str, str]) -> dict[str, Any]:
    """Flag > environment variable > default; raise :class:`MissingSettingError` for a required one."""
    values: dict[str, Any] = {}
    missing = []
    for opt in options:
        value = getattr(args, opt.dest, None) if args is not None else None
        if value in (None, ""):
            value = env.get(opt.env) or None
        if value is None:
            value = opt.default
        if value is None and opt.required:
            missing.append(opt)
        if value is not None and opt.choices and value not in opt.choices:
            raise RegistrationError(f"{opt.env}={value!r} is not one of {', '.join(opt.choices)} ({opt.flag})")
        values[opt.dest] = value
    if missing:
        lines = [f"  {o.env} (or {o.flag}): {o.help}" for o in missing]
        names = ", ".join(o.env for o in missing)
        raise MissingSettingError(f"missing required setting{'s' if len(missing) > 1 else ''} {names}:\n"
                                  + "\n".join(lines))
    values["activate"] = bool(getattr(args, "activate", False)) if args is not None else False
    values["check_requirements"] = getattr(args, "check_requirements", True) if args is not None else True
    return values


def _module_missing(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is None
    except ModuleNotFoundError:      # a parent package is missing
        return True


def check_extra(orchestrator_flavor: str) -> None:
    """Raise :class:`MissingExtraError` when the orchestrator's Python requirements are not importable."""
    modules, install = EXTRAS[orchestrator_flavor]
    missing = [m for m in modules if _module_missing(m)]
    if missing:
        raise MissingExtraError(
            f"the {orchestrator_flavor} orchestrator needs the Python module(s) {', '.join(missing)}, which are "
            f"not installed in this environment ({sys.executable}). Install the `{orchestrator_flavor}` extra "
            f"from the repository root: {install}")


def artifact_store_component(path: str, s3_endpoint_url: str | None) -> tuple[str, dict[str, Any]]:
    """The artifact store flavor and configuration for ``path`` (the flavor follows the URI scheme)."""
    for scheme, flavor in ARTIFACT_STORE_FLAVORS.items():
        if path.startswith(scheme):
            config: dict[str, Any] = {"path": path.rstrip("/")}
            if flavor == "s3" and s3_endpoint_url:
                config["client_kwargs"] = {"endpoint_url": s3_endpoint_url}
            return flavor, config
    raise RegistrationError(
        f"LASER_ARTIFACT_STORE_PATH={path!r}: a cluster stack needs a bucket both this machine and the pods can "
        f"reach; use one of {', '.join(ARTIFACT_STORE_FLAVORS)} (a local path only works on the local stack)")


def image_builder_component(values: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    if values["image_builder"] == "kaniko":
        if not values.get("kube_context"):
            raise MissingSettingError("missing required setting LASER_KUBE_CONTEXT:\n  LASER_KUBE_CONTEXT (or "
                                      "--kube-context): the kaniko image builder runs its pods in this context")
        return "kaniko", {"kubernetes_context": values["kube_context"],
                          "kubernetes_namespace": values["kaniko_namespace"]}
    return "local", {}


def warn_missing_integration(flavor: str) -> str | None:
    """A warning when the artifact store's ZenML integration is not installed on this machine."""
    from zenml.integrations.registry import integration_registry

    integration = ARTIFACT_STORE_INTEGRATIONS.get(flavor)
    if integration is None or integration_registry.is_installed(integration):
        return None
    reqs = " ".join(f"'{r}'" for r in integration_registry.select_integration_requirements(integration))
    return (f"warning: the `{integration}` ZenML integration (the {flavor} artifact store) is not installed here; "
            f"registration works without it, but running a pipeline on this stack needs it on this machine: "
            f"`zenml integration install {integration}` or pip install {reqs}")


@dataclass
class Result:
    stack: str
    statuses: dict[str, str] = field(default_factory=dict)   # component or stack name -> created/updated/unchanged
    warnings: list[str] = field(default_factory=list)

    def report(self) -> str:
        lines = [f"{status:9} {name}" for name, status in self.statuses.items()]
        return "\n".join(lines + self.warnings)


def upsert_component(client: Any, name: str, component_type: Any, flavor: str,
                     configuration: dict[str, Any]) -> str:
    """Create the component, or update it in place when its configuration differs: created/updated/unchanged."""
    from zenml.stack.utils import validate_stack_component_config

    try:
        existing = client.get_stack_component(component_type=component_type, name_id_or_prefix=name,
                                              allow_name_prefix_match=False)
    except KeyError:
        client.create_stack_component(name=name, flavor=flavor, component_type=component_type,
                                      configuration=configuration)
        return "created"
    if existing.flavor_name != flavor:
        kind = component_type.value.replace("_", "-")
        raise RegistrationError(
            f"the {kind} {name!r} exists with flavor {existing.flavor_name!r}, not {flavor!r}; a flavor cannot be "
            f"changed in place: remove it from its stacks and delete it (`zenml {kind} delete {name}`), or pick "
            f"another --stack-name")
    wanted = validate_stack_component_config(configuration, flavor=flavor, component_type=component_type)
    wanted_dump = wanted.model_dump(mode="json", exclude_unset=True)
    current = existing.configuration
    if all(current.get(k) == v for k, v in wanted_dump.items()):
        return "unchanged"
    client.update_stack_component(name_id_or_prefix=existing.id, component_type=component_type,
                                  configuration=configuration)
    return "updated"


def upsert_stack(client: Any, name: str, components: Mapping[Any, str]) -> str:
    try:
        stack = client.get_stack(name_id_or_prefix=name, allow_name_prefix_match=False)
    except KeyError:
        client.create_stack(name=name, components=dict(components))
        return "created"
    current = {ctype: [c.id for c in comps] for ctype, comps in stack.components.items()}
    wanted = {ctype: [client.get_stack_component(component_type=ctype, name_id_or_prefix=comp,
                                                 allow_name_prefix_match=False).id]
              for ctype, comp in components.items()}
    if all(current.get(ctype) == ids for ctype, ids in wanted.items()):
        return "unchanged"
    client.update_stack(name_id_or_prefix=stack.id, component_updates=dict(components))
    return "updated"


def register_components(values: Mapping[str, Any], orchestrator_flavor: str,
                        orchestrator_config: dict[str, Any], client: Any = None) -> Result:
    """Register the four components and the stack in the active ZenML store (or ``client``'s)."""
    store_flavor, store_config = artifact_store_component(values["artifact_store_path"],
                                                          values.get("s3_endpoint_url"))
    builder_flavor, builder_config = image_builder_component(values)
    if values.get("check_requirements", True):
        check_extra(orchestrator_flavor)

    from zenml.client import Client
    from zenml.enums import StackComponentType as T

    client = client or Client()
    stack = values["stack_name"]
    names = {T.ORCHESTRATOR: f"{stack}-orchestrator", T.ARTIFACT_STORE: f"{stack}-artifact-store",
             T.CONTAINER_REGISTRY: f"{stack}-registry", T.IMAGE_BUILDER: f"{stack}-image-builder"}
    specs = {T.ORCHESTRATOR: (orchestrator_flavor, orchestrator_config),
             T.ARTIFACT_STORE: (store_flavor, store_config),
             T.CONTAINER_REGISTRY: ("default", {"uri": values["registry_uri"]}),
             T.IMAGE_BUILDER: (builder_flavor, builder_config)}
    result = Result(stack=stack)
    for ctype, (flavor, config) in specs.items():
        result.statuses[names[ctype]] = upsert_component(client, names[ctype], ctype, flavor, config)
    result.statuses[stack] = upsert_stack(client, stack, names)
    if values.get("activate"):
        client.activate_stack(stack)
        result.statuses[stack] += ", active"
    if warning := warn_missing_integration(store_flavor):
        result.warnings.append(warning)
    return result


def kubernetes_orchestrator_config(values: Mapping[str, Any]) -> dict[str, Any]:
    config: dict[str, Any] = {"kubernetes_context": values["kube_context"],
                              "kubernetes_namespace": values["namespace"]}
    if values.get("service_account"):
        config["service_account_name"] = values["service_account"]
    return config


def register(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None, client: Any = None) -> Result:
    """Parse ``argv`` (flags) and ``env`` (default: ``os.environ``), then register; raises on any problem."""
    args = build_parser(K8S_OPTIONS, __doc__ or "").parse_args(list(argv or []))
    values = resolve(K8S_OPTIONS, args, os.environ if env is None else env)
    return register_components(values, "kubernetes", kubernetes_orchestrator_config(values), client)


def run_main(register_fn: Any, argv: Sequence[str] | None) -> int:
    try:
        result = register_fn(argv)
    except RegistrationError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(result.report())
    if not any(s.endswith("active") for s in result.statuses.values()):
        print(f"activate it with: zenml stack set {result.stack}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_main(register, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
