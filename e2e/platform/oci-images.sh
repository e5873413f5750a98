#!/usr/bin/env bash
# Builds the sluice-operator and sluice-pooler container images without a
# Docker engine: static musl binaries from cargo, assembled into OCI image
# layouts with umoci (Debian package). Same content as the Dockerfile's
# `operator` and `pooler` targets, on an empty base (the binaries are static).
#
# Usage: e2e/platform/oci-images.sh [OUT_DIR]   (default ~/.cache/sluice/images)
# Push:  skopeo copy oci:OUT_DIR/sluice-operator:0.1.0 docker://ghcr.io/sluice-dev/sluice-operator:0.1.0
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
OUT=${1:-$HOME/.cache/sluice/images}
TARGET=x86_64-unknown-linux-musl
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' "$ROOT/Cargo.toml" | head -1)
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/sluice/target}
log() { printf '[oci-images] %s\n' "$*" >&2; }

command -v umoci >/dev/null || { log "installing umoci"; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq umoci >/dev/null; }
command -v musl-gcc >/dev/null || { log "installing musl-tools"; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq musl-tools >/dev/null; }
rustup target list --installed | grep -qx "$TARGET" || rustup target add "$TARGET"

log "building static binaries ($TARGET, release)"
(cd "$ROOT" && cargo build --release --locked --target "$TARGET" -p sluice-operator -p sluice-pooler)

mkdir -p "$OUT"
for name in sluice-operator sluice-pooler; do
  bin=$CARGO_TARGET_DIR/$TARGET/release/$name
  if file "$bin" | grep -q 'dynamically linked'; then log "$bin is not static"; exit 1; fi
  layout=$OUT/$name
  rm -rf "$layout" "$OUT/$name.bundle"
  umoci init --layout "$layout"
  umoci new --image "$layout:$VERSION"
  umoci unpack --rootless --image "$layout:$VERSION" "$OUT/$name.bundle" >/dev/null
  install -s -D -m 0755 "$bin" "$OUT/$name.bundle/rootfs/usr/local/bin/$name"
  umoci repack --image "$layout:$VERSION" "$OUT/$name.bundle"
  rm -rf "$OUT/$name.bundle"
  case $name in
    sluice-operator) cmd=(--config.cmd run) ports=() ;;
    sluice-pooler) cmd=(--config.cmd --config --config.cmd /etc/sluice/pooler.toml) ports=(--config.exposedports 6432/tcp --config.exposedports 9930/tcp) ;;
  esac
  umoci config --image "$layout:$VERSION" \
    --config.entrypoint "/usr/local/bin/$name" "${cmd[@]}" "${ports[@]}" \
    --config.user 65532:65532 \
    --clear=config.env --config.env PATH=/usr/local/bin \
    --config.label "org.opencontainers.image.title=$name" \
    --config.label "org.opencontainers.image.version=$VERSION" \
    --config.label "org.opencontainers.image.source=https://github.com/sluice-dev/sluice" \
    --config.label "org.opencontainers.image.licenses=Apache-2.0"
  # Check what we built: unpack it again and run the binary the config points at.
  check=$(mktemp -d)
  umoci unpack --rootless --image "$layout:$VERSION" "$check/b" >/dev/null
  entry=$(python3 -c 'import json,sys; c=json.load(open(sys.argv[1])); print(c["process"]["args"][0], "%d:%d" % (c["process"]["user"]["uid"], c["process"]["user"]["gid"]))' "$check/b/config.json")
  [[ $entry == "/usr/local/bin/$name 65532:65532" ]] || { log "$name: unexpected entrypoint/user: $entry"; exit 1; }
  got=$("$check/b/rootfs/usr/local/bin/$name" --version)
  rm -rf "$check"
  [[ $got == "$name $VERSION" ]] || { log "$name: --version printed '$got'"; exit 1; }
  log "$name:$VERSION -> $layout ($(du -sh "$layout" | cut -f1)); runs as 65532, prints '$got'"
done
