"""The cluster stacks (infra/kubernetes, infra/kubeflow) and their run settings (pipelines/settings.py).

Registration runs in-process against the session's isolated ZenML store (tests/conftest.py), with fake but
well-formed values: nothing here reaches a cluster. The registration tests skip, naming the extra, where the
orchestrator's Python requirements are not installed; the missing-extra message is checked where they are not.
"""

from __future__ import annotations

import importlib.util
import sys
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
K8S_MODULE = "laser_infra_kubernetes_register_stack"   # the name infra/kubeflow/register_stack.py loads it under

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
EXTRA_MODULES = {"kubernetes": ("kubernetes",), "kubeflow": ("kfp", "kfp.kubernetes", "kubernetes")}


def _load(kind: str):
    name = K8S_MODULE if kind == "kubernetes" else "laser_infra_kubeflow_register_stack"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "infra" / kind / "register_stack.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def _require_extra(extra: str) -> None:
    for module in EXTRA_MODULES[extra]:
        pytest.importorskip(module, reason=f"the `{extra}` extra is not installed ({module} is missing): "
                                           f"pip install -e .[{extra}] (see infra/{extra}/README.md)")


def _components(stack_name: str) -> dict[str, object]:
    from zenml.client import Client

    stack = Client().get_stack(stack_name, allow_name_prefix_match=False)
    return {ctype.value: comps[0] for ctype, comps in stack.components.items()}


def _flavors(components: dict) -> dict[str, str]:
    return {ctype: c.flavor_name for ctype, c in components.items()}


def test_kubernetes_stack_registers_idempotently(zenml_store):
    _require_extra("kubernetes")
    from zenml.client import Client

    mod = _load("kubernetes")
    env = {**K8S_ENV, "LASER_STACK_NAME": "laser-k8s-test"}
    first = mod.register([], env)
    assert set(first.statuses.values()) == {"created"} and len(first.statuses) == 5
    comps = _components("laser-k8s-test")
    assert _flavors(comps) == {"orchestrator": "kubernetes", "artifact_store": "s3",
                               "container_registry": "default", "image_builder": "local"}
    assert comps["orchestrator"].name == "laser-k8s-test-orchestrator"
    assert comps["orchestrator"].configuration["kubernetes_context"] == "test-cluster"
    assert comps["orchestrator"].configuration["kubernetes_namespace"] == "zenml"     # the documented default
    assert comps["artifact_store"].configuration["path"] == "s3://laser-test-bucket/zenml"
    assert comps["container_registry"].configuration["uri"] == "registry.example.com/laser"
    assert Client().active_stack_model.name == "default"                              # not activated

    again = mod.register([], env)
    assert set(again.statuses.values()) == {"unchanged"}
    assert {k: c.id for k, c in _components("laser-k8s-test").items()} == {k: c.id for k, c in comps.items()}

    # a changed value updates that component in place; a flag beats the environment variable
    changed = mod.register(["--namespace", "laser-runs", "--s3-endpoint-url", "http://minio.local:9000"], env)
    assert changed.statuses == {"laser-k8s-test-orchestrator": "updated", "laser-k8s-test-artifact-store": "updated",
                                "laser-k8s-test-registry": "unchanged", "laser-k8s-test-image-builder": "unchanged",
                                "laser-k8s-test": "unchanged"}
    comps2 = _components("laser-k8s-test")
    assert comps2["orchestrator"].id == comps["orchestrator"].id
    assert comps2["orchestrator"].configuration["kubernetes_namespace"] == "laser-runs"
    assert comps2["artifact_store"].configuration["client_kwargs"] == {"endpoint_url": "http://minio.local:9000"}


def test_kubeflow_stack_registers_idempotently(zenml_store):
    _require_extra("kubeflow")
    mod = _load("kubeflow")
    env = {**KUBEFLOW_ENV, "LASER_STACK_NAME": "laser-kubeflow-test"}
    first = mod.register(["--user-namespace", "laser-team"], env)
    assert set(first.statuses.values()) == {"created"}
    comps = _components("laser-kubeflow-test")
    assert _flavors(comps) == {"orchestrator": "kubeflow", "artifact_store": "gcp",
                               "container_registry": "default", "image_builder": "kaniko"}
    orch = comps["orchestrator"].configuration
    assert orch["kubeflow_hostname"] == "https://kubeflow.example.com/pipeline"
    assert orch["kubernetes_context"] == "test-cluster" and orch["kubeflow_namespace"] == "kubeflow"
    assert orch["user_namespace"] == "laser-team"
    assert comps["image_builder"].configuration["kubernetes_context"] == "test-cluster"
    assert comps["image_builder"].configuration["kubernetes_namespace"] == "zenml-kaniko"
    assert comps["artifact_store"].configuration["path"] == "gs://laser-test-bucket/zenml"
    assert set(mod.register(["--user-namespace", "laser-team"], env).statuses.values()) == {"unchanged"}


