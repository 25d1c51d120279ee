#!/usr/bin/env bash
# Download the KubeRay v1.7.0 CRDs (RayJob, RayCronJob, RayCluster) that the Kubernetes tests validate
# rendered objects against, into a cache outside the repository (they are KubeRay's files, not ours).
#
#   tools/get-kuberay-crds.sh        # idempotent: returns at once when the cached files check out
#
# Cache: $SECVEC_KUBERAY_CRDS if set, else ${XDG_CACHE_HOME:-~/.cache}/secvec/kuberay-v1.7.0.
# tests/conftest_kube.py reads ../shared/schemas/kuberay-v1.7.0 (CI) or this cache; without either the
# KubeRay-schema tests skip with a reason naming this script (and fail under CI=true).
# Needs internet access to raw.githubusercontent.com; each file is checked against its pinned sha256.
set -euo pipefail

VERSION="v1.7.0"
BASE_URL="https://raw.githubusercontent.com/ray-project/kuberay/${VERSION}/ray-operator/config/crd/bases"
CACHE_DIR="${SECVEC_KUBERAY_CRDS:-${XDG_CACHE_HOME:-$HOME/.cache}/secvec/kuberay-${VERSION#v}}"
# sha256 of the files at the v1.7.0 tag (git show v1.7.0:ray-operator/config/crd/bases/<file> | sha256sum).
declare -A SHA256=(
  [ray.io_rayjobs.yaml]=01a5cf3b17c1769fda44af7e82debcd98722f0c27b9ab84d084681c6649121f5
  [ray.io_raycronjobs.yaml]=31c2c753bba01f7e8e89cb8e8c504131b58ee42090ca536d87f5ac27605a568e
  [ray.io_rayclusters.yaml]=c44704442eef0c6721ad40c1d66782c8bd3fdab9d3344306a5820910a679baa1
)

checks_out() {  # checks_out <file>: present with the pinned digest
  [ -f "$CACHE_DIR/$1" ] && [ "$(sha256sum "$CACHE_DIR/$1" | cut -d' ' -f1)" = "${SHA256[$1]}" ]
}

mkdir -p "$CACHE_DIR"
for file in "${!SHA256[@]}"; do
  checks_out "$file" && continue
  command -v curl >/dev/null || { echo "get-kuberay-crds.sh: 'curl' is required" >&2; exit 2; }
  curl -fsSL --retry 3 -o "$CACHE_DIR/$file.part" "$BASE_URL/$file"
  mv "$CACHE_DIR/$file.part" "$CACHE_DIR/$file"
  if ! checks_out "$file"; then
    rm -f "$CACHE_DIR/$file"
    echo "get-kuberay-crds.sh: $file does not match its pinned sha256 (removed)" >&2
    exit 1
  fi
done
echo "get-kuberay-crds.sh: KubeRay ${VERSION} CRDs in $CACHE_DIR"
