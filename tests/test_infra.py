"""The cluster stacks (`laser stack register kubernetes|kubeflow`, laser_cli/stack.py) and their run settings
(pipelines/settings.py).

Registration runs the real command in-process against the session's isolated ZenML store (tests/conftest.py), with
fake but well-formed values: nothing here reaches a cluster. It needs ZenML only (ZenML registers every
integration's flavors, installed or not), so these tests run without the `kubernetes`/`kubeflow` extras; where an
extra is missing they pass --no-requirements-check, and where it is installed they go through the check.
Compiling the pipeline on a registered stack imports the orchestrator's client: those tests skip, naming the extra,
where it is missing.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from click.testing import CliRunner

from laser_cli.main import cli
from laser_cli.stack import EXTRAS, REGISTER_MODULES, missing_modules, register_group

REPO = Path(__file__).resolve().parents[1]

K8S_ENV = {
    "LASER_KUBE_CONTEXT": "test-cluster",
    "LASER_ARTIFACT_STORE_PATH": "s3://laser-test-bucket/zenml",
    "LASER_CONTAINER_REGISTRY_URI": "registry.example.com/laser",
}
KUBEFLOW_ENV = {
    "LASER_KUBEFLOW_HOST": "https://kubeflow.example.com/pipeline",
    "LASER_KUBE_CONTEXT": "test-cluster",
    "LASER_ARTIFACT_STORE_PATH": "gs://laser-test-bucket/zenml",
    "LASER_CONTAINER_REGISTRY_URI": "europe-docker.pkg.dev/test-project/laser",
    "LASER_IMAGE_BUILDER": "kaniko",
}
STACK_VARS = sorted({p.envvar for cmd in register_group.commands.values() for p in cmd.params if p.envvar})
STATUS = re.compile(r"^(created|updated|unchanged)(, active)? +(\S+)$")


def _require_extra(extra: str, register_only: bool = False) -> None:
    """Skip unless the extra's modules (or, ``register_only``, those ZenML needs to register its orchestrator) are
    installed; `make test` installs the kubernetes extra, which is all a kubeflow registration needs."""
    for module in REGISTER_MODULES[extra] if register_only else EXTRAS[extra][0]:
        needs = (
            f"registering a {extra} stack needs {module}: pip install -e .[kubernetes]"
            if register_only
            else f"the `{extra}` extra is not installed ({module} is missing): pip install -e .[{extra}]"
        )
        pytest.importorskip(module, reason=f"{needs} (see infra/{extra}/README.md)")


@pytest.fixture
def clean_env(zenml_store, monkeypatch):
    """No LASER_* stack variable from the outside: each test passes its own."""
    for var in STACK_VARS:
        monkeypatch.delenv(var, raising=False)


def _invoke(kind: str, args: list[str], env: dict[str, str], check: bool = True):
    """``laser stack register KIND ARGS`` with ``env``; ``check``: skip --no-requirements-check where the extra is
    installed (so the check itself runs there)."""
    flag = ["--no-requirements-check"] if check and missing_modules(kind) else []
    return CliRunner().invoke(cli, ["stack", "register", kind, *flag, *args], env=env)


def _register(kind: str, args: list[str], env: dict[str, str]) -> dict[str, str]:
    """Register; the statuses printed (component or stack name -> created/updated/unchanged[, active])."""
    result = _invoke(kind, args, env)
    assert result.exit_code == 0, result.output
    found = [STATUS.match(line) for line in result.stdout.splitlines()]
    return {m[3]: m[1] + (m[2] or "") for m in found if m}


def _components(stack_name: str) -> dict[str, object]:
    from zenml.client import Client

    stack = Client().get_stack(stack_name, allow_name_prefix_match=False)
    return {ctype.value: comps[0] for ctype, comps in stack.components.items()}


def _flavors(components: dict) -> dict[str, str]:
    return {ctype: c.flavor_name for ctype, c in components.items()}


def _no_stack(name: str) -> bool:
    from zenml.client import Client

    client = Client()
    return not client.list_stacks(name=name).items and not client.list_stack_components(name=f"{name}-registry").items


def test_kubernetes_stack_registers_idempotently(clean_env):
    from zenml.client import Client

    env = {**K8S_ENV, "LASER_STACK_NAME": "laser-k8s-test"}
    first = _register("kubernetes", [], env)
    assert set(first.values()) == {"created"} and len(first) == 5
    comps = _components("laser-k8s-test")
    assert _flavors(comps) == {
        "orchestrator": "kubernetes",
        "artifact_store": "s3",
        "container_registry": "default",
        "image_builder": "local",
    }
    assert comps["orchestrator"].name == "laser-k8s-test-orchestrator"
    assert comps["orchestrator"].configuration["kubernetes_context"] == "test-cluster"
    assert comps["orchestrator"].configuration["kubernetes_namespace"] == "zenml"  # the documented default
    assert "service_account_name" not in comps["orchestrator"].configuration
    assert comps["artifact_store"].configuration["path"] == "s3://laser-test-bucket/zenml"
    assert comps["container_registry"].configuration["uri"] == "registry.example.com/laser"
    assert Client().active_stack_model.name == "default"  # not activated

    again = _register("kubernetes", [], env)
    assert set(again.values()) == {"unchanged"}
    assert {k: c.id for k, c in _components("laser-k8s-test").items()} == {k: c.id for k, c in comps.items()}

    # a changed value updates that component in place; a flag beats the environment variable
    changed = _register(
        "kubernetes",
        ["--namespace", "laser-runs", "--s3-endpoint-url", "http://minio.local:9000"],
        {**env, "LASER_K8S_NAMESPACE": "from-env", "LASER_K8S_SERVICE_ACCOUNT": "laser-sa"},
    )
    assert changed == {
        "laser-k8s-test-orchestrator": "updated",
        "laser-k8s-test-artifact-store": "updated",
        "laser-k8s-test-registry": "unchanged",
        "laser-k8s-test-image-builder": "unchanged",
        "laser-k8s-test": "unchanged",
    }
    comps2 = _components("laser-k8s-test")
    assert comps2["orchestrator"].id == comps["orchestrator"].id
    assert comps2["orchestrator"].configuration["kubernetes_namespace"] == "laser-runs"
    assert comps2["orchestrator"].configuration["service_account_name"] == "laser-sa"
    assert comps2["artifact_store"].configuration["client_kwargs"] == {"endpoint_url": "http://minio.local:9000"}


def test_kubeflow_stack_registers_idempotently(clean_env):
    _require_extra("kubeflow", register_only=True)
    from zenml.client import Client

    env = {**KUBEFLOW_ENV, "LASER_STACK_NAME": "laser-kubeflow-test"}
    first = _register("kubeflow", ["--user-namespace", "laser-team"], env)
    assert set(first.values()) == {"created"}
    comps = _components("laser-kubeflow-test")
    assert _flavors(comps) == {
        "orchestrator": "kubeflow",
        "artifact_store": "gcp",
        "container_registry": "default",
        "image_builder": "kaniko",
    }
    orch = comps["orchestrator"].configuration
    assert orch["kubeflow_hostname"] == "https://kubeflow.example.com/pipeline"
    assert orch["kubernetes_context"] == "test-cluster" and orch["kubeflow_namespace"] == "kubeflow"
    assert orch["user_namespace"] == "laser-team"
    assert comps["image_builder"].configuration["kubernetes_context"] == "test-cluster"
    assert comps["image_builder"].configuration["kubernetes_namespace"] == "zenml-kaniko"
    assert comps["artifact_store"].configuration["path"] == "gs://laser-test-bucket/zenml"
    try:
        again = _register("kubeflow", ["--activate"], {**env, "LASER_KUBEFLOW_USER_NAMESPACE": "laser-team"})
        assert again["laser-kubeflow-test"] == "unchanged, active"
        assert set(again.values()) - {"unchanged, active"} == {"unchanged"}
        assert Client().active_stack_model.name == "laser-kubeflow-test"
    finally:
        Client().activate_stack("default")


def test_missing_settings_are_named_together(clean_env):
    result = _invoke("kubernetes", ["--stack-name", "laser-miss"], {})
    assert result.exit_code == 2 and "Traceback" not in result.output
    for var, flag in (
        ("LASER_KUBE_CONTEXT", "--kube-context"),
        ("LASER_ARTIFACT_STORE_PATH", "--artifact-store-path"),
        ("LASER_CONTAINER_REGISTRY_URI", "--registry-uri"),
    ):
        assert f"{var} (or {flag})" in result.stderr
    assert _no_stack("laser-miss")

    env = {k: v for k, v in KUBEFLOW_ENV.items() if k not in ("LASER_KUBEFLOW_HOST", "LASER_KUBE_CONTEXT")}
    result = _invoke("kubeflow", [], {**env, "LASER_IMAGE_BUILDER": "local"})
    assert result.exit_code == 2
    assert "LASER_KUBEFLOW_HOST (or --kubeflow-host) or LASER_KUBE_CONTEXT (or --kube-context)" in result.stderr
    result = _invoke("kubeflow", ["--kubeflow-host", "https://kfp.example.com"], env)  # kaniko needs a context
    assert result.exit_code == 2
    assert "LASER_KUBE_CONTEXT (or --kube-context): the kaniko image builder" in result.stderr


def test_bad_values_give_clear_errors(clean_env):
    result = _invoke("kubernetes", ["--artifact-store-path", "/tmp/artifacts"], K8S_ENV)
    assert result.exit_code == 2 and "'--artifact-store-path'" in result.stderr and "s3://" in result.stderr
    result = _invoke("kubernetes", [], {**K8S_ENV, "LASER_IMAGE_BUILDER": "buildah"})
    assert result.exit_code == 2 and "LASER_IMAGE_BUILDER" in result.stderr and "'buildah'" in result.stderr
    # a component name taken by another flavor is reported, not silently replaced
    env = {**K8S_ENV, "LASER_STACK_NAME": "laser-flip"}
    _register("kubernetes", [], env)
    result = _invoke("kubernetes", ["--artifact-store-path", "gs://other/zenml"], env)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "flavor 's3', not 'gcp'" in result.stderr
    assert _components("laser-flip")["artifact_store"].configuration["path"] == "s3://laser-test-bucket/zenml"


@pytest.mark.parametrize("kind", ["kubernetes", "kubeflow"])
def test_missing_extra_is_reported(clean_env, monkeypatch, kind):
    """Without the orchestrator's client (blocked here, so the test is the same where the extra is installed) the
    command stops before touching the store and names the extra; --no-requirements-check registers anyway."""
    env = {**(K8S_ENV if kind == "kubernetes" else KUBEFLOW_ENV), "LASER_STACK_NAME": f"laser-noextra-{kind}"}
    with monkeypatch.context() as blocked:
        for module in EXTRAS[kind][0]:
            blocked.setitem(sys.modules, module, None)
        result = _invoke(kind, [], env, check=False)
        assert result.exit_code == 2 and "Traceback" not in result.output
        assert f"-e '.[{kind}]'" in result.stderr and "--no-requirements-check" in result.stderr
        if kind == "kubeflow":  # ZenML cannot validate a kubeflow orchestrator without the kubernetes client
            result = _invoke(kind, ["--no-requirements-check"], env, check=False)
            assert result.exit_code == 2 and "validates its configuration" in result.stderr
            assert "-e '.[kubernetes]'" in result.stderr
        assert _no_stack(f"laser-noextra-{kind}")
    _require_extra(kind, register_only=True)
    assert set(_register(kind, ["--no-requirements-check"], env).values()) == {"created"}


def test_help_needs_neither_zenml_nor_the_extras():
    code = """
