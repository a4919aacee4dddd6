"""``laser stack register kubernetes|kubeflow``: register a cluster stack in the ACTIVE ZenML store.

Four components plus the stack that combines them (``<stack>`` = ``--stack-name``):

    <stack>-orchestrator    kubernetes | kubeflow
    <stack>-artifact-store  s3 | gcp | azure     from the path's scheme (s3://, gs://, az:// or abfs://)
    <stack>-registry        default              any registry URI (docker login on this machine)
    <stack>-image-builder   local | kaniko       local = Docker on this machine; kaniko = builds in the cluster

Every value is an option that can also come from its environment variable (click's ``envvar``; a flag wins over
the variable, the variable over the default). Missing required values are all named at once, with their
variables. Re-running is idempotent: an existing component of the same flavor is updated in place (or left
alone when nothing changed), the stack is re-pointed at the components. The stack is activated only with
``--activate``.

ZenML's flavor registry holds the Kubernetes and Kubeflow flavors whether or not their Python clients are
installed, so registering a Kubernetes stack needs ZenML only, and a Kubeflow stack ZenML and the ``kubernetes``
client (ZenML validates the Kubeflow orchestrator's configuration with it), not kfp. The whole client (the
``kubernetes`` / ``kubeflow`` extra) is needed where a pipeline runs on the stack, so by default registration
stops when it is missing here, naming the extra to install; ``--no-requirements-check`` registers anyway (e.g.
from a machine that only administers the store). ZenML is imported only when a command runs, so ``laser --help``
stays fast and works without the extras.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import click

from laser_core.errors import EXIT_CONFIG, UserError


class RegistrationError(UserError):
    """Anything that stops a registration, with a message meant for the user."""

    exit_code = EXIT_CONFIG


class MissingExtraError(RegistrationError):
    """The orchestrator's Python client (the package extra) is not installed in this environment."""


# Python modules each orchestrator flavor needs on the machine that runs `laser run`, and how to install them.
EXTRAS: dict[str, tuple[tuple[str, ...], str]] = {
    "kubernetes": (("kubernetes",), "pip install -c infra/kubernetes/requirements-kubernetes.lock -e '.[kubernetes]'"),
    "kubeflow": (
        ("kfp", "kfp.kubernetes", "kubernetes"),
        "pip install -c infra/kubeflow/requirements-kubeflow.lock -e '.[kubeflow]'",
    ),
}
# Those ZenML 0.98.0 needs to register it: the Kubeflow orchestrator's configuration validator builds its pod
# settings with the kubernetes client (the Kubernetes orchestrator's needs nothing beyond ZenML).
REGISTER_MODULES: dict[str, tuple[str, ...]] = {"kubernetes": (), "kubeflow": ("kubernetes",)}

# Artifact store flavor by path scheme; the ZenML integration implementing a flavor has the flavor's name.
ARTIFACT_STORE_FLAVORS = {"s3://": "s3", "gs://": "gcp", "az://": "azure", "abfs://": "azure"}


# --------------------------------------------------------------------------------------- options
class EnvOption(click.Option):
    """An option that may come from its environment variable (shown in ``--help`` and in click's error for a bad
    value). ``required_setting`` options are checked together by :func:`require`: click's own ``required`` would
    stop at the first missing one and not name its variable."""

    def __init__(self, *args: Any, required_setting: bool = False, **kwargs: Any) -> None:
        kwargs.setdefault("show_envvar", True)
        self.about = kwargs.get("help") or ""
        if required_setting:
            kwargs["help"] = f"{self.about} [required]"
        super().__init__(*args, **kwargs)
        self.required_setting = required_setting

    def setting(self) -> str:
        return f"{self.envvar} (or {self.opts[0]})"


def _option(
    flag: str, envvar: str, help: str, default: str | None = None, required: bool = False, **kwargs: Any
) -> Callable:
    return click.option(
        flag,
        envvar=envvar,
        default=default,
        show_default=default is not None,
        cls=EnvOption,
        required_setting=required,
        help=help,
        **kwargs,
    )


