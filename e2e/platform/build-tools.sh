#!/usr/bin/env bash
# Builds, once, the real Kubernetes control plane (etcd, kube-apiserver,
# kube-controller-manager), kubectl and helm from their official Go modules, and caches
# each binary by version under $SLUICE_CACHE/bin (default ~/.cache/sluice/bin).
# A second run with the same versions is a cache hit and builds nothing.
#
# Usage: e2e/platform/build-tools.sh [--print-bin-dir]
set -euo pipefail

K8S_VERSION=${K8S_VERSION:-v1.34.4}
ETCD_VERSION=${ETCD_VERSION:-v3.6.5}
HELM_VERSION=${HELM_VERSION:-v3.19.0}
CACHE=${SLUICE_CACHE:-$HOME/.cache/sluice}
BIN=$CACHE/bin
HERE=$(cd "$(dirname "$0")" && pwd)

# The checksum database is not reachable from this machine; the module proxy
# is. The committed go.sum files under e2e/platform/go pin every hash, so a
# build on another machine verifies against them.
export GOSUMDB=off GOFLAGS=-mod=mod GOTOOLCHAIN=local CGO_ENABLED=0

if [[ "${1:-}" == "--print-bin-dir" ]]; then echo "$BIN"; exit 0; fi
mkdir -p "$BIN"

log() { printf '[build-tools %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# build NAME VERSION MODULE_DIR PACKAGE [LDFLAGS]
build() {
  local name=$1 version=$2 moddir=$3 pkg=$4 ldflags=${5:-}
  local out=$BIN/$name-$version
  if [[ -x $out ]]; then
    log "$name $version: cached at $out"
  else
    log "$name $version: building $pkg (first time takes minutes)..."
    local start=$SECONDS
    # A temporary name of this run's own, renamed into place atomically.
    (cd "$moddir" && go build -trimpath -ldflags "-s -w $ldflags" -o "$out.tmp.$$" "$pkg")
    mv -f "$out.tmp.$$" "$out"
    log "$name $version: built in $((SECONDS - start))s"
  fi
  ln -sf "$name-$version" "$BIN/$name"
}

# Kubernetes: k8s.io/kubernetes replaces its staging modules with local paths,
# which a dependent module cannot use; map each k8s.io/* staging module to its
# published v0.X.Y of the same release instead.
k8s_mod() {
  local dir=$HERE/go/kubernetes
  if ! grep -q "k8s.io/kubernetes $K8S_VERSION" "$dir/go.mod" 2>/dev/null; then
    log "kubernetes $K8S_VERSION: generating go.mod with staging replaces"
    mkdir -p "$dir"
    local gomod
    gomod=$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
    local staging=v0.${K8S_VERSION#v1.}
    {
      echo "module sluice.dev/e2e/kubernetes-tools"
      echo
      echo "go 1.24"
      echo
      echo "require k8s.io/kubernetes $K8S_VERSION"
      echo
      echo "replace ("
      sed -n 's#^\s*\(k8s.io/[a-z0-9-]*\) => ./staging/src/.*#\1#p' "$gomod" | sort -u |
        while read -r m; do echo "	$m => $m $staging"; done
      echo ")"
    } > "$dir/go.mod"
    printf 'package tools\n' > "$dir/tools.go"
  fi
  echo "$dir"
}

log "cache: $BIN"
# Runs from several clones share the cache: one builds, the others wait and find it built.
exec 9>"$BIN/.build-tools.lock"
flock 9
K8S_DIR=$(k8s_mod)
minor=${K8S_VERSION#v1.}; minor=${minor%%.*}
K8S_LDFLAGS="-X k8s.io/component-base/version.gitVersion=$K8S_VERSION -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor -X k8s.io/component-base/version.gitTreeState=clean"
build kube-apiserver "$K8S_VERSION" "$K8S_DIR" k8s.io/kubernetes/cmd/kube-apiserver "$K8S_LDFLAGS"
build kube-controller-manager "$K8S_VERSION" "$K8S_DIR" k8s.io/kubernetes/cmd/kube-controller-manager "$K8S_LDFLAGS"
# kubectl matching the server version (a fresh machine may have none, or an older one).
build kubectl "$K8S_VERSION" "$K8S_DIR" k8s.io/kubernetes/cmd/kubectl "$K8S_LDFLAGS"

ETCD_DIR=$HERE/go/etcd
if ! grep -q "etcd/server/v3 $ETCD_VERSION" "$ETCD_DIR/go.mod" 2>/dev/null; then
  mkdir -p "$ETCD_DIR"
  printf 'module sluice.dev/e2e/etcd-tools\n\ngo 1.24\n\nrequire go.etcd.io/etcd/server/v3 %s\n' "$ETCD_VERSION" > "$ETCD_DIR/go.mod"
  printf 'package tools\n' > "$ETCD_DIR/tools.go"
fi
build etcd "$ETCD_VERSION" "$ETCD_DIR" go.etcd.io/etcd/server/v3

HELM_DIR=$HERE/go/helm
if ! grep -q "helm/v3 $HELM_VERSION" "$HELM_DIR/go.mod" 2>/dev/null; then
  mkdir -p "$HELM_DIR"
  printf 'module sluice.dev/e2e/helm-tools\n\ngo 1.24\n\nrequire helm.sh/helm/v3 %s\n' "$HELM_VERSION" > "$HELM_DIR/go.mod"
  printf 'package tools\n' > "$HELM_DIR/tools.go"
fi
build helm "$HELM_VERSION" "$HELM_DIR" helm.sh/helm/v3/cmd/helm "-X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"

log "done: $(ls "$BIN" | tr '\n' ' ')"
