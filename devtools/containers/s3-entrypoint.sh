#!/bin/sh
# Takes minio's arguments (`server DIR [--address :PORT]`) and runs weed mini's S3 there.
set -eu
dir=/data
port=9000
[ "${1:-}" = server ] && shift
while [ $# -gt 0 ]; do
    case "$1" in
        --address) port=${2##*:}; shift 2 ;;
        --address=*) port=${1##*:}; shift ;;
        -*) shift ;;
        *) dir=$1; shift ;;
    esac
done
mkdir -p "$dir"
export AWS_ACCESS_KEY_ID="${MINIO_ROOT_USER:?MINIO_ROOT_USER is required}"
export AWS_SECRET_ACCESS_KEY="${MINIO_ROOT_PASSWORD:?MINIO_ROOT_PASSWORD is required}"
exec weed mini -dir="$dir" -ip=127.0.0.1 -ip.bind=0.0.0.0 -s3.port="$port" -webdav=false \
    -admin.ui=false -s3.port.iceberg=0 -s3.port.lance=0 -master.telemetry=false
