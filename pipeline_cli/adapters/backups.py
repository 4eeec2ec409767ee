"""S3/MinIO backup store: dataset backups, virtual-entity backups and graph exports.

The one place that talks to S3. Every minio/urllib3 error is wrapped into BackupError with the
object key, never the credentials. Keys are plain strings like ``datasets/ds-v3/manifest.json``,
relative to the store's key prefix (``[s3] prefix``, "" by default): every call adds it.
"""

from __future__ import annotations

import gzip
import io
import json
import threading
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any, TypeVar

import urllib3
from minio import Minio
from minio.error import MinioException, S3Error

from ..errors import EXIT_CONFIG, BackupError, service_error

T = TypeVar("T")


class BackupRefused(BackupError):
    """The server answered and refused the request: the access key, the secret key, this
    host's clock or the credentials' permissions (:data:`_DENIED`). It is up; a setting or a
    policy is wrong, which the next run does not outlive: exit 78, as Redis's and OSRM's
    refusals."""

    exit_code = EXIT_CONFIG


class BackupStore:
    def __init__(self, client: Minio, bucket: str, endpoint: str = "", prefix: str = "",
                 timeout: float | None = None) -> None:
        self.client = client
        self.timeout = timeout  # seconds a request waits for an answer, for messages
        self.bucket = bucket
        self.endpoint = endpoint  # host:port, for messages
        # Two installations on one bucket each write under a prefix of their own: every key
        # is relative to it, so the stages and the keys recorded in PostgreSQL never name it.
        self.prefix = normalize_prefix(prefix)
        self._bucket_checked = False
        # Uploads run in several threads; the first ones must not all try to create the
        # bucket at once (SeaweedFS answered one of them NoSuchBucket meanwhile).
        self._bucket_lock = threading.Lock()

    @classmethod
    def connect(cls, endpoint: str, access_key: str | None, secret_key: str | None, bucket: str,
                *, secure: bool = False, region: str = "us-east-1",
                timeout: float = 30.0, retries: int = 3, prefix: str = "") -> BackupStore:
        # Short timeouts and a bounded retry: an S3 outage must fail a stage, not hang cron.
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=min(timeout, 10.0), read=timeout),
            retries=urllib3.Retry(total=retries, backoff_factor=0.2,
                                  status_forcelist=(500, 502, 503, 504)),
        )
        try:
            client = Minio(endpoint, access_key=access_key, secret_key=secret_key,
                           secure=secure, region=region, http_client=http)
        except ValueError as exc:  # a malformed endpoint, e.g. a port that is not a number
            http.clear()
            raise BackupError(f"S3 endpoint {endpoint!r} is unusable: {exc}") from None
        return cls(client, bucket, endpoint, prefix, timeout)

    @property
    def location(self) -> str:
        """Where the keys are, for messages: ``bucket 'b'`` or ``bucket 'b', prefix 'p/'``."""
        return f"bucket {self.bucket!r}" + (f", prefix {self.prefix!r}" if self.prefix else "")

    def _key(self, key: str) -> str:
        return self.prefix + key

    def _call(self, what: str, fn: Callable[[], T], action: str) -> T:
        """``fn()``, its errors wrapped into one BackupError line; ``action`` is the S3
        permission it needs (s3:PutObject...), named when the server denies it."""
        try:
            return fn()
        except S3Error as exc:
            detail, kind = f"{exc.code}: {exc.message}", BackupError
            if exc.code == "NoSuchBucket":  # the server's message names no bucket
                detail = (f"NoSuchBucket: bucket {self.bucket!r} does not exist: check [s3] "
                          "bucket and endpoint (a stage that writes creates it)")
            elif exc.code in _DENIED:
                detail, kind = self._denied(exc, action), BackupRefused
            raise service_error(kind, "S3", self.endpoint, f"{what} failed",
                                detail) from None
        except (MinioException, urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
            # Without retries urllib3 raises MaxRetryError, the timeout as its reason. A
            # refused connection is a NewConnectionError, which urllib3 makes a timeout too.
            reason = getattr(exc, "reason", None) or exc
            timed_out = isinstance(reason, urllib3.exceptions.TimeoutError) and not isinstance(
                reason, urllib3.exceptions.NewConnectionError)
            if timed_out and self.timeout is not None:
                raise service_error(BackupError, "S3", self.endpoint,
                                    f"did not answer the {what} within "
                                    f"{round(self.timeout, 1):g} s") from None
            raise service_error(BackupError, "S3", self.endpoint, f"{what} failed",
                                exc) from None

    def _denied(self, exc: S3Error, action: str) -> str:
        """Why the server refused: a wrong access key, a wrong secret, a clock far off, or
        credentials without ``action``. A 403 to a HEAD (stat, bucket check) has no body to
        say which, so a GET of the bucket list asks again (only on this failure path)."""
        code, message = exc.code, exc.message
        if code == "AccessDenied" and not exc.response.data:  # minio's own code for a 403
            try:
                self.client.list_buckets()
            except S3Error as again:
                code, message = again.code, again.message
            except (MinioException, urllib3.exceptions.HTTPError, OSError, ValueError):
                pass  # no better answer: the denial stands
        if code == "InvalidAccessKeyId":
            return "InvalidAccessKeyId: the server knows no such access key (check [s3] access_key)"
        if code == "SignatureDoesNotMatch":
            return ("SignatureDoesNotMatch: the secret key does not belong to the access key "
                    "(check [s3] secret_key)")
        if code == "RequestTimeTooSkewed":  # the request's signed time: this host's clock
            return ("RequestTimeTooSkewed: this host's clock and the S3 server's differ by "
                    "more than 15 minutes: check NTP on both")
        if code in ("AccessDenied", "AllAccessDisabled"):
            return (f"AccessDenied: the credentials of [s3] access_key may not {action} in "
                    f"{self.location} (the S3 user's or bucket's policy)")
        return f"{code}: {message}"

    def ensure_bucket(self) -> None:
        if self._bucket_checked:
            return

        def make() -> None:
            try:
                self.client.make_bucket(self.bucket)
            except S3Error as exc:
                if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                    raise

        with self._bucket_lock:
            if not self._bucket_checked:
                if not self.bucket_exists():
                    self._call(f"creation of bucket {self.bucket}", make, "s3:CreateBucket")
                self._bucket_checked = True

    def put_bytes(self, key: str, data: bytes, content_type: str = "application/octet-stream"
                  ) -> None:
        self.ensure_bucket()
        self._call(f"upload of {self._key(key)}", lambda: self.client.put_object(
            self.bucket, self._key(key), io.BytesIO(data), len(data), content_type=content_type),
            "s3:PutObject")

    def put_file(self, key: str, path: str, content_type: str = "application/octet-stream"
                 ) -> None:
        self.ensure_bucket()
        self._call(f"upload of {self._key(key)}", lambda: self.client.fput_object(
            self.bucket, self._key(key), path, content_type=content_type), "s3:PutObject")

    def put_json(self, key: str, obj: Any, *, gzipped: bool = False) -> None:
        data = json.dumps(obj, ensure_ascii=False, sort_keys=True, default=str).encode()
        if gzipped:
            self.put_bytes(key, gzip.compress(data, mtime=0), "application/gzip")
        else:
            self.put_bytes(key, data, "application/json")

    def _download(self, key: str, *, missing_ok: bool = False) -> bytes | None:
        """The object's bytes; None for a missing one if ``missing_ok`` (one GET either way)."""
        def get() -> bytes | None:
            try:
                resp = self.client.get_object(self.bucket, self._key(key))
            except S3Error as exc:
                if missing_ok and exc.code in _MISSING:
                    return None
                raise
            try:
                return resp.read()
            finally:
                resp.close()
                resp.release_conn()

        return self._call(f"download of {self._key(key)}", get, "s3:GetObject")

    def get_bytes(self, key: str) -> bytes:
        data = self._download(key)
        assert data is not None
        return data

    def get_json(self, key: str) -> Any:
        return self._parse_json(key, self.get_bytes(key))

    def get_json_if_any(self, key: str) -> Any:
        """:meth:`get_json`, or None when there is no such object."""
        data = self._download(key, missing_ok=True)
        return None if data is None else self._parse_json(key, data)

    def _parse_json(self, key: str, data: bytes) -> Any:
        try:
            if key.endswith(".gz"):
                data = gzip.decompress(data)
            return json.loads(data)
        except (ValueError, OSError, EOFError):
            raise BackupError(f"S3 object {self._key(key)} is not valid JSON") from None

    def get_file(self, key: str, path: str) -> None:
        self._call(f"download of {self._key(key)}",
                   lambda: self.client.fget_object(self.bucket, self._key(key), path),
                   "s3:GetObject")

    def exists(self, key: str) -> bool:
        def stat() -> bool:
            try:
                self.client.stat_object(self.bucket, self._key(key))
                return True
            except S3Error as exc:
                if exc.code in _MISSING:
                    return False
                raise

        return self._call(f"stat of {self._key(key)}", stat, "s3:GetObject")

    def last_modified(self, key: str) -> datetime | None:
        """When ``key`` was written (the server's clock); a missing one is a BackupError."""
        return self._call(f"stat of {self._key(key)}", lambda: self.client.stat_object(
            self.bucket, self._key(key)).last_modified, "s3:GetObject")

    def list(self, prefix: str) -> Iterator[str]:
        """The keys under ``prefix`` (relative to the store's prefix, as the others take);
        none in a bucket not made yet (the first upload makes it)."""
        def listing() -> list[Any]:
            try:
                return list(self.client.list_objects(self.bucket, prefix=self._key(prefix),
                                                     recursive=True))
            except S3Error as exc:
                if exc.code == "NoSuchBucket":
                    return []
                raise

        objects = self._call(f"listing of {self._key(prefix)}", listing, "s3:ListBucket")
        for obj in objects:
            if obj.object_name:
                yield obj.object_name[len(self.prefix):]

    def delete_prefix(self, prefix: str) -> int:
        keys = list(self.list(prefix))
        for key in keys:
            self._call(f"delete of {self._key(key)}",
                       lambda k=key: self.client.remove_object(  # type: ignore[misc]
                           self.bucket, self._key(k)), "s3:DeleteObject")
        return len(keys)

    def bucket_exists(self) -> bool:
        return self._call(f"bucket check of {self.bucket}",
                          lambda: self.client.bucket_exists(self.bucket), "s3:ListBucket")

    def delete(self, key: str) -> None:
        self._call(f"delete of {self._key(key)}",
                   lambda: self.client.remove_object(self.bucket, self._key(key)),
                   "s3:DeleteObject")

    def may_create_buckets(self, probe_bucket: str) -> None:
        """Create and at once remove ``probe_bucket``: raises BackupError unless the
        credentials may create buckets (the honest answer; S3 has no "may I" call)."""
        self._call(f"creation of probe bucket {probe_bucket}",
                   lambda: self.client.make_bucket(probe_bucket), "s3:CreateBucket")
        self._call(f"removal of probe bucket {probe_bucket}",
                   lambda: self.client.remove_bucket(probe_bucket), "s3:DeleteBucket")


_MISSING = ("NoSuchKey", "NoSuchBucket", "NoSuchObject")


def normalize_prefix(prefix: str) -> str:
    """``[s3] prefix`` as keys start with it: "" (none), else ending in one "/" (``city-a``
    and ``city-a/`` are one prefix; the settings check what it may hold)."""
    stripped = prefix.strip("/")
    return stripped + "/" if stripped else ""


# What a refused request answers: which it was, _denied finds out.
_DENIED = ("AccessDenied", "AllAccessDisabled", "SignatureDoesNotMatch", "InvalidAccessKeyId",
           "RequestTimeTooSkewed")