def test_missing_variable_names_it(zenml_store, monkeypatch, capsys):
    from zenml.client import Client

    k8s = _load("kubernetes")
    env = {k: v for k, v in K8S_ENV.items() if k != "LASER_ARTIFACT_STORE_PATH"} | {"LASER_STACK_NAME": "laser-miss"}
    with pytest.raises(k8s.MissingSettingError, match="LASER_ARTIFACT_STORE_PATH") as err:
        k8s.register([], env)
    assert "--artifact-store-path" in str(err.value)
    # the command line: exit status 2 and the message on stderr, with nothing registered
    for var in ("LASER_KUBE_CONTEXT", "LASER_ARTIFACT_STORE_PATH", "LASER_CONTAINER_REGISTRY_URI"):
        monkeypatch.delenv(var, raising=False)
    assert k8s.main(["--stack-name", "laser-miss"]) == 2
    message = capsys.readouterr().err
    assert all(v in message for v in ("LASER_KUBE_CONTEXT", "LASER_ARTIFACT_STORE_PATH",
                                      "LASER_CONTAINER_REGISTRY_URI"))
    assert not Client().list_stacks(name="laser-miss").items

    kubeflow = _load("kubeflow")
    env = {k: v for k, v in KUBEFLOW_ENV.items() if k not in ("LASER_KUBEFLOW_HOST", "LASER_KUBE_CONTEXT")}
    with pytest.raises(kubeflow.MissingSettingError, match="LASER_KUBEFLOW_HOST or LASER_KUBE_CONTEXT"):
        kubeflow.register([], {**env, "LASER_IMAGE_BUILDER": "local"})
    with pytest.raises(kubeflow.MissingSettingError, match="LASER_KUBE_CONTEXT"):      # kaniko needs a context
        kubeflow.register(["--kubeflow-host", "https://kfp.example.com"], env)


def test_bad_values_give_clear_errors(zenml_store):
    k8s = _load("kubernetes")
    with pytest.raises(k8s.RegistrationError, match="s3://"):
        k8s.register(["--no-requirements-check", "--artifact-store-path", "/tmp/artifacts"], K8S_ENV)
    with pytest.raises(SystemExit):      # argparse rejects an unknown image builder
        k8s.register(["--image-builder", "buildah"], K8S_ENV)
    with pytest.raises(k8s.RegistrationError, match="not one of"):
        k8s.register([], {**K8S_ENV, "LASER_IMAGE_BUILDER": "buildah"})
    # a component name taken by another flavor is reported, not silently replaced
    env = {**K8S_ENV, "LASER_STACK_NAME": "laser-flip"}
    k8s.register(["--no-requirements-check"], env)
    with pytest.raises(k8s.RegistrationError, match="flavor 's3', not 'gcp'"):
        k8s.register(["--no-requirements-check", "--artifact-store-path", "gs://other/zenml"], env)


@pytest.mark.parametrize("kind", ["kubernetes", "kubeflow"])
def test_missing_extra_is_reported(zenml_store, kind):
    if all(_installed(m) for m in EXTRA_MODULES[kind]):
        pytest.skip(f"the `{kind}` extra is installed here; the missing-extra message is checked where it is not")
    mod = _load(kind)
    env = K8S_ENV if kind == "kubernetes" else KUBEFLOW_ENV
    with pytest.raises(mod.MissingExtraError, match=rf"\.\[{kind}\]"):
        mod.register([], {**env, "LASER_STACK_NAME": f"laser-noextra-{kind}"})


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
    custom = docker_settings(InfraConfig(parent_image="nvcr.io/nvidia/pytorch:25.01-py3",
                                         environment={"LASER_CACHE_DIR": "/opt/laser"}))
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
        assert {k: v for k, v in base.items() if k not in overrides} == \
               {k: v for k, v in lock.items() if k in base and k not in overrides}
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
        InfraConfig.model_validate({"gpu": 1})            # typo'd keys are rejected
    from pipelines.settings import detect_stack_kind

    assert detect_stack_kind() == "local"                 # the isolated store's default stack


INFRA = {"gpus": 2, "node_selector": {"nvidia.com/gpu.present": "true"},
         "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]}


def test_kubernetes_gpu_pod_settings():
    pytest.importorskip("kubernetes", reason="the `kubernetes` extra is not installed (kubernetes is missing): "
                                             "pip install -e .[kubernetes]")
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
    PipelineRunConfiguration.model_validate(options)     # the shape with_options(**options) accepts


def test_kubeflow_gpu_settings_warn():
    from pipelines.settings import settings_for_config

    with pytest.warns(UserWarning, match="Kubeflow orchestrator drops step pod settings"):
        options = settings_for_config(INFRA, "kubeflow")
    assert Path(options["settings"]["docker"].requirements).name == "requirements-kubeflow.lock"
    assert set(options["steps"]["evaluate_laser"]["settings"]) == {"resources"}
    assert options["steps"]["evaluate_laser"]["settings"]["resources"].gpu_count == 2


@pytest.mark.parametrize("kind", ["kubernetes", "kubeflow"])
def test_settings_survive_compilation(zenml_store, kind):
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
    env = {**(K8S_ENV if kind == "kubernetes" else KUBEFLOW_ENV), "LASER_STACK_NAME": name}
    _load(kind).register([], env)
    # the bucket's integration (s3fs/gcsfs) is not needed to compile: use the local artifact store
    Client().update_stack(name, component_updates={StackComponentType.ARTIFACT_STORE: "default"})
    stack = Stack.from_model(Client().get_stack(name))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")      # the Kubeflow GPU warning (test_kubeflow_gpu_settings_warn)
        options = settings_for_config(INFRA, kind)
    pipe = training_pipeline.with_options(settings=options["settings"])
    cfg = load_config(REPO / "configs" / "demo.yaml")
    pipe.prepare(dataset=cfg.dataset.model_dump(), validation=cfg.validation.model_dump(),
                 data_fingerprint=data_fingerprint(cfg.dataset), sr_model=cfg.sr.model_dump(),
                 sr_train=cfg.sr_train.model_dump(), laser=cfg.laser_spec().model_dump(),
                 laser_train=cfg.laser_train.model_dump(), stop_after="laser")
    run_config = PipelineRunConfiguration.model_validate({"steps": options["steps"]})   # = with_options(steps=...)
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

