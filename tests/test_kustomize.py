"""k8s/: `kubectl kustomize` (kustomize built into kubectl 1.32, offline) of the base and the GPU
overlay, every object validated like the chart's."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

try:
    from tests.conftest_kube import (
        REPO_ROOT,
        load_documents,
        pod_specs,
        pss_restricted_violations,
        require_tools,
        validation_errors,
    )
except ImportError:  # tests/ is not a package: pytest puts tests/ itself on sys.path
    from conftest_kube import (
        REPO_ROOT,
        load_documents,
        pod_specs,
        pss_restricted_violations,
        require_tools,
        validation_errors,
    )

from workflows import kube

pytestmark = pytest.mark.slow  # needs kubectl from tools/get-helm.sh

K8S = REPO_ROOT / "k8s"
EXAMPLE_SPEC = REPO_ROOT / "workflows" / "examples" / "cluster-smollm2.yaml"
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
        "RayJob", "CronJob", "ServiceAccount", "Role", "RoleBinding", "NetworkPolicy",
    }  # fmt: skip
    assert validation_errors(objects) == []


@pytest.mark.parametrize("directory", KUSTOMIZATIONS)
def test_kustomize_pods_pass_pod_security_restricted_without_literal_secrets(directory: str) -> None:
    checked = set()
    for obj in build(directory):
        for where, pod in pod_specs(obj):
            assert pss_restricted_violations(pod) == [], where
            checked.add(where)
            for container in pod["containers"]:
                for env in container.get("env", []):
                    if "PASSWORD" in env["name"]:
                        assert "valueFrom" in env, f"{where}: {env['name']}"
    assert "Secret" not in {o["kind"] for o in build(directory)}
    assert "RayJob submitter" in checked  # KubeRay's default submitter pod would be rejected


@pytest.mark.parametrize("directory", KUSTOMIZATIONS)
def test_rayjob_is_locked_down_and_cleans_up_after_itself(directory: str) -> None:
    rayjob = only(build(directory), "RayJob")
    spec = rayjob["spec"]
    assert spec["rayClusterSpec"]["authOptions"] == {"mode": "token"}
    assert spec["preRunningDeadlineSeconds"] > 0 and "shutdownAfterJobFinishes" not in spec
    assert {r["policy"] for r in spec["deletionStrategy"]["deletionRules"]} == {"DeleteCluster", "DeleteSelf"}
    for where, pod in pod_specs(rayjob):
        assert pod["automountServiceAccountToken"] is False, where
        registry = pod["containers"][0]["image"].split("/")[0]
        assert "." in registry, f"{where}: image without a registry host"
    cron = only(build(directory), "CronJob")["spec"]["jobTemplate"]["spec"]
    assert cron["activeDeadlineSeconds"] == 600


def test_base_wires_pipeline_configmap_mlflow_and_rbac() -> None:
    objects = build("base")
    assert {o["metadata"].get("namespace") for o in objects} == {"secvec"}
    configmap = only(objects, "ConfigMap")
    assert configmap["metadata"]["name"] == "secvec-pipeline"  # no hash suffix: the RayJob refers to it
    assert sorted(configmap["data"]) == ["pipeline.yaml", "rayjob-patch.yaml", "rayjob-template.yaml"]
    assert yaml.safe_load(configmap["data"]["rayjob-patch.yaml"]) == []  # the base changes nothing
    rayjob = only(objects, "RayJob")
    assert rayjob["spec"]["entrypoint"] == "secvec run /config/pipeline.yaml"
    for where, pod in pod_specs(rayjob):
        if not where.endswith("submitter"):
            assert {"name": "pipeline-config", "configMap": {"name": "secvec-pipeline"}} in pod["volumes"]
    mlflow = only(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]["command"]
    allowed = mlflow[mlflow.index("--allowed-hosts") + 1].split(",")
    assert {"secvec-mlflow", "secvec-mlflow:*", "secvec-mlflow.*"} <= set(allowed)
    assert only(objects, "Role")["rules"] == [
        {"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": ["create", "get", "list", "watch"]}
    ]
    binding = only(objects, "RoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "secvec-submitter", "namespace": "secvec"}]


def test_base_pipeline_spec_is_the_cluster_smollm2_example() -> None:
    """k8s/base/pipeline.yaml and workflows/examples/cluster-smollm2.yaml never drift apart."""
    example = yaml.safe_load(EXAMPLE_SPEC.read_text())
    assert yaml.safe_load((K8S / "base" / "pipeline.yaml").read_text()) == example
    configmap = only(build("base"), "ConfigMap")
    assert yaml.safe_load(configmap["data"]["pipeline.yaml"]) == example


@pytest.mark.parametrize("directory", KUSTOMIZATIONS)
def test_rayjob_has_the_workers_and_data_volume_the_spec_asks_for(directory: str) -> None:
    objects = build(directory)
    scaling = yaml.safe_load(only(objects, "ConfigMap")["data"]["pipeline.yaml"])["scaling"]
    rayjob = only(objects, "RayJob")
    (group,) = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == scaling["num_workers"]
    requests = group["template"]["spec"]["containers"][0]["resources"]["requests"]
    assert requests[kube.GPU_RESOURCE] == scaling["resources_per_worker"]["GPU"]
    assert float(requests["cpu"]) >= scaling["resources_per_worker"]["CPU"]
    for where, pod in pod_specs(rayjob):
        if where.endswith("submitter"):
            continue
        assert {"name": "pipeline-data", "mountPath": "/data"} in pod["containers"][0]["volumeMounts"], where
        assert {"name": "pipeline-data", "persistentVolumeClaim": {"claimName": "secvec-data"}} in pod["volumes"]


def test_gpu_overlay_places_gpu_workers_on_gpu_nodes() -> None:
    objects = build("overlays/gpu")
    (group,) = only(objects, "RayJob")["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 2
    pod = group["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["containers"][0]["resources"]["requests"]["cpu"] == "8"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["containers"][0]["image"] == "registry.example.com/secvec:0.1.0-gpu"
    base_group = only(build("base"), "RayJob")["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    assert "nodeSelector" not in base_group["template"]["spec"]


@pytest.mark.parametrize("directory", KUSTOMIZATIONS)
def test_cronjob_template_is_the_rayjob(directory: str) -> None:
    """Scheduled runs start from rayjob-template.yaml with rayjob-patch.yaml applied (`secvec submit
    --template-patch`): that must be the RayJob this kustomization applies."""
    objects = build(directory)
    data = only(objects, "ConfigMap")["data"]
    template = kube.patch_template(
        yaml.safe_load(data["rayjob-template.yaml"]), yaml.safe_load(data["rayjob-patch.yaml"])
    )
    assert template["spec"] == only(objects, "RayJob")["spec"]


def test_gpu_overlay_is_a_patch_of_the_base_not_a_copy() -> None:
    """The overlay holds no RayJob of its own: a copy drifts from the base (image, security, clean-up)."""
    for path in (K8S / "overlays" / "gpu").glob("*.yaml"):
        for document in yaml.safe_load_all(path.read_text()):
            assert not (isinstance(document, dict) and document.get("kind") == "RayJob"), path
    base, gpu = (only(build(d), "RayJob")["spec"] for d in KUSTOMIZATIONS)
    assert {k: v for k, v in base.items() if k != "rayClusterSpec"} == {
        k: v for k, v in gpu.items() if k != "rayClusterSpec"
    }
    assert base["rayClusterSpec"]["headGroupSpec"] == gpu["rayClusterSpec"]["headGroupSpec"]


def test_mlflow_waits_for_the_database_and_upgrades_its_schema_before_serving() -> None:
    deployment = only(build("base"), "Deployment")["spec"]
    assert deployment["strategy"] == {"type": "Recreate"}  # no old server on the schema while it migrates
    pod = deployment["template"]["spec"]
    assert [c["name"] for c in pod["initContainers"]] == ["wait-for-db", "db-upgrade"]
    upgrade = pod["initContainers"][1]
    assert upgrade["image"] == pod["containers"][0]["image"]  # the schema of the server that starts next
    assert not any("postgresql" in argument for argument in upgrade["command"])  # the URI only in env


@pytest.mark.parametrize("directory", KUSTOMIZATIONS)
def test_cronjob_submit_renders_a_valid_rayjob(directory: str, tmp_path: Path) -> None:
    """Run the CronJob's own `secvec submit` arguments through `secvec render` and validate the result."""
    import typer
    from typer.testing import CliRunner

    from workflows import cli_kube

    objects = build(directory)
    for key, text in only(objects, "ConfigMap")["data"].items():
        (tmp_path / key).write_text(text)
    command = only(objects, "CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[:5] == ["secvec", "submit", "/config/pipeline.yaml", "--in-cluster", "--namespace"]
    arguments = [a.replace("$(POD_NAMESPACE)", "secvec").replace("/config/", f"{tmp_path}/") for a in command[2:]]
    arguments.remove("--in-cluster")
    app = typer.Typer()
    cli_kube.register(app)
    result = CliRunner().invoke(app, ["render", *arguments])
    assert result.exit_code == 0, result.output
    rayjob = yaml.safe_load(result.stdout)
    assert validation_errors([rayjob]) == []
    (group,) = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    (applied,) = only(objects, "RayJob")["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert group["replicas"] == applied["replicas"]
    worker = group["template"]["spec"]
    assert worker.get("nodeSelector") == applied["template"]["spec"].get("nodeSelector")
    assert worker["containers"][0]["resources"] == applied["template"]["spec"]["containers"][0]["resources"]
    for where, pod in pod_specs(rayjob):
        if not where.endswith("submitter"):
            assert {"name": "pipeline-data", "persistentVolumeClaim": {"claimName": "secvec-data"}} in pod["volumes"]


def test_dockerfile_installs_pinned_dependencies_before_the_source_on_one_cuda_stack() -> None:
    """Layer caching and one CUDA stack (checked on the text: no Docker daemon in the test environment)."""
    lines = [line.strip() for line in (REPO_ROOT / "Dockerfile").read_text().splitlines()]
    copies = [index for index, line in enumerate(lines) if line.startswith("COPY")]
    first_install = next(i for i, line in enumerate(lines) if "pip install" in line and "-c constraints.txt" in line)
    constraints_copy = next(i for i in copies if "constraints.txt" in lines[i])
    source_copies = [i for i in copies if "secvec_core" in lines[i] or "workflows" in lines[i]]
    assert constraints_copy < first_install < min(source_copies)
    assert "--no-deps ." in "\n".join(lines[min(source_copies) :])
    base = next(line for line in lines if line.startswith("FROM"))
    assert base.endswith("-cpu")  # CUDA only from torch's wheels, not also from a CUDA base image
    ray_version = next(line for line in lines if line.startswith("ARG RAY_VERSION=")).split("=", 1)[1]
    chart_values = yaml.safe_load((REPO_ROOT / "charts" / "secvec" / "values.yaml").read_text())
    assert ray_version == chart_values["rayJob"]["rayVersion"]
    assert "whl/cu" in next(line for line in lines if line.startswith("ARG TORCH_INDEX_URL="))  # GPU by default


def test_db_upgrade_init_container_leaves_a_new_database_alone_and_upgrades_an_old_schema(tmp_path: Path) -> None:
    """The init container's own script, run against real PostgreSQL: an empty database is left for the
    server to create; a schema an older MLflow left (an early migration) is brought to this MLflow's head."""
    import os
    import sys

    import sqlalchemy
    from alembic import command
    from alembic.script import ScriptDirectory
    from mlflow.store.db.utils import InitialBase, _get_alembic_config

    from tests.e2e import postgres_database

    pod = only(build("base"), "Deployment")["spec"]["template"]["spec"]
    (upgrade,) = [c for c in pod["initContainers"] if c["name"] == "db-upgrade"]
    assert upgrade["command"][:2] == ["python", "-c"]
    script = upgrade["command"][2]

    def run_script(uri: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "MLFLOW_BACKEND_STORE_URI": uri, "HOME": str(tmp_path)}
        return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)

    with postgres_database("secvec_dbupgrade") as uri:
        engine = sqlalchemy.create_engine(uri)
        result = run_script(uri)
        assert result.returncode == 0, result.stderr[-2000:]
        assert "no MLflow schema yet" in result.stdout
        assert sqlalchemy.inspect(engine).get_table_names() == []

        config = _get_alembic_config(uri)
        first_migration = "451aebb31d03"  # MLflow's first schema migration (metric step)
        InitialBase.metadata.create_all(engine)
        with engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, first_migration)
        result = run_script(uri)
        assert result.returncode == 0, result.stderr[-2000:]
        with engine.connect() as connection:
            (version,) = connection.execute(sqlalchemy.text("SELECT version_num FROM alembic_version")).one()
        assert version in ScriptDirectory.from_config(config).get_heads() and version != first_migration
        engine.dispose()
