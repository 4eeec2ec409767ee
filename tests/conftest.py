"""Shared fixtures: real servers, and an isolated namespace per test.

Servers come from ``PIPELINE_TEST_*`` URLs when set, else :class:`LocalServices` finds or starts
local ones. Each test gets its own database (cloned from a migrated template), Redis prefix and
S3 bucket, so tests never see each other's data.
"""

from __future__ import annotations

import json
import os
import signal
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql

from devtools.cleanup import drop_bucket, drop_prefix
from devtools.services import LocalServices, S3Endpoint
from pipeline_cli import db
from tests.support.clirunner import Cli

# A suite started under nohup (or by a CI runner that ignores SIGHUP) passed the ignored SIGHUP
# on to every pipeline process it starts, and the pipeline keeps an ignored SIGHUP ignored, as
# nohup asks: the tests of a hung-up session then waited in vain. The suite's own processes
# get SIGHUP's default, as a login shell's would.
signal.signal(signal.SIGHUP, signal.SIG_DFL)

REPO = Path(__file__).resolve().parents[1]


def _replace_db(url: str, name: str) -> str:
    return psycopg.conninfo.make_conninfo(url, dbname=name)


@pytest.fixture(autouse=True)
def _no_proxy_from_the_shell(monkeypatch: pytest.MonkeyPatch) -> None:
    """The OData client takes HTTP_PROXY and the like from the environment: a developer's
    proxy must not stand between the tests and their loopback servers."""
    for name in [n for n in os.environ if n.lower().endswith("_proxy")]:
        monkeypatch.delenv(name)


@pytest.fixture(scope="session")
def services() -> Iterator[LocalServices]:
    svc = LocalServices()
    yield svc
    svc.stop_all()


@pytest.fixture(scope="session")
def pg_admin_url(services: LocalServices) -> str:
    return services.postgres()


@pytest.fixture(scope="session")
def template_db(pg_admin_url: str) -> Iterator[str]:
    """A migrated database that every test's database is cloned from (fast: no re-migrate)."""
    name = f"pipeline_tpl_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    with psycopg.connect(pg_admin_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    with db.connect(_replace_db(pg_admin_url, name), autocommit=True) as conn:
        db.migrate(conn)
    yield name
    with psycopg.connect(pg_admin_url, autocommit=True) as admin:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
            sql.Identifier(name)))


def _new_database(admin_url: str, template: str | None) -> str:
    name = f"pipeline_t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        if template:
            admin.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(name), sql.Identifier(template)))
        else:
            admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return name


def _drop_database(admin_url: str, name: str) -> None:
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
            sql.Identifier(name)))


@pytest.fixture
def database_url(pg_admin_url: str, template_db: str) -> Iterator[str]:
    """A fresh, migrated database for this test only."""
    name = _new_database(pg_admin_url, template_db)
    yield _replace_db(pg_admin_url, name)
    _drop_database(pg_admin_url, name)


@pytest.fixture
def empty_database_url(pg_admin_url: str) -> Iterator[str]:
    """A fresh database with no schema at all (for migration tests)."""
    name = _new_database(pg_admin_url, None)
    yield _replace_db(pg_admin_url, name)
    _drop_database(pg_admin_url, name)


@pytest.fixture
def other_database_url(pg_admin_url: str) -> Iterator[str]:
    """A second installation's database: migrated from nothing, not cloned from the template
    as every test's database is, so it is another deployment (sql/028 gives it an identity of
    its own)."""
    name = _new_database(pg_admin_url, None)
    url = _replace_db(pg_admin_url, name)
    with db.connect(url, autocommit=True) as conn:
        db.migrate(conn)
    yield url
    _drop_database(pg_admin_url, name)


@pytest.fixture
def conn(database_url: str) -> Iterator[psycopg.Connection[dict[str, Any]]]:
    with db.connect(database_url, autocommit=True) as c:
        yield c


@pytest.fixture(scope="session")
def redis_url(services: LocalServices) -> str:
    return services.redis()


@pytest.fixture
def redis_prefix(redis_url: str) -> Iterator[str]:
    """A unique key prefix; every key under it is removed after the test."""
    import redis

    prefix = f"pt{uuid.uuid4().hex[:10]}"
    yield prefix
    client = redis.Redis.from_url(redis_url)
    try:
        drop_prefix(client, prefix)
    finally:
        client.close()


