"""k8s/: `kubectl kustomize` (kustomize built into kubectl 1.32, offline) of the base and the GPU
overlay, every object validated like the chart's."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

try:
    from tests.conftest_kube import REPO_ROOT, load_documents, pod_specs, require_tools, validation_errors
except ImportError:  # tests/ is not a package: pytest puts tests/ itself on sys.path
    from conftest_kube import REPO_ROOT, load_documents, pod_specs, require_tools, validation_errors

from workflows import kube

pytestmark = pytest.mark.slow  # needs kubectl from tools/get-helm.sh

K8S = REPO_ROOT / "k8s"
KUSTOMIZATIONS = ["base", "overlays/gpu"]


def build(directory: str) -> list[dict[str, Any]]:
    kubectl = require_tools() / "kubectl"
    result = subprocess.run(
        [str(kubectl), "kustomize", str(K8S / directory)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    return load_documents(result.stdout)


def only(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (match,) = [o for o in objects if o["kind"] == kind]
    return match


@pytest.mark.parametrize("directory", KUSTOMIZATIONS)
def test_kustomize_output_matches_kubernetes_and_kuberay_schemas(directory: str) -> None:
    objects = build(directory)
    assert {o["kind"] for o in objects} == {
        "ConfigMap", "Deployment", "Service", "PersistentVolumeClaim", "StatefulSet",
        "RayJob", "CronJob", "ServiceAccount", "Role", "RoleBinding",
    }  # fmt: skip
    assert validation_errors(objects) == []


@pytest.mark.parametrize("directory", KUSTOMIZATIONS)
def test_kustomize_pods_run_as_non_root_without_literal_secrets(directory: str) -> None:
    for obj in build(directory):
        for where, pod in pod_specs(obj):
            assert pod["securityContext"]["runAsNonRoot"] is True, where
            for container in pod["containers"]:
                for env in container.get("env", []):
                    if "PASSWORD" in env["name"]:
                        assert "valueFrom" in env, f"{where}: {env['name']}"
    assert "Secret" not in {o["kind"] for o in build(directory)}


def test_base_wires_pipeline_configmap_mlflow_and_rbac() -> None:
    objects = build("base")
    assert {o["metadata"].get("namespace") for o in objects} == {"secvec"}
    configmap = only(objects, "ConfigMap")
    assert configmap["metadata"]["name"] == "secvec-pipeline"  # no hash suffix: the RayJob refers to it
    assert isinstance(yaml.safe_load(configmap["data"]["pipeline.yaml"]), dict)
    rayjob = only(objects, "RayJob")
    assert rayjob["spec"]["entrypoint"] == "secvec run /config/pipeline.yaml"
    for _, pod in pod_specs(rayjob):
        assert {"name": "pipeline-config", "configMap": {"name": "secvec-pipeline"}} in pod["volumes"]
    mlflow = only(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]["command"]
    allowed = mlflow[mlflow.index("--allowed-hosts") + 1].split(",")
    assert {"secvec-mlflow", "secvec-mlflow:*", "secvec-mlflow.*"} <= set(allowed)
    assert only(objects, "Role")["rules"] == [
        {"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": ["create", "get", "list", "watch"]}
    ]
    binding = only(objects, "RoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "secvec-submitter", "namespace": "secvec"}]


def _submit_arguments(objects: list[dict[str, Any]]) -> list[str]:
    cronjob = only(objects, "CronJob")
    command = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[:4] == ["secvec", "submit", "/config/pipeline.yaml", "--in-cluster"]
    return command[4:]


def test_gpu_overlay_places_gpu_workers_on_gpu_nodes() -> None:
    objects = build("overlays/gpu")
    (group,) = only(objects, "RayJob")["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 2
    pod = group["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["containers"][0]["image"] == "secvec:0.1.0-gpu"
    arguments = _submit_arguments(objects)
    assert arguments[arguments.index("--gpus-per-worker") + 1] == "1"


@pytest.mark.parametrize("directory", KUSTOMIZATIONS)
def test_cronjob_submit_flags_render_a_valid_rayjob(directory: str, tmp_path: Path) -> None:
    """Run the CronJob's own `secvec render` equivalent of its `secvec submit` flags and validate it."""
    import typer
    from typer.testing import CliRunner

    from workflows import cli_kube

    objects = build(directory)
    spec = tmp_path / "pipeline.yaml"
    spec.write_text(only(objects, "ConfigMap")["data"]["pipeline.yaml"])
    arguments = [a.replace("$(POD_NAMESPACE)", "secvec") for a in _submit_arguments(objects)]
    app = typer.Typer()
    cli_kube.register(app)
    result = CliRunner().invoke(app, ["render", str(spec), *arguments])
    assert result.exit_code == 0, result.output
    rayjob = yaml.safe_load(result.stdout)
    assert validation_errors([rayjob]) == []
    base_group = only(objects, "RayJob")["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    (group,) = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert group["replicas"] == base_group["replicas"]
    worker = group["template"]["spec"]
    assert worker.get("nodeSelector") == base_group["template"]["spec"].get("nodeSelector")
    gpus = base_group["template"]["spec"]["containers"][0]["resources"]["limits"].get(kube.GPU_RESOURCE)
    assert worker["containers"][0]["resources"]["limits"].get(kube.GPU_RESOURCE) == gpus