import sys, time
for name in ("kubernetes", "kfp", "kfp.kubernetes"):
    sys.modules[name] = None                      # as if the extras were not installed
start = time.perf_counter()
from laser_cli.main import cli
for args in (["--help"], ["stack", "register", "kubeflow", "--help"], ["stack", "register", "kubernetes", "--help"]):
    try:
        cli(args, prog_name="laser")
    except SystemExit as exc:
        assert exc.code == 0, (args, exc.code)
assert "zenml" not in sys.modules
print(f"help in {time.perf_counter() - start:.2f} s")
"""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "stack  " in out.stdout and "LASER_KUBEFLOW_HOST" in out.stdout and "LASER_K8S_NAMESPACE" in out.stdout


# --- pipelines/settings.py -------------------------------------------------------------------------------


def test_docker_settings_pin_the_lock_files():
    from pipelines.settings import IMAGE_ENVIRONMENT, InfraConfig, docker_settings

    docker = docker_settings(stack_kind="local-docker")
    assert Path(docker.requirements) == REPO / "requirements.lock" and Path(docker.requirements).is_file()
    assert docker.environment["ZENML_ANALYTICS_OPT_IN"] == "false" and docker.environment["HF_HUB_OFFLINE"] == "1"
    assert docker.environment == IMAGE_ENVIRONMENT and docker.parent_image is None
    assert docker.disable_automatic_requirements_detection and docker.install_stack_requirements
    for kind in ("kubernetes", "kubeflow"):
        path = Path(docker_settings(stack_kind=kind).requirements)
        assert path == REPO / "infra" / kind / f"requirements-{kind}.lock" and path.is_file()
    custom = docker_settings(
        InfraConfig(parent_image="nvcr.io/nvidia/pytorch:25.01-py3", environment={"LASER_CACHE_DIR": "/opt/laser"})
    )
    assert custom.parent_image == "nvcr.io/nvidia/pytorch:25.01-py3"
    assert custom.environment["LASER_CACHE_DIR"] == "/opt/laser" and custom.environment["HF_HUB_OFFLINE"] == "1"
    with pytest.raises(FileNotFoundError, match="nope.lock"):
        docker_settings(InfraConfig(requirements="nope.lock"))


def _pins(path: Path) -> dict[str, str]:
    lines = [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    return {ln.split("==")[0].lower().replace("_", "-"): ln.split("==")[1] for ln in lines}


def test_extra_lock_files_extend_requirements_lock():
    """Each stack's lock = requirements.lock + the extra (kubeflow: protobuf 6, as kfp needs); catches drift."""
    import tomllib

    base = _pins(REPO / "requirements.lock")
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for kind, overrides in (("kubernetes", set()), ("kubeflow", {"protobuf"})):
        lock = _pins(REPO / "infra" / kind / f"requirements-{kind}.lock")
        assert {k: v for k, v in base.items() if k not in overrides} == {
            k: v for k, v in lock.items() if k in base and k not in overrides
        }
        assert set(base) <= set(lock)
        for req in extras[kind]:
            name, version = req.split("==")
            assert lock[name.lower()] == version, (kind, req)
    assert _pins(REPO / "infra" / "kubeflow" / "requirements-kubeflow.lock")["protobuf"].startswith("6.")


