"""charts/secvec: `helm lint --strict`, `helm template` validated offline, and per-template behaviour
in the helm-unittest style, with helm 3 and helm 4 (fetched by tools/get-helm.sh)."""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

try:
    from tests.conftest_kube import (
        HELMS,
        REPO_ROOT,
        crd_validator,
        load_documents,
        pod_specs,
        pss_restricted_violations,
        require_tools,
        validation_errors,
    )
except ImportError:  # tests/ is not a package: pytest puts tests/ itself on sys.path
    from conftest_kube import (
        HELMS,
        REPO_ROOT,
        crd_validator,
        load_documents,
        pod_specs,
        pss_restricted_violations,
        require_tools,
        validation_errors,
    )

from workflows import kube

# Needs the helm binaries (fetched once by tools/get-helm.sh); about 15 s in all.
pytestmark = pytest.mark.slow

CHART = REPO_ROOT / "charts" / "secvec"
OPERATOR_CHART = CHART / "charts" / "kuberay-operator"
EXAMPLE_SPEC = REPO_ROOT / "workflows" / "examples" / "cluster-smollm2.yaml"
CRDS_COMMAND = 'kubectl apply --server-side -k "github.com/ray-project/kuberay/ray-operator/config/crd?ref=v1.7.0"'
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
RELEASE, NAMESPACE = "demo", "ml"


@pytest.fixture(scope="session")
def tools() -> Path:
    return require_tools()


def _helm(helm: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(require_tools() / helm), *args], capture_output=True, text=True, timeout=120, check=False
    )


@functools.cache
def _template(
    helm: str, values: tuple[str, ...] = (), sets: tuple[str, ...] = (), set_files: tuple[str, ...] = ()
) -> subprocess.CompletedProcess:
    args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE]
    for path in values:
        args += ["-f", path]
    for item in sets:
        args += ["--set", item]
    for item in set_files:
        args += ["--set-file", item]
    return _helm(helm, *args)


DEFAULT_VALUES = CHART / "ci" / "default-values.yaml"  # the two values every install must give


def render(
    *sets: str, values: tuple[str | Path, ...] = (), set_files: tuple[str, ...] = (), helm: str = "helm3"
) -> list[dict[str, Any]]:
    """Objects of `helm template` with ci/default-values.yaml (image registry, data claim) under ``values``."""
    result = _template(helm, tuple(str(v) for v in (DEFAULT_VALUES, *values)), sets, set_files)
    assert result.returncode == 0, result.stderr
    return load_documents(result.stdout)


