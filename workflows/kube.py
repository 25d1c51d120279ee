"""Run a secvec pipeline on Kubernetes as a KubeRay ``RayJob`` (ray.io/v1): render, submit, wait.

The rendered RayJob is self-contained, so ``secvec submit`` needs RBAC on ``rayjobs`` only:

- the pipeline spec (opaque YAML text) travels in the pod template as the environment variable
  ``SECVEC_PIPELINE_YAML`` of an init container that writes it to ``/config/pipeline.yaml`` on an
  ``emptyDir`` shared with the Ray container, on the head (where the driver runs) and on every worker;
- the entrypoint is ``secvec run /config/pipeline.yaml``, the same as in the Helm chart, which mounts
  a ConfigMap at ``/config`` instead. A template that mounts something at ``/config`` (the chart's
  RayJob) has that mount replaced, so the spec given is the spec that runs.

The worker group follows the spec's ``scaling`` read through ``workflows.specs.ScalingSpec`` (so a spec
without one gets the pipeline's own defaults: 2 workers, no GPU, 1 CPU each): one Ray Train worker per
pod. Sizing arguments must agree with the spec; a mismatch would leave Ray Train waiting forever.
The rendered cluster is locked down as the chart's is: Ray token auth, a restricted submitter pod,
no service-account token in the Ray pods, KubeRay deletion rules, a deadline for the cluster to start.
"""

from __future__ import annotations

import copy
import datetime as dt
import logging
import re
import secrets
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
# status.jobDeploymentStatus values after which KubeRay does nothing more for the RayJob
# (ValidationFailed: the operator rejected the spec and will not retry it).
TERMINAL_DEPLOYMENT_STATUSES = frozenset({"Complete", "Failed", "ValidationFailed"})
_RAY_UID = 1000  # the `ray` user of the rayproject/ray images
_RAY_GID = 100
# (connect, read) seconds of every Kubernetes API call: a hung connection must not hang `submit`.
REQUEST_TIMEOUT = (10, 60)
DATA_MOUNT_PATH = "/data"
_RESTRICTED_CONTAINER = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
_RESTRICTED_POD = {
    "runAsNonRoot": True,
    "runAsUser": _RAY_UID,
    "runAsGroup": _RAY_GID,
    "fsGroup": _RAY_GID,
    "seccompProfile": {"type": "RuntimeDefault"},
}