def test_gpu_count_lands_in_resource_settings():
    from zenml.config import ResourceSettings

    from pipelines.settings import DEFAULT_GPU_STEPS, InfraConfig, bitune_step_settings, settings_for_config

    assert bitune_step_settings(0, "kubernetes") == {}
    local = bitune_step_settings(2, "local")
    assert set(local) == {"resources"} and isinstance(local["resources"], ResourceSettings)
    assert local["resources"].gpu_count == 2
    # the embedded default without GPUs: nothing changes (same configuration, same cache keys)
    assert settings_for_config({}, "local") == {}
    options = settings_for_config({"gpus": 1}, "local")
    assert set(options) == {"steps"} and set(options["steps"]) == set(DEFAULT_GPU_STEPS)
    assert options["steps"]["bi_tune_stage2"]["settings"]["resources"].gpu_count == 1
    assert set(settings_for_config({"gpus": 1}, "local", gpu_steps=["batch_recommend"])["steps"]) == {"batch_recommend"}
    from steps.laser import bi_tune_stage1, bi_tune_stage2, evaluate_laser

    assert set(DEFAULT_GPU_STEPS) == {s.name for s in (bi_tune_stage1, bi_tune_stage2, evaluate_laser)}
    with pytest.raises(ValueError, match="gpu"):
        InfraConfig.model_validate({"gpu": 1})  # typo'd keys are rejected
    from pipelines.settings import detect_stack_kind

    assert detect_stack_kind() == "local"  # the isolated store's default stack


