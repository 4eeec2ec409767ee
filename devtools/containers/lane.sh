#!/usr/bin/env bash
# The container lane (`make test-containers`): the stage and reliability tests against
# PostgreSQL, Redis and S3 containers that testcontainers starts once per test session.
#
#   1. engine: use a running Docker; else, as root, install docker.io and start dockerd;
#      else say what is missing in one line and exit 1 (never skip silently).
#   2. images: PIPELINE_TEST_IMAGE_{POSTGRES,REDIS,S3} when set (e.g. postgres:16, redis:7,
#      minio/minio where a registry answers); else images built here (images.sh), cached by tag.
#   3. pytest with tests/containers.py as a plugin; the lane's containers are removed at the end,
#      even after a failure or ^C.
#
# Extra arguments go to pytest (default: tests/stages tests/reliability).
set -euo pipefail
shopt -s inherit_errexit
REPO=$(cd "$(dirname "$0")/../.." && pwd)
HERE="$REPO/devtools/containers"
STATE="${PIPELINE_LOCAL_DIR:-$REPO/.local}/containers"
PYTEST="${PYTEST:-$REPO/.venv/bin/pytest}"
mkdir -p "$STATE"

die() { echo "test-containers: $*" >&2; exit 1; }

engine() {
    docker info >/dev/null 2>&1 && return 0
    command -v docker >/dev/null 2>&1 || [ "$(id -u)" = 0 ] \
        || die "no docker client and not root: install Docker (or run as root to have it installed)"
    if [ ! -x /usr/sbin/dockerd ] || ! command -v debootstrap >/dev/null \
        || ! command -v iptables >/dev/null; then
        [ "$(id -u)" = 0 ] || die "no Docker engine running and not root to install docker.io"
        echo "test-containers: installing docker.io debootstrap iptables" >&2
        # A new machine's package lists may be stale or missing: refresh them first.
        apt-get update -q >"$STATE/apt.log" 2>&1 || die "apt-get update failed, see $STATE/apt.log"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
            docker.io debootstrap iptables >>"$STATE/apt.log" 2>&1 \
            || die "apt-get install docker.io failed, see $STATE/apt.log"
    fi
    [ "$(id -u)" = 0 ] || die "the Docker engine does not answer and only root may start dockerd"
    echo "test-containers: starting dockerd (log $STATE/dockerd.log)" >&2
    setsid nohup /usr/sbin/dockerd >"$STATE/dockerd.log" 2>&1 < /dev/null &
    for _ in $(seq 60); do
        docker info >/dev/null 2>&1 && return 0
        sleep 1
    done
    die "dockerd did not answer within 60 s, see $STATE/dockerd.log"
}

# The lane's own label: clean-up removes these containers and no one else's.
LANE_ID="lane-$$-$(date +%s)"
cleanup() {
    local ids
    ids=$(docker ps -aq --filter label=org.testcontainers=true \
        --filter "label=pipeline.test-lane=$LANE_ID" 2>/dev/null || true)
    if [ -n "$ids" ]; then
        # shellcheck disable=SC2086
        docker rm -f -v $ids >/dev/null
    fi
}

engine
images=$("$HERE/images.sh")  # PIPELINE_TEST_IMAGE_*: the given ones, else built here
eval "$images"

export PIPELINE_TEST_CONTAINERS_LANE="$LANE_ID"
# Ryuk (the reaper) is an image to pull; the lane removes its containers itself (cleanup).
export TESTCONTAINERS_RYUK_DISABLED=true
# This machine kind has /.dockerenv: testcontainers would hand out the bridge address.
export TESTCONTAINERS_CONNECTION_MODE=docker_host
export TESTCONTAINERS_HOST_OVERRIDE=127.0.0.1
trap cleanup EXIT
trap 'exit 130' INT TERM

[ $# -gt 0 ] || set -- tests/stages tests/reliability
cd "$REPO"
PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" "$PYTEST" -p tests.containers "$@"
