"""Run a secvec pipeline on Kubernetes as a KubeRay ``RayJob`` (ray.io/v1): render, submit, wait.

The rendered RayJob is self-contained, so ``secvec submit`` needs RBAC on ``rayjobs`` only:

- the pipeline spec (opaque YAML text) travels in the pod template as the environment variable
  ``SECVEC_PIPELINE_YAML`` of an init container that writes it to ``/config/pipeline.yaml`` on an
  ``emptyDir`` shared with the Ray container, on the head (where the driver runs) and on every worker;
- the entrypoint is ``secvec run /config/pipeline.yaml``, the same as in the Helm chart, which mounts
  a ConfigMap at ``/config`` instead. A template whose pods already mount ``/config`` is left alone.

The worker group is sized from keyword arguments, else from the spec's optional ``scaling:`` mapping
(``num_workers``, ``use_gpu``, ``resources_per_worker``), else one worker with one GPU.
"""

from __future__ import annotations

import copy
import datetime as dt
import logging
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import yaml

logger = logging.getLogger(__name__)

RAY_API_GROUP = "ray.io"
RAY_API_VERSION = "v1"
PIPELINE_DIR = "/config"
PIPELINE_PATH = f"{PIPELINE_DIR}/pipeline.yaml"
ENTRYPOINT = f"secvec run {PIPELINE_PATH}"
PIPELINE_ENV_VAR = "SECVEC_PIPELINE_YAML"
GPU_RESOURCE = "nvidia.com/gpu"
# KubeRay rejects longer RayJob names (the RayCluster gets a 6-character suffix, 53 at most).
MAX_RAYJOB_NAME_LENGTH = 47
MAX_RAYCRONJOB_NAME_LENGTH = 30
PLURALS = {"RayJob": "rayjobs", "RayCronJob": "raycronjobs"}
# status.jobDeploymentStatus values after which KubeRay does nothing more for the RayJob.
TERMINAL_DEPLOYMENT_STATUSES = frozenset({"Complete", "Failed"})
_RAY_UID = 1000  # the `ray` user of the rayproject/ray images
_RAY_GID = 100