INFRA = {
    "gpus": 2,
    "node_selector": {"nvidia.com/gpu.present": "true"},
    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
}


def test_kubernetes_gpu_pod_settings():
    pytest.importorskip(
        "kubernetes",
        reason="the `kubernetes` extra is not installed (kubernetes is missing): pip install -e .[kubernetes]",
    )
    from zenml.config.pipeline_run_configuration import PipelineRunConfiguration
    from zenml.integrations.kubernetes.flavors import KubernetesOrchestratorSettings

    from pipelines.settings import settings_for_config

    options = settings_for_config(INFRA, "kubernetes")
    assert Path(options["settings"]["docker"].requirements).name == "requirements-kubernetes.lock"
    step = options["steps"]["bi_tune_stage1"]["settings"]
    assert step["resources"].gpu_count == 2
    # as ZenML carries it into the run (dumped without defaults, validated again; see also the compile test)
    dumped = step["orchestrator.kubernetes"].model_dump(exclude_unset=True)
    pod = KubernetesOrchestratorSettings.model_validate(dumped).pod_settings
    assert pod.resources == {"requests": {"nvidia.com/gpu": "2"}, "limits": {"nvidia.com/gpu": "2"}}
    assert pod.node_selectors == {"nvidia.com/gpu.present": "true"}
    assert pod.tolerations == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    PipelineRunConfiguration.model_validate(options)  # the shape with_options(**options) accepts