def find(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    matches = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(matches) == 1, f"expected one {kind} {name or ''}, found {len(matches)}"
    return matches[0]


def kinds(objects: list[dict[str, Any]]) -> set[str]:
    return {o["kind"] for o in objects}


def container(pod_spec: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in pod_spec["containers"] if c["name"] == name)


def env_of(container_spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {item["name"]: item for item in container_spec.get("env", [])}


def mlflow_args(objects: list[dict[str, Any]]) -> list[str]:
    deployment = find(objects, "Deployment", f"{RELEASE}-secvec-mlflow")
    return container(deployment["spec"]["template"]["spec"], "mlflow")["command"]


def ray_pods(obj: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Head and worker pod specs of a RayJob (the submitter pod runs no Ray node)."""
    return [(where, pod) for where, pod in pod_specs(obj) if not where.endswith("submitter")]


def option(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


# --- lint and schema validation of every ci values file, both helms --------------------------------


def test_ci_values_cover_the_documented_cases() -> None:
    names = {path.name.removesuffix("-values.yaml") for path in CI_VALUES}
    expected = {"default", "external-database", "s3-artifacts", "schedule-raycronjob", "schedule-cronjob"}
    assert expected | {"basic-auth", "gpu-workers", "with-operator", "ingress"} <= names


@pytest.mark.parametrize("helm", HELMS)
@pytest.mark.parametrize("values", CI_VALUES, ids=lambda p: p.name)
def test_helm_lint_strict(tools: Path, helm: str, values: Path) -> None:
    result = _helm(helm, "lint", "--strict", str(CHART), "-f", str(values))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("helm", HELMS)
@pytest.mark.parametrize("values", CI_VALUES, ids=lambda p: p.name)
def test_rendered_objects_match_kubernetes_and_kuberay_schemas(tools: Path, helm: str, values: Path) -> None:
    objects = render(values=(values,), helm=helm)
    assert {"ConfigMap"} <= kinds(objects)
    assert validation_errors(objects) == []


def test_helm3_and_helm4_render_the_same_objects(tools: Path) -> None:
    for values in CI_VALUES:
        without_secrets = [[o for o in render(values=(values,), helm=h) if o["kind"] != "Secret"] for h in HELMS]
        assert without_secrets[0] == without_secrets[1], values.name


def test_crd_validation_catches_a_misspelled_field(tools: Path) -> None:
    rayjob = find(render(), "RayJob")
    rayjob["spec"]["preRunningDeadlineSecond"] = rayjob["spec"].pop("preRunningDeadlineSeconds")
    worker = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    worker["template"]["spec"]["containers"][0]["resource"] = {}
    errors = validation_errors([rayjob])
    assert any("preRunningDeadlineSecond'" in error for error in errors), errors
    assert any("'resource'" in error for error in errors), errors


# --- behaviour of individual templates -------------------------------------------------------------


def test_renders_mlflow_postgresql_configmap_and_rayjob_by_default(tools: Path) -> None:
    objects = render()
    assert kinds(objects) == {
        "Deployment", "Service", "PersistentVolumeClaim", "StatefulSet", "Secret", "ConfigMap", "RayJob", "Job",
        "NetworkPolicy", "ServiceAccount",
    }  # fmt: skip
    assert not {"RayCronJob", "CronJob", "Role", "Ingress"} & kinds(objects)


def test_mlflow_server_has_allowed_hosts_with_the_service_name(tools: Path) -> None:
    from mlflow.server.security_utils import is_allowed_host_header

    args = mlflow_args(render())
    assert args[:2] == ["mlflow", "server"]
    allowed = option(args, "--allowed-hosts").split(",")
    service = f"{RELEASE}-secvec-mlflow"
    assert find(render(), "Service", service)["spec"]["ports"][0]["port"] == 5000
    for host in (
        f"{service}:5000",
        f"{service}.{NAMESPACE}:5000",
        f"{service}.{NAMESPACE}.svc:5000",
        f"{service}.{NAMESPACE}.svc.cluster.local:5000",
        f"{service}.{NAMESPACE}.svc.cluster.local",
        "localhost:5000",
    ):
        assert is_allowed_host_header(allowed, host), host
    assert not is_allowed_host_header(allowed, "attacker.example.com")


def test_mlflow_server_serves_artifacts_from_the_pvc_and_probes_health(tools: Path) -> None:
    objects = render()
    args = mlflow_args(objects)
    assert "--backend-store-uri" not in args  # read from $MLFLOW_BACKEND_STORE_URI: no password in the arguments
    assert "--serve-artifacts" in args and option(args, "--artifacts-destination") == "/mlartifacts"
    assert option(args, "--host") == "0.0.0.0" and option(args, "--port") == "5000"
    pod = find(objects, "Deployment")["spec"]["template"]["spec"]
    server = container(pod, "mlflow")
    assert server["readinessProbe"]["httpGet"]["path"] == "/health"
    assert server["livenessProbe"]["httpGet"]["path"] == "/health"
    claim = find(objects, "PersistentVolumeClaim")["metadata"]["name"]
    assert {"name": "artifacts", "persistentVolumeClaim": {"claimName": claim}} in pod["volumes"]
    assert server["image"].startswith("ghcr.io/mlflow/mlflow:v3.") and server["image"].endswith("-full")


def test_mlflow_uses_the_bundled_postgresql_with_a_generated_password(tools: Path) -> None:
    objects = render()
    env = env_of(container(find(objects, "Deployment")["spec"]["template"]["spec"], "mlflow"))
    secret = find(objects, "Secret", f"{RELEASE}-secvec-postgresql")
    assert env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": secret["metadata"]["name"],
        "key": "password",
    }
    assert env["MLFLOW_BACKEND_STORE_URI"]["value"] == (
        f"postgresql+psycopg2://mlflow:$(POSTGRES_PASSWORD)@{RELEASE}-secvec-postgresql:5432/mlflow"
    )
    statefulset = find(objects, "StatefulSet")
    assert container(statefulset["spec"]["template"]["spec"], "postgresql")["image"].startswith("postgres:")


def test_uses_the_external_database_secret_when_postgresql_enabled_is_false(tools: Path) -> None:
    objects = render(values=(CHART / "ci" / "external-database-values.yaml",))
    assert "StatefulSet" not in kinds(objects)
    assert all("postgresql" not in o["metadata"]["name"] for o in objects)
    for kind in ("Deployment", "Job"):
        pod = find(objects, kind)["spec"]["template"]["spec"]
        env = env_of(pod["containers"][0])
        assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"] == {"name": "mlflow-database", "key": "uri"}
        assert "POSTGRES_PASSWORD" not in env


def test_external_database_without_secret_is_rejected(tools: Path) -> None:
    result = _template("helm3", (), ("postgresql.enabled=false",))
    assert result.returncode != 0 and "existingSecret" in result.stderr


def test_s3_artifacts_use_the_bucket_and_credentials_from_the_existing_secret(tools: Path) -> None:
    objects = render(values=(CHART / "ci" / "s3-artifacts-values.yaml",))
    assert "PersistentVolumeClaim" not in kinds(objects)
    args = mlflow_args(objects)
    assert option(args, "--artifacts-destination") == "s3://secvec-artifacts/mlflow"
    assert "mlflow.example.com" in option(args, "--allowed-hosts").split(",")
    env = env_of(container(find(objects, "Deployment")["spec"]["template"]["spec"], "mlflow"))
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["name"] == "minio-credentials"
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "minio-credentials"
    assert env["MLFLOW_S3_ENDPOINT_URL"]["value"] == "http://minio.storage.svc.cluster.local:9000"
    assert find(objects, "Deployment")["spec"].get("strategy") is None  # rolling updates: no RWO volume


def test_basic_auth_uses_credentials_from_the_existing_secret(tools: Path) -> None:
    objects = render(values=(CHART / "ci" / "basic-auth-values.yaml",))
    pod = find(objects, "Deployment")["spec"]["template"]["spec"]
    args = container(pod, "mlflow")["command"]
    assert option(args, "--app-name") == "basic-auth"
    env = env_of(container(pod, "mlflow"))
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "mlflow-admin", "key": "password"}
    assert (
        env["MLFLOW_FLASK_SERVER_SECRET_KEY"]["valueFrom"]["secretKeyRef"]["name"] == f"{RELEASE}-secvec-mlflow-flask"
    )
    assert env["MLFLOW_AUTH_CONFIG_PATH"]["value"] == "/auth/basic_auth.ini"
    assert [init["name"] for init in pod["initContainers"]] == ["wait-for-db", "auth-config"]
    for _, ray_pod in ray_pods(find(objects, "RayJob")):
        ray_env = env_of(ray_pod["containers"][0])
        assert ray_env["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "mlflow-admin"


def test_basic_auth_init_script_writes_a_config_mlflow_reads(tools: Path, tmp_path: Path) -> None:
    """The init container's ini, read the way mlflow.server.auth.config reads it (ConfigParser with
    interpolation, so a URL-encoded password's `%` must come out intact)."""
    import configparser

    objects = render(values=(CHART / "ci" / "basic-auth-values.yaml",))
    init = container(
        {"containers": find(objects, "Deployment")["spec"]["template"]["spec"]["initContainers"]}, "auth-config"
    )
    script = init["command"][2].replace("/auth/", f"{tmp_path}/")
    uri = "postgresql+psycopg2://mlflow:p%40ss@db:5432/mlflow"
    environment = {"MLFLOW_BACKEND_STORE_URI": uri, "DEFAULT_PERMISSION": "NO_PERMISSIONS", "PATH": "/usr/bin:/bin"}
    subprocess.run(["sh", "-ec", script], env=environment, check=True, timeout=30)
    config = configparser.ConfigParser()
    config.read(tmp_path / "basic_auth.ini")
    assert config["mlflow"]["database_uri"] == uri
    assert config["mlflow"]["default_permission"] == "NO_PERMISSIONS"
    assert config["mlflow"]["authorization_function"] == "mlflow.server.auth:authenticate_request_basic_auth"


def test_db_upgrade_job_is_a_pre_upgrade_hook_that_keeps_the_uri_out_of_its_arguments(
    tools: Path, tmp_path: Path
) -> None:
    """No argument holds the URI; the Job's command, run here with a stand-in `mlflow.db` module, calls
    `mlflow db upgrade` with the URI taken from $MLFLOW_BACKEND_STORE_URI (the real command is a click
    group with an `upgrade` subcommand taking the URL, checked below)."""
    import os
    import sys

    import click
    from mlflow.db import commands

    job = find(render(), "Job")
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "pre-upgrade"
    command = job["spec"]["template"]["spec"]["containers"][0]["command"]
    assert not [arg for arg in command if "MLFLOW_BACKEND_STORE_URI)" in arg or "postgresql" in arg]
    assert command[0] == "python" and isinstance(commands, click.Group)
    assert [p.name for p in commands.commands["upgrade"].params] == ["url"]
    stub = tmp_path / "mlflow"
    stub.mkdir()
    (stub / "__init__.py").write_text("")
    (stub / "db.py").write_text("import json, sys\ndef commands(args):\n    print(json.dumps(args))\n    return 0\n")
    uri = "postgresql+psycopg2://mlflow:secret@db:5432/mlflow"
    result = subprocess.run(
        [sys.executable, *command[1:]],
        env={**os.environ, "PYTHONPATH": str(tmp_path), "MLFLOW_BACKEND_STORE_URI": uri},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout) == ["upgrade", uri]


def test_pipeline_spec_is_rendered_into_the_configmap_mounted_at_config(tools: Path) -> None:
    objects = render(values=(CHART / "ci" / "gpu-workers-values.yaml",))
    configmap = find(objects, "ConfigMap")
    spec = yaml.safe_load(configmap["data"]["pipeline.yaml"])
    assert spec["name"] == "guarded-finetune" and spec["scaling"]["num_workers"] == 8
    rayjob = find(objects, "RayJob")
    assert rayjob["spec"]["entrypoint"] == "secvec run /config/pipeline.yaml"
    for _, pod in ray_pods(rayjob):
        mounts = pod["containers"][0]["volumeMounts"]
        assert {"name": "pipeline-config", "mountPath": "/config", "readOnly": True} in mounts
        assert {"name": "pipeline-config", "configMap": {"name": configmap["metadata"]["name"]}} in pod["volumes"]


def test_rayjob_has_head_and_gpu_worker_group_and_lifecycle_settings(tools: Path) -> None:
    objects = render(values=(CHART / "ci" / "gpu-workers-values.yaml",))
    rayjob = find(objects, "RayJob")
    spec = rayjob["spec"]
    # Kueue (rayJob.kueueQueueName) refuses a RayJob without shutdownAfterJobFinishes, which KubeRay refuses
    # beside deletionRules: the cluster's TTL instead of the deletion rules.
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] == 600
    assert "deletionStrategy" not in spec
    assert (spec["activeDeadlineSeconds"], spec["preRunningDeadlineSeconds"], spec["backoffLimit"]) == (172800, 1800, 1)
    (workers,) = spec["rayClusterSpec"]["workerGroupSpecs"]
    assert workers["replicas"] == workers["minReplicas"] == workers["maxReplicas"] == 8
    worker = workers["template"]["spec"]
    resources = worker["containers"][0]["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == 1
    assert worker["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert worker["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert worker["imagePullSecrets"] == [{"name": "registry-credentials"}]
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["image"] == "registry.example.com/ml/secvec@sha256:" + "0123456789abcdef" * 4
    assert workers["template"]["spec"]["priorityClassName"] == "gpu-training"
    # Kueue admits the RayJob as one workload, by the RayJob's own label (pods labelled alone would each be
    # a workload of their own under Kueue's pod integration, or not be managed at all).
    assert rayjob["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    cluster = spec["rayClusterSpec"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        assert "kueue.x-k8s.io/queue-name" not in group["template"]["metadata"]["labels"]
    template = yaml.safe_load(find(objects, "ConfigMap")["data"]["rayjob-template.yaml"])
    assert template["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"  # scheduled runs too
    assert "nvidia.com/gpu" not in head["resources"].get("limits", {})
    assert env_of(head)["NCCL_DEBUG"]["value"] == "WARN"


def test_rayjob_tracks_to_the_chart_mlflow_service_or_an_external_uri(tools: Path) -> None:
    for _, pod in ray_pods(find(render(), "RayJob")):
        uri = env_of(pod["containers"][0])["MLFLOW_TRACKING_URI"]["value"]
        assert uri == f"http://{RELEASE}-secvec-mlflow.{NAMESPACE}.svc.cluster.local:5000"
    objects = render(values=(CHART / "ci" / "external-mlflow-values.yaml",))
    assert not {"Deployment", "StatefulSet", "Job"} & kinds(objects)
    for _, pod in ray_pods(find(objects, "RayJob")):
        assert env_of(pod["containers"][0])["MLFLOW_TRACKING_URI"]["value"] == "https://mlflow.example.com"


def test_renders_a_raycronjob_when_schedule_kind_is_raycronjob(tools: Path) -> None:
    objects = render(values=(CHART / "ci" / "schedule-raycronjob-values.yaml",))
    cron = find(objects, "RayCronJob")
    assert cron["apiVersion"] == "ray.io/v1"
    assert cron["spec"]["schedule"] == "0 3 * * 0" and cron["spec"]["timeZone"] == "Europe/Berlin"
    assert cron["spec"]["jobTemplate"]["entrypoint"] == "secvec run /config/pipeline.yaml"
    assert len(cron["metadata"]["name"]) <= kube.MAX_RAYCRONJOB_NAME_LENGTH
    assert not {"RayJob", "CronJob", "Role"} & kinds(objects)  # runOnInstall: false


def test_renders_cronjob_and_role_limited_to_rayjobs_when_schedule_kind_is_cronjob(tools: Path) -> None:
    objects = render(values=(CHART / "ci" / "schedule-cronjob-values.yaml",))
    assert "RayCronJob" not in kinds(objects)
    role = find(objects, "Role")
    assert role["rules"] == [
        {"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": ["create", "get", "list", "watch"]}
    ]
    binding = find(objects, "RoleBinding")
    account = find(objects, "ServiceAccount", f"{RELEASE}-secvec-scheduled")["metadata"]["name"]
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE}]
    cronjob = find(objects, "CronJob")
    pod = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert cronjob["spec"]["schedule"] == "30 1 * * *" and pod["serviceAccountName"] == account
    command = pod["containers"][0]["command"]
    assert command[:5] == ["secvec", "submit", "/config/pipeline.yaml", "--in-cluster", "--namespace"]
    assert (
        pod["containers"][0]["image"]
        == find(objects, "RayJob")["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0][
            "image"
        ]
    )


def test_cronjob_template_makes_a_valid_rayjob_through_secvec_submit(tools: Path) -> None:
    """What the CronJob's `secvec submit --template` would create, checked against the RayJob CRD."""
    objects = render(values=(CHART / "ci" / "schedule-cronjob-values.yaml",))
    data = find(objects, "ConfigMap")["data"]
    template = yaml.safe_load(data["rayjob-template.yaml"])
    rayjob = kube.render_rayjob(data["pipeline.yaml"], namespace=NAMESPACE, template=template)
    assert validation_errors([rayjob]) == []
    assert rayjob["metadata"]["name"].startswith(yaml.safe_load(data["pipeline.yaml"])["name"] + "-")
    applied = find(objects, "RayJob")["spec"]
    assert {k: v for k, v in rayjob["spec"].items() if k != "rayClusterSpec"} == {
        k: v for k, v in applied.items() if k != "rayClusterSpec"
    }
    # The same cluster, except that the spec now travels inline instead of through the ConfigMap mount.
    for (where, pod), (_, applied_pod) in zip(pod_specs(rayjob), pod_specs(find(objects, "RayJob")), strict=True):
        assert pod["containers"][0]["resources"] == applied_pod["containers"][0]["resources"], where
        assert pod["containers"][0]["image"] == applied_pod["containers"][0]["image"], where


def test_pods_run_as_non_root(tools: Path) -> None:
    checked = 0
    for values in CI_VALUES:
        for obj in render(values=(values,)):
            for where, pod in pod_specs(obj):
                assert pod["securityContext"]["runAsNonRoot"] is True, f"{values.name}: {where}"
                for item in pod["containers"] + pod.get("initContainers", []):
                    assert item["securityContext"]["allowPrivilegeEscalation"] is False, f"{where} {item['name']}"
                    assert item["resources"]["requests"], f"{values.name}: {where} {item['name']} has no requests"
                checked += 1
    assert checked >= 20


def test_values_schema_forbids_running_as_root(tools: Path) -> None:
    result = _template("helm3", (), ("rayJob.podSecurityContext.runAsNonRoot=false",))
    assert result.returncode != 0 and "runAsNonRoot" in result.stderr


def test_no_secret_data_in_plain_values(tools: Path) -> None:
    sensitive = ("password", "token", "secretkey", "accesskey", "credential")
    reference_suffixes = ("key", "secret", "existingsecret", "usernamekey", "passwordkey")

    def literal_secrets(node: Any, path: str = "") -> list[str]:
        found = []
        if isinstance(node, dict):
            for key, value in node.items():
                lowered = key.lower()
                is_reference = lowered.endswith(reference_suffixes) or lowered.endswith("tokens")  # max_new_tokens
                if any(word in lowered for word in sensitive) and not is_reference and value not in ("", None):
                    found.append(f"{path}.{key}")
                found += literal_secrets(value, f"{path}.{key}")
        elif isinstance(node, list):
            for index, item in enumerate(node):
                found += literal_secrets(item, f"{path}[{index}]")
        return found

    for path in [CHART / "values.yaml", OPERATOR_CHART / "values.yaml", *CI_VALUES]:
        assert literal_secrets(yaml.safe_load(path.read_text()) or {}) == [], path.name
    for values in CI_VALUES:
        objects = render(values=(values,))
        for obj in objects:
            for where, pod in pod_specs(obj):
                for item in pod["containers"] + pod.get("initContainers", []):
                    for env in item.get("env", []):
                        if any(word in env["name"].lower() for word in ("password", "secret", "token", "access_key")):
                            assert "value" not in env, f"{values.name}: {where} {env['name']} is a literal"
        secrets = [o for o in objects if o["kind"] == "Secret"]
        assert {s["metadata"]["name"] for s in secrets} <= {
            f"{RELEASE}-secvec-postgresql", f"{RELEASE}-secvec-mlflow-flask", f"{RELEASE}-secvec-mlflow-admin"
        }  # fmt: skip
    # The only Secret data the chart writes is random (randAlphaNum), never taken from values.
    postgresql = f"{RELEASE}-secvec-postgresql"
    first = find(render("postgresql.auth.username=first"), "Secret", postgresql)["data"]["password"]
    second = find(render("postgresql.auth.username=second"), "Secret", postgresql)["data"]["password"]
    assert first != second


@pytest.mark.parametrize("helm", HELMS)
@pytest.mark.parametrize(
    "bad_value",
    [
        "unknownKey=1",
        "mlflow.artifacts.type=gcs",
        "schedule.kind=Airflow",
        "rayJob.gpuWorkers.replicas=-1",
        "pipeline.dataVolume.claim=data",
        "kuberay-operator.enabled=true,kuberay-operator.imageTag=v1.7.0",
    ],
)
def test_values_schema_rejects_unknown_key(tools: Path, helm: str, bad_value: str) -> None:
    result = _template(helm, (), (bad_value,))
    assert result.returncode != 0
    assert "schema" in result.stderr.lower() or "values don't meet" in result.stderr.lower(), result.stderr


@pytest.mark.parametrize(
    "values_file", [CHART / "values.yaml", OPERATOR_CHART / "values.yaml"], ids=["secvec", "operator"]
)
def test_every_value_has_a_helm_docs_comment(values_file: Path) -> None:
    """helm-docs: `# --` documents the key below it and its whole subtree; plain sections need none."""
    lines = values_file.read_text().splitlines()
    documented_ancestors: list[tuple[int, bool]] = []  # (indent, documented) of open mapping sections
    undocumented = []
    for index, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith(("#", "-")):
            continue
        indent = len(line) - len(line.lstrip())
        while documented_ancestors and documented_ancestors[-1][0] >= indent:
            documented_ancestors.pop()
        comment = index - 1
        while comment >= 0 and lines[comment].strip().startswith("#") and "# --" not in lines[comment]:
            comment -= 1
        has_doc = comment >= 0 and lines[comment].strip().startswith("# --") and comment < index
        covered = has_doc or any(documented for _, documented in documented_ancestors)
        key, _, rest = stripped.partition(":")
        following = next((n for n in lines[index + 1 :] if n.strip() and not n.strip().startswith("#")), "")
        is_section = not rest.strip() and not following.strip().startswith("-")
        if is_section:
            documented_ancestors.append((indent, covered))
        elif not covered:
            undocumented.append(f"line {index + 1}: {key}")
    assert undocumented == []


def test_crd_schemas_are_read_from_shared_not_copied_into_the_repo() -> None:
    assert crd_validator("RayJob")
    copies = [p for p in REPO_ROOT.rglob("ray.io_*.yaml") if ".venv" not in p.parts]
    assert copies == []


# --- the default pipeline spec and its data volume ---------------------------------------------------


def test_default_pipeline_spec_is_the_cluster_smollm2_example() -> None:
    """values.yaml's pipeline.spec and workflows/examples/cluster-smollm2.yaml never drift apart."""
    default = yaml.safe_load((CHART / "values.yaml").read_text())["pipeline"]["spec"]
    assert default == yaml.safe_load(EXAMPLE_SPEC.read_text())


def test_configmap_holds_the_default_spec_and_the_rayjob_has_the_workers_it_asks_for(tools: Path) -> None:
    from workflows.specs import parse_spec

    example = yaml.safe_load(EXAMPLE_SPEC.read_text())
    objects = render()
    # Compared as validated specs: helm's toYaml writes 5e-05, which YAML 1.1 reads as a string that
    # Pydantic turns back into the float.
    rendered = yaml.safe_load(find(objects, "ConfigMap")["data"]["pipeline.yaml"])
    assert parse_spec(rendered, "configmap") == parse_spec(example, str(EXAMPLE_SPEC))
    scaling = example["scaling"]
    (group,) = find(objects, "RayJob")["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert group["replicas"] == scaling["num_workers"] and scaling["use_gpu"] is True
    resources = group["template"]["spec"]["containers"][0]["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == scaling["resources_per_worker"]["GPU"]
    assert float(resources["requests"]["cpu"]) >= scaling["resources_per_worker"]["CPU"]


@pytest.mark.parametrize("helm", HELMS)
def test_set_file_spec_replaces_the_default_spec_whole(tools: Path, helm: str) -> None:
    demo = REPO_ROOT / "workflows" / "examples" / "demo.yaml"
    objects = render(set_files=(f"pipeline.spec={demo}",), helm=helm)
    text = find(objects, "ConfigMap")["data"]["pipeline.yaml"]
    assert text.strip() == demo.read_text().strip()  # the file as written, comments included
    assert validation_errors(objects) == []


def _data_mounts(pod: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    mounts = [m for c in pod["containers"] for m in c["volumeMounts"] if m["name"] == "pipeline-data"]
    return mounts, [v for v in pod["volumes"] if v["name"] == "pipeline-data"]


def test_data_volume_is_mounted_at_data_on_every_ray_pod_when_claim_name_is_set(tools: Path) -> None:
    objects = render("pipeline.dataVolume.claimName=secvec-data", "schedule.enabled=true", "schedule.kind=CronJob")
    template = yaml.safe_load(find(objects, "ConfigMap")["data"]["rayjob-template.yaml"])
    raycronjob = find(render(values=(CHART / "ci" / "with-operator-values.yaml",)), "RayCronJob")
    checked = 0
    for rayjob in (find(objects, "RayJob"), template, raycronjob):  # one-off, CronJob and RayCronJob runs
        for where, pod in pod_specs(rayjob):
            if where.endswith("submitter"):
                assert _data_mounts(pod) == ([], []), where  # `ray job submit` needs no data
                continue
            mounts, volumes = _data_mounts(pod)
            assert mounts == [{"name": "pipeline-data", "mountPath": "/data"}], where
            assert volumes == [{"name": "pipeline-data", "persistentVolumeClaim": {"claimName": "secvec-data"}}]
            checked += 1
    assert checked == 6
    read_only = find(render("pipeline.dataVolume.claimName=data", "pipeline.dataVolume.readOnly=true"), "RayJob")
    for where, pod in pod_specs(read_only):
        if where.endswith("submitter"):
            continue
        mounts, volumes = _data_mounts(pod)
        assert mounts[0]["readOnly"] is True and volumes[0]["persistentVolumeClaim"]["readOnly"] is True


def _render_without_defaults(helm: str, *sets: str, set_files: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return _template(helm, (), ("image.repository=registry.example.com/secvec", *sets), set_files)


@pytest.mark.parametrize("helm", HELMS)
def test_a_spec_using_data_without_a_claim_fails_the_render(tools: Path, helm: str) -> None:
    """The default spec reads /data and checkpoints there: without a claim every stage would fail."""
    for sets in ((), ("schedule.enabled=true", "schedule.kind=CronJob", "pipeline.runOnInstall=false")):
        result = _render_without_defaults(helm, *sets)
        assert result.returncode != 0
        assert "reads or writes /data but pipeline.dataVolume.claimName is empty" in result.stderr
    demo = REPO_ROOT / "workflows" / "examples" / "demo.yaml"  # no /data in it: nothing to mount
    result = _render_without_defaults(helm, set_files=(f"pipeline.spec={demo}",))
    assert result.returncode == 0, result.stderr
    for _, pod in pod_specs(find(load_documents(result.stdout), "RayJob")):
        assert _data_mounts(pod) == ([], [])


# --- the optional KubeRay operator (subchart charts/kuberay-operator) ---------------------------------

OPERATOR = f"{RELEASE}-kuberay-operator"
WITH_OPERATOR = CHART / "ci" / "with-operator-values.yaml"
ALL_VERBS = ("get", "list", "watch", "create", "update", "patch", "delete")


def operator_objects(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [o for o in objects if o["metadata"]["labels"].get("app.kubernetes.io/component") == "kuberay-operator"]


def operator_container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return container(find(objects, "Deployment", OPERATOR)["spec"]["template"]["spec"], "kuberay-operator")


def test_renders_no_operator_objects_by_default(tools: Path) -> None:
    for values in CI_VALUES:
        if values != WITH_OPERATOR:
            objects = render(values=(values,))
            assert operator_objects(objects) == [], values.name
            assert not {"ClusterRole", "ClusterRoleBinding"} & kinds(objects), values.name
            images = [c["image"] for o in objects for _, pod in pod_specs(o) for c in pod["containers"]]
            assert not [image for image in images if "kuberay" in image], values.name


def test_renders_the_operator_deployment_service_account_and_rbac_when_kuberay_operator_enabled_is_true(
    tools: Path,
) -> None:
    objects = render(values=(WITH_OPERATOR,))
    operator_kinds = sorted(o["kind"] for o in operator_objects(objects))
    expected = ["ClusterRole", "ClusterRoleBinding", "Deployment", "Role", "Role", "RoleBinding", "RoleBinding"]
    assert operator_kinds == [*expected, "ServiceAccount"]
    pod = find(objects, "Deployment", OPERATOR)["spec"]["template"]["spec"]
    operator = operator_container(objects)
    assert operator["image"] == "quay.io/kuberay/operator:v1.7.0"
    assert {"--feature-gates=RayCronJob=true", "--watch-namespace=ml", "--enable-leader-election=true"} <= set(
        operator["args"]
    )
    assert pod["serviceAccountName"] == find(objects, "ServiceAccount", OPERATOR)["metadata"]["name"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["tolerations"][0]["key"] == "CriticalAddonsOnly"
    assert operator["securityContext"]["readOnlyRootFilesystem"] is True
    assert operator["resources"]["requests"] and operator["resources"]["limits"]["memory"]
    assert {p["name"]: p["containerPort"] for p in operator["ports"]}["probes"] == 8082
    assert operator["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "probes"}
    assert operator["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "probes"}
    subject = [{"kind": "ServiceAccount", "name": OPERATOR, "namespace": NAMESPACE}]
    binding = find(objects, "ClusterRoleBinding", OPERATOR)
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": OPERATOR}
    assert binding["subjects"] == subject
    leader_role = find(objects, "Role", f"{OPERATOR}-leader-election")
    leader = find(objects, "RoleBinding", f"{OPERATOR}-leader-election")
    assert leader["roleRef"]["name"] == leader_role["metadata"]["name"] and leader["subjects"] == subject
    assert {"create", "get", "update"} <= {
        verb for rule in leader_role["rules"] if "leases" in rule["resources"] for verb in rule["verbs"]
    }


def _granted(rules: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    return {(g, r, v) for rule in rules for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}


@pytest.mark.parametrize("watch", [False, True], ids=["all-namespaces", "watch-namespaces"])
def test_operator_rbac_grants_what_kuberay_reconciles(tools: Path, watch: bool) -> None:
    """All namespaces: one ClusterRole. With watchNamespaces: the same rules as a Role in each watched
    namespace and nothing namespaced (Secrets least of all) cluster-wide, as KubeRay's own chart does."""
    if watch:
        objects = render("kuberay-operator.enabled=true", "kuberay-operator.watchNamespaces={ml,research}")
        roles = [o for o in objects if o["kind"] == "Role" and o["metadata"]["name"] == OPERATOR]
        assert sorted(r["metadata"]["namespace"] for r in roles) == ["ml", "research"]
        bindings = [o for o in objects if o["kind"] == "RoleBinding" and o["metadata"]["name"] == OPERATOR]
        assert sorted(b["metadata"]["namespace"] for b in bindings) == ["ml", "research"]
        assert all(b["subjects"][0]["namespace"] == NAMESPACE for b in bindings)
        cluster_wide = _granted(find(objects, "ClusterRole", OPERATOR)["rules"])
        assert cluster_wide == {("networking.k8s.io", "ingressclasses", v) for v in ("get", "list", "watch")}
        assert roles[0]["rules"] == roles[1]["rules"]
        rules = roles[0]["rules"] + find(objects, "ClusterRole", OPERATOR)["rules"]
    else:
        rules = find(render("kuberay-operator.enabled=true"), "ClusterRole", OPERATOR)["rules"]
    granted = _granted(rules)
    needed = {("ray.io", kind, verb) for kind in ("rayjobs", "rayclusters", "raycronjobs") for verb in ALL_VERBS}
    needed |= {("ray.io", f"{kind}/status", verb) for kind in ("rayjobs", "rayclusters", "raycronjobs")
               for verb in ("get", "update", "patch")}  # fmt: skip
    needed |= {("ray.io", f"{kind}/finalizers", "update") for kind in ("rayjobs", "rayclusters", "raycronjobs")}
    needed |= {("", kind, verb) for kind in ("pods", "services") for verb in ALL_VERBS}
    needed |= {("batch", "jobs", verb) for verb in ALL_VERBS}  # the RayJob submitter (K8sJobMode)
    needed |= {("", "secrets", verb) for verb in ("get", "create")}  # the Ray auth token Secret
    needed |= {("", "serviceaccounts", "create"), ("rbac.authorization.k8s.io", "roles", "create"),
               ("rbac.authorization.k8s.io", "rolebindings", "create"), ("events.k8s.io", "events", "create"),
               ("coordination.k8s.io", "leases", "update"), ("discovery.k8s.io", "endpointslices", "list")}  # fmt: skip
    assert needed - granted == set()
    assert not [rule for rule in rules if "*" in rule["verbs"] or "*" in rule["resources"]]


def test_operator_feature_gate_raycronjob_is_off_unless_a_value_enables_it(tools: Path) -> None:
    objects = render("kuberay-operator.enabled=true")
    args = operator_container(objects)["args"]
    assert "--feature-gates=RayCronJob=false" in args
    assert not [arg for arg in args if arg.startswith("--watch-namespace")]
    assert validation_errors(objects) == []


@pytest.mark.parametrize("helm", HELMS)
def test_kueue_queue_with_a_raycronjob_schedule_fails_the_render(tools: Path, helm: str) -> None:
    """KubeRay's RayCronJob gives its RayJobs only its own name label: Kueue would never see the queue."""
    sets = ("rayJob.kueueQueueName=gpu-queue", "schedule.enabled=true", "schedule.kind=RayCronJob")
    result = _template(helm, (str(DEFAULT_VALUES),), sets)
    assert result.returncode != 0 and "schedule.kind CronJob" in result.stderr, result.stderr
    cron = _template(helm, (str(DEFAULT_VALUES),), (*sets[:2], "schedule.kind=CronJob"))
    assert cron.returncode == 0, cron.stderr


@pytest.mark.parametrize("helm", HELMS)
def test_bundled_operator_with_a_raycronjob_schedule_needs_the_feature_gate(tools: Path, helm: str) -> None:
    result = _template(helm, (), ("kuberay-operator.enabled=true", "schedule.enabled=true"))
    assert result.returncode != 0 and "RayCronJob" in result.stderr, result.stderr


@pytest.mark.parametrize("helm", HELMS)
def test_operator_subchart_lints_on_its_own(tools: Path, helm: str) -> None:
    result = _helm(helm, "lint", "--strict", str(OPERATOR_CHART))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("helm", HELMS)
def test_helm_package_bundles_the_operator_subchart(tools: Path, helm: str, tmp_path: Path) -> None:
    import tarfile

    result = _helm(helm, "package", str(CHART), "--destination", str(tmp_path))
    assert result.returncode == 0, result.stderr
    (archive,) = tmp_path.glob("secvec-*.tgz")
    with tarfile.open(archive) as tar:
        names = set(tar.getnames())
    assert "secvec/charts/kuberay-operator/templates/deployment.yaml" in names
    assert not [name for name in names if "/ci/" in name]
    rendered = _helm(
        helm, "template", RELEASE, str(archive), "-n", NAMESPACE, "-f", str(DEFAULT_VALUES),
        "--set", "kuberay-operator.enabled=true",
    )  # fmt: skip
    assert rendered.returncode == 0, rendered.stderr
    assert "image: quay.io/kuberay/operator:v1.7.0" in rendered.stdout


def _notes(*sets: str) -> str:
    """NOTES.txt as `helm install` prints it (helm 4's client-side dry run needs no cluster; helm 3's does)."""
    args = ["install", RELEASE, str(CHART), "-n", NAMESPACE, "--dry-run=client", "-f", str(DEFAULT_VALUES)]
    result = _helm("helm4", *args, *[arg for item in sets for arg in ("--set", item)])
    assert result.returncode == 0, result.stderr
    return result.stdout.split("NOTES:", 1)[1]


def test_notes_tell_how_to_install_the_crds_when_the_operator_is_enabled(tools: Path) -> None:
    enabled = _notes("kuberay-operator.enabled=true")
    assert CRDS_COMMAND in enabled and f"rollout status deployment/{OPERATOR}" in enabled
    default = _notes()
    assert CRDS_COMMAND in default and "--set kuberay-operator.enabled=true" in default


# --- a default install that can start on a real GPU cluster, locked down --------------------------------


@pytest.mark.parametrize("helm", HELMS)
def test_image_is_the_gpu_build_from_a_registry_or_pinned_by_digest(tools: Path, helm: str) -> None:
    images = {c["image"] for o in render(helm=helm) for _, pod in pod_specs(o) for c in pod["containers"]}
    assert f"registry.example.com/secvec:{kube.DEFAULT_IMAGE_TAG}" in images  # appVersion + "-gpu"
    digest = "sha256:" + "ab" * 32
    pinned = render(f"image.digest={digest}", "image.tag=ignored", helm=helm)
    rayjob_images = {c["image"] for _, pod in pod_specs(find(pinned, "RayJob")) for c in pod["containers"]}
    assert rayjob_images == {f"registry.example.com/secvec@{digest}"}
    claim = "pipeline.dataVolume.claimName=d"
    for repository, message in (("", "image.repository is required"), ("secvec", "names no registry host"),
                                ("myteam/secvec", "names no registry host")):  # fmt: skip
        result = _template(helm, (), (f"image.repository={repository}", claim))
        assert result.returncode != 0 and message in result.stderr, result.stderr
    for repository in ("localhost:5000/secvec", "ghcr.io/team/secvec", "10.0.0.5:5000/secvec"):
        assert _template(helm, (), (f"image.repository={repository}", claim)).returncode == 0
    bad_digest = _template(helm, (str(DEFAULT_VALUES),), ("image.digest=latest",))
    assert bad_digest.returncode != 0


def test_every_pod_passes_pod_security_restricted_and_the_submitter_pod_is_rendered(tools: Path) -> None:
    """Pod Security "restricted" (see conftest_kube.pss_restricted_violations) for every pod of every ci
    values file, the RayJob's submitter pod included: KubeRay's default one would be rejected."""
    checked = set()
    for values in CI_VALUES:
        for obj in render(values=(values,)):
            for where, pod in pod_specs(obj):
                assert pss_restricted_violations(pod) == [], f"{values.name}: {where}"
                checked.add(where)
            if obj["kind"] in ("RayJob", "RayCronJob"):
                rayjob_spec = obj["spec"]["jobTemplate"] if obj["kind"] == "RayCronJob" else obj["spec"]
                submitter = rayjob_spec["submitterPodTemplate"]["spec"]
                assert submitter["automountServiceAccountToken"] is False
                assert submitter["containers"][0]["resources"]["limits"]["memory"] == "512Mi"
                for _, pod in ray_pods(obj):
                    assert pod["automountServiceAccountToken"] is False
                    assert submitter.get("imagePullSecrets") == pod.get("imagePullSecrets")
                    assert submitter["containers"][0]["image"] == pod["containers"][0]["image"]
    assert {"RayJob submitter", "RayCronJob submitter", "Deployment", "StatefulSet", "Job", "CronJob"} <= checked


def test_containers_outside_ray_have_a_read_only_root_filesystem(tools: Path) -> None:
    for values in CI_VALUES:
        for obj in render(values=(values,)):
            for where, pod in pod_specs(obj) if obj["kind"] not in ("RayJob", "RayCronJob") else []:
                for item in pod["containers"] + pod.get("initContainers", []):
                    assert item["securityContext"].get("readOnlyRootFilesystem") is True, f"{where} {item['name']}"
    rayjob = find(render(), "RayJob")
    (_, submitter), *_ = [(w, p) for w, p in pod_specs(rayjob) if w.endswith("submitter")]
    assert submitter["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True
    # Ray pods keep a writable root (Ray writes /tmp/ray, libraries cache under $HOME: values.yaml says so),
    # and the cluster autoscaler may not evict them mid-training.
    annotations = [t["metadata"]["annotations"] for t in _ray_templates(rayjob)]
    assert all(a["cluster-autoscaler.kubernetes.io/safe-to-evict"] == "false" for a in annotations)


def _ray_templates(rayjob: dict[str, Any]) -> list[dict[str, Any]]:
    cluster = rayjob["spec"]["rayClusterSpec"]
    return [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]


@pytest.mark.parametrize("helm", HELMS)
@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (
            ("rayJob.gpuWorkers.replicas=4",),
            "rayJob.gpuWorkers.replicas is 4 but the pipeline spec's scaling.num_workers is 2",
        ),
        (("rayJob.gpuWorkers.gpusPerWorker=2",), "gpusPerWorker is 2 but the pipeline spec asks 1 GPU"),
        (("pipeline.spec.scaling.resources_per_worker.GPU=2",), "asks 2 GPUs per Ray Train worker"),
        (("rayJob.gpuWorkers.resources.requests.cpu=2",), "requests.cpu is 2 but the pipeline spec asks 4 CPUs"),
    ],
)
def test_a_sizing_mismatch_fails_the_render_with_a_clear_message(
    tools: Path, helm: str, sets: tuple[str, ...], message: str
) -> None:
    result = _template(helm, (str(DEFAULT_VALUES),), sets)
    assert result.returncode != 0 and message in result.stderr, result.stderr


@pytest.mark.parametrize("helm", HELMS)
def test_the_worker_group_follows_the_spec(tools: Path, helm: str, tmp_path: Path) -> None:
    spec = yaml.safe_load(EXAMPLE_SPEC.read_text())
    spec["scaling"] = {"num_workers": 3, "use_gpu": True, "resources_per_worker": {"CPU": 6}}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    (group,) = find(render(set_files=(f"pipeline.spec={path}",), helm=helm), "RayJob")["spec"]["rayClusterSpec"][
        "workerGroupSpecs"
    ]
    resources = group["template"]["spec"]["containers"][0]["resources"]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 3
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == 1
    assert float(resources["requests"]["cpu"]) == 6
    del spec["scaling"]  # the pipeline's own defaults: 2 CPU workers, 1 CPU each
    path = tmp_path / "no-scaling.yaml"  # a new path: renders are cached by their arguments
    path.write_text(yaml.safe_dump(spec))
    (group,) = find(render(set_files=(f"pipeline.spec={path}",), helm=helm), "RayJob")["spec"]["rayClusterSpec"][
        "workerGroupSpecs"
    ]
    resources = group["template"]["spec"]["containers"][0]["resources"]
    assert group["replicas"] == 2 and "nvidia.com/gpu" not in resources["requests"]
    assert float(resources["requests"]["cpu"]) == 1


def test_token_auth_network_policies_and_deletion_rules_render_by_default(tools: Path) -> None:
    objects = render()
    spec = find(objects, "RayJob")["spec"]
    assert spec["rayClusterSpec"]["authOptions"] == {"mode": "token"}
    assert spec["preRunningDeadlineSeconds"] == 1800
    rules = {(json_key(r["condition"]), r["policy"]): r["condition"]["ttlSeconds"]
             for r in spec["deletionStrategy"]["deletionRules"]}  # fmt: skip
    assert rules[("jobStatus=SUCCEEDED", "DeleteCluster")] == 600
    assert rules[("jobStatus=SUCCEEDED", "DeleteSelf")] == rules[("jobDeploymentStatus=Failed", "DeleteSelf")] == 604800
    policies = {o["metadata"]["name"]: o["spec"] for o in objects if o["kind"] == "NetworkPolicy"}
    assert set(policies) == {f"{RELEASE}-secvec-ray", f"{RELEASE}-secvec-mlflow", f"{RELEASE}-secvec-postgresql"}
    ray = policies[f"{RELEASE}-secvec-ray"]
    # Every ingress rule names its sources: no rule lets the whole cluster in.
    for policy in policies.values():
        assert policy["policyTypes"] == ["Ingress"]
        assert all(rule.get("from") for rule in policy["ingress"])
    dashboard = next(r for r in ray["ingress"] if r.get("ports"))
    assert dashboard["ports"] == [{"port": 8265, "protocol": "TCP"}]
    assert {"app.kubernetes.io/name": "kuberay-operator"} in [
        p.get("podSelector", {}).get("matchLabels") for p in dashboard["from"]
    ]
    mlflow_peers = policies[f"{RELEASE}-secvec-mlflow"]["ingress"][0]["from"]
    assert mlflow_peers[0]["podSelector"]["matchExpressions"][0]["values"] == ["ray-head", "ray-worker"]
    assert policies[f"{RELEASE}-secvec-postgresql"]["ingress"][0]["ports"] == [{"port": 5432, "protocol": "TCP"}]
    # The policies select the pods they protect.
    for component, name in (("ray-head", "ray"), ("mlflow", "mlflow"), ("postgresql", "postgresql")):
        selector = policies[f"{RELEASE}-secvec-{name}"]["podSelector"]
        labels = {"app.kubernetes.io/instance": RELEASE, "app.kubernetes.io/component": component,
                  "app.kubernetes.io/name": "secvec"}  # fmt: skip
        assert selector["matchLabels"].items() <= labels.items()
        for expression in selector.get("matchExpressions", []):
            assert labels[expression["key"]] in expression["values"]
    assert "NetworkPolicy" not in kinds(render("networkPolicy.enabled=false"))
    assert "authOptions" not in find(render("rayJob.auth.enabled=false"), "RayJob")["spec"]["rayClusterSpec"]


def json_key(condition: dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(condition.items()) if k != "ttlSeconds")


def test_the_run_again_command_runs_the_given_spec_with_the_release_cluster(tools: Path) -> None:
    """NOTES.txt's command: `secvec submit my-pipeline.yaml --template <ConfigMap's rayjob-template.yaml>`."""
    notes = _notes()
    assert "--template rayjob-template.yaml" in notes and "jsonpath='{.data.rayjob-template\\.yaml}'" in notes
    objects = render()
    template = yaml.safe_load(find(objects, "ConfigMap")["data"]["rayjob-template.yaml"])
    mine = (
        (REPO_ROOT / "workflows" / "examples" / "cluster-smollm2.yaml")
        .read_text()
        .replace("name: cluster-smollm2", "name: my-pipeline")
    )
    rayjob = kube.render_rayjob(mine, namespace=NAMESPACE, template=template)
    assert validation_errors([rayjob]) == []
    assert rayjob["metadata"]["name"].startswith("my-pipeline-")
    for where, pod in ray_pods(rayjob):
        assert not [v for v in pod["volumes"] if "configMap" in v], where  # the release's spec is not mounted
        (init,) = pod["initContainers"]
        assert init["env"][0]["value"] == mine and pss_restricted_violations(pod) == []
    assert kube.check_cluster_spec(kube.parse_pipeline_spec(mine), rayjob["spec"]) == []


def test_mlflow_waits_for_the_database_and_restarts_on_config_changes(tools: Path) -> None:
    pod_template = find(render(), "Deployment")["spec"]["template"]
    (wait,) = [i for i in pod_template["spec"]["initContainers"] if i["name"] == "wait-for-db"]
    assert wait["image"].startswith("postgres:") and "pg_isready" in wait["command"][-1]
    checksum = pod_template["metadata"]["annotations"]["checksum/config"]
    changed = find(render("mlflow.workers=4"), "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert changed["checksum/config"] != checksum
    external = find(render(values=(CHART / "ci" / "external-database-values.yaml",)), "Deployment")
    # No bundled database to wait for (the basic-auth config writer, on by default, stays).
    assert [i["name"] for i in external["spec"]["template"]["spec"]["initContainers"]] == ["auth-config"]


def test_scheduled_submitter_jobs_have_a_deadline(tools: Path) -> None:
    cronjob = find(render(values=(CHART / "ci" / "schedule-cronjob-values.yaml",)), "CronJob")
    assert cronjob["spec"]["jobTemplate"]["spec"]["activeDeadlineSeconds"] == 600


# --- MLflow basic auth on by default, database URI only in the environment ----------------------------


def test_mlflow_basic_auth_is_on_by_default_with_a_generated_admin_secret(tools: Path) -> None:
    """Without auth any pod that reaches MLflow could move `champion` past the gate (issue 13, item 8)."""
    from mlflow import environment_variables as mlflow_env

    objects = render()
    pod = find(objects, "Deployment")["spec"]["template"]["spec"]
    assert option(container(pod, "mlflow")["command"], "--app-name") == "basic-auth"
    admin = find(objects, "Secret", f"{RELEASE}-secvec-mlflow-admin")
    assert set(admin["data"]) == {"username", "password"}
    assert admin["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"  # the database outlives the release
    reference = {"name": admin["metadata"]["name"], "key": "password"}
    server_env = env_of(container(pod, "mlflow"))
    assert server_env[mlflow_env.MLFLOW_AUTH_ADMIN_PASSWORD.name]["valueFrom"]["secretKeyRef"] == reference
    assert server_env[mlflow_env.MLFLOW_AUTH_CONFIG_PATH.name]["value"] == "/auth/basic_auth.ini"
    assert mlflow_env.MLFLOW_FLASK_SERVER_SECRET_KEY.name in server_env
    pods = ray_pods(find(objects, "RayJob"))
    assert len(pods) == 2
    for where, ray_pod in pods:  # the pipeline's client logs in with the same admin credentials
        ray_env = env_of(ray_pod["containers"][0])
        assert ray_env[mlflow_env.MLFLOW_TRACKING_PASSWORD.name]["valueFrom"]["secretKeyRef"] == reference, where
        assert ray_env[mlflow_env.MLFLOW_TRACKING_USERNAME.name]["valueFrom"]["secretKeyRef"]["key"] == "username"
    given = render("mlflow.auth.existingSecret=my-admin")
    assert f"{RELEASE}-secvec-mlflow-admin" not in [o["metadata"]["name"] for o in given if o["kind"] == "Secret"]
    off = render("mlflow.auth.enabled=false")
    assert "--app-name" not in mlflow_args(off)
    assert {o["metadata"]["name"] for o in off if o["kind"] == "Secret"} == {f"{RELEASE}-secvec-postgresql"}


def test_the_pipeline_client_sends_the_credentials_the_chart_gives_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """MLFLOW_TRACKING_USERNAME/PASSWORD, as the chart sets them on the Ray pods, reach the server as
    HTTP basic auth from MlflowClient (a local stand-in server that refuses anything else)."""
    import base64
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from mlflow.tracking import MlflowClient

    expected = "Basic " + base64.b64encode(b"admin:s3cret").decode()
    seen: list[str | None] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            seen.append(self.headers.get("Authorization"))
            ok = self.headers.get("Authorization") == expected
            body = json.dumps({"experiments": []} if ok else {"error_code": "UNAUTHENTICATED"}).encode()
            self.send_response(200 if ok else 401)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self) -> None:  # noqa: N802
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.do_GET()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "s3cret")
    try:
        client = MlflowClient(tracking_uri=f"http://127.0.0.1:{server.server_address[1]}")
        assert list(client.search_experiments()) == []
    finally:
        server.shutdown()
    assert seen and set(seen) == {expected}


def test_no_container_argument_holds_the_database_uri_or_a_password(tools: Path) -> None:
    """`mlflow server`, `mlflow db upgrade` and the auth init container read the URI from the environment:
    arguments show in `ps`, in events and in `kubectl describe`."""
    checked = 0
    for values in CI_VALUES:
        for obj in render(values=(values,)):
            for where, pod in pod_specs(obj):
                for item in pod["containers"] + pod.get("initContainers", []):
                    for argument in item.get("command", []) + item.get("args", []):
                        text = str(argument)
                        assert "PASSWORD)" not in text, f"{values.name}: {where} {item['name']}: {text}"
                        assert not ("://" in text and "@" in text.split("://", 1)[1].split("/", 1)[0]), text
                        assert "--backend-store-uri" not in text and "$(MLFLOW_BACKEND_STORE_URI)" not in text
                    checked += 1
    assert checked >= 30


def test_generated_passwords_are_documented_as_unstable_under_helm_template() -> None:
    """`helm template` (GitOps) cannot read a Secret back: every generated password changes on each render,
    so values.yaml and docs/kubernetes.md must say that `existingSecret` is required there."""
    values_text = (CHART / "values.yaml").read_text()
    for section in ("postgresql:", "mlflow:"):
        block = values_text[values_text.index(f"\n{section}") :]
        block = block[block.index("\n  auth:") :]
        comment = block[: block.index("existingSecret:")].rsplit("# --", 1)[1]
        assert "helm template" in comment, section
    docs = " ".join((REPO_ROOT / "docs" / "kubernetes.md").read_text().split())
    assert "set `postgresql.auth.existingSecret`" in docs and "`mlflow.auth.existingSecret`" in docs
    assert "Under `helm template` both are **required**" in docs


# --- ServiceAccount, Ingress and scheduling options (community mlflow chart / KubeRay conventions) ------

INGRESS_VALUES = CHART / "ci" / "ingress-values.yaml"


def test_service_account_is_created_and_used_by_mlflow_and_the_ray_pods(tools: Path) -> None:
    objects = render(values=(INGRESS_VALUES,))
    account = find(objects, "ServiceAccount", f"{RELEASE}-secvec")
    assert account["automountServiceAccountToken"] is False
    assert account["metadata"]["annotations"] == {"eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/secvec"}
    users = [find(objects, "Deployment")["spec"]["template"]["spec"], find(objects, "Job")["spec"]["template"]["spec"]]
    users += [pod for _, pod in ray_pods(find(objects, "RayJob"))]
    assert len(users) == 4
    for pod in users:  # an identity (e.g. IRSA for S3), never an API token
        assert pod["serviceAccountName"] == f"{RELEASE}-secvec" and pod["automountServiceAccountToken"] is False
    submitter = find(objects, "RayJob")["spec"]["submitterPodTemplate"]["spec"]
    assert "serviceAccountName" not in submitter  # `ray job submit` needs no cloud identity
    external = render("serviceAccount.create=false")
    assert "ServiceAccount" not in kinds(external)
    assert find(external, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == "default"
    own = render("pipeline.serviceAccountName=training")
    assert {pod["serviceAccountName"] for _, pod in ray_pods(find(own, "RayJob"))} == {"training"}
    assert find(own, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == f"{RELEASE}-secvec"


def test_mlflow_ingress_is_off_by_default_and_its_hosts_are_allowed_when_on(tools: Path) -> None:
    from mlflow.server.security_utils import is_allowed_host_header

    assert "Ingress" not in kinds(render())
    objects = render(values=(INGRESS_VALUES,))
    ingress = find(objects, "Ingress")
    assert ingress["spec"]["ingressClassName"] == "nginx"
    assert ingress["spec"]["tls"] == [{"secretName": "mlflow-tls", "hosts": ["mlflow.example.com"]}]
    (rule,) = ingress["spec"]["rules"]
    assert rule["host"] == "mlflow.example.com"
    backend = rule["http"]["paths"][0]["backend"]["service"]
    assert backend["name"] == find(objects, "Service", f"{RELEASE}-secvec-mlflow")["metadata"]["name"]
    assert backend["port"] == {"name": "http"}
    allowed = option(mlflow_args(objects), "--allowed-hosts").split(",")
    for host in ("mlflow.example.com", "mlflow.example.com:443"):  # else every API call through it gets 403
        assert is_allowed_host_header(allowed, host), host
    result = _template("helm3", (str(DEFAULT_VALUES),), ("mlflow.ingress.enabled=true",))
    assert result.returncode != 0 and "hosts" in result.stderr


def test_mlflow_pods_take_affinity_priority_class_and_annotations(tools: Path) -> None:
    template = find(render(values=(INGRESS_VALUES,)), "Deployment")["spec"]["template"]
    metadata, pod = template["metadata"], template["spec"]
    assert pod["priorityClassName"] == "platform-services"
    term = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"][0]
    assert term["matchExpressions"][0]["key"] == "node-role.example.com/services"
    assert metadata["annotations"]["prometheus.io/scrape"] == "false" and "checksum/config" in metadata["annotations"]
    default = find(render(), "Deployment")["spec"]["template"]["spec"]
    assert not {"priorityClassName", "affinity"} & set(default)


# --- the chart README, generated from the `# --` comments ----------------------------------------------


def _chart_readme() -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location("chart_readme", REPO_ROOT / "tools" / "chart_readme.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_chart_readme_values_table_is_generated_from_values_yaml_and_up_to_date(tmp_path: Path) -> None:
    """charts/secvec/README.md's table is what tools/chart_readme.py makes of values.yaml now: a value
    added, changed or documented differently without regenerating it fails here."""
    chart_readme = _chart_readme()
    assert chart_readme.main(["--check"]) == 0, "charts/secvec/README.md is stale: run python tools/chart_readme.py"
    values_text = (CHART / "values.yaml").read_text()
    documented = chart_readme.documented_keys(values_text)
    assert len(documented) == values_text.count("# --")
    readme = (CHART / "README.md").read_text()
    for key in ("image.repository", "mlflow.auth.enabled", "mlflow.ingress.hosts", "serviceAccount.annotations",
                "rayJob.gpuWorkers.replicas", "kuberay-operator.enabled"):  # fmt: skip
        assert f"| `{key}` |" in readme, key
    assert "| `mlflow.auth.enabled` | bool | `true` |" in readme
    # A changed default makes the README stale.
    copy = tmp_path / "chart"
    copy.mkdir()
    (copy / "README.md").write_text(readme)
    (copy / "values.yaml").write_text(values_text.replace("  workers: 2\n", "  workers: 3\n", 1))
    assert chart_readme.main(["--check", "--chart", str(copy)]) == 1
    assert chart_readme.main(["--chart", str(copy)]) == 0
    assert "| `mlflow.workers` | int | `3` |" in (copy / "README.md").read_text()
