"""Remove what a test, a benchmark or the demo put on the shared servers: every Redis key under
a prefix and a whole S3 bucket. One copy, used by the fixtures, the sandboxes, the benchmarks
and ``make demo-down``."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import redis
    from minio import Minio

_BATCH = 500


def drop_prefix(client: redis.Redis, prefix: str) -> int:
    """UNLINK every key under ``<prefix>:`` in batches; returns how many were removed."""
    keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
    for i in range(0, len(keys), _BATCH):
        client.unlink(*keys[i:i + _BATCH])
    return len(keys)


def drop_bucket(client: Minio, bucket: str) -> bool:
    """Empty and remove ``bucket``; False when it did not exist."""
    if not client.bucket_exists(bucket):
        return False
    for obj in client.list_objects(bucket, recursive=True):
        client.remove_object(bucket, obj.object_name or "")
    client.remove_bucket(bucket)
    return True