def _package_version(name: str, fallback: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return fallback


DEFAULT_IMAGE = f"secvec:{_package_version('secvec', 'latest')}"
DEFAULT_RAY_VERSION = _package_version("ray", "2.60.0")


class KubeError(RuntimeError):
    """A Kubernetes call failed; the message is one line meant for the user."""


class PipelineSpecError(ValueError):
    """The pipeline spec is not a YAML mapping."""


def parse_pipeline_spec(pipeline_yaml: str) -> dict[str, Any]:
    """Parse the spec only to check that it is a YAML mapping (its schema belongs to workflows.specs)."""
    try:
        spec = yaml.safe_load(pipeline_yaml)
    except yaml.YAMLError as error:
        raise PipelineSpecError(f"pipeline spec is not valid YAML: {error}".replace("\n", " ")) from error
    if not isinstance(spec, dict):
        raise PipelineSpecError(f"pipeline spec must be a YAML mapping, got {type(spec).__name__}")
    return spec


def dns_label(text: str, max_length: int = MAX_RAYJOB_NAME_LENGTH) -> str:
    """Turn free text into a DNS-1035 label (lower case, starts with a letter), as KubeRay requires."""
    label = re.sub(r"[^a-z0-9-]+", "-", text.lower())
    label = re.sub(r"-{2,}", "-", re.sub(r"^[^a-z]+", "", label))
    label = label[:max_length].strip("-")
    return label or "secvec"


def default_rayjob_name(spec: Mapping[str, Any], now: dt.datetime | None = None) -> str:
    """``<spec name or 'secvec'>-<UTC yyyymmdd-hhmmss>``: a fresh name per submission."""
    stamp = (now or dt.datetime.now(dt.timezone.utc)).strftime("%Y%m%d-%H%M%S")
    base = dns_label(str(spec.get("name") or "secvec"), MAX_RAYJOB_NAME_LENGTH - len(stamp) - 1)
    return f"{base}-{stamp}"


@dataclass(frozen=True)
class WorkerSizing:
    """The GPU worker group: how many pods, GPUs each, and CPU/memory requests (None: unset)."""

    num_workers: int
    gpus_per_worker: int
    cpu: str | None = None
    memory: str | None = None


def worker_sizing(
    spec: Mapping[str, Any], *, num_workers: int | None = None, gpus_per_worker: int | None = None
) -> WorkerSizing:
    """Size the worker group: explicit arguments win, then the spec's ``scaling:``, then 1 worker, 1 GPU."""
    scaling = spec.get("scaling") or {}
    if not isinstance(scaling, Mapping):
        raise PipelineSpecError("pipeline spec 'scaling' must be a mapping")
    per_worker = scaling.get("resources_per_worker") or {}
    if not isinstance(per_worker, Mapping):
        raise PipelineSpecError("pipeline spec 'scaling.resources_per_worker' must be a mapping")
    if gpus_per_worker is None:
        if "GPU" in per_worker:
            gpus_per_worker = int(per_worker["GPU"])
        else:
            gpus_per_worker = 1 if scaling.get("use_gpu", True) else 0
    if num_workers is None:
        num_workers = int(scaling.get("num_workers", 1))
    if num_workers < 0 or gpus_per_worker < 0:
        raise PipelineSpecError("num_workers and gpus_per_worker must not be negative")
    cpu = per_worker.get("CPU")
    memory = per_worker.get("memory")  # bytes, as in Ray
    return WorkerSizing(
        num_workers=num_workers,
        gpus_per_worker=gpus_per_worker,
        cpu=None if cpu is None else str(cpu),
        memory=None if memory is None else str(int(memory)),
    )


def parse_toleration(text: str) -> dict[str, str]:
    """``KEY[=VALUE][:EFFECT]`` (kubectl taint syntax) to a toleration; without VALUE it is ``Exists``."""
    key_value, _, effect = text.partition(":")
    key, has_value, value = key_value.partition("=")
    if not key:
        raise ValueError(f"toleration {text!r}: expected KEY[=VALUE][:EFFECT]")
    toleration = {"key": key, "operator": "Equal" if has_value else "Exists"}
    if has_value:
        toleration["value"] = value
    if effect:
        if effect not in ("NoSchedule", "PreferNoSchedule", "NoExecute"):
            raise ValueError(f"toleration {text!r}: effect must be NoSchedule, PreferNoSchedule or NoExecute")
        toleration["effect"] = effect
    return toleration


def _env(mlflow_tracking_uri: str | None, mlflow_auth_secret: str | None) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = []
    if mlflow_tracking_uri:
        env.append({"name": "MLFLOW_TRACKING_URI", "value": mlflow_tracking_uri})
    if mlflow_auth_secret:
        for var, key in (("MLFLOW_TRACKING_USERNAME", "username"), ("MLFLOW_TRACKING_PASSWORD", "password")):
            env.append({"name": var, "valueFrom": {"secretKeyRef": {"name": mlflow_auth_secret, "key": key}}})
    return env


def _pod_template(
    *,
    role: str,
    image: str,
    env: list[dict[str, Any]],
    resources: dict[str, dict[str, Any]],
    node_selector: Mapping[str, str] | None = None,
    tolerations: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": f"ray-{role}",
        "image": image,
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
        "resources": resources,
    }
    if env:
        container["env"] = copy.deepcopy(env)
    if role == "head":
        container["ports"] = [
            {"name": "gcs", "containerPort": 6379},
            {"name": "dashboard", "containerPort": 8265},
            {"name": "client", "containerPort": 10001},
        ]
    spec: dict[str, Any] = {
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": _RAY_UID,
            "runAsGroup": _RAY_GID,
            "fsGroup": _RAY_GID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
    }
    if node_selector:
        spec["nodeSelector"] = dict(node_selector)
    if tolerations:
        spec["tolerations"] = list(tolerations)
    return {"metadata": {"labels": {"app.kubernetes.io/name": "secvec", "ray.io/role": role}}, "spec": spec}


def _pod_templates(rayjob_spec: Mapping[str, Any]) -> list[dict[str, Any]]:
    cluster = rayjob_spec.get("rayClusterSpec") or {}
    templates = [cluster.get("headGroupSpec", {}).get("template")]
    templates += [group.get("template") for group in cluster.get("workerGroupSpecs") or []]
    return [template for template in templates if template]


def _mounts_pipeline_dir(template: Mapping[str, Any]) -> bool:
    containers = template.get("spec", {}).get("containers") or []
    return bool(containers) and any(
        mount.get("mountPath") == PIPELINE_DIR for mount in containers[0].get("volumeMounts") or []
    )


def _inject_pipeline(template: dict[str, Any], pipeline_yaml: str, image: str) -> None:
    """Deliver the spec into /config/pipeline.yaml of this pod through an init container (or refresh
    the one a template rendered by this module already has)."""
    spec = template.setdefault("spec", {})
    for init in spec.get("initContainers") or []:
        if init.get("name") == "secvec-pipeline":
            init["env"] = [{"name": PIPELINE_ENV_VAR, "value": pipeline_yaml}]
            return
    if _mounts_pipeline_dir(template):
        return
    spec.setdefault("volumes", []).append({"name": "secvec-pipeline", "emptyDir": {}})
    mount = {"name": "secvec-pipeline", "mountPath": PIPELINE_DIR}
    spec["containers"][0].setdefault("volumeMounts", []).append({**mount, "readOnly": True})
    spec.setdefault("initContainers", []).insert(
        0,
        {
            "name": "secvec-pipeline",
            "image": spec["containers"][0].get("image", image),
            "command": ["sh", "-c", f'printf "%s" "${PIPELINE_ENV_VAR}" > {PIPELINE_PATH}'],
            "env": [{"name": PIPELINE_ENV_VAR, "value": pipeline_yaml}],
            "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
            "resources": {"requests": {"cpu": "10m", "memory": "32Mi"}, "limits": {"memory": "64Mi"}},
            "volumeMounts": [mount],
        },
    )


def render_rayjob(
    pipeline_yaml: str,
    *,
    name: str | None = None,
    namespace: str = "default",
    image: str = DEFAULT_IMAGE,
    gpus_per_worker: int | None = None,
    num_workers: int | None = None,
    mlflow_tracking_uri: str | None = None,
    mlflow_auth_secret: str | None = None,
    worker_node_selector: Mapping[str, str] | None = None,
    worker_tolerations: list[dict[str, Any]] | None = None,
    gpu_resource_name: str = GPU_RESOURCE,
    ray_version: str = DEFAULT_RAY_VERSION,
    ttl_seconds_after_finished: int = 600,
    active_deadline_seconds: int = 86400,
    backoff_limit: int = 0,
    labels: Mapping[str, str] | None = None,
    template: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Return a RayJob (ray.io/v1) whose entrypoint runs ``secvec run /config/pipeline.yaml``.

    ``template``: a RayJob manifest to start from instead of the built-in cluster (the chart's
    CronJob passes the chart's own); then the sizing arguments must be left unset. Its name,
    namespace and entrypoint are replaced; its labels are kept. ``mlflow_auth_secret`` names a
    Secret with keys ``username`` and ``password`` for MLflow basic auth.
    """
    spec = parse_pipeline_spec(pipeline_yaml)
    name = name or default_rayjob_name(spec)
    if len(name) > MAX_RAYJOB_NAME_LENGTH or dns_label(name) != name:
        raise ValueError(f"RayJob name {name!r} must be a DNS-1035 label of at most {MAX_RAYJOB_NAME_LENGTH}")
    object_labels = {"app.kubernetes.io/name": "secvec", "app.kubernetes.io/created-by": "secvec-cli"}
    if template is not None:
        sizing_given = (num_workers, gpus_per_worker, worker_node_selector, worker_tolerations)
        if any(value is not None for value in sizing_given):
            raise ValueError("a RayJob template already sizes the cluster: drop the sizing options")
        if template.get("kind", "RayJob") != "RayJob":
            raise ValueError(f"template must be a RayJob, got kind {template.get('kind')!r}")
        rayjob_spec = copy.deepcopy(dict(template.get("spec") or {}))
        if not rayjob_spec.get("rayClusterSpec"):
            raise ValueError("template has no spec.rayClusterSpec")
        object_labels.update((template.get("metadata") or {}).get("labels") or {})
    else:
        sizing = worker_sizing(spec, num_workers=num_workers, gpus_per_worker=gpus_per_worker)
        env = _env(mlflow_tracking_uri, mlflow_auth_secret)
        worker_resources: dict[str, dict[str, Any]] = {
            "requests": {"cpu": sizing.cpu or "2", "memory": sizing.memory or "8Gi"},
            "limits": {"memory": sizing.memory or "8Gi"},
        }
        if sizing.gpus_per_worker:
            worker_resources["requests"][gpu_resource_name] = sizing.gpus_per_worker
            worker_resources["limits"][gpu_resource_name] = sizing.gpus_per_worker
        head_resources = {"requests": {"cpu": "1", "memory": "4Gi"}, "limits": {"memory": "4Gi"}}
        rayjob_spec = {
            "submissionMode": "K8sJobMode",
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": ttl_seconds_after_finished,
            "activeDeadlineSeconds": active_deadline_seconds,
            "backoffLimit": backoff_limit,
            "rayClusterSpec": {
                "rayVersion": ray_version,
                "headGroupSpec": {
                    # No GPU work on the head: the driver runs there, training runs on the workers.
                    "rayStartParams": {"dashboard-host": "0.0.0.0", "num-gpus": "0"},
                    "template": _pod_template(role="head", image=image, env=env, resources=head_resources),
                },
                "workerGroupSpecs": [
                    {
                        "groupName": "gpu-workers" if sizing.gpus_per_worker else "workers",
                        "replicas": sizing.num_workers,
                        "minReplicas": sizing.num_workers,
                        "maxReplicas": sizing.num_workers,
                        "rayStartParams": {},
                        "template": _pod_template(
                            role="worker",
                            image=image,
                            env=env,
                            resources=worker_resources,
                            node_selector=worker_node_selector,
                            tolerations=worker_tolerations,
                        ),
                    }
                ],
            },
        }
    rayjob_spec = {"entrypoint": ENTRYPOINT, **{k: v for k, v in rayjob_spec.items() if k != "entrypoint"}}
    for pod_template in _pod_templates(rayjob_spec):
        _inject_pipeline(pod_template, pipeline_yaml, image)
    object_labels.update(labels or {})
    return {
        "apiVersion": f"{RAY_API_GROUP}/{RAY_API_VERSION}",
        "kind": "RayJob",
        "metadata": {"name": name, "namespace": namespace, "labels": object_labels},
        "spec": rayjob_spec,
    }


def render_raycronjob(
    pipeline_yaml: str,
    *,
    schedule: str,
    name: str | None = None,
    namespace: str = "default",
    time_zone: str | None = None,
    suspend: bool = False,
    **rayjob_options: Any,
) -> dict[str, Any]:
    """Return a RayCronJob (ray.io/v1, KubeRay 1.6+ with the operator's ``RayCronJob`` feature gate)
    that creates the RayJob of :func:`render_rayjob` on the cron ``schedule``."""
    spec = parse_pipeline_spec(pipeline_yaml)
    name = name or dns_label(str(spec.get("name") or "secvec"), MAX_RAYCRONJOB_NAME_LENGTH)
    if len(name) > MAX_RAYCRONJOB_NAME_LENGTH or dns_label(name) != name:
        raise ValueError(f"RayCronJob name {name!r} must be a DNS-1035 label of at most 30 characters")
    rayjob = render_rayjob(pipeline_yaml, name=name, namespace=namespace, **rayjob_options)
    cron_spec: dict[str, Any] = {"schedule": schedule, "suspend": suspend, "jobTemplate": rayjob["spec"]}
    if time_zone:
        cron_spec["timeZone"] = time_zone
    return {
        "apiVersion": rayjob["apiVersion"],
        "kind": "RayCronJob",
        "metadata": rayjob["metadata"],
        "spec": cron_spec,
    }


def load_api_client(*, in_cluster: bool = False, kubeconfig: str | None = None, context: str | None = None):
    """An ``ApiClient`` from the pod's service account or from a kubeconfig (``$KUBECONFIG``, ~/.kube/config)."""
    from kubernetes import client, config

    try:
        if in_cluster:
            configuration = client.Configuration()
            config.load_incluster_config(client_configuration=configuration)
            return client.ApiClient(configuration)
        return config.new_client_from_config(config_file=kubeconfig, context=context)
    except config.ConfigException as error:
        where = "in-cluster service account" if in_cluster else f"kubeconfig {kubeconfig or '(default)'}"
        raise KubeError(f"cannot load Kubernetes credentials from {where}: {error}") from error


def _describe_api_error(error: Exception, *, action: str, namespace: str, server: str) -> KubeError:
    """One line for an ApiException or a connection failure."""
    import json

    from kubernetes.client.exceptions import ApiException

    if not isinstance(error, ApiException):
        reason = str(getattr(error, "reason", None) or error).splitlines()[0]
        return KubeError(f"cannot reach the Kubernetes API server at {server}: {reason}")
    try:
        body = json.loads(error.body or "{}")
    except (TypeError, ValueError):
        body = {}
    message = body.get("message") or error.reason or ""
    status = error.status
    if status == 401:
        return KubeError(f"unauthorized (401) at {server}: check the kubeconfig credentials")
    if status == 403:
        return KubeError(f"forbidden (403): cannot {action} in namespace {namespace!r}: {message}")
    if status == 404:
        if (body.get("details") or {}).get("kind") == "namespaces":
            return KubeError(f"namespace {namespace!r} not found (404)")
        return KubeError(
            f"not found (404) while trying to {action}: is the KubeRay operator installed "
            f"(CRD rayjobs.{RAY_API_GROUP}/{RAY_API_VERSION})? {message}".rstrip()
        )
    return KubeError(f"Kubernetes API error {status} while trying to {action}: {message}")


def _server_of(api_client: Any) -> str:
    return getattr(getattr(api_client, "configuration", None), "host", "?")


def submit_rayjob(
    obj: Mapping[str, Any],
    *,
    namespace: str,
    api_client: Any = None,
    in_cluster: bool = False,
    kubeconfig: str | None = None,
    context: str | None = None,
) -> str:
    """Create the RayJob (or RayCronJob) ``obj`` in ``namespace``; return the created object's name."""
    import urllib3
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    kind = obj.get("kind", "RayJob")
    plural = PLURALS.get(kind)
    if plural is None:
        raise ValueError(f"cannot submit kind {kind!r}: expected RayJob or RayCronJob")
    api_client = api_client or load_api_client(in_cluster=in_cluster, kubeconfig=kubeconfig, context=context)
    body = copy.deepcopy(dict(obj))
    body.setdefault("metadata", {})["namespace"] = namespace
    api = client.CustomObjectsApi(api_client)
    try:
        created = api.create_namespaced_custom_object(
            group=RAY_API_GROUP, version=RAY_API_VERSION, namespace=namespace, plural=plural, body=body
        )
    except (ApiException, urllib3.exceptions.HTTPError, OSError) as error:
        action = f"create {plural}.{RAY_API_GROUP}"
        raise _describe_api_error(error, action=action, namespace=namespace, server=_server_of(api_client)) from error
    created_name = created["metadata"]["name"]
    logger.info("created %s %s/%s", kind, namespace, created_name)
    return created_name


@dataclass(frozen=True)
class RayJobStatus:
    """``status.jobStatus`` (Ray: PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED) and
    ``status.jobDeploymentStatus`` (KubeRay: Initializing, Running, Complete, Failed, Retrying, ...)."""

    job_status: str = ""
    deployment_status: str = ""
    message: str = ""
    reason: str = ""

    @classmethod
    def from_object(cls, obj: Mapping[str, Any]) -> RayJobStatus:
        status = obj.get("status") or {}
        return cls(
            job_status=status.get("jobStatus") or "",
            deployment_status=status.get("jobDeploymentStatus") or "",
            message=status.get("message") or "",
            reason=status.get("reason") or "",
        )

    @property
    def finished(self) -> bool:
        """KubeRay is done with the RayJob (retries, if any, are over)."""
        return self.deployment_status in TERMINAL_DEPLOYMENT_STATUSES

    @property
    def succeeded(self) -> bool:
        return self.deployment_status == "Complete" and self.job_status == "SUCCEEDED"

    def describe(self) -> str:
        text = f"{self.deployment_status or 'New'} / {self.job_status or '-'}"
        return f"{text} ({self.reason or self.message})" if (self.reason or self.message) else text


def wait_for_rayjob(
    name: str,
    namespace: str,
    timeout_s: float,
    poll_s: float = 5.0,
    api: Any = None,
    *,
    on_status: Callable[[RayJobStatus], None] | None = None,
) -> RayJobStatus:
    """Poll the RayJob until KubeRay reports it Complete or Failed; return that final status.

    ``api`` is a ``CustomObjectsApi`` or an ``ApiClient`` (default: from the kubeconfig).
    ``on_status`` is called whenever the status changes. Raises ``KubeError`` on API errors and
    ``TimeoutError`` when ``timeout_s`` passes first; check ``.succeeded`` of the result.
    """
    import urllib3
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    if api is None:
        api = load_api_client()
    if not isinstance(api, client.CustomObjectsApi):
        api = client.CustomObjectsApi(api)
    deadline = time.monotonic() + timeout_s
    last: RayJobStatus | None = None
    while True:
        try:
            obj = api.get_namespaced_custom_object(
                group=RAY_API_GROUP, version=RAY_API_VERSION, namespace=namespace, plural="rayjobs", name=name
            )
        except (ApiException, urllib3.exceptions.HTTPError, OSError) as error:
            action = f"get rayjobs.{RAY_API_GROUP} {name}"
            server = _server_of(api.api_client)
            raise _describe_api_error(error, action=action, namespace=namespace, server=server) from error
        status = RayJobStatus.from_object(obj)
        if status != last:
            logger.info("RayJob %s/%s: %s", namespace, name, status.describe())
            if on_status is not None:
                on_status(status)
            last = status
        if status.finished:
            return status
        if time.monotonic() + poll_s > deadline:
            raise TimeoutError(f"RayJob {namespace}/{name} still {status.describe()} after {timeout_s:g} s")
        time.sleep(poll_s)


class _NoAliasDumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:
        return True


def to_yaml(*objects: Mapping[str, Any]) -> str:
    """Objects as a multi-document YAML stream, keys in insertion order, no YAML anchors."""
    return "---\n".join(yaml.dump(dict(obj), Dumper=_NoAliasDumper, sort_keys=False, width=110) for obj in objects)