def test_kubeflow_gpu_settings_warn():
    from pipelines.settings import settings_for_config

    with pytest.warns(UserWarning, match="Kubeflow orchestrator drops step pod settings"):
        options = settings_for_config(INFRA, "kubeflow")
    assert Path(options["settings"]["docker"].requirements).name == "requirements-kubeflow.lock"
    assert set(options["steps"]["evaluate_laser"]["settings"]) == {"resources"}
    assert options["steps"]["evaluate_laser"]["settings"]["resources"].gpu_count == 2


@pytest.mark.parametrize("kind", ["kubernetes", "kubeflow"])
def test_settings_survive_compilation(clean_env, kind):
    """Compile (no run) the training pipeline on a registered cluster stack, as `laser run` would there."""
    _require_extra(kind)
    from zenml.client import Client
    from zenml.config.compiler import Compiler
    from zenml.config.pipeline_run_configuration import PipelineRunConfiguration
    from zenml.enums import StackComponentType
    from zenml.stack import Stack

    from laser_core.config import data_fingerprint, load_config
    from pipelines.settings import settings_for_config
    from pipelines.training import training_pipeline

    name = f"laser-{kind}-compile"
    _register(kind, [], {**(K8S_ENV if kind == "kubernetes" else KUBEFLOW_ENV), "LASER_STACK_NAME": name})
    # the bucket's integration (s3fs/gcsfs) is not needed to compile: use the local artifact store
    Client().update_stack(name, component_updates={StackComponentType.ARTIFACT_STORE: "default"})
    stack = Stack.from_model(Client().get_stack(name))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the Kubeflow GPU warning (test_kubeflow_gpu_settings_warn)
        options = settings_for_config(INFRA, kind)
    pipe = training_pipeline.with_options(settings=options["settings"])
    cfg = load_config(REPO / "configs" / "demo.yaml")
    pipe.prepare(
        dataset=cfg.dataset.model_dump(),
        validation=cfg.validation.model_dump(),
        data_fingerprint=data_fingerprint(cfg.dataset),
        sr_model=cfg.sr.model_dump(),
        sr_train=cfg.sr_train.model_dump(),
        laser=cfg.laser_spec().model_dump(),
        laser_train=cfg.laser_train.model_dump(),
        stop_after="laser",
    )
    run_config = PipelineRunConfiguration.model_validate({"steps": options["steps"]})  # = with_options(steps=...)
    snapshot = Compiler().compile(pipeline=pipe, stack=stack, run_configuration=run_config)
    docker = snapshot.pipeline_configuration.settings["docker"]
    assert Path(docker.requirements).name == f"requirements-{kind}.lock"
    steps = snapshot.step_configurations
    assert steps["bi_tune_stage1"].config.resource_settings.gpu_count == 2
    assert steps["pretrain_sr"].config.resource_settings.gpu_count is None
    if kind == "kubernetes":
        pod = stack.orchestrator.get_settings(steps["bi_tune_stage2"]).pod_settings
        assert pod.resources["limits"] == {"nvidia.com/gpu": "2"}
        assert pod.node_selectors == INFRA["node_selector"] and pod.tolerations == INFRA["tolerations"]
        assert stack.orchestrator.get_settings(steps["split_dataset"]).pod_settings is None