@pytest.fixture(scope="session")
def redis_cluster_url(services: LocalServices) -> str:
    """One node of a 3-master Redis Cluster the harness started for this session."""
    return services.redis_cluster()


@pytest.fixture(params=["single", "cluster"])
def redis_env(request: pytest.FixtureRequest, redis_url: str, redis_prefix: str
              ) -> Iterator[dict[str, str]]:
    """The [redis] settings of a single server, then of the 3-master cluster (tests that take
    this run once on each); keys under the test's prefix are removed from the cluster too."""
    if request.param == "single":
        yield {"PIPELINE_REDIS_URL": redis_url, "PIPELINE_REDIS_CLUSTER": "false"}
        return
    import redis

    url = request.getfixturevalue("redis_cluster_url")
    yield {"PIPELINE_REDIS_URL": url, "PIPELINE_REDIS_CLUSTER": "true"}
    client = redis.RedisCluster.from_url(url)
    try:
        drop_prefix(client, redis_prefix)
    finally:
        client.close()


@pytest.fixture(scope="session")
def pgbouncer_url(services: LocalServices) -> str:
    """Admin URL of a PgBouncer in pool_mode = transaction in front of the test PostgreSQL."""
    return services.pgbouncer()


@pytest.fixture
def pooled_database_url(database_url: str, pgbouncer_url: str) -> str:
    """The test's database, reached through PgBouncer in transaction pooling mode."""
    name = psycopg.conninfo.conninfo_to_dict(database_url)["dbname"]
    return _replace_db(pgbouncer_url, str(name))


@pytest.fixture(scope="session")
def s3(services: LocalServices) -> S3Endpoint:
    return services.s3()


@pytest.fixture
def s3_bucket(s3: S3Endpoint) -> Iterator[str]:
    """A unique bucket name; the stage creates it if needed; emptied and removed after."""
    from minio import Minio

    name = f"pt-{uuid.uuid4().hex[:12]}"
    yield name
    client = Minio(s3.endpoint, access_key=s3.access_key, secret_key=s3.secret_key,
                   secure=s3.secure, region=s3.region)
    drop_bucket(client, name)


@pytest.fixture
def s3_deny(s3: S3Endpoint, s3_bucket: str) -> Iterator[Callable[..., None]]:
    """``s3_deny("s3:DeleteObject", ..., key="*")``: a bucket policy refusing those actions on
    the objects ``key`` matches in ``s3_bucket`` to everyone (the test's credentials too), as
    an operator's S3 user without them; replaces the last one; removed before the bucket is."""
    from minio import Minio

    client = Minio(s3.endpoint, access_key=s3.access_key, secret_key=s3.secret_key,
                   secure=s3.secure, region=s3.region)
    denied: list[str] = []

    def deny(*actions: str, key: str = "*") -> None:
        denied.extend(actions)
        if not client.bucket_exists(s3_bucket):
            client.make_bucket(s3_bucket)
        client.set_bucket_policy(s3_bucket, json.dumps({"Version": "2012-10-17", "Statement": [
            {"Effect": "Deny", "Principal": "*", "Action": list(actions),
             "Resource": [f"arn:aws:s3:::{s3_bucket}/{key}"]}]}))

    yield deny
    if denied:
        client.delete_bucket_policy(s3_bucket)


@pytest.fixture(scope="session")
def osrm_url(services: LocalServices) -> str:
    return services.osrm()


@pytest.fixture
def pipeline_env(database_url: str) -> dict[str, str]:
    """Environment for the CLI: the test's database; other fixtures add their services."""
    return {"PIPELINE_DATABASE_URL": database_url}


@pytest.fixture
def full_env(pipeline_env: dict[str, str], redis_url: str, redis_prefix: str, s3: S3Endpoint,
             s3_bucket: str) -> dict[str, str]:
    """The test's database, Redis prefix and S3 bucket."""
    return {
        **pipeline_env,
        "PIPELINE_REDIS_URL": redis_url,
        "PIPELINE_REDIS_PREFIX": redis_prefix,
        "PIPELINE_S3_ENDPOINT": s3.endpoint,
        "PIPELINE_S3_ACCESS_KEY": s3.access_key,
        "PIPELINE_S3_SECRET_KEY": s3.secret_key,
        "PIPELINE_S3_BUCKET": s3_bucket,
        "PIPELINE_S3_SECURE": "true" if s3.secure else "false",
    }


@pytest.fixture
def run_cli(pipeline_env: dict[str, str]) -> Cli:
    return Cli(pipeline_env)