def _package_version(name: str, fallback: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return fallback


# The GPU build's tag (docs/kubernetes.md, step 1); the registry is the user's, so there is no default image.
DEFAULT_IMAGE_TAG = f"{_package_version('secvec', '0.1.0')}-gpu"
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
    """``<spec name or 'secvec'>-<UTC yyyymmdd-hhmmss>-<4 random hex>``: a fresh name per submission,
    also for two submissions in the same second (a CronJob retry and a manual run, say)."""
    stamp = (now or dt.datetime.now(dt.timezone.utc)).strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(2)
    base = dns_label(str(spec.get("name") or "secvec"), MAX_RAYJOB_NAME_LENGTH - len(stamp) - 1)
    return f"{base}-{stamp}"


def check_image(image: str) -> str:
    """Refuse an image reference without a registry host: it would resolve to Docker Hub, which has no
    secvec image, and the pods would sit in ImagePullBackOff with their GPUs reserved."""
    host, slash, _ = image.partition("/")
    if not slash or not ("." in host or ":" in host or host == "localhost"):
        raise ValueError(
            f"image {image!r} names no registry host: push the image built from the Dockerfile to your "
            f"registry and pass its path, e.g. registry.example.com/secvec:{DEFAULT_IMAGE_TAG}"
        )
    return image


def uses_path(pipeline_yaml: str, mount_path: str = DATA_MOUNT_PATH) -> bool:
    """Does the spec text refer to ``mount_path`` (``path: /data/x.jsonl``, ``work_dir: /data/w``)?"""
    mount = re.escape(mount_path.rstrip("/"))
    return re.search(rf"(^|[\s:\"'\[{{,=]){mount}(/|[\s\"',}}\]]|$)", pipeline_yaml) is not None


_LOCAL_HOSTS = ("localhost", "127.", "[::1]", "0.0.0.0")


def is_local_tracking_uri(uri: str) -> bool:
    """A tracking URI that only means something inside one pod: a file store, SQLite, or localhost.
    In a RayJob such a store lives on the head and is deleted with the cluster."""
    scheme, sep, rest = uri.partition("://")
    if not sep or scheme in ("file", "sqlite") or scheme.startswith("sqlite"):
        return True
    host = rest.split("/", 1)[0].rsplit("@", 1)[-1]
    return host.startswith(_LOCAL_HOSTS)


@dataclass(frozen=True)
class WorkerSizing:
    """The worker group: how many pods, GPUs each, and CPU/memory requests (None: unset)."""

    num_workers: int
    gpus_per_worker: int
    cpu: str | None = None
    memory: str | None = None


def worker_sizing(
    spec: Mapping[str, Any], *, num_workers: int | None = None, gpus_per_worker: int | None = None
) -> WorkerSizing:
    """Size the worker group from the spec's ``scaling`` (``ScalingSpec`` defaults where absent): one
    Ray Train worker per pod, one GPU per worker when ``use_gpu``. Explicit arguments must agree."""
    from pydantic import ValidationError

    from workflows.specs import ScalingSpec

    scaling_data = spec.get("scaling") or {}
    if not isinstance(scaling_data, Mapping):
        raise PipelineSpecError("pipeline spec 'scaling' must be a mapping")
    try:
        scaling = ScalingSpec.model_validate(dict(scaling_data))
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise PipelineSpecError(f"pipeline spec scaling.{where}: {first['msg']}") from None
    per_worker = scaling.resources_per_worker
    gpus = per_worker.get("GPU", 1.0) if scaling.use_gpu else 0.0
    if gpus != int(gpus):
        raise PipelineSpecError(f"scaling.resources_per_worker.GPU is {gpus:g}: Kubernetes gives whole GPUs")
    if gpus > 1:
        raise PipelineSpecError(
            f"the spec asks {gpus:g} GPUs per Ray Train worker, but each worker trains on one device: "
            "set scaling.resources_per_worker.GPU to 1 and raise scaling.num_workers instead"
        )
    if num_workers is not None and num_workers != scaling.num_workers:
        raise ValueError(
            f"--num-workers {num_workers} but the spec's scaling.num_workers is {scaling.num_workers}: Ray Train "
            "would wait forever for the missing workers; change the spec instead"
        )
    if gpus_per_worker is not None and gpus_per_worker != int(gpus):
        raise ValueError(
            f"--gpus-per-worker {gpus_per_worker} but the spec asks {int(gpus)} GPU(s) per worker "
            "(scaling.use_gpu, resources_per_worker.GPU); change the spec instead"
        )
    cpu = per_worker.get("CPU", 1.0)
    memory = per_worker.get("memory")  # bytes, as in Ray
    return WorkerSizing(
        num_workers=scaling.num_workers,
        gpus_per_worker=int(gpus),
        cpu=f"{cpu:g}",
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
        "securityContext": copy.deepcopy(_RESTRICTED_CONTAINER),
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
        # The pipeline never calls the Kubernetes API.
        "automountServiceAccountToken": False,
        "securityContext": copy.deepcopy(_RESTRICTED_POD),
        "containers": [container],
    }
    if node_selector:
        spec["nodeSelector"] = dict(node_selector)
    if tolerations:
        spec["tolerations"] = list(tolerations)
    return {
        "metadata": {
            "labels": {"app.kubernetes.io/name": "secvec", "ray.io/role": role},
            # A running training pod is not evicted to scale a node down.
            "annotations": {"cluster-autoscaler.kubernetes.io/safe-to-evict": "false"},
        },
        "spec": spec,
    }


def submitter_template(image: str, image_pull_secrets: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The K8sJobMode submitter pod (KubeRay adds the ``ray job submit`` command, the dashboard address
    and, with token auth, the token). Without it KubeRay builds one from the head image with no
    securityContext, no pull secrets and the default service account: Pod Security "restricted"
    rejects it and the Ray cluster holds its GPUs until ``activeDeadlineSeconds``."""
    spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "securityContext": copy.deepcopy(_RESTRICTED_POD),
        "containers": [
            {
                "name": "ray-job-submitter",
                "image": image,
                "securityContext": {**copy.deepcopy(_RESTRICTED_CONTAINER), "readOnlyRootFilesystem": True},
                "env": [{"name": "HOME", "value": "/tmp"}],
                "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "512Mi"}},
                "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
            }
        ],
        "volumes": [{"name": "tmp", "emptyDir": {}}],
    }
    if image_pull_secrets:
        spec["imagePullSecrets"] = copy.deepcopy(image_pull_secrets)
    return {"metadata": {"labels": {"app.kubernetes.io/name": "secvec", "app.kubernetes.io/component": "ray-submitter"}},
            "spec": spec}  # fmt: skip


def deletion_rules(cluster_ttl_seconds: int, rayjob_ttl_seconds: int) -> dict[str, Any]:
    """KubeRay ``deletionStrategy``: the cluster goes ``cluster_ttl_seconds`` after the job ends, the
    RayJob itself (and its submitter Job) ``rayjob_ttl_seconds`` after, so scheduled runs do not pile up."""
    rules = []
    for condition in ({"jobStatus": "SUCCEEDED"}, {"jobStatus": "FAILED"}, {"jobDeploymentStatus": "Failed"}):
        rules.append({"condition": {**condition, "ttlSeconds": cluster_ttl_seconds}, "policy": "DeleteCluster"})
        rules.append({"condition": {**condition, "ttlSeconds": max(cluster_ttl_seconds, rayjob_ttl_seconds)},
                      "policy": "DeleteSelf"})  # fmt: skip
    return {"deletionRules": rules}


def _pod_templates(rayjob_spec: Mapping[str, Any]) -> list[dict[str, Any]]:
    cluster = rayjob_spec.get("rayClusterSpec") or {}
    templates = [cluster.get("headGroupSpec", {}).get("template")]
    templates += [group.get("template") for group in cluster.get("workerGroupSpecs") or []]
    return [template for template in templates if template]


def _mount_paths(template: Mapping[str, Any]) -> set[str]:
    containers = template.get("spec", {}).get("containers") or []
    return (
        {mount.get("mountPath", "").rstrip("/") for mount in (containers[0].get("volumeMounts") or [])}
        if containers
        else set()
    )


def _drop_pipeline_dir_mount(spec: dict[str, Any]) -> None:
    """Remove what a template mounts at /config (the chart's ConfigMap), so that the given spec is the one
    that runs, and the volume it came from when nothing else mounts it."""
    containers = spec.get("containers") or []
    dropped = set()
    for container in containers:
        mounts = container.get("volumeMounts") or []
        dropped |= {m["name"] for m in mounts if m.get("mountPath", "").rstrip("/") == PIPELINE_DIR}
        container["volumeMounts"] = [m for m in mounts if m.get("mountPath", "").rstrip("/") != PIPELINE_DIR]
    still_used = {
        m["name"] for c in containers + (spec.get("initContainers") or []) for m in c.get("volumeMounts") or []
    }
    spec["volumes"] = [v for v in spec.get("volumes") or [] if v["name"] not in dropped - still_used]


def _inject_pipeline(template: dict[str, Any], pipeline_yaml: str, image: str) -> None:
    """Deliver the spec into /config/pipeline.yaml of this pod through an init container (or refresh
    the one a template rendered by this module already has)."""
    spec = template.setdefault("spec", {})
    for init in spec.get("initContainers") or []:
        if init.get("name") == "secvec-pipeline":
            init["env"] = [{"name": PIPELINE_ENV_VAR, "value": pipeline_yaml}]
            return
    _drop_pipeline_dir_mount(spec)
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
            "securityContext": {**copy.deepcopy(_RESTRICTED_CONTAINER), "readOnlyRootFilesystem": True},
            "resources": {"requests": {"cpu": "10m", "memory": "32Mi"}, "limits": {"memory": "64Mi"}},
            "volumeMounts": [mount],
        },
    )


def _mount_data_claim(template: dict[str, Any], claim: str, mount_path: str) -> None:
    spec = template["spec"]
    spec.setdefault("volumes", []).append({"name": "pipeline-data", "persistentVolumeClaim": {"claimName": claim}})
    spec["containers"][0].setdefault("volumeMounts", []).append({"name": "pipeline-data", "mountPath": mount_path})


def _template_env(rayjob_spec: Mapping[str, Any], name: str) -> str | None:
    head = (rayjob_spec.get("rayClusterSpec") or {}).get("headGroupSpec", {}).get("template", {})
    containers = head.get("spec", {}).get("containers") or [{}]
    return next((e.get("value") for e in containers[0].get("env") or [] if e.get("name") == name), None)


def patch_template(template: Mapping[str, Any], operations: Any) -> dict[str, Any]:
    """``template`` with an RFC 6902 JSON patch applied (a new object; the argument is left alone).

    Why: a kustomize overlay changes the applied RayJob with a patch, but cannot reach the CronJob's
    template, a string inside a ConfigMap. The overlay puts the same patch file into the ConfigMap
    (``rayjob-patch.yaml``) and ``secvec submit --template-patch`` applies it, so every scheduled run gets
    exactly what the overlay applied, with no copy of the RayJob to drift apart.
    """
    import jsonpatch  # the kube extra: only `secvec render/submit` need it
    import jsonpointer

    if operations is None:
        operations = []
    if not isinstance(operations, list) or not all(isinstance(op, Mapping) for op in operations):
        raise ValueError("a template patch must be a list of JSON patch operations (RFC 6902), e.g. [] for none")
    try:
        return jsonpatch.apply_patch(dict(template), operations)  # copies: the template is left alone
    except (jsonpatch.JsonPatchException, jsonpointer.JsonPointerException) as error:
        raise ValueError(f"the template patch does not apply: {error}") from error


def check_cluster_spec(
    spec: Mapping[str, Any], rayjob_spec: Mapping[str, Any], *, data_mount_path: str = DATA_MOUNT_PATH
) -> list[str]:
    """Refuse what cannot work on a cluster; return warnings for what probably will not.

    The tracking URI the pods will use (the spec's own ``tracking.tracking_uri``, else the pods'
    ``MLFLOW_TRACKING_URI``) must name a server: SQLite or a file store would live on the head and be
    deleted with the cluster, every result with it. ``work_dir`` holds Ray Train's checkpoints, which
    every node must share."""
    tracking = spec.get("tracking") if isinstance(spec.get("tracking"), Mapping) else {}
    uri = tracking.get("tracking_uri") or _template_env(rayjob_spec, "MLFLOW_TRACKING_URI")
    if not uri:
        raise ValueError(
            "no MLflow tracking URI for the cluster: the pods would fall back to SQLite on the Ray head, "
            "deleted with the cluster; pass --mlflow-tracking-uri (e.g. http://secvec-mlflow.<namespace>.svc:5000)"
        )
    if is_local_tracking_uri(str(uri)):
        raise ValueError(
            f"tracking URI {uri!r} is local to one pod: its runs and models would be deleted with the Ray "
            "cluster; use an MLflow server (--mlflow-tracking-uri, or tracking.tracking_uri in the spec)"
        )
    warnings = []
    work_dir = str(spec.get("work_dir") or ".secvec/work")
    mounted = set.union(set(), *(_mount_paths(t) for t in _pod_templates(rayjob_spec)))
    if not any(work_dir == path or work_dir.startswith(path + "/") for path in mounted - {PIPELINE_DIR, ""}):
        warnings.append(
            f"work_dir {work_dir!r} is not on a volume the Ray pods share (mounted: "
            f"{sorted(mounted - {PIPELINE_DIR, ''}) or 'none'}): Ray Train's checkpoints would be lost with a "
            f"pod; put it under {data_mount_path} and pass --data-claim"
        )
    return warnings


def render_rayjob(
    pipeline_yaml: str,
    *,
    name: str | None = None,
    namespace: str = "default",
    image: str | None = None,
    gpus_per_worker: int | None = None,
    num_workers: int | None = None,
    mlflow_tracking_uri: str | None = None,
    mlflow_auth_secret: str | None = None,
    worker_node_selector: Mapping[str, str] | None = None,
    worker_tolerations: list[dict[str, Any]] | None = None,
    gpu_resource_name: str = GPU_RESOURCE,
    ray_version: str = DEFAULT_RAY_VERSION,
    ttl_seconds_after_finished: int = 600,
    delete_rayjob_after_seconds: int = 7 * 24 * 3600,
    active_deadline_seconds: int = 86400,
    pre_running_deadline_seconds: int = 1800,
    backoff_limit: int = 0,
    data_claim: str | None = None,
    data_mount_path: str = DATA_MOUNT_PATH,
    image_pull_secrets: list[str] | None = None,
    ray_token_auth: bool = True,
    labels: Mapping[str, str] | None = None,
    template: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Return a RayJob (ray.io/v1) whose entrypoint runs ``secvec run /config/pipeline.yaml``.

    ``template``: a RayJob manifest to start from instead of the built-in cluster (the chart's RayJob,
    ``rayjob-template.yaml`` in its ConfigMap); then the sizing arguments must be left unset. Its name,
    namespace and entrypoint are replaced, whatever it mounts at ``/config`` is replaced by the given
    spec, and its labels are kept. ``mlflow_auth_secret`` names a Secret with keys ``username`` and
    ``password`` for MLflow basic auth. ``data_claim``: a PersistentVolumeClaim mounted at
    ``data_mount_path`` on every Ray pod, required when the spec refers to that path.
    """
    spec = parse_pipeline_spec(pipeline_yaml)
    name = name or default_rayjob_name(spec)
    if len(name) > MAX_RAYJOB_NAME_LENGTH or dns_label(name) != name:
        raise ValueError(f"RayJob name {name!r} must be a DNS-1035 label of at most {MAX_RAYJOB_NAME_LENGTH}")
    object_labels = {"app.kubernetes.io/name": "secvec", "app.kubernetes.io/created-by": "secvec-cli"}
    pull_secrets = [{"name": secret} for secret in image_pull_secrets or []]
    if template is not None:
        sizing_given = (num_workers, gpus_per_worker, worker_node_selector, worker_tolerations, data_claim)
        if any(value is not None for value in sizing_given):
            raise ValueError("a RayJob template already sizes the cluster: drop the sizing and data options")
        if template.get("kind", "RayJob") != "RayJob":
            raise ValueError(f"template must be a RayJob, got kind {template.get('kind')!r}")
        rayjob_spec = copy.deepcopy(dict(template.get("spec") or {}))
        if not rayjob_spec.get("rayClusterSpec"):
            raise ValueError("template has no spec.rayClusterSpec")
        object_labels.update((template.get("metadata") or {}).get("labels") or {})
        if image:
            for pod in _pod_templates(rayjob_spec) + [rayjob_spec.get("submitterPodTemplate") or {}]:
                for container in (pod.get("spec") or {}).get("containers") or []:
                    container["image"] = check_image(image)
        if mlflow_tracking_uri:
            for pod in _pod_templates(rayjob_spec):
                container = pod["spec"]["containers"][0]
                env = [e for e in container.get("env") or [] if e.get("name") != "MLFLOW_TRACKING_URI"]
                container["env"] = _env(mlflow_tracking_uri, None) + env
        image = rayjob_spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    else:
        if not image:
            raise ValueError(
                f"--image is required: the registry path of the image built from the Dockerfile, "
                f"e.g. registry.example.com/secvec:{DEFAULT_IMAGE_TAG}"
            )
        check_image(image)
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
        head = _pod_template(role="head", image=image, env=env, resources=head_resources)
        worker = _pod_template(
            role="worker",
            image=image,
            env=env,
            resources=worker_resources,
            node_selector=worker_node_selector,
            tolerations=worker_tolerations,
        )
        for pod in (head, worker):
            if pull_secrets:
                pod["spec"]["imagePullSecrets"] = copy.deepcopy(pull_secrets)
            if data_claim:
                _mount_data_claim(pod, data_claim, data_mount_path)
        cluster: dict[str, Any] = {"rayVersion": ray_version}
        if ray_token_auth:
            cluster["authOptions"] = {"mode": "token"}
        cluster["headGroupSpec"] = {
            # No GPU work on the head: the driver runs there, training runs on the workers.
            "rayStartParams": {"dashboard-host": "0.0.0.0", "num-gpus": "0"},
            "template": head,
        }
        cluster["workerGroupSpecs"] = [
            {
                "groupName": "gpu-workers" if sizing.gpus_per_worker else "workers",
                "replicas": sizing.num_workers,
                "minReplicas": sizing.num_workers,
                "maxReplicas": sizing.num_workers,
                "rayStartParams": {},
                "template": worker,
            }
        ]
        rayjob_spec = {
            "submissionMode": "K8sJobMode",
            "submitterPodTemplate": submitter_template(image, pull_secrets),
            "deletionStrategy": deletion_rules(ttl_seconds_after_finished, delete_rayjob_after_seconds),
            "activeDeadlineSeconds": active_deadline_seconds,
            "preRunningDeadlineSeconds": pre_running_deadline_seconds,
            "backoffLimit": backoff_limit,
            "rayClusterSpec": cluster,
        }
    if uses_path(pipeline_yaml, data_mount_path):
        mounted = set.union(set(), *(_mount_paths(t) for t in _pod_templates(rayjob_spec)))
        if data_mount_path.rstrip("/") not in mounted:
            raise ValueError(
                f"the spec reads or writes {data_mount_path} but nothing is mounted there: pass --data-claim "
                "with a ReadWriteMany claim holding the data sets, or a --template that mounts one"
            )
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
            group=RAY_API_GROUP,
            version=RAY_API_VERSION,
            namespace=namespace,
            plural=plural,
            body=body,
            _request_timeout=REQUEST_TIMEOUT,
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


def _is_transient(error: Exception) -> bool:
    """Worth polling again: a dropped connection, a timeout, 429 or a 5xx (API server restarts, etcd
    leader changes and load-balancer hiccups happen during a day-long training run)."""
    from kubernetes.client.exceptions import ApiException

    if isinstance(error, ApiException):
        return error.status in (408, 429) or (error.status or 0) >= 500
    return True  # urllib3 HTTPError / OSError: connection refused, reset, timed out


def wait_for_rayjob(
    name: str,
    namespace: str,
    timeout_s: float,
    poll_s: float = 5.0,
    api: Any = None,
    *,
    on_status: Callable[[RayJobStatus], None] | None = None,
    max_consecutive_errors: int = 30,
) -> RayJobStatus:
    """Poll the RayJob until KubeRay reports it Complete, Failed or ValidationFailed; return that status.

    ``api`` is a ``CustomObjectsApi`` or an ``ApiClient`` (default: from the kubeconfig).
    ``on_status`` is called whenever the status changes. Transient API errors are logged and polled
    through (up to ``max_consecutive_errors`` in a row); a 404 means the RayJob was deleted. Raises
    ``KubeError`` on other API errors and ``TimeoutError`` when ``timeout_s`` passes first; check
    ``.succeeded`` of the result.
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
    errors_in_a_row = 0
    while True:
        try:
            obj = api.get_namespaced_custom_object(
                group=RAY_API_GROUP,
                version=RAY_API_VERSION,
                namespace=namespace,
                plural="rayjobs",
                name=name,
                _request_timeout=REQUEST_TIMEOUT,
            )
        except (ApiException, urllib3.exceptions.HTTPError, OSError) as error:
            server = _server_of(api.api_client)
            if isinstance(error, ApiException) and error.status == 404:
                raise KubeError(
                    f"RayJob {namespace}/{name} is gone (404): it was deleted while waiting "
                    f"(kubectl delete, or a deletionStrategy rule); last status: {(last or RayJobStatus()).describe()}"
                ) from error
            errors_in_a_row += 1
            if not _is_transient(error) or errors_in_a_row > max_consecutive_errors:
                action = f"get rayjobs.{RAY_API_GROUP} {name}"
                raise _describe_api_error(error, action=action, namespace=namespace, server=server) from error
            logger.warning("RayJob %s/%s: API error while waiting (%s), polling again", namespace, name,
                           str(getattr(error, "reason", None) or error).splitlines()[0])  # fmt: skip
        else:
            errors_in_a_row = 0
            status = RayJobStatus.from_object(obj)
            if status != last:
                logger.info("RayJob %s/%s: %s", namespace, name, status.describe())
                if on_status is not None:
                    on_status(status)
                last = status
            if status.finished:
                return status
        if time.monotonic() + poll_s > deadline:
            still = (last or RayJobStatus()).describe()
            raise TimeoutError(f"RayJob {namespace}/{name} still {still} after {timeout_s:g} s")
        time.sleep(poll_s)


class _NoAliasDumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:
        return True


def to_yaml(*objects: Mapping[str, Any]) -> str:
    """Objects as a multi-document YAML stream, keys in insertion order, no YAML anchors."""
    return "---\n".join(yaml.dump(dict(obj), Dumper=_NoAliasDumper, sort_keys=False, width=110) for obj in objects)
