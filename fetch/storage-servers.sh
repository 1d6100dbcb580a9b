#!/usr/bin/env bash
# Install the storage servers that ferrite-fetch's tests run against, pinned,
# into a cache that survives `cargo clean`:
#
#   .cache/storage/bin/minio             MinIO (S3), built from its Go module
#   .cache/storage/bin/fake-gcs-server   fake-gcs-server (GCS), built from its Go module
#   .cache/storage/azurite/              Azurite (Azure Blob), from npm;
#                                        bin/azurite-blob links to it
#   .cache/storage/stamps/<name>         what each one was installed from
#
# Usage: fetch/storage-servers.sh [name...]   (names: minio fake-gcs-server azurite; default all)
#        fetch/storage-servers.sh --print-bin-dir
#
# Idempotent: a server whose stamp matches its pin is skipped. Needs `go`
# (the Go module proxy) and `npm` (the npm registry). MinIO publishes no
# semver tags, so it is pinned to a pseudo-version (a commit of its main
# branch); its cold build is the slow one (see the timings printed).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${FERRITE_STORAGE_CACHE:-$ROOT/.cache/storage}"
BIN="$CACHE/bin"
STAMPS="$CACHE/stamps"

# The pins (the single source of the versions).
MINIO_MODULE="github.com/minio/minio"
MINIO_VERSION="v0.0.0-20260212201848-7aac2a2c5b7c"
FAKE_GCS_MODULE="github.com/fsouza/fake-gcs-server"
FAKE_GCS_VERSION="v1.56.1"
AZURITE_VERSION="3.37.0"

if [[ "${1:-}" == "--print-bin-dir" ]]; then echo "$BIN"; exit 0; fi

NAMES=("$@")
[[ ${#NAMES[@]} -gt 0 ]] || NAMES=(minio fake-gcs-server azurite)
mkdir -p "$BIN" "$STAMPS"

export CGO_ENABLED=0
export GOFLAGS=-mod=mod
export GOTOOLCHAIN="${GOTOOLCHAIN:-local}"

go_install() { # name module version
  local name="$1" module="$2" version="$3"
  command -v go >/dev/null || { echo "go not found on PATH (needed for $name)" >&2; return 1; }
  local stamp="$module@$version $(go env GOVERSION)"
  if [[ -x "$BIN/$name" && "$(cat "$STAMPS/$name" 2>/dev/null)" == "$stamp" ]]; then
    echo "==> $name $version: cached ($BIN/$name)"
    return 0
  fi
  echo "==> building $name from $module@$version (cold: minutes on 2 cores)"
  local start=$SECONDS
  GOBIN="$BIN" go install -trimpath -ldflags "-s -w" "$module@$version"
  echo "$stamp" > "$STAMPS/$name"
  echo "==> $name $version built in $((SECONDS - start)) s"
}

npm_install() {
  command -v npm >/dev/null || { echo "npm not found on PATH (needed for azurite)" >&2; return 1; }
  local stamp="azurite@$AZURITE_VERSION"
  if [[ -x "$BIN/azurite-blob" && "$(cat "$STAMPS/azurite" 2>/dev/null)" == "$stamp" ]]; then
    echo "==> azurite $AZURITE_VERSION: cached ($BIN/azurite-blob)"
    return 0
  fi
  echo "==> installing azurite@$AZURITE_VERSION from npm"
  local start=$SECONDS
  mkdir -p "$CACHE/azurite"
  npm install --prefix "$CACHE/azurite" --no-audit --no-fund --loglevel=error --save-exact "azurite@$AZURITE_VERSION"
  ln -sfn "$CACHE/azurite/node_modules/.bin/azurite-blob" "$BIN/azurite-blob"
  echo "$stamp" > "$STAMPS/azurite"
  echo "==> azurite $AZURITE_VERSION installed in $((SECONDS - start)) s"
}

for name in "${NAMES[@]}"; do
  case "$name" in
    minio) go_install minio "$MINIO_MODULE" "$MINIO_VERSION" ;;
    fake-gcs-server) go_install fake-gcs-server "$FAKE_GCS_MODULE" "$FAKE_GCS_VERSION" ;;
    azurite) npm_install ;;
    *) echo "unknown storage server: $name" >&2; exit 2 ;;
  esac
done
