"""pytest plugin of the container lane (`make test-containers`, devtools/containers/lane.sh).

Loaded with ``-p tests.containers``, it starts one PostgreSQL, one Redis and one S3 container
with testcontainers when the session is configured, before any fixture resolves, and points
the ``PIPELINE_TEST_*`` variables that ``LocalServices`` reads at them. OSRM stays a local
process. Images are settings: ``PIPELINE_TEST_IMAGE_POSTGRES`` / ``_REDIS`` / ``_S3`` (defaults
the official ``postgres:16``, ``redis:7``, ``minio/minio``; the lane builds look-alikes where no
registry answers). Every port is published on 127.0.0.1 only; the containers go when the
session ends, and carry the lane's label so that lane.sh removes them even after a crash.
"""

from __future__ import annotations

import os
import secrets

import pytest
import urllib3
from minio import Minio
from minio.error import MinioException
from tenacity import Retrying, retry_if_exception_type, stop_after_delay, wait_fixed
from testcontainers.community.postgres import PostgresContainer
from testcontainers.community.redis import RedisContainer
from testcontainers.core.container import DockerContainer

LOOPBACK = "127.0.0.1"
IMAGES = {
    "postgres": ("PIPELINE_TEST_IMAGE_POSTGRES", "postgres:16"),
    "redis": ("PIPELINE_TEST_IMAGE_REDIS", "redis:7"),
    "s3": ("PIPELINE_TEST_IMAGE_S3", "minio/minio"),
}
LANE_LABEL = "pipeline.test-lane"
S3_PORT = 9000
# The settings of the local harness's own cluster: the data is thrown away anyway.
POSTGRES_COMMAND = ("postgres -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
                    " -c max_connections=200")


def image(kind: str) -> str:
    variable, default = IMAGES[kind]
    return os.environ.get(variable) or default


def _loopback_only(container: DockerContainer, port: int) -> DockerContainer:
    # with_bind_ports takes no host address; docker-py's (address, None) binding means
    # "a free port on that address only".
    container.ports[str(port)] = (LOOPBACK, None)  # type: ignore[assignment]
    return container


class _S3NotReady(Exception):
    pass


def _wait_for_s3(endpoint: str, access: str, secret: str, timeout: float = 60.0) -> None:
    http = urllib3.PoolManager(timeout=urllib3.Timeout(connect=1, read=3), retries=False)
    client = Minio(endpoint, access_key=access, secret_key=secret, secure=False,
                   region="us-east-1", http_client=http)

    def probe() -> None:
        try:
            client.list_buckets()
        except (MinioException, urllib3.exceptions.HTTPError, OSError) as exc:
            raise _S3NotReady(str(exc)) from exc

    try:
        Retrying(stop=stop_after_delay(timeout), wait=wait_fixed(0.2),
                 retry=retry_if_exception_type(_S3NotReady), reraise=True)(probe)
    finally:
        http.clear()


class ContainerServices:
    """The three containers of one session, and the environment that points at them."""

    def __init__(self) -> None:
        self.labels = {LANE_LABEL: os.environ.get("PIPELINE_TEST_CONTAINERS_LANE", "manual")}
        self.started: list[DockerContainer] = []

    def start(self) -> dict[str, str]:
        env: dict[str, str] = {}
        pg = PostgresContainer(image("postgres"), username="postgres",
                               password=secrets.token_hex(16), dbname="postgres", driver=None,
                               labels=self.labels).with_command(POSTGRES_COMMAND)
        self._start(_loopback_only(pg, pg.port))
        env["PIPELINE_TEST_DATABASE_URL"] = pg.get_connection_url(driver=None)

        redis = RedisContainer(image("redis"), labels=self.labels)
        self._start(_loopback_only(redis, redis.port))
        env["PIPELINE_TEST_REDIS_URL"] = (
            f"redis://{LOOPBACK}:{redis.get_exposed_port(redis.port)}/0")

        access, secret = "pipeline-lane", secrets.token_hex(20)
        s3 = (DockerContainer(image("s3"), labels=self.labels)
              .with_env("MINIO_ROOT_USER", access).with_env("MINIO_ROOT_PASSWORD", secret)
              .with_command(f"server /data --address :{S3_PORT}"))
        self._start(_loopback_only(s3, S3_PORT))
        endpoint = f"{LOOPBACK}:{s3.get_exposed_port(S3_PORT)}"
        _wait_for_s3(endpoint, access, secret)
        env |= {"PIPELINE_TEST_S3_ENDPOINT": f"http://{endpoint}",
                "PIPELINE_TEST_S3_ACCESS_KEY": access, "PIPELINE_TEST_S3_SECRET_KEY": secret}
        return env

    def _start(self, container: DockerContainer) -> None:
        self.started.append(container)  # before start(): a failed start is removed too
        container.start()

    def stop(self) -> None:
        while self.started:
            container = self.started.pop()
            if container._container is not None:  # created at all
                container.stop()
            else:
                container.get_docker_client().client.close()


def pytest_configure(config: pytest.Config) -> None:
    services = ContainerServices()
    config.add_cleanup(services.stop)
    saved = {name: os.environ.get(name) for name in (
        "PIPELINE_TEST_DATABASE_URL", "PIPELINE_TEST_REDIS_URL", "PIPELINE_TEST_S3_ENDPOINT",
        "PIPELINE_TEST_S3_ACCESS_KEY", "PIPELINE_TEST_S3_SECRET_KEY")}

    def restore() -> None:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value

    config.add_cleanup(restore)
    os.environ.update(services.start())


def pytest_report_header(config: pytest.Config) -> str:
    return "containers: " + ", ".join(f"{kind}={image(kind)}" for kind in IMAGES)