def _artifact_store_path(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is not None and not value.startswith(tuple(ARTIFACT_STORE_FLAVORS)):
        raise click.BadParameter(
            f"{value!r}: a cluster stack needs a bucket both this machine and the pods can reach; use one of "
            f"{', '.join(ARTIFACT_STORE_FLAVORS)} (a local path only works on the local stack)"
        )
    return value


#: a stack name: letters, digits, '-' and '_', starting with a letter or digit (it prefixes the component names)
STACK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,62}")
#: a Kubernetes namespace: an RFC 1123 DNS label
DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
#: a Kubernetes object name such as a service account: an RFC 1123 DNS subdomain
DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


def _matches(pattern: re.Pattern, rule: str, max_len: int) -> Callable:
    """An option callback refusing a value that ``pattern`` does not match in full (click names the flag)."""

    def check(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
        if value is not None and (len(value) > max_len or not pattern.fullmatch(value)):
            raise click.BadParameter(f"{value!r} is not a valid name: {rule}", ctx, param)
        return value

    return check


_stack_name_rule = _matches(
    STACK_NAME, "use letters, digits, '-' and '_', start with a letter or digit, at most 63 characters", 63
)
_namespace = _matches(
    DNS_LABEL,
    "a Kubernetes namespace is an RFC 1123 label: lowercase letters, digits and '-', starting and ending with a "
    "letter or digit, at most 63 characters",
    63,
)
_k8s_object = _matches(
    DNS_SUBDOMAIN,
    "a Kubernetes name is an RFC 1123 subdomain: lowercase letters, digits, '-' and '.', each part starting and "
    "ending with a letter or digit, at most 253 characters",
    253,
)


def _stack_name(default: str) -> Callable:
    return _option(
        "--stack-name",
        "LASER_STACK_NAME",
        "name of the stack (the components get it as prefix)",
        default=default,
        callback=_stack_name_rule,
    )


# Options shared by the Kubernetes and the Kubeflow stacks, after each command's own.
COMMON_OPTIONS = (
    _option(
        "--artifact-store-path",
        "LASER_ARTIFACT_STORE_PATH",
        "artifact store root: s3://bucket/prefix, gs://bucket/prefix, az://container/prefix or abfs://...",
        required=True,
        callback=_artifact_store_path,
    ),
    _option("--s3-endpoint-url", "LASER_S3_ENDPOINT_URL", "S3-compatible endpoint (MinIO, Ceph...); unset = AWS S3"),
    _option(
        "--registry-uri",
        "LASER_CONTAINER_REGISTRY_URI",
        "container registry the images are pushed to and the cluster pulls from, e.g. "
        "123456789.dkr.ecr.eu-west-1.amazonaws.com, europe-docker.pkg.dev/proj/repo, docker.io/myuser",
        required=True,
    ),
    _option(
        "--image-builder",
        "LASER_IMAGE_BUILDER",
        "local (Docker on this machine) or kaniko (a pod in the cluster; needs kubectl and a kube context)",
        default="local",
        type=click.Choice(["local", "kaniko"]),
    ),
    _option(
        "--kaniko-namespace",
        "LASER_KANIKO_NAMESPACE",
        "existing namespace for the Kaniko build pods",
        default="zenml-kaniko",
        callback=_namespace,
    ),
    click.option("--activate", is_flag=True, help="make the stack the active one afterwards (= `zenml stack set`)"),
    click.option(
        "--no-requirements-check",
        "no_requirements_check",
        is_flag=True,
        help="register even if the orchestrator's Python client (the package extra) is not installed "
        "here (a kubeflow stack still needs the kubernetes client to register)",
    ),
)


def _with_options(*options: Callable) -> Callable:
    """Apply ``options`` then :data:`COMMON_OPTIONS`, listed in ``--help`` in that order."""

    def decorate(fn: Callable) -> Callable:
        for option in reversed(options + COMMON_OPTIONS):
            fn = option(fn)
        return fn

    return decorate


def require(ctx: click.Context, *alternatives: tuple[tuple[str, ...], str]) -> None:
    """Raise a usage error naming every missing required setting (with its variable) in one message.

    Every ``required_setting`` option of the command must be set, and the kube context with the kaniko image
    builder; each of ``alternatives`` (parameter names, why) needs at least one of its parameters set.
    """
    params = {p.name: p for p in ctx.command.params if isinstance(p, EnvOption)}
    groups = [((name,), p.about) for name, p in params.items() if p.required_setting] + list(alternatives)
    if ctx.params.get("image_builder") == "kaniko":
        groups.append((("kube_context",), "the kaniko image builder runs its pods in this context"))
    lines: dict[tuple[str, ...], str] = {}
    for names, why in groups:
        if names not in lines and all(ctx.params.get(name) in (None, "") for name in names):
            lines[names] = " or ".join(params[name].setting() for name in names) + f": {why}"
    if lines:
        raise click.UsageError(
            f"missing required setting{'s' if len(lines) > 1 else ''}:\n  " + "\n  ".join(lines.values()), ctx
        )


def _module_missing(name: str) -> bool:
    if name in sys.modules:  # None there = the import is blocked
        return sys.modules[name] is None
    try:
        return importlib.util.find_spec(name) is None
    except (ModuleNotFoundError, ValueError):  # a parent package is missing (or blocked)
        return True


def missing_modules(orchestrator_flavor: str, register_only: bool = False) -> list[str]:
    """The orchestrator's Python modules (or, ``register_only``, those registering it needs) not importable here."""
    modules = REGISTER_MODULES[orchestrator_flavor] if register_only else EXTRAS[orchestrator_flavor][0]
    return [m for m in modules if _module_missing(m)]


def check_extra(orchestrator_flavor: str, register_only: bool = False) -> None:
    """Raise :class:`MissingExtraError` naming the extra to install when :func:`missing_modules` finds any."""
    install = EXTRAS[orchestrator_flavor][1]
    missing = missing_modules(orchestrator_flavor, register_only)
    if not missing:
        return
    where = f"which {'is' if len(missing) == 1 else 'are'} not installed in this environment ({sys.executable})"
    if register_only:
        raise MissingExtraError(
            f"registering the {orchestrator_flavor} orchestrator needs the Python module {', '.join(missing)} "
            f"(ZenML validates its configuration with it), {where}. Install the `{orchestrator_flavor}` extra from "
            f"the repository root: {install}; or, enough to register, the `kubernetes` extra: "
            f"{EXTRAS['kubernetes'][1]}"
        )
    raise MissingExtraError(
        f"the {orchestrator_flavor} orchestrator needs the Python module(s) {', '.join(missing)}, {where}. Install "
        f"the `{orchestrator_flavor}` extra from the repository root: {install}   (or pass --no-requirements-check "
        f"to register the stack anyway)"
    )


# --------------------------------------------------------------------------------------- registration
@dataclass
class Result:
    stack: str
    statuses: dict[str, str] = field(default_factory=dict)  # component or stack name -> created/updated/unchanged
    warnings: list[str] = field(default_factory=list)

    def report(self) -> str:
        return "\n".join(f"{status:9} {name}" for name, status in self.statuses.items())


def artifact_store_component(path: str, s3_endpoint_url: str | None) -> tuple[str, dict[str, Any]]:
    """The artifact store flavor and configuration for ``path`` (the flavor follows the URI scheme)."""
    flavor = next(f for scheme, f in ARTIFACT_STORE_FLAVORS.items() if path.startswith(scheme))
    config: dict[str, Any] = {"path": path.rstrip("/")}
    if flavor == "s3" and s3_endpoint_url:
        config["client_kwargs"] = {"endpoint_url": s3_endpoint_url}
    return flavor, config


def image_builder_component(values: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    if values["image_builder"] == "kaniko":
        return "kaniko", {
            "kubernetes_context": values["kube_context"],
            "kubernetes_namespace": values["kaniko_namespace"],
        }
    return "local", {}


def missing_integration_warning(flavor: str) -> str | None:
    """A warning when the artifact store's ZenML integration is not installed on this machine."""
    from zenml.integrations.registry import integration_registry

    if integration_registry.is_installed(flavor):
        return None
    reqs = " ".join(f"'{r}'" for r in integration_registry.select_integration_requirements(flavor))
    return (
        f"warning: the `{flavor}` ZenML integration (the {flavor} artifact store) is not installed here; "
        f"registration works without it, but running a pipeline on this stack needs it on this machine: "
        f"`zenml integration install {flavor}` or pip install {reqs}"
    )


def upsert_component(client: Any, name: str, component_type: Any, flavor: str, configuration: dict[str, Any]) -> str:
    """Create the component, or update it in place when its configuration differs: created/updated/unchanged."""
    from zenml.stack.utils import validate_stack_component_config

    try:
        existing = client.get_stack_component(
            component_type=component_type, name_id_or_prefix=name, allow_name_prefix_match=False
        )
    except KeyError:
        client.create_stack_component(
            name=name, flavor=flavor, component_type=component_type, configuration=configuration
        )
        return "created"
    if existing.flavor_name != flavor:
        kind = component_type.value.replace("_", "-")
        raise RegistrationError(
            f"the {kind} {name!r} exists with flavor {existing.flavor_name!r}, not {flavor!r}; a flavor cannot be "
            f"changed in place: remove it from its stacks and delete it (`zenml {kind} delete {name}`), or pick "
            f"another --stack-name"
        )
    wanted = validate_stack_component_config(configuration, flavor=flavor, component_type=component_type)
    wanted_dump = wanted.model_dump(mode="json", exclude_unset=True)
    if all(existing.configuration.get(k) == v for k, v in wanted_dump.items()):
        return "unchanged"
    client.update_stack_component(
        name_id_or_prefix=existing.id, component_type=component_type, configuration=configuration
    )
    return "updated"


def upsert_stack(client: Any, name: str, components: Mapping[Any, str]) -> str:
    try:
        stack = client.get_stack(name_id_or_prefix=name, allow_name_prefix_match=False)
    except KeyError:
        client.create_stack(name=name, components=dict(components))
        return "created"
    current = {ctype: [c.id for c in comps] for ctype, comps in stack.components.items()}
    wanted = {
        ctype: [
            client.get_stack_component(component_type=ctype, name_id_or_prefix=comp, allow_name_prefix_match=False).id
        ]
        for ctype, comp in components.items()
    }
    if all(current.get(ctype) == ids for ctype, ids in wanted.items()):
        return "unchanged"
    client.update_stack(name_id_or_prefix=stack.id, component_updates=dict(components))
    return "updated"


def register_stack(
    values: Mapping[str, Any], orchestrator_flavor: str, orchestrator_config: dict[str, Any], client: Any = None
) -> Result:
    """Register the four components and the stack in the active ZenML store (or ``client``'s).

    ``values``: the command's parameters (stack_name, artifact_store_path, s3_endpoint_url, registry_uri,
    image_builder, kaniko_namespace, kube_context, activate, no_requirements_check).
    """
    check_extra(orchestrator_flavor, register_only=bool(values.get("no_requirements_check")))
    store_flavor, store_config = artifact_store_component(values["artifact_store_path"], values.get("s3_endpoint_url"))
    builder_flavor, builder_config = image_builder_component(values)

    from zenml.client import Client
    from zenml.enums import StackComponentType as T

    client = client or Client()
    stack = values["stack_name"]
    specs = {
        T.ORCHESTRATOR: ("orchestrator", orchestrator_flavor, orchestrator_config),
        T.ARTIFACT_STORE: ("artifact-store", store_flavor, store_config),
        T.CONTAINER_REGISTRY: ("registry", "default", {"uri": values["registry_uri"]}),
        T.IMAGE_BUILDER: ("image-builder", builder_flavor, builder_config),
    }
    names = {ctype: f"{stack}-{suffix}" for ctype, (suffix, _, _) in specs.items()}
    result = Result(stack=stack)
    for ctype, (_, flavor, config) in specs.items():
        result.statuses[names[ctype]] = upsert_component(client, names[ctype], ctype, flavor, config)
    result.statuses[stack] = upsert_stack(client, stack, names)
    if values.get("activate"):
        client.activate_stack(stack)
        result.statuses[stack] += ", active"
    if warning := missing_integration_warning(store_flavor):
        result.warnings.append(warning)
    return result


def _echo(result: Result) -> None:
    click.echo(result.report())
    for warning in result.warnings:
        click.echo(warning, err=True)
    if not result.statuses[result.stack].endswith("active"):
        click.echo(f"activate it with: zenml stack set {result.stack}")


# --------------------------------------------------------------------------------------- commands
@click.group(name="stack")
def stack_group() -> None:
    """Cluster stacks (infra/README.md): register them in the active ZenML store."""


@stack_group.group(name="register")
def register_group() -> None:
    """Register (or update) a cluster stack; every option can also be set by its environment variable."""


def _kube_context(help: str, required: bool = False) -> Callable:
    return _option("--kube-context", "LASER_KUBE_CONTEXT", help, required=required)


@register_group.command(name="kubernetes")
@_with_options(
    _stack_name("laser-k8s"),
    _kube_context("kubeconfig context of the cluster (`kubectl config get-contexts`)", required=True),
    _option(
        "--namespace", "LASER_K8S_NAMESPACE", "namespace the pipeline pods run in", default="zenml", callback=_namespace
    ),
    _option(
        "--service-account",
        "LASER_K8S_SERVICE_ACCOUNT",
        "service account of the orchestrator pod; unset = ZenML creates one with 'edit' rights",
        callback=_k8s_object,
    ),
)
@click.pass_context
def register_kubernetes(ctx: click.Context, **values: Any) -> None:
    """The Kubernetes stack (default name laser-k8s): one pod per step (infra/kubernetes/README.md)."""
    require(ctx)
    config: dict[str, Any] = {"kubernetes_context": values["kube_context"], "kubernetes_namespace": values["namespace"]}
    if values["service_account"]:
        config["service_account_name"] = values["service_account"]
    _echo(register_stack(values, "kubernetes", config))


@register_group.command(name="kubeflow")
@_with_options(
    _stack_name("laser-kubeflow"),
    _option(
        "--kubeflow-host",
        "LASER_KUBEFLOW_HOST",
        "Kubeflow Pipelines API URL, e.g. https://kubeflow.example.com/pipeline (needed for multi-tenant "
        "Kubeflow; unset = reach KFP through the kube context)",
    ),
    _kube_context("kubeconfig context of the cluster (needed when --kubeflow-host is unset, and for kaniko)"),
    _option(
        "--kubeflow-namespace",
        "LASER_KUBEFLOW_NAMESPACE",
        "namespace Kubeflow Pipelines is deployed in",
        default="kubeflow",
        callback=_namespace,
    ),
    _option(
        "--user-namespace",
        "LASER_KUBEFLOW_USER_NAMESPACE",
        "Kubeflow profile namespace runs are created in (multi-tenant Kubeflow); unset = KFP's default",
        callback=_namespace,
    ),
)
@click.pass_context
def register_kubeflow(ctx: click.Context, **values: Any) -> None:
    """The Kubeflow Pipelines stack (default name laser-kubeflow): a KFP run (infra/kubeflow/README.md)."""
    require(
        ctx,
        (
            ("kubeflow_host", "kube_context"),
            "the Kubeflow Pipelines API URL, or the kube context whose API proxy reaches KFP",
        ),
    )
    config: dict[str, Any] = {"kubeflow_namespace": values["kubeflow_namespace"]}
    for key, param in (
        ("kubeflow_hostname", "kubeflow_host"),
        ("kubernetes_context", "kube_context"),
        ("user_namespace", "user_namespace"),
    ):
        if values[param]:
            config[key] = values[param]
    _echo(register_stack(values, "kubeflow", config))


def register(cli: click.Group) -> None:
    """Add ``stack register kubernetes|kubeflow`` to the ``laser`` command group."""
    cli.add_command(stack_group)
